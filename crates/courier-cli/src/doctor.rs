//! `courier doctor`, part two: live checks of the configured broker against the guarantee,
//! with the broker's own client libraries (read-only: nothing is created or published).

use std::time::Duration;

use courier::config::{KafkaConfig, QueueType, RabbitMqConfig, SqsConfig};
use courier::doctor::{Finding, Severity};
use courier::{BackendConfig, Config, Guarantee};

const TIMEOUT: Duration = Duration::from_secs(10);

struct Out<'a> {
    config: &'a Config,
    findings: Vec<Finding>,
}

impl Out<'_> {
    fn add(&mut self, severity: Severity, what: impl Into<String>, fix: impl Into<String>) {
        self.findings.push(Finding {
            severity,
            backend: self.config.backend.kind().to_owned(),
            what: what.into(),
            fix: fix.into(),
        });
    }
}

/// Live checks of `destinations` on the configured broker.
pub async fn live(config: &Config, destinations: &[String]) -> Vec<Finding> {
    let mut out = Out {
        config,
        findings: Vec::new(),
    };
    match &config.backend {
        BackendConfig::Rabbitmq(r) => rabbitmq(&mut out, r, destinations).await,
        BackendConfig::Sqs(s) => sqs(&mut out, s, destinations).await,
        BackendConfig::Kafka(k) => kafka(&mut out, k, destinations).await,
        _ => {}
    }
    out.findings
}

async fn rabbitmq(out: &mut Out<'_>, r: &RabbitMqConfig, queues: &[String]) {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let conn = match tokio::time::timeout(
        TIMEOUT,
        lapin::Connection::connect(r.url.expose(), lapin::ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return out.add(
                Severity::Error,
                format!("cannot connect to {}: {e}", r.url.redacted()),
                "check the URL and credentials, or start RabbitMQ",
            )
        }
        Err(_) => {
            return out.add(
                Severity::Error,
                format!("connecting to {} timed out", r.url.redacted()),
                "check the host and port",
            )
        }
    };
    if out.config.guarantee != Guarantee::AtMostOnce && r.queue_type == QueueType::Classic {
        out.add(
            Severity::Info,
            "queue_type = classic: no delivery limit and no replication",
            "use queue_type = \"quorum\" (default) for at-least-once and exactly-once",
        );
    }
    for q in queues {
        // A passive declare only inspects; a fresh channel per queue since a 404 closes it.
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match ch
            .queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await
        {
            Err(e) => out.add(
                Severity::Error,
                format!("queue {q:?} does not exist or is not accessible: {e}"),
                "create it (auto_create = true, or declare it in your topology)",
            ),
            Ok(_) => {
                // The passive declare does not return arguments: re-declare durable+quorum passively is
                // not possible, so probe durability with a non-passive declare that must match exactly.
                let Ok(ch2) = conn.create_channel().await else {
                    continue;
                };
                let mut args = FieldTable::default();
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
                let durable = QueueDeclareOptions {
                    durable: true,
                    passive: false,
                    ..QueueDeclareOptions::default()
                };
                if let Err(e) = ch2.queue_declare(q.as_str().into(), durable, args).await {
                    if out.config.guarantee != Guarantee::AtMostOnce {
                        out.add(
                            Severity::Warning,
                            format!("queue {q:?} is not a durable quorum queue ({e})"),
                            "recreate it as a durable quorum queue (x-queue-type=quorum): a classic or non-durable queue can lose messages the guarantee promised to keep",
                        );
                    }
                }
            }
        }
    }
    let _ = conn.close(200, "doctor".into()).await;
}

/// A raw SQS client for `[backend]` (region, endpoint, credentials as courier's own).
pub(crate) async fn sqs_client(s: &SqsConfig) -> aws_sdk_sqs::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = &s.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    if let Some(e) = &s.endpoint {
        loader = loader.endpoint_url(e);
    }
    if let (Some(id), Some(secret)) = (&s.access_key_id, &s.secret_access_key) {
        loader = loader.credentials_provider(aws_credential_types::Credentials::new(
            id,
            secret.expose(),
            None,
            None,
            "courier-config",
        ));
    }
    aws_sdk_sqs::Client::new(&loader.load().await)
}

/// Raw Kafka client settings for `[backend]` (its passthrough settings and bootstrap servers).
pub(crate) fn kafka_client_config(k: &KafkaConfig) -> rdkafka::ClientConfig {
    let mut cc = rdkafka::ClientConfig::new();
    for (name, v) in &k.settings {
        cc.set(name, v);
    }
    cc.set("bootstrap.servers", &k.bootstrap);
    cc
}

