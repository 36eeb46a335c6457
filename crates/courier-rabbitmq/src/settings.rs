//! The guarantee → RabbitMQ settings table: what the client applies when it publishes, declares
//! queues and consumes, each with why. `explain` prints these same values, so what it shows is
//! what is sent (the unit tests below read the applied values back from the explanation).

use crate::{QueueType, RabbitMqConfig};
use courier_core::{Explanation, Guarantee};
use lapin::types::{AMQPValue, FieldTable};

use crate::BACKEND;

/// How messages are published under a guarantee.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Publishing {
    /// `publish` returns only after the broker's confirm.
    pub(crate) await_confirm: bool,
    /// `basic.publish` `mandatory`: an unroutable message comes back instead of being dropped.
    pub(crate) mandatory: bool,
    /// AMQP `delivery_mode`: 2 persistent, 1 transient.
    pub(crate) delivery_mode: u8,
}

/// The publishing settings of guarantee `g`.
pub(crate) fn publishing(g: Guarantee) -> Publishing {
    let confirmed = g != Guarantee::AtMostOnce;
    Publishing {
        await_confirm: confirmed,
        mandatory: confirmed,
        delivery_mode: if confirmed { 2 } else { 1 },
    }
}

/// `basic.consume` `no_ack` under guarantee `g`: at-most-once is settled on delivery.
pub(crate) fn no_ack(g: Guarantee) -> bool {
    g == Guarantee::AtMostOnce
}

/// A queue argument courier sets: (name, value, why).
pub(crate) type QueueArgument = (&'static str, AMQPValue, &'static str);

