//! Settling one received message: delete, change its visibility, dead-letter.

use super::*;

pub(super) struct SqsSettle {
    pub(super) inner: Arc<Inner>,
    pub(super) url: String,
    pub(super) dlq: String,
    pub(super) source: String,
    pub(super) handle: String,
    pub(super) id: MessageId,
    pub(super) message: Message,
    pub(super) attempt: u32,
    pub(super) fifo: bool,
    /// SQS's own message id (FIFO deferral counts).
    pub(super) sqs_id: Option<String>,
    pub(super) deleter: Deleter,
    pub(super) _lease: Option<Lease>,
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

pub(super) fn gone() -> Error {
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
