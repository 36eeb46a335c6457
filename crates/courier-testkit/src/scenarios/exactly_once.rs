//! Exactly-once effects through the idempotent layer, and prepared deliveries.

use super::*;

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
