//! # courier-core
//!
//! The contract every courier backend implements: the [`Guarantee`], the message envelope
//! ([`Message`]), received [`Delivery`]s and how they are settled, the dyn-compatible
//! [`DeliveryClient`] trait, [`Capabilities`], the typed [`Error`], configuration, and the
//! [`Consumer`] — the consume loop that orders settle vs handler as each guarantee requires.
//!
//! | guarantee | publish returns Ok when | consume: settle vs handler | on handler error |
//! |---|---|---|---|
//! | at-most-once | handed to the client | settle **before** the handler | dropped (counted) |
//! | at-least-once | broker confirmed | settle **after** the handler | retried with backoff, then dead-lettered |
//! | exactly-once | confirmed + broker dedup by id where it exists | after the handler, through the idempotent layer or a transaction | as at-least-once; duplicates absorbed |

mod admin;
mod backend;
pub mod batch;
mod capabilities;
mod client;
mod codec;
pub mod config;
mod consumer;
mod error;
mod explain;
pub mod findings;
mod guarantee;
mod handler;
pub mod layers;
mod message;
#[cfg(feature = "otel")]
pub mod otel;
mod request;
mod retry;

pub use admin::{DestinationInfo, GroupInfo};
pub use backend::{Backend, BrokerTraits};
pub use capabilities::Capabilities;
pub use client::{check_payload, Deliveries, DeliveryClient, DeliveryStream, Subscription};
pub use codec::{
    handler_fn_with_context, json_handler_fn, ContextHandlerFn, HandlerFuture, JsonHandlerFn, JSON,
};
pub use config::{BackendSection, BackendUrl, Config};
pub use consumer::{BatchOptions, Consumer, ConsumerHandle, ConsumerStats};
pub use error::{BoxError, Error, Result};
pub use explain::{Explanation, Setting};
pub use guarantee::Guarantee;
pub use handler::{
    batch_handler_fn, handler_fn, BatchHandler, BatchHandlerFn, Context, Handler, HandlerError,
    HandlerFn, Outgoing,
};
pub use message::{
    header, AfterCommit, CommitHook, DeadLetter, Delivery, DeliveryInfo, Headers, Message,
    MessageId, Position, Receipt, Settle,
};
pub use request::Requester;
pub use retry::{Failure, RetryDecision, RetryPolicy, RetryStrategy};

/// Re-exported so backends and users implement the traits without naming the crate.
pub use async_trait::async_trait;
pub use bytes::Bytes;
