//! Values that must never be printed: passwords, tokens, URLs with credentials.

use std::cell::Cell;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret string. `Debug` and `Display` print `***`; use [`Secret::expose`] to read it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret value (only to hand it to a client library).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

thread_local! {
    /// Set while [`with_secrets_exposed`] runs on this thread.
    static EXPOSE: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with secrets serialized in clear on this thread (for [`crate::Config::to_toml_with_secrets`]:
/// handing a whole configuration to a child process over a pipe). Everywhere else they
/// serialize as `***`.
pub(crate) fn with_secrets_exposed<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            EXPOSE.with(|e| e.set(self.0));
        }
    }
    let _reset = Reset(EXPOSE.with(|e| e.replace(true)));
    f()
}

/// Whether secrets serialize in clear right now (see [`with_secrets_exposed`]).
pub fn secrets_exposed() -> bool {
    EXPOSE.with(Cell::get)
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if secrets_exposed() { &self.0 } else { "***" })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A URL that may carry credentials (`amqp://user:pass@host`, `redis://:pass@host`,
/// `postgres://user:pass@host/db`). `Debug`, `Display` and serialization show it with the
/// password replaced by `***`; [`SecretUrl::expose`] gives the real one to the client library.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wrap a URL.
    pub fn new(s: impl Into<String>) -> Self {
        SecretUrl(s.into())
    }

    /// The real URL, credentials included.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password (and any `password=`/`secret=`/`token=` query value) replaced
    /// by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

/// Replace credentials in `s` (a URL or a string containing one) by `***`.
pub fn redact_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.has_host() || u.password().is_some() => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let lower = k.to_ascii_lowercase();
                    if ["password", "secret", "token", "key"]
                        .iter()
                        .any(|w| lower.contains(w))
                    {
                        (k.into_owned(), "***".to_owned())
                    } else {
                        (k.into_owned(), v.into_owned())
                    }
                })
                .collect();
            if !pairs.is_empty() {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        // Not a URL we can parse: redact anything between "://" and "@" to be safe.
        _ => match (s.find("://"), s.rfind('@')) {
            (Some(a), Some(b)) if b > a + 3 => format!("{}***{}", &s[..a + 3], &s[b..]),
            _ => s.to_owned(),
        },
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if secrets_exposed() {
            s.serialize_str(&self.0)
        } else {
            s.serialize_str(&self.redacted())
        }
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretUrl)
    }
}

/// Whether a raw client setting name holds a secret (for passthrough maps).
pub fn is_secret_setting(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "sasl.oauthbearer.config",
        "ssl.key.pem",
        "private",
    ]
    .iter()
    .any(|w| n.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        let u = SecretUrl::new("amqp://guest:hunter2@127.0.0.1:5672/%2f");
        assert!(!format!("{u:?}").contains("hunter2"));
        assert!(!format!("{u}").contains("hunter2"));
        assert!(format!("{u}").contains("guest:***@127.0.0.1"));
        let r = SecretUrl::new("redis://:hunter2@localhost:6379/0");
        assert!(!r.redacted().contains("hunter2"));
        let p = SecretUrl::new("postgres://app:hunter2@db/x?sslmode=require&password=hunter2");
        assert!(!p.redacted().contains("hunter2"), "{}", p.redacted());
        assert_eq!(SecretUrl::new("memory").redacted(), "memory");
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert!(!serde_json::to_string(&s).unwrap().contains("hunter2"));
    }
}
