//! The message envelope, receipts and received deliveries.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::handler::Outgoing;
use crate::{Error, Result};

/// Header names courier itself reads and writes.
pub mod header {
    /// Carries the courier id on brokers without a native id field (Kafka).
    pub const ID: &str = "courier-id";
    /// Attempt counter for brokers that do not count deliveries themselves (Kafka).
    pub const ATTEMPT: &str = "courier-attempt";
    /// Set on dead-lettered messages: the attempts that were made.
    pub const DEAD_LETTER_ATTEMPTS: &str = "courier-dead-letter-attempts";
    /// Set on dead-lettered messages: the last error.
    pub const DEAD_LETTER_REASON: &str = "courier-dead-letter-reason";
    /// Set on dead-lettered messages: where the message was consumed from.
    pub const DEAD_LETTER_SOURCE: &str = "courier-dead-letter-source";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// The payload's media type (`application/json` for [`Message::json`](crate::Message::json)).
    pub const CONTENT_TYPE: &str = "content-type";
    /// The earliest time (milliseconds since the Unix epoch) the message may be handled: set by
    /// [`Message::with_delay`](crate::Message::with_delay) and by Kafka retries.
    pub const NOT_BEFORE: &str = "courier-not-before";
    /// Where the reply to a request goes (set by [`Requester`](crate::Requester)).
    pub const REPLY_TO: &str = "courier-reply-to";
    /// Ties a reply to its request.
    pub const CORRELATION_ID: &str = "courier-correlation-id";
    /// Set on a reply when its request was dead-lettered instead of answered: the reason.
    /// [`Requester::request`](crate::Requester::request) returns it as
    /// [`Error::RequestFailed`](crate::Error::RequestFailed).
    pub const REPLY_ERROR: &str = "courier-reply-error";
    /// The key the idempotent layer dedups on when it is not the message id: a request asked
    /// again goes out with a new message id (no broker dedup drops it) and keeps this key.
    pub const IDEMPOTENCY_KEY: &str = "courier-idempotency-key";
}

/// The stable identity of a message: set once by the producer, kept across retries and
/// redeliveries; it is the idempotency key. UUIDv7 by default (time ordered).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(String);

impl MessageId {
    /// A new UUIDv7 id.
    pub fn new() -> Self {
        MessageId(uuid::Uuid::now_v7().to_string())
    }

    /// Use an id chosen by the application (e.g. a business key or an outbox row id).
    pub fn from_string(id: impl Into<String>) -> Self {
        MessageId(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

impl From<&str> for MessageId {
    fn from(s: &str) -> Self {
        MessageId(s.to_owned())
    }
}

impl From<String> for MessageId {
    fn from(s: String) -> Self {
        MessageId(s)
    }
}

/// Message headers: string keys to string values, ordered for stable output.
pub type Headers = BTreeMap<String, String>;

/// The envelope courier sends and receives on every broker.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Stable id (the idempotency key).
    pub id: MessageId,
    /// Ordering key: Kafka record key, SQS FIFO `MessageGroupId`; per-key order is kept by
    /// backends whose capabilities say so.
    pub key: Option<String>,
    /// Application headers.
    pub headers: Headers,
    /// The body.
    pub payload: Bytes,
}

impl Message {
    /// A message with a fresh id and the given payload.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            id: MessageId::new(),
            key: None,
            headers: Headers::new(),
            payload: payload.into(),
        }
    }

    /// Set the ordering key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Set the id (for example a business id, so producer retries dedup).
    pub fn with_id(mut self, id: impl Into<MessageId>) -> Self {
        self.id = id.into();
        self
    }

    /// Add a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Deliver no earlier than `delay` from now: the message is published at once, and its
    /// consumers hand it to their handler only from then on (see
    /// [`Message::with_not_before`]).
    pub fn with_delay(self, delay: std::time::Duration) -> Self {
        self.with_not_before(std::time::SystemTime::now() + delay)
    }

