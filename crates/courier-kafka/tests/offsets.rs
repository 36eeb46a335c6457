//! At-least-once offsets: what is committed is exactly the next offset after the processed
//! messages of each partition — never past an unprocessed one, never short of a processed one.
//! (A regression test: `rd_kafka_offset_store` adds one to what it is given.)

mod common;

use std::collections::HashMap;
use std::time::Duration;

use courier_core::{DeliveryClient, Guarantee, Message, Position, Subscription};
use rdkafka::consumer::{BaseConsumer, Consumer};

#[tokio::test(flavor = "multi_thread")]
async fn committed_offsets_match_processed_messages() {
    let boot = common::mock_bootstrap();
    let topic = courier_testkit::unique("offsets");
    common::mock_create_topic(&topic).unwrap();
    let client = courier_kafka::connect(&common::config(&boot, Guarantee::AtLeastOnce))
        .await
        .unwrap();
    let mut d = client
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .unwrap();
    for i in 0..30 {
        client
            .publish(
                &topic,
                Message::new(format!("{i}")).with_key(format!("k{i}")),
            )
            .await
            .unwrap();
    }
    // Process 30 messages but leave one unsettled in the middle of its partition.
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut held = None;
    for i in 0..30 {
        let delivery = d
            .next_timeout(Duration::from_secs(30))
            .await
            .expect("delivery")
            .unwrap();
        let Position::Offset { partition, offset } = delivery.position else {
            panic!()
        };
        if i == 10 {
            held = Some((partition, offset, delivery));
            continue;
        }
        if held.as_ref().is_none_or(|(p, _, _)| *p != partition) {
            next.insert(partition, offset + 1);
        }
        delivery.ack().await.unwrap();
    }
    let (held_p, held_o, held_d) = held.unwrap();
    next.insert(held_p, held_o); // the unsettled message is the committable position
    drop(held_d);
    d.close().await.unwrap();
    let bc: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &boot)
        .set("group.id", "g")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(&topic, p);
    }
    let committed = bc.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    for el in committed.elements() {
        // No commit means "from the beginning": the same as a committed 0.
        let expected = next.get(&el.partition()).copied().unwrap_or(0);
        let got = match el.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => 0,
        };
        assert_eq!(
            got,
            expected,
            "partition {}: committed {:?}, processed up to {:?}",
            el.partition(),
            got,
            expected
        );
    }
}

/// A retry waiting for its backoff is held beside the receive loop: the records behind it (and
/// in other partitions) keep being handled meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_waiting_for_its_backoff_does_not_hold_back_other_records() {
    use courier_core::{handler_fn, Consumer, HandlerError, RetryPolicy};
    use std::sync::Arc;

    let boot = courier_testkit::endpoints::kafka_bootstrap();
    let client: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&common::config(&boot, Guarantee::AtLeastOnce))
            .await
            .unwrap_or_else(|e| courier_testkit::endpoints::unreachable("Kafka", &boot, e)),
    );
    let topic = courier_testkit::unique("backoff");
    client.create_destination(&topic).await.unwrap();
    let events = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let handler = {
        let events = events.clone();
        let attempts = Arc::new(parking_lot::Mutex::new(HashMap::<String, u32>::new()));
        handler_fn(move |m: Message| {
            let (events, attempts, tx) = (events.clone(), attempts.clone(), tx.clone());
            async move {
                let body = String::from_utf8_lossy(&m.payload).into_owned();
                let n = {
                    let mut a = attempts.lock();
                    let n = a.entry(body.clone()).or_default();
                    *n += 1;
                    *n
                };
                events.lock().push(format!("{body}#{n}"));
                let _ = tx.send(format!("{body}#{n}"));
                if body == "slow" && n == 1 {
                    return Err(HandlerError::retryable("first attempt fails"));
                }
                Ok(())
            }
        })
    };
    let consumer = Consumer::new(
        client.clone(),
        Subscription::new(&topic, courier_testkit::unique("g")),
    )
    .concurrency(4)
    .retry(RetryPolicy::attempts(3).backoff(Duration::from_secs(5), Duration::from_secs(5)))
    .spawn(handler)
    .await
    .unwrap();
    client.publish(&topic, Message::new("slow")).await.unwrap();
    wait_for(&mut rx, "slow#1").await;
    // The failed attempt's copy (with its not-before time) is published before the handler's
    // run counts as settled: wait until the consumer has nothing in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while consumer.stats().retried == 0 || consumer.stats().in_flight > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retry was never scheduled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..20 {
        client
            .publish(
                &topic,
                Message::new(format!("fast{i}")).with_key(format!("k{i}")),
            )
            .await
            .unwrap();
    }
    wait_for(&mut rx, "slow#2").await;
    consumer.shutdown().await.unwrap();
    let events = events.lock().clone();
    let slow = events.iter().position(|e| e == "slow#2").unwrap();
    let fast_after: Vec<&String> = events[slow..]
        .iter()
        .filter(|e| e.starts_with("fast"))
        .collect();
    assert!(
        fast_after.is_empty(),
        "records published after the retry waited for its 5 s backoff: {fast_after:?} came after it ({events:?})"
    );
    assert_eq!(
        events.iter().filter(|e| e.starts_with("fast")).count(),
        20,
        "{events:?}"
    );
}

