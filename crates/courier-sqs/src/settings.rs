//! The guarantee → SQS settings table: what the client applies when it sends, creates queues and
//! receives, each with why. `explain` prints these same values, so what it shows is what is sent
//! (the unit tests below read the applied values back from the explanation).

use std::time::Duration;

use crate::SqsConfig;
use aws_sdk_sqs::types::QueueAttributeName;
use courier_core::{Explanation, Guarantee};

use crate::BACKEND;

/// How many times a send is attempted (by the SDK for a request, by courier for the entries of a
/// batch that failed): at-most-once never sends again.
pub(crate) fn send_attempts(g: Guarantee) -> u32 {
    if g == Guarantee::AtMostOnce {
        1
    } else {
        5
    }
}

/// The SDK's retry configuration under `g`.
pub(crate) fn retry_config(g: Guarantee) -> aws_config::retry::RetryConfig {
    match send_attempts(g) {
        1 => aws_config::retry::RetryConfig::disabled(),
        n => aws_config::retry::RetryConfig::standard().with_max_attempts(n),
    }
}

/// `WaitTimeSeconds` of each ReceiveMessage: the configured wait, at most SQS's 20 s.
pub(crate) fn long_poll(s: &SqsConfig) -> Duration {
    Duration::from_secs(s.wait_time.as_secs().min(20))
}

/// The visibility a received message is kept invisible for, extended by the heartbeat.
pub(crate) fn visibility(s: &SqsConfig) -> Duration {
    s.visibility_timeout.max(Duration::from_secs(1))
}

/// How often the heartbeat extends the visibility of messages being handled; `None` under
/// at-most-once, which deletes before the handler and has nothing to keep invisible.
pub(crate) fn heartbeat(s: &SqsConfig, g: Guarantee) -> Option<Duration> {
    (g != Guarantee::AtMostOnce).then(|| visibility(s) / 3)
}

/// A queue attribute courier sets when it creates a queue: (name, value, why).
pub(crate) type QueueAttribute = (QueueAttributeName, String, &'static str);

/// The attributes of a queue courier creates; `dead_letter_arn` is the ARN of its dead-letter
/// queue when courier creates that too (`create_dead_letter_queue`).
pub(crate) fn queue_attributes(
    s: &SqsConfig,
    fifo: bool,
    dead_letter_arn: Option<&str>,
) -> Vec<QueueAttribute> {
    let mut attrs = vec![(
        QueueAttributeName::VisibilityTimeout,
        s.visibility_timeout.as_secs().to_string(),
        "redelivery window; the lease of the idempotent layer",
    )];
    if fifo {
        attrs.push((
            QueueAttributeName::FifoQueue,
            "true".into(),
            "per-key order (MessageGroupId) and 5-minute dedup by id",
        ));
    }
    if let Some(arn) = dead_letter_arn {
        attrs.push((
            QueueAttributeName::RedrivePolicy,
            format!(
                r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"{}"}}"#,
                s.max_receive_count
            ),
            "a message received this often without being settled (a handler that crashes the process every time) moves to the dead-letter queue",
        ));
    }
    attrs
}

/// The effective settings of `s` under guarantee `g`, from the same functions the client applies.
pub(crate) fn explain(s: &SqsConfig, g: Guarantee) -> Explanation {
    let amo = g == Guarantee::AtMostOnce;
    let attempts = send_attempts(g);
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
            "send attempts",
            attempts,
            if attempts == 1 {
                "at-most-once never re-sends (SDK retries off)"
            } else {
                "SDK standard retries; failed batch entries are sent again with the same id"
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
        );
    let dlq_arn = s.create_dead_letter_queue.then_some("<arn of <queue>-dlq>");
    for (name, value, why) in queue_attributes(s, s.fifo, dlq_arn) {
        e = e.set("topology", name.as_str(), value, why);
    }
    e = e
        .set(
            "topology",
            "dead letter",
            "<queue>-dlq (courier sends failed messages there)",
            "after the retry policy's last attempt",
        )
        .set(
            "topology",
            "auto_create",
            s.auto_create,
            "create missing queues instead of failing",
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
            "heartbeat",
            match heartbeat(s, g) {
                Some(every) => format!("every {every:?}, visibility {:?}", visibility(s)),
                None => "-".to_owned(),
            },
            "extends visibility while the handler runs",
        )
        .set(
            "consumer",
            "WaitTimeSeconds",
            long_poll(s).as_secs(),
            "long poll of ReceiveMessage (SQS allows at most 20)",
        )
        .set("consumer", "attempt", "ApproximateReceiveCount", "")
        .set(
            "consumer",
            "nack",
            "ChangeMessageVisibility(delay)",
            "backoff without blocking other messages",
        );
    if g == Guarantee::ExactlyOnce {
        e = e.note("exactly-once = FIFO dedup (5 minutes) + the idempotent layer: visibility expiry can still redeliver");
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
        let mut s = SqsConfig {
            wait_time: Duration::from_secs(60),
            ..SqsConfig::default()
        };
        for g in Guarantee::ALL {
            let e = explain(&s, g);
            assert_eq!(value(&e, "send attempts"), send_attempts(g).to_string());
            assert_eq!(
                value(&e, "WaitTimeSeconds"),
                "20",
                "capped at SQS's maximum"
            );
            assert_eq!(
                value(&e, "heartbeat") == "-",
                heartbeat(&s, g).is_none(),
                "{g:?}"
            );
            for (name, v, _) in queue_attributes(&s, s.fifo, None) {
                assert_eq!(value(&e, name.as_str()), v);
            }
        }
        s.create_dead_letter_queue = true;
        let e = explain(&s, Guarantee::AtLeastOnce);
        assert!(value(&e, "RedrivePolicy")
            .contains(&format!("\"maxReceiveCount\":\"{}\"", s.max_receive_count)));
        assert_eq!(send_attempts(Guarantee::AtMostOnce), 1);
    }
}
