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
