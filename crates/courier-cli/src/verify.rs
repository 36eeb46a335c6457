//! `courier verify`: run a real experiment against the configured broker under injected faults
//! and check the guarantee with a delivery ledger.
//!
//! The ledger runs in this process, the producer and the consumers in child processes (`courier
//! verify-producer`, `courier verify-worker`; or as tasks here, [`Workers::Tasks`], and always
//! for the memory broker); the ledger counts what was sent and every handler effect, so loss
//! and duplicate *effects* are measured, not assumed. Faults:
//!
//! - `kill=N` — N consumer crashes in the middle of a handler (the consumer process is killed
//!   with `SIGKILL`, or its task aborted, without settling anything; a fresh one takes its place);
//! - `errors=P` — each handler run fails (retryably) with probability P;
//! - `duplicates=P` — the producer publishes a fraction P of messages a second time with the same
//!   id (a producer retry after a lost confirm);
//! - `store-outage=DURATION` — the idempotency store is unreachable for DURATION mid-run (with
//!   the PostgreSQL transactional mode: every database connection of the run is terminated, over
//!   and over, for DURATION — transactions die mid-way, commits included);
//! - `restart` — the broker is restarted mid-run (RabbitMQ via `rabbitmqctl stop_app/start_app`);
//! - `cut=N` — N connection cuts: the client reaches the broker through a TCP fault proxy
//!   ([`crate::proxy::FaultProxy`]) that drops every open connection, publishing and consuming
//!   side at once (RabbitMQ `amqp://` and SQS over an `http://` endpoint such as LocalStack;
//!   Kafka clients follow the broker addresses the cluster advertises, past any single-address
//!   proxy).
//!
//! Kills and cuts land at evenly spaced marks of progress, kills first: with `kill=K,cut=C` the
//! i-th fault waits until i/(K+C+1) of the messages reached a handler (kills; half that under
//! at-most-once, where each crash loses what its consumer held) or had their effect (cuts,
//! which also wait for the kills to land), or less when the mark is out of reach
//! (a lossy at-most-once run): a cut waits at most half the stall window, a kill until effects
//! have stopped coming for that long. A kill that found no handler in flight, or a
//! cut that dropped no connection, did not inject its fault: the run reports that as a
//! violation, since it proves nothing about that fault.
//!
//! Exactly-once runs through the idempotent layer. When `[idempotency] store` is a PostgreSQL URL
//! it runs in the transactional mode ([`TransactionalIdempotent`]): each effect is a row the
//! handler inserts in the transaction that also records the key, and the ledger counts those
//! rows — the way a payments handler gets exactly-once effects. With the in-process or Redis
//! store the effect is recorded in memory before the key is completed, so a crash in between
//! repeats it (the limit of any store outside the effect's transaction; docs/proving.md).
//!
//! Exit status is non-zero when the guarantee was violated.

mod cleanup;
mod faults;
mod ledger;
mod report;
mod schedule;
mod work;
mod workers;

use faults::*;
pub use faults::{Faults, Sabotage};
use ledger::*;
use report::Outcome;
pub use report::Report;
use schedule::*;
use work::*;

pub use workers::{producer, worker};

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use tokio_util::sync::CancellationToken;

use courier::config::StoreFailurePolicy;
use courier::idempotency::{
    Begin, IdempotencyStore, LeaseToken, PostgresStore, TransactionalIdempotent, TxHandler,
};
use courier::{
    Config, ConsumerBuilder, ConsumerHandle, Context, DeliveryClient, Guarantee, Handler,
    HandlerError, Message, RetryPolicy, Subscription,
};

const SENT_AT: &str = "courier-verify-sent-at";
/// The effects table of the PostgreSQL transactional mode (rows of a run are deleted after it).
const EFFECTS_TABLE: &str = "courier_verify_effects";

