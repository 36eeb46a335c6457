//! The conformance scenarios. Each takes a [`TestBackend`], consults its capabilities, and returns
//! `Err` (with counts) when the backend broke the contract.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use parking_lot::Mutex;

use courier_core::{
    header, json_handler_fn, BatchHandler, BatchOptions, Consumer, ConsumerHandle, Context,
    DeliveryClient, Error, GroupInfo, Guarantee, Handler, HandlerError, Message, RetryPolicy,
    Subscription,
};
use courier_idempotency::Idempotent;

use crate::endpoints::scaled;
use crate::{unique, Ledger, TestBackend};

/// A broken contract, with what was observed.
#[derive(Debug)]
pub struct ScenarioError(pub String);

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScenarioError {}

impl From<Error> for ScenarioError {
    fn from(e: Error) -> Self {
        ScenarioError(format!("unexpected courier error ({}): {e}", e.kind()))
    }
}

/// Result of a scenario.
pub type Outcome = Result<(), ScenarioError>;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(ScenarioError(format!($($arg)*)));
        }
    };
}

fn wait() -> Duration {
    scaled(Duration::from_secs(60))
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::attempts(max_attempts)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// Start `consumer` with `handler` — through the idempotent layer (namespaced by `group`) when
/// the backend asks for it, so the same scenarios prove the layer changes nothing they check.
async fn launch<H: Handler>(
    b: &dyn TestBackend,
    consumer: Consumer,
    group: &str,
    handler: H,
) -> courier_core::Result<ConsumerHandle> {
    match b.layer_store() {
        Some(store) => {
            consumer
                .spawn(
                    Idempotent::new(handler, store)
                        .namespace(group)
                        .lease(Duration::from_secs(5)),
                )
                .await
        }
        None => consumer.spawn(handler).await,
    }
}

/// A handler that records each message id in a ledger (optionally failing some attempts).
struct Recorder {
    ledger: Arc<Ledger>,
    fail_first: u32,
    attempts: Mutex<HashMap<String, u32>>,
}

impl Recorder {
    fn new(ledger: Arc<Ledger>) -> Self {
        Recorder {
            ledger,
            fail_first: 0,
            attempts: Mutex::default(),
        }
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, message: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        let n = {
            let mut a = self.attempts.lock();
            let n = a.entry(message.id.to_string()).or_default();
            *n += 1;
            *n
        };
        if n <= self.fail_first {
            return Err(HandlerError::retryable(format!("injected failure {n}")));
        }
        self.ledger.handled(message.id.as_str());
        Ok(())
    }
}

async fn publish_all(
    client: &dyn DeliveryClient,
    dest: &str,
    msgs: &[Message],
    ledger: &Ledger,
) -> Outcome {
    for m in msgs {
        client.publish(dest, m.clone()).await?;
        ledger.sent(m.id.as_str());
    }
    Ok(())
}

async fn stop(handles: Vec<ConsumerHandle>) -> Outcome {
    for h in handles {
        h.shutdown().await?;
    }
    Ok(())
}

/// Receive and ack deliveries until `want` distinct ids outside `except` arrived, or nothing
/// arrives within the wait; returns those ids.
async fn ack_distinct(
    deliveries: &mut courier_core::Deliveries,
    want: usize,
    except: &std::collections::HashSet<courier_core::MessageId>,
) -> Result<std::collections::HashSet<courier_core::MessageId>, ScenarioError> {
    let mut got = std::collections::HashSet::new();
    while got.len() < want {
        let Some(d) = deliveries.next_timeout(wait()).await else {
            break;
        };
        let d = d?;
        if !except.contains(&d.message.id) {
            got.insert(d.message.id.clone());
        }
        d.ack().await?;
    }
    Ok(got)
}

fn numbered(n: usize, prefix: &str) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("{prefix}-{i}")).with_header("seq", i.to_string()))
        .collect()
}

mod delivery;
mod exactly_once;
mod failures;
mod features;

pub use delivery::*;
pub use exactly_once::*;
pub use failures::*;
pub use features::*;

