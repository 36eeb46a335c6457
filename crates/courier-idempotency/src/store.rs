//! The store contract.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use courier_core::Result;

/// Proof that a worker holds the lease of a key (returned by `begin`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseToken(pub String);

impl LeaseToken {
    /// A fresh random token.
    pub fn new() -> Self {
        LeaseToken(uuid::Uuid::new_v4().simple().to_string())
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        Self::new()
    }
}

/// Outcome of [`IdempotencyStore::begin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The caller now holds the lease and must run the handler.
    Begun(LeaseToken),
    /// Another worker holds a live lease; try again after (about) this long.
    InProgress {
        /// Time left on the other worker's lease.
        retry_after: Duration,
    },
    /// The key was completed before: do not run the handler again.
    Completed {
        /// The result stored with the key, if any.
        result: Option<Bytes>,
    },
}

/// Where the layer records keys. Implementations must make `begin` atomic (one winner per key).
///
/// A `begin` on a key whose recorded fingerprint differs from `fingerprint` fails with
/// [`courier_core::Error::IdempotencyConflict`]. Store failures are
/// [`courier_core::Error::Store`].
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Store name for logs and metrics (`memory`, `redis`, `postgres`).
    fn name(&self) -> &'static str;

    /// Claim `key` for `lease`, or report it in progress / completed.
    async fn begin(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Begin>;

    /// Extend a held lease. `false` when the lease was lost (expired and taken over).
    async fn extend(&self, key: &str, token: &LeaseToken, lease: Duration) -> Result<bool>;

    /// Record `key` (with its payload `fingerprint`) as completed for `ttl`. Returns `false` if the lease had been lost meanwhile
    /// (the key is completed anyway unless another worker completed it first).
    async fn complete(
        &self,
        key: &str,
        token: &LeaseToken,
        fingerprint: &str,
        result: Option<Bytes>,
        ttl: Duration,
    ) -> Result<bool>;

    /// Give up a held lease so the message can be retried at once.
    async fn release(&self, key: &str, token: &LeaseToken) -> Result<()>;

    /// Whether [`claim_many`](Self::claim_many) costs less than one `begin` per key (one round
    /// trip for all of them). The layer only claims the keys of deliveries that arrived together
    /// ahead of their handlers when it does. Default `false`.
    fn claims_in_batches(&self) -> bool {
        false
    }

    /// Claim several `(key, fingerprint)` pairs for `lease` at once: `Some(token)` for each key
    /// claimed, `None` for a key that exists (in progress or completed; a later `begin` says
    /// which and checks its fingerprint). Atomic per key, like `begin`. Default: one `begin` per
    /// key.
    async fn claim_many(
        &self,
        keys: &[(&str, &str)],
        lease: Duration,
    ) -> Result<Vec<Option<LeaseToken>>> {
        let mut claimed = Vec::with_capacity(keys.len());
        for (key, fingerprint) in keys {
            claimed.push(match self.begin(key, fingerprint, lease).await? {
                Begin::Begun(token) => Some(token),
                Begin::InProgress { .. } | Begin::Completed { .. } => None,
            });
        }
        Ok(claimed)
    }
}
