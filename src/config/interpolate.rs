//! `${NAME}` interpolation of every string value of a parsed TOML document (`$${` writes a
//! literal `${`). Owns the syntax and its errors, which name the key and the variable, never
//! its value. It reports which keys took a value from the environment, so that they can be
//! masked; it must not log or keep the values.

use super::error::{err, ConfigError};

/// Where `${NAME}` values come from: the process environment, or a test's table.
pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Replaces `${NAME}` in every string value with the variable's value; `$${` writes `${`.
/// `from_env` is called with the path (`models[0].deployments[1].headers.X-Org`) of every
/// value that took something from the environment.
pub(super) fn interpolate(
    v: &mut toml::Value,
    env: Env,
    from_env: &mut dyn FnMut(&str),
) -> Result<(), ConfigError> {
    walk(v, &mut String::new(), env, from_env)
}

fn walk(
    v: &mut toml::Value,
    path: &mut String,
    env: Env,
    from_env: &mut dyn FnMut(&str),
) -> Result<(), ConfigError> {
    match v {
        toml::Value::String(s) if s.contains('$') => {
            let (out, substituted) = interpolate_str(s, path, env)?;
            if substituted {
                from_env(path);
            }
            *s = out;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path, env, from_env)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(t) => {
            for (k, item) in t.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                walk(item, path, env, from_env)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// One string: the result, and whether a variable was substituted.
pub(super) fn interpolate_str(
    s: &str,
    path: &str,
    env: Env,
) -> Result<(String, bool), ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut substituted = false;
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return err(path, "has \"${\" without a closing \"}\"; write ${NAME}, or $${ for a literal \"${\"");
            };
            out.push_str(&lookup(&after[..end], path, env)?);
            substituted = true;
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok((out, substituted))
}

fn lookup(name: &str, path: &str, env: Env) -> Result<String, ConfigError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return err(
            path,
            format!("\"${{{name}}}\" is not a variable name; use letters, digits and '_'"),
        );
    }
    match env(name) {
        Some(val) => Ok(val),
        None => err(
            path,
            format!("environment variable {name} is not set; export {name}=... before starting, or remove the key"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Result<String, ConfigError> {
        interpolate_str(s, "k", &|k| (k == "A").then(|| "x".to_string())).map(|r| r.0)
    }

    #[test]
    fn dollar_escapes() {
        assert_eq!(one("a$${b}").unwrap(), "a${b}");
        assert_eq!(one("$5").unwrap(), "$5");
        assert_eq!(one("${A}-${A}").unwrap(), "x-x");
        assert!(one("${A").is_err());
        assert!(one("${A-B}").is_err());
        assert!(one("${B}")
            .unwrap_err()
            .to_string()
            .contains("B is not set"));
    }

    #[test]
    fn reports_the_keys_that_took_a_value() {
        let mut v: toml::Value =
            toml::from_str("a = \"${A}\"\nb = \"$${A}\"\n[t]\nc = [\"1\", \"${A}\"]").unwrap();
        let mut seen = Vec::new();
        interpolate(&mut v, &|_| Some("x".into()), &mut |p| {
            seen.push(p.to_string())
        })
        .unwrap();
        assert_eq!(seen, ["a", "t.c[1]"]);
        assert_eq!(v["b"].as_str(), Some("${A}"));
    }
}
