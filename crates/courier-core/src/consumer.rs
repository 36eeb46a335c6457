//! The consume loop: owns the order of settle vs handler that each guarantee requires, retries,
//! dead-lettering, bounded concurrency with per-key order, and graceful shutdown.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use crate::layers::{AtMostOnce, Guard, SeenIds};

use crate::{
    AfterCommit, BatchHandler, Context, Delivery, DeliveryClient, DeliveryInfo, Error, Failure,
    Guarantee, Handler, HandlerError, Message, MessageId, Outgoing, Result, RetryDecision,
    RetryPolicy, RetryStrategy, Settle, Subscription,
};

/// Counters of a running consumer. Cheap to read while it runs.
#[derive(Debug, Default)]
struct StatsInner {
    received: AtomicU64,
    handled: AtomicU64,
    handler_errors: AtomicU64,
    retried: AtomicU64,
    deferred: AtomicU64,
    delayed: AtomicU64,
    dead_lettered: AtomicU64,
    dropped: AtomicU64,
    duplicates_skipped: AtomicU64,
    duplicates_absorbed: AtomicU64,
    settle_errors: AtomicU64,
    in_flight: AtomicU64,
}

/// A snapshot of a consumer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Deliveries received from the broker.
    pub received: u64,
    /// Handler runs that succeeded (duplicates the idempotent layer absorbed not included).
    pub handled: u64,
    /// Handler runs that failed (retryable or permanent; deferrals are not counted here).
    pub handler_errors: u64,
    /// Deliveries nacked for a retry.
    pub retried: u64,
    /// Deliveries deferred (nacked without counting as a failure).
    pub deferred: u64,
    /// Deliveries that arrived before their not-before time ([`Message::with_delay`]) and were
    /// put back until then without running the handler (at-most-once: held until due).
    pub delayed: u64,
    /// Deliveries dead-lettered.
    pub dead_lettered: u64,
    /// At-most-once deliveries whose handler failed (dropped by contract).
    pub dropped: u64,
    /// At-most-once deliveries skipped because their id was already handed to the handler.
    pub duplicates_skipped: u64,
    /// Deliveries of an id already completed, acknowledged by the idempotent layer without
    /// running the handler.
    pub duplicates_absorbed: u64,
    /// Settle operations the broker refused (the message will be redelivered).
    pub settle_errors: u64,
    /// Deliveries being handled right now.
    pub in_flight: u64,
}

impl StatsInner {
    fn snapshot(&self) -> ConsumerStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConsumerStats {
            received: l(&self.received),
            handled: l(&self.handled),
            handler_errors: l(&self.handler_errors),
            retried: l(&self.retried),
            deferred: l(&self.deferred),
            delayed: l(&self.delayed),
            dead_lettered: l(&self.dead_lettered),
            dropped: l(&self.dropped),
            duplicates_skipped: l(&self.duplicates_skipped),
            duplicates_absorbed: l(&self.duplicates_absorbed),
            settle_errors: l(&self.settle_errors),
            in_flight: l(&self.in_flight),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// The at-most-once duplicate filter is shared by every consumer of the same subscription in a
/// process, so a duplicate handed to a different consumer (or to the replacement of a crashed
/// one) is still recognised.
fn shared_seen(backend: &str, sub: &Subscription, cap: usize) -> Arc<Mutex<SeenIds>> {
    static SEEN: std::sync::OnceLock<
        Mutex<std::collections::HashMap<String, Arc<Mutex<SeenIds>>>>,
    > = std::sync::OnceLock::new();
    let key = format!("{backend}\u{0}{}\u{0}{}", sub.destination, sub.group);
    SEEN.get_or_init(Default::default)
        .lock()
        .entry(key)
        .or_insert_with(|| Arc::new(Mutex::new(SeenIds::new(cap))))
        .clone()
}

/// Options of the batch mode.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Largest batch handed to the handler.
    pub max_size: usize,
    /// How long to wait for a batch to fill after its first message.
    pub max_wait: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_size: 100,
            max_wait: Duration::from_millis(50),
        }
    }
}

/// Builds and runs a consume loop over a [`DeliveryClient`] subscription.
///
/// ```no_run
/// # async fn demo(client: std::sync::Arc<dyn courier_core::DeliveryClient>) -> courier_core::Result<()> {
/// use courier_core::{handler_fn, Consumer, Subscription, RetryPolicy};
/// let handle = Consumer::new(client, Subscription::new("orders", "billing"))
///     .concurrency(8)
///     .retry(RetryPolicy::attempts(5))
///     .spawn(handler_fn(|msg| async move { println!("{:?}", msg.id); Ok(()) }))
///     .await?;
/// // ... later
/// let stats = handle.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Consumer {
    client: Arc<dyn DeliveryClient>,
    subscription: Subscription,
    concurrency: usize,
    retry: Arc<dyn RetryStrategy>,
    shutdown_timeout: Duration,
    handler_timeout: Option<Duration>,
    amo_dedup_window: usize,
    backlog_interval: Option<Duration>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("backend", &self.client.backend())
            .field("guarantee", &self.client.guarantee())
            .field("subscription", &self.subscription)
            .field("concurrency", &self.concurrency)
            .field("retry", &self.retry)
            .finish()
    }
}

