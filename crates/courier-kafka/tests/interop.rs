//! Interop with a reference Kafka client, `kcat` (librdkafka's command-line client, from
//! Debian): courier's record read by kcat with key, `courier-id` header and payload intact, and a
//! kcat-produced record consumed by courier with its key and headers.
//!
//! Runs against the Kafka broker at `KAFKA_BOOTSTRAP` (Apache Kafka from `scripts/services`).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use courier_core::{DeliveryClient, Guarantee, Message, Subscription};

/// A fresh topic on the broker, created through courier.
async fn fresh_topic(client: &impl DeliveryClient) -> String {
    let topic = courier_testkit::unique("kcat");
    client.create_destination(&topic).await.unwrap();
    topic
}

fn kcat() -> &'static str {
    if Command::new("kcat").arg("-V").output().is_err() {
        panic!("kcat is not installed: run `scripts/services up` (it installs Debian's kcat)");
    }
    "kcat"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_reads_what_courier_publishes() {
    let boot = courier_testkit::endpoints::kafka_bootstrap();
    let c = courier_kafka::connect(&common::config(&boot, Guarantee::AtLeastOnce))
        .await
        .unwrap();
    let topic = fresh_topic(&c).await;
    let m = Message::new("from courier")
        .with_key("customer-7")
        .with_header("tenant", "acme");
    c.publish(&topic, m.clone()).await.unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(kcat())
            .args(["-C", "-b", &boot, "-t", &topic, "-c", "1", "-e", "-q"])
            .args(["-f", "%k\\n%h\\n%s\\n"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "kcat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first().copied(), Some("customer-7"), "{text}");
    let headers = lines.get(1).copied().unwrap_or_default();
    assert!(headers.contains(&format!("courier-id={}", m.id)), "{text}");
    assert!(headers.contains("tenant=acme"), "{text}");
    assert_eq!(lines.get(2).copied(), Some("from courier"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_consumes_what_kcat_produces() {
    let boot = courier_testkit::endpoints::kafka_bootstrap();
    let c = courier_kafka::connect(&common::config(&boot, Guarantee::AtLeastOnce))
        .await
        .unwrap();
    let topic = fresh_topic(&c).await;
    let (b, t) = (boot.clone(), topic.clone());
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new(kcat())
            .args([
                "-P",
                "-b",
                &b,
                "-t",
                &t,
                "-k",
                "customer-9",
                "-H",
                "tenant=acme",
                "-H",
                "courier-id=kcat-id-1",
            ])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"from kcat\n")
            .unwrap();
        assert!(child.wait().unwrap().success());
    })
    .await
    .unwrap();
    let mut sub = c.subscribe(Subscription::new(&topic, "g")).await.unwrap();
    let d = sub
        .next_timeout(Duration::from_secs(30))
        .await
        .expect("courier never received kcat's record")
        .unwrap();
    assert_eq!(d.message.id.as_str(), "kcat-id-1");
    assert_eq!(d.message.key.as_deref(), Some("customer-9"));
    assert_eq!(&d.message.payload[..], b"from kcat");
    assert_eq!(
        d.message.headers.get("tenant").map(String::as_str),
        Some("acme")
    );
    d.ack().await.unwrap();
}
