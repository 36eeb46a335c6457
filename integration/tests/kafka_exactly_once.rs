//! Kafka exactly-once consume-transform-produce with an external effect, on the stack's Apache
//! Kafka and PostgreSQL: worker processes (concurrency 8, 64 keys) are SIGKILLed mid-stream, a
//! last one drains and stops; then a `read_committed` reader counts the outputs **per input**
//! and PostgreSQL counts the effects per input.
//!
//! - Through `courier::consumer` (the idempotent layer, PostgreSQL store): exactly one output
//!   per input, every effect at least once (an effect and its key are two writes: a kill between
//!   them repeats the effect, reported).
//! - Through the transactional mode (`TransactionalIdempotent`: the effect and the key in one
//!   PostgreSQL transaction): exactly one output **and** exactly one effect per input.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use courier::config::{IdempotencyConfig, KafkaConfig, SecretUrl};
use courier::idempotency::{PostgresStore, TransactionalIdempotent, TxHandler};
use courier::{
    async_trait, BackendConfig, Config, Consumer, Context, DeliveryClient, Guarantee, Handler,
    HandlerError, Message, Subscription,
};
use courier_testkit::endpoints::{database_url, kafka_bootstrap, unreachable};
use courier_testkit::process::{
    kill_workers_until, spawn_worker, trickle, until_terminated, worker_role,
};
use courier_testkit::{unique, FileLedger};
use sqlx::postgres::Postgres;
use sqlx::{Row, Transaction};

fn config(guarantee: Guarantee, transactional_id: Option<String>) -> Config {
    Config {
        guarantee,
        backend: BackendConfig::Kafka(KafkaConfig {
            bootstrap: kafka_bootstrap(),
            session_timeout: Duration::from_secs(6),
            max_poll_interval: Duration::from_secs(10),
            delivery_timeout: Duration::from_secs(30),
            transactional_id,
            ..KafkaConfig::default()
        }),
        consumer: Default::default(),
        idempotency: (guarantee == Guarantee::ExactlyOnce).then(|| IdempotencyConfig {
            store: SecretUrl::new(database_url()),
            // A killed worker's key is free again after 5 s.
            lease: Some(Duration::from_secs(5)),
            ..IdempotencyConfig::default()
        }),
    }
}

async fn pool() -> sqlx::PgPool {
    let url = database_url();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .connect(&url)
        .await
        .unwrap_or_else(|e| unreachable("PostgreSQL", &url, e));
    courier::idempotency::create_serialized(
        &pool,
        "courier_test_effects",
        "CREATE TABLE IF NOT EXISTS courier_test_effects (run TEXT NOT NULL, input TEXT NOT NULL)",
    )
    .await
    .unwrap();
    pool
}

/// Each run's effects: one row per handler run that committed.
async fn effects(pool: &sqlx::PgPool, run: &str) -> HashMap<String, usize> {
    sqlx::query(
        "SELECT input, count(*) AS n FROM courier_test_effects WHERE run = $1 GROUP BY input",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get::<String, _>("input"), r.get::<i64, _>("n") as usize))
    .collect()
}

/// The effect of handling `m`: a row in PostgreSQL (a few ms of work first, so the lanes
/// finish out of order).
async fn effect<'e>(
    db: impl sqlx::PgExecutor<'e>,
    run: &str,
    m: &Message,
) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..5))).await;
    sqlx::query("INSERT INTO courier_test_effects (run, input) VALUES ($1, $2)")
        .bind(run)
        .bind(m.id.as_str())
        .execute(db)
        .await
        .map_err(HandlerError::retryable)?;
    Ok(())
}

/// The output of `m`: its id as payload, with an id derived from the input's.
fn stage(cx: &mut Context, output: &str, m: &Message) {
    cx.publish(
        output.to_owned(),
        Message::new(m.id.to_string()).with_id(cx.derive_id("out")),
    );
}