impl Consumer {
    /// A consumer of `subscription` through `client`, with the client's guarantee.
    pub fn new(client: Arc<dyn DeliveryClient>, subscription: Subscription) -> Self {
        Consumer {
            client,
            subscription,
            concurrency: 1,
            retry: Arc::new(RetryPolicy::default()),
            shutdown_timeout: Duration::from_secs(30),
            handler_timeout: None,
            amo_dedup_window: 100_000,
            backlog_interval: Some(Duration::from_secs(30)),
        }
    }

    /// Apply the `[consumer]` section of a config.
    pub fn with_config(self, config: &crate::config::ConsumerConfig) -> Self {
        let mut c = self
            .concurrency(config.concurrency)
            .retry(config.retry.clone())
            .shutdown_timeout(config.shutdown_timeout);
        c.handler_timeout = config.handler_timeout;
        c
    }

    /// How many messages are handled at once. Messages with the same key are never handled
    /// concurrently and keep their order.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The retry policy for failed handlers (default: [`RetryPolicy::default`]).
    pub fn retry(self, policy: RetryPolicy) -> Self {
        self.retry_strategy(policy)
    }

    /// Decide retries with your own [`RetryStrategy`] instead of a [`RetryPolicy`]: e.g.
    /// dead-letter validation errors at once and give timeouts more attempts. Guarded by
    /// `crates/courier/tests/retry_strategy.rs`.
    pub fn retry_strategy(mut self, strategy: impl RetryStrategy) -> Self {
        self.retry = Arc::new(strategy);
        self
    }

    /// How long [`ConsumerHandle::shutdown`] waits for in-flight handlers.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }

    /// How often the consumer asks the broker for its group's backlog and exports it as metrics
    /// (`courier_backlog`, `courier_backlog_in_flight`, `courier_backlog_delayed`,
    /// `courier_oldest_message_age_seconds`; see [`DeliveryClient::inspect`]); the first report
    /// comes one interval after the start. Default 30 s; `None` turns it off.
    pub fn backlog_interval(mut self, every: Option<Duration>) -> Self {
        self.backlog_interval = every.filter(|d| !d.is_zero());
        self
    }

    /// Fail (and retry) a handler run that takes longer than `d`.
    pub fn handler_timeout(mut self, d: Duration) -> Self {
        self.handler_timeout = Some(d);
        self
    }

    /// How many recent ids an at-most-once consumer remembers to skip duplicate deliveries
    /// (0 disables the check). The window is shared by the consumers of one subscription in
    /// one process; consumers in several processes need the idempotent layer's store to skip
    /// an id published twice (`courier::consumer` runs it when the config has an
    /// `[idempotency]` section).
    pub fn at_most_once_dedup_window(mut self, ids: usize) -> Self {
        self.amo_dedup_window = ids;
        self
    }

    /// What `spawn` and `spawn_batch` share: subscribe, the loop's shared state, the backlog
    /// report.
    async fn start(&self) -> Result<Started> {
        let deliveries = self.client.subscribe(self.subscription.clone()).await?;
        let token = CancellationToken::new();
        let stats = Arc::new(StatsInner::default());
        let shared = Arc::new(Shared {
            client: self.client.clone(),
            guarantee: self.client.guarantee(),
            retry: self.retry.clone(),
            stats: stats.clone(),
            seen: shared_seen(
                self.client.backend(),
                &self.subscription,
                self.amo_dedup_window,
            ),
            labels: Labels::new(self.client.backend(), &self.subscription),
        });
        self.report_backlog(&token);
        Ok(Started {
            deliveries,
            token,
            stats,
            shared,
        })
    }

