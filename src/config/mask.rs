//! What `check-config` may show: the resolved config with every secret replaced by `***`:
//! `api_key` (a [`Secret`](super::Secret)), deployment `headers` and `env` values that came from
//! `${VAR}` or whose name looks like a credential, and the password of `limits.redis_url`.
//! It only renders; it must not change the config the gateway runs with.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use super::Config;

const MASK: &str = "***";

/// Parts of a name that mark a credential (`Authorization`, `X-Api-Key`, `Cookie`, ...).
const CREDENTIAL_WORDS: [&str; 8] = [
    "auth",
    "key",
    "token",
    "secret",
    "password",
    "passwd",
    "cookie",
    "credential",
];

/// Whether a header or variable name looks like it carries a credential (case-insensitive).
pub(super) fn is_credential_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    CREDENTIAL_WORDS.iter().any(|w| name.contains(w))
}

/// A copy of `cfg` that is safe to print. `from_env` holds the paths of values taken from
/// the environment.
pub(super) fn masked(cfg: &Config, from_env: &BTreeSet<String>) -> Config {
    let mut shown = cfg.clone();
    for (i, m) in shown.models.iter_mut().enumerate() {
        for (j, d) in m.deployments.iter_mut().enumerate() {
            let at = format!("models[{i}].deployments[{j}]");
            mask_values(&mut d.headers, &format!("{at}.headers"), from_env);
            mask_values(&mut d.env, &format!("{at}.env"), from_env);
        }
    }
    if let Some(url) = &mut shown.usage.url {
        *url = mask_url_password(url);
    }
    if let Some(url) = &mut shown.limits.redis_url {
        *url = mask_url_password(url);
    }
    // Its keys are listed in `auth.keys`: the output stands on its own.
    shown.auth.keys_file = None;
    shown
}

fn mask_values(map: &mut BTreeMap<String, String>, at: &str, from_env: &BTreeSet<String>) {
    for (name, value) in map.iter_mut() {
        if is_credential_name(name) || from_env.contains(&format!("{at}.{name}")) {
            *value = MASK.to_string();
        }
    }
}

/// `redis://user:pass@host` shown as `redis://user:***@host`; a URL that does not parse is
/// hidden whole.
fn mask_url_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => match u.set_password(Some(MASK)) {
            Ok(()) => u.to_string(),
            Err(()) => MASK.to_string(),
        },
        Ok(_) => url.to_string(),
        Err(_) => MASK.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_names() {
        for n in [
            "Authorization",
            "X-API-KEY",
            "api-key",
            "X-Session-Token",
            "Cookie",
            "DB_PASSWORD",
            "HF_TOKEN",
        ] {
            assert!(is_credential_name(n), "{n}");
        }
        for n in [
            "OpenAI-Organization",
            "X-Request-Source",
            "LLAMA_ARG_THREADS",
        ] {
            assert!(!is_credential_name(n), "{n}");
        }
    }

    #[test]
    fn redis_password_is_masked() {
        assert_eq!(
            mask_url_password("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(mask_url_password("rediss://u:p@h/"), "rediss://u:***@h/");
        assert_eq!(
            mask_url_password("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(mask_url_password("not a url :pw@"), "***");
    }
}
