//! What a backend can do, so callers and tests ask instead of guess.

use std::time::Duration;

use serde::Serialize;

/// What a backend (as configured) can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// Messages with the same key are delivered in publish order, across competing consumers.
    pub ordering_by_key: bool,
    /// Several consumer groups each receive every message of a destination.
    pub consumer_groups: bool,
    /// The broker drops re-published messages with the same id within this window.
    pub native_dedup: Option<Duration>,
    /// Handler outputs and the consumed position can commit atomically.
    pub transactions: bool,
    /// Largest accepted message (envelope included) in bytes.
    pub max_payload: usize,
    /// The broker routes failed messages to a dead-letter destination by itself.
    pub native_dead_letter: bool,
    /// `nack(delay)` really delays the redelivery (otherwise it is immediate).
    pub delayed_redelivery: bool,
    /// Publishing to a destination that does not exist fails (rather than being dropped).
    pub detects_missing_destination: bool,
    /// How long to wait before concluding that a settled message will not come back.
    pub settle_window: Duration,
    /// How long an unsettled delivery takes to come back after its consumer went away.
    pub redelivery_after_crash: Duration,
}

impl Capabilities {
    /// A starting point for backends: nothing special, 1 MiB payloads.
    pub fn baseline() -> Self {
        Capabilities {
            ordering_by_key: false,
            consumer_groups: false,
            native_dedup: None,
            transactions: false,
            max_payload: 1024 * 1024,
            native_dead_letter: false,
            delayed_redelivery: false,
            detects_missing_destination: true,
            settle_window: Duration::from_millis(500),
            redelivery_after_crash: Duration::from_secs(1),
        }
    }
}

impl Default for Capabilities {
    fn default() -> Self {
        Self::baseline()
    }
}
