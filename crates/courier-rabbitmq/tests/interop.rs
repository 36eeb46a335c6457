//! Interop with a reference AMQP client, Python `pika` (from PyPI, installed by
//! `scripts/services up` into `~/.cache/courier/interop-venv`): courier's message is read by
//! pika with `message_id`, headers and payload intact, and a pika-published message is consumed
//! by courier with its id and headers.

use std::process::Command;
use std::time::Duration;

use courier_core::config::SecretUrl;
use courier_core::{DeliveryClient, Guarantee, Message, Subscription};
use courier_rabbitmq::Config;
use courier_rabbitmq::RabbitMqConfig;
use courier_testkit::{endpoints, unique};

fn pika(script: &str, args: &[&str]) -> String {
    let out = Command::new(courier_testkit::process::interop_python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "pika script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn client() -> courier_rabbitmq::RabbitMqClient {
    let config = Config {
        guarantee: Guarantee::AtLeastOnce,
        backend: RabbitMqConfig {
            url: SecretUrl::new(endpoints::rabbitmq_url()),
            ..RabbitMqConfig::default()
        },
        consumer: Default::default(),
        idempotency: None,
    };
    courier_rabbitmq::connect(&config)
        .await
        .unwrap_or_else(|e| endpoints::unreachable("RabbitMQ", &endpoints::rabbitmq_url(), e))
}

const PIKA_GET: &str = r#"
import json, sys, time, pika
params = pika.URLParameters(sys.argv[1])
conn = pika.BlockingConnection(params)
ch = conn.channel()
deadline = time.time() + 20
while True:
    method, props, body = ch.basic_get(queue=sys.argv[2], auto_ack=True)
    if method is not None:
        break
    if time.time() > deadline:
        sys.exit("no message in " + sys.argv[2])
    time.sleep(0.05)
headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (props.headers or {}).items()}
print(json.dumps({"message_id": props.message_id, "headers": headers,
                  "body": body.decode(), "delivery_mode": props.delivery_mode}))
conn.close()
"#;

const PIKA_PUBLISH: &str = r#"
import sys, pika
conn = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
ch = conn.channel()
ch.confirm_delivery()
ch.basic_publish(exchange=sys.argv[2], routing_key="anything", body=sys.argv[3].encode(),
                 properties=pika.BasicProperties(message_id=sys.argv[4], delivery_mode=2,
                                                 headers={"tenant": "acme", "trace": "t-1"}),
                 mandatory=True)
conn.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_reads_what_courier_publishes() {
    let c = client().await;
    let dest = unique("interop");
    c.create_destination(&dest).await.unwrap();
    drop(c.subscribe(Subscription::new(&dest, "pika")).await.unwrap()); // declare the queue
    let m = Message::new("héllo from courier")
        .with_key("customer-7")
        .with_header("tenant", "acme");
    c.publish(&dest, m.clone()).await.unwrap();
    let out = pika(
        PIKA_GET,
        &[&endpoints::rabbitmq_url(), &format!("{dest}.pika")],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["message_id"], m.id.as_str(), "{v}");
    assert_eq!(v["body"], "héllo from courier", "{v}");
    assert_eq!(v["headers"]["tenant"], "acme", "{v}");
    assert_eq!(v["headers"]["courier-key"], "customer-7", "{v}");
    assert_eq!(
        v["delivery_mode"], 2,
        "at-least-once publishes persistent messages: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_consumes_what_pika_publishes() {
    let c = client().await;
    let dest = unique("interop");
    c.create_destination(&dest).await.unwrap();
    let mut sub = c
        .subscribe(Subscription::new(&dest, "courier"))
        .await
        .unwrap();
    pika(
        PIKA_PUBLISH,
        &[&endpoints::rabbitmq_url(), &dest, "from pika", "pika-id-42"],
    );
    let d = sub
        .next_timeout(Duration::from_secs(20))
        .await
        .expect("courier never received pika's message")
        .unwrap();
    assert_eq!(d.message.id.as_str(), "pika-id-42");
    assert_eq!(&d.message.payload[..], b"from pika");
    assert_eq!(
        d.message.headers.get("tenant").map(String::as_str),
        Some("acme")
    );
    assert_eq!(
        d.message.headers.get("trace").map(String::as_str),
        Some("t-1")
    );
    assert_eq!(d.attempt, 1);
    d.ack().await.unwrap();
}

const PIKA_PUBLISH_SAME_BODY: &str = r#"
import sys, pika
conn = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
ch = conn.channel()
ch.confirm_delivery()
for _ in range(3):
    ch.basic_publish(exchange=sys.argv[2], routing_key="anything", body=b"charge 10 EUR",
                     properties=pika.BasicProperties(delivery_mode=2), mandatory=True)
ch.basic_publish(exchange=sys.argv[2], routing_key="anything", body=b"with an id",
                 properties=pika.BasicProperties(message_id="pika-id-7", delivery_mode=2),
                 mandatory=True)
conn.close()
"#;

/// Three publishes of the same body without `message_id` are three messages: at-least-once hands
/// each over with an id of its own (no merging by body), and exactly-once, which could not tell
/// a redelivery from a new publish, dead-letters them with the reason instead of guessing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_messages_without_an_id() {
    let c = client().await;
    let dest = unique("interop-noid");
    c.create_destination(&dest).await.unwrap();
    let mut alo = c
        .subscribe(Subscription::new(&dest, "plain"))
        .await
        .unwrap();
    let mut eo_config = Config {
        guarantee: Guarantee::ExactlyOnce,
        backend: RabbitMqConfig {
            url: SecretUrl::new(endpoints::rabbitmq_url()),
            ..RabbitMqConfig::default()
        },
        consumer: Default::default(),
        idempotency: Some(Default::default()),
    };
    eo_config.consumer.concurrency = 1;
    let eo_client = courier_rabbitmq::connect(&eo_config).await.unwrap();
    let mut eo = eo_client
        .subscribe(Subscription::new(&dest, "billing"))
        .await
        .unwrap();
    let dlq = format!("{dest}-dlq");
    let mut dead = c.subscribe(Subscription::new(&dlq, "ops")).await.unwrap();
    pika(PIKA_PUBLISH_SAME_BODY, &[&endpoints::rabbitmq_url(), &dest]);

    let mut ids = std::collections::HashSet::new();
    for _ in 0..4 {
        let d = alo
            .next_timeout(Duration::from_secs(20))
            .await
            .expect("at-least-once received fewer than 4 messages")
            .unwrap();
        ids.insert(d.message.id.to_string());
        d.ack().await.unwrap();
    }
    assert_eq!(ids.len(), 4, "messages merged by body: {ids:?}");
    assert!(ids.contains("pika-id-7"), "{ids:?}");
    assert_eq!(
        ids.iter().filter(|id| id.starts_with("amqp-")).count(),
        3,
        "{ids:?}"
    );

    let d = eo
        .next_timeout(Duration::from_secs(20))
        .await
        .expect("exactly-once never received the message with an id")
        .unwrap();
    assert_eq!(d.message.id.as_str(), "pika-id-7");
    d.ack().await.unwrap();
    for _ in 0..3 {
        let d = dead
            .next_timeout(Duration::from_secs(20))
            .await
            .expect("an id-less message did not reach the dead-letter queue")
            .unwrap();
        assert_eq!(&d.message.payload[..], b"charge 10 EUR");
        let reason = d
            .message
            .headers
            .get(courier_core::header::DEAD_LETTER_REASON)
            .cloned()
            .unwrap_or_default();
        assert!(reason.contains("message_id"), "reason: {reason}");
        d.ack().await.unwrap();
    }
}
