//! The store contract, run against every store: memory, Redis (127.0.0.1:6379) and
//! PostgreSQL (DATABASE_URL). A store that cannot be reached fails the test.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier_core::Error;
use courier_idempotency::{
    Begin, IdempotencyStore, LeaseToken, MemoryStore, PostgresStore, RedisStore,
};
use courier_testkit::endpoints::{database_url, redis_url, unreachable};
use courier_testkit::unique;

async fn memory() -> Arc<dyn IdempotencyStore> {
    Arc::new(MemoryStore::default())
}

async fn redis() -> Arc<dyn IdempotencyStore> {
    let url = redis_url();
    match RedisStore::connect(&url).await {
        Ok(s) => Arc::new(s.with_prefix(unique("test:"))),
        Err(e) => unreachable("Redis", &url, e),
    }
}

async fn postgres() -> Arc<dyn IdempotencyStore> {
    let url = database_url();
    match PostgresStore::connect(&url).await {
        Ok(s) => Arc::new(s),
        Err(e) => unreachable("PostgreSQL", &url, e),
    }
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn begun(b: Begin) -> LeaseToken {
    match b {
        Begin::Begun(t) => t,
        other => panic!("expected Begun, got {other:?}"),
    }
}

async fn claim_complete_and_absorb(s: Arc<dyn IdempotencyStore>) {
    let key = unique("k");
    let t = begun(s.begin(&key, "fp1", LEASE).await.unwrap());
    // A second worker sees it in progress, with about the lease left.
    match s.begin(&key, "fp1", LEASE).await.unwrap() {
        Begin::InProgress { retry_after } => assert!(retry_after <= LEASE, "{retry_after:?}"),
        other => panic!("expected InProgress, got {other:?}"),
    }
    assert!(s
        .complete(&key, &t, "fp1", Some(Bytes::from_static(b"receipt-7")), TTL)
        .await
        .unwrap());
    match s.begin(&key, "fp1", LEASE).await.unwrap() {
        Begin::Completed { result } => assert_eq!(result.as_deref(), Some(&b"receipt-7"[..])),
        other => panic!("expected Completed, got {other:?}"),
    }
    // Completing again (a stale worker) does not overwrite the completion.
    assert!(!s.complete(&key, &t, "fp1", None, TTL).await.unwrap());
    match s.begin(&key, "fp1", LEASE).await.unwrap() {
        Begin::Completed { result } => assert_eq!(result.as_deref(), Some(&b"receipt-7"[..])),
        other => panic!("expected Completed, got {other:?}"),
    }
}

async fn completed_without_result(s: Arc<dyn IdempotencyStore>) {
    let key = unique("k");
    let t = begun(s.begin(&key, "fp", LEASE).await.unwrap());
    assert!(s.complete(&key, &t, "fp", None, TTL).await.unwrap());
    assert_eq!(
        s.begin(&key, "fp", LEASE).await.unwrap(),
        Begin::Completed { result: None }
    );
}

async fn different_payload_is_a_conflict(s: Arc<dyn IdempotencyStore>) {
    let key = unique("k");
    let t = begun(s.begin(&key, "fp-a", LEASE).await.unwrap());
    let e = s.begin(&key, "fp-b", LEASE).await.unwrap_err();
    assert!(matches!(e, Error::IdempotencyConflict { .. }), "{e}");
    assert_eq!(e.kind(), "idempotency_conflict");
    s.complete(&key, &t, "fp-a", None, TTL).await.unwrap();
    let e = s.begin(&key, "fp-b", LEASE).await.unwrap_err();
    assert!(matches!(e, Error::IdempotencyConflict { .. }), "{e}");
}

async fn release_lets_a_retry_begin(s: Arc<dyn IdempotencyStore>) {
    let key = unique("k");
    let t = begun(s.begin(&key, "fp", LEASE).await.unwrap());
    // Releasing with someone else's token changes nothing.
    s.release(&key, &LeaseToken::new()).await.unwrap();
    assert!(matches!(
        s.begin(&key, "fp", LEASE).await.unwrap(),
        Begin::InProgress { .. }
    ));
    s.release(&key, &t).await.unwrap();
    begun(s.begin(&key, "fp", LEASE).await.unwrap());
}

async fn expired_lease_is_taken_over(s: Arc<dyn IdempotencyStore>) {
    let key = unique("k");
    let short = Duration::from_millis(300);
    let dead = begun(s.begin(&key, "fp", short).await.unwrap());
    // Poll until the lease has expired (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let alive = loop {
        match s.begin(&key, "fp", LEASE).await.unwrap() {
            Begin::Begun(t) => break t,
            Begin::InProgress { retry_after } => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "lease never expired"
                );
                tokio::time::sleep(retry_after.min(Duration::from_millis(100))).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    // The dead worker's token no longer extends or completes as the holder.
    assert!(!s.extend(&key, &dead, LEASE).await.unwrap());
    assert!(s.extend(&key, &alive, LEASE).await.unwrap());
    assert!(s.complete(&key, &alive, "fp", None, TTL).await.unwrap());
    assert!(matches!(
        s.begin(&key, "fp", LEASE).await.unwrap(),
        Begin::Completed { .. }
    ));
}

async fn extend_keeps_the_lease(s: Arc<dyn IdempotencyStore>) {
    let key = unique("k");
    let lease = Duration::from_millis(600);
    let t = begun(s.begin(&key, "fp", lease).await.unwrap());
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            s.extend(&key, &t, lease).await.unwrap(),
            "lease lost while extended"
        );
    }
    assert!(matches!(
        s.begin(&key, "fp", lease).await.unwrap(),
        Begin::InProgress { .. }
    ));
}

