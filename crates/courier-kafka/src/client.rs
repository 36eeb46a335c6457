//! The producer side, topics and transactions.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::KafkaConfig;
use courier_core::{
    check_payload, header, Capabilities, Deliveries, DeliveryClient, DestinationInfo, Error,
    Explanation, Guarantee, Message, Position, Receipt, Result, Subscription,
};

use crate::{settings, BACKEND};

/// Classify a librdkafka error (retriable / abortable / fatal-fenced).
pub(crate) fn kafka_err(operation: &'static str, e: KafkaError) -> Error {
    if let KafkaError::Transaction(t) = &e {
        if t.is_fatal() {
            return Error::Fenced {
                backend: BACKEND,
                detail: t.to_string(),
            };
        }
        return Error::broker(
            BACKEND,
            operation,
            t.is_retriable() || t.txn_requires_abort(),
            e,
        );
    }
    let code = e.rdkafka_error_code();
    if matches!(
        code,
        Some(RDKafkaErrorCode::ProducerFenced)
            | Some(RDKafkaErrorCode::InvalidProducerEpoch)
            | Some(RDKafkaErrorCode::Fatal)
    ) {
        return Error::Fenced {
            backend: BACKEND,
            detail: e.to_string(),
        };
    }
    let retryable = !matches!(
        code,
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
            | Some(RDKafkaErrorCode::InvalidConfig)
            | Some(RDKafkaErrorCode::TopicAuthorizationFailed)
    );
    Error::broker(BACKEND, operation, retryable, e)
}

pub(crate) fn not_found(topic: &str) -> Error {
    Error::DestinationNotFound {
        backend: BACKEND,
        destination: topic.to_owned(),
        hint: "create the topic (DeliveryClient::create_destination) or set backend.auto_create = true".into(),
    }
}

/// The broker does not implement an admin request (librdkafka's MockCluster has no DeleteTopics
/// or DeleteGroups).
fn unsupported(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnsupportedFeature | RDKafkaErrorCode::UnsupportedVersion
    )
}

fn no_admin(request: &str) -> Error {
    Error::unsupported(
        BACKEND,
        format!("{request} (the broker does not implement it)"),
        "delete with the broker's own tools (kafka-topics.sh --delete, kafka-consumer-groups.sh --delete)",
    )
}

static TXN_SEQ: AtomicU32 = AtomicU32::new(0);

/// Shared producer state.
pub(crate) struct Inner {
    pub(crate) config: KafkaConfig,
    pub(crate) guarantee: Guarantee,
    pub(crate) producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Serialises transactions: librdkafka runs one at a time per producer.
    pub(crate) txn: Arc<tokio::sync::Mutex<()>>,
    topics: Mutex<HashSet<String>>,
    transactional_id: Option<String>,
}

/// A courier client of a Kafka cluster with one guarantee.
pub struct KafkaClient {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for KafkaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaClient")
            .field("bootstrap", &self.inner.config.bootstrap)
            .field("guarantee", &self.inner.guarantee)
            .field("transactional_id", &self.inner.transactional_id)
            .finish()
    }
}

/// Wait for the acks of enqueued records; the first failure is the result.
pub(crate) async fn confirm(acks: Vec<DeliveryFuture>) -> Result<()> {
    for ack in acks {
        match ack.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(kafka_err("produce", e)),
            Err(_) => {
                return Err(Error::broker(
                    BACKEND,
                    "produce",
                    true,
                    "the producer was closed before the record was acknowledged",
                ))
            }
        }
    }
    Ok(())
}

/// Run a blocking librdkafka call off the async executor.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::broker(BACKEND, "blocking call", true, e))
}

pub(crate) fn record_headers(
    m: &Message,
    attempt: Option<u32>,
    not_before_ms: Option<u64>,
) -> OwnedHeaders {
    let mut h = OwnedHeaders::new().insert(Header {
        key: header::ID,
        value: Some(m.id.as_str()),
    });
    let attempt = attempt.map(|a| a.to_string());
    if let Some(a) = &attempt {
        h = h.insert(Header {
            key: header::ATTEMPT,
            value: Some(a.as_str()),
        });
    }
    let nb = not_before_ms.map(|t| t.to_string());
    if let Some(t) = &nb {
        h = h.insert(Header {
            key: header::NOT_BEFORE,
            value: Some(t.as_str()),
        });
    }
    for (k, v) in &m.headers {
        if nb.is_some() && k == header::NOT_BEFORE {
            continue; // this copy's own not-before time (a retry) replaces the message's
        }
        h = h.insert(Header {
            key: k.as_str(),
            value: Some(v.as_str()),
        });
    }
    h
}

