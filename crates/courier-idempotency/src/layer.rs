//! The layer over a handler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{debug, warn};

use courier_core::config::StoreFailurePolicy;
use courier_core::{Context, Error, Handler, HandlerError, Message};

use crate::store::{Begin, IdempotencyStore, LeaseToken};

/// Counters of the layer (shared; read them while the consumer runs).
#[derive(Debug, Default)]
pub struct IdempotencyStats {
    /// Handler runs that began with a fresh lease.
    pub begun: AtomicU64,
    /// Of those, runs whose lease was claimed ahead, with the other deliveries received
    /// together (one store round trip for the batch).
    pub claimed_ahead: AtomicU64,
    /// Keys completed.
    pub completed: AtomicU64,
    /// Duplicates acknowledged without running the handler.
    pub duplicates_absorbed: AtomicU64,
    /// Deliveries deferred because another worker held the lease.
    pub in_progress_deferred: AtomicU64,
    /// Same key, different payload.
    pub conflicts: AtomicU64,
    /// Leases found lost at extend/complete time.
    pub leases_lost: AtomicU64,
    /// Store errors.
    pub store_errors: AtomicU64,
    /// Messages processed without dedup because the store was down and the policy is fail-open.
    pub processed_fail_open: AtomicU64,
    /// Redeliveries of a completed input whose broker transaction never committed: its stored
    /// outputs were staged again instead of running the handler (Kafka exactly-once).
    pub outputs_replayed: AtomicU64,
}

/// What the layer stores with a key completed on a backend that commits outputs with the
/// consumed position (Kafka exactly-once): the handler's result, its outputs, and the position
/// of the input.
///
/// The key completes right after the handler, before the broker transaction holding the outputs
/// commits. If that transaction never commits (an abort, a crash, the partition moving to
/// another consumer), the same input is read again *at the same position* — a committed
/// transaction would have moved the group's offset past it — and the layer stages the stored
/// outputs again instead of running the handler: the external effect happened once and the
/// outputs commit once. A copy of the input at another position (a publisher's duplicate) is
/// absorbed: the original's outputs are committed with the original.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Completed {
    position: String,
    result: Option<bytes::Bytes>,
    outputs: Vec<courier_core::Outgoing>,
}

/// Marks a stored result as a [`Completed`] record (a result from a non-transactional backend is
/// stored as it is).
const COMPLETED_MAGIC: &[u8] = b"courier-completed/1\n";

impl Completed {
    pub(crate) fn new(cx: &Context) -> Self {
        Completed {
            position: cx.position().to_string(),
            result: cx.result().cloned(),
            outputs: cx.outputs().to_vec(),
        }
    }

    pub(crate) fn encode(&self) -> bytes::Bytes {
        let mut v = COMPLETED_MAGIC.to_vec();
        // Serialising owned strings and bytes cannot fail.
        serde_json::to_writer(&mut v, self).unwrap_or_default();
        v.into()
    }

    fn decode(stored: &[u8]) -> Option<Self> {
        serde_json::from_slice(stored.strip_prefix(COMPLETED_MAGIC)?).ok()
    }
}

/// The handler result stored with a completed key (inside a [`Completed`] record or as it is).
pub(crate) fn stored_result(stored: Option<bytes::Bytes>) -> Option<bytes::Bytes> {
    let stored = stored?;
    match Completed::decode(&stored) {
        Some(record) => record.result,
        None => Some(stored),
    }
}

/// Stage the stored outputs of a completed key again when this delivery is the same input at
/// the same position on a backend that commits outputs atomically (see [`Completed`]).
pub(crate) fn replay_outputs(cx: &mut Context, stored: Option<&bytes::Bytes>) -> bool {
    if !cx.commits_atomically() {
        return false;
    }
    let Some(record) = stored.and_then(|s| Completed::decode(s)) else {
        return false;
    };
    if record.position != cx.position().to_string() {
        return false;
    }
    if let Some(r) = record.result {
        cx.set_result(r);
    }
    for out in record.outputs {
        cx.publish(out.destination, out.message);
    }
    true
}

/// When to look at a key in progress again: after about as long as its run has been going
/// (the lease's elapsed part; at least 100 ms), never after its lease ends. A duplicate of a
/// short run (a request asked again while its first run finishes) is answered soon after that
/// run completes; one of a long run costs a few deferrals, not one per 100 ms.
/// (`tests/layer.rs::a_duplicate_during_a_short_run_is_deferred_briefly`)
fn look_again(lease: Duration, left: Duration) -> Duration {
    let running = lease.saturating_sub(left);
    running
        .max(Duration::from_millis(100))
        .min(left.max(Duration::from_millis(50)))
}

