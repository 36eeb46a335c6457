//! # courier-testkit (not published)
//!
//! The conformance suite every courier backend and every wrapper runs: scenario functions that
//! take a [`TestBackend`] (a client factory) and consult its [`Capabilities`](courier_core::Capabilities),
//! a delivery [`Ledger`] that counts **lost and duplicated** messages, and helpers for crash tests
//! (re-executing the test binary as a worker process that can be SIGKILLed).
//!
//! ```ignore
//! async fn backend() -> MyBackend { MyBackend::new() }
//! courier_testkit::conformance_suite!(backend);
//! ```

pub mod crash;
pub mod endpoints;
pub mod kafka_log;
pub mod kafka_mock;
mod ledger;
pub mod process;
pub mod scenarios;
pub mod stores;

use std::sync::Arc;

use async_trait::async_trait;
use courier_core::{DeliveryClient, Guarantee, Result};
use courier_idempotency::{IdempotencyStore, MemoryStore};

pub use ledger::{FileLedger, Ledger, LedgerReport, STALL};
pub use scenarios::ScenarioError;

/// Assert that `client` refuses each of `names` as a destination — on create, publish and
/// subscribe alike — with `Error::InvalidName` in one short sentence (the backend's naming rule).
pub async fn assert_names_refused(client: &dyn DeliveryClient, names: &[&str]) {
    use courier_core::{Message, Subscription};
    let kind = |e: courier_core::Error| {
        let text = e.to_string();
        assert!(text.len() < 300, "{} bytes: {text}", text.len());
        e.kind()
    };
    for &name in names {
        assert_eq!(
            client.create_destination(name).await.map_err(kind),
            Err("invalid_name"),
            "create {name:?}"
        );
        assert_eq!(
            client
                .publish(name, Message::new("m"))
                .await
                .map(|_| ())
                .map_err(kind),
            Err("invalid_name"),
            "publish {name:?}"
        );
        assert_eq!(
            client
                .subscribe(Subscription::new(name, "g"))
                .await
                .map(|_| ())
                .map_err(kind),
            Err("invalid_name"),
            "subscribe {name:?}"
        );
    }
}

/// A unique name: `prefix-` followed by 12 random hex characters.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

/// What the conformance suite needs from a backend.
#[async_trait]
pub trait TestBackend: Send + Sync + 'static {
    /// Name for reports.
    fn name(&self) -> String;

    /// A client with `guarantee` (a new connection per call is fine).
    async fn client(&self, guarantee: Guarantee) -> Result<Arc<dyn DeliveryClient>>;

    /// Create a fresh, uniquely named destination and return its name.
    async fn fresh_destination(&self, client: &dyn DeliveryClient, prefix: &str) -> Result<String> {
        let name = unique(prefix);
        client.create_destination(&name).await?;
        Ok(name)
    }

    /// The idempotency store exactly-once scenarios wrap their handlers with.
    fn idempotency_store(&self) -> Arc<dyn IdempotencyStore> {
        Arc::new(MemoryStore::default())
    }

    /// When `Some`, every scenario that runs a handler runs it through the idempotent layer
    /// with this store (see [`Layered`]).
    fn layer_store(&self) -> Option<Arc<dyn IdempotencyStore>> {
        None
    }

    /// Whether the broker implements deleting destinations and groups. librdkafka's
    /// MockCluster does not (no DeleteTopics or DeleteGroups; a request waits out its timeout):
    /// there the admin scenario checks that `delete_destination` fails instead of deleting.
    fn deletes_destinations(&self) -> bool {
        true
    }
}

/// Any backend with every scenario's handlers wrapped in the idempotent layer over `store`:
/// `conformance_suite!` on a `Layered` backend proves the layer keeps the whole contract.
pub struct Layered<B> {
    /// The backend.
    pub inner: B,
    /// The store the layer records keys in.
    pub store: Arc<dyn IdempotencyStore>,
}

