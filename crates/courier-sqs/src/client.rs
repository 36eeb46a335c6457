//! The SQS client, publishing, receiving and settling.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use base64::Engine as _;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use courier_core::config::SqsConfig;
use courier_core::{
    Capabilities, DeadLetter, Deliveries, Delivery, DeliveryClient, DeliveryStream,
    DestinationInfo, Error, Explanation, GroupInfo, Guarantee, Headers, Message, MessageId,
    Position, Receipt, Result, Settle, Subscription,
};

use crate::{settings, BACKEND};

/// The queue tag naming the consumer group that reads a queue.
const GROUP_TAG: &str = "courier-group";

/// SQS's queue naming rule, checked before any request: 1 to 80 characters of ASCII letters,
/// digits, `-` and `_`, a FIFO queue's ending in `.fifo` (counted in the 80). Guarded by
/// `tests/faults.rs::queue_names_sqs_refuses_are_refused_before_any_request`.
pub(crate) fn check_queue_name(name: &str) -> Result<()> {
    let stem = name.strip_suffix(".fifo").unwrap_or(name);
    let rule = if stem.is_empty() {
        "it is empty".to_owned()
    } else if name.len() > 80 {
        format!(
            "it is {} characters; SQS allows at most 80 (\".fifo\" included)",
            name.len()
        )
    } else if let Some(c) = stem
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
    {
        format!("{c:?} is not allowed; SQS queue names use ASCII letters, digits, '-' and '_' (and end in \".fifo\" for a FIFO queue)")
    } else {
        return Ok(());
    };
    Err(Error::invalid_name(BACKEND, "queue", name, rule))
}

/// [`Error::PayloadTooLarge`] when `enc` is over `limit` (courier's cap, or the queue's own).
fn fits(destination: &str, enc: &Encoded, limit: usize) -> Result<()> {
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

const ATTR_ID: &str = "courier-id";
const ATTR_KEY: &str = "courier-key";
const ATTR_HEADERS: &str = "courier-headers";
const ATTR_ENCODING: &str = "courier-encoding";
/// Attempts a deferred message had already made before it was sent again (its receive count
/// starts over; courier's attempt number continues).
const ATTR_ATTEMPTS_BEFORE: &str = "courier-attempts-before";
/// Entries per SendMessageBatch / DeleteMessageBatch.
const BATCH: usize = 10;
/// Delete requests one subscription keeps in flight at once (see `run_deleter`).
const DELETES_IN_FLIGHT: usize = 1;

/// A courier error from an SDK error, in one short sentence: the service's code and message
/// (`InvalidParameterValue: …`), or what went wrong on the way; never the SDK's whole response.
fn sdk_err<E>(operation: &'static str, e: SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let retryable = matches!(
        e,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    );
    Error::broker(BACKEND, operation, retryable, short_text(&e))
}

/// The short text of an SDK error (see [`sdk_err`]). Guarded by
/// `tests/faults.rs::refusals_are_short_typed_errors`.
fn short_text<E>(e: &SdkError<E>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => match e {
            SdkError::DispatchFailure(_) => {
                "the SQS endpoint could not be reached (check endpoint, region and network)".into()
            }
            SdkError::TimeoutError(_) => "the request timed out".into(),
            other => {
                let text = DisplayErrorContext(other).to_string();
                match text.char_indices().nth(200) {
                    Some((at, _)) => format!("{}…", &text[..at]),
                    None => text,
                }
            }
        },
    }
}

/// A courier client of SQS with one guarantee.
pub struct SqsClient {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) sdk: aws_sdk_sqs::Client,
    config: SqsConfig,
    guarantee: Guarantee,
    has_store: bool,
    urls: Mutex<HashMap<String, String>>,
    /// Each queue's `MaximumMessageSize` (read once), by queue name.
    limits: Mutex<HashMap<String, usize>>,
    /// The consumer group each queue was claimed for (see [`Inner::claim_group`]), by queue URL.
    groups: Mutex<HashMap<String, String>>,
    /// FIFO queues: deferrals of each SQS message by this client, taken off its receive count
    /// so that they do not spend the retry budget (see `SqsSettle::defer`).
    deferrals: Mutex<HashMap<String, u32>>,
}

impl fmt::Debug for SqsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsClient")
            .field("region", &self.inner.config.region)
            .field("endpoint", &self.inner.config.endpoint)
            .field("guarantee", &self.inner.guarantee)
            .finish()
    }
}

/// Whether SQS accepts `s` as a message body (XML 1.0 characters only).
fn body_safe(s: &str) -> bool {
    s.chars().all(|c| matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}'))
}

fn string_attr(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .expect("data_type is set")
}