    /// Deliver no earlier than `at` (delayed delivery, every backend). Stored in the
    /// [`header::NOT_BEFORE`] header; SQS standard queues also hold the message back with
    /// `DelaySeconds` (up to 15 minutes), Kafka's receive task holds it beside the stream without
    /// blocking other records, and everywhere else the consume loop defers a delivery that
    /// arrives early until it is due — without running the handler or counting an attempt
    /// (conformance scenario `delayed_delivery_waits_until_due`).
    pub fn with_not_before(self, at: std::time::SystemTime) -> Self {
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.with_header(header::NOT_BEFORE, ms.to_string())
    }

    /// The earliest time the message may be handled, if it was published with one.
    pub fn not_before(&self) -> Option<std::time::SystemTime> {
        let ms: u64 = self.headers.get(header::NOT_BEFORE)?.parse().ok()?;
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
    }

    /// How long until the message is due; `None` when it is (or has no not-before time).
    pub fn due_in(&self) -> Option<std::time::Duration> {
        self.not_before()?
            .duration_since(std::time::SystemTime::now())
            .ok()
            .filter(|d| !d.is_zero())
    }

    /// Bytes the envelope occupies on a broker that stores id, key and headers beside the payload:
    /// what payload limits are checked against.
    pub fn encoded_len(&self) -> usize {
        self.payload.len()
            + self.id.as_str().len()
            + self.key.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("headers", &self.headers)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Where a message sits on its broker, for logs and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Position {
    /// Not known (e.g. at-most-once publish).
    Unknown,
    /// A sequence number (memory broker).
    Sequence(u64),
    /// Kafka partition and offset.
    Offset {
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
    },
    /// AMQP delivery tag on its channel.
    DeliveryTag(u64),
    /// SQS message id (and sequence number on FIFO queues).
    SqsMessage {
        /// The broker's message id.
        message_id: String,
        /// FIFO sequence number.
        sequence_number: Option<String>,
    },
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Unknown => f.write_str("-"),
            Position::Sequence(s) => write!(f, "seq {s}"),
            Position::Offset { partition, offset } => write!(f, "{partition}@{offset}"),
            Position::DeliveryTag(t) => write!(f, "tag {t}"),
            Position::SqsMessage {
                message_id,
                sequence_number,
            } => match sequence_number {
                Some(s) => write!(f, "{message_id} (seq {s})"),
                None => f.write_str(message_id),
            },
        }
    }
}

/// What a successful publish returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The courier id of the published message.
    pub id: MessageId,
    /// Where it was published.
    pub destination: String,
    /// Where the broker stored it, when the guarantee waits for that.
    pub position: Position,
    /// Whether the broker said it was a duplicate it had already stored (native dedup).
    pub deduplicated: bool,
}

/// Why a delivery is dead-lettered.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Human-readable reason (the last error).
    pub reason: String,
    /// Attempts made so far.
    pub attempts: u32,
}

impl DeadLetter {
    /// The copy of `message` that goes to the dead-letter destination: the attempts made, the
    /// reason and where it was consumed from, as headers ([`header::DEAD_LETTER_ATTEMPTS`],
    /// [`header::DEAD_LETTER_REASON`], [`header::DEAD_LETTER_SOURCE`]). Every backend's
    /// `Settle::dead_letter` sends this; the conformance scenario
    /// `handler_errors_retry_then_dead_letter` reads the headers back on each.
    pub fn stamp(self, message: &Message, source: &str) -> Message {
        let mut m = message.clone();
        m.headers.insert(
            header::DEAD_LETTER_ATTEMPTS.into(),
            self.attempts.to_string(),
        );
        m.headers
            .insert(header::DEAD_LETTER_REASON.into(), self.reason);
        m.headers
            .insert(header::DEAD_LETTER_SOURCE.into(), source.to_owned());
        m
    }
}

/// Backend half of a [`Delivery`]: the operations that settle it on the broker.
///
/// Each method consumes the handle, so a delivery is settled at most once. Implementations
/// must be safe to drop unsettled: the broker then redelivers the message (when the consumer
/// closes, the visibility timeout passes, or the channel is gone).
#[async_trait]
pub trait Settle: Send + Sync {
    /// Acknowledge: the message is done and must not be redelivered.
    async fn ack(self: Box<Self>) -> Result<()>;

