//! `ConfigError`: what is wrong with a config and how to fix it, and the rendering of a TOML
//! syntax error as file, line, column and the offending line (with the caret under the fault).
//! It must not leak secrets: a shown line that names a credential has its strings starred out.

use std::fmt;

/// A start-up configuration error: says which key (or line) is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A key has a missing, unknown or bad value.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// The text is not TOML. `excerpt` shows the line with a caret under the fault.
    #[error("line {line}, column {column}: not valid TOML: {message}\n{excerpt}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
        excerpt: String,
    },
    /// The config file itself cannot be read.
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    /// An error in the named file.
    #[error("{file}: {source}")]
    InFile {
        file: String,
        source: Box<ConfigError>,
    },
}

impl ConfigError {
    pub(super) fn invalid(key: impl fmt::Display, message: impl fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    /// The key at fault (`models[0].deployments[1].url`), when one is.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::InFile { source, .. } => source.key(),
            _ => None,
        }
    }

    /// A syntax error of `toml`, located in `text`.
    pub(super) fn syntax(text: &str, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim().replace('\n', " ");
        let start = e.span().map_or(0, |s| s.start).min(text.len());
        let Some(before) = text.get(..start) else {
            return ConfigError::invalid("(document)", format!("not valid TOML: {message}"));
        };
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = before.matches('\n').count() + 1;
        let column = before[line_start..].chars().count() + 1;
        let shown = text[line_start..line_end].trim_end_matches('\r');
        ConfigError::Syntax {
            line,
            column,
            message,
            excerpt: excerpt(line, column, shown),
        }
    }
}

/// Errors at start-up are `Result<_, ConfigError>`; this builds the `Err`.
pub(super) fn err<T>(key: impl fmt::Display, msg: impl fmt::Display) -> Result<T, ConfigError> {
    Err(ConfigError::invalid(key, msg))
}

/// Characters of the offending line shown at most, around the fault.
const WINDOW: usize = 120;

/// The line as a compiler shows it, a caret under `column`: masked, windowed, printable.
fn excerpt(line: usize, column: usize, text: &str) -> String {
    let masked = mask_strings_if_credential(text);
    let chars: Vec<char> = masked
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let from = column.saturating_sub(WINDOW / 2 + 1).min(chars.len());
    let to = (from + WINDOW).min(chars.len());
    let mut shown: String = chars[from..to].iter().collect();
    let mut caret = column - 1 - from;
    if from > 0 {
        shown.insert_str(0, "...");
        caret += 3;
    }
    if to < chars.len() {
        shown.push_str("...");
    }
    let n = line.to_string();
    let pad = " ".repeat(n.len());
    format!("{pad} |\n{n} | {shown}\n{pad} | {}^", " ".repeat(caret))
}

/// A line that names a credential (`api_key = "sk-..."`) has the inside of its strings starred
/// out, one `*` per character so that the caret still points at the fault.
fn mask_strings_if_credential(line: &str) -> String {
    if !super::mask::is_credential_name(line) && !line.contains("sk-") {
        return line.to_string();
    }
    let mut out = String::with_capacity(line.len());
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                out.push(c);
            }
            Some(_) => out.push('*'),
            None => {
                if c == '"' || c == '\'' {
                    quote = Some(c);
                }
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax(text: &str) -> String {
        let e = toml::from_str::<toml::Value>(text).unwrap_err();
        ConfigError::syntax(text, &e).to_string()
    }

    #[test]
    fn syntax_error_shows_line_column_and_the_line() {
        let e = syntax("[server]\n\nttft_ms = 5 6\n");
        assert!(e.starts_with("line 3, column 13: not valid TOML: "), "{e}");
        assert!(e.contains("3 | ttft_ms = 5 6\n  |             ^"), "{e}");
    }

    #[test]
    fn syntax_error_masks_credentials_and_long_lines() {
        let e = syntax("api_key = \"sk-live-123\" x\n");
        assert!(!e.contains("sk-live-123"), "{e}");
        assert!(e.contains("api_key = \"***********\" x"), "{e}");
        let long = format!("a = \"{}\" 5\n", "x".repeat(500));
        let e = syntax(&long);
        assert!(e.len() < 400, "{e}");
        assert!(e.contains("...") && e.contains("\" 5"), "{e}");
        let at_end = syntax("a = ");
        assert!(at_end.starts_with("line 1, column"), "{at_end}");
        let multibyte = syntax("a = 1\nb = \"é\" x\n");
        assert!(multibyte.starts_with("line 2, column 9"), "{multibyte}");
    }
}
