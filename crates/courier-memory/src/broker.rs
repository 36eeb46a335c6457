//! The broker state machine and its `DeliveryClient`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::config::{MemoryConfig, MemoryFaults};
use courier_core::{
    check_payload, Capabilities, DeadLetter, Deliveries, Delivery, DeliveryClient, DeliveryStream,
    DestinationInfo, Error, Explanation, GroupInfo, Guarantee, Message, MessageId, Position,
    Receipt, Result, Settle, Subscription,
};

const BACKEND: &str = "memory";

fn not_found(destination: &str) -> Error {
    Error::DestinationNotFound {
        backend: BACKEND,
        destination: destination.to_owned(),
        hint:
            "create it first (DeliveryClient::create_destination) or set backend.auto_create = true"
                .into(),
    }
}
/// How often a confirmed publish is retried when its confirm is lost.
const PUBLISH_ATTEMPTS: u32 = 20;

#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    message: Message,
    attempt: u32,
    visible_at: Option<Instant>,
    stored_at: SystemTime,
}

#[derive(Debug)]
struct InFlight {
    entry: Entry,
    consumer: u64,
    deadline: Option<Instant>,
}

#[derive(Debug, Default)]
struct Group {
    ready: BTreeMap<u64, Entry>,
    inflight: HashMap<u64, InFlight>,
    busy_keys: HashMap<String, usize>,
    consumers: u32,
}

impl Group {
    fn mark_busy(&mut self, key: &Option<String>) {
        if let Some(k) = key {
            *self.busy_keys.entry(k.clone()).or_default() += 1;
        }
    }

    fn unmark_busy(&mut self, key: &Option<String>) {
        if let Some(k) = key {
            if let Some(n) = self.busy_keys.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.busy_keys.remove(k);
                }
            }
        }
    }

    /// Put an in-flight entry back (for redelivery) with the next attempt number.
    fn requeue(&mut self, token: u64, visible_at: Option<Instant>) -> bool {
        self.put_back(token, visible_at, 1)
    }

    /// Put an in-flight entry back with its attempt number raised by `counted` (0 for a
    /// deferral: the handler did not run).
    fn put_back(&mut self, token: u64, visible_at: Option<Instant>, counted: u32) -> bool {
        match self.inflight.remove(&token) {
            Some(f) => {
                self.unmark_busy(&f.entry.message.key);
                let mut e = f.entry;
                e.attempt += counted;
                e.visible_at = visible_at;
                self.ready.insert(e.seq, e);
                true
            }
            None => false,
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.deadline.is_some_and(|d| d <= now))
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            self.requeue(t, None);
        }
    }

    /// The first deliverable entry in order, honouring visibility and per-key order.
    fn take(&mut self, now: Instant) -> Option<Entry> {
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut chosen = None;
        for (seq, e) in &self.ready {
            if let Some(k) = e.message.key.as_deref() {
                if self.busy_keys.contains_key(k) || blocked.contains(k) {
                    continue;
                }
            }
            if e.visible_at.is_some_and(|v| v > now) {
                if let Some(k) = e.message.key.as_deref() {
                    blocked.insert(k);
                }
                continue;
            }
            chosen = Some(*seq);
            break;
        }
        let seq = chosen?;
        let e = self.ready.remove(&seq)?;
        self.mark_busy(&e.message.key);
        Some(e)
    }

    fn next_wake(&self) -> Option<Instant> {
        let ready = self.ready.values().filter_map(|e| e.visible_at).min();
        let inflight = self.inflight.values().filter_map(|f| f.deadline).min();
        match (ready, inflight) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug, Default)]
struct Topic {
    log: Vec<(u64, Message, SystemTime)>,
    groups: HashMap<String, Group>,
    dedup: HashMap<MessageId, Instant>,
}

#[derive(Debug, Default)]
struct State {
    topics: HashMap<String, Topic>,
    next_seq: u64,
    next_token: u64,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    changed: Notify,
}

/// An in-process broker. Clones share the broker; [`MemoryBroker::named`] returns the same
/// broker for the same name within a process while any client holds it.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.state.lock();
        f.debug_struct("MemoryBroker")
            .field("topics", &st.topics.len())
            .finish()
    }
}

