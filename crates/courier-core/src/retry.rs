//! Retry policy: exponential backoff with jitter and a maximum number of attempts.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How failed messages are retried before they are dead-lettered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in total (first delivery included) before dead-lettering. `1` = no retries.
    pub max_attempts: u32,
    /// Delay before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Upper bound for a delay.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Growth factor per attempt.
    pub multiplier: f64,
    /// Random spread as a fraction of the delay (0.2 = ±20%), so retries of many messages do not
    /// arrive in lockstep.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// A policy with `max_attempts` and otherwise default values.
    pub fn attempts(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            ..Self::default()
        }
    }

    /// Set the backoff bounds.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Whether a message whose attempt number `attempt` just failed may be tried again.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// Delay before retrying after attempt number `attempt` (1-based) failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(63) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + jitter * (fastrand::f64() * 2.0 - 1.0);
        Duration::from_secs_f64((capped * factor).max(0.0))
    }

    /// Check the policy for nonsense values.
    pub fn validate(&self) -> crate::Result<()> {
        if self.max_attempts == 0 {
            return Err(crate::Error::config(
                "retry.max_attempts must be at least 1 (1 = no retries)",
            ));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(crate::Error::config(
                "retry.multiplier must be a number ≥ 1.0",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(crate::Error::config(
                "retry.jitter must be between 0.0 and 1.0",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        }
        .backoff(Duration::from_millis(100), Duration::from_millis(350));
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(3), Duration::from_millis(350));
        assert_eq!(p.delay(60), Duration::from_millis(350));
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let p = RetryPolicy::default().backoff(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..1000 {
            let d = p.delay(1);
            assert!(
                d >= Duration::from_millis(80) && d <= Duration::from_millis(120),
                "{d:?}"
            );
        }
    }

    #[test]
    fn attempts_and_validation() {
        let p = RetryPolicy::attempts(3);
        assert!(p.should_retry(2));
        assert!(!p.should_retry(3));
        assert!(RetryPolicy {
            max_attempts: 0,
            ..p.clone()
        }
        .validate()
        .is_err());
        assert!(RetryPolicy { jitter: 2.0, ..p }.validate().is_err());
    }
}