/// A `MessageDeduplicationId`: the courier id when SQS accepts it, else its SHA-256.
fn dedup_id(id: &MessageId) -> String {
    let s = id.as_str();
    if !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic()) {
        s.to_owned()
    } else {
        hex::encode(Sha256::digest(s.as_bytes()))
    }
}

struct Encoded {
    body: String,
    attributes: HashMap<String, MessageAttributeValue>,
    size: usize,
    /// `DelaySeconds` of this message (standard queues).
    delay_seconds: Option<i32>,
}

fn encode(m: &Message) -> Result<Encoded> {
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

fn decode(msg: &aws_sdk_sqs::types::Message) -> Message {
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

impl SqsClient {
    pub(crate) async fn connect(
        config: SqsConfig,
        guarantee: Guarantee,
        has_store: bool,
    ) -> Result<Self> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = &config.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(e) = &config.endpoint {
            loader = loader.endpoint_url(e);
        }
        if let Some(p) = &config.profile {
            loader = loader.profile_name(p);
        }
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                id,
                secret.expose(),
                None,
                None,
                "courier-config",
            ));
        }
        loader = loader.retry_config(settings::retry_config(guarantee));
        let shared = loader.load().await;
        if shared.region().is_none() {
            return Err(Error::config(
                "no AWS region: set backend.region, or AWS_REGION / a profile with a region",
            ));
        }
        let sdk = aws_sdk_sqs::Client::new(&shared);
        Ok(SqsClient {
            inner: Arc::new(Inner {
                sdk,
                config,
                guarantee,
                has_store,
                urls: Mutex::new(HashMap::new()),
                limits: Mutex::new(HashMap::new()),
                groups: Mutex::new(HashMap::new()),
                deferrals: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl Inner {
    fn name(&self, destination: &str) -> String {
        if self.config.fifo && !destination.ends_with(".fifo") {
            format!("{destination}.fifo")
        } else {
            destination.to_owned()
        }
    }

    fn dead_letter_name(&self, sub: &Subscription) -> String {
        if let Some(d) = &sub.dead_letter {
            return self.name(d);
        }
        let q = self.name(&sub.destination);
        match q.strip_suffix(".fifo") {
            Some(stem) => format!("{stem}-dlq.fifo"),
            None => format!("{q}-dlq"),
        }
    }

    async fn create(&self, name: &str) -> Result<String> {
        check_queue_name(name)?;
        let mut dead_letter_arn = None;
        if self.config.create_dead_letter_queue && !name.contains("-dlq") {
            let dlq = match name.strip_suffix(".fifo") {
                Some(stem) => format!("{stem}-dlq.fifo"),
                None => format!("{name}-dlq"),
            };
            let dlq_url = Box::pin(self.create(&dlq)).await?;
            let arn = self
                .sdk
                .get_queue_attributes()
                .queue_url(&dlq_url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .map_err(|e| sdk_err("get_queue_attributes", e))?
                .attributes
                .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
                .unwrap_or_default();
            dead_letter_arn = Some(arn);
        }
        let mut req = self.sdk.create_queue().queue_name(name);
        for (attribute, value, _) in settings::queue_attributes(
            &self.config,
            name.ends_with(".fifo"),
            dead_letter_arn.as_deref(),
        ) {
            req = req.attributes(attribute, value);
        }
        let url = req
            .send()
            .await
            .map_err(|e| sdk_err("create_queue", e))?
            .queue_url
            .unwrap_or_default();
        self.urls.lock().insert(name.to_owned(), url.clone());
        Ok(url)
    }

    async fn url(&self, destination: &str) -> Result<String> {
        let name = self.name(destination);
        if let Some(u) = self.urls.lock().get(&name) {
            return Ok(u.clone());
        }
        match self.existing_url(destination).await? {
            Some(u) => {
                self.urls.lock().insert(name, u.clone());
                Ok(u)
            }
            None if self.config.auto_create => self.create(&name).await,
            None => Err(self.not_found(destination)),
        }
    }

    fn not_found(&self, destination: &str) -> Error {
        let name = self.name(destination);
        Error::DestinationNotFound {
            backend: BACKEND,
            destination: destination.to_owned(),
            hint: format!("queue {name:?} does not exist: create it (DeliveryClient::create_destination), set backend.auto_create = true, or check the region"),
        }
    }

    /// The URL of `destination`'s queue, never creating it; `None` when it does not exist.
    async fn existing_url(&self, destination: &str) -> Result<Option<String>> {
        let name = self.name(destination);
        check_queue_name(&name)?;
        match self.sdk.get_queue_url().queue_name(&name).send().await {
            Ok(r) => Ok(r.queue_url),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_queue_does_not_exist()) =>
            {
                Ok(None)
            }
            Err(e) => Err(sdk_err("get_queue_url", e)),
        }
    }

    fn check(&self, destination: &str, m: &Message) -> Result<Encoded> {
        let name = self.name(destination);
        if self.guarantee == Guarantee::ExactlyOnce && !name.ends_with(".fifo") && !self.has_store {
            return Err(Error::unsupported(
                BACKEND,
                format!("exactly-once on standard queue {name:?} without an idempotency store"),
                "use a .fifo queue (backend.fifo = true) or configure [idempotency]",
            ));
        }
        if m.payload.is_empty() {
            return Err(Error::invalid_message(
                BACKEND,
                destination,
                m.id.as_str(),
                "SQS refuses an empty message body (send at least one byte)",
            ));
        }
        let enc = encode(m)?;
        fits(destination, &enc, self.config.max_message_bytes)?;
        Ok(enc)
    }

    /// The size limit of `destination`'s queue: its `MaximumMessageSize` (read once; 256 KiB
    /// on older queues and LocalStack, up to 1 MiB), capped by `max_message_bytes`.
    pub(crate) async fn queue_limit(&self, destination: &str) -> Result<usize> {
        let name = self.name(destination);
        if let Some(l) = self.limits.lock().get(&name) {
            return Ok(*l);
        }
        let url = self.url(destination).await?;
        let read = self
            .sdk
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::MaximumMessageSize)
            .send()
            .await
            .map_err(|e| sdk_err("get_queue_attributes", e))?;
        let queue = read
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::MaximumMessageSize))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(self.config.max_message_bytes);
        let limit = queue.min(self.config.max_message_bytes);
        self.limits.lock().insert(name, limit);
        Ok(limit)
    }

    /// Claim the queue at `url` for consumer group `group`, or refuse a second group. SQS hands
    /// each message to one consumer, so two groups on one queue would silently split its
    /// messages; the first group to subscribe (or be declared) tags the queue `courier-group`,
    /// and any other group is refused with the fix. Guarded by
    /// `tests/faults.rs::a_second_group_on_one_queue_is_refused`.
    pub(crate) async fn claim_group(
        &self,
        destination: &str,
        url: &str,
        group: &str,
    ) -> Result<()> {
        if self.groups.lock().get(url).is_some_and(|g| g == group) {
            return Ok(());
        }
        let tags = self
            .sdk
            .list_queue_tags()
            .queue_url(url)
            .send()
            .await
            .map_err(|e| sdk_err("list_queue_tags", e))?;
        match tags.tags().and_then(|t| t.get(GROUP_TAG)) {
            Some(owner) if owner != group => {
                return Err(Error::unsupported(
                    BACKEND,
                    format!(
                        "consumer group {group:?} on queue {:?}, which group {owner:?} already reads",
                        self.name(destination)
                    ),
                    "SQS hands each message to one consumer, so two groups would split the messages: give each group a queue of its own (fan out with SNS), or use one group name",
                ));
            }
            Some(_) => {}
            None => {
                self.sdk
                    .tag_queue()
                    .queue_url(url)
                    .tags(GROUP_TAG, group)
                    .send()
                    .await
                    .map_err(|e| sdk_err("tag_queue", e))?;
            }
        }
        self.groups.lock().insert(url.to_owned(), group.to_owned());
        Ok(())
    }

    fn group_id(&self, m: &Message) -> String {
        m.key
            .clone()
            .unwrap_or_else(|| self.config.default_group_id.clone())
    }

    async fn send(&self, destination: &str, m: &Message, enc: Encoded) -> Result<Receipt> {
        fits(destination, &enc, self.queue_limit(destination).await?)?;
        let url = self.url(destination).await?;
        let fifo = url.ends_with(".fifo");
        let mut req = self
            .sdk
            .send_message()
            .queue_url(&url)
            .message_body(enc.body)
            .set_message_attributes(Some(enc.attributes))
            .set_delay_seconds(enc.delay_seconds.filter(|_| !fifo));
        if fifo {
            req = req
                .message_group_id(self.group_id(m))
                .message_deduplication_id(dedup_id(&m.id));
        }
        let out = req.send().await.map_err(|e| {
            if e.as_service_error()
                .is_some_and(|s| s.is_queue_does_not_exist())
            {
                self.urls.lock().remove(&self.name(destination));
                Error::DestinationNotFound {
                    backend: BACKEND,
                    destination: destination.to_owned(),
                    hint: "the queue was deleted".into(),
                }
            } else {
                sdk_err("send_message", e)
            }
        })?;
        Ok(Receipt {
            id: m.id.clone(),
            destination: destination.to_owned(),
            position: Position::SqsMessage {
                message_id: out.message_id.unwrap_or_default(),
                sequence_number: out.sequence_number,
            },
            deduplicated: false,
        })
    }
}

#[async_trait]
impl DeliveryClient for SqsClient {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn guarantee(&self) -> Guarantee {
        self.inner.guarantee
    }

    fn capabilities(&self) -> Capabilities {
        let c = &self.inner.config;
        let mut caps = Capabilities::baseline();
        caps.ordering_by_key = c.fifo;
        caps.consumer_groups = false;
        caps.native_dedup = c.fifo.then(|| Duration::from_secs(300));
        caps.max_payload = c.max_message_bytes;
        caps.native_dead_letter = c.create_dead_letter_queue;
        caps.delayed_redelivery = true;
        caps.detects_missing_destination = true;
        caps.settle_window = Duration::from_secs(1);
        caps.redelivery_after_crash = c.visibility_timeout;
        caps
    }

    fn explain(&self) -> Explanation {
        crate::settings::explain(&self.inner.config, self.inner.guarantee)
    }

    async fn create_destination(&self, destination: &str) -> Result<()> {
        let name = self.inner.name(destination);
        self.inner.create(&name).await.map(|_| ())
    }

    /// Creates the queue and claims it for the group (a queue serves one group on SQS).
    async fn declare_subscription(&self, sub: &Subscription) -> Result<()> {
        let name = self.inner.name(&sub.destination);
        let url = self.inner.create(&name).await?;
        self.inner
            .claim_group(&sub.destination, &url, &sub.group)
            .await
    }

    async fn publish(&self, destination: &str, message: Message) -> Result<Receipt> {
        let enc = self.inner.check(destination, &message)?;
        self.inner.send(destination, &message, enc).await
    }

    async fn publish_batch(
        &self,
        destination: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Receipt>> {
        let mut encoded = Vec::with_capacity(messages.len());
        for m in &messages {
            encoded.push(self.inner.check(destination, m)?);
        }
        let limit = self.inner.queue_limit(destination).await?;
        for e in &encoded {
            fits(destination, e, limit)?;
        }
        let url = self.inner.url(destination).await?;
        let fifo = url.ends_with(".fifo");
        let mut receipts: Vec<Option<Receipt>> = vec![None; messages.len()];
        // Chunks of at most 10 entries and at most the size limit in total.
        let mut chunks: Vec<Vec<usize>> = Vec::new();
        let mut size = 0;
        for (i, e) in encoded.iter().enumerate() {
            let new_chunk = chunks
                .last()
                .is_none_or(|c| c.len() == BATCH || size + e.size > limit);
            if new_chunk {
                chunks.push(Vec::new());
                size = 0;
            }
            size += e.size;
            chunks.last_mut().expect("chunk").push(i);
        }
        let attempts = settings::send_attempts(self.inner.guarantee);
        for chunk in chunks {
            let mut pending = chunk;
            for attempt in 0..attempts {
                if pending.is_empty() {
                    break;
                }
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                let mut req = self.inner.sdk.send_message_batch().queue_url(&url);
                for &i in &pending {
                    let m = &messages[i];
                    let e = &encoded[i];
                    let mut entry = SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(e.body.clone())
                        .set_message_attributes(Some(e.attributes.clone()))
                        .set_delay_seconds(e.delay_seconds.filter(|_| !fifo));
                    if fifo {
                        entry = entry
                            .message_group_id(self.inner.group_id(m))
                            .message_deduplication_id(dedup_id(&m.id));
                    }
                    req = req.entries(entry.build().map_err(|e| Error::config(e.to_string()))?);
                }
                let out = match req.send().await {
                    Ok(o) => o,
                    Err(e) if attempt + 1 < attempts && !matches!(e, SdkError::ServiceError(_)) => {
                        warn!(error = %DisplayErrorContext(&e), "send_message_batch failed; retrying the batch with the same ids");
                        continue;
                    }
                    Err(e) => return Err(sdk_err("send_message_batch", e)),
                };
                for ok in out.successful() {
                    if let Ok(i) = ok.id().parse::<usize>() {
                        receipts[i] = Some(Receipt {
                            id: messages[i].id.clone(),
                            destination: destination.to_owned(),
                            position: Position::SqsMessage {
                                message_id: ok.message_id().to_owned(),
                                sequence_number: ok.sequence_number().map(str::to_owned),
                            },
                            deduplicated: false,
                        });
                    }
                }
                let failed: Vec<usize> = out
                    .failed()
                    .iter()
                    .filter_map(|f| f.id().parse().ok())
                    .collect();
                if let Some(f) = out.failed().iter().find(|f| f.sender_fault()) {
                    return Err(Error::broker(
                        BACKEND,
                        "send_message_batch",
                        false,
                        format!(
                            "entry rejected: {} {}",
                            f.code(),
                            f.message().unwrap_or_default()
                        ),
                    ));
                }
                pending = failed;
            }
            if !pending.is_empty() {
                return Err(Error::broker(
                    BACKEND,
                    "send_message_batch",
                    true,
                    format!("{} entries not accepted after retries", pending.len()),
                ));
            }
        }
        Ok(receipts
            .into_iter()
            .map(|r| r.expect("all entries sent"))
            .collect())
    }

    async fn subscribe(&self, sub: Subscription) -> Result<Deliveries> {
        let url = self.inner.url(&sub.destination).await?;
        self.inner
            .claim_group(&sub.destination, &url, &sub.group)
            .await?;
        let dlq = self.inner.dead_letter_name(&sub);
        let (tx, rx) = mpsc::channel(1);
        let inner = self.inner.clone();
        let max = i32::from(sub.prefetch.unwrap_or(10).clamp(1, 10));
        let source = sub.destination.clone();
        let (del_tx, del_rx) = mpsc::unbounded_channel();
        tokio::spawn(run_deleter(inner.clone(), url.clone(), del_rx));
        let deleter = Deleter(del_tx);
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(poll(
            inner,
            url.clone(),
            source,
            dlq,
            max,
            deleter,
            Handoff {
                tx,
                stop: stop.clone(),
            },
        ));
        Ok(Deliveries::new(Box::new(SqsStream {
            rx,
            task,
            stop,
            wait: settings::long_poll(&self.inner.config),
        })))
    }

    /// The queue's approximate counts; each group asked about is reported with them when it is
    /// the group that reads the queue (the queue's `courier-group` tag) or no group claimed it
    /// yet, and as absent otherwise.
    async fn inspect(&self, destination: &str, groups: &[&str]) -> Result<DestinationInfo> {
        let inner = &self.inner;
        let url = inner
            .existing_url(destination)
            .await?
            .ok_or_else(|| inner.not_found(destination))?;
        let attrs = inner
            .sdk
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| sdk_err("get_queue_attributes", e))?;
        let count = |name: QueueAttributeName| -> u64 {
            attrs
                .attributes()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let visible = count(QueueAttributeName::ApproximateNumberOfMessages);
        let mut info = DestinationInfo::new(destination);
        info.stored = Some(visible);
        if groups.is_empty() {
            return Ok(info);
        }
        let tags = inner
            .sdk
            .list_queue_tags()
            .queue_url(&url)
            .send()
            .await
            .map_err(|e| sdk_err("list_queue_tags", e))?;
        let owner = tags.tags().and_then(|t| t.get(GROUP_TAG)).cloned();
        for &group in groups {
            if owner.as_deref().is_some_and(|o| o != group) {
                info.groups.push(GroupInfo::new(group, false, 0));
                continue;
            }
            let mut g = GroupInfo::new(group, true, visible);
            g.in_flight = Some(count(
                QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            ));
            g.delayed = Some(count(
                QueueAttributeName::ApproximateNumberOfMessagesDelayed,
            ));
            info.groups.push(g);
        }
        Ok(info)
    }

    /// Deletes the queue (the groups own nothing else on SQS). SQS forbids creating a queue
    /// of the same name for 60 seconds after.
    async fn delete_destination(&self, destination: &str, groups: &[&str]) -> Result<Vec<String>> {
        let _ = groups;
        let inner = &self.inner;
        let name = inner.name(destination);
        let Some(url) = inner.existing_url(destination).await? else {
            return Ok(Vec::new());
        };
        match inner.sdk.delete_queue().queue_url(&url).send().await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_queue_does_not_exist()) =>
            {
                return Ok(Vec::new())
            }
            Err(e) => return Err(sdk_err("delete_queue", e)),
        }
        inner.urls.lock().remove(&name);
        inner.limits.lock().remove(&name);
        inner.groups.lock().remove(&url);
        Ok(vec![format!("queue {name}")])
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Where the receive loop hands its deliveries, and the flag that stops it (`SqsStream::close`).
struct Handoff {
    tx: mpsc::Sender<Result<Delivery>>,
    stop: Arc<AtomicBool>,
}

async fn poll(
    inner: Arc<Inner>,
    url: String,
    source: String,
    dlq: String,
    max: i32,
    deleter: Deleter,
    handoff: Handoff,
) {
    let Handoff { tx, stop } = handoff;
    let wait = settings::long_poll(&inner.config).as_secs() as i32;
    let mut backoff = Duration::from_millis(100);
    // At-most-once deletes before the handler: nothing to keep invisible.
    let keeper = settings::heartbeat(&inner.config, inner.guarantee)
        .map(|every| Keeper::start(&inner, &url, every));
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let req = inner
            .sdk
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(max)
            .wait_time_seconds(wait)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SequenceNumber)
            .message_system_attribute_names(MessageSystemAttributeName::MessageDeduplicationId)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp);
        let out = tokio::select! {
            _ = tx.closed() => return,
            r = req.send() => r,
        };
        let messages = match out {
            Ok(o) => {
                backoff = Duration::from_millis(100);
                o.messages.unwrap_or_default()
            }
            Err(e) => {
                let err = sdk_err("receive_message", e);
                debug!(error = %err, "receive failed; retrying");
                if !err.is_retryable() && tx.send(Err(err)).await.is_err() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // Every received message gets its delivery (and so its visibility lease) now, not when
        // the consumer gets round to it: a message waiting behind slower ones in this batch must
        // not have its receipt expire and be received a second time.
        let mut batch = messages
            .into_iter()
            .map(|m| delivery(&inner, &url, &source, &dlq, &deleter, keeper.as_ref(), m))
            .collect::<std::collections::VecDeque<_>>();
        if stop.load(Ordering::SeqCst) {
            // Closing: what this last receive brought goes back to the queue at once.
            for d in batch {
                let (_, settle) = d.into_parts();
                let _ = settle.nack(Duration::ZERO).await;
            }
            return;
        }
        while let Some(d) = batch.pop_front() {
            if let Err(mpsc::error::SendError(Ok(d))) = tx.send(Ok(d)).await {
                // Subscriber gone: make this and the rest visible again at once.
                for d in std::iter::once(d).chain(batch) {
                    let (_, settle) = d.into_parts();
                    let _ = settle.nack(Duration::ZERO).await;
                }
                return;
            }
        }
    }
}

/// Batches the deletes (acks) of one subscription: while `DELETES_IN_FLIGHT` requests are out,
/// further acks queue and share the next `DeleteMessageBatch` (up to ten entries); before a
/// request goes out, acks that other runnable tasks are about to make join it (`gather_ready`).
/// Concurrent handlers cost about one request per ten acks, and a lone ack is not held by a
/// timer. Each ack still awaits the outcome of its own entry.
#[derive(Clone)]
struct Deleter(mpsc::UnboundedSender<DeleteRequest>);

struct DeleteRequest {
    handle: String,
    id: MessageId,
    done: oneshot::Sender<Result<()>>,
}

async fn run_deleter(
    inner: Arc<Inner>,
    url: String,
    mut rx: mpsc::UnboundedReceiver<DeleteRequest>,
) {
    // At most this many delete requests in flight: acks that arrive meanwhile wait and go out
    // together in the next request. No timer is involved, so a lone ack is never delayed.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(DELETES_IN_FLIGHT));
    let mut buf = Vec::with_capacity(BATCH);
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        if rx.recv_many(&mut buf, BATCH).await == 0 {
            return;
        }
        courier_core::batch::gather_ready(&mut rx, &mut buf, BATCH).await;
        let batch = std::mem::replace(&mut buf, Vec::with_capacity(BATCH));
        let (inner, url) = (inner.clone(), url.clone());
        tokio::spawn(async move {
            delete_batch(inner, url, batch).await;
            drop(permit);
        });
    }
}

