//! Kafka under faults: on librdkafka's MockCluster, injected produce errors (transport,
//! NOT_ENOUGH_REPLICAS, request timeouts) and a broker down/up during a 10,000-message run lose
//! nothing and leave no duplicate in the log (idempotent producer); on the Kafka-protocol broker
//! of the stack, consumer processes SIGKILLed mid-handler lose nothing (at-least-once) and
//! exactly-once consume-transform-produce gives every input exactly one committed output.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use courier_core::{
    Consumer, Context, DeliveryClient, Guarantee, Handler, HandlerError, Message, Subscription,
};
use courier_testkit::process::{
    kill_workers_until, spawn_worker, trickle, until_terminated, worker_role,
};
use courier_testkit::{unique, FileLedger, Ledger};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// Records each delivery in the ledger (loss check); duplicates are counted in the log itself.
struct Count {
    ledger: Arc<Ledger>,
}

#[courier_core::async_trait]
impl Handler for Count {
    async fn handle(&self, m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        self.ledger.handled(m.id.as_str());
        Ok(())
    }
    fn is_idempotent(&self) -> bool {
        true // exactly-once here is the producer's: the test counts what the log holds
    }
}

async fn faults_on_mock(guarantee: Guarantee) {
    const N: usize = 10_000;
    let boot = common::mock_bootstrap();
    let topic = unique("faults");
    common::mock_create_topic(&topic).unwrap();
    let producer: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&common::config(&boot, guarantee))
            .await
            .unwrap(),
    );
    let consumer_client: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&common::config(&boot, Guarantee::AtLeastOnce))
            .await
            .unwrap(),
    );
    let ledger = Arc::new(Ledger::new());
    let publisher = {
        let producer = producer.clone();
        let ledger = ledger.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut failures = 0;
            for chunk in 0..N / 100 {
                let batch: Vec<Message> = (chunk * 100..(chunk + 1) * 100)
                    .map(|i| Message::new(format!("m{i}")).with_key(format!("k{}", i % 32)))
                    .collect();
                // The application's retry of a failed publish keeps the ids.
                loop {
                    match producer.publish_batch(&topic, batch.clone()).await {
                        Ok(_) => break,
                        Err(e) => {
                            assert!(e.is_retryable(), "non-retryable publish error: {e}");
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                for m in &batch {
                    ledger.sent(m.id.as_str());
                }
            }
            failures
        })
    };

    // Faults, spread over the run.
    let wait = |target: usize| {
        let ledger = ledger.clone();
        async move {
            let (r, ok) = ledger
                .wait_until(Duration::from_secs(120), |r| r.sent >= target)
                .await;
            assert!(ok, "stalled before {target} sent: {r}");
        }
    };
    wait(N / 5).await;
    common::mock_do(|c| {
        c.request_errors(
            RDKafkaApiKey::Produce,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
            ],
        );
        Ok(())
    })
    .unwrap();
    wait(N / 2).await;
    common::mock_do(|c| c.broker_down(2).map_err(|e| e.to_string())).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // the outage itself
    common::mock_do(|c| c.broker_up(2).map_err(|e| e.to_string())).unwrap();
    wait(N * 3 / 4).await;
    common::mock_do(|c| {
        c.request_errors(
            RDKafkaApiKey::Produce,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT,
            ],
        );
        Ok(())
    })
    .unwrap();

    let failures = publisher.await.unwrap();
    // Read the whole log afterwards with a fresh group and no faults: a second copy of an id
    // there is a duplicate the producer wrote (not a consumer redelivery during the faults).
    let h = Consumer::new(
        consumer_client.clone(),
        Subscription::new(&topic, unique("reader")),
    )
    .concurrency(8)
    .spawn(Count {
        ledger: ledger.clone(),
    })
    .await
    .unwrap();
    let (report, done) = ledger.wait_all_handled(Duration::from_secs(120)).await;
    h.shutdown().await.unwrap();
    // Duplicates are counted in the log itself — an id stored at two offsets — not by the
    // reader: a consumer group replaying from its last commit (MockCluster rebalances do) would
    // hand the same record over twice without the producer having written it twice.
    let log = tokio::task::spawn_blocking(move || log_offsets(&boot, &topic))
        .await
        .unwrap();
    let written_twice: Vec<_> = log.iter().filter(|(_, at)| at.len() > 1).collect();
    let r = ledger.report();
    println!(
        "{guarantee} under produce errors and a broker outage: {r}; publish calls that failed: {failures}; \
         records in the log {}, ids written more than once {}",
        log.values().map(Vec::len).sum::<usize>(),
        written_twice.len()
    );
    assert!(
        done && report.lost == 0,
        "{guarantee}: lost messages: {report}"
    );
    assert!(
        written_twice.is_empty(),
        "{guarantee}: {} ids written to the log more than once, e.g. {:?}",
        written_twice.len(),
        written_twice.iter().take(3).collect::<Vec<_>>()
    );
}

