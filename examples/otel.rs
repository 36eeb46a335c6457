//! OpenTelemetry (feature `otel`): a message published inside an application span carries
//! that trace; the consumer's `courier.handle` span is a child of the `courier.publish` span,
//! and the handler's outputs continue it. This example collects the spans in the SDK's
//! in-memory exporter and prints the tree; an application installs an OTLP exporter instead.
//!
//! ```text
//! cargo run --example otel
//! ```

use std::sync::Arc;
use std::time::Duration;

use courier::{
    handler_fn_with_context, Config, Consumer, Context, DeliveryClient, HandlerError, Message,
    Subscription,
};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("shop"))),
    )?;

    let client: Arc<dyn DeliveryClient> = courier::connect(&Config::default()).await?.into();
    for d in ["orders", "receipts"] {
        client.create_destination(d).await?;
    }
    let consumer = Consumer::new(client.clone(), Subscription::new("orders", "billing"))
        .spawn(handler_fn_with_context(|_m: &Message, cx: &mut Context| {
            cx.publish("receipts", Message::new("receipt"));
            Box::pin(async { Ok::<(), HandlerError>(()) })
        }))
        .await?;
    let mut receipts = client
        .subscribe(Subscription::new("receipts", "audit"))
        .await?;
    client
        .publish("orders", Message::new("order 1"))
        .instrument(tracing::info_span!("checkout"))
        .await?;
    let receipt = receipts
        .next_timeout(Duration::from_secs(10))
        .await
        .ok_or_else(|| anyhow::anyhow!("no receipt within 10 s"))??;
    println!(
        "receipt traceparent: {}",
        receipt.message.headers["traceparent"]
    );
    receipt.ack().await?;
    consumer.shutdown().await?;
    receipts.close().await?;
    provider.force_flush()?;

    let mut spans = exporter.get_finished_spans()?;
    spans.sort_by_key(|s| s.start_time);
    for s in &spans {
        println!(
            "{:<16} trace {}  span {}  parent {}",
            s.name,
            s.span_context.trace_id(),
            s.span_context.span_id(),
            s.parent_span_id
        );
    }
    client.close().await?;
    Ok(())
}
