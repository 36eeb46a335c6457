//! Exactly-once *effects* through the idempotent layer, on every backend, with the Redis and
//! PostgreSQL stores; a worker that dies holding a lease; and PostgreSQL transactional mode
//! under repeated SIGKILL between the business commit and the acknowledgement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier::config::{MemoryConfig, MemoryFaults};
use courier::idempotency::{
    Begin, IdempotencyStore, Idempotent, PostgresStore, RedisStore, TransactionalIdempotent,
    TxHandler,
};
use courier::{
    async_trait, BackendConfig, Config, Consumer, Context, DeliveryClient, Guarantee, Handler,
    HandlerError, Message, Result, RetryPolicy, Subscription,
};
use courier_testkit::endpoints::{self, database_url, redis_url, unreachable};
use courier_testkit::process::{
    kill9, rabbitmq_queue_state, spawn_worker, wait_rabbitmq_no_consumers, worker_role,
};
use courier_testkit::{scenarios, unique, Ledger, TestBackend};
use sqlx::postgres::Postgres;
use sqlx::{Row, Transaction};

async fn redis_store() -> Arc<dyn IdempotencyStore> {
    let url = redis_url();
    match RedisStore::connect(&url).await {
        Ok(s) => Arc::new(s),
        Err(e) => unreachable("Redis", &url, e),
    }
}

async fn pg_store() -> PostgresStore {
    let url = database_url();
    match PostgresStore::connect(&url).await {
        Ok(s) => s,
        Err(e) => unreachable("PostgreSQL", &url, e),
    }
}

/// Any backend, from a config, with the layer's store chosen by the test.
struct Backend {
    name: String,
    config: Config,
    store: Arc<dyn IdempotencyStore>,
}

#[async_trait]
impl TestBackend for Backend {
    fn name(&self) -> String {
        self.name.clone()
    }

    async fn client(&self, guarantee: Guarantee) -> Result<Arc<dyn DeliveryClient>> {
        let mut config = self.config.clone().with_guarantee(guarantee);
        if guarantee == Guarantee::ExactlyOnce && config.idempotency.is_none() {
            config.idempotency = Some(Default::default());
        }
        match courier::connect(&config).await {
            Ok(c) => Ok(Arc::from(c)),
            Err(e) if e.kind() == "broker" || e.kind() == "timeout" => {
                unreachable(&self.name, &self.name, e)
            }
            Err(e) => Err(e),
        }
    }

    fn idempotency_store(&self) -> Arc<dyn IdempotencyStore> {
        self.store.clone()
    }
}

fn memory_with_duplicates() -> Config {
    Config {
        backend: BackendConfig::Memory(MemoryConfig {
            broker: unique("eo"),
            faults: MemoryFaults {
                duplicate_delivery: 0.2,
                duplicate_on_publish: 0.1,
                crash_before_settle: 0.05,
                ..MemoryFaults::default()
            },
            ..MemoryConfig::default()
        }),
        ..Config::default()
    }
}

fn url(u: &str) -> Config {
    Config::from_url(u).unwrap()
}

fn rabbitmq() -> Config {
    url(&endpoints::rabbitmq_url())
}

fn sqs() -> Config {
    url(&format!(
        "sqs://{}?endpoint={}",
        endpoints::aws_region(),
        endpoints::sqs_endpoint()
    ))
}

fn kafka() -> Config {
    url(&format!("kafka://{}", endpoints::kafka_bootstrap()))
}

