//! The schema of `[auth]`: API keys declared by the hash of their secret, and the `keys_file`
//! that holds more of them. Owns the `sha256:<hex>` format and reading the keys file; it must
//! never hold, print or echo a key's secret (a value that looks like one is refused without
//! being repeated). The `authorize` phase (`proxy::authorize`) checks requests against them.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::interpolate::{interpolate, Env};
use crate::admission::Priority;

/// Whether requests need an API key.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No key needed (the default).
    #[default]
    None,
    /// Every request needs one of `keys`; `/admin/*` needs one of `admin_keys`.
    Keys,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub mode: AuthMode,
    /// Keys that may use `/admin/*`, by hash.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_keys: Vec<KeyHash>,
    /// A TOML file with more `[[keys]]` tables, relative to the config file. After loading, its
    /// keys are in `keys` (after the inline ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_file: Option<String>,
    /// The client keys: the inline `[[auth.keys]]`, then those of `keys_file`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyConfig>,
}

/// One `[[auth.keys]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Shown in logs, metrics and headers instead of the key: `[A-Za-z0-9_.-]{1,64}`, unique.
    pub name: String,
    /// `sha256:<64 lowercase hex>` of the secret.
    pub hash: KeyHash,
    /// The models this key may use; `None`: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Requests above it are lowered to it.
    #[serde(default = "default_max_priority")]
    pub max_priority: Priority,
    /// The priority of requests that name none.
    #[serde(default)]
    pub default_priority: Priority,
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// What the key may spend per period, in currency units (from the usage ledger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Tokens (input + output) the key may use per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_budget: Option<Budget>,
}

/// `budget = { amount = 50.0, period = "month" }`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub amount: f64,
    pub period: Period,
}

fn default_max_priority() -> Priority {
    Priority::Critical
}

/// The SHA-256 of a key's secret, written `sha256:<64 lowercase hex>`. Not a secret itself: it
/// may be printed.
#[derive(Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyHash([u8; 32]);

const PREFIX: &str = "sha256:";

impl KeyHash {
    /// The hash of a secret.
    pub fn from_digest(digest: [u8; 32]) -> Self {
        KeyHash(digest)
    }
    /// The 32 bytes of the digest.
    pub fn digest(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<KeyHash> for String {
    fn from(h: KeyHash) -> String {
        h.to_string()
    }
}

impl TryFrom<String> for KeyHash {
    type Error = String;
    /// Errors never repeat the value: it may be a secret pasted by mistake.
    fn try_from(s: String) -> Result<KeyHash, String> {
        s.parse()
    }
}

impl std::str::FromStr for KeyHash {
    type Err = String;
    fn from_str(s: &str) -> Result<KeyHash, String> {
        if s.starts_with("sk-") {
            return Err("this looks like a raw API key, not its hash; never put the secret in the config: run `mofa-gateway keys hash` (it reads the key on stdin) and paste the \"sha256:...\" it prints".into());
        }
        let Some(hex) = s.strip_prefix(PREFIX) else {
            return Err(
                "must be \"sha256:\" followed by 64 hex digits (from `mofa-gateway keys hash`)"
                    .into(),
            );
        };
        let bytes = hex.as_bytes();
        if bytes.len() != 64 || !bytes.iter().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "must be \"sha256:\" followed by 64 hex digits, got {} characters after \"sha256:\"",
                hex.chars().count()
            ));
        }
        if bytes.iter().any(|b| b.is_ascii_uppercase()) {
            return Err("write the hex digits in lowercase".into());
        }
        let mut digest = [0u8; 32];
        for (d, pair) in digest.iter_mut().zip(bytes.chunks_exact(2)) {
            *d = (nibble(pair[0]) << 4) | nibble(pair[1]);
        }
        Ok(KeyHash(digest))
    }
}

/// The value of one lowercase hex digit (checked by the caller).
fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        _ => c.wrapping_sub(b'a').wrapping_add(10) & 0x0f,
    }
}

/// The contents of a `keys_file`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyConfig>,
}

/// The keys read from `keys_file`, and how errors name it.
pub(super) struct FileKeys {
    /// `auth.keys_file (<path>)`.
    pub label: String,
    pub keys: Vec<KeyConfig>,
}

/// Reads `keys_file` (relative to `dir`), with `${ENV}` interpolated as in the config.
pub(super) fn read_keys_file(file: &str, dir: &Path, env: Env) -> Result<FileKeys, ConfigError> {
    let path = dir.join(file);
    let label = format!("auth.keys_file ({})", path.display());
    let in_file = |e: ConfigError| ConfigError::invalid(&label, e);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        in_file(ConfigError::invalid(
            "cannot read it",
            format!("{e}; the path is relative to the config file"),
        ))
    })?;
    let mut value = super::parse_toml(&text).map_err(in_file)?;
    interpolate(&mut value, env, &mut |_| {}).map_err(in_file)?;
    let parsed: KeysFile = super::deserialize(value).map_err(in_file)?;
    Ok(FileKeys {
        label: label.clone(),
        keys: parsed.keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trips_and_refuses_secrets_without_echo() {
        let hex = "0123456789abcdef".repeat(4);
        let h: KeyHash = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(h.to_string(), format!("sha256:{hex}"));
        assert_eq!(h.digest()[0], 0x01);
        assert_eq!(h.digest()[31], 0xef);
        let e = "sk-mofa-secretvalue".parse::<KeyHash>().unwrap_err();
        assert!(e.contains("keys hash") && !e.contains("secretvalue"), "{e}");
        assert!("sha256:abc".parse::<KeyHash>().is_err());
        assert!(format!("sha256:{}", hex.to_uppercase())
            .parse::<KeyHash>()
            .unwrap_err()
            .contains("lowercase"));
        assert!(format!("md5:{hex}").parse::<KeyHash>().is_err());
        assert!(format!("sha256:{}", "g".repeat(64))
            .parse::<KeyHash>()
            .is_err());
    }
}

/// A budget's period, on calendar boundaries in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Month,
    Total,
}
