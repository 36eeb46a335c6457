//! The chaos matrix: every guarantee on every landed backend under each fault, checked by
//! `courier verify`'s experiment runner (delivery ledger: lost and duplicate effects). Sized so
//! the test command stays well under an hour; `courier verify --full` runs 10,000 per cell.
//!
//! Also proves the checker can fail: deliberately wrong setups must be reported as violations.

use std::time::Duration;

use courier::config::{
    BackendConfig, IdempotencyConfig, KafkaConfig, Secret, SecretUrl, SqsConfig,
};
use courier::{Config, Guarantee};
use courier_cli::verify::{self, Faults, Plan, Sabotage};

const MESSAGES: usize = 1_000;

fn plan(faults: &str, sabotage: Option<Sabotage>) -> Plan {
    Plan {
        messages: MESSAGES,
        consumers: 3,
        faults: faults.parse::<Faults>().unwrap(),
        sabotage,
        timeout: Duration::from_secs(120),
        progress: false,
        destination: None,
        // Consumers are child processes, crashed with SIGKILL (the memory backend's stay in
        // this process: the broker lives here).
        workers: verify::Workers::Processes(courier_exe()),
        keep: false,
    }
}

/// The `courier` binary beside this test's (cargo builds it for courier-cli's tests in the same
/// `cargo test --workspace`).
fn courier_exe() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let courier = dir.join(format!("courier{}", std::env::consts::EXE_SUFFIX));
    assert!(
        courier.exists(),
        "{} is missing: build it with `cargo build -p courier-cli` (`cargo test --workspace` does)",
        courier.display()
    );
    courier
}

/// `verify::run`, failing the test with the reason when the experiment cannot run (`what` names
/// it) — a broker that is down fails, never skips.
async fn must_run(what: &str, config: &Config, plan: &Plan) -> verify::Report {
    match verify::run(config, plan).await {
        Ok(r) => r,
        Err(e) => panic!("{what}: the experiment could not run ({e:#}); are the broker and PostgreSQL up? `scripts/services up`"),
    }
}

async fn cell(url: &str, guarantee: Guarantee, faults: &str) -> verify::Report {
    let config = Config::from_url(url).unwrap().with_guarantee(guarantee);
    let report = must_run(url, &config, &plan(faults, None)).await;
    println!("{url} {guarantee} [{faults}]\n{report}");
    report
}

