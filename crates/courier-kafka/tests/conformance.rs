//! The shared conformance suite on both Kafka test beds.

mod common;

mod nisshi {
    use super::common::Kafka;
    async fn backend() -> Kafka {
        Kafka {
            bootstrap: courier_testkit::endpoints::kafka_bootstrap(),
            name: "kafka (nisshi)",
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

/// The suite on the Kafka-protocol broker with every handler behind the idempotent layer
/// (Redis store).
mod nisshi_through_the_layer {
    use super::common::Kafka;
    async fn backend() -> courier_testkit::Layered<Kafka> {
        courier_testkit::Layered {
            inner: Kafka {
                bootstrap: courier_testkit::endpoints::kafka_bootstrap(),
                name: "kafka (nisshi)",
            },
            store: courier_testkit::stores::redis().await,
        }
    }
    courier_testkit::conformance_suite!(backend);
}
