//! The conformance scenarios. Each takes a [`TestBackend`], consults its capabilities, and returns
//! `Err` (with counts) when the backend broke the contract.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use parking_lot::Mutex;

use courier_core::{
    header, json_handler_fn, BatchHandler, BatchOptions, Consumer, ConsumerHandle, Context,
    DeliveryClient, Error, GroupInfo, Guarantee, Handler, HandlerError, Message, RetryPolicy,
    Subscription,
};
use courier_idempotency::Idempotent;

use crate::endpoints::scaled;
use crate::{unique, Ledger, TestBackend};

/// A broken contract, with what was observed.
#[derive(Debug)]
pub struct ScenarioError(pub String);

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScenarioError {}

impl From<Error> for ScenarioError {
    fn from(e: Error) -> Self {
        ScenarioError(format!("unexpected courier error ({}): {e}", e.kind()))
    }
}

/// Result of a scenario.
pub type Outcome = Result<(), ScenarioError>;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(ScenarioError(format!($($arg)*)));
        }
    };
}

fn wait() -> Duration {
    scaled(Duration::from_secs(60))
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::attempts(max_attempts)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// Start `consumer` with `handler` — through the idempotent layer (namespaced by `group`) when
/// the backend asks for it, so the same scenarios prove the layer changes nothing they check.
async fn launch<H: Handler>(
    b: &dyn TestBackend,
    consumer: Consumer,
    group: &str,
    handler: H,
) -> courier_core::Result<ConsumerHandle> {
    match b.layer_store() {
        Some(store) => {
            consumer
                .spawn(
                    Idempotent::new(handler, store)
                        .namespace(group)
                        .lease(Duration::from_secs(5)),
                )
                .await
        }
        None => consumer.spawn(handler).await,
    }
}

/// A handler that records each message id in a ledger (optionally failing some attempts).
struct Recorder {
    ledger: Arc<Ledger>,
    fail_first: u32,
    attempts: Mutex<HashMap<String, u32>>,
}

impl Recorder {
    fn new(ledger: Arc<Ledger>) -> Self {
        Recorder {
            ledger,
            fail_first: 0,
            attempts: Mutex::default(),
        }
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, message: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        let n = {
            let mut a = self.attempts.lock();
            let n = a.entry(message.id.to_string()).or_default();
            *n += 1;
            *n
        };
        if n <= self.fail_first {
            return Err(HandlerError::retryable(format!("injected failure {n}")));
        }
        self.ledger.handled(message.id.as_str());
        Ok(())
    }
}

async fn publish_all(
    client: &dyn DeliveryClient,
    dest: &str,
    msgs: &[Message],
    ledger: &Ledger,
) -> Outcome {
    for m in msgs {
        client.publish(dest, m.clone()).await?;
        ledger.sent(m.id.as_str());
    }
    Ok(())
}

async fn stop(handles: Vec<ConsumerHandle>) -> Outcome {
    for h in handles {
        h.shutdown().await?;
    }
    Ok(())
}

/// Receive and ack deliveries until `want` distinct ids outside `except` arrived, or nothing
/// arrives within the wait; returns those ids.
async fn ack_distinct(
    deliveries: &mut courier_core::Deliveries,
    want: usize,
    except: &std::collections::HashSet<courier_core::MessageId>,
) -> Result<std::collections::HashSet<courier_core::MessageId>, ScenarioError> {
    let mut got = std::collections::HashSet::new();
    while got.len() < want {
        let Some(d) = deliveries.next_timeout(wait()).await else {
            break;
        };
        let d = d?;
        if !except.contains(&d.message.id) {
            got.insert(d.message.id.clone());
        }
        d.ack().await?;
    }
    Ok(got)
}

fn numbered(n: usize, prefix: &str) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("{prefix}-{i}")).with_header("seq", i.to_string()))
        .collect()
}

/// Publish a message with id, key, headers and binary payload; receive it intact.
pub async fn round_trip(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "round-trip").await?;
    let mut deliveries = client
        .subscribe(Subscription::new(&dest, unique("g")))
        .await?;
    let payload: Vec<u8> = (0..=255u8).chain(b"courier".iter().copied()).collect();
    let sent = Message::new(Bytes::from(payload))
        .with_key("customer-42")
        .with_header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .with_header("x-tenant", "acme");
    let receipt = client.publish(&dest, sent.clone()).await?;
    ensure!(
        receipt.id == sent.id,
        "receipt id {} != message id {}",
        receipt.id,
        sent.id
    );
    let d = deliveries
        .next_timeout(wait())
        .await
        .ok_or_else(|| ScenarioError("no delivery within the wait bound".into()))??;
    ensure!(
        d.message.id == sent.id,
        "id changed: {} -> {}",
        sent.id,
        d.message.id
    );
    ensure!(
        d.message.key == sent.key,
        "key changed: {:?} -> {:?}",
        sent.key,
        d.message.key
    );
    ensure!(
        d.message.payload == sent.payload,
        "payload changed ({} -> {} bytes)",
        sent.payload.len(),
        d.message.payload.len()
    );
    for (k, v) in &sent.headers {
        ensure!(
            d.message.headers.get(k) == Some(v),
            "header {k} lost or changed: {:?}",
            d.message.headers.get(k)
        );
    }
    ensure!(d.attempt == 1, "first delivery has attempt {}", d.attempt);
    ensure!(d.source == dest, "source {} != {}", d.source, dest);
    d.ack().await?;
    deliveries.close().await?;
    client.close().await?;
    Ok(())
}

/// 5,000 messages from 20 concurrent publishers to 10 competing consumers: none lost.
pub async fn competing_consumers_no_loss(b: &dyn TestBackend) -> Outcome {
    let producer = b.client(Guarantee::AtLeastOnce).await?;
    let consumer_client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*producer, "compete").await?;
    let group = unique("g");
    let ledger = Arc::new(Ledger::new());
    let mut handles = Vec::new();
    for _ in 0..10 {
        handles.push(
            launch(
                b,
                Consumer::new(consumer_client.clone(), Subscription::new(&dest, &group))
                    .concurrency(4)
                    .retry(fast_retry(10)),
                &group,
                Recorder::new(ledger.clone()),
            )
            .await?,
        );
    }
    let results = join_all((0..20).map(|p| {
        let producer = producer.clone();
        let dest = dest.clone();
        let ledger = ledger.clone();
        async move {
            let msgs: Vec<Message> = (0..250)
                .map(|i| Message::new(format!("p{p}-{i}")))
                .collect();
            publish_all(&*producer, &dest, &msgs, &ledger).await
        }
    }))
    .await;
    for r in results {
        r?;
    }
    let (report, done) = ledger.wait_all_handled(wait() * 2).await;
    stop(handles).await?;
    ensure!(report.sent == 5000, "sent {} of 5000", report.sent);
    ensure!(
        done && report.lost == 0,
        "messages lost under at-least-once: {report}"
    );
    ensure!(
        report.unexpected == 0,
        "handled ids that were never sent: {report}"
    );
    Ok(())
}

/// A nacked delivery comes back, with a higher attempt number.
pub async fn nack_redelivers(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "nack").await?;
    let mut deliveries = client
        .subscribe(Subscription::new(&dest, unique("g")))
        .await?;
    let m = Message::new("nack me");
    client.publish(&dest, m.clone()).await?;
    let first = deliveries
        .next_timeout(wait())
        .await
        .ok_or_else(|| ScenarioError("no first delivery".into()))??;
    ensure!(first.message.id == m.id, "wrong message");
    let first_attempt = first.attempt;
    first.nack(Duration::from_millis(100)).await?;
    let again = deliveries
        .next_timeout(wait())
        .await
        .ok_or_else(|| ScenarioError("nacked message never came back".into()))??;
    ensure!(again.message.id == m.id, "a different message came back");
    ensure!(
        again.attempt > first_attempt,
        "attempt did not grow: {} then {}",
        first_attempt,
        again.attempt
    );
    again.ack().await?;
    deliveries.close().await?;
    Ok(())
}

