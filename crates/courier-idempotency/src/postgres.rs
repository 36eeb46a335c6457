//! PostgreSQL store (sqlx): one row per key with status, lease token, fingerprint, stored result
//! and expiry; plus a cleanup job for expired rows.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;

use courier_core::{Error, Result};

use crate::store::{Begin, IdempotencyStore, LeaseToken};

/// The table the store keeps its keys in.
pub const DEFAULT_TABLE: &str = "courier_idempotency";

pub(crate) fn pg_err(operation: &'static str, e: impl Into<courier_core::BoxError>) -> Error {
    Error::Store {
        store: "postgres",
        operation,
        source: e.into(),
    }
}

/// Schema of the idempotency table (created by [`PostgresStore::migrate`]).
pub(crate) fn schema(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            key         TEXT PRIMARY KEY,
            status      CHAR(1) NOT NULL CHECK (status IN ('p', 'c')),
            fingerprint TEXT NOT NULL,
            token       TEXT,
            result      BYTEA,
            expires_at  TIMESTAMPTZ NOT NULL,
            updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE INDEX IF NOT EXISTS {table}_expires_at ON {table} (expires_at);"
    )
}

/// Run `ddl` (`CREATE … IF NOT EXISTS` statements) in a transaction that first takes a
/// PostgreSQL advisory lock named `name`. Two sessions creating the same table at the same time
/// can both pass `IF NOT EXISTS`, and one then fails with a unique violation on the catalog
/// (`pg_type_typname_nsp_index`) — what happens when several instances start at once on a fresh
/// database. Guarded by `tests/stores.rs::concurrent_migrations_of_a_fresh_table_all_succeed`.
pub async fn create_serialized(pool: &PgPool, name: &str, ddl: &str) -> Result<()> {
    let mut tx = pool.begin().await.map_err(|e| pg_err("migrate", e))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(|e| pg_err("migrate", e))?;
    sqlx::raw_sql(ddl)
        .execute(&mut *tx)
        .await
        .map_err(|e| pg_err("migrate", e))?;
    tx.commit().await.map_err(|e| pg_err("migrate", e))
}

fn valid_table(table: &str) -> Result<()> {
    let ok = !table.is_empty()
        && table.len() <= 63
        && table
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && !table.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "idempotency table name {table:?} must be a plain SQL identifier (letters, digits, _ and an optional schema.)"
        )))
    }
}

/// The end of a claim: a key that exists is taken over only once its lease or TTL has expired
/// (so one statement decides, one winner per key); the claimed rows' tokens are returned.
const CLAIM_CONFLICT: &str = "ON CONFLICT (key) DO UPDATE
               SET status = 'p', fingerprint = EXCLUDED.fingerprint, token = EXCLUDED.token,
                   result = NULL, expires_at = EXCLUDED.expires_at, updated_at = now()
               WHERE t.expires_at <= now()
             RETURNING token";

fn millis(d: Duration) -> i64 {
    d.as_millis().clamp(1, i64::MAX as u128) as i64
}

/// An idempotency store in PostgreSQL. Cheap to clone (a pool).
///
/// Every row is `(key, status 'p'|'c', fingerprint, token, result, expires_at)`: while in
/// progress `expires_at` is the lease; once completed it is the TTL. Expired rows can be
/// claimed again and are deleted by [`PostgresStore::cleanup`] (run it periodically, e.g. with
/// [`PostgresStore::spawn_cleanup`]).
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    table: String,
    op_timeout: Duration,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.table)
            .finish()
    }
}

impl PostgresStore {
    /// Connect to `url` (credentials in it are never printed) and create the table if missing.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| pg_err("connect", e))?;
        let store = Self::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Use an existing pool (the table is not created: call [`migrate`](Self::migrate)).
    pub fn from_pool(pool: PgPool) -> Self {
        PostgresStore {
            pool,
            table: DEFAULT_TABLE.into(),
            op_timeout: Duration::from_secs(5),
        }
    }

