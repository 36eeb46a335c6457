//! # courier-sqs
//!
//! The AWS SQS backend of courier, over aws-sdk-sqs and the standard AWS configuration chain
//! (environment, profile, instance role; `endpoint` for LocalStack).
//!
//! | | at-most-once | at-least-once | exactly-once |
//! |---|---|---|---|
//! | publish | one attempt, SDK retries off | SDK retries (standard mode) | FIFO queue: `MessageDeduplicationId` = courier id, `MessageGroupId` = key |
//! | consume | deleted before the handler | deleted after the handler; a visibility **heartbeat** extends the timeout while the handler runs | as at-least-once + the idempotent layer |
//! | nack / retry | — | `ChangeMessageVisibility(delay)` | same |
//! | dead letter | — | confirmed send to the dead-letter queue, then delete (a `RedrivePolicy` is created with `create_dead_letter_queue`) | same |
//!
//! The courier id, key and headers travel as message attributes (`courier-id`, `courier-key`, and all application
//! headers packed as JSON in `courier-headers`), so a message uses at most 4 of SQS's 10 attributes. Text
//! payloads are sent as the body; binary payloads are base64-encoded with `courier-encoding = base64`.
//! Exactly-once on a standard queue without an `[idempotency]` store is refused.
//!
//! Closing a subscription (a consumer's shutdown) waits for the long poll in flight — at most the
//! `wait_time` (20 s by default) plus 5 s — and makes whatever it brought visible again at once:
//! abandoning a long poll can leave the messages SQS hands it invisible for their whole
//! visibility timeout. Lower `wait_time` for faster shutdowns.

mod client;
mod config;
mod doctor;
mod settings;

pub use client::SqsClient;
pub use config::SqsConfig;
pub use doctor::doctor;

use courier_core::config::BackendUrl;
use courier_core::findings::Finding;
use courier_core::{Backend, BrokerTraits, DeliveryClient, Error, Explanation, Guarantee, Result};

pub(crate) const BACKEND: &str = "sqs";

/// A configuration of the SQS backend alone.
pub type Config = courier_core::Config<SqsConfig>;

/// Connect with the guarantee and settings of `config`.
pub async fn connect(config: &Config) -> Result<SqsClient> {
    config.validate()?;
    let s = &config.backend;
    if config.guarantee == Guarantee::ExactlyOnce && !s.fifo && config.idempotency.is_none() {
        return Err(Error::unsupported(
            BACKEND,
            "exactly-once on standard queues without an idempotency store",
            "set backend.fifo = true (FIFO queues dedup by id for 5 minutes), or add an [idempotency] section (redis:// or postgres://)",
        ));
    }
    SqsClient::connect(s.clone(), config.guarantee, config.idempotency.is_some()).await
}

/// The effective settings for `config`'s guarantee, without connecting.
pub fn explain(config: &Config) -> Result<Explanation> {
    Ok(settings::explain(&config.backend, config.guarantee))
}

#[courier_core::async_trait]
impl Backend for SqsConfig {
    const KIND: &'static str = BACKEND;
    const SCHEMES: &'static [&'static str] = &["sqs"];
    const TRAITS: BrokerTraits = BrokerTraits {
        ordering: "only on FIFO queues (per MessageGroupId = key)",
        keeps_key_order: true,
        ordering_fix: "use a queue name ending in .fifo; keys become MessageGroupIds",
        consumer_groups: false,
        native_dedup: Some(std::time::Duration::from_secs(300)),
        transactions: false,
        max_payload: 1024 * 1024,
        in_process: false,
        delayed_redelivery: true,
    };

    fn check(&self) -> Result<()> {
        self.validate_section()
    }

    fn parse_url(url: &BackendUrl<'_>) -> Result<Self> {
        SqsConfig::from_url(url)
    }

    fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    async fn connect(config: &Config) -> Result<Box<dyn DeliveryClient>> {
        Ok(Box::new(connect(config).await?))
    }

    fn explain(config: &Config) -> Result<Explanation> {
        explain(config)
    }

    async fn doctor(config: &Config, destinations: &[String]) -> Vec<Finding> {
        doctor(config, destinations).await
    }

    fn endpoint(&self) -> Option<String> {
        self.endpoint.clone()
    }

    fn set_endpoint(&mut self, url: String) {
        self.endpoint = Some(url);
    }
}
