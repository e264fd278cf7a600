//! The credentials file format (`credentialsFile` of a registry): what the
//! operator writes from a `MirrorRegistry`'s `credentialsSecretRef` and the
//! proxy reads. Its errors never quote a value: it may be the password.

use serde::{Deserialize, Serialize};

/// The content of a registry's `credentialsFile`: what `docker login`
/// would be given. The operator renders it from the `MirrorRegistry`'s
/// `credentialsSecretRef`; the proxy reads it with
/// [`UpstreamCredentials::from_json`].
///
/// `Debug` is written by hand so the password never reaches a log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for UpstreamCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a credentials file's content was rejected, naming the field (never
/// the values: they may be secrets).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct CredentialsError {
    /// `username`, `password`, another key the file has, or `<document>`.
    pub field: String,
    pub message: String,
}

impl UpstreamCredentials {
    /// Parses `{"username": "...", "password": "..."}`: both keys required,
    /// non-empty strings; any other key is an error.
    ///
    /// Checked by hand rather than with serde's derive because serde's
    /// messages may quote the offending value, and a value here may be the
    /// password.
    pub fn from_json(bytes: &[u8]) -> Result<Self, CredentialsError> {
        let err = |field: &str, message: String| CredentialsError {
            field: field.to_string(),
            message,
        };
        // serde_json's syntax errors give only a position, never the text.
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            err(
                "<document>",
                format!(
                    "not JSON (line {} column {}): expected {{\"username\": \"...\", \"password\": \"...\"}}",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        let serde_json::Value::Object(map) = value else {
            return Err(err(
                "<document>",
                "must be a JSON object {\"username\": \"...\", \"password\": \"...\"}".into(),
            ));
        };
        if let Some(unknown) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "username" | "password"))
        {
            return Err(err(
                unknown,
                "unknown key (only `username` and `password` are allowed)".into(),
            ));
        }
        let field = |name: &str| -> Result<String, CredentialsError> {
            match map.get(name) {
                None => Err(err(name, "missing".into())),
                Some(serde_json::Value::String(s)) if s.is_empty() => {
                    Err(err(name, "must not be empty".into()))
                }
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(err(name, "must be a string".into())),
            }
        };
        let username = field("username")?;
        if username.contains(':') {
            // Basic authentication splits `username:password` at the first
            // colon, so the upstream would see another user.
            return Err(err("username", "must not contain `:`".into()));
        }
        Ok(Self {
            username,
            password: field("password")?,
        })
    }
}