/// A consumer that goes away without settling: the message is redelivered to another consumer.
pub async fn unsettled_redelivered_to_another_consumer(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "unsettled").await?;
    let group = unique("g");
    let mut first = client.subscribe(Subscription::new(&dest, &group)).await?;
    let m = Message::new("do not lose me");
    client.publish(&dest, m.clone()).await?;
    let d = first
        .next_timeout(wait())
        .await
        .ok_or_else(|| ScenarioError("no delivery".into()))??;
    ensure!(d.message.id == m.id, "wrong message");
    drop(d); // never settled
    first.close().await?;
    let other_client = b.client(Guarantee::AtLeastOnce).await?;
    let mut second = other_client
        .subscribe(Subscription::new(&dest, &group))
        .await?;
    let bound = wait() + client.capabilities().redelivery_after_crash;
    let again = second
        .next_timeout(bound)
        .await
        .ok_or_else(|| ScenarioError("unsettled message was not redelivered (lost)".into()))??;
    ensure!(again.message.id == m.id, "a different message arrived");
    again.ack().await?;
    second.close().await?;
    Ok(())
}

/// Settled messages never come back (checked after the settle window, and after re-subscribing).
pub async fn settled_never_redelivered(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let caps = client.capabilities();
    let dest = b.fresh_destination(&*client, "settled").await?;
    let group = unique("g");
    let mut deliveries = client.subscribe(Subscription::new(&dest, &group)).await?;
    let msgs = numbered(20, "settled");
    for m in &msgs {
        client.publish(&dest, m.clone()).await?;
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < msgs.len() {
        let d = deliveries
            .next_timeout(wait())
            .await
            .ok_or_else(|| ScenarioError(format!("only {} of 20 delivered", seen.len())))??;
        if !seen.insert(d.message.id.clone()) {
            return Err(ScenarioError(format!(
                "settled message {} was delivered again (attempt {})",
                d.message.id, d.attempt
            )));
        }
        d.ack().await?;
    }
    if let Some(Ok(d)) = deliveries.next_timeout(caps.settle_window).await {
        return Err(ScenarioError(format!(
            "settled message {} was delivered again (attempt {})",
            d.message.id, d.attempt
        )));
    }
    deliveries.close().await?;
    let mut again = client.subscribe(Subscription::new(&dest, &group)).await?;
    let window = caps.settle_window + caps.redelivery_after_crash;
    if let Some(Ok(d)) = again.next_timeout(window).await {
        return Err(ScenarioError(format!(
            "settled message {} came back after re-subscribing",
            d.message.id
        )));
    }
    again.close().await?;
    Ok(())
}

/// At-most-once never hands the same id to the handler twice, even when the same message is
/// published twice (a producer retry) — and without faults it loses nothing noticeable.
pub async fn at_most_once_never_handles_twice(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtMostOnce).await?;
    let dest = b.fresh_destination(&*client, "amo").await?;
    let ledger = Arc::new(Ledger::new());
    let group = unique("g");
    let handle = launch(
        b,
        Consumer::new(client.clone(), Subscription::new(&dest, &group)).concurrency(4),
        &group,
        Recorder::new(ledger.clone()),
    )
    .await?;
    let msgs = numbered(200, "amo");
    publish_all(&*client, &dest, &msgs, &ledger).await?;
    for m in msgs.iter().step_by(4) {
        client.publish(&dest, m.clone()).await?; // duplicate injection: same id again
    }
    let (report, _) = ledger.wait_all_handled(wait()).await;
    // Give late duplicates the settle window to show up.
    tokio::time::sleep(client.capabilities().settle_window).await;
    let report_after = ledger.report();
    handle.shutdown().await?;
    ensure!(
        report_after.duplicates == 0,
        "at-most-once handled an id twice: {report_after}"
    );
    ensure!(
        report.handled * 10 >= report.sent * 9,
        "at-most-once lost more than 10% without faults: {report}"
    );
    Ok(())
}

/// Messages with the same key are handled in publish order, across several consumers.
pub async fn per_key_order_across_consumers(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    if !client.capabilities().ordering_by_key {
        return Ok(()); // capability absent: nothing promised
    }
    let dest = b.fresh_destination(&*client, "order").await?;
    let group = unique("g");
    let seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>> = Arc::default();
    let ledger = Arc::new(Ledger::new());
    struct Ordered {
        seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
        ledger: Arc<Ledger>,
    }
    #[async_trait]
    impl Handler for Ordered {
        async fn handle(&self, m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
            let seq: usize = m
                .headers
                .get("seq")
                .and_then(|s| s.parse().ok())
                .unwrap_or(usize::MAX);
            // Yield so that concurrent lanes really interleave.
            tokio::task::yield_now().await;
            self.seen
                .lock()
                .entry(m.key.clone().unwrap_or_default())
                .or_default()
                .push(seq);
            self.ledger.handled(m.id.as_str());
            Ok(())
        }
    }
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(
            launch(
                b,
                Consumer::new(client.clone(), Subscription::new(&dest, &group)).concurrency(4),
                &group,
                Ordered {
                    seen: seen.clone(),
                    ledger: ledger.clone(),
                },
            )
            .await?,
        );
    }
    let keys = ["k0", "k1", "k2", "k3", "k4"];
    for i in 0..40 {
        for k in keys {
            let m = Message::new(format!("{k}-{i}"))
                .with_key(k)
                .with_header("seq", i.to_string());
            client.publish(&dest, m.clone()).await?;
            ledger.sent(m.id.as_str());
        }
    }
    let (report, done) = ledger.wait_all_handled(wait()).await;
    stop(handles).await?;
    ensure!(done, "not all ordered messages arrived: {report}");
    for (k, seqs) in seen.lock().iter() {
        let order = check_key_order(seqs, 40);
        ensure!(
            order.is_ok(),
            "key {k} handled out of order ({}): {seqs:?}",
            order.err().unwrap_or_default()
        );
    }
    Ok(())
}

/// Whether one key's handled sequence numbers (in handling order) keep publish order for `n`
/// messages under at-least-once: it starts at 0, each next number is the successor of the
/// previous one, or a *replay* that restarts at or before the previous one (a redelivery after a
/// rebalance or a crash resumes from the last committed position, then runs forward again in
/// order), and it reaches `n - 1`. So a message is never handled before all its predecessors had
/// been handled, and two deliveries of the key never interleave (`5, 9, 6, 10` fails).
pub fn check_key_order(seqs: &[usize], n: usize) -> std::result::Result<(), String> {
    let Some((&first, rest)) = seqs.split_first() else {
        return Err("never handled".into());
    };
    if first != 0 {
        return Err(format!("first handled was #{first}, not #0"));
    }
    let mut prev = first;
    for (i, &s) in rest.iter().enumerate() {
        if s != prev + 1 && s > prev {
            return Err(format!(
                "#{s} handled right after #{prev} (position {}), skipping ahead",
                i + 1
            ));
        }
        prev = s;
    }
    let last = seqs.iter().max().copied().unwrap_or(0);
    if last + 1 != n {
        return Err(format!("highest handled is #{last}, expected #{}", n - 1));
    }
    Ok(())
}

