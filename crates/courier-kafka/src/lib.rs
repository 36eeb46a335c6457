//! # courier-kafka
//!
//! The Kafka backend of courier, over librdkafka (rdkafka).
//!
//! | | at-most-once | at-least-once | exactly-once |
//! |---|---|---|---|
//! | producer | `acks=0`, `retries=0`, `enable.idempotence=false`; returns once enqueued | `acks=all`, `enable.idempotence=true`; returns on the broker's ack | + `transactional.id`; every publish / `publish_batch` is one transaction |
//! | consumer | `enable.auto.commit=false`; the offset is committed (sync) **before** the handler | `enable.auto.commit=true`, `enable.auto.offset.store=false`: the offset is *stored* after the handler, only up to the first unprocessed message of the partition; committed on revoke and on close | `isolation.level=read_committed`, `enable.auto.commit=false`; handler outputs and the consumed offsets commit in one transaction (`send_offsets_to_transaction`) |
//!
//! The courier id travels as the `courier-id` header, the key as the record key, the attempt as
//! `courier-attempt`. Kafka has no per-message nack: `nack(delay)` re-publishes the message to its topic
//! with the next attempt number and a `courier-not-before` time, then settles the original (a retried
//! message can therefore be overtaken by later messages of its key). External side effects of an
//! exactly-once handler go through the idempotent layer; transactions cover Kafka→Kafka only.

mod admin;
mod client;
mod config;
mod connection;
mod consume;
mod doctor;
mod publish;
mod settings;

pub use client::KafkaClient;
pub use config::KafkaConfig;
pub use doctor::doctor;

use courier_core::config::BackendUrl;
use courier_core::findings::Finding;
use courier_core::{Backend, BrokerTraits, DeliveryClient, Explanation, Result};

pub(crate) const BACKEND: &str = "kafka";

/// A configuration of the Kafka backend alone.
pub type Config = courier_core::Config<KafkaConfig>;

/// Connect with the guarantee and settings of `config`.
pub async fn connect(config: &Config) -> Result<KafkaClient> {
    config.validate()?;
    KafkaClient::connect(config.backend.clone(), config.guarantee).await
}

/// The effective settings for `config`'s guarantee, without connecting.
pub fn explain(config: &Config) -> Result<Explanation> {
    Ok(settings::explain(&config.backend, config.guarantee, None))
}

#[courier_core::async_trait]
impl Backend for KafkaConfig {
    const KIND: &'static str = BACKEND;
    const SCHEMES: &'static [&'static str] = &["kafka"];
    const TRAITS: BrokerTraits = BrokerTraits {
        ordering: "per partition (the key picks the partition)",
        keeps_key_order: true,
        ordering_fix: "keys keep their meaning; check the partition count for parallelism",
        consumer_groups: true,
        native_dedup: None,
        transactions: true,
        max_payload: 1024 * 1024,
        in_process: false,
        delayed_redelivery: false,
    };

    fn check(&self) -> Result<()> {
        self.validate_section()
    }

    fn parse_url(url: &BackendUrl<'_>) -> Result<Self> {
        KafkaConfig::from_url(url)
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

    fn set_instance(&mut self, instance: &str) {
        // Guarded by `integration/tests/chaos.rs::kafka_matrix_holds` (verify's restarted
        // workers fence their SIGKILLed predecessors).
        let base = self.transactional_id.as_deref().unwrap_or(&self.client_id);
        self.transactional_id = Some(format!("{base}-{instance}"));
    }
}

/// The librdkafka producer settings (name, value; sorted by name) a client connected with
/// `config` uses for its publishes — built by the same function the client's producer is: the
/// `[backend] settings` passthrough, with courier's settings for the guarantee winning. Everything not listed is librdkafka's default (`linger.ms`,
/// `batch.size`, compression …) unless the passthrough sets it. Exactly-once clients add a
/// `transactional.id` chosen at connect time, which is not listed.
///
/// A raw rdkafka producer built from these settings behaves as courier's does on the wire —
/// `benches/kafka.rs` builds its reference producer this way so that the ratio it prints
/// compares the adapter, not two configurations.
pub fn producer_settings(config: &Config) -> Result<Vec<(String, String)>> {
    let k = &config.backend;
    let applied = settings::client_config(k, &settings::producer(k, config.guarantee, None));
    let mut out: Vec<(String, String)> = applied
        .config_map()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    out.sort();
    Ok(out)
}
