//! The broker stack works: each service accepts a write and returns it, through the real client
//! crates (rdkafka, lapin, aws-sdk-sqs, redis, sqlx). Runs before any backend logic is involved,
//! so a failure here means the stack (`scripts/services up`), not courier.

use std::time::Duration;

use courier_testkit::{endpoints, unique};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn kafka_accepts_a_record_and_returns_it() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{ClientConfig, Message};

    let bootstrap = endpoints::kafka_bootstrap();
    let topic = unique("smoke");
    let admin: rdkafka::admin::AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let created = tokio::time::timeout(
        WAIT,
        admin.create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        ),
    )
    .await;
    match created {
        Ok(Ok(r)) => assert!(r.iter().all(|r| r.is_ok()), "create topic: {r:?}"),
        Ok(Err(e)) => endpoints::unreachable("Kafka", &bootstrap, e),
        Err(_) => endpoints::unreachable("Kafka", &bootstrap, "create_topics timed out"),
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(&topic).key("k").payload("hello kafka"),
            WAIT,
        )
        .await
        .unwrap_or_else(|(e, _)| endpoints::unreachable("Kafka", &bootstrap, e));
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", unique("smoke-group"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "10000")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let m = tokio::time::timeout(WAIT, consumer.recv())
        .await
        .expect("no record came back within 30 s")
        .unwrap();
    assert_eq!(m.payload(), Some(&b"hello kafka"[..]));
    assert_eq!(m.key(), Some(&b"k"[..]));
}

#[tokio::test]
async fn rabbitmq_accepts_a_message_and_returns_it() {
    use futures::StreamExt;
    use lapin::options::*;
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let url = endpoints::rabbitmq_url();
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| endpoints::unreachable("RabbitMQ", "127.0.0.1:5672", e));
    let ch = conn.create_channel().await.unwrap();
    let queue = unique("smoke");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"hello rabbit",
            BasicProperties::default().with_message_id("smoke-1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "smoke".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("no message within 30 s")
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"hello rabbit");
    assert_eq!(
        d.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("smoke-1")
    );
    d.ack(BasicAckOptions::default()).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn sqs_accepts_a_message_and_returns_it() {
    let endpoint = endpoints::sqs_endpoint();
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(endpoints::aws_region()))
        .endpoint_url(&endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            "test", "test", None, None, "smoke",
        ))
        .load()
        .await;
    let sqs = aws_sdk_sqs::Client::new(&conf);
    let url = sqs
        .create_queue()
        .queue_name(unique("smoke"))
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
    sqs.send_message()
        .queue_url(&url)
        .message_body("hello sqs")
        .send()
        .await
        .unwrap();
    let got = sqs
        .receive_message()
        .queue_url(&url)
        .wait_time_seconds(10)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body(), Some("hello sqs"));
}

#[tokio::test]
async fn redis_accepts_a_write_and_returns_it() {
    let url = endpoints::redis_url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = tokio::time::timeout(WAIT, client.get_multiplexed_async_connection())
        .await
        .unwrap_or_else(|_| endpoints::unreachable("Redis", &url, "timed out"))
        .unwrap_or_else(|e| endpoints::unreachable("Redis", &url, e));
    let key = unique("smoke");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("hello redis")
        .arg("EX")
        .arg(60)
        .query_async(&mut conn)
        .await
        .unwrap();
    let v: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "hello redis");
}

#[tokio::test]
async fn postgres_accepts_a_write_and_returns_it() {
    let url = endpoints::database_url();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(WAIT)
        .connect(&url)
        .await
        .unwrap_or_else(|e| endpoints::unreachable("PostgreSQL", &url, e));
    let table = unique("smoke").replace('-', "_");
    sqlx::query(&format!("CREATE TABLE {table} (v text)"))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(&format!("INSERT INTO {table} VALUES ('hello postgres')"))
        .execute(&pool)
        .await
        .unwrap();
    let (v,): (String,) = sqlx::query_as(&format!("SELECT v FROM {table}"))
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(v, "hello postgres");
}
