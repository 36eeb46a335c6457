//! The consumer's backlog report: `courier_backlog`, `courier_backlog_in_flight` and
//! `courier_oldest_message_age_seconds` follow what the broker holds for the group, and
//! `courier_message_age_seconds` records each delivery's age (memory broker).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use courier::{
    Consumer, Context, DeliveryClient, Guarantee, Handler, HandlerError, Message, Subscription,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::sync::Semaphore;

/// The consumer's report interval, and the wider spacing of the test's reads.
const REPORT_EVERY: Duration = Duration::from_millis(50);
const READ_EVERY: Duration = Duration::from_millis(150);

/// Handles a message only when a permit is given.
struct Gate(Arc<Semaphore>);

#[async_trait::async_trait]
impl Handler for Gate {
    async fn handle(&self, _m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        self.0.acquire().await.expect("gate open").forget();
        Ok(())
    }
}

/// The metrics read so far: each gauge's last value, and the samples of
/// `courier_message_age_seconds`. The debugging recorder drains histograms and zeroes gauges
/// on every read, so reads are spaced wider than the report interval.
struct Probe {
    snapshotter: Snapshotter,
    gauges: HashMap<String, f64>,
    ages: Vec<f64>,
}

impl Probe {
    fn read(&mut self) {
        for (k, _, _, v) in self.snapshotter.snapshot().into_vec() {
            match v {
                DebugValue::Gauge(g) => {
                    self.gauges
                        .insert(k.key().name().to_owned(), g.into_inner());
                }
                DebugValue::Histogram(h) if k.key().name() == "courier_message_age_seconds" => {
                    self.ages.extend(h.into_iter().map(|v| v.into_inner()));
                }
                _ => {}
            }
        }
    }

    /// Poll (bounded) until `want` holds for the gauges `names`; their values.
    async fn until(
        &mut self,
        names: &[&str],
        want: impl Fn(&[Option<f64>]) -> bool,
    ) -> Vec<Option<f64>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            self.read();
            let values: Vec<Option<f64>> =
                names.iter().map(|n| self.gauges.get(*n).copied()).collect();
            if want(&values) || std::time::Instant::now() > deadline {
                return values;
            }
            tokio::time::sleep(READ_EVERY).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_gauges_follow_the_group() {
    let recorder = DebuggingRecorder::new();
    let mut probe = Probe {
        snapshotter: recorder.snapshotter(),
        gauges: HashMap::new(),
        ages: Vec::new(),
    };
    metrics::set_global_recorder(recorder).unwrap();

    let client: Arc<dyn DeliveryClient> =
        courier::connect(&courier::Config::default().with_guarantee(Guarantee::AtLeastOnce))
            .await
            .unwrap()
            .into();
    client.create_destination("orders").await.unwrap();
    for i in 0..5 {
        client
            .publish("orders", Message::new(format!("order {i}")))
            .await
            .unwrap();
    }
    let gate = Arc::new(Semaphore::new(0));
    let consumer = Consumer::new(client.clone(), Subscription::new("orders", "billing"))
        .backlog_interval(Some(REPORT_EVERY))
        .spawn(Gate(gate.clone()))
        .await
        .unwrap();
    let names = [
        "courier_backlog",
        "courier_backlog_in_flight",
        "courier_oldest_message_age_seconds",
    ];
    // One handler runs (held at the gate); the rest wait at the broker or in the consume loop.
    let held = probe
        .until(&names, |v| {
            v[1].is_some_and(|f| f >= 1.0) && v[0].zip(v[1]).is_some_and(|(b, f)| b + f == 5.0)
        })
        .await;
    let (backlog, in_flight) = (held[0].unwrap_or(-1.0), held[1].unwrap_or(-1.0));
    assert!(
        in_flight >= 1.0 && backlog + in_flight == 5.0,
        "backlog and in flight while one is held: {held:?}"
    );
    let age = held[2].expect("oldest message age reported");
    assert!((0.0..10.0).contains(&age), "oldest age {age}");
    gate.add_permits(5);
    // The recorder zeroes a gauge when it is read, so a read between two reports shows 0:
    // wait for the handlers first, then for the report of the drained group.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while consumer.stats().handled < 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(READ_EVERY).await;
    }
    let drained = probe
        .until(&names[..2], |v| v[0] == Some(0.0) && v[1] == Some(0.0))
        .await;
    assert_eq!(drained, [Some(0.0), Some(0.0)], "after all were handled");
    let stats = consumer.shutdown().await.unwrap();
    assert_eq!(stats.handled, 5);
    probe.read();
    assert_eq!(
        probe.ages.len(),
        5,
        "one age sample per delivery: {:?}",
        probe.ages
    );
    assert!(
        probe.ages.iter().all(|a| (0.0..10.0).contains(a)),
        "ages {:?}",
        probe.ages
    );
}
