//! Cost of the idempotent layer: at-least-once consume of the same messages on the same broker,
//! without the layer and with it (Redis, PostgreSQL and memory stores), in one run.
//!
//! ```text
//! cargo bench --bench idempotency                # RabbitMQ (scripts/services up)
//! cargo bench --bench idempotency -- memory      # the embedded memory broker instead
//! ```
//!
//! Prints consumed messages per second for each variant and the ratio to "no layer".
//! Target for the Redis layer: >= 0.80.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::idempotency::{IdempotencyStore, Idempotent, MemoryStore, PostgresStore, RedisStore};
use courier::{
    async_trait, Config, Consumer, Context, DeliveryClient, Handler, HandlerError, Message,
    Subscription,
};

const MESSAGES: usize = 20_000;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

struct Count(Arc<AtomicU64>);

#[async_trait]
impl Handler for Count {
    async fn handle(&self, _m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Publish MESSAGES to a fresh destination (a group queue declared first), then time how long
/// a consumer takes to handle them all.
async fn run(client: &Arc<dyn DeliveryClient>, store: Option<Arc<dyn IdempotencyStore>>) -> f64 {
    let dest = format!("bench-idem-{}", uuid::Uuid::now_v7().simple());
    let group = "bench";
    client.create_destination(&dest).await.unwrap();
    let sub = client
        .subscribe(Subscription::new(&dest, group))
        .await
        .unwrap();
    sub.close().await.unwrap();
    for chunk in 0..MESSAGES / 500 {
        let batch = (chunk * 500..(chunk + 1) * 500)
            .map(|i| Message::new(format!("payment {i}")).with_key(format!("k{}", i % 128)))
            .collect();
        client.publish_batch(&dest, batch).await.unwrap();
    }
    let n = Arc::new(AtomicU64::new(0));
    let consumer = Consumer::new(client.clone(), Subscription::new(&dest, group)).concurrency(32);
    let t = Instant::now();
    let handle = match store {
        None => consumer.spawn(Count(n.clone())).await.unwrap(),
        Some(s) => consumer
            .spawn(Idempotent::new(Count(n.clone()), s).namespace(dest.clone()))
            .await
            .unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while n.load(Ordering::Relaxed) < MESSAGES as u64 {
        assert!(Instant::now() < deadline, "consumer stalled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = MESSAGES as f64 / t.elapsed().as_secs_f64();
    handle.shutdown().await.unwrap();
    rate
}

#[tokio::main]
async fn main() {
    let memory = std::env::args().skip(1).any(|a| a == "memory");
    let url = if memory {
        "memory://bench-idem?auto_create=true".to_owned()
    } else {
        env("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    };
    let config = Config::from_url(&url).unwrap();
    let client: Arc<dyn DeliveryClient> = Arc::from(courier::connect(&config).await.unwrap());
    let redis: Arc<dyn IdempotencyStore> = Arc::new(
        RedisStore::connect(&env("REDIS_URL", "redis://127.0.0.1:6379"))
            .await
            .unwrap(),
    );
    let postgres: Arc<dyn IdempotencyStore> = Arc::new(
        PostgresStore::connect(&env(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/courier",
        ))
        .await
        .unwrap(),
    );
    println!(
        "at-least-once consume of {MESSAGES} messages on {}, concurrency 32",
        config.backend.kind()
    );
    // Warm-up (connections, queues), not reported.
    let _ = run(&client, None).await;
    let base = run(&client, None).await;
    println!("no layer          {base:>9.0} msg/s   ratio 1.00");
    for (name, store) in [
        ("redis layer", redis),
        ("postgres layer", postgres),
        (
            "memory layer",
            Arc::new(MemoryStore::default()) as Arc<dyn IdempotencyStore>,
        ),
    ] {
        let r = run(&client, Some(store)).await;
        println!("{name:<17} {r:>9.0} msg/s   ratio {:.2}", r / base);
    }
    client.close().await.unwrap();
}
