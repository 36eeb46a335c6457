//! Handlers, their errors and the per-message context.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BoxError;
use crate::{AfterCommit, DeliveryClient, Message, MessageId, Position, Result};

/// How a handler failed, which decides what the consume loop does with the message.
///
/// Any error type converts into [`HandlerError::Retryable`] with `?`.
pub enum HandlerError {
    /// Try again later (backoff), dead-letter after the retry policy's max attempts.
    Retryable(BoxError),
    /// Never going to work (bad data): dead-letter now.
    Permanent(BoxError),
    /// Not a failure of this message (e.g. another worker holds its idempotency lease, or the
    /// idempotency store is down): redeliver after `after`, never dead-letter for it.
    Defer {
        /// Redelivery delay.
        after: Duration,
        /// Why (for logs).
        reason: String,
    },
}

impl HandlerError {
    /// A retryable error.
    pub fn retryable(e: impl Into<BoxError>) -> Self {
        HandlerError::Retryable(e.into())
    }

    /// A permanent error (dead-letter now).
    pub fn permanent(e: impl Into<BoxError>) -> Self {
        HandlerError::Permanent(e.into())
    }

    /// Defer the message without counting it as a failure.
    pub fn defer(after: Duration, reason: impl Into<String>) -> Self {
        HandlerError::Defer {
            after,
            reason: reason.into(),
        }
    }

