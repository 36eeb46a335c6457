//! courier vs raw aws-sdk-sqs against the same SQS (LocalStack), in one run: one-at-a-time send,
//! batched send (10 entries), and receive + delete. Prints each rate and courier/raw.
//!
//! ```text
//! cargo bench --bench sqs         # SQS_ENDPOINT (default http://127.0.0.1:4566), AWS_REGION, test credentials
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, SendMessageBatchRequestEntry,
};
use courier::config::{Secret, SqsConfig};
use courier::{
    async_trait, BackendConfig, Config, Consumer, Context, DeliveryClient, Guarantee, Handler,
    HandlerError, Message, Subscription,
};

const SINGLE: usize = 1_000;
const BATCHED: usize = 3_000;
/// Receive + delete passes (the side that goes first alternates).
const PASSES: usize = 3;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn body(i: usize) -> String {
    let mut p = format!("payment-{i:08}-");
    p.extend(std::iter::repeat_n('x', 240));
    p
}

fn msg(i: usize) -> Message {
    Message::new(body(i)).with_header("tenant", "acme")
}

fn attr(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .unwrap()
}

/// The raw side's ten send-batch entries of `round`: the same body and attributes courier sends.
fn raw_entries(round: usize) -> Vec<SendMessageBatchRequestEntry> {
    (0..10)
        .map(|j| {
            SendMessageBatchRequestEntry::builder()
                .id(j.to_string())
                .message_body(body(round * 10 + j))
                .message_attributes("courier-id", attr(&uuid::Uuid::now_v7().to_string()))
                .message_attributes("tenant", attr("acme"))
                .build()
                .unwrap()
        })
        .collect()
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
        "{what:<24} raw aws-sdk-sqs {raw:>7.0} msg/s   courier {courier:>7.0} msg/s   ratio {:.2}",
        courier / raw
    );
}

#[tokio::main]
async fn main() {
    let endpoint = env("SQS_ENDPOINT", "http://127.0.0.1:4566");
    let region = env("AWS_REGION", "us-east-1");
    let config = Config {
        guarantee: Guarantee::AtLeastOnce,
        backend: BackendConfig::Sqs(SqsConfig {
            region: Some(region.clone()),
            endpoint: Some(endpoint.clone()),
            access_key_id: Some(env("AWS_ACCESS_KEY_ID", "test")),
            secret_access_key: Some(Secret::new(env("AWS_SECRET_ACCESS_KEY", "test"))),
            wait_time: Duration::from_secs(1),
            ..SqsConfig::default()
        }),
        consumer: Default::default(),
        idempotency: None,
    };
    let client: Arc<dyn DeliveryClient> = Arc::from(courier::connect(&config).await.unwrap());
    let creds = aws_credential_types::Credentials::new(
        env("AWS_ACCESS_KEY_ID", "test"),
        env("AWS_SECRET_ACCESS_KEY", "test"),
        None,
        None,
        "bench",
    );
    let sdk_config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region))
        .endpoint_url(&endpoint)
        .credentials_provider(creds)
        .load()
        .await;
    let sqs = aws_sdk_sqs::Client::new(&sdk_config);
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let (raw_q, cour_q) = (format!("bench-raw-{tag}"), format!("bench-courier-{tag}"));
    let raw_url = sqs
        .create_queue()
        .queue_name(&raw_q)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    client.create_destination(&cour_q).await.unwrap();
    println!("SQS at {endpoint}: 256 B bodies, id + header attributes");

    let (mut raw_d, mut cour_d) = (Duration::ZERO, Duration::ZERO);
    for i in 0..SINGLE {
        let t = Instant::now();
        sqs.send_message()
            .queue_url(&raw_url)
            .message_body(body(i))
            .message_attributes("courier-id", attr(&uuid::Uuid::now_v7().to_string()))
            .message_attributes("tenant", attr("acme"))
            .send()
            .await
            .unwrap();
        raw_d += t.elapsed();
        let t = Instant::now();
        client.publish(&cour_q, msg(i)).await.unwrap();
        cour_d += t.elapsed();
    }
    line(
        "send, one at a time",
        SINGLE as f64 / raw_d.as_secs_f64(),
        SINGLE as f64 / cour_d.as_secs_f64(),
    );

    let (mut raw_d, mut cour_d) = (Duration::ZERO, Duration::ZERO);
    for round in 0..BATCHED / 10 {
        let entries = raw_entries(round);
        let t = Instant::now();
        let out = sqs
            .send_message_batch()
            .queue_url(&raw_url)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
        assert!(out.failed.is_empty());
        raw_d += t.elapsed();
        let batch = (round * 10..round * 10 + 10).map(msg).collect();
        let t = Instant::now();
        client.publish_batch(&cour_q, batch).await.unwrap();
        cour_d += t.elapsed();
    }
    line(
        "send, batches of 10",
        BATCHED as f64 / raw_d.as_secs_f64(),
        BATCHED as f64 / cour_d.as_secs_f64(),
    );

    // Receive + delete: a raw long-poll loop with batch deletes vs courier's consumer, each
    // draining its own queue of `total` messages. Three passes, the side that drains first
    // alternating, the queues refilled (untimed) between passes; rates are over all passes. One
    // pass per side was at the mercy of whatever LocalStack was doing at the time (0.71–0.97).
    let total = SINGLE + BATCHED;
    let (mut raw_d, mut cour_d) = (Duration::ZERO, Duration::ZERO);
    for pass in 0..PASSES {
        if pass > 0 {
            refill(&sqs, &raw_url, &client, &cour_q, total).await;
        }
        let (raw, cour) = if pass % 2 == 0 {
            let raw = drain_raw(&sqs, &raw_url, total).await;
            (raw, drain_courier(&client, &cour_q, total).await)
        } else {
            let cour = drain_courier(&client, &cour_q, total).await;
            (drain_raw(&sqs, &raw_url, total).await, cour)
        };
        println!(
            "  pass {}: raw {:>5.0} msg/s, courier {:>5.0} msg/s ({} first)",
            pass + 1,
            total as f64 / raw.as_secs_f64(),
            total as f64 / cour.as_secs_f64(),
            if pass % 2 == 0 { "raw" } else { "courier" },
        );
        raw_d += raw;
        cour_d += cour;
    }
    let n = (total * PASSES) as f64;
    line(
        "receive + delete",
        n / raw_d.as_secs_f64(),
        n / cour_d.as_secs_f64(),
    );
    // Leave nothing on the broker.
    sqs.delete_queue().queue_url(&raw_url).send().await.unwrap();
    client.delete_destination(&cour_q, &[]).await.unwrap();
    client.close().await.unwrap();
}