/// Options of one experiment.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Messages to publish.
    pub messages: usize,
    /// Concurrent consumers.
    pub consumers: usize,
    /// Faults.
    pub faults: Faults,
    /// Deliberate mistake.
    pub sabotage: Option<Sabotage>,
    /// Upper bound on the run.
    pub timeout: Duration,
    /// Show a progress bar.
    pub progress: bool,
    /// Run on these existing, empty destinations (`NAME` and its dead-letter `NAME-dlq`) instead
    /// of creating fresh ones — for brokers where courier may not create topics or queues.
    pub destination: Option<String>,
    /// Where the producer and the consumers run. The memory backend's always run in the verify
    /// process (the broker lives there).
    pub workers: Workers,
    /// Leave the run's destinations and consumer group on the broker (by default they are
    /// removed after the run; never those of [`Plan::destination`]).
    pub keep: bool,
}

/// Where `verify` runs its producer and consumers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workers {
    /// Tasks of the verify process; a crash aborts the consumer's task (nothing it held is
    /// settled, its connection stays up). The producer is a task too.
    Tasks,
    /// Child processes of this executable (`EXE verify-worker`, and `EXE verify-producer` for
    /// the producer), each with its own broker connection; a crash is `SIGKILL` of the consumer
    /// process while a handler is mid-way.
    Processes(PathBuf),
}

/// A consumer of the run.
enum Running {
    Task {
        handle: ConsumerHandle,
        id: u64,
        slot: usize,
    },
    Proc(workers::Proc),
}

impl Running {
    fn id(&self) -> u64 {
        match self {
            Running::Task { id, .. } => *id,
            Running::Proc(p) => p.id,
        }
    }

    /// Its place in the fleet: a replacement takes the crashed consumer's slot (and, on Kafka,
    /// its transactional id).
    fn slot(&self) -> usize {
        match self {
            Running::Task { slot, .. } => *slot,
            Running::Proc(p) => p.slot,
        }
    }

    /// Crash it mid-handler: abort the task, or `SIGKILL` the process.
    async fn crash(self) {
        match self {
            Running::Task { handle, .. } => handle.abort(),
            Running::Proc(p) => p.kill().await,
        }
    }

    /// Stop it gracefully; how many messages it dead-lettered.
    async fn shutdown(self) -> Result<u64> {
        Ok(match self {
            Running::Task { handle, .. } => handle.shutdown().await?.dead_lettered,
            Running::Proc(p) => p.shutdown(Duration::from_secs(30)).await?,
        })
    }
}

/// The experiment's publishing, in the producer process or a task of the verify process:
/// `messages` messages over 64 keys, a share `duplicates` of them published a second time with
/// the same id (a producer retry after a lost confirm). `sent` sees the id of each message whose
/// first publish succeeded; returns how many did.
async fn publish_all(
    client: &dyn DeliveryClient,
    dest: &str,
    messages: u64,
    duplicates: f64,
    mut sent: impl FnMut(&str),
) -> u64 {
    let mut published = 0u64;
    for i in 0..messages {
        let m = Message::new(format!("verify #{i}"))
            .with_key(format!("k{}", i % 64))
            .with_header(SENT_AT, now_micros().to_string());
        if client.publish(dest, m.clone()).await.is_ok() {
            sent(&m.id.to_string());
            published += 1;
            if duplicates > 0.0 && fastrand::f64() < duplicates {
                let _ = client.publish(dest, m).await;
            }
        }
    }
    published
}

/// The experiment's consumer: the consume loop tuned for a short run (in the verify process and
/// in consumer processes alike), over the stack `config` asks for — `layer` says which
/// idempotent layer the run uses instead of the configuration's.
fn consumer_for(
    config: &Config,
    client: Arc<dyn DeliveryClient>,
    dest: &str,
    group: &str,
    dlq: &str,
    layer: Option<(Arc<dyn IdempotencyStore>, Duration)>,
) -> ConsumerBuilder {
    let builder = ConsumerBuilder::new(
        config,
        client,
        Subscription::new(dest, group).dead_letter(dlq),
    )
    .consumer(|c| {
        c.concurrency(4)
            .retry(
                RetryPolicy::attempts(8)
                    .backoff(Duration::from_millis(10), Duration::from_millis(500)),
            )
            .shutdown_timeout(Duration::from_secs(10))
    });
    match layer {
        // The idempotent layer over a store outside the effect's transaction (Redis,
        // in-process): keys per destination, a short store retry.
        Some((store, lease)) => builder
            .idempotency_store(store)
            .namespace(dest)
            .lease(lease)
            .store_retry_delay(Duration::from_millis(200)),
        None => builder.without_idempotency(),
    }
}

