//! # courier-idempotency
//!
//! The idempotent-consumer layer: turns at-least-once delivery into exactly-once *effects*.
//!
//! Wrap any [`Handler`](courier_core::Handler) in [`Idempotent`]. For each message the layer asks
//! its [`IdempotencyStore`] to `begin(key, fingerprint, lease)`:
//!
//! - **Begun** — this worker holds a lease: run the handler (the lease is extended while it runs);
//!   on success publish its staged outputs, then `complete` the key (fingerprint, optional result,
//!   TTL) and let the consume loop acknowledge; on failure `release` the key and let the consume
//!   loop retry.
//! - **InProgress** — another worker holds a live lease: defer (redeliver later), never acknowledge.
//! - **Completed** — a duplicate: acknowledge without running the handler (counted).
//! - **Conflict** — same key, different payload: typed error, dead-lettered.
//!
//! Stores: [`MemoryStore`] (one process), [`RedisStore`] (an atomic `SET NX PX` claims a key and
//! `SET … GET` completes it; small Lua scripts extend and release a lease) and [`PostgresStore`]. With PostgreSQL there is also a
//! transactional mode, [`TransactionalIdempotent`]: the handler gets the database transaction,
//! and the dedup row commits together with its business writes.
//!
//! Unlike a deduplicator that marks a key *before* the handler runs, a failed first attempt never
//! makes the message look done: the key is only completed after the handler succeeded.

mod layer;
mod memory;
mod postgres;
mod redis;
mod store;
mod transactional;

pub use layer::{fingerprint, IdempotencyStats, Idempotent};
pub use memory::MemoryStore;
pub use postgres::{create_serialized, PostgresStore, DEFAULT_TABLE};
pub use redis::RedisStore;
pub use store::{Begin, IdempotencyStore, LeaseToken};
pub use transactional::{TransactionalIdempotent, TxHandler};

/// The key a message is deduplicated on: its [`header::IDEMPOTENCY_KEY`] when it has one (a
/// request asked again with a new message id keeps its key), else its id.
///
/// [`header::IDEMPOTENCY_KEY`]: courier_core::header::IDEMPOTENCY_KEY
pub fn idempotency_key(message: &courier_core::Message) -> &str {
    message
        .headers
        .get(courier_core::header::IDEMPOTENCY_KEY)
        .map_or(message.id.as_str(), String::as_str)
}

use std::sync::Arc;

use courier_core::config::IdempotencyConfig;
use courier_core::{Error, Result};

/// Build the store an `[idempotency]` section names: `memory`, `redis://…` or `postgres://…`.
///
/// `memory` is one store per process, shared by every consumer built from a config (the layer
/// namespaces keys by consumer group): duplicates are absorbed across the consumers of a
/// process, not across processes or restarts. Guarded by `tests/layer.rs`,
/// `memory_store_from_config_is_one_per_process`.
pub async fn store_from_config(config: &IdempotencyConfig) -> Result<Arc<dyn IdempotencyStore>> {
    let url = config.store.expose();
    if url == "memory" {
        static PROCESS: std::sync::OnceLock<Arc<MemoryStore>> = std::sync::OnceLock::new();
        let store: Arc<dyn IdempotencyStore> = PROCESS.get_or_init(Arc::default).clone();
        return Ok(store);
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return Ok(Arc::new(RedisStore::connect(url).await?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PostgresStore::connect(url).await?));
    }
    Err(Error::config(format!(
        "idempotency.store {} is not a store courier knows: use memory, redis://host:6379 or postgres://user@host/db",
        config.store.redacted()
    )))
}
