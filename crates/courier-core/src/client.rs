//! The `DeliveryClient` trait every backend implements, and subscriptions.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    Capabilities, Delivery, DestinationInfo, Error, Explanation, Guarantee, Message, Receipt,
    Result,
};

/// What to consume: a destination, a consumer group and consume-side options.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Subscription {
    /// Topic / queue to consume from.
    pub destination: String,
    /// Consumer group: members of one group compete for messages; every group receives every
    /// message (where the backend has consumer groups).
    pub group: String,
    /// Where dead-lettered messages go; `None` means `<destination>-dlq` (see
    /// [`Subscription::dead_letter_destination`]).
    pub dead_letter: Option<String>,
    /// How many unsettled deliveries the broker may hand this subscriber at once; `None` (the
    /// default) uses the backend's configured value (RabbitMQ `prefetch`, 64; SQS: ten per
    /// receive, its maximum).
    pub prefetch: Option<u16>,
}

impl Subscription {
    /// Subscribe `group` to `destination` with default options.
    pub fn new(destination: impl Into<String>, group: impl Into<String>) -> Self {
        Subscription {
            destination: destination.into(),
            group: group.into(),
            dead_letter: None,
            prefetch: None,
        }
    }

    /// Set the dead-letter destination.
    pub fn dead_letter(mut self, destination: impl Into<String>) -> Self {
        self.dead_letter = Some(destination.into());
        self
    }

    /// Set the prefetch (broker-side in-flight limit).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch.max(1));
        self
    }

    /// The effective dead-letter destination: the configured one, else `<destination>-dlq`
    /// (`<stem>-dlq.fifo` for an SQS FIFO queue name, which must keep its `.fifo` suffix) — a
    /// valid name on every backend (SQS names allow no `.` but the FIFO suffix).
    pub fn dead_letter_destination(&self) -> String {
        if let Some(d) = &self.dead_letter {
            return d.clone();
        }
        match self.destination.strip_suffix(".fifo") {
            Some(stem) => format!("{stem}-dlq.fifo"),
            None => format!("{}-dlq", self.destination),
        }
    }
}

/// Backend half of [`Deliveries`].
#[async_trait]
pub trait DeliveryStream: Send {
    /// The next delivery; `None` when the subscription ended. Must be cancel safe: dropping the
    /// future before it completes loses no message.
    async fn next(&mut self) -> Option<Result<Delivery>>;

    /// Stop receiving and release the subscription (commit positions where the backend does;
    /// unsettled deliveries become redeliverable).
    async fn close(self: Box<Self>) -> Result<()>;
}

/// A stream of deliveries from one subscription.
pub struct Deliveries {
    inner: Box<dyn DeliveryStream>,
}

impl Deliveries {
    /// Wrap a backend stream.
    pub fn new(inner: Box<dyn DeliveryStream>) -> Self {
        Deliveries { inner }
    }

    /// The next delivery (cancel safe); `None` when the subscription ended.
    pub async fn next(&mut self) -> Option<Result<Delivery>> {
        self.inner.next().await
    }

    /// The next delivery, or `None` if none arrives within `timeout`.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Option<Result<Delivery>> {
        tokio::time::timeout(timeout, self.inner.next())
            .await
            .ok()
            .flatten()
    }

    /// Close the subscription.
    pub async fn close(self) -> Result<()> {
        self.inner.close().await
    }
}

impl fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Deliveries")
    }
}

/// A connection to one broker, configured with one delivery guarantee.
///
/// Dyn compatible: `courier::connect(&config)` returns `Box<dyn DeliveryClient>`, so switching
/// brokers is a configuration change.
#[async_trait]
pub trait DeliveryClient: Send + Sync {
    /// Backend name (`memory`, `kafka`, `rabbitmq`, `sqs`).
    fn backend(&self) -> &'static str;

    /// The guarantee this client was configured with.
    fn guarantee(&self) -> Guarantee;

