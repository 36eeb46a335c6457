//! # courier-memory
//!
//! An in-process broker with the full courier contract: topics, consumer groups (every group gets
//! every message; members of a group compete), redelivery of unsettled messages when a consumer
//! goes away (or after an optional ack timeout), per-key order across competing consumers,
//! delayed redelivery, dead-letter topics, id dedup for exactly-once publishes, and fault knobs
//! ([`courier_core::config::MemoryFaults`]) to watch each guarantee hold — or fail — under faults.
//!
//! It is the quickstart's embedded default and needs no services:
//!
//! ```
//! # tokio_test_block_on(async {
//! use courier_core::{Config, DeliveryClient, Message, Subscription};
//! let client = courier_memory::connect(&Config::memory()).await?;
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

pub use broker::{MemoryBroker, MemoryClient};

use courier_core::{BackendConfig, Config, Error, Explanation, Result};

/// Connect to the named in-process broker of `config` (created on first use).
pub async fn connect(config: &Config) -> Result<MemoryClient> {
    let BackendConfig::Memory(m) = &config.backend else {
        return Err(Error::config(format!(
            "courier_memory::connect needs [backend] kind = \"memory\", got {:?}",
            config.backend.kind()
        )));
    };
    config.validate()?;
    Ok(MemoryClient::new(
        MemoryBroker::named(&m.broker),
        m.clone(),
        config.guarantee,
    ))
}

/// The effective settings of the memory backend for `config`'s guarantee.
pub fn explain(config: &Config) -> Result<Explanation> {
    let BackendConfig::Memory(m) = &config.backend else {
        return Err(Error::config("explain: not a memory config"));
    };
    Ok(broker::explain(m, config.guarantee))
}
