//! `courier outbox status` against the real PostgreSQL.

use std::process::Command;

use courier::outbox;
use courier::Message;
use courier_testkit::endpoints::{database_url, unreachable};
use courier_testkit::unique;

fn url_with_schema(schema: &str) -> String {
    let url = database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

#[tokio::test]
async fn status_reports_backlog_and_a_missing_table() {
    let schema = unique("cli").replace('-', "_").to_lowercase();
    let admin = sqlx::PgPool::connect(&database_url())
        .await
        .unwrap_or_else(|e| unreachable("PostgreSQL", &database_url(), e));
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = url_with_schema(&schema);

    // No table yet: a clear error saying how to create it.
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["outbox", "status", "--database-url", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("migrate"), "{err}");

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    outbox::migrate(&pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for i in 0..3 {
        outbox::enqueue(&mut tx, "orders", Message::new(format!("o{i}")))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["outbox", "status", "--json", "--database-url", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backlog"], 3, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert!(v["lag_seconds"].as_f64().unwrap() >= 0.0, "{v}");
    assert_eq!(v["backlog_by_destination"][0][0], "orders", "{v}");
}
