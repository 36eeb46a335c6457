//! Request-reply with cached replies: a payment API whose caller times out before the reply
//! arrives asks again, and gets the **same receipt** — the cashier charged once. The replier runs
//! under exactly-once (the idempotent layer); its result is the reply and is stored with the
//! request's idempotency key, so a repeated request is answered from the store — here through
//! another instance of the caller, after the one that asked first went away with its reply. A
//! request the cashier refuses is answered with the reason (`Error::RequestFailed`) at once.
//!
//! ```text
//! cargo run --example request_reply                                  # memory broker, no services
//! COURIER_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example request_reply
//! COURIER_URL='sqs://us-east-1?endpoint=http://127.0.0.1:4566&idempotency=redis://127.0.0.1:6379' cargo run --example request_reply
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier::config::IdempotencyConfig;
use courier::{
    handler_fn_with_context, Config, Context, DeliveryClient, Guarantee, HandlerError, Message,
    Requester, Subscription,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // COURIER_URL (or COURIER_CONFIG) picks the broker; without it, the embedded memory broker.
    let mut config = Config::from_env()?.with_guarantee(Guarantee::ExactlyOnce);
    // One process here, so the in-process store will do; several replier instances share one:
    // COURIER_URL='…?idempotency=redis://127.0.0.1:6379'.
    if config.idempotency.is_none() {
        config = config.with_idempotency(IdempotencyConfig::default());
    }
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let payments = format!("payments-{suffix}");
    let client: Arc<dyn DeliveryClient> = courier::connect(&config).await?.into();
    let dlq = Subscription::new(&payments, "cashier").dead_letter_destination();
    for d in [&payments, &dlq] {
        client.create_destination(d).await?;
    }

    // The replier. Its first charge is slow (1.5 s): the caller's first request times out.
    let charges = Arc::new(AtomicU32::new(0));
    let cashier = {
        let charges = charges.clone();
        handler_fn_with_context(move |m: &Message, cx: &mut Context| {
            let charges = charges.clone();
            Box::pin(async move {
                let request = String::from_utf8_lossy(&m.payload).into_owned();
                if request.contains(" -") {
                    // Dead-lettered at once; the caller gets Error::RequestFailed with this reason.
                    return Err(HandlerError::permanent("a charge must be positive"));
                }
                let n = charges.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                cx.set_result(format!("receipt #{n} for {request}"));
                Ok(())
            })
        })
    };
    let replier = courier::consumer(
        &config,
        client.clone(),
        Subscription::new(&payments, "cashier"),
        cashier,
    )
    .await?;

    // The caller: one reply destination per instance. The request's id is its idempotency key.
    let web1 = Requester::start(client.clone(), format!("replies-web-1-{suffix}")).await?;
    let charge = Message::new("order 1017: 42.00 EUR").with_id(format!("charge-1017-{suffix}"));
    match web1
        .request(&payments, charge.clone(), Duration::from_millis(300))
        .await
    {
        Err(e) if e.kind() == "timeout" => {
            println!("web-1: no reply within 300 ms, and web-1 goes away")
        }
        other => anyhow::bail!("the first request should time out, got {other:?}"),
    }
    // web-1's reply is lost with it. The client retries through web-2, with the same message:
    // the cashier answers from the first run's stored result and does not charge again.
    web1.close().await?;
    let web2 = Requester::start(client.clone(), format!("replies-web-2-{suffix}")).await?;
    let again = web2
        .request(&payments, charge, Duration::from_secs(30))
        .await?;
    let receipt = String::from_utf8_lossy(&again.payload).into_owned();
    println!("web-2, asked again: {receipt}");
    let other = web2
        .request(
            &payments,
            Message::new("order 1018: 9.90 EUR").with_id(format!("charge-1018-{suffix}")),
            Duration::from_secs(30),
        )
        .await?;
    println!(
        "web-2, another one: {}",
        String::from_utf8_lossy(&other.payload)
    );
    match web2
        .request(
            &payments,
            Message::new("order 1019: -5.00 EUR").with_id(format!("charge-1019-{suffix}")),
            Duration::from_secs(30),
        )
        .await
    {
        Err(e @ courier::Error::RequestFailed { .. }) => {
            println!("web-2, a refund sent as a charge: {e}")
        }
        other => anyhow::bail!("a refused request should fail with RequestFailed, got {other:?}"),
    }
    web2.close().await?;

    let stats = replier.shutdown().await?;
    println!(
        "cashier charged {} times for 4 requests; {} answered from the stored result",
        charges.load(Ordering::SeqCst),
        stats.duplicates_absorbed
    );
    anyhow::ensure!(
        receipt == "receipt #1 for order 1017: 42.00 EUR",
        "the repeated request got {receipt:?}, not the first run's receipt"
    );
    anyhow::ensure!(
        charges.load(Ordering::SeqCst) == 2 && stats.duplicates_absorbed == 1,
        "charged {} times for 2 distinct requests, {} answered from the store",
        charges.load(Ordering::SeqCst),
        stats.duplicates_absorbed
    );
    client.delete_destination(&payments, &["cashier"]).await?;
    for web in ["web-1", "web-2"] {
        let replies = format!("replies-{web}-{suffix}");
        client.delete_destination(&replies, &[&replies]).await?;
    }
    client.delete_destination(&dlq, &[]).await?;
    client.close().await?;
    Ok(())
}