/// AWS: `ReceiptHandleIsInvalid`; LocalStack: `InvalidParameterValue` "... has expired".
fn expired(id: &MessageId, text: &str) -> Option<Error> {
    (text.contains("ReceiptHandleIsInvalid") || text.contains("receipt handle has expired")).then(
        || Error::DeliveryExpired {
            message_id: id.to_string(),
            reason: "its receipt handle expired (visibility timeout passed)".into(),
        },
    )
}

async fn delete_batch(inner: Arc<Inner>, url: String, batch: Vec<DeleteRequest>) {
    if let [one] = &batch[..] {
        let r = inner
            .sdk
            .delete_message()
            .queue_url(&url)
            .receipt_handle(&one.handle)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                let text = DisplayErrorContext(&e).to_string();
                expired(&one.id, &text).unwrap_or_else(|| sdk_err("delete_message", e))
            });
        let one = batch.into_iter().next().expect("one entry");
        let _ = one.done.send(r);
        return;
    }
    let entries = batch
        .iter()
        .enumerate()
        .map(|(i, r)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(&r.handle)
                .build()
                .expect("id and receipt handle are set")
        })
        .collect::<Vec<_>>();
    let out = inner
        .sdk
        .delete_message_batch()
        .queue_url(&url)
        .set_entries(Some(entries))
        .send()
        .await;
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            let retryable = matches!(
                e,
                SdkError::TimeoutError(_)
                    | SdkError::DispatchFailure(_)
                    | SdkError::ResponseError(_)
            );
            let text = DisplayErrorContext(&e).to_string();
            for r in batch {
                let _ = r.done.send(Err(Error::broker(
                    BACKEND,
                    "delete_message_batch",
                    retryable,
                    text.clone(),
                )));
            }
            return;
        }
    };
    let mut failed: HashMap<String, Error> = out
        .failed
        .into_iter()
        .filter_map(|f| {
            let i: usize = f.id.parse().ok()?;
            let id = &batch.get(i)?.id;
            let text = format!(
                "{}: {}",
                f.code,
                f.message.as_deref().unwrap_or("no message")
            );
            let err = expired(id, &text).unwrap_or_else(|| {
                Error::broker(BACKEND, "delete_message_batch", !f.sender_fault, text)
            });
            Some((f.id, err))
        })
        .collect();
    for (i, r) in batch.into_iter().enumerate() {
        let _ = r.done.send(match failed.remove(&i.to_string()) {
            Some(e) => Err(e),
            None => Ok(()),
        });
    }
}

