//! The shared conformance suite on the memory backend: plain, under injected faults, and on
//! deliberately broken brokers (where the suite must fail).

use std::sync::Arc;

use courier_core::{DeliveryClient, Guarantee, Result};
use courier_memory::{MemoryBroker, MemoryClient};
use courier_memory::{MemoryConfig, MemoryFaults};
use courier_testkit::{scenarios, unique, TestBackend};

struct Memory {
    config: MemoryConfig,
    name: &'static str,
}

#[async_trait::async_trait]
impl TestBackend for Memory {
    fn name(&self) -> String {
        self.name.to_owned()
    }

    async fn client(&self, guarantee: Guarantee) -> Result<Arc<dyn DeliveryClient>> {
        let broker = MemoryBroker::named(&self.config.broker);
        Ok(Arc::new(MemoryClient::new(
            broker,
            self.config.clone(),
            guarantee,
        )))
    }
}

fn with_faults(name: &'static str, faults: MemoryFaults) -> Memory {
    Memory {
        config: MemoryConfig {
            broker: unique("broker"),
            faults,
            ..MemoryConfig::default()
        },
        name,
    }
}

async fn backend() -> Memory {
    with_faults("memory", MemoryFaults::default())
}

courier_testkit::conformance_suite!(backend);

/// The guarantee-relevant scenarios again, with the broker duplicating deliveries, losing
/// confirms and consumers crashing before they settle.
mod under_faults {
    use super::*;

    async fn faulty() -> Memory {
        with_faults(
            "memory (faults)",
            MemoryFaults {
                duplicate_delivery: 0.1,
                duplicate_on_publish: 0.1,
                drop_on_publish: 0.05,
                crash_before_settle: 0.05,
                seed: Some(7),
                ..MemoryFaults::default()
            },
        )
    }

    courier_testkit::conformance_suite!(@tests faulty;
        competing_consumers_no_loss,
        at_most_once_never_handles_twice,
        exactly_once_effects_with_idempotent_layer,
        every_group_receives_everything,
    );
}

/// The suite can fail: run it against brokers that break the contract and expect it to say so.
mod broken_brokers_are_caught {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn loss_of_confirmed_messages_is_caught() {
        let b = with_faults(
            "memory (loses confirmed messages)",
            MemoryFaults {
                lose_acknowledged: 0.05,
                seed: Some(1),
                ..MemoryFaults::default()
            },
        );
        let err = scenarios::competing_consumers_no_loss(&b)
            .await
            .expect_err("the suite must report lost messages");
        assert!(err.0.contains("lost"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redelivery_of_settled_messages_is_caught() {
        let b = with_faults(
            "memory (redelivers settled messages)",
            MemoryFaults {
                redeliver_settled: 1.0,
                ..MemoryFaults::default()
            },
        );
        let err = scenarios::settled_never_redelivered(&b)
            .await
            .expect_err("the suite must report redelivered settled messages");
        assert!(err.0.contains("delivered again"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn duplicate_effects_are_caught_without_the_layer() {
        // At-least-once (no idempotent layer) under duplicate delivery: the ledger must see the
        // duplicate effects the exactly-once scenario forbids.
        let b = with_faults(
            "memory (duplicates)",
            MemoryFaults {
                duplicate_delivery: 0.5,
                seed: Some(3),
                ..MemoryFaults::default()
            },
        );
        let client = b.client(Guarantee::AtLeastOnce).await.unwrap();
        let dest = b.fresh_destination(&*client, "dups").await.unwrap();
        let ledger = Arc::new(courier_testkit::Ledger::new());
        let l2 = ledger.clone();
        let h = courier_core::Consumer::new(
            client.clone(),
            courier_core::Subscription::new(&dest, "g"),
        )
        .spawn(courier_core::handler_fn(move |m| {
            let l = l2.clone();
            async move {
                l.handled(m.id.as_str());
                Ok(())
            }
        }))
        .await
        .unwrap();
        for i in 0..200 {
            let m = courier_core::Message::new(format!("{i}"));
            client.publish(&dest, m.clone()).await.unwrap();
            ledger.sent(m.id.as_str());
        }
        let (report, _) = ledger
            .wait_until(std::time::Duration::from_secs(30), |r| {
                r.lost == 0 && r.duplicates > 0
            })
            .await;
        h.shutdown().await.unwrap();
        assert_eq!(report.lost, 0, "{report}");
        assert!(
            report.duplicates > 0,
            "duplicate delivery must show as duplicate effects: {report}"
        );
    }
}

/// The suite with every handler behind the idempotent layer (memory store).
mod through_the_layer {
    use super::*;
    use courier_testkit::Layered;

    async fn layered() -> Layered<Memory> {
        Layered {
            inner: with_faults("memory", MemoryFaults::default()),
            store: Arc::new(courier_idempotency::MemoryStore::default()),
        }
    }
    courier_testkit::conformance_suite!(layered);
}

/// `wait_idle` says when a consumer has drained its destination, without a guess at how long
/// that takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_returns_once_the_destination_is_drained() {
    use courier_core::{handler_fn, Consumer, Message, Subscription};
    use std::time::Duration;
    let b = backend().await;
    let client = b.client(Guarantee::AtLeastOnce).await.unwrap();
    let dest = unique("idle");
    client.create_destination(&dest).await.unwrap();
    for i in 0..50 {
        client
            .publish(&dest, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let h = Consumer::new(client, Subscription::new(&dest, "g"))
        .concurrency(4)
        .spawn(handler_fn(|_m| async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(())
        }))
        .await
        .unwrap();
    assert!(
        h.wait_idle(Duration::from_millis(200), Duration::from_secs(30))
            .await,
        "never idle: {:?}",
        h.stats()
    );
    let stats = h.shutdown().await.unwrap();
    assert_eq!(stats.handled, 50, "{stats:?}");
}
