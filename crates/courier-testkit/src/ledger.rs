//! Delivery ledgers: count what was sent and what was handled, and report loss and duplicates.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// What a ledger saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerReport {
    /// Distinct ids sent.
    pub sent: usize,
    /// Distinct sent ids handled at least once.
    pub handled: usize,
    /// Sent ids never handled.
    pub lost: usize,
    /// Extra handlings beyond the first, summed over ids.
    pub duplicates: usize,
    /// Handled ids that were never sent (should be 0).
    pub unexpected: usize,
    /// Total handler invocations recorded.
    pub handlings: usize,
}

impl fmt::Display for LedgerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {} handled {} lost {} duplicates {} unexpected {}",
            self.sent, self.handled, self.lost, self.duplicates, self.unexpected
        )
    }
}

#[derive(Debug, Default)]
struct State {
    sent: HashSet<String>,
    handled: HashMap<String, usize>,
    order: Vec<String>,
}

/// How long [`Ledger::wait_all_handled`] waits without progress before giving up.
pub const STALL: Duration = Duration::from_secs(20);

/// An in-process ledger.
#[derive(Debug, Default)]
pub struct Ledger {
    state: Mutex<State>,
    changed: Notify,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record that `id` was sent.
    pub fn sent(&self, id: impl Into<String>) {
        self.state.lock().sent.insert(id.into());
        self.changed.notify_waiters();
    }

    /// Record that `id`'s effect happened once more.
    pub fn handled(&self, id: impl Into<String>) {
        let id = id.into();
        {
            let mut st = self.state.lock();
            *st.handled.entry(id.clone()).or_default() += 1;
            st.order.push(id);
        }
        self.changed.notify_waiters();
    }

    /// How often `id` was handled.
    pub fn count(&self, id: &str) -> usize {
        self.state.lock().handled.get(id).copied().unwrap_or(0)
    }

    /// Handled ids in handling order.
    pub fn order(&self) -> Vec<String> {
        self.state.lock().order.clone()
    }

    /// The current report.
    pub fn report(&self) -> LedgerReport {
        let st = self.state.lock();
        report_of(&st.sent, &st.handled)
    }

    /// Wait (bounded) until `done(report)` holds; returns the last report either way, and whether
    /// it held.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&LedgerReport) -> bool,
    ) -> (LedgerReport, bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let r = self.report();
            if done(&r) {
                return (r, true);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let r = self.report();
                let ok = done(&r);
                return (r, ok);
            }
        }
    }

    /// Wait until every sent id was handled: bounded by `timeout`, and given up early when
    /// nothing new was handled for [`STALL`] (the missing messages are not coming).
    pub async fn wait_all_handled(&self, timeout: Duration) -> (LedgerReport, bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        let stall = crate::endpoints::scaled(STALL);
        loop {
            let before = self.report();
            let step_end = (tokio::time::Instant::now() + stall).min(deadline);
            let remaining = step_end.saturating_duration_since(tokio::time::Instant::now());
            let (r, ok) = self
                .wait_until(remaining, |r| {
                    (r.lost == 0 && r.sent > 0) || r.handlings > before.handlings
                })
                .await;
            if r.lost == 0 && r.sent > 0 {
                return (r, true);
            }
            if !ok || tokio::time::Instant::now() >= deadline {
                return (r, false);
            }
        }
    }
}

fn report_of(sent: &HashSet<String>, handled: &HashMap<String, usize>) -> LedgerReport {
    let handled_sent = sent.iter().filter(|id| handled.contains_key(*id)).count();
    LedgerReport {
        sent: sent.len(),
        handled: handled_sent,
        lost: sent.len() - handled_sent,
        duplicates: handled.values().map(|n| n.saturating_sub(1)).sum(),
        unexpected: handled.keys().filter(|id| !sent.contains(*id)).count(),
        handlings: handled.values().sum(),
    }
}

/// A ledger in an append-only file, shared by processes (a worker that is SIGKILLed keeps what
/// it wrote: each record is one `write` of a whole line with `O_APPEND`).
#[derive(Debug, Clone)]
pub struct FileLedger {
    path: PathBuf,
}

impl FileLedger {
    /// A ledger at `path` (created on first write).
    pub fn new(path: impl AsRef<Path>) -> Self {
        FileLedger {
            path: path.as_ref().to_owned(),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, kind: char, id: &str) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(format!("{kind} {id}\n").as_bytes())
    }

    /// Record that `id` was sent.
    pub fn sent(&self, id: &str) -> std::io::Result<()> {
        self.append('S', id)
    }

    /// Record that `id`'s effect happened.
    pub fn handled(&self, id: &str) -> std::io::Result<()> {
        self.append('H', id)
    }

    /// Read the report (a missing file is an empty ledger).
    pub fn report(&self) -> std::io::Result<LedgerReport> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut sent = HashSet::new();
        let mut handled: HashMap<String, usize> = HashMap::new();
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("S", id)) => {
                    sent.insert(id.to_owned());
                }
                Some(("H", id)) => *handled.entry(id.to_owned()).or_default() += 1,
                _ => {} // a torn last line of a killed writer
            }
        }
        Ok(report_of(&sent, &handled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_loss_and_duplicates() {
        let l = Ledger::new();
        for id in ["a", "b", "c"] {
            l.sent(id);
        }
        l.handled("a");
        l.handled("a");
        l.handled("b");
        l.handled("zzz");
        let r = l.report();
        assert_eq!(r.sent, 3);
        assert_eq!(r.handled, 2);
        assert_eq!(r.lost, 1);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.unexpected, 1);
    }

    #[test]
    fn file_ledger_survives_torn_lines() {
        let dir = std::env::temp_dir().join(crate::unique("ledger"));
        let l = FileLedger::new(&dir);
        l.sent("a").unwrap();
        l.handled("a").unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&dir)
            .unwrap()
            .write_all(b"H")
            .unwrap();
        let r = l.report().unwrap();
        assert_eq!((r.sent, r.handled, r.lost), (1, 1, 0));
        std::fs::remove_file(dir).unwrap();
    }
}
