//! The producer side, topics and transactions.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::AdminOptions;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer;

use crate::KafkaConfig;
use courier_core::{
    check_payload, Capabilities, Deliveries, DeliveryClient, DestinationInfo, Error, Explanation,
    Guarantee, Message, Receipt, Result, Subscription,
};

use crate::connection::*;
use crate::publish::Inner;
use crate::{settings, BACKEND};

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

impl KafkaClient {
    pub(crate) async fn connect(config: KafkaConfig, guarantee: Guarantee) -> Result<Self> {
        Ok(KafkaClient {
            inner: Arc::new(Inner::connect(config, guarantee).await?),
        })
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
