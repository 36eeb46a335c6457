//! The shared conformance suite against the real RabbitMQ (`RABBITMQ_URL`).

use std::sync::Arc;

use courier_core::config::{IdempotencyConfig, SecretUrl};
use courier_core::{DeliveryClient, Guarantee, Result};
use courier_rabbitmq::Config;
use courier_rabbitmq::RabbitMqConfig;
use courier_testkit::{endpoints, TestBackend};

/// Test helper: Rabbit;.
pub struct Rabbit;

/// Test helper: config.
pub fn config(guarantee: Guarantee) -> Config {
    Config {
        guarantee,
        backend: RabbitMqConfig {
            url: SecretUrl::new(endpoints::rabbitmq_url()),
            ..RabbitMqConfig::default()
        },
        consumer: Default::default(),
        idempotency: (guarantee == Guarantee::ExactlyOnce).then(IdempotencyConfig::default),
    }
}

#[async_trait::async_trait]
impl TestBackend for Rabbit {
    fn name(&self) -> String {
        "rabbitmq".into()
    }

    async fn client(&self, guarantee: Guarantee) -> Result<Arc<dyn DeliveryClient>> {
        match courier_rabbitmq::connect(&config(guarantee)).await {
            Ok(c) => Ok(Arc::new(c)),
            Err(e) if e.kind() == "broker" || e.kind() == "timeout" => {
                endpoints::unreachable("RabbitMQ", &endpoints::rabbitmq_url(), e)
            }
            Err(e) => Err(e),
        }
    }
}

async fn backend() -> Rabbit {
    Rabbit
}

courier_testkit::conformance_suite!(backend);

/// Consumer processes SIGKILLed mid-handler, over and over.
mod crash {
    async fn backend() -> super::Rabbit {
        super::Rabbit
    }
    courier_testkit::crash_suite!(backend);
}

/// The same suite with every handler behind the idempotent layer (Redis store).
mod through_the_layer {
    async fn backend() -> courier_testkit::Layered<super::Rabbit> {
        courier_testkit::Layered {
            inner: super::Rabbit,
            store: courier_testkit::stores::redis().await,
        }
    }
    courier_testkit::conformance_suite!(backend);
}
