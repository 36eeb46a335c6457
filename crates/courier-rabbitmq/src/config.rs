//! `[backend] kind = "rabbitmq"`: RabbitMQ through lapin.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use courier_core::config::{BackendUrl, Secret, SecretUrl};
use courier_core::{Error, Result};

/// Queue type of queues courier declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, durable, with a delivery limit (default).
    #[default]
    Quorum,
    /// Classic durable queue.
    Classic,
}

/// Configuration of the RabbitMQ backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitMqConfig {
    /// `amqp://` or `amqps://` URL (credentials are never printed).
    pub url: SecretUrl,
    /// Declare exchanges, queues and bindings for destinations and groups.
    pub auto_create: bool,
    /// Queue type for declared queues.
    pub queue_type: QueueType,
    /// Consumer prefetch (`basic.qos`).
    pub prefetch: u16,
    /// Quorum queues: how many times the broker hands out one message (redeliveries after a
    /// consumer crash or a lost channel; courier's own retries are new publishes and do not
    /// count) before it dead-letters the message to the subscription's dead-letter exchange
    /// (`x-delivery-limit`, with `x-dead-letter-exchange`). Without it RabbitMQ 4 applies 20 and
    /// then drops the message.
    pub delivery_limit: u32,
    /// Largest accepted message (envelope included), bytes.
    pub max_message_bytes: usize,
    /// How long to wait for a publisher confirm before treating the publish as failed and
    /// publishing it again (same id) on a fresh channel; also the bound on topology declarations
    /// (declaring a quorum queue starts a Raft group and takes seconds on a busy broker).
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Bound on every other broker round trip: connecting, opening a channel, `basic.qos`,
    /// `basic.consume`, writing a publish, ack/nack, cancel and close. A connection that dropped
    /// without the socket saying so can leave such a reply pending forever; when the bound lapses
    /// the channel (or the connection) is treated as broken and opened again, and an ack that
    /// lapsed is reported as expired (the broker redelivers the message), so no handler lane
    /// waits on it.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// PEM file with CA certificates for amqps.
    pub tls_ca_file: Option<String>,
    /// PKCS#12 client identity for amqps client-certificate auth.
    pub tls_client_identity: Option<String>,
    /// Password of the PKCS#12 identity.
    pub tls_client_identity_password: Option<Secret>,
}

/// RabbitMQ's URL parameters beside the common ones.
const URL_PARAMS: &[&str] = &[
    "tls_ca_file",
    "tls_client_identity",
    "tls_client_identity_password",
];

impl RabbitMqConfig {
    /// `amqp[s]://user:pass@host[:port]/vhost`: the AMQP URL itself; parameters
    /// `tls_ca_file`, `tls_client_identity` and `tls_client_identity_password`.
    pub(crate) fn from_url(url: &BackendUrl<'_>) -> Result<Self> {
        url.refuse_host_list()?;
        let mut r = RabbitMqConfig {
            url: SecretUrl::new(url.without_query()),
            auto_create: url.auto_create()?,
            ..RabbitMqConfig::default()
        };
        for (name, v) in url.params() {
            match name {
                "tls_ca_file" => r.tls_ca_file = Some(v.to_owned()),
                "tls_client_identity" => r.tls_client_identity = Some(v.to_owned()),
                "tls_client_identity_password" => {
                    r.tls_client_identity_password = Some(Secret::new(v))
                }
                _ => return Err(url.unknown_param(name, URL_PARAMS)),
            }
        }
        Ok(r)
    }

    pub(crate) fn validate_section(&self) -> Result<()> {
        let url = self.url.expose();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(Error::config(format!(
                "backend.url {:?} must start with amqp:// or amqps://",
                self.url.redacted()
            )));
        }
        if self.prefetch == 0 {
            return Err(Error::config("backend.prefetch must be at least 1"));
        }
        if (self.tls_ca_file.is_some() || self.tls_client_identity.is_some())
            && !url.starts_with("amqps://")
        {
            return Err(Error::config(
                "backend.tls_ca_file and backend.tls_client_identity apply to TLS connections: use an amqps:// URL",
            ));
        }
        if self.delivery_limit == 0 {
            return Err(Error::config(
                "backend.delivery_limit must be at least 1 (20 is RabbitMQ 4's default)",
            ));
        }
        if self.confirm_timeout.is_zero() || self.operation_timeout.is_zero() {
            return Err(Error::config(
                "backend.confirm_timeout and backend.operation_timeout must be above zero (e.g. \"30s\", \"10s\")",
            ));
        }
        Ok(())
    }
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        RabbitMqConfig {
            url: SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            auto_create: false,
            queue_type: QueueType::Quorum,
            prefetch: 64,
            delivery_limit: 20,
            max_message_bytes: 16 * 1024 * 1024,
            confirm_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(10),
            tls_ca_file: None,
            tls_client_identity: None,
            tls_client_identity_password: None,
        }
    }
}