async fn completed_key_expires_after_ttl(s: Arc<dyn IdempotencyStore>) {
    let key = unique("k");
    let t = begun(s.begin(&key, "fp", LEASE).await.unwrap());
    s.complete(&key, &t, "fp", None, Duration::from_millis(300))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match s.begin(&key, "fp", LEASE).await.unwrap() {
            Begin::Begun(_) => break,
            Begin::Completed { .. } => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "completed key never expired"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn one_winner_under_contention(s: Arc<dyn IdempotencyStore>) {
    for _ in 0..5 {
        let key = unique("k");
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let s = s.clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                s.begin(&key, "fp", LEASE).await.unwrap()
            }));
        }
        let mut winners = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Begin::Begun(_)) {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "exactly one worker may win a key");
    }
}

/// A batch claim wins fresh keys, leaves existing ones (held or completed) to `begin`, and
/// races a concurrent `begin` with one winner per key.
async fn batch_claim(s: Arc<dyn IdempotencyStore>) {
    let (fresh, held, done) = (unique("k"), unique("k"), unique("k"));
    let held_token = begun(s.begin(&held, "fp", LEASE).await.unwrap());
    let t = begun(s.begin(&done, "fp", LEASE).await.unwrap());
    assert!(s.complete(&done, &t, "fp", None, TTL).await.unwrap());
    let claimed = s
        .claim_many(&[(&fresh, "fp"), (&held, "fp"), (&done, "fp")], LEASE)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    assert_eq!(claimed[1], None, "a held key is not claimed again");
    assert_eq!(claimed[2], None, "a completed key is not claimed again");
    let token = claimed[0].clone().expect("a fresh key is claimed");
    assert!(matches!(
        s.begin(&fresh, "fp", LEASE).await.unwrap(),
        Begin::InProgress { .. }
    ));
    assert!(s.extend(&fresh, &token, LEASE).await.unwrap());
    assert!(s.complete(&fresh, &token, "fp", None, TTL).await.unwrap());
    assert!(matches!(
        s.begin(&fresh, "fp", LEASE).await.unwrap(),
        Begin::Completed { .. }
    ));
    // The held key is still its first holder's.
    assert!(s
        .complete(&held, &held_token, "fp", None, TTL)
        .await
        .unwrap());

    // Batch claims and single begins racing for the same keys: one winner per key.
    let keys: Vec<String> = (0..32).map(|_| unique("k")).collect();
    let batch = {
        let (s, keys) = (s.clone(), keys.clone());
        tokio::spawn(async move {
            let pairs: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "fp")).collect();
            s.claim_many(&pairs, LEASE).await.unwrap()
        })
    };
    let singles: Vec<_> = keys
        .iter()
        .map(|k| {
            let (s, k) = (s.clone(), k.clone());
            tokio::spawn(async move {
                matches!(s.begin(&k, "fp", LEASE).await.unwrap(), Begin::Begun(_))
            })
        })
        .collect();
    let batch = batch.await.unwrap();
    for (i, single) in singles.into_iter().enumerate() {
        let single = single.await.unwrap();
        assert!(
            batch[i].is_some() != single,
            "key {i}: batch claimed {}, begin won {single}",
            batch[i].is_some()
        );
    }
}