    /// Short name of the variant.
    pub fn kind(&self) -> &'static str {
        match self {
            HandlerError::Retryable(_) => "retryable",
            HandlerError::Permanent(_) => "permanent",
            HandlerError::Defer { .. } => "defer",
        }
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::Retryable(e.into())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerError::Retryable(e) => write!(f, "retryable: {e}"),
            HandlerError::Permanent(e) => write!(f, "permanent: {e}"),
            HandlerError::Defer { after, reason } => write!(f, "deferred for {after:?}: {reason}"),
        }
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A message a handler publishes through its [`Context`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outgoing {
    /// Destination.
    pub destination: String,
    /// The message.
    pub message: Message,
}

/// Per-delivery context handed to a handler.
///
/// Messages published with [`Context::publish`] are staged and published by the consume loop
/// only after the handler succeeded: atomically with the consumed position where the backend has
/// transactions (Kafka exactly-once), otherwise confirmed before the input is acknowledged.
pub struct Context {
    attempt: u32,
    source: String,
    message_id: MessageId,
    outputs: Vec<Outgoing>,
    result: Option<Bytes>,
    client: Option<Arc<dyn DeliveryClient>>,
    atomic_outputs: bool,
    trace_id: Option<String>,
    position: Position,
    after_commit: AfterCommit,
    duplicate: bool,
    skipped: bool,
    waited: Option<Duration>,
}

impl Context {
    /// A context for a delivery (used by the consume loop and by tests of handlers).
    pub fn new(message_id: MessageId, attempt: u32, source: impl Into<String>) -> Self {
        Context {
            attempt,
            source: source.into(),
            message_id,
            outputs: Vec::new(),
            result: None,
            client: None,
            atomic_outputs: false,
            trace_id: None,
            position: Position::Unknown,
            after_commit: AfterCommit::default(),
            duplicate: false,
            skipped: false,
            waited: None,
        }
    }

    /// Mark this delivery as a duplicate of an id already completed, acknowledged without
    /// running the handler (the idempotent layer calls it; counted in
    /// [`ConsumerStats::duplicates_absorbed`](crate::ConsumerStats) instead of `handled`).
    pub fn absorb_duplicate(&mut self) {
        self.duplicate = true;
    }

    /// Whether [`Context::absorb_duplicate`] was called.
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }

    /// At-most-once: the layer skipped an id this process had already taken.
    pub(crate) fn skip(&mut self) {
        self.skipped = true;
    }

    pub(crate) fn was_skipped(&self) -> bool {
        self.skipped
    }

    /// At-most-once: the layer held the message until its not-before time.
    pub(crate) fn wait(&mut self, d: Duration) {
        self.waited = Some(d);
    }

    pub(crate) fn waited(&self) -> Option<Duration> {
        self.waited
    }

    /// Where the delivery sits on the broker (for tests of handlers: the consume loop sets it).
    pub fn with_position(mut self, position: Position) -> Self {
        self.position = position;
        self
    }

    /// A context whose staged outputs commit with the consumed position after the handler
    /// returns, as on Kafka exactly-once (for tests of handlers and layers; the consume loop sets
    /// it from the backend).
    pub fn committing_atomically(mut self) -> Self {
        self.atomic_outputs = true;
        self
    }

    /// Where the delivery being handled sits on the broker (partition and offset on Kafka).
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// Whether the backend commits the staged outputs together with the consumed position, in
    /// one broker transaction (Kafka exactly-once), after the handler returns. Then
    /// [`Context::flush`] publishes nothing, and whatever must wait for that commit goes in
    /// [`Context::after_commit`].
    pub fn commits_atomically(&self) -> bool {
        self.atomic_outputs
    }

    /// Run `step` once this delivery's outputs and acknowledgement are final, with whether they
    /// were committed. Where [`Context::commits_atomically`] is true that is after the broker
    /// transaction holding them ended (the idempotent layer completes its key there); elsewhere
    /// right after the acknowledgement. After a failed handler run, `step` gets `false`.
    pub fn after_commit<F, Fut>(&mut self, step: F)
    where
        F: FnOnce(bool) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.after_commit
            .push(Box::new(move |committed| Box::pin(step(committed))));
    }

    /// Take the steps added with [`Context::after_commit`] (leaves none).
    pub fn take_after_commit(&mut self) -> AfterCommit {
        std::mem::take(&mut self.after_commit)
    }

    /// Continue the trace of the input message (its `traceparent` header).
    pub fn with_traceparent(mut self, traceparent: Option<&str>) -> Self {
        self.trace_id = traceparent
            .and_then(|tp| tp.split('-').nth(1))
            .filter(|t| t.len() == 32)
            .map(str::to_owned);
        self
    }

    /// The trace id this delivery belongs to.
    pub fn trace_id(&self) -> Option<&str> {
        self.trace_id.as_deref()
    }

    pub(crate) fn with_publisher(mut self, client: Arc<dyn DeliveryClient>, atomic: bool) -> Self {
        self.client = Some(client);
        self.atomic_outputs = atomic;
        self
    }

    /// Attempt number of the delivery being handled (1-based).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Destination the message was consumed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A deterministic id derived from the input message id: give outputs such ids so that a
    /// re-run of the handler after a redelivery publishes the *same* ids, which downstream dedup
    /// absorbs.
    pub fn derive_id(&self, suffix: &str) -> MessageId {
        MessageId::from_string(format!("{}/{}", self.message_id, suffix))
    }

    /// Stage a message to publish when the handler succeeds. It inherits the input's trace (a
    /// `traceparent` with the same trace id) unless it carries its own.
    pub fn publish(&mut self, destination: impl Into<String>, mut message: Message) {
        // With OpenTelemetry (feature `otel`), an output is a child of the handler's span.
        #[cfg(feature = "otel")]
        if let Some(tp) = crate::otel::traceparent(&tracing::Span::current()) {
            message
                .headers
                .entry(crate::header::TRACEPARENT.to_owned())
                .or_insert(tp);
        }
        if let Some(trace) = &self.trace_id {
            message
                .headers
                .entry(crate::header::TRACEPARENT.to_owned())
                .or_insert_with(|| format!("00-{trace}-{:016x}-01", fastrand::u64(1..)));
        }
        self.outputs.push(Outgoing {
            destination: destination.into(),
            message,
        });
    }

    /// Staged outputs.
    pub fn outputs(&self) -> &[Outgoing] {
        &self.outputs
    }

    /// Take the staged outputs (leaves none).
    pub fn take_outputs(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outputs)
    }

    /// Publish staged outputs now, unless the backend commits them atomically with the ack (then
    /// they stay staged). The idempotent layer calls this before it records a key as completed,
    /// so a completed key always has its outputs published.
    pub async fn flush(&mut self) -> Result<()> {
        if self.atomic_outputs || self.outputs.is_empty() {
            return Ok(());
        }
        let Some(client) = self.client.clone() else {
            return Ok(());
        };
        while let Some(out) = self.outputs.first().cloned() {
            client.publish(&out.destination, out.message).await?;
            self.outputs.remove(0);
        }
        Ok(())
    }

    /// Attach a result value (the idempotency layer stores it with the completed key).
    pub fn set_result(&mut self, value: impl Into<Bytes>) {
        self.result = Some(value.into());
    }

    /// The result value, if the handler set one.
    pub fn result(&self) -> Option<&Bytes> {
        self.result.as_ref()
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("message_id", &self.message_id)
            .field("attempt", &self.attempt)
            .field("source", &self.source)
            .field("outputs", &self.outputs.len())
            .finish()
    }
}

