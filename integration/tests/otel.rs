//! The `otel` feature with an OpenTelemetry SDK behind `tracing-opentelemetry`, on every backend
//! (memory, RabbitMQ, Kafka, SQS on loopback): a message
//! published inside an application span carries that trace; the consumer's handler span is a
//! child of the publish span; the handler's output carries the handler span's context. The
//! spans are read from the SDK's in-memory exporter.

use std::sync::Arc;
use std::time::Duration;

use courier::{
    handler_fn_with_context, BackendConfig, Config, Consumer, DeliveryClient, Guarantee,
    HandlerError, Message, Subscription,
};
use courier_testkit::{endpoints, unique};
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

/// One message through `url`'s broker: published inside an application span, handled, its
/// output read back. Returns the output's `traceparent`.
async fn round_trip(url: &str) -> String {
    let mut config = Config::from_url(url)
        .unwrap()
        .with_guarantee(Guarantee::AtLeastOnce);
    if let BackendConfig::Sqs(sqs) = &mut config.backend {
        // Closing a subscription waits for its long poll in flight (courier-sqs
        // tests/faults.rs::closing_a_subscription_strands_nothing): keep it short here.
        sqs.wait_time = Duration::from_secs(1);
    }
    let client: Arc<dyn DeliveryClient> = match courier::connect(&config).await {
        Ok(c) => c.into(),
        Err(e) => endpoints::unreachable("the broker", url, e),
    };
    let (orders, receipts) = (unique("otel-orders"), unique("otel-receipts"));
    for d in [&orders, &receipts] {
        client.create_destination(d).await.unwrap();
    }
    let (billing, audit) = (
        Subscription::new(&orders, "billing"),
        Subscription::new(&receipts, "audit"),
    );
    client.declare_subscription(&billing).await.unwrap();
    client.declare_subscription(&audit).await.unwrap();
    let output_to = receipts.clone();
    let consumer = Consumer::new(client.clone(), billing)
        .backlog_interval(None)
        .spawn(handler_fn_with_context(
            move |_m: &Message, cx: &mut courier::Context| {
                cx.publish(output_to.clone(), Message::new("receipt"));
                Box::pin(async { Ok::<(), HandlerError>(()) })
            },
        ))
        .await
        .unwrap();
    let mut receipts_in = client.subscribe(audit).await.unwrap();

    client
        .publish(&orders, Message::new("order 1"))
        .instrument(tracing::info_span!("checkout"))
        .await
        .unwrap();
    let receipt = receipts_in
        .next_timeout(Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("{url}: no receipt within 60 s"))
        .unwrap();
    let output_tp = receipt.message.headers["traceparent"].clone();
    receipt.ack().await.unwrap();
    receipts_in.close().await.unwrap();
    consumer.shutdown().await.unwrap();
    client
        .delete_destination(&orders, &["billing"])
        .await
        .unwrap();
    client
        .delete_destination(&receipts, &["audit"])
        .await
        .unwrap();
    client.close().await.unwrap();
    output_tp
}

/// On every backend: the handler span continues the publisher's trace across the broker, and
/// the handler's output carries the handler span's context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_span_continues_the_publishers_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("courier-test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let urls = [
        "memory://otel?auto_create=true".to_owned(),
        endpoints::rabbitmq_url(),
        format!("kafka://{}", endpoints::kafka_bootstrap()),
        format!(
            "sqs://{}?endpoint={}",
            endpoints::aws_region(),
            endpoints::sqs_endpoint()
        ),
    ];
    for url in &urls {
        exporter.reset();
        let started = std::time::Instant::now();
        let output_tp = round_trip(url).await;
        println!("{url}: round trip in {:?}", started.elapsed());
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();

        let checkout = span(&spans, "checkout");
        let publish = spans
            .iter()
            .find(|s| {
                s.name == "courier.publish" && s.parent_span_id == checkout.span_context.span_id()
            })
            .unwrap_or_else(|| {
                panic!("{url}: courier.publish is a child of the application's span")
            });
        let trace = checkout.span_context.trace_id();
        let handle = spans
            .iter()
            .find(|s| s.name == "courier.handle" && s.span_context.trace_id() == trace)
            .unwrap_or_else(|| {
                panic!(
                    "{url}: no courier.handle span in the publisher's trace among {:?}",
                    spans
                        .iter()
                        .map(|s| (&s.name, s.span_context.trace_id()))
                        .collect::<Vec<_>>()
                )
            });
        assert_eq!(
            handle.parent_span_id,
            publish.span_context.span_id(),
            "{url}: the handler span is a child of the publish span"
        );
        assert_eq!(
            output_tp,
            traceparent_of(handle),
            "{url}: the handler's output carries the handler span's context"
        );
    }
}
