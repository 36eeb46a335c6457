//! The layer's lease heartbeat: a handler slower than the lease keeps it.

use std::sync::Arc;
use std::time::Duration;

use courier_core::{handler_fn, Context, Handler, Message, MessageId};
use courier_idempotency::{Begin, IdempotencyStore, Idempotent, MemoryStore};

#[tokio::test]
async fn a_handler_slower_than_its_lease_keeps_the_lease() {
    let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::default());
    let lease = Duration::from_millis(300);
    let layer = Idempotent::new(
        handler_fn(|_m: Message| async move {
            tokio::time::sleep(Duration::from_millis(1_200)).await;
            Ok(())
        }),
        store.clone(),
    )
    .namespace("g")
    .lease(lease);
    let stats = layer.stats();
    let m = Message::new("slow");
    let key = format!("g:{}", m.id);
    let fp = courier_idempotency::fingerprint(&m);
    let run = {
        let m = m.clone();
        tokio::spawn(async move {
            let mut cx = Context::new(MessageId::new(), 1, "test");
            layer.handle(&m, &mut cx).await
        })
    };
    // Well past the lease, another worker still finds the key in progress.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let b = store.begin(&key, &fp, lease).await.unwrap();
        assert!(
            matches!(b, Begin::InProgress { .. }),
            "lease lost while the handler ran: {b:?}"
        );
    }
    run.await.unwrap().unwrap();
    assert!(matches!(
        store.begin(&key, &fp, lease).await.unwrap(),
        Begin::Completed { .. }
    ));
    assert_eq!(
        stats.leases_lost.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// A duplicate arriving while the first run has just begun is looked at again soon (about as
/// long as that run has been going, at least 100 ms), not when the 30 s lease would end: a
/// request asked again while its first run finishes is answered promptly. Late in a long run,
/// the deferral grows with the run but never passes the lease's end.
#[tokio::test]
async fn a_duplicate_during_a_short_run_is_deferred_briefly() {
    let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::default());
    let started = Arc::new(tokio::sync::Notify::new());
    let finish = Arc::new(tokio::sync::Notify::new());
    let layer = Arc::new(
        Idempotent::new(
            {
                let (started, finish) = (started.clone(), finish.clone());
                handler_fn(move |_m: Message| {
                    let (started, finish) = (started.clone(), finish.clone());
                    async move {
                        started.notify_one();
                        finish.notified().await;
                        Ok(())
                    }
                })
            },
            store,
        )
        .namespace("g")
        .lease(Duration::from_secs(30)),
    );
    let m = Message::new("charge 42");
    let first = {
        let (layer, m) = (layer.clone(), m.clone());
        tokio::spawn(async move { handle(&*layer, &m).await })
    };
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the first run starts");
    match handle(&*layer, &m).await {
        Err(courier_core::HandlerError::Defer { after, .. }) => assert!(
            after >= Duration::from_millis(100) && after < Duration::from_secs(5),
            "a duplicate of a run that just began is deferred {after:?} (the lease is 30 s)"
        ),
        other => panic!("a duplicate during the first run must be deferred: {other:?}"),
    }
    finish.notify_one();
    first.await.unwrap().unwrap();
    assert!(
        handle(&*layer, &m).await.is_ok(),
        "after the first run, the duplicate is absorbed"
    );

    // Late in a run: the lease's end bounds the deferral. The first worker's lease has 1 s
    // left while this layer's own lease is 30 s, so the run looks ~29 s old.
    let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::default());
    let late = Idempotent::new(counting(Arc::default()), store.clone())
        .namespace("g")
        .lease(Duration::from_secs(30));
    let m = Message::new("charge 7");
    let fp = courier_idempotency::fingerprint(&m);
    assert!(matches!(
        store
            .begin(&format!("g:{}", m.id), &fp, Duration::from_secs(1))
            .await
            .unwrap(),
        Begin::Begun(_)
    ));
    match handle(&late, &m).await {
        Err(courier_core::HandlerError::Defer { after, .. }) => assert!(
            after <= Duration::from_secs(1) && after >= Duration::from_millis(500),
            "deferred {after:?}; the lease ends in at most 1 s, and the run looks 29 s old"
        ),
        other => panic!("a duplicate during the first run must be deferred: {other:?}"),
    }
}

/// A Redis store under a fresh prefix (a store that cannot be reached fails the test).
async fn redis() -> Arc<dyn IdempotencyStore> {
    let url = courier_testkit::endpoints::redis_url();
    match courier_idempotency::RedisStore::connect(&url).await {
        Ok(s) => Arc::new(s.with_prefix(courier_testkit::unique("test:"))),
        Err(e) => courier_testkit::endpoints::unreachable("Redis", &url, e),
    }
}