    /// Export the group's backlog every `backlog_interval` until `token` is cancelled.
    fn report_backlog(&self, token: &CancellationToken) {
        let Some(every) = self.backlog_interval else {
            return;
        };
        let client = self.client.clone();
        let sub = self.subscription.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let labels = [
                metrics::Label::new("backend", client.backend()),
                metrics::Label::new("destination", sub.destination.clone()),
                metrics::Label::new("group", sub.group.clone()),
            ];
            let backlog = metrics::gauge!("courier_backlog", labels.iter());
            let in_flight = metrics::gauge!("courier_backlog_in_flight", labels.iter());
            let delayed = metrics::gauge!("courier_backlog_delayed", labels.iter());
            let oldest = metrics::gauge!("courier_oldest_message_age_seconds", labels.iter());
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let groups = [sub.group.as_str()];
                let report = tokio::select! {
                    _ = token.cancelled() => return,
                    r = client.inspect(&sub.destination, &groups) => r,
                };
                match report {
                    Ok(info) => {
                        if let Some(g) = info.group(&sub.group) {
                            backlog.set(g.backlog as f64);
                            if let Some(n) = g.in_flight {
                                in_flight.set(n as f64);
                            }
                            if let Some(n) = g.delayed {
                                delayed.set(n as f64);
                            }
                            if let Some(a) = g.oldest_age {
                                oldest.set(a.as_secs_f64());
                            }
                        }
                    }
                    Err(Error::Unsupported { .. }) => return,
                    Err(e) => {
                        warn!(error = %e, destination = %sub.destination, group = %sub.group, "backlog report failed; trying again next interval")
                    }
                }
            }
        });
    }

    fn check(&self, idempotent: bool) -> Result<()> {
        RetryStrategy::validate(&*self.retry)?;
        let g = self.client.guarantee();
        let caps = self.client.capabilities();
        if g == Guarantee::ExactlyOnce && !idempotent && !caps.transactions {
            return Err(Error::unsupported(
                self.client.backend(),
                "exactly-once effects with a plain handler",
                "wrap the handler in the idempotent layer (courier_idempotency::Idempotent, or set [idempotency] in the config and use courier::consumer), or use at-least-once",
            ));
        }
        if self.subscription.destination.is_empty() || self.subscription.group.is_empty() {
            return Err(Error::config(
                "a subscription needs a destination and a group",
            ));
        }
        Ok(())
    }

    /// Subscribe and start handling messages one at a time (with the configured concurrency).
    pub async fn spawn<H: Handler>(self, handler: H) -> Result<ConsumerHandle> {
        self.check(handler.is_idempotent())?;
        let guarded = Guard::new(handler).timeout(self.handler_timeout);
        if self.client.guarantee() == Guarantee::AtMostOnce {
            let seen = shared_seen(
                self.client.backend(),
                &self.subscription,
                self.amo_dedup_window,
            );
            return self
                .run(AtMostOnce {
                    inner: guarded,
                    seen,
                })
                .await;
        }
        self.run(guarded).await
    }

    /// Subscribe and run `handler` (the layers already stacked) in the single-message loop.
    async fn run<H: Handler>(self, handler: H) -> Result<ConsumerHandle> {
        let Started {
            deliveries,
            token,
            stats,
            shared,
        } = self.start().await?;
        let join = tokio::spawn(run_single(
            deliveries,
            Arc::new(handler),
            shared,
            self.concurrency,
            token.clone(),
            self.shutdown_timeout,
        ));
        Ok(ConsumerHandle { token, join, stats })
    }

    /// Subscribe and hand messages to `handler` in batches; a batch is settled as a whole.
    pub async fn spawn_batch<H: BatchHandler>(
        self,
        handler: H,
        options: BatchOptions,
    ) -> Result<ConsumerHandle> {
        if self.client.guarantee() == Guarantee::ExactlyOnce
            && self.client.capabilities().transactions
        {
            // Guarded by `crates/courier-kafka/tests/exactly_once.rs::batch_handlers_are_refused_under_exactly_once`.
            return Err(Error::unsupported(
                self.client.backend(),
                "exactly-once batch handlers",
                "a transaction commits a handler's outputs with its own input's offset; a batch spans inputs whose offsets commit in different transactions, so its outputs could repeat after a crash — use `spawn` with a per-message handler (its outputs commit with its offset), or at-least-once for batches",
            ));
        }
        self.check(false)?;
        let Started {
            deliveries,
            token,
            stats,
            shared,
        } = self.start().await?;
        let join = tokio::spawn(run_batch(
            deliveries,
            Arc::new(Guard::new(handler).timeout(self.handler_timeout)),
            shared,
            options,
            token.clone(),
        ));
        Ok(ConsumerHandle { token, join, stats })
    }
}

/// A subscription with its consume loop's state, before the loop runs.
struct Started {
    deliveries: crate::Deliveries,
    token: CancellationToken,
    stats: Arc<StatsInner>,
    shared: Arc<Shared>,
}

/// A running consumer.
#[derive(Debug)]
pub struct ConsumerHandle {
    token: CancellationToken,
    join: tokio::task::JoinHandle<Result<()>>,
    stats: Arc<StatsInner>,
}

impl ConsumerHandle {
    /// Current counters.
    pub fn stats(&self) -> ConsumerStats {
        self.stats.snapshot()
    }