fn registry() -> &'static Mutex<HashMap<String, Weak<Inner>>> {
    static R: OnceLock<Mutex<HashMap<String, Weak<Inner>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

impl MemoryBroker {
    /// A new, private broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide broker called `name`.
    pub fn named(name: &str) -> Self {
        let mut r = registry().lock();
        if let Some(inner) = r.get(name).and_then(Weak::upgrade) {
            return MemoryBroker { inner };
        }
        let b = MemoryBroker::new();
        r.insert(name.to_owned(), Arc::downgrade(&b.inner));
        b
    }

    /// Messages waiting (not in flight) for `group` on `topic` — for tests and diagnostics.
    pub fn backlog(&self, topic: &str, group: &str) -> usize {
        let st = self.inner.state.lock();
        st.topics
            .get(topic)
            .and_then(|t| t.groups.get(group))
            .map_or(0, |g| g.ready.len())
    }

    /// Messages ever stored on `topic` (duplicates included).
    pub fn stored(&self, topic: &str) -> usize {
        let st = self.inner.state.lock();
        st.topics.get(topic).map_or(0, |t| t.log.len())
    }

    fn create(&self, topic: &str) {
        let mut st = self.inner.state.lock();
        st.topics.entry(topic.to_owned()).or_default();
    }

    fn exists(&self, topic: &str) -> bool {
        self.inner.state.lock().topics.contains_key(topic)
    }

    /// Append to the log and to every group. Returns (seq, deduplicated).
    fn store(
        &self,
        topic: &str,
        message: &Message,
        dedup: Option<Duration>,
        faults: &Faults,
    ) -> (u64, bool) {
        let now = Instant::now();
        let mut st = self.inner.state.lock();
        let seq = st.next_seq;
        let t = st.topics.entry(topic.to_owned()).or_default();
        if let Some(window) = dedup {
            t.dedup.retain(|_, at| now.duration_since(*at) < window);
            if t.dedup.contains_key(&message.id) {
                return (seq, true);
            }
            t.dedup.insert(message.id.clone(), now);
        }
        let stored_at = SystemTime::now();
        t.log.push((seq, message.clone(), stored_at));
        for g in t.groups.values_mut() {
            g.ready.insert(
                seq,
                Entry {
                    seq,
                    message: message.clone(),
                    attempt: 1,
                    visible_at: faults.delay().map(|d| now + d),
                    stored_at,
                },
            );
        }
        st.next_seq += 1;
        drop(st);
        self.inner.changed.notify_waiters();
        (seq, false)
    }

    /// BROKEN-BROKER fault: forget a stored message everywhere.
    fn forget(&self, topic: &str, seq: u64) {
        let mut st = self.inner.state.lock();
        if let Some(t) = st.topics.get_mut(topic) {
            t.log.retain(|(s, _, _)| *s != seq);
            for g in t.groups.values_mut() {
                g.ready.remove(&seq);
            }
        }
    }

    fn join_group(&self, topic: &str, group: &str) {
        let mut st = self.inner.state.lock();
        let t = st.topics.entry(topic.to_owned()).or_default();
        let g = t.groups.entry(group.to_owned()).or_insert_with(|| {
            // A new group starts from the earliest message (like auto.offset.reset=earliest).
            let ready = t
                .log
                .iter()
                .map(|(seq, m, at)| {
                    (
                        *seq,
                        Entry {
                            seq: *seq,
                            message: m.clone(),
                            attempt: 1,
                            visible_at: None,
                            stored_at: *at,
                        },
                    )
                })
                .collect();
            Group {
                ready,
                ..Group::default()
            }
        });
        g.consumers += 1;
    }