    /// Negative-acknowledge: redeliver the message after `delay` (best effort: a backend without
    /// delayed redelivery documents its behaviour in [`crate::Capabilities`]).
    async fn nack(self: Box<Self>, delay: Duration) -> Result<()>;

    /// Redeliver after `delay` without counting an attempt: the handler did not run (the
    /// idempotent layer's store was unreachable, or another worker holds the message's key).
    /// Must not move the message towards the dead-letter destination — neither courier's retry
    /// budget nor a broker's own delivery limit (RabbitMQ quorum `x-delivery-limit`, an SQS
    /// redrive policy). Default: [`Settle::nack`], for brokers that count nothing themselves.
    async fn defer(self: Box<Self>, delay: Duration) -> Result<()> {
        self.nack(delay).await
    }

    /// Move the message to the subscription's dead-letter destination and settle it, so it is not
    /// redelivered. Must not lose the message: publish to the dead-letter destination is confirmed
    /// before the original is acknowledged.
    async fn dead_letter(self: Box<Self>, message: &Message, why: DeadLetter) -> Result<()>;

    /// Whether [`Settle::ack_with_outputs`] commits outputs and the consumed position atomically
    /// (Kafka transactions).
    fn atomic_outputs(&self) -> bool {
        false
    }

    /// Whether the backend publishes a handler's outputs itself, in
    /// [`Settle::ack_with_outputs`], and acknowledges the input once they are confirmed —
    /// without holding the consume loop while it waits (Kafka). True whenever
    /// [`Settle::atomic_outputs`] is. Otherwise the consume loop publishes the outputs (each
    /// confirmed) and then acknowledges.
    fn publishes_outputs(&self) -> bool {
        self.atomic_outputs()
    }

    /// Publish `outputs` and acknowledge — in one atomic step where [`Settle::atomic_outputs`],
    /// else the acknowledgement after every output is confirmed — then run `after` with whether
    /// that happened. Only called when [`Settle::publishes_outputs`] is true.
    ///
    /// A backend may return before the commit (Kafka commits many inputs in one transaction per
    /// commit interval); it runs `after` exactly once in every case, `false` when the outputs
    /// and the acknowledgement will not be committed (the message is delivered again).
    async fn ack_with_outputs(
        self: Box<Self>,
        outputs: Vec<Outgoing>,
        after: AfterCommit,
    ) -> Result<()> {
        let _ = outputs;
        after.run(false).await;
        Err(Error::unsupported(
            "courier",
            "atomic handler outputs",
            "this backend publishes handler outputs before acknowledging instead",
        ))
    }
}

/// A step to run once a delivery's outputs and acknowledgement are final; its argument says
/// whether they were committed. See [`Context::after_commit`](crate::Context::after_commit).
pub type CommitHook = Box<dyn FnOnce(bool) -> BoxFuture<'static, ()> + Send>;

/// The steps to run once a delivery's settle is final (in the order they were added).
#[derive(Default)]
pub struct AfterCommit {
    // A mutex only to make the steps shareable between threads while they wait (it is never
    // contended: every method takes the value or `&mut`).
    hooks: std::sync::Mutex<Vec<CommitHook>>,
}

impl AfterCommit {
    /// Add a step.
    pub fn push(&mut self, hook: CommitHook) {
        self.hooks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .push(hook);
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.hooks.lock().map(|h| h.is_empty()).unwrap_or(true)
    }

    /// Run every step with `committed`.
    pub async fn run(self, committed: bool) {
        let hooks = self.hooks.into_inner().unwrap_or_else(|e| e.into_inner());
        for hook in hooks {
            hook(committed).await;
        }
    }

    /// Run every step with `committed` on a task of its own (from code that must not wait).
    pub fn spawn(self, committed: bool) {
        if self.is_empty() {
            return;
        }
        // Outside a runtime the steps cannot run (they talk to stores); the leases they would
        // have settled expire by themselves.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            drop(rt.spawn(self.run(committed)));
        }
    }
}

