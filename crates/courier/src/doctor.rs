//! `courier doctor`: what changes when a configuration moves to another broker, and live checks
//! of the configured one.
//!
//! Each finding says what the other broker does differently for the configured guarantee and
//! how to keep the guarantee (or why it cannot be kept) after the switch.

use courier_core::Guarantee;

use crate::{BackendConfig, Config};

pub use courier_core::findings::{Finding, Severity};

/// `courier doctor`, part two: live, read-only checks of `destinations` on the configured
/// broker, by its backend crate (with the broker's own client, connected as courier connects).
/// Nothing for the memory broker.
pub async fn live(config: &Config, destinations: &[String]) -> Vec<Finding> {
    BackendConfig::doctor(config, destinations).await
}

/// Whether `config` keeps its idempotency keys in the process's memory.
pub(crate) fn memory_store(config: &Config) -> bool {
    config
        .idempotency
        .as_ref()
        .is_some_and(|i| i.store.expose() == "memory")
}

/// What changes for `config` on each of the other brokers.
pub fn portability(config: &Config) -> Vec<Finding> {
    let from = config.backend.traits();
    let from_kind = config.backend.kind();
    let g = config.guarantee;
    let ttl = config.idempotency.as_ref().map(|i| i.ttl);
    let mut out = Vec::new();
    for backend in BackendConfig::compiled() {
        let (name, to) = (backend.kind, backend.traits);
        if name == from_kind {
            continue;
        }
        let mut add = |severity, what: String, fix: &str| {
            out.push(Finding {
                severity,
                backend: name.into(),
                what,
                fix: fix.into(),
            })
        };
        if from.ordering != to.ordering {
            add(
                if to.keeps_key_order {
                    Severity::Info
                } else {
                    Severity::Warning
                },
                format!(
                    "ordering by key: {} here, {} there",
                    from.ordering, to.ordering
                ),
                to.ordering_fix,
            );
        }
        if from.consumer_groups && !to.consumer_groups {
            add(
                Severity::Warning,
                "no consumer groups: every subscriber of a queue competes; a second group does not get its own copy".into(),
                "give each group its own queue (fan out with SNS → SQS subscriptions)",
            );
        }
        if g == Guarantee::ExactlyOnce {
            match (to.native_dedup, ttl) {
                (Some(window), Some(ttl)) if ttl < window => add(
                    Severity::Warning,
                    format!("broker dedup window {window:?} is longer than the idempotency TTL {ttl:?}"),
                    "raise [idempotency] ttl to at least the broker's window",
                ),
                (Some(window), _) if !to.in_process => add(
                    Severity::Info,
                    format!("{name} drops re-sent ids for {window:?} only; later duplicates reach the idempotent layer"),
                    "keep [idempotency] configured",
                ),
                (None, None) => add(
                    Severity::Error,
                    "exactly-once without an [idempotency] store: this broker has no dedup of its own".into(),
                    "add an [idempotency] section (redis:// or postgres://)",
                ),
                _ => {}
            }
            if !to.in_process && memory_store(config) {
                add(
                    Severity::Warning,
                    "[idempotency] store = memory absorbs duplicates within one process only: a duplicate handled by another consumer process, or after a restart, runs again".into(),
                    "use a shared store: [idempotency] store = \"redis://…\" or \"postgres://…\"",
                );
            }
            if from.transactions && !to.transactions {
                add(
                    Severity::Warning,
                    "no transactions: handler outputs are published before the ack, not atomically with it".into(),
                    "give outputs deterministic ids (Context::derive_id) so downstream dedup absorbs re-publishes",
                );
            }
        }
        let limit = config.backend.max_message_bytes();
        if to.max_payload < limit {
            add(
                Severity::Warning,
                format!("payload limit {} bytes there, {limit} configured here", to.max_payload),
                "keep messages under the smaller limit (store large bodies elsewhere and send a reference)",
            );
        }
        if !to.delayed_redelivery && from.delayed_redelivery {
            add(
                Severity::Info,
                "no native delayed redelivery: retries are re-published with their delay by courier".into(),
                "nothing to do; retried messages may overtake later ones of the same key",
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_memory_idempotency_store_is_flagged_as_one_process_only() {
        let c = Config::from_url("memory://?guarantee=exactly-once&idempotency=memory").unwrap();
        let found = portability(&c);
        for to in ["kafka", "rabbitmq", "sqs"] {
            assert!(
                found
                    .iter()
                    .any(|f| f.backend == to && f.what.contains("within one process only")),
                "{to}: {found:?}"
            );
        }
    }

    #[test]
    fn moving_exactly_once_off_memory_without_a_store_is_flagged() {
        let c = Config::default().with_guarantee(Guarantee::ExactlyOnce);
        let f = portability(&c);
        assert!(
            f.iter()
                .any(|f| f.backend == "kafka" && f.severity == Severity::Error),
            "{f:#?}"
        );
        assert!(f
            .iter()
            .any(|f| f.backend == "sqs" && f.what.contains("consumer groups")));
        assert!(f
            .iter()
            .any(|f| f.backend == "rabbitmq" && f.what.contains("ordering")));
    }

    #[test]
    fn short_ttl_against_sqs_window() {
        let mut c =
            Config::from_url("kafka://127.0.0.1:9092?guarantee=exactly-once&idempotency=memory")
                .unwrap();
        c.idempotency.as_mut().unwrap().ttl = Duration::from_secs(60);
        let f = portability(&c);
        assert!(
            f.iter()
                .any(|f| f.backend == "sqs" && f.what.contains("longer than the idempotency TTL")),
            "{f:#?}"
        );
        assert!(f.iter().any(|f| f.what.contains("no transactions")));
    }
}
