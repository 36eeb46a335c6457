//! `[backend] kind = "memory"`: the in-process broker.

use std::time::Duration;

use courier_core::config::BackendUrl;
use courier_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Configuration of the in-process memory broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Clients with the same broker name in one process share one broker.
    pub broker: String,
    /// Largest accepted message (envelope included), bytes.
    pub max_payload: usize,
    /// Create destinations on first publish/subscribe instead of failing.
    pub auto_create: bool,
    /// Redeliver a delivery that was not settled within this time (like an SQS visibility
    /// timeout); `None` = only when its consumer goes away.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Option<Duration>,
    /// Exactly-once publishes with an id seen within this window are dropped by the broker.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Fault injection.
    pub faults: MemoryFaults,
}

impl MemoryConfig {
    /// `memory://[name]`: the in-process broker of that name (default `default`); no path, no
    /// parameters beyond the common ones.
    pub(crate) fn from_url(url: &BackendUrl<'_>) -> Result<Self> {
        url.refuse_path()?;
        url.refuse_host_list()?;
        if let Some((name, _)) = url.params().next() {
            return Err(url.unknown_param(name, &[]));
        }
        Ok(MemoryConfig {
            broker: url.host().unwrap_or("default").to_owned(),
            auto_create: url.auto_create()?,
            ..MemoryConfig::default()
        })
    }

    pub(crate) fn validate_section(&self) -> Result<()> {
        self.faults.validate()?;
        if self.max_payload == 0 {
            return Err(Error::config("backend.max_payload must be > 0"));
        }
        Ok(())
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            broker: "default".into(),
            max_payload: 1024 * 1024,
            auto_create: false,
            ack_timeout: None,
            dedup_window: Duration::from_secs(300),
            faults: MemoryFaults::default(),
        }
    }
}

/// Fault knobs of the memory broker. Probabilities are 0.0..=1.0; all off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryFaults {
    /// A publish is lost on the way to the broker. At-most-once returns Ok (no confirm) and the
    /// message is gone; confirmed guarantees see no confirm and retry with the same id.
    pub drop_on_publish: f64,
    /// The broker stores a publish but its confirm is lost, so a confirmed publish is retried and
    /// stored twice (unless the broker dedups by id).
    pub duplicate_on_publish: f64,
    /// A delivery is handed out twice.
    pub duplicate_delivery: f64,
    /// Random extra latency per delivery, up to this.
    #[serde(with = "humantime_serde")]
    pub max_delay: Option<Duration>,
    /// The consumer "crashes" when it settles: the settle is lost and the message is redelivered.
    pub crash_before_settle: f64,
    /// BROKEN BROKER: a confirmed message is forgotten. Only for proving that checkers catch loss.
    pub lose_acknowledged: f64,
    /// BROKEN BROKER: an acknowledged message is delivered again anyway. Only for proving that
    /// checkers catch duplicates.
    pub redeliver_settled: f64,
    /// Random seed (for reproducible fault patterns).
    pub seed: Option<u64>,
}

impl MemoryFaults {
    /// Whether any fault is switched on.
    pub fn any(&self) -> bool {
        self.drop_on_publish > 0.0
            || self.duplicate_on_publish > 0.0
            || self.duplicate_delivery > 0.0
            || self.max_delay.is_some()
            || self.crash_before_settle > 0.0
            || self.lose_acknowledged > 0.0
            || self.redeliver_settled > 0.0
    }

    fn validate(&self) -> Result<()> {
        for (name, p) in [
            ("drop_on_publish", self.drop_on_publish),
            ("duplicate_on_publish", self.duplicate_on_publish),
            ("duplicate_delivery", self.duplicate_delivery),
            ("crash_before_settle", self.crash_before_settle),
            ("lose_acknowledged", self.lose_acknowledged),
            ("redeliver_settled", self.redeliver_settled),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::config(format!(
                    "backend.faults.{name} = {p} is not a probability: use a value from 0.0 to 1.0"
                )));
            }
        }
        Ok(())
    }
}
