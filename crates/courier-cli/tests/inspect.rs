//! `courier inspect`, `courier top` and `courier delete` against the local Kafka broker: the
//! counts a user reads, the confirmation `delete` asks for, and the typed error for a
//! destination that is not there.

use std::process::{Command, Output};

use courier_testkit::{endpoints, unique};

fn courier(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(args)
        .env_remove("COURIER_CONFIG")
        .env_remove("COURIER_URL")
        .output()
        .expect("run courier")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn inspect_top_and_delete_a_kafka_topic() {
    let url = format!(
        "kafka://{}?guarantee=at-least-once",
        endpoints::kafka_bootstrap()
    );
    let topic = unique("cli-inspect");
    let sent = courier(&[
        "send", "--url", &url, "--to", &topic, "--create", "--count", "3", "hello",
    ]);
    if !sent.status.success() {
        endpoints::unreachable("Kafka", &url, text(&sent.stderr));
    }

    let out = courier(&[
        "inspect", "--url", &url, &topic, "--group", "billing", "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["destination"], topic.as_str());
    assert_eq!(v[0]["stored"], 3, "{v}");
    let g = &v[0]["groups"][0];
    assert_eq!(g["group"], "billing");
    assert_eq!(
        g["exists"], false,
        "no consumer of billing has committed: {v}"
    );
    assert_eq!(g["backlog"], 3, "a new group reads all three: {v}");
    let age = g["oldest_age_seconds"].as_f64().expect("oldest age");
    assert!((0.0..120.0).contains(&age), "oldest age {age}");

    let out = courier(&[
        "top",
        "--url",
        &url,
        &topic,
        "--group",
        "billing",
        "--interval",
        "100ms",
        "--refreshes",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert_eq!(table.matches("courier top").count(), 2, "{table}");
    assert!(
        table.contains("billing") && table.contains("backlog change +0.0/s"),
        "{table}"
    );

    let out = courier(&["delete", "--url", &url, &topic, "--group", "billing"]);
    assert!(!out.status.success(), "delete without --yes must refuse");
    assert!(text(&out.stderr).contains("--yes"), "{}", text(&out.stderr));

    let out = courier(&[
        "delete", "--url", &url, &topic, "--group", "billing", "--yes",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("removed topic {topic}")),
        "{}",
        text(&out.stdout)
    );

    let missing = unique("cli-never-created");
    let out = courier(&["inspect", "--url", &url, &missing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("does not exist"),
        "{}",
        text(&out.stderr)
    );
}
