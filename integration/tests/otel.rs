//! The `otel` feature with an OpenTelemetry SDK behind `tracing-opentelemetry`: a message
//! published inside an application span carries that trace; the consumer's handler span is a
//! child of the publish span; the handler's output carries the handler span's context. The
//! spans are read from the SDK's in-memory exporter.

use std::sync::Arc;
use std::time::Duration;

use courier::{
    handler_fn_with_context, Config, Consumer, DeliveryClient, Guarantee, HandlerError, Message,
    Subscription,
};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
        panic!(
            "no span {name} among {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        )
    })
}

fn traceparent_of(s: &SpanData) -> String {
    format!(
        "00-{}-{}-01",
        s.span_context.trace_id(),
        s.span_context.span_id()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_span_continues_the_publishers_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("courier-test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let client: Arc<dyn DeliveryClient> =
        courier::connect(&Config::default().with_guarantee(Guarantee::AtLeastOnce))
            .await
            .unwrap()
            .into();
    for d in ["orders", "receipts"] {
        client.create_destination(d).await.unwrap();
    }
    let consumer = Consumer::new(client.clone(), Subscription::new("orders", "billing"))
        .backlog_interval(None)
        .spawn(handler_fn_with_context(
            |_m: &Message, cx: &mut courier::Context| {
                cx.publish("receipts", Message::new("receipt"));
                Box::pin(async { Ok::<(), HandlerError>(()) })
            },
        ))
        .await
        .unwrap();
    let mut receipts = client
        .subscribe(Subscription::new("receipts", "audit"))
        .await
        .unwrap();

    client
        .publish("orders", Message::new("order 1"))
        .instrument(tracing::info_span!("checkout"))
        .await
        .unwrap();
    let receipt = receipts
        .next_timeout(Duration::from_secs(10))
        .await
        .expect("receipt within 10 s")
        .unwrap();
    let output_tp = receipt.message.headers["traceparent"].clone();
    receipt.ack().await.unwrap();
    consumer.shutdown().await.unwrap();
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    let checkout = span(&spans, "checkout");
    let publish = spans
        .iter()
        .find(|s| {
            s.name == "courier.publish" && s.parent_span_id == checkout.span_context.span_id()
        })
        .expect("courier.publish is a child of the application's span");
    let handle = span(&spans, "courier.handle");
    let trace = checkout.span_context.trace_id();
    assert_eq!(publish.span_context.trace_id(), trace);
    assert_eq!(
        handle.span_context.trace_id(),
        trace,
        "the handler span is in the publisher's trace"
    );
    assert_eq!(
        handle.parent_span_id,
        publish.span_context.span_id(),
        "the handler span is a child of the publish span"
    );
    assert_eq!(
        output_tp,
        traceparent_of(handle),
        "the handler's output carries the handler span's context"
    );
}
