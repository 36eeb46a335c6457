//! courier vs raw lapin on the same RabbitMQ, in one run: publish with confirms (pipelined
//! batches and one-at-a-time) and consume with manual acks. Prints each rate and courier/raw.
//!
//! ```text
//! cargo bench --bench rabbitmq          # RABBITMQ_URL, default amqp://guest:guest@127.0.0.1:5672/%2f
//! ```
//!
//! Both sides do the same work: persistent messages with `message_id` and headers, `mandatory`,
//! confirms awaited, a durable topic exchange with a quorum queue bound to it, prefetch 64.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{
    async_trait, Config, Consumer, Context, DeliveryClient, Handler, HandlerError, Message,
    Subscription,
};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

const BATCHED: usize = 20_000;
const BATCH: usize = 500;
const SINGLE: usize = 2_000;

fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("payment-{i:08}-").into_bytes();
    p.resize(256, b'x');
    p
}

async fn raw_topology(ch: &Channel, name: &str) {
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let q = format!("{name}.g");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.as_str().into(),
        name.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

fn raw_props() -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    BasicProperties::default()
        .with_message_id(uuid::Uuid::now_v7().to_string().into())
        .with_delivery_mode(2)
        .with_content_type("application/octet-stream".into())
        .with_headers(headers)
}

async fn raw_publish(ch: &Channel, exchange: &str, from: usize, n: usize) {
    let mut confirms = Vec::with_capacity(n);
    for i in from..from + n {
        let c = ch
            .basic_publish(
                exchange.into(),
                format!("k{}", i % 64).as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &payload(i),
                raw_props(),
            )
            .await
            .unwrap();
        confirms.push(c);
    }
    for c in futures::future::join_all(confirms).await {
        assert!(c.unwrap().is_ack());
    }
}

fn msg(i: usize) -> Message {
    Message::new(payload(i))
        .with_key(format!("k{}", i % 64))
        .with_header("tenant", "acme")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Raw,
    Courier,
}

/// Raw first in even rounds, courier first in odd ones.
fn order(round: usize) -> [Side; 2] {
    if round % 2 == 0 {
        [Side::Raw, Side::Courier]
    } else {
        [Side::Courier, Side::Raw]
    }
}

struct Count(Arc<AtomicU64>);

#[async_trait]
impl Handler for Count {
    async fn handle(&self, _m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn line(what: &str, raw: f64, courier: f64) {
    println!(
        "{what:<28} raw lapin {raw:>8.0} msg/s   courier {courier:>8.0} msg/s   ratio {:.2}",
        courier / raw
    );
}

#[tokio::main]
async fn main() {
    let url = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let client: Arc<dyn DeliveryClient> = Arc::from(
        courier::connect(&Config::from_url(&url).unwrap())
            .await
            .unwrap(),
    );
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let (raw_x, cour_x) = (format!("bench-raw-{tag}"), format!("bench-courier-{tag}"));
    raw_topology(&ch, &raw_x).await;
    client.create_destination(&cour_x).await.unwrap();
    client
        .subscribe(Subscription::new(&cour_x, "g"))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    println!("RabbitMQ, 256 B persistent messages, confirms, quorum queues");

    // Warm-up.
    raw_publish(&ch, &raw_x, 0, BATCH).await;
    client
        .publish_batch(&cour_x, (0..BATCH).map(msg).collect())
        .await
        .unwrap();

    // Publish, pipelined batches of 500, in rounds; which side goes first alternates, so neither
    // always meets the broker still busy with the other's work.
    let (mut raw_t, mut cour_t) = (Duration::ZERO, Duration::ZERO);
    for round in 0..BATCHED / BATCH {
        for side in order(round) {
            if side == Side::Raw {
                let t = Instant::now();
                raw_publish(&ch, &raw_x, round * BATCH, BATCH).await;
                raw_t += t.elapsed();
            } else {
                let batch = (round * BATCH..(round + 1) * BATCH).map(msg).collect();
                let t = Instant::now();
                client.publish_batch(&cour_x, batch).await.unwrap();
                cour_t += t.elapsed();
            }
        }
    }
    line(
        "publish, batches of 500",
        BATCHED as f64 / raw_t.as_secs_f64(),
        BATCHED as f64 / cour_t.as_secs_f64(),
    );

    // Publish one at a time, each confirm awaited.
    let (mut raw_t, mut cour_t) = (Duration::ZERO, Duration::ZERO);
    for i in 0..SINGLE {
        for side in order(i) {
            let t = Instant::now();
            if side == Side::Raw {
                raw_publish(&ch, &raw_x, i, 1).await;
                raw_t += t.elapsed();
            } else {
                client.publish(&cour_x, msg(i)).await.unwrap();
                cour_t += t.elapsed();
            }
        }
    }
    line(
        "publish, one at a time",
        SINGLE as f64 / raw_t.as_secs_f64(),
        SINGLE as f64 / cour_t.as_secs_f64(),
    );

    let total = (BATCHED + SINGLE + BATCH) as u64;
    // Consume with manual acks, prefetch 64: raw.
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(64, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            format!("{raw_x}.g").as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let t = Instant::now();
    let mut n = 0;
    while n < total {
        let d = consumer.next().await.unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        n += 1;
    }
    let raw_rate = total as f64 / t.elapsed().as_secs_f64();

    // Consume: courier's consume loop (at-least-once: ack after the handler).
    let count = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let h = Consumer::new(client.clone(), Subscription::new(&cour_x, "g"))
        .spawn(Count(count.clone()))
        .await
        .unwrap();
    while count.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cour_rate = total as f64 / t.elapsed().as_secs_f64();
    h.shutdown().await.unwrap();
    line("consume + ack", raw_rate, cour_rate);
    // Leave nothing on the broker: quorum queues of earlier runs slow a small node down.
    let dlq = format!("{cour_x}-dlq");
    for (x, groups) in [(&raw_x, &["g"][..]), (&cour_x, &["g"][..]), (&dlq, &[][..])] {
        client.delete_destination(x, groups).await.unwrap();
    }
    client.close().await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}
