//! What a broker backend crate provides: one [`Backend`] implementation, on its `[backend]`
//! section type. The `courier` facade, `courier doctor` and the CLI dispatch through it, so a
//! new backend is its own crate plus one line in the facade's list of backends.

use crate::config::{BackendSection, BackendUrl};
use crate::findings::Finding;
use crate::{Config, DeliveryClient, Explanation, Result};

/// A broker backend, implemented by its `[backend]` section type (e.g.
/// `courier_kafka::KafkaConfig`): the section's validation and URL form, connecting, the
/// effective settings (`courier explain`) and the live checks (`courier doctor`).
#[async_trait::async_trait]
pub trait Backend:
    Clone
    + std::fmt::Debug
    + PartialEq
    + Default
    + serde::Serialize
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// `[backend] kind`, also the name in errors and metrics.
    const KIND: &'static str;
    /// URL schemes that select this backend (`Config::from_url`).
    const SCHEMES: &'static [&'static str];

    /// Check the section's values, with a message that says how to fix them.
    fn check(&self) -> Result<()>;
    /// The section a URL of one of [`Backend::SCHEMES`] describes.
    fn parse_url(url: &BackendUrl<'_>) -> Result<Self>;
    /// What decides whether a guarantee carries over to or from this broker
    /// (`courier doctor`'s portability findings).
    const TRAITS: BrokerTraits;

    /// The largest payload (envelope included) this configuration accepts, bytes.
    fn max_message_bytes(&self) -> usize;
    /// Connect with `config`'s guarantee and settings (validated here, once).
    async fn connect(config: &Config<Self>) -> Result<Box<dyn DeliveryClient>>;
    /// The effective broker settings for `config`'s guarantee, without connecting.
    fn explain(config: &Config<Self>) -> Result<Explanation>;
    /// Live, read-only checks of `destinations` on the broker (`courier doctor`).
    async fn doctor(config: &Config<Self>, destinations: &[String]) -> Vec<Finding>;

    /// The one address every connection of this configuration goes to, as a URL (RabbitMQ's
    /// `amqp://` URL, an SQS endpoint), when there is one. `None` (the default) where clients
    /// also connect to addresses the cluster advertises (Kafka) or there is no connection
    /// (memory). `courier verify`'s connection cuts put a fault proxy there.
    fn endpoint(&self) -> Option<String> {
        None
    }

    /// Reach the broker at `url` (same scheme as [`Backend::endpoint`]) instead.
    fn set_endpoint(&mut self, url: String) {
        let _ = url;
    }

    /// Give this configuration a stable identity per instance (`courier verify`'s fleet slot, a
    /// pod name) where the broker ties state to one: Kafka's `transactional.id`, so a restarted
    /// instance fences its predecessor's open transaction. No-op by default.
    fn set_instance(&mut self, instance: &str) {
        let _ = instance;
    }
}

/// The facts about a broker that decide whether a guarantee carries over when a configuration
/// moves to it or from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerTraits {
    /// How messages of one key are ordered for consumers.
    pub ordering: &'static str,
    /// Whether per-key order can be kept there at all (with competing consumers).
    pub keeps_key_order: bool,
    /// How to keep (or live without) per-key order there.
    pub ordering_fix: &'static str,
    /// Whether each consumer group gets its own copy of every message.
    pub consumer_groups: bool,
    /// The broker's own dedup window for re-sent ids, if it has one.
    pub native_dedup: Option<std::time::Duration>,
    /// Whether consumed offsets and produced messages commit atomically.
    pub transactions: bool,
    /// The broker's default payload ceiling, bytes.
    pub max_payload: usize,
    /// Whether the broker delays a redelivery itself.
    pub delayed_redelivery: bool,
    /// Whether the broker lives inside the process (no other process can reach it).
    pub in_process: bool,
}

impl<T: Backend> BackendSection for T {
    fn kind(&self) -> &'static str {
        T::KIND
    }

    fn validate(&self) -> Result<()> {
        self.check()
    }

    fn from_url(url: &BackendUrl<'_>) -> Result<Self> {
        if !T::SCHEMES.contains(&url.scheme()) {
            return Err(crate::Error::config(format!(
                "the {} backend takes {} URLs, not {}://",
                T::KIND,
                T::SCHEMES
                    .iter()
                    .map(|s| format!("{s}://"))
                    .collect::<Vec<_>>()
                    .join(" or "),
                url.scheme()
            )));
        }
        T::parse_url(url)
    }

    fn prepare(table: &mut toml::Table) -> Result<()> {
        match table.remove("kind") {
            None => Ok(()),
            Some(toml::Value::String(k)) if k == T::KIND => Ok(()),
            Some(other) => Err(crate::Error::config(format!(
                "[backend] kind = {other} where this configuration is for the {} backend",
                T::KIND
            ))),
        }
    }
}
