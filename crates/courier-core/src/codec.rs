//! Typed messages: a payload encoded from a `serde` value, with its media type in the
//! `content-type` header, and handlers that receive the decoded value.
//!
//! ```
//! use courier_core::{json_handler_fn, Context, HandlerError, Message};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Order {
//!     id: u64,
//!     amount_cents: i64,
//! }
//!
//! let m = Message::json(&Order { id: 7, amount_cents: 1250 }).unwrap();
//! assert_eq!(m.content_type(), Some("application/json"));
//! let back: Order = m.decode_json().unwrap();
//! assert_eq!(back.id, 7);
//!
//! // A handler over the decoded value; a payload that does not decode is dead-lettered at once.
//! let handler = json_handler_fn(|order: Order, cx: &mut Context| {
//!     Box::pin(async move {
//!         if order.amount_cents <= 0 {
//!             return Err(HandlerError::permanent("amount must be positive"));
//!         }
//!         cx.publish("invoices", Message::json(&order)?);
//!         Ok(())
//!     })
//! });
//! # let _ = handler;
//! ```
//! Guarded by `crates/courier-testkit` scenario `typed_messages_round_trip_and_bad_payloads_dead_letter`,
//! which every backend's conformance suite runs.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{header, Context, Error, Handler, HandlerError, Message, Result};

/// The media type [`Message::json`] stamps in the `content-type` header.
pub const JSON: &str = "application/json";

/// A boxed, `Send` future borrowing for `'a`: what context-taking closures return.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

impl Message {
    /// A message (fresh id) whose payload is `value` as JSON, with `content-type:
    /// application/json`. Fails with [`Error::Encode`] when `serde_json` cannot encode the
    /// value (a map with non-string keys, a failing `Serialize` impl); nothing is sent.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Message> {
        let payload = serde_json::to_vec(value).map_err(|e| Error::Encode {
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })?;
        Ok(Message::new(payload).with_header(header::CONTENT_TYPE, JSON))
    }

    /// The payload's media type (the `content-type` header), if the producer set one.
    pub fn content_type(&self) -> Option<&str> {
        self.headers.get(header::CONTENT_TYPE).map(String::as_str)
    }

    /// Decode the payload as JSON into `T`. A message whose `content-type` names another media
    /// type, or whose payload does not decode as `T`, is a [`HandlerError::Permanent`] (the
    /// consume loop dead-letters it at once; retrying cannot help), whose text names the
    /// message, the type and serde's reason — it becomes the dead-letter reason header. A
    /// message without a `content-type` (a foreign producer) is decoded as JSON.
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        let type_name = std::any::type_name::<T>();
        if let Some(ct) = self.content_type() {
            let essence = ct.split(';').next().unwrap_or("").trim();
            if !(essence.eq_ignore_ascii_case(JSON) || essence.ends_with("+json")) {
                return Err(HandlerError::permanent(format!(
                    "message {} has content-type {ct:?}, not JSON; it cannot be decoded as {type_name}",
                    self.id
                )));
            }
        }
        serde_json::from_slice(&self.payload).map_err(|e| {
            HandlerError::permanent(format!(
                "message {} does not decode as {type_name}: {e}",
                self.id
            ))
        })
    }
}

/// A handler built by [`handler_fn_with_context`].
pub struct ContextHandlerFn<F>(F);

/// Build a [`Handler`] from a closure that receives the message and the [`Context`] (attempt
/// number, outputs, stored result, after-commit steps) without implementing the trait:
///
/// ```
/// use courier_core::{handler_fn_with_context, Context, Message};
///
/// let handler = handler_fn_with_context(|m: &Message, cx: &mut Context| {
///     Box::pin(async move {
///         if cx.attempt() > 1 {
///             tracing::info!(message_id = %m.id, attempt = cx.attempt(), "retrying");
///         }
///         cx.publish("audit", Message::new(m.payload.clone()));
///         Ok(())
///     })
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn_with_context<F>(f: F) -> ContextHandlerFn<F>
where
    F: for<'a> Fn(&'a Message, &'a mut Context) -> HandlerFuture<'a> + Send + Sync + 'static,
{
    ContextHandlerFn(f)
}

#[async_trait]
impl<F> Handler for ContextHandlerFn<F>
where
    F: for<'a> Fn(&'a Message, &'a mut Context) -> HandlerFuture<'a> + Send + Sync + 'static,
{
    async fn handle(&self, message: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        (self.0)(message, cx).await
    }
}

