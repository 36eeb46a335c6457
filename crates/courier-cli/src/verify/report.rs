//! What a run measured, and how it prints.

use super::*;

/// What the experiment measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Backend.
    pub backend: String,
    /// Guarantee checked.
    pub guarantee: Guarantee,
    /// Faults injected.
    pub faults: Faults,
    /// Sabotage applied.
    pub sabotage: Option<Sabotage>,
    /// Distinct messages published successfully.
    pub sent: u64,
    /// Handler effects recorded.
    pub effects: u64,
    /// Distinct messages that had an effect.
    pub handled: u64,
    /// Sent but never handled.
    pub lost: u64,
    /// Of the lost, those no handler ever saw (never delivered, or stuck behind something that
    /// was); the rest reached a handler whose effect never committed.
    pub lost_undelivered: u64,
    /// Effects beyond the first per id.
    pub duplicate_effects: u64,
    /// Handler invocations beyond the first per id (redeliveries and retries).
    pub redeliveries: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Duplicates the idempotent layer absorbed.
    pub duplicates_absorbed: u64,
    /// Consumer crashes injected.
    pub crashes: u32,
    /// Whether the consumers ran as child processes (a crash is `SIGKILL`) rather than as tasks
    /// of the verify process.
    pub consumer_processes: bool,
    /// Whether the producer ran as a child process of its own (with the consumer processes)
    /// rather than as a task of the verify process.
    pub producer_process: bool,
    /// Connections dropped by the fault proxy's cuts.
    pub connections_cut: u64,
    /// Effects per second.
    pub throughput: f64,
    /// End-to-end latency p50, ms.
    pub p50_ms: f64,
    /// End-to-end latency p99, ms.
    pub p99_ms: f64,
    /// Whether the guarantee held.
    pub holds: bool,
    /// What was violated.
    pub violations: Vec<String>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// The run's destination (its dead-letter destination is `DESTINATION-dlq`).
    pub destination: String,
    /// What was removed from the broker after the run (empty when kept).
    pub removed: Vec<String>,
    /// Why removing the run's destinations failed, if it did (they are left behind).
    pub cleanup_error: Option<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: [(&str, String); 18] = [
            ("backend", self.backend.clone()),
            ("guarantee", self.guarantee.to_string()),
            ("sent", self.sent.to_string()),
            ("handled", self.handled.to_string()),
            (
                "lost",
                if self.lost > 0 {
                    format!(
                        "{} ({} never reached a handler)",
                        self.lost, self.lost_undelivered
                    )
                } else {
                    "0".into()
                },
            ),
            ("duplicate effects", self.duplicate_effects.to_string()),
            ("redeliveries", self.redeliveries.to_string()),
            ("dead-lettered", self.dead_lettered.to_string()),
            ("duplicates absorbed", self.duplicates_absorbed.to_string()),
            (
                "consumers",
                if self.consumer_processes {
                    "processes (a crash is SIGKILL)".into()
                } else {
                    "tasks of this process".into()
                },
            ),
            (
                "producer",
                if self.producer_process {
                    "a process of its own".into()
                } else {
                    "a task of this process".into()
                },
            ),
            ("consumer crashes", self.crashes.to_string()),
            (
                "connections cut",
                if self.faults.cut > 0 {
                    format!("{} in {} cuts", self.connections_cut, self.faults.cut)
                } else {
                    "0".into()
                },
            ),
            ("throughput", format!("{:.0} msg/s", self.throughput)),
            ("latency p50", format!("{:.1} ms", self.p50_ms)),
            ("latency p99", format!("{:.1} ms", self.p99_ms)),
            (
                "destination",
                match (&self.cleanup_error, self.removed.len()) {
                    (Some(e), _) => format!("{} left behind: {e}", self.destination),
                    (None, 0) => format!("{} (kept)", self.destination),
                    (None, n) => {
                        format!("{} (removed after the run: {n} objects)", self.destination)
                    }
                },
            ),
            (
                "verdict",
                if self.holds {
                    "guarantee holds".into()
                } else {
                    format!("VIOLATED: {}", self.violations.join("; "))
                },
            ),
        ];
        for (k, v) in rows {
            writeln!(f, "{k:<20} {v}")?;
        }
        Ok(())
    }
}