/// Two consumer groups each receive every message.
pub async fn every_group_receives_everything(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    if !client.capabilities().consumer_groups {
        return Ok(());
    }
    let dest = b.fresh_destination(&*client, "groups").await?;
    let l1 = Arc::new(Ledger::new());
    let l2 = Arc::new(Ledger::new());
    let (g1, g2) = (unique("g1"), unique("g2"));
    let h1 = launch(
        b,
        Consumer::new(client.clone(), Subscription::new(&dest, &g1)).concurrency(4),
        &g1,
        Recorder::new(l1.clone()),
    )
    .await?;
    let h2 = launch(
        b,
        Consumer::new(client.clone(), Subscription::new(&dest, &g2)).concurrency(4),
        &g2,
        Recorder::new(l2.clone()),
    )
    .await?;
    for m in numbered(100, "groups") {
        client.publish(&dest, m.clone()).await?;
        l1.sent(m.id.as_str());
        l2.sent(m.id.as_str());
    }
    let (r1, ok1) = l1.wait_all_handled(wait()).await;
    let (r2, ok2) = l2.wait_all_handled(wait()).await;
    stop(vec![h1, h2]).await?;
    ensure!(
        ok1 && ok2,
        "a group missed messages: group1 {r1}; group2 {r2}"
    );
    Ok(())
}

/// Messages published to one destination never reach another's consumers.
pub async fn destination_isolation(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let a = b.fresh_destination(&*client, "iso-a").await?;
    let other = b.fresh_destination(&*client, "iso-b").await?;
    let ledger = Arc::new(Ledger::new());
    let group = unique("g");
    let h = launch(
        b,
        Consumer::new(client.clone(), Subscription::new(&a, &group)).concurrency(2),
        &group,
        Recorder::new(ledger.clone()),
    )
    .await?;
    // The other destination has its own consumer (some brokers refuse messages nobody can receive).
    let h_other = Consumer::new(client.clone(), Subscription::new(&other, unique("g")))
        .spawn(Recorder::new(Arc::new(Ledger::new())))
        .await?;
    for m in numbered(10, "other") {
        client.publish(&other, m).await?;
    }
    publish_all(&*client, &a, &numbered(10, "mine"), &ledger).await?;
    let (report, done) = ledger.wait_all_handled(wait()).await;
    tokio::time::sleep(client.capabilities().settle_window).await;
    let after = ledger.report();
    stop(vec![h, h_other]).await?;
    ensure!(done, "own messages missing: {report}");
    ensure!(
        after.unexpected == 0,
        "{} messages of another destination arrived",
        after.unexpected
    );
    Ok(())
}

/// `close` flushes publishes the client accepted but had not yet delivered (at-most-once
/// publishes return before the broker has them).
pub async fn close_flushes_pending_publishes(b: &dyn TestBackend) -> Outcome {
    let producer = b.client(Guarantee::AtMostOnce).await?;
    let dest = b.fresh_destination(&*producer, "flush").await?;
    let consumer_client = b.client(Guarantee::AtLeastOnce).await?;
    let mut deliveries = consumer_client
        .subscribe(Subscription::new(&dest, unique("g")))
        .await?;
    let msgs = numbered(200, "flush");
    for m in &msgs {
        producer.publish(&dest, m.clone()).await?;
    }
    producer.close().await?;
    let mut got = std::collections::HashSet::new();
    while got.len() < msgs.len() {
        match deliveries.next_timeout(wait()).await {
            Some(d) => {
                let d = d?;
                got.insert(d.message.id.clone());
                match d.ack().await {
                    // Received while this test was still flushing its publishes and held past
                    // the visibility timeout (3 s in the SQS suite) when a loaded LocalStack was
                    // slow to answer the lease extensions: the broker redelivers it, which is
                    // what at-least-once promises. This scenario is about the flush.
                    Ok(()) | Err(Error::DeliveryExpired { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            None => break,
        }
    }
    deliveries.close().await?;
    ensure!(
        got.len() == msgs.len(),
        "close did not flush: {} of {} arrived",
        got.len(),
        msgs.len()
    );
    Ok(())
}

/// A subscription closed while deliveries wait for a reader that stopped reading returns
/// promptly — `close` is bounded by what is in flight, not by a fixed deadline of the receive
/// side — and what was not settled comes back to the group's next subscriber, nothing lost.
pub async fn close_returns_promptly_with_deliveries_waiting(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "close").await?;
    let group = unique("g");
    let mut deliveries = client.subscribe(Subscription::new(&dest, &group)).await?;
    let msgs = numbered(20, "close");
    client.publish_batch(&dest, msgs.clone()).await?;
    let mut acked = std::collections::HashSet::new();
    let first = match deliveries.next_timeout(wait()).await {
        Some(d) => d?,
        None => return Err(ScenarioError("no delivery arrived".into())),
    };
    acked.insert(first.message.id.clone());
    first.ack().await?;
    // Take one more and leave it unsettled: the receive side now holds the rest, waiting for a
    // reader that no longer reads. (The pause lets it fill its hand-off; the check below holds
    // whether or not it did.)
    let held = match deliveries.next_timeout(wait()).await {
        Some(d) => d?,
        None => return Err(ScenarioError("the second delivery never arrived".into())),
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(held);
    let bound = scaled(Duration::from_secs(5));
    ensure!(
        tokio::time::timeout(bound, deliveries.close())
            .await
            .is_ok(),
        "close with deliveries waiting took longer than {bound:?}"
    );
    // Everything not acked comes back to the group.
    let mut again = client.subscribe(Subscription::new(&dest, &group)).await?;
    let seen = ack_distinct(&mut again, msgs.len() - acked.len(), &acked).await?;
    again.close().await?;
    ensure!(
        seen.len() + acked.len() == msgs.len(),
        "{} of {} messages came back after the prompt close",
        seen.len(),
        msgs.len() - acked.len()
    );
    Ok(())
}

/// A consumer group declared with `declare_subscription` keeps what is published before it first
/// subscribes, on every backend (RabbitMQ would otherwise have no queue to route it to).
pub async fn declared_group_keeps_what_is_published_before_it_subscribes(
    b: &dyn TestBackend,
) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "early").await?;
    let sub = Subscription::new(&dest, unique("g"));
    client.declare_subscription(&sub).await?;
    // Declaring again changes nothing.
    client.declare_subscription(&sub).await?;
    let msgs = numbered(10, "early");
    for m in &msgs {
        client.publish(&dest, m.clone()).await?;
    }
    let mut deliveries = client.subscribe(sub).await?;
    let got = ack_distinct(&mut deliveries, msgs.len(), &Default::default()).await?;
    deliveries.close().await?;
    ensure!(
        got.len() == msgs.len(),
        "{} of {} messages published before the group subscribed arrived",
        got.len(),
        msgs.len()
    );
    Ok(())
}

/// An oversize payload fails with `PayloadTooLarge` and nothing is sent (single and batch).
pub async fn oversize_payload_is_rejected_before_sending(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let limit = client.capabilities().max_payload;
    let dest = b.fresh_destination(&*client, "oversize").await?;
    let mut deliveries = client
        .subscribe(Subscription::new(&dest, unique("g")))
        .await?;
    let big = Message::new(Bytes::from(vec![b'x'; limit + 1]));
    match client.publish(&dest, big.clone()).await {
        Err(Error::PayloadTooLarge { limit: l, .. }) => ensure!(
            l == limit,
            "error reports limit {l}, capability says {limit}"
        ),
        other => {
            return Err(ScenarioError(format!(
                "expected PayloadTooLarge, got {other:?}"
            )))
        }
    }
    let small = Message::new("small");
    match client.publish_batch(&dest, vec![small.clone(), big]).await {
        Err(Error::PayloadTooLarge { .. }) => {}
        other => {
            return Err(ScenarioError(format!(
                "batch: expected PayloadTooLarge, got {other:?}"
            )))
        }
    }
    let marker = Message::new("marker");
    client.publish(&dest, marker.clone()).await?;
    let d = deliveries
        .next_timeout(wait())
        .await
        .ok_or_else(|| ScenarioError("marker not delivered".into()))??;
    ensure!(
        d.message.id == marker.id,
        "something of the rejected publishes was sent: got {}",
        d.message.id
    );
    d.ack().await?;
    deliveries.close().await?;
    Ok(())
}

/// Publishing to a destination that does not exist is a typed error (when the backend can tell).
pub async fn missing_destination_is_a_typed_error(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    if !client.capabilities().detects_missing_destination {
        return Ok(());
    }
    let name = unique("missing");
    match client.publish(&name, Message::new("x")).await {
        Err(Error::DestinationNotFound { destination, .. }) => {
            ensure!(destination == name, "error names {destination}, not {name}");
            Ok(())
        }
        other => Err(ScenarioError(format!(
            "expected DestinationNotFound, got {other:?}"
        ))),
    }
}

struct AlwaysFails {
    calls: Arc<AtomicU32>,
    permanent: bool,
}

#[async_trait]
impl Handler for AlwaysFails {
    async fn handle(&self, _m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.permanent {
            Err(HandlerError::permanent("bad data"))
        } else {
            Err(HandlerError::retryable("downstream unavailable"))
        }
    }
}

async fn dead_letter_case(b: &dyn TestBackend, permanent: bool) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "dl-src").await?;
    let dlq = b.fresh_destination(&*client, "dl-dlq").await?;
    let mut dead = client
        .subscribe(Subscription::new(&dlq, unique("dlq-reader")))
        .await?;
    let calls = Arc::new(AtomicU32::new(0));
    let group = unique("g");
    let h = launch(
        b,
        Consumer::new(
            client.clone(),
            Subscription::new(&dest, &group).dead_letter(&dlq),
        )
        .retry(fast_retry(3)),
        &group,
        AlwaysFails {
            calls: calls.clone(),
            permanent,
        },
    )
    .await?;
    let m = Message::new("poison").with_header("x-tenant", "acme");
    client.publish(&dest, m.clone()).await?;
    let d = dead
        .next_timeout(wait())
        .await
        .ok_or_else(|| ScenarioError("nothing reached the dead-letter destination".into()))??;
    let expected = if permanent { 1 } else { 3 };
    h.shutdown().await?;
    ensure!(
        d.message.id == m.id,
        "dead-lettered id {} != {}",
        d.message.id,
        m.id
    );
    ensure!(
        d.message.payload == m.payload,
        "dead-lettered payload changed"
    );
    let attempts = d.message.headers.get(header::DEAD_LETTER_ATTEMPTS).cloned();
    ensure!(
        attempts.as_deref() == Some(&*expected.to_string()),
        "attempt count header {attempts:?}, expected {expected}"
    );
    ensure!(
        d.message.headers.contains_key(header::DEAD_LETTER_REASON),
        "no reason header"
    );
    let n = calls.load(Ordering::SeqCst);
    ensure!(n == expected, "handler ran {n} times, expected {expected}");
    d.ack().await?;
    dead.close().await?;
    Ok(())
}