macro_rules! contract {
    ($store:ident) => {
        mod $store {
            contract!(@t $store; claim_complete_and_absorb, completed_without_result,
                different_payload_is_a_conflict, release_lets_a_retry_begin,
                expired_lease_is_taken_over, extend_keeps_the_lease,
                completed_key_expires_after_ttl, one_winner_under_contention, batch_claim);
        }
    };
    (@t $store:ident; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                super::$case(super::$store().await).await;
            }
        )*
    };
}

contract!(memory);
contract!(redis);
contract!(postgres);

#[tokio::test]
async fn postgres_cleanup_deletes_expired_rows() {
    let url = database_url();
    let store = PostgresStore::connect(&url)
        .await
        .unwrap_or_else(|e| unreachable("PostgreSQL", &url, e));
    let key = unique("gone");
    let t = begun(store.begin(&key, "fp", LEASE).await.unwrap());
    store
        .complete(&key, &t, "fp", None, Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let deleted = store.cleanup(100_000).await.unwrap();
    assert!(deleted >= 1, "cleanup deleted {deleted}");
    let n: i64 = sqlx_count(&store, &key).await;
    assert_eq!(n, 0);
}

async fn sqlx_count(store: &PostgresStore, key: &str) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT count(*) AS n FROM courier_idempotency WHERE key = $1")
        .bind(key)
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get("n")
}

#[tokio::test]
async fn unknown_store_url_is_a_config_error() {
    let cfg = courier_core::config::IdempotencyConfig {
        store: courier_core::config::SecretUrl::new("mongodb://u:pw@h/db"),
        ..Default::default()
    };
    let Err(e) = courier_idempotency::store_from_config(&cfg).await else {
        panic!("an unknown store URL was accepted");
    };
    assert!(matches!(e, Error::Config { .. }), "{e}");
    assert!(!e.to_string().contains("pw@"), "{e}");
}

#[tokio::test]
async fn unreachable_redis_is_a_store_error_quickly() {
    let e = RedisStore::connect("redis://127.0.0.1:1")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "store", "{e}");
    assert!(e.is_retryable());
}

/// Concurrent calls share one multiplexed connection: every caller must still get its own key's answer
/// (fresh keys begun, completed keys reported completed with their own result).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_concurrent_calls_get_their_own_replies() {
    let s = redis().await;
    let keys: Vec<String> = (0..200).map(|i| format!("{}-{i}", unique("p"))).collect();
    // Complete every even key with its index as the stored result.
    let mut tasks = Vec::new();
    for (i, key) in keys.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        let (s, key) = (s.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let t = begun(s.begin(&key, "fp", LEASE).await.unwrap());
            let r = Some(Bytes::from(i.to_string()));
            assert!(s.complete(&key, &t, "fp", r, TTL).await.unwrap());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut tasks = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let (s, key) = (s.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            (i, s.begin(&key, "fp", LEASE).await.unwrap())
        }));
    }
    for t in tasks {
        match t.await.unwrap() {
            (i, Begin::Completed { result }) if i % 2 == 0 => {
                assert_eq!(result, Some(Bytes::from(i.to_string())), "key {i}")
            }
            (i, Begin::Begun(_)) if i % 2 == 1 => {}
            (i, other) => panic!("key {i}: unexpected {other:?}"),
        }
    }
}

