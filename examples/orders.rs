//! The transactional outbox end to end: an order row and its `OrderPlaced` message commit in
//! one PostgreSQL transaction, a relay publishes the message, and an exactly-once consumer
//! sends one confirmation per order.
//!
//! ```text
//! cargo run --example orders                      # memory broker, DATABASE_URL or local PostgreSQL
//! COURIER_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example orders
//! ```
//!
//! One checkout is declined and rolled back: its message is never published. One message is
//! published a second time with the same id, as a relay that crashed between publishing and
//! marking would: the idempotent consumer absorbs it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use courier::config::IdempotencyConfig;
use courier::outbox::{self, enqueue, Relay};
use courier::{
    BackendConfig, Config, Context, DeliveryClient, Guarantee, Handler, HandlerError, Message,
    Subscription,
};
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Mutex;

/// Sends the order confirmation e-mail (not idempotent by itself).
struct SendConfirmation {
    sent: Arc<Mutex<HashMap<String, u32>>>,
}

#[courier::async_trait]
impl Handler for SendConfirmation {
    async fn handle(&self, m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        let order = String::from_utf8_lossy(&m.payload).into_owned();
        *self.sent.lock().await.entry(order).or_default() += 1;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/courier".into());
    let mut config = match std::env::var("COURIER_URL") {
        Ok(url) => Config::from_url(&url)?,
        Err(_) => Config::default(),
    };
    config.guarantee = Guarantee::ExactlyOnce;
    if config.idempotency.is_none() {
        config.idempotency = Some(IdempotencyConfig::default());
    }
    if let BackendConfig::Memory(m) = &mut config.backend {
        m.broker = "orders".into();
        m.auto_create = true;
    }
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&database_url)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach PostgreSQL at {}: {e} (run scripts/services up, or set DATABASE_URL)",
                courier::config::redact_url(&database_url)
            )
        })?;
    outbox::migrate(&pool).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_orders (
            id TEXT PRIMARY KEY, customer TEXT NOT NULL, amount_cents BIGINT NOT NULL)",
    )
    .execute(&pool)
    .await?;

    let client: Arc<dyn DeliveryClient> = courier::connect(&config).await?.into();
    let topic = format!("orders-{}", uuid::Uuid::now_v7().simple());
    client.create_destination(&topic).await?;
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let consumer = courier::consumer(
        &config,
        client.clone(),
        Subscription::new(&topic, "mailer"),
        SendConfirmation { sent: sent.clone() },
    )
    .await?;
    let relay = Relay::new(pool.clone(), client.clone()).spawn().await?;

    // Checkouts: the order row and its event commit together, or not at all.
    let mut placed = Vec::new();
    for i in 0..20 {
        let order_id = format!("order-{}", uuid::Uuid::now_v7().simple());
        let customer = format!("customer-{}", i % 4);
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO example_orders (id, customer, amount_cents) VALUES ($1, $2, $3)")
            .bind(&order_id)
            .bind(&customer)
            .bind(1_000 + i as i64)
            .execute(&mut *tx)
            .await?;
        let event = Message::new(order_id.clone()).with_key(customer);
        let id = enqueue(&mut tx, &topic, event).await?;
        if i == 13 {
            tx.rollback().await?; // payment declined: neither the order nor its event exist
            continue;
        }
        tx.commit().await?;
        placed.push((order_id, id));
    }
    // What a relay crash between publish and mark produces: the same message id again.
    let (order, id) = &placed[3];
    let again = client
        .publish(&topic, Message::new(order.clone()).with_id(id.clone()))
        .await?;
    println!(
        "re-published {order}'s message: dropped by the broker's own dedup = {} (otherwise the idempotent consumer absorbs it)",
        again.deduplicated
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sent.lock().await.len() < placed.len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relayed = relay.shutdown().await?;
    let stats = consumer.shutdown().await?;
    client.close().await?;
    let sent = sent.lock().await;
    let confirmations: u32 = sent.values().sum();
    println!(
        "orders committed: {}, rolled back: 1, relayed: {}, deliveries: {}, confirmations sent: {confirmations}",
        placed.len(),
        relayed.published.load(std::sync::atomic::Ordering::Relaxed),
        stats.received,
    );
    println!("{}", outbox::status(&pool).await?);
    anyhow::ensure!(
        sent.len() == placed.len() && confirmations as usize == placed.len(),
        "an order was lost or confirmed twice"
    );
    anyhow::ensure!(
        placed.iter().all(|(o, _)| sent.contains_key(o)),
        "a committed order has no confirmation"
    );
    println!("every committed order confirmed exactly once; the declined one never published");
    Ok(())
}