async fn sqs(out: &mut Out<'_>, s: &SqsConfig, queues: &[String]) {
    use aws_sdk_sqs::types::QueueAttributeName;
    let client = sqs_client(s).await;
    let handler_timeout = out.config.consumer.handler_timeout;
    for q in queues {
        let url = match tokio::time::timeout(TIMEOUT, client.get_queue_url().queue_name(q).send())
            .await
        {
            Ok(Ok(r)) => r.queue_url.unwrap_or_default(),
            Ok(Err(e)) => {
                out.add(
                    Severity::Error,
                    format!(
                        "queue {q:?}: {}",
                        aws_sdk_sqs::error::DisplayErrorContext(e)
                    ),
                    "create it (auto_create = true) or fix the name/region",
                );
                continue;
            }
            Err(_) => {
                out.add(
                    Severity::Error,
                    "SQS did not answer within 10 s",
                    "check endpoint, region and network",
                );
                return;
            }
        };
        let attrs = match client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
        {
            Ok(r) => r.attributes.unwrap_or_default(),
            Err(e) => {
                out.add(
                    Severity::Error,
                    format!(
                        "queue {q:?}: cannot read attributes: {}",
                        aws_sdk_sqs::error::DisplayErrorContext(e)
                    ),
                    "grant sqs:GetQueueAttributes",
                );
                continue;
            }
        };
        let g = out.config.guarantee;
        if g != Guarantee::AtMostOnce && !attrs.contains_key(&QueueAttributeName::RedrivePolicy) {
            out.add(Severity::Warning, format!("queue {q:?} has no RedrivePolicy: a poison message is retried forever"), "set a RedrivePolicy with a dead-letter queue (create_dead_letter_queue = true creates one)");
        }
        let visibility: u64 = attrs
            .get(&QueueAttributeName::VisibilityTimeout)
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        if let Some(t) = handler_timeout {
            if Duration::from_secs(visibility) < t {
                out.add(
                    Severity::Warning,
                    format!("queue {q:?} visibility timeout {visibility}s is shorter than the handler timeout {t:?}"),
                    "raise VisibilityTimeout above the handler timeout (courier's heartbeat extends it, but a stalled heartbeat then redelivers mid-handler)",
                );
            }
        }
        let fifo = q.ends_with(".fifo");
        if g == Guarantee::ExactlyOnce && !fifo && out.config.idempotency.is_none() {
            out.add(
                Severity::Error,
                format!("exactly-once on standard queue {q:?} without an idempotency store"),
                "use a .fifo queue, or configure [idempotency]",
            );
        }
    }
}

async fn kafka(out: &mut Out<'_>, k: &KafkaConfig, topics: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::Consumer as _;
    let cc = kafka_client_config(k);
    let admin: AdminClient<DefaultClientContext> = match cc.create() {
        Ok(a) => a,
        Err(e) => {
            return out.add(
                Severity::Error,
                format!("invalid Kafka client settings: {e}"),
                "fix [backend] settings",
            )
        }
    };
    let metadata = match tokio::task::spawn_blocking({
        let consumer: Result<rdkafka::consumer::BaseConsumer, _> = cc.create();
        move || consumer.and_then(|c| c.fetch_metadata(None, TIMEOUT))
    })
    .await
    {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            return out.add(
                Severity::Error,
                format!("cannot fetch metadata from {}: {e}", k.bootstrap),
                "check bootstrap servers, TLS/SASL settings, or start the broker",
            )
        }
        Err(e) => {
            return out.add(
                Severity::Error,
                format!("metadata task failed: {e}"),
                "retry",
            )
        }
    };
    let brokers = metadata.brokers().len();
    for t in topics {
        let Some(topic) = metadata.topics().iter().find(|x| x.name() == t) else {
            out.add(
                Severity::Error,
                format!("topic {t:?} does not exist"),
                "create it (auto_create = true) or fix the name",
            );
            continue;
        };
        if topic.error().is_some() || topic.partitions().is_empty() {
            out.add(
                Severity::Error,
                format!("topic {t:?} does not exist ({:?})", topic.error()),
                "create it (auto_create = true) or fix the name",
            );
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
        if out.config.guarantee != Guarantee::AtMostOnce {
            if replication < 3 && brokers >= 3 {
                out.add(Severity::Warning, format!("topic {t:?} has replication factor {replication}: acks=all survives no broker loss"), "use replication factor 3 with min.insync.replicas=2");
            }
            match min_isr {
                Some(m) if m < 2 && replication >= 3 => out.add(Severity::Warning, format!("topic {t:?} min.insync.replicas={m}: acks=all can be confirmed by a single replica"), "set min.insync.replicas=2"),
                Some(m) if m > replication => out.add(Severity::Error, format!("topic {t:?} min.insync.replicas={m} > replication factor {replication}: every acks=all publish fails"), "lower min.insync.replicas or raise the replication factor"),
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
    }
}
