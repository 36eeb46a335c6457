//! Consuming: a background task per subscription that (re)subscribes after connection loss and
//! forwards deliveries through a channel (so `next()` is cancel safe), and the settle operations.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use courier_core::{
    header, DeadLetter, Delivery, DeliveryStream, Error, Guarantee, Headers, Message, MessageId,
    Position, Result, Settle, Subscription,
};

use crate::client::{header_str, Outbound, RabbitMqClient};
use crate::connection::{bounded, close_channel, within, Link, Watched};

pub(crate) struct RabbitStream {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Ctx {
    link: Arc<Link>,
    guarantee: Guarantee,
    sub: Subscription,
    queue: String,
    dlx: String,
}

impl Ctx {
    /// Bound on one broker round trip of the consumer (`operation_timeout`).
    fn op(&self) -> Duration {
        self.link.op()
    }
}

impl RabbitStream {
    pub(crate) async fn start(
        link: Arc<Link>,
        guarantee: Guarantee,
        sub: Subscription,
        queue: String,
        dlx: String,
    ) -> Result<Self> {
        let ctx = Arc::new(Ctx {
            link,
            guarantee,
            sub,
            queue,
            dlx,
        });
        // Subscribe once up front so errors (missing queue, access) surface from subscribe().
        let first = open_consumer(&ctx).await?;
        let (tx, rx) = mpsc::channel(1);
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(ctx, first, tx, stop_rx));
        Ok(RabbitStream {
            rx,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }
}

async fn open_consumer(ctx: &Ctx) -> Result<(Watched, lapin::Consumer)> {
    let w = ctx.link.new_channel().await?;
    match subscribe_on(ctx, &w).await {
        Ok(consumer) => Ok((w, consumer)),
        Err(e) => {
            close_channel(&w.channel, ctx.op(), "subscribe failed").await;
            Err(e)
        }
    }
}

async fn subscribe_on(ctx: &Ctx, w: &Watched) -> Result<lapin::Consumer> {
    let ch = &w.channel;
    let prefetch = effective_prefetch(ctx);
    bounded(
        ctx.op(),
        &w.lost,
        "basic.qos",
        ch.basic_qos(prefetch, BasicQosOptions::default()),
    )
    .await?;
    let opts = BasicConsumeOptions {
        no_ack: crate::settings::no_ack(ctx.guarantee),
        ..BasicConsumeOptions::default()
    };
    let tag = format!("courier-{:x}", fastrand_u64());
    bounded(
        ctx.op(),
        &w.lost,
        "basic.consume",
        ch.basic_consume(
            ctx.queue.as_str().into(),
            tag.as_str().into(),
            opts,
            FieldTable::default(),
        ),
    )
    .await
}

/// The `basic.qos` prefetch: the subscription's if it sets one, else the backend config's.
fn effective_prefetch(ctx: &Ctx) -> u16 {
    ctx.sub.prefetch.unwrap_or(ctx.link.config.prefetch).max(1)
}

fn fastrand_u64() -> u64 {
    let mut h = DefaultHasher::new();
    std::time::SystemTime::now().hash(&mut h);
    std::thread::current().id().hash(&mut h);
    h.finish()
}

/// On `close`: cancel the consumer, then close its channel, so the broker requeues what it had
/// handed over and nobody settled.
async fn cancel_and_close(
    ctx: &Ctx,
    ch: &lapin::Channel,
    lost: &tokio_util::sync::CancellationToken,
    consumer: &lapin::Consumer,
) {
    let _ = within(
        ctx.op(),
        lost,
        "basic.cancel",
        ch.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
    )
    .await;
    close_channel(ch, ctx.op(), "closed").await;
}

async fn run(
    ctx: Arc<Ctx>,
    first: (Watched, lapin::Consumer),
    tx: mpsc::Sender<Result<Delivery>>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut current = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let (Watched { channel: ch, lost }, mut consumer) = match current.take() {
            Some(c) => c,
            None => match open_consumer(&ctx).await {
                Ok(c) => {
                    backoff = Duration::from_millis(100);
                    c
                }
                Err(e) => {
                    warn!(queue = %ctx.queue, error = %e, "resubscribing failed; retrying");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        loop {
            let item = tokio::select! {
                _ = &mut stop => {
                    cancel_and_close(&ctx, &ch, &lost, &consumer).await;
                    return;
                }
                _ = tx.closed() => {
                    // The subscriber went away without closing: close the channel so the broker
                    // redelivers whatever it had handed us.
                    close_channel(&ch, ctx.op(), "dropped").await;
                    return;
                }
                _ = lost.cancelled() => {
                    debug!(queue = %ctx.queue, "connection lost; resubscribing");
                    break;
                }
                item = consumer.next() => item,
            };
            match item {
                Some(Ok(d)) => {
                    let (delivery, has_id) = convert(&ctx, &ch, &lost, d);
                    if !has_id && ctx.guarantee == Guarantee::ExactlyOnce {
                        let (info, settle) = delivery.into_parts();
                        warn!(queue = %ctx.queue, "a message without message_id is dead-lettered: {NO_ID}");
                        let why = DeadLetter {
                            reason: NO_ID.to_owned(),
                            attempts: info.attempt,
                        };
                        if let Err(e) = settle.dead_letter(&info.message, why).await {
                            warn!(queue = %ctx.queue, error = %e, "dead-lettering a message without message_id failed; it is delivered again");
                        }
                        continue;
                    }
                    // Race the hand-off with the stop signal: a subscriber that stopped reading
                    // must not hold `close` until its deadline. The delivery not handed off is
                    // requeued with the channel. Guarded by the conformance scenario
                    // `close_returns_promptly_with_deliveries_waiting`.
                    let handed = tokio::select! {
                        r = tx.send(Ok(delivery)) => r.is_ok(),
                        _ = &mut stop => {
                            cancel_and_close(&ctx, &ch, &lost, &consumer).await;
                            return;
                        }
                    };
                    if !handed {
                        close_channel(&ch, ctx.op(), "dropped").await;
                        return;
                    }
                }
                Some(Err(e)) => {
                    debug!(queue = %ctx.queue, error = %e, "consumer stream error; resubscribing");
                    break;
                }
                None => {
                    debug!(queue = %ctx.queue, "consumer stream ended; resubscribing");
                    break;
                }
            }
        }
        if !lost.is_cancelled() {
            // The channel failed on a live connection: close it so the broker requeues what it
            // had handed us. (A lost connection took its channels with it.)
            close_channel(&ch, ctx.op(), "resubscribe").await;
        }
    }
}

/// The id of a message published without `message_id` (by another client): AMQP gives a message
/// nothing stable to tell two publishes of the same body apart, nor one message's redeliveries
/// from each other, so it gets a fresh id per delivery. Exactly-once refuses such messages (see
/// `NO_ID`); under the other guarantees the id is only a label. Guarded by
/// `tests/interop.rs::pika_messages_without_an_id`.
fn fallback_id() -> MessageId {
    MessageId::from_string(format!("amqp-{}", MessageId::new()))
}

/// Why an exactly-once subscription dead-letters a message without `message_id`.
const NO_ID: &str = "exactly-once needs a message id to recognise redeliveries, and this message has no AMQP message_id property: publish it with message_id set (courier does)";

fn convert(
    ctx: &Arc<Ctx>,
    ch: &lapin::Channel,
    lost: &CancellationToken,
    d: lapin::message::Delivery,
) -> (Delivery, bool) {
    let mut headers = Headers::new();
    let mut key = None;
    let mut courier_attempt = None;
    let mut delivery_count = 0u32;
    if let Some(table) = d.properties.headers() {
        for (k, v) in table.inner() {
            let name = k.as_str();
            match name {
                "courier-key" => key = header_str(v),
                h if h == header::ATTEMPT => {
                    courier_attempt = header_str(v).and_then(|s| s.parse::<u32>().ok())
                }
                "x-delivery-count" => {
                    delivery_count = header_str(v).and_then(|s| s.parse().ok()).unwrap_or(0)
                }
                // Broker bookkeeping, not application headers.
                "x-death"
                | "x-first-death-exchange"
                | "x-first-death-queue"
                | "x-first-death-reason"
                | "x-last-death-exchange"
                | "x-last-death-queue"
                | "x-last-death-reason"
                | "x-received-from" => {}
                _ => {
                    if let Some(s) = header_str(v) {
                        headers.insert(name.to_owned(), s);
                    }
                }
            }
        }
    }
    // A foreign producer's AMQP content type (pika's `content_type="application/json"`) is the
    // message's, unless it carries courier's header.
    if let Some(ct) = d.properties.content_type() {
        if ct.as_str() != "application/octet-stream" {
            headers
                .entry(header::CONTENT_TYPE.to_owned())
                .or_insert_with(|| ct.as_str().to_owned());
        }
    }
    let id = d
        .properties
        .message_id()
        .as_ref()
        .map(|s| MessageId::from_string(s.as_str()));
    let has_id = id.is_some();
    let id = id.unwrap_or_else(fallback_id);
    let redeliveries = if delivery_count > 0 {
        delivery_count
    } else {
        u32::from(d.redelivered)
    };
    let attempt = courier_attempt.unwrap_or(1) + redeliveries;
    let message = Message {
        id,
        key,
        headers,
        payload: d.data.into(),
    };
    let settle = RabbitSettle {
        ctx: ctx.clone(),
        acker: d.acker,
        channel: ch.clone(),
        lost: lost.clone(),
        message: message.clone(),
        attempt,
    };
    let delivery = Delivery::new(
        message,
        attempt,
        Position::DeliveryTag(d.delivery_tag),
        ctx.sub.destination.clone(),
        Box::new(settle),
    )
    .with_published_at(
        d.properties
            .timestamp()
            .map(|secs| std::time::UNIX_EPOCH + Duration::from_secs(secs)),
    );
    (delivery, has_id)
}

#[async_trait]
impl DeliveryStream for RabbitStream {
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
        Ok(())
    }
}

struct RabbitSettle {
    ctx: Arc<Ctx>,
    acker: lapin::Acker,
    channel: lapin::Channel,
    /// Fires when the connection the delivery arrived on is lost.
    lost: CancellationToken,
    message: Message,
    attempt: u32,
}

impl RabbitSettle {
    fn expired(&self, e: impl std::fmt::Display) -> Error {
        Error::DeliveryExpired {
            message_id: self.message.id.to_string(),
            reason: format!("the channel it arrived on is gone ({e}); the broker redelivers it"),
        }
    }

    async fn ack_now(&self) -> Result<()> {
        if self.ctx.guarantee == Guarantee::AtMostOnce {
            return Ok(()); // no_ack: settled on delivery
        }
        if !self.channel.status().connected() {
            return Err(self.expired("channel closed"));
        }
        let acked = within(
            self.ctx.op(),
            &self.lost,
            "basic.ack",
            self.acker.ack(BasicAckOptions::default()),
        )
        .await;
        self.settled(acked)
    }

    /// The outcome of an ack or nack: lapin answers `Ok(false)` when the channel ended before
    /// the settle could be sent — that is not a settle, the broker redelivers the message.
    fn settled(&self, outcome: Result<lapin::Result<bool>>) -> Result<()> {
        match outcome {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(self.expired("channel ended before the settle was sent")),
            Ok(Err(e)) => Err(self.expired(e)),
            Err(e) => {
                if matches!(e, Error::Timeout { .. }) {
                    // No answer on a connection that still looks up: close the channel, so the
                    // broker requeues this delivery (and the channel's others) instead of
                    // holding them unacknowledged; the consumer resubscribes.
                    let (ch, limit) = (self.channel.clone(), self.ctx.op());
                    tokio::spawn(async move { close_channel(&ch, limit, "settle timeout").await });
                }
                Err(self.expired(e))
            }
        }
    }

    /// Park a copy carrying `attempt` in the delay queue of the delay's step (confirmed), then
    /// settle the original.
    async fn park(self: Box<Self>, delay: Duration, attempt: u32) -> Result<()> {
        let client = self.client();
        let queue = client
            .declare_delay_queue(&self.ctx.queue, crate::names::delay_step(delay))
            .await?;
        let out = Outbound {
            message: self.message.clone(),
            attempt: Some(attempt),
        };
        client.send("", Some(&queue), &[out]).await?;
        self.ack_now().await
    }

    fn client(&self) -> RabbitMqClient {
        RabbitMqClient::from_link(self.ctx.link.clone(), self.ctx.guarantee)
    }
}

#[async_trait]
impl Settle for RabbitSettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.ack_now().await
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        if self.ctx.guarantee == Guarantee::AtMostOnce {
            return Ok(());
        }
        if delay.is_zero() {
            let nacked = within(
                self.ctx.op(),
                &self.lost,
                "basic.nack",
                self.acker.nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                }),
            )
            .await;
            return self.settled(nacked);
        }
        let attempt = self.attempt + 1;
        self.park(delay, attempt).await
    }

    /// A new message in the delay queue with the *same* attempt number: neither courier's retry
    /// budget nor the quorum queue's delivery count moves (conformance scenario
    /// `deferrals_never_dead_letter`).
    async fn defer(self: Box<Self>, delay: Duration) -> Result<()> {
        if self.ctx.guarantee == Guarantee::AtMostOnce {
            return Ok(());
        }
        let attempt = self.attempt;
        // The longest delay step that does not overshoot: a message deferred until its
        // not-before time comes back at most that early and is deferred for the rest.
        let step = crate::names::delay_step_at_most(delay);
        self.park(Duration::from_millis(step), attempt).await
    }

    async fn dead_letter(self: Box<Self>, message: &Message, why: DeadLetter) -> Result<()> {
        let m = why.stamp(message, &self.ctx.sub.destination);
        self.client()
            .send(&self.ctx.dlx, None, &[Outbound::plain(m)])
            .await?;
        self.ack_now().await
    }
}
