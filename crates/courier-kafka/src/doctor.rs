//! `courier doctor`'s live checks of a Kafka cluster (read-only).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};

use courier_core::findings::{Finding, Findings, Severity};
use courier_core::Guarantee;

use crate::{settings, Config, BACKEND};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Reach the cluster as courier does (bootstrap servers, passthrough settings) and check
/// `topics`: each exists; under at-least-once and exactly-once its replication and
/// `min.insync.replicas` let `acks=all` survive a broker loss.
pub async fn doctor(config: &Config, topics: &[String]) -> Vec<Finding> {
    let mut out = Findings::new(BACKEND);
    let k = &config.backend;
    let cc = settings::connection(k);
    let (admin, consumer): (AdminClient<DefaultClientContext>, BaseConsumer) =
        match (cc.create(), cc.create()) {
            (Ok(a), Ok(c)) => (a, c),
            (Err(e), _) | (_, Err(e)) => {
                out.add(
                    Severity::Error,
                    format!("invalid Kafka client settings: {e}"),
                    "fix [backend] settings",
                );
                return out.into_vec();
            }
        };
    let metadata =
        match tokio::task::spawn_blocking(move || consumer.fetch_metadata(None, TIMEOUT)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                out.add(
                    Severity::Error,
                    format!("cannot fetch metadata from {}: {e}", k.bootstrap),
                    "check bootstrap servers, TLS/SASL settings, or start the broker",
                );
                return out.into_vec();
            }
            Err(e) => {
                out.add(
                    Severity::Error,
                    format!("metadata task failed: {e}"),
                    "retry",
                );
                return out.into_vec();
            }
        };
    let brokers = metadata.brokers().len();
    for t in topics {
        let topic = metadata.topics().iter().find(|x| x.name() == t);
        let Some(topic) = topic.filter(|x| x.error().is_none() && !x.partitions().is_empty())
        else {
            out.add(
                Severity::Error,
                format!("topic {t:?} does not exist"),
                "create it (auto_create = true) or fix the name",
            );
            continue;
        };
        if config.guarantee == Guarantee::AtMostOnce {
            continue;
        }
        let replication = topic
            .partitions()
            .iter()
            .map(|p| p.replicas().len())
            .min()
            .unwrap_or(0);
        let configs = admin
            .describe_configs(
                &[ResourceSpecifier::Topic(t)],
                &AdminOptions::new().request_timeout(Some(TIMEOUT)),
            )
            .await;
        let min_isr: Option<usize> = configs
            .ok()
            .and_then(|mut v| v.pop())
            .and_then(|r| r.ok())
            .and_then(|r| r.get("min.insync.replicas").and_then(|e| e.value.clone()))
            .and_then(|v| v.parse().ok());
        if replication < 3 && brokers >= 3 {
            out.add(
                Severity::Warning,
                format!("topic {t:?} has replication factor {replication}: acks=all survives no broker loss"),
                "use replication factor 3 with min.insync.replicas=2",
            );
        }
        match min_isr {
            Some(m) if m < 2 && replication >= 3 => out.add(
                Severity::Warning,
                format!("topic {t:?} min.insync.replicas={m}: acks=all can be confirmed by a single replica"),
                "set min.insync.replicas=2",
            ),
            Some(m) if m > replication => out.add(
                Severity::Error,
                format!("topic {t:?} min.insync.replicas={m} > replication factor {replication}: every acks=all publish fails"),
                "lower min.insync.replicas or raise the replication factor",
            ),
            _ => {}
        }
        if brokers == 1 {
            out.add(
                Severity::Info,
                format!("single-broker cluster: topic {t:?} cannot be replicated"),
                "fine for development; production needs ≥ 3 brokers",
            );
        }
    }
    out.into_vec()
}
