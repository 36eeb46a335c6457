//! Handler failures: retries, deferrals, dead-lettering, and batches that settle only after success.

use super::*;

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
