//! librdkafka's MockCluster (3 brokers) for the rest of the test process, shared by every test
//! that needs a second Kafka test bed. The cluster is not `Send`, so a thread of its own owns it
//! and runs commands on it: create topics (the mock has no CreateTopics API), inject request
//! errors, take brokers down and up.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};

/// The mock cluster type owned by the mock thread.
pub type Cluster =
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

type Command = Box<dyn FnOnce(&Cluster) + Send>;

struct Mock {
    bootstrap: String,
    commands: Mutex<Sender<Command>>,
}

static MOCK: OnceLock<Mock> = OnceLock::new();

fn mock() -> &'static Mock {
    MOCK.get_or_init(|| {
        let (boot_tx, boot_rx) = channel();
        let (cmd_tx, cmd_rx) = channel::<Command>();
        std::thread::spawn(move || {
            let cluster = rdkafka::mocking::MockCluster::new(3).expect("librdkafka MockCluster");
            boot_tx
                .send(cluster.bootstrap_servers())
                .expect("send the bootstrap");
            for command in cmd_rx {
                command(&cluster);
            }
        });
        Mock {
            bootstrap: boot_rx.recv().expect("MockCluster bootstrap"),
            commands: Mutex::new(cmd_tx),
        }
    })
}

/// The bootstrap servers of the mock cluster (started on first use).
pub fn bootstrap() -> String {
    mock().bootstrap.clone()
}

/// The bootstrap servers if the mock cluster was started, without starting it.
pub fn bootstrap_if_started() -> Option<String> {
    MOCK.get().map(|m| m.bootstrap.clone())
}

/// Run `f` on the mock cluster (in its owning thread) and return its result.
pub fn run(f: impl FnOnce(&Cluster) -> Result<(), String> + Send + 'static) -> Result<(), String> {
    let (tx, rx) = channel();
    let command: Command = Box::new(move |c| {
        let _ = tx.send(f(c));
    });
    mock()
        .commands
        .lock()
        .map_err(|e| e.to_string())?
        .send(command)
        .map_err(|e| e.to_string())?;
    rx.recv().map_err(|e| e.to_string())?
}

/// Create `topic` with 3 partitions on the mock cluster.
pub fn create_topic(topic: &str) -> Result<(), String> {
    let topic = topic.to_owned();
    run(move |c| c.create_topic(&topic, 3, 1).map_err(|e| e.to_string()))
}