/// The raw loop: long-poll receives of up to ten, each answered by one `DeleteMessageBatch`,
/// until `total` messages were deleted. Returns the time taken.
async fn drain_raw(sqs: &aws_sdk_sqs::Client, url: &str, total: usize) -> Duration {
    let t = Instant::now();
    let mut n = 0;
    while n < total {
        let out = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap();
        let msgs = out.messages.unwrap_or_default();
        if msgs.is_empty() {
            continue;
        }
        let entries: Vec<_> = msgs
            .iter()
            .enumerate()
            .map(|(j, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(j.to_string())
                    .receipt_handle(m.receipt_handle.clone().unwrap())
                    .build()
                    .unwrap()
            })
            .collect();
        n += entries.len();
        sqs.delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
    }
    t.elapsed()
}

/// courier's consumer (subscribing included) until it handled `total` messages. Ten handlers
/// at a time, as the raw loop settles ten messages per round trip; their acks share
/// `DeleteMessageBatch` requests.
async fn drain_courier(client: &Arc<dyn DeliveryClient>, queue: &str, total: usize) -> Duration {
    let count = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let h = Consumer::new(client.clone(), Subscription::new(queue, "bench"))
        .concurrency(10)
        .spawn(Count(count.clone()))
        .await
        .unwrap();
    while count.load(Ordering::Relaxed) < total as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = t.elapsed();
    h.shutdown().await.unwrap();
    took
}

/// Put `total` messages back on each queue, ten per request (not timed).
async fn refill(
    sqs: &aws_sdk_sqs::Client,
    raw_url: &str,
    client: &Arc<dyn DeliveryClient>,
    cour_q: &str,
    total: usize,
) {
    for round in 0..total / 10 {
        let entries = raw_entries(round);
        let out = sqs
            .send_message_batch()
            .queue_url(raw_url)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
        assert!(out.failed.is_empty());
        let batch = (round * 10..round * 10 + 10).map(msg).collect();
        client.publish_batch(cour_q, batch).await.unwrap();
    }
}
