//! Configuration: a TOML file, environment variables or a URL select the backend and guarantee.
//!
//! ```toml
//! guarantee = "exactly-once"
//!
//! [backend]
//! kind = "kafka"            # memory | kafka | rabbitmq | sqs
//! bootstrap = "127.0.0.1:9092"
//!
//! [consumer]
//! concurrency = 8
//! retry = { max_attempts = 5, initial_backoff = "200ms", max_backoff = "30s" }
//!
//! [idempotency]
//! store = "redis://127.0.0.1:6379"
//! ttl = "24h"
//! ```
//!
//! [`Config`] is generic over its `[backend]` section. Each backend crate owns its section type
//! (`courier_kafka::KafkaConfig`, …): its fields, validation and URL scheme, through the
//! [`Backend`](crate::Backend) trait. The `courier` facade's `Config` is `Config<BackendConfig>`,
//! whose `BackendConfig` is an enum of the compiled-in backends selected by `kind`; a backend
//! crate used alone takes `Config<ItsSection>`.

mod secret;
mod url;

use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use self::url::BackendUrl;
pub use secret::{is_secret_setting, redact_url, secrets_exposed, Secret, SecretUrl};

use crate::{Error, Guarantee, Result, RetryPolicy};

/// The whole courier configuration, over the `[backend]` section type `B`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config<B> {
    /// The delivery guarantee (default at-least-once).
    #[serde(default)]
    pub guarantee: Guarantee,
    /// Which broker, and its settings.
    pub backend: B,
    /// Consume-loop settings.
    #[serde(default)]
    pub consumer: ConsumerConfig,
    /// The idempotent-consumer layer (needed for exactly-once effects on most brokers).
    #[serde(default)]
    pub idempotency: Option<IdempotencyConfig>,
}

/// What [`Config`] needs of its `[backend]` section: its kind, its validation and its URL form.
/// Every [`Backend`](crate::Backend) is one; the `courier` facade's enum of backends is one by
/// dispatching to the backend its `kind` selects.
pub trait BackendSection:
    Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The backend name (`[backend] kind`).
    fn kind(&self) -> &'static str;
    /// Check the section's values (called by [`Config::validate`]).
    fn validate(&self) -> Result<()>;
    /// The section a courier URL describes; `url`'s common parameters are already taken.
    fn from_url(url: &BackendUrl<'_>) -> Result<Self>;
    /// Adjust the `[backend]` table before it is deserialized (a single backend drops its own
    /// `kind`; the facade explains a kind that is not compiled in).
    fn prepare(table: &mut toml::Table) -> Result<()>;
}

/// `[consumer]`: how the consume loop runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Messages handled at once (same key: never at once, in order).
    pub concurrency: usize,
    /// Retry policy for failed handlers.
    pub retry: RetryPolicy,
    /// How long shutdown waits for in-flight handlers.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Fail (and retry) handler runs longer than this.
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Option<Duration>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            concurrency: 8,
            retry: RetryPolicy::default(),
            shutdown_timeout: Duration::from_secs(30),
            handler_timeout: None,
        }
    }
}

/// What the idempotent layer does when its store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StoreFailurePolicy {
    /// Do not process; redeliver later. Nothing is lost, nothing is duplicated (default).
    #[default]
    FailClosed,
    /// Process without dedup (counted): availability over exactly-once.
    FailOpen,
}

/// `[idempotency]`: the idempotent-consumer layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// `memory`, `redis://…` or `postgres://…` (credentials never printed).
    pub store: SecretUrl,
    /// How long a completed key is remembered (the dedup window).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Lease of an in-progress key; `None` = the backend's redelivery window.
    #[serde(with = "humantime_serde")]
    pub lease: Option<Duration>,
    /// Store outage policy.
    pub on_store_error: StoreFailurePolicy,
    /// Key namespace (default: the consumer group).
    pub namespace: Option<String>,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            store: SecretUrl::new("memory"),
            ttl: Duration::from_secs(24 * 3600),
            lease: None,
            on_store_error: StoreFailurePolicy::FailClosed,
            namespace: None,
        }
    }
}

impl<B: BackendSection + Default> Default for Config<B> {
    fn default() -> Self {
        Config::new(B::default())
    }
}

impl<B: BackendSection> Config<B> {
    /// At-least-once over `backend`, with the default `[consumer]` and no `[idempotency]`.
    pub fn new(backend: impl Into<B>) -> Self {
        Config {
            guarantee: Guarantee::AtLeastOnce,
            backend: backend.into(),
            consumer: ConsumerConfig::default(),
            idempotency: None,
        }
    }

    /// Set the guarantee.
    pub fn with_guarantee(mut self, g: Guarantee) -> Self {
        self.guarantee = g;
        self
    }

    /// Set the idempotency section.
    pub fn with_idempotency(mut self, i: IdempotencyConfig) -> Self {
        self.idempotency = Some(i);
        self
    }

