//! Test beds: the Kafka-protocol broker of the stack (`KAFKA_BOOTSTRAP`) and librdkafka's
//! MockCluster.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use courier_core::config::{IdempotencyConfig, KafkaConfig};
use courier_core::{BackendConfig, Config, DeliveryClient, Guarantee, Result};
use courier_testkit::{endpoints, TestBackend};

/// Test helper: config.
pub fn config(bootstrap: &str, guarantee: Guarantee) -> Config {
    Config {
        guarantee,
        backend: BackendConfig::Kafka(KafkaConfig {
            bootstrap: bootstrap.to_owned(),
            session_timeout: Duration::from_secs(6),
            max_poll_interval: Duration::from_secs(10),
            delivery_timeout: Duration::from_secs(30),
            partitions: 3,
            ..KafkaConfig::default()
        }),
        consumer: Default::default(),
        idempotency: (guarantee == Guarantee::ExactlyOnce).then(IdempotencyConfig::default),
    }
}

/// The mock cluster type owned by the mock thread.
pub type Cluster =
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

type MockCommand = Box<dyn FnOnce(&Cluster) + Send>;

struct Mock {
    bootstrap: String,
    commands: std::sync::Mutex<std::sync::mpsc::Sender<MockCommand>>,
}

/// A MockCluster with 3 brokers living for the rest of the test process. It is not `Send`, so a
/// dedicated thread owns it and runs commands on it (create topics — the mock has no
/// CreateTopics API —, inject request errors, take brokers down and up).
fn mock() -> &'static Mock {
    static MOCK: OnceLock<Mock> = OnceLock::new();
    MOCK.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<MockCommand>();
        std::thread::spawn(move || {
            let cluster = rdkafka::mocking::MockCluster::new(3).expect("mock cluster");
            tx.send(cluster.bootstrap_servers())
                .expect("send bootstrap");
            for command in cmd_rx {
                command(&cluster);
            }
        });
        Mock {
            bootstrap: rx.recv().expect("mock cluster bootstrap"),
            commands: std::sync::Mutex::new(cmd_tx),
        }
    })
}

/// Run `f` on the mock cluster (in its owning thread) and return its result.
pub fn mock_do(
    f: impl FnOnce(&Cluster) -> std::result::Result<(), String> + Send + 'static,
) -> std::result::Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let command: MockCommand = Box::new(move |c| {
        let _ = tx.send(f(c));
    });
    mock()
        .commands
        .lock()
        .unwrap()
        .send(command)
        .map_err(|e| e.to_string())?;
    rx.recv().map_err(|e| e.to_string())?
}

fn mock_bootstrap_if_started() -> String {
    static_mock()
        .map(|m| m.bootstrap.clone())
        .unwrap_or_default()
}

fn static_mock() -> Option<&'static Mock> {
    MOCK_STARTED.get().map(|_| mock())
}

static MOCK_STARTED: OnceLock<()> = OnceLock::new();

/// Test helper: mock_bootstrap.
pub fn mock_bootstrap() -> String {
    let _ = MOCK_STARTED.set(());
    mock().bootstrap.clone()
}

/// Create a topic (3 partitions) on the mock cluster.
pub fn mock_create_topic(topic: &str) -> std::result::Result<(), String> {
    let topic = topic.to_owned();
    mock_do(move |c| c.create_topic(&topic, 3, 1).map_err(|e| e.to_string()))
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

    async fn client(&self, guarantee: Guarantee) -> Result<Arc<dyn DeliveryClient>> {
        Ok(Arc::new(
            courier_kafka::connect(&config(&self.bootstrap, guarantee)).await?,
        ))
    }

    async fn fresh_destination(&self, client: &dyn DeliveryClient, prefix: &str) -> Result<String> {
        let name = courier_testkit::unique(prefix);
        if self.bootstrap == mock_bootstrap_if_started() {
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
