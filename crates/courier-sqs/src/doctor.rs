//! `courier doctor`'s live checks of SQS queues (read-only).

use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::QueueAttributeName;

use courier_core::findings::{Finding, Findings, Severity};
use courier_core::Guarantee;

use crate::client::SqsClient;
use crate::{Config, BACKEND};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Reach SQS as courier does (region, endpoint, profile, credentials) and check `queues`: each
/// exists; under at-least-once and exactly-once it has a redrive policy; its visibility
/// timeout covers the handler timeout; exactly-once on a standard queue has an idempotency
/// store.
pub async fn doctor(config: &Config, queues: &[String]) -> Vec<Finding> {
    let mut out = Findings::new(BACKEND);
    let client = SqsClient::connect(config.backend.clone(), Guarantee::AtLeastOnce, false).await;
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            out.add(
                Severity::Error,
                e.to_string(),
                "fix the [backend] region, endpoint or credentials",
            );
            return out.into_vec();
        }
    };
    let sdk = &client.inner.sdk;
    let g = config.guarantee;
    for q in queues {
        let url =
            match tokio::time::timeout(TIMEOUT, sdk.get_queue_url().queue_name(q).send()).await {
                Ok(Ok(r)) => r.queue_url.unwrap_or_default(),
                Ok(Err(e)) => {
                    out.add(
                        Severity::Error,
                        format!("queue {q:?}: {}", DisplayErrorContext(e)),
                        "create it (auto_create = true) or fix the name/region",
                    );
                    continue;
                }
                Err(_) => {
                    out.add(
                        Severity::Error,
                        format!("SQS did not answer within {TIMEOUT:?}"),
                        "check endpoint, region and network",
                    );
                    return out.into_vec();
                }
            };
        let attrs = match sdk
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
                        DisplayErrorContext(e)
                    ),
                    "grant sqs:GetQueueAttributes",
                );
                continue;
            }
        };
        if g != Guarantee::AtMostOnce && !attrs.contains_key(&QueueAttributeName::RedrivePolicy) {
            out.add(
                Severity::Warning,
                format!("queue {q:?} has no RedrivePolicy: a poison message is retried forever"),
                "set a RedrivePolicy with a dead-letter queue (create_dead_letter_queue = true creates one)",
            );
        }
        let visibility: u64 = attrs
            .get(&QueueAttributeName::VisibilityTimeout)
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        if let Some(t) = config.consumer.handler_timeout {
            if Duration::from_secs(visibility) < t {
                out.add(
                    Severity::Warning,
                    format!("queue {q:?} visibility timeout {visibility}s is shorter than the handler timeout {t:?}"),
                    "raise VisibilityTimeout above the handler timeout (courier's heartbeat extends it, but a stalled heartbeat then redelivers mid-handler)",
                );
            }
        }
        if g == Guarantee::ExactlyOnce && !q.ends_with(".fifo") && config.idempotency.is_none() {
            out.add(
                Severity::Error,
                format!("exactly-once on standard queue {q:?} without an idempotency store"),
                "use a .fifo queue, or configure [idempotency]",
            );
        }
    }
    out.into_vec()
}
