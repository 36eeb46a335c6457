//! The delivery ledger: what was sent, every handler invocation and effect, latencies; and
//! its PostgreSQL side in the transactional mode (effects as rows).

use super::*;

#[derive(Default)]
pub(super) struct Ledger {
    pub(super) sent: Mutex<HashMap<String, ()>>,
    pub(super) effects: Mutex<HashMap<String, u32>>,
    pub(super) invocations: Mutex<HashMap<String, u32>>,
    pub(super) latencies: Mutex<Vec<f64>>,
    pub(super) total_effects: AtomicU64,
    pub(super) last_effect: Mutex<Option<Instant>>,
    /// Woken whenever effects are recorded, for [`Ledger::reached`].
    pub(super) changed: tokio::sync::Notify,
}

/// What a fault's mark counts.
#[derive(Clone, Copy)]
pub(super) enum Progress {
    /// Distinct ids that had an effect.
    Effects,
    /// Distinct ids that reached a handler: what the kills count, since a kill needs a handler
    /// to start — under at-most-once, failed handlers and store outages hold effects back while
    /// deliveries keep reaching handlers.
    Invocations,
}

impl Ledger {
    /// Message `id` was published (its first publish succeeded).
    pub(super) fn sent(&self, id: &str) {
        self.sent.lock().insert(id.to_owned(), ());
    }

    /// Wait until `target` distinct ids had an effect, or until `deadline`.
    pub(super) async fn reached(&self, target: usize, deadline: Instant) {
        self.reached_or_idle(target, Progress::Effects, None, deadline)
            .await
    }

    pub(super) fn progress(&self, by: Progress) -> usize {
        match by {
            Progress::Effects => self.effects.lock().len(),
            Progress::Invocations => self.invocations.lock().len(),
        }
    }

    /// Count one handler start on `id`.
    pub(super) fn invoked(&self, id: String) {
        *self.invocations.lock().entry(id).or_default() += 1;
        self.changed.notify_waiters();
    }

    /// Like [`Ledger::reached`] (counting `by`), but with `idle` also return once effects stopped
    /// coming for that long after the first one: a mark the run can no longer reach (an
    /// at-most-once run whose faults lost the rest) must not hold the fault back until the
    /// deadline.
    pub(super) async fn reached_or_idle(
        &self,
        target: usize,
        by: Progress,
        idle: Option<Duration>,
        deadline: Instant,
    ) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.progress(by) >= target {
                return;
            }
            let now = Instant::now();
            if deadline <= now {
                return;
            }
            let mut wake = deadline;
            if let (Some(idle), Some(last)) = (idle, *self.last_effect.lock()) {
                if now.saturating_duration_since(last) >= idle {
                    return;
                }
                wake = wake.min(last + idle);
            }
            let _ = tokio::time::timeout(wake.saturating_duration_since(now), changed).await;
        }
    }

    /// Count one effect of `id` (the in-memory effect of the non-transactional modes).
    pub(super) fn record(&self, id: String, latency_ms: Option<f64>) {
        *self.effects.lock().entry(id).or_default() += 1;
        self.total_effects.fetch_add(1, Ordering::Relaxed);
        *self.last_effect.lock() = Some(Instant::now());
        if let Some(l) = latency_ms {
            self.latencies.lock().push(l);
        }
        self.changed.notify_waiters();
    }
}

/// Milliseconds since the producer stamped `m`.
pub(super) fn latency_ms(m: &Message) -> Option<f64> {
    let sent = m.headers.get(SENT_AT)?.parse::<u64>().ok()?;
    Some(now_micros().saturating_sub(sent) as f64 / 1000.0)
}

