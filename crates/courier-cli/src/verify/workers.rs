//! Producer and consumer processes for `courier verify`: each consumer of the experiment runs
//! as a child process (`courier verify-worker`), and a crash is a real `SIGKILL` of that
//! process; the messages are published by one more child (`courier verify-producer`, which
//! reports `T <id>` for each message sent and `done <count>`, see [`producer`]).
//!
//! The parent is the ledger. It hands each child its spec (the configuration, secrets included,
//! over the child's stdin — never on the command line), and the child reports over its stdout,
//! one line per event, each written with a single `write` of less than `PIPE_BUF` bytes, so a
//! line is in the pipe whole or not at all when the child is killed:
//!
//! | child → parent          | meaning                                                      |
//! |-------------------------|--------------------------------------------------------------|
//! | `ready`                 | subscribed; handlers may run                                 |
//! | `fail <0/1> <message>`  | could not start (1: retrying may help)                       |
//! | `I <id>`                | a handler started on message `<id>` (an invocation)          |
//! | `E <id> <latency-ms>`   | the handler's effect (not in the PostgreSQL transactional mode, whose effects are rows) |
//! | `P`                     | a handler took the armed kill and is parked mid-way          |
//! | `S <absorbed> <dead>`   | counters: duplicates absorbed by the layer, dead-lettered    |
//!
//! | parent → child | meaning                                                               |
//! |----------------|-----------------------------------------------------------------------|
//! | `arm`          | the next handler to start parks and reports `P`                       |
//! | `disarm`       | a kill was taken elsewhere (or given up): do not park                 |
//! | `resume`       | the parked handler was not chosen: carry on                           |
//! | `down` / `up`  | the idempotency store is unreachable / back (store-outage fault)      |
//! | `stop`         | shut the consumer down gracefully, report counters, exit              |
//!
//! The chosen victim is never resumed: the parent kills it with `SIGKILL` while its handler is
//! parked, and starts a fresh child in its place. Whatever the victim's pipe held is still read:
//! an effect the child reported before it died counts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{KillSwitch, Ledger, Progress, DISARMED, OFFERED};

/// Which idempotent layer a consumer process runs its handler through.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(super) enum Layer {
    /// None (at-most-once, at-least-once, or a sabotaged exactly-once).
    None,
    /// The idempotent layer over the configured store, with this lease.
    Store {
        /// Lease of an in-progress key, milliseconds.
        lease_ms: u64,
    },
    /// The PostgreSQL transactional mode: effects are rows.
    Transactional,
}

/// What a consumer process is told to do (the first line on its stdin, JSON).
#[derive(Serialize, Deserialize)]
pub(super) struct WorkerSpec {
    /// The consumer's configuration as TOML, secrets included.
    pub config: String,
    /// This consumer's id in the run.
    pub consumer: u64,
    /// Its slot in the fleet (a replacement gets the slot of the consumer it replaces).
    pub slot: usize,
    pub dest: String,
    pub dlq: String,
    pub group: String,
    /// The run's id (the effects table's `run`, the PostgreSQL application name's suffix).
    pub run: String,
    pub error_rate: f64,
    pub layer: Layer,
}

/// The child's side of the pipe: reports to the parent, and the kill it may be armed with.
#[derive(Default)]
pub(super) struct Pipe {
    armed: AtomicBool,
    resume: tokio::sync::Notify,
}

impl Pipe {
    /// Write one line to the parent: a single `write` (see the module docs).
    pub(super) fn send(&self, line: &str) {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let mut out = std::io::stdout().lock();
        // The parent gone means the run is over; nothing to report to.
        let _ = out.write_all(&buf);
        let _ = out.flush();
    }

    /// Tell the parent this process could not start: `fail <0/1> <message>` (1: retrying may
    /// help), the message on one line.
    pub(super) fn fail(&self, retryable: bool, error: &dyn std::fmt::Display) {
        let msg = format!("{error:#}").replace('\n', " ");
        self.send(&format!("fail {} {msg}", u8::from(retryable)));
    }