    /// What this backend, as configured, can do.
    fn capabilities(&self) -> Capabilities;

    /// The effective broker settings for the guarantee.
    fn explain(&self) -> Explanation;

    /// Create `destination` (topic, queue, exchange + queue) if it does not exist. Idempotent.
    async fn create_destination(&self, destination: &str) -> Result<()>;

    /// Create `subscription`'s destination and make its consumer group keep every message
    /// published from now on, before the group first subscribes. Idempotent.
    ///
    /// On Kafka, SQS and the memory broker a group already receives what was published before
    /// it joined (a new Kafka group reads from the earliest offset; an SQS queue or memory topic
    /// keeps its messages), so this only creates the destination. On RabbitMQ a message published
    /// to an exchange with no queue bound is unroutable: this declares the group's queue (and its
    /// dead-letter exchange and queue) and binds it, as `subscribe` does. Provision groups this
    /// way before publishers start.
    async fn declare_subscription(&self, subscription: &Subscription) -> Result<()> {
        self.create_destination(&subscription.destination).await
    }

    /// Publish one message. Returns when the guarantee's publish condition holds (see the
    /// contract table): handed to the client (at-most-once) or confirmed durable by the broker.
    async fn publish(&self, destination: &str, message: Message) -> Result<Receipt>;

    /// Publish several messages to one destination. Validation (size, destination) happens for
    /// all of them before any is sent. Backends batch (or use one transaction) where they can.
    async fn publish_batch(
        &self,
        destination: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Receipt>> {
        let mut receipts = Vec::with_capacity(messages.len());
        for m in messages {
            receipts.push(self.publish(destination, m).await?);
        }
        Ok(receipts)
    }

    /// Subscribe to a destination as a member of a consumer group.
    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries>;

    /// What the broker holds for `destination` and each of `groups` (backlog, in flight,
    /// delayed, consumers, oldest message age — see [`GroupInfo`](crate::GroupInfo) for what
    /// each backend can tell). A group the broker holds nothing for is reported with
    /// `exists: false`. A missing destination is [`Error::DestinationNotFound`].
    async fn inspect(&self, destination: &str, groups: &[&str]) -> Result<DestinationInfo> {
        let _ = (destination, groups);
        Err(Error::unsupported(
            self.backend(),
            "inspect",
            "inspect the destination with the broker's own tools",
        ))
    }

    /// Remove `destination` and what courier created for each of `groups` on the broker (their
    /// queues, delay queues or committed offsets). Returns what was removed; something already
    /// gone is not an error. Messages in them are deleted. The dead-letter destination is a
    /// destination of its own, kept unless it is removed by name: it holds the messages that
    /// need a person.
    async fn delete_destination(&self, destination: &str, groups: &[&str]) -> Result<Vec<String>> {
        let _ = (destination, groups);
        Err(Error::unsupported(
            self.backend(),
            "delete_destination",
            "remove the destination with the broker's own tools",
        ))
    }

    /// Flush pending publishes and release resources, within the configured close timeout.
    async fn close(&self) -> Result<()>;
}

/// Check a message against a payload limit before anything is sent.
pub fn check_payload(
    backend: &'static str,
    destination: &str,
    message: &Message,
    limit: usize,
) -> Result<()> {
    let size = message.encoded_len();
    if size > limit {
        return Err(crate::Error::PayloadTooLarge {
            backend,
            destination: destination.to_owned(),
            size,
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Subscription;

    #[test]
    fn default_dead_letter_name_is_destination_dash_dlq() {
        let s = Subscription::new("orders", "g");
        assert_eq!(s.dead_letter_destination(), "orders-dlq");
        let fifo = Subscription::new("orders.fifo", "g");
        assert_eq!(fifo.dead_letter_destination(), "orders-dlq.fifo");
        let named = Subscription::new("orders", "g").dead_letter("parked");
        assert_eq!(named.dead_letter_destination(), "parked");
    }
}
