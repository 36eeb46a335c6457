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
mod setup;
mod work;
mod workers;

use faults::*;
pub use faults::{Faults, Sabotage};
use ledger::*;
use report::Outcome;
pub use report::Report;
use schedule::*;
use setup::*;
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
    let x = set_up(config, plan).await?;
    let mut consumers = Vec::new();
    for slot in 0..plan.consumers.max(1) {
        consumers.push(x.spawner.spawn(slot).await?);
    }
    let bar = plan.progress.then(|| progress_bar(plan.messages, g));
    let mut producer = x.start_producer(plan).await?;
    // Transactional mode: the effects are rows; keep the in-memory ledger (progress, kills,
    // the stall check) in step with them.
    let stop_sync = CancellationToken::new();
    let syncer =
        x.pg.clone()
            .map(|pg| tokio::spawn(sync_effects(pg, x.ledger.clone(), stop_sync.clone())));

    let expected = Duration::from_secs_f64((plan.messages as f64 / 2000.0).clamp(1.0, 30.0));
    // The run ends when no effect arrived for this long (longer than the broker takes to hand a
    // crashed consumer's messages to another one).
    let stall = (x.client.capabilities().redelivery_after_crash * 2).max(Duration::from_secs(5));
    let mut faults = FaultTasks::start(&x, plan, expected, stall);
    let settle_first = g == Guarantee::AtMostOnce || plan.sabotage == Some(Sabotage::AckFirst);
    let crashes = kill_consumers(
        &mut consumers,
        &x.spawner,
        &x.kill,
        &x.ledger,
        x.fleet.as_deref(),
        Kills {
            count: plan.faults.kill,
            span: if settle_first {
                2 * faults.marks
            } else {
                faults.marks
            },
            messages: plan.messages as u64,
            stall,
            timeout: plan.timeout,
        },
    )
    .await?;
    faults.kills_landed();
    // Bounded: a producer stuck on a broker that stopped answering ends the run with an error
    // (aborting its task stops a producer process too).
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
        &x.ledger,
        published,
        Instant::now() + plan.timeout,
        stall,
        bar.as_ref(),
    )
    .await;
    // Late duplicates get a moment to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connections_cut = faults.stop().await;
    let mut dead_lettered = 0;
    for c in consumers {
        dead_lettered += c.shutdown().await?;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    x.client.close().await.ok();
    // What the run created goes again (the broker's own client, not through the proxy; verify's
    // is closed).
    let (removed, cleanup_error) = if plan.destination.is_some() || plan.keep {
        (Vec::new(), None)
    } else {
        match remove_run(config, &x.dest).await {
            Ok(removed) => (removed, None),
            Err(e) => (Vec::new(), Some(format!("{e:#}"))),
        }
    };
    if let Some(pg) = &x.pg {
        stop_sync.cancel();
        if let Some(t) = syncer {
            let _ = t.await;
        }
        pg.sync(&x.ledger).await?;
        *x.ledger.latencies.lock() = pg.latencies().await?;
        pg.cleanup().await;
    }
    Ok(Outcome {
        backend: x.client.backend(),
        guarantee: g,
        plan,
        started,
        absorbed: x.absorbed(),
        crashes,
        consumer_processes: x.fleet.is_some(),
        producer_process: x.fleet.is_some(),
        connections_cut,
        dead_lettered,
        destination: x.dest.clone(),
        removed,
        cleanup_error,
    }
    .report(&x.ledger))
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