    /// Called by a handler mid-way: when armed, take the kill, tell the parent, and wait — for
    /// `SIGKILL` (chosen) or `resume` (another handler was chosen first).
    pub(super) async fn maybe_park(&self) {
        if self
            .armed
            .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            let resumed = self.resume.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            self.send("P");
            resumed.await;
        }
    }
}

/// A child's spec: the first line on its stdin, JSON.
async fn read_spec<T: serde::de::DeserializeOwned>(
    stdin: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>,
    command: &str,
) -> Result<T> {
    let line = stdin.next_line().await?.ok_or_else(|| {
        anyhow!("{command}: no spec on stdin (it is started by `courier verify`)")
    })?;
    serde_json::from_str(&line).with_context(|| format!("{command}: bad spec"))
}

/// The `courier verify-worker` process: run one consumer of the experiment as `stdin` says.
pub async fn worker() -> Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let spec: WorkerSpec = read_spec(&mut stdin, "verify-worker").await?;
    let pipe = Arc::new(Pipe::default());
    let store_down = Arc::new(AtomicBool::new(false));
    let (handle, absorbed, client) =
        match super::start_worker(&spec, pipe.clone(), store_down.clone()).await {
            Ok(started) => started,
            Err(e) => {
                let retryable = e
                    .downcast_ref::<courier::Error>()
                    .is_some_and(courier::Error::is_retryable);
                pipe.fail(retryable, &e);
                return Err(e);
            }
        };
    pipe.send("ready");
    let counters = |dead: u64| {
        let absorbed = absorbed
            .as_ref()
            .map_or(0, |s| s.duplicates_absorbed.load(Ordering::Relaxed));
        format!("S {absorbed} {dead}")
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            line = stdin.next_line() => match line {
                Ok(Some(cmd)) => match cmd.trim() {
                    "arm" => pipe.armed.store(true, Ordering::SeqCst),
                    "disarm" => pipe.armed.store(false, Ordering::SeqCst),
                    "resume" => pipe.resume.notify_one(),
                    "down" => store_down.store(true, Ordering::SeqCst),
                    "up" => store_down.store(false, Ordering::SeqCst),
                    "stop" => break,
                    other => tracing::warn!(command = other, "verify-worker: unknown command"),
                },
                // The parent is gone (or closed our stdin): stop like on `stop`.
                Ok(None) | Err(_) => break,
            },
            _ = tick.tick() => pipe.send(&counters(handle.stats().dead_lettered)),
        }
    }
    let stats = handle.shutdown().await?;
    pipe.send(&counters(stats.dead_lettered));
    client.close().await.ok();
    Ok(())
}

/// Counters a consumer process last reported.
#[derive(Default)]
pub(super) struct ProcStats {
    pub absorbed: AtomicU64,
    pub dead_lettered: AtomicU64,
}

/// The parent's side: every consumer process of the run, for broadcasts and counters.
pub(super) struct Fleet {
    exe: PathBuf,
    ledger: Arc<Ledger>,
    kill: Arc<KillSwitch>,
    backend: &'static str,
    senders: Mutex<Vec<(u64, mpsc::UnboundedSender<String>)>>,
    /// The run's store-outage switch (the one the in-process store wrapper reads too).
    store_down: Arc<AtomicBool>,
    /// Counters of every process the run started, killed ones included.
    stats: Mutex<Vec<Arc<ProcStats>>>,
}

/// One consumer process.
pub(super) struct Proc {
    pub id: u64,
    pub slot: usize,
    fleet: Arc<Fleet>,
    child: tokio::process::Child,
    tx: mpsc::UnboundedSender<String>,
    reader: JoinHandle<()>,
    stats: Arc<ProcStats>,
}

impl Fleet {
    pub(super) fn new(
        exe: PathBuf,
        ledger: Arc<Ledger>,
        kill: Arc<KillSwitch>,
        store_down: Arc<AtomicBool>,
        backend: &'static str,
    ) -> Self {
        Fleet {
            exe,
            ledger,
            kill,
            backend,
            senders: Mutex::new(Vec::new()),
            store_down,
            stats: Mutex::new(Vec::new()),
        }
    }

    /// Send `line` to every live consumer process but `except`.
    pub(super) fn broadcast(&self, line: &str, except: Option<u64>) {
        for (id, tx) in self.senders.lock().iter() {
            if Some(*id) != except {
                let _ = tx.send(line.to_owned());
            }
        }
    }

