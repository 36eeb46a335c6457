//! Consuming: offset tracking that never commits past an unprocessed message, rebalance
//! handling, the settle operations, and — under exactly-once — the commit-interval
//! transactions that hold the outputs and offsets of many inputs at once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use parking_lot::Mutex;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, warn};

use courier_core::{
    header, AfterCommit, DeadLetter, Delivery, DeliveryStream, Error, Guarantee, Message,
    MessageId, Outgoing, Position, Result, Settle, Subscription,
};

use crate::connection::{blocking, kafka_err};
use crate::publish::Inner;
use crate::settings;

mod settle;
mod tracker;

use settle::KafkaSettle;
use tracker::*;

/// Retries waiting for their not-before time, at most, before the receive task stops fetching
/// until some are due.
const MAX_DELAYED: usize = 10_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A record to produce as part of settling.
pub(crate) struct Out {
    topic: String,
    message: Message,
    attempt: Option<u32>,
    not_before: Option<u64>,
}

pub(crate) struct Ctx {
    tracker: Arc<Tracker>,
    guarantee: Guarantee,
    /// Which of this process's subscriptions (for logs).
    subscription: u64,
    /// Set once the stream's `close` has committed what was processed: a revoke served after
    /// that (the one `unsubscribe` causes) has nothing left to commit.
    closing: Arc<std::sync::atomic::AtomicBool>,
}

/// Partitions of a rebalance event, for logs.
fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => debug!(
                subscription = self.subscription,
                partitions = ?partitions(tpl),
                "partitions revoked"
            ),
            Rebalance::Assign(tpl) => debug!(
                subscription = self.subscription,
                partitions = ?partitions(tpl),
                "partitions assigned"
            ),
            Rebalance::Error(e) => {
                consumer_error(self.subscription, "rebalance", e);
            }
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            if self.guarantee == Guarantee::AtLeastOnce
                && tpl.count() > 0
                && !self.closing.load(std::sync::atomic::Ordering::SeqCst)
            {
                // Commit what was processed before the partitions move.
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    if e.rdkafka_error_code() != Some(rdkafka::error::RDKafkaErrorCode::NoOffset) {
                        consumer_error(self.subscription, "commit on revoke", e);
                    }
                }
            }
            for el in tpl.elements() {
                // Exactly-once: inputs settled but not yet in a transaction are handled again
                // by the partition's next owner; their steps learn they never committed.
                for after in self.tracker.revoke(el.partition()) {
                    after.spawn(false);
                }
            }
        }
    }
}

/// A consumer-side error courier cannot act on: logged at warn and counted in
/// `courier_consumer_errors_total`.
fn consumer_error(subscription: u64, operation: &'static str, e: impl std::fmt::Display) {
    warn!(subscription, operation, error = %e, "Kafka consumer error");
    metrics::counter!("courier_consumer_errors_total", "backend" => crate::BACKEND, "operation" => operation)
        .increment(1);
}

/// A subscription's consumer, closed off the async worker threads when the last reference goes.
///
/// Dropping an rdkafka consumer closes it: it leaves the group and polls until the close is done,
/// running the revoke callback (a synchronous commit under at-least-once). That can take a
/// broker round trip or a session timeout, and must not occupy a tokio worker: a stream
/// dropped without `close` (its task aborted, a consumer torn down mid-handler) would stall the
/// tasks queued behind it on that worker. It runs on a thread of its own rather than
/// `spawn_blocking`: rdkafka polls until librdkafka reports the consumer closed, without a bound,
/// and a close that never finishes must not hold up the shutdown of the application's runtime.
/// The stream's `close` has left the group already (`KafkaStream::leave`), so what remains here
/// is quick.
struct OwnedConsumer(Option<StreamConsumer<Ctx>>);

impl std::ops::Deref for OwnedConsumer {
    type Target = StreamConsumer<Ctx>;

    fn deref(&self) -> &StreamConsumer<Ctx> {
        self.0
            .as_ref()
            .expect("the consumer is taken only when it is dropped")
    }
}

impl Drop for OwnedConsumer {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            let closing = std::thread::Builder::new()
                .name("courier-kafka-drop".into())
                .spawn(move || drop(consumer));
            if let Err(e) = closing {
                warn!(error = %e, "no thread to close a Kafka consumer on: closed on the dropping thread");
            }
        }
    }
}

struct Sub {
    inner: Arc<Inner>,
    consumer: Arc<OwnedConsumer>,
    tracker: Arc<Tracker>,
    topic: String,
    dlq: String,
    /// At-least-once inputs whose outputs are being confirmed.
    confirming: Arc<Confirming>,
    /// Shared with the consumer's context: see `Ctx::closing`.
    closing: Arc<std::sync::atomic::AtomicBool>,
}

