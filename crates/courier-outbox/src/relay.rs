//! The relay: claim committed outbox rows, publish them, mark them published.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use courier_core::{DeliveryClient, Error, Headers, Message, MessageId, Result};

use crate::{db_err, CHANNEL};

/// Claims up to `$1` pending rows, skipping rows other relays hold, and returns only rows
/// with no earlier pending row of the same key outside this batch (per-key order across relays).
const CLAIM: &str = "
WITH c AS MATERIALIZED (
    SELECT seq FROM courier_outbox
    WHERE published_at IS NULL AND failed_at IS NULL
    ORDER BY seq
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
SELECT o.seq, o.id, o.destination, o.key, o.headers, o.payload,
       (o.key IS NULL OR NOT EXISTS (
            SELECT 1 FROM courier_outbox p
            WHERE p.key = o.key AND p.seq < o.seq
              AND p.published_at IS NULL AND p.failed_at IS NULL
              AND p.seq NOT IN (SELECT seq FROM c))) AS ready
FROM courier_outbox o JOIN c USING (seq)
ORDER BY o.seq";

const MARK: &str = "
UPDATE courier_outbox
SET published_at = clock_timestamp(), attempts = attempts + 1, last_error = NULL
WHERE seq = ANY($1)
RETURNING EXTRACT(EPOCH FROM (clock_timestamp() - created_at))::FLOAT8 AS latency";

const FAIL: &str = "
UPDATE courier_outbox
SET failed_at = clock_timestamp(), attempts = attempts + 1, last_error = $2
WHERE seq = $1";

/// Keep at most this many latency samples (for percentiles).
const MAX_SAMPLES: usize = 1_000_000;

/// A relay's counters and latency samples (shared; read them while it runs).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows published and marked.
    pub published: AtomicU64,
    /// Batches claimed that published at least one row.
    pub batches: AtomicU64,
    /// Publish attempts that failed with a retryable error (the rows are retried).
    pub publish_errors: AtomicU64,
    /// Rows given up on (non-retryable publish error); they stay in the table with `failed_at`.
    pub failed: AtomicU64,
    /// Rows claimed but left for later because an earlier row of their key was held elsewhere.
    pub held_back: AtomicU64,
    latencies: Mutex<Vec<f64>>,
}

impl RelayStats {
    /// The `q`-quantile (0..=1) of commit→published latency over the recorded rows.
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        let mut v = self.latencies.lock().clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let i = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(Duration::from_secs_f64(v[i].max(0.0)))
    }

    fn record(&self, latencies: &[f64]) {
        let mut l = self.latencies.lock();
        for x in latencies {
            if l.len() < MAX_SAMPLES {
                l.push(*x);
            }
        }
    }
}

/// What one relay round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Round {
    /// Rows published and marked.
    pub published: usize,
    /// Rows held back for per-key order (another relay holds an earlier row of their key).
    pub held_back: usize,
    /// Rows marked failed.
    pub failed: usize,
}

/// Publishes the outbox through a courier client. See the crate docs.
pub struct Relay {
    pool: PgPool,
    client: Arc<dyn DeliveryClient>,
    batch_size: i64,
    poll_interval: Duration,
    retention: Option<Duration>,
    cleanup_every: Duration,
    status_every: Duration,
    max_backoff: Duration,
    stats: Arc<RelayStats>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("backend", &self.client.backend())
            .field("batch_size", &self.batch_size)
            .field("poll_interval", &self.poll_interval)
            .field("retention", &self.retention)
            .finish()
    }
}

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
    stats: Arc<RelayStats>,
}

impl RelayHandle {
    /// The relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Stop after the batch in flight is published and marked; returns the counters.
    pub async fn shutdown(self) -> Result<Arc<RelayStats>> {
        self.token.cancel();
        match self.task.await {
            Ok(r) => r.map(|()| self.stats),
            Err(e) => Err(Error::Store {
                store: "postgres-outbox",
                operation: "relay",
                source: e.into(),
            }),
        }
    }
}

fn headers_from(v: serde_json::Value) -> Headers {
    serde_json::from_value(v).unwrap_or_default()
}

