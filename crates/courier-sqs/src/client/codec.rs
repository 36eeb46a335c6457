//! How a courier message is written into an SQS message (body, attributes, dedup id) and
//! read back.

use super::*;

/// [`Error::PayloadTooLarge`] when `enc` is over `limit` (courier's cap, or the queue's own).
pub(super) fn fits(destination: &str, enc: &Encoded, limit: usize) -> Result<()> {
    if enc.size > limit {
        return Err(Error::PayloadTooLarge {
            backend: BACKEND,
            destination: destination.to_owned(),
            size: enc.size,
            limit,
        });
    }
    Ok(())
}

pub(super) const ATTR_ID: &str = "courier-id";
pub(super) const ATTR_KEY: &str = "courier-key";
pub(super) const ATTR_HEADERS: &str = "courier-headers";
pub(super) const ATTR_ENCODING: &str = "courier-encoding";
/// Attempts a deferred message had already made before it was sent again (its receive count
/// starts over; courier's attempt number continues).
pub(super) const ATTR_ATTEMPTS_BEFORE: &str = "courier-attempts-before";
/// Entries per SendMessageBatch / DeleteMessageBatch.
pub(super) const BATCH: usize = 10;
/// Delete requests one subscription keeps in flight at once (see `run_deleter`).
pub(super) const DELETES_IN_FLIGHT: usize = 1;

/// Whether SQS accepts `s` as a message body (XML 1.0 characters only).
pub(super) fn body_safe(s: &str) -> bool {
    s.chars().all(|c| matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}'))
}

pub(super) fn string_attr(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .expect("data_type is set")
}

/// A `MessageDeduplicationId`: the courier id when SQS accepts it, else its SHA-256.
pub(super) fn dedup_id(id: &MessageId) -> String {
    let s = id.as_str();
    if !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic()) {
        s.to_owned()
    } else {
        hex::encode(Sha256::digest(s.as_bytes()))
    }
}

pub(super) struct Encoded {
    pub(super) body: String,
    pub(super) attributes: HashMap<String, MessageAttributeValue>,
    pub(super) size: usize,
    /// `DelaySeconds` of this message (standard queues).
    pub(super) delay_seconds: Option<i32>,
}

pub(super) fn encode(m: &Message) -> Result<Encoded> {
    let mut attributes = HashMap::new();
    let (body, binary) = match std::str::from_utf8(&m.payload) {
        Ok(s) if body_safe(s) && !s.is_empty() => (s.to_owned(), false),
        _ => (
            base64::engine::general_purpose::STANDARD.encode(&m.payload),
            true,
        ),
    };
    attributes.insert(ATTR_ID.to_owned(), string_attr(m.id.as_str()));
    if let Some(k) = &m.key {
        attributes.insert(ATTR_KEY.to_owned(), string_attr(k));
    }
    if !m.headers.is_empty() {
        let json = serde_json::to_string(&m.headers)
            .map_err(|e| Error::config(format!("headers: {e}")))?;
        attributes.insert(ATTR_HEADERS.to_owned(), string_attr(&json));
    }
    if binary {
        attributes.insert(ATTR_ENCODING.to_owned(), string_attr("base64"));
    }
    let size = body.len()
        + attributes
            .iter()
            .map(|(k, v)| k.len() + v.data_type().len() + v.string_value().map_or(0, str::len))
            .sum::<usize>();
    // Delayed delivery: a standard queue holds the message back itself, up to 15 minutes (the
    // consume loop defers what arrives early); FIFO queues have no per-message delay.
    let delay_seconds = m.due_in().map(|d| d.as_secs_f64().ceil().min(900.0) as i32);
    Ok(Encoded {
        body,
        attributes,
        size,
        delay_seconds,
    })
}

pub(super) fn decode(msg: &aws_sdk_sqs::types::Message) -> Message {
    let attrs = msg.message_attributes();
    let get = |name: &str| {
        attrs
            .and_then(|a| a.get(name))
            .and_then(|v| v.string_value())
            .map(str::to_owned)
    };
    let body = msg.body().unwrap_or_default();
    let payload = match get(ATTR_ENCODING).as_deref() {
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap_or_else(|_| body.as_bytes().to_vec()),
        _ => body.as_bytes().to_vec(),
    };
    let headers: Headers = get(ATTR_HEADERS)
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default();
    // Messages from other producers: their own string attributes become headers.
    let mut headers = headers;
    if let Some(a) = attrs {
        for (k, v) in a {
            if !k.starts_with("courier-") {
                if let Some(s) = v.string_value() {
                    headers.entry(k.clone()).or_insert_with(|| s.to_owned());
                }
            }
        }
    }
    // Messages from other producers: a FIFO producer's MessageDeduplicationId is its idempotency
    // id and its MessageGroupId its ordering key; otherwise SQS's own MessageId.
    let system =
        |name: MessageSystemAttributeName| msg.attributes().and_then(|a| a.get(&name)).cloned();
    let foreign = get(ATTR_ID).is_none();
    let id = get(ATTR_ID)
        .or_else(|| system(MessageSystemAttributeName::MessageDeduplicationId))
        .map(MessageId::from_string)
        .unwrap_or_else(|| MessageId::from_string(msg.message_id().unwrap_or_default()));
    Message {
        id,
        key: get(ATTR_KEY).or_else(|| {
            foreign
                .then(|| system(MessageSystemAttributeName::MessageGroupId))
                .flatten()
        }),
        headers,
        payload: payload.into(),
    }
}
