//! Delayed delivery, admin (inspect and delete), request-reply, typed messages, and handler outputs.

use super::*;

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
        if m.payload.starts_with(b"charge -") {
            return Err(HandlerError::permanent("a charge must be positive"));
        }
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
        // The broker cannot delete: the call must say so, never report success.
        return match client.delete_destination(&dest, &[&group]).await {
            Err(_) => Ok(()),
            Ok(removed) => Err(ScenarioError(format!(
                "delete_destination on a broker without delete APIs reported success: {removed:?}"
            ))),
        };
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
/// the handler runs once; another request gets its own reply; two calls asking the same at once
/// share one reply; a request the replier refuses for good is answered with the reason
/// (`Error::RequestFailed`) once it is in the dead letter, not left to time out.
pub async fn request_reply_answers_a_repeated_request_from_the_stored_result(
    b: &dyn TestBackend,
) -> Outcome {
    let client = b.client(Guarantee::AtLeastOnce).await?;
    let dest = b.fresh_destination(&*client, "rr").await?;
    let dlq = b.fresh_destination(&*client, "rr-dlq").await?;
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
    let h = Consumer::new(
        client.clone(),
        Subscription::new(&dest, &group).dead_letter(&dlq),
    )
    .concurrency(4)
    .spawn(layer)
    .await?;
    let mut dead = client
        .subscribe(Subscription::new(&dlq, unique("dlq-reader")))
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
    // Two calls asking the same at once share the one reply.
    let twice = Message::new("charge 9").with_id(unique("charge"));
    let (a, b2) = tokio::join!(
        requester.request(&dest, twice.clone(), wait()),
        requester.request(&dest, twice, wait())
    );
    let (a, b2) = (
        String::from_utf8_lossy(&a?.payload).into_owned(),
        String::from_utf8_lossy(&b2?.payload).into_owned(),
    );
    let refused = requester
        .request(&dest, Message::new("charge -5"), wait())
        .await;
    let in_dead_letter = dead.next_timeout(wait()).await;
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
        a == "receipt for charge 9 (run 3)" && a == b2,
        "two calls asking the same at once got {a:?} and {b2:?}"
    );
    ensure!(
        runs == 3,
        "the handler ran {runs} times for three distinct requests"
    );
    match refused {
        Err(Error::RequestFailed { ref reason, .. }) if reason.contains("must be positive") => {}
        other => {
            return Err(ScenarioError(format!(
                "a refused request should fail with RequestFailed and the handler's reason, got {other:?}"
            )))
        }
    }
    match in_dead_letter {
        Some(Ok(d)) if d.message.payload.as_ref() == b"charge -5" => d.ack().await?,
        other => {
            return Err(ScenarioError(format!(
                "the refused request is not in the dead letter: {other:?}"
            )))
        }
    }
    dead.close().await?;
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