/// A consumer process's start (`courier verify-worker`, [`workers::worker`]): its client, its
/// consumer with the layer `spec` names, and the layer's counters.
#[allow(clippy::type_complexity)]
async fn start_worker(
    spec: &workers::WorkerSpec,
    pipe: Arc<workers::Pipe>,
    store_down: Arc<AtomicBool>,
) -> Result<(
    ConsumerHandle,
    Option<Arc<courier::idempotency::IdempotencyStats>>,
    Arc<dyn DeliveryClient>,
)> {
    let mut config = Config::from_toml_str(&spec.config)?;
    // One identity per fleet slot, kept by the slot's replacement: on Kafka a restarted worker
    // fences its SIGKILLed predecessor and aborts its open transaction at once, as a pod with a
    // stable name does (instead of read_committed readers waiting for the transaction timeout).
    config
        .backend
        .set_instance(&format!("verify-{}-{}", spec.run, spec.slot));
    let client: Arc<dyn DeliveryClient> = courier::connect(&config).await?.into();
    let work = Work {
        sink: Sink::Pipe(pipe),
        error_rate: spec.error_rate,
        consumer: spec.consumer,
        run: spec.run.clone(),
    };
    let consumer = |layer| {
        consumer_for(
            &config,
            client.clone(),
            &spec.dest,
            &spec.group,
            &spec.dlq,
            layer,
        )
    };
    let section = config.idempotency.clone().unwrap_or_default();
    let (handle, stats) = match spec.layer {
        workers::Layer::None => (consumer(None).spawn(work).await?, None),
        workers::Layer::Store { lease_ms } => {
            let store = Arc::new(Flaky {
                inner: courier::idempotency_store(&section).await?,
                down: store_down,
            });
            consumer(Some((store, Duration::from_millis(lease_ms))))
                .spawn_counted(work)
                .await?
        }
        workers::Layer::Transactional => {
            let store = PostgresStore::from_pool(
                PgLedger::store_pool(section.store.expose(), &spec.run, 8).await?,
            );
            let layer = TransactionalIdempotent::new(work, &store).namespace(spec.dest.clone());
            let stats = layer.stats();
            (consumer(None).spawn(layer).await?, Some(stats))
        }
    };
    Ok((handle, stats, client))
}