/// A failing handler is retried with backoff, then dead-lettered with the attempt count.
pub async fn handler_errors_retry_then_dead_letter(b: &dyn TestBackend) -> Outcome {
    dead_letter_case(b, false).await
}

/// Defers its first runs (as the idempotent layer does while its store is down), then fails
/// once, then succeeds; records the attempt number of every run.
struct DeferThenFail {
    ledger: Arc<Ledger>,
    defers: u32,
    runs: Mutex<Vec<u32>>,
}

#[async_trait]
impl Handler for DeferThenFail {
    async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        let run = {
            let mut runs = self.runs.lock();
            runs.push(cx.attempt());
            runs.len() as u32
        };
        if run <= self.defers {
            return Err(HandlerError::defer(
                Duration::from_millis(20),
                "the idempotency store is unreachable",
            ));
        }
        if run == self.defers + 1 {
            return Err(HandlerError::retryable("a real failure after the outage"));
        }
        self.ledger.handled(m.id.as_str());
        Ok(())
    }
}

/// The layer's store is down for its first `down` claims (`Error::Store`, as when it cannot be
/// reached), then works.
struct OutageFirst {
    inner: Arc<dyn courier_idempotency::IdempotencyStore>,
    down: AtomicU32,
}

#[async_trait]
impl courier_idempotency::IdempotencyStore for OutageFirst {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn begin(
        &self,
        key: &str,
        fingerprint: &str,
        lease: Duration,
    ) -> courier_core::Result<courier_idempotency::Begin> {
        let left = self.down.load(Ordering::SeqCst);
        if left > 0 {
            self.down.store(left - 1, Ordering::SeqCst);
            return Err(Error::Store {
                store: self.inner.name(),
                operation: "begin",
                source: "connection refused (the scenario's store outage)".into(),
            });
        }
        self.inner.begin(key, fingerprint, lease).await
    }

    async fn extend(
        &self,
        key: &str,
        token: &courier_idempotency::LeaseToken,
        lease: Duration,
    ) -> courier_core::Result<bool> {
        self.inner.extend(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &str,
        token: &courier_idempotency::LeaseToken,
        fingerprint: &str,
        result: Option<Bytes>,
        ttl: Duration,
    ) -> courier_core::Result<bool> {
        self.inner
            .complete(key, token, fingerprint, result, ttl)
            .await
    }

    async fn release(
        &self,
        key: &str,
        token: &courier_idempotency::LeaseToken,
    ) -> courier_core::Result<()> {
        self.inner.release(key, token).await
    }
}

/// Deferrals never move a message towards the dead-letter destination: five deferrals (more
/// than the retry budget of 3), then a failure, then success — the failure is retried, not
/// dead-lettered, and the deferrals left the attempt number where it was. Through the layer the
/// deferrals are the layer's own, during an outage of its store (fail-closed); plain, the
/// handler returns them as the layer would.
pub async fn deferrals_never_dead_letter(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "defer").await?;
    let dlq = b.fresh_destination(&*client, "defer-dlq").await?;
    let group = unique("g");
    let ledger = Arc::new(Ledger::new());
    let consumer = Consumer::new(
        client.clone(),
        Subscription::new(&dest, &group).dead_letter(&dlq),
    )
    .retry(fast_retry(3));
    let through_layer = b.layer_store();
    let handler = Arc::new(DeferThenFail {
        ledger: ledger.clone(),
        defers: if through_layer.is_some() { 0 } else { 5 },
        runs: Mutex::new(Vec::new()),
    });
    let h = match through_layer {
        Some(store) => {
            let store = Arc::new(OutageFirst {
                inner: store,
                down: AtomicU32::new(5),
            });
            let layer = Idempotent::new(handler.clone(), store)
                .namespace(&group)
                .lease(Duration::from_secs(5))
                .store_retry_delay(Duration::from_millis(20));
            consumer.spawn(layer).await?
        }
        None => consumer.spawn(handler.clone()).await?,
    };
    let m = Message::new("deferred").with_key("account-1");
    ledger.sent(m.id.as_str());
    client.publish(&dest, m).await?;
    let (report, done) = ledger.wait_all_handled(wait() * 2).await;
    let stats = h.shutdown().await?;
    let runs = handler.runs.lock().clone();
    let expected: Vec<u32> = if handler.defers == 0 {
        vec![1, 2]
    } else {
        vec![1, 1, 1, 1, 1, 1, 2]
    };
    ensure!(
        done,
        "a deferred message was never handled ({report}); runs by attempt {runs:?}, {} dead-lettered",
        stats.dead_lettered
    );
    ensure!(
        stats.dead_lettered == 0,
        "dead-lettered after deferrals: runs by attempt {runs:?}"
    );
    ensure!(
        runs == expected,
        "deferrals spent attempts: runs by attempt {runs:?} (expected {expected:?})"
    );
    ensure!(
        stats.deferred == 5 && stats.handler_errors == 1,
        "{} deferred, {} handler errors (expected 5 and 1): deferrals are not handler errors",
        stats.deferred,
        stats.handler_errors
    );
    Ok(())
}

