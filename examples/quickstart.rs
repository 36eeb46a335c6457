//! The quickstart: the three delivery guarantees on the embedded memory broker, under the same
//! injected faults (lost publishes, lost confirms, duplicate deliveries, consumers crashing before
//! they settle), and what each guarantee makes of them.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! No services needed. Exits non-zero if a guarantee is violated.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::config::{ConsumerConfig, IdempotencyConfig, MemoryConfig, MemoryFaults};
use courier::{
    handler_fn, BackendConfig, Config, DeliveryClient, Guarantee, Message, RetryPolicy,
    Subscription,
};
use tokio::sync::Mutex;

const MESSAGES: usize = 2_000;

struct Row {
    guarantee: Guarantee,
    sent: usize,
    effects: usize,
    lost: usize,
    duplicated: usize,
}

impl Row {
    fn holds(&self) -> bool {
        (self.guarantee.allows_loss() || self.lost == 0)
            && (self.guarantee.allows_duplicates() || self.duplicated == 0)
    }
}

fn config(guarantee: Guarantee) -> Config {
    let faults = MemoryFaults {
        drop_on_publish: 0.02,
        duplicate_on_publish: 0.02,
        duplicate_delivery: 0.02,
        crash_before_settle: 0.02,
        seed: Some(42),
        ..MemoryFaults::default()
    };
    Config {
        guarantee,
        backend: BackendConfig::Memory(MemoryConfig {
            broker: format!("quickstart-{guarantee}"),
            faults,
            ..MemoryConfig::default()
        }),
        consumer: ConsumerConfig {
            concurrency: 8,
            retry: RetryPolicy::attempts(10)
                .backoff(Duration::from_millis(5), Duration::from_millis(100)),
            ..ConsumerConfig::default()
        },
        // Exactly-once = at-least-once + the idempotent layer (here with its in-memory store).
        idempotency: (guarantee == Guarantee::ExactlyOnce).then(IdempotencyConfig::default),
    }
}

async fn run(guarantee: Guarantee) -> courier::Result<Row> {
    let config = config(guarantee);
    let client: Arc<dyn DeliveryClient> = courier::connect(&config).await?.into();
    client.create_destination("payments").await?;

    // The "effect" of a message: one charge per handler run.
    let charges: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let recorded = charges.clone();
    let consumer = courier::consumer(
        &config,
        client.clone(),
        Subscription::new("payments", "ledger"),
        handler_fn(move |m: Message| {
            let recorded = recorded.clone();
            async move {
                *recorded.lock().await.entry(m.id.to_string()).or_default() += 1;
                Ok(())
            }
        }),
    )
    .await?;

    let mut sent = 0;
    for i in 0..MESSAGES {
        let m = Message::new(format!("charge #{i}")).with_key(format!("customer-{}", i % 50));
        if client.publish("payments", m).await.is_ok() {
            sent += 1;
        }
    }

    // Wait until every message had its effect, or nothing moved for a second (lost ones).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (0, Instant::now());
    loop {
        let n = charges.lock().await.len();
        if n >= MESSAGES || Instant::now() > deadline || last.1.elapsed() > Duration::from_secs(1) {
            break;
        }
        if n != last.0 {
            last = (n, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.shutdown().await?;
    client.close().await?;

    let charges = charges.lock().await;
    Ok(Row {
        guarantee,
        sent,
        effects: charges.values().sum(),
        lost: MESSAGES - charges.len(),
        duplicated: charges.values().map(|n| n - 1).sum(),
    })
}

#[tokio::main]
async fn main() -> courier::Result<()> {
    println!("courier quickstart: {MESSAGES} payments per guarantee on the embedded memory broker");
    println!("injected faults: 2% publishes lost, 2% confirms lost, 2% duplicate deliveries, 2% consumer crashes before settle\n");
    println!(
        "{:<14} {:>6} {:>8} {:>6} {:>11}  verdict",
        "guarantee", "sent", "effects", "lost", "duplicated"
    );
    let mut ok = true;
    for g in Guarantee::ALL {
        let row = run(g).await?;
        let verdict = if row.holds() { "holds" } else { "VIOLATED" };
        ok &= row.holds();
        println!(
            "{:<14} {:>6} {:>8} {:>6} {:>11}  {verdict}",
            row.guarantee.as_str(),
            row.sent,
            row.effects,
            row.lost,
            row.duplicated
        );
    }
    println!(
        "\nat-most-once may lose but never repeats; at-least-once never loses but may repeat;"
    );
    println!("exactly-once neither loses nor repeats (broker dedup + idempotent layer).");
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
