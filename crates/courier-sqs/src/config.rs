//! `[backend] kind = "sqs"`: AWS SQS through aws-sdk-sqs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use courier_core::config::{BackendUrl, Secret};
use courier_core::{Error, Result};

/// Configuration of the SQS backend. Credentials come from the standard AWS chain (environment,
/// profile, instance role) unless given here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqsConfig {
    /// Region (default: from the AWS chain, e.g. `AWS_REGION`).
    pub region: Option<String>,
    /// Endpoint override (LocalStack: `http://127.0.0.1:4566`).
    pub endpoint: Option<String>,
    /// AWS profile name.
    pub profile: Option<String>,
    /// Static access key id (prefer the AWS chain).
    pub access_key_id: Option<String>,
    /// Static secret access key (never printed).
    pub secret_access_key: Option<Secret>,
    /// Create missing queues (a name ending in `.fifo` creates a FIFO queue).
    pub auto_create: bool,
    /// Visibility timeout of queues courier creates, and the heartbeat's extension step.
    #[serde(with = "humantime_serde")]
    pub visibility_timeout: Duration,
    /// Long-poll wait per receive (max 20 s).
    #[serde(with = "humantime_serde")]
    pub wait_time: Duration,
    /// `MessageGroupId` for FIFO messages without a key.
    pub default_group_id: String,
    /// Create a dead-letter queue with a `RedrivePolicy` for created queues.
    pub create_dead_letter_queue: bool,
    /// `maxReceiveCount` of created redrive policies.
    pub max_receive_count: u32,
    /// Largest accepted message (body plus attributes), bytes (SQS's ceiling: 1 MiB). Each
    /// queue's own `MaximumMessageSize` (256 KiB on older queues and LocalStack) is read on first
    /// use and applies when it is lower.
    pub max_message_bytes: usize,
    /// Destinations are FIFO queues: a name without `.fifo` gets it appended, keys become
    /// `MessageGroupId`s and the capabilities report per-key order and the 5-minute dedup.
    pub fifo: bool,
}

impl SqsConfig {
    /// `sqs://[region]`: the region (default: the AWS chain's), no path; parameters `endpoint`
    /// (e.g. LocalStack's `http://127.0.0.1:4566`) and `fifo`.
    pub(crate) fn from_url(url: &BackendUrl<'_>) -> Result<Self> {
        url.refuse_path()?;
        url.refuse_host_list()?;
        let mut q = SqsConfig {
            region: url.host().map(str::to_owned),
            auto_create: url.auto_create()?,
            ..SqsConfig::default()
        };
        for (name, v) in url.params() {
            match name {
                "endpoint" => q.endpoint = Some(v.to_owned()),
                "fifo" => q.fifo = BackendUrl::bool_param("fifo", v)?,
                _ => return Err(url.unknown_param(name, &["endpoint", "fifo"])),
            }
        }
        Ok(q)
    }

    pub(crate) fn validate_section(&self) -> Result<()> {
        if self.wait_time > Duration::from_secs(20) {
            return Err(Error::config(
                "backend.wait_time must be at most 20s (SQS long-poll limit)",
            ));
        }
        if self.max_message_bytes > 1024 * 1024 {
            return Err(Error::config(
                "backend.max_message_bytes cannot exceed SQS's 1 MiB limit",
            ));
        }
        Ok(())
    }
}

impl Default for SqsConfig {
    fn default() -> Self {
        SqsConfig {
            region: None,
            endpoint: None,
            profile: None,
            access_key_id: None,
            secret_access_key: None,
            auto_create: false,
            visibility_timeout: Duration::from_secs(30),
            wait_time: Duration::from_secs(20),
            default_group_id: "courier".into(),
            create_dead_letter_queue: false,
            max_receive_count: 5,
            max_message_bytes: 1024 * 1024,
            fifo: false,
        }
    }
}
