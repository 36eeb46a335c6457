//! Consuming: offset tracking that never commits past an unprocessed message, rebalance
//! handling, and the settle operations (including transactional outputs).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use parking_lot::Mutex;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use courier_core::{
    header, DeadLetter, Delivery, DeliveryStream, Error, Guarantee, Message, MessageId, Outgoing,
    Position, Result, Settle, Subscription,
};

use crate::client::{blocking, kafka_err, Inner};
use crate::settings;

/// Header carrying the earliest time (ms since the epoch) a retried message may be handled.
pub(crate) const NOT_BEFORE: &str = "courier-not-before";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Per-partition in-flight offsets: the committable position is the first unprocessed one.
#[derive(Default)]
pub(crate) struct Tracker {
    parts: Mutex<HashMap<i32, BTreeMap<i64, bool>>>,
    committed: Mutex<HashMap<i32, i64>>,
    /// At-least-once: the last stored watermark per partition (committed explicitly on close).
    stored: Mutex<HashMap<i32, i64>>,
}

impl Tracker {
    fn received(&self, p: i32, o: i64) {
        self.parts.lock().entry(p).or_default().insert(o, false);
    }

    /// Watermark the partition would have if `o` were done (without changing anything).
    fn peek(&self, p: i32, o: i64) -> Option<i64> {
        let parts = self.parts.lock();
        let offsets = parts.get(&p)?;
        let mut wm = None;
        for (&off, &done) in offsets {
            if done || off == o {
                wm = Some(off + 1);
            } else {
                break;
            }
        }
        wm
    }

    /// Mark `o` done; returns the new watermark when it advanced.
    fn done(&self, p: i32, o: i64) -> Option<i64> {
        let mut parts = self.parts.lock();
        let offsets = parts.get_mut(&p)?;
        if let Some(d) = offsets.get_mut(&o) {
            *d = true;
        }
        let mut wm = None;
        while let Some((&off, &done)) = offsets.iter().next() {
            if !done {
                break;
            }
            offsets.remove(&off);
            wm = Some(off + 1);
        }
        wm
    }

    /// Record a commit; false if `wm` is not ahead of what is committed.
    fn advance(&self, p: i32, wm: i64) -> bool {
        let mut c = self.committed.lock();
        let cur = c.entry(p).or_insert(i64::MIN);
        if wm > *cur {
            *cur = wm;
            true
        } else {
            false
        }
    }

    fn revoke(&self, p: i32) {
        self.parts.lock().remove(&p);
        self.committed.lock().remove(&p);
        self.stored.lock().remove(&p);
    }
}

pub(crate) struct Ctx {
    tracker: Arc<Tracker>,
    guarantee: Guarantee,
    /// Which of this process's subscriptions (for logs).
    subscription: u64,
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
                warn!(subscription = self.subscription, error = %e, "rebalance failed")
            }
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            if self.guarantee == Guarantee::AtLeastOnce {
                // Commit what was processed before the partitions move.
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    debug!(error = %e, "commit on revoke");
                }
            }
            for el in tpl.elements() {
                self.tracker.revoke(el.partition());
            }
        }
    }
}

/// A subscription's consumer, closed off the async worker threads when the last reference goes.
///
/// Dropping an rdkafka consumer closes it: it leaves the group and polls until the close is done,
/// running the revoke callback (a synchronous commit under at-least-once). That can take a
/// broker round trip or a session timeout, and must not occupy a tokio worker: a stream
/// dropped without `close` (its task aborted, a consumer torn down mid-handler) would stall the
/// tasks queued behind it on that worker.
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
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(move || drop(consumer));
                }
                Err(_) => drop(consumer),
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
}

pub(crate) struct KafkaStream {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    sub: Arc<Sub>,
}

impl KafkaStream {
    pub(crate) fn start(inner: Arc<Inner>, s: Subscription) -> Result<Self> {
        let tracker = Arc::new(Tracker::default());
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
        });
        let (tx, rx) = mpsc::channel(1);
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(sub.clone(), tx, stop_rx));
        Ok(KafkaStream {
            rx,
            stop: Some(stop_tx),
            task: Some(task),
            sub,
        })
    }
}

