//! Transactional mode: the dedup row and the handler's business writes commit in one
//! PostgreSQL transaction.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, Postgres};
use sqlx::{Row, Transaction};
use tracing::{debug, warn};

use courier_core::{Context, Error, Handler, HandlerError, Message};

use crate::layer::{fingerprint, IdempotencyStats};
use crate::postgres::{pg_err, PostgresStore};

/// A handler whose effects are writes to PostgreSQL, made inside the transaction it is given.
///
/// Return `Ok` to commit the transaction (business writes and the dedup row together); an
/// error rolls both back and the message is retried or dead-lettered per the retry policy.
#[async_trait]
pub trait TxHandler: Send + Sync + 'static {
    /// Process `message`, writing through `tx`. Do not commit or roll back `tx` yourself.
    async fn handle(
        &self,
        message: &Message,
        tx: &mut Transaction<'static, Postgres>,
        cx: &mut Context,
    ) -> Result<(), HandlerError>;
}

/// The idempotent layer in transactional mode, for handlers whose effects live in the same
/// PostgreSQL database as the idempotency table.
///
/// Per message: open a transaction, insert the key's row as completed (a concurrent worker
/// with the same key blocks on the row lock, then sees it completed), run the handler in the
/// same transaction, publish its staged outputs, commit, then let the consume loop acknowledge.
/// A crash anywhere before the commit rolls everything back (the message is redelivered and
/// runs again from scratch); a crash after the commit but before the acknowledgement makes the
/// redelivery find the row and be acknowledged without running the handler. No lease is needed:
/// the transaction is the lease.
pub struct TransactionalIdempotent<H> {
    inner: H,
    pool: PgPool,
    table: String,
    namespace: String,
    ttl: Duration,
    lock_timeout: Duration,
    stats: Arc<IdempotencyStats>,
}

impl<H> std::fmt::Debug for TransactionalIdempotent<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalIdempotent")
            .field("table", &self.table)
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .finish()
    }
}

fn bump(
    stats: &IdempotencyStats,
    pick: fn(&IdempotencyStats) -> &std::sync::atomic::AtomicU64,
    metric: &'static str,
) {
    pick(stats).fetch_add(1, Ordering::Relaxed);
    metrics::counter!(metric, "store" => "postgres").increment(1);
}

fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

impl<H: TxHandler> TransactionalIdempotent<H> {
    /// Wrap `inner`, keeping keys in `store`'s table (create it with `store.migrate()`).
    /// Defaults: namespace `default`, TTL 24 h, lock wait 2 s.
    pub fn new(inner: H, store: &PostgresStore) -> Self {
        TransactionalIdempotent {
            inner,
            pool: store.pool().clone(),
            table: store.table().to_owned(),
            namespace: "default".into(),
            ttl: Duration::from_secs(24 * 3600),
            lock_timeout: Duration::from_secs(2),
            stats: Arc::default(),
        }
    }

    /// Namespace keys (use the consumer group).
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    /// How long a completed key is remembered.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// How long to wait for another worker holding the same key before deferring.
    pub fn lock_timeout(mut self, d: Duration) -> Self {
        self.lock_timeout = d.max(Duration::from_millis(10));
        self
    }

    /// The layer's counters.
    pub fn stats(&self) -> Arc<IdempotencyStats> {
        self.stats.clone()
    }

    fn store_unavailable(&self, op: &'static str, e: sqlx::Error) -> HandlerError {
        bump(
            &self.stats,
            |s| &s.store_errors,
            "courier_idempotency_store_errors_total",
        );
        warn!(error = %e, "idempotency database unavailable: deferring");
        HandlerError::defer(
            Duration::from_secs(1),
            format!("idempotency database unavailable: {}", pg_err(op, e)),
        )
    }
}

