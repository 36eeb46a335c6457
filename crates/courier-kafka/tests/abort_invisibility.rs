//! Records of an aborted transaction are never handed to an exactly-once (read_committed)
//! consumer.
//!
//! Runs against the Apache Kafka broker of `scripts/services` (or any `KAFKA_BOOTSTRAP` with
//! `KAFKA_FLAVOR=apache`, the default). Kafka-protocol brokers that do not filter aborted
//! transactions for read_committed consumers (librdkafka's MockCluster, nisshi) cannot run it:
//! with another `KAFKA_FLAVOR` it prints why it is skipped and passes.

mod common;

use std::time::Duration;

use courier_core::{Context, Guarantee, Handler, HandlerError, Message, Subscription};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

struct Forward(tokio::sync::mpsc::UnboundedSender<Message>);

#[courier_core::async_trait]
impl Handler for Forward {
    async fn handle(&self, m: &Message, _cx: &mut Context) -> Result<(), HandlerError> {
        let _ = self.0.send(m.clone());
        Ok(())
    }
    fn is_idempotent(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aborted_transactions_are_invisible_to_exactly_once_consumers() {
    let flavor = courier_testkit::endpoints::kafka_flavor();
    if flavor != "apache" {
        courier_testkit::endpoints::notice(&format!(
            "SKIPPED: abort invisibility needs Apache Kafka; KAFKA_FLAVOR={flavor} names a broker \
             that may not filter aborted transactions for read_committed consumers. Unset \
             KAFKA_FLAVOR (or set it to apache) with KAFKA_BOOTSTRAP pointing at Apache Kafka \
             (scripts/services up starts one)."
        ));
        return;
    }
    let bootstrap = courier_testkit::endpoints::kafka_bootstrap();
    let config = common::config(&bootstrap, Guarantee::ExactlyOnce);
    let client = std::sync::Arc::new(courier_kafka::connect(&config).await.unwrap());
    let topic = courier_testkit::unique("abort");
    courier_core::DeliveryClient::create_destination(&*client, &topic)
        .await
        .unwrap();

    // One aborted transaction, then one committed marker, from a raw transactional producer.
    let t = topic.clone();
    let b = bootstrap.clone();
    tokio::task::spawn_blocking(move || {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("transactional.id", courier_testkit::unique("abort-tx"))
            .create()
            .unwrap();
        let timeout = Duration::from_secs(30);
        p.init_transactions(timeout).unwrap();
        p.begin_transaction().unwrap();
        for i in 0..10 {
            p.send(BaseRecord::to(&t).key("k").payload(&format!("aborted {i}")))
                .map_err(|(e, _)| e)
                .unwrap();
        }
        p.flush(timeout).unwrap();
        p.abort_transaction(timeout).unwrap();
        p.begin_transaction().unwrap();
        p.send(BaseRecord::to(&t).key("k").payload("committed"))
            .map_err(|(e, _)| e)
            .unwrap();
        p.commit_transaction(timeout).unwrap();
    })
    .await
    .unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = courier_core::Consumer::new(client.clone(), Subscription::new(&topic, "g"))
        .spawn(Forward(tx))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("the committed record never arrived")
        .unwrap();
    consumer.shutdown().await.unwrap();
    let mut seen = vec![String::from_utf8_lossy(&first.payload).into_owned()];
    while let Ok(m) = rx.try_recv() {
        seen.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    assert_eq!(
        seen,
        vec!["committed".to_owned()],
        "aborted records were delivered"
    );
}