async fn run(sub: Arc<Sub>, tx: mpsc::Sender<Result<Delivery>>, mut stop: oneshot::Receiver<()>) {
    loop {
        let r = tokio::select! {
            _ = &mut stop => return,
            _ = tx.closed() => return,
            r = sub.consumer.recv() => r.map(|m| m.detach()),
        };
        let m = match r {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "consume error");
                continue;
            }
        };
        let (p, o) = (m.partition(), m.offset());
        tracing::trace!(
            subscription = sub.consumer.context().subscription,
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
                    NOT_BEFORE => not_before = v.parse::<u64>().ok(),
                    k => {
                        headers.insert(k.to_owned(), v);
                    }
                }
            }
        }
        let message = Message {
            // A record from another producer: its position is a stable id.
            id: MessageId::from_string(
                id.unwrap_or_else(|| format!("kafka-{}-{p}-{o}", sub.topic)),
            ),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload: m.payload().map(|b| b.to_vec()).unwrap_or_default().into(),
        };
        if let Some(nb) = not_before {
            let wait = nb.saturating_sub(now_ms());
            if wait > 0 {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(Duration::from_millis(wait.min(3_600_000))) => {}
                }
            }
        }
        sub.tracker.received(p, o);
        let settle = KafkaSettle {
            sub: sub.clone(),
            partition: p,
            offset: o,
            attempt,
            message: message.clone(),
        };
        let d = Delivery::new(
            message,
            attempt,
            Position::Offset {
                partition: p,
                offset: o,
            },
            sub.topic.clone(),
            Box::new(settle),
        );
        // Race the hand-off with the stop signal, so `close` is not held by a subscriber that
        // stopped reading; the record not handed off is uncommitted and read again. Guarded by the
        // conformance scenario `close_returns_promptly_with_deliveries_waiting`.
        tokio::select! {
            r = tx.send(Ok(d)) => if r.is_err() { return },
            _ = &mut stop => return,
        }
    }
}

#[async_trait]
impl DeliveryStream for KafkaStream {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        if self.sub.inner.guarantee != Guarantee::AtMostOnce {
            // Commit exactly what was processed, explicitly (not only what auto-commit saw).
            let stored: Vec<(i32, i64)> = self
                .sub
                .tracker
                .stored
                .lock()
                .iter()
                .map(|(p, o)| (*p, *o))
                .collect();
            let committed: Vec<(i32, i64)> = self
                .sub
                .tracker
                .committed
                .lock()
                .iter()
                .map(|(p, o)| (*p, *o))
                .filter(|(_, o)| *o >= 0)
                .collect();
            let mut tpl = TopicPartitionList::new();
            for (p, o) in stored.into_iter().chain(committed) {
                let _ = tpl.add_partition_offset(&self.sub.topic, p, Offset::Offset(o));
            }
            let c = self.sub.consumer.clone();
            match blocking(move || {
                if tpl.count() > 0 {
                    c.commit(&tpl, CommitMode::Sync)
                } else {
                    Ok(())
                }
            })
            .await
            {
                Ok(Err(e))
                    if e.rdkafka_error_code()
                        != Some(rdkafka::error::RDKafkaErrorCode::NoOffset) =>
                {
                    warn!(error = %e, "committing offsets on close failed");
                }
                _ => {}
            }
        }
        let c = self.sub.consumer.clone();
        let _ = blocking(move || c.unsubscribe()).await;
        Ok(())
    }
}

struct KafkaSettle {
    sub: Arc<Sub>,
    partition: i32,
    offset: i64,
    attempt: u32,
    message: Message,
}

/// A record to produce as part of settling.
struct Out {
    topic: String,
    message: Message,
    attempt: Option<u32>,
    not_before: Option<u64>,
}

