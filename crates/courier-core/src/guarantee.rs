//! The three delivery guarantees.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The delivery guarantee a client is configured with.
///
/// The guarantee is configured once (per client) and courier compiles it into broker settings and
/// into the order of settle-vs-handler in the consume loop. See the contract table in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Guarantee {
    /// Publish without confirmation or retry; settle before the handler runs. Effects: 0 or 1.
    AtMostOnce,
    /// Publish with broker confirmation and retries; settle after the handler succeeded. Effects: ≥ 1.
    #[default]
    AtLeastOnce,
    /// At-least-once plus broker dedup where possible and the idempotent-consumer layer (or
    /// transactions). Effects: exactly 1 within the dedup window.
    ExactlyOnce,
}

impl Guarantee {
    /// All guarantees, weakest first.
    pub const ALL: [Guarantee; 3] = [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::ExactlyOnce,
    ];

    /// The kebab-case name used in config files, URLs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Guarantee::AtMostOnce => "at-most-once",
            Guarantee::AtLeastOnce => "at-least-once",
            Guarantee::ExactlyOnce => "exactly-once",
        }
    }

    /// Whether a message may be lost under this guarantee.
    pub fn allows_loss(self) -> bool {
        matches!(self, Guarantee::AtMostOnce)
    }

    /// Whether a message's effect may happen more than once under this guarantee.
    pub fn allows_duplicates(self) -> bool {
        matches!(self, Guarantee::AtLeastOnce)
    }

    /// Whether deliveries are settled before the handler runs.
    pub fn settles_before_handler(self) -> bool {
        matches!(self, Guarantee::AtMostOnce)
    }
}

impl fmt::Display for Guarantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Guarantee {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm: String = s
            .trim()
            .to_ascii_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        match norm.as_str() {
            "atmostonce" | "amo" => Ok(Guarantee::AtMostOnce),
            "atleastonce" | "alo" => Ok(Guarantee::AtLeastOnce),
            "exactlyonce" | "eo" | "eos" => Ok(Guarantee::ExactlyOnce),
            _ => Err(Error::config(format!(
                "unknown guarantee {s:?}: use one of at-most-once, at-least-once, exactly-once"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_spellings() {
        for g in Guarantee::ALL {
            assert_eq!(g.as_str().parse::<Guarantee>().unwrap(), g);
        }
        assert_eq!(
            "AtLeastOnce".parse::<Guarantee>().unwrap(),
            Guarantee::AtLeastOnce
        );
        assert_eq!(
            "exactly_once".parse::<Guarantee>().unwrap(),
            Guarantee::ExactlyOnce
        );
        let err = "twice".parse::<Guarantee>().unwrap_err();
        assert!(matches!(err, Error::Config { .. }));
    }
}