/// A permanent handler error dead-letters after one attempt.
pub async fn permanent_error_dead_letters_at_once(b: &dyn TestBackend) -> Outcome {
    dead_letter_case(b, true).await
}

/// Batch mode: a batch that fails is redelivered whole; nothing is settled before success.
pub async fn batch_settles_only_after_success(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "batch").await?;
    let ledger = Arc::new(Ledger::new());
    struct FailFirstBatch {
        ledger: Arc<Ledger>,
        failed: Mutex<Option<Vec<String>>>,
    }
    #[async_trait]
    impl BatchHandler for FailFirstBatch {
        async fn handle_batch(
            &self,
            ms: &[Message],
            _cx: &mut Context,
        ) -> Result<(), HandlerError> {
            {
                let mut f = self.failed.lock();
                if f.is_none() {
                    *f = Some(ms.iter().map(|m| m.id.to_string()).collect());
                    return Err(HandlerError::retryable("first batch fails"));
                }
            }
            for m in ms {
                self.ledger.handled(m.id.as_str());
            }
            Ok(())
        }
    }
    let handler = Arc::new(FailFirstBatch {
        ledger: ledger.clone(),
        failed: Mutex::new(None),
    });
    struct Shared(Arc<FailFirstBatch>);
    #[async_trait]
    impl BatchHandler for Shared {
        async fn handle_batch(&self, ms: &[Message], cx: &mut Context) -> Result<(), HandlerError> {
            self.0.handle_batch(ms, cx).await
        }
    }
    let h = Consumer::new(client.clone(), Subscription::new(&dest, unique("g")))
        .retry(fast_retry(5))
        .spawn_batch(
            Shared(handler.clone()),
            BatchOptions {
                max_size: 10,
                max_wait: Duration::from_millis(100),
            },
        )
        .await?;
    publish_all(&*client, &dest, &numbered(50, "batch"), &ledger).await?;
    let (report, done) = ledger.wait_all_handled(wait()).await;
    h.shutdown().await?;
    ensure!(done, "batch mode lost messages: {report}");
    let failed = handler.failed.lock().clone().unwrap_or_default();
    ensure!(!failed.is_empty(), "the failing batch never ran");
    for id in failed {
        ensure!(
            ledger.count(&id) >= 1,
            "message {id} of the failed batch was settled without success"
        );
    }
    Ok(())
}

/// Records when each payload was handled, and with which attempt number.
struct Clock {
    ledger: Arc<Ledger>,
    runs: Mutex<Vec<(String, std::time::SystemTime, u32)>>,
}

#[async_trait]
impl Handler for Clock {
    async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        let body = String::from_utf8_lossy(&m.payload).into_owned();
        self.runs
            .lock()
            .push((body, std::time::SystemTime::now(), cx.attempt()));
        self.ledger.handled(m.id.as_str());
        Ok(())
    }
}

/// Delayed delivery, at every guarantee: a message published with a 2 s delay is handled no
/// earlier than its not-before time, once, on its first attempt, and (at-least-once) a message
/// published after it without a delay is handled first; nothing is dead-lettered.
pub async fn delayed_delivery_waits_until_due(b: &dyn TestBackend) -> Outcome {
    for g in [Guarantee::AtMostOnce, Guarantee::AtLeastOnce] {
        let client = b.client(g).await?;
        let dest = b.fresh_destination(&*client, "delayed").await?;
        let group = unique("g");
        let ledger = Arc::new(Ledger::new());
        let clock = Arc::new(Clock {
            ledger: ledger.clone(),
            runs: Mutex::new(Vec::new()),
        });
        let h = launch(
            b,
            Consumer::new(client.clone(), Subscription::new(&dest, &group)).concurrency(4),
            &group,
            clock.clone(),
        )
        .await?;
        // The consumer is live (a Kafka group has joined) before the delay starts counting.
        let warmup = Message::new("warmup").with_key("k-warmup");
        publish_all(&*client, &dest, &[warmup], &ledger).await?;
        let (report, live) = ledger.wait_all_handled(wait()).await;
        ensure!(live, "{g}: the first message was never handled: {report}");
        clock.runs.lock().clear();
        // Different keys: on a FIFO queue a delayed message holds back its own group only.
        let later = Message::new("later")
            .with_key("k-later")
            .with_delay(Duration::from_secs(2));
        let due = later.not_before().expect("a not-before time");
        let now = Message::new("now").with_key("k-now");
        publish_all(&*client, &dest, &[later, now], &ledger).await?;
        let (report, done) = ledger.wait_all_handled(wait()).await;
        let stats = h.shutdown().await?;
        ensure!(done, "{g}: delayed delivery lost a message: {report}");
        let runs = clock.runs.lock().clone();
        let later_runs: Vec<&(String, std::time::SystemTime, u32)> =
            runs.iter().filter(|(b, _, _)| b == "later").collect();
        ensure!(
            later_runs.len() == 1,
            "{g}: the delayed message ran {} times",
            later_runs.len()
        );
        let (_, at, attempt) = later_runs[0];
        let early = due.duration_since(*at).ok();
        ensure!(
            early.is_none() || early == Some(Duration::ZERO),
            "{g}: the delayed message was handled {early:?} before its not-before time"
        );
        ensure!(
            *attempt == 1,
            "{g}: waiting for its time spent attempts (handled on attempt {attempt})"
        );
        let order: Vec<&str> = runs.iter().map(|(b, _, _)| b.as_str()).collect();
        // At-most-once holds a delayed message in its lane (it is settled already), so only
        // at-least-once promises that other messages pass it.
        ensure!(
            g == Guarantee::AtMostOnce || order.first() == Some(&"now"),
            "{g}: the message published after the delayed one waited for it: {order:?}"
        );
        ensure!(
            stats.dead_lettered == 0 && stats.handler_errors == 0,
            "{g}: {} dead-lettered, {} handler errors",
            stats.dead_lettered,
            stats.handler_errors
        );
    }
    Ok(())
}

/// Answers a request with a receipt numbering its run; the first run is slow.
struct Cashier {
    runs: AtomicU32,
    ledger: Arc<Ledger>,
    first_run_takes: Duration,
}

#[async_trait]
impl Handler for Cashier {
    async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if run == 1 {
            tokio::time::sleep(self.first_run_takes).await;
        }
        let body = String::from_utf8_lossy(&m.payload).into_owned();
        cx.set_result(format!("receipt for {body} (run {run})"));
        self.ledger.handled(body);
        Ok(())
    }
}

