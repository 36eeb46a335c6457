//! courier vs raw rdkafka on the same Kafka-protocol broker, in one run: at-least-once publish
//! (acks=all, idempotent producer), at-least-once consume with commit-after-handler, at-most-once
//! consume with commit-before-handler,
//! exactly-once transactional batches vs at-least-once batches, and consume-transform-produce
//! (one output per input): courier exactly-once and at-least-once vs raw rdkafka at-least-once.
//!
//! ```text
//! cargo bench --bench kafka        # KAFKA_BOOTSTRAP, default 127.0.0.1:9092 (scripts/services up)
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::config::KafkaConfig;
use courier::{
    async_trait, Config, Consumer, Context, DeliveryClient, Guarantee, Handler, HandlerError,
    Message, Subscription,
};
use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

const N: usize = 20_000;
const BATCH: usize = 500;
/// Records the at-most-once consume reads (each costs a commit round trip before its handler).
const N_AMO: usize = 4_000;

fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("payment-{i:08}-").into_bytes();
    p.resize(256, b'x');
    p
}

fn msg(i: usize) -> Message {
    Message::new(payload(i))
        .with_key(format!("k{}", i % 64))
        .with_header("tenant", "acme")
}

fn kafka_section(bootstrap: &str) -> KafkaConfig {
    KafkaConfig {
        bootstrap: bootstrap.to_owned(),
        session_timeout: Duration::from_secs(6),
        max_poll_interval: Duration::from_secs(10),
        ..KafkaConfig::default()
    }
}

fn config(bootstrap: &str, g: Guarantee) -> Config {
    Config {
        guarantee: g,
        backend: kafka_section(bootstrap).into(),
        consumer: Default::default(),
        idempotency: (g == Guarantee::ExactlyOnce).then(Default::default),
    }
}

/// Counts up to a target and wakes the waiter when it is reached.
struct Tally {
    n: AtomicU64,
    target: u64,
    reached: tokio::sync::Notify,
}

impl Tally {
    fn new(target: usize) -> Arc<Self> {
        Arc::new(Tally {
            n: AtomicU64::new(0),
            target: target as u64,
            reached: tokio::sync::Notify::new(),
        })
    }

    fn add(&self) {
        if self.n.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.reached.notify_one();
        }
    }

    /// Wait until the target was counted (bounded: a stalled run fails the bench).
    async fn reached(&self) {
        tokio::time::timeout(Duration::from_secs(300), self.reached.notified())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {} after 300 s",
                    self.n.load(Ordering::Relaxed),
                    self.target
                )
            });
    }
}

struct Count(Arc<Tally>);

#[async_trait]
impl Handler for Count {
    async fn handle(&self, _m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        self.0.add();
        Ok(())
    }
}

/// Stages one output per input; counts inputs whose output and settle are final.
struct Transform {
    output: String,
    done: Arc<Tally>,
}

#[async_trait]
impl Handler for Transform {
    async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        cx.publish(
            self.output.clone(),
            Message::new(m.payload.clone()).with_id(cx.derive_id("out")),
        );
        let done = self.done.clone();
        cx.after_commit(move |ok| async move {
            if ok {
                done.add();
            }
        });
        Ok(())
    }

    fn is_idempotent(&self) -> bool {
        true // Kafka → Kafka: the transaction is the whole effect
    }
}

/// How a raw consumer commits.
enum Commit {
    /// Auto-commit what the loop stored (at-least-once: stored after processing).
    Stored,
    /// Only what the loop commits itself (at-most-once: before processing).
    Explicit,
}

/// A raw rdkafka consumer of `topic` in `group`, reading from the start.
fn raw_consumer(boot: &str, group: &str, topic: &str, commit: Commit) -> StreamConsumer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", boot)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "10000");
    match commit {
        Commit::Stored => c
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false"),
        Commit::Explicit => c.set("enable.auto.commit", "false"),
    };
    let consumer: StreamConsumer = c.create().unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

fn line(what: &str, a: &str, ra: f64, b: &str, rb: f64) {
    println!(
        "{what:<34} {a} {ra:>8.0} msg/s   {b} {rb:>8.0} msg/s   ratio {:.2}",
        rb / ra
    );
}

async fn raw_publish(p: &FutureProducer, topic: &str, from: usize) {
    let futs: Vec<_> = (from..from + BATCH)
        .map(|i| {
            let key = format!("k{}", i % 64);
            let id = uuid::Uuid::now_v7().to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "courier-id",
                    value: Some(id.as_str()),
                })
                .insert(Header {
                    key: "tenant",
                    value: Some("acme"),
                });
            let body = payload(i);
            let record = FutureRecord::to(topic)
                .key(&key)
                .payload(&body)
                .headers(headers);
            p.send_result(record).map_err(|(e, _)| e).unwrap()
        })
        .collect();
    for r in futures::future::join_all(futs).await {
        r.unwrap().unwrap();
    }
}

