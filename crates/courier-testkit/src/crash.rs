//! The SIGKILL crash suite every broker backend runs ([`crash_suite!`](crate::crash_suite)):
//! consumers in processes of their own are killed mid-handler over and over while messages keep
//! arriving; a file ledger that survives the kills counts what was lost and what was handled
//! twice. At-least-once must lose nothing; at-most-once must handle nothing twice. The broker's
//! own count (`DeliveryClient::inspect`) says when an at-most-once run has drained.

use std::time::Duration;

use async_trait::async_trait;
use courier_core::{Consumer, Context, Guarantee, Handler, HandlerError, Message, Subscription};

use crate::process::{kill9, spawn_worker};
use crate::{unique, FileLedger, LedgerReport, TestBackend};

/// Messages a run publishes.
const MESSAGES: usize = 600;
/// Kills a run makes at least.
const MIN_KILLS: usize = 3;

/// The name `spawn_worker` runs for the worker test `name` defined next to the caller
/// (`module_path` is the caller's `module_path!()`; test names leave out the crate).
pub fn test_path(module_path: &str, name: &str) -> String {
    match module_path.split_once("::") {
        Some((_, rest)) => format!("{rest}::{name}"),
        None => name.to_owned(),
    }
}

/// Records each handled id in the file ledger after a short pause, so kills land in handlers.
struct FileRecord(FileLedger);

#[async_trait]
impl Handler for FileRecord {
    async fn handle(&self, m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..4))).await;
        self.0
            .handled(m.id.as_str())
            .map_err(HandlerError::retryable)
    }
}

/// The worker process: consume `DEST` as group `GROUP` with `GUARANTEE`, recording in `LEDGER`,
/// until killed.
pub async fn worker(b: &dyn TestBackend) {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let g: Guarantee = var("GUARANTEE").parse().expect("a guarantee");
    let client = b.client(g).await.expect("the worker's client");
    let _consumer = Consumer::new(client, Subscription::new(var("DEST"), var("GROUP")))
        .concurrency(8)
        .backlog_interval(None)
        .spawn(FileRecord(FileLedger::new(var("LEDGER"))))
        .await
        .expect("the worker's consumer");
    tokio::time::sleep(Duration::from_secs(120)).await;
}

/// Publish [`MESSAGES`] in small batches while consumer processes (`worker_test`) come and go,
/// each SIGKILLed once it has handled some; until every message was handled (at-least-once) or
/// the broker holds nothing more for the group (at-most-once), and at least [`MIN_KILLS`] kills.
/// The ledger's report and the number of kills.
pub async fn sigkill_consumers(
    b: &dyn TestBackend,
    g: Guarantee,
    worker_test: &str,
) -> (LedgerReport, usize) {
    let client = b.client(Guarantee::AtLeastOnce).await.expect("a client");
    let dest = b
        .fresh_destination(&*client, "crash")
        .await
        .expect("a destination");
    let group = unique("g");
    client
        .declare_subscription(&Subscription::new(&dest, &group))
        .await
        .expect("the group");
    let dir = std::env::temp_dir().join(unique("courier-crash"));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let ledger = FileLedger::new(dir.join("ledger"));
    // Publish while the workers come and go, so every worker gets fresh messages (an
    // at-most-once consumer takes everything that is ready at once).
    let publisher = {
        let (client, dest, ledger) = (client.clone(), dest.clone(), ledger.clone());
        tokio::spawn(async move {
            let msgs: Vec<Message> = (0..MESSAGES)
                .map(|i| Message::new(format!("m{i}")))
                .collect();
            for (i, chunk) in msgs.chunks(10).enumerate() {
                client
                    .publish_batch(&dest, chunk.to_vec())
                    .await
                    .expect("publishing");
                for m in chunk {
                    ledger.sent(m.id.as_str()).expect("the ledger file");
                }
                if i % 10 == 9 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
    };
    let envs = [
        ("DEST", dest.as_str()),
        ("GROUP", group.as_str()),
        ("LEDGER", ledger.path().to_str().expect("a UTF-8 path")),
        ("GUARANTEE", g.as_str()),
    ];
    let report = || ledger.report().expect("the ledger file");
    let drained = || async {
        if !publisher.is_finished() {
            return false;
        }
        if g != Guarantee::AtMostOnce {
            return report().lost == 0;
        }
        match client.inspect(&dest, &[group.as_str()]).await {
            Ok(info) => info.group(&group).is_some_and(|w| {
                w.backlog + w.in_flight.unwrap_or(0) + w.delayed.unwrap_or(0) == 0
            }),
            Err(_) => false,
        }
    };
    let deadline = tokio::time::Instant::now() + crate::endpoints::scaled(Duration::from_secs(240));
    let mut kills = 0;
    while kills < MIN_KILLS || !drained().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: not drained after {kills} kills: {}",
            b.name(),
            report()
        );
        let mut child = spawn_worker(worker_test, "consumer", &envs).expect("a worker process");
        // Let it handle messages no one handled before (a Kafka group first waits out the killed
        // member's session, then replays what its predecessor handled but did not commit), then
        // kill it mid-flight. Counting new ids, not handlings, guarantees progress between kills.
        let before = report().handled;
        let t = tokio::time::Instant::now();
        while report().handled < before + 50 && t.elapsed() < Duration::from_secs(20) {
            if report().handled > before && drained().await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill9(&mut child);
        kills += 1;
    }
    let r = report();
    let _ = client.delete_destination(&dest, &[group.as_str()]).await;
    let _ = std::fs::remove_dir_all(&dir);
    (r, kills)
}

/// Run [`sigkill_consumers`] with the worker test next to the caller (`module_path` is its
/// `module_path!()`) and assert the guarantee: at-least-once lost nothing, at-most-once handled
/// nothing twice; no id appears that was not sent.
pub async fn check(b: &dyn TestBackend, g: Guarantee, module_path: &str) {
    let worker = test_path(module_path, "crash_worker_entry");
    let (r, kills) = sigkill_consumers(b, g, &worker).await;
    println!("{}: {g}, {kills} SIGKILLs: {r}", b.name());
    if g.allows_loss() {
        assert_eq!(r.duplicates, 0, "{g} handled a message twice: {r}");
    } else {
        assert_eq!(r.lost, 0, "{g} lost messages: {r}");
    }
    assert_eq!(r.unexpected, 0, "{r}");
}

/// Generate the crash tests for a backend: a worker entry (`crash_worker_entry`, a no-op in a
/// normal run) and the at-least-once and at-most-once SIGKILL tests, each calling
/// `$factory().await` for the backend. Use it in a backend crate's test file, at most once per
/// module.
#[macro_export]
macro_rules! crash_suite {
    ($factory:path) => {
        #[test]
        fn crash_worker_entry() {
            if $crate::process::worker_role().is_none() {
                return;
            }
            let rt = tokio::runtime::Runtime::new().expect("a runtime");
            rt.block_on(async {
                let backend = $factory().await;
                $crate::crash::worker(&backend).await
            });
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn sigkilled_consumers_at_least_once_lose_nothing() {
            $crate::crash::check(
                &$factory().await,
                courier_core::Guarantee::AtLeastOnce,
                module_path!(),
            )
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn sigkilled_consumers_at_most_once_never_handle_twice() {
            $crate::crash::check(
                &$factory().await,
                courier_core::Guarantee::AtMostOnce,
                module_path!(),
            )
            .await;
        }
    };
}
