//! `inspect` on Kafka: watermarks, a group's committed offsets, its members and the timestamp
//! of the first record it has not consumed. Blocking librdkafka calls (run on a blocking
//! thread by the client).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Message as _, Offset, TopicPartitionList};

use crate::KafkaConfig;
use courier_core::{DestinationInfo, Error, GroupInfo, Result};

use crate::connection::{kafka_err, not_found};
use crate::settings;

const TIMEOUT: Duration = Duration::from_secs(10);
/// How long `inspect` waits for the first unconsumed record of each partition.
const PEEK: Duration = Duration::from_secs(3);

/// A consumer that reads `group`'s committed offsets and can be assigned partitions; it never
/// joins the group (no subscribe) and never commits.
fn group_reader(config: &KafkaConfig, group: &str) -> Result<BaseConsumer> {
    let mut c = settings::connection(config);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    c.create()
        .map_err(|e| Error::config(format!("invalid Kafka settings: {e}")))
}

pub(crate) fn inspect(
    config: &KafkaConfig,
    producer: &FutureProducer,
    topic: &str,
    groups: &[String],
) -> Result<DestinationInfo> {
    let client = producer.client();
    let md = client
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(|e| kafka_err("metadata", e))?;
    let partitions: Vec<i32> = match md.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            t.partitions().iter().map(|p| p.id()).collect()
        }
        _ => return Err(not_found(topic)),
    };
    let mut marks = Vec::with_capacity(partitions.len());
    for &p in &partitions {
        let (low, high) = client
            .fetch_watermarks(topic, p, TIMEOUT)
            .map_err(|e| kafka_err("list_offsets", e))?;
        marks.push((p, low, high));
    }
    let mut info = DestinationInfo::new(topic);
    info.partitions = Some(partitions.len() as u32);
    info.stored = Some(marks.iter().map(|(_, l, h)| (h - l).max(0) as u64).sum());
    for group in groups {
        info.groups
            .push(group_info(config, producer, topic, group, &marks)?);
    }
    Ok(info)
}

fn group_info(
    config: &KafkaConfig,
    producer: &FutureProducer,
    topic: &str,
    group: &str,
    marks: &[(i32, i64, i64)],
) -> Result<GroupInfo> {
    let reader = group_reader(config, group)?;
    let mut tpl = TopicPartitionList::new();
    for &(p, _, _) in marks {
        tpl.add_partition(topic, p);
    }
    let committed = committed(&reader, &tpl)?;
    let mut exists = false;
    let mut backlog = 0u64;
    // Where the group's next record is, per partition with a backlog.
    let mut next = TopicPartitionList::new();
    for &(p, low, high) in marks {
        let from = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => {
                exists = true;
                o.max(low)
            }
            _ => low,
        };
        if high > from {
            backlog += (high - from) as u64;
            next.add_partition_offset(topic, p, Offset::Offset(from))
                .map_err(|e| kafka_err("assign", e))?;
        }
    }
    let members = producer
        .client()
        .fetch_group_list(Some(group), TIMEOUT)
        .ok()
        .and_then(|l| {
            l.groups()
                .iter()
                .find(|g| g.name() == group && g.state() != "Dead")
                .map(|g| g.members().len() as u32)
        });
    exists |= members.is_some_and(|m| m > 0);
    let mut g = GroupInfo::new(group, exists, backlog);
    g.consumers = members;
    g.oldest_age = oldest(&reader, &next)?;
    Ok(g)
}

/// The group's committed offsets of `tpl`. A group's coordinator is looked up on first use;
/// until the broker has it loaded it answers "not coordinator", which is retried (bounded).
fn committed(reader: &BaseConsumer, tpl: &TopicPartitionList) -> Result<TopicPartitionList> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match reader.committed_offsets(tpl.clone(), TIMEOUT) {
            Ok(c) => return Ok(c),
            Err(e)
                if std::time::Instant::now() < deadline
                    && matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::NotCoordinator
                                | RDKafkaErrorCode::CoordinatorNotAvailable
                                | RDKafkaErrorCode::CoordinatorLoadInProgress
                        )
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(kafka_err("offset_fetch", e)),
        }
    }
}

/// The age of the oldest of the records at `next` (one per partition), peeking for at most
/// [`PEEK`].
fn oldest(reader: &BaseConsumer, next: &TopicPartitionList) -> Result<Option<Duration>> {
    if next.count() == 0 {
        return Ok(None);
    }
    reader.assign(next).map_err(|e| kafka_err("assign", e))?;
    let deadline = std::time::Instant::now() + PEEK;
    let mut seen = std::collections::HashSet::new();
    let mut earliest: Option<i64> = None;
    while seen.len() < next.count() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match reader.poll(left) {
            Some(Ok(m)) => {
                if seen.insert(m.partition()) {
                    if let Some(ms) = m.timestamp().to_millis() {
                        earliest = Some(earliest.map_or(ms, |e| e.min(ms)));
                    }
                }
            }
            Some(Err(e)) => return Err(kafka_err("fetch", e)),
            None => break,
        }
    }
    Ok(earliest.and_then(|ms| u64::try_from(ms).ok()).map(|ms| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH + Duration::from_millis(ms))
            .unwrap_or_default()
    }))
}