impl fmt::Debug for AfterCommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AfterCommit")
            .field(
                "steps",
                &self.hooks.lock().map(|h| h.len()).unwrap_or_default(),
            )
            .finish()
    }
}

/// A message received from a subscription, with what the broker knows about it and the handle
/// that settles it.
pub struct Delivery {
    /// The envelope.
    pub message: Message,
    /// 1 for the first delivery, 2 for the first redelivery, ...
    pub attempt: u32,
    /// Where the message sits on the broker.
    pub position: Position,
    /// Where it was consumed from.
    pub source: String,
    /// When this process received it.
    pub received_at: SystemTime,
    /// When the broker stored it, where the broker tells (Kafka's record timestamp, SQS
    /// `SentTimestamp`, RabbitMQ's `timestamp` property as courier sets it — whole seconds —,
    /// the memory broker). `received_at - published_at` is the message's age when it arrived.
    pub published_at: Option<SystemTime>,
    settle: Box<dyn Settle>,
}

impl Delivery {
    /// Build a delivery (used by backends).
    pub fn new(
        message: Message,
        attempt: u32,
        position: Position,
        source: impl Into<String>,
        settle: Box<dyn Settle>,
    ) -> Self {
        Delivery {
            message,
            attempt: attempt.max(1),
            position,
            source: source.into(),
            received_at: SystemTime::now(),
            published_at: None,
            settle,
        }
    }

    /// Set when the broker stored the message (used by backends).
    pub fn with_published_at(mut self, at: Option<SystemTime>) -> Self {
        self.published_at = at;
        self
    }

    /// How old the message was when this process received it, where the broker tells when it
    /// was stored; zero when the clocks disagree.
    pub fn age(&self) -> Option<Duration> {
        message_age(self.published_at, self.received_at)
    }

    /// Acknowledge the message.
    pub async fn ack(self) -> Result<()> {
        self.settle.ack().await
    }

    /// Ask for redelivery after `delay`.
    pub async fn nack(self, delay: Duration) -> Result<()> {
        self.settle.nack(delay).await
    }

    /// Move the message to the dead-letter destination with `reason`.
    pub async fn dead_letter(self, reason: impl Into<String>) -> Result<()> {
        let why = DeadLetter {
            reason: reason.into(),
            attempts: self.attempt,
        };
        self.settle.dead_letter(&self.message, why).await
    }

    /// Put a delivery back together from [`Delivery::into_parts`] (for wrappers that replace the
    /// settle handle); everything the broker told is kept.
    pub fn from_parts(info: DeliveryInfo, settle: Box<dyn Settle>) -> Self {
        Delivery {
            message: info.message,
            attempt: info.attempt,
            position: info.position,
            source: info.source,
            received_at: info.received_at,
            published_at: info.published_at,
            settle,
        }
    }

    /// Split into the envelope and the settle handle (used by the consume loop).
    pub fn into_parts(self) -> (DeliveryInfo, Box<dyn Settle>) {
        (
            DeliveryInfo {
                message: self.message,
                attempt: self.attempt,
                position: self.position,
                source: self.source,
                received_at: self.received_at,
                published_at: self.published_at,
            },
            self.settle,
        )
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("attempt", &self.attempt)
            .field("position", &self.position)
            .field("source", &self.source)
            .finish()
    }
}

/// The data part of a [`Delivery`].
#[derive(Debug, Clone)]
pub struct DeliveryInfo {
    /// The envelope.
    pub message: Message,
    /// Attempt number (1-based).
    pub attempt: u32,
    /// Broker position.
    pub position: Position,
    /// Source destination.
    pub source: String,
    /// Receive time.
    pub received_at: SystemTime,
    /// When the broker stored it, where the broker tells (see [`Delivery::published_at`]).
    pub published_at: Option<SystemTime>,
}

impl DeliveryInfo {
    /// How old the message was when this process received it (see [`Delivery::age`]).
    pub fn age(&self) -> Option<Duration> {
        message_age(self.published_at, self.received_at)
    }
}

fn message_age(published_at: Option<SystemTime>, received_at: SystemTime) -> Option<Duration> {
    published_at.map(|p| received_at.duration_since(p).unwrap_or_default())
}
