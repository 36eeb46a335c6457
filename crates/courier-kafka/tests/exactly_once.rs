//! Exactly-once consume-transform-produce when a transaction does not commit: a fenced producer
//! ends the subscription and its replacement commits every input once (Apache Kafka); an
//! aborted transaction rewinds its partitions and every input still commits exactly once
//! (MockCluster, injected AddPartitionsToTxn errors).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use courier_core::{
    Consumer, ConsumerHandle, Context, DeliveryClient, Guarantee, Handler, HandlerError, Message,
    Subscription,
};
use courier_testkit::kafka_log::{committed_payload_counts, wait_group_caught_up};
use courier_testkit::{unique, Ledger};
use parking_lot::Mutex;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// Stages one output per input (payload = the input id) and counts how each input's
/// transaction ended, through `Context::after_commit`.
#[derive(Clone)]
struct Transform {
    output: String,
    ledger: Arc<Ledger>,
    committed: Arc<Mutex<HashMap<String, usize>>>,
    aborted: Arc<Mutex<usize>>,
    /// Time each handler run takes at least.
    work: Duration,
}

impl Transform {
    fn new(output: &str) -> Self {
        Transform {
            output: output.to_owned(),
            ledger: Arc::new(Ledger::new()),
            committed: Arc::default(),
            aborted: Arc::default(),
            work: Duration::ZERO,
        }
    }
}

#[courier_core::async_trait]
impl Handler for Transform {
    async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        tokio::time::sleep(self.work + Duration::from_millis(fastrand::u64(0..3))).await;
        cx.publish(
            self.output.clone(),
            Message::new(m.id.to_string()).with_id(cx.derive_id("out")),
        );
        let (id, committed, aborted) = (
            m.id.to_string(),
            self.committed.clone(),
            self.aborted.clone(),
        );
        cx.after_commit(move |ok| async move {
            if ok {
                *committed.lock().entry(id).or_default() += 1;
            } else {
                *aborted.lock() += 1;
            }
        });
        self.ledger.handled(m.id.as_str());
        Ok(())
    }

    fn is_idempotent(&self) -> bool {
        true // Kafka → Kafka only: the transaction is the whole effect
    }
}

fn inputs(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("m{i}")).with_key(format!("k{}", i % 64)))
        .collect()
}

async fn spawn(client: Arc<dyn DeliveryClient>, topic: &str, t: Transform) -> ConsumerHandle {
    Consumer::new(client, Subscription::new(topic, "g"))
        .concurrency(8)
        .spawn(t)
        .await
        .unwrap()
}

fn exactly_once_config(boot: &str, transactional_id: &str) -> courier_kafka::Config {
    let mut config = common::config(boot, Guarantee::ExactlyOnce);
    {
        let k = &mut config.backend;
        k.transactional_id = Some(transactional_id.to_owned());
    }
    config
}

