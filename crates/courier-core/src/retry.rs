//! What happens to a message whose handler failed: the [`RetryStrategy`] trait the consume loop
//! asks, and [`RetryPolicy`], the configurable strategy every consumer uses unless given another
//! (exponential backoff with jitter and a maximum number of attempts).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{HandlerError, Message};

/// What the consume loop does with a message whose handler failed.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RetryDecision {
    /// Have the broker deliver it again after this delay (its attempt number grows).
    Retry(Duration),
    /// Send it to the subscription's dead-letter destination, with this reason.
    DeadLetter(String),
}

/// A failed handler run, as a [`RetryStrategy`] sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Failure<'a> {
    /// The message the handler failed on.
    pub message: &'a Message,
    /// The attempt that just failed, 1 for the first delivery.
    pub attempt: u32,
    /// How it failed: [`HandlerError::Retryable`] or [`HandlerError::Permanent`] (a deferral is
    /// not a failure and never reaches the strategy: it is redelivered after its delay, never
    /// dead-lettered).
    pub error: &'a HandlerError,
}

impl<'a> Failure<'a> {
    /// A failure of `message` at `attempt` (for testing a strategy).
    pub fn new(message: &'a Message, attempt: u32, error: &'a HandlerError) -> Self {
        Failure {
            message,
            attempt,
            error,
        }
    }

    /// The handler's error message.
    pub fn reason(&self) -> String {
        match self.error {
            HandlerError::Retryable(e) | HandlerError::Permanent(e) => e.to_string(),
            HandlerError::Defer { reason, .. } => reason.clone(),
        }
    }
}

/// Decides, for each failed handler run, whether the message is tried again (and when) or
/// dead-lettered. [`RetryPolicy`] is the configurable default; implement this trait for rules it
/// cannot express, e.g. dead-letter validation errors at once and retry timeouts for longer, and
/// pass it to [`Consumer::retry_strategy`](crate::Consumer::retry_strategy).
///
/// Whatever the strategy decides, nothing is lost: a retry is a broker redelivery and a dead
/// letter is confirmed before the message is acknowledged.
pub trait RetryStrategy: Send + Sync + std::fmt::Debug + 'static {
    /// What to do with `failure`'s message.
    fn decide(&self, failure: &Failure<'_>) -> RetryDecision;

    /// The redelivery delay of an input whose handler succeeded but whose outputs could not be
    /// published (the input is always tried again: the outputs are not lost).
    fn output_retry_delay(&self) -> Duration {
        Duration::from_millis(200)
    }

    /// Check the strategy when the consumer starts; an error stops it from starting.
    fn validate(&self) -> crate::Result<()> {
        Ok(())
    }
}

impl RetryStrategy for RetryPolicy {
    /// A retryable error is tried again after [`RetryPolicy::delay`] until `max_attempts`
    /// attempts failed; a permanent error, or the last attempt, is dead-lettered.
    fn decide(&self, failure: &Failure<'_>) -> RetryDecision {
        match failure.error {
            HandlerError::Retryable(_) if self.should_retry(failure.attempt) => {
                RetryDecision::Retry(self.delay(failure.attempt))
            }
            _ => RetryDecision::DeadLetter(failure.reason()),
        }
    }

    fn output_retry_delay(&self) -> Duration {
        self.delay(1)
    }

    fn validate(&self) -> crate::Result<()> {
        RetryPolicy::validate(self)
    }
}

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
    fn the_policy_retries_retryable_errors_until_the_last_attempt() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::attempts(3)
        };
        let m = Message::new("x");
        let retryable = HandlerError::retryable("flaky");
        let permanent = HandlerError::permanent("bad data");
        assert_eq!(
            p.decide(&Failure::new(&m, 1, &retryable)),
            RetryDecision::Retry(p.initial_backoff)
        );
        assert_eq!(
            p.decide(&Failure::new(&m, 3, &retryable)),
            RetryDecision::DeadLetter("flaky".into())
        );
        assert_eq!(
            p.decide(&Failure::new(&m, 1, &permanent)),
            RetryDecision::DeadLetter("bad data".into())
        );
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
