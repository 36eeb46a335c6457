//! # courier-rabbitmq
//!
//! The RabbitMQ backend of courier, over lapin.
//!
//! | | at-most-once | at-least-once | exactly-once |
//! |---|---|---|---|
//! | publish | `delivery_mode=1`, returns once written (confirm mode, but confirms are not awaited; `close` waits for them) | `confirm_select`, `mandatory`, `delivery_mode=2`; returns on the broker's ack; a *returned* message is [`Error::Unroutable`](courier_core::Error::Unroutable), a nack or a lost connection is retried with the same `message_id` | as at-least-once |
//! | consume | `no_ack` (settled on delivery) | manual ack after the handler, `basic.qos` prefetch | as at-least-once + the idempotent layer (`message_id` = courier id; RabbitMQ has no dedup) |
//!
//! Topology: a destination is a durable **topic exchange**; a subscription `(destination, group)` is a durable
//! queue `<destination>.<group>` (quorum by default) bound with `#`, so every group receives every message and
//! members of a group compete. Delayed redelivery (`nack(delay)`, retries) rounds the delay up to a step of
//! [`DELAY_STEPS_MS`] (50 ms … 1 h) and parks the message in that step's delay queue `<destination>.<group>.delay.<ms>`
//! (declared on first use, the TTL set on the queue), whose expired messages dead-letter back into the work queue:
//! every message of a delay queue waits the same time, so a short retry never waits behind a long one. Dead letters
//! are published (confirmed) to the subscription's dead-letter exchange `<destination>-dlq`, which keeps them in a
//! queue of the same name.

mod client;
mod consume;
mod doctor;

pub use client::{delay_queue, RabbitMqClient, DELAY_STEPS_MS};
pub use doctor::doctor;

use courier_core::config::{QueueType, RabbitMqConfig};
use courier_core::{BackendConfig, Config, Error, Explanation, Guarantee, Result};

pub(crate) const BACKEND: &str = "rabbitmq";

fn section(config: &Config) -> Result<&RabbitMqConfig> {
    match &config.backend {
        BackendConfig::Rabbitmq(r) => Ok(r),
        other => Err(Error::config(format!(
            "courier_rabbitmq needs [backend] kind = \"rabbitmq\", got {:?}",
            other.kind()
        ))),
    }
}

/// Connect with the guarantee and settings of `config`.
///
/// Exactly-once without an `[idempotency]` section is refused: RabbitMQ cannot deduplicate.
pub async fn connect(config: &Config) -> Result<RabbitMqClient> {
    config.validate()?;
    let r = section(config)?;
    if config.guarantee == Guarantee::ExactlyOnce && config.idempotency.is_none() {
        return Err(Error::unsupported(
            BACKEND,
            "exactly-once without an idempotency store",
            "RabbitMQ has no message dedup: add an [idempotency] section (store = \"redis://…\" or \"postgres://…\"), or use at-least-once",
        ));
    }
    RabbitMqClient::connect(r.clone(), config.guarantee).await
}

/// The effective settings for `config`'s guarantee, without connecting.
pub fn explain(config: &Config) -> Result<Explanation> {
    let r = section(config)?;
    Ok(explain_settings(r, config.guarantee))
}

pub(crate) fn explain_settings(r: &RabbitMqConfig, g: Guarantee) -> Explanation {
    let confirmed = g != Guarantee::AtMostOnce;
    let queue_type = match r.queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    let mut e = Explanation::new(BACKEND, g)
        .set(
            "connection",
            "url",
            r.url.redacted(),
            "credentials are never printed",
        )
        .set(
            "producer",
            "confirm_select",
            true,
            if confirmed {
                "publish returns only after the broker's ack"
            } else {
                "publish returns once written, without waiting for the ack; close waits for the acks"
            },
        )
        .set(
            "producer",
            "mandatory",
            confirmed,
            if confirmed {
                "an unroutable message comes back as an Unroutable error, not a silent drop"
            } else {
                "at-most-once waits for nothing, so a returned message could not be reported"
            },
        )
        .set(
            "producer",
            "delivery_mode",
            if confirmed { 2 } else { 1 },
            if confirmed {
                "persistent: survives a broker restart"
            } else {
                "transient"
            },
        )
        .set(
            "producer",
            "message_id",
            "courier id",
            "kept across retries: the idempotency key",
        )
        .set(
            "producer",
            "confirm_timeout",
            format!("{:?}", r.confirm_timeout),
            "no confirm within it: publish again (same id) on a fresh channel",
        )
        .set(
            "connection",
            "operation_timeout",
            format!("{:?}", r.operation_timeout),
            "any other broker round trip (connect, channel, qos, ack) unanswered within it: the channel or connection is replaced; an ack that lapsed is reported expired",
        )
        .set(
            "topology",
            "destination",
            "durable topic exchange",
            "every group's queue is bound with #",
        )
        .set(
            "topology",
            "queue",
            format!("<destination>.<group>, durable, x-queue-type={queue_type}"),
            "one queue per consumer group",
        )
        .set(
            "topology",
            "queue dead letters",
            match r.queue_type {
                QueueType::Quorum => format!(
                    "x-delivery-limit={}, x-dead-letter-exchange=the subscription's dead-letter exchange",
                    r.delivery_limit
                ),
                QueueType::Classic => {
                    "x-dead-letter-exchange=the subscription's dead-letter exchange".to_owned()
                }
            },
            "a message the broker gives up on is dead-lettered, never dropped",
        )
        .set(
            "topology",
            "auto_create",
            r.auto_create,
            "declare exchanges on first use instead of failing",
        )
        .set(
            "consumer",
            "ack mode",
            if confirmed {
                "manual, after the handler"
            } else {
                "no_ack (settled on delivery)"
            },
            "the guarantee's settle order",
        )
        .set(
            "consumer",
            "basic.qos prefetch",
            r.prefetch,
            "unsettled deliveries per consumer",
        )
        .set(
            "consumer",
            "retry",
            "<queue>.delay.<ms>: one queue per delay step (TTL on the queue), dead-lettered back",
            "nack(delay) without blocking the queue; a short retry never waits behind a long one",
        )
        .set(
            "consumer",
            "dead letter",
            "confirmed publish to the dead-letter exchange, then ack",
            "nothing lost between the two",
        )
        .set(
            "connection",
            "recovery",
            "reconnect with backoff; unconfirmed publishes are retried",
            "a lost confirm is never reported as success",
        );
    if g == Guarantee::ExactlyOnce {
        e = e.note("exactly-once = at-least-once + message_id + the idempotent layer: RabbitMQ itself has no dedup");
    }
    e
}
