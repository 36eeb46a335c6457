//! The shared conformance suite on both Kafka test beds: the broker at `KAFKA_BOOTSTRAP` (Apache
//! Kafka from `scripts/services`) and librdkafka's MockCluster.

mod common;

mod broker {
    use super::common::Kafka;
    async fn backend() -> Kafka {
        Kafka {
            bootstrap: courier_testkit::endpoints::kafka_bootstrap(),
            name: "kafka (Apache Kafka)",
        }
    }
    courier_testkit::conformance_suite!(backend);
    // Consumer processes SIGKILLed mid-handler (not on the MockCluster, which lives in one
    // process).
    courier_testkit::crash_suite!(backend);
}

mod mock {
    use super::common::{mock_bootstrap, Kafka};
    async fn backend() -> Kafka {
        Kafka {
            bootstrap: mock_bootstrap(),
            name: "kafka (MockCluster)",
        }
    }
    courier_testkit::conformance_suite!(backend);
}

/// The suite on the Kafka broker with every handler behind the idempotent layer
/// (Redis store).
mod broker_through_the_layer {
    use super::common::Kafka;
    async fn backend() -> courier_testkit::Layered<Kafka> {
        courier_testkit::Layered {
            inner: Kafka {
                bootstrap: courier_testkit::endpoints::kafka_bootstrap(),
                name: "kafka (Apache Kafka)",
            },
            store: courier_testkit::stores::redis().await,
        }
    }
    courier_testkit::conformance_suite!(backend);
}

/// Topic names Kafka refuses get a typed `InvalidName` before any request reaches the broker:
/// on create, publish and subscribe alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_names_kafka_refuses_are_refused_before_any_request() {
    use courier_core::{DeliveryClient, Guarantee};
    let boot = courier_testkit::endpoints::kafka_bootstrap();
    let c = courier_kafka::connect(&common::config(&boot, Guarantee::AtLeastOnce))
        .await
        .unwrap();
    let too_long = "t".repeat(250);
    courier_testkit::assert_names_refused(
        &c,
        &[
            "",
            "..",
            "orders/eu",
            "orders eu",
            "zahlungen-ä",
            too_long.as_str(),
        ],
    )
    .await;
    // The longest valid name is accepted.
    c.create_destination(&courier_testkit::unique(&"t".repeat(236)))
        .await
        .unwrap();
}