/// A count of background confirmations, awaited on close.
#[derive(Default)]
struct Confirming {
    count: std::sync::atomic::AtomicUsize,
    idle: Notify,
}

impl Confirming {
    fn start(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn finish(&self) {
        if self.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Wait until none is left (bounded by `limit`).
    async fn drained(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let idle = self.idle.notified();
                if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
    }
}

impl Sub {
    fn subscription(&self) -> u64 {
        self.consumer.context().subscription
    }
}

pub(crate) struct KafkaStream {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    sub: Arc<Sub>,
}

impl KafkaStream {
    pub(crate) fn start(inner: Arc<Inner>, s: Subscription) -> Result<Self> {
        let tracker = Arc::new(Tracker::new(inner.config.commit_max_inputs));
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ours = settings::consumer(&inner.config, inner.guarantee, &s.group);
        let consumer: StreamConsumer<Ctx> = settings::client_config(&inner.config, &ours)
            .create_with_context(Ctx {
                tracker: tracker.clone(),
                guarantee: inner.guarantee,
                subscription: {
                    static NEXT: std::sync::atomic::AtomicU64 =
                        std::sync::atomic::AtomicU64::new(1);
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                },
                closing: closing.clone(),
            })
            .map_err(|e| Error::config(format!("invalid Kafka consumer settings: {e}")))?;
        consumer
            .subscribe(&[&s.destination])
            .map_err(|e| kafka_err("subscribe", e))?;
        let sub = Arc::new(Sub {
            inner,
            consumer: Arc::new(OwnedConsumer(Some(consumer))),
            tracker,
            topic: s.destination.clone(),
            dlq: s.dead_letter_destination(),
            confirming: Arc::default(),
            closing,
        });
        let (tx, rx) = mpsc::channel(1);
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(Receiver::new(sub.clone(), tx).run(stop_rx));
        Ok(KafkaStream {
            rx,
            stop: Some(stop_tx),
            task: Some(task),
            sub,
        })
    }
}

/// A received record ready to hand off, with the partition epoch it was received under.
struct Ready {
    partition: i32,
    epoch: u64,
    delivery: Delivery,
}

/// The subscription's receive task: fetches records, holds retries until their not-before time
/// without holding back other records, hands deliveries to the subscriber and — under
/// exactly-once — runs one transaction per commit interval.
struct Receiver {
    sub: Arc<Sub>,
    tx: mpsc::Sender<Result<Delivery>>,
    handoff: VecDeque<Ready>,
    /// Retries not due yet: (due ms, sequence) → record.
    delayed: BinaryHeap<Reverse<(u64, u64)>>,
    delayed_items: HashMap<u64, Ready>,
    seq: u64,
}

type Committing = tokio::task::JoinHandle<(Batch, Result<()>)>;

impl Receiver {
    fn new(sub: Arc<Sub>, tx: mpsc::Sender<Result<Delivery>>) -> Self {
        Receiver {
            sub,
            tx,
            handoff: VecDeque::new(),
            delayed: BinaryHeap::new(),
            delayed_items: HashMap::new(),
            seq: 0,
        }
    }

    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let eo = self.sub.inner.guarantee == Guarantee::ExactlyOnce;
        let interval = self.sub.inner.config.commit_interval;
        let max_inputs = self.sub.inner.config.commit_max_inputs;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut committing: Option<Committing> = None;
        loop {
            let next_due = self.delayed.peek().map(|Reverse((due, _))| *due);
            let sub = self.sub.clone();
            let tx = self.tx.clone();
            tokio::select! {
                biased;
                _ = &mut stop => break,
                _ = tx.closed() => return,
                r = async { committing.as_mut().expect("guarded").await }, if committing.is_some() => {
                    committing = None;
                    let (batch, result) = r.unwrap_or_else(|e| (Batch::default(), Err(Error::broker(crate::BACKEND, "transaction task", true, e))));
                    if !self.finish(batch, result).await {
                        return;
                    }
                }
                _ = tick.tick(), if eo && committing.is_none() => {
                    committing = self.start_commit();
                }
                _ = sub.tracker.settled.notified(), if eo && committing.is_none() => {
                    if sub.tracker.waiting() >= max_inputs {
                        committing = self.start_commit();
                    }
                }
                // Lazy: the clock is read only when a retry waits.
                _ = async { tokio::time::sleep(Duration::from_millis(next_due.unwrap_or(0).saturating_sub(now_ms()))).await }, if next_due.is_some() => {
                    self.release_due();
                }
                permit = tx.reserve(), if !self.handoff.is_empty() => {
                    let Ok(permit) = permit else { return };
                    let r = self.handoff.pop_front().expect("guarded");
                    // A record of a partition rewound or revoked since it was received is read
                    // again (or by the new owner): do not hand off the stale copy.
                    if self.sub.tracker.epoch(r.partition) == r.epoch {
                        permit.send(Ok(r.delivery));
                    }
                }
                r = sub.consumer.recv(), if self.handoff.is_empty() && self.delayed_items.len() < MAX_DELAYED => {
                    match r {
                        Ok(m) => {
                            self.received(&m);
                            // Hand it over now if the subscriber is waiting (saves a turn of
                            // the loop per record).
                            if let Some(r) = self.handoff.pop_front() {
                                match tx.try_reserve() {
                                    Ok(permit) if self.sub.tracker.epoch(r.partition) == r.epoch => {
                                        permit.send(Ok(r.delivery))
                                    }
                                    Ok(_) => {}
                                    Err(_) => self.handoff.push_front(r),
                                }
                            }
                        }
                        Err(e) => consumer_error(self.sub.subscription(), "consume", e),
                    }
                }
            }
        }
        if eo {
            // Graceful stop: what was settled commits now (the subscriber settled everything it
            // will before closing).
            if let Some(c) = committing.take() {
                if let Ok((batch, result)) = c.await {
                    if !self.finish(batch, result).await {
                        return;
                    }
                }
            }
            let batch = self.sub.tracker.take_ready();
            if !batch.items.is_empty() {
                let (batch, result) = commit(self.sub.clone(), batch).await;
                self.finish(batch, result).await;
            }
        }
    }

    fn received(&mut self, m: &BorrowedMessage<'_>) {
        let (p, o) = (m.partition(), m.offset());
        tracing::trace!(
            subscription = self.sub.subscription(),
            partition = p,
            offset = o,
            "received"
        );
        let mut id = None;
        let mut attempt = 1u32;
        let mut not_before = None;
        let mut headers = courier_core::Headers::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                let v = h
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                match h.key {
                    k if k == header::ID => id = Some(v),
                    k if k == header::ATTEMPT => attempt = v.parse().unwrap_or(1),
                    header::NOT_BEFORE => not_before = v.parse::<u64>().ok(),
                    k => {
                        headers.insert(k.to_owned(), v);
                    }
                }
            }
        }
        let message = Message {
            // A record from another producer: its position is a stable id.
            id: MessageId::from_string(
                id.unwrap_or_else(|| format!("kafka-{}-{p}-{o}", self.sub.topic)),
            ),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload: m.payload().map(|b| b.to_vec()).unwrap_or_default().into(),
        };
        let epoch = self.sub.tracker.received(p, o);
        let settle = KafkaSettle {
            sub: self.sub.clone(),
            partition: p,
            offset: o,
            epoch,
            attempt,
            message: message.clone(),
        };
        let delivery = Delivery::new(
            message,
            attempt,
            Position::Offset {
                partition: p,
                offset: o,
            },
            self.sub.topic.clone(),
            Box::new(settle),
        )
        .with_published_at(
            m.timestamp()
                .to_millis()
                .and_then(|ms| u64::try_from(ms).ok())
                .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms)),
        );
        let ready = Ready {
            partition: p,
            epoch,
            delivery,
        };
        match not_before.filter(|&due| due > now_ms()) {
            // A retry waits here, not in the loop: the records behind it keep flowing (their
            // offsets commit once it is handled). Guarded by
            // `tests/offsets.rs::a_retry_waiting_for_its_backoff_does_not_hold_back_other_records`.
            Some(due) => {
                self.seq += 1;
                self.delayed.push(Reverse((due, self.seq)));
                self.delayed_items.insert(self.seq, ready);
            }
            None => self.handoff.push_back(ready),
        }
    }

    fn release_due(&mut self) {
        let now = now_ms();
        while let Some(Reverse((due, seq))) = self.delayed.peek().copied() {
            if due > now {
                break;
            }
            self.delayed.pop();
            if let Some(r) = self.delayed_items.remove(&seq) {
                self.handoff.push_back(r);
            }
        }
    }

    fn start_commit(&mut self) -> Option<Committing> {
        let batch = self.sub.tracker.take_ready();
        if batch.items.is_empty() {
            return None;
        }
        Some(tokio::spawn(commit(self.sub.clone(), batch)))
    }

    /// After a transaction: tell its inputs' steps how it ended; after an abort rewind its
    /// partitions, after a fenced producer end the subscription. False = the task must stop.
    async fn finish(&mut self, batch: Batch, result: Result<()>) -> bool {
        let hooks: Vec<AfterCommit> = batch
            .items
            .into_iter()
            .map(|(_, _, _, p)| p.after)
            .collect();
        match result {
            Ok(()) => {
                self.sub.tracker.committed_batch(&batch.offsets);
                if hooks.iter().any(|h| !h.is_empty()) {
                    tokio::spawn(futures::future::join_all(
                        hooks.into_iter().map(|h| h.run(true)),
                    ));
                }
                true
            }
            Err(e) => {
                metrics::counter!("courier_transactions_aborted_total", "backend" => crate::BACKEND)
                    .increment(1);
                // Steps first (the idempotent layer gives its leases back), so the inputs read
                // again after the rewind start at once.
                let mut all = hooks;
                let mut rewind = Vec::new();
                for &(p, epoch, _) in &batch.offsets {
                    let (base, dropped) = self.sub.tracker.rewind(p, epoch);
                    all.extend(dropped);
                    if let Some(base) = base {
                        rewind.push((p, base));
                    }
                }
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    futures::future::join_all(all.into_iter().map(|h| h.run(false))),
                )
                .await;
                let rewound: Vec<i32> = rewind.iter().map(|(p, _)| *p).collect();
                self.handoff.retain(|r| !rewound.contains(&r.partition));
                self.delayed_items
                    .retain(|_, r| !rewound.contains(&r.partition));
                if let Error::Fenced { .. } = e {
                    warn!(subscription = self.sub.subscription(), error = %e, "producer fenced: another instance took over this transactional id; the subscription ends");
                    let _ = self.tx.send(Err(e)).await;
                    return false;
                }
                for (p, base) in rewind {
                    let c = self.sub.consumer.clone();
                    let topic = self.sub.topic.clone();
                    match blocking(move || {
                        c.seek(&topic, p, Offset::Offset(base), Duration::from_secs(10))
                    })
                    .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => consumer_error(self.sub.subscription(), "seek", e),
                        Err(e) => consumer_error(self.sub.subscription(), "seek", e),
                    }
                }
                warn!(subscription = self.sub.subscription(), error = %e, partitions = ?rewound, "transaction aborted; its partitions rewound to their last committed offsets");
                true
            }
        }
    }
}