#[async_trait]
impl<B: TestBackend> TestBackend for Layered<B> {
    fn name(&self) -> String {
        format!(
            "{} through the idempotent layer ({})",
            self.inner.name(),
            self.store.name()
        )
    }

    async fn client(&self, guarantee: Guarantee) -> Result<Arc<dyn DeliveryClient>> {
        self.inner.client(guarantee).await
    }

    async fn fresh_destination(&self, client: &dyn DeliveryClient, prefix: &str) -> Result<String> {
        self.inner.fresh_destination(client, prefix).await
    }

    fn idempotency_store(&self) -> Arc<dyn IdempotencyStore> {
        self.store.clone()
    }

    fn layer_store(&self) -> Option<Arc<dyn IdempotencyStore>> {
        Some(self.store.clone())
    }

    fn deletes_destinations(&self) -> bool {
        self.inner.deletes_destinations()
    }
}

/// How long one conformance scenario may run before it fails as hung:
/// `COURIER_SCENARIO_LIMIT_SECS` seconds, 300 by default (the slowest scenario takes about a
/// minute on a loaded 2-core machine).
pub fn scenario_limit() -> std::time::Duration {
    let secs = std::env::var("COURIER_SCENARIO_LIMIT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    std::time::Duration::from_secs(secs)
}

/// Run one conformance scenario on a runtime of its own, bounded by [`scenario_limit`], and
/// panic with the scenario's error. The runtime is shut down with a bound too: a blocking call
/// a backend left behind cannot keep the test from ending. Called by [`conformance_suite!`].
#[doc(hidden)]
pub fn run_scenario<B, F, S>(scenario: &str, factory: F, run: S)
where
    B: TestBackend,
    F: std::future::Future<Output = B>,
    S: for<'a> FnOnce(
        &'a B,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = scenarios::Outcome> + 'a>,
    >,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime for the scenario");
    let limit = scenario_limit();
    let (backend, outcome) = rt.block_on(async {
        let backend = factory.await;
        let outcome = tokio::time::timeout(limit, run(&backend)).await;
        (backend.name(), outcome)
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("conformance scenario `{scenario}` failed on {backend}: {e}"),
        Err(_) => panic!(
            "conformance scenario `{scenario}` on {backend} did not finish within {limit:?} \
             (COURIER_SCENARIO_LIMIT_SECS)"
        ),
    }
}

/// Generate one test per conformance scenario, each calling `$factory().await` for a backend
/// and failing when the scenario fails or runs longer than [`scenario_limit`]. Use it in a
/// backend crate's `tests/conformance.rs`.
#[macro_export]
macro_rules! conformance_suite {
    ($factory:path) => {
        $crate::conformance_suite!(@tests $factory;
            round_trip,
            competing_consumers_no_loss,
            nack_redelivers,
            unsettled_redelivered_to_another_consumer,
            settled_never_redelivered,
            at_most_once_never_handles_twice,
            per_key_order_across_consumers,
            every_group_receives_everything,
            destination_isolation,
            close_flushes_pending_publishes,
            close_returns_promptly_with_deliveries_waiting,
            declared_group_keeps_what_is_published_before_it_subscribes,
            oversize_payload_is_rejected_before_sending,
            missing_destination_is_a_typed_error,
            handler_errors_retry_then_dead_letter,
            deferrals_never_dead_letter,
            permanent_error_dead_letters_at_once,
            batch_settles_only_after_success,
            exactly_once_effects_with_idempotent_layer,
            prepared_deliveries_are_handled_or_abandoned,
            handler_outputs_arrive_and_inputs_settle,
            typed_messages_round_trip_and_bad_payloads_dead_letter,
            delayed_delivery_waits_until_due,
            request_reply_answers_a_repeated_request_from_the_stored_result,
            admin_inspects_and_deletes
        );
    };
    (@tests $factory:path; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::run_scenario(stringify!($name), $factory(), |backend| {
                    Box::pin($crate::scenarios::$name(backend))
                });
            }
        )*
    };
}