impl Relay {
    /// A relay over `pool`'s outbox publishing through `client`. Defaults: batches of 500,
    /// LISTEN/NOTIFY with a 1 s polling fallback, published rows kept 24 h.
    pub fn new(pool: PgPool, client: Arc<dyn DeliveryClient>) -> Self {
        Relay {
            pool,
            client,
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            retention: Some(Duration::from_secs(24 * 3600)),
            cleanup_every: Duration::from_secs(60),
            status_every: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
            stats: Arc::default(),
        }
    }

    /// Rows claimed per round (1..=10 000).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.clamp(1, 10_000) as i64;
        self
    }

    /// How often to look for rows when no notification arrives (the fallback when
    /// LISTEN/NOTIFY is unavailable, e.g. behind a transaction-pooling proxy).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d.max(Duration::from_millis(10));
        self
    }

    /// Delete published rows older than this (`None` keeps them).
    pub fn retention(mut self, keep: Option<Duration>) -> Self {
        self.retention = keep;
        self
    }

    /// Longest wait between retries after a publish or database error.
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d.max(Duration::from_millis(10));
        self
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Claim one batch, publish it and mark it, in one database transaction (a crash before
    /// the commit leaves the rows to be published again — same ids).
    pub async fn run_once(&self) -> Result<Round> {
        let mut tx = self.pool.begin().await.map_err(db_err("claim"))?;
        let rows = sqlx::query(CLAIM)
            .bind(self.batch_size)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err("claim"))?;
        let mut round = Round::default();
        if rows.is_empty() {
            tx.commit().await.map_err(db_err("claim"))?;
            return Ok(round);
        }
        // Group ready rows by destination, keeping seq order inside each group.
        let mut groups: BTreeMap<String, Vec<(i64, Message)>> = BTreeMap::new();
        for r in &rows {
            if !r.get::<bool, _>("ready") {
                round.held_back += 1;
                continue;
            }
            let message = Message {
                id: MessageId::from_string(r.get::<String, _>("id")),
                key: r.get("key"),
                headers: headers_from(r.get("headers")),
                payload: r.get::<Vec<u8>, _>("payload").into(),
            };
            groups
                .entry(r.get("destination"))
                .or_default()
                .push((r.get("seq"), message));
        }
        self.stats
            .held_back
            .fetch_add(round.held_back as u64, Ordering::Relaxed);
        let span = info_span!(
            "courier.outbox.relay",
            rows = rows.len(),
            held_back = round.held_back
        );
        let mut retry_error = None;
        async {
            for (destination, batch) in groups {
                let (seqs, messages): (Vec<i64>, Vec<Message>) = batch.into_iter().unzip();
                match self.client.publish_batch(&destination, messages.clone()).await {
                    Ok(_) => {
                        self.mark(&mut tx, &seqs, &destination).await?;
                        round.published += seqs.len();
                    }
                    Err(e) if e.is_retryable() => {
                        self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("courier_outbox_publish_errors_total", "destination" => destination.clone()).increment(1);
                        warn!(%destination, error = %e, "outbox publish failed; will retry");
                        retry_error = Some(e);
                        break;
                    }
                    Err(e) => {
                        // Isolate the rows the broker refuses; publish the rest in order.
                        debug!(%destination, error = %e, "batch refused; publishing one by one");
                        for (seq, m) in seqs.into_iter().zip(messages) {
                            match self.client.publish(&destination, m).await {
                                Ok(_) => {
                                    self.mark(&mut tx, &[seq], &destination).await?;
                                    round.published += 1;
                                }
                                Err(e) if e.is_retryable() => {
                                    retry_error = Some(e);
                                    break;
                                }
                                Err(e) => {
                                    warn!(%destination, seq, error = %e, "outbox row cannot be published; marked failed");
                                    sqlx::query(FAIL)
                                        .bind(seq)
                                        .bind(format!("{} ({})", e, e.kind()))
                                        .execute(&mut *tx)
                                        .await
                                        .map_err(db_err("mark failed"))?;
                                    round.failed += 1;
                                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                                    metrics::counter!("courier_outbox_failed_total", "destination" => destination.clone()).increment(1);
                                }
                            }
                        }
                        if retry_error.is_some() {
                            break;
                        }
                    }
                }
            }
            Ok::<(), Error>(())
        }
        .instrument(span)
        .await?;
        tx.commit().await.map_err(db_err("mark"))?;
        if round.published > 0 {
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
        }
        match retry_error {
            Some(e) if round.published == 0 => Err(e),
            _ => Ok(round),
        }
    }

    async fn mark(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        seqs: &[i64],
        destination: &str,
    ) -> Result<()> {
        let rows = sqlx::query(MARK)
            .bind(seqs)
            .fetch_all(&mut **tx)
            .await
            .map_err(db_err("mark"))?;
        let latencies: Vec<f64> = rows.iter().map(|r| r.get::<f64, _>("latency")).collect();
        let h = metrics::histogram!("courier_outbox_latency_seconds", "destination" => destination.to_owned());
        for l in &latencies {
            h.record(*l);
        }
        self.stats.record(&latencies);
        self.stats
            .published
            .fetch_add(seqs.len() as u64, Ordering::Relaxed);
        metrics::counter!("courier_outbox_published_total", "destination" => destination.to_owned())
            .increment(seqs.len() as u64);
        Ok(())
    }

    /// Create the table if needed, start listening, and run in the background until
    /// [`RelayHandle::shutdown`].
    pub async fn spawn(self) -> Result<RelayHandle> {
        crate::migrate(&self.pool).await?;
        let listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut l) => match l.listen(CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    warn!(error = %e, "LISTEN failed; the relay polls");
                    None
                }
            },
            Err(e) => {
                warn!(error = %e, "no LISTEN connection; the relay polls");
                None
            }
        };
        let token = CancellationToken::new();
        let stats = self.stats.clone();
        let task = tokio::spawn(self.run(listener, token.clone()));
        Ok(RelayHandle { token, task, stats })
    }

    async fn run(self, mut listener: Option<PgListener>, token: CancellationToken) -> Result<()> {
        let mut backoff = Duration::from_millis(50);
        let mut last_cleanup = tokio::time::Instant::now();
        let mut last_status = tokio::time::Instant::now() - self.status_every;
        while !token.is_cancelled() {
            if last_status.elapsed() >= self.status_every {
                last_status = tokio::time::Instant::now();
                if let Ok(s) = crate::status(&self.pool).await {
                    metrics::gauge!("courier_outbox_backlog").set(s.backlog as f64);
                    metrics::gauge!("courier_outbox_lag_seconds")
                        .set(s.oldest_pending.map_or(0.0, |d| d.as_secs_f64()));
                }
            }
            if let Some(keep) = self.retention {
                if last_cleanup.elapsed() >= self.cleanup_every {
                    last_cleanup = tokio::time::Instant::now();
                    match crate::cleanup(&self.pool, keep).await {
                        Ok(n) if n > 0 => debug!(deleted = n, "outbox retention"),
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "outbox retention failed"),
                    }
                }
            }
            let wait = match self.run_once().await {
                Ok(round) => {
                    backoff = Duration::from_millis(50);
                    if round.published > 0 || round.failed > 0 {
                        continue;
                    }
                    if round.held_back > 0 {
                        // Another relay holds earlier rows of these keys: it will be done soon.
                        Some(Duration::from_millis(5))
                    } else {
                        None
                    }
                }
                Err(e) => {
                    warn!(error = %e, "outbox relay round failed; backing off");
                    let b = backoff;
                    backoff = (backoff * 2).min(self.max_backoff);
                    Some(b)
                }
            };
            match (wait, listener.as_mut()) {
                (Some(d), _) => {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tokio::time::sleep(d) => {}
                    }
                }
                (None, Some(l)) => {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        n = l.recv() => {
                            if let Err(e) = n {
                                debug!(error = %e, "LISTEN connection lost; polling until it returns");
                                tokio::time::sleep(self.poll_interval.min(Duration::from_millis(200))).await;
                            }
                        }
                        _ = tokio::time::sleep(self.poll_interval) => {}
                    }
                }
                (None, None) => {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tokio::time::sleep(self.poll_interval) => {}
                    }
                }
            }
        }
        Ok(())
    }
}