    /// Tell every process the store-outage switch changed (processes started during the
    /// outage read the switch when they start).
    pub(super) fn store_switched(&self, down: bool) {
        self.broadcast(if down { "down" } else { "up" }, None);
    }

    /// Duplicates absorbed, summed over every process of the run.
    pub(super) fn absorbed(&self) -> u64 {
        self.stats
            .lock()
            .iter()
            .map(|s| s.absorbed.load(Ordering::Relaxed))
            .sum()
    }

    /// Offer the armed kill to the processes whenever its mark is reached (the in-process
    /// handlers check the mark themselves; a process cannot see the ledger). Runs until `stop`.
    pub(super) async fn relay_kills(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let rearmed = self.kill.rearmed.notified();
            let changed = self.ledger.changed.notified();
            tokio::pin!(rearmed, changed);
            rearmed.as_mut().enable();
            changed.as_mut().enable();
            let at = self.kill.armed_at.load(Ordering::SeqCst);
            if at != DISARMED
                && at != OFFERED
                && self.ledger.progress(Progress::Invocations) as u64 >= at
                && self
                    .kill
                    .armed_at
                    .compare_exchange(at, OFFERED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                let doomed = self.kill.doomed.load(Ordering::SeqCst);
                self.broadcast("arm", Some(doomed));
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = rearmed => {}
                _ = changed => {}
            }
        }
    }

    /// A kill given up: no process is to park for it any more.
    pub(super) fn disarm(&self) {
        self.broadcast("disarm", None);
    }

    /// Start consumer process `spec.consumer` and wait until it has subscribed.
    pub(super) async fn spawn(self: &Arc<Self>, spec: &WorkerSpec) -> courier::Result<Proc> {
        let id = spec.consumer;
        let (mut child, mut stdin, stdout) = start_child(&self.exe, "verify-worker", "consumer")?;
        let spec_line = serde_json::to_string(spec)
            .map_err(|e| courier::Error::config(format!("worker spec: {e}")))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            let mut first = Some(spec_line);
            loop {
                let line = match first.take() {
                    Some(l) => l,
                    None => match rx.recv().await {
                        Some(l) => l,
                        None => break,
                    },
                };
                if stdin
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                    || stdin.flush().await.is_err()
                {
                    break;
                }
            }
        });
        let stats = Arc::new(ProcStats::default());
        self.stats.lock().push(stats.clone());
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), NotStarted>>();
        let reader =
            tokio::spawn(
                self.clone()
                    .read(id, stdout, tx.clone(), stats.clone(), ready_tx),
            );
        let start = match tokio::time::timeout(START_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(why))) => Err(why),
            Ok(Err(_)) => Err(NotStarted::Gone),
            Err(_) => Err(NotStarted::TimedOut),
        };
        if let Err(why) = start {
            let op = "starting a consumer process";
            return Err(not_started(&mut child, why, op, self.backend).await);
        }
        self.senders.lock().push((id, tx.clone()));
        // A process started mid-fault joins it.
        if self.store_down.load(Ordering::SeqCst) {
            let _ = tx.send("down".into());
        }
        if self.kill.armed_at.load(Ordering::SeqCst) == OFFERED {
            let _ = tx.send("arm".into());
        }
        Ok(Proc {
            id,
            slot: spec.slot,
            fleet: self.clone(),
            child,
            tx,
            reader,
            stats,
        })
    }

    /// Read one process's reports into the ledger until its stdout closes.
    async fn read(
        self: Arc<Self>,
        id: u64,
        stdout: tokio::process::ChildStdout,
        tx: mpsc::UnboundedSender<String>,
        stats: Arc<ProcStats>,
        ready: oneshot::Sender<Result<(), NotStarted>>,
    ) {
        let mut ready = Some(ready);
        let mut out = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match out.read_line(&mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // A line without its newline was cut by the kill: never written whole, not counted.
            let Some(l) = line.strip_suffix('\n') else {
                break;
            };
            let mut parts = l.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("I"), Some(msg), _) => self.ledger.invoked(msg.to_owned()),
                (Some("E"), Some(msg), latency) => {
                    let latency = latency.and_then(|l| l.parse().ok());
                    self.ledger.record(msg.to_owned(), latency);
                }
                (Some("P"), _, _) => {
                    if self
                        .kill
                        .armed_at
                        .compare_exchange(OFFERED, DISARMED, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        self.kill.report_parked(id);
                        self.broadcast("disarm", Some(id));
                    } else {
                        let _ = tx.send("resume".into());
                    }
                }
                (Some("S"), Some(absorbed), Some(dead)) => {
                    if let (Ok(a), Ok(d)) = (absorbed.parse(), dead.parse()) {
                        stats.absorbed.store(a, Ordering::Relaxed);
                        stats.dead_lettered.store(d, Ordering::Relaxed);
                    }
                }
                (Some("ready"), _, _) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Ok(()));
                    }
                }
                (Some("fail"), _, _) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Err(NotStarted::from_fail(l)));
                    }
                }
                _ => tracing::warn!(line = l, "verify: unexpected line from a consumer process"),
            }
        }
    }

    fn forget(&self, id: u64) {
        self.senders.lock().retain(|(i, _)| *i != id);
    }
}