fn queue_type(t: QueueType, why: &'static str) -> QueueArgument {
    let name = match t {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    ("x-queue-type", AMQPValue::LongString(name.into()), why)
}

/// The arguments of a subscription's work queue, which dead-letters into `dead_letter_exchange`.
pub(crate) fn work_queue(r: &RabbitMqConfig, dead_letter_exchange: &str) -> Vec<QueueArgument> {
    let mut args = vec![
        queue_type(
            r.queue_type,
            "queue_type from the config: quorum queues are replicated and survive a node's loss",
        ),
        (
            "x-dead-letter-exchange",
            AMQPValue::LongString(dead_letter_exchange.into()),
            "a message the broker gives up on goes to the subscription's dead-letter exchange, never dropped",
        ),
    ];
    if r.queue_type == QueueType::Quorum {
        args.push((
            "x-delivery-limit",
            AMQPValue::LongLongInt(i64::from(r.delivery_limit)),
            "redeliveries the broker allows before it dead-letters (a handler that crashes the process every time)",
        ));
    }
    args
}

/// The arguments of a subscription's dead-letter queue.
pub(crate) fn dead_letter_queue(r: &RabbitMqConfig) -> Vec<QueueArgument> {
    vec![queue_type(r.queue_type, "queue_type from the config")]
}

/// The arguments of the delay queue that holds `queue`'s retries for `step_ms`, then dead-letters
/// them back into `queue` through the default exchange.
pub(crate) fn delay_queue(queue: &str, step_ms: u64) -> Vec<QueueArgument> {
    vec![
        queue_type(
            QueueType::Classic,
            "a durable holding queue on one node: cheaper than a replicated one",
        ),
        (
            "x-dead-letter-exchange",
            AMQPValue::LongString("".into()),
            "expired retries go back through the default exchange",
        ),
        (
            "x-dead-letter-routing-key",
            AMQPValue::LongString(queue.into()),
            "… to the work queue they came from",
        ),
        (
            "x-message-ttl",
            AMQPValue::LongLongInt(i64::try_from(step_ms).unwrap_or(i64::MAX)),
            "one queue per delay step: every message in it expires in arrival order",
        ),
    ]
}

/// The arguments as sent in `queue.declare`.
pub(crate) fn table(args: &[QueueArgument]) -> FieldTable {
    let mut t = FieldTable::default();
    for (name, value, _) in args {
        t.insert((*name).into(), value.clone());
    }
    t
}

fn shown(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) if s.as_bytes().is_empty() => "\"\" (default exchange)".into(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// The effective settings of `r` under guarantee `g`, from the same functions the client applies.
pub(crate) fn explain(r: &RabbitMqConfig, g: Guarantee) -> Explanation {
    let p = publishing(g);
    let mut e = Explanation::new(BACKEND, g)
        .set(
            "connection",
            "url",
            r.url.redacted(),
            "credentials are never printed",
        )
        .set(
            "connection",
            "operation_timeout",
            format!("{:?}", r.operation_timeout),
            "any other broker round trip (connect, channel, qos, ack) unanswered within it: the channel or connection is replaced; an ack that lapsed is reported expired",
        )
        .set(
            "connection",
            "recovery",
            "reconnect with backoff; unconfirmed publishes are retried",
            "a lost confirm is never reported as success",
        )
        .set(
            "producer",
            "confirm_select",
            true,
            if p.await_confirm {
                "publish returns only after the broker's ack"
            } else {
                "publish returns once written, without waiting for the ack; close waits for the acks"
            },
        )
        .set(
            "producer",
            "mandatory",
            p.mandatory,
            if p.mandatory {
                "an unroutable message comes back as an Unroutable error, not a silent drop"
            } else {
                "at-most-once waits for nothing, so a returned message could not be reported"
            },
        )
        .set(
            "producer",
            "delivery_mode",
            p.delivery_mode,
            if p.delivery_mode == 2 {
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
            "topology",
            "destination",
            "durable topic exchange",
            "every group's queue is bound with #",
        )
        .set(
            "topology",
            "queue",
            "<destination>.<group>, durable",
            "one queue per consumer group",
        );
    let queues = [
        ("queue", work_queue(r, "<destination>-dlq")),
        ("dead-letter queue", dead_letter_queue(r)),
        ("delay queue", delay_queue("<destination>.<group>", 0)),
    ];
    for (queue, args) in queues {
        for (name, value, why) in args {
            let value = if queue == "delay queue" && name == "x-message-ttl" {
                "<step ms>".to_owned()
            } else {
                shown(&value)
            };
            e = e.set("topology", &format!("{queue} {name}"), value, why);
        }
    }
    e = e
        .set(
            "topology",
            "auto_create",
            r.auto_create,
            "declare exchanges on first use instead of failing",
        )
        .set(
            "consumer",
            "no_ack",
            no_ack(g),
            if no_ack(g) {
                "settled on delivery"
            } else {
                "manual ack after the handler: the guarantee's settle order"
            },
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
        );
    if g == Guarantee::ExactlyOnce {
        e = e.note("exactly-once = at-least-once + message_id + the idempotent layer: RabbitMQ itself has no dedup");
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value<'a>(e: &'a Explanation, name: &str) -> &'a str {
        e.value(name)
            .unwrap_or_else(|| panic!("{name} not in the explanation"))
    }

    #[test]
    fn explain_shows_what_is_applied() {
        let r = RabbitMqConfig::default();
        for g in Guarantee::ALL {
            let e = explain(&r, g);
            let p = publishing(g);
            assert_eq!(value(&e, "mandatory"), p.mandatory.to_string());
            assert_eq!(value(&e, "delivery_mode"), p.delivery_mode.to_string());
            assert_eq!(value(&e, "no_ack"), no_ack(g).to_string());
            for (name, v, _) in work_queue(&r, "<destination>-dlq") {
                assert_eq!(value(&e, &format!("queue {name}")), shown(&v));
            }
        }
        assert!(!publishing(Guarantee::AtMostOnce).await_confirm);
        assert!(publishing(Guarantee::AtLeastOnce).await_confirm);
    }

    #[test]
    fn a_quorum_work_queue_has_a_delivery_limit_and_a_classic_one_does_not() {
        let mut r = RabbitMqConfig::default();
        let names = |r: &RabbitMqConfig| -> Vec<&str> {
            work_queue(r, "x.dlq").iter().map(|a| a.0).collect()
        };
        assert!(names(&r).contains(&"x-delivery-limit"));
        r.queue_type = QueueType::Classic;
        assert!(!names(&r).contains(&"x-delivery-limit"));
    }
}
