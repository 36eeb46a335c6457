//! Receiving: the long-poll loop, the batched deletes, the visibility heartbeat and the stream.

use super::*;

/// Where the receive loop hands its deliveries, and the flag that stops it (`SqsStream::close`).
pub(super) struct Handoff {
    pub(super) tx: mpsc::Sender<Result<Delivery>>,
    pub(super) stop: Arc<AtomicBool>,
}

pub(super) async fn poll(
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
pub(super) struct Deleter(pub(super) mpsc::UnboundedSender<DeleteRequest>);

pub(super) struct DeleteRequest {
    pub(super) handle: String,
    pub(super) id: MessageId,
    pub(super) done: oneshot::Sender<Result<()>>,
}

pub(super) async fn run_deleter(
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
pub(super) fn expired(id: &MessageId, text: &str) -> Option<Error> {
    (text.contains("ReceiptHandleIsInvalid") || text.contains("receipt handle has expired")).then(
        || Error::DeliveryExpired {
            message_id: id.to_string(),
            reason: "its receipt handle expired (visibility timeout passed)".into(),
        },
    )
}

pub(super) async fn delete_batch(inner: Arc<Inner>, url: String, batch: Vec<DeleteRequest>) {
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

pub(super) fn delivery(
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
pub(super) struct Keeper {
    pub(super) live: Mutex<HashMap<u64, String>>,
    pub(super) next: std::sync::atomic::AtomicU64,
}

/// A message's place in the keeper; dropping it stops the extensions.
pub(super) struct Lease {
    pub(super) keeper: Arc<Keeper>,
    pub(super) slot: u64,
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

pub(super) async fn extend(inner: &Inner, url: &str, handles: &[String], vis: Duration) {
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

pub(super) struct SqsStream {
    pub(super) rx: mpsc::Receiver<Result<Delivery>>,
    pub(super) task: tokio::task::JoinHandle<()>,
    /// Tells the receive loop to stop after the request in flight.
    pub(super) stop: Arc<AtomicBool>,
    /// The long-poll wait: how long that request can take.
    pub(super) wait: Duration,
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
