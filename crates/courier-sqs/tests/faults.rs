//! SQS on LocalStack under faults and against a reference client: consumer processes SIGKILLed
//! mid-handler (redelivered after the visibility timeout, nothing lost), a handler slower than
//! the visibility timeout (the heartbeat keeps it invisible: not redelivered), FIFO dedup of a
//! re-sent id with per-group order across consumers, and interop with `boto3`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use courier_core::config::Secret;
use courier_core::{
    Consumer, Context, DeliveryClient, Error, Guarantee, Handler, HandlerError, Message,
    Subscription,
};
use courier_sqs::Config;
use courier_sqs::SqsConfig;
use courier_testkit::{endpoints, unique, Ledger};
use parking_lot::Mutex;

fn config(fifo: bool, visibility: Duration) -> Config {
    Config {
        guarantee: Guarantee::AtLeastOnce,
        backend: SqsConfig {
            region: Some(endpoints::aws_region()),
            endpoint: Some(endpoints::sqs_endpoint()),
            access_key_id: Some(
                std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "test".into()),
            ),
            secret_access_key: Some(Secret::new(
                std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "test".into()),
            )),
            visibility_timeout: visibility,
            wait_time: Duration::from_secs(1),
            fifo,
            ..SqsConfig::default()
        },
        consumer: Default::default(),
        idempotency: None,
    }
}

async fn client(fifo: bool, visibility: Duration) -> Arc<dyn DeliveryClient> {
    match courier_sqs::connect(&config(fifo, visibility)).await {
        Ok(c) => Arc::new(c),
        Err(e) => endpoints::unreachable("LocalStack SQS", &endpoints::sqs_endpoint(), e),
    }
}

async fn fresh(c: &dyn DeliveryClient, name: String) -> String {
    match c.create_destination(&name).await {
        Ok(()) => name,
        Err(e) => endpoints::unreachable("LocalStack SQS", &endpoints::sqs_endpoint(), e),
    }
}

/// Records handlings (and the attempt each ran as), optionally sleeping first.
struct Slow {
    ledger: Arc<Ledger>,
    sleep: Duration,
    attempts: Arc<Mutex<Vec<u32>>>,
}