impl IdempotencyStats {
    /// Read a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

fn bump(c: &AtomicU64, metric: &'static str, store: &'static str) {
    c.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(metric, "store" => store).increment(1);
}

/// The payload fingerprint recorded with a key: SHA-256 of key and payload (hex, 32 chars).
pub fn fingerprint(message: &Message) -> String {
    let mut h = Sha256::new();
    h.update(message.key.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(&message.payload);
    hex::encode(&h.finalize()[..16])
}

/// The idempotent-consumer layer over a handler. See the crate docs.
pub struct Idempotent<H> {
    inner: H,
    store: Arc<dyn IdempotencyStore>,
    namespace: String,
    lease: Duration,
    ttl: Duration,
    policy: StoreFailurePolicy,
    store_retry: Duration,
    complete_timeout: Duration,
    stats: Arc<IdempotencyStats>,
    /// Keys claimed ahead of their handlers by [`Handler::prepare`], by key.
    claimed: Mutex<HashMap<String, Claimed>>,
}

/// A key claimed in a batch, waiting for its delivery's handler.
struct Claimed {
    token: LeaseToken,
    fingerprint: String,
    at: Instant,
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<H> std::fmt::Debug for Idempotent<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotent")
            .field("store", &self.store.name())
            .field("namespace", &self.namespace)
            .field("lease", &self.lease)
            .field("ttl", &self.ttl)
            .field("policy", &self.policy)
            .finish()
    }
}

impl<H: Handler> Idempotent<H> {
    /// Wrap `inner`, recording keys in `store`. Defaults: namespace `default`, lease 30 s,
    /// TTL 24 h, fail-closed.
    pub fn new(inner: H, store: Arc<dyn IdempotencyStore>) -> Self {
        Idempotent {
            inner,
            store,
            namespace: "default".into(),
            lease: Duration::from_secs(30),
            ttl: Duration::from_secs(24 * 3600),
            policy: StoreFailurePolicy::FailClosed,
            store_retry: Duration::from_secs(1),
            complete_timeout: Duration::from_secs(120),
            stats: Arc::default(),
            claimed: Mutex::default(),
        }
    }

    /// Namespace keys (use the consumer group, so two groups each process every message once).
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    /// Lease of an in-progress key: match the broker's redelivery window (SQS visibility
    /// timeout, Kafka `max.poll.interval.ms`, RabbitMQ `consumer_timeout`). Extended every
    /// third of it while the handler runs.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(100));
        self
    }