impl KafkaClient {
    pub(crate) async fn connect(config: KafkaConfig, guarantee: Guarantee) -> Result<Self> {
        let transactional_id = (guarantee == Guarantee::ExactlyOnce).then(|| {
            config.transactional_id.clone().unwrap_or_else(|| {
                let host = std::env::var("HOSTNAME")
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "local".into());
                format!(
                    "{}-{host}-{}-{}",
                    config.client_id,
                    std::process::id(),
                    TXN_SEQ.fetch_add(1, Ordering::Relaxed)
                )
            })
        });
        let ours = settings::producer(&config, guarantee, transactional_id.as_deref());
        let producer: FutureProducer = settings::client_config(&config, &ours)
            .create()
            .map_err(|e| Error::config(format!("invalid Kafka producer settings: {e}")))?;
        let admin: AdminClient<DefaultClientContext> = settings::connection(&config)
            .create()
            .map_err(|e| Error::config(format!("invalid Kafka settings: {e}")))?;
        if transactional_id.is_some() {
            let p = producer.clone();
            let t = config.delivery_timeout.min(Duration::from_secs(60));
            blocking(move || p.init_transactions(t))
                .await?
                .map_err(|e| kafka_err("init_transactions", e))?;
        }
        Ok(KafkaClient {
            inner: Arc::new(Inner {
                config,
                guarantee,
                producer,
                admin,
                txn: Arc::new(tokio::sync::Mutex::new(())),
                topics: Mutex::new(HashSet::new()),
                transactional_id,
            }),
        })
    }
}

/// Kafka's topic naming rule, checked before any request: 1 to 249 characters of ASCII letters,
/// digits, `.`, `_` and `-`, and not `.` or `..`. Guarded by
/// `tests/conformance.rs::topic_names_kafka_refuses_are_refused_before_any_request`.
pub(crate) fn check_topic(topic: &str) -> Result<()> {
    let rule = if topic.is_empty() {
        "it is empty".to_owned()
    } else if topic.len() > 249 {
        format!("it is {} characters; Kafka allows at most 249", topic.len())
    } else if topic == "." || topic == ".." {
        "\".\" and \"..\" are not allowed".to_owned()
    } else if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        format!(
            "{c:?} is not allowed; Kafka topic names use ASCII letters, digits, '.', '_' and '-'"
        )
    } else {
        return Ok(());
    };
    Err(Error::invalid_name(BACKEND, "topic", topic, rule))
}

