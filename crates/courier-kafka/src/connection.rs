//! What the producer and the consumers share: librdkafka error classification, blocking calls
//! off the executor, acks, record headers and the topic naming rule.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::DeliveryFuture;

use courier_core::{header, Error, Message, Result};

use crate::BACKEND;

/// Classify a librdkafka error (retriable / abortable / fatal-fenced).
pub(crate) fn kafka_err(operation: &'static str, e: KafkaError) -> Error {
    if let KafkaError::Transaction(t) = &e {
        if t.is_fatal() {
            return Error::Fenced {
                backend: BACKEND,
                detail: t.to_string(),
            };
        }
        return Error::broker(
            BACKEND,
            operation,
            t.is_retriable() || t.txn_requires_abort(),
            e,
        );
    }
    let code = e.rdkafka_error_code();
    if matches!(
        code,
        Some(RDKafkaErrorCode::ProducerFenced)
            | Some(RDKafkaErrorCode::InvalidProducerEpoch)
            | Some(RDKafkaErrorCode::Fatal)
    ) {
        return Error::Fenced {
            backend: BACKEND,
            detail: e.to_string(),
        };
    }
    let retryable = !matches!(
        code,
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
            | Some(RDKafkaErrorCode::InvalidConfig)
            | Some(RDKafkaErrorCode::TopicAuthorizationFailed)
    );
    Error::broker(BACKEND, operation, retryable, e)
}

pub(crate) fn not_found(topic: &str) -> Error {
    Error::DestinationNotFound {
        backend: BACKEND,
        destination: topic.to_owned(),
        hint: "create the topic (DeliveryClient::create_destination) or set backend.auto_create = true".into(),
    }
}

/// The broker does not implement an admin request (librdkafka's MockCluster has no DeleteTopics
/// or DeleteGroups).
pub(crate) fn unsupported(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnsupportedFeature | RDKafkaErrorCode::UnsupportedVersion
    )
}

pub(crate) fn no_admin(request: &str) -> Error {
    Error::unsupported(
        BACKEND,
        format!("{request} (the broker does not implement it)"),
        "delete with the broker's own tools (kafka-topics.sh --delete, kafka-consumer-groups.sh --delete)",
    )
}

/// Wait for the acks of enqueued records; the first failure is the result.
pub(crate) async fn confirm(acks: Vec<DeliveryFuture>) -> Result<()> {
    for ack in acks {
        match ack.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(kafka_err("produce", e)),
            Err(_) => {
                return Err(Error::broker(
                    BACKEND,
                    "produce",
                    true,
                    "the producer was closed before the record was acknowledged",
                ))
            }
        }
    }
    Ok(())
}

/// Run a blocking librdkafka call off the async executor.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::broker(BACKEND, "blocking call", true, e))
}

pub(crate) fn record_headers(
    m: &Message,
    attempt: Option<u32>,
    not_before_ms: Option<u64>,
) -> OwnedHeaders {
    let mut h = OwnedHeaders::new().insert(Header {
        key: header::ID,
        value: Some(m.id.as_str()),
    });
    let attempt = attempt.map(|a| a.to_string());
    if let Some(a) = &attempt {
        h = h.insert(Header {
            key: header::ATTEMPT,
            value: Some(a.as_str()),
        });
    }
    let nb = not_before_ms.map(|t| t.to_string());
    if let Some(t) = &nb {
        h = h.insert(Header {
            key: header::NOT_BEFORE,
            value: Some(t.as_str()),
        });
    }
    for (k, v) in &m.headers {
        if nb.is_some() && k == header::NOT_BEFORE {
            continue; // this copy's own not-before time (a retry) replaces the message's
        }
        h = h.insert(Header {
            key: k.as_str(),
            value: Some(v.as_str()),
        });
    }
    h
}

/// Kafka's topic naming rule, checked before any request: 1 to 249 characters of ASCII letters,
/// digits, `.`, `_` and `-`, and not `.` or `..`. Guarded by
/// `tests/conformance.rs::topic_names_kafka_refuses_are_refused_before_any_request`.
pub(crate) fn check_topic(topic: &str) -> Result<()> {
    let rule = if topic.is_empty() {
        "it is empty".to_owned()
    } else if topic.len() > 249 {
        format!("it is {} characters; Kafka allows at most 249", topic.len())
    } else if topic == "." || topic == ".." {
        "\".\" and \"..\" are not allowed".to_owned()
    } else if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        format!(
            "{c:?} is not allowed; Kafka topic names use ASCII letters, digits, '.', '_' and '-'"
        )
    } else {
        return Ok(());
    };
    Err(Error::invalid_name(BACKEND, "topic", topic, rule))
}
