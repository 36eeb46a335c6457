//! # courier-outbox
//!
//! The transactional outbox for PostgreSQL: write a message in the same transaction as your
//! business rows with [`enqueue`], and a [`Relay`] publishes it through any courier backend
//! after the transaction commits. A rolled-back transaction publishes nothing; a committed one
//! is published at least once, and — because the outbox row id *is* the message id end to end
//! (Kafka id header, AMQP `message_id`, SQS FIFO `MessageDeduplicationId`, the idempotent
//! consumer's key) — exactly once in effect when the consumer uses the idempotent layer.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool, client: std::sync::Arc<dyn courier_core::DeliveryClient>) -> courier_core::Result<()> {
//! use courier_core::Message;
//! use courier_outbox::{enqueue, migrate, Relay};
//!
//! migrate(&pool).await?;
//! let mut tx = pool.begin().await.map_err(courier_outbox::db_err("begin"))?;
//! // ... INSERT INTO orders ... in `tx` ...
//! enqueue(&mut tx, "orders", Message::new("order 42 placed").with_key("customer-7")).await?;
//! tx.commit().await.map_err(courier_outbox::db_err("commit"))?;
//!
//! let relay = Relay::new(pool.clone(), client).spawn().await?; // publishes in the background
//! relay.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Several relays may run at once: rows are claimed with `FOR UPDATE SKIP LOCKED`, so no row is
//! claimed twice, and a row is never published while an earlier unpublished row with the same
//! key is held by another relay, so **per-key order** holds across relays. A relay that crashes
//! between publishing and marking leaves its rows unmarked; they are published again (same ids),
//! and the idempotent consumer absorbs the duplicate.

mod relay;

pub use relay::{Relay, RelayHandle, RelayStats, Round};

use std::time::Duration;

use courier_core::{Error, Message, MessageId, Result};
use sqlx::postgres::{PgPool, Postgres};
use sqlx::{Row, Transaction};

/// The outbox table.
pub const TABLE: &str = "courier_outbox";
/// The channel `enqueue` notifies and relays listen on.
pub const CHANNEL: &str = "courier_outbox";

/// Turn a database error into courier's typed store error (`operation` says what failed).
pub fn db_err(operation: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| Error::Store {
        store: "postgres-outbox",
        operation,
        source: e.into(),
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS courier_outbox (
    seq          BIGSERIAL PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    destination  TEXT NOT NULL,
    key          TEXT,
    headers      JSONB NOT NULL DEFAULT '{}',
    payload      BYTEA NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    published_at TIMESTAMPTZ,
    failed_at    TIMESTAMPTZ,
    attempts     INT NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX IF NOT EXISTS courier_outbox_pending ON courier_outbox (seq)
    WHERE published_at IS NULL AND failed_at IS NULL;
CREATE INDEX IF NOT EXISTS courier_outbox_pending_key ON courier_outbox (key, seq)
    WHERE published_at IS NULL AND failed_at IS NULL;
CREATE INDEX IF NOT EXISTS courier_outbox_published ON courier_outbox (published_at)
    WHERE published_at IS NOT NULL;
";

/// Create the outbox table and its indexes if they do not exist (idempotent; run it at
/// startup or copy [`schema_sql`] into your own migrations).
pub async fn migrate(pool: &PgPool) -> Result<()> {
    // Serialise concurrent migrations (CREATE ... IF NOT EXISTS can race on the catalog).
    let mut tx = pool.begin().await.map_err(db_err("migrate"))?;
    sqlx::query("SELECT pg_advisory_xact_lock(7262877)")
        .execute(&mut *tx)
        .await
        .map_err(db_err("migrate"))?;
    sqlx::raw_sql(SCHEMA)
        .execute(&mut *tx)
        .await
        .map_err(db_err("migrate"))?;
    tx.commit().await.map_err(db_err("migrate"))?;
    Ok(())
}

/// The outbox schema, for projects that manage migrations themselves.
pub fn schema_sql() -> &'static str {
    SCHEMA
}

/// Largest payload `enqueue` accepts (PostgreSQL `bytea` can hold more, but no broker courier
/// supports takes more than this in one message).
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// Write `message` to the outbox inside the application's transaction `tx`. It is published
/// to `destination` by a relay after `tx` commits, with `message.id` as its id (returned).
///
/// Errors: an empty destination or an oversize payload is rejected before anything is written;
/// an id already in the outbox is [`Error::IdempotencyConflict`] when the payload differs, and
/// accepted as the same message (nothing new is written) when it is identical.
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    destination: &str,
    message: Message,
) -> Result<MessageId> {
    if destination.is_empty() {
        return Err(Error::config("outbox destination is empty"));
    }
    if message.payload.len() > MAX_PAYLOAD {
        return Err(Error::PayloadTooLarge {
            backend: "outbox",
            destination: destination.to_owned(),
            size: message.payload.len(),
            limit: MAX_PAYLOAD,
        });
    }
    let headers = serde_json::to_value(&message.headers)
        .map_err(|e| Error::config(format!("outbox headers are not JSON-encodable: {e}")))?;
    let inserted = sqlx::query(
        "INSERT INTO courier_outbox (id, destination, key, headers, payload)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO NOTHING
         RETURNING seq",
    )
    .bind(message.id.as_str())
    .bind(destination)
    .bind(message.key.as_deref())
    .bind(&headers)
    .bind(message.payload.as_ref())
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_err("enqueue"))?;
    if inserted.is_none() {
        let row = sqlx::query("SELECT destination, key, payload FROM courier_outbox WHERE id = $1")
            .bind(message.id.as_str())
            .fetch_one(&mut **tx)
            .await
            .map_err(db_err("enqueue"))?;
        let same = row.get::<String, _>("destination") == destination
            && row.get::<Option<String>, _>("key") == message.key
            && row.get::<Vec<u8>, _>("payload") == message.payload.as_ref();
        if !same {
            return Err(Error::IdempotencyConflict {
                key: message.id.to_string(),
                stored: "another message with this id is in the outbox".into(),
                received: format!("{} bytes for {destination}", message.payload.len()),
            });
        }
        return Ok(message.id);
    }
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(&mut **tx)
        .await
        .map_err(db_err("enqueue"))?;
    Ok(message.id)
}