fn delivery(
    inner: &Arc<Inner>,
    url: &str,
    source: &str,
    dlq: &str,
    deleter: &Deleter,
    keeper: Option<&Arc<Keeper>>,
    m: aws_sdk_sqs::types::Message,
) -> Delivery {
    let message = decode(&m);
    let before: u32 = m
        .message_attributes()
        .and_then(|a| a.get(ATTR_ATTEMPTS_BEFORE))
        .and_then(|v| v.string_value())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let attempt = m
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .saturating_add(before);
    let sqs_id = m.message_id().unwrap_or_default().to_owned();
    let deferred = inner.deferrals.lock().get(&sqs_id).copied().unwrap_or(0);
    let attempt = attempt.saturating_sub(deferred).max(1);
    let sequence = m
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::SequenceNumber))
        .cloned();
    let sent_at = m
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms));
    let handle = m.receipt_handle().unwrap_or_default().to_owned();
    let lease = keeper.map(|k| k.hold(&handle));
    let settle = SqsSettle {
        inner: inner.clone(),
        url: url.to_owned(),
        dlq: dlq.to_owned(),
        source: source.to_owned(),
        handle,
        id: message.id.clone(),
        message: message.clone(),
        attempt,
        fifo: url.ends_with(".fifo"),
        sqs_id: Some(sqs_id.clone()).filter(|s| !s.is_empty()),
        deleter: deleter.clone(),
        _lease: lease,
    };
    Delivery::new(
        message,
        attempt,
        Position::SqsMessage {
            message_id: sqs_id,
            sequence_number: sequence,
        },
        source.to_owned(),
        Box::new(settle),
    )
    .with_published_at(sent_at)
}

