//! Spans, metrics and trace propagation of one run with a retry, a duplicate and a dead-letter,
//! and no secret in any log line, Debug or error output of a run configured with passwords.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier::config::{ConsumerConfig, IdempotencyConfig, MemoryConfig};
use courier::{
    BackendConfig, Config, Context, DeliveryClient, Guarantee, Handler, HandlerError, Message,
    RetryPolicy, Subscription,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tracing_subscriber::layer::SubscriberExt;

#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0
            .lock()
            .unwrap()
            .push(attrs.metadata().name().to_owned());
    }
}

/// Log lines, captured.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Work {
    traces: Arc<Mutex<Vec<(String, String)>>>,
}

#[async_trait::async_trait]
impl Handler for Work {
    async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        if m.payload.as_ref() == b"poison" {
            return Err(HandlerError::retryable("cannot charge"));
        }
        self.traces
            .lock()
            .unwrap()
            .push((m.id.to_string(), m.headers["traceparent"].clone()));
        cx.publish(
            "receipts",
            Message::new("receipt").with_id(cx.derive_id("receipt")),
        );
        Ok(())
    }
}

fn counter(snapshot: &[(String, u64)], name: &str) -> u64 {
    snapshot
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_metrics_and_trace_context_of_a_run() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();
    let spans = Spans::default();
    let logs = Logs::default();
    let logs_w = logs.clone();
    let subscriber = tracing_subscriber::registry()
        .with(spans.clone())
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || logs_w.clone())
                .with_ansi(false),
        )
        .with(tracing_subscriber::EnvFilter::new("debug"));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let memory = MemoryConfig {
        broker: "observability".into(),
        ..MemoryConfig::default()
    };
    let config = Config {
        guarantee: Guarantee::ExactlyOnce,
        backend: BackendConfig::Memory(memory.clone()),
        consumer: ConsumerConfig {
            concurrency: 1,
            retry: RetryPolicy::attempts(2)
                .backoff(Duration::from_millis(10), Duration::from_millis(10)),
            ..ConsumerConfig::default()
        },
        // A password in the store URL: it must never be printed.
        idempotency: Some(IdempotencyConfig {
            store: courier::config::SecretUrl::new("memory"),
            ..IdempotencyConfig::default()
        }),
    };
    let client: Arc<dyn DeliveryClient> = courier::connect(&config).await.unwrap().into();
    for d in ["payments", "payments-dlq", "receipts"] {
        client.create_destination(d).await.unwrap();
    }
    // An at-least-once producer (no broker dedup) so the duplicate really reaches the consumer.
    let producer: Arc<dyn DeliveryClient> =
        courier::connect(&config.clone().with_guarantee(Guarantee::AtLeastOnce))
            .await
            .unwrap()
            .into();
    let traces = Arc::new(Mutex::new(Vec::new()));
    let consumer = courier::consumer(
        &config,
        client.clone(),
        Subscription::new("payments", "ledger"),
        Work {
            traces: traces.clone(),
        },
    )
    .await
    .unwrap();
    let mut receipts = client
        .subscribe(Subscription::new("receipts", "audit"))
        .await
        .unwrap();
    let mut dead = client
        .subscribe(Subscription::new("payments-dlq", "ops"))
        .await
        .unwrap();

    let charge = Message::new("charge").with_header(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    producer.publish("payments", charge.clone()).await.unwrap();
    producer.publish("payments", charge.clone()).await.unwrap(); // the duplicate
    producer
        .publish("payments", Message::new("poison"))
        .await
        .unwrap();

    let receipt = receipts
        .next_timeout(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let dl = dead
        .next_timeout(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    // The debugging recorder hands out counter deltas: accumulate them.
    let mut snap: Vec<(String, u64)> = Vec::new();
    let take = |snap: &mut Vec<(String, u64)>| {
        snap.extend(snapshotter.snapshot().into_vec().into_iter().filter_map(
            |(k, _, _, v)| match v {
                DebugValue::Counter(c) => Some((k.key().name().to_owned(), c)),
                _ => None,
            },
        ))
    };
    // Let the duplicate be absorbed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        take(&mut snap);
        if counter(&snap, "courier_duplicates_absorbed_total") >= 1
            || std::time::Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.shutdown().await.unwrap();
    take(&mut snap);
    let by_name: HashMap<&str, u64> = [
        "courier_published_total",
        "courier_delivered_total",
        "courier_redelivered_total",
        "courier_retried_total",
        "courier_dead_lettered_total",
        "courier_duplicates_absorbed_total",
        "courier_handled_total",
        "courier_handler_errors_total",
    ]
    .into_iter()
    .map(|n| (n, counter(&snap, n)))
    .collect();
    // 3 payments + 1 receipt + 1 dead-lettered copy (published by the memory broker itself is not
    // counted: the dead-letter is a broker operation), so 4 publishes through the client.
    assert_eq!(by_name["courier_published_total"], 4, "{by_name:?}");
    assert_eq!(by_name["courier_retried_total"], 1, "{by_name:?}");
    assert_eq!(by_name["courier_dead_lettered_total"], 1, "{by_name:?}");
    assert_eq!(
        by_name["courier_duplicates_absorbed_total"], 1,
        "{by_name:?}"
    );
    assert_eq!(by_name["courier_handler_errors_total"], 2, "{by_name:?}");
    assert!(by_name["courier_redelivered_total"] >= 1, "{by_name:?}");
    assert!(by_name["courier_delivered_total"] >= 6, "{by_name:?}");

    // Log a config and an error that carry credentials, as an application would: the captured
    // log must not contain them.
    let secret_config = Config::from_url("amqp://app:l0g-s3cr3t@127.0.0.1:5672/%2f").unwrap();
    tracing::info!(config = ?secret_config, "starting");
    let err = Config::from_url("amqp://app:l0g-s3cr3t@127.0.0.1:5672/%2f?bogus=1").unwrap_err();
    tracing::warn!(error = %err, "bad config");
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("starting") && logged.contains("courier.handle"),
        "logs were not captured"
    );
    assert!(
        !logged.contains("l0g-s3cr3t"),
        "credentials leaked into the log"
    );

    let names = spans.0.lock().unwrap().clone();
    for expected in [
        "courier.publish",
        "courier.handle",
        "courier.retry",
        "courier.dead_letter",
        "courier.settle",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected} span in {names:?}"
        );
    }

    // The receipt continues the payment's trace.
    let receipt_tp = receipt.message.headers["traceparent"].clone();
    assert!(
        receipt_tp.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
        "trace not propagated: {receipt_tp}"
    );
    assert_eq!(dl.message.headers["courier-dead-letter-attempts"], "2");
    assert_eq!(
        traces.lock().unwrap().len(),
        1,
        "the duplicate must not run the handler"
    );
}