/// Start `exe subcommand` with piped stdin and stdout (its stderr is ours); `role` names it in
/// the error.
fn start_child(
    exe: &Path,
    subcommand: &str,
    role: &str,
) -> courier::Result<(
    tokio::process::Child,
    tokio::process::ChildStdin,
    tokio::process::ChildStdout,
)> {
    let mut child = tokio::process::Command::new(exe)
        .arg(subcommand)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            courier::Error::config(format!(
                "cannot start the {role} process {}: {e} (verify runs its producer and consumers as `courier {subcommand}`; build the courier binary, or run them in-process with --in-process)",
                exe.display()
            ))
        })?;
    match (child.stdin.take(), child.stdout.take()) {
        (Some(stdin), Some(stdout)) => Ok((child, stdin, stdout)),
        _ => Err(courier::Error::config(format!(
            "{role} process without pipes"
        ))),
    }
}

/// How long a child may take to say `ready`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a child did not start.
enum NotStarted {
    /// It said `fail <0/1> <message>` (1: retrying may help).
    Failed(bool, String),
    /// It ended (or said something else) before either.
    Gone,
    /// Nothing within [`START_TIMEOUT`].
    TimedOut,
}

impl NotStarted {
    /// A child's `fail <0/1> <message>` line.
    fn from_fail(line: &str) -> Self {
        let mut parts = line.splitn(3, ' ').skip(1);
        let retryable = parts.next() == Some("1");
        NotStarted::Failed(retryable, parts.next().unwrap_or("").to_owned())
    }
}

/// The error for a child that did not start (`operation` says which), once it is reaped.
async fn not_started(
    child: &mut tokio::process::Child,
    why: NotStarted,
    operation: &'static str,
    backend: &'static str,
) -> courier::Error {
    let status = reap(child).await;
    let (retryable, reason) = match why {
        NotStarted::TimedOut => {
            return courier::Error::Timeout {
                operation: operation.into(),
                after: START_TIMEOUT,
            }
        }
        NotStarted::Failed(retryable, msg) => (retryable, msg),
        NotStarted::Gone => (
            false,
            format!("the process ended before it was ready ({status:?}; its error is above)"),
        ),
    };
    courier::Error::Broker {
        backend,
        operation,
        retryable,
        source: reason.into(),
    }
}

/// What the producer process is told (the first line on its stdin, JSON).
#[derive(Serialize, Deserialize)]
pub(super) struct ProducerSpec {
    /// The publishing side's configuration as TOML, secrets included.
    pub config: String,
    pub dest: String,
    pub messages: u64,
    /// Share of messages published a second time with the same id.
    pub duplicates: f64,
}

