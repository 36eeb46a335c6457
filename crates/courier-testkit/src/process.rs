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

/// Messages (ready + unacknowledged) in a RabbitMQ queue, read with `rabbitmqctl list_queues`.
pub async fn rabbitmq_queue_depth(queue: &str) -> Option<u64> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "messages"])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(queue)).then(|| f.next().and_then(|n| n.parse::<u64>().ok()))?
    })
}

/// Wait (bounded) until a RabbitMQ queue holds no message, ready or unacknowledged.
pub async fn wait_rabbitmq_queue_empty(queue: &str, timeout: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if rabbitmq_queue_depth(queue).await == Some(0) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    false
}
