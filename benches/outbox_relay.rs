//! Outbox relay throughput and commit→publish latency, per backend.
//!
//! ```text
//! cargo bench --bench outbox_relay                 # memory, RabbitMQ and Kafka (scripts/services up)
//! cargo bench --bench outbox_relay -- rabbitmq     # one backend
//! ```
//!
//! Throughput: 20,000 committed rows, one relay, time until the backlog is empty; the same
//! messages published by `publish_batch` directly (no outbox) in the same run give the ratio.
//! Latency: single-row transactions at a steady 500/s while the relay waits on LISTEN/NOTIFY;
//! p50/p99 of commit→published (the relay marks a row only after the broker confirmed it).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::outbox::{self, enqueue, Relay};
use courier::{Config, DeliveryClient, Message, Subscription};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

const ROWS: usize = 20_000;
const LATENCY_ROWS: usize = 2_000;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

async fn pool(schema: &str) -> PgPool {
    let url = env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/courier");
    let admin = PgPool::connect(&url).await.expect("PostgreSQL reachable");
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let opts: PgConnectOptions = url.parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(opts.options([("search_path", schema)]))
        .await
        .unwrap();
    outbox::migrate(&pool).await.unwrap();
    pool
}

fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("order-{i:08}-").into_bytes();
    p.resize(256, b'x');
    p
}

async fn fill(pool: &PgPool, dest: &str, rows: usize) {
    for chunk in 0..rows.div_ceil(500) {
        let mut tx = pool.begin().await.unwrap();
        for i in chunk * 500..((chunk + 1) * 500).min(rows) {
            let m = Message::new(payload(i)).with_key(format!("k{}", i % 64));
            enqueue(&mut tx, dest, m).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
}

async fn wait_empty(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while outbox::status(pool).await.unwrap().backlog > 0 {
        assert!(Instant::now() < deadline, "relay never drained the outbox");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn bench(name: &str, url: &str) {
    let config = Config::from_url(url).unwrap();
    let client: Arc<dyn DeliveryClient> = Arc::from(courier::connect(&config).await.unwrap());
    let schema = format!("bench_outbox_{name}");
    let pool = pool(&schema).await;
    let dest = format!("bench-outbox-{}", uuid::Uuid::now_v7().simple());
    client.create_destination(&dest).await.unwrap();

    // Direct publish_batch of the same messages (the ceiling the relay is measured against).
    let direct_dest = format!("{dest}-direct");
    client.create_destination(&direct_dest).await.unwrap();
    // Declare a consumer group on both (a RabbitMQ exchange without a bound queue refuses
    // messages as unroutable).
    for d in [&dest, &direct_dest] {
        let sub = client
            .subscribe(Subscription::new(d.as_str(), "bench"))
            .await
            .unwrap();
        sub.close().await.unwrap();
    }
    let t = Instant::now();
    for chunk in 0..ROWS / 500 {
        let batch = (chunk * 500..(chunk + 1) * 500)
            .map(|i| Message::new(payload(i)).with_key(format!("k{}", i % 64)))
            .collect();
        client.publish_batch(&direct_dest, batch).await.unwrap();
    }
    let direct = ROWS as f64 / t.elapsed().as_secs_f64();

    fill(&pool, &dest, ROWS).await;
    let t = Instant::now();
    let relay = Relay::new(pool.clone(), client.clone())
        .batch_size(500)
        .spawn()
        .await
        .unwrap();
    wait_empty(&pool).await;
    let relayed = ROWS as f64 / t.elapsed().as_secs_f64();
    relay.shutdown().await.unwrap();

    // Latency with LISTEN/NOTIFY: a fresh relay, rows trickling in one transaction each.
    let relay = Relay::new(pool.clone(), client.clone())
        .spawn()
        .await
        .unwrap();
    let stats = relay.stats();
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    for i in 0..LATENCY_ROWS {
        tick.tick().await;
        let mut tx = pool.begin().await.unwrap();
        enqueue(
            &mut tx,
            &dest,
            Message::new(payload(i)).with_key(format!("k{}", i % 64)),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    wait_empty(&pool).await;
    let p50 = stats.latency_quantile(0.50).unwrap();
    let p99 = stats.latency_quantile(0.99).unwrap();
    let n = stats.published.load(Ordering::Relaxed);
    relay.shutdown().await.unwrap();
    // Leave nothing on the broker.
    for d in [
        dest.clone(),
        direct_dest.clone(),
        format!("{dest}-dlq"),
        format!("{direct_dest}-dlq"),
    ] {
        client.delete_destination(&d, &["bench"]).await.unwrap();
    }
    client.close().await.unwrap();
    println!(
        "{name:<9} relay {relayed:>8.0} msg/s   direct publish_batch {direct:>8.0} msg/s   ratio {:.2}   commit->published p50 {:>6.1} ms  p99 {:>6.1} ms  ({n} rows at 500/s)",
        relayed / direct,
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |n: &str| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str()));
    println!("outbox relay: {ROWS} rows of 256 B, batches of 500, 64 keys");
    if want("memory") {
        bench("memory", "memory://bench?auto_create=true").await;
    }
    if want("rabbitmq") {
        bench(
            "rabbitmq",
            &env("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        )
        .await;
    }
    if want("kafka") {
        bench(
            "kafka",
            &format!("kafka://{}", env("KAFKA_BOOTSTRAP", "127.0.0.1:9092")),
        )
        .await;
    }
}
