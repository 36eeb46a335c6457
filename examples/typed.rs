//! Typed messages: publish `serde` values, handle them decoded, publish typed outputs; a payload
//! that does not decode is dead-lettered with the reason, never retried.
//!
//! ```text
//! cargo run --example typed                                  # memory broker, no services
//! COURIER_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example typed
//! ```

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier::{
    json_handler_fn, BackendConfig, Config, Context, DeliveryClient, HandlerError, Message,
    Subscription,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Payment {
    customer: String,
    amount_cents: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    customer: String,
    charged_cents: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = Config::from_env()?;
    if let BackendConfig::Memory(m) = &mut config.backend {
        m.broker = "typed".into();
    }
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let (payments, receipts, dlq) = (
        format!("payments-{suffix}"),
        format!("receipts-{suffix}"),
        format!("payments-{suffix}-dlq"),
    );
    let client: Arc<dyn DeliveryClient> = courier::connect(&config).await?.into();
    for d in [&payments, &receipts, &dlq] {
        client.create_destination(d).await?;
    }
    let mut receipts_in = client
        .subscribe(Subscription::new(&receipts, "accounting"))
        .await?;
    let mut dead = client.subscribe(Subscription::new(&dlq, "ops")).await?;

    let charged = Arc::new(AtomicI64::new(0));
    let handler = {
        let (charged, receipts) = (charged.clone(), receipts.clone());
        json_handler_fn(move |p: Payment, cx: &mut Context| {
            let (charged, receipts) = (charged.clone(), receipts.clone());
            Box::pin(async move {
                if p.amount_cents <= 0 {
                    return Err(HandlerError::permanent(format!(
                        "amount {} is not positive",
                        p.amount_cents
                    )));
                }
                charged.fetch_add(p.amount_cents, Ordering::SeqCst);
                let receipt = Receipt {
                    customer: p.customer.clone(),
                    charged_cents: p.amount_cents,
                };
                cx.publish(receipts, Message::json(&receipt)?.with_key(p.customer));
                Ok(())
            })
        })
    };
    let consumer = courier::consumer(
        &config,
        client.clone(),
        Subscription::new(&payments, "billing").dead_letter(&dlq),
        handler,
    )
    .await?;

    for (customer, cents) in [("ada", 1250), ("grace", 990), ("alan", 4200)] {
        let payment = Payment {
            customer: customer.into(),
            amount_cents: cents,
        };
        client
            .publish(&payments, Message::json(&payment)?.with_key(customer))
            .await?;
    }
    // A producer that got the schema wrong: the amount is a string.
    let bad = Message::new(r#"{"customer": "eve", "amount_cents": "lots"}"#)
        .with_header(courier::header::CONTENT_TYPE, courier::JSON);
    client.publish(&payments, bad).await?;

    let mut total = 0;
    for _ in 0..3 {
        let d = receipts_in
            .next_timeout(Duration::from_secs(30))
            .await
            .ok_or_else(|| anyhow::anyhow!("a receipt did not arrive"))??;
        let r: Receipt = d
            .message
            .decode_json()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        println!(
            "receipt: {} charged {} cents ({})",
            r.customer,
            r.charged_cents,
            d.message.content_type().unwrap_or("no content-type")
        );
        total += r.charged_cents;
        d.ack().await?;
    }
    let d = dead
        .next_timeout(Duration::from_secs(30))
        .await
        .ok_or_else(|| anyhow::anyhow!("the bad payment was not dead-lettered"))??;
    println!(
        "dead-lettered after {} attempt(s): {}",
        d.message
            .headers
            .get(courier::header::DEAD_LETTER_ATTEMPTS)
            .map_or("?", String::as_str),
        d.message
            .headers
            .get(courier::header::DEAD_LETTER_REASON)
            .map_or("", String::as_str)
    );
    d.ack().await?;
    consumer.shutdown().await?;
    anyhow::ensure!(
        total == 6440 && charged.load(Ordering::SeqCst) == 6440,
        "charged {} cents, receipts for {total}",
        charged.load(Ordering::SeqCst)
    );
    println!("3 payments charged, 3 receipts, 1 undecodable payment dead-lettered");
    Ok(())
}
