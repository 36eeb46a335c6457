//! `[backend] kind = "kafka"`: Kafka through librdkafka.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use courier_core::config::{is_secret_setting, secrets_exposed, BackendUrl};
use courier_core::{Error, Result};

/// Configuration of the Kafka backend.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap: String,
    /// `client.id`.
    pub client_id: String,
    /// Stable per-instance `transactional.id` for exactly-once (default: `courier-<client_id>-<host>`).
    pub transactional_id: Option<String>,
    /// Create missing topics (with `partitions` / `replication_factor`) instead of failing.
    pub auto_create: bool,
    /// Partitions of topics courier creates.
    pub partitions: i32,
    /// Replication factor of topics courier creates.
    pub replication_factor: i32,
    /// `message.max.bytes` courier checks payloads against before sending.
    pub max_message_bytes: usize,
    /// Consumer `session.timeout.ms`.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Consumer `max.poll.interval.ms` (also the idempotency lease on Kafka).
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// Producer `delivery.timeout.ms` (how long librdkafka retries a confirmed publish).
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Exactly-once: how often the handled inputs' outputs and offsets commit, in one
    /// transaction for all of them (Kafka Streams' `commit.interval.ms`). Longer = fewer
    /// transactions and more throughput; outputs become visible to `read_committed` readers
    /// up to this much later.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Exactly-once: commit early once this many handled inputs wait for the next transaction.
    pub commit_max_inputs: usize,
    /// Raw librdkafka settings for everything courier does not model (TLS, SASL, tuning). Applied
    /// to producer and consumer; courier's guarantee settings win on conflict. Values of names
    /// containing password/secret/token are never printed (nor serialized back out).
    #[serde(serialize_with = "serialize_redacted")]
    pub settings: BTreeMap<String, String>,
}

/// Kafka's URL parameters (`kafka://host:port?…`) and the librdkafka settings they set.
const URL_PARAMS: &[(&str, &str)] = &[
    ("security_protocol", "security.protocol"),
    ("sasl_mechanism", "sasl.mechanism"),
    ("sasl_username", "sasl.username"),
    ("sasl_password", "sasl.password"),
    ("ssl_ca_location", "ssl.ca.location"),
];

impl KafkaConfig {
    /// `kafka://host:port[,host:port]`: the bootstrap servers, no path; parameters
    /// `security_protocol`, `sasl_mechanism`, `sasl_username`, `sasl_password` and
    /// `ssl_ca_location` set those librdkafka settings.
    pub(crate) fn from_url(url: &BackendUrl<'_>) -> Result<Self> {
        url.refuse_path()?;
        if url.authority().is_empty() {
            return Err(
                url.invalid("kafka:// needs the bootstrap servers, e.g. kafka://127.0.0.1:9092")
            );
        }
        let mut k = KafkaConfig {
            bootstrap: url.authority().to_owned(),
            auto_create: url.auto_create()?,
            ..KafkaConfig::default()
        };
        for (name, v) in url.params() {
            let Some((_, setting)) = URL_PARAMS.iter().find(|(p, _)| *p == name) else {
                let own: Vec<&str> = URL_PARAMS.iter().map(|(p, _)| *p).collect();
                return Err(url.unknown_param(name, &own));
            };
            k.settings.insert((*setting).to_owned(), v.to_owned());
        }
        Ok(k)
    }

    pub(crate) fn validate_section(&self) -> Result<()> {
        if self.bootstrap.trim().is_empty() {
            return Err(Error::config(
                "backend.bootstrap is empty: set it to host:port of a Kafka broker (e.g. 127.0.0.1:9092)",
            ));
        }
        if self.partitions < 1 {
            return Err(Error::config("backend.partitions must be at least 1"));
        }
        if self.commit_interval.is_zero() || self.commit_interval > self.delivery_timeout {
            return Err(Error::config(format!(
                "backend.commit_interval = {:?} must be above zero and at most backend.delivery_timeout ({:?}); 100ms is the default",
                self.commit_interval, self.delivery_timeout
            )));
        }
        if self.commit_max_inputs == 0 {
            return Err(Error::config(
                "backend.commit_max_inputs must be at least 1 (1000 is the default)",
            ));
        }
        Ok(())
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap: "127.0.0.1:9092".into(),
            client_id: "courier".into(),
            transactional_id: None,
            auto_create: false,
            partitions: 3,
            replication_factor: 1,
            max_message_bytes: 1024 * 1024,
            session_timeout: Duration::from_secs(10),
            max_poll_interval: Duration::from_secs(300),
            delivery_timeout: Duration::from_secs(120),
            commit_interval: Duration::from_millis(100),
            commit_max_inputs: 1000,
            settings: BTreeMap::new(),
        }
    }
}

fn serialize_redacted<S: serde::Serializer>(
    settings: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(settings.len()))?;
    for (k, v) in settings {
        m.serialize_entry(
            k,
            if is_secret_setting(k) && !secrets_exposed() {
                "***"
            } else {
                v.as_str()
            },
        )?;
    }
    m.end()
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings: BTreeMap<&str, &str> = self
            .settings
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret_setting(k) {
                        "***"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap", &self.bootstrap)
            .field("client_id", &self.client_id)
            .field("transactional_id", &self.transactional_id)
            .field("auto_create", &self.auto_create)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("session_timeout", &self.session_timeout)
            .field("max_poll_interval", &self.max_poll_interval)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("commit_max_inputs", &self.commit_max_inputs)
            .field("settings", &settings)
            .finish()
    }
}
