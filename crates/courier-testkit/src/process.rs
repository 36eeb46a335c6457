//! Crash tests: re-execute the current test binary as a worker process, then SIGKILL it.
//!
//! In the test file:
//! ```ignore
//! #[test]
//! fn worker_entry() {
//!     let Some(role) = courier_testkit::process::worker_role() else { return }; // normal runs: no-op
//!     // ... act as a consumer until killed ...
//! }
//! // in the real test:
//! let mut child = courier_testkit::process::spawn_worker("worker_entry", "consumer", &[("QUEUE", &q)])?;
//! courier_testkit::process::kill9(&mut child);
//! ```

use std::process::{Child, Command, Stdio};

/// Environment variable that marks a process as a worker (its value is the role).
pub const WORKER_ENV: &str = "COURIER_TEST_WORKER";

/// The role this process was started with, if it is a worker.
pub fn worker_role() -> Option<String> {
    std::env::var(WORKER_ENV).ok().filter(|r| !r.is_empty())
}

/// Start this test binary again, running only the test `test_name`, as a worker with `role`.
pub fn spawn_worker(test_name: &str, role: &str, envs: &[(&str, &str)]) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(WORKER_ENV, role)
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn()
}

/// Kill a worker with SIGKILL (no cleanup runs in it) and reap it.
pub fn kill9(child: &mut Child) {
    // `Child::kill` sends SIGKILL on Unix.
    let _ = child.kill();
    let _ = child.wait();
}

/// `(ready messages, consumers)` of a RabbitMQ queue, exact (a passive `queue.declare` on
/// `RABBITMQ_URL`). Messages delivered to a consumer and not yet acknowledged are not counted;
/// once a dead consumer's count has dropped to zero its unacknowledged messages are ready again.
pub async fn rabbitmq_queue_state(queue: &str) -> (u32, u32) {
    use lapin::options::QueueDeclareOptions;
    let url = crate::endpoints::rabbitmq_url();
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| crate::endpoints::unreachable("RabbitMQ", &url, e));
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {queue} does not exist: {e}"));
    let state = (q.message_count(), q.consumer_count());
    let _ = conn.close(200, "".into()).await;
    state
}

/// Wait (bounded) until a RabbitMQ queue has no consumer (a killed consumer's connection is
/// gone and its unacknowledged messages are back in the queue).
pub async fn wait_rabbitmq_no_consumers(queue: &str, timeout: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if rabbitmq_queue_state(queue).await.1 == 0 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// The Python of the interop venv (`pika`, `boto3`) that `scripts/services up` installs under
/// `$COURIER_CACHE/interop-venv` (default `~/.cache/courier`). Panics with how to install it.
pub fn interop_python() -> String {
    let cache = std::env::var("COURIER_CACHE").unwrap_or_else(|_| {
        format!(
            "{}/.cache/courier",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let py = format!("{cache}/interop-venv/bin/python");
    if !std::path::Path::new(&py).exists() {
        panic!("the interop venv is missing at {py}: run `scripts/services up` (it installs pika and boto3)");
    }
    py
}

/// Stop a worker with SIGTERM (it shuts down gracefully) and wait for it, up to `timeout`;
/// SIGKILL after that. True when it exited by itself.
pub fn terminate(child: &mut Child, timeout: std::time::Duration) -> bool {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    kill9(child);
    false
}

/// In a worker: wait until SIGTERM (or `limit`, a safety net if the test process died).
pub async fn until_terminated(limit: std::time::Duration) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::time::sleep(limit) => {}
    }
}

/// Publish `messages` to `topic` in `chunks` parts one second apart, recording each in `ledger`:
/// a stream that keeps crash-test workers busy while they are killed.
pub fn trickle(
    client: std::sync::Arc<dyn courier_core::DeliveryClient>,
    topic: String,
    messages: Vec<courier_core::Message>,
    chunks: usize,
    ledger: crate::FileLedger,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let size = messages.len().div_ceil(chunks.max(1)).max(1);
        for chunk in messages.chunks(size) {
            client
                .publish_batch(&topic, chunk.to_vec())
                .await
                .expect("publishing the test's inputs");
            for m in chunk {
                ledger.sent(m.id.as_str()).expect("the ledger file");
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    })
}

/// Start workers (`worker_test` of this binary, with `envs`) one after another and SIGKILL each
/// 2–6 s after it first made progress (`ledger`'s handlings grew): in the middle of its work.
/// Stops once there were `min_kills` kills and `done()` holds; panics after `limit`. Returns
/// the number of kills.
pub async fn kill_workers_until(
    worker_test: &str,
    envs: &[(&str, &str)],
    ledger: &crate::FileLedger,
    min_kills: usize,
    limit: std::time::Duration,
    done: impl Fn() -> bool,
) -> usize {
    use std::time::Duration;
    let deadline = tokio::time::Instant::now() + limit;
    let handlings = || ledger.report().expect("the ledger file").handlings;
    let mut kills = 0;
    while kills < min_kills || !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "inputs never processed after {kills} kills: {}",
            ledger.report().expect("the ledger file")
        );
        let mut child = spawn_worker(worker_test, "consumer", envs).expect("a worker process");
        let before = handlings();
        let t = tokio::time::Instant::now();
        while handlings() == before && t.elapsed() < Duration::from_secs(60) && !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(2_000..6_000))).await;
        kill9(&mut child);
        kills += 1;
    }
    kills
}
