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