#[courier_core::async_trait]
impl Handler for Slow {
    async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        self.attempts.lock().push(cx.attempt());
        tokio::time::sleep(self.sleep).await;
        self.ledger.handled(m.id.as_str());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handler_slower_than_the_visibility_timeout_is_not_redelivered() {
    let visibility = Duration::from_secs(2);
    let c = client(false, visibility).await;
    let q = fresh(&*c, unique("hb")).await;
    let ledger = Arc::new(Ledger::new());
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let h = Consumer::new(c.clone(), Subscription::new(&q, "g"))
        .concurrency(4)
        .spawn(Slow {
            ledger: ledger.clone(),
            sleep: visibility * 3,
            attempts: attempts.clone(),
        })
        .await
        .unwrap();
    let m = Message::new("slow work");
    ledger.sent(m.id.as_str());
    c.publish(&q, m).await.unwrap();
    let (r, ok) = ledger.wait_all_handled(Duration::from_secs(60)).await;
    assert!(ok, "{r}");
    // A redelivery would have started while the handler ran (after 2 s) or right after it.
    let _ = ledger.wait_until(visibility * 2, |r| r.handlings > 1).await;
    h.shutdown().await.unwrap();
    let attempts = attempts.lock().clone();
    assert_eq!(
        attempts,
        vec![1],
        "the heartbeat must keep the message invisible: {attempts:?}"
    );
    assert_eq!(ledger.report().duplicates, 0);
}

/// Records arrival order per key.
struct Order {
    ledger: Arc<Ledger>,
    seen: Arc<Mutex<HashMap<String, Vec<u32>>>>,
}

#[courier_core::async_trait]
impl Handler for Order {
    async fn handle(&self, m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        let n: u32 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        self.seen
            .lock()
            .entry(m.key.clone().unwrap())
            .or_default()
            .push(n);
        self.ledger.handled(m.id.as_str());
        Ok(())
    }
}

/// Closing a subscription must not strand what its receive loop already holds: messages the last
/// receive brought (or a long poll in flight still brings) go back to the queue at once instead
/// of staying invisible for the visibility timeout — here 60 s, far past this test's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_a_subscription_strands_nothing() {
    let c = client(false, Duration::from_secs(60)).await;
    let q = fresh(&*c, unique("close")).await;
    let n = 6;
    let sent: Vec<Message> = (0..n).map(|i| Message::new(format!("m{i}"))).collect();
    let ids: std::collections::HashSet<String> = sent.iter().map(|m| m.id.to_string()).collect();
    c.publish_batch(&q, sent).await.unwrap();
    let bound = Duration::from_secs(15);
    // Take one delivery, so the loop has received a batch (the rest of it sits in the loop or
    // the channel) and has another long poll out; then close.
    let mut s = c.subscribe(Subscription::new(&q, "g")).await.unwrap();
    let first = s
        .next_timeout(bound)
        .await
        .expect("a delivery within the bound")
        .unwrap();
    let first_id = first.message.id.to_string();
    first.ack().await.unwrap();
    s.close().await.unwrap();
    // Everything else is visible again: a fresh subscription gets it well before the 60 s
    // visibility timeout would have let it reappear.
    let mut s = c.subscribe(Subscription::new(&q, "g")).await.unwrap();
    let mut got = std::collections::HashSet::new();
    while got.len() < n - 1 {
        match s.next_timeout(bound).await {
            Some(Ok(d)) => {
                got.insert(d.message.id.to_string());
                d.ack().await.unwrap();
            }
            other => panic!(
                "{} of {} messages came back within {bound:?} after close ({other:?}): the rest were stranded",
                got.len(),
                n - 1
            ),
        }
    }
    s.close().await.unwrap();
    let mut expected = ids;
    expected.remove(&first_id);
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifo_drops_a_resent_id_and_keeps_group_order_across_consumers() {
    let c = client(true, Duration::from_secs(5)).await;
    let q = fresh(&*c, format!("{}.fifo", unique("dedup"))).await;
    let ledger = Arc::new(Ledger::new());
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(
            Consumer::new(c.clone(), Subscription::new(&q, "g"))
                .concurrency(4)
                .spawn(Order {
                    ledger: ledger.clone(),
                    seen: seen.clone(),
                })
                .await
                .unwrap(),
        );
    }
    for i in 0..60u32 {
        let m = Message::new(i.to_string()).with_key(format!("group-{}", i % 3));
        ledger.sent(m.id.as_str());
        c.publish(&q, m.clone()).await.unwrap();
        // A producer retry after a lost response: the same id again, within 5 minutes.
        c.publish(&q, m).await.unwrap();
    }
    let (r, ok) = ledger.wait_all_handled(Duration::from_secs(90)).await;
    assert!(ok, "{r}");
    let _ = ledger
        .wait_until(Duration::from_secs(3), |r| r.duplicates > 0)
        .await;
    for h in handles {
        h.shutdown().await.unwrap();
    }
    let r = ledger.report();
    assert_eq!(r.duplicates, 0, "a re-sent id was delivered twice: {r}");
    for (group, order) in seen.lock().iter() {
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{group} out of order: {order:?}"
        );
    }
}

// ---- boto3 -----------------------------------------------------------------------------------

fn boto3(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(courier_testkit::process::interop_python())
        .arg("-c")
        .arg(script)
        .args(args)
        .env(
            "AWS_ACCESS_KEY_ID",
            std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "test".into()),
        )
        .env(
            "AWS_SECRET_ACCESS_KEY",
            std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "test".into()),
        )
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "boto3 script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const BOTO3_RECEIVE: &str = r#"
import json, sys, time, boto3
sqs = boto3.client("sqs", endpoint_url=sys.argv[1], region_name=sys.argv[2])
url = sqs.get_queue_url(QueueName=sys.argv[3])["QueueUrl"]
deadline = time.time() + 20
while True:
    r = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=1,
                            MessageAttributeNames=["All"], AttributeNames=["All"])
    if r.get("Messages"):
        break
    if time.time() > deadline:
        sys.exit("nothing received")
