//! The transactional outbox: rollback publishes nothing and commit publishes once on every
//! backend (id, key, headers, payload kept); two relays over 10,000 rows publish each row once
//! in per-key order; a relay SIGKILLed between publish and mark loses nothing, and the
//! idempotent consumer absorbs the duplicates it causes.
//!
//! Each test uses its own PostgreSQL schema (search_path), so relays never see other tests' rows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier::idempotency::{Idempotent, MemoryStore};
use courier::outbox::{self, enqueue, Relay};
use courier::{
    async_trait, Config, Consumer, Context, DeliveryClient, Guarantee, Handler, HandlerError,
    Message, Receipt, Result, Subscription,
};
use courier_testkit::endpoints::{self, database_url, unreachable};
use courier_testkit::process::{kill9, spawn_worker, worker_role};
use courier_testkit::{unique, Ledger};
use parking_lot::Mutex;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// A pool whose connections use `schema` (created if missing) as their search_path.
async fn pool_in(schema: &str) -> PgPool {
    let url = database_url();
    let admin = PgPool::connect(&url)
        .await
        .unwrap_or_else(|e| unreachable("PostgreSQL", &url, e));
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let opts: PgConnectOptions = url.parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(opts.options([("search_path", schema)]))
        .await
        .unwrap();
    outbox::migrate(&pool).await.unwrap();
    pool
}

fn fresh_schema() -> String {
    unique("ob").replace('-', "_").to_lowercase()
}

fn rabbitmq() -> Config {
    Config::from_url(&endpoints::rabbitmq_url()).unwrap()
}

async fn client(config: &Config) -> Arc<dyn DeliveryClient> {
    match courier::connect(config).await {
        Ok(c) => Arc::from(c),
        Err(e) => unreachable(config.backend.kind(), config.backend.kind(), e),
    }
}

/// Keeps every delivered message.
#[derive(Default)]
struct Collect(Mutex<Vec<Message>>);

#[async_trait]
impl Handler for Collect {
    async fn handle(
        &self,
        m: &Message,
        _cx: &mut Context,
    ) -> std::result::Result<(), HandlerError> {
        self.0.lock().push(m.clone());
        Ok(())
    }
}

