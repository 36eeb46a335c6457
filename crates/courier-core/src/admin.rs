//! What a broker reports about a destination and its consumer groups, and removing them:
//! [`DeliveryClient::inspect`](crate::DeliveryClient::inspect) and
//! [`DeliveryClient::delete_destination`](crate::DeliveryClient::delete_destination).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// A destination as its broker reports it. Counts are the broker's own (SQS's are
/// approximate); a field is `None` where the broker cannot tell it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DestinationInfo {
    /// The destination inspected.
    pub destination: String,
    /// Messages the destination itself holds: Kafka, the records retained over all partitions;
    /// SQS, the queue's visible messages; the memory broker, its log; RabbitMQ, the queue named
    /// after the destination (a dead-letter destination has one; a plain exchange stores
    /// nothing and reports `None`).
    pub stored: Option<u64>,
    /// Partitions (Kafka).
    pub partitions: Option<u32>,
    /// One entry per group asked about, in the order asked.
    pub groups: Vec<GroupInfo>,
}

/// One consumer group of a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The group.
    pub group: String,
    /// Whether the broker holds anything for the group: its queue (RabbitMQ), committed offsets
    /// (Kafka), its membership (memory). Always `true` on SQS, where every group shares the
    /// queue.
    pub exists: bool,
    /// Messages waiting for the group: Kafka, the lag (end offset − committed offset, summed;
    /// a partition without a commit counts from its start); RabbitMQ, the ready messages of the
    /// group's queue; SQS, `ApproximateNumberOfMessages`; memory, the ready messages. For a
    /// group that does not exist yet: what it would read when it joins (Kafka and memory: the
    /// whole destination; RabbitMQ: nothing).
    pub backlog: u64,
    /// Delivered and not yet settled (SQS `ApproximateNumberOfMessagesNotVisible`, memory).
    pub in_flight: Option<u64>,
    /// Put off until later: retries and deferrals waiting out their delay (RabbitMQ delay
    /// queues, SQS `ApproximateNumberOfMessagesDelayed`, memory).
    pub delayed: Option<u64>,
    /// Consumers attached (RabbitMQ, memory).
    pub consumers: Option<u32>,
    /// How long the oldest waiting message has been stored (Kafka: the record at the committed
    /// offset; memory). Serialized as `oldest_age_seconds`.
    #[serde(rename = "oldest_age_seconds", serialize_with = "seconds")]
    pub oldest_age: Option<Duration>,
}

fn seconds<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

impl GroupInfo {
    /// A group with nothing known but its backlog (used by backends).
    pub fn new(group: impl Into<String>, exists: bool, backlog: u64) -> Self {
        GroupInfo {
            group: group.into(),
            exists,
            backlog,
            in_flight: None,
            delayed: None,
            consumers: None,
            oldest_age: None,
        }
    }
}

impl DestinationInfo {
    /// A destination with no groups (used by backends).
    pub fn new(destination: impl Into<String>) -> Self {
        DestinationInfo {
            destination: destination.into(),
            stored: None,
            partitions: None,
            groups: Vec::new(),
        }
    }

    /// The entry of `group`, if it was asked about.
    pub fn group(&self, group: &str) -> Option<&GroupInfo> {
        self.groups.iter().find(|g| g.group == group)
    }
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string)
}

impl fmt::Display for DestinationInfo {
    /// A small table: the destination line, then one line per group (`(new)` marks a group the
    /// broker holds nothing for yet).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.destination)?;
        if let Some(p) = self.partitions {
            write!(f, "  partitions {p}")?;
        }
        writeln!(f, "  stored {}", opt(&self.stored))?;
        if self.groups.is_empty() {
            return Ok(());
        }
        writeln!(
            f,
            "  {:<32} {:>10} {:>10} {:>10} {:>10} {:>12}",
            "group", "backlog", "in-flight", "delayed", "consumers", "oldest"
        )?;
        for g in &self.groups {
            // A group that does not exist yet: what it would read when it joins.
            let backlog = if g.exists {
                g.backlog.to_string()
            } else {
                format!("{} (new)", g.backlog)
            };
            let oldest = g
                .oldest_age
                .map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
            writeln!(
                f,
                "  {:<32} {:>10} {:>10} {:>10} {:>10} {:>12}",
                g.group,
                backlog,
                opt(&g.in_flight),
                opt(&g.delayed),
                opt(&g.consumers),
                oldest
            )?;
        }
        Ok(())
    }
}