/// Wait (up to a minute) until the handler reports `want`.
async fn wait_for(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let next = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{want} never handled"))
            .expect("handler alive");
        if next == want {
            return;
        }
    }
}

/// At-least-once with outputs: an output that cannot be published sends its input round again
/// (the next attempt), the failed run's after-commit step learns it was not committed, and the
/// input is settled only once a run's outputs are published.
#[tokio::test(flavor = "multi_thread")]
async fn an_output_that_cannot_be_published_sends_its_input_round_again() {
    use courier_core::{Consumer, Context, Handler, HandlerError};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    struct FirstOutputInvalid {
        out: String,
        tx: tokio::sync::mpsc::UnboundedSender<String>,
        runs: AtomicU32,
    }

    #[courier_core::async_trait]
    impl Handler for FirstOutputInvalid {
        async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
            let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
            // The first run addresses a topic name Kafka refuses; the second a real topic.
            let to = if run == 1 {
                "no spaces allowed".to_owned()
            } else {
                self.out.clone()
            };
            cx.publish(to, Message::new(m.payload.clone()));
            let tx = self.tx.clone();
            let attempt = cx.attempt();
            cx.after_commit(move |committed| async move {
                let _ = tx.send(format!("attempt {attempt} committed={committed}"));
            });
            Ok(())
        }
    }

    let boot = courier_testkit::endpoints::kafka_bootstrap();
    let client: Arc<dyn DeliveryClient> = Arc::new(
        courier_kafka::connect(&common::config(&boot, Guarantee::AtLeastOnce))
            .await
            .unwrap_or_else(|e| courier_testkit::endpoints::unreachable("Kafka", &boot, e)),
    );
    let topic = courier_testkit::unique("out-fails");
    let out = courier_testkit::unique("out-fails-out");
    client.create_destination(&topic).await.unwrap();
    client.create_destination(&out).await.unwrap();
    let mut outputs = client
        .subscribe(Subscription::new(&out, courier_testkit::unique("reader")))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let consumer = Consumer::new(
        client.clone(),
        Subscription::new(&topic, courier_testkit::unique("g")),
    )
    .spawn(FirstOutputInvalid {
        out: out.clone(),
        tx,
        runs: AtomicU32::new(0),
    })
    .await
    .unwrap();
    client
        .publish(&topic, Message::new("payload"))
        .await
        .unwrap();
    wait_for(&mut rx, "attempt 1 committed=false").await;
    wait_for(&mut rx, "attempt 2 committed=true").await;
    let d = outputs
        .next_timeout(Duration::from_secs(60))
        .await
        .expect("the second run's output arrives")
        .unwrap();
    assert_eq!(&d.message.payload[..], b"payload");
    d.ack().await.unwrap();
    let stats = consumer.shutdown().await.unwrap();
    assert_eq!(stats.handled, 2, "{stats:?}");
    outputs.close().await.unwrap();
}