/// One transaction: every output of `batch` and its partitions' watermarks, with the group's
/// metadata (so a consumer that lost the partitions cannot commit them).
async fn commit(sub: Arc<Sub>, batch: Batch) -> (Batch, Result<()>) {
    let inner = &sub.inner;
    let mut topics: Vec<&str> = batch
        .items
        .iter()
        .flat_map(|(_, _, _, p)| p.outs.iter().map(|o| o.topic.as_str()))
        .collect();
    topics.sort_unstable();
    topics.dedup();
    for t in topics {
        if let Err(e) = ensure_output_topic(inner, t).await {
            return (batch, Err(e));
        }
    }
    let result = inner
        .transaction(|| async {
            inner
                .produce_all(
                    batch
                        .items
                        .iter()
                        .flat_map(|(_, _, _, p)| p.outs.iter())
                        .map(|o| (o.topic.as_str(), &o.message, o.attempt, o.not_before)),
                )
                .await?;
            let mut tpl = TopicPartitionList::new();
            for &(p, _, wm) in &batch.offsets {
                tpl.add_partition_offset(&sub.topic, p, Offset::Offset(wm))
                    .map_err(|e| kafka_err("offsets", e))?;
            }
            let meta = sub.consumer.group_metadata().ok_or_else(|| {
                Error::broker(
                    crate::BACKEND,
                    "group metadata",
                    true,
                    "consumer has no group metadata yet",
                )
            })?;
            let p = inner.producer.clone();
            blocking(move || {
                rdkafka::producer::Producer::send_offsets_to_transaction(
                    &p,
                    &tpl,
                    &meta,
                    Duration::from_secs(30),
                )
            })
            .await?
            .map_err(|e| kafka_err("send_offsets_to_transaction", e))
        })
        .await;
    (batch, result)
}