/// A Redis restart (or `SCRIPT FLUSH`) forgets the scripts that extend and release a lease: the
/// store must load them again instead of failing those calls with NOSCRIPT.
#[tokio::test]
async fn redis_reloads_flushed_scripts() {
    let (s, mut conn) = redis_and_raw(&unique("flush:")).await;
    let t = begun(s.begin("k", "fp", LEASE).await.unwrap());
    script_flush(&mut conn).await;
    assert!(s.extend("k", &t, LEASE).await.unwrap());
    script_flush(&mut conn).await;
    s.release("k", &t).await.unwrap();
    begun(s.begin("k", "fp", LEASE).await.unwrap());
}

async fn script_flush(conn: &mut ::redis::aio::MultiplexedConnection) {
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(conn)
        .await
        .unwrap();
}

/// A store under `prefix`, and a plain connection to the same Redis to write keys behind its back.
async fn redis_and_raw(prefix: &str) -> (RedisStore, ::redis::aio::MultiplexedConnection) {
    let url = redis_url();
    let s = RedisStore::connect(&url)
        .await
        .unwrap_or_else(|e| unreachable("Redis", &url, e))
        .with_prefix(prefix);
    let client = ::redis::Client::open(url).unwrap();
    (s, client.get_multiplexed_async_connection().await.unwrap())
}

/// Keys that courier wrote as hashes before the string records (an upgrade with keys in flight)
/// still answer `begin`: completed ones absorb their duplicates, with their result.
#[tokio::test]
async fn redis_reads_keys_of_the_earlier_hash_layout() {
    let prefix = unique("legacy:");
    let (s, mut conn) = redis_and_raw(&prefix).await;
    let _: () = ::redis::pipe()
        .hset_multiple(
            format!("{prefix}done"),
            &[("s", "c"), ("f", "fp"), ("r", "receipt-9")],
        )
        .hset_multiple(
            format!("{prefix}busy"),
            &[("s", "p"), ("f", "fp"), ("t", "tok")],
        )
        .pexpire(format!("{prefix}busy"), 30_000)
        .pexpire(format!("{prefix}done"), 30_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        s.begin("done", "fp", LEASE).await.unwrap(),
        Begin::Completed {
            result: Some(Bytes::from_static(b"receipt-9"))
        }
    );
    let e = s.begin("done", "other", LEASE).await.unwrap_err();
    assert!(matches!(e, Error::IdempotencyConflict { .. }), "{e}");
    assert!(matches!(
        s.begin("busy", "fp", LEASE).await.unwrap(),
        Begin::InProgress { .. }
    ));
}

/// A value courier did not write under its prefix is a store error, not a guess.
#[tokio::test]
async fn redis_foreign_value_is_a_store_error() {
    let prefix = unique("foreign:");
    let (s, mut conn) = redis_and_raw(&prefix).await;
    let _: () = ::redis::cmd("SET")
        .arg(format!("{prefix}k"))
        .arg("hello")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let e = s.begin("k", "fp", LEASE).await.unwrap_err();
    assert_eq!(e.kind(), "store", "{e}");
}

/// Several instances starting at once on a database without the table: every `migrate`
/// succeeds (unserialised, concurrent `CREATE TABLE IF NOT EXISTS` of one table fails some of
/// them with a unique violation on PostgreSQL's catalog).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_of_a_fresh_table_all_succeed() {
    let url = database_url();
    for round in 0..3 {
        let table = unique("courier_idem_race").replace('-', "_");
        let mut stores = Vec::new();
        for _ in 0..8 {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await
                .unwrap_or_else(|e| unreachable("PostgreSQL", &url, e));
            stores.push(
                PostgresStore::from_pool(pool)
                    .with_table(table.clone())
                    .unwrap(),
            );
        }
        let results =
            futures::future::join_all(stores.iter().map(|s| async move { s.migrate().await }))
                .await;
        let failed: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
            .collect();
        sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(stores[0].pool())
            .await
            .unwrap();
        assert!(
            failed.is_empty(),
            "round {round}: {} of 8 migrations failed: {failed:?}",
            failed.len()
        );
    }
}