/// Poll `inspect` (bounded) until `done` holds for the report of `group`; the last report.
async fn inspect_until(
    client: &dyn DeliveryClient,
    dest: &str,
    group: &str,
    done: impl Fn(&GroupInfo) -> bool,
) -> Result<GroupInfo, ScenarioError> {
    let deadline = tokio::time::Instant::now() + scaled(Duration::from_secs(20));
    loop {
        let info = client.inspect(dest, &[group]).await?;
        let g = info
            .group(group)
            .cloned()
            .ok_or_else(|| ScenarioError(format!("inspect left out group {group}: {info}")))?;
        if done(&g) || tokio::time::Instant::now() >= deadline {
            return Ok(g);
        }
        // Broker counts are read, not pushed: look again shortly.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `inspect` reports a group's backlog before and after part of it is consumed, and the
/// consumers attached; deliveries carry when the broker stored them; `delete_destination`
/// removes the destination and the group, and a missing destination is a typed error.
pub async fn admin_inspects_and_deletes(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "admin").await?;
    let group = unique("g");
    let sub = Subscription::new(&dest, &group);
    client.declare_subscription(&sub).await?;
    let started = std::time::SystemTime::now();
    for m in numbered(10, "admin") {
        client.publish(&dest, m).await?;
    }
    let waiting = |g: &GroupInfo| g.backlog + g.in_flight.unwrap_or(0) + g.delayed.unwrap_or(0);
    let g = inspect_until(&*client, &dest, &group, |g| g.backlog == 10).await?;
    ensure!(
        g.backlog == 10,
        "inspect: {} waiting for the group after 10 published: {g:?}",
        g.backlog
    );
    if let Some(age) = g.oldest_age {
        ensure!(
            age <= started.elapsed().unwrap_or_default() + Duration::from_secs(1),
            "inspect: oldest message {age:?} old, but the first was published {:?} ago",
            started.elapsed().unwrap_or_default()
        );
    }
    // Take four and settle them; the other six stay.
    let mut deliveries = client.subscribe(sub.clone()).await?;
    for i in 0..4 {
        let d = deliveries
            .next_timeout(wait())
            .await
            .ok_or_else(|| ScenarioError(format!("delivery {i} of 10 never arrived")))??;
        let at = d.published_at.ok_or_else(|| {
            ScenarioError(format!(
                "{} delivered without when it was published",
                b.name()
            ))
        })?;
        ensure!(
            at + Duration::from_secs(1) >= started && at <= d.received_at + Duration::from_secs(1),
            "published_at {at:?} is not between the publish ({started:?}) and the receive ({:?})",
            d.received_at
        );
        d.ack().await?;
    }
    let live = client.inspect(&dest, &[&group]).await?;
    let consumers = live.group(&group).and_then(|g| g.consumers);
    ensure!(
        consumers.is_none_or(|c| c >= 1),
        "inspect: {consumers:?} consumers while one is receiving: {live}"
    );
    deliveries.close().await?;
    let g = inspect_until(&*client, &dest, &group, |g| g.exists && waiting(g) == 6).await?;
    ensure!(
        g.exists && waiting(&g) == 6,
        "inspect: {} waiting after 4 of 10 were settled (want 6): {g:?}",
        waiting(&g)
    );
    if !b.deletes_destinations() {
        eprintln!(
            "admin_inspects_and_deletes: deleting skipped on {}: the broker does not implement deleting topics and groups",
            b.name()
        );
        return Ok(());
    }
    let removed = client.delete_destination(&dest, &[&group]).await?;
    ensure!(
        removed
            .iter()
            .any(|r| r.ends_with(&dest) || r.contains(&format!("{dest}."))),
        "delete_destination({dest}) removed nothing of it: {removed:?}"
    );
    // Deletion can take a moment to show (Kafka deletes topics asynchronously).
    let deadline = tokio::time::Instant::now() + scaled(Duration::from_secs(20));
    loop {
        match client.inspect(&dest, &[]).await {
            Err(Error::DestinationNotFound { .. }) => break,
            Err(e) => return Err(e.into()),
            Ok(info) if tokio::time::Instant::now() >= deadline => {
                return Err(ScenarioError(format!(
                    "{dest} still there after delete_destination: {info}"
                )))
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let again = client.delete_destination(&dest, &[&group]).await?;
    ensure!(
        again.is_empty(),
        "deleting {dest} a second time removed {again:?}"
    );
    match client.inspect(&unique("never-created"), &[]).await {
        Err(Error::DestinationNotFound { .. }) => Ok(()),
        other => Err(ScenarioError(format!(
            "inspect of a destination never created: {other:?}, want DestinationNotFound"
        ))),
    }
}

/// Request-reply through the idempotent layer: a request whose reply came too late (the
/// requester timed out) is asked again, and answered with the stored result of its first run —
/// the handler runs once; another request gets its own reply.
pub async fn request_reply_answers_a_repeated_request_from_the_stored_result(
    b: &dyn TestBackend,
) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "rr").await?;
    let replies = b.fresh_destination(&*client, "rr-replies").await?;
    let group = unique("g");
    let ledger = Arc::new(Ledger::new());
    let cashier = Arc::new(Cashier {
        runs: AtomicU32::new(0),
        ledger: ledger.clone(),
        first_run_takes: Duration::from_secs(2),
    });
    let layer = Idempotent::new(cashier.clone(), b.idempotency_store())
        .namespace(group.clone())
        .lease(Duration::from_secs(10));
    let h = Consumer::new(client.clone(), Subscription::new(&dest, &group))
        .concurrency(4)
        .spawn(layer)
        .await?;
    let requester = courier_core::Requester::start(client.clone(), replies).await?;
    let charge = Message::new("charge 42").with_id(unique("charge"));
    ledger.sent("charge 42");
    match requester
        .request(&dest, charge.clone(), Duration::from_millis(300))
        .await
    {
        Err(Error::Timeout { .. }) => {}
        other => {
            return Err(ScenarioError(format!(
                "the first request should time out (its handler takes 2 s), got {other:?}"
            )))
        }
    }
    // The first run finishes and its reply is dropped (nobody waits for it any more).
    let (report, done) = ledger.wait_all_handled(wait()).await;
    ensure!(done, "the request was never handled: {report}");
    let again = requester.request(&dest, charge.clone(), wait()).await?;
    let answer = String::from_utf8_lossy(&again.payload).into_owned();
    let other = requester
        .request(&dest, Message::new("charge 7"), wait())
        .await?;
    let other_answer = String::from_utf8_lossy(&other.payload).into_owned();
    requester.close().await?;
    let stats = h.shutdown().await?;
    let runs = cashier.runs.load(Ordering::SeqCst);
    ensure!(
        answer == "receipt for charge 42 (run 1)",
        "the repeated request was answered with {answer:?}, not the first run's result"
    );
    ensure!(
        other_answer == "receipt for charge 7 (run 2)",
        "another request was answered with {other_answer:?}"
    );
    ensure!(
        runs == 2,
        "the handler ran {runs} times for two distinct requests"
    );
    ensure!(
        stats.duplicates_absorbed >= 1,
        "the repeated request was not absorbed as a duplicate ({stats:?})"
    );
    Ok(())
}

/// A typed message of the scenarios.
#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    order_id: String,
    amount_cents: i64,
}

/// Typed messages: `Message::json` values reach a `json_handler_fn` decoded, with their
/// `content-type` carried by the broker; a payload that does not decode is dead-lettered after
/// one attempt with a reason naming the type, and the handler never sees it.
pub async fn typed_messages_round_trip_and_bad_payloads_dead_letter(
    b: &dyn TestBackend,
) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "typed").await?;
    let dlq = b.fresh_destination(&*client, "typed-dlq").await?;
    let mut dead = client
        .subscribe(Subscription::new(&dlq, unique("dlq-reader")))
        .await?;
    let ledger = Arc::new(Ledger::new());
    let group = unique("g");
    let calls = Arc::new(AtomicU32::new(0));
    let handler = {
        let (ledger, calls) = (ledger.clone(), calls.clone());
        json_handler_fn(move |order: Order, _cx: &mut Context| {
            let (ledger, calls) = (ledger.clone(), calls.clone());
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if order.amount_cents > 0 {
                    ledger.handled(order.order_id);
                }
                Ok(())
            })
        })
    };
    // What arrived in the content-type header, seen before the typed handler decodes.
    struct ContentTypes<H> {
        inner: H,
        seen: Arc<Mutex<Vec<Option<String>>>>,
    }
    #[async_trait]
    impl<H: Handler> Handler for ContentTypes<H> {
        async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
            self.seen.lock().push(m.content_type().map(str::to_owned));
            self.inner.handle(m, cx).await
        }
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let h = launch(
        b,
        Consumer::new(
            client.clone(),
            Subscription::new(&dest, &group).dead_letter(&dlq),
        )
        .retry(fast_retry(3)),
        &group,
        ContentTypes {
            inner: handler,
            seen: seen.clone(),
        },
    )
    .await?;
    for i in 0..3 {
        let order = Order {
            order_id: format!("order-{i}"),
            amount_cents: 100 + i,
        };
        ledger.sent(order.order_id.clone());
        client.publish(&dest, Message::json(&order)?).await?;
    }
    let bad = Message::new(r#"{"order_id": 42, "amount_cents": "lots"}"#)
        .with_header(header::CONTENT_TYPE, courier_core::JSON);
    client.publish(&dest, bad.clone()).await?;
    let (report, done) = ledger.wait_all_handled(wait()).await;
    let d = dead
        .next_timeout(wait())
        .await
        .ok_or_else(|| ScenarioError("the undecodable message was not dead-lettered".into()))??;
    h.shutdown().await?;
    ensure!(done, "typed messages were not all handled: {report}");
    ensure!(d.message.id == bad.id, "another message was dead-lettered");
    let reason = d
        .message
        .headers
        .get(header::DEAD_LETTER_REASON)
        .cloned()
        .unwrap_or_default();
    ensure!(
        reason.contains("does not decode as") && reason.contains("Order"),
        "dead-letter reason {reason:?} does not say the payload failed to decode"
    );
    let attempts = d.message.headers.get(header::DEAD_LETTER_ATTEMPTS).cloned();
    ensure!(
        attempts.as_deref() == Some("1"),
        "an undecodable payload was retried (attempts header {attempts:?})"
    );
    let n = calls.load(Ordering::SeqCst);
    ensure!(
        n == 3,
        "the typed handler ran {n} times for 3 decodable messages"
    );
    d.ack().await?;
    dead.close().await?;
    let seen = seen.lock().clone();
    ensure!(
        seen.len() >= 4
            && seen
                .iter()
                .all(|ct| ct.as_deref() == Some(courier_core::JSON)),
        "content-type headers that arrived for 4 JSON messages: {seen:?}"
    );
    Ok(())
}