/// Run the experiment described by `config` and `plan`.
pub async fn run(config: &Config, plan: &Plan) -> Result<Report> {
    let started = Instant::now();
    let g = config.guarantee;
    // With cuts, every connection of the run goes through the fault proxy.
    let (proxied, proxy) = if plan.faults.cut > 0 {
        let (c, p) = through_proxy(config).await?;
        (c, Some(Arc::new(p)))
    } else {
        (config.clone(), None)
    };
    // The broker itself, not through the proxy (for the cleanup).
    let direct = config;
    let config = &proxied;
    let client: Arc<dyn DeliveryClient> = courier::connect(config).await?.into();
    let suffix = uuid_suffix();
    let (dest, dlq) = match &plan.destination {
        Some(name) => (name.clone(), format!("{name}-dlq")),
        None => (format!("verify-{suffix}"), format!("verify-{suffix}-dlq")),
    };
    // A group of its own: joining a group other runs' (possibly crashed) members are still in
    // would make every start wait out their session timeouts.
    let group = format!("verify-{suffix}");
    tracing::info!(destination = %dest, group = %group, "verify: the run's destination and consumer group");
    if plan.destination.is_none() {
        client.create_destination(&dest).await?;
        client.create_destination(&dlq).await?;
    }
    let ledger = Arc::new(Ledger::default());
    let store_down = Arc::new(AtomicBool::new(false));
    let section = config.idempotency.clone().unwrap_or_default();
    let (pg, store) = idempotency(config, plan, &suffix, &store_down).await?;
    let absorbed = Arc::new(Mutex::new(
        Vec::<Arc<courier::idempotency::IdempotencyStats>>::new(),
    ));
    let kill = Arc::new(KillSwitch::default());

    let (client, consumer_client) = sabotaged(config, plan, client).await?;
    // Consumer processes (not for the memory broker, which lives in this process).
    let fleet = match &plan.workers {
        Workers::Processes(exe) if !config.backend.traits().in_process => {
            if store.as_ref().is_some_and(|s| s.name() == "memory") {
                bail!("exactly-once with the in-process idempotency store cannot be checked with consumer processes (each would dedup on its own): set [idempotency] store to a redis:// or postgres:// URL, or run the consumers in-process (--in-process)");
            }
            Some(Arc::new(workers::Fleet::new(
                exe.clone(),
                ledger.clone(),
                kill.clone(),
                store_down.clone(),
                client.backend(),
            )))
        }
        _ => None,
    };
    // What consumer processes are told: the consumer side's configuration (the sabotage's
    // guarantee), secrets included — it goes over their stdin.
    let consumer_toml = match plan.sabotage {
        Some(Sabotage::AckFirst) => config.clone().with_guarantee(Guarantee::AtMostOnce),
        Some(Sabotage::NoDedup) => config.clone().with_guarantee(Guarantee::AtLeastOnce),
        None => config.clone(),
    }
    .to_toml_with_secrets()?;
    // The producer process's: the publishing side's configuration (at-least-once under the
    // no-dedup sabotage, as `client` above).
    let producer_toml = match plan.sabotage {
        Some(Sabotage::NoDedup) => config.clone().with_guarantee(Guarantee::AtLeastOnce),
        Some(Sabotage::AckFirst) | None => config.clone(),
    }
    .to_toml_with_secrets()?;
    // Short, so a crashed consumer's message is retried soon; longer than a store outage plus
    // the complete retries after it, so a live worker's lease does not lapse meanwhile.
    let lease = section.lease.unwrap_or(Duration::from_secs(5));
    let spawner = Spawner {
        client: consumer_client.clone(),
        ledger: ledger.clone(),
        store: store.clone(),
        pg: pg.clone(),
        absorbed: absorbed.clone(),
        dest: dest.clone(),
        dlq: dlq.clone(),
        group: group.clone(),
        error_rate: plan.faults.errors,
        run: suffix.clone(),
        kill: kill.clone(),
        fleet: fleet.clone(),
        config: Config::from_toml_str(&consumer_toml)?,
        consumer_toml: consumer_toml.clone(),
        lease,
        ids: AtomicU64::new(0),
    };
    let mut consumers = Vec::new();
    for slot in 0..plan.consumers.max(1) {
        consumers.push(spawner.spawn(slot).await?);
    }

    let bar = plan.progress.then(|| progress_bar(plan.messages, g));

    // Producer: a process of its own next to the consumer processes, else a task here.
    let producer_process = fleet.is_some();
    let producer = match &plan.workers {
        Workers::Processes(exe) if producer_process => {
            let spec = workers::ProducerSpec {
                config: producer_toml,
                dest: dest.clone(),
                messages: plan.messages as u64,
                duplicates: plan.faults.duplicates,
            };
            workers::spawn_producer(exe, &spec, ledger.clone(), client.backend()).await?
        }
        _ => {
            let client = client.clone();
            let ledger = ledger.clone();
            let dest = dest.clone();
            let (n, dup) = (plan.messages as u64, plan.faults.duplicates);
            tokio::spawn(async move {
                Ok(publish_all(&*client, &dest, n, dup, |id| ledger.sent(id)).await)
            })
        }
    };

    // Transactional mode: the effects are rows; keep the in-memory ledger (progress, kills,
    // the stall check) in step with them.
    let stop_sync = CancellationToken::new();
    let syncer = pg
        .clone()
        .map(|pg| tokio::spawn(sync_effects(pg, ledger.clone(), stop_sync.clone())));

    // Fault driver.
    let stop_faults = CancellationToken::new();
    let expected = Duration::from_secs_f64((plan.messages as f64 / 2000.0).clamp(1.0, 30.0));
    // The run ends when no effect arrived for this long (longer than the broker takes to hand a
    // crashed consumer's messages to another one).
    let stall = (client.capabilities().redelivery_after_crash * 2).max(Duration::from_secs(5));
    let kills = plan.faults.kill;
    let cuts = plan.faults.cut;
    let connections_cut = Arc::new(AtomicU64::new(0));
    let backend = client.backend();
    let relay = fleet
        .clone()
        .map(|f| tokio::spawn(f.relay_kills(stop_faults.clone())));
    let driver = tokio::spawn(store_and_broker_faults(
        plan.faults.clone(),
        plan.messages,
        expected,
        ledger.clone(),
        StoreSwitch {
            down: store_down.clone(),
            fleet: fleet.clone(),
            pg: pg.clone(),
        },
        backend,
        stop_faults.clone(),
    ));
    // Kills and cuts share one schedule of evenly spaced marks, kills first: the i-th kill
    // when i/(kills+cuts+1) of the messages reached a handler (half that for consumers that
    // settle first, below), then the cuts. Under at-most-once
    // a cut loses everything a consumer had buffered, so a kill placed after the cuts could wait
    // for a mark the run never reaches (the at-most-once `kill` and `cut` cells of the chaos matrix, `integration/tests/chaos.rs`).
    let marks = u64::from(kills) + u64::from(cuts) + 1;
    // Connection cuts, the i-th at mark kills+i.
    // The cuts wait until the kills have landed (or were given up): under at-most-once each cut
    // loses every prefetched delivery, and cuts made early on their time bound could leave too
    // little of the run for a kill's mark to be passed with handlers still starting.
    let kills_done = CancellationToken::new();
    let kills_done_guard = kills_done.clone().drop_guard();
    let cutter = proxy.clone().map(|proxy| {
        tokio::spawn(cut_connections(
            proxy,
            CutPlan {
                cuts,
                kills,
                marks,
                messages: plan.messages as u64,
                wait: (expected * 10).min(stall / 2),
            },
            ledger.clone(),
            connections_cut.clone(),
            kills_done.clone(),
            stop_faults.clone(),
        ))
    });
    let settle_first = g == Guarantee::AtMostOnce || plan.sabotage == Some(Sabotage::AckFirst);
    let crashes = kill_consumers(
        &mut consumers,
        &spawner,
        &kill,
        &ledger,
        fleet.as_deref(),
        Kills {
            count: kills,
            span: if settle_first { 2 * marks } else { marks },
            messages: plan.messages as u64,
            stall,
            timeout: plan.timeout,
        },
    )
    .await?;
    drop(kills_done_guard);
    // Bounded: a producer stuck on a broker that stopped answering ends the run with an error
    // (aborting its task stops a producer process too).
    let mut producer = producer;
    let published = match tokio::time::timeout(plan.timeout, &mut producer).await {
        Ok(joined) => joined.map_err(|e| anyhow!("producer task failed: {e}"))??,
        Err(_) => {
            producer.abort();
            bail!(
                "the producer did not finish publishing {} messages within {:?} (--timeout)",
                plan.messages,
                plan.timeout
            );
        }
    };

    wait_for_effects(
        &ledger,
        published,
        Instant::now() + plan.timeout,
        stall,
        bar.as_ref(),
    )
    .await;
    // Late duplicates get a moment to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_faults.cancel();
    let _ = driver.await;
    if let Some(cutter) = cutter {
        let _ = cutter.await;
    }
    if let Some(relay) = relay {
        let _ = relay.await;
    }
    let mut dead_lettered = 0;
    for c in consumers {
        dead_lettered += c.shutdown().await?;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    client.close().await.ok();
    // What the run created goes again (the broker's own client; verify's is closed).
    let (removed, cleanup_error) = if plan.destination.is_some() || plan.keep {
        (Vec::new(), None)
    } else {
        match remove_run(direct, &dest).await {
            Ok(removed) => (removed, None),
            Err(e) => (Vec::new(), Some(format!("{e:#}"))),
        }
    };
    if let Some(pg) = &pg {
        stop_sync.cancel();
        if let Some(t) = syncer {
            let _ = t.await;
        }
        pg.sync(&ledger).await?;
        *ledger.latencies.lock() = pg.latencies().await?;
        pg.cleanup().await;
    }

    let absorbed_total = absorbed
        .lock()
        .iter()
        .map(|s| s.duplicates_absorbed.load(Ordering::Relaxed))
        .sum::<u64>()
        + fleet.as_ref().map_or(0, |f| f.absorbed());
    Ok(Outcome {
        backend,
        guarantee: g,
        plan,
        started,
        absorbed: absorbed_total,
        crashes,
        consumer_processes: fleet.is_some(),
        producer_process,
        connections_cut: connections_cut.load(Ordering::Relaxed),
        dead_lettered,
        destination: dest,
        removed,
        cleanup_error,
    }
    .report(&ledger))
}

/// The run's idempotency: the transactional mode's PostgreSQL ledger, or the store of the
/// layer (wrapped so the outage fault can take it down), or neither.
async fn idempotency(
    config: &Config,
    plan: &Plan,
    suffix: &str,
    store_down: &Arc<AtomicBool>,
) -> Result<(Option<Arc<PgLedger>>, Option<Arc<dyn IdempotencyStore>>)> {
    let section = config.idempotency.clone().unwrap_or_default();
    // The facade's rule (at-most-once with a section needs the layer to skip an id published
    // twice across consumer processes; the consumer's own window covers one process).
    let use_layer =
        ConsumerBuilder::wants_idempotency(config) && plan.sabotage != Some(Sabotage::NoDedup);
    let url = section.store.expose();
    let transactional =
        use_layer && (url.starts_with("postgres://") || url.starts_with("postgresql://"));
    if transactional && section.on_store_error == StoreFailurePolicy::FailOpen {
        return Err(courier::Error::config(
            "idempotency.on_store_error = \"fail-open\" is not honoured with a postgres:// store: verify runs the transactional mode, where the effect and its key commit in one PostgreSQL transaction, so an unreachable database can only defer; remove on_store_error (fail-closed) or use a redis:// store",
        )
        .into());
    }
    let pg = if transactional {
        Some(Arc::new(PgLedger::connect(url, suffix).await?))
    } else {
        None
    };
    // The store of the non-transactional layer; none without the layer (an at-least-once run
    // does not need Redis to be up).
    let store = if use_layer && pg.is_none() {
        Some(Arc::new(Flaky {
            inner: courier::idempotency_store(&section).await?,
            down: store_down.clone(),
        }) as Arc<dyn IdempotencyStore>)
    } else {
        None
    };
    Ok((pg, store))
}

/// The publishing and consuming clients. Sabotage: ack-first = an at-most-once consumer posing
/// as the configured guarantee; no-dedup = at-least-once everywhere (no broker dedup, no
/// idempotent layer) posing as exactly-once.
async fn sabotaged(
    config: &Config,
    plan: &Plan,
    client: Arc<dyn DeliveryClient>,
) -> Result<(Arc<dyn DeliveryClient>, Arc<dyn DeliveryClient>)> {
    Ok(match plan.sabotage {
        Some(Sabotage::AckFirst) => (
            client,
            courier::connect(&config.clone().with_guarantee(Guarantee::AtMostOnce))
                .await?
                .into(),
        ),
        Some(Sabotage::NoDedup) => {
            let alo: Arc<dyn DeliveryClient> =
                courier::connect(&config.clone().with_guarantee(Guarantee::AtLeastOnce))
                    .await?
                    .into();
            (alo.clone(), alo)
        }
        None => (client.clone(), client),
    })
}

/// The progress bar of an interactive run.
fn progress_bar(messages: usize, g: Guarantee) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(messages as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:>10} [{bar:40}] {pos}/{len} effects ({per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_message(g.to_string());
    b
}

/// Transactional mode: the effects are rows; keep the in-memory ledger (progress, kills, the
/// stall check) in step with them until `stop`.
async fn sync_effects(pg: Arc<PgLedger>, ledger: Arc<Ledger>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        if let Err(e) = pg.sync(&ledger).await {
            tracing::warn!(error = %e, "reading the effects table failed");
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Starts the run's consumers: a process of the fleet, or a task of this process running the
/// run's idempotent layer (if any) over the experiment's handler.
struct Spawner {
    client: Arc<dyn DeliveryClient>,
    ledger: Arc<Ledger>,
    store: Option<Arc<dyn IdempotencyStore>>,
    pg: Option<Arc<PgLedger>>,
    absorbed: Arc<Mutex<Vec<Arc<courier::idempotency::IdempotencyStats>>>>,
    dest: String,
    dlq: String,
    group: String,
    error_rate: f64,
    run: String,
    kill: Arc<KillSwitch>,
    fleet: Option<Arc<workers::Fleet>>,
    /// The consumer side's configuration, for consumer processes.
    consumer_toml: String,
    /// The consumer side's configuration (`consumer_toml`, parsed).
    config: Config,
    lease: Duration,
    ids: AtomicU64,
}

impl Spawner {
    /// A new consumer in `slot` (a replacement takes the slot of the one it replaces).
    async fn spawn(&self, slot: usize) -> courier::Result<Running> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        if let Some(fleet) = &self.fleet {
            let layer = match (&self.pg, &self.store) {
                (Some(_), _) => workers::Layer::Transactional,
                (None, Some(_)) => workers::Layer::Store {
                    lease_ms: self.lease.as_millis() as u64,
                },
                (None, None) => workers::Layer::None,
            };
            let spec = workers::WorkerSpec {
                config: self.consumer_toml.clone(),
                consumer: id,
                slot,
                dest: self.dest.clone(),
                dlq: self.dlq.clone(),
                group: self.group.clone(),
                run: self.run.clone(),
                error_rate: self.error_rate,
                layer,
            };
            return fleet.spawn(&spec).await.map(Running::Proc);
        }
        let work = Work {
            sink: Sink::Local {
                ledger: self.ledger.clone(),
                kill: self.kill.clone(),
            },
            error_rate: self.error_rate,
            consumer: id,
            run: self.run.clone(),
        };
        let consumer = |layer| {
            consumer_for(
                &self.config,
                self.client.clone(),
                &self.dest,
                &self.group,
                &self.dlq,
                layer,
            )
        };
        let handle = match (&self.pg, &self.store) {
            (Some(pg), _) => {
                let layer =
                    TransactionalIdempotent::new(work, &pg.store).namespace(self.dest.clone());
                self.absorbed.lock().push(layer.stats());
                consumer(None).spawn(layer).await?
            }
            (None, Some(store)) => {
                let (handle, stats) = consumer(Some((store.clone(), self.lease)))
                    .spawn_counted(work)
                    .await?;
                self.absorbed.lock().extend(stats);
                handle
            }
            (None, None) => consumer(None).spawn(work).await?,
        };
        Ok(Running::Task { handle, id, slot })
    }
}

/// Wait for the effects: until every sent id had one, or nothing moved for `stall` — longer
/// than the broker takes to hand a crashed consumer's messages to another one — or `deadline`.
async fn wait_for_effects(
    ledger: &Ledger,
    published: u64,
    deadline: Instant,
    stall: Duration,
    bar: Option<&indicatif::ProgressBar>,
) {
    let mut last = (u64::MAX, Instant::now());
    loop {
        let handled = ledger.effects.lock().len() as u64;
        if let Some(b) = bar {
            b.set_position(handled);
        }
        if handled >= published || Instant::now() > deadline || last.1.elapsed() > stall {
            return;
        }
        if handled != last.0 {
            last = (handled, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Remove from the broker of `config` what a run on `destination` created: the destination, its
/// dead-letter destination `DESTINATION-dlq` and the consumer group of the same name (a run does
/// this at its end unless [`Plan::keep`] or [`Plan::destination`]). What was removed; something
/// already gone is not an error.
pub async fn remove_run(config: &Config, destination: &str) -> Result<Vec<String>> {
    cleanup::remove(
        config,
        destination,
        &format!("{destination}-dlq"),
        destination,
    )
    .await
}

fn uuid_suffix() -> String {
    format!("{:016x}", fastrand::u64(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_split_keeps_credentials_and_path_and_fills_default_ports() {
        let (p, h, r) = split_authority("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(
            (p.as_str(), h.as_str(), r.as_str()),
            ("amqp://guest:guest@", "127.0.0.1:5672", "/%2f")
        );
        let (p, h, r) = split_authority("http://localhost").unwrap();
        assert_eq!(
            (p.as_str(), h.as_str(), r.as_str()),
            ("http://", "localhost:80", "")
        );
        assert!(split_authority("amqps://broker:5671").is_err());
        assert!(split_authority("not a url").is_err());
    }

    #[test]
    fn cut_fault_parses() {
        let f: Faults = "cut=3,kill=1".parse().unwrap();
        assert_eq!((f.cut, f.kill), (3, 1));
        assert!("cut=x".parse::<Faults>().is_err());
    }
}