    /// Wait until the consumer is idle: nothing in flight and nothing received for `quiet`
    /// (the destination is drained, as far as this consumer can tell). `false` if that did not
    /// happen within `timeout`. For batch jobs that stop when the queue is empty, and for tests.
    pub async fn wait_idle(&self, quiet: Duration, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let step = (quiet / 4).clamp(Duration::from_millis(1), Duration::from_millis(50));
        let mut last = self.stats.received.load(Ordering::Relaxed);
        let mut since = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            let received = self.stats.received.load(Ordering::Relaxed);
            if received != last || self.stats.in_flight.load(Ordering::Relaxed) > 0 {
                last = received;
                since = now;
            } else if now.duration_since(since) >= quiet {
                return true;
            }
            if now >= deadline || self.join.is_finished() {
                return false;
            }
            tokio::time::sleep(step).await;
        }
    }

    /// Stop intake, let in-flight handlers finish (up to the shutdown timeout), settle, and
    /// close the subscription. Deliveries whose handler did not finish are left unsettled, so
    /// the broker redelivers them: nothing is lost.
    pub async fn shutdown(self) -> Result<ConsumerStats> {
        self.token.cancel();
        self.join().await
    }

    /// Wait until the consumer stops by itself (subscription ended or fatal error).
    pub async fn join(self) -> Result<ConsumerStats> {
        match self.join.await {
            Ok(r) => r.map(|()| self.stats.snapshot()),
            Err(e) => Err(Error::broker("courier", "consume loop", false, e)),
        }
    }

    /// Stop the consumer abruptly, as if its process died: nothing is settled and the
    /// subscription is dropped without closing, so the broker redelivers whatever was in flight.
    /// For crash experiments (`courier verify`); use [`ConsumerHandle::shutdown`] otherwise.
    pub fn abort(self) {
        self.join.abort();
        // Ends the backlog reporter; the aborted loop no longer sees it.
        self.token.cancel();
    }

    /// A token that stops the consumer when cancelled (e.g. from a signal handler).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.token.clone()
    }
}

/// The consumer's metric handles, registered once when it starts (labelled by backend,
/// destination and group), so counting a message costs no label allocations.
struct Labels {
    destination: String,
    in_flight: metrics::Gauge,
    handled: metrics::Counter,
    duplicates_absorbed: metrics::Counter,
    handler_errors: metrics::Counter,
    dropped: metrics::Counter,
    deferred: metrics::Counter,
    delayed: metrics::Counter,
    retried: metrics::Counter,
    dead_lettered: metrics::Counter,
    settle_errors: metrics::Counter,
    handler_seconds: metrics::Histogram,
    message_age: metrics::Histogram,
}

impl Labels {
    fn new(backend: &'static str, sub: &Subscription) -> Self {
        let labels = [
            metrics::Label::new("backend", backend),
            metrics::Label::new("destination", sub.destination.clone()),
            metrics::Label::new("group", sub.group.clone()),
        ];
        let counter = |name: &'static str| metrics::counter!(name, labels.iter());
        Labels {
            destination: sub.destination.clone(),
            in_flight: metrics::gauge!("courier_in_flight", labels.iter()),
            handled: counter("courier_handled_total"),
            handler_errors: counter("courier_handler_errors_total"),
            duplicates_absorbed: counter("courier_consumer_duplicates_absorbed_total"),
            dropped: counter("courier_dropped_total"),
            deferred: counter("courier_deferred_total"),
            delayed: counter("courier_delayed_total"),
            retried: counter("courier_retried_total"),
            dead_lettered: counter("courier_dead_lettered_total"),
            settle_errors: counter("courier_settle_errors_total"),
            message_age: metrics::histogram!("courier_message_age_seconds", labels.iter()),
            handler_seconds: metrics::histogram!(
                "courier_handler_seconds",
                "backend" => backend,
                "destination" => sub.destination.clone()
            ),
        }
    }

    fn in_flight(&self, n: u64) {
        self.in_flight.set(n as f64);
    }

    /// How old a message was when it arrived, where the broker tells when it was stored.
    fn received(&self, info: &DeliveryInfo) {
        if let Some(age) = info.age() {
            self.message_age.record(age.as_secs_f64());
        }
    }
}

struct Shared {
    client: Arc<dyn DeliveryClient>,
    guarantee: Guarantee,
    retry: Arc<dyn RetryStrategy>,
    stats: Arc<StatsInner>,
    seen: Arc<Mutex<SeenIds>>,
    labels: Labels,
}

impl Shared {
    /// A handler run that returned `Ok`: handled, a duplicate the idempotent layer absorbed, or
    /// (at-most-once) an id the consumer had already taken.
    fn count_success(&self, cx: &Context) {
        if cx.was_skipped() {
            bump(&self.stats.duplicates_skipped);
        } else if cx.is_duplicate() {
            bump(&self.stats.duplicates_absorbed);
            self.labels.duplicates_absorbed.increment(1);
        } else {
            bump(&self.stats.handled);
            self.labels.handled.increment(1);
        }
    }