    /// How long a completed key is remembered (the dedup window).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// What to do when the store fails.
    pub fn on_store_error(mut self, policy: StoreFailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Redelivery delay used when the store is down (fail-closed).
    pub fn store_retry_delay(mut self, d: Duration) -> Self {
        self.store_retry = d;
        self
    }

    /// How long to keep retrying `complete` after the handler succeeded while the store is
    /// unreachable (default 2 minutes). Past it, the message is redelivered after the lease and
    /// its effect may repeat.
    pub fn complete_timeout(mut self, d: Duration) -> Self {
        self.complete_timeout = d;
        self
    }

    /// Apply an `[idempotency]` config section (TTL, lease, policy, namespace).
    pub fn with_config(mut self, c: &courier_core::config::IdempotencyConfig) -> Self {
        self.ttl = c.ttl;
        if let Some(l) = c.lease {
            self.lease = l;
        }
        self.policy = c.on_store_error;
        if let Some(ns) = &c.namespace {
            self.namespace = ns.clone();
        }
        self
    }

    /// The layer's counters.
    pub fn stats(&self) -> Arc<IdempotencyStats> {
        self.stats.clone()
    }

    fn key(&self, message: &Message) -> String {
        format!("{}:{}", self.namespace, crate::idempotency_key(message))
    }

    /// Give a held lease back; a failure is only logged (the lease then expires by itself).
    async fn release(&self, key: &str, token: &LeaseToken) {
        if let Err(e) = self.store.release(key, token).await {
            debug!(%key, error = %e, "release failed; the lease will expire");
        }
    }

    /// The lease claimed for `key` by `prepare`, if there is one for this payload and it still
    /// holds, with when its current term started. A claim older than a third of the lease is
    /// extended first (its delivery waited in a lane); one for another payload is released so
    /// that `begin` sees the key as it is.
    async fn take_claimed(&self, key: &str, fingerprint: &str) -> Option<(LeaseToken, Instant)> {
        let claimed = self.claimed.lock().remove(key)?;
        if claimed.fingerprint != fingerprint {
            self.release(key, &claimed.token).await;
            return None;
        }
        if claimed.at.elapsed() < self.lease / 3 {
            return Some((claimed.token, claimed.at));
        }
        match self.store.extend(key, &claimed.token, self.lease).await {
            Ok(true) => Some((claimed.token, Instant::now())),
            Ok(false) | Err(_) => None,
        }
    }
}

impl<H> Idempotent<H> {
    /// Record `key` as completed with `stored`, waiting out a store outage (the delivery stays
    /// unsettled meanwhile, so nobody else runs it) rather than giving up and letting a
    /// redelivery repeat the effect. False when it could not be recorded within the complete
    /// timeout.
    async fn complete(
        &self,
        key: &str,
        token: &LeaseToken,
        fingerprint: &str,
        stored: Option<bytes::Bytes>,
    ) -> bool {
        let store = self.store.name();
        let deadline = tokio::time::Instant::now() + self.complete_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            match self
                .store
                .complete(key, token, fingerprint, stored.clone(), self.ttl)
                .await
            {
                Ok(held) => {
                    if !held {
                        bump(
                            &self.stats.leases_lost,
                            "courier_idempotency_leases_lost_total",
                            store,
                        );
                    }
                    bump(
                        &self.stats.completed,
                        "courier_idempotency_completed_total",
                        store,
                    );
                    return true;
                }
                Err(e) => {
                    bump(
                        &self.stats.store_errors,
                        "courier_idempotency_store_errors_total",
                        store,
                    );
                    if tokio::time::Instant::now() + backoff > deadline {
                        warn!(%key, error = %e, "handler succeeded but the key could not be completed in time; a redelivery after the lease expires may repeat the effect");
                        return false;
                    }
                    debug!(%key, error = %e, "completing the key failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

#[async_trait]
impl<H: Handler> Handler for Idempotent<H> {
    async fn handle(&self, message: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        let store = self.store.name();
        let key = self.key(message);
        let fp = fingerprint(message);
        let (token, since) = match self.take_claimed(&key, &fp).await {
            Some(claimed) => {
                bump(
                    &self.stats.claimed_ahead,
                    "courier_idempotency_claimed_ahead_total",
                    store,
                );
                claimed
            }
            None => match self.store.begin(&key, &fp, self.lease).await {
                Ok(Begin::Begun(t)) => (t, Instant::now()),
                Ok(Begin::Completed { result }) => {
                    cx.absorb_duplicate();
                    if replay_outputs(cx, result.as_ref()) {
                        bump(
                            &self.stats.outputs_replayed,
                            "courier_idempotency_outputs_replayed_total",
                            store,
                        );
                        debug!(%key, "completed before, its transaction did not commit: outputs staged again");
                        return Ok(());
                    }
                    // The first run's result, for whoever answers the duplicate (a request
                    // asked twice is answered with the stored reply).
                    if let Some(r) = stored_result(result) {
                        cx.set_result(r);
                    }
                    bump(
                        &self.stats.duplicates_absorbed,
                        "courier_duplicates_absorbed_total",
                        store,
                    );
                    debug!(%key, "duplicate absorbed");
                    return Ok(());
                }
                Ok(Begin::InProgress { retry_after }) => {
                    bump(
                        &self.stats.in_progress_deferred,
                        "courier_idempotency_in_progress_total",
                        store,
                    );
                    return Err(HandlerError::defer(
                        look_again(self.lease, retry_after),
                        format!("{key} is being processed by another worker"),
                    ));
                }
                Err(e @ Error::IdempotencyConflict { .. }) => {
                    bump(
                        &self.stats.conflicts,
                        "courier_idempotency_conflicts_total",
                        store,
                    );
                    return Err(HandlerError::permanent(e));
                }
                Err(e) => {
                    bump(
                        &self.stats.store_errors,
                        "courier_idempotency_store_errors_total",
                        store,
                    );
                    return match self.policy {
                        StoreFailurePolicy::FailClosed => {
                            warn!(%key, error = %e, "idempotency store unavailable: deferring (fail-closed)");
                            Err(HandlerError::defer(
                                self.store_retry,
                                format!("idempotency store unavailable: {e}"),
                            ))
                        }
                        StoreFailurePolicy::FailOpen => {
                            bump(
                                &self.stats.processed_fail_open,
                                "courier_idempotency_fail_open_total",
                                store,
                            );
                            warn!(%key, error = %e, "idempotency store unavailable: processing without dedup (fail-open)");
                            self.inner.handle(message, cx).await
                        }
                    };
                }
            },
        };
        bump(&self.stats.begun, "courier_idempotency_begun_total", store);

        // Keep the lease alive while the handler runs. Most handlers finish well within a
        // third of the lease, so the heartbeat task only starts when one does not. The guard
        // stops it when this future ends *or is dropped* (cancelled consumer, handler timeout),
        // so an abandoned handler never keeps its lease forever.
        let outcome = {
            let handler = self.inner.handle(message, cx);
            tokio::pin!(handler);
            tokio::select! {
            biased;
            r = &mut handler => r,
            _ = tokio::time::sleep((self.lease / 3).saturating_sub(since.elapsed())) => {
                let _heartbeat = AbortOnDrop({
                    let store = self.store.clone();
                    let key = key.clone();
                    let token = token.clone();
                    let lease = self.lease;
                    let stats = self.stats.clone();
                    tokio::spawn(async move {
                        // The first extension is due now: a third of the lease has passed.
                        let mut tick = tokio::time::interval(lease / 3);
                        loop {
                            tick.tick().await;
                            match store.extend(&key, &token, lease).await {
                                Ok(true) => {}
                                Ok(false) => {
                                    bump(
                                        &stats.leases_lost,
                                        "courier_idempotency_leases_lost_total",
                                        store.name(),
                                    );
                                    warn!(%key, "idempotency lease lost while the handler ran");
                                    return;
                                }
                                Err(e) => warn!(%key, error = %e, "extending the idempotency lease failed"),
                            }
                        }
                    })
                });
                handler.await
            }
            }
        };

        match outcome {
            Ok(()) => {
                // Outputs first: a completed key must always have its outputs published.
                if let Err(e) = cx.flush().await {
                    self.release(&key, &token).await;
                    return Err(HandlerError::retryable(e));
                }
                // Where the backend commits the outputs with the input's offset after this
                // returns, they are stored with the key: see `replay_outputs`.
                let stored = if cx.commits_atomically() {
                    Some(Completed::new(cx).encode())
                } else {
                    cx.result().cloned()
                };
                if self.complete(&key, &token, &fp, stored).await {
                    Ok(())
                } else {
                    Err(HandlerError::defer(
                        self.lease,
                        format!("completing {key} failed"),
                    ))
                }
            }
            Err(e) => {
                self.release(&key, &token).await;
                Err(e)
            }
        }
    }

    fn is_idempotent(&self) -> bool {
        true
    }

    /// Claims the keys of deliveries that arrived together in one store round trip (stores that
    /// can: Redis, PostgreSQL), so each handler run starts with its lease held. A key that exists is left to
    /// `handle`'s own `begin`; a failed batch claim is only logged (each message then claims its
    /// own key, and the store-failure policy applies there).
    async fn prepare(&self, messages: &[&Message]) {
        self.inner.prepare(messages).await;
        if messages.len() < 2 || !self.store.claims_in_batches() {
            return;
        }
        // One claim per key not already claimed (a redelivery can arrive while the first
        // delivery of its id still waits in a lane).
        let mut keys: Vec<(String, String)> = Vec::with_capacity(messages.len());
        {
            let claimed = self.claimed.lock();
            let mut seen = std::collections::HashSet::new();
            for m in messages {
                let key = self.key(m);
                if !claimed.contains_key(&key) && seen.insert(key.clone()) {
                    keys.push((key, fingerprint(m)));
                }
            }
        }
        let pairs: Vec<(&str, &str)> = keys.iter().map(|(k, f)| (k.as_str(), f.as_str())).collect();
        let at = Instant::now();
        match self.store.claim_many(&pairs, self.lease).await {
            Ok(tokens) => {
                let mut claimed = self.claimed.lock();
                // Claims never taken (their handler was dropped) have expired in the store.
                claimed.retain(|_, c| c.at.elapsed() < self.lease);
                for ((key, fingerprint), token) in keys.into_iter().zip(tokens) {
                    if let Some(token) = token {
                        claimed.entry(key).or_insert(Claimed {
                            token,
                            fingerprint,
                            at,
                        });
                    }
                }
            }
            Err(e) => {
                bump(
                    &self.stats.store_errors,
                    "courier_idempotency_store_errors_total",
                    self.store.name(),
                );
                debug!(error = %e, "claiming a batch of keys failed; each message claims its own");
            }
        }
    }

    /// Releases the leases `prepare` claimed for deliveries that will not be handled.
    async fn abandon(&self, messages: &[&Message]) {
        self.inner.abandon(messages).await;
        let taken: Vec<(String, LeaseToken)> = {
            let mut claimed = self.claimed.lock();
            messages
                .iter()
                .filter_map(|m| {
                    let key = self.key(m);
                    claimed.remove(&key).map(|c| (key, c.token))
                })
                .collect()
        };
        for (key, token) in taken {
            self.release(&key, &token).await;
        }
    }
}
