//! Reading what a Kafka topic holds for exactly-once tests: whether a consumer group has
//! committed everything of a topic, and how often each value occurs among the *committed*
//! records of a topic (`read_committed`, to the end).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("a Kafka consumer")
}

fn partitions(c: &BaseConsumer, topic: &str) -> Vec<i32> {
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    md.topics()[0].partitions().iter().map(|p| p.id()).collect()
}

/// Wait (up to `timeout`) until `group` has committed the end of every partition of `topic`:
/// everything in it is processed and committed. True when it did. For a topic written without
/// transactions (a transaction's commit marker takes an offset no consumer commits past).
pub fn wait_group_caught_up(bootstrap: &str, topic: &str, group: &str, timeout: Duration) -> bool {
    let c = consumer(bootstrap, group);
    let parts = partitions(&c, topic);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition(topic, *p);
        }
        if let Ok(committed) = c.committed_offsets(tpl, Duration::from_secs(10)) {
            let done = committed.elements().iter().all(|el| {
                let (_, high) = c
                    .fetch_watermarks(topic, el.partition(), Duration::from_secs(10))
                    .unwrap_or((0, i64::MAX));
                match el.offset() {
                    Offset::Offset(o) => o >= high,
                    _ => high == 0,
                }
            });
            if done {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Every committed record of `topic`, from the start to its current end, counted by payload.
/// Call it when no transaction on the topic is open any more (the writers stopped or were
/// fenced), so the end is reachable. Panics if the end is not reached within `timeout`.
pub fn committed_payload_counts(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
) -> HashMap<String, usize> {
    let c = consumer(
        bootstrap,
        &format!("courier-count-{}", uuid::Uuid::new_v4()),
    );
    let parts = partitions(&c, topic);
    let mut tpl = TopicPartitionList::new();
    let mut end: HashMap<i32, i64> = HashMap::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .expect("partition");
        let (_, high) = c
            .fetch_watermarks(topic, *p, Duration::from_secs(10))
            .expect("watermarks");
        end.insert(*p, high);
    }
    c.assign(&tpl).expect("assign");
    let mut counts = HashMap::new();
    let deadline = Instant::now() + timeout;
    loop {
        // Done when each partition's position is at its end (control records and aborted
        // records are skipped but move the position).
        let pos = c.position().expect("position");
        let reached = pos.elements().iter().all(|el| {
            let high = end.get(&el.partition()).copied().unwrap_or(0);
            high == 0 || matches!(el.offset(), Offset::Offset(o) if o >= high)
        });
        if reached {
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach its end {end:?} within {timeout:?} (position {pos:?})"
        );
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            *counts.entry(v).or_insert(0) += 1;
        }
    }
}

/// The end of a crash test: `last` (a worker that is not killed) processes whatever the killed
/// ones left until `group` has committed all of `input`, then stops with SIGTERM (no transaction
/// left open); returns the committed records of `output` counted by payload. Panics if the
/// worker never catches up or does not stop.
pub fn drain_and_count(
    bootstrap: &str,
    input: &str,
    group: &str,
    output: &str,
    last: &mut std::process::Child,
) -> HashMap<String, usize> {
    let caught_up = wait_group_caught_up(bootstrap, input, group, Duration::from_secs(180));
    assert!(
        crate::process::terminate(last, Duration::from_secs(60)),
        "the last worker did not stop"
    );
    assert!(
        caught_up,
        "the last worker never committed all inputs of {input}"
    );
    committed_payload_counts(bootstrap, output, Duration::from_secs(60))
}
