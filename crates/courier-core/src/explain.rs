//! `courier explain`: the effective broker settings a guarantee compiles into.

use std::fmt;

use serde::Serialize;

use crate::Guarantee;

/// One effective setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Setting {
    /// Where it applies: `producer`, `consumer`, `topology`, `settle`, ...
    pub scope: String,
    /// Setting name as the broker or client calls it.
    pub name: String,
    /// Effective value (secrets are redacted).
    pub value: String,
    /// Why courier chose it for this guarantee.
    pub why: String,
}

/// The effective settings of a client for its guarantee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// Backend name.
    pub backend: String,
    /// The guarantee the settings implement.
    pub guarantee: Guarantee,
    /// The settings, in the order they matter.
    pub settings: Vec<Setting>,
    /// Caveats the user should know (e.g. what the guarantee does not cover).
    pub notes: Vec<String>,
}

impl Explanation {
    /// An empty explanation for `backend` and `guarantee`.
    pub fn new(backend: impl Into<String>, guarantee: Guarantee) -> Self {
        Explanation {
            backend: backend.into(),
            guarantee,
            settings: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Add a setting.
    pub fn set(
        mut self,
        scope: &str,
        name: &str,
        value: impl fmt::Display,
        why: impl Into<String>,
    ) -> Self {
        self.settings.push(Setting {
            scope: scope.to_owned(),
            name: name.to_owned(),
            value: value.to_string(),
            why: why.into(),
        });
        self
    }

    /// Add a note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    /// Look up a setting's value by name.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.settings
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.value.as_str())
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "backend:   {}", self.backend)?;
        writeln!(f, "guarantee: {}", self.guarantee)?;
        let w_scope = self
            .settings
            .iter()
            .map(|s| s.scope.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let w_name = self
            .settings
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(7)
            .max(7);
        let w_value = self
            .settings
            .iter()
            .map(|s| s.value.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(f)?;
        writeln!(
            f,
            "{:w_scope$}  {:w_name$}  {:w_value$}  why",
            "scope", "setting", "value"
        )?;
        for s in &self.settings {
            writeln!(
                f,
                "{:w_scope$}  {:w_name$}  {:w_value$}  {}",
                s.scope, s.name, s.value, s.why
            )?;
        }
        if !self.notes.is_empty() {
            writeln!(f)?;
            for n in &self.notes {
                writeln!(f, "note: {n}")?;
            }
        }
        Ok(())
    }
}
