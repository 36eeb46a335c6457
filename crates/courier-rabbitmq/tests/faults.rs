//! RabbitMQ under faults, on the real broker: connections closed by the broker mid-run, a broker
//! restart (`stop_app` / `start_app`) mid-run, consumer processes SIGKILLed mid-handler, and
//! publishing to an exchange nothing is bound to.
//!
//! The tests that disturb the broker hold a lock, so they never overlap each other; this file is
//! its own test binary, so no other test runs while they do.

use std::sync::Arc;
use std::time::Duration;

use courier_core::config::SecretUrl;
use courier_core::{
    Consumer, Context, DeliveryClient, Error, Guarantee, Handler, HandlerError, Message,
    Subscription,
};
use courier_rabbitmq::Config;
use courier_rabbitmq::RabbitMqConfig;
use courier_testkit::{endpoints, unique, Ledger};

static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(guarantee: Guarantee) -> Config {
    Config {
        guarantee,
        backend: RabbitMqConfig {
            url: SecretUrl::new(endpoints::rabbitmq_url()),
            ..RabbitMqConfig::default()
        },
        consumer: Default::default(),
        idempotency: None,
    }
}

async fn client(guarantee: Guarantee) -> Arc<dyn DeliveryClient> {
    Arc::new(client_with(&config(guarantee)).await)
}

/// A client of `config` (on the plain listener), failing the test when the broker is down.
async fn client_with(config: &Config) -> courier_rabbitmq::RabbitMqClient {
    match courier_rabbitmq::connect(config).await {
        Ok(c) => c,
        Err(e) => endpoints::unreachable("RabbitMQ", &endpoints::rabbitmq_url(), e),
    }
}

/// A plain lapin connection to the broker, for what a test checks or sets up behind courier.
async fn raw_connection() -> lapin::Connection {
    lapin::Connection::connect(
        &endpoints::rabbitmq_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap()
}

/// Subscribe group `g` to `dest`, publish one message and receive it (`how` names the case).
async fn round_trip(c: &dyn DeliveryClient, dest: &str, how: &str) {
    let mut s = c.subscribe(Subscription::new(dest, "g")).await.unwrap();
    let m = Message::new(format!("a message {how}"));
    c.publish(dest, m.clone()).await.unwrap();
    let d = s
        .next_timeout(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("nothing arrived {how}"))
        .unwrap();
    assert_eq!(d.message.id, m.id);
    d.ack().await.unwrap();
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the RabbitMQ app again when a test ends, however it ends.
struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .status();
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "await_startup", "--timeout", "60"])
            .status();
    }
}

struct Record(Arc<Ledger>);

#[courier_core::async_trait]
impl Handler for Record {
    async fn handle(&self, m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        self.0.handled(m.id.as_str());
        Ok(())
    }
}

/// Publish `n` messages, retrying each (same id) until the broker confirms it: what an
/// at-least-once producer does. Returns the number of retries needed.
async fn publish_all(
    client: Arc<dyn DeliveryClient>,
    dest: String,
    ledger: Arc<Ledger>,
    n: usize,
) -> usize {
    let mut retries = 0;
    for i in 0..n {
        let m = Message::new(format!("payment {i}")).with_key(format!("k{}", i % 16));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            match client.publish(&dest, m.clone()).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("publish failed for good: {e}"),
            }
        }
        ledger.sent(m.id.as_str());
    }
    retries
}