    /// A handler run that failed; a deferral (the handler did not run) is not a handler error.
    fn count_failure(&self, e: &HandlerError) {
        if !matches!(e, HandlerError::Defer { .. }) {
            bump(&self.stats.handler_errors);
            self.labels.handler_errors.increment(1);
        }
    }

    fn settle_failed(&self, what: &str, id: &MessageId, e: &Error) {
        bump(&self.stats.settle_errors);
        self.labels.settle_errors.increment(1);
        warn!(message_id = %id, error = %e, "{what} failed; the broker will redeliver the message");
    }

    /// Publish outputs and acknowledge, then run the handler's after-commit steps with the
    /// outcome. A backend that publishes outputs itself (Kafka) does both, and runs the steps,
    /// in `ack_with_outputs`; under exactly-once it commits them with the acknowledgement.
    async fn ack_with_outputs(
        &self,
        id: &MessageId,
        settle: Box<dyn Settle>,
        outputs: Vec<Outgoing>,
        after: AfterCommit,
    ) -> bool {
        if settle.publishes_outputs() && !outputs.is_empty() || settle.atomic_outputs() {
            return match settle.ack_with_outputs(outputs, after).await {
                Ok(()) => true,
                Err(e) => {
                    self.settle_failed("transactional commit", id, &e);
                    false
                }
            };
        }
        let acked = self.publish_then_ack(id, settle, outputs).await;
        after.run(acked).await;
        acked
    }

    async fn publish_then_ack(
        &self,
        id: &MessageId,
        settle: Box<dyn Settle>,
        outputs: Vec<Outgoing>,
    ) -> bool {
        for out in outputs {
            if let Err(e) = self.client.publish(&out.destination, out.message).await {
                warn!(message_id = %id, error = %e, "publishing a handler output failed; retrying the input");
                let delay = self.retry.output_retry_delay();
                if let Err(e) = settle.nack(delay).await {
                    self.settle_failed("nack", id, &e);
                }
                return false;
            }
        }
        match settle.ack().await {
            Ok(()) => true,
            Err(e) => {
                self.settle_failed("ack", id, &e);
                false
            }
        }
    }

    /// Settle after a failed handler run under at-least-once / exactly-once.
    async fn settle_failure(
        &self,
        info: &DeliveryInfo,
        settle: Box<dyn Settle>,
        err: HandlerError,
    ) {
        let id = &info.message.id;
        let result = match err {
            HandlerError::Defer { after, reason } => {
                bump(&self.stats.deferred);
                self.labels.deferred.increment(1);
                debug!(message_id = %id, %reason, "deferred");
                settle.defer(after).await
            }
            err => {
                let failure = Failure::new(&info.message, info.attempt, &err);
                match self.retry.decide(&failure) {
                    RetryDecision::Retry(delay) => {
                        bump(&self.stats.retried);
                        self.labels.retried.increment(1);
                        let span = info_span!("courier.retry", message_id = %id, attempt = info.attempt, delay_ms = delay.as_millis() as u64);
                        debug!(parent: &span, error = %failure.reason(), "handler failed; retrying");
                        settle.nack(delay).instrument(span).await
                    }
                    RetryDecision::DeadLetter(reason) => {
                        bump(&self.stats.dead_lettered);
                        self.labels.dead_lettered.increment(1);
                        let span = info_span!("courier.dead_letter", message_id = %id, attempt = info.attempt, reason = %reason);
                        let fault = crate::request::fault_reply_for(&info.message, &reason);
                        let settled = settle
                            .dead_letter(
                                &info.message,
                                crate::DeadLetter {
                                    reason,
                                    attempts: info.attempt,
                                },
                            )
                            .instrument(span)
                            .await;
                        // A request is answered with the reason once it is in the dead letter
                        // (scenario `request_reply_answers_a_repeated_request_from_the_stored_result`).
                        if let (Ok(()), Some((to, reply))) = (&settled, fault) {
                            if let Err(e) = self.client.publish(&to, reply).await {
                                warn!(message_id = %id, error = %e, reply_to = %to, "answering a dead-lettered request with its reason failed; the requester will time out");
                            }
                        }
                        settled
                    }
                }
            }
        };
        if let Err(e) = result {
            self.settle_failed("settling a failed message", id, &e);
        }
    }

    /// A delivery that arrived before its not-before time (scenario
    /// `delayed_delivery_waits_until_due`).
    fn count_delayed(&self, id: &MessageId, wait: Duration) {
        bump(&self.stats.delayed);
        self.labels.delayed.increment(1);
        debug!(message_id = %id, wait_ms = wait.as_millis() as u64, "not due yet");
    }

    fn context(&self, info: &DeliveryInfo, atomic: bool) -> Context {
        Context::new(info.message.id.clone(), info.attempt, info.source.clone())
            .with_position(info.position.clone())
            .with_publisher(self.client.clone(), atomic)
            .with_traceparent(
                info.message
                    .headers
                    .get(crate::header::TRACEPARENT)
                    .map(String::as_str),
            )
    }

