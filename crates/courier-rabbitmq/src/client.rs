//! Connection management, topology and publishing.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;
use tracing::{debug, warn};

use courier_core::config::{QueueType, RabbitMqConfig};
use courier_core::{
    check_payload, header, Capabilities, Deliveries, DeliveryClient, Error, Explanation, Guarantee,
    Message, Position, Receipt, Result, Subscription,
};

use crate::BACKEND;

/// Publish attempts before a confirmed publish gives up.
const PUBLISH_ATTEMPTS: u32 = 8;

pub(crate) fn broker_err(operation: &'static str, e: lapin::Error) -> Error {
    let retryable = !matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)));
    Error::broker(BACKEND, operation, retryable, e)
}

pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

fn not_found(destination: &str) -> Error {
    Error::DestinationNotFound {
        backend: BACKEND,
        destination: destination.to_owned(),
        hint: "declare it first (DeliveryClient::create_destination) or set backend.auto_create = true".into(),
    }
}

/// One connection plus a publishing channel, re-created after failures. The publishing channel
/// is always in confirm mode: at-least-once awaits each confirm; at-most-once does not, but
/// [`close`](Link::close) waits for the outstanding ones, because a channel closed while the
/// broker still holds enqueues for it (a quorum queue's leader being slow) drops them.
pub(crate) struct Link {
    pub(crate) config: RabbitMqConfig,
    state: Mutex<Option<(Connection, Channel)>>,
}

impl Link {
    async fn open(&self) -> Result<(Connection, Channel)> {
        let props = ConnectionProperties::default().with_connection_name("courier".into());
        let conn = tokio::time::timeout(
            self.config.confirm_timeout,
            Connection::connect(self.config.url.expose(), props),
        )
        .await
        .map_err(|_| Error::Timeout {
            operation: format!("connecting to {}", self.config.url.redacted()),
            after: self.config.confirm_timeout,
        })?
        .map_err(|e| broker_err("connect", e))?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| broker_err("open channel", e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| broker_err("confirm_select", e))?;
        Ok((conn, ch))
    }

    /// The publishing channel, reconnecting when the connection or channel is gone.
    pub(crate) async fn channel(&self) -> Result<Channel> {
        let mut st = self.state.lock().await;
        if let Some((conn, ch)) = st.as_mut() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
            if conn.status().connected() {
                let fresh = conn
                    .create_channel()
                    .await
                    .map_err(|e| broker_err("open channel", e))?;
                fresh
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| broker_err("confirm_select", e))?;
                *ch = fresh.clone();
                return Ok(fresh);
            }
        }
        let (conn, ch) = self.open().await?;
        *st = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// A fresh channel on the (possibly re-established) connection, for topology or consuming.
    pub(crate) async fn new_channel(&self) -> Result<Channel> {
        self.channel().await?;
        let st = self.state.lock().await;
        let (conn, _) = st.as_ref().ok_or(Error::Closed {
            what: "rabbitmq connection",
        })?;
        conn.create_channel()
            .await
            .map_err(|e| broker_err("open channel", e))
    }

    /// Flush, then close: wait (bounded by `confirm_timeout`) until the broker confirmed every
    /// publish of the channel, so an at-most-once publish that returned is not dropped by the
    /// close itself.
    pub(crate) async fn close(&self) {
        if let Some((conn, ch)) = self.state.lock().await.take() {
            if ch.status().connected() {
                let flushed =
                    tokio::time::timeout(self.config.confirm_timeout, ch.wait_for_confirms()).await;
                if !matches!(flushed, Ok(Ok(_))) {
                    tracing::warn!("closing with publishes the broker has not confirmed");
                }
            }
            let _ = ch.close(200, "bye".into()).await;
            let _ = conn.close(200, "bye".into()).await;
        }
    }
}

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

pub(crate) fn queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    let t = match queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    args.insert("x-queue-type".into(), AMQPValue::LongString(t.into()));
    args
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
    pub(crate) expiration: Option<Duration>,
}

impl Outbound {
    pub(crate) fn plain(message: Message) -> Self {
        Outbound {
            message,
            attempt: None,
            expiration: None,
        }
    }
}

pub(crate) fn properties(m: &Message, persistent: bool, attempt: Option<u32>) -> BasicProperties {
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
    BasicProperties::default()
        .with_message_id(m.id.as_str().into())
        .with_delivery_mode(if persistent { 2 } else { 1 })
        .with_content_type("application/octet-stream".into())
        .with_headers(headers)
}

impl RabbitMqClient {
    pub(crate) async fn connect(config: RabbitMqConfig, guarantee: Guarantee) -> Result<Self> {
        let link = Arc::new(Link {
            config,
            state: Mutex::new(None),
        });
        link.channel().await?;
        Ok(RabbitMqClient { link, guarantee })
    }

    fn confirmed(&self) -> bool {
        self.guarantee != Guarantee::AtMostOnce
    }

    /// Declare the exchange of a destination (idempotent).
    pub(crate) async fn declare_exchange(&self, name: &str) -> Result<()> {
        let ch = self.link.new_channel().await?;
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            durable(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker_err("exchange.declare", e))?;
        let _ = ch.close(200, "ok".into()).await;
        Ok(())
    }