/// 10,000 messages at-least-once while `fault` runs three times, at 20%, 50% and 80% handled.
async fn run_with_fault(name: &str, fault: impl Fn()) {
    const N: usize = 10_000;
    let producer = client(Guarantee::AtLeastOnce).await;
    let consumer_client = client(Guarantee::AtLeastOnce).await;
    let dest = unique(name);
    producer.create_destination(&dest).await.unwrap();
    let ledger = Arc::new(Ledger::new());
    let handles = {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(
                Consumer::new(consumer_client.clone(), Subscription::new(&dest, "g"))
                    .concurrency(8)
                    .spawn(Record(ledger.clone()))
                    .await
                    .unwrap(),
            );
        }
        v
    };
    let publisher = tokio::spawn(publish_all(
        producer.clone(),
        dest.clone(),
        ledger.clone(),
        N,
    ));
    for share in [0.2, 0.5, 0.8] {
        let target = (N as f64 * share) as usize;
        let (r, ok) = ledger
            .wait_until(Duration::from_secs(120), |r| r.handled >= target)
            .await;
        assert!(ok, "{name}: stalled before {target} handled: {r}");
        fault();
    }
    let retries = publisher.await.unwrap();
    let (report, done) = ledger.wait_all_handled(Duration::from_secs(180)).await;
    for h in handles {
        let _ = h.shutdown().await;
    }
    println!("{name}: {report}; publish retries {retries}");
    assert!(
        done && report.lost == 0,
        "{name}: at-least-once lost messages: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_closed_by_the_broker_mid_run_lose_nothing() {
    let _lock = BROKER.lock().await;
    run_with_fault("cut", || {
        rabbitmqctl(&["-q", "close_all_connections", "courier fault test"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_restart_mid_run_loses_nothing() {
    let _lock = BROKER.lock().await;
    let _guard = StartAppOnDrop;
    run_with_fault("restart", || {
        rabbitmqctl(&["-q", "stop_app"]);
        rabbitmqctl(&["-q", "start_app"]);
        rabbitmqctl(&["-q", "await_startup", "--timeout", "60"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishing_where_nothing_is_bound_is_a_typed_unroutable_error() {
    let _lock = BROKER.lock().await;
    let c = client(Guarantee::AtLeastOnce).await;
    let dest = unique("unbound");
    c.create_destination(&dest).await.unwrap(); // an exchange, with no queue bound to it
    let e = c
        .publish(&dest, Message::new("to nowhere"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unroutable { .. }), "{e}");
    assert!(!e.is_retryable());
    let e = c
        .publish_batch(&dest, vec![Message::new("a"), Message::new("b")])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unroutable { .. }), "{e}");
}

/// With `auto_create`, the exchange is declared before this client's first publish only. One
/// deleted behind the client's back is declared again by the next publish — which is then
/// unroutable (the deletion took the queue's binding with it), not a missing destination — and a
/// new subscription binds the queue again; nothing published before is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_create_declares_again_an_exchange_deleted_since() {
    let _lock = BROKER.lock().await;
    let mut cfg = config(Guarantee::AtLeastOnce);
    {
        let r = &mut cfg.backend;
        r.auto_create = true;
    }
    let c = client_with(&cfg).await;
    let dest = unique("auto");
    // The subscription declares the exchange and binds its queue.
    c.subscribe(Subscription::new(&dest, "g"))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    c.publish(&dest, Message::new("one")).await.unwrap();
    c.publish(&dest, Message::new("two")).await.unwrap();

    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete(dest.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;

    let e = c.publish(&dest, Message::new("three")).await.unwrap_err();
    assert!(matches!(e, Error::Unroutable { .. }), "{e}");

    let mut sub = c.subscribe(Subscription::new(&dest, "g")).await.unwrap();
    c.publish(&dest, Message::new("four")).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let d = sub
            .next_timeout(Duration::from_secs(10))
            .await
            .expect("the queue's messages within 10 s")
            .unwrap();
        got.push(String::from_utf8_lossy(&d.message.payload).into_owned());
        d.ack().await.unwrap();
    }
    sub.close().await.unwrap();
    got.sort();
    assert_eq!(got, ["four", "one", "two"]);
}

/// Names and messages AMQP cannot carry — a name, message id or header name over 255 bytes, an
/// `amq.` name, headers larger than a frame — get a typed error before anything is declared or
/// sent (lapin would panic on the long strings, and the broker closes the whole connection on an
/// oversize header frame). The same connection then still carries a good message, and that
/// message is the only one the subscription receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn names_and_messages_that_amqp_cannot_carry_are_refused() {
    let c = client(Guarantee::AtLeastOnce).await;
    let dest = unique("bad-input");
    c.create_destination(&dest).await.unwrap();
    let mut sub = c.subscribe(Subscription::new(&dest, "g")).await.unwrap();
    let long = "x".repeat(300);

    fn kind<T>(r: courier_core::Result<T>) -> String {
        match r {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.kind().to_owned(),
        }
    }
    // Names.
    assert_eq!(kind(c.create_destination(&long).await), "invalid_name");
    assert_eq!(
        kind(c.create_destination("amq.courier").await),
        "invalid_name"
    );
    assert_eq!(
        kind(c.publish(&long, Message::new("m")).await),
        "invalid_name"
    );
    assert_eq!(
        kind(c.publish_batch(&long, vec![Message::new("m")]).await),
        "invalid_name"
    );
    match c.subscribe(Subscription::new(&dest, long.as_str())).await {
        Err(e) => assert_eq!(e.kind(), "invalid_name", "{e}"),
        Ok(_) => panic!("a 300-byte group name was accepted"),
    }
    // Messages.
    let e = c
        .publish(&dest, Message::new("m").with_id(long.as_str()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "invalid_message", "{e}");
    assert!(e.to_string().contains("nothing was sent"), "{e}");
    let e = c
        .publish(&dest, Message::new("m").with_header(long.as_str(), "v"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "invalid_message", "{e}");
    let big = "v".repeat(200 * 1024);
    let e = c
        .publish(&dest, Message::new("m").with_header("big", big.as_str()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "invalid_message", "{e}");
    assert!(e.to_string().contains("frame"), "{e}");
    // One bad message refuses the whole batch, before any of it is sent.
    let e = c
        .publish_batch(
            &dest,
            vec![
                Message::new("first of a bad batch"),
                Message::new("m").with_id(long.as_str()),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "invalid_message", "{e}");

    // The connection is intact, and the good message is the first to arrive: the queue keeps
    // publish order, so anything a refused publish had sent would have come before it.
    let good = Message::new("good");
    c.publish(&dest, good.clone()).await.unwrap();
    let d = sub
        .next_timeout(Duration::from_secs(30))
        .await
        .expect("the good message never arrived")
        .unwrap();
    assert_eq!(
        d.message.id, good.id,
        "something of a refused publish was delivered"
    );
    d.ack().await.unwrap();
}

/// A retry parked for 200 ms comes back in time although one parked for 30 s went first: each
/// delay step has its own delay queue, so a short retry never waits behind a long one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_retry_is_not_held_behind_a_long_one() {
    let c = client(Guarantee::AtLeastOnce).await;
    let dest = unique("delays");
    c.create_destination(&dest).await.unwrap();
    let mut sub = c.subscribe(Subscription::new(&dest, "g")).await.unwrap();
    let (long, short) = (Message::new("long"), Message::new("short"));
    c.publish(&dest, long.clone()).await.unwrap();
    c.publish(&dest, short.clone()).await.unwrap();
    for _ in 0..2 {
        let d = sub
            .next_timeout(Duration::from_secs(30))
            .await
            .expect("a message never arrived")
            .unwrap();
        let delay = if d.message.id == long.id {
            Duration::from_secs(30)
        } else {
            Duration::from_millis(200)
        };
        d.nack(delay).await.unwrap();
    }
    let back = sub
        .next_timeout(Duration::from_secs(10))
        .await
        .expect("the 200 ms retry was held behind the 30 s one")
        .unwrap();
    assert_eq!(back.message.id, short.id, "the 30 s retry came back first");
    assert_eq!(back.attempt, 2);
    back.ack().await.unwrap();
}

/// A message the broker hands out more often than `delivery_limit` (its consumers went away
/// without settling it) is dead-lettered by the broker to the subscription's dead-letter queue —
/// not requeued for ever, and not dropped as RabbitMQ 4 does past its default limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_broker_dead_letters_a_message_past_the_delivery_limit() {
    let mut cfg = config(Guarantee::AtLeastOnce);
    {
        let r = &mut cfg.backend;
        r.delivery_limit = 1;
    }
    let c = client_with(&cfg).await;
    let dest = unique("limit");
    c.create_destination(&dest).await.unwrap();
    let sub = Subscription::new(&dest, "g");
    let dlq = sub.dead_letter_destination();
    c.declare_subscription(&sub).await.unwrap();
    let m = Message::new("poison for consumers");
    c.publish(&dest, m.clone()).await.unwrap();
    // Two consumers take it and go away without settling: delivered twice, over the limit of 1.
    for _ in 0..2 {
        let mut s = c.subscribe(sub.clone()).await.unwrap();
        let d = s
            .next_timeout(Duration::from_secs(30))
            .await
            .expect("the message was not redelivered")
            .unwrap();
        assert_eq!(d.message.id, m.id);
        drop(d);
        s.close().await.unwrap();
    }
    // The broker dead-letters it to the subscription's dead-letter queue.
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let mut dead = ch
        .basic_consume(
            dlq.as_str().into(),
            "limit-test".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(15), futures::StreamExt::next(&mut dead))
        .await
        .unwrap_or_else(|_| panic!("the message never reached {dlq}"))
        .expect("the dead-letter consumer ended")
        .unwrap();
    assert_eq!(
        got.properties.message_id().as_ref().map(|s| s.as_str()),
        Some(m.id.as_str())
    );
    // And the work queue holds nothing more.
    let work = ch
        .queue_declare(
            format!("{dest}.g").as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(work.message_count(), 0);
    let _ = conn.close(200, "done".into()).await;
}

/// A work queue declared by an earlier version (without the delivery limit and dead-letter
/// exchange) is used as it is: subscribing does not fail on the broker's inequivalent-argument
/// refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_declared_without_the_delivery_limit_is_used_as_it_is() {
    let c = client(Guarantee::AtLeastOnce).await;
    let dest = unique("legacy");
    c.create_destination(&dest).await.unwrap();
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    let queue = format!("{dest}.g");
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;

    round_trip(&*c, &dest, "on the earlier version's queue").await;
}

/// The TLS settings are applied: with `tls_ca_file` naming the test CA of the broker's TLS
/// listener a client connects and a message goes round; without it the same URL fails (the CA is
/// not a system root); a client identity with the wrong password fails, the right one connects;
/// TLS settings on a plain `amqp://` URL are a configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_settings_are_applied() {
    use courier_core::config::Secret;
    let tls = |ca: bool, identity: Option<&str>| Config {
        backend: RabbitMqConfig {
            url: SecretUrl::new(endpoints::rabbitmq_tls_url()),
            tls_ca_file: ca.then(endpoints::rabbitmq_tls_ca),
            tls_client_identity: identity.map(|_| endpoints::rabbitmq_tls_client()),
            tls_client_identity_password: identity.map(Secret::new),
            ..RabbitMqConfig::default()
        },
        ..config(Guarantee::AtLeastOnce)
    };
    let c = match courier_rabbitmq::connect(&tls(true, None)).await {
        Ok(c) => c,
        Err(e) => {
            endpoints::unreachable("RabbitMQ TLS listener", &endpoints::rabbitmq_tls_url(), e)
        }
    };
    let dest = unique("tls");
    c.create_destination(&dest).await.unwrap();
    round_trip(&c, &dest, "over TLS").await;

    let e = courier_rabbitmq::connect(&tls(false, None))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "broker", "without the CA: {e}");
    let e = courier_rabbitmq::connect(&tls(true, Some("wrong")))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "broker", "with a wrong identity password: {e}");
    courier_rabbitmq::connect(&tls(true, Some("courier")))
        .await
        .expect("the client identity with its password");

    let mut plain = tls(true, None);
    {
        let r = &mut plain.backend;
        r.url = SecretUrl::new(endpoints::rabbitmq_url());
    }
    let e = courier_rabbitmq::connect(&plain).await.unwrap_err();
    assert_eq!(e.kind(), "config", "{e}");
}
