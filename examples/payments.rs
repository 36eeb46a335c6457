//! Exactly-once effects: charge each payment once per id, whatever the broker redelivers.
//!
//! ```text
//! cargo run --example payments                                   # memory broker + memory store
//! COURIER_URL='memory://?guarantee=exactly-once&idempotency=redis://127.0.0.1:6379' cargo run --example payments
//! ```
//!
//! The broker duplicates deliveries and consumers crash before they settle (memory fault knobs);
//! the idempotent layer absorbs every duplicate, so the ledger shows exactly one charge per
//! payment id. A payment re-sent with the same id but a different amount is refused
//! (dead-lettered), never charged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use courier::config::{IdempotencyConfig, MemoryFaults};
use courier::{
    BackendConfig, Config, Context, DeliveryClient, Guarantee, Handler, HandlerError, Message,
    Subscription,
};
use tokio::sync::Mutex;

/// The payment service: charges a card. Not idempotent by itself.
struct ChargeCard {
    charges: Arc<Mutex<HashMap<String, u32>>>,
}

#[courier::async_trait]
impl Handler for ChargeCard {
    async fn handle(&self, m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        *self
            .charges
            .lock()
            .await
            .entry(m.id.to_string())
            .or_default() += 1;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = match std::env::var("COURIER_URL") {
        Ok(url) => Config::from_url(&url)?,
        Err(_) => Config::default().with_idempotency(IdempotencyConfig::default()),
    };
    config.guarantee = Guarantee::ExactlyOnce;
    if let BackendConfig::Memory(m) = &mut config.backend {
        m.broker = "payments".into();
        m.auto_create = true;
        m.faults = MemoryFaults {
            duplicate_delivery: 0.2,
            crash_before_settle: 0.1,
            seed: Some(9),
            ..MemoryFaults::default()
        };
    }
    let client: Arc<dyn DeliveryClient> = courier::connect(&config).await?.into();
    client.create_destination("payments").await?;
    client.create_destination("payments-dlq").await?;
    let charges = Arc::new(Mutex::new(HashMap::new()));
    let consumer = courier::consumer(
        &config,
        client.clone(),
        Subscription::new("payments", "billing"),
        ChargeCard {
            charges: charges.clone(),
        },
    )
    .await?;
    let mut dead = client
        .subscribe(Subscription::new("payments-dlq", "ops"))
        .await?;

    for i in 0..500 {
        let id = format!("payment-{i}");
        client
            .publish(
                "payments",
                Message::new(format!(r#"{{"amount": {}}}"#, 100 + i)).with_id(id),
            )
            .await?;
    }
    // A producer retry (same id, same body): the broker's own dedup drops it.
    let retry = client
        .publish(
            "payments",
            Message::new(r#"{"amount": 107}"#).with_id("payment-7"),
        )
        .await?;
    println!(
        "re-sent payment-7: deduplicated by the broker = {}",
        retry.deduplicated
    );
    // The same id with a different amount from a service that publishes without broker dedup:
    // a bug upstream, refused by the idempotent layer's fingerprint check and dead-lettered.
    let other_service: Arc<dyn DeliveryClient> =
        courier::connect(&config.clone().with_guarantee(Guarantee::AtLeastOnce))
            .await?
            .into();
    other_service
        .publish(
            "payments",
            Message::new(r#"{"amount": 999999}"#).with_id("payment-7"),
        )
        .await?;

    let refused = dead
        .next_timeout(Duration::from_secs(10))
        .await
        .transpose()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while charges.lock().await.len() < 500 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = consumer.shutdown().await?;
    let charges = charges.lock().await;
    let total: u32 = charges.values().sum();
    println!(
        "payments: 500, charged ids: {}, charges: {total}, redeliveries seen by the consumer: {}",
        charges.len(),
        stats.received - 500
    );
    match refused {
        Some(d) => println!(
            "refused: {} ({})",
            d.message.id,
            d.message
                .headers
                .get("courier-dead-letter-reason")
                .map_or("", String::as_str)
        ),
        None => println!("refused: none"),
    }
    anyhow::ensure!(
        charges.len() == 500 && total == 500,
        "a payment was lost or charged twice"
    );
    println!("every payment charged exactly once");
    Ok(())
}