fn counting(runs: Arc<std::sync::atomic::AtomicU64>) -> impl Handler + 'static {
    handler_fn(move |_m: Message| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    })
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

async fn handle(layer: &impl Handler, m: &Message) -> Result<(), courier_core::HandlerError> {
    let mut cx = Context::new(m.id.clone(), 1, "test");
    layer.handle(m, &mut cx).await
}

/// `prepare` claims the keys of a batch in one step: another worker finds them in progress
/// before their handlers run, and each handler runs once on its claimed lease.
#[tokio::test]
async fn prepared_batch_is_claimed_ahead_and_handled_once() {
    let store = redis().await;
    let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let layer = Idempotent::new(counting(runs.clone()), store.clone()).namespace("g");
    let stats = layer.stats();
    let batch: Vec<Message> = (0..10).map(|i| Message::new(format!("m{i}"))).collect();
    let refs: Vec<&Message> = batch.iter().collect();
    layer.prepare(&refs).await;
    for m in &batch {
        let b = other_worker_begins(&store, m).await;
        assert!(
            matches!(b, Begin::InProgress { .. }),
            "not claimed ahead: {b:?}"
        );
    }
    for m in &batch {
        handle(&layer, m).await.unwrap();
    }
    // Redelivered duplicates, prepared again: absorbed, not run.
    layer.prepare(&refs).await;
    for m in &batch {
        handle(&layer, m).await.unwrap();
    }
    assert_eq!(get(&runs), 10);
    assert_eq!(get(&stats.begun), 10);
    assert_eq!(
        get(&stats.claimed_ahead),
        10,
        "every run began on its batch claim"
    );
    assert_eq!(get(&stats.completed), 10);
    assert_eq!(get(&stats.duplicates_absorbed), 10);
    assert_eq!(get(&stats.leases_lost), 0);
}

const LEASE: Duration = Duration::from_secs(30);

/// What another worker's `begin` of `m`'s key (namespace `g`) finds.
async fn other_worker_begins(store: &Arc<dyn IdempotencyStore>, m: &Message) -> Begin {
    let key = format!("g:{}", m.id);
    let fp = courier_idempotency::fingerprint(m);
    store.begin(&key, &fp, LEASE).await.unwrap()
}

/// Deliveries the consume loop abandons (shutdown) give their claimed leases back at once.
#[tokio::test]
async fn abandoned_batch_releases_its_claims() {
    let store = redis().await;
    let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let layer = Idempotent::new(counting(runs.clone()), store.clone()).namespace("g");
    let batch: Vec<Message> = (0..4).map(|i| Message::new(format!("m{i}"))).collect();
    let refs: Vec<&Message> = batch.iter().collect();
    layer.prepare(&refs).await;
    layer.abandon(&refs).await;
    for m in &batch {
        let b = other_worker_begins(&store, m).await;
        assert!(
            matches!(b, Begin::Begun(_)),
            "claim kept after abandon: {b:?}"
        );
    }
    assert_eq!(get(&runs), 0);
}