impl Inner {
    /// Make sure `topic` exists (cached), creating it when auto_create is on.
    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<()> {
        if self.topics.lock().contains(topic) {
            return Ok(());
        }
        check_topic(topic)?;
        let producer = self.producer.clone();
        let t = topic.to_owned();
        let md = blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&t), Duration::from_secs(10))
        })
        .await?;
        let exists = match md {
            Ok(md) => md
                .topics()
                .iter()
                .any(|x| x.name() == topic && x.error().is_none() && !x.partitions().is_empty()),
            Err(e) => return Err(kafka_err("metadata", e)),
        };
        if exists {
            self.topics.lock().insert(topic.to_owned());
            return Ok(());
        }
        if self.config.auto_create {
            return self.create_topic(topic).await;
        }
        Err(not_found(topic))
    }

    pub(crate) async fn create_topic(&self, topic: &str) -> Result<()> {
        check_topic(topic)?;
        let nt = NewTopic::new(
            topic,
            self.config.partitions,
            TopicReplication::Fixed(self.config.replication_factor),
        );
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let r = self
            .admin
            .create_topics(&[nt], &opts)
            .await
            .map_err(|e| kafka_err("create_topics", e))?;
        for res in r {
            match res {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(Error::broker(
                        BACKEND,
                        "create_topics",
                        true,
                        format!("{t}: {code}"),
                    ))
                }
            }
        }
        // Wait (bounded) until every partition has a leader that serves it: metadata can name a
        // leader a moment before that broker accepts writes for the partition, and an
        // at-most-once producer (acks=0) would lose records sent in that moment without an
        // error. Listing a partition's offsets asks the leader itself.
        // Guarded by the conformance scenario `at_most_once_never_handles_twice`.
        for _ in 0..100 {
            let producer = self.producer.clone();
            let t = topic.to_owned();
            let ready = blocking(move || -> bool {
                let client = producer.client();
                let Ok(md) = client.fetch_metadata(Some(&t), Duration::from_secs(5)) else {
                    return false;
                };
                let Some(tm) = md.topics().iter().find(|x| x.name() == t) else {
                    return false;
                };
                tm.error().is_none()
                    && !tm.partitions().is_empty()
                    && tm.partitions().iter().all(|p| {
                        p.error().is_none()
                            && p.leader() >= 0
                            && client
                                .fetch_watermarks(&t, p.id(), Duration::from_secs(5))
                                .is_ok()
                    })
            })
            .await;
            if matches!(ready, Ok(true)) {
                self.topics.lock().insert(topic.to_owned());
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::Timeout {
            operation: format!("every partition of topic {topic} to have a leader"),
            after: Duration::from_secs(10),
        })
    }

    /// Produce many records, all enqueued before any is awaited, and wait for every ack (inside
    /// a transaction: the records a commit interval's inputs left).
    pub(crate) async fn produce_all<'a>(
        &self,
        records: impl Iterator<Item = (&'a str, &'a Message, Option<u32>, Option<u64>)>,
    ) -> Result<()> {
        let acks = self.enqueue_all(records).await?;
        confirm(acks).await
    }

    /// Enqueue records without waiting for their acks (a full local queue is waited out); the
    /// acks to await with [`confirm`].
    pub(crate) async fn enqueue_all<'a>(
        &self,
        records: impl Iterator<Item = (&'a str, &'a Message, Option<u32>, Option<u64>)>,
    ) -> Result<Vec<DeliveryFuture>> {
        let mut acks = Vec::new();
        for (topic, m, attempt, not_before_ms) in records {
            let mut record = FutureRecord::to(topic)
                .payload(&m.payload[..])
                .headers(record_headers(m, attempt, not_before_ms));
            if let Some(k) = &m.key {
                record = record.key(k.as_str());
            }
            match self.producer.send_result(record) {
                Ok(ack) => acks.push(ack),
                // The local queue is full: this one waits for room (and its ack) the slow way.
                Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    self.produce(topic, m, attempt, not_before_ms).await?;
                }
                Err((e, _)) => return Err(kafka_err("produce", e)),
            }
        }
        Ok(acks)
    }

    /// Produce and wait for the broker's ack (no transaction handling here).
    pub(crate) async fn produce(
        &self,
        topic: &str,
        m: &Message,
        attempt: Option<u32>,
        not_before_ms: Option<u64>,
    ) -> Result<Receipt> {
        let headers = record_headers(m, attempt, not_before_ms);
        let mut record = FutureRecord::to(topic)
            .payload(&m.payload[..])
            .headers(headers);
        if let Some(k) = &m.key {
            record = record.key(k.as_str());
        }
        if self.guarantee == Guarantee::AtMostOnce {
            return match self.producer.send_result(record) {
                Ok(_enqueued) => Ok(Receipt {
                    id: m.id.clone(),
                    destination: topic.to_owned(),
                    position: Position::Unknown,
                    deduplicated: false,
                }),
                Err((e, _)) => Err(kafka_err("produce", e)),
            };
        }
        match self
            .producer
            .send(record, Timeout::After(self.config.delivery_timeout))
            .await
        {
            Ok(d) => Ok(Receipt {
                id: m.id.clone(),
                destination: topic.to_owned(),
                position: Position::Offset {
                    partition: d.partition,
                    offset: d.offset,
                },
                deduplicated: false,
            }),
            Err((e, _))
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition) =>
            {
                self.topics.lock().remove(topic);
                Err(not_found(topic))
            }
            Err((e, _)) => Err(kafka_err("produce", e)),
        }
    }

    /// Run `body` inside a transaction; abort on failure (abortable errors are retryable).
    ///
    /// Cancellation-safe: if the caller's future is dropped mid-transaction (a consumer aborted,
    /// a shutdown deadline passed), the transaction is aborted on a blocking thread that keeps
    /// the client's transaction lock until it is done, so the shared producer is never left with
    /// an open transaction that the next caller's `begin_transaction` would trip over.
    pub(crate) async fn transaction<F, Fut, T>(&self, body: F) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let timeout = self.config.delivery_timeout.min(Duration::from_secs(60));
        let mut open = OpenTransaction {
            producer: Some(self.producer.clone()),
            guard: Some(self.txn.clone().lock_owned().await),
            timeout,
        };
        let p = self.producer.clone();
        blocking(move || p.begin_transaction())
            .await?
            .map_err(|e| {
                open.disarm();
                kafka_err("begin_transaction", e)
            })?;
        let out = body().await;
        // From here on the ending runs on a blocking thread that owns the lock: cancelling the
        // caller no longer interrupts it.
        let (p, guard) = open.take();
        match out {
            Ok(v) => blocking(move || {
                let r = match p.commit_transaction(timeout) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        let err = kafka_err("commit_transaction", e);
                        if !matches!(err, Error::Fenced { .. }) {
                            let _ = p.abort_transaction(timeout);
                        }
                        Err(err)
                    }
                };
                drop(guard);
                r
            })
            .await?
            .map(|()| v),
            Err(e) => {
                blocking(move || {
                    let _ = p.abort_transaction(timeout);
                    drop(guard);
                })
                .await?;
                Err(e)
            }
        }
    }

    /// Publish messages with the client's guarantee (one transaction for exactly-once).
    pub(crate) async fn publish_all(
        &self,
        topic: &str,
        messages: &[Message],
    ) -> Result<Vec<Receipt>> {
        self.ensure_topic(topic).await?;
        if self.guarantee == Guarantee::ExactlyOnce {
            return self
                .transaction(|| async {
                    let futs = messages.iter().map(|m| self.produce(topic, m, None, None));
                    futures::future::try_join_all(futs).await
                })
                .await;
        }
        let futs = messages.iter().map(|m| self.produce(topic, m, None, None));
        futures::future::try_join_all(futs).await
    }
}