    async fn process<H: Handler>(&self, handler: &H, delivery: Delivery) {
        let (info, settle) = delivery.into_parts();
        self.labels.received(&info);
        let id = info.message.id.clone();
        let span = info_span!(
            "courier.handle",
            message_id = %id,
            destination = %info.source,
            attempt = info.attempt,
            guarantee = %self.guarantee,
            trace_id = info.message.headers.get(crate::header::TRACEPARENT).and_then(|t| t.split('-').nth(1)).unwrap_or(""),
        );
        #[cfg(feature = "otel")]
        crate::otel::continue_trace(
            &span,
            info.message
                .headers
                .get(crate::header::TRACEPARENT)
                .map(String::as_str),
        );
        async {
            let started = Instant::now();
            match self.guarantee {
                Guarantee::AtMostOnce => {
                    // Settle first: if we die now the message is gone, never handled twice.
                    // The handler is wrapped in the at-most-once layer (`layers`): it skips an
                    // id already taken and waits until the message is due.
                    if let Err(e) = settle.ack().await {
                        self.settle_failed("ack", &id, &e);
                        return;
                    }
                    let mut cx = self.context(&info, false);
                    let outcome = handler.handle(&info.message, &mut cx).await;
                    if let Some(wait) = cx.waited() {
                        self.count_delayed(&id, wait);
                    }
                    match outcome {
                        Ok(()) if cx.was_skipped() => {
                            self.count_success(&cx);
                            return;
                        }
                        Ok(()) => {
                            self.count_success(&cx);
                            stage_reply(&info.message, &mut cx);
                            if let Err(e) = cx.flush().await {
                                warn!(message_id = %id, error = %e, "at-most-once: handler output lost");
                            }
                        }
                        Err(e) => {
                            bump(&self.stats.handler_errors);
                            bump(&self.stats.dropped);
                            self.labels.dropped.increment(1);
                            warn!(message_id = %id, error = %e, "at-most-once: handler failed; message dropped by contract");
                        }
                    }
                }
                Guarantee::AtLeastOnce | Guarantee::ExactlyOnce => {
                    if let Some(wait) = info.message.due_in() {
                        self.count_delayed(&id, wait);
                        if let Err(e) = settle.defer(wait).await {
                            self.settle_failed("deferring a delayed message", &id, &e);
                        }
                        return;
                    }
                    let mut cx = self.context(&info, settle.atomic_outputs());
                    match handler.handle(&info.message, &mut cx).await {
                        Ok(()) => {
                            self.count_success(&cx);
                            stage_reply(&info.message, &mut cx);
                            let outputs = cx.take_outputs();
                            let after = cx.take_after_commit();
                            self.ack_with_outputs(&id, settle, outputs, after).await;
                        }
                        Err(e) => {
                            self.count_failure(&e);
                            self.settle_failure(&info, settle, e).await;
                            cx.take_after_commit().run(false).await;
                        }
                    }
                }
            }
            self.labels.handler_seconds.record(started.elapsed().as_secs_f64());
        }
        .instrument(span)
        .await
    }
}

/// A request's reply (its handler's result, or a duplicate's stored one) goes out with the
/// handler's outputs (scenario `request_reply_answers_a_repeated_request_from_the_stored_result`).
fn stage_reply(request: &Message, cx: &mut Context) {
    if let Some((to, reply)) = crate::request::reply_for(request, cx.result()) {
        cx.publish(to, reply);
    }
}