/// A prepared delivery that waited past its lease, while another worker took the key over and
/// completed it, is absorbed as a duplicate, not run again.
#[tokio::test]
async fn a_claim_that_expired_while_waiting_is_not_trusted() {
    let store = redis().await;
    let lease = Duration::from_millis(300);
    let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let layer = Idempotent::new(counting(runs.clone()), store.clone())
        .namespace("g")
        .lease(lease);
    let stats = layer.stats();
    let batch: Vec<Message> = (0..2).map(|i| Message::new(format!("m{i}"))).collect();
    let refs: Vec<&Message> = batch.iter().collect();
    layer.prepare(&refs).await;
    // The claims expire (the store's own clock), then another worker runs batch[0].
    let key = format!("g:{}", batch[0].id);
    let fp = courier_idempotency::fingerprint(&batch[0]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let other = loop {
        match store.begin(&key, &fp, LEASE).await.unwrap() {
            Begin::Begun(t) => break t,
            _ => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the claim never expired"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(store
        .complete(&key, &other, &fp, None, Duration::from_secs(60))
        .await
        .unwrap());
    handle(&layer, &batch[0]).await.unwrap();
    handle(&layer, &batch[1]).await.unwrap();
    assert_eq!(get(&runs), 1, "only batch[1] runs here");
    assert_eq!(get(&stats.duplicates_absorbed), 1);
    assert_eq!(
        get(&stats.claimed_ahead),
        0,
        "a lapsed claim is never trusted"
    );
    assert_eq!(get(&stats.leases_lost), 0);
}

/// Two deliveries with one id but different payloads in one batch: whichever is handled first
/// runs, the other is a conflict (dead-lettered) — the claim made for one payload never lets the
/// other through.
#[tokio::test]
async fn one_id_two_payloads_in_a_batch_runs_once_and_conflicts_once() {
    let store = redis().await;
    for forged_first in [false, true] {
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let layer = Idempotent::new(counting(runs.clone()), store.clone()).namespace("g");
        let a = Message::new("charge 10");
        let forged = Message::new("charge 1000").with_id(a.id.clone());
        let other = Message::new("x");
        layer.prepare(&[&a, &forged, &other]).await;
        let (first, second) = if forged_first {
            (&forged, &a)
        } else {
            (&a, &forged)
        };
        handle(&layer, first).await.unwrap();
        let err = handle(&layer, second).await.unwrap_err();
        assert_eq!(err.kind(), "permanent", "{err}");
        handle(&layer, &other).await.unwrap();
        assert_eq!(get(&runs), 2, "forged first: {forged_first}");
    }
}

#[tokio::test]
async fn memory_store_from_config_is_one_per_process() {
    let config = courier_core::config::IdempotencyConfig::default();
    let a = courier_idempotency::store_from_config(&config)
        .await
        .unwrap();
    let b = courier_idempotency::store_from_config(&config)
        .await
        .unwrap();
    let Begin::Begun(token) = a
        .begin("billing:one-process", "fp", Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("a fresh key is begun")
    };
    a.complete(
        "billing:one-process",
        &token,
        "fp",
        None,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(
        matches!(
            b.begin("billing:one-process", "fp", Duration::from_secs(5))
                .await
                .unwrap(),
            Begin::Completed { .. }
        ),
        "a second consumer of the process sees the first one's completed key"
    );
}

/// On a backend that commits outputs with the consumed offset after the handler (Kafka
/// exactly-once), the layer stores the outputs with the key: the same input read again at the
/// same position (its transaction never committed) gets them staged again without running the
/// handler; a copy at another position (a publisher's duplicate) is absorbed with none.
#[tokio::test]
async fn stored_outputs_are_staged_again_only_for_the_same_position() {
    use courier_core::Position;
    use std::sync::atomic::{AtomicU32, Ordering};

    let runs = Arc::new(AtomicU32::new(0));
    struct Transform(Arc<AtomicU32>);
    #[courier_core::async_trait]
    impl Handler for Transform {
        async fn handle(
            &self,
            m: &Message,
            cx: &mut Context,
        ) -> Result<(), courier_core::HandlerError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            cx.set_result("charged");
            cx.publish(
                "receipts",
                Message::new(m.payload.clone()).with_id(cx.derive_id("receipt")),
            );
            Ok(())
        }
    }
    let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::default());
    let layer = Idempotent::new(Transform(runs.clone()), store).namespace("billing");
    let m = Message::new("order-1");
    let at = |offset| {
        Context::new(m.id.clone(), 1, "orders")
            .with_position(Position::Offset {
                partition: 0,
                offset,
            })
            .committing_atomically()
    };

    let mut first = at(7);
    layer.handle(&m, &mut first).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(first.outputs().len(), 1);
    assert!(!first.is_duplicate());

    let mut again = at(7);
    layer.handle(&m, &mut again).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran again");
    assert_eq!(
        again.outputs(),
        first.outputs(),
        "the stored outputs are staged again"
    );
    assert_eq!(again.result().map(|r| &r[..]), Some(&b"charged"[..]));
    assert!(again.is_duplicate());

    let mut copy = at(9);
    layer.handle(&m, &mut copy).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        copy.outputs().is_empty(),
        "a publisher's duplicate got outputs"
    );
    assert!(copy.is_duplicate());
    assert_eq!(
        layer.stats().outputs_replayed.load(Ordering::SeqCst),
        1,
        "one replay"
    );
}

/// A real store behind an outage switch: while `down`, every call fails as an unreachable store
/// does (`Error::Store`).
struct Outage {
    inner: Arc<dyn IdempotencyStore>,
    down: std::sync::atomic::AtomicBool,
}

impl Outage {
    fn check(&self) -> courier_core::Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(courier_core::Error::Store {
                store: self.inner.name(),
                operation: "begin",
                source: "connection refused (outage switch)".into(),
            });
        }
        Ok(())
    }
}