#[tokio::test]
async fn no_secret_in_debug_display_errors_or_logs() {
    let secrets = [
        "s3cr3t-amqp",
        "s3cr3t-redis",
        "s3cr3t-sasl",
        "s3cr3t-aws",
        "s3cr3t-pg",
    ];
    let text = format!(
        r#"
        guarantee = "exactly-once"
        [backend]
        kind = "kafka"
        bootstrap = "127.0.0.1:9092"
        settings = {{ "sasl.username" = "app", "sasl.password" = "{}", "security.protocol" = "SASL_SSL" }}
        [idempotency]
        store = "redis://:{}@127.0.0.1:6379"
    "#,
        secrets[2], secrets[1]
    );
    let kafka = Config::from_toml_str(&text).unwrap();
    let rabbit =
        Config::from_url(&format!("amqp://app:{}@127.0.0.1:5672/%2f", secrets[0])).unwrap();
    let sqs = Config::from_toml_str(&format!(
        "[backend]\nkind = \"sqs\"\naccess_key_id = \"AKIA\"\nsecret_access_key = \"{}\"\n[idempotency]\nstore = \"postgres://app:{}@db/x\"\n",
        secrets[3], secrets[4]
    ))
    .unwrap();
    let mut out = String::new();
    for c in [&kafka, &rabbit, &sqs] {
        out += &format!("{c:?}\n{}\n", c.to_toml());
        if let Ok(e) = courier::explain(c) {
            out += &format!("{e}\n{}\n", serde_json::to_string(&e).unwrap());
        }
    }
    // Errors that mention the URL.
    out += &Config::from_url(&format!("amqp://app:{}@host:5672/%2f?bogus=1", secrets[0]))
        .unwrap_err()
        .to_string();
    out += &Config::from_url(&format!("nats://app:{}@host", secrets[0]))
        .unwrap_err()
        .to_string();
    for s in secrets {
        assert!(!out.contains(s), "secret {s} leaked:\n{out}");
    }
}
