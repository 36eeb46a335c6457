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
