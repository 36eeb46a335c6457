//! The error type every courier operation returns.

use std::time::Duration;

/// A boxed error from a backend or store, kept as the `source` of a courier error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in courier, in terms a caller can act on.
///
/// Each variant says what happened and, where there is one, how to fix it. Backend-native errors
/// are kept as the `source` of [`Error::Broker`], so no backend type appears in a signature.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The payload (plus envelope) is over the destination's limit; nothing was sent.
    #[error("payload of {size} bytes for {destination:?} exceeds the {limit}-byte limit of {backend}; nothing was sent (split the message, store the body elsewhere and send a reference, or raise the broker limit)")]
    PayloadTooLarge {
        /// Backend name.
        backend: &'static str,
        /// Destination the message was addressed to.
        destination: String,
        /// Size of the message as the broker would count it.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The message cannot be encoded for this broker as it is (an id or header name over the
    /// protocol's length limit, headers larger than a frame); nothing was sent.
    #[error("message {message_id:?} to {destination:?} cannot be sent on {backend}: {reason}; nothing was sent")]
    InvalidMessage {
        /// Backend name.
        backend: &'static str,
        /// Destination the message was addressed to.
        destination: String,
        /// The courier id of the message (cut to 64 characters).
        message_id: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A destination or consumer-group name breaks the broker's naming rules; nothing was
    /// created or sent.
    #[error("{what} {name:?} is not a valid name on {backend}: {rule}")]
    InvalidName {
        /// Backend name.
        backend: &'static str,
        /// What the name is for ("topic", "exchange", "queue", …).
        what: &'static str,
        /// The name (cut to 64 characters).
        name: String,
        /// The rule it breaks.
        rule: String,
    },
    /// The broker accepted the message but could not route it anywhere (e.g. AMQP NO_ROUTE).
    #[error("message {message_id} to {destination:?} is unroutable: {reason} (bind a queue to the exchange, or check the routing key)")]
    Unroutable {
        /// Destination the message was addressed to.
        destination: String,
        /// The courier id of the message.
        message_id: String,
        /// Broker's explanation.
        reason: String,
    },
    /// The destination (topic, queue) does not exist and creating it is not enabled.
    #[error("destination {destination:?} does not exist on {backend}: {hint}")]
    DestinationNotFound {
        /// Backend name.
        backend: &'static str,
        /// The missing destination.
        destination: String,
        /// How to fix it.
        hint: String,
    },
    /// Invalid configuration.
    #[error("invalid configuration: {message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A combination the backend cannot honour (e.g. exactly-once on an SQS standard queue
    /// without an idempotency store).
    #[error("{backend} cannot provide {what}: {fix}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// What was asked for.
        what: String,
        /// How to get it anyway.
        fix: String,
    },
    /// An error reported by the broker or its client library.
    #[error("{backend} error during {operation}: {source}")]
    Broker {
        /// Backend name.
        backend: &'static str,
        /// What courier was doing.
        operation: &'static str,
        /// Whether retrying the same operation may succeed.
        retryable: bool,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },
    /// The producer was fenced by a newer instance with the same transactional id (Kafka). Fatal
    /// for this client: create a new one (and make sure two instances do not share an id).
    #[error("{backend} producer fenced: {detail} (another instance uses the same transactional id; this client must be recreated)")]
    Fenced {
        /// Backend name.
        backend: &'static str,
        /// Broker detail.
        detail: String,
    },
    /// An operation did not finish within its deadline.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        operation: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The client or subscription was closed.
    #[error("the {what} is closed")]
    Closed {
        /// What is closed.
        what: &'static str,
    },
    /// The delivery can no longer be settled (its lease or channel is gone; it will be redelivered).
    #[error("delivery {message_id} can no longer be settled: {reason}")]
    DeliveryExpired {
        /// The courier id of the message.
        message_id: String,
        /// Why.
        reason: String,
    },
    /// The same idempotency key was used with a different payload.
    #[error("idempotency key {key:?} was already used with a different payload (fingerprint {stored} ≠ {received}); the message is dead-lettered, not processed")]
    IdempotencyConflict {
        /// The key.
        key: String,
        /// Fingerprint recorded for the key.
        stored: String,
        /// Fingerprint of the new message.
        received: String,
    },
    /// A value could not be encoded as a message payload (see `Message::json`); nothing was sent.
    #[error("a {type_name} cannot be encoded as JSON: {reason}; nothing was sent (JSON object keys must be strings)")]
    Encode {
        /// The Rust type that was being encoded.
        type_name: &'static str,
        /// serde's reason.
        reason: String,
    },
    /// The replier did not answer a request: its handler failed for good and the request was
    /// dead-lettered (the reply carries the dead-letter reason). Asking again with the same
    /// message runs the handler again; fix the request or the replier first.
    #[error("request {key} to {destination:?} failed: {reason} (the request is in the replier's dead-letter destination)")]
    RequestFailed {
        /// Where the request was sent.
        destination: String,
        /// The request's idempotency key (its correlation id).
        key: String,
        /// Why the replier gave up on it (the dead-letter reason).
        reason: String,
    },
    /// A store courier keeps state in (idempotency store, outbox database) failed.
    #[error("{store} store error during {operation}: {source}")]
    Store {
        /// Store name.
        store: &'static str,
        /// What the layer was doing.
        operation: &'static str,
        /// Underlying error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Whether retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Broker { retryable, .. } => *retryable,
            Error::Timeout { .. } | Error::Store { .. } | Error::DeliveryExpired { .. } => true,
            Error::PayloadTooLarge { .. }
            | Error::InvalidMessage { .. }
            | Error::InvalidName { .. }
            | Error::Unroutable { .. }
            | Error::DestinationNotFound { .. }
            | Error::Config { .. }
            | Error::Unsupported { .. }
            | Error::Fenced { .. }
            | Error::Closed { .. }
            | Error::IdempotencyConflict { .. }
            | Error::RequestFailed { .. }
            | Error::Encode { .. } => false,
        }
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Broker`].
    pub fn broker(
        backend: &'static str,
        operation: &'static str,
        retryable: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Broker {
            backend,
            operation,
            retryable,
            source: source.into(),
        }
    }

    /// Shorthand for [`Error::InvalidName`]; cuts `name` to 64 characters.
    pub fn invalid_name(
        backend: &'static str,
        what: &'static str,
        name: &str,
        rule: impl Into<String>,
    ) -> Self {
        Error::InvalidName {
            backend,
            what,
            name: cut(name),
            rule: rule.into(),
        }
    }

    /// Shorthand for [`Error::InvalidMessage`]; cuts the id to 64 characters.
    pub fn invalid_message(
        backend: &'static str,
        destination: &str,
        message_id: &str,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidMessage {
            backend,
            destination: cut(destination),
            message_id: cut(message_id),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(
        backend: &'static str,
        what: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Error::Unsupported {
            backend,
            what: what.into(),
            fix: fix.into(),
        }
    }

    /// A short stable name of the variant (for logs, metrics labels and tests).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::InvalidMessage { .. } => "invalid_message",
            Error::InvalidName { .. } => "invalid_name",
            Error::Unroutable { .. } => "unroutable",
            Error::DestinationNotFound { .. } => "destination_not_found",
            Error::Config { .. } => "config",
            Error::Unsupported { .. } => "unsupported",
            Error::Broker { .. } => "broker",
            Error::Fenced { .. } => "fenced",
            Error::Timeout { .. } => "timeout",
            Error::Closed { .. } => "closed",
            Error::DeliveryExpired { .. } => "delivery_expired",
            Error::IdempotencyConflict { .. } => "idempotency_conflict",
            Error::RequestFailed { .. } => "request_failed",
            Error::Store { .. } => "store",
            Error::Encode { .. } => "encode",
        }
    }
}

/// At most 64 characters of `s`, with "…" when cut (names in errors stay one line).
fn cut(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// `Result` with courier's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability() {
        assert!(!Error::config("x").is_retryable());
        assert!(Error::broker("memory", "publish", true, "boom").is_retryable());
        assert!(!Error::broker("memory", "publish", false, "boom").is_retryable());
        let e = Error::PayloadTooLarge {
            backend: "sqs",
            destination: "q".into(),
            size: 2,
            limit: 1,
        };
        assert!(!e.is_retryable());
        assert_eq!(e.kind(), "payload_too_large");
        assert!(e.to_string().contains("nothing was sent"));
    }
}
