//! Connection management, topology and publishing.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use tracing::{debug, warn};

use crate::RabbitMqConfig;
use courier_core::{
    check_payload, header, Capabilities, Deliveries, DeliveryClient, DestinationInfo, Error,
    Explanation, GroupInfo, Guarantee, Message, Position, Receipt, Result, Subscription,
};

use crate::connection::*;
use crate::names::*;
use crate::{settings, BACKEND};

/// Publish attempts before a confirmed publish gives up.
const PUBLISH_ATTEMPTS: u32 = 8;

/// A courier client of one RabbitMQ broker (or cluster endpoint) with one guarantee.
pub struct RabbitMqClient {
    pub(crate) link: Arc<Link>,
    guarantee: Guarantee,
}

impl fmt::Debug for RabbitMqClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqClient")
            .field("url", &self.link.config.url)
            .field("guarantee", &self.guarantee)
            .finish()
    }
}

fn durable() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// A message to send, with what courier adds on the way.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    pub(crate) message: Message,
    pub(crate) attempt: Option<u32>,
}

impl Outbound {
    pub(crate) fn plain(message: Message) -> Self {
        Outbound {
            message,
            attempt: None,
        }
    }
}

pub(crate) fn properties(m: &Message, delivery_mode: u8, attempt: Option<u32>) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in &m.headers {
        headers.insert(
            k.as_str().into(),
            AMQPValue::LongString(LongString::from(v.as_bytes())),
        );
    }
    if let Some(k) = &m.key {
        headers.insert(
            "courier-key".into(),
            AMQPValue::LongString(LongString::from(k.as_bytes())),
        );
    }
    if let Some(a) = attempt {
        headers.insert(
            header::ATTEMPT.into(),
            AMQPValue::LongString(a.to_string().into()),
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    BasicProperties::default()
        .with_message_id(m.id.as_str().into())
        // Read back as `Delivery::published_at` (whole seconds, AMQP's resolution).
        .with_timestamp(now.as_secs())
        .with_delivery_mode(delivery_mode)
        // The AMQP property too, for consumers that are not courier (`Message::json`).
        .with_content_type(
            m.content_type()
                .unwrap_or("application/octet-stream")
                .into(),
        )
        .with_headers(headers)
}

impl RabbitMqClient {
    pub(crate) async fn connect(config: RabbitMqConfig, guarantee: Guarantee) -> Result<Self> {
        let link = Arc::new(Link::new(config));
        link.channel().await?;
        Ok(RabbitMqClient { link, guarantee })
    }

    /// Declare the exchange of a destination (idempotent).
    pub(crate) async fn declare_exchange(&self, name: &str) -> Result<()> {
        let Watched { channel: ch, lost } = self.link.new_channel().await?;
        let op = self.link.declare_timeout();
        bounded(
            op,
            &lost,
            "exchange.declare",
            ch.exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                durable(),
                FieldTable::default(),
            ),
        )
        .await?;
        close_channel(&ch, op, "ok").await;
        Ok(())
    }

    /// Whether the exchange exists (a passive declare on a throw-away channel).
    async fn exchange_exists(&self, name: &str) -> Result<bool> {
        let Watched { channel: ch, lost } = self.link.new_channel().await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..durable()
        };
        let op = self.link.declare_timeout();
        match within(
            op,
            &lost,
            "exchange.declare passive",
            ch.exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            ),
        )
        .await?
        {
            Ok(()) => {
                close_channel(&ch, op, "ok").await;
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(broker_err("exchange.declare passive", e)),
        }
    }

    /// A queue's ready messages and consumers (a passive declare on a throw-away channel);
    /// `None` when it does not exist.
    async fn queue_counts(&self, name: &str) -> Result<Option<(u32, u32)>> {
        let Watched { channel: ch, lost } = self.link.new_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let op = self.link.declare_timeout();
        match within(
            op,
            &lost,
            "queue.declare passive",
            ch.queue_declare(name.into(), passive, FieldTable::default()),
        )
        .await?
        {
            Ok(q) => {
                close_channel(&ch, op, "ok").await;
                Ok(Some((q.message_count(), q.consumer_count())))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(broker_err("queue.declare passive", e)),
        }
    }

    /// Delete a queue if it exists (RabbitMQ answers delete-ok for a missing one, so look first
    /// and say only what was there).
    async fn delete_queue(&self, name: &str) -> Result<bool> {
        if self.queue_counts(name).await?.is_none() {
            return Ok(false);
        }
        let Watched { channel: ch, lost } = self.link.new_channel().await?;
        let op = self.link.declare_timeout();
        bounded(
            op,
            &lost,
            "queue.delete",
            ch.queue_delete(name.into(), QueueDeleteOptions::default()),
        )
        .await?;
        close_channel(&ch, op, "ok").await;
        self.link.delay_queues.lock().remove(name);
        Ok(true)
    }

    /// With `auto_create`, declare the exchange before its first publish by this client (not
    /// before every publish).
    async fn auto_declare(&self, name: &str) -> Result<()> {
        if !self.link.config.auto_create || self.link.declared.lock().contains(name) {
            return Ok(());
        }
        self.declare_exchange(name).await?;
        self.link.declared.lock().insert(name.to_owned());
        Ok(())
    }

    /// Publish `batch` to `destination`'s exchange. With `auto_create`, an exchange deleted since
    /// this client declared it is declared again and the batch sent once more: the broker
    /// refused the first attempt whole (the channel closed with NOT_FOUND), so nothing of it was
    /// routed.
    ///
    /// Everything is checked before anything is sent: the exchange name, and each message's size
    /// and encoding (one bad message refuses the whole batch).
    async fn publish_to(&self, destination: &str, batch: &[Outbound]) -> Result<Vec<Receipt>> {
        check_name("exchange", destination)?;
        for out in batch {
            check_payload(
                BACKEND,
                destination,
                &out.message,
                self.link.config.max_message_bytes,
            )?;
            check_message(destination, &out.message, self.link.frame_max())?;
        }
        self.auto_declare(destination).await?;
        match self.send(destination, None, batch).await {
            Err(Error::DestinationNotFound { .. }) if self.link.config.auto_create => {
                self.link.declared.lock().remove(destination);
                self.auto_declare(destination).await?;
                self.send(destination, None, batch).await
            }
            other => other,
        }
    }

    async fn ensure_exchange(&self, name: &str) -> Result<()> {
        if self.link.config.auto_create {
            return self.declare_exchange(name).await;
        }
        if self.exchange_exists(name).await? {
            Ok(())
        } else {
            Err(not_found(name))
        }
    }

    /// Declare the delay queue of `queue` for `step_ms` (see [`DELAY_STEPS_MS`]): messages wait
    /// there for the queue's TTL, then dead-letter back into `queue` through the default
    /// exchange. Declared once per client; returns its name.
    pub(crate) async fn declare_delay_queue(&self, queue: &str, step_ms: u64) -> Result<String> {
        let name = delay_queue(queue, step_ms);
        if self.link.delay_queues.lock().contains(&name) {
            return Ok(name);
        }
        let Watched { channel: ch, lost } = self.link.new_channel().await?;
        let args = settings::table(&settings::delay_queue(queue, step_ms));
        let opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let declared = bounded(
            self.link.declare_timeout(),
            &lost,
            "queue.declare delay",
            ch.queue_declare(name.as_str().into(), opts, args),
        )
        .await;
        close_channel(&ch, self.link.op(), "ok").await;
        declared?;
        self.link.delay_queues.lock().insert(name.clone());
        Ok(name)
    }

    /// Declare the subscription's work queue and its dead-letter exchange + queue. Callers check
    /// the names first ([`check_subscription`]), before the exchange is declared.
    pub(crate) async fn declare_queues(&self, sub: &Subscription) -> Result<(String, String)> {
        let Watched { channel: ch, lost } = self.link.new_channel().await?;
        let (queue, dlx) = subscription_names(sub);
        let q_opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let op = self.link.declare_timeout();
        // The work queue dead-letters what the broker itself gives up on (a quorum queue's
        // delivery limit) to the subscription's dead-letter exchange, so nothing is dropped.
        // Guarded by `tests/faults.rs::the_broker_dead_letters_a_message_past_the_delivery_limit`.
        let args = settings::table(&settings::work_queue(&self.link.config, &dlx));
        let declared = within(
            op,
            &lost,
            "queue.declare",
            ch.queue_declare(queue.as_str().into(), q_opts, args),
        )
        .await?;
        let ch = match declared {
            Ok(_) => ch,
            // A queue an earlier version declared without these arguments: the broker refuses
            // the new ones (406 PRECONDITION_FAILED) and closes the channel. Use the queue as it
            // is, and say how to get the limit. Guarded by
            // `tests/faults.rs::a_queue_declared_without_the_delivery_limit_is_used_as_it_is`.
            Err(e) if is_precondition_failed(&e) => {
                warn!(queue = %queue, "the queue exists without courier's delivery limit and dead-letter exchange; messages past RabbitMQ's own delivery limit may be dropped. Delete the queue (when empty) to have it declared with them");
                let Watched { channel, .. } = self.link.new_channel().await?;
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                bounded(
                    op,
                    &lost,
                    "queue.declare",
                    channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()),
                )
                .await?;
                channel
            }
            Err(e) => return Err(broker_err("queue.declare", e)),
        };
        within(
            op,
            &lost,
            "queue.bind",
            ch.queue_bind(
                queue.as_str().into(),
                sub.destination.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?
        .map_err(|e| {
            if is_not_found(&e) {
                not_found(&sub.destination)
            } else {
                broker_err("queue.bind", e)
            }
        })?;
        // Dead letters are kept even when nobody consumes the dead-letter destination yet.
        bounded(
            op,
            &lost,
            "exchange.declare dead-letter",
            ch.exchange_declare(
                dlx.as_str().into(),
                ExchangeKind::Topic,
                durable(),
                FieldTable::default(),
            ),
        )
        .await?;
        bounded(
            op,
            &lost,
            "queue.declare dead-letter",
            ch.queue_declare(
                dlx.as_str().into(),
                q_opts,
                settings::table(&settings::dead_letter_queue(&self.link.config)),
            ),
        )
        .await?;
        bounded(
            op,
            &lost,
            "queue.bind dead-letter",
            ch.queue_bind(
                dlx.as_str().into(),
                dlx.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        close_channel(&ch, op, "ok").await;
        Ok((queue, dlx))
    }

    /// Publish `messages` to `exchange` (routing key = key or ""), pipelining confirms.
    pub(crate) async fn send(
        &self,
        exchange: &str,
        routing: Option<&str>,
        messages: &[Outbound],
    ) -> Result<Vec<Receipt>> {
        let publishing = settings::publishing(self.guarantee);
        let mut pending: Vec<usize> = (0..messages.len()).collect();
        let mut receipts: Vec<Option<Receipt>> = vec![None; messages.len()];
        let mut last_err = None;
        for attempt in 0..PUBLISH_ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100u64 << attempt.min(5))).await;
            }
            let Watched { channel: ch, lost } = match self.link.channel().await {
                Ok(w) => w,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            // Send everything, then await the confirms (pipelined).
            let mut confirms = Vec::with_capacity(pending.len());
            let mut failed = Vec::new();
            let mut stuck = false;
            // Each write is bounded by `operation_timeout` and by the connection's life; one
            // timer and one loss waiter serve the whole batch (re-armed per message), not one
            // of each per message.
            let op = self.link.op();
            let deadline = tokio::time::sleep(op);
            tokio::pin!(deadline);
            let gone = lost.cancelled();
            tokio::pin!(gone);
            for (n, &i) in pending.iter().enumerate() {
                let out = &messages[i];
                let m = &out.message;
                let rk = routing.or(m.key.as_deref()).unwrap_or("");
                let opts = BasicPublishOptions {
                    mandatory: publishing.mandatory,
                    ..BasicPublishOptions::default()
                };
                let props = properties(m, publishing.delivery_mode, out.attempt);
                deadline.as_mut().reset(tokio::time::Instant::now() + op);
                let written = tokio::select! {
                    biased;
                    r = ch.basic_publish(exchange.into(), rk.into(), opts, &m.payload, props) => Ok(r),
                    _ = &mut gone => Err(connection_lost("basic.publish")),
                    _ = &mut deadline => {
                        warn!(after = ?op, "no answer from RabbitMQ in time writing a publish; treating the channel as broken");
                        Err(Error::Timeout {
                            operation: "basic.publish".into(),
                            after: op,
                        })
                    }
                };
                match written {
                    Ok(Ok(c)) => confirms.push((i, c)),
                    Ok(Err(e)) if is_not_found(&e) => return Err(not_found(exchange)),
                    // The channel is gone or stuck: the rest would fail the same way.
                    Ok(Err(e)) => {
                        last_err = Some(broker_err("basic.publish", e));
                        failed.extend(&pending[n..]);
                        break;
                    }
                    Err(e) => {
                        last_err = Some(e);
                        failed.extend(&pending[n..]);
                        stuck = true;
                        break;
                    }
                }
            }
            if !publishing.await_confirm {
                for (i, _) in &confirms {
                    receipts[*i] = Some(receipt(&messages[*i].message, exchange));
                }
                if stuck {
                    self.link.discard(&ch).await;
                }
                pending = failed;
                continue;
            }
            let timeout = self.link.config.confirm_timeout;
            let awaited: Vec<usize> = confirms.iter().map(|(i, _)| *i).collect();
            let all = join_all(
                confirms
                    .into_iter()
                    .map(|(i, c)| async move { (i, tokio::time::timeout(timeout, c).await) }),
            );
            // The confirms of a connection that failed never come: stop waiting at once and
            // publish them all again (same ids) on the next connection.
            let results = tokio::select! {
                r = all => r,
                _ = lost.cancelled() => {
                    last_err = Some(connection_lost("publish confirm"));
                    failed.extend(awaited);
                    pending = failed;
                    continue;
                }
            };
            for (i, r) in results {
                let m = &messages[i].message;
                match r {
                    Ok(Ok(Confirmation::Ack(None))) => receipts[i] = Some(receipt(m, exchange)),
                    Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                        return Err(Error::Unroutable {
                            destination: exchange.to_owned(),
                            message_id: m.id.to_string(),
                            reason: format!("{} {}", returned.reply_code, returned.reply_text),
                        })
                    }
                    Ok(Ok(other)) => {
                        debug!(message_id = %m.id, ?other, "publish not confirmed; retrying");
                        last_err = Some(Error::broker(
                            BACKEND,
                            "publish confirm",
                            true,
                            format!("broker answered {other:?}"),
                        ));
                        failed.push(i);
                    }
                    Ok(Err(e)) if is_not_found(&e) => return Err(not_found(exchange)),
                    Ok(Err(e)) => {
                        last_err = Some(broker_err("publish confirm", e));
                        failed.push(i);
                    }
                    Err(_) => {
                        last_err = Some(Error::Timeout {
                            operation: format!("confirm of {}", m.id),
                            after: timeout,
                        });
                        failed.push(i);
                        stuck = true;
                    }
                }
            }
            if stuck {
                // No answer on this channel: publish the rest on a fresh one.
                self.link.discard(&ch).await;
            }
            if !failed.is_empty() {
                warn!(
                    count = failed.len(),
                    "publishes not confirmed; retrying them with the same ids"
                );
            }
            pending = failed;
        }
        if !pending.is_empty() {
            return Err(last_err.unwrap_or(Error::Timeout {
                operation: "publish".into(),
                after: self.link.config.confirm_timeout,
            }));
        }
        Ok(receipts
            .into_iter()
            .map(|r| r.expect("every message confirmed"))
            .collect())
    }
}