fn lane_for(key: &str, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

/// Wait for the next delivery, backing off on transient subscription errors.
/// `None` = stop (cancelled, ended, or fatal error recorded in `fatal`).
async fn next_delivery(
    deliveries: &mut crate::Deliveries,
    token: &CancellationToken,
    fatal: &mut Option<Error>,
) -> Option<Delivery> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let next = tokio::select! {
            biased;
            _ = token.cancelled() => return None,
            d = deliveries.next() => d,
        };
        match next {
            None => return None,
            Some(Ok(d)) => return Some(d),
            Some(Err(e)) if e.is_retryable() => {
                warn!(error = %e, "subscription error; retrying");
                tokio::select! {
                    _ = token.cancelled() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Some(Err(e)) => {
                *fatal = Some(e);
                return None;
            }
        }
    }
}

async fn run_single<H: Handler>(
    mut deliveries: crate::Deliveries,
    handler: Arc<H>,
    shared: Arc<Shared>,
    concurrency: usize,
    token: CancellationToken,
    shutdown_timeout: Duration,
) -> Result<()> {
    let mut workers = JoinSet::new();
    let mut lanes = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (tx, mut rx) = mpsc::channel::<Delivery>(1);
        lanes.push(tx);
        let handler = handler.clone();
        let shared = shared.clone();
        workers.spawn(async move {
            while let Some(d) = rx.recv().await {
                shared.process(&*handler, d).await;
                let n = shared.stats.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
                shared.labels.in_flight(n);
            }
        });
    }
    let mut fatal = None;
    let mut rr = 0usize;
    // Under at-least-once and exactly-once, the deliveries already received are handed to the
    // handler's `prepare` together (the idempotent layer claims their keys in one round trip).
    let prepares = shared.guarantee != Guarantee::AtMostOnce;
    let batch_max = (concurrency * 2).clamp(1, 64);
    let mut ended = false;
    'receive: while !ended {
        let Some(first) = next_delivery(&mut deliveries, &token, &mut fatal).await else {
            break;
        };
        let mut batch = vec![first];
        if prepares {
            while batch.len() < batch_max {
                match deliveries.next().now_or_never() {
                    None => break,
                    Some(Some(Ok(d))) => batch.push(d),
                    Some(Some(Err(e))) if e.is_retryable() => {
                        warn!(error = %e, "subscription error; retrying");
                        break;
                    }
                    Some(Some(Err(e))) => {
                        fatal = Some(e);
                        ended = true;
                        break;
                    }
                    Some(None) => {
                        ended = true;
                        break;
                    }
                }
            }
            let messages: Vec<&crate::Message> = batch.iter().map(|d| &d.message).collect();
            handler.prepare(&messages).await;
        }
        let mut batch = batch.into_iter();
        while let Some(d) = batch.next() {
            bump(&shared.stats.received);
            let n = shared.stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            shared.labels.in_flight(n);
            let mut d = Some(d);
            let lane = match d.as_ref().and_then(|d| d.message.key.as_deref()) {
                Some(key) => lane_for(key, concurrency),
                None => {
                    // Keyless: the first free lane, starting after the last one used.
                    let mut chosen = None;
                    for i in 0..concurrency {
                        let l = (rr + i) % concurrency;
                        match lanes[l].try_send(d.take().expect("delivery present")) {
                            Ok(()) => {
                                chosen = Some(l);
                                break;
                            }
                            Err(mpsc::error::TrySendError::Full(back))
                            | Err(mpsc::error::TrySendError::Closed(back)) => d = Some(back),
                        }
                    }
                    rr = rr.wrapping_add(1);
                    match chosen {
                        Some(_) => continue,
                        None => rr % concurrency,
                    }
                }
            };
            let d = d.expect("delivery present");
            // Wait for room in the lane without giving the delivery away, so a shutdown
            // meanwhile still has it to abandon.
            let permit = tokio::select! {
                biased;
                _ = token.cancelled() => None,
                p = lanes[lane].reserve() => p.ok(),
            };
            let undelivered = match permit {
                Some(permit) => {
                    permit.send(d);
                    None
                }
                None => Some(d),
            };
            if let Some(d) = undelivered {
                // Dropped unsettled: the broker redelivers them.
                shared.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                if prepares {
                    let rest: Vec<Delivery> = std::iter::once(d).chain(batch).collect();
                    let messages: Vec<&crate::Message> = rest.iter().map(|d| &d.message).collect();
                    handler.abandon(&messages).await;
                }
                break 'receive;
            }
        }
    }
    drop(lanes);
    let drained = tokio::time::timeout(shutdown_timeout, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(timeout = ?shutdown_timeout, "shutdown timeout: abandoning in-flight handlers; their messages will be redelivered");
        workers.abort_all();
        while workers.join_next().await.is_some() {}
    }
    let closed = deliveries.close().await;
    match fatal {
        Some(e) => Err(e),
        None => closed,
    }
}

async fn run_batch<H: BatchHandler>(
    mut deliveries: crate::Deliveries,
    handler: Arc<H>,
    shared: Arc<Shared>,
    options: BatchOptions,
    token: CancellationToken,
) -> Result<()> {
    let max = options.max_size.max(1);
    let mut fatal = None;
    'outer: loop {
        let Some(first) = next_delivery(&mut deliveries, &token, &mut fatal).await else {
            break;
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + options.max_wait;
        while batch.len() < max {
            let next = tokio::select! {
                biased;
                _ = token.cancelled() => None,
                _ = tokio::time::sleep_until(deadline) => None,
                d = deliveries.next() => Some(d),
            };
            match next {
                Some(Some(Ok(d))) => batch.push(d),
                Some(Some(Err(e))) if e.is_retryable() => warn!(error = %e, "subscription error"),
                Some(Some(Err(e))) => {
                    fatal = Some(e);
                    break;
                }
                Some(None) | None => break,
            }
        }
        shared
            .stats
            .received
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        shared.process_batch(&*handler, batch).await;
        if fatal.is_some() || token.is_cancelled() {
            break 'outer;
        }
    }
    let closed = deliveries.close().await;
    match fatal {
        Some(e) => Err(e),
        None => closed,
    }
}

