//! The chaos matrix: every guarantee on every landed backend under each fault, checked by
//! `courier verify`'s experiment runner (delivery ledger: lost and duplicate effects). Sized so
//! the test command stays well under an hour; `courier verify --full` runs 10,000 per cell.
//!
//! Also proves the checker can fail: deliberately wrong setups must be reported as violations.

use std::time::Duration;

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
    }
}

async fn cell(url: &str, guarantee: Guarantee, faults: &str) -> verify::Report {
    let config = Config::from_url(url).unwrap().with_guarantee(guarantee);
    let report = verify::run(&config, &plan(faults, None)).await.unwrap();
    println!("{url} {guarantee} [{faults}]\n{report}");
    report
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
