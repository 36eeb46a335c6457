//! Layers over a handler: each one a [`Handler`] (and, where it applies, a [`BatchHandler`])
//! that wraps another, like tower's middleware. The consume loop stacks them for every handler
//! it runs, innermost first:
//!
//! 1. [`Guard`]: a panic or a run longer than the handler timeout becomes a retryable
//!    [`HandlerError`] instead of taking the lane down or holding it forever
//!    (`crates/courier/tests/layers.rs`).
//! 2. At-most-once only: skip an id this process has already taken, then wait until the
//!    message is due (its `not-before` time), since an at-most-once delivery is settled before
//!    the handler runs and cannot go back to the broker.
//!
//! The idempotent-consumer layer (`courier_idempotency::Idempotent`) is the next one out; the
//! facade's `courier::ConsumerBuilder` adds it as the configuration says. What stays in the
//! loop is what needs the delivery's settle handle: acknowledging, retrying, deferring and
//! dead-lettering, as the [`RetryStrategy`](crate::RetryStrategy) decides.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use parking_lot::Mutex;

use crate::handler::{BatchHandler, Context, Handler, HandlerError};
use crate::Message;

/// Catches a handler's panic and bounds its run time; both become retryable errors
/// ("handler panicked: …", "handler timed out after …").
#[derive(Debug, Clone)]
pub struct Guard<H> {
    inner: H,
    timeout: Option<Duration>,
}

impl<H> Guard<H> {
    /// Guard `inner` against panics, with no time limit.
    pub fn new(inner: H) -> Self {
        Guard {
            inner,
            timeout: None,
        }
    }

    /// Fail (and so retry) runs longer than `limit`; `None` = no limit.
    pub fn timeout(mut self, limit: Option<Duration>) -> Self {
        self.timeout = limit;
        self
    }

    async fn run<F>(&self, fut: F) -> Result<(), HandlerError>
    where
        F: std::future::Future<Output = Result<(), HandlerError>>,
    {
        let guarded = AssertUnwindSafe(fut).catch_unwind();
        let outcome = match self.timeout {
            Some(t) => match tokio::time::timeout(t, guarded).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(HandlerError::retryable(format!(
                        "handler timed out after {t:?}"
                    )))
                }
            },
            None => guarded.await,
        };
        outcome.unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(HandlerError::retryable(format!("handler panicked: {msg}")))
        })
    }
}

#[async_trait]
impl<H: Handler> Handler for Guard<H> {
    async fn handle(&self, message: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        self.run(self.inner.handle(message, cx)).await
    }

    fn is_idempotent(&self) -> bool {
        self.inner.is_idempotent()
    }

    async fn prepare(&self, messages: &[&Message]) {
        self.inner.prepare(messages).await
    }

    async fn abandon(&self, messages: &[&Message]) {
        self.inner.abandon(messages).await
    }
}

#[async_trait]
impl<H: BatchHandler> BatchHandler for Guard<H> {
    async fn handle_batch(
        &self,
        messages: &[Message],
        cx: &mut Context,
    ) -> Result<(), HandlerError> {
        self.run(self.inner.handle_batch(messages, cx)).await
    }
}

/// The ids a process's at-most-once consumers of one subscription have taken, the most recent
/// `cap` of them.
#[derive(Debug)]
pub(crate) struct SeenIds {
    set: std::collections::HashSet<crate::MessageId>,
    order: std::collections::VecDeque<crate::MessageId>,
    cap: usize,
}

impl SeenIds {
    pub(crate) fn new(cap: usize) -> Self {
        SeenIds {
            set: Default::default(),
            order: Default::default(),
            cap,
        }
    }

    /// True if `id` is new (and records it).
    pub(crate) fn insert(&mut self, id: &crate::MessageId) -> bool {
        if self.cap == 0 {
            return true;
        }
        if !self.set.insert(id.clone()) {
            return false;
        }
        self.order.push_back(id.clone());
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// At-most-once, after the delivery is settled: a message whose id this process has already
/// taken is skipped ([`Context::was_skipped`]); one that is not due yet waits here, holding its
/// lane ([`Context::waited`]), since it can no longer go back to the broker.
pub(crate) struct AtMostOnce<H> {
    pub(crate) inner: H,
    pub(crate) seen: Arc<Mutex<SeenIds>>,
}

#[async_trait]
impl<H: Handler> Handler for AtMostOnce<H> {
    async fn handle(&self, message: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        if !self.seen.lock().insert(&message.id) {
            cx.skip();
            return Ok(());
        }
        if let Some(wait) = message.due_in() {
            cx.wait(wait);
            tokio::time::sleep(wait).await;
        }
        self.inner.handle(message, cx).await
    }

    fn is_idempotent(&self) -> bool {
        self.inner.is_idempotent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{handler_fn, MessageId};

    #[test]
    fn seen_ids_is_bounded() {
        let mut s = SeenIds::new(2);
        let (a, b, c) = (MessageId::new(), MessageId::new(), MessageId::new());
        assert!(s.insert(&a));
        assert!(!s.insert(&a));
        assert!(s.insert(&b));
        assert!(s.insert(&c));
        assert!(s.insert(&a), "a was evicted");
    }

    #[tokio::test]
    async fn panics_and_timeouts_become_retryable_errors() {
        let panicking = Guard::new(handler_fn(|_m| async move { panic!("boom") }));
        let slow = Guard::new(handler_fn(|_m| async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }))
        .timeout(Some(Duration::from_millis(20)));
        let m = Message::new("x");
        let mut cx = Context::new(m.id.clone(), 1, "d");
        let e = panicking.handle(&m, &mut cx).await.unwrap_err();
        assert!(
            matches!(&e, HandlerError::Retryable(_)) && e.to_string().contains("boom"),
            "{e}"
        );
        let e = slow.handle(&m, &mut cx).await.unwrap_err();
        assert!(e.to_string().contains("timed out after 20ms"), "{e}");
    }

    #[tokio::test]
    async fn at_most_once_skips_an_id_it_has_taken() {
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = runs.clone();
        let layer = AtMostOnce {
            inner: handler_fn(move |_m| {
                let runs = counted.clone();
                async move {
                    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                }
            }),
            seen: Arc::new(Mutex::new(SeenIds::new(8))),
        };
        let m = Message::new("x");
        let mut first = Context::new(m.id.clone(), 1, "d");
        let mut second = Context::new(m.id.clone(), 1, "d");
        layer.handle(&m, &mut first).await.unwrap();
        layer.handle(&m, &mut second).await.unwrap();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(!first.was_skipped() && second.was_skipped());
    }
}