/// The `courier verify-producer` process: publish the run's messages as `stdin` says. It reports
/// `ready` once connected (or `fail <0/1> <message>`), `T <id>` for each message whose publish
/// succeeded (the ledger's "sent"), and `done <count>` at the end — each line one `write`, as
/// the consumer processes' are.
pub async fn producer() -> Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let spec: ProducerSpec = read_spec(&mut stdin, "verify-producer").await?;
    let pipe = Pipe::default();
    let connected = async {
        let config = courier::Config::from_toml_str(&spec.config)?;
        courier::connect(&config).await
    };
    let client = match connected.await {
        Ok(c) => c,
        Err(e) => {
            pipe.fail(e.is_retryable(), &e);
            return Err(e.into());
        }
    };
    pipe.send("ready");
    let sent = super::publish_all(&*client, &spec.dest, spec.messages, spec.duplicates, |id| {
        pipe.send(&format!("T {id}"))
    })
    .await;
    pipe.send(&format!("done {sent}"));
    client.close().await.ok();
    Ok(())
}

/// Start the producer process and wait until it has connected. The task it returns records each
/// sent id in the ledger and ends with the number of messages sent, once the process said
/// `done` — an error if it ended without saying so.
pub(super) async fn spawn_producer(
    exe: &Path,
    spec: &ProducerSpec,
    ledger: Arc<Ledger>,
    backend: &'static str,
) -> courier::Result<JoinHandle<Result<u64>>> {
    let (mut child, mut stdin, stdout) = start_child(exe, "verify-producer", "producer")?;
    let spec_line = serde_json::to_string(spec)
        .map_err(|e| courier::Error::config(format!("producer spec: {e}")))?;
    let written = async {
        stdin.write_all(format!("{spec_line}\n").as_bytes()).await?;
        stdin.flush().await
    };
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(START_TIMEOUT, async {
        written.await?;
        lines.next_line().await
    })
    .await;
    let start = match first {
        Ok(Ok(Some(l))) if l == "ready" => Ok(()),
        Ok(Ok(Some(l))) if l.starts_with("fail ") => Err(NotStarted::from_fail(&l)),
        Ok(_) => Err(NotStarted::Gone),
        Err(_) => Err(NotStarted::TimedOut),
    };
    if let Err(why) = start {
        let op = "starting the producer process";
        return Err(not_started(&mut child, why, op, backend).await);
    }
    Ok(tokio::spawn(async move {
        let mut sent = 0u64;
        loop {
            let line = match lines.next_line().await {
                Ok(Some(l)) => l,
                Ok(None) | Err(_) => {
                    let status = reap(&mut child).await;
                    bail!("the producer process ended before it was done ({sent} messages sent; {status:?}; its error is above)");
                }
            };
            match line.split_once(' ') {
                Some(("T", id)) => {
                    ledger.sent(id);
                    sent += 1;
                }
                Some(("done", n)) => {
                    reap(&mut child).await;
                    if n.parse() != Ok(sent) {
                        bail!("the producer process reported {n} messages sent, but {sent} reached the ledger");
                    }
                    return Ok(sent);
                }
                _ => tracing::warn!(line, "verify: unexpected line from the producer process"),
            }
        }
    }))
}

/// Wait a little for a child that is on its way out, then kill it; its exit status.
async fn reap(child: &mut tokio::process::Child) -> Option<std::process::ExitStatus> {
    if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        return Some(status);
    }
    let _ = child.start_kill();
    tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .ok()
        .and_then(Result::ok)
}

impl Proc {
    /// `SIGKILL`, then read what its pipe still held.
    pub(super) async fn kill(mut self) {
        self.fleet.forget(self.id);
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.reader).await;
    }

    /// Graceful stop (`stop`: in-flight handlers finish, the subscription closes); the
    /// dead-lettered count it reported last. Killed if it does not exit within `grace`.
    pub(super) async fn shutdown(mut self, grace: Duration) -> Result<u64> {
        self.fleet.forget(self.id);
        let _ = self.tx.send("stop".into());
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                reap(&mut self.child).await;
                None
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.reader).await;
        match status {
            Some(s) if s.success() => Ok(self.stats.dead_lettered.load(Ordering::Relaxed)),
            Some(s) => Err(anyhow!(
                "consumer process {} exited with {s} on shutdown",
                self.id
            )),
            None => Err(anyhow!(
                "consumer process {} did not stop within {grace:?} and was killed",
                self.id
            )),
        }
    }
}