/// A handler built by [`json_handler_fn`].
pub struct JsonHandlerFn<T, F> {
    f: F,
    _t: PhantomData<fn() -> T>,
}

/// Build a [`Handler`] over messages whose payload is `T` as JSON: the closure gets the decoded
/// value and the [`Context`]. A payload that does not decode is dead-lettered at once with the
/// reason (see [`Message::decode_json`]); the closure never sees it.
pub fn json_handler_fn<T, F>(f: F) -> JsonHandlerFn<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: for<'a> Fn(T, &'a mut Context) -> HandlerFuture<'a> + Send + Sync + 'static,
{
    JsonHandlerFn { f, _t: PhantomData }
}

#[async_trait]
impl<T, F> Handler for JsonHandlerFn<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: for<'a> Fn(T, &'a mut Context) -> HandlerFuture<'a> + Send + Sync + 'static,
{
    async fn handle(&self, message: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        let value = message.decode_json::<T>()?;
        (self.f)(value, cx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MessageId;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Order {
        id: u64,
    }

    fn permanent_text(e: HandlerError) -> String {
        match e {
            HandlerError::Permanent(e) => e.to_string(),
            other => panic!("expected a permanent error, got {other}"),
        }
    }

    #[test]
    fn json_round_trips_with_its_content_type() {
        let m = Message::json(&Order { id: 3 }).unwrap();
        assert_eq!(m.content_type(), Some(JSON));
        assert_eq!(m.decode_json::<Order>().unwrap(), Order { id: 3 });
    }

    #[test]
    fn undecodable_payloads_and_other_media_types_are_permanent_errors() {
        let bad = Message::new("{\"id\": \"seven\"}").with_id("m-1");
        let text = permanent_text(bad.decode_json::<Order>().unwrap_err());
        assert!(text.contains("m-1") && text.contains("Order"), "{text}");
        let xml = Message::new("<id>1</id>").with_header(header::CONTENT_TYPE, "application/xml");
        let text = permanent_text(xml.decode_json::<Order>().unwrap_err());
        assert!(text.contains("application/xml"), "{text}");
        // No content-type (a foreign producer) and a JSON variant are decoded.
        assert!(Message::new("{\"id\":1}").decode_json::<Order>().is_ok());
        let variant = Message::new("{\"id\":1}").with_header(
            header::CONTENT_TYPE,
            "application/vnd.orders+json; charset=utf-8",
        );
        assert!(variant.decode_json::<Order>().is_ok());
    }

    #[test]
    fn values_serde_cannot_encode_are_a_typed_error() {
        let mut m = std::collections::HashMap::new();
        m.insert((1, 2), "tuple keys are not JSON object keys");
        let e = Message::json(&m).unwrap_err();
        assert_eq!(e.kind(), "encode");
        assert!(!e.is_retryable());
    }

    #[tokio::test]
    async fn json_handler_fn_decodes_and_sees_the_context() {
        let h = json_handler_fn(|order: Order, cx: &mut Context| {
            Box::pin(async move {
                cx.publish("out", Message::json(&Order { id: order.id + 1 })?);
                Ok(())
            })
        });
        let mut cx = Context::new(MessageId::from_string("in-1"), 1, "in");
        h.handle(&Message::json(&Order { id: 1 }).unwrap(), &mut cx)
            .await
            .unwrap();
        let out = &cx.outputs()[0];
        assert_eq!(out.message.decode_json::<Order>().unwrap(), Order { id: 2 });
        let mut cx = Context::new(MessageId::from_string("in-2"), 1, "in");
        let e = h
            .handle(&Message::new("not json"), &mut cx)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "permanent");
        assert!(cx.outputs().is_empty());
    }

    #[tokio::test]
    async fn handler_fn_with_context_sees_the_attempt() {
        let h = handler_fn_with_context(|_m: &Message, cx: &mut Context| {
            Box::pin(async move {
                if cx.attempt() < 2 {
                    return Err(HandlerError::retryable("first attempt"));
                }
                Ok(())
            })
        });
        let m = Message::new("x");
        let mut first = Context::new(m.id.clone(), 1, "in");
        assert!(h.handle(&m, &mut first).await.is_err());
        let mut second = Context::new(m.id.clone(), 2, "in");
        assert!(h.handle(&m, &mut second).await.is_ok());
    }
}