/// Handles one message at a time.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Process `message`. Return `Ok` only when its effects are done.
    async fn handle(&self, message: &Message, cx: &mut Context) -> Result<(), HandlerError>;

    /// Whether this handler absorbs duplicate deliveries itself (the idempotent layer says yes).
    /// The consume loop refuses exactly-once with a handler that does not, unless the backend
    /// commits outputs transactionally.
    fn is_idempotent(&self) -> bool {
        false
    }

    /// Called by the consume loop (at-least-once and exactly-once) with the deliveries it
    /// received together, before it hands them to [`handle`](Self::handle) one by one: a layer
    /// can do its per-message set-up for all of them in one step (the idempotent layer claims
    /// their keys in one store round trip). Default: nothing.
    ///
    /// Purely an optimisation: `handle` must be correct for a message that was never prepared.
    /// Every prepared message is later passed to `handle`, or to [`abandon`](Self::abandon)
    /// when the consumer stops before handing it over.
    async fn prepare(&self, messages: &[&Message]) {
        let _ = messages;
    }

    /// Prepared messages the consume loop will not hand to `handle` (it is shutting down; the
    /// broker redelivers them): undo what [`prepare`](Self::prepare) did. Default: nothing.
    async fn abandon(&self, messages: &[&Message]) {
        let _ = messages;
    }
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Arc<H> {
    async fn handle(&self, message: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        (**self).handle(message, cx).await
    }

    fn is_idempotent(&self) -> bool {
        (**self).is_idempotent()
    }

    async fn prepare(&self, messages: &[&Message]) {
        (**self).prepare(messages).await
    }

    async fn abandon(&self, messages: &[&Message]) {
        (**self).abandon(messages).await
    }
}

/// Handles a batch of messages at once; the whole batch is settled together.
#[async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    /// Process all of `messages`. `Ok` settles every one of them; an error settles none of them
    /// as done (they are retried or dead-lettered per the retry policy).
    async fn handle_batch(
        &self,
        messages: &[Message],
        cx: &mut Context,
    ) -> Result<(), HandlerError>;
}

/// A handler made from an async closure over an owned message.
pub struct HandlerFn<F>(F);

/// Build a [`Handler`] from `|message: Message| async move { ... }`.
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    HandlerFn(f)
}

#[async_trait]
impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, message: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        (self.0)(message.clone()).await
    }
}

/// A batch handler made from an async closure over owned messages.
pub struct BatchHandlerFn<F>(F);

/// Build a [`BatchHandler`] from `|messages: Vec<Message>| async move { ... }`.
pub fn batch_handler_fn<F, Fut>(f: F) -> BatchHandlerFn<F>
where
    F: Fn(Vec<Message>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    BatchHandlerFn(f)
}

#[async_trait]
impl<F, Fut> BatchHandler for BatchHandlerFn<F>
where
    F: Fn(Vec<Message>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle_batch(
        &self,
        messages: &[Message],
        _cx: &mut Context,
    ) -> Result<(), HandlerError> {
        (self.0)(messages.to_vec()).await
    }
}