/// Publishes one output per input (its id in the payload) and counts the after-commit steps.
struct Transform {
    out: String,
    committed: Arc<AtomicU32>,
    not_committed: Arc<AtomicU32>,
}

#[async_trait]
impl Handler for Transform {
    async fn handle(&self, message: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        cx.publish(
            self.out.clone(),
            Message::new(message.id.as_str().to_owned())
                .with_key(message.key.clone().unwrap_or_default()),
        );
        let (yes, no) = (self.committed.clone(), self.not_committed.clone());
        cx.after_commit(move |committed| async move {
            let counter = if committed { yes } else { no };
            counter.fetch_add(1, Ordering::Relaxed);
        });
        Ok(())
    }
}

/// Consume-transform-produce at at-least-once, concurrency 8: every input's output arrives, every
/// input's after-commit step runs once with `true`, and no settled input comes back after
/// re-subscribing (Kafka publishes outputs without holding the lane: this guards that the input
/// is settled only once its outputs are confirmed).
pub async fn handler_outputs_arrive_and_inputs_settle(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let caps = client.capabilities();
    let dest = b.fresh_destination(&*client, "ctp-in").await?;
    let out = b.fresh_destination(&*client, "ctp-out").await?;
    let group = unique("g");
    let out_group = unique("g");
    let mut outputs = client
        .subscribe(Subscription::new(&out, &out_group))
        .await?;
    let committed = Arc::new(AtomicU32::new(0));
    let not_committed = Arc::new(AtomicU32::new(0));
    let handle = launch(
        b,
        Consumer::new(client.clone(), Subscription::new(&dest, &group)).concurrency(8),
        &group,
        Transform {
            out: out.clone(),
            committed: committed.clone(),
            not_committed: not_committed.clone(),
        },
    )
    .await?;
    let msgs: Vec<Message> = numbered(120, "ctp")
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.with_key(format!("k-{}", i % 10)))
        .collect();
    for m in &msgs {
        client.publish(&dest, m.clone()).await?;
    }
    let mut arrived: HashMap<String, u32> = HashMap::new();
    while arrived.len() < msgs.len() {
        let Some(d) = outputs.next_timeout(wait()).await else {
            break;
        };
        let d = d?;
        *arrived
            .entry(String::from_utf8_lossy(&d.message.payload).into_owned())
            .or_default() += 1;
        d.ack().await?;
    }
    let missing = msgs
        .iter()
        .filter(|m| !arrived.contains_key(m.id.as_str()))
        .count();
    ensure!(
        missing == 0,
        "{missing} of {} inputs have no output",
        msgs.len()
    );
    // Every settle is final once the consumer has stopped.
    handle.shutdown().await?;
    outputs.close().await?;
    let (yes, no) = (
        committed.load(Ordering::Relaxed),
        not_committed.load(Ordering::Relaxed),
    );
    ensure!(
        yes as usize == msgs.len() && no == 0,
        "after-commit steps: {yes} committed, {no} not, for {} inputs handled once each",
        msgs.len()
    );
    let mut again = client.subscribe(Subscription::new(&dest, &group)).await?;
    let window = caps.settle_window + caps.redelivery_after_crash;
    if let Some(Ok(d)) = again.next_timeout(window).await {
        return Err(ScenarioError(format!(
            "input {} came back after its outputs were published and the consumer stopped",
            d.message.id
        )));
    }
    again.close().await?;
    Ok(())
}

/// Exactly-once: with duplicate publishes (producer retries with the same id) and redeliveries,
/// the idempotent layer leaves exactly one effect per id.
pub async fn exactly_once_effects_with_idempotent_layer(b: &dyn TestBackend) -> Outcome {
    let client = match b.client(Guarantee::ExactlyOnce).await {
        Ok(c) => c,
        Err(e @ Error::Unsupported { .. }) => {
            return Err(ScenarioError(format!("backend refused exactly-once: {e}")))
        }
        Err(e) => return Err(e.into()),
    };
    let dest = b.fresh_destination(&*client, "eo").await?;
    let group = unique("g");
    let ledger = Arc::new(Ledger::new());
    let mut handles = Vec::new();
    let store = b.idempotency_store();
    for _ in 0..3 {
        let layer = Idempotent::new(
            Recorder {
                fail_first: 1,
                ..Recorder::new(ledger.clone())
            },
            store.clone(),
        )
        .namespace(group.clone())
        .lease(Duration::from_secs(10));
        handles.push(
            Consumer::new(client.clone(), Subscription::new(&dest, &group))
                .concurrency(4)
                .retry(fast_retry(10))
                .spawn(layer)
                .await?,
        );
    }
    // Keyed, as payments are keyed by account: on a FIFO queue each key is its own message
    // group, so a failing first attempt holds up only its own group, not the whole queue.
    let msgs: Vec<Message> = numbered(300, "eo")
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.with_key(format!("account-{}", i % 12)))
        .collect();
    publish_all(&*client, &dest, &msgs, &ledger).await?;
    for m in msgs.iter().step_by(3) {
        client.publish(&dest, m.clone()).await?; // producer retry: same id again
    }
    let (report, done) = ledger.wait_all_handled(wait() * 2).await;
    tokio::time::sleep(client.capabilities().settle_window).await;
    let after = ledger.report();
    stop(handles).await?;
    ensure!(
        done && report.lost == 0,
        "exactly-once lost messages: {report}"
    );
    ensure!(
        after.duplicates == 0,
        "exactly-once produced duplicate effects: {after}"
    );
    Ok(())
}

/// Counts, per message id, deliveries prepared and not yet handled or abandoned.
#[derive(Default)]
struct PrepareProbe {
    ledger: Arc<Ledger>,
    open: Mutex<HashMap<String, u32>>,
    unprepared_handled: AtomicU32,
    unprepared_abandoned: AtomicU32,
    abandoned: AtomicU32,
}

