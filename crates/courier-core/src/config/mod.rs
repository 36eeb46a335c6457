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

mod kafka;
mod memory;
mod rabbitmq;
mod secret;
mod sqs;

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use kafka::KafkaConfig;
pub use memory::{MemoryConfig, MemoryFaults};
pub use rabbitmq::{QueueType, RabbitMqConfig};
pub use secret::{is_secret_setting, redact_url, Secret, SecretUrl};
pub use sqs::SqsConfig;

use crate::{Error, Guarantee, Result, RetryPolicy};

/// The whole courier configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The delivery guarantee (default at-least-once).
    #[serde(default)]
    pub guarantee: Guarantee,
    /// Which broker, and its settings.
    pub backend: BackendConfig,
    /// Consume-loop settings.
    #[serde(default)]
    pub consumer: ConsumerConfig,
    /// The idempotent-consumer layer (needed for exactly-once effects on most brokers).
    #[serde(default)]
    pub idempotency: Option<IdempotencyConfig>,
}

/// The broker and its settings; `kind` selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[non_exhaustive]
pub enum BackendConfig {
    /// In-process broker.
    Memory(MemoryConfig),
    /// Kafka.
    Kafka(KafkaConfig),
    /// RabbitMQ.
    Rabbitmq(RabbitMqConfig),
    /// AWS SQS.
    Sqs(SqsConfig),
}

impl BackendConfig {
    /// The backend name.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Memory(_) => "memory",
            BackendConfig::Kafka(_) => "kafka",
            BackendConfig::Rabbitmq(_) => "rabbitmq",
            BackendConfig::Sqs(_) => "sqs",
        }
    }
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

impl Default for Config {
    fn default() -> Self {
        Config::memory()
    }
}

