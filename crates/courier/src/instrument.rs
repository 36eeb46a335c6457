//! Tracing spans, metrics and W3C trace-context propagation around any backend.
//!
//! [`crate::connect`] wraps every client in [`Instrumented`], so each backend gets the same
//! observability without code of its own:
//!
//! | span | fields |
//! |---|---|
//! | `courier.publish` | backend, destination, message_id, trace_id |
//! | `courier.receive` (event) | backend, destination, message_id, attempt |
//! | `courier.handle`, `courier.retry`, `courier.dead_letter` (consume loop) | message_id, destination, attempt |
//! | `courier.settle` | backend, destination, message_id, op (ack / nack / dead_letter) |
//!
//! Metrics (through the `metrics` facade; plug in any exporter): `courier_published_total`,
//! `courier_publish_errors_total`, `courier_delivered_total`, `courier_redelivered_total`,
//! `courier_settled_total{op}`, and from the consume loop `courier_handled_total`,
//! `courier_handler_errors_total`, `courier_retried_total`, `courier_deferred_total`,
//! `courier_dead_lettered_total`, `courier_dropped_total`, `courier_in_flight`,
//! `courier_handler_seconds`; from the idempotent layer `courier_duplicates_absorbed_total` and
//! friends; from the outbox `courier_outbox_*`.

use std::time::Duration;

use async_trait::async_trait;
use tracing::{info_span, Instrument};

use courier_core::{
    header, AfterCommit, Capabilities, DeadLetter, Deliveries, Delivery, DeliveryClient,
    DeliveryStream, DestinationInfo, Explanation, Guarantee, Message, Outgoing, Receipt, Result,
    Settle, Subscription,
};

/// A new W3C `traceparent` value with a random trace id and span id.
pub fn new_traceparent() -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        fastrand::u128(1..),
        fastrand::u64(1..)
    )
}

/// The trace id of a `traceparent` value, if it is well formed.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_v, t) = (parts.next()?, parts.next()?);
    (t.len() == 32 && t.chars().all(|c| c.is_ascii_hexdigit())).then_some(t)
}

/// The message's `traceparent`, set first when it has none: with OpenTelemetry (feature `otel`)
/// from `span`'s context, so the consumer's handler span becomes its child; otherwise a fresh
/// one.
fn ensure_traceparent(m: &mut Message, span: &tracing::Span) -> String {
    #[cfg(feature = "otel")]
    if !m.headers.contains_key(header::TRACEPARENT) {
        if let Some(tp) = courier_core::otel::traceparent(span) {
            m.headers.insert(header::TRACEPARENT.to_owned(), tp);
        }
    }
    #[cfg(not(feature = "otel"))]
    let _ = span;
    m.headers
        .entry(header::TRACEPARENT.to_owned())
        .or_insert_with(new_traceparent)
        .clone()
}

/// A client wrapped with spans, metrics and trace-context propagation.
///
/// A published message without a `traceparent` header gets a fresh one when courier's spans are
/// recorded (a `tracing` subscriber enables `courier.publish` at INFO); with tracing off, no
/// trace header is added, so messages are not made 70 bytes larger for a trace nobody reads.
/// A `traceparent` the application set is always kept.
pub struct Instrumented {
    inner: Box<dyn DeliveryClient>,
}

impl Instrumented {
    /// Wrap `inner`.
    pub fn new(inner: Box<dyn DeliveryClient>) -> Self {
        Instrumented { inner }
    }
}

impl std::fmt::Debug for Instrumented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instrumented")
            .field("backend", &self.inner.backend())
            .finish()
    }
}

#[async_trait]
impl DeliveryClient for Instrumented {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn guarantee(&self) -> Guarantee {
        self.inner.guarantee()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn explain(&self) -> Explanation {
        self.inner.explain()
    }

    async fn create_destination(&self, destination: &str) -> Result<()> {
        self.inner.create_destination(destination).await
    }

    async fn declare_subscription(&self, subscription: &Subscription) -> Result<()> {
        self.inner.declare_subscription(subscription).await
    }

    async fn inspect(&self, destination: &str, groups: &[&str]) -> Result<DestinationInfo> {
        self.inner.inspect(destination, groups).await
    }

    async fn delete_destination(&self, destination: &str, groups: &[&str]) -> Result<Vec<String>> {
        self.inner.delete_destination(destination, groups).await
    }

    async fn publish(&self, destination: &str, mut message: Message) -> Result<Receipt> {
        let backend = self.inner.backend();
        let span = info_span!("courier.publish", backend, destination, message_id = %message.id, trace_id = tracing::field::Empty);
        if !span.is_disabled() {
            let tp = ensure_traceparent(&mut message, &span);
            span.record("trace_id", trace_id(&tp).unwrap_or(""));
        }
        let r = self
            .inner
            .publish(destination, message)
            .instrument(span)
            .await;
        count_publish(backend, destination, &r, 1);
        r
    }

