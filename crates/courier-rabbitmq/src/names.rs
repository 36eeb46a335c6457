//! The names and messages AMQP can carry, checked before anything is declared or sent, and
//! the names courier gives a subscription's queues.

use std::time::Duration;

use courier_core::{Error, Message, Result, Subscription};

use crate::BACKEND;

/// AMQP short strings (exchange, queue and header names, `message_id`) hold at most 255 bytes.
pub(crate) const SHORT_STRING_MAX: usize = 255;

/// Check an exchange or queue name before anything is declared or sent: AMQP encodes it as a
/// short string, and `amq.` names are reserved by the broker. Guarded by
/// `tests/faults.rs::names_and_messages_that_amqp_cannot_carry_are_refused`.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<()> {
    let rule = if name.is_empty() {
        "it is empty".to_owned()
    } else if name.len() > SHORT_STRING_MAX {
        format!(
            "it is {} bytes; AMQP names hold at most {SHORT_STRING_MAX} bytes",
            name.len()
        )
    } else if name.starts_with("amq.") {
        "names starting with \"amq.\" are reserved by RabbitMQ".to_owned()
    } else {
        return Ok(());
    };
    Err(Error::invalid_name(BACKEND, what, name, rule))
}

/// The names a subscription declares: its work queue and the dead-letter exchange and queue.
pub(crate) fn subscription_names(sub: &Subscription) -> (String, String) {
    (
        format!("{}.{}", sub.destination, sub.group),
        sub.dead_letter_destination(),
    )
}

/// The retry delays a delay queue exists for, in milliseconds. A nack's delay is rounded up to
/// the next step, and each step has a queue of its own (`<queue>.delay.<ms>`, TTL on the
/// queue), so every message in a delay queue expires in the order it arrived: a short retry never
/// waits behind a long one. Guarded by `tests/faults.rs::a_short_retry_is_not_held_behind_a_long_one`.
pub const DELAY_STEPS_MS: &[u64] = &[
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000,
    1_800_000, 3_600_000,
];

/// The delay step for `delay`: the smallest step at least as long (the longest step for longer
/// delays).
pub(crate) fn delay_step(delay: Duration) -> u64 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    DELAY_STEPS_MS
        .iter()
        .copied()
        .find(|&s| s >= ms)
        .unwrap_or(DELAY_STEPS_MS[DELAY_STEPS_MS.len() - 1])
}

/// The longest delay step not longer than `delay` (the shortest step for shorter delays).
pub(crate) fn delay_step_at_most(delay: Duration) -> u64 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    DELAY_STEPS_MS
        .iter()
        .copied()
        .rev()
        .find(|&s| s <= ms)
        .unwrap_or(DELAY_STEPS_MS[0])
}

/// The name of `queue`'s delay queue for `step_ms`.
pub fn delay_queue(queue: &str, step_ms: u64) -> String {
    format!("{queue}.delay.{step_ms}")
}

/// Check a subscription's names before anything is declared.
pub(crate) fn check_subscription(sub: &Subscription) -> Result<()> {
    check_name("exchange", &sub.destination)?;
    if sub.group.is_empty() {
        return Err(Error::invalid_name(
            BACKEND,
            "consumer group",
            "",
            "it is empty",
        ));
    }
    let (queue, dlx) = subscription_names(sub);
    check_name("queue", &queue)?;
    check_name(
        "queue",
        &delay_queue(&queue, DELAY_STEPS_MS[DELAY_STEPS_MS.len() - 1]),
    )?;
    check_name("dead-letter exchange", &dlx)
}

/// Check that `m` can be encoded as one AMQP message to `destination`: its id and header names
/// are short strings, and its properties (id, key, headers) fit in one frame of `frame_max`
/// bytes — larger ones make the broker close the whole connection. Nothing is sent when this
/// fails.
pub(crate) fn check_message(destination: &str, m: &Message, frame_max: u32) -> Result<()> {
    let refuse = |reason: String| {
        Err(Error::invalid_message(
            BACKEND,
            destination,
            m.id.as_str(),
            reason,
        ))
    };
    if m.id.as_str().len() > SHORT_STRING_MAX {
        return refuse(format!(
            "its id is {} bytes; the AMQP message_id holds at most {SHORT_STRING_MAX} (use a shorter id)",
            m.id.as_str().len()
        ));
    }
    // Field table entries: name (1 + len), type tag (1), long string (4 + len).
    let mut size = 0usize;
    for (k, v) in &m.headers {
        if k.len() > SHORT_STRING_MAX {
            return refuse(format!(
                "header name {:?}… is {} bytes; AMQP header names hold at most {SHORT_STRING_MAX}",
                k.chars().take(32).collect::<String>(),
                k.len()
            ));
        }
        size += 1 + k.len() + 1 + 4 + v.len();
    }
    if let Some(k) = &m.key {
        size += 1 + "courier-key".len() + 1 + 4 + k.len();
    }
    // The rest of the content header: class, weight, body size, flags, message_id, content
    // type, delivery mode, the attempt property, and the frame envelope.
    size += 14 + 1 + m.id.as_str().len() + 64 + 64;
    let limit = frame_max as usize;
    if size > limit {
        return refuse(format!(
            "its id, key and headers take {size} bytes, over the connection's frame size of {limit} (frame_max); \
             move large values into the payload"
        ));
    }
    Ok(())
}
