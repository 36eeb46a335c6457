//! # courier-memory
//!
//! An in-process broker with the full courier contract: topics, consumer groups (every group gets
//! every message; members of a group compete), redelivery of unsettled messages when a consumer
//! goes away (or after an optional ack timeout), per-key order across competing consumers,
//! delayed redelivery, dead-letter topics, id dedup for exactly-once publishes, and fault knobs
//! ([`MemoryFaults`]) to watch each guarantee hold — or fail — under faults.
//!
//! It is the quickstart's embedded default and needs no services:
//!
//! ```
//! # tokio_test_block_on(async {
//! use courier_core::{DeliveryClient, Message, Subscription};
//! use courier_memory::{Config, MemoryConfig};
//! let client = courier_memory::connect(&Config::new(MemoryConfig::default())).await?;
//! client.create_destination("orders").await?;
//! client.publish("orders", Message::new("hello")).await?;
//! let mut deliveries = client.subscribe(Subscription::new("orders", "billing")).await?;
//! let d = deliveries.next().await.unwrap()?;
//! assert_eq!(&d.message.payload[..], b"hello");
//! d.ack().await?;
//! # Ok::<_, courier_core::Error>(()) });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f) }
//! ```

mod broker;
mod config;

pub use broker::{MemoryBroker, MemoryClient};
pub use config::{MemoryConfig, MemoryFaults};

use courier_core::config::BackendUrl;
use courier_core::findings::Finding;
use courier_core::{Backend, BrokerTraits, DeliveryClient, Explanation, Result};

/// A configuration of the memory backend alone.
pub type Config = courier_core::Config<MemoryConfig>;

/// Connect to the named in-process broker of `config` (created on first use).
pub async fn connect(config: &Config) -> Result<MemoryClient> {
    config.validate()?;
    let m = &config.backend;
    Ok(MemoryClient::new(
        MemoryBroker::named(&m.broker),
        m.clone(),
        config.guarantee,
    ))
}

/// The effective settings of the memory backend for `config`'s guarantee.
pub fn explain(config: &Config) -> Result<Explanation> {
    Ok(broker::explain(&config.backend, config.guarantee))
}

#[courier_core::async_trait]
impl Backend for MemoryConfig {
    const KIND: &'static str = "memory";
    const SCHEMES: &'static [&'static str] = &["memory"];
    const TRAITS: BrokerTraits = BrokerTraits {
        ordering: "per key across consumers",
        keeps_key_order: true,
        ordering_fix: "keys keep their meaning",
        consumer_groups: true,
        native_dedup: Some(std::time::Duration::from_secs(300)),
        transactions: false,
        max_payload: 1024 * 1024,
        in_process: true,
        delayed_redelivery: true,
    };

    fn check(&self) -> Result<()> {
        self.validate_section()
    }

    fn parse_url(url: &BackendUrl<'_>) -> Result<Self> {
        MemoryConfig::from_url(url)
    }

    fn max_message_bytes(&self) -> usize {
        self.max_payload
    }

    async fn connect(config: &Config) -> Result<Box<dyn DeliveryClient>> {
        Ok(Box::new(connect(config).await?))
    }

    fn explain(config: &Config) -> Result<Explanation> {
        explain(config)
    }

    async fn doctor(_config: &Config, _destinations: &[String]) -> Vec<Finding> {
        Vec::new()
    }
}