    async fn publish_batch(
        &self,
        destination: &str,
        mut messages: Vec<Message>,
    ) -> Result<Vec<Receipt>> {
        let backend = self.inner.backend();
        let n = messages.len() as u64;
        let span = info_span!("courier.publish_batch", backend, destination, size = n);
        if !span.is_disabled() {
            for m in &mut messages {
                ensure_traceparent(m, &span);
            }
        }
        let r = self
            .inner
            .publish_batch(destination, messages)
            .instrument(span)
            .await;
        count_publish(backend, destination, &r, n);
        r
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries> {
        let destination = subscription.destination.clone();
        let inner = self.inner.subscribe(subscription).await?;
        Ok(Deliveries::new(Box::new(InstrumentedStream {
            inner,
            metrics: std::sync::Arc::new(StreamMetrics::new(self.inner.backend(), &destination)),
        })))
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

fn count_publish<T>(backend: &'static str, destination: &str, r: &Result<T>, n: u64) {
    match r {
        Ok(_) => metrics::counter!("courier_published_total", "backend" => backend, "destination" => destination.to_owned()).increment(n),
        Err(e) => metrics::counter!("courier_publish_errors_total", "backend" => backend, "destination" => destination.to_owned(), "kind" => e.kind()).increment(n),
    }
}

/// Counter handles of one subscription, registered once (not per message).
struct StreamMetrics {
    backend: &'static str,
    destination: std::sync::Arc<str>,
    delivered: metrics::Counter,
    redelivered: metrics::Counter,
    ack: metrics::Counter,
    nack: metrics::Counter,
    dead_letter: metrics::Counter,
}

impl StreamMetrics {
    fn new(backend: &'static str, destination: &str) -> Self {
        let settled = |op: &'static str| metrics::counter!("courier_settled_total", "backend" => backend, "destination" => destination.to_owned(), "op" => op);
        StreamMetrics {
            backend,
            destination: destination.into(),
            delivered: metrics::counter!("courier_delivered_total", "backend" => backend, "destination" => destination.to_owned()),
            redelivered: metrics::counter!("courier_redelivered_total", "backend" => backend, "destination" => destination.to_owned()),
            ack: settled("ack"),
            nack: settled("nack"),
            dead_letter: settled("dead_letter"),
        }
    }
}

struct InstrumentedStream {
    inner: Deliveries,
    metrics: std::sync::Arc<StreamMetrics>,
}

#[async_trait]
impl DeliveryStream for InstrumentedStream {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let d = match self.inner.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        let (info, settle) = d.into_parts();
        let m = &self.metrics;
        m.delivered.increment(1);
        if info.attempt > 1 {
            m.redelivered.increment(1);
        }
        tracing::debug!(
            name: "courier.receive",
            backend = m.backend,
            destination = %m.destination,
            message_id = %info.message.id,
            attempt = info.attempt,
            "received"
        );
        let settle = InstrumentedSettle {
            inner: settle,
            metrics: m.clone(),
            message_id: info.message.id.clone(),
        };
        Some(Ok(Delivery::from_parts(info, Box::new(settle))))
    }

    async fn close(self: Box<Self>) -> Result<()> {
        self.inner.close().await
    }
}

struct InstrumentedSettle {
    inner: Box<dyn Settle>,
    metrics: std::sync::Arc<StreamMetrics>,
    message_id: courier_core::MessageId,
}

impl InstrumentedSettle {
    fn span(&self, op: &'static str) -> tracing::Span {
        info_span!("courier.settle", backend = self.metrics.backend, destination = %self.metrics.destination, message_id = %self.message_id, op)
    }
}

#[async_trait]
impl Settle for InstrumentedSettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        let span = self.span("ack");
        self.metrics.ack.increment(1);
        self.inner.ack().instrument(span).await
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        let span = self.span("nack");
        self.metrics.nack.increment(1);
        self.inner.nack(delay).instrument(span).await
    }

    async fn defer(self: Box<Self>, delay: Duration) -> Result<()> {
        // Counted by the consume loop (`courier_deferred_total`).
        let span = self.span("defer");
        self.inner.defer(delay).instrument(span).await
    }

    async fn dead_letter(self: Box<Self>, message: &Message, why: DeadLetter) -> Result<()> {
        let span = self.span("dead_letter");
        self.metrics.dead_letter.increment(1);
        self.inner.dead_letter(message, why).instrument(span).await
    }

    fn atomic_outputs(&self) -> bool {
        self.inner.atomic_outputs()
    }

    fn publishes_outputs(&self) -> bool {
        self.inner.publishes_outputs()
    }

    async fn ack_with_outputs(
        self: Box<Self>,
        outputs: Vec<Outgoing>,
        after: AfterCommit,
    ) -> Result<()> {
        let span = self.span("ack_with_outputs");
        self.metrics.ack.increment(1);
        self.inner
            .ack_with_outputs(outputs, after)
            .instrument(span)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_shape() {
        let tp = new_traceparent();
        assert_eq!(tp.len(), 55, "{tp}");
        assert!(trace_id(&tp).is_some());
        assert_eq!(trace_id("garbage"), None);
    }
}
