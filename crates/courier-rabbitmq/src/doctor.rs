//! `courier doctor`'s live checks of a RabbitMQ broker (read-only: a queue that matches is
//! left as it is).

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

use courier_core::findings::{Finding, Findings, Severity};
use courier_core::Guarantee;

use crate::connection::{close_channel, Link, Watched};
use crate::{Config, QueueType, BACKEND};

/// Connect as courier does (URL, TLS) and check `queues`: each exists, and under at-least-once
/// and exactly-once is a durable quorum queue.
pub async fn doctor(config: &Config, queues: &[String]) -> Vec<Finding> {
    let mut out = Findings::new(BACKEND);
    let r = &config.backend;
    let link = Link::new(r.clone());
    if let Err(e) = link.channel().await {
        out.add(
            Severity::Error,
            format!("cannot connect to {}: {e}", r.url.redacted()),
            "check the URL, credentials and TLS settings, or start RabbitMQ",
        );
        return out.into_vec();
    }
    let guaranteed = config.guarantee != Guarantee::AtMostOnce;
    if guaranteed && r.queue_type == QueueType::Classic {
        out.add(
            Severity::Info,
            "queue_type = classic: no delivery limit and no replication",
            "use queue_type = \"quorum\" (default) for at-least-once and exactly-once",
        );
    }
    let op = link.declare_timeout();
    for q in queues {
        // A passive declare only inspects; a fresh channel per queue since a 404 closes it.
        let Ok(Watched { channel: ch, .. }) = link.new_channel().await else {
            continue;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = tokio::time::timeout(
            op,
            ch.queue_declare(q.as_str().into(), passive, FieldTable::default()),
        )
        .await;
        match declared {
            Err(_) => out.add(
                Severity::Error,
                format!("RabbitMQ did not answer about queue {q:?} within {op:?}"),
                "check the broker's health",
            ),
            Ok(Err(e)) => out.add(
                Severity::Error,
                format!("queue {q:?} does not exist or is not accessible: {e}"),
                "create it (auto_create = true, or declare it in your topology)",
            ),
            Ok(Ok(_)) => {
                close_channel(&ch, op, "doctor").await;
                if !guaranteed {
                    continue;
                }
                // A passive declare does not return the queue's arguments: a declare of a
                // durable quorum queue succeeds only when the queue is exactly that.
                let Ok(Watched { channel: ch2, .. }) = link.new_channel().await else {
                    continue;
                };
                let mut args = FieldTable::default();
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
                let durable = QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                };
                match tokio::time::timeout(op, ch2.queue_declare(q.as_str().into(), durable, args))
                    .await
                {
                    Ok(Ok(_)) => close_channel(&ch2, op, "doctor").await,
                    Ok(Err(e)) => out.add(
                        Severity::Warning,
                        format!("queue {q:?} is not a durable quorum queue ({e})"),
                        "recreate it as a durable quorum queue (x-queue-type=quorum): a classic or non-durable queue can lose messages the guarantee promised to keep",
                    ),
                    Err(_) => out.add(
                        Severity::Error,
                        format!("RabbitMQ did not answer about queue {q:?} within {op:?}"),
                        "check the broker's health",
                    ),
                }
            }
        }
    }
    link.close().await;
    out.into_vec()
}