impl Config {
    /// The embedded memory broker with at-least-once.
    pub fn memory() -> Self {
        Config {
            guarantee: Guarantee::AtLeastOnce,
            backend: BackendConfig::Memory(MemoryConfig::default()),
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

    /// Parse TOML text.
    pub fn from_toml_str(s: &str) -> Result<Self> {
        let c: Config = toml::from_str(s).map_err(|e| Error::config(format!("{e}")))?;
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

    /// Parse a URL: `memory://[name]`, `kafka://host:port[,host:port]`, `amqp[s]://user:pass@host/vhost`,
    /// `sqs://[region][?endpoint=http://host:port]`. Query parameters: `guarantee`,
    /// `auto_create`, `concurrency`, `idempotency` (a store URL); for SQS `endpoint` and `fifo`;
    /// for RabbitMQ `tls_ca_file`, `tls_client_identity` and `tls_client_identity_password`; for
    /// Kafka `security_protocol`, `sasl_mechanism`, `sasl_username`, `sasl_password` and
    /// `ssl_ca_location` (librdkafka settings). A parameter of another backend, a URL without `//`
    /// after the scheme, a path where the scheme has none, or a `kafka://` without a broker
    /// address is refused (a typo must not fall back to a default).
    pub fn from_url(s: &str) -> Result<Self> {
        let Some((scheme, rest)) = s.split_once("://") else {
            let fix = match s.split_once(':') {
                Some((scheme, rest)) => {
                    format!("write {scheme}://{}", rest.trim_start_matches('/'))
                }
                None => {
                    "e.g. memory://, kafka://host:9092, amqp://host, sqs://us-east-1".to_owned()
                }
            };
            return Err(Error::config(format!(
                "invalid courier URL {:?}: a courier URL is <scheme>://…; {fix}",
                redact_url(s)
            )));
        };
        // The authority runs to the first `/` or `?`; what follows up to `?` is the path.
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = rest[..end].to_owned();
        let path = &rest[end..rest.find('?').unwrap_or(rest.len()).max(end)];
        if matches!(scheme, "memory" | "kafka" | "sqs") && !path.is_empty() && path != "/" {
            return Err(Error::config(format!(
                "invalid courier URL {:?}: {scheme}:// URLs have no path (got {path:?})",
                redact_url(s)
            )));
        }
        // The `url` crate accepts one host; a Kafka bootstrap list (`kafka://a:9092,b:9092`)
        // is taken verbatim from the authority and parsed with a placeholder host.
        let parse_text = if s.starts_with("kafka://") && authority.contains(',') {
            s.replacen(&authority, "bootstrap-list", 1)
        } else {
            s.to_owned()
        };
        let u = url::Url::parse(&parse_text)
            .map_err(|e| Error::config(format!("invalid courier URL {:?}: {e}", redact_url(s))))?;
        let mut guarantee = Guarantee::default();
        let mut auto_create = None;
        let mut consumer = ConsumerConfig::default();
        let mut idempotency = None;
        // Parameters of one backend, applied (or refused) once the scheme has picked it.
        let mut extra: Vec<(String, String)> = Vec::new();
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "guarantee" => guarantee = v.parse()?,
                "auto_create" => auto_create = Some(url_bool("auto_create", &v)?),
                "concurrency" => {
                    consumer.concurrency = v
                        .parse()
                        .map_err(|_| Error::config(format!("concurrency={v} must be a number")))?
                }
                "idempotency" => {
                    idempotency = Some(IdempotencyConfig {
                        store: SecretUrl::new(v.into_owned()),
                        ..IdempotencyConfig::default()
                    })
                }
                other => extra.push((other.to_owned(), v.into_owned())),
            }
        }
        let backend = match u.scheme() {
            "memory" => {
                if let Some((name, _)) = extra.first() {
                    return Err(unknown_param(name, "memory", &[]));
                }
                BackendConfig::Memory(MemoryConfig {
                    broker: u.host_str().filter(|h| !h.is_empty()).unwrap_or("default").to_owned(),
                    auto_create: auto_create.unwrap_or(false),
                    ..MemoryConfig::default()
                })
            }
            "kafka" if authority.is_empty() => {
                return Err(Error::config(format!(
                    "invalid courier URL {:?}: kafka:// needs the bootstrap servers, e.g. kafka://127.0.0.1:9092",
                    redact_url(s)
                )))
            }
            "kafka" => {
                let mut k = KafkaConfig {
                    bootstrap: authority,
                    auto_create: auto_create.unwrap_or(false),
                    ..KafkaConfig::default()
                };
                for (name, v) in extra.drain(..) {
                    let Some((_, setting)) = KAFKA_PARAMS.iter().find(|(p, _)| *p == name) else {
                        let own: Vec<&str> = KAFKA_PARAMS.iter().map(|(p, _)| *p).collect();
                        return Err(unknown_param(&name, "kafka", &own));
                    };
                    k.settings.insert((*setting).to_owned(), v);
                }
                BackendConfig::Kafka(k)
            }
            "amqp" | "amqps" => {
                let mut plain = u.clone();
                plain.set_query(None);
                let mut r = RabbitMqConfig {
                    url: SecretUrl::new(plain.to_string()),
                    auto_create: auto_create.unwrap_or(false),
                    ..RabbitMqConfig::default()
                };
                for (name, v) in extra.drain(..) {
                    match name.as_str() {
                        "tls_ca_file" => r.tls_ca_file = Some(v),
                        "tls_client_identity" => r.tls_client_identity = Some(v),
                        "tls_client_identity_password" => {
                            r.tls_client_identity_password = Some(Secret::new(v))
                        }
                        _ => return Err(unknown_param(&name, u.scheme(), RABBITMQ_PARAMS)),
                    }
                }
                BackendConfig::Rabbitmq(r)
            }
            "sqs" => {
                let mut q = SqsConfig {
                    region: u.host_str().filter(|h| !h.is_empty()).map(str::to_owned),
                    auto_create: auto_create.unwrap_or(false),
                    ..SqsConfig::default()
                };
                for (name, v) in extra.drain(..) {
                    match name.as_str() {
                        "endpoint" => q.endpoint = Some(v),
                        "fifo" => q.fifo = url_bool("fifo", &v)?,
                        _ => return Err(unknown_param(&name, "sqs", SQS_PARAMS)),
                    }
                }
                BackendConfig::Sqs(q)
            }
            other => {
                return Err(Error::config(format!(
                    "unknown backend scheme {other:?}: use memory://, kafka://, amqp://, amqps:// or sqs://"
                )))
            }
        };
        let c = Config {
            guarantee,
            backend,
            consumer,
            idempotency,
        };
        c.validate()?;
        Ok(c)
    }

    /// Build from the environment: `COURIER_CONFIG` (a TOML file) or `COURIER_URL`, else the
    /// memory broker; then `COURIER_GUARANTEE` overrides the guarantee.
    pub fn from_env() -> Result<Self> {
        let mut c = if let Ok(path) = std::env::var("COURIER_CONFIG") {
            Self::from_file(path)?
        } else if let Ok(url) = std::env::var("COURIER_URL") {
            Self::from_url(&url)?
        } else {
            Self::memory()
        };
        if let Ok(g) = std::env::var("COURIER_GUARANTEE") {
            c.guarantee = g.parse()?;
        }
        c.validate()?;
        Ok(c)
    }

    /// Check values that do not make sense whatever the broker.
    pub fn validate(&self) -> Result<()> {
        self.consumer.retry.validate()?;
        if self.consumer.concurrency == 0 {
            return Err(Error::config("consumer.concurrency must be at least 1"));
        }
        match &self.backend {
            BackendConfig::Memory(m) => {
                m.faults.validate()?;
                if m.max_payload == 0 {
                    return Err(Error::config("backend.max_payload must be > 0"));
                }
            }
            BackendConfig::Kafka(k) => {
                if k.bootstrap.trim().is_empty() {
                    return Err(Error::config(
                        "backend.bootstrap is empty: set it to host:port of a Kafka broker (e.g. 127.0.0.1:9092)",
                    ));
                }
                if k.partitions < 1 {
                    return Err(Error::config("backend.partitions must be at least 1"));
                }
                if k.commit_interval.is_zero() || k.commit_interval > k.delivery_timeout {
                    return Err(Error::config(format!(
                        "backend.commit_interval = {:?} must be above zero and at most backend.delivery_timeout ({:?}); 100ms is the default",
                        k.commit_interval, k.delivery_timeout
                    )));
                }
                if k.commit_max_inputs == 0 {
                    return Err(Error::config(
                        "backend.commit_max_inputs must be at least 1 (1000 is the default)",
                    ));
                }
            }
            BackendConfig::Rabbitmq(r) => {
                let url = r.url.expose();
                if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                    return Err(Error::config(format!(
                        "backend.url {:?} must start with amqp:// or amqps://",
                        r.url.redacted()
                    )));
                }
                if r.prefetch == 0 {
                    return Err(Error::config("backend.prefetch must be at least 1"));
                }
                if (r.tls_ca_file.is_some() || r.tls_client_identity.is_some())
                    && !url.starts_with("amqps://")
                {
                    return Err(Error::config(
                        "backend.tls_ca_file and backend.tls_client_identity apply to TLS connections: use an amqps:// URL",
                    ));
                }
                if r.delivery_limit == 0 {
                    return Err(Error::config(
                        "backend.delivery_limit must be at least 1 (20 is RabbitMQ 4's default)",
                    ));
                }
                if r.confirm_timeout.is_zero() || r.operation_timeout.is_zero() {
                    return Err(Error::config(
                        "backend.confirm_timeout and backend.operation_timeout must be above zero (e.g. \"30s\", \"10s\")",
                    ));
                }
            }
            BackendConfig::Sqs(s) => {
                if s.wait_time > Duration::from_secs(20) {
                    return Err(Error::config(
                        "backend.wait_time must be at most 20s (SQS long-poll limit)",
                    ));
                }
                if s.max_message_bytes > 1024 * 1024 {
                    return Err(Error::config(
                        "backend.max_message_bytes cannot exceed SQS's 1 MiB limit",
                    ));
                }
            }
        }
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

/// Kafka's URL parameters (`Config::from_url`) and the librdkafka settings they set.
const KAFKA_PARAMS: &[(&str, &str)] = &[
    ("security_protocol", "security.protocol"),
    ("sasl_mechanism", "sasl.mechanism"),
    ("sasl_username", "sasl.username"),
    ("sasl_password", "sasl.password"),
    ("ssl_ca_location", "ssl.ca.location"),
];

/// RabbitMQ's and SQS's URL parameters beside the common ones (`Config::from_url`).
const RABBITMQ_PARAMS: &[&str] = &[
    "tls_ca_file",
    "tls_client_identity",
    "tls_client_identity_password",
];
const SQS_PARAMS: &[&str] = &["endpoint", "fifo"];

fn url_bool(name: &str, v: &str) -> Result<bool> {
    v.parse()
        .map_err(|_| Error::config(format!("{name}={v} must be true or false")))
}

fn unknown_param(name: &str, scheme: &str, own: &[&str]) -> Error {
    let mut known = vec!["guarantee", "auto_create", "concurrency", "idempotency"];
    known.extend_from_slice(own);
    Error::config(format!(
        "unknown URL parameter {name:?} for {scheme}://: use {}",
        known.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_for_every_backend() {
        let text = r#"
            guarantee = "exactly-once"
            [backend]
            kind = "kafka"
            bootstrap = "127.0.0.1:9092"
            settings = { "security.protocol" = "SASL_SSL", "sasl.password" = "hunter2" }
            [consumer]
            concurrency = 4
            retry = { max_attempts = 3, initial_backoff = "10ms", max_backoff = "1s" }
            [idempotency]
            store = "redis://:hunter2@127.0.0.1:6379"
            ttl = "1h"
        "#;
        let c = Config::from_toml_str(text).unwrap();
        assert_eq!(c.guarantee, Guarantee::ExactlyOnce);
        assert_eq!(c.consumer.retry.max_attempts, 3);
        let BackendConfig::Kafka(k) = &c.backend else {
            panic!()
        };
        assert_eq!(k.settings["sasl.password"], "hunter2");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(!c.to_toml().contains("hunter2"));
        // The child-process hand-over keeps every secret, and only for that call.
        let exposed = c.to_toml_with_secrets().unwrap();
        assert_eq!(Config::from_toml_str(&exposed).unwrap(), c);
        assert!(!c.to_toml().contains("hunter2"));
        for url in [
            "amqp://user:hunter2@127.0.0.1:5672/%2f?guarantee=at-most-once",
            "sqs://us-east-1?endpoint=http://127.0.0.1:4566",
        ] {
            let mut c = Config::from_url(url).unwrap();
            if let BackendConfig::Sqs(s) = &mut c.backend {
                s.secret_access_key = Some(Secret::new("hunter2"));
            }
            let back = Config::from_toml_str(&c.to_toml_with_secrets().unwrap()).unwrap();
            assert_eq!(back, c, "{url}");
            assert!(!c.to_toml().contains("hunter2"), "{url}");
        }

        for kind in ["memory", "rabbitmq", "sqs"] {
            let c = Config::from_toml_str(&format!("[backend]\nkind = \"{kind}\"\n")).unwrap();
            assert_eq!(c.backend.kind(), kind);
            assert_eq!(c.guarantee, Guarantee::AtLeastOnce);
        }
        let c = Config::from_toml_str(
            "[backend]\nkind = \"rabbitmq\"\noperation_timeout = \"3s\"\nconfirm_timeout = \"1m\"\n",
        )
        .unwrap();
        let BackendConfig::Rabbitmq(r) = &c.backend else {
            panic!()
        };
        assert_eq!(r.operation_timeout, Duration::from_secs(3));
        assert_eq!(r.confirm_timeout, Duration::from_secs(60));
    }

    #[test]
    fn bad_config_is_a_typed_error() {
        for bad in [
            "[backend]\nkind = \"nats\"\n",
            "guarantee = \"twice\"\n[backend]\nkind = \"memory\"\n",
            "[backend]\nkind = \"memory\"\nbogus = 1\n",
            "[backend]\nkind = \"memory\"\n[consumer]\nconcurrency = 0\n",
            "[backend]\nkind = \"sqs\"\nwait_time = \"30s\"\n",
            "[backend]\nkind = \"memory\"\nfaults = { drop_on_publish = 1.5 }\n",
            "[backend]\nkind = \"rabbitmq\"\noperation_timeout = \"0s\"\n",
            "[backend]\nkind = \"rabbitmq\"\nconfirm_timeout = \"0s\"\n",
        ] {
            let e = Config::from_toml_str(bad).unwrap_err();
            assert!(matches!(e, Error::Config { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn urls() {
        let c = Config::from_url("kafka://a:9092,b:9092?guarantee=exactly-once").unwrap();
        let BackendConfig::Kafka(k) = &c.backend else {
            panic!()
        };
        assert_eq!(k.bootstrap, "a:9092,b:9092");
        assert_eq!(c.guarantee, Guarantee::ExactlyOnce);
        let c = Config::from_url("amqp://guest:secretpw@127.0.0.1:5672/%2f?guarantee=at-most-once")
            .unwrap();
        assert!(!format!("{c:?}").contains("secretpw"));
        let c = Config::from_url("sqs://us-east-1?endpoint=http://127.0.0.1:4566&auto_create=true")
            .unwrap();
        let BackendConfig::Sqs(s) = &c.backend else {
            panic!()
        };
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(s.region.as_deref(), Some("us-east-1"));
        assert!(s.auto_create);
        let c = Config::from_url("memory://?guarantee=alo").unwrap();
        assert_eq!(c.backend.kind(), "memory");
        assert!(Config::from_url("nats://x").is_err());
        assert!(Config::from_url("memory://x?frobnicate=1").is_err());
        let c = Config::from_url("sqs://eu-west-1?fifo=true").unwrap();
        let BackendConfig::Sqs(s) = &c.backend else {
            panic!()
        };
        assert!(s.fifo);
        let c = Config::from_url(
            "amqps://u:p@rabbit:5671/%2f?tls_ca_file=/ca.pem&tls_client_identity=/c.p12&tls_client_identity_password=s3cr3t-pw",
        )
        .unwrap();
        let BackendConfig::Rabbitmq(r) = &c.backend else {
            panic!()
        };
        assert_eq!(r.tls_ca_file.as_deref(), Some("/ca.pem"));
        assert_eq!(r.tls_client_identity.as_deref(), Some("/c.p12"));
        assert!(!format!("{c:?}").contains("s3cr3t"), "{c:?}");
        let c = Config::from_url(
            "kafka://b:9093?security_protocol=SASL_SSL&sasl_mechanism=PLAIN&sasl_username=u&sasl_password=s3cr3t-pw",
        )
        .unwrap();
        let BackendConfig::Kafka(k) = &c.backend else {
            panic!()
        };
        assert_eq!(k.settings["security.protocol"], "SASL_SSL");
        assert_eq!(k.settings["sasl.username"], "u");
        assert!(!format!("{c:?}").contains("s3cr3t"), "{c:?}");
        // A parameter of another backend is a typo, not ignored.
        for (bad, param) in [
            ("kafka://b:9092?fifo=true", "fifo"),
            ("sqs://eu-west-1?tls_ca_file=/ca.pem", "tls_ca_file"),
            ("memory://?endpoint=http://x", "endpoint"),
        ] {
            match Config::from_url(bad) {
                Err(Error::Config { message }) => assert!(
                    message.contains(&format!("unknown URL parameter {param:?}")),
                    "{bad}: {message}"
                ),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    /// Typos are refused with a message that shows the fix, never read as a default.
    #[test]
    fn malformed_urls_are_refused() {
        for (bad, says) in [
            ("sqs:/us-east-1", "write sqs://us-east-1"),
            ("memory:/x", "write memory://x"),
            ("memory:x", "write memory://x"),
            ("kafka:127.0.0.1:9092", "write kafka://127.0.0.1:9092"),
            ("memory", "<scheme>://"),
            ("memory://x/y", "no path"),
            ("sqs://us-east-1/queue", "no path"),
            ("kafka://", "needs the bootstrap servers"),
            ("kafka://?guarantee=alo", "needs the bootstrap servers"),
            ("sqs://eu-west-1?fifo=yes", "fifo=yes"),
        ] {
            match Config::from_url(bad) {
                Err(Error::Config { message }) => {
                    assert!(message.contains(says), "{bad}: {message}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        // Good URLs with a trailing slash or an empty host stay good.
        assert!(Config::from_url("memory://").is_ok());
        assert!(Config::from_url("memory://x/").is_ok());
        assert!(Config::from_url("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
    }
}