m = r["Messages"][0]
print(json.dumps({"body": m["Body"],
                  "attributes": {k: v.get("StringValue") for k, v in m.get("MessageAttributes", {}).items()},
                  "system": m.get("Attributes", {})}))
"#;

const BOTO3_SEND_FIFO: &str = r#"
import sys, boto3
sqs = boto3.client("sqs", endpoint_url=sys.argv[1], region_name=sys.argv[2])
url = sqs.get_queue_url(QueueName=sys.argv[3])["QueueUrl"]
for i in range(3):
    sqs.send_message(QueueUrl=url, MessageBody="boto3 %d" % i, MessageGroupId="customer-9",
                     MessageDeduplicationId="boto3-id-%d" % i,
                     MessageAttributes={"tenant": {"DataType": "String", "StringValue": "acme"}})
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_reads_what_courier_publishes() {
    for fifo in [false, true] {
        let c = client(fifo, Duration::from_secs(5)).await;
        let name = if fifo {
            format!("{}.fifo", unique("boto"))
        } else {
            unique("boto")
        };
        let q = fresh(&*c, name).await;
        let m = Message::new("from courier")
            .with_key("customer-7")
            .with_header("tenant", "acme");
        c.publish(&q, m.clone()).await.unwrap();
        let out = boto3(
            BOTO3_RECEIVE,
            &[&endpoints::sqs_endpoint(), &endpoints::aws_region(), &q],
        );
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["body"], "from courier", "{v}");
        assert_eq!(v["attributes"]["courier-id"], m.id.as_str(), "{v}");
        assert_eq!(v["attributes"]["courier-key"], "customer-7", "{v}");
        let headers: serde_json::Value =
            serde_json::from_str(v["attributes"]["courier-headers"].as_str().unwrap()).unwrap();
        assert_eq!(headers["tenant"], "acme", "{v}");
        if fifo {
            assert_eq!(v["system"]["MessageDeduplicationId"], m.id.as_str(), "{v}");
            assert_eq!(v["system"]["MessageGroupId"], "customer-7", "{v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_consumes_boto3_fifo_messages_with_their_ids_and_groups() {
    let c = client(true, Duration::from_secs(5)).await;
    let q = fresh(&*c, format!("{}.fifo", unique("boto"))).await;
    boto3(
        BOTO3_SEND_FIFO,
        &[&endpoints::sqs_endpoint(), &endpoints::aws_region(), &q],
    );
    let mut sub = c.subscribe(Subscription::new(&q, "g")).await.unwrap();
    for i in 0..3 {
        let d = sub
            .next_timeout(Duration::from_secs(20))
            .await
            .expect("courier never received boto3's message")
            .unwrap();
        assert_eq!(
            d.message.id.as_str(),
            format!("boto3-id-{i}"),
            "the producer's dedup id is the id"
        );
        assert_eq!(d.message.key.as_deref(), Some("customer-9"));
        assert_eq!(&d.message.payload[..], format!("boto3 {i}").as_bytes());
        assert_eq!(
            d.message.headers.get("tenant").map(String::as_str),
            Some("acme")
        );
        d.ack().await.unwrap();
    }
}

/// Queue names SQS refuses get a typed `InvalidName` before any request, with the rule in the
/// message — not an SDK error dump — on create, publish and subscribe alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_names_sqs_refuses_are_refused_before_any_request() {
    let c = client(false, Duration::from_secs(30)).await;
    let too_long = "q".repeat(81);
    courier_testkit::assert_names_refused(
        &*c,
        &[
            "",
            "orders.eu",
            "orders eu",
            "orders/eu",
            ".fifo",
            too_long.as_str(),
        ],
    )
    .await;
    // The longest valid names are accepted, standard and FIFO.
    fresh(&*c, unique(&"q".repeat(67))).await;
    let fifo = client(true, Duration::from_secs(30)).await;
    fresh(&*fifo, format!("{}.fifo", unique(&"q".repeat(62)))).await;
}

/// SQS refusals reach the user as typed errors of one short sentence: an empty body is
/// `InvalidMessage`; a body over the queue's own `MaximumMessageSize` (256 KiB on LocalStack,
/// below courier's 1 MiB cap) is `PayloadTooLarge` with the queue's limit, before anything is
/// sent; a refusal only the service can make is `Broker` with its code and message, not the
/// SDK's response dump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_short_typed_errors() {
    let c = client(false, Duration::from_secs(30)).await;
    let q = fresh(&*c, unique("refuse")).await;

    let e = c.publish(&q, Message::new("")).await.unwrap_err();
    assert_eq!(e.kind(), "invalid_message", "{e}");

    let big = Message::new(vec![b'x'; 300 * 1024]);
    match c.publish(&q, big.clone()).await.unwrap_err() {
        Error::PayloadTooLarge { limit, .. } => assert_eq!(limit, 262_144),
        e => panic!("expected PayloadTooLarge, got {e}"),
    }
    match c
        .publish_batch(&q, vec![Message::new("small"), big])
        .await
        .unwrap_err()
    {
        Error::PayloadTooLarge { limit, .. } => assert_eq!(limit, 262_144),
        e => panic!("expected PayloadTooLarge, got {e}"),
    }

    // A refusal only the service can make: the queue exists with another visibility timeout.
    let other = client(false, Duration::from_secs(5)).await;
    let e = other.create_destination(&q).await.unwrap_err();
    let text = e.to_string();
    assert_eq!(e.kind(), "broker", "{text}");
    assert!(
        text.contains("QueueAlreadyExists") || text.contains("QueueNameExists"),
        "{text}"
    );
    assert!(text.len() < 400, "{} bytes: {text}", text.len());
    assert!(!text.contains("raw: Response"), "{text}");

    // Nothing of the refused publishes reached the queue.
    let sdk = aws_sdk_sqs::Client::new(
        &aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(endpoints::aws_region()))
            .endpoint_url(endpoints::sqs_endpoint())
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .load()
            .await,
    );
    let url = sdk
        .get_queue_url()
        .queue_name(&q)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let attrs = sdk
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await
        .unwrap();
    let waiting = attrs
        .attributes()
        .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages))
        .cloned();
    assert_eq!(waiting.as_deref(), Some("0"));
}

