//! # courier-sqs
//!
//! The AWS SQS backend of courier, over aws-sdk-sqs and the standard AWS configuration chain
//! (environment, profile, instance role; `endpoint` for LocalStack).
//!
//! | | at-most-once | at-least-once | exactly-once |
//! |---|---|---|---|
//! | publish | one attempt, SDK retries off | SDK retries (standard mode) | FIFO queue: `MessageDeduplicationId` = courier id, `MessageGroupId` = key |
//! | consume | deleted before the handler | deleted after the handler; a visibility **heartbeat** extends the timeout while the handler runs | as at-least-once + the idempotent layer |
//! | nack / retry | — | `ChangeMessageVisibility(delay)` | same |
//! | dead letter | — | confirmed send to the dead-letter queue, then delete (a `RedrivePolicy` is created with `create_dead_letter_queue`) | same |
//!
//! The courier id, key and headers travel as message attributes (`courier-id`, `courier-key`, and all application
//! headers packed as JSON in `courier-headers`), so a message uses at most 4 of SQS's 10 attributes. Text
//! payloads are sent as the body; binary payloads are base64-encoded with `courier-encoding = base64`.
//! Exactly-once on a standard queue without an `[idempotency]` store is refused.
//!
//! Closing a subscription (a consumer's shutdown) waits for the long poll in flight — at most the
//! `wait_time` (20 s by default) plus 5 s — and makes whatever it brought visible again at once:
//! abandoning a long poll can leave the messages SQS hands it invisible for their whole
//! visibility timeout. Lower `wait_time` for faster shutdowns.

mod client;
mod doctor;

pub use client::SqsClient;
pub use doctor::doctor;

use courier_core::config::SqsConfig;
use courier_core::{BackendConfig, Config, Error, Explanation, Guarantee, Result};

pub(crate) const BACKEND: &str = "sqs";

fn section(config: &Config) -> Result<&SqsConfig> {
    match &config.backend {
        BackendConfig::Sqs(s) => Ok(s),
        other => Err(Error::config(format!(
            "courier_sqs needs [backend] kind = \"sqs\", got {:?}",
            other.kind()
        ))),
    }
}

/// Connect with the guarantee and settings of `config`.
pub async fn connect(config: &Config) -> Result<SqsClient> {
    config.validate()?;
    let s = section(config)?;
    if config.guarantee == Guarantee::ExactlyOnce && !s.fifo && config.idempotency.is_none() {
        return Err(Error::unsupported(
            BACKEND,
            "exactly-once on standard queues without an idempotency store",
            "set backend.fifo = true (FIFO queues dedup by id for 5 minutes), or add an [idempotency] section (redis:// or postgres://)",
        ));
    }
    SqsClient::connect(s.clone(), config.guarantee, config.idempotency.is_some()).await
}

/// The effective settings for `config`'s guarantee, without connecting.
pub fn explain(config: &Config) -> Result<Explanation> {
    Ok(explain_settings(section(config)?, config.guarantee))
}

pub(crate) fn explain_settings(s: &SqsConfig, g: Guarantee) -> Explanation {
    let amo = g == Guarantee::AtMostOnce;
    let mut e = Explanation::new(BACKEND, g)
        .set(
            "client",
            "region",
            s.region.as_deref().unwrap_or("(AWS chain)"),
            "from config or the standard AWS chain",
        )
        .set(
            "client",
            "endpoint",
            s.endpoint.as_deref().unwrap_or("(AWS)"),
            "override for LocalStack",
        )
        .set(
            "producer",
            "SDK retries",
            if amo {
                "off (1 attempt)"
            } else {
                "standard, 5 attempts"
            },
            if amo {
                "at-most-once never re-sends"
            } else {
                "a failed send is retried with the same id"
            },
        )
        .set(
            "producer",
            "queue type",
            if s.fifo { "FIFO (.fifo)" } else { "standard" },
            "FIFO gives per-key order and 5-minute dedup by id",
        )
        .set(
            "producer",
            "MessageGroupId",
            if s.fifo {
                "key, else default_group_id"
            } else {
                "-"
            },
            "per-key order on FIFO queues",
        )
        .set(
            "producer",
            "MessageDeduplicationId",
            if s.fifo { "courier id" } else { "-" },
            "a re-sent id within 5 minutes is dropped by SQS",
        )
        .set(
            "producer",
            "attributes",
            "courier-id, courier-key, courier-headers (JSON)",
            "at most 4 of the 10 allowed",
        )
        .set(
            "consumer",
            "delete",
            if amo {
                "before the handler"
            } else {
                "after the handler"
            },
            "the guarantee's settle order",
        )
        .set(
            "consumer",
            "visibility timeout",
            format!("{:?}", s.visibility_timeout),
            "redelivery window; the lease of the idempotent layer",
        )
        .set(
            "consumer",
            "heartbeat",
            if amo {
                "-".to_owned()
            } else {
                format!("every {:?}", s.visibility_timeout / 3)
            },
            "extends visibility while the handler runs",
        )
        .set(
            "consumer",
            "long poll",
            format!("{:?}", s.wait_time),
            "WaitTimeSeconds of ReceiveMessage",
        )
        .set("consumer", "attempt", "ApproximateReceiveCount", "")
        .set(
            "consumer",
            "nack",
            "ChangeMessageVisibility(delay)",
            "backoff without blocking other messages",
        )
        .set(
            "topology",
            "dead letter",
            if s.create_dead_letter_queue {
                format!(
                    "<queue>-dlq, RedrivePolicy maxReceiveCount={}",
                    s.max_receive_count
                )
            } else {
                "<queue>-dlq (courier sends failed messages there)".into()
            },
            "after the retry policy's last attempt",
        )
        .set(
            "topology",
            "auto_create",
            s.auto_create,
            "create missing queues instead of failing",
        );
    if g == Guarantee::ExactlyOnce {
        e = e.note("exactly-once = FIFO dedup (5 minutes) + the idempotent layer: visibility expiry can still redeliver");
    }
    e
}
