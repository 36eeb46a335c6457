//! What `courier doctor` reports: findings with a severity and a fix. The portability findings
//! come from the `courier` facade; each backend crate's `doctor` function checks its own
//! broker live.

use std::fmt;

use serde::Serialize;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// The guarantee or an assumption weakens unless the fix is applied.
    Warning,
    /// The configuration will be refused or break the guarantee.
    Error,
}

/// One thing `doctor` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Severity.
    pub severity: Severity,
    /// The broker the finding is about (`kafka`, `rabbitmq`, `sqs`, `memory`).
    pub backend: String,
    /// What is different or wrong.
    pub what: String,
    /// How to fix it.
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.severity {
            Severity::Info => "info",
            Severity::Warning => "warn",
            Severity::Error => "FAIL",
        };
        write!(
            f,
            "[{s}] {}: {}\n       fix: {}",
            self.backend, self.what, self.fix
        )
    }
}

/// Findings about one backend, collected by its live checks.
#[derive(Debug)]
pub struct Findings {
    backend: &'static str,
    items: Vec<Finding>,
}

impl Findings {
    /// No findings yet about `backend`.
    pub fn new(backend: &'static str) -> Self {
        Findings {
            backend,
            items: Vec::new(),
        }
    }

    /// Add one.
    pub fn add(&mut self, severity: Severity, what: impl Into<String>, fix: impl Into<String>) {
        self.items.push(Finding {
            severity,
            backend: self.backend.to_owned(),
            what: what.into(),
            fix: fix.into(),
        });
    }

    /// The findings, in the order added.
    pub fn into_vec(self) -> Vec<Finding> {
        self.items
    }
}