    /// Keep keys in another table (a plain identifier, optionally `schema.table`).
    pub fn with_table(mut self, table: impl Into<String>) -> Result<Self> {
        let table = table.into();
        valid_table(&table)?;
        self.table = table;
        Ok(self)
    }

    /// The pool (share it with the application's own queries).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Create the table and its index if they do not exist (idempotent; safe when several
    /// processes start at once, see [`create_serialized`]).
    pub async fn migrate(&self) -> Result<()> {
        create_serialized(&self.pool, &self.table, &schema(&self.table)).await
    }

    /// Delete expired rows, at most `limit` per call; returns how many were deleted.
    pub async fn cleanup(&self, limit: i64) -> Result<u64> {
        let sql = format!(
            "DELETE FROM {t} WHERE key IN (SELECT key FROM {t} WHERE expires_at < now() LIMIT $1)",
            t = self.table
        );
        let r = sqlx::query(&sql)
            .bind(limit.max(1))
            .execute(&self.pool)
            .await
            .map_err(|e| pg_err("cleanup", e))?;
        Ok(r.rows_affected())
    }

    /// Run [`cleanup`](Self::cleanup) every `every` until the returned handle is aborted or
    /// dropped with the runtime.
    pub fn spawn_cleanup(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
            loop {
                tick.tick().await;
                loop {
                    match store.cleanup(10_000).await {
                        Ok(10_000) => continue,
                        Ok(n) => {
                            if n > 0 {
                                tracing::debug!(deleted = n, "idempotency cleanup");
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "idempotency cleanup failed");
                            break;
                        }
                    }
                }
            }
        })
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
    ) -> Result<T> {
        tokio::time::timeout(self.op_timeout, f)
            .await
            .map_err(|_| pg_err(op, "timed out"))?
            .map_err(|e| pg_err(op, e))
    }
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn begin(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Begin> {
        let token = LeaseToken::new();
        // Claim a new key, or take over one whose lease/TTL has expired: one statement, so one
        // winner per key.
        let claim = format!(
            "INSERT INTO {t} AS t (key, status, fingerprint, token, result, expires_at)
             VALUES ($1, 'p', $2, $3, NULL, now() + $4 * interval '1 millisecond')
             {CLAIM_CONFLICT}",
            t = self.table
        );
        let look = format!(
            "SELECT status, fingerprint, result,
                    GREATEST(0, (EXTRACT(EPOCH FROM (expires_at - now())) * 1000))::BIGINT AS left_ms
             FROM {t} WHERE key = $1 AND expires_at > now()",
            t = self.table
        );
        // A row that expires between the claim and the look is claimed on the next round.
        for _ in 0..3 {
            let claimed = self
                .bounded(
                    "begin",
                    sqlx::query(&claim)
                        .bind(key)
                        .bind(fingerprint)
                        .bind(&token.0)
                        .bind(millis(lease))
                        .fetch_optional(&self.pool),
                )
                .await?;
            if claimed.is_some() {
                return Ok(Begin::Begun(token));
            }
            let row = self
                .bounded(
                    "begin",
                    sqlx::query(&look).bind(key).fetch_optional(&self.pool),
                )
                .await?;
            let Some(row) = row else { continue };
            let status: String = row.get("status");
            let stored: String = row.get("fingerprint");
            if stored != fingerprint {
                return Err(Error::IdempotencyConflict {
                    key: key.to_owned(),
                    stored,
                    received: fingerprint.to_owned(),
                });
            }
            if status == "c" {
                let result: Option<Vec<u8>> = row.get("result");
                return Ok(Begin::Completed {
                    result: result.map(Bytes::from),
                });
            }
            let left: i64 = row.get("left_ms");
            return Ok(Begin::InProgress {
                retry_after: Duration::from_millis(left.max(1) as u64),
            });
        }
        Err(pg_err("begin", "the key kept changing state; try again"))
    }

    fn claims_in_batches(&self) -> bool {
        true
    }

    /// One statement for the whole batch (one commit). Keys go in sorted order, so two batches
    /// that share keys lock their rows in the same order and cannot deadlock; a key given twice
    /// is claimed once (for its first occurrence).
    async fn claim_many(
        &self,
        keys: &[(&str, &str)],
        lease: Duration,
    ) -> Result<Vec<Option<LeaseToken>>> {
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by(|&a, &b| keys[a].0.cmp(keys[b].0));
        order.dedup_by(|later, first| keys[*later].0 == keys[*first].0);
        let tokens: Vec<LeaseToken> = keys.iter().map(|_| LeaseToken::new()).collect();
        let sql = format!(
            "INSERT INTO {t} AS t (key, status, fingerprint, token, result, expires_at)
             SELECT k, 'p', f, tok, NULL, now() + $4 * interval '1 millisecond'
             FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(k, f, tok, n)
             ORDER BY n
             {CLAIM_CONFLICT}",
            t = self.table
        );
        let rows = self
            .bounded(
                "begin",
                sqlx::query(&sql)
                    .bind(order.iter().map(|&i| keys[i].0).collect::<Vec<_>>())
                    .bind(order.iter().map(|&i| keys[i].1).collect::<Vec<_>>())
                    .bind(
                        order
                            .iter()
                            .map(|&i| tokens[i].0.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(millis(lease))
                    .fetch_all(&self.pool),
            )
            .await?;
        let won: std::collections::HashSet<String> =
            rows.iter().map(|r| r.get::<String, _>("token")).collect();
        Ok(tokens
            .into_iter()
            .map(|t| won.contains(&t.0).then_some(t))
            .collect())
    }

    async fn extend(&self, key: &str, token: &LeaseToken, lease: Duration) -> Result<bool> {
        let sql = format!(
            "UPDATE {t} SET expires_at = now() + $3 * interval '1 millisecond', updated_at = now()
             WHERE key = $1 AND status = 'p' AND token = $2",
            t = self.table
        );
        let r = self
            .bounded(
                "extend",
                sqlx::query(&sql)
                    .bind(key)
                    .bind(&token.0)
                    .bind(millis(lease))
                    .execute(&self.pool),
            )
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn complete(
        &self,
        key: &str,
        token: &LeaseToken,
        fingerprint: &str,
        result: Option<Bytes>,
        ttl: Duration,
    ) -> Result<bool> {
        // `old` sees the row before the upsert: the lease was held iff it was ours and live.
        let sql = format!(
            "WITH old AS (
                SELECT (status = 'p' AND token = $2) AS held FROM {t} WHERE key = $1
             ), up AS (
                INSERT INTO {t} AS t (key, status, fingerprint, token, result, expires_at)
                VALUES ($1, 'c', $3, NULL, $4, now() + $5 * interval '1 millisecond')
                ON CONFLICT (key) DO UPDATE
                  SET status = 'c', fingerprint = EXCLUDED.fingerprint, token = NULL,
                      result = EXCLUDED.result, expires_at = EXCLUDED.expires_at, updated_at = now()
                  WHERE NOT (t.status = 'c' AND t.expires_at > now())
                RETURNING 1
             )
             SELECT (SELECT count(*) FROM up) AS written, COALESCE((SELECT held FROM old), false) AS held",
            t = self.table
        );
        let row = self
            .bounded(
                "complete",
                sqlx::query(&sql)
                    .bind(key)
                    .bind(&token.0)
                    .bind(fingerprint)
                    .bind(result.map(|r| r.to_vec()))
                    .bind(millis(ttl))
                    .fetch_one(&self.pool),
            )
            .await?;
        let written: i64 = row.get("written");
        let held: bool = row.get("held");
        Ok(written == 1 && held)
    }

    async fn release(&self, key: &str, token: &LeaseToken) -> Result<()> {
        let sql = format!(
            "DELETE FROM {t} WHERE key = $1 AND status = 'p' AND token = $2",
            t = self.table
        );
        self.bounded(
            "release",
            sqlx::query(&sql)
                .bind(key)
                .bind(&token.0)
                .execute(&self.pool),
        )
        .await?;
        Ok(())
    }
}
