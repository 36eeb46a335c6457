//! # courier-rabbitmq
//!
//! The RabbitMQ backend of courier, over lapin.
//!
//! | | at-most-once | at-least-once | exactly-once |
//! |---|---|---|---|
//! | publish | `delivery_mode=1`, returns once written (confirm mode, but confirms are not awaited; `close` waits for them) | `confirm_select`, `mandatory`, `delivery_mode=2`; returns on the broker's ack; a *returned* message is [`Error::Unroutable`](courier_core::Error::Unroutable), a nack or a lost connection is retried with the same `message_id` | as at-least-once |
//! | consume | `no_ack` (settled on delivery) | manual ack after the handler, `basic.qos` prefetch | as at-least-once + the idempotent layer (`message_id` = courier id; RabbitMQ has no dedup) |
//!
//! Topology: a destination is a durable **topic exchange**; a subscription `(destination, group)` is a durable
//! queue `<destination>.<group>` (quorum by default) bound with `#`, so every group receives every message and
//! members of a group compete. Delayed redelivery (`nack(delay)`, retries) rounds the delay up to a step of
//! [`DELAY_STEPS_MS`] (50 ms … 1 h) and parks the message in that step's delay queue `<destination>.<group>.delay.<ms>`
//! (declared on first use, the TTL set on the queue), whose expired messages dead-letter back into the work queue:
//! every message of a delay queue waits the same time, so a short retry never waits behind a long one. Dead letters
//! are published (confirmed) to the subscription's dead-letter exchange `<destination>-dlq`, which keeps them in a
//! queue of the same name.

mod client;
mod config;
mod connection;
mod consume;
mod doctor;
mod names;
mod settings;

pub use client::RabbitMqClient;
pub use config::{QueueType, RabbitMqConfig};
pub use doctor::doctor;
pub use names::{delay_queue, DELAY_STEPS_MS};

use courier_core::config::BackendUrl;
use courier_core::findings::Finding;
use courier_core::{Backend, BrokerTraits, DeliveryClient, Error, Explanation, Guarantee, Result};

pub(crate) const BACKEND: &str = "rabbitmq";

/// A configuration of the RabbitMQ backend alone.
pub type Config = courier_core::Config<RabbitMqConfig>;

/// Connect with the guarantee and settings of `config`.
///
/// Exactly-once without an `[idempotency]` section is refused: RabbitMQ cannot deduplicate.
pub async fn connect(config: &Config) -> Result<RabbitMqClient> {
    config.validate()?;
    let r = &config.backend;
    if config.guarantee == Guarantee::ExactlyOnce && config.idempotency.is_none() {
        return Err(Error::unsupported(
            BACKEND,
            "exactly-once without an idempotency store",
            "RabbitMQ has no message dedup: add an [idempotency] section (store = \"redis://…\" or \"postgres://…\"), or use at-least-once",
        ));
    }
    RabbitMqClient::connect(r.clone(), config.guarantee).await
}

/// The effective settings for `config`'s guarantee, without connecting.
pub fn explain(config: &Config) -> Result<Explanation> {
    Ok(settings::explain(&config.backend, config.guarantee))
}

#[courier_core::async_trait]
impl Backend for RabbitMqConfig {
    const KIND: &'static str = BACKEND;
    const SCHEMES: &'static [&'static str] = &["amqp", "amqps"];
    const TRAITS: BrokerTraits = BrokerTraits {
        ordering: "none across competing consumers (only with a single active consumer)",
        keeps_key_order: false,
        ordering_fix:
            "do not rely on per-key order, or run one consumer per queue (single active consumer)",
        consumer_groups: true,
        native_dedup: None,
        transactions: false,
        max_payload: 16 * 1024 * 1024,
        in_process: false,
        delayed_redelivery: true,
    };

    fn check(&self) -> Result<()> {
        self.validate_section()
    }

    fn parse_url(url: &BackendUrl<'_>) -> Result<Self> {
        RabbitMqConfig::from_url(url)
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
        Some(self.url.expose().to_owned())
    }

    fn set_endpoint(&mut self, url: String) {
        self.url = courier_core::config::SecretUrl::new(url);
    }
}