    /// What the broker holds for `topic` and `groups`; `None` when the topic does not exist.
    fn inspect(&self, topic: &str, groups: &[&str]) -> Option<DestinationInfo> {
        let now = Instant::now();
        let st = self.inner.state.lock();
        let t = st.topics.get(topic)?;
        let mut info = DestinationInfo::new(topic);
        info.stored = Some(t.log.len() as u64);
        for &name in groups {
            let Some(g) = t.groups.get(name) else {
                // A group that joins reads the whole log.
                info.groups
                    .push(GroupInfo::new(name, false, t.log.len() as u64));
                continue;
            };
            let delayed = g
                .ready
                .values()
                .filter(|e| e.visible_at.is_some_and(|v| v > now))
                .count() as u64;
            let mut gi = GroupInfo::new(name, true, g.ready.len() as u64 - delayed);
            gi.in_flight = Some(g.inflight.len() as u64);
            gi.delayed = Some(delayed);
            gi.consumers = Some(g.consumers);
            gi.oldest_age = g
                .ready
                .values()
                .map(|e| e.stored_at)
                .chain(g.inflight.values().map(|f| f.entry.stored_at))
                .min()
                .map(|at| SystemTime::now().duration_since(at).unwrap_or_default());
            info.groups.push(gi);
        }
        Some(info)
    }

    /// Remove `topic` (with every group) and the named groups; what was removed.
    fn delete(&self, topic: &str, groups: &[&str]) -> Vec<String> {
        let mut st = self.inner.state.lock();
        let Some(t) = st.topics.remove(topic) else {
            return Vec::new();
        };
        let mut removed = vec![format!("topic {topic}")];
        removed.extend(
            groups
                .iter()
                .filter(|g| t.groups.contains_key(**g))
                .map(|g| format!("group {g}")),
        );
        drop(st);
        self.inner.changed.notify_waiters();
        removed
    }

    fn leave(&self, topic: &str, group: &str, consumer: u64) {
        let mut st = self.inner.state.lock();
        if let Some(g) = st
            .topics
            .get_mut(topic)
            .and_then(|t| t.groups.get_mut(group))
        {
            g.consumers = g.consumers.saturating_sub(1);
            let mine: Vec<u64> = g
                .inflight
                .iter()
                .filter(|(_, f)| f.consumer == consumer)
                .map(|(t, _)| *t)
                .collect();
            for t in mine {
                g.requeue(t, None);
            }
        }
        drop(st);
        self.inner.changed.notify_waiters();
    }

    fn settle(&self, topic: &str, group: &str, token: u64, how: SettleOp) -> bool {
        let mut st = self.inner.state.lock();
        let Some(g) = st
            .topics
            .get_mut(topic)
            .and_then(|t| t.groups.get_mut(group))
        else {
            return false;
        };
        let ok = match how {
            SettleOp::Ack => match g.inflight.remove(&token) {
                Some(f) => {
                    g.unmark_busy(&f.entry.message.key);
                    true
                }
                None => false,
            },
            SettleOp::Requeue(at) => g.requeue(token, at),
            SettleOp::Defer(at) => g.put_back(token, Some(at), 0),
        };
        drop(st);
        self.inner.changed.notify_waiters();
        ok
    }
}

enum SettleOp {
    Ack,
    Requeue(Option<Instant>),
    /// Back to the queue at this time, not counted as an attempt.
    Defer(Instant),
}

/// Per-client fault injection with its own random generator.
#[derive(Debug)]
struct Faults {
    cfg: MemoryFaults,
    rng: Mutex<fastrand::Rng>,
}

impl Faults {
    fn new(cfg: MemoryFaults) -> Self {
        let rng = match cfg.seed {
            Some(s) => fastrand::Rng::with_seed(s),
            None => fastrand::Rng::new(),
        };
        Faults {
            cfg,
            rng: Mutex::new(rng),
        }
    }

    fn hit(&self, p: f64) -> bool {
        p > 0.0 && self.rng.lock().f64() < p
    }

    fn delay(&self) -> Option<Duration> {
        self.cfg
            .max_delay
            .map(|max| max.mul_f64(self.rng.lock().f64()))
    }
}

/// A client of a [`MemoryBroker`] with one guarantee.
pub struct MemoryClient {
    broker: MemoryBroker,
    config: MemoryConfig,
    guarantee: Guarantee,
    faults: Arc<Faults>,
    closed: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for MemoryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryClient")
            .field("broker", &self.config.broker)
            .field("guarantee", &self.guarantee)
            .finish()
    }
}

impl MemoryClient {
    /// A client of `broker`.
    pub fn new(broker: MemoryBroker, config: MemoryConfig, guarantee: Guarantee) -> Self {
        let faults = Arc::new(Faults::new(config.faults.clone()));
        MemoryClient {
            broker,
            config,
            guarantee,
            faults,
            closed: Default::default(),
        }
    }