fn receipt(m: &Message, destination: &str) -> Receipt {
    Receipt {
        id: m.id.clone(),
        destination: destination.to_owned(),
        position: Position::Unknown,
        deduplicated: false,
    }
}

#[async_trait]
impl DeliveryClient for RabbitMqClient {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn guarantee(&self) -> Guarantee {
        self.guarantee
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::baseline();
        // Competing consumers on one queue interleave; RabbitMQ keeps no per-key order.
        c.ordering_by_key = false;
        c.consumer_groups = true;
        c.max_payload = self.link.config.max_message_bytes;
        c.delayed_redelivery = true;
        c.detects_missing_destination = true;
        c.settle_window = Duration::from_millis(500);
        c.redelivery_after_crash = Duration::from_secs(1);
        c
    }

    fn explain(&self) -> Explanation {
        crate::settings::explain(&self.link.config, self.guarantee)
    }

    async fn create_destination(&self, destination: &str) -> Result<()> {
        check_name("exchange", destination)?;
        self.declare_exchange(destination).await
    }

    async fn declare_subscription(&self, sub: &Subscription) -> Result<()> {
        check_subscription(sub)?;
        self.declare_exchange(&sub.destination).await?;
        self.declare_queues(sub).await.map(|_| ())
    }

    async fn publish(&self, destination: &str, message: Message) -> Result<Receipt> {
        let mut r = self
            .publish_to(destination, &[Outbound::plain(message)])
            .await?;
        Ok(r.remove(0))
    }

