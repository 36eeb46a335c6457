//! # courier
//!
//! Send and receive messages over Kafka, RabbitMQ, AWS SQS or an embedded in-memory broker with
//! an explicit delivery guarantee — at-most-once, at-least-once or exactly-once — configured once
//! and switched between brokers by configuration alone.
//!
//! ```no_run
//! # async fn demo() -> courier::Result<()> {
//! use courier::{Config, Message, Subscription, handler_fn};
//! let config = Config::from_env()?;                 // COURIER_CONFIG / COURIER_URL, else memory
//! let client = courier::connect(&config).await?;    // Box<dyn DeliveryClient>
//! let client: std::sync::Arc<dyn courier::DeliveryClient> = client.into();
//! client.create_destination("orders").await?;
//! client.publish("orders", Message::new("order #1").with_key("customer-7")).await?;
//! let consumer = courier::consumer(
//!     &config,
//!     client.clone(),
//!     Subscription::new("orders", "billing"),
//!     handler_fn(|m| async move { println!("{}", m.id); Ok(()) }),
//! ).await?;
//! consumer.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Backends are cargo features (`kafka`, `rabbitmq`, `sqs`; `memory` is always there), and
//! `outbox` adds the transactional outbox. Each backend crate owns its `[backend]` section and
//! implements [`Backend`]; [`BackendConfig`] lists the compiled-in ones.

use std::sync::Arc;

mod backends;
pub mod doctor;
pub mod instrument;
mod stack;

pub use backends::{BackendConfig, CompiledBackend};
pub use courier_core::*;
pub use stack::ConsumerBuilder;

/// A courier configuration: guarantee, `[backend]` (any compiled-in backend, by `kind`),
/// `[consumer]` and `[idempotency]`. `Config::default()` is the embedded memory broker with
/// at-least-once.
pub type Config = courier_core::Config<BackendConfig>;

/// Configuration types: the common sections, and each compiled-in backend's section.
pub mod config {
    pub use crate::{BackendConfig, Config};
    pub use courier_core::config::{
        is_secret_setting, redact_url, BackendSection, BackendUrl, ConsumerConfig,
        IdempotencyConfig, Secret, SecretUrl, StoreFailurePolicy,
    };
    #[cfg(feature = "kafka")]
    pub use courier_kafka::KafkaConfig;
    pub use courier_memory::{MemoryConfig, MemoryFaults};
    #[cfg(feature = "rabbitmq")]
    pub use courier_rabbitmq::{QueueType, RabbitMqConfig};
    #[cfg(feature = "sqs")]
    pub use courier_sqs::SqsConfig;
}
pub use courier_idempotency as idempotency;
pub use courier_memory as memory;

#[cfg(feature = "kafka")]
pub use courier_kafka as kafka;
#[cfg(feature = "outbox")]
pub use courier_outbox as outbox;
#[cfg(feature = "rabbitmq")]
pub use courier_rabbitmq as rabbitmq;
#[cfg(feature = "sqs")]
pub use courier_sqs as sqs;

use courier_idempotency::IdempotencyStore;

/// Connect to the broker `config` selects, with its guarantee. The client is wrapped in
/// [`instrument::Instrumented`]: tracing spans, metrics and `traceparent` propagation.
pub async fn connect(config: &Config) -> Result<Box<dyn DeliveryClient>> {
    Ok(Box::new(instrument::Instrumented::new(
        connect_raw(config).await?,
    )))
}

/// Connect without the instrumentation wrapper.
pub async fn connect_raw(config: &Config) -> Result<Box<dyn DeliveryClient>> {
    BackendConfig::connect(config).await
}

/// The effective broker settings `config` compiles into, without connecting.
pub fn explain(config: &Config) -> Result<Explanation> {
    config.validate()?;
    let mut e = BackendConfig::explain(config)?;
    let c = &config.consumer;
    e = e
        .set(
            "consume loop",
            "concurrency",
            c.concurrency,
            "handlers at once; same key never concurrently, in order",
        )
        .set(
            "consume loop",
            "retry",
            format!(
                "{} attempts, {:?}..{:?} x{} ±{}%",
                c.retry.max_attempts,
                c.retry.initial_backoff,
                c.retry.max_backoff,
                c.retry.multiplier,
                (c.retry.jitter * 100.0) as u32
            ),
            "then dead-lettered with the attempt count and last error",
        );
    e = match &config.idempotency {
        Some(i) if doctor::memory_store(config) && !config.backend.traits().in_process => e
            .set(
                "idempotency",
                "store",
                i.store.redacted(),
                format!("duplicates absorbed for {:?}, within this process", i.ttl),
            )
            .note("[idempotency] store = memory is one store per process: consumers in other processes, and this one after a restart, do not see its keys; use redis:// or postgres:// for exactly-once across instances"),
        Some(i) => e.set(
            "idempotency",
            "store",
            i.store.redacted(),
            format!("duplicates absorbed for {:?}; store outage: {:?}", i.ttl, i.on_store_error),
        ),
        None if config.guarantee == Guarantee::ExactlyOnce => {
            e.note("exactly-once needs the idempotent layer: add an [idempotency] section (or the backend's transactions cover only broker-to-broker effects)")
        }
        None => e,
    };
    Ok(e)
}

/// The idempotency store an `[idempotency]` section describes.
pub async fn idempotency_store(
    config: &config::IdempotencyConfig,
) -> Result<Arc<dyn IdempotencyStore>> {
    courier_idempotency::store_from_config(config).await
}

/// Start a consumer as `config` says: the `[consumer]` settings, and — when the config has an
/// `[idempotency]` section or the guarantee is exactly-once — the idempotent layer around
/// `handler` (namespaced by the subscription's group, lease = the broker's redelivery window).
/// [`ConsumerBuilder`] is the same with knobs.
pub async fn consumer<H: Handler>(
    config: &Config,
    client: Arc<dyn DeliveryClient>,
    subscription: Subscription,
    handler: H,
) -> Result<ConsumerHandle> {
    ConsumerBuilder::new(config, client, subscription)
        .spawn(handler)
        .await
}