impl Shared {
    async fn process_batch<H: BatchHandler>(&self, handler: &H, batch: Vec<Delivery>) {
        let mut parts: Vec<(DeliveryInfo, Box<dyn Settle>)> =
            batch.into_iter().map(Delivery::into_parts).collect();
        for (info, _) in &parts {
            self.labels.received(info);
        }
        if self.guarantee != Guarantee::AtMostOnce {
            // Deliveries that are not due yet go back until they are; the rest is the batch.
            let mut due = Vec::with_capacity(parts.len());
            for (info, settle) in parts {
                match info.message.due_in() {
                    Some(wait) => {
                        self.count_delayed(&info.message.id, wait);
                        if let Err(e) = settle.defer(wait).await {
                            self.settle_failed("deferring a delayed message", &info.message.id, &e);
                        }
                    }
                    None => due.push((info, settle)),
                }
            }
            parts = due;
            if parts.is_empty() {
                return;
            }
        }
        let span =
            info_span!("courier.handle_batch", size = parts.len(), guarantee = %self.guarantee);
        async {
            let n = parts.len() as u64;
            self.stats.in_flight.fetch_add(n, Ordering::Relaxed);
            let first_id = parts[0].0.message.id.clone();
            match self.guarantee {
                Guarantee::AtMostOnce => {
                    let mut messages = Vec::with_capacity(parts.len());
                    for (info, settle) in parts {
                        let fresh = self.seen.lock().insert(&info.message.id);
                        let acked = settle.ack().await;
                        match (fresh, acked) {
                            (false, _) => bump(&self.stats.duplicates_skipped),
                            (true, Err(e)) => self.settle_failed("ack", &info.message.id, &e),
                            (true, Ok(())) => messages.push(info.message),
                        }
                    }
                    if let Some(wait) = messages.iter().filter_map(Message::due_in).max() {
                        // Already settled: the batch waits for its latest not-before time.
                        self.count_delayed(&first_id, wait);
                        tokio::time::sleep(wait).await;
                    }
                    if !messages.is_empty() {
                        let mut cx = Context::new(first_id, 1, self.labels.destination.clone())
                            .with_publisher(self.client.clone(), false);
                        match handler.handle_batch(&messages, &mut cx).await {
                            Ok(()) => {
                                self.stats.handled.fetch_add(messages.len() as u64, Ordering::Relaxed);
                                if let Err(e) = cx.flush().await {
                                    warn!(error = %e, "at-most-once: batch output lost");
                                }
                            }
                            Err(e) => {
                                bump(&self.stats.handler_errors);
                                self.stats.dropped.fetch_add(messages.len() as u64, Ordering::Relaxed);
                                warn!(error = %e, "at-most-once: batch handler failed; batch dropped by contract");
                            }
                        }
                    }
                }
                Guarantee::AtLeastOnce | Guarantee::ExactlyOnce => {
                    let messages: Vec<Message> = parts.iter().map(|(i, _)| i.message.clone()).collect();
                    let attempt = parts.iter().map(|(i, _)| i.attempt).max().unwrap_or(1);
                    let mut cx = Context::new(first_id.clone(), attempt, self.labels.destination.clone())
                        .with_publisher(self.client.clone(), false);
                    match handler.handle_batch(&messages, &mut cx).await {
                        Ok(()) => {
                            self.stats.handled.fetch_add(n, Ordering::Relaxed);
                            if let Err(e) = cx.flush().await {
                                warn!(error = %e, "publishing batch outputs failed; retrying the batch");
                                for (info, settle) in parts {
                                    self.settle_failure(&info, settle, HandlerError::retryable(e.to_string())).await;
                                }
                            } else {
                                for (info, settle) in parts {
                                    if let Err(e) = settle.ack().await {
                                        self.settle_failed("ack", &info.message.id, &e);
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            self.count_failure(&e);
                            let text = e.to_string();
                            let permanent = matches!(e, HandlerError::Permanent(_));
                            let defer = match e {
                                HandlerError::Defer { after, .. } => Some(after),
                                _ => None,
                            };
                            for (info, settle) in parts {
                                let err = match (defer, permanent) {
                                    (Some(after), _) => HandlerError::defer(after, text.clone()),
                                    (None, true) => HandlerError::permanent(text.clone()),
                                    (None, false) => HandlerError::retryable(text.clone()),
                                };
                                self.settle_failure(&info, settle, err).await;
                            }
                        }
                    }
                }
            }
            self.stats.in_flight.fetch_sub(n, Ordering::Relaxed);
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_are_stable() {
        assert_eq!(lane_for("k", 8), lane_for("k", 8));
        assert!(lane_for("k", 3) < 3);
    }
}