async fn ensure_output_topic(inner: &Inner, topic: &str) -> Result<()> {
    match inner.ensure_topic(topic).await {
        Err(Error::DestinationNotFound { .. }) => inner.create_topic(topic).await,
        other => other,
    }
}

#[async_trait]
impl DeliveryStream for KafkaStream {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        if self.sub.inner.guarantee == Guarantee::AtLeastOnce {
            // While the receive task still polls (a group rebalance completes only through polls):
            // inputs whose outputs are still being confirmed are done once they are, then what was
            // processed is committed explicitly (not only what auto-commit saw).
            self.sub
                .confirming
                .drained(self.sub.inner.config.delivery_timeout)
                .await;
            self.commit_stored().await;
        }
        self.sub
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            // Exactly-once: the task commits what was settled before it ends.
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        self.leave().await;
        Ok(())
    }
}

/// Run a librdkafka call that may block without bound (a synchronous commit waits for the group
/// coordinator) on a thread of its own, and wait for it at most `limit`. Unlike
/// `spawn_blocking`, a call that never returns does not hold up the shutdown of the caller's
/// runtime. `None` when it did not return in time.
async fn bounded<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("courier-kafka-close".into())
        .spawn(move || {
            let _ = tx.send(f());
        });
    if spawned.is_err() {
        return None;
    }
    tokio::time::timeout(limit, rx).await.ok()?.ok()
}