/// The transactional mode's handler: the effect row in the layer's transaction, the output
/// staged.
struct TxWork {
    run: String,
    output: String,
}

#[async_trait]
impl TxHandler for TxWork {
    async fn handle(
        &self,
        m: &Message,
        tx: &mut Transaction<'static, Postgres>,
        cx: &mut Context,
    ) -> Result<(), HandlerError> {
        effect(&mut **tx, &self.run, m).await?;
        stage(cx, &self.output, m);
        Ok(())
    }
}

/// Records each handler run in the ledger (the test's progress signal), then runs `inner`.
struct Progress<H> {
    ledger: FileLedger,
    inner: H,
}

#[async_trait]
impl<H: Handler> Handler for Progress<H> {
    async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        self.inner.handle(m, cx).await?;
        self.ledger
            .handled(m.id.as_str())
            .map_err(HandlerError::retryable)?;
        Ok(())
    }

    fn is_idempotent(&self) -> bool {
        self.inner.is_idempotent()
    }

    async fn prepare(&self, messages: &[&Message]) {
        self.inner.prepare(messages).await;
    }

    async fn abandon(&self, messages: &[&Message]) {
        self.inner.abandon(messages).await;
    }
}

/// Worker process body (runs only when spawned by a test below).
#[test]
fn eo_worker_entry() {
    if worker_role().is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let env = |k: &str| std::env::var(k).unwrap();
        let (topic, output, run, mode) = (env("TOPIC"), env("OUTPUT"), env("RUN"), env("MODE"));
        let ledger = FileLedger::new(env("LEDGER"));
        // One transactional id per worker slot, stable across restarts: the new worker fences
        // the killed one and aborts its open transaction.
        let config = config(Guarantee::ExactlyOnce, Some(format!("courier-eo-{topic}")));
        let client: Arc<dyn DeliveryClient> = Arc::from(courier::connect(&config).await.unwrap());
        let pool = pool().await;
        let sub = Subscription::new(&topic, "g");
        let consumer = if mode == "transactional" {
            let store = PostgresStore::connect(&database_url()).await.unwrap();
            store.migrate().await.unwrap();
            let layer = TransactionalIdempotent::new(TxWork { run, output }, &store).namespace("g");
            Consumer::new(client, sub)
                .concurrency(8)
                .spawn(Progress {
                    ledger,
                    inner: layer,
                })
                .await
                .unwrap()
        } else {
            // The documented way: courier::consumer puts the idempotent layer (PostgreSQL store)
            // around the handler; the effect is a row written by the handler itself.
            let mut config = config.clone();
            config.consumer.concurrency = 8;
            let handler = layer_work(run, output, pool);
            courier::consumer(
                &config,
                client,
                sub,
                Progress {
                    ledger,
                    inner: handler,
                },
            )
            .await
            .unwrap()
        };
        until_terminated(Duration::from_secs(240)).await;
        consumer.shutdown().await.unwrap();
    });
}

/// The layer mode's handler: the effect row (its own write), the output staged.
fn layer_work(run: String, output: String, pool: sqlx::PgPool) -> impl Handler {
    struct Work {
        run: String,
        output: String,
        pool: sqlx::PgPool,
    }
    #[async_trait]
    impl Handler for Work {
        async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
            effect(&self.pool, &self.run, m).await?;
            stage(cx, &self.output, m);
            Ok(())
        }
    }
    Work { run, output, pool }
}

/// One SIGKILL test at a time: they share the broker and both cores.
static KILL_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Counts {
    inputs: usize,
    kills: usize,
    outputs: HashMap<String, usize>,
    effects: HashMap<String, usize>,
    ids: Vec<String>,
}

impl Counts {
    fn missing(map: &HashMap<String, usize>, ids: &[String]) -> usize {
        ids.iter().filter(|id| !map.contains_key(*id)).count()
    }

    fn repeated(map: &HashMap<String, usize>) -> usize {
        map.values().filter(|n| **n > 1).count()
    }
}