/// Every committed record of `topic`, read straight from the partitions (assigned, not
/// subscribed: no group, so no replay), as courier id → (partition, offset) list.
fn log_offsets(bootstrap: &str, topic: &str) -> HashMap<String, Vec<(i32, i64)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::message::Headers as _;
    use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("log-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("a log reader");
    let limit = Duration::from_secs(10);
    let md = c
        .fetch_metadata(Some(topic), limit)
        .expect("topic metadata");
    let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for &p in &partitions {
        let (_, high) = c.fetch_watermarks(topic, p, limit).expect("watermarks");
        ends.insert(p, high);
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    c.assign(&tpl).expect("assign");
    let mut out: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        // Read until every partition's position reached the end seen above (the position also
        // moves past transaction markers, which are never delivered).
        let position = c.position().expect("position");
        let at_end = partitions.iter().all(|&p| {
            match position.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o >= ends[&p],
                _ => ends[&p] == 0,
            }
        });
        if at_end {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reading the log of {topic} did not reach its end in 120 s"
        );
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let id = m.headers().and_then(|hs| {
                    hs.iter()
                        .find(|h| h.key == courier_core::header::ID)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                if let Some(id) = id {
                    out.entry(id).or_default().push((m.partition(), m.offset()));
                }
            }
            Some(Err(e)) => panic!("reading the log of {topic}: {e}"),
            None => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_least_once_survives_produce_errors_and_a_broker_outage() {
    faults_on_mock(Guarantee::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_survives_produce_errors_and_a_broker_outage() {
    faults_on_mock(Guarantee::ExactlyOnce).await;
}

// ---- SIGKILLed consumer processes (the stack's broker) ----------------------------------------

/// Publish the input's output through the context (exactly-once: in one transaction with the
/// consumed offsets; at-least-once: confirmed before the input is marked done), and record the
/// input.
struct Work {
    ledger: FileLedger,
    output: String,
}

#[courier_core::async_trait]
impl Handler for Work {
    async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..5))).await;
        cx.publish(
            self.output.clone(),
            Message::new(m.id.to_string()).with_id(cx.derive_id("out")),
        );
        self.ledger
            .handled(m.id.as_str())
            .map_err(HandlerError::retryable)?;
        Ok(())
    }
    fn is_idempotent(&self) -> bool {
        true
    }
}

#[test]
fn kafka_worker_entry() {
    if worker_role().is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let topic = std::env::var("TOPIC").unwrap();
        let output = std::env::var("OUTPUT").unwrap();
        let g = if std::env::var("EXACTLY_ONCE").is_ok_and(|v| v == "1") {
            Guarantee::ExactlyOnce
        } else {
            Guarantee::AtLeastOnce
        };
        let boot = courier_testkit::endpoints::kafka_bootstrap();
        let mut config = common::config(&boot, g);
        {
            let k = &mut config.backend;
            // One transactional id per worker slot, stable across restarts: the new worker's
            // init_transactions fences the killed one and aborts its open transaction (which
            // would otherwise hold back read_committed readers until the broker times it out).
            k.transactional_id = Some(format!("courier-kill-{topic}"));
        }
        let c = Arc::new(courier_kafka::connect(&config).await.unwrap());
        let h = Consumer::new(c, Subscription::new(&topic, "g"))
            .concurrency(8)
            .spawn(Work {
                ledger: FileLedger::new(std::env::var("LEDGER").unwrap()),
                output,
            })
            .await
            .unwrap();
        // Killed with SIGKILL mid-stream, or (the last worker) stopped with SIGTERM.
        until_terminated(Duration::from_secs(180)).await;
        h.shutdown().await.unwrap();
    });
}