impl KafkaStream {
    /// Commit the stored offsets of at-least-once inputs on close. A commit refused while the
    /// group rebalances (another member joining or leaving) is tried again until the rebalance
    /// is over, bounded by the session timeout: a refused commit would hand every processed
    /// input since the last auto-commit to the next consumer. Guarded by the conformance scenario
    /// `handler_outputs_arrive_and_inputs_settle` (MockCluster runs it beside other groups).
    async fn commit_stored(&mut self) {
        let stored: Vec<(i32, i64)> = self
            .sub
            .tracker
            .stored
            .lock()
            .iter()
            .map(|(p, o)| (*p, *o))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for (p, o) in stored {
            let _ = tpl.add_partition_offset(&self.sub.topic, p, Offset::Offset(o));
        }
        if tpl.count() == 0 {
            return;
        }
        let limit = self.sub.inner.config.session_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let c = self.sub.consumer.clone();
            let attempt = tpl.clone();
            let r = bounded(limit, move || c.commit(&attempt, CommitMode::Sync)).await;
            match r {
                None => {
                    warn!(
                        ?limit,
                        "committing offsets on close did not finish in time; processed inputs since the last commit may be delivered again"
                    );
                    return;
                }
                Some(Err(e))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::error::RDKafkaErrorCode::RebalanceInProgress)
                        && tokio::time::Instant::now() < deadline =>
                {
                    // The receive task's polls finish the rebalance meanwhile; it polls only with
                    // room to hand records over, so what it received since is let go (unsettled:
                    // delivered again).
                    while self.rx.try_recv().is_ok() {}
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some(Err(e))
                    if e.rdkafka_error_code()
                        != Some(rdkafka::error::RDKafkaErrorCode::NoOffset) =>
                {
                    warn!(error = %e, "committing offsets on close failed; processed inputs since the last commit are delivered again");
                    return;
                }
                Some(_) => return,
            }
        }
    }

    /// Leave the group before the stream is gone: unsubscribe, then serve the revoke that
    /// follows here until the consumer holds no partition (bounded by the session timeout).
    /// Partitions move to the other members now, even while a delivery handle keeps the
    /// consumer alive, and the consumer's final close (when the last reference goes) finds no
    /// rebalance event left over from the unsubscribe: librdkafka aborts the process when a
    /// commit from such a late revoke callback races its terminate
    /// (`rd_kafka_cgrp_terminated: assert: !rd_kafka_assignment_in_progress`). Guarded by the
    /// MockCluster conformance suite, whose scenarios close dozens of consumers beside each
    /// other (`competing_consumers_no_loss` closes ten of one group).
    async fn leave(&mut self) {
        let limit = self.sub.inner.config.session_timeout;
        let c = self.sub.consumer.clone();
        if bounded(limit, move || c.unsubscribe()).await.is_none() {
            warn!(?limit, "unsubscribing on close did not finish in time");
            return;
        }
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            let assigned = self
                .sub
                .consumer
                .assignment()
                .map(|a| a.count())
                .unwrap_or(0);
            if assigned == 0 {
                return;
            }
            // Polling serves the revoke callback. A record it returns is let go: nothing of it
            // was committed, so the partition's next owner receives it.
            let _ =
                tokio::time::timeout(Duration::from_millis(100), self.sub.consumer.recv()).await;
        }
        warn!(
            ?limit,
            "the consumer still held partitions when closing gave up waiting for the revoke"
        );
    }
}
