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

use crate::SqsConfig;
use courier_core::{
    Capabilities, DeadLetter, Deliveries, Delivery, DeliveryClient, DeliveryStream,
    DestinationInfo, Error, Explanation, GroupInfo, Guarantee, Headers, Message, MessageId,
    Position, Receipt, Result, Settle, Subscription,
};

use crate::{settings, BACKEND};

mod codec;
mod receive;
mod settle;

use codec::*;
use receive::*;
use settle::*;

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