/// The visibility heartbeat of one subscription: every message received and not yet settled is
/// registered here, and every third of the visibility timeout the keeper extends all of them with
/// `ChangeMessageVisibilityBatch` (ten per request) — one request per ten messages instead of one
/// per message, which matters when handlers are slow or many deliveries wait in the buffer.
/// A message leaves the set when its delivery is settled or dropped.
struct Keeper {
    live: Mutex<HashMap<u64, String>>,
    next: std::sync::atomic::AtomicU64,
}

/// A message's place in the keeper; dropping it stops the extensions.
struct Lease {
    keeper: Arc<Keeper>,
    slot: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.live.lock().remove(&self.slot);
    }
}

impl Keeper {
    fn start(inner: &Arc<Inner>, url: &str, every: Duration) -> Arc<Keeper> {
        let keeper = Arc::new(Keeper {
            live: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&keeper);
        let inner = inner.clone();
        let url = url.to_owned();
        let vis = settings::visibility(&inner.config);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                // Ends when the subscription and every delivery it handed out are gone.
                let Some(keeper) = weak.upgrade() else { return };
                let handles: Vec<String> = keeper.live.lock().values().cloned().collect();
                drop(keeper);
                for chunk in handles.chunks(BATCH) {
                    extend(&inner, &url, chunk, vis).await;
                }
            }
        });
        keeper
    }

    fn hold(self: &Arc<Self>, handle: &str) -> Lease {
        let slot = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.live.lock().insert(slot, handle.to_owned());
        Lease {
            keeper: self.clone(),
            slot,
        }
    }
}

