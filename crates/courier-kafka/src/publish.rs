//! The producer side: topics, publishing, and transactions.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::KafkaConfig;
use courier_core::{Error, Guarantee, Message, Position, Receipt, Result};

use crate::connection::*;
use crate::{settings, BACKEND};

static TXN_SEQ: AtomicU32 = AtomicU32::new(0);

/// Shared producer state.
pub(crate) struct Inner {
    pub(crate) config: KafkaConfig,
    pub(crate) guarantee: Guarantee,
    pub(crate) producer: FutureProducer,
    pub(crate) admin: AdminClient<DefaultClientContext>,
    /// Serialises transactions: librdkafka runs one at a time per producer.
    pub(crate) txn: Arc<tokio::sync::Mutex<()>>,
    pub(crate) topics: Mutex<HashSet<String>>,
    pub(crate) transactional_id: Option<String>,
}

impl Inner {
    /// The producer (and admin client) of a client with `guarantee`; under exactly-once its
    /// transactions are initialised.
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
        Ok(Inner {
            config,
            guarantee,
            producer,
            admin,
            txn: Arc::new(tokio::sync::Mutex::new(())),
            topics: Mutex::new(HashSet::new()),
            transactional_id,
        })
    }

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