#[async_trait]
impl DeliveryClient for KafkaClient {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn guarantee(&self) -> Guarantee {
        self.inner.guarantee
    }

    fn capabilities(&self) -> Capabilities {
        let k = &self.inner.config;
        let mut c = Capabilities::baseline();
        c.ordering_by_key = true;
        c.consumer_groups = true;
        c.transactions = self.inner.guarantee == Guarantee::ExactlyOnce;
        c.max_payload = k.max_message_bytes;
        c.delayed_redelivery = true;
        c.detects_missing_destination = true;
        c.settle_window = Duration::from_secs(2);
        c.redelivery_after_crash = k.session_timeout + Duration::from_secs(5);
        c
    }

    fn explain(&self) -> Explanation {
        settings::explain(
            &self.inner.config,
            self.inner.guarantee,
            self.inner.transactional_id.as_deref(),
        )
    }

    async fn create_destination(&self, destination: &str) -> Result<()> {
        self.inner.create_topic(destination).await
    }

    /// A new group reads from the earliest offset, so it already receives what was published
    /// before it joined: this creates the topic only when it does not exist.
    async fn declare_subscription(&self, sub: &Subscription) -> Result<()> {
        match self.inner.ensure_topic(&sub.destination).await {
            Err(Error::DestinationNotFound { .. }) => {
                self.inner.create_topic(&sub.destination).await
            }
            other => other,
        }
    }

    async fn publish(&self, destination: &str, message: Message) -> Result<Receipt> {
        check_payload(
            BACKEND,
            destination,
            &message,
            self.inner.config.max_message_bytes,
        )?;
        let mut r = self
            .inner
            .publish_all(destination, std::slice::from_ref(&message))
            .await?;
        Ok(r.remove(0))
    }

