//! The guarantee → librdkafka settings table (one place, used by the clients and `explain`).

use courier_core::config::is_secret_setting;

use crate::KafkaConfig;
use courier_core::{Explanation, Guarantee};

/// The client settings of courier's own helper clients (admin, `inspect`, `doctor`): the
/// `[backend] settings` passthrough (TLS, SASL …) with the bootstrap servers and client id.
pub(crate) fn connection(k: &KafkaConfig) -> rdkafka::ClientConfig {
    client_config(
        k,
        &[
            ("bootstrap.servers".into(), k.bootstrap.clone(), ""),
            ("client.id".into(), k.client_id.clone(), ""),
        ],
    )
}

/// (name, value, why) of the producer settings courier sets.
pub(crate) fn producer(
    k: &KafkaConfig,
    g: Guarantee,
    transactional_id: Option<&str>,
) -> Vec<(String, String, &'static str)> {
    let mut s = vec![
        ("bootstrap.servers".into(), k.bootstrap.clone(), ""),
        ("client.id".into(), k.client_id.clone(), ""),
        (
            "message.max.bytes".into(),
            (k.max_message_bytes + 1024).to_string(),
            "payloads are checked against max_message_bytes before sending",
        ),
        (
            "allow.auto.create.topics".into(),
            "false".into(),
            "courier creates topics only with auto_create; a typo fails",
        ),
    ];
    match g {
        Guarantee::AtMostOnce => {
            s.push(("acks".into(), "0".into(), "no broker acknowledgement"));
            s.push(("retries".into(), "0".into(), "never re-send"));
            s.push((
                "enable.idempotence".into(),
                "false".into(),
                "nothing to dedup without retries",
            ));
        }
        Guarantee::AtLeastOnce | Guarantee::ExactlyOnce => {
            s.push((
                "acks".into(),
                "all".into(),
                "confirmed by all in-sync replicas",
            ));
            s.push((
                "enable.idempotence".into(),
                "true".into(),
                "librdkafka retries never duplicate or reorder",
            ));
            s.push((
                "delivery.timeout.ms".into(),
                k.delivery_timeout.as_millis().to_string(),
                "how long a publish is retried",
            ));
        }
    }
    if let (Guarantee::ExactlyOnce, Some(id)) = (g, transactional_id) {
        s.push((
            "transactional.id".into(),
            id.to_owned(),
            "set [backend] transactional_id to a name stable per instance (e.g. the pod name) so a restart fences its predecessor and aborts its open transaction; the default <client.id>-<host>-<pid>-<n> is unique but not stable",
        ));
        s.push((
            "transaction.timeout.ms".into(),
            k.delivery_timeout.as_millis().max(1000).to_string(),
            "librdkafka requires it >= delivery.timeout.ms (the broker caps it at transaction.max.timeout.ms)",
        ));
    }
    s
}

/// (name, value, why) of the consumer settings courier sets.
pub(crate) fn consumer(
    k: &KafkaConfig,
    g: Guarantee,
    group: &str,
) -> Vec<(String, String, &'static str)> {
    let mut s = vec![
        ("bootstrap.servers".into(), k.bootstrap.clone(), ""),
        ("client.id".into(), k.client_id.clone(), ""),
        ("group.id".into(), group.to_owned(), "the consumer group"),
        (
            "auto.offset.reset".into(),
            "earliest".into(),
            "a new group reads the topic from the start",
        ),
        ("enable.partition.eof".into(), "false".into(), ""),
        (
            "session.timeout.ms".into(),
            k.session_timeout.as_millis().to_string(),
            "how fast a dead consumer's partitions move",
        ),
        (
            "max.poll.interval.ms".into(),
            k.max_poll_interval.as_millis().to_string(),
            "the redelivery window (idempotency lease)",
        ),
    ];
    match g {
        Guarantee::AtMostOnce => {
            s.push((
                "enable.auto.commit".into(),
                "false".into(),
                "courier commits each offset before its handler runs",
            ));
        }
        Guarantee::AtLeastOnce => {
            s.push((
                "enable.auto.commit".into(),
                "true".into(),
                "commits what was stored, periodically",
            ));
            s.push((
                "enable.auto.offset.store".into(),
                "false".into(),
                "offsets are stored only after the handler succeeded",
            ));
            s.push(("auto.commit.interval.ms".into(), "1000".into(), ""));
        }
        Guarantee::ExactlyOnce => {
            s.push((
                "enable.auto.commit".into(),
                "false".into(),
                "offsets commit inside the output transaction",
            ));
            s.push(("enable.auto.offset.store".into(), "false".into(), ""));
            s.push((
                "isolation.level".into(),
                "read_committed".into(),
                "never read aborted or open transactions",
            ));
        }
    }
    s
}

/// Apply passthrough settings, then courier's (which win).
pub(crate) fn client_config(
    k: &KafkaConfig,
    ours: &[(String, String, &'static str)],
) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    for (name, v) in &k.settings {
        c.set(name, v);
    }
    for (name, v, _) in ours {
        c.set(name, v);
    }
    c.set_log_level(rdkafka::config::RDKafkaLogLevel::Error);
    c
}

pub(crate) fn explain(
    k: &KafkaConfig,
    g: Guarantee,
    transactional_id: Option<&str>,
) -> Explanation {
    let mut e = Explanation::new(crate::BACKEND, g);
    let txn = transactional_id
        .map(str::to_owned)
        .or_else(|| k.transactional_id.clone())
        .unwrap_or_else(|| "<client_id>-<host>-<pid>-<n>".into());
    for (name, v, why) in producer(k, g, Some(&txn)) {
        e = e.set("producer", &name, v, why);
    }
    for (name, v, why) in consumer(k, g, "<group>") {
        e = e.set("consumer", &name, v, why);
    }
    let commit = match g {
        Guarantee::AtMostOnce => "commit offset (sync) before the handler",
        Guarantee::AtLeastOnce => "store offset after the handler (contiguous per partition); commit on revoke, on close and every second",
        Guarantee::ExactlyOnce => "commit offsets with the outputs, one transaction per commit interval; read_committed",
    };
    e = e.set(
        "consumer",
        "commit timing",
        commit,
        "the guarantee's settle order",
    );
    if g == Guarantee::ExactlyOnce {
        e = e.set(
            "consumer",
            "commit_interval",
            format!("{:?} or {} inputs", k.commit_interval, k.commit_max_inputs),
            "one transaction per interval holds the outputs and offsets of every input handled in it whose predecessors in its partition are done; an abort rewinds those partitions",
        );
    }
    for (name, v) in &k.settings {
        let shown = if is_secret_setting(name) {
            "***"
        } else {
            v.as_str()
        };
        e = e.set(
            "passthrough",
            name,
            shown,
            "raw librdkafka setting from the config",
        );
    }
    if g == Guarantee::ExactlyOnce {
        e = e.note("transactions cover Kafka→Kafka effects; external side effects need the idempotent layer ([idempotency])");
    }
    e
}
