//! Cost of the idempotent layer: at-least-once consume of the same messages on the same broker,
//! without the layer and with it (Redis, PostgreSQL and memory stores), in one run.
//!
//! ```text
//! cargo bench --bench idempotency                # RabbitMQ (scripts/services up)
//! cargo bench --bench idempotency -- memory      # the embedded memory broker instead
//! ```
//!
//! Prints consumed messages per second for each variant and the ratio to "no layer" (the Redis
//! layer as the median of five alternating pairs of runs), with how many keys each layered run
//! claimed ahead in batches (`Handler::prepare`), then what the Redis store does alone, without a
//! broker. Target for the Redis layer: >= 0.80.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::idempotency::{IdempotencyStore, Idempotent, MemoryStore, PostgresStore, RedisStore};
use courier::{
    async_trait, Config, Consumer, Context, DeliveryClient, Handler, HandlerError, Message,
    Subscription,
};

const MESSAGES: usize = 20_000;
/// Pairs of runs without and with the Redis layer.
const ROUNDS: usize = 5;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    let mut stats = None;
    let handle = match store {
        None => consumer.spawn(Count(n.clone())).await.unwrap(),
        Some(s) => {
            let layer = Idempotent::new(Count(n.clone()), s).namespace(dest.clone());
            stats = Some(layer.stats());
            consumer.spawn(layer).await.unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while n.load(Ordering::Relaxed) < MESSAGES as u64 {
        assert!(Instant::now() < deadline, "consumer stalled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = MESSAGES as f64 / t.elapsed().as_secs_f64();
    handle.shutdown().await.unwrap();
    if let Some(s) = stats {
        let ahead = s.claimed_ahead.load(Ordering::Relaxed);
        println!("    ({ahead} of {MESSAGES} keys claimed ahead, in batches)");
    }
    // Leave nothing on the broker (RabbitMQ quorum queues of earlier runs slow the node down).
    for d in [dest.clone(), format!("{dest}-dlq")] {
        client.delete_destination(&d, &[group]).await.unwrap();
    }
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
    // A run takes about a second, so one pair of them is at the mercy of whatever else the
    // machine does at that moment: pair "no layer" with "Redis layer" ROUNDS times, the side
    // that goes first alternating, and report the median of the pairs' ratios.
    let mut bases = Vec::new();
    let mut ratios = Vec::new();
    for round in 0..ROUNDS {
        let (base, with) = if round % 2 == 0 {
            let base = run(&client, None).await;
            (base, run(&client, Some(redis.clone())).await)
        } else {
            let with = run(&client, Some(redis.clone())).await;
            (run(&client, None).await, with)
        };
        println!(
            "  round {}: no layer {base:>7.0} msg/s, redis layer {with:>7.0} msg/s, ratio {:.2}",
            round + 1,
            with / base
        );
        bases.push(base);
        ratios.push(with / base);
    }
    let base = median(&mut bases);
    println!("no layer          {base:>9.0} msg/s   ratio 1.00 (median of {ROUNDS})");
    println!(
        "redis layer                       ratio {:.2} (median of the {ROUNDS} rounds' ratios)",
        median(&mut ratios)
    );
    for (name, store) in [
        ("postgres layer", postgres),
        (
            "memory layer",
            Arc::new(MemoryStore::default()) as Arc<dyn IdempotencyStore>,
        ),
    ] {
        let r = run(&client, Some(store)).await;
        println!("{name:<17} {r:>9.0} msg/s   ratio {:.2}", r / base);
    }
    // The store alone (no broker): begin + complete of fresh keys by 32 concurrent tasks.
    let r = store_alone(&redis).await;
    println!("redis store alone {r:>9.0} begin+complete/s (no broker)");
    client.close().await.unwrap();
}

/// Begin + complete of `MESSAGES` fresh keys from 32 concurrent tasks: what the store costs
/// without a broker sharing the machine.
async fn store_alone(store: &Arc<dyn IdempotencyStore>) -> f64 {
    let ns = uuid::Uuid::now_v7().simple().to_string();
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (store, next, ns) = (store.clone(), next.clone(), ns.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= MESSAGES as u64 {
                        return;
                    }
                    let key = format!("{ns}:{i}");
                    let lease = Duration::from_secs(30);
                    let token = match store.begin(&key, "fp", lease).await.unwrap() {
                        courier::idempotency::Begin::Begun(t) => t,
                        other => panic!("fresh key {key}: {other:?}"),
                    };
                    store
                        .complete(&key, &token, "fp", None, Duration::from_secs(600))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    MESSAGES as f64 / t.elapsed().as_secs_f64()
}