    async fn publish_batch(
        &self,
        destination: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Receipt>> {
        for m in &messages {
            check_payload(BACKEND, destination, m, self.inner.config.max_message_bytes)?;
        }
        self.inner.publish_all(destination, &messages).await
    }

    async fn subscribe(&self, sub: Subscription) -> Result<Deliveries> {
        self.inner.ensure_topic(&sub.destination).await?;
        let stream = crate::consume::KafkaStream::start(self.inner.clone(), sub)?;
        Ok(Deliveries::new(Box::new(stream)))
    }

    async fn inspect(&self, destination: &str, groups: &[&str]) -> Result<DestinationInfo> {
        check_topic(destination)?;
        let inner = self.inner.clone();
        let topic = destination.to_owned();
        let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        blocking(move || crate::admin::inspect(&inner.config, &inner.producer, &topic, &groups))
            .await?
    }

    /// Deletes the topic — the broker drops every group's committed offsets on it — and each
    /// named group as a whole (its offsets on every topic: name only groups of this
    /// destination). A group with running consumers is refused by the broker.
    async fn delete_destination(&self, destination: &str, groups: &[&str]) -> Result<Vec<String>> {
        check_topic(destination)?;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let mut removed = Vec::new();
        let topics = self
            .inner
            .admin
            .delete_topics(&[destination], &opts)
            .await
            .map_err(|e| match e.rdkafka_error_code() {
                Some(code) if unsupported(code) => no_admin("DeleteTopics"),
                _ => kafka_err("delete_topics", e),
            })?;
        for r in topics {
            match r {
                Ok(t) => removed.push(format!("topic {t}")),
                Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((_, code)) if unsupported(code) => return Err(no_admin("DeleteTopics")),
                Err((t, code)) => {
                    return Err(Error::broker(
                        BACKEND,
                        "delete_topics",
                        true,
                        format!("{t}: {code}"),
                    ))
                }
            }
        }
        self.inner.topics.lock().remove(destination);
        if !groups.is_empty() {
            let deleted = self
                .inner
                .admin
                .delete_groups(groups, &opts)
                .await
                .map_err(|e| match e.rdkafka_error_code() {
                    Some(code) if unsupported(code) => no_admin("DeleteGroups"),
                    _ => kafka_err("delete_groups", e),
                })?;
            for r in deleted {
                match r {
                    Ok(g) => removed.push(format!("group {g}")),
                    Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                    Err((_, code)) if unsupported(code) => return Err(no_admin("DeleteGroups")),
                    Err((g, RDKafkaErrorCode::NonEmptyGroup)) => {
                        return Err(Error::broker(
                            BACKEND,
                            "delete_groups",
                            false,
                            format!("group {g} has running consumers: stop them first"),
                        ))
                    }
                    Err((g, code)) => {
                        return Err(Error::broker(
                            BACKEND,
                            "delete_groups",
                            true,
                            format!("{g}: {code}"),
                        ))
                    }
                }
            }
        }
        Ok(removed)
    }

    async fn close(&self) -> Result<()> {
        let p = self.inner.producer.clone();
        let t = self
            .inner
            .config
            .delivery_timeout
            .min(Duration::from_secs(30));
        blocking(move || p.flush(t))
            .await?
            .map_err(|e| kafka_err("flush", e))
    }
}

/// An open transaction and the client's transaction lock; aborts the transaction if dropped
/// before `disarm` (see `Inner::transaction`).
struct OpenTransaction {
    producer: Option<FutureProducer>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    timeout: Duration,
}

impl OpenTransaction {
    fn disarm(&mut self) {
        self.producer = None;
        self.guard = None;
    }

    /// Hand the producer and the lock to whoever ends the transaction.
    fn take(mut self) -> (FutureProducer, tokio::sync::OwnedMutexGuard<()>) {
        (
            self.producer.take().expect("armed"),
            self.guard.take().expect("armed"),
        )
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        if let (Some(p), Some(guard)) = (self.producer.take(), self.guard.take()) {
            let timeout = self.timeout;
            let abort = move || {
                let _ = p.abort_transaction(timeout);
                drop(guard);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(abort)),
                Err(_) => drop(std::thread::spawn(abort)),
            }
        }
    }
}
