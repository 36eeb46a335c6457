//! The experiment's handler, the kill switch that crashes a consumer mid-handler, and the
//! idempotency store that goes down on cue.

use super::*;

/// The experiment's handler: a unit of "work" (a short wait during which a crash can hit), then
/// the effect — counted in memory, or (transactional mode) a row inserted into [`EFFECTS_TABLE`]
/// in the transaction that records the key.
pub(super) struct Work {
    pub(super) sink: Sink,
    pub(super) error_rate: f64,
    /// Which consumer this handler belongs to.
    pub(super) consumer: u64,
    /// The run's id in the effects table.
    pub(super) run: String,
}

/// Where a handler reports its invocations and effects, and learns of kills.
pub(super) enum Sink {
    /// A consumer task of the verify process: the run's ledger and kill switch.
    Local {
        ledger: Arc<Ledger>,
        kill: Arc<KillSwitch>,
    },
    /// A consumer process: lines to the parent, which keeps the ledger ([`workers`]).
    Pipe(Arc<workers::Pipe>),
}

/// Lets the fault driver crash a consumer while one of its handlers is mid-way. Shared by all
/// consumers: the first handler (of any consumer) to start once the switch is armed and its
/// mark reached parks, and its consumer is the one crashed — a consumer that happens to have
/// nothing to do is never picked. The handlers check the mark themselves, so a kill lands on the
/// first handler past it even when the run outpaces the driver.
pub(super) struct KillSwitch {
    /// Handler starts (distinct ids) at which the next handler parks; `DISARMED` when none,
    /// `OFFERED` while consumer processes are offered it.
    pub(super) armed_at: AtomicU64,
    pub(super) parked: tokio::sync::Notify,
    pub(super) victim: AtomicU64,
    /// The consumer being crashed: its other handlers do not take the next kill.
    pub(super) doomed: AtomicU64,
    /// Woken when a kill is armed (consumer processes are offered it by a relay).
    pub(super) rearmed: tokio::sync::Notify,
}

pub(super) const DISARMED: u64 = u64::MAX;

/// `armed_at` while the kill is offered to consumer processes: the first to report a parked
/// handler takes it.
pub(super) const OFFERED: u64 = u64::MAX - 1;

impl Default for KillSwitch {
    fn default() -> Self {
        KillSwitch {
            armed_at: AtomicU64::new(DISARMED),
            parked: tokio::sync::Notify::new(),
            victim: AtomicU64::new(0),
            doomed: AtomicU64::new(DISARMED),
            rearmed: tokio::sync::Notify::new(),
        }
    }
}

impl KillSwitch {
    /// A handler of consumer `consumer` took the kill and is parked: it is the victim.
    pub(super) fn report_parked(&self, consumer: u64) {
        self.victim.store(consumer, Ordering::SeqCst);
        self.parked.notify_one();
    }

    /// Arm the next kill at `at` handler starts (distinct ids).
    pub(super) fn arm(&self, at: u64) {
        self.armed_at.store(at, Ordering::SeqCst);
        self.rearmed.notify_waiters();
    }

    /// Whether this handler, of consumer `consumer`, takes the kill (at most one does per
    /// arming).
    pub(super) fn take(&self, consumer: u64, started: impl FnOnce() -> usize) -> bool {
        let at = self.armed_at.load(Ordering::SeqCst);
        at != DISARMED
            && consumer != self.doomed.load(Ordering::SeqCst)
            && started() as u64 >= at
            && self
                .armed_at
                .compare_exchange(at, DISARMED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }
}

impl Work {
    /// Everything before the effect: count the invocation, work, crash or fail when told to.
    pub(super) async fn prelude(&self, m: &Message) -> Result<(), HandlerError> {
        match &self.sink {
            Sink::Local { ledger, kill } => {
                ledger.invoked(m.id.to_string());
                tokio::time::sleep(Duration::from_micros(200)).await;
                if kill.take(self.consumer, || ledger.progress(Progress::Invocations)) {
                    // Crash point: tell the driver which consumer is mid-handler, then never
                    // finish.
                    kill.report_parked(self.consumer);
                    std::future::pending::<()>().await;
                }
            }
            Sink::Pipe(pipe) => {
                pipe.send(&format!("I {}", m.id));
                tokio::time::sleep(Duration::from_micros(200)).await;
                // Crash point: parked until SIGKILL (or resumed when another took the kill).
                pipe.maybe_park().await;
            }
        }
        if self.error_rate > 0.0 && fastrand::f64() < self.error_rate {
            return Err(HandlerError::retryable("injected handler error"));
        }
        Ok(())
    }
}

#[async_trait]
impl Handler for Work {
    async fn handle(&self, m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        self.prelude(m).await?;
        match &self.sink {
            Sink::Local { ledger, .. } => ledger.record(m.id.to_string(), latency_ms(m)),
            Sink::Pipe(pipe) => pipe.send(&format!(
                "E {} {}",
                m.id,
                latency_ms(m).map_or_else(|| "-".to_owned(), |l| format!("{l:.3}"))
            )),
        }
        Ok(())
    }
}

#[async_trait]
impl TxHandler for Work {
    async fn handle(
        &self,
        m: &Message,
        tx: &mut Transaction<'static, Postgres>,
        _cx: &mut Context,
    ) -> Result<(), HandlerError> {
        self.prelude(m).await?;
        sqlx::query(&format!(
            "INSERT INTO {EFFECTS_TABLE} (run, id, latency_ms) VALUES ($1, $2, $3)"
        ))
        .bind(&self.run)
        .bind(m.id.to_string())
        .bind(latency_ms(m))
        .execute(&mut **tx)
        .await
        .map_err(|e| {
            HandlerError::defer(
                Duration::from_millis(200),
                format!("recording the effect failed: {e}"),
            )
        })?;
        Ok(())
    }
}

/// An idempotency store that is unreachable while `down` is set.
pub(super) struct Flaky {
    pub(super) inner: Arc<dyn IdempotencyStore>,
    pub(super) down: Arc<AtomicBool>,
}

impl Flaky {
    pub(super) fn check(&self) -> courier::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(courier::Error::Store {
                store: "flaky",
                operation: "call",
                source: "injected store outage".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl IdempotencyStore for Flaky {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn begin(&self, key: &str, fp: &str, lease: Duration) -> courier::Result<Begin> {
        self.check()?;
        self.inner.begin(key, fp, lease).await
    }
    async fn extend(&self, key: &str, t: &LeaseToken, lease: Duration) -> courier::Result<bool> {
        self.check()?;
        self.inner.extend(key, t, lease).await
    }
    async fn complete(
        &self,
        key: &str,
        t: &LeaseToken,
        fp: &str,
        r: Option<Bytes>,
        ttl: Duration,
    ) -> courier::Result<bool> {
        self.check()?;
        self.inner.complete(key, t, fp, r, ttl).await
    }
    async fn release(&self, key: &str, t: &LeaseToken) -> courier::Result<()> {
        self.check()?;
        self.inner.release(key, t).await
    }
    fn claims_in_batches(&self) -> bool {
        self.inner.claims_in_batches()
    }
    async fn claim_many(
        &self,
        keys: &[(&str, &str)],
        lease: Duration,
    ) -> courier::Result<Vec<Option<LeaseToken>>> {
        self.check()?;
        self.inner.claim_many(keys, lease).await
    }
}
