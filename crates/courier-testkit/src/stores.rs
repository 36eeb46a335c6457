//! Idempotency stores on the local services, for layered suites. Unreachable = test failure.

use std::sync::Arc;

use courier_idempotency::{IdempotencyStore, PostgresStore, RedisStore};

use crate::endpoints::{database_url, redis_url, unreachable};

/// A [`RedisStore`] on `REDIS_URL`.
pub async fn redis() -> Arc<dyn IdempotencyStore> {
    let url = redis_url();
    match RedisStore::connect(&url).await {
        Ok(s) => Arc::new(s),
        Err(e) => unreachable("Redis", &url, e),
    }
}

/// A [`PostgresStore`] on `DATABASE_URL` (table created if missing).
pub async fn postgres() -> Arc<dyn IdempotencyStore> {
    let url = database_url();
    match PostgresStore::connect(&url).await {
        Ok(s) => Arc::new(s),
        Err(e) => unreachable("PostgreSQL", &url, e),
    }
}