    /// The broker this client talks to.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    fn ensure(&self, destination: &str) -> Result<()> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::Closed {
                what: "memory client",
            });
        }
        if destination.is_empty() {
            return Err(Error::config("destination name is empty"));
        }
        if !self.broker.exists(destination) {
            if self.config.auto_create {
                self.broker.create(destination);
            } else {
                return Err(not_found(destination));
            }
        }
        Ok(())
    }

    fn publish_one(&self, destination: &str, message: &Message) -> Result<Receipt> {
        let receipt = |seq: Option<u64>, dedup: bool| Receipt {
            id: message.id.clone(),
            destination: destination.to_owned(),
            position: seq.map_or(Position::Unknown, Position::Sequence),
            deduplicated: dedup,
        };
        if self.guarantee == Guarantee::AtMostOnce {
            // Fire and forget: a message lost in transit is simply gone.
            if self.faults.hit(self.faults.cfg.drop_on_publish) {
                return Ok(receipt(None, false));
            }
            let (seq, _) = self.broker.store(destination, message, None, &self.faults);
            return Ok(receipt(Some(seq), false));
        }
        let dedup = (self.guarantee == Guarantee::ExactlyOnce).then_some(self.config.dedup_window);
        for _ in 0..PUBLISH_ATTEMPTS {
            if self.faults.hit(self.faults.cfg.drop_on_publish) {
                continue; // no confirm: retry with the same id
            }
            let (seq, deduplicated) = self.broker.store(destination, message, dedup, &self.faults);
            if self.faults.hit(self.faults.cfg.duplicate_on_publish) {
                continue; // stored, but the confirm was lost: retry (may store twice)
            }
            if !deduplicated && self.faults.hit(self.faults.cfg.lose_acknowledged) {
                self.broker.forget(destination, seq);
            }
            return Ok(receipt(Some(seq), deduplicated));
        }
        Err(Error::Timeout {
            operation: format!(
                "publish of {} to {destination:?} (no confirm after {PUBLISH_ATTEMPTS} attempts)",
                message.id
            ),
            after: Duration::ZERO,
        })
    }
}

/// The memory backend's explanation for a guarantee.
pub(crate) fn explain(config: &MemoryConfig, g: Guarantee) -> Explanation {
    let mut e = Explanation::new(BACKEND, g).set(
        "broker",
        "broker",
        &config.broker,
        "clients with the same name in one process share a broker",
    );
    e = match g {
        Guarantee::AtMostOnce => e
            .set(
                "producer",
                "confirm",
                "none",
                "publish returns once handed over; no retry",
            )
            .set(
                "consumer",
                "settle",
                "before handler",
                "a crash during the handler loses the message, never repeats it",
            )
            .set(
                "consumer",
                "duplicate filter",
                "last 100000 ids",
                "a duplicate delivery is never handed to the handler",
            ),
        Guarantee::AtLeastOnce => e
            .set(
                "producer",
                "confirm",
                "stored",
                "publish returns after the broker stored the message",
            )
            .set(
                "producer",
                "retries",
                PUBLISH_ATTEMPTS,
                "a lost confirm is retried with the same id",
            )
            .set(
                "consumer",
                "settle",
                "after handler",
                "unsettled deliveries are redelivered",
            ),
        Guarantee::ExactlyOnce => e
            .set(
                "producer",
                "confirm",
                "stored",
                "publish returns after the broker stored the message",
            )
            .set(
                "producer",
                "dedup window",
                humantime_like(config.dedup_window),
                "a retried publish with the same id is stored once",
            )
            .set(
                "consumer",
                "settle",
                "after handler",
                "unsettled deliveries are redelivered",
            )
            .set(
                "consumer",
                "idempotent layer",
                "required",
                "absorbs redeliveries: exactly one effect per id",
            ),
    };
    e = e
        .set(
            "topology",
            "auto_create",
            config.auto_create,
            "missing destinations fail unless true",
        )
        .set(
            "topology",
            "max_payload",
            config.max_payload,
            "larger messages fail before sending",
        )
        .set(
            "consumer",
            "ack_timeout",
            config.ack_timeout.map_or("none".into(), humantime_like),
            "unsettled deliveries come back when their consumer leaves (or after this)",
        );
    if config.faults.any() {
        e = e.note(format!("fault injection is ON: {:?}", config.faults));
    }
    e
}