/// What the outbox holds right now.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// Rows waiting to be published.
    pub backlog: i64,
    /// Age of the oldest waiting row (the relay lag), if any.
    pub oldest_pending: Option<Duration>,
    /// Rows published and not yet removed by retention.
    pub published: i64,
    /// Rows published in the last minute.
    pub published_last_minute: i64,
    /// Rows the relay gave up on (a non-retryable publish error); see `last_error`.
    pub failed: i64,
    /// Waiting rows per destination.
    pub backlog_by_destination: Vec<(String, i64)>,
}

impl std::fmt::Display for OutboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "backlog            {}", self.backlog)?;
        match self.oldest_pending {
            Some(d) => writeln!(f, "lag (oldest)       {:.3}s", d.as_secs_f64())?,
            None => writeln!(f, "lag (oldest)       -")?,
        }
        writeln!(f, "published (kept)   {}", self.published)?;
        writeln!(f, "published last 60s {}", self.published_last_minute)?;
        write!(f, "failed             {}", self.failed)?;
        for (d, n) in &self.backlog_by_destination {
            write!(f, "\n  {d:<24} {n} waiting")?;
        }
        Ok(())
    }
}

/// Read the outbox's backlog, lag and counts.
pub async fn status(pool: &PgPool) -> Result<OutboxStatus> {
    let row = sqlx::query(
        "SELECT
            count(*) FILTER (WHERE published_at IS NULL AND failed_at IS NULL) AS backlog,
            EXTRACT(EPOCH FROM (clock_timestamp() - min(created_at) FILTER (WHERE published_at IS NULL AND failed_at IS NULL)))::FLOAT8 AS lag,
            count(*) FILTER (WHERE published_at IS NOT NULL) AS published,
            count(*) FILTER (WHERE published_at > clock_timestamp() - interval '1 minute') AS recent,
            count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed
         FROM courier_outbox",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") => Error::config(
            "this database has no courier_outbox table: create it with courier_outbox::migrate (a relay does at start)",
        ),
        _ => db_err("status")(e),
    })?;
    let by_dest = sqlx::query(
        "SELECT destination, count(*) AS n FROM courier_outbox
         WHERE published_at IS NULL AND failed_at IS NULL GROUP BY destination ORDER BY n DESC LIMIT 20",
    )
    .fetch_all(pool)
    .await
    .map_err(db_err("status"))?;
    Ok(OutboxStatus {
        backlog: row.get("backlog"),
        oldest_pending: row
            .get::<Option<f64>, _>("lag")
            .map(|s| Duration::from_secs_f64(s.max(0.0))),
        published: row.get("published"),
        published_last_minute: row.get("recent"),
        failed: row.get("failed"),
        backlog_by_destination: by_dest
            .iter()
            .map(|r| (r.get("destination"), r.get("n")))
            .collect(),
    })
}

/// Delete published rows older than `older_than`; returns how many were deleted.
pub async fn cleanup(pool: &PgPool, older_than: Duration) -> Result<u64> {
    let r = sqlx::query(
        "DELETE FROM courier_outbox WHERE published_at < clock_timestamp() - $1 * interval '1 millisecond'",
    )
    .bind(older_than.as_millis().min(i64::MAX as u128) as i64)
    .execute(pool)
    .await
    .map_err(db_err("cleanup"))?;
    Ok(r.rows_affected())
}
