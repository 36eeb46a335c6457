//! The consumer stack a configuration asks for: the consume loop with its `[consumer]` settings
//! and its built-in layers (`courier_core::layers`), and the idempotent layer when the
//! configuration wants one.

use std::sync::Arc;
use std::time::Duration;

use courier_idempotency::{IdempotencyStats, IdempotencyStore, Idempotent};

use crate::{
    Config, Consumer, ConsumerHandle, DeliveryClient, Guarantee, Handler, Result, Subscription,
};

/// Which store the idempotent layer uses, if it runs.
enum Layer {
    /// As the configuration says ([`ConsumerBuilder::wants_idempotency`]), its `[idempotency]`
    /// store.
    FromConfig,
    /// Always, over this store.
    Store(Arc<dyn IdempotencyStore>),
    /// Never.
    Off,
}

/// Builds the consumer [`consumer`](crate::consumer) starts, with knobs: tune the consume loop,
/// bring your own idempotency store, set the lease or namespace, or leave the layer out.
///
/// ```no_run
/// # async fn demo(config: courier::Config, client: std::sync::Arc<dyn courier::DeliveryClient>) -> courier::Result<()> {
/// use courier::{handler_fn, ConsumerBuilder, Subscription};
/// let consumer = ConsumerBuilder::new(&config, client, Subscription::new("orders", "billing"))
///     .consumer(|c| c.concurrency(16))
///     .namespace("billing-v2")
///     .spawn(handler_fn(|m| async move { println!("{}", m.id); Ok(()) }))
///     .await?;
/// # Ok(()) }
/// ```
pub struct ConsumerBuilder {
    config: Config,
    client: Arc<dyn DeliveryClient>,
    subscription: Subscription,
    consumer: Consumer,
    layer: Layer,
    lease: Option<Duration>,
    namespace: Option<String>,
    store_retry_delay: Option<Duration>,
}

impl ConsumerBuilder {
    /// The stack `config` asks for on `subscription`.
    pub fn new(
        config: &Config,
        client: Arc<dyn DeliveryClient>,
        subscription: Subscription,
    ) -> Self {
        let consumer =
            Consumer::new(client.clone(), subscription.clone()).with_config(&config.consumer);
        ConsumerBuilder {
            config: config.clone(),
            client,
            subscription,
            consumer,
            layer: Layer::FromConfig,
            lease: None,
            namespace: None,
            store_retry_delay: None,
        }
    }

    /// Whether `config` runs the idempotent layer: under exactly-once, and under any guarantee
    /// with an `[idempotency]` section (at-most-once then also skips an id published twice
    /// across consumer processes).
    pub fn wants_idempotency(config: &Config) -> bool {
        config.idempotency.is_some() || config.guarantee == Guarantee::ExactlyOnce
    }

    /// Change the consume loop's settings (concurrency, retry, timeouts …) after the
    /// configuration's `[consumer]` section was applied.
    pub fn consumer(mut self, tune: impl FnOnce(Consumer) -> Consumer) -> Self {
        self.consumer = tune(self.consumer);
        self
    }

    /// Run the idempotent layer over `store` (whatever the configuration says about it).
    pub fn idempotency_store(mut self, store: Arc<dyn IdempotencyStore>) -> Self {
        self.layer = Layer::Store(store);
        self
    }

    /// Run no idempotent layer. Exactly-once is then refused at start unless the backend commits
    /// outputs with the input transactionally.
    pub fn without_idempotency(mut self) -> Self {
        self.layer = Layer::Off;
        self
    }

    /// The lease of an in-progress key (default: `[idempotency] lease`, else the broker's
    /// redelivery window, at least 30 s).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The key namespace (default: `[idempotency] namespace`, else the subscription's group).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// How soon a message is redelivered while the store is down (fail-closed; default 1 s).
    pub fn store_retry_delay(mut self, delay: Duration) -> Self {
        self.store_retry_delay = Some(delay);
        self
    }

    /// Start the consumer.
    pub async fn spawn<H: Handler>(self, handler: H) -> Result<ConsumerHandle> {
        Ok(self.spawn_counted(handler).await?.0)
    }

    /// Start the consumer; also returns the idempotent layer's counters when it runs.
    pub async fn spawn_counted<H: Handler>(
        self,
        handler: H,
    ) -> Result<(ConsumerHandle, Option<Arc<IdempotencyStats>>)> {
        let section = self.config.idempotency.clone().unwrap_or_default();
        let store = match self.layer {
            Layer::Off => None,
            Layer::FromConfig if !Self::wants_idempotency(&self.config) => None,
            Layer::FromConfig => {
                if section.store.expose() == "memory" && !self.config.backend.traits().in_process {
                    tracing::warn!(
                        backend = self.client.backend(),
                        "idempotency store = memory: duplicates are absorbed within this process only (not across processes or restarts); configure [idempotency] store = redis:// or postgres:// for more than one instance"
                    );
                }
                Some(crate::idempotency_store(&section).await?)
            }
            Layer::Store(store) => Some(store),
        };
        let Some(store) = store else {
            return Ok((self.consumer.spawn(handler).await?, None));
        };
        let lease = self.lease.or(section.lease).unwrap_or_else(|| {
            self.client
                .capabilities()
                .redelivery_after_crash
                .max(Duration::from_secs(30))
        });
        let namespace = self
            .namespace
            .or_else(|| section.namespace.clone())
            .unwrap_or_else(|| self.subscription.group.clone());
        let mut layer = Idempotent::new(handler, store)
            .with_config(&section)
            .namespace(namespace)
            .lease(lease);
        if let Some(delay) = self.store_retry_delay {
            layer = layer.store_retry_delay(delay);
        }
        let stats = layer.stats();
        Ok((self.consumer.spawn(layer).await?, Some(stats)))
    }
}
