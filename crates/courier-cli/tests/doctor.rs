//! `courier doctor` against the real local brokers: each seeded misconfiguration is found with
//! its fix, and a healthy configuration exits cleanly.

use std::process::Command;

use courier_testkit::{endpoints, unique};

fn doctor(url: &str, destination: &str, extra_env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["doctor", "--url", url, "--destination", destination])
        .env_remove("COURIER_CONFIG")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(extra_env.iter().copied())
        .output()
        .expect("run courier doctor");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), text)
}

/// The findings about the configured broker (not the "if it moved" part).
fn here(text: &str) -> &str {
    text.split("if this config moved").next().unwrap_or(text)
}

#[tokio::test]
async fn rabbitmq_classic_transient_queue_is_flagged_and_quorum_is_healthy() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let url = endpoints::rabbitmq_url();
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| endpoints::unreachable("RabbitMQ", &url, e));
    let ch = conn.create_channel().await.unwrap();
    let bad = unique("doctor-classic");
    ch.queue_declare(
        bad.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let good = unique("doctor-quorum");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        good.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();

    let target = format!("{url}?guarantee=at-least-once");
    let (code, text) = doctor(&target, &bad, &[]);
    assert_eq!(code, 3, "{text}");
    assert!(
        here(&text).contains("not a durable quorum queue") && here(&text).contains("fix:"),
        "{text}"
    );

    let (code, text) = doctor(&target, &good, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(here(&text).contains("no problems found"), "{text}");

    let (code, text) = doctor(&target, &unique("missing"), &[]);
    assert_eq!(code, 3, "{text}");
    assert!(here(&text).contains("does not exist"), "{text}");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(good.as_str().into(), Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn sqs_queue_without_redrive_or_with_short_visibility_is_flagged() {
    use aws_sdk_sqs::types::QueueAttributeName;
    let endpoint = endpoints::sqs_endpoint();
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(endpoints::aws_region()))
        .endpoint_url(&endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            "test", "test", None, None, "doctor",
        ))
        .load()
        .await;
    let sqs = aws_sdk_sqs::Client::new(&conf);
    let dlq = unique("doctor-dlq");
    let dlq_url = sqs
        .create_queue()
        .queue_name(&dlq)
        .send()
        .await
        .unwrap_or_else(|e| {
            endpoints::unreachable(
                "LocalStack SQS",
                &endpoint,
                aws_sdk_sqs::error::DisplayErrorContext(e),
            )
        })
        .queue_url
        .unwrap();
    let dlq_arn = sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    let bad = unique("doctor-bare");
    sqs.create_queue()
        .queue_name(&bad)
        .attributes(QueueAttributeName::VisibilityTimeout, "5")
        .send()
        .await
        .unwrap();
    let good = unique("doctor-good");
    sqs.create_queue()
        .queue_name(&good)
        .attributes(QueueAttributeName::VisibilityTimeout, "60")
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"5"}}"#),
        )
        .send()
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(unique("doctor"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("sqs.toml");
    std::fs::write(
        &cfg,
        format!(
            "guarantee = \"at-least-once\"\n[backend]\nkind = \"sqs\"\nregion = \"{}\"\nendpoint = \"{endpoint}\"\n[consumer]\nhandler_timeout = \"30s\"\n",
            endpoints::aws_region()
        ),
    )
    .unwrap();
    let run = |q: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_courier"))
            .args([
                "doctor",
                "--config",
                cfg.to_str().unwrap(),
                "--destination",
                q,
            ])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = run(&bad);
    assert_eq!(code, 3, "{text}");
    assert!(here(&text).contains("no RedrivePolicy"), "{text}");
    assert!(
        here(&text).contains("visibility timeout 5s is shorter than the handler timeout"),
        "{text}"
    );
    let (code, text) = run(&good);
    assert_eq!(code, 0, "{text}");
    assert!(here(&text).contains("no problems found"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Create `topic` (1 partition, replication 1, with `configs`) on the local Kafka broker.
async fn create_kafka_topic(topic: &str, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let bootstrap = endpoints::kafka_bootstrap();
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap_or_else(|e| panic!("a Kafka admin client: {e}"));
    let new = configs.iter().fold(
        NewTopic::new(topic, 1, TopicReplication::Fixed(1)),
        |t, (k, v)| t.set(k, v),
    );
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        admin.create_topics(&[new], &AdminOptions::new()),
    )
    .await
    .unwrap_or_else(|_| endpoints::unreachable("Kafka", &bootstrap, "timed out"))
    .unwrap_or_else(|e| endpoints::unreachable("Kafka", &bootstrap, e));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
}

#[tokio::test]
async fn kafka_missing_topic_is_flagged_and_a_created_topic_is_healthy() {
    let topic = unique("doctor-topic");
    create_kafka_topic(&topic, &[]).await;
    let bootstrap = endpoints::kafka_bootstrap();
    let url = format!("kafka://{bootstrap}?guarantee=at-least-once");
    let (code, text) = doctor(&url, &unique("missing"), &[]);
    assert_eq!(code, 3, "{text}");
    assert!(here(&text).contains("does not exist"), "{text}");
    let (code, text) = doctor(&url, &topic, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        !here(&text).contains("[FAIL]") && !here(&text).contains("[warn]"),
        "{text}"
    );
}

#[tokio::test]
async fn kafka_min_insync_replicas_above_replication_is_flagged() {
    // Seeded misconfiguration: every acks=all publish to this topic would fail.
    let topic = unique("doctor-min-isr");
    create_kafka_topic(&topic, &[("min.insync.replicas", "2")]).await;
    let bootstrap = endpoints::kafka_bootstrap();
    let url = format!("kafka://{bootstrap}?guarantee=at-least-once");
    let (code, text) = doctor(&url, &topic, &[]);
    assert_eq!(code, 3, "{text}");
    assert!(
        here(&text).contains("min.insync.replicas=2 > replication factor 1"),
        "{text}"
    );
    assert!(
        here(&text).contains("lower min.insync.replicas or raise the replication factor"),
        "{text}"
    );
}
