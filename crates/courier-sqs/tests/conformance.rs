//! The shared conformance suite against LocalStack SQS (`SQS_ENDPOINT`), on standard queues and
//! on FIFO queues (whose capabilities add per-key order and dedup by id).

use std::sync::Arc;
use std::time::Duration;

use courier_core::config::IdempotencyConfig;
use courier_core::{DeliveryClient, Guarantee, Result};
use courier_sqs::Config;
use courier_sqs::SqsConfig;
use courier_testkit::{endpoints, TestBackend};

/// Test helper: Sqs.
pub struct Sqs {
    fifo: bool,
}

/// Test helper: config.
pub fn config(guarantee: Guarantee, fifo: bool) -> Config {
    Config {
        guarantee,
        backend: SqsConfig {
            region: Some(endpoints::aws_region()),
            endpoint: Some(endpoints::sqs_endpoint()),
            access_key_id: Some(
                std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "test".into()),
            ),
            secret_access_key: Some(courier_core::config::Secret::new(
                std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "test".into()),
            )),
            visibility_timeout: Duration::from_secs(3),
            wait_time: Duration::from_secs(1),
            fifo,
            ..SqsConfig::default()
        },
        consumer: Default::default(),
        idempotency: (guarantee == Guarantee::ExactlyOnce).then(IdempotencyConfig::default),
    }
}

#[async_trait::async_trait]
impl TestBackend for Sqs {
    fn name(&self) -> String {
        if self.fifo {
            "sqs (fifo)".into()
        } else {
            "sqs (standard)".into()
        }
    }

    async fn client(&self, guarantee: Guarantee) -> Result<Arc<dyn DeliveryClient>> {
        Ok(Arc::new(
            courier_sqs::connect(&config(guarantee, self.fifo)).await?,
        ))
    }

    async fn fresh_destination(&self, client: &dyn DeliveryClient, prefix: &str) -> Result<String> {
        let name = courier_testkit::unique(prefix);
        match client.create_destination(&name).await {
            Ok(()) => Ok(name),
            Err(e @ courier_core::Error::Broker { .. }) => {
                endpoints::unreachable("LocalStack SQS", &endpoints::sqs_endpoint(), e)
            }
            Err(e) => Err(e),
        }
    }
}

mod standard {
    use super::*;
    async fn backend() -> Sqs {
        Sqs { fifo: false }
    }
    courier_testkit::conformance_suite!(backend);
}

/// Consumer processes SIGKILLed mid-handler, over and over (standard queue).
mod crash {
    async fn backend() -> super::Sqs {
        super::Sqs { fifo: false }
    }
    courier_testkit::crash_suite!(backend);
}

mod fifo {
    use super::*;
    async fn backend() -> Sqs {
        Sqs { fifo: true }
    }
    courier_testkit::conformance_suite!(backend);
}

/// The standard-queue suite with every handler behind the idempotent layer (PostgreSQL store).
mod standard_through_the_layer {
    async fn backend() -> courier_testkit::Layered<super::Sqs> {
        courier_testkit::Layered {
            inner: super::Sqs { fifo: false },
            store: courier_testkit::stores::postgres().await,
        }
    }
    courier_testkit::conformance_suite!(backend);
}
