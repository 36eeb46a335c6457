//! Test beds: the Kafka-protocol broker of the stack (`KAFKA_BOOTSTRAP`) and librdkafka's
//! MockCluster.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use courier_core::config::IdempotencyConfig;
use courier_core::{DeliveryClient, Guarantee, Result};
use courier_kafka::Config;
use courier_kafka::KafkaConfig;
use courier_testkit::{endpoints, TestBackend};

/// Test helper: config.
pub fn config(bootstrap: &str, guarantee: Guarantee) -> Config {
    Config {
        guarantee,
        backend: KafkaConfig {
            bootstrap: bootstrap.to_owned(),
            session_timeout: Duration::from_secs(6),
            max_poll_interval: Duration::from_secs(10),
            delivery_timeout: Duration::from_secs(30),
            partitions: 3,
            ..KafkaConfig::default()
        },
        consumer: Default::default(),
        idempotency: (guarantee == Guarantee::ExactlyOnce).then(IdempotencyConfig::default),
    }
}

/// The mock cluster type (see [`courier_testkit::kafka_mock`]).
pub type Cluster = courier_testkit::kafka_mock::Cluster;

/// Run `f` on the mock cluster (in its owning thread) and return its result.
pub fn mock_do(
    f: impl FnOnce(&Cluster) -> std::result::Result<(), String> + Send + 'static,
) -> std::result::Result<(), String> {
    courier_testkit::kafka_mock::run(f)
}

/// Test helper: the MockCluster's bootstrap servers (started on first use).
pub fn mock_bootstrap() -> String {
    courier_testkit::kafka_mock::bootstrap()
}

/// Create a topic (3 partitions) on the mock cluster.
pub fn mock_create_topic(topic: &str) -> std::result::Result<(), String> {
    courier_testkit::kafka_mock::create_topic(topic)
}

/// Test helper: Kafka.
pub struct Kafka {
    /// Bootstrap servers.
    pub bootstrap: String,
    /// Name in reports.
    pub name: &'static str,
}

#[async_trait::async_trait]
impl TestBackend for Kafka {
    fn name(&self) -> String {
        self.name.into()
    }

    fn deletes_destinations(&self) -> bool {
        !self.name.contains("MockCluster")
    }

    async fn client(&self, guarantee: Guarantee) -> Result<Arc<dyn DeliveryClient>> {
        Ok(Arc::new(
            courier_kafka::connect(&config(&self.bootstrap, guarantee)).await?,
        ))
    }

    async fn fresh_destination(&self, client: &dyn DeliveryClient, prefix: &str) -> Result<String> {
        let name = courier_testkit::unique(prefix);
        if Some(&self.bootstrap) == courier_testkit::kafka_mock::bootstrap_if_started().as_ref() {
            mock_create_topic(&name).map_err(courier_core::Error::config)?;
            return Ok(name);
        }
        match client.create_destination(&name).await {
            Ok(()) => Ok(name),
            Err(e @ (courier_core::Error::Broker { .. } | courier_core::Error::Timeout { .. })) => {
                endpoints::unreachable("Kafka", &self.bootstrap, e)
            }
            Err(e) => Err(e),
        }
    }
}
