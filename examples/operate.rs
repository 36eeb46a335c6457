//! Operating a destination: what the broker holds for a consumer group before and after it
//! works (`inspect`), the backlog the consumer exports as metrics, and removing the destination
//! (`delete_destination`). The same calls back `courier inspect`, `courier top` and
//! `courier delete`.
//!
//! ```text
//! cargo run --example operate                                  # memory broker, no services
//! COURIER_URL=kafka://127.0.0.1:9092 cargo run --example operate
//! ```

use std::sync::Arc;
use std::time::Duration;

use courier::{handler_fn, Config, Consumer, DeliveryClient, Message, Subscription};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let client: Arc<dyn DeliveryClient> = courier::connect(&config).await?.into();
    let orders = format!("orders-{}", uuid::Uuid::now_v7().simple());
    let sub = Subscription::new(&orders, "billing");
    client.declare_subscription(&sub).await?;
    for i in 0..10 {
        client
            .publish(&orders, Message::new(format!("order {i}")))
            .await?;
    }
    print!("before:\n{}", client.inspect(&orders, &["billing"]).await?);

    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = handled.clone();
    let consumer = Consumer::new(client.clone(), sub)
        // Exported as courier_backlog{destination,group} and friends (30 s by default).
        .backlog_interval(Some(Duration::from_secs(1)))
        .spawn(handler_fn(move |_m: Message| {
            let done = done.clone();
            async move {
                done.add_permits(1);
                Ok(())
            }
        }))
        .await?;
    let all = tokio::time::timeout(Duration::from_secs(60), handled.acquire_many(10)).await;
    all.map_err(|_| anyhow::anyhow!("the 10 orders were not handled within 60 s"))??
        .forget();
    consumer.shutdown().await?;
    print!("after:\n{}", client.inspect(&orders, &["billing"]).await?);

    for removed in client.delete_destination(&orders, &["billing"]).await? {
        println!("removed {removed}");
    }
    let dlq = Subscription::new(&orders, "billing").dead_letter_destination();
    client.delete_destination(&dlq, &[]).await?;
    client.close().await?;
    Ok(())
}
