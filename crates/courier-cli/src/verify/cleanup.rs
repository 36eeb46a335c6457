//! After a run: remove what `verify` created on the broker (its destination, dead-letter
//! destination and consumer group), with the broker's own client, so runs do not pile up
//! `verify-…` queues and topics. Not done for `--destination` (the user's) or with `--keep`.

use std::time::Duration;

use anyhow::{anyhow, Result};

use courier::config::{KafkaConfig, RabbitMqConfig, SqsConfig};
use courier::{BackendConfig, Config};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Remove the run's `dest`, `dlq` and `group` from the broker of `config`; what was removed.
/// Something already gone is not an error. Bounded as a whole: a broker that stops answering
/// leaves the run's destinations behind, it does not hold the report back.
pub(super) async fn remove(
    config: &Config,
    dest: &str,
    dlq: &str,
    group: &str,
) -> Result<Vec<String>> {
    tokio::time::timeout(TIMEOUT * 6, remove_unbounded(config, dest, dlq, group))
        .await
        .map_err(|_| anyhow!("the broker did not answer within {:?}", TIMEOUT * 6))?
}

async fn remove_unbounded(
    config: &Config,
    dest: &str,
    dlq: &str,
    group: &str,
) -> Result<Vec<String>> {
    match &config.backend {
        BackendConfig::Rabbitmq(r) => rabbitmq(r, dest, dlq, group).await,
        BackendConfig::Sqs(s) => sqs(s, dest, dlq).await,
        BackendConfig::Kafka(k) => kafka(k, dest, dlq, group).await,
        // The memory broker's destinations live and die with the verify process.
        _ => Ok(Vec::new()),
    }
}

/// courier's RabbitMQ topology of the run (courier-rabbitmq): an exchange per destination, the
/// group's work queue `DEST.GROUP` and the delay queues `DEST.GROUP.delay.<ms>` the run declared,
/// and the dead-letter exchange with its queue of the same name.
async fn rabbitmq(r: &RabbitMqConfig, dest: &str, dlq: &str, group: &str) -> Result<Vec<String>> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let conn = tokio::time::timeout(
        TIMEOUT,
        lapin::Connection::connect(r.url.expose(), lapin::ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow!("connecting to {} timed out", r.url.redacted()))??;
    let work = format!("{dest}.{group}");
    let mut removed = Vec::new();
    // One channel per deletion: a refused one closes its channel.
    let channel = || async {
        tokio::time::timeout(TIMEOUT, conn.create_channel())
            .await
            .map_err(|_| anyhow!("opening a channel timed out"))?
            .map_err(anyhow::Error::from)
    };
    let delays = courier::rabbitmq::DELAY_STEPS_MS
        .iter()
        .map(|&ms| courier::rabbitmq::delay_queue(&work, ms));
    for queue in [work.clone(), dlq.to_owned()].into_iter().chain(delays) {
        // RabbitMQ answers delete-ok for a queue that does not exist: look first, so `removed`
        // names only what was there (a refused passive declare closes its channel).
        let ch = channel().await?;
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let exists = tokio::time::timeout(
            TIMEOUT,
            ch.queue_declare(queue.as_str().into(), passive, Default::default()),
        )
        .await;
        if !matches!(exists, Ok(Ok(_))) {
            continue;
        }
        let deleted = tokio::time::timeout(
            TIMEOUT,
            ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
        )
        .await;
        if let Ok(Ok(_)) = deleted {
            removed.push(format!("queue {queue}"));
        }
    }
    for exchange in [dest, dlq] {
        let ch = channel().await?;
        let deleted = tokio::time::timeout(
            TIMEOUT,
            ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()),
        )
        .await;
        if let Ok(Ok(())) = deleted {
            removed.push(format!("exchange {exchange}"));
        }
    }
    let _ = tokio::time::timeout(TIMEOUT, conn.close(200, "verify cleaned up".into())).await;
    Ok(removed)
}

/// The run's queues (names as courier-sqs gives them: `.fifo` appended on a FIFO config).
async fn sqs(s: &SqsConfig, dest: &str, dlq: &str) -> Result<Vec<String>> {
    let client = crate::doctor::sqs_client(s).await;
    let mut removed = Vec::new();
    for name in [dest, dlq] {
        let name = if s.fifo && !name.ends_with(".fifo") {
            format!("{name}.fifo")
        } else {
            name.to_owned()
        };
        let Ok(Ok(url)) =
            tokio::time::timeout(TIMEOUT, client.get_queue_url().queue_name(&name).send()).await
        else {
            continue;
        };
        let Some(url) = url.queue_url else { continue };
        tokio::time::timeout(TIMEOUT, client.delete_queue().queue_url(&url).send())
            .await
            .map_err(|_| anyhow!("deleting SQS queue {name} timed out"))?
            .map_err(|e| {
                anyhow!(
                    "deleting SQS queue {name}: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(e)
                )
            })?;
        removed.push(format!("queue {name}"));
    }
    Ok(removed)
}

/// The run's topics and its consumer group (its committed offsets).
async fn kafka(k: &KafkaConfig, dest: &str, dlq: &str, group: &str) -> Result<Vec<String>> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> =
        crate::doctor::kafka_client_config(k).create()?;
    let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
    let mut removed = Vec::new();
    // Each name's outcome; one that is already gone (`missing`) is not an error.
    let mut tally = |kind: &str,
                     results: Vec<Result<String, (String, RDKafkaErrorCode)>>,
                     missing: RDKafkaErrorCode|
     -> Result<()> {
        for r in results {
            match r {
                Ok(name) => removed.push(format!("{kind} {name}")),
                Err((_, code)) if code == missing => {}
                Err((name, code)) => return Err(anyhow!("deleting Kafka {kind} {name}: {code}")),
            }
        }
        Ok(())
    };
    let groups = tokio::time::timeout(TIMEOUT * 2, admin.delete_groups(&[group], &opts))
        .await
        .map_err(|_| anyhow!("deleting Kafka group {group} timed out"))??;
    tally("group", groups, RDKafkaErrorCode::GroupIdNotFound)?;
    let topics = tokio::time::timeout(TIMEOUT * 2, admin.delete_topics(&[dest, dlq], &opts))
        .await
        .map_err(|_| anyhow!("deleting Kafka topics {dest}, {dlq} timed out"))??;
    tally("topic", topics, RDKafkaErrorCode::UnknownTopicOrPartition)?;
    Ok(removed)
}