    async fn publish_batch(
        &self,
        destination: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Receipt>> {
        let batch: Vec<Outbound> = messages.into_iter().map(Outbound::plain).collect();
        self.publish_to(destination, &batch).await
    }

    async fn subscribe(&self, sub: Subscription) -> Result<Deliveries> {
        check_subscription(&sub)?;
        self.ensure_exchange(&sub.destination).await?;
        let (queue, dlx) = self.declare_queues(&sub).await?;
        let stream =
            crate::consume::RabbitStream::start(self.link.clone(), self.guarantee, sub, queue, dlx)
                .await?;
        Ok(Deliveries::new(Box::new(stream)))
    }

    /// The exchange must exist; `stored` is the queue named after the destination (a
    /// dead-letter destination's); per group, its queue's ready messages and consumers and the
    /// messages in its delay queues.
    async fn inspect(&self, destination: &str, groups: &[&str]) -> Result<DestinationInfo> {
        check_name("exchange", destination)?;
        if !self.exchange_exists(destination).await? {
            return Err(not_found(destination));
        }
        let mut info = DestinationInfo::new(destination);
        info.stored = self.queue_counts(destination).await?.map(|(n, _)| n.into());
        for &group in groups {
            let sub = Subscription::new(destination, group);
            check_subscription(&sub)?;
            let (queue, _) = subscription_names(&sub);
            let Some((ready, consumers)) = self.queue_counts(&queue).await? else {
                info.groups.push(GroupInfo::new(group, false, 0));
                continue;
            };
            let mut delayed = 0u64;
            for &ms in DELAY_STEPS_MS {
                if let Some((n, _)) = self.queue_counts(&delay_queue(&queue, ms)).await? {
                    delayed += u64::from(n);
                }
            }
            let mut g = GroupInfo::new(group, true, ready.into());
            g.consumers = Some(consumers);
            g.delayed = Some(delayed);
            info.groups.push(g);
        }
        Ok(info)
    }

    /// Removes each group's queue and delay queues, the queue named after the destination (a
    /// dead-letter destination's), and the exchange.
    async fn delete_destination(&self, destination: &str, groups: &[&str]) -> Result<Vec<String>> {
        check_name("exchange", destination)?;
        let mut removed = Vec::new();
        for &group in groups {
            let sub = Subscription::new(destination, group);
            check_subscription(&sub)?;
            let (queue, _) = subscription_names(&sub);
            let delays = DELAY_STEPS_MS.iter().map(|&ms| delay_queue(&queue, ms));
            for name in std::iter::once(queue.clone()).chain(delays) {
                if self.delete_queue(&name).await? {
                    removed.push(format!("queue {name}"));
                }
            }
        }
        if self.delete_queue(destination).await? {
            removed.push(format!("queue {destination}"));
        }
        if self.exchange_exists(destination).await? {
            let Watched { channel: ch, lost } = self.link.new_channel().await?;
            let op = self.link.declare_timeout();
            bounded(
                op,
                &lost,
                "exchange.delete",
                ch.exchange_delete(destination.into(), ExchangeDeleteOptions::default()),
            )
            .await?;
            close_channel(&ch, op, "ok").await;
            removed.push(format!("exchange {destination}"));
        }
        self.link.declared.lock().remove(destination);
        Ok(removed)
    }

    async fn close(&self) -> Result<()> {
        self.link.close().await;
        Ok(())
    }
}

impl RabbitMqClient {
    /// A client handle sharing this client's connection, for settle operations.
    pub(crate) fn from_link(link: Arc<Link>, guarantee: Guarantee) -> Self {
        RabbitMqClient { link, guarantee }
    }
}

/// Read a string header (AMQP long or short string).
pub(crate) fn header_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(i) => Some(i.to_string()),
        AMQPValue::LongInt(i) => Some(i.to_string()),
        AMQPValue::ShortInt(i) => Some(i.to_string()),
        AMQPValue::LongUInt(i) => Some(i.to_string()),
        _ => None,
    }
}
