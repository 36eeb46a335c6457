//! Request-reply over any backend: a [`Requester`] publishes a request with a reply destination
//! and a correlation id, and waits for the reply; the consume loop publishes a handler's result
//! ([`Context::set_result`](crate::Context::set_result)) to the request's reply destination.
//!
//! A request asked again (its reply was lost, the requester timed out) keeps its idempotency key:
//! through the idempotent layer, the replier answers it with the **stored result of the first
//! run** and never runs the handler twice. Conformance scenario
//! `request_reply_answers_a_repeated_request_from_the_stored_result`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{header, DeliveryClient, Error, Message, MessageId, Result, Subscription};

/// Calls waiting for a reply, by correlation id: each call (a number) and its channel. Calls
/// with the same key share the reply.
type Waiters = Arc<Mutex<HashMap<String, Vec<(u64, oneshot::Sender<Message>)>>>>;

/// Sends requests and routes their replies back, over one reply destination of its own.
///
/// ```no_run
/// # async fn demo(client: std::sync::Arc<dyn courier_core::DeliveryClient>) -> courier_core::Result<()> {
/// use std::time::Duration;
/// use courier_core::{Message, Requester};
///
/// // One reply destination per requesting instance (e.g. with the pod name in it).
/// let requester = Requester::start(client, "payments-replies-web-1").await?;
/// let charge = Message::new(r#"{"amount": 42}"#).with_id("charge-order-1017");
/// let reply = requester.request("payments", charge.clone(), Duration::from_secs(5)).await?;
/// // Timed out? Ask again with the same message: the replier answers from its stored result.
/// # let _ = reply;
/// requester.close().await?;
/// # Ok(())
/// # }
/// ```
pub struct Requester {
    client: Arc<dyn DeliveryClient>,
    reply_to: String,
    waiters: Waiters,
    calls: std::sync::atomic::AtomicU64,
    stop: CancellationToken,
    router: tokio::task::JoinHandle<()>,
}

impl Requester {
    /// Declare `reply_to` (created where it does not exist), subscribe to it (a consumer group of the same name) and
    /// start routing replies. `reply_to` must be this requester's alone: replies for other
    /// requesters arriving there are dropped.
    pub async fn start(
        client: Arc<dyn DeliveryClient>,
        reply_to: impl Into<String>,
    ) -> Result<Self> {
        let reply_to = reply_to.into();
        let sub = Subscription::new(&reply_to, &reply_to);
        client.declare_subscription(&sub).await?;
        let mut replies = client.subscribe(sub).await?;
        let waiters: Waiters = Arc::default();
        let stop = CancellationToken::new();
        let router = tokio::spawn({
            let (waiters, stop) = (waiters.clone(), stop.clone());
            async move {
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => break,
                        d = replies.next() => d,
                    };
                    match next {
                        None => break,
                        Some(Err(e)) if e.is_retryable() => {
                            warn!(error = %e, "reply subscription error; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Some(Err(e)) => {
                            warn!(error = %e, "reply subscription ended");
                            break;
                        }
                        Some(Ok(d)) => {
                            let waiter = d
                                .message
                                .correlation_id()
                                .and_then(|c| waiters.lock().remove(c));
                            match waiter {
                                Some(calls) => {
                                    for (_, w) in calls {
                                        let _ = w.send(d.message.clone());
                                    }
                                }
                                None => {
                                    debug!(message_id = %d.message.id, "a reply nobody waits for (late, or answered already): dropped")
                                }
                            }
                            if let Err(e) = d.ack().await {
                                debug!(error = %e, "acknowledging a reply failed");
                            }
                        }
                    }
                }
                let _ = replies.close().await;
            }
        });
        Ok(Requester {
            client,
            reply_to,
            waiters,
            calls: std::sync::atomic::AtomicU64::new(0),
            stop,
            router,
        })
    }

    /// The destination replies come back to.
    pub fn reply_to(&self) -> &str {
        &self.reply_to
    }

    /// Publish `request` to `destination` and wait up to `timeout` for its reply.
    ///
    /// The request's idempotency key is its [`header::IDEMPOTENCY_KEY`], else its id; each
    /// send goes out with a fresh message id (so no broker dedup drops a request asked again)
    /// and that key, which the replier's idempotent layer dedups on, and which is the
    /// correlation id of the reply. After [`Error::Timeout`], calling `request` again with the
    /// same message asks again safely. A request the replier dead-lettered (its handler failed
    /// for good) is answered with [`Error::RequestFailed`] and the reason, not left to time out.
    pub async fn request(
        &self,
        destination: &str,
        request: Message,
        timeout: Duration,
    ) -> Result<Message> {
        let key = request
            .headers
            .get(header::IDEMPOTENCY_KEY)
            .cloned()
            .unwrap_or_else(|| request.id.to_string());
        let mut m = request
            .with_id(MessageId::new())
            .with_header(header::IDEMPOTENCY_KEY, key.clone())
            .with_header(header::REPLY_TO, self.reply_to.clone())
            .with_header(header::CORRELATION_ID, key.clone());
        m.headers.remove(header::NOT_BEFORE);
        let (tx, rx) = oneshot::channel();
        let call = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Calls asking with the same key at once (a double click) share one reply.
        self.waiters
            .lock()
            .entry(key.clone())
            .or_default()
            .push((call, tx));
        // Forgets this call's waiter however the call ends (answered, failed, timed out, dropped).
        let _forget = Forget {
            waiters: &self.waiters,
            key: &key,
            call,
        };
        self.client.publish(destination, m).await?;
        let reply = tokio::time::timeout(timeout, rx).await;
        match reply {
            Ok(Ok(reply)) => match reply.headers.get(header::REPLY_ERROR) {
                Some(reason) => Err(Error::RequestFailed {
                    destination: destination.to_owned(),
                    key: key.clone(),
                    reason: reason.clone(),
                }),
                None => Ok(reply),
            },
            Ok(Err(_)) => Err(Error::Closed { what: "requester" }),
            Err(_) => Err(Error::Timeout {
                operation: format!("waiting for the reply to request {key} sent to {destination:?} (ask again with the same message: the replier answers from its stored result)"),
                after: timeout,
            }),
        }
    }

    /// Stop routing replies and close the reply subscription (the reply destination stays).
    pub async fn close(self) -> Result<()> {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.router).await;
        Ok(())
    }
}

