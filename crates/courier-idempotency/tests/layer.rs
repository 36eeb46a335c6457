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