/// A second consumer group on one queue is refused (SQS would split the messages between the
/// groups); the first group — whether it subscribed or was declared first — keeps reading, from
/// another client too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_group_on_one_queue_is_refused() {
    let c = client(false, Duration::from_secs(30)).await;
    let q = fresh(&*c, unique("groups")).await;
    let first = c.subscribe(Subscription::new(&q, "billing")).await.unwrap();
    let e = match c.subscribe(Subscription::new(&q, "shipping")).await {
        Err(e) => e,
        Ok(_) => panic!("a second group was accepted on one SQS queue"),
    };
    assert_eq!(e.kind(), "unsupported", "{e}");
    assert!(e.to_string().contains("billing"), "{e}");
    // Another client (another process) sees the claim; the same group is welcome.
    let other = client(false, Duration::from_secs(30)).await;
    let e = other
        .declare_subscription(&Subscription::new(&q, "shipping"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "unsupported", "{e}");
    let mut again = other
        .subscribe(Subscription::new(&q, "billing"))
        .await
        .unwrap();
    first.close().await.unwrap();
    c.publish(&q, Message::new("m")).await.unwrap();
    let d = again
        .next_timeout(Duration::from_secs(30))
        .await
        .expect("the group's second member received nothing")
        .unwrap();
    d.ack().await.unwrap();
}