impl KafkaSettle {
    fn tpl(&self, wm: i64) -> Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.sub.topic, self.partition, Offset::Offset(wm))
            .map_err(|e| kafka_err("offsets", e))?;
        Ok(tpl)
    }

    async fn commit(&self, wm: i64, mode: CommitMode) -> Result<()> {
        if !self.sub.tracker.advance(self.partition, wm) {
            return Ok(());
        }
        let tpl = self.tpl(wm)?;
        let c = self.sub.consumer.clone();
        blocking(move || c.commit(&tpl, mode))
            .await?
            .map_err(|e| kafka_err("commit", e))
    }

    async fn mark_done(&self) -> Result<()> {
        match self.sub.inner.guarantee {
            Guarantee::AtMostOnce => {
                // Commit this message's position before its handler runs (monotonic).
                self.sub.tracker.done(self.partition, self.offset);
                self.commit(self.offset + 1, CommitMode::Sync).await
            }
            Guarantee::AtLeastOnce => {
                if let Some(wm) = self.sub.tracker.done(self.partition, self.offset) {
                    self.sub.tracker.stored.lock().insert(self.partition, wm);
                    // rd_kafka_offset_store takes the last processed offset and stores it + 1.
                    if let Err(e) =
                        self.sub
                            .consumer
                            .store_offset(&self.sub.topic, self.partition, wm - 1)
                    {
                        // The partition moved to another consumer: it will process from the last commit.
                        debug!(error = %e, "store_offset after revoke");
                    }
                }
                Ok(())
            }
            Guarantee::ExactlyOnce => match self.sub.tracker.done(self.partition, self.offset) {
                Some(wm) => self.commit(wm, CommitMode::Async).await,
                None => Ok(()),
            },
        }
    }

    /// Produce `outs` and settle: atomically in one transaction under exactly-once, else
    /// confirmed produce then mark done.
    async fn settle_with(&self, outs: Vec<Out>) -> Result<()> {
        let inner = &self.sub.inner;
        for o in &outs {
            if let Err(Error::DestinationNotFound { .. }) = inner.ensure_topic(&o.topic).await {
                inner.create_topic(&o.topic).await?;
            }
        }
        if inner.guarantee != Guarantee::ExactlyOnce {
            for o in &outs {
                inner
                    .produce(&o.topic, &o.message, o.attempt, o.not_before)
                    .await?;
            }
            return self.mark_done().await;
        }
        let result = inner
            .transaction(|| async {
                for o in &outs {
                    inner
                        .produce(&o.topic, &o.message, o.attempt, o.not_before)
                        .await?;
                }
                if let Some(wm) = self.sub.tracker.peek(self.partition, self.offset) {
                    let tpl = self.tpl(wm)?;
                    let meta = self.sub.consumer.group_metadata().ok_or_else(|| {
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
                    .map_err(|e| kafka_err("send_offsets_to_transaction", e))?;
                }
                Ok(())
            })
            .await;
        match result {
            Ok(()) => {
                if let Some(wm) = self.sub.tracker.done(self.partition, self.offset) {
                    self.sub.tracker.advance(self.partition, wm);
                }
                Ok(())
            }
            Err(e) => {
                // Aborted: rewind so the input is processed again (its outputs were not committed).
                if !matches!(e, Error::Fenced { .. }) {
                    let c = self.sub.consumer.clone();
                    let (topic, p, o) = (self.sub.topic.clone(), self.partition, self.offset);
                    let _ = blocking(move || {
                        c.seek(&topic, p, Offset::Offset(o), Duration::from_secs(10))
                    })
                    .await;
                    warn!(error = %e, partition = p, offset = o, "transaction aborted; rewound to reprocess the input");
                }
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Settle for KafkaSettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.mark_done().await
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        if self.sub.inner.guarantee == Guarantee::AtMostOnce {
            return Ok(());
        }
        // No per-message nack in Kafka: re-publish with the next attempt number and a not-before
        // time, then settle the original.
        let message = self.message.clone();
        let out = Out {
            topic: self.sub.topic.clone(),
            message,
            attempt: Some(self.attempt + 1),
            not_before: Some(now_ms() + delay.as_millis() as u64),
        };
        self.settle_with(vec![out]).await
    }

    async fn dead_letter(self: Box<Self>, message: &Message, why: DeadLetter) -> Result<()> {
        let mut m = message.clone();
        m.headers.insert(
            header::DEAD_LETTER_ATTEMPTS.into(),
            why.attempts.to_string(),
        );
        m.headers
            .insert(header::DEAD_LETTER_REASON.into(), why.reason);
        m.headers
            .insert(header::DEAD_LETTER_SOURCE.into(), self.sub.topic.clone());
        let out = Out {
            topic: self.sub.dlq.clone(),
            message: m,
            attempt: None,
            not_before: None,
        };
        self.settle_with(vec![out]).await
    }

    fn atomic_outputs(&self) -> bool {
        self.sub.inner.guarantee == Guarantee::ExactlyOnce
    }

    async fn ack_with_outputs(self: Box<Self>, outputs: Vec<Outgoing>) -> Result<()> {
        let outs = outputs
            .into_iter()
            .map(|o| Out {
                topic: o.destination,
                message: o.message,
                attempt: None,
                not_before: None,
            })
            .collect();
        self.settle_with(outs).await
    }
}