fn humantime_like(d: Duration) -> String {
    format!("{d:?}")
}

#[async_trait]
impl DeliveryClient for MemoryClient {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn guarantee(&self) -> Guarantee {
        self.guarantee
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::baseline();
        c.ordering_by_key = true;
        c.consumer_groups = true;
        c.native_dedup =
            (self.guarantee == Guarantee::ExactlyOnce).then_some(self.config.dedup_window);
        c.max_payload = self.config.max_payload;
        c.native_dead_letter = true;
        c.delayed_redelivery = true;
        c.detects_missing_destination = true;
        c.settle_window = Duration::from_millis(300);
        c.redelivery_after_crash = self
            .config
            .ack_timeout
            .unwrap_or(Duration::from_millis(100));
        c
    }

    fn explain(&self) -> Explanation {
        explain(&self.config, self.guarantee)
    }

    async fn create_destination(&self, destination: &str) -> Result<()> {
        if destination.is_empty() {
            return Err(Error::config("destination name is empty"));
        }
        self.broker.create(destination);
        Ok(())
    }

    async fn publish(&self, destination: &str, message: Message) -> Result<Receipt> {
        check_payload(BACKEND, destination, &message, self.config.max_payload)?;
        self.ensure(destination)?;
        self.publish_one(destination, &message)
    }