async fn eo(name: &str, config: Config, store: Arc<dyn IdempotencyStore>) {
    let b = Backend {
        name: format!("{name} + {} store", store.name()),
        config,
        store,
    };
    if let Err(e) = scenarios::exactly_once_effects_with_idempotent_layer(&b).await {
        panic!("exactly-once effects failed on {}: {e}", b.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_with_injected_duplicates_redis_store() {
    eo(
        "memory (duplicates)",
        memory_with_duplicates(),
        redis_store().await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_with_injected_duplicates_postgres_store() {
    eo(
        "memory (duplicates)",
        memory_with_duplicates(),
        Arc::new(pg_store().await),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_postgres_store() {
    eo("rabbitmq", rabbitmq(), Arc::new(pg_store().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_redis_store() {
    eo("rabbitmq", rabbitmq(), redis_store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_redis_store() {
    eo("sqs", sqs(), redis_store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_redis_store() {
    eo("kafka", kafka(), redis_store().await).await;
}

/// Records each handled id.
struct Record(Arc<Ledger>);

#[async_trait]
impl Handler for Record {
    async fn handle(
        &self,
        m: &Message,
        _cx: &mut Context,
    ) -> std::result::Result<(), HandlerError> {
        self.0.handled(m.id.as_str());
        Ok(())
    }
}

/// A worker died holding the lease of a message (it began, then never extended, completed or
/// released). The redelivered message is deferred while the lease lives, then processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_workers_lease_expires_then_another_worker_processes_once() {
    let store = redis_store().await;
    let client: Arc<dyn DeliveryClient> = Arc::from(courier::connect(&rabbitmq()).await.unwrap());
    let dest = unique("lease");
    let group = unique("g");
    client.create_destination(&dest).await.unwrap();
    let ledger = Arc::new(Ledger::new());
    let layer = Idempotent::new(Record(ledger.clone()), store.clone())
        .namespace(group.clone())
        .lease(Duration::from_secs(10));
    let stats = layer.stats();
    let msg = Message::new("charge 42");
    // The dead worker's claim, with a 2 s lease.
    let key = format!("{group}:{}", msg.id);
    let fp = courier::idempotency::fingerprint(&msg);
    assert!(matches!(
        store
            .begin(&key, &fp, Duration::from_secs(2))
            .await
            .unwrap(),
        Begin::Begun(_)
    ));
    let consumer = Consumer::new(client.clone(), Subscription::new(&dest, &group))
        .spawn(layer)
        .await
        .unwrap();
    ledger.sent(msg.id.as_str());
    client.publish(&dest, msg.clone()).await.unwrap();
    let (report, done) = ledger.wait_all_handled(Duration::from_secs(30)).await;
    assert!(done, "never processed after the lease expired: {report}");
    // Give a wrongly repeated delivery the chance to show up.
    let _ = ledger
        .wait_until(Duration::from_secs(1), |r| r.duplicates > 0)
        .await;
    consumer.shutdown().await.unwrap();
    let r = ledger.report();
    assert_eq!((r.lost, r.duplicates), (0, 0), "{r}");
    assert!(
        stats.in_progress_deferred.load(Ordering::Relaxed) >= 1,
        "the live lease must defer the delivery, not let it run"
    );
    assert!(matches!(
        store
            .begin(&key, &fp, Duration::from_secs(2))
            .await
            .unwrap(),
        Begin::Completed { .. }
    ));
}

// ---- PostgreSQL transactional mode under SIGKILL ---------------------------------------------

const TX_MESSAGES: usize = 300;

/// The business write: one row per handled message, in the layer's transaction. The table has
/// no unique constraint, so a repeated effect shows up as a second row.
struct RecordPayment {
    run: String,
}

#[async_trait]
impl TxHandler for RecordPayment {
    async fn handle(
        &self,
        m: &Message,
        tx: &mut Transaction<'static, Postgres>,
        _cx: &mut Context,
    ) -> std::result::Result<(), HandlerError> {
        sqlx::query("INSERT INTO courier_test_payments (run, message_id) VALUES ($1, $2)")
            .bind(&self.run)
            .bind(m.id.as_str())
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::retryable)?;
        Ok(())
    }
}

/// SIGKILLs its own process after the inner handler committed, before the consume loop acks.
struct KillAfterCommit<H> {
    inner: H,
    every: u64,
    seen: AtomicU64,
}

#[async_trait]
impl<H: Handler> Handler for KillAfterCommit<H> {
    async fn handle(&self, m: &Message, cx: &mut Context) -> std::result::Result<(), HandlerError> {
        self.inner.handle(m, cx).await?;
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if n % self.every == 0 {
            nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL)
                .unwrap();
        }
        Ok(())
    }

    fn is_idempotent(&self) -> bool {
        self.inner.is_idempotent()
    }
}

/// Worker process body (runs only when spawned by the test below).
#[test]
fn tx_worker_entry() {
    if worker_role().is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dest = std::env::var("DEST").unwrap();
        let group = std::env::var("GROUP").unwrap();
        let run = std::env::var("RUN").unwrap();
        let every: u64 = std::env::var("KILL_EVERY").unwrap().parse().unwrap();
        let store = pg_store().await;
        let client: Arc<dyn DeliveryClient> =
            Arc::from(courier::connect(&rabbitmq()).await.unwrap());
        let layer = TransactionalIdempotent::new(RecordPayment { run }, &store).namespace(&group);
        let handler = KillAfterCommit {
            inner: layer,
            every,
            seen: AtomicU64::new(0),
        };
        let consumer = Consumer::new(client, Subscription::new(&dest, &group))
            .concurrency(4)
            .retry(
                RetryPolicy::attempts(50)
                    .backoff(Duration::from_millis(20), Duration::from_millis(200)),
            )
            .spawn(handler)
            .await
            .unwrap();
        // Run until killed (by itself or by the test), or the test gives up on us.
        tokio::time::sleep(Duration::from_secs(120)).await;
        consumer.shutdown().await.unwrap();
    });
}

async fn payments(pool: &sqlx::PgPool, run: &str) -> (usize, usize) {
    let row = sqlx::query(
        "SELECT count(*) AS rows, count(DISTINCT message_id) AS ids FROM courier_test_payments WHERE run = $1",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .unwrap();
    (
        row.get::<i64, _>("rows") as usize,
        row.get::<i64, _>("ids") as usize,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_transactional_mode_survives_sigkill_between_commit_and_ack() {
    let store = pg_store().await;
    let pool = store.pool().clone();
    courier::idempotency::create_serialized(
        &pool,
        "courier_test_payments",
        "CREATE TABLE IF NOT EXISTS courier_test_payments (run TEXT NOT NULL, message_id TEXT NOT NULL)",
    )
    .await
    .unwrap();
    let run = unique("run");
    let dest = unique("payments");
    let group = unique("g");
    let client: Arc<dyn DeliveryClient> = Arc::from(courier::connect(&rabbitmq()).await.unwrap());
    client.create_destination(&dest).await.unwrap();
    // Declare the group's queue before publishing.
    drop(
        client
            .subscribe(Subscription::new(&dest, &group))
            .await
            .unwrap(),
    );
    for i in 0..TX_MESSAGES {
        client
            .publish(&dest, Message::new(format!("payment {i}")))
            .await
            .unwrap();
    }

    let envs = [
        ("DEST", dest.as_str()),
        ("GROUP", group.as_str()),
        ("RUN", run.as_str()),
        ("KILL_EVERY", "23"),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut kills = 0;
    loop {
        let (_, ids) = payments(&pool, &run).await;
        if ids >= TX_MESSAGES {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {ids}/{TX_MESSAGES} payments after {kills} kills"
        );
        let mut child = spawn_worker("tx_worker_entry", "consumer", &envs).unwrap();
        // Wait (bounded) for the worker to kill itself after a commit, or for the work to end.
        let started = tokio::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "worker ended without SIGKILL: {status}"
                );
                kills += 1;
                break;
            }
            let (_, ids) = payments(&pool, &run).await;
            if ids >= TX_MESSAGES || started.elapsed() > Duration::from_secs(60) {
                kill9(&mut child);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Drain, in this process, what the killed workers committed but never acknowledged: every
    // such redelivery must be absorbed, not applied again.
    let queue = format!("{dest}.{group}");
    assert!(wait_rabbitmq_no_consumers(&queue, Duration::from_secs(30)).await);
    let (left, _) = rabbitmq_queue_state(&queue).await;
    let layer =
        TransactionalIdempotent::new(RecordPayment { run: run.clone() }, &store).namespace(&group);
    let tx_stats = layer.stats();
    let drain = Consumer::new(client.clone(), Subscription::new(&dest, &group))
        .concurrency(4)
        .spawn(layer)
        .await
        .unwrap();
    let t = tokio::time::Instant::now();
    // Every delivery left is either handled or absorbed as a duplicate (counted apart).
    let settled = |s: courier::ConsumerStats| s.handled + s.duplicates_absorbed;
    while settled(drain.stats()) < u64::from(left) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "drain stalled: {:?}",
            drain.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drain.shutdown().await.unwrap();
    let absorbed = tx_stats.duplicates_absorbed.load(Ordering::Relaxed);
    println!("drained {left} redeliveries, {absorbed} absorbed as duplicates");
    // Every payment was committed before the drain, so every message left is a redelivery.
    assert_eq!(
        absorbed,
        u64::from(left),
        "a committed payment's redelivery was not absorbed"
    );

    let (rows, ids) = payments(&pool, &run).await;
    println!("transactional mode: {kills} SIGKILLs after commit, {rows} rows for {ids} ids");
    assert!(
        kills >= 3,
        "the test must actually kill workers (killed {kills})"
    );
    assert_eq!(ids, TX_MESSAGES, "lost payments");
    assert_eq!(
        rows, TX_MESSAGES,
        "duplicate effects: {rows} rows for {ids} messages"
    );
}