async fn extend(inner: &Inner, url: &str, handles: &[String], vis: Duration) {
    let entries = handles
        .iter()
        .enumerate()
        .map(|(i, h)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(h)
                .visibility_timeout(vis.as_secs() as i32)
                .build()
                .expect("id and receipt handle are set")
        })
        .collect::<Vec<_>>();
    match inner
        .sdk
        .change_message_visibility_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
    {
        Ok(out) => {
            for f in out.failed {
                // A message settled while the request was in flight fails here harmlessly.
                debug!(code = %f.code, message = ?f.message, "visibility extension refused");
            }
        }
        Err(e) => warn!(error = %DisplayErrorContext(&e), "visibility heartbeat failed"),
    }
}

struct SqsStream {
    rx: mpsc::Receiver<Result<Delivery>>,
    task: tokio::task::JoinHandle<()>,
    /// Tells the receive loop to stop after the request in flight.
    stop: Arc<AtomicBool>,
    /// The long-poll wait: how long that request can take.
    wait: Duration,
}

#[async_trait]
impl DeliveryStream for SqsStream {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    /// Stops receiving without abandoning a long poll in flight: SQS can hand messages to a
    /// request whose client has gone, and those stay invisible until their visibility timeout
    /// (30 s by default) — a restart would see them late. So the last receive is awaited (at
    /// most the long-poll wait, 20 s by default, plus 5 s) and whatever it or the channel
    /// still holds becomes visible again at once.
    async fn close(mut self: Box<Self>) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let rx = &mut self.rx;
        let drained = tokio::time::timeout(self.wait + Duration::from_secs(5), async {
            // Ends when the receive loop has returned (its sender dropped).
            while let Some(r) = rx.recv().await {
                if let Ok(d) = r {
                    let (_, settle) = d.into_parts();
                    let _ = settle.nack(Duration::ZERO).await;
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!("the last SQS receive did not finish in time; abandoning it (its messages reappear after their visibility timeout)");
        }
        self.task.abort();
        self.rx.close();
        while let Ok(Ok(d)) = self.rx.try_recv() {
            let (_, settle) = d.into_parts();
            let _ = settle.nack(Duration::ZERO).await;
        }
        Ok(())
    }
}

impl Drop for SqsStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct SqsSettle {
    inner: Arc<Inner>,
    url: String,
    dlq: String,
    source: String,
    handle: String,
    id: MessageId,
    message: Message,
    attempt: u32,
    fifo: bool,
    /// SQS's own message id (FIFO deferral counts).
    sqs_id: Option<String>,
    deleter: Deleter,
    _lease: Option<Lease>,
}

impl SqsSettle {
    async fn delete(&self) -> Result<()> {
        if let Some(sqs_id) = &self.sqs_id {
            self.inner.deferrals.lock().remove(sqs_id);
        }
        let (done, outcome) = oneshot::channel();
        let req = DeleteRequest {
            handle: self.handle.clone(),
            id: self.id.clone(),
            done,
        };
        if let Err(mpsc::error::SendError(req)) = self.deleter.0.send(req) {
            // The subscription's deleter has ended (runtime shutting down): delete directly.
            let (done, outcome) = oneshot::channel();
            delete_batch(
                self.inner.clone(),
                self.url.clone(),
                vec![DeleteRequest { done, ..req }],
            )
            .await;
            return outcome.await.unwrap_or_else(|_| Err(gone()));
        }
        outcome.await.unwrap_or_else(|_| Err(gone()))
    }
}

fn gone() -> Error {
    Error::broker(
        BACKEND,
        "delete_message",
        true,
        "the delete was dropped before it completed (runtime shutting down); the message will be redelivered",
    )
}

#[async_trait]
impl Settle for SqsSettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.delete().await
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        let SqsSettle {
            inner,
            url,
            handle,
            _lease,
            ..
        } = *self;
        drop(_lease);
        let secs = delay.as_secs_f64().ceil().min(43_200.0) as i32;
        inner
            .sdk
            .change_message_visibility()
            .queue_url(&url)
            .receipt_handle(&handle)
            .visibility_timeout(secs)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_err("change_message_visibility", e))
    }

    /// Standard queues: a copy sent with `DelaySeconds` (at most 15 minutes) and the attempts
    /// made so far, then the original deleted — the copy's receive count starts over, so a
    /// redrive policy never counts a deferral (conformance scenario `deferrals_never_dead_letter`).
    /// FIFO queues keep the message in place (a copy would overtake its group's later messages,
    /// and SQS has no per-message delay there): the visibility timeout is changed, which SQS
    /// counts as a receive; this client takes its deferrals off the receive count for the retry
    /// budget, but a redrive policy's `maxReceiveCount` sees them (size it above the deferrals an
    /// outage can cause).
    async fn defer(self: Box<Self>, delay: Duration) -> Result<()> {
        if self.fifo {
            if let Some(sqs_id) = self.sqs_id.clone() {
                let mut d = self.inner.deferrals.lock();
                if d.len() >= 100_000 {
                    d.clear();
                }
                *d.entry(sqs_id).or_default() += 1;
            }
            return self.nack(delay).await;
        }
        let mut enc = encode(&self.message)?;
        enc.attributes.insert(
            ATTR_ATTEMPTS_BEFORE.to_owned(),
            string_attr(&self.attempt.saturating_sub(1).to_string()),
        );
        enc.delay_seconds = Some(delay.as_secs_f64().ceil().min(900.0) as i32);
        self.inner.send(&self.source, &self.message, enc).await?;
        self.delete().await
    }

    async fn dead_letter(self: Box<Self>, message: &Message, why: DeadLetter) -> Result<()> {
        let m = why.stamp(message, &self.source);
        let enc = encode(&m)?;
        self.inner.send(&self.dlq, &m, enc).await?;
        self.delete().await
    }
}