    /// Whether the exchange exists (a passive declare on a throw-away channel).
    async fn exchange_exists(&self, name: &str) -> Result<bool> {
        let ch = self.link.new_channel().await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..durable()
        };
        match ch
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {
                let _ = ch.close(200, "ok".into()).await;
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(broker_err("exchange.declare passive", e)),
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

    /// Declare the subscription's work queue, its delay queue and its dead-letter exchange + queue.
    pub(crate) async fn declare_subscription(
        &self,
        sub: &Subscription,
    ) -> Result<(String, String, String)> {
        let ch = self.link.new_channel().await?;
        let queue = format!("{}.{}", sub.destination, sub.group);
        let delay = format!("{queue}.delay");
        let dlx = sub.dead_letter_destination();
        let q_opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let qt = self.link.config.queue_type;
        ch.queue_declare(queue.as_str().into(), q_opts, queue_args(qt))
            .await
            .map_err(|e| broker_err("queue.declare", e))?;
        ch.queue_bind(
            queue.as_str().into(),
            sub.destination.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            if is_not_found(&e) {
                not_found(&sub.destination)
            } else {
                broker_err("queue.bind", e)
            }
        })?;
        // Delayed redelivery: messages wait here with a per-message TTL, then dead-letter back
        // into the work queue through the default exchange.
        let mut dargs = queue_args(QueueType::Classic);
        dargs.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        dargs.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.as_str().into()),
        );
        ch.queue_declare(delay.as_str().into(), q_opts, dargs)
            .await
            .map_err(|e| broker_err("queue.declare delay", e))?;
        // Dead letters are kept even when nobody consumes the dead-letter destination yet.
        ch.exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Topic,
            durable(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker_err("exchange.declare dead-letter", e))?;
        ch.queue_declare(dlx.as_str().into(), q_opts, queue_args(qt))
            .await
            .map_err(|e| broker_err("queue.declare dead-letter", e))?;
        ch.queue_bind(
            dlx.as_str().into(),
            dlx.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker_err("queue.bind dead-letter", e))?;
        let _ = ch.close(200, "ok".into()).await;
        Ok((queue, delay, dlx))
    }

    /// Publish `messages` to `exchange` (routing key = key or ""), pipelining confirms.
    pub(crate) async fn send(
        &self,
        exchange: &str,
        routing: Option<&str>,
        messages: &[Outbound],
    ) -> Result<Vec<Receipt>> {
        let persistent = self.confirmed();
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
            let ch = match self.link.channel().await {
                Ok(ch) => ch,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            // Send everything, then await the confirms (pipelined).
            let mut confirms = Vec::with_capacity(pending.len());
            let mut failed = Vec::new();
            for &i in &pending {
                let out = &messages[i];
                let m = &out.message;
                let rk = routing.or(m.key.as_deref()).unwrap_or("");
                let opts = BasicPublishOptions {
                    mandatory: persistent,
                    ..BasicPublishOptions::default()
                };
                let mut props = properties(m, persistent, out.attempt);
                if let Some(ttl) = out.expiration {
                    props = props.with_expiration(ttl.as_millis().max(1).to_string().into());
                }
                match ch
                    .basic_publish(exchange.into(), rk.into(), opts, &m.payload, props)
                    .await
                {
                    Ok(c) => confirms.push((i, c)),
                    Err(e) if is_not_found(&e) => return Err(not_found(exchange)),
                    Err(e) => {
                        last_err = Some(broker_err("basic.publish", e));
                        failed.push(i);
                    }
                }
            }
            if !persistent {
                for (i, _) in &confirms {
                    receipts[*i] = Some(receipt(&messages[*i].message, exchange));
                }
                pending = failed;
                continue;
            }
            let timeout = self.link.config.confirm_timeout;
            let results = join_all(
                confirms
                    .into_iter()
                    .map(|(i, c)| async move { (i, tokio::time::timeout(timeout, c).await) }),
            )
            .await;
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
                    }
                }
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
        crate::explain_settings(&self.link.config, self.guarantee)
    }

    async fn create_destination(&self, destination: &str) -> Result<()> {
        if destination.is_empty() {
            return Err(Error::config("destination name is empty"));
        }
        self.declare_exchange(destination).await
    }

    async fn publish(&self, destination: &str, message: Message) -> Result<Receipt> {
        check_payload(
            BACKEND,
            destination,
            &message,
            self.link.config.max_message_bytes,
        )?;
        if self.link.config.auto_create {
            self.declare_exchange(destination).await?;
        }
        let mut r = self
            .send(destination, None, &[Outbound::plain(message)])
            .await?;
        Ok(r.remove(0))
    }

    async fn publish_batch(
        &self,
        destination: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Receipt>> {
        for m in &messages {
            check_payload(BACKEND, destination, m, self.link.config.max_message_bytes)?;
        }
        if self.link.config.auto_create {
            self.declare_exchange(destination).await?;
        }
        let batch: Vec<Outbound> = messages.into_iter().map(Outbound::plain).collect();
        self.send(destination, None, &batch).await
    }

    async fn subscribe(&self, sub: Subscription) -> Result<Deliveries> {
        self.ensure_exchange(&sub.destination).await?;
        let (queue, delay, dlx) = self.declare_subscription(&sub).await?;
        let stream = crate::consume::RabbitStream::start(
            self.link.clone(),
            self.guarantee,
            sub,
            queue,
            delay,
            dlx,
        )
        .await?;
        Ok(Deliveries::new(Box::new(stream)))
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