/// Names of all scenarios, in suite order.
pub const ALL: &[&str] = &[
    "round_trip",
    "competing_consumers_no_loss",
    "nack_redelivers",
    "unsettled_redelivered_to_another_consumer",
    "settled_never_redelivered",
    "at_most_once_never_handles_twice",
    "per_key_order_across_consumers",
    "every_group_receives_everything",
    "destination_isolation",
    "close_flushes_pending_publishes",
    "close_returns_promptly_with_deliveries_waiting",
    "declared_group_keeps_what_is_published_before_it_subscribes",
    "oversize_payload_is_rejected_before_sending",
    "missing_destination_is_a_typed_error",
    "handler_errors_retry_then_dead_letter",
    "deferrals_never_dead_letter",
    "permanent_error_dead_letters_at_once",
    "batch_settles_only_after_success",
    "exactly_once_effects_with_idempotent_layer",
    "prepared_deliveries_are_handled_or_abandoned",
    "handler_outputs_arrive_and_inputs_settle",
    "typed_messages_round_trip_and_bad_payloads_dead_letter",
    "delayed_delivery_waits_until_due",
    "request_reply_answers_a_repeated_request_from_the_stored_result",
    "admin_inspects_and_deletes",
];

/// Run one scenario by name.
pub async fn run(name: &str, b: &dyn TestBackend) -> Outcome {
    match name {
        "round_trip" => round_trip(b).await,
        "competing_consumers_no_loss" => competing_consumers_no_loss(b).await,
        "nack_redelivers" => nack_redelivers(b).await,
        "unsettled_redelivered_to_another_consumer" => {
            unsettled_redelivered_to_another_consumer(b).await
        }
        "settled_never_redelivered" => settled_never_redelivered(b).await,
        "at_most_once_never_handles_twice" => at_most_once_never_handles_twice(b).await,
        "per_key_order_across_consumers" => per_key_order_across_consumers(b).await,
        "every_group_receives_everything" => every_group_receives_everything(b).await,
        "destination_isolation" => destination_isolation(b).await,
        "close_flushes_pending_publishes" => close_flushes_pending_publishes(b).await,
        "close_returns_promptly_with_deliveries_waiting" => {
            close_returns_promptly_with_deliveries_waiting(b).await
        }
        "declared_group_keeps_what_is_published_before_it_subscribes" => {
            declared_group_keeps_what_is_published_before_it_subscribes(b).await
        }
        "oversize_payload_is_rejected_before_sending" => {
            oversize_payload_is_rejected_before_sending(b).await
        }
        "missing_destination_is_a_typed_error" => missing_destination_is_a_typed_error(b).await,
        "handler_errors_retry_then_dead_letter" => handler_errors_retry_then_dead_letter(b).await,
        "deferrals_never_dead_letter" => deferrals_never_dead_letter(b).await,
        "permanent_error_dead_letters_at_once" => permanent_error_dead_letters_at_once(b).await,
        "batch_settles_only_after_success" => batch_settles_only_after_success(b).await,
        "exactly_once_effects_with_idempotent_layer" => {
            exactly_once_effects_with_idempotent_layer(b).await
        }
        "prepared_deliveries_are_handled_or_abandoned" => {
            prepared_deliveries_are_handled_or_abandoned(b).await
        }
        "handler_outputs_arrive_and_inputs_settle" => {
            handler_outputs_arrive_and_inputs_settle(b).await
        }
        "typed_messages_round_trip_and_bad_payloads_dead_letter" => {
            typed_messages_round_trip_and_bad_payloads_dead_letter(b).await
        }
        "delayed_delivery_waits_until_due" => delayed_delivery_waits_until_due(b).await,
        "request_reply_answers_a_repeated_request_from_the_stored_result" => {
            request_reply_answers_a_repeated_request_from_the_stored_result(b).await
        }
        "admin_inspects_and_deletes" => admin_inspects_and_deletes(b).await,
        other => Err(ScenarioError(format!("no scenario named {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::check_key_order;

    #[test]
    fn key_order_accepts_in_order_and_replays_from_an_earlier_position() {
        let straight: Vec<usize> = (0..5).collect();
        assert_eq!(check_key_order(&straight, 5), Ok(()));
        // Handled 0..=3, then the partition moved and the new owner replayed from #2.
        assert_eq!(check_key_order(&[0, 1, 2, 3, 2, 3, 4], 5), Ok(()));
        // Replayed whole three times (a rebalance before any commit landed).
        let thrice: Vec<usize> = (0..3).cycle().take(9).collect();
        assert_eq!(check_key_order(&thrice, 3), Ok(()));
    }

    #[test]
    fn key_order_rejects_swaps_interleavings_gaps_and_missing_tails() {
        assert!(check_key_order(&[0, 2, 1, 3], 4).is_err());
        // Two deliveries of the key running at once: 5.. and 9.. interleave.
        assert!(check_key_order(&[0, 1, 2, 3, 4, 5, 9, 6, 10], 11).is_err());
        assert!(check_key_order(&[1, 2], 3).is_err());
        assert!(check_key_order(&[0, 1], 3).is_err());
        assert!(check_key_order(&[], 1).is_err());
    }
}