#[tokio::main]
async fn main() {
    let boot = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let alo: Arc<dyn DeliveryClient> = Arc::from(
        courier::connect(&config(&boot, Guarantee::AtLeastOnce))
            .await
            .unwrap(),
    );
    let eo: Arc<dyn DeliveryClient> = Arc::from(
        courier::connect(&config(&boot, Guarantee::ExactlyOnce))
            .await
            .unwrap(),
    );
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let (raw_t, cour_t, eo_t) = (
        format!("bench-raw-{tag}"),
        format!("bench-courier-{tag}"),
        format!("bench-eo-{tag}"),
    );
    for t in [&raw_t, &cour_t, &eo_t] {
        alo.create_destination(t).await.unwrap();
    }
    // The reference producer gets exactly the settings courier's at-least-once producer uses
    // (acks, idempotence, delivery timeout, message size; linger and batch size are librdkafka's
    // defaults for both), so the ratio measures the adapter, not two configurations.
    let shared = courier::kafka::producer_settings(
        &config(&boot, Guarantee::AtLeastOnce).with_backend(kafka_section(&boot)),
    )
    .unwrap();
    let mut raw_config = ClientConfig::new();
    for (name, value) in &shared {
        raw_config.set(name, value);
    }
    raw_config.set_log_level(rdkafka::config::RDKafkaLogLevel::Error);
    let producer: FutureProducer = raw_config.create().unwrap();
    // courier fetches a topic's metadata before its first publish to it (to report a missing
    // topic); the raw producer does the same.
    producer
        .client()
        .fetch_metadata(Some(&raw_t), Duration::from_secs(10))
        .unwrap();
    println!("Kafka at {boot}: 256 B records, key + courier-id + 1 header");
    let shown: Vec<String> = shared
        .iter()
        .filter(|(n, _)| n != "bootstrap.servers")
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    println!("producer settings (raw and courier): {}", shown.join(" "));

    // Publish, at-least-once, batches of 500 (rounds interleaved; who goes first alternates).
    let (mut raw_d, mut cour_d) = (Duration::ZERO, Duration::ZERO);
    for round in 0..N / BATCH {
        for side in [round % 2, 1 - round % 2] {
            if side == 0 {
                let t = Instant::now();
                raw_publish(&producer, &raw_t, round * BATCH).await;
                raw_d += t.elapsed();
            } else {
                let batch = (round * BATCH..(round + 1) * BATCH).map(msg).collect();
                let t = Instant::now();
                alo.publish_batch(&cour_t, batch).await.unwrap();
                cour_d += t.elapsed();
            }
        }
    }
    line(
        "publish at-least-once (batches)",
        "raw rdkafka",
        N as f64 / raw_d.as_secs_f64(),
        "courier",
        N as f64 / cour_d.as_secs_f64(),
    );
    let alo_rate = N as f64 / cour_d.as_secs_f64();

    // Exactly-once: each batch one transaction.
    let t = Instant::now();
    for round in 0..N / BATCH / 4 {
        let batch = (round * BATCH..(round + 1) * BATCH).map(msg).collect();
        eo.publish_batch(&eo_t, batch).await.unwrap();
    }
    let eo_rate = (N / 4) as f64 / t.elapsed().as_secs_f64();
    line(
        "exactly-once txn batches vs ALO",
        "courier ALO",
        alo_rate,
        "courier EO",
        eo_rate,
    );

    // Consume at-least-once: raw = store the offset after processing, auto-commit the stored.
    let consumer = raw_consumer(&boot, &format!("bench-raw-{tag}"), &raw_t, Commit::Stored);
    let t = Instant::now();
    {
        let mut stream = consumer.stream();
        let mut n = 0;
        while n < N {
            let m = stream.next().await.unwrap().unwrap();
            consumer.store_offset_from_message(&m).unwrap();
            n += 1;
        }
    }
    consumer.commit_consumer_state(CommitMode::Sync).unwrap();
    let raw_rate = N as f64 / t.elapsed().as_secs_f64();

    let count = Tally::new(N);
    let t = Instant::now();
    let h = Consumer::new(alo.clone(), Subscription::new(&cour_t, "bench"))
        .spawn(Count(count.clone()))
        .await
        .unwrap();
    count.reached().await;
    let cour_rate = N as f64 / t.elapsed().as_secs_f64();
    h.shutdown().await.unwrap();
    line(
        "consume at-least-once (commit after)",
        "raw rdkafka",
        raw_rate,
        "courier",
        cour_rate,
    );
    println!("(consume times include joining the group on both sides)");

    // Consume at-most-once: every offset committed before its handler runs. Raw: commit each
    // record synchronously, then handle it. courier: concurrency 8; its commits go one at a time
    // per subscription, each covering what every lane has taken by then.
    let raw_amo = {
        let consumer = raw_consumer(
            &boot,
            &format!("bench-raw-amo-{tag}"),
            &raw_t,
            Commit::Explicit,
        );
        let t = Instant::now();
        {
            let mut stream = consumer.stream();
            for _ in 0..N_AMO {
                let m = stream.next().await.unwrap().unwrap();
                consumer.commit_message(&m, CommitMode::Sync).unwrap();
            }
        }
        N_AMO as f64 / t.elapsed().as_secs_f64()
    };
    let amo: Arc<dyn DeliveryClient> = Arc::from(
        courier::connect(&config(&boot, Guarantee::AtMostOnce))
            .await
            .unwrap(),
    );
    let count = Tally::new(N_AMO);
    let t = Instant::now();
    let h = Consumer::new(amo.clone(), Subscription::new(&cour_t, "bench-amo"))
        .concurrency(8)
        .spawn(Count(count.clone()))
        .await
        .unwrap();
    count.reached().await;
    let cour_amo = N_AMO as f64 / t.elapsed().as_secs_f64();
    h.shutdown().await.unwrap();
    amo.close().await.unwrap();
    line(
        "consume at-most-once (commit before)",
        "raw rdkafka",
        raw_amo,
        "courier",
        cour_amo,
    );

    // Consume-transform-produce: one output per input. The reference is raw rdkafka
    // at-least-once consume-and-publish: produce each output without waiting, store the input's
    // offset when its output's delivery report arrives, auto-commit what is stored.
    let raw_ctp = {
        let out = format!("bench-ctp-raw-{tag}");
        alo.create_destination(&out).await.unwrap();
        let consumer = raw_consumer(
            &boot,
            &format!("bench-raw-ctp-{tag}"),
            &cour_t,
            Commit::Stored,
        );
        let t = Instant::now();
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut stream = consumer.stream();
        let (mut read, mut done) = (0, 0);
        while done < N {
            tokio::select! {
                m = stream.next(), if read < N && pending.len() < 10_000 => {
                    let m = m.unwrap().unwrap();
                    let (p, o) = (m.partition(), m.offset());
                    let record = FutureRecord::to(&out)
                        .payload(m.payload().unwrap_or_default())
                        .key(m.key().unwrap_or_default());
                    let delivery = producer.send_result(record).map_err(|(e, _)| e).unwrap();
                    pending.push(async move { (delivery.await, p, o) });
                    read += 1;
                }
                Some((r, p, o)) = pending.next() => {
                    r.unwrap().unwrap();
                    consumer.store_offset(&cour_t, p, o).unwrap();
                    done += 1;
                }
            }
        }
        drop(stream);
        consumer.commit_consumer_state(CommitMode::Sync).unwrap();
        N as f64 / t.elapsed().as_secs_f64()
    };

    // courier: concurrency 8, an input counted when its output and its settle are final
    // (Context::after_commit). At-least-once enqueues the outputs and marks the input done once
    // they are confirmed; exactly-once commits outputs and offsets in one transaction per commit
    // interval.
    let mut rates = Vec::new();
    for (g, client) in [
        (Guarantee::AtLeastOnce, &alo),
        (Guarantee::ExactlyOnce, &eo),
    ] {
        let out = format!("bench-ctp-{g}-{tag}");
        client.create_destination(&out).await.unwrap();
        let done = Tally::new(N);
        let t = Instant::now();
        let h = Consumer::new(
            client.clone(),
            Subscription::new(&cour_t, format!("ctp-{g}")),
        )
        .concurrency(8)
        .spawn(Transform {
            output: out,
            done: done.clone(),
        })
        .await
        .unwrap();
        done.reached().await;
        rates.push(N as f64 / t.elapsed().as_secs_f64());
        h.shutdown().await.unwrap();
    }
    line(
        "consume-transform-produce EO",
        "raw ALO",
        raw_ctp,
        "courier EO",
        rates[1],
    );
    line(
        "consume-transform-produce ALO",
        "raw ALO",
        raw_ctp,
        "courier ALO",
        rates[0],
    );
    line(
        "consume-transform-produce EO vs ALO",
        "courier ALO",
        rates[0],
        "courier EO",
        rates[1],
    );
    // Leave nothing on the broker (topics and the groups of this run).
    for t in [&raw_t, &cour_t, &eo_t] {
        alo.delete_destination(t, &[]).await.unwrap();
    }
    for out in [
        format!("bench-ctp-raw-{tag}"),
        format!("bench-ctp-{}-{tag}", Guarantee::AtLeastOnce),
        format!("bench-ctp-{}-{tag}", Guarantee::ExactlyOnce),
    ] {
        alo.delete_destination(&out, &[]).await.unwrap();
    }
    alo.close().await.unwrap();
    eo.close().await.unwrap();
}