pub(super) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The PostgreSQL side of the transactional mode: the pool the layer uses (its connections carry
/// an application name of their own, so the outage fault can find and kill exactly them) and an
/// admin pool that reads the effects and injects the outage.
pub(super) struct PgLedger {
    pub(super) store: PostgresStore,
    pub(super) admin: PgPool,
    pub(super) app: String,
    pub(super) run: String,
}

impl PgLedger {
    /// The application name of run `run`'s store connections (what the outage terminates).
    pub(super) fn app(run: &str) -> String {
        format!("courier-verify-{run}")
    }

    /// The store's pool of run `run`, `max` connections (in the verify process, or a consumer
    /// process with its four handlers).
    pub(super) async fn store_pool(url: &str, run: &str, max: u32) -> Result<PgPool> {
        let opts: PgConnectOptions = url
            .parse()
            .map_err(|e| anyhow!("idempotency.store is not a PostgreSQL URL: {e}"))?;
        PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.application_name(&Self::app(run)))
            .await
            .map_err(|e| anyhow!("connecting to the idempotency database: {e}"))
    }

    pub(super) async fn connect(url: &str, run: &str) -> Result<Self> {
        let app = Self::app(run);
        let opts: PgConnectOptions = url
            .parse()
            .map_err(|e| anyhow!("idempotency.store is not a PostgreSQL URL: {e}"))?;
        let pool = Self::store_pool(url, run, 16).await?;
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.application_name("courier-verify-admin"))
            .await
            .map_err(|e| anyhow!("connecting to the idempotency database: {e}"))?;
        let store = PostgresStore::from_pool(pool);
        store.migrate().await?;
        courier::idempotency::create_serialized(
            &admin,
            EFFECTS_TABLE,
            &format!(
                "CREATE TABLE IF NOT EXISTS {EFFECTS_TABLE} (
                     run TEXT NOT NULL, id TEXT NOT NULL, latency_ms DOUBLE PRECISION,
                     at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
                 CREATE INDEX IF NOT EXISTS {EFFECTS_TABLE}_run ON {EFFECTS_TABLE} (run);"
            ),
        )
        .await?;
        Ok(PgLedger {
            store,
            admin,
            app,
            run: run.to_owned(),
        })
    }

    /// Copy the run's committed effects into the in-memory ledger (what progress and the
    /// report read).
    pub(super) async fn sync(&self, ledger: &Ledger) -> Result<()> {
        let rows = sqlx::query(&format!(
            "SELECT id, count(*) AS n FROM {EFFECTS_TABLE} WHERE run = $1 GROUP BY id"
        ))
        .bind(&self.run)
        .fetch_all(&self.admin)
        .await?;
        let mut effects = HashMap::with_capacity(rows.len());
        let mut total = 0u64;
        for r in rows {
            let n: i64 = r.try_get("n")?;
            total += n as u64;
            effects.insert(r.try_get::<String, _>("id")?, n as u32);
        }
        *ledger.effects.lock() = effects;
        if ledger.total_effects.swap(total, Ordering::Relaxed) != total {
            *ledger.last_effect.lock() = Some(Instant::now());
        }
        ledger.changed.notify_waiters();
        Ok(())
    }

    pub(super) async fn latencies(&self) -> Result<Vec<f64>> {
        let rows = sqlx::query(&format!(
            "SELECT latency_ms FROM {EFFECTS_TABLE} WHERE run = $1 AND latency_ms IS NOT NULL"
        ))
        .bind(&self.run)
        .fetch_all(&self.admin)
        .await?;
        Ok(rows.iter().filter_map(|r| r.try_get(0).ok()).collect())
    }

    /// The outage: terminate every connection of the run's pool, again every 20 ms (new ones
    /// included), until `until`.
    pub(super) async fn outage(&self, until: Instant, stop: &CancellationToken) {
        while Instant::now() < until && !stop.is_cancelled() {
            let _ = sqlx::query(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = $1",
            )
            .bind(&self.app)
            .execute(&self.admin)
            .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) async fn cleanup(&self) {
        let _ = sqlx::query(&format!("DELETE FROM {EFFECTS_TABLE} WHERE run = $1"))
            .bind(&self.run)
            .execute(&self.admin)
            .await;
    }
}
