//! The compiled-in backends: one line each in [`backends!`], the only place the facade names a
//! backend. Everything else — the `[backend]` section's fields, its validation, its URL scheme,
//! connecting, `explain` and `doctor` — is the backend crate's, behind [`Backend`].

use serde::{Deserialize, Serialize};

use courier_core::config::{BackendSection, BackendUrl};
use courier_core::findings::Finding;
use courier_core::{Backend, BrokerTraits, DeliveryClient, Error, Explanation, Result};

use crate::Config;

/// A backend compiled into this build ([`BackendConfig::compiled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompiledBackend {
    /// Its `[backend] kind`.
    pub kind: &'static str,
    /// Its URL schemes (`kafka`, `amqp`/`amqps`, …).
    pub schemes: &'static [&'static str],
    /// The facts `courier doctor` compares when a configuration moves between brokers.
    pub traits: BrokerTraits,
}

/// Declares [`BackendConfig`] with a variant per backend and dispatches to each variant's
/// [`Backend`] implementation. A variant's name, lowercased, is its `[backend] kind`
/// (`tests::kinds_are_the_backends_own` checks it against [`Backend::KIND`]).
macro_rules! backends {
    ($( $(#[cfg($cfg:meta)])? $variant:ident($ty:ty), )*) => {
        /// The `[backend]` section of a configuration: one variant per backend compiled in
        /// (cargo features `kafka`, `rabbitmq`, `sqs`; memory is always there), selected by
        /// `kind`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind", rename_all = "lowercase")]
        #[non_exhaustive]
        pub enum BackendConfig {
            $(
                $(#[cfg($cfg)])?
                #[doc = concat!("`kind = \"", stringify!($variant), "\"` (lowercase).")]
                $variant($ty),
            )*
        }

        $(
            $(#[cfg($cfg)])?
            impl From<$ty> for BackendConfig {
                fn from(section: $ty) -> Self {
                    BackendConfig::$variant(section)
                }
            }
        )*

        impl BackendConfig {
            /// The selected backend's name (`[backend] kind`).
            pub fn kind(&self) -> &'static str {
                match self { $( $(#[cfg($cfg)])? BackendConfig::$variant(_) => <$ty as Backend>::KIND, )* }
            }

            /// Every compiled-in backend: its kind, URL schemes and broker traits.
            pub fn compiled() -> Vec<CompiledBackend> {
                vec![$( $(#[cfg($cfg)])? CompiledBackend {
                    kind: <$ty as Backend>::KIND,
                    schemes: <$ty as Backend>::SCHEMES,
                    traits: <$ty as Backend>::TRAITS,
                }, )*]
            }

            /// The largest payload (envelope included) this section accepts, bytes.
            pub fn max_message_bytes(&self) -> usize {
                match self { $( $(#[cfg($cfg)])? BackendConfig::$variant(b) => b.max_message_bytes(), )* }
            }

            /// The broker traits of the selected backend.
            pub fn traits(&self) -> BrokerTraits {
                match self { $( $(#[cfg($cfg)])? BackendConfig::$variant(_) => <$ty as Backend>::TRAITS, )* }
            }

            /// The one address every connection goes to, as a URL ([`Backend::endpoint`]).
            pub fn endpoint(&self) -> Option<String> {
                match self { $( $(#[cfg($cfg)])? BackendConfig::$variant(b) => b.endpoint(), )* }
            }

            /// Reach the broker at `url` instead ([`Backend::set_endpoint`]).
            pub fn set_endpoint(&mut self, url: String) {
                match self { $( $(#[cfg($cfg)])? BackendConfig::$variant(b) => b.set_endpoint(url), )* }
            }

            /// A stable identity per instance ([`Backend::set_instance`]).
            pub fn set_instance(&mut self, instance: &str) {
                match self { $( $(#[cfg($cfg)])? BackendConfig::$variant(b) => b.set_instance(instance), )* }
            }

            pub(crate) async fn connect(config: &Config) -> Result<Box<dyn DeliveryClient>> {
                match &config.backend {
                    $( $(#[cfg($cfg)])? BackendConfig::$variant(b) => <$ty as Backend>::connect(&config.with_backend(b.clone())).await, )*
                }
            }

            pub(crate) fn explain(config: &Config) -> Result<Explanation> {
                match &config.backend {
                    $( $(#[cfg($cfg)])? BackendConfig::$variant(b) => <$ty as Backend>::explain(&config.with_backend(b.clone())), )*
                }
            }

            pub(crate) async fn doctor(config: &Config, destinations: &[String]) -> Vec<Finding> {
                match &config.backend {
                    $( $(#[cfg($cfg)])? BackendConfig::$variant(b) => <$ty as Backend>::doctor(&config.with_backend(b.clone()), destinations).await, )*
                }
            }
        }

        impl BackendSection for BackendConfig {
            fn kind(&self) -> &'static str {
                BackendConfig::kind(self)
            }

            fn validate(&self) -> Result<()> {
                match self { $( $(#[cfg($cfg)])? BackendConfig::$variant(b) => b.validate(), )* }
            }

            fn from_url(url: &BackendUrl<'_>) -> Result<Self> {
                $(
                    $(#[cfg($cfg)])?
                    if <$ty as Backend>::SCHEMES.contains(&url.scheme()) {
                        return <$ty as Backend>::parse_url(url).map(BackendConfig::$variant);
                    }
                )*
                Err(Error::config(format!(
                    "unknown backend scheme {:?}: use {}{}",
                    url.scheme(),
                    BackendConfig::compiled()
                        .iter()
                        .flat_map(|b| b.schemes.iter().map(|s| format!("{s}://")))
                        .collect::<Vec<_>>()
                        .join(", "),
                    NOT_COMPILED_HINT,
                )))
            }

            fn prepare(table: &mut toml::Table) -> Result<()> {
                let compiled = BackendConfig::compiled();
                match table.get("kind") {
                    Some(toml::Value::String(k)) if !compiled.iter().any(|b| b.kind == k) => {
                        Err(Error::config(format!(
                            "[backend] kind = {k:?} is not a backend of this build: use {}{}",
                            compiled.iter().map(|b| format!("{:?}", b.kind)).collect::<Vec<_>>().join(", "),
                            NOT_COMPILED_HINT,
                        )))
                    }
                    _ => Ok(()),
                }
            }
        }
    };
}

/// Ends the error for a backend kind or scheme this build does not have.
const NOT_COMPILED_HINT: &str =
    " (kafka, rabbitmq and sqs are cargo features of the courier crate: enable the one you need)";

backends! {
    Memory(courier_memory::MemoryConfig),
    #[cfg(feature = "kafka")]
    Kafka(courier_kafka::KafkaConfig),
    #[cfg(feature = "rabbitmq")]
    Rabbitmq(courier_rabbitmq::RabbitMqConfig),
    #[cfg(feature = "sqs")]
    Sqs(courier_sqs::SqsConfig),
}

impl Default for BackendConfig {
    /// The embedded memory broker.
    fn default() -> Self {
        BackendConfig::Memory(courier_memory::MemoryConfig::default())
    }
}