    async fn publish_batch(
        &self,
        destination: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Receipt>> {
        for m in &messages {
            check_payload(BACKEND, destination, m, self.config.max_payload)?;
        }
        self.ensure(destination)?;
        messages
            .iter()
            .map(|m| self.publish_one(destination, m))
            .collect()
    }

    async fn subscribe(&self, sub: Subscription) -> Result<Deliveries> {
        self.ensure(&sub.destination)?;
        self.broker.join_group(&sub.destination, &sub.group);
        let consumer = {
            let mut st = self.broker.inner.state.lock();
            st.next_token += 1;
            st.next_token
        };
        let dead_letter = sub.dead_letter_destination();
        Ok(Deliveries::new(Box::new(MemoryStream {
            broker: self.broker.clone(),
            topic: sub.destination,
            group: sub.group,
            dead_letter,
            consumer,
            ack_timeout: self.config.ack_timeout,
            faults: self.faults.clone(),
            closed: false,
        })))
    }

    async fn inspect(&self, destination: &str, groups: &[&str]) -> Result<DestinationInfo> {
        self.broker
            .inspect(destination, groups)
            .ok_or_else(|| not_found(destination))
    }

    async fn delete_destination(&self, destination: &str, groups: &[&str]) -> Result<Vec<String>> {
        Ok(self.broker.delete(destination, groups))
    }

    async fn close(&self) -> Result<()> {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

struct MemoryStream {
    broker: MemoryBroker,
    topic: String,
    group: String,
    dead_letter: String,
    consumer: u64,
    ack_timeout: Option<Duration>,
    faults: Arc<Faults>,
    closed: bool,
}

impl MemoryStream {
    fn try_take(&self) -> (Option<Delivery>, Option<Instant>) {
        let now = Instant::now();
        let mut st = self.broker.inner.state.lock();
        let token = st.next_token + 1;
        let Some(g) = st
            .topics
            .get_mut(&self.topic)
            .and_then(|t| t.groups.get_mut(&self.group))
        else {
            return (None, None);
        };
        g.expire(now);
        let Some(entry) = g.take(now) else {
            return (None, g.next_wake());
        };
        if self.faults.hit(self.faults.cfg.duplicate_delivery) {
            // The broker hands the same message out twice: a second physical copy.
            let mut copy = entry.clone();
            copy.seq = entry.seq;
            // Keep it right behind the original (same seq would collide; use a fresh slot).
            let dup_seq = u64::MAX - token;
            copy.seq = dup_seq;
            g.ready.insert(dup_seq, copy);
        }
        let seq = entry.seq;
        let message = entry.message.clone();
        let attempt = entry.attempt;
        let stored_at = entry.stored_at;
        g.inflight.insert(
            token,
            InFlight {
                entry,
                consumer: self.consumer,
                deadline: self.ack_timeout.map(|d| now + d),
            },
        );
        st.next_token = token;
        drop(st);
        let settle = MemorySettle {
            broker: self.broker.clone(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            dead_letter: self.dead_letter.clone(),
            token,
            faults: self.faults.clone(),
            message_id: message.id.clone(),
        };
        (
            Some(
                Delivery::new(
                    message,
                    attempt,
                    Position::Sequence(seq),
                    self.topic.clone(),
                    Box::new(settle),
                )
                .with_published_at(Some(stored_at)),
            ),
            None,
        )
    }
}

#[async_trait]
impl DeliveryStream for MemoryStream {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.closed {
            return None;
        }
        loop {
            let notified = self.broker.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (d, wake) = self.try_take();
            if let Some(d) = d {
                return Some(Ok(d));
            }
            match wake {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.closed = true;
        self.broker.leave(&self.topic, &self.group, self.consumer);
        Ok(())
    }
}

impl Drop for MemoryStream {
    fn drop(&mut self) {
        // A consumer that goes away without settling: its deliveries are redelivered.
        if !self.closed {
            self.broker.leave(&self.topic, &self.group, self.consumer);
        }
    }
}

struct MemorySettle {
    broker: MemoryBroker,
    topic: String,
    group: String,
    dead_letter: String,
    token: u64,
    faults: Arc<Faults>,
    message_id: MessageId,
}

impl MemorySettle {
    fn expired(&self, reason: &str) -> Error {
        Error::DeliveryExpired {
            message_id: self.message_id.to_string(),
            reason: reason.into(),
        }
    }

    /// The crash-before-settle fault: the settle never reaches the broker, which redelivers.
    fn crashed(&self) -> Option<Error> {
        if self.faults.hit(self.faults.cfg.crash_before_settle) {
            self.broker.settle(
                &self.topic,
                &self.group,
                self.token,
                SettleOp::Requeue(None),
            );
            return Some(self.expired("injected consumer crash before settle"));
        }
        None
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        if let Some(e) = self.crashed() {
            return Err(e);
        }
        if self.faults.hit(self.faults.cfg.redeliver_settled) {
            // BROKEN BROKER: pretend the ack worked, deliver again anyway.
            self.broker.settle(
                &self.topic,
                &self.group,
                self.token,
                SettleOp::Requeue(None),
            );
            return Ok(());
        }
        if self
            .broker
            .settle(&self.topic, &self.group, self.token, SettleOp::Ack)
        {
            Ok(())
        } else {
            Err(self.expired("it was already redelivered (consumer left or ack timeout passed)"))
        }
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        if let Some(e) = self.crashed() {
            return Err(e);
        }
        let at = (!delay.is_zero()).then(|| Instant::now() + delay);
        if self
            .broker
            .settle(&self.topic, &self.group, self.token, SettleOp::Requeue(at))
        {
            Ok(())
        } else {
            Err(self.expired("it was already redelivered"))
        }
    }

    async fn defer(self: Box<Self>, delay: Duration) -> Result<()> {
        if let Some(e) = self.crashed() {
            return Err(e);
        }
        if self.broker.settle(
            &self.topic,
            &self.group,
            self.token,
            SettleOp::Defer(Instant::now() + delay),
        ) {
            Ok(())
        } else {
            Err(self.expired("it was already redelivered"))
        }
    }

    async fn dead_letter(self: Box<Self>, message: &Message, why: DeadLetter) -> Result<()> {
        if let Some(e) = self.crashed() {
            return Err(e);
        }
        let m = why.stamp(message, &self.topic);
        // Store in the dead-letter topic first, then settle: nothing is lost in between.
        self.broker.create(&self.dead_letter);
        let no_faults = Faults::new(MemoryFaults::default());
        self.broker.store(&self.dead_letter, &m, None, &no_faults);
        if self
            .broker
            .settle(&self.topic, &self.group, self.token, SettleOp::Ack)
        {
            Ok(())
        } else {
            Err(self.expired("it was already redelivered (the dead-lettered copy stays)"))
        }
    }
}