/// One backend's cells: every guarantee under each fault, with `messages` per cell. Exactly-once
/// runs through the idempotent layer in its PostgreSQL transactional mode: each effect is a row
/// inserted in the transaction that records the message's key, and the store outage terminates
/// the run's database connections (commits included). With a store outside the effect's
/// transaction (Redis, in-process), a crash between the effect and the completed key repeats the
/// effect — see docs/proving.md.
async fn backend_matrix(name: &str, base: Config, messages: usize, faults: &[&str]) {
    let mut failures = Vec::new();
    for g in Guarantee::ALL {
        for f in faults {
            let mut config = base.clone().with_guarantee(g);
            // At-most-once gets the store too: its consumers are processes, and an id the
            // producer published twice may reach two of them; the consumer's in-memory window
            // skips it within one process only, the store across them (`verify_finds_at_most_once_duplicates_across_processes_without_a_store`).
            if g != Guarantee::AtLeastOnce {
                config.idempotency = Some(IdempotencyConfig {
                    store: SecretUrl::new(courier_testkit::endpoints::database_url()),
                    ..IdempotencyConfig::default()
                });
            }
            let plan = Plan {
                messages,
                ..plan(f, None)
            };
            let r = must_run(name, &config, &plan).await;
            println!("{name} {g} [{f}]\n{r}");
            assert!(
                r.consumer_processes && r.producer_process,
                "{name}: the producer or the consumers ran in the test process, not as processes"
            );
            if !r.holds {
                failures.push(format!("{g} [{f}]: {}", r.violations.join("; ")));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "guarantee violated on {name}:\n{}",
        failures.join("\n")
    );
}

/// Faults every broker backend is checked under (the broker restart is the RabbitMQ fault
/// test's; restarting a shared local broker mid-suite would fail unrelated tests).
const BACKEND_FAULTS: &[&str] = &[
    "none",
    "kill=2",
    "errors=0.05",
    "duplicates=0.1",
    "kill=2,errors=0.05,duplicates=0.1,store-outage=1s",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_matrix_holds() {
    let config = Config::from_url(&courier_testkit::endpoints::rabbitmq_url()).unwrap();
    backend_matrix("rabbitmq", config, 500, BACKEND_FAULTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_matrix_holds() {
    backend_matrix("sqs", sqs_config(), 300, BACKEND_FAULTS).await;
}

fn sqs_config() -> Config {
    Config {
        guarantee: Guarantee::AtLeastOnce,
        backend: BackendConfig::Sqs(SqsConfig {
            region: Some(courier_testkit::endpoints::aws_region()),
            endpoint: Some(courier_testkit::endpoints::sqs_endpoint()),
            access_key_id: Some("test".into()),
            secret_access_key: Some(Secret::new("test")),
            // A crashed consumer's messages come back after 3 s, not the default 30 s.
            visibility_timeout: Duration::from_secs(3),
            wait_time: Duration::from_secs(1),
            ..SqsConfig::default()
        }),
        consumer: Default::default(),
        idempotency: None,
    }
}

/// Connection cuts through `verify`'s TCP fault proxy: three times in a run every connection —
/// publisher and consumers — is dropped at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_cuts_hold_on_sqs() {
    backend_matrix("sqs", sqs_config(), 300, &["cut=3"]).await;
}

/// The same on RabbitMQ, where publisher and consumers share one AMQP connection, and the cuts
/// together with a consumer crash and handler errors (a cell of the matrix in docs/proving.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_cuts_hold_on_rabbitmq() {
    let config = Config::from_url(&courier_testkit::endpoints::rabbitmq_url()).unwrap();
    backend_matrix(
        "rabbitmq",
        config,
        500,
        &["cut=3", "cut=2,kill=1,errors=0.05"],
    )
    .await;
}

/// Every fault of the broker cells at once.
const ALL_FAULTS: &str = "kill=2,errors=0.05,duplicates=0.1,store-outage=1s";

/// A Kafka configuration for the cells: a crashed consumer's partitions move after 6 s, not the
/// default 45 s.
fn kafka_config(bootstrap: String) -> Config {
    Config {
        guarantee: Guarantee::AtLeastOnce,
        backend: BackendConfig::Kafka(KafkaConfig {
            bootstrap,
            session_timeout: Duration::from_secs(6),
            max_poll_interval: Duration::from_secs(10),
            // Also the transaction timeout. A SIGKILLed worker's replacement takes its slot's
            // transactional id and aborts its open transaction when it starts; until then that
            // transaction holds read_committed readers of its partitions back. The broker's own
            // abort (at this timeout) bounds the wait if a replacement is slow to start.
            delivery_timeout: Duration::from_secs(20),
            ..KafkaConfig::default()
        }),
        consumer: Default::default(),
        idempotency: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_matrix_holds() {
    let config = kafka_config(courier_testkit::endpoints::kafka_bootstrap());
    // Fewer cells than the other brokers: every Kafka cell pays a consumer-group join and its
    // crashes a rebalance; the combined cell still covers each fault.
    backend_matrix("kafka", config, 200, &["none", "kill=2", ALL_FAULTS]).await;
}

const FAULTS: &[&str] = &[
    "none",
    "kill=3",
    "errors=0.05",
    "duplicates=0.1",
    "store-outage=1s",
    "kill=3,errors=0.05,duplicates=0.1,store-outage=1s",
];

async fn matrix(url: &str) {
    let mut failures = Vec::new();
    for g in Guarantee::ALL {
        for f in FAULTS {
            let r = cell(url, g, f).await;
            if !r.holds {
                failures.push(format!("{g} [{f}]: {}", r.violations.join("; ")));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "guarantee violated on {url}:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_matrix_holds() {
    matrix("memory://chaos?auto_create=true").await;
}

#[tokio::test]
async fn connection_cuts_are_refused_where_the_proxy_cannot_stand_in() {
    let config = Config::from_url("memory://cut-refused").unwrap();
    let e = verify::run(&config, &plan("cut=1", None))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("not available for the memory backend"),
        "{e:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_catches_ack_before_handler() {
    let config = Config::from_url("memory://sabotage-ack?guarantee=at-least-once").unwrap();
    let r = verify::run(&config, &plan("kill=3", Some(Sabotage::AckFirst)))
        .await
        .unwrap();
    assert!(
        !r.holds && r.lost > 0,
        "ack-before-handler with crashes must lose messages and be reported: {r}"
    );
}

/// A 500-message run on RabbitMQ (consumer processes, no idempotency store), its report printed.
async fn rabbitmq_run(g: Guarantee, faults: &str, sabotage: Option<Sabotage>) -> verify::Report {
    let url = courier_testkit::endpoints::rabbitmq_url();
    let config = Config::from_url(&url).unwrap().with_guarantee(g);
    let plan = Plan {
        messages: 500,
        ..plan(faults, sabotage)
    };
    let r = must_run("rabbitmq", &config, &plan).await;
    println!("{r}");
    r
}

/// The same mistake with consumer processes on a real broker: each crash is a SIGKILL, and the
/// messages the killed process had acked but not handled are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_catches_ack_before_handler_with_consumer_processes() {
    let r = rabbitmq_run(Guarantee::AtLeastOnce, "kill=2", Some(Sabotage::AckFirst)).await;
    assert!(
        r.consumer_processes && r.crashes == 2 && !r.holds && r.lost > 0,
        "ack-before-handler with SIGKILLed consumer processes must lose messages and be reported: {r}"
    );
}

/// Finding 7: at-most-once consumers in several processes, without an `[idempotency]` store,
/// handle an id the producer published twice once in each process that got a copy — the
/// consumer's duplicate window is per process. verify must report it (the cells of the matrix
/// run at-most-once with the store, which skips the second copy in any process).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_finds_at_most_once_duplicates_across_processes_without_a_store() {
    let r = rabbitmq_run(Guarantee::AtMostOnce, "duplicates=0.2", None).await;
    assert!(
        r.consumer_processes && !r.holds && r.duplicate_effects > 0,
        "at-most-once duplicates across consumer processes without a store must be reported: {r}"
    );
}

/// A run removes what it created: its destination, dead-letter destination and consumer group
/// (RabbitMQ: exchanges and the group's work, delay and dead-letter queues; SQS: both queues;
/// Kafka: both topics and the group), checked with each broker's own client. Runs with `keep`
/// first show the objects are there under the names checked, so "gone" cannot pass vacuously.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_removes_what_it_created() {
    let small = |keep: bool| Plan {
        messages: 50,
        keep,
        ..plan("none", None)
    };

    // RabbitMQ: kept, there; removed with `remove_run`, gone; a plain run removes its own. The
    // kept run's handler errors send retries through delay queues, which go too.
    let rabbit = Config::from_url(&courier_testkit::endpoints::rabbitmq_url()).unwrap();
    let conn = lapin::Connection::connect(
        &courier_testkit::endpoints::rabbitmq_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    // Which of the run's queues exist: the work queue, the dead-letter queue, then any delay queue.
    let queues_there = |dest: String| {
        let conn = &conn;
        async move {
            let work = format!("{dest}.{dest}");
            let delays = courier::rabbitmq::DELAY_STEPS_MS
                .iter()
                .map(|&ms| courier::rabbitmq::delay_queue(&work, ms));
            let mut there = Vec::new();
            for queue in [work.clone(), format!("{dest}-dlq")]
                .into_iter()
                .chain(delays)
            {
                let ch = conn.create_channel().await.unwrap();
                let passive = lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                let declared = ch
                    .queue_declare(queue.as_str().into(), passive, Default::default())
                    .await;
                there.push(declared.is_ok());
            }
            let any_delay = there[2..].iter().any(|&t| t);
            [there[0], there[1], any_delay]
        }
    };
    let kept_plan = Plan {
        faults: "errors=0.2".parse().unwrap(),
        ..small(true)
    };
    let kept = must_run("rabbitmq", &rabbit, &kept_plan).await;
    assert!(kept.holds && kept.removed.is_empty(), "{kept}");
    assert_eq!(queues_there(kept.destination.clone()).await, [true; 3]);
    let removed = verify::remove_run(&rabbit, &kept.destination)
        .await
        .unwrap();
    assert!(
        removed.len() > 4 && removed.iter().any(|r| r.contains(".delay.")),
        "{removed:?}"
    );
    assert_eq!(queues_there(kept.destination.clone()).await, [false; 3]);
    let r = must_run("rabbitmq", &rabbit, &small(false)).await;
    assert!(
        r.holds && r.cleanup_error.is_none() && r.removed.len() == 4,
        "{r}"
    );
    assert_eq!(queues_there(r.destination.clone()).await, [false; 3]);

    // SQS: kept, there; removed, gone.
    let sdk = aws_sdk_sqs::Client::new(
        &aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(
                courier_testkit::endpoints::aws_region(),
            ))
            .endpoint_url(courier_testkit::endpoints::sqs_endpoint())
            .credentials_provider(aws_credential_types::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .load()
            .await,
    );
    let queues_there = |dest: String| {
        let sdk = &sdk;
        async move {
            let mut there = Vec::new();
            for queue in [dest.clone(), format!("{dest}-dlq")] {
                there.push(sdk.get_queue_url().queue_name(&queue).send().await.is_ok());
            }
            there
        }
    };
    let kept = must_run("sqs", &sqs_config(), &small(true)).await;
    assert!(kept.holds && kept.removed.is_empty(), "{kept}");
    assert_eq!(queues_there(kept.destination.clone()).await, [true; 2]);
    let r = must_run("sqs", &sqs_config(), &small(false)).await;
    assert!(r.holds && r.cleanup_error.is_none(), "{r}");
    assert_eq!(queues_there(r.destination.clone()).await, [false; 2]);
    verify::remove_run(&sqs_config(), &kept.destination)
        .await
        .unwrap();
    assert_eq!(queues_there(kept.destination.clone()).await, [false; 2]);

    // Kafka: deleting a topic or group that does not exist is reported as such, so the names
    // in `removed` are objects that were there.
    let kafka = kafka_config(courier_testkit::endpoints::kafka_bootstrap());
    let r = must_run("kafka", &kafka, &small(false)).await;
    assert!(r.holds && r.cleanup_error.is_none(), "{r}");
    for object in [
        format!("topic {}", r.destination),
        format!("topic {}-dlq", r.destination),
        format!("group {}", r.destination),
    ] {
        assert!(
            r.removed.contains(&object),
            "{object} not removed: {:?}",
            r.removed
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_catches_exactly_once_without_dedup() {
    let config = Config::from_url("memory://sabotage-dedup?guarantee=exactly-once").unwrap();
    let r = verify::run(&config, &plan("duplicates=0.2", Some(Sabotage::NoDedup)))
        .await
        .unwrap();
    assert!(
        !r.holds && r.duplicate_effects > 0,
        "exactly-once without dedup must show duplicate effects: {r}"
    );
}

/// The transactional mode (a postgres:// store) cannot process without its database: fail-open
/// is refused before anything runs rather than silently ignored.
#[tokio::test]
async fn fail_open_with_the_transactional_mode_is_refused() {
    let mut config = Config::from_url(&format!(
        "memory://?guarantee=exactly-once&idempotency={}",
        courier_testkit::endpoints::database_url()
    ))
    .unwrap();
    config.idempotency.as_mut().unwrap().on_store_error =
        courier_core::config::StoreFailurePolicy::FailOpen;
    let e = verify::run(&config, &plan("", None)).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("fail-open") && text.contains("transactional"),
        "{text}"
    );
}

/// Exactly-once through the Redis store (the lease layer): the store outage holds (deferred,
/// nothing lost or repeated); SIGKILLed consumers lose nothing, and an effect repeats only when a
/// consumer died between its effect and the completed key — at most one per crash and handler
/// slot. The numbers are printed and recorded in docs/proving.md; the contract table says which
/// store gives exactly-once effects under crashes (the PostgreSQL transactional mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_layer_cells_on_rabbitmq() {
    let mut config = Config::from_url(&courier_testkit::endpoints::rabbitmq_url())
        .unwrap()
        .with_guarantee(Guarantee::ExactlyOnce);
    config.idempotency = Some(IdempotencyConfig {
        store: SecretUrl::new(courier_testkit::endpoints::redis_url()),
        ..IdempotencyConfig::default()
    });
    let outage = Plan {
        messages: 500,
        ..plan("store-outage=1s", None)
    };
    let r = must_run("rabbitmq + redis", &config, &outage).await;
    println!("rabbitmq exactly-once + redis [store-outage=1s]\n{r}");
    assert!(r.consumer_processes, "consumers must be processes");
    assert!(r.holds, "store outage: {}", r.violations.join("; "));

    let kills = Plan {
        messages: 500,
        ..plan("kill=2", None)
    };
    let r = must_run("rabbitmq + redis", &config, &kills).await;
    println!(
        "rabbitmq exactly-once + redis [kill=2]: {} crashes, {} lost, {} duplicate effects\n{r}",
        r.crashes, r.lost, r.duplicate_effects
    );
    assert!(r.crashes >= 1, "no consumer was killed");
    assert_eq!(r.lost, 0, "{r}");
    let slots = u64::from(r.crashes) * config.consumer.concurrency as u64;
    assert!(
        r.duplicate_effects <= slots,
        "{} duplicate effects after {} crashes: more than one per crash and handler slot",
        r.duplicate_effects,
        r.crashes
    );
}