/// One SIGKILL test at a time: they share the broker and both cores.
static KILL_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn kill_consumers(exactly_once: bool) {
    let _serial = KILL_TESTS.lock().await;
    let n: usize = 2_000;
    let boot = courier_testkit::endpoints::kafka_bootstrap();
    let g = if exactly_once {
        Guarantee::ExactlyOnce
    } else {
        Guarantee::AtLeastOnce
    };
    let c: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&common::config(&boot, g))
            .await
            .unwrap_or_else(|e| courier_testkit::endpoints::unreachable("Kafka", &boot, e)),
    );
    let topic = unique("kill-in");
    c.create_destination(&topic).await.unwrap();
    let output = unique("kill-out");
    c.create_destination(&output).await.unwrap();
    let dir = std::env::temp_dir().join(unique("courier-kafka-kill"));
    std::fs::create_dir_all(&dir).unwrap();
    let ledger = FileLedger::new(dir.join("ledger"));
    let msgs: Vec<Message> = (0..n)
        // Many keys, so the eight lanes finish offsets of one partition out of order.
        .map(|i| Message::new(format!("m{i}")).with_key(format!("k{}", i % 64)))
        .collect();
    // Publish for about 40 s while workers come and go, so every worker has work when killed.
    // Inputs are published without transactions, so the end of the input topic is its last
    // record (see `wait_group_caught_up`).
    let inputs: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&common::config(&boot, Guarantee::AtLeastOnce))
            .await
            .unwrap(),
    );
    let publisher = trickle(inputs, topic.clone(), msgs.clone(), 40, ledger.clone());
    let envs = [
        ("TOPIC", topic.as_str()),
        ("OUTPUT", output.as_str()),
        ("EXACTLY_ONCE", if exactly_once { "1" } else { "0" }),
        ("LEDGER", ledger.path().to_str().unwrap()),
    ];
    let kills = kill_workers_until(
        "kafka_worker_entry",
        &envs,
        &ledger,
        3,
        Duration::from_secs(300),
        || publisher.is_finished() && ledger.report().unwrap().lost == 0,
    )
    .await;
    let r = ledger.report().unwrap();
    println!("kafka {g}, {kills} SIGKILLs: {r}");
    assert!(kills >= 3, "too few kills ({kills})");
    assert_eq!(r.lost, 0, "{r}");
    {
        // A last worker, not killed, processes whatever the killed ones left uncommitted and
        // stops gracefully (no transaction left open); then a read_committed reader counts the
        // outputs per input: exactly one each under exactly-once, at least one under
        // at-least-once (an input is marked done only once its outputs are confirmed).
        let mut last = spawn_worker("kafka_worker_entry", "consumer", &envs).unwrap();
        let counts = tokio::task::spawn_blocking({
            let (boot, topic, output) = (boot.clone(), topic.clone(), output.clone());
            move || {
                courier_testkit::kafka_log::drain_and_count(&boot, &topic, "g", &output, &mut last)
            }
        })
        .await
        .unwrap();
        let missing = msgs
            .iter()
            .filter(|m| !counts.contains_key(m.id.as_str()))
            .count();
        let duplicated: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
        println!(
            "kafka {g} consume-transform-produce, {kills} SIGKILLs: {} inputs, {} with an output, {missing} missing, {} duplicated {:?}",
            msgs.len(),
            counts.len(),
            duplicated.len(),
            duplicated.iter().take(10).collect::<Vec<_>>()
        );
        assert_eq!(missing, 0, "inputs without an output");
        if exactly_once {
            assert!(duplicated.is_empty(), "inputs with more than one output");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_at_least_once_consume_transform_produce_loses_no_output() {
    kill_consumers(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_consume_transform_produce_gives_every_input_exactly_one_output() {
    kill_consumers(true).await;
}