async fn rollback_and_commit(name: &str, config: Config) {
    let schema = fresh_schema();
    let pool = pool_in(&schema).await;
    let client = client(&config).await;
    let dest = if name == "sqs-fifo" {
        format!("{}.fifo", unique("ob"))
    } else {
        unique("ob")
    };
    client.create_destination(&dest).await.unwrap();
    let got = Arc::new(Collect::default());
    let consumer = Consumer::new(client.clone(), Subscription::new(&dest, "g"))
        .spawn(got.clone())
        .await
        .unwrap();

    let rolled_back = Message::new("never").with_key("k1");
    let mut tx = pool.begin().await.unwrap();
    enqueue(&mut tx, &dest, rolled_back.clone()).await.unwrap();
    tx.rollback().await.unwrap();

    let committed = Message::new("order 42 placed")
        .with_key("k1")
        .with_header("tenant", "acme");
    let mut tx = pool.begin().await.unwrap();
    let id = enqueue(&mut tx, &dest, committed.clone()).await.unwrap();
    assert_eq!(id, committed.id, "the outbox row id is the message id");
    tx.commit().await.unwrap();

    let relay = Relay::new(pool.clone(), client.clone());
    let round = relay.run_once().await.unwrap();
    assert_eq!(round.published, 1, "{name}: {round:?}");
    assert_eq!(
        relay.run_once().await.unwrap().published,
        0,
        "{name}: published twice"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.0.lock().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: committed message never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = outbox::status(&pool).await.unwrap();
    assert_eq!(
        (status.backlog, status.published),
        (0, 1),
        "{name}: {status}"
    );
    consumer.shutdown().await.unwrap();
    let got = got.0.lock().clone();
    assert_eq!(got.len(), 1, "{name}: {got:?}");
    let m = &got[0];
    assert_eq!(m.id, committed.id, "{name}: id not preserved");
    assert_eq!(m.key, committed.key, "{name}: key not preserved");
    assert_eq!(m.payload, committed.payload, "{name}");
    assert_eq!(
        m.headers.get("tenant").map(String::as_str),
        Some("acme"),
        "{name}: {:?}",
        m.headers
    );
    assert!(
        got.iter().all(|m| m.id != rolled_back.id),
        "{name}: a rolled-back message was published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_publishes_nothing_commit_publishes_once_memory() {
    rollback_and_commit(
        "memory",
        Config::from_url("memory://outbox?auto_create=true").unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_publishes_nothing_commit_publishes_once_rabbitmq() {
    rollback_and_commit("rabbitmq", rabbitmq()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_publishes_nothing_commit_publishes_once_sqs() {
    let url = format!(
        "sqs://{}?endpoint={}",
        endpoints::aws_region(),
        endpoints::sqs_endpoint()
    );
    rollback_and_commit("sqs", Config::from_url(&url).unwrap()).await;
    rollback_and_commit("sqs-fifo", Config::from_url(&url).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_publishes_nothing_commit_publishes_once_kafka() {
    let url = format!("kafka://{}", endpoints::kafka_bootstrap());
    rollback_and_commit("kafka", Config::from_url(&url).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_typed_and_writes_nothing() {
    let pool = pool_in(&fresh_schema()).await;
    let mut tx = pool.begin().await.unwrap();
    let e = enqueue(&mut tx, "", Message::new("x")).await.unwrap_err();
    assert_eq!(e.kind(), "config", "{e}");
    let big = Message::new(vec![0u8; outbox::MAX_PAYLOAD + 1]);
    let e = enqueue(&mut tx, "d", big).await.unwrap_err();
    assert_eq!(e.kind(), "payload_too_large", "{e}");
    // The same id again: identical is accepted once, different is a conflict.
    let m = Message::new("a");
    enqueue(&mut tx, "d", m.clone()).await.unwrap();
    enqueue(&mut tx, "d", m.clone()).await.unwrap();
    let e = enqueue(&mut tx, "d", Message::new("b").with_id(m.id.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "idempotency_conflict", "{e}");
    tx.commit().await.unwrap();
    assert_eq!(outbox::status(&pool).await.unwrap().backlog, 1);
}

/// Records deliveries per key in arrival order.
#[derive(Default)]
struct Ordered {
    seen: Mutex<HashMap<String, Vec<u64>>>,
    ids: Mutex<HashMap<String, u32>>,
    total: AtomicU64,
}

#[async_trait]
impl Handler for Ordered {
    async fn handle(
        &self,
        m: &Message,
        _cx: &mut Context,
    ) -> std::result::Result<(), HandlerError> {
        let n: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        self.seen
            .lock()
            .entry(m.key.clone().unwrap())
            .or_default()
            .push(n);
        *self.ids.lock().entry(m.id.to_string()).or_default() += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

async fn fill(pool: &PgPool, dest: &str, rows: usize, keys: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(rows);
    for chunk in 0..rows.div_ceil(100) {
        let mut tx = pool.begin().await.unwrap();
        for i in chunk * 100..((chunk + 1) * 100).min(rows) {
            let m = Message::new(i.to_string()).with_key(format!("key-{}", i % keys));
            ids.push(enqueue(&mut tx, dest, m).await.unwrap().to_string());
        }
        tx.commit().await.unwrap();
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_publish_10000_rows_once_in_key_order() {
    const ROWS: usize = 10_000;
    let pool = pool_in(&fresh_schema()).await;
    let consumer_client = client(&rabbitmq()).await;
    let dest = unique("ob2");
    consumer_client.create_destination(&dest).await.unwrap();
    let seen = Arc::new(Ordered::default());
    let consumer = Consumer::new(consumer_client.clone(), Subscription::new(&dest, "g"))
        .concurrency(8)
        .spawn(seen.clone())
        .await
        .unwrap();
    let ids = fill(&pool, &dest, ROWS, 50).await;

    let mut relays = Vec::new();
    for _ in 0..2 {
        let c = client(&rabbitmq()).await;
        relays.push(
            Relay::new(pool.clone(), c)
                .batch_size(200)
                .spawn()
                .await
                .unwrap(),
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while seen.ids.lock().len() < ROWS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {ROWS} rows arrived",
            seen.ids.lock().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut per_relay = Vec::new();
    for r in relays {
        per_relay.push(
            r.shutdown()
                .await
                .unwrap()
                .published
                .load(Ordering::Relaxed),
        );
    }
    consumer.shutdown().await.unwrap();
    println!("two relays published {per_relay:?}");
    assert_eq!(
        per_relay.iter().sum::<u64>(),
        ROWS as u64,
        "rows published (marked)"
    );
    assert!(
        per_relay.iter().all(|&n| n > 0),
        "both relays must work: {per_relay:?}"
    );
    let counts = seen.ids.lock().clone();
    assert!(
        ids.iter().all(|id| counts.get(id) == Some(&1)),
        "a row was lost or published twice"
    );
    assert_eq!(seen.total.load(Ordering::Relaxed), ROWS as u64);
    for (key, order) in seen.seen.lock().iter() {
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "order broken for {key}: {order:?}"
        );
    }
    let status = outbox::status(&pool).await.unwrap();
    assert_eq!(status.backlog, 0, "{status}");
}

// ---- relay SIGKILLed between publish and mark -----------------------------------------------

/// A client that SIGKILLs its process right after a batch was published (before the relay
/// marks it), every `every` batches.
struct KillAfterPublish {
    inner: Arc<dyn DeliveryClient>,
    every: u64,
    batches: AtomicU64,
}

#[async_trait]
impl DeliveryClient for KillAfterPublish {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn guarantee(&self) -> Guarantee {
        self.inner.guarantee()
    }
    fn capabilities(&self) -> courier::Capabilities {
        self.inner.capabilities()
    }
    fn explain(&self) -> courier::Explanation {
        self.inner.explain()
    }
    async fn create_destination(&self, d: &str) -> Result<()> {
        self.inner.create_destination(d).await
    }
    async fn publish(&self, d: &str, m: Message) -> Result<Receipt> {
        self.inner.publish(d, m).await
    }
    async fn publish_batch(&self, d: &str, ms: Vec<Message>) -> Result<Vec<Receipt>> {
        let r = self.inner.publish_batch(d, ms).await?;
        if (self.batches.fetch_add(1, Ordering::Relaxed) + 1) % self.every == 0 {
            nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL)
                .unwrap();
        }
        Ok(r)
    }
    async fn subscribe(&self, s: Subscription) -> Result<courier::Deliveries> {
        self.inner.subscribe(s).await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[test]
fn relay_worker_entry() {
    if worker_role().is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let schema = std::env::var("SCHEMA").unwrap();
        let every: u64 = std::env::var("KILL_EVERY").unwrap().parse().unwrap();
        let pool = pool_in(&schema).await;
        let inner = client(&rabbitmq()).await;
        let c = Arc::new(KillAfterPublish {
            inner,
            every,
            batches: AtomicU64::new(0),
        });
        let relay = Relay::new(pool, c).batch_size(50).spawn().await.unwrap();
        tokio::time::sleep(Duration::from_secs(120)).await;
        relay.shutdown().await.unwrap();
    });
}

/// Counts effects: the handler behind the idempotent layer.
struct Effects(Arc<Ledger>);

#[async_trait]
impl Handler for Effects {
    async fn handle(
        &self,
        m: &Message,
        _cx: &mut Context,
    ) -> std::result::Result<(), HandlerError> {
        self.0.handled(m.id.as_str());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_sigkilled_between_publish_and_mark_loses_nothing_duplicates_absorbed() {
    const ROWS: usize = 2_000;
    let schema = fresh_schema();
    let pool = pool_in(&schema).await;
    let consumer_client = client(&rabbitmq()).await;
    let dest = unique("obk");
    consumer_client.create_destination(&dest).await.unwrap();
    let ledger = Arc::new(Ledger::new());
    let layer =
        Idempotent::new(Effects(ledger.clone()), Arc::new(MemoryStore::default())).namespace("g");
    let absorbed = layer.stats();
    let consumer = Consumer::new(consumer_client.clone(), Subscription::new(&dest, "g"))
        .concurrency(8)
        .spawn(layer)
        .await
        .unwrap();
    for id in fill(&pool, &dest, ROWS, 20).await {
        ledger.sent(id);
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut kills = 0;
    while outbox::status(&pool).await.unwrap().backlog > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relays never drained the outbox ({kills} kills)"
        );
        let mut child = spawn_worker(
            "relay_worker_entry",
            "relay",
            &[("SCHEMA", schema.as_str()), ("KILL_EVERY", "7")],
        )
        .unwrap();
        let started = tokio::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "relay ended without SIGKILL: {status}"
                );
                kills += 1;
                break;
            }
            if outbox::status(&pool).await.unwrap().backlog == 0
                || started.elapsed() > Duration::from_secs(60)
            {
                kill9(&mut child);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (report, done) = ledger.wait_all_handled(Duration::from_secs(60)).await;
    consumer.shutdown().await.unwrap();
    let r = ledger.report();
    let dups = absorbed.duplicates_absorbed.load(Ordering::Relaxed);
    println!("relay SIGKILL: {kills} kills, {r}, duplicates absorbed {dups}");
    assert!(kills >= 3, "the test must actually kill relays ({kills})");
    assert!(done && r.lost == 0, "lost: {report}");
    assert_eq!(r.duplicates, 0, "duplicate effects: {r}");
    assert!(
        dups > 0,
        "killing between publish and mark must cause redelivered copies"
    );
}