    /// The same guarantee, `[consumer]` and `[idempotency]` over another backend section — how
    /// the facade hands one backend its own `Config<ItsSection>`.
    pub fn with_backend<C: BackendSection>(&self, backend: C) -> Config<C> {
        Config {
            guarantee: self.guarantee,
            backend,
            consumer: self.consumer.clone(),
            idempotency: self.idempotency.clone(),
        }
    }

    /// Parse TOML text.
    pub fn from_toml_str(s: &str) -> Result<Self> {
        let mut table: toml::Table =
            toml::from_str(s).map_err(|e| Error::config(format!("{e}")))?;
        let mut prepared = false;
        if let Some(toml::Value::Table(backend)) = table.get_mut("backend") {
            let before = backend.clone();
            B::prepare(backend)?;
            prepared = *backend != before;
        }
        // From the text when the section is as written, so an error shows its line and column
        // (`crates/courier/tests/config.rs::errors_in_a_file_show_where`).
        let c: Config<B> = if prepared {
            toml::Value::Table(table).try_into()
        } else {
            toml::from_str(s)
        }
        .map_err(|e: toml::de::Error| Error::config(e.to_string().trim().to_owned()))?;
        c.validate()?;
        Ok(c)
    }

    /// The configuration as TOML **with its secrets in clear** (passwords, credentials in URLs,
    /// secret client settings), such that [`Config::from_toml_str`] gives it back. Only for
    /// handing the configuration to a process of your own over a private channel (`courier
    /// verify` passes it to its consumer processes over a pipe); never log or store it. Plain
    /// serialization redacts secrets as `***`.
    pub fn to_toml_with_secrets(&self) -> Result<String> {
        secret::with_secrets_exposed(|| toml::to_string(self))
            .map_err(|e| Error::config(format!("cannot serialize the configuration: {e}")))
    }

    /// Read a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let s = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!("cannot read config file {}: {e}", path.display()))
        })?;
        Self::from_toml_str(&s).map_err(|e| match e {
            Error::Config { message } => Error::config(format!("{}: {message}", path.display())),
            other => other,
        })
    }

    /// Parse a URL: `<scheme>://…?<parameters>`. The scheme picks the backend, which reads the
    /// rest (see each backend's `from_url`, e.g. `kafka://host:port[,host:port]`,
    /// `amqp[s]://user:pass@host/vhost`, `sqs://[region][?endpoint=http://host:port]`,
    /// `memory://[name]`). Parameters every backend takes: `guarantee`, `auto_create`,
    /// `concurrency`, `idempotency` (a store URL). A parameter the backend does not take, or a
    /// URL without `//` after the scheme, is refused (a typo must not fall back to a default).
    pub fn from_url(s: &str) -> Result<Self> {
        let u = BackendUrl::parse(s)?;
        let mut consumer = ConsumerConfig::default();
        let mut guarantee = Guarantee::default();
        let mut idempotency = None;
        for (k, v) in u.common_params() {
            match k {
                "guarantee" => guarantee = v.parse()?,
                "concurrency" => {
                    consumer.concurrency = v
                        .parse()
                        .map_err(|_| Error::config(format!("concurrency={v} must be a number")))?
                }
                "idempotency" => {
                    idempotency = Some(IdempotencyConfig {
                        store: SecretUrl::new(v),
                        ..IdempotencyConfig::default()
                    })
                }
                _ => {}
            }
        }
        let c = Config {
            guarantee,
            backend: B::from_url(&u)?,
            consumer,
            idempotency,
        };
        c.validate()?;
        Ok(c)
    }

    /// Build from the environment: `COURIER_CONFIG` (a TOML file) or `COURIER_URL`, else
    /// `Config::default()` (for the facade: the memory broker); then `COURIER_GUARANTEE`
    /// overrides the guarantee.
    pub fn from_env() -> Result<Self>
    where
        B: Default,
    {
        let mut c = if let Ok(path) = std::env::var("COURIER_CONFIG") {
            Self::from_file(path)?
        } else if let Ok(url) = std::env::var("COURIER_URL") {
            Self::from_url(&url)?
        } else {
            Self::default()
        };
        if let Ok(g) = std::env::var("COURIER_GUARANTEE") {
            c.guarantee = g.parse()?;
        }
        c.validate()?;
        Ok(c)
    }

    /// Check the values: the `[consumer]` and `[idempotency]` sections here, the `[backend]`
    /// section by its backend.
    pub fn validate(&self) -> Result<()> {
        self.consumer.retry.validate()?;
        if self.consumer.concurrency == 0 {
            return Err(Error::config("consumer.concurrency must be at least 1"));
        }
        self.backend.validate()?;
        if let Some(i) = &self.idempotency {
            let store = i.store.expose();
            if !(store == "memory"
                || store.starts_with("redis://")
                || store.starts_with("rediss://")
                || store.starts_with("postgres://")
                || store.starts_with("postgresql://"))
            {
                return Err(Error::config(format!(
                    "idempotency.store {:?} is not supported: use \"memory\", redis://… or postgres://…",
                    i.store.redacted()
                )));
            }
        }
        Ok(())
    }

    /// The config as TOML (secrets redacted).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}