/// What the run knows besides the ledger when it ends; [`Outcome::report`] counts and judges.
pub(super) struct Outcome<'a> {
    pub(super) backend: &'static str,
    pub(super) guarantee: Guarantee,
    pub(super) plan: &'a Plan,
    pub(super) started: Instant,
    pub(super) absorbed: u64,
    pub(super) crashes: u32,
    pub(super) consumer_processes: bool,
    pub(super) producer_process: bool,
    pub(super) connections_cut: u64,
    pub(super) dead_lettered: u64,
    pub(super) destination: String,
    pub(super) removed: Vec<String>,
    pub(super) cleanup_error: Option<String>,
}

impl Outcome<'_> {
    /// Count loss, duplicate effects and redeliveries from the ledger, and judge the run: a
    /// violation is loss or a duplicate effect the guarantee forbids, or a fault that was not
    /// injected.
    pub(super) fn report(self, ledger: &Ledger) -> Report {
        let g = self.guarantee;
        let plan = self.plan;
        let (kills, cuts) = (plan.faults.kill, plan.faults.cut);
        let sent = ledger.sent.lock();
        let effects = ledger.effects.lock();
        let invocations = ledger.invocations.lock();
        let handled = sent.keys().filter(|id| effects.contains_key(*id)).count() as u64;
        let lost = sent.len() as u64 - handled;
        let lost_undelivered = sent
            .keys()
            .filter(|id| !effects.contains_key(*id) && !invocations.contains_key(*id))
            .count() as u64;
        let dup_effects: u64 = effects
            .values()
            .map(|n| u64::from(n.saturating_sub(1)))
            .sum();
        let redeliveries: u64 = invocations
            .values()
            .map(|n| u64::from(n.saturating_sub(1)))
            .sum();
        let mut lat = ledger.latencies.lock().clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| {
            if lat.is_empty() {
                0.0
            } else {
                lat[((lat.len() - 1) as f64 * p) as usize]
            }
        };
        let seconds = self.started.elapsed().as_secs_f64();
        let busy = ledger
            .last_effect
            .lock()
            .map_or(seconds, |t| t.duration_since(self.started).as_secs_f64())
            .max(0.001);
        let mut violations = Vec::new();
        if !g.allows_loss() && lost > 0 {
            violations.push(format!("{lost} messages lost under {g}"));
        }
        if !g.allows_duplicates() && dup_effects > 0 {
            violations.push(format!("{dup_effects} duplicate effects under {g}"));
        }
        // A cut that dropped nothing injected nothing: the run proves nothing about cuts.
        let connections_cut = self.connections_cut;
        if connections_cut < u64::from(cuts) {
            violations.push(format!(
                "cut={cuts} dropped only {connections_cut} connections: the fault was not injected"
            ));
        }
        // Likewise a kill that found no handler in flight: the run proves nothing about crashes.
        if self.crashes < kills {
            violations.push(format!(
                "kill={kills} crashed only {} consumers (no handler was in flight): the fault was not injected",
                self.crashes
            ));
        }
        Report {
            backend: self.backend.to_owned(),
            guarantee: g,
            faults: plan.faults.clone(),
            sabotage: plan.sabotage,
            sent: sent.len() as u64,
            effects: ledger.total_effects.load(Ordering::Relaxed),
            handled,
            lost,
            lost_undelivered,
            duplicate_effects: dup_effects,
            redeliveries,
            dead_lettered: self.dead_lettered,
            duplicates_absorbed: self.absorbed,
            crashes: self.crashes,
            consumer_processes: self.consumer_processes,
            producer_process: self.producer_process,
            connections_cut,
            throughput: ledger.total_effects.load(Ordering::Relaxed) as f64 / busy,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            holds: violations.is_empty(),
            violations,
            seconds,
            destination: self.destination,
            removed: self.removed,
            cleanup_error: self.cleanup_error,
        }
    }
}