impl std::fmt::Debug for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester")
            .field("reply_to", &self.reply_to)
            .field("waiting", &self.waiters.lock().len())
            .finish()
    }
}

/// Removes a request's waiter when its call ends (answered, timed out or cancelled).
struct Forget<'a> {
    waiters: &'a Waiters,
    key: &'a str,
    call: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut w = self.waiters.lock();
        if let Some(calls) = w.get_mut(self.key) {
            calls.retain(|(call, _)| *call != self.call);
            if calls.is_empty() {
                w.remove(self.key);
            }
        }
    }
}

impl Message {
    /// Where a reply to this message goes ([`header::REPLY_TO`]), if it is a request.
    pub fn reply_to(&self) -> Option<&str> {
        self.headers.get(header::REPLY_TO).map(String::as_str)
    }

    /// The id that ties a reply to its request ([`header::CORRELATION_ID`]).
    pub fn correlation_id(&self) -> Option<&str> {
        self.headers.get(header::CORRELATION_ID).map(String::as_str)
    }
}

/// The reply the consume loop publishes for a handled request: the handler's result (or, for a
/// duplicate absorbed by the idempotent layer, the first run's stored result) to the request's
/// reply destination, with its correlation id.
pub(crate) fn reply_for(
    request: &Message,
    result: Option<&bytes::Bytes>,
) -> Option<(String, Message)> {
    addressed(request, Message::new(result?.clone()))
}

/// The reply for a request the consume loop dead-lettered: the reason, as payload and in
/// [`header::REPLY_ERROR`], so the requester learns at once why no answer comes.
pub(crate) fn fault_reply_for(request: &Message, reason: &str) -> Option<(String, Message)> {
    addressed(
        request,
        Message::new(reason.to_owned()).with_header(header::REPLY_ERROR, reason),
    )
}

/// `reply` addressed to `request`'s reply destination with its correlation id (none when the
/// message is not a request).
fn addressed(request: &Message, reply: Message) -> Option<(String, Message)> {
    let to = request.reply_to()?;
    let correlation = request
        .correlation_id()
        .map(str::to_owned)
        .unwrap_or_else(|| request.id.to_string());
    Some((
        to.to_owned(),
        reply.with_header(header::CORRELATION_ID, correlation),
    ))
}