#[courier_core::async_trait]
impl IdempotencyStore for Outage {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn begin(&self, key: &str, fp: &str, lease: Duration) -> courier_core::Result<Begin> {
        self.check()?;
        self.inner.begin(key, fp, lease).await
    }
    async fn extend(
        &self,
        key: &str,
        token: &courier_idempotency::LeaseToken,
        lease: Duration,
    ) -> courier_core::Result<bool> {
        self.check()?;
        self.inner.extend(key, token, lease).await
    }
    async fn complete(
        &self,
        key: &str,
        token: &courier_idempotency::LeaseToken,
        fp: &str,
        result: Option<courier_core::Bytes>,
        ttl: Duration,
    ) -> courier_core::Result<bool> {
        self.check()?;
        self.inner.complete(key, token, fp, result, ttl).await
    }
    async fn release(
        &self,
        key: &str,
        token: &courier_idempotency::LeaseToken,
    ) -> courier_core::Result<()> {
        self.check()?;
        self.inner.release(key, token).await
    }
}

async fn postgres() -> Arc<dyn IdempotencyStore> {
    let url = courier_testkit::endpoints::database_url();
    match courier_idempotency::PostgresStore::connect(&url).await {
        Ok(s) => Arc::new(s),
        Err(e) => courier_testkit::endpoints::unreachable("PostgreSQL", &url, e),
    }
}

/// Fail-closed defers while the store is down (the handler does not run) and runs once after;
/// fail-open runs the handler without dedup while it is down (counted), so a redelivery after
/// the outage runs it again — the documented price of availability.
async fn store_failure_policies(store: Arc<dyn IdempotencyStore>) {
    use courier_core::config::StoreFailurePolicy;
    for policy in [StoreFailurePolicy::FailClosed, StoreFailurePolicy::FailOpen] {
        let outage = Arc::new(Outage {
            inner: store.clone(),
            down: std::sync::atomic::AtomicBool::new(true),
        });
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let layer = Idempotent::new(counting(runs.clone()), outage.clone())
            .namespace(courier_testkit::unique("policy"))
            .on_store_error(policy);
        let m = Message::new("charge 10 EUR");
        let during = handle(&layer, &m).await;
        outage
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let after = handle(&layer, &m).await;
        let again = handle(&layer, &m).await;
        let stats = layer.stats();
        match policy {
            StoreFailurePolicy::FailClosed => {
                assert!(
                    matches!(during, Err(courier_core::HandlerError::Defer { .. })),
                    "{}: fail-closed must defer during the outage: {during:?}",
                    store.name()
                );
                assert_eq!(
                    get(&runs),
                    1,
                    "{}: fail-closed ran {} times",
                    store.name(),
                    get(&runs)
                );
                assert_eq!(get(&stats.processed_fail_open), 0);
            }
            StoreFailurePolicy::FailOpen => {
                assert!(
                    during.is_ok(),
                    "{}: fail-open must process: {during:?}",
                    store.name()
                );
                assert_eq!(get(&stats.processed_fail_open), 1, "{}", store.name());
                assert_eq!(
                    get(&runs),
                    2,
                    "{}: fail-open runs during the outage and once more after it",
                    store.name()
                );
            }
        }
        assert!(after.is_ok() && again.is_ok(), "{after:?} {again:?}");
        assert_eq!(get(&stats.duplicates_absorbed), 1, "{}", store.name());
    }
}

#[tokio::test]
async fn store_failure_policies_memory() {
    store_failure_policies(Arc::new(MemoryStore::default())).await;
}

#[tokio::test]
async fn store_failure_policies_redis() {
    store_failure_policies(redis().await).await;
}

#[tokio::test]
async fn store_failure_policies_postgres() {
    store_failure_policies(postgres().await).await;
}

/// A duplicate is not handled again, but whoever answers it sees the first run's result.
#[tokio::test]
async fn a_duplicate_gets_the_first_runs_result() {
    let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    struct Reply(Arc<std::sync::atomic::AtomicU64>);
    #[courier_core::async_trait]
    impl Handler for Reply {
        async fn handle(
            &self,
            _m: &Message,
            cx: &mut Context,
        ) -> Result<(), courier_core::HandlerError> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            cx.set_result(format!("payment accepted, run {n}"));
            Ok(())
        }
    }
    for store in [
        Arc::new(MemoryStore::default()) as Arc<dyn IdempotencyStore>,
        redis().await,
        postgres().await,
    ] {
        let layer = Idempotent::new(Reply(runs.clone()), store.clone())
            .namespace(courier_testkit::unique("reply"));
        let m = Message::new("pay 10 EUR");
        let mut first = Context::new(m.id.clone(), 1, "payments");
        layer.handle(&m, &mut first).await.unwrap();
        let mut dup = Context::new(m.id.clone(), 1, "payments");
        layer.handle(&m, &mut dup).await.unwrap();
        assert!(dup.is_duplicate(), "{}", store.name());
        assert_eq!(dup.result(), first.result(), "{}", store.name());
    }
    assert_eq!(get(&runs), 3, "one run per store");
}
