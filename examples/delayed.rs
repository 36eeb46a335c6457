//! Delayed delivery: a payment reminder published now to be handled in 2 s, and an order
//! published after it that is handled at once — the delayed message holds nothing else up, and
//! its early arrival costs no attempt.
//!
//! ```text
//! cargo run --example delayed                                  # memory broker, no services
//! COURIER_URL=kafka://127.0.0.1:9092 cargo run --example delayed
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use courier::{handler_fn_with_context, Config, Context, DeliveryClient, Message, Subscription};
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // COURIER_URL (or COURIER_CONFIG) picks the broker; without it, the embedded memory broker.
    let config = Config::from_env()?;
    let events = format!("billing-{}", uuid::Uuid::now_v7().simple());
    let client: Arc<dyn DeliveryClient> = courier::connect(&config).await?.into();
    let sub = Subscription::new(&events, "notifier");
    client.declare_subscription(&sub).await?;

    let start = Instant::now();
    let (handled, mut seen) = mpsc::unbounded_channel();
    let consumer = courier::consumer(
        &config,
        client.clone(),
        sub,
        handler_fn_with_context(move |m: &Message, cx: &mut Context| {
            let handled = handled.clone();
            Box::pin(async move {
                let what = String::from_utf8_lossy(&m.payload).into_owned();
                // Handled no earlier than the time the message carries (ms resolution).
                let on_time = m.not_before().is_none_or(|due| SystemTime::now() >= due);
                let _ = handled.send((what, cx.attempt(), start.elapsed(), on_time));
                Ok(())
            })
        }),
    )
    .await?;

    client
        .publish(
            &events,
            Message::new("reminder: invoice 88 is due").with_delay(Duration::from_secs(2)),
        )
        .await?;
    client
        .publish(&events, Message::new("order 1017 paid"))
        .await?;

    let mut order = Vec::new();
    while order.len() < 2 {
        let (what, attempt, at, on_time) =
            tokio::time::timeout(Duration::from_secs(60), seen.recv())
                .await
                .map_err(|_| anyhow::anyhow!("not both messages were handled within 60 s"))?
                .ok_or_else(|| anyhow::anyhow!("the consumer stopped"))?;
        println!("{:>6} ms  attempt {attempt}  {what}", at.as_millis());
        order.push((what, attempt, on_time));
    }
    let stats = consumer.shutdown().await?;
    println!("{} early arrival(s) put back until due", stats.delayed);
    anyhow::ensure!(
        order[0].0 == "order 1017 paid" && order[1].0.starts_with("reminder"),
        "the undelayed order should be handled first"
    );
    anyhow::ensure!(
        order[1].1 == 1 && order[1].2,
        "the reminder was handled on attempt {} (expected 1), {} its time",
        order[1].1,
        if order[1].2 { "not before" } else { "before" }
    );
    client.delete_destination(&events, &["notifier"]).await?;
    let dlq = Subscription::new(&events, "notifier").dead_letter_destination();
    client.delete_destination(&dlq, &[]).await?;
    client.close().await?;
    Ok(())
}
