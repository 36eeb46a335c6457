//! The consume loop's layers, observed through a running consumer on the memory broker (the
//! embedded default): a panicking or overrunning handler is retried, not lost; at-most-once runs
//! an id once per process; `ConsumerBuilder` adds the idempotent layer as the configuration says
//! and leaves it out when told to.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier::config::IdempotencyConfig;
use courier::{
    handler_fn, Config, Consumer, ConsumerBuilder, Context, DeliveryClient, Error, Guarantee,
    Handler, HandlerError, Message, Subscription,
};

async fn client(broker: &str, g: Guarantee) -> Arc<dyn DeliveryClient> {
    let config = Config::from_url(&format!("memory://{broker}?auto_create=true"))
        .unwrap()
        .with_guarantee(g);
    courier::connect(&config).await.unwrap().into()
}

/// Panics on its first attempt, overruns the handler timeout on its second, succeeds on its
/// third.
struct Unruly(Arc<AtomicU32>);

#[async_trait::async_trait]
impl Handler for Unruly {
    async fn handle(&self, _m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        match cx.attempt() {
            1 => panic!("bad state"),
            2 => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn a_panic_and_a_timeout_are_retried_and_nothing_is_lost() {
    let client = client("layers-guard", Guarantee::AtLeastOnce).await;
    let runs = Arc::new(AtomicU32::new(0));
    let consumer = Consumer::new(client.clone(), Subscription::new("jobs", "workers"))
        .handler_timeout(Duration::from_millis(200))
        .retry(
            courier::RetryPolicy::attempts(5)
                .backoff(Duration::from_millis(10), Duration::from_millis(20)),
        )
        .spawn(Unruly(runs.clone()))
        .await
        .unwrap();
    client.publish("jobs", Message::new("job")).await.unwrap();
    let idle = consumer
        .wait_idle(Duration::from_millis(300), Duration::from_secs(20))
        .await;
    let stats = consumer.shutdown().await.unwrap();
    assert!(idle, "{stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 3, "{stats:?}");
    assert_eq!(stats.handled, 1, "{stats:?}");
    assert_eq!(
        stats.handler_errors, 2,
        "the panic and the timeout: {stats:?}"
    );
    assert_eq!(stats.retried, 2, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
}

#[tokio::test]
async fn at_most_once_runs_an_id_once_per_process() {
    let client = client("layers-amo", Guarantee::AtMostOnce).await;
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let consumer = Consumer::new(client.clone(), Subscription::new("events", "audit"))
        .spawn(handler_fn(move |_m| {
            let runs = counted.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }))
        .await
        .unwrap();
    let twice = Message::new("sent twice");
    client.publish("events", twice.clone()).await.unwrap();
    client.publish("events", twice).await.unwrap();
    client
        .publish("events", Message::new("once"))
        .await
        .unwrap();
    let idle = consumer
        .wait_idle(Duration::from_millis(200), Duration::from_secs(10))
        .await;
    let stats = consumer.shutdown().await.unwrap();
    assert!(idle, "{stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "{stats:?}");
    assert_eq!(stats.handled, 2, "{stats:?}");
    assert_eq!(stats.duplicates_skipped, 1, "{stats:?}");
}

/// Counts runs per payload.
fn counting(runs: Arc<AtomicU32>) -> impl Handler {
    handler_fn(move |_m| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    })
}

#[tokio::test]
async fn the_builder_adds_the_idempotent_layer_as_the_configuration_says() {
    let config = Config::from_url("memory://layers-builder?auto_create=true")
        .unwrap()
        .with_idempotency(IdempotencyConfig::default());
    assert!(ConsumerBuilder::wants_idempotency(&config));
    assert!(!ConsumerBuilder::wants_idempotency(&Config::default()));
    assert!(ConsumerBuilder::wants_idempotency(
        &Config::default().with_guarantee(Guarantee::ExactlyOnce)
    ));
    let client: Arc<dyn DeliveryClient> = courier::connect(&config).await.unwrap().into();

    // With the layer: a message published twice (same id) runs once; the second is absorbed.
    let runs = Arc::new(AtomicU32::new(0));
    let (consumer, layer) =
        ConsumerBuilder::new(&config, client.clone(), Subscription::new("orders", "a"))
            .consumer(|c| c.concurrency(1))
            .spawn_counted(counting(runs.clone()))
            .await
            .unwrap();
    let layer = layer.expect("the configuration has an [idempotency] section");
    let twice = Message::new("order");
    client.publish("orders", twice.clone()).await.unwrap();
    client.publish("orders", twice.clone()).await.unwrap();
    let idle = consumer
        .wait_idle(Duration::from_millis(200), Duration::from_secs(10))
        .await;
    let stats = consumer.shutdown().await.unwrap();
    assert!(idle, "{stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "{stats:?}");
    assert_eq!(stats.duplicates_absorbed, 1, "{stats:?}");
    assert_eq!(
        courier::idempotency::IdempotencyStats::get(&layer.duplicates_absorbed),
        1
    );

    // Without it every copy runs: a new group reads the destination from its start, so the two
    // copies published above and the two below.
    let runs = Arc::new(AtomicU32::new(0));
    let (consumer, layer) =
        ConsumerBuilder::new(&config, client.clone(), Subscription::new("orders", "b"))
            .without_idempotency()
            .spawn_counted(counting(runs.clone()))
            .await
            .unwrap();
    assert!(layer.is_none());
    client.publish("orders", twice.clone()).await.unwrap();
    client.publish("orders", twice).await.unwrap();
    let idle = consumer
        .wait_idle(Duration::from_millis(200), Duration::from_secs(10))
        .await;
    let stats = consumer.shutdown().await.unwrap();
    assert!(idle, "{stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 4, "{stats:?}");
    assert_eq!(stats.duplicates_absorbed, 0, "{stats:?}");

    // Exactly-once without the layer on a broker without transactions is refused at start.
    let eo = config.clone().with_guarantee(Guarantee::ExactlyOnce);
    let eo_client: Arc<dyn DeliveryClient> = courier::connect(&eo).await.unwrap().into();
    match ConsumerBuilder::new(&eo, eo_client, Subscription::new("orders", "c"))
        .without_idempotency()
        .spawn(counting(Arc::default()))
        .await
    {
        Err(Error::Unsupported { .. }) => {}
        Err(other) => panic!("expected a typed refusal, got {other:?}"),
        Ok(_) => panic!("exactly-once without the idempotent layer must not start"),
    }
}