/// `(missing, repeated)` inputs among `counts`.
fn tally(msgs: &[Message], counts: &HashMap<String, usize>) -> (usize, usize) {
    let missing = msgs
        .iter()
        .filter(|m| !counts.contains_key(m.id.as_str()))
        .count();
    (missing, counts.values().filter(|n| **n > 1).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_consumer_stops_and_its_replacement_commits_every_input_once() {
    const N: usize = 1_000;
    let boot = courier_testkit::endpoints::kafka_bootstrap();
    let plain: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&common::config(&boot, Guarantee::AtLeastOnce))
            .await
            .unwrap_or_else(|e| courier_testkit::endpoints::unreachable("Kafka", &boot, e)),
    );
    let (topic, output) = (unique("fence-in"), unique("fence-out"));
    plain.create_destination(&topic).await.unwrap();
    plain.create_destination(&output).await.unwrap();
    let msgs = inputs(N);
    plain.publish_batch(&topic, msgs.clone()).await.unwrap();

    let txn = unique("fence-txn");
    // Slow enough (8 lanes x 20 ms) that the fence lands in the middle of the work.
    let first = Transform {
        work: Duration::from_millis(20),
        ..Transform::new(&output)
    };
    let a: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&exactly_once_config(&boot, &txn))
            .await
            .unwrap(),
    );
    let handle = spawn(a, &topic, first.clone()).await;
    let (r, ok) = first
        .ledger
        .wait_until(Duration::from_secs(60), |r| r.handlings >= 100)
        .await;
    assert!(ok, "the first consumer never got going: {r}");
    // Another instance with the same transactional id: the first one's producer is fenced.
    let fencer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &boot)
        .set("transactional.id", &txn)
        .create()
        .unwrap();
    let fencer = tokio::task::spawn_blocking(move || {
        fencer.init_transactions(Duration::from_secs(30)).unwrap();
        fencer
    })
    .await
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(60), handle.join())
        .await
        .expect("a fenced consumer must end its subscription");
    let e = ended.expect_err("the consumer ended without an error");
    assert_eq!(e.kind(), "fenced", "{e}");
    assert!(
        *first.aborted.lock() > 0,
        "the fenced transaction's inputs were told it committed"
    );

    let second = Transform::new(&output);
    let b: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&common::config(&boot, Guarantee::ExactlyOnce))
            .await
            .unwrap(),
    );
    let handle = spawn(b, &topic, second.clone()).await;
    let caught_up = tokio::task::spawn_blocking({
        let (boot, topic) = (boot.clone(), topic.clone());
        move || wait_group_caught_up(&boot, &topic, "g", Duration::from_secs(120))
    })
    .await
    .unwrap();
    handle.shutdown().await.unwrap();
    drop(fencer);
    assert!(caught_up, "the replacement never committed every input");
    let counts = tokio::task::spawn_blocking({
        let (boot, output) = (boot.clone(), output.clone());
        move || committed_payload_counts(&boot, &output, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let (missing, repeated) = tally(&msgs, &counts);
    println!(
        "fenced after {} handled: {missing} inputs without an output, {repeated} with more than one",
        first.ledger.report().handlings
    );
    assert_eq!((missing, repeated), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_transaction_rewinds_and_every_input_commits_once() {
    const N: usize = 1_000;
    let boot = common::mock_bootstrap();
    let (topic, output) = (unique("abort-in"), unique("abort-out"));
    common::mock_create_topic(&topic).unwrap();
    common::mock_create_topic(&output).unwrap();
    let plain: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&common::config(&boot, Guarantee::AtLeastOnce))
            .await
            .unwrap(),
    );
    let msgs = inputs(N);
    let t = Transform::new(&output);
    let client: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&exactly_once_config(&boot, &unique("abort-txn")))
            .await
            .unwrap(),
    );
    let handle = spawn(client, &topic, t.clone()).await;
    plain
        .publish_batch(&topic, msgs[..N / 2].to_vec())
        .await
        .unwrap();
    let (r, ok) = t
        .ledger
        .wait_until(Duration::from_secs(60), |r| r.handlings >= 200)
        .await;
    assert!(ok, "the consumer never got going: {r}");
    // The next transactions cannot add their partitions: they abort.
    common::mock_do(|c| {
        c.request_errors(
            RDKafkaApiKey::AddPartitionsToTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
        );
        Ok(())
    })
    .unwrap();
    plain
        .publish_batch(&topic, msgs[N / 2..].to_vec())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while t.committed.lock().len() < N {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {N} inputs committed",
            t.committed.lock().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.shutdown().await.unwrap();
    let aborted = *t.aborted.lock();
    let committed = t.committed.lock().clone();
    let (missing, repeated) = tally(&msgs, &committed);
    let log = tokio::task::spawn_blocking({
        let (boot, output) = (boot.clone(), output.clone());
        move || committed_payload_counts(&boot, &output, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let (log_missing, log_repeated) = tally(&msgs, &log);
    println!(
        "{aborted} inputs in aborted transactions; commits per input: {missing} missing, {repeated} repeated; committed log: {log_missing} missing, {log_repeated} repeated"
    );
    assert!(
        aborted > 0,
        "no transaction aborted: the injected errors did not bite"
    );
    assert_eq!((missing, repeated), (0, 0), "commits per input");
    assert_eq!(
        (log_missing, log_repeated),
        (0, 0),
        "outputs in the committed log"
    );
}

/// A batch handler cannot commit its outputs with the offsets of all its inputs in one
/// transaction: exactly-once batches are refused with the reason, before subscribing.
#[tokio::test(flavor = "multi_thread")]
async fn batch_handlers_are_refused_under_exactly_once() {
    use courier_core::{batch_handler_fn, BatchOptions, Error};
    let boot = common::mock_bootstrap();
    let client: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&common::config(&boot, Guarantee::ExactlyOnce))
            .await
            .unwrap(),
    );
    let refused = Consumer::new(client, Subscription::new(unique("batch"), "g"))
        .spawn_batch(
            batch_handler_fn(|_ms: Vec<Message>| async { Ok(()) }),
            BatchOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::Unsupported { .. }) && refused.to_string().contains("spawn"),
        "{refused}"
    );
}