async fn kill_workers(mode: &str) -> Counts {
    let _serial = KILL_TESTS.lock().await;
    const N: usize = 2_000;
    let inputs: Arc<dyn DeliveryClient> = Arc::from(
        courier::connect(&config(Guarantee::AtLeastOnce, None))
            .await
            .unwrap_or_else(|e| unreachable("Kafka", &kafka_bootstrap(), e)),
    );
    let pool = pool().await;
    let topic = unique("eo-in");
    let output = unique("eo-out");
    inputs.create_destination(&topic).await.unwrap();
    inputs.create_destination(&output).await.unwrap();
    let run = unique("run");
    let dir = std::env::temp_dir().join(unique("courier-kafka-eo"));
    std::fs::create_dir_all(&dir).unwrap();
    let ledger = FileLedger::new(dir.join("ledger"));
    let msgs: Vec<Message> = (0..N)
        .map(|i| Message::new(format!("m{i}")).with_key(format!("k{}", i % 64)))
        .collect();
    let ids: Vec<String> = msgs.iter().map(|m| m.id.to_string()).collect();
    // Published for about 30 s, without transactions (see `wait_group_caught_up`), while
    // workers come and go.
    let publisher = trickle(
        inputs.clone(),
        topic.clone(),
        msgs.clone(),
        30,
        ledger.clone(),
    );
    let envs = [
        ("TOPIC", topic.as_str()),
        ("OUTPUT", output.as_str()),
        ("RUN", run.as_str()),
        ("MODE", mode),
        ("LEDGER", ledger.path().to_str().unwrap()),
    ];
    let kills = kill_workers_until(
        "eo_worker_entry",
        &envs,
        &ledger,
        3,
        Duration::from_secs(300),
        || publisher.is_finished(),
    )
    .await;
    let mut last = spawn_worker("eo_worker_entry", "consumer", &envs).unwrap();
    let outputs = tokio::task::spawn_blocking({
        let (topic, output) = (topic.clone(), output.clone());
        move || {
            courier_testkit::kafka_log::drain_and_count(
                &kafka_bootstrap(),
                &topic,
                "g",
                &output,
                &mut last,
            )
        }
    })
    .await
    .unwrap();
    let effects = effects(&pool, &run).await;
    let _ = std::fs::remove_dir_all(&dir);
    let c = Counts {
        inputs: N,
        kills,
        outputs,
        effects,
        ids,
    };
    println!(
        "kafka exactly-once ({mode}), {} SIGKILLs, {} inputs: outputs {} missing / {} repeated; effects {} missing / {} repeated",
        c.kills,
        c.inputs,
        Counts::missing(&c.outputs, &c.ids),
        Counts::repeated(&c.outputs),
        Counts::missing(&c.effects, &c.ids),
        Counts::repeated(&c.effects),
    );
    c
}

/// Outputs: exactly one per input. Effects: none missing; exactly one each when `exact`,
/// otherwise at most one repeat per kill and lane (an effect and its key are two writes: a kill
/// between them repeats the effect).
fn check(c: &Counts, exact: bool) {
    assert!(c.kills >= 3);
    assert_eq!(
        Counts::missing(&c.outputs, &c.ids),
        0,
        "inputs without an output"
    );
    assert_eq!(
        Counts::repeated(&c.outputs),
        0,
        "inputs with more than one output"
    );
    assert_eq!(
        Counts::missing(&c.effects, &c.ids),
        0,
        "inputs without an effect"
    );
    let repeated = Counts::repeated(&c.effects);
    let allowed = if exact { 0 } else { c.kills * 8 };
    assert!(
        repeated <= allowed,
        "{repeated} inputs with a repeated effect after {} kills",
        c.kills
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_courier_consumer_every_input_has_exactly_one_output_and_its_effect() {
    check(&kill_workers("layer").await, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactional_mode_gives_every_input_exactly_one_output_and_one_effect() {
    check(&kill_workers("transactional").await, true);
}