#[async_trait]
impl<H: TxHandler> Handler for TransactionalIdempotent<H> {
    async fn handle(&self, message: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        let key = format!("{}:{}", self.namespace, crate::idempotency_key(message));
        let fp = fingerprint(message);
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.store_unavailable("begin", e))?;
        let set_timeout = format!(
            "SET LOCAL lock_timeout = '{}ms'",
            self.lock_timeout.as_millis()
        );
        sqlx::query(&set_timeout)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.store_unavailable("begin", e))?;
        let claim = format!(
            "INSERT INTO {t} AS t (key, status, fingerprint, token, result, expires_at)
             VALUES ($1, 'c', $2, NULL, NULL, now() + $3 * interval '1 millisecond')
             ON CONFLICT (key) DO UPDATE
               SET status = 'c', fingerprint = EXCLUDED.fingerprint, token = NULL, result = NULL,
                   expires_at = EXCLUDED.expires_at, updated_at = now()
               WHERE t.expires_at <= now()
             RETURNING 1",
            t = self.table
        );
        let ttl_ms = self.ttl.as_millis().min(i64::MAX as u128) as i64;
        let claimed = match sqlx::query(&claim)
            .bind(&key)
            .bind(&fp)
            .bind(ttl_ms)
            .fetch_optional(&mut *tx)
            .await
        {
            Ok(row) => row.is_some(),
            Err(e) if is_lock_timeout(&e) => {
                bump(
                    &self.stats,
                    |s| &s.in_progress_deferred,
                    "courier_idempotency_in_progress_total",
                );
                return Err(HandlerError::defer(
                    self.lock_timeout,
                    format!("{key} is being processed by another worker"),
                ));
            }
            Err(e) => return Err(self.store_unavailable("begin", e)),
        };
        if !claimed {
            let look = format!(
                "SELECT status, fingerprint, result FROM {t} WHERE key = $1",
                t = self.table
            );
            let row = sqlx::query(&look)
                .bind(&key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.store_unavailable("begin", e))?;
            let _ = tx.rollback().await;
            let Some(row) = row else {
                return Err(HandlerError::defer(
                    Duration::from_millis(50),
                    format!("{key} changed state while claiming; retrying"),
                ));
            };
            let stored: String = row.get("fingerprint");
            let status: String = row.get("status");
            if stored != fp {
                bump(
                    &self.stats,
                    |s| &s.conflicts,
                    "courier_idempotency_conflicts_total",
                );
                return Err(HandlerError::permanent(Error::IdempotencyConflict {
                    key,
                    stored,
                    received: fp,
                }));
            }
            if status == "c" {
                cx.absorb_duplicate();
                let result: Option<Vec<u8>> = row.get("result");
                let result = result.map(bytes::Bytes::from);
                if crate::layer::replay_outputs(cx, result.as_ref()) {
                    bump(
                        &self.stats,
                        |s| &s.outputs_replayed,
                        "courier_idempotency_outputs_replayed_total",
                    );
                    debug!(%key, "completed before, its transaction did not commit: outputs staged again (transactional)");
                    return Ok(());
                }
                if let Some(r) = crate::layer::stored_result(result) {
                    cx.set_result(r);
                }
                bump(
                    &self.stats,
                    |s| &s.duplicates_absorbed,
                    "courier_duplicates_absorbed_total",
                );
                debug!(%key, "duplicate absorbed (transactional)");
                return Ok(());
            }
            // A live lease of the non-transactional layer on the same key.
            bump(
                &self.stats,
                |s| &s.in_progress_deferred,
                "courier_idempotency_in_progress_total",
            );
            return Err(HandlerError::defer(
                self.lock_timeout,
                format!("{key} is being processed by another worker"),
            ));
        }
        bump(&self.stats, |s| &s.begun, "courier_idempotency_begun_total");

        if let Err(e) = self.inner.handle(message, &mut tx, cx).await {
            let _ = tx.rollback().await;
            return Err(e);
        }
        // On a backend that commits the outputs with the input's offset, they are stored with
        // the key (see `layer::Completed`).
        let stored = if cx.commits_atomically() {
            Some(crate::layer::Completed::new(cx).encode())
        } else {
            cx.result().cloned()
        };
        if let Some(result) = stored {
            let sql = format!("UPDATE {t} SET result = $2 WHERE key = $1", t = self.table);
            if let Err(e) = sqlx::query(&sql)
                .bind(&key)
                .bind(result.to_vec())
                .execute(&mut *tx)
                .await
            {
                let _ = tx.rollback().await;
                return Err(self.store_unavailable("complete", e));
            }
        }
        // Outputs before the commit: a committed key always has its outputs published (a crash
        // in between republishes them with the same derived ids, which consumers dedup).
        if let Err(e) = cx.flush().await {
            let _ = tx.rollback().await;
            return Err(HandlerError::retryable(e));
        }
        tx.commit()
            .await
            .map_err(|e| self.store_unavailable("complete", e))?;
        bump(
            &self.stats,
            |s| &s.completed,
            "courier_idempotency_completed_total",
        );
        Ok(())
    }

    fn is_idempotent(&self) -> bool {
        true
    }
}