impl PrepareProbe {
    /// Close one prepared delivery of `id`; `false` if none was open.
    fn close(&self, id: &str) -> bool {
        let mut open = self.open.lock();
        match open.get_mut(id) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

#[async_trait]
impl Handler for PrepareProbe {
    async fn handle(&self, message: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        if !self.close(message.id.as_str()) {
            self.unprepared_handled.fetch_add(1, Ordering::Relaxed);
        }
        // Some work, so that the shutdown lands while deliveries are still queued.
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.ledger.handled(message.id.as_str());
        Ok(())
    }

    async fn prepare(&self, messages: &[&Message]) {
        let mut open = self.open.lock();
        for m in messages {
            *open.entry(m.id.to_string()).or_default() += 1;
        }
    }

    async fn abandon(&self, messages: &[&Message]) {
        for m in messages {
            self.abandoned.fetch_add(1, Ordering::Relaxed);
            if !self.close(m.id.as_str()) {
                self.unprepared_abandoned.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The consume loop hands the deliveries it received together to the handler's `prepare`, then
/// each one to `handle` — or to `abandon` when it stops first. After a shutdown in the middle of
/// a stream, every prepared delivery was handled or abandoned, and none was handled unprepared
/// (what the idempotent layer's batch claims rely on).
pub async fn prepared_deliveries_are_handled_or_abandoned(b: &dyn TestBackend) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "prepare").await?;
    let group = unique("g");
    let probe = Arc::new(PrepareProbe::default());
    let handle = launch(
        b,
        Consumer::new(client.clone(), Subscription::new(&dest, &group)).concurrency(4),
        &group,
        probe.clone(),
    )
    .await?;
    let msgs = numbered(400, "prepare");
    publish_all(&*client, &dest, &msgs, &probe.ledger).await?;
    let (report, ok) = probe.ledger.wait_until(wait(), |r| r.handled >= 100).await;
    ensure!(ok, "fewer than 100 of 400 handled: {report}");
    stop(vec![handle]).await?;
    let left: u32 = probe.open.lock().values().sum();
    let handled = probe.ledger.report().handled;
    ensure!(
        left == 0,
        "{left} prepared deliveries were neither handled nor abandoned ({handled} handled, {} abandoned)",
        probe.abandoned.load(Ordering::Relaxed)
    );
    let (h, a) = (
        probe.unprepared_handled.load(Ordering::Relaxed),
        probe.unprepared_abandoned.load(Ordering::Relaxed),
    );
    ensure!(
        h == 0 && a == 0,
        "{h} deliveries handled and {a} abandoned without being prepared"
    );
    Ok(())
}

/// Names of all scenarios, in suite order.
pub const ALL: &[&str] = &[
    "round_trip",
    "competing_consumers_no_loss",
    "nack_redelivers",
    "unsettled_redelivered_to_another_consumer",
    "settled_never_redelivered",
    "at_most_once_never_handles_twice",
    "per_key_order_across_consumers",
    "every_group_receives_everything",
    "destination_isolation",
    "close_flushes_pending_publishes",
    "close_returns_promptly_with_deliveries_waiting",
    "declared_group_keeps_what_is_published_before_it_subscribes",
    "oversize_payload_is_rejected_before_sending",
    "missing_destination_is_a_typed_error",
    "handler_errors_retry_then_dead_letter",
    "deferrals_never_dead_letter",
    "permanent_error_dead_letters_at_once",
    "batch_settles_only_after_success",
    "exactly_once_effects_with_idempotent_layer",
    "prepared_deliveries_are_handled_or_abandoned",
    "handler_outputs_arrive_and_inputs_settle",
    "typed_messages_round_trip_and_bad_payloads_dead_letter",
    "delayed_delivery_waits_until_due",
    "request_reply_answers_a_repeated_request_from_the_stored_result",
    "admin_inspects_and_deletes",
];

/// Run one scenario by name.
pub async fn run(name: &str, b: &dyn TestBackend) -> Outcome {
    match name {
        "round_trip" => round_trip(b).await,
        "competing_consumers_no_loss" => competing_consumers_no_loss(b).await,
        "nack_redelivers" => nack_redelivers(b).await,
        "unsettled_redelivered_to_another_consumer" => {
            unsettled_redelivered_to_another_consumer(b).await
        }
        "settled_never_redelivered" => settled_never_redelivered(b).await,
        "at_most_once_never_handles_twice" => at_most_once_never_handles_twice(b).await,
        "per_key_order_across_consumers" => per_key_order_across_consumers(b).await,
        "every_group_receives_everything" => every_group_receives_everything(b).await,
        "destination_isolation" => destination_isolation(b).await,
        "close_flushes_pending_publishes" => close_flushes_pending_publishes(b).await,
        "close_returns_promptly_with_deliveries_waiting" => {
            close_returns_promptly_with_deliveries_waiting(b).await
        }
        "declared_group_keeps_what_is_published_before_it_subscribes" => {
            declared_group_keeps_what_is_published_before_it_subscribes(b).await
        }
        "oversize_payload_is_rejected_before_sending" => {
            oversize_payload_is_rejected_before_sending(b).await
        }
        "missing_destination_is_a_typed_error" => missing_destination_is_a_typed_error(b).await,
        "handler_errors_retry_then_dead_letter" => handler_errors_retry_then_dead_letter(b).await,
        "deferrals_never_dead_letter" => deferrals_never_dead_letter(b).await,
        "permanent_error_dead_letters_at_once" => permanent_error_dead_letters_at_once(b).await,
        "batch_settles_only_after_success" => batch_settles_only_after_success(b).await,
        "exactly_once_effects_with_idempotent_layer" => {
            exactly_once_effects_with_idempotent_layer(b).await
        }
        "prepared_deliveries_are_handled_or_abandoned" => {
            prepared_deliveries_are_handled_or_abandoned(b).await
        }
        "handler_outputs_arrive_and_inputs_settle" => {
            handler_outputs_arrive_and_inputs_settle(b).await
        }
        "typed_messages_round_trip_and_bad_payloads_dead_letter" => {
            typed_messages_round_trip_and_bad_payloads_dead_letter(b).await
        }
        "delayed_delivery_waits_until_due" => delayed_delivery_waits_until_due(b).await,
        "request_reply_answers_a_repeated_request_from_the_stored_result" => {
            request_reply_answers_a_repeated_request_from_the_stored_result(b).await
        }
        "admin_inspects_and_deletes" => admin_inspects_and_deletes(b).await,
        other => Err(ScenarioError(format!("no scenario named {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::check_key_order;

    #[test]
    fn key_order_accepts_in_order_and_replays_from_an_earlier_position() {
        let straight: Vec<usize> = (0..5).collect();
        assert_eq!(check_key_order(&straight, 5), Ok(()));
        // Handled 0..=3, then the partition moved and the new owner replayed from #2.
        assert_eq!(check_key_order(&[0, 1, 2, 3, 2, 3, 4], 5), Ok(()));
        // Replayed whole three times (a rebalance before any commit landed).
        let thrice: Vec<usize> = (0..3).cycle().take(9).collect();
        assert_eq!(check_key_order(&thrice, 3), Ok(()));
    }

    #[test]
    fn key_order_rejects_swaps_interleavings_gaps_and_missing_tails() {
        assert!(check_key_order(&[0, 2, 1, 3], 4).is_err());
        // Two deliveries of the key running at once: 5.. and 9.. interleave.
        assert!(check_key_order(&[0, 1, 2, 3, 4, 5, 9, 6, 10], 11).is_err());
        assert!(check_key_order(&[1, 2], 3).is_err());
        assert!(check_key_order(&[0, 1], 3).is_err());
        assert!(check_key_order(&[], 1).is_err());
    }
}
