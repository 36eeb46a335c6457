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
