//! Redis (the idempotency store) stopped in the middle of a run, fail-closed: deliveries are
//! deferred while it is down, and after it returns nothing is lost and no effect is repeated.
//!
//! The test runs its own persistent Redis (AOF, fsync always) on a free port and SIGKILLs it:
//! the shared Redis of the other tests is not touched.

use std::sync::Arc;
use std::time::Duration;

use courier::idempotency::{Idempotent, RedisStore};
use courier::{
    async_trait, Consumer, Context, DeliveryClient, Handler, HandlerError, Message, Subscription,
};
use courier_testkit::endpoints::{rabbitmq_url, unreachable};
use courier_testkit::{unique, Ledger};

struct Record(Arc<Ledger>);

#[async_trait]
impl Handler for Record {
    async fn handle(&self, m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        self.0.handled(m.id.as_str());
        Ok(())
    }
}

/// A Redis of this test's own, persisting every write (AOF, fsync always) — what a production
/// idempotency store must do, or a restart forgets which messages were completed.
struct OwnRedis {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    fn new() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique("courier-redis-"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = OwnRedis {
            port,
            dir,
            child: None,
        };
        r.start();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn up(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    fn start(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| unreachable("redis-server", "PATH", e));
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown save; only what was fsynced survives.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_fail_closed_loses_nothing_and_repeats_nothing() {
    let mut redis = OwnRedis::new();
    wait_for("Redis to start", Duration::from_secs(10), || redis.up()).await;
    let url = redis.url();
    let store = Arc::new(
        RedisStore::connect(&url)
            .await
            .unwrap_or_else(|e| unreachable("Redis", &url, e)),
    );
    let config = courier::Config::from_url(&rabbitmq_url()).unwrap();
    let client: Arc<dyn DeliveryClient> = Arc::from(courier::connect(&config).await.unwrap());
    let dest = unique("outage");
    let group = unique("g");
    client.create_destination(&dest).await.unwrap();

    let ledger = Arc::new(Ledger::new());
    let mut consumers = Vec::new();
    let mut stats = Vec::new();
    for _ in 0..2 {
        let layer = Idempotent::new(Record(ledger.clone()), store.clone())
            .namespace(group.clone())
            .lease(Duration::from_secs(10))
            .store_retry_delay(Duration::from_millis(200));
        stats.push(layer.stats());
        consumers.push(
            Consumer::new(client.clone(), Subscription::new(&dest, &group))
                .concurrency(4)
                .spawn(layer)
                .await
                .unwrap(),
        );
    }

    const N: usize = 2_000;
    let msgs: Vec<Message> = (0..N).map(|i| Message::new(format!("order {i}"))).collect();
    let publisher = {
        let client = client.clone();
        let dest = dest.clone();
        let ledger = ledger.clone();
        tokio::spawn(async move {
            for (i, m) in msgs.into_iter().enumerate() {
                ledger.sent(m.id.as_str());
                client.publish(&dest, m.clone()).await.unwrap();
                if i % 5 == 0 {
                    // A producer retry: the same id again.
                    client.publish(&dest, m).await.unwrap();
                }
                if i % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };

    let (r, ok) = ledger
        .wait_until(Duration::from_secs(60), |r| r.handled >= N / 4)
        .await;
    assert!(ok, "no progress before the outage: {r}");
    redis.kill();
    println!("redis killed after {} handled", ledger.report().handled);
    let errors = || {
        stats
            .iter()
            .map(|s| s.store_errors.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
    };
    wait_for(
        "the layer to defer through the outage",
        Duration::from_secs(30),
        || errors() >= 20,
    )
    .await;
    let during = ledger.report();
    redis.start();
    wait_for("Redis to return", Duration::from_secs(10), || redis.up()).await;
    println!(
        "redis back; handled during outage window: {}",
        during.handled
    );

    publisher.await.unwrap();
    let (report, done) = ledger.wait_all_handled(Duration::from_secs(120)).await;
    let _ = ledger
        .wait_until(Duration::from_secs(1), |r| r.duplicates > 0)
        .await;
    for c in consumers {
        c.shutdown().await.unwrap();
    }
    let r = ledger.report();
    println!("after the outage: {r}; store errors {}", errors());
    assert!(
        done && r.lost == 0,
        "lost messages across a Redis outage: {report}"
    );
    assert_eq!(
        r.duplicates, 0,
        "duplicate effects across a Redis outage: {r}"
    );
}
