//! What `verify` injects: the fault list (`--faults`), the sabotages, and the glue that cuts
//! connections (the TCP fault proxy) and restarts the broker.

use super::*;

/// Faults to inject.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Faults {
    /// Consumer crashes mid-handler.
    pub kill: u32,
    /// Handler error probability.
    pub errors: f64,
    /// Share of messages published twice with the same id.
    pub duplicates: f64,
    /// Idempotency store outage.
    pub store_outage: Option<Duration>,
    /// Broker restart mid-run.
    pub restart: bool,
    /// Connection cuts through the fault proxy.
    pub cut: u32,
}

impl std::str::FromStr for Faults {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut f = Faults::default();
        for part in s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "none")
        {
            let (name, value) = part.split_once('=').unwrap_or((part, ""));
            match name {
                "kill" => f.kill = value.parse().map_err(|_| anyhow!("kill={value}: expected a count"))?,
                "errors" => f.errors = prob(name, value)?,
                "duplicates" | "dup" => f.duplicates = prob(name, value)?,
                "store-outage" => f.store_outage = Some(crate::humantime_parse(value).map_err(|e| anyhow!(e))?),
                "restart" => f.restart = true,
                "cut" => f.cut = value.parse().map_err(|_| anyhow!("cut={value}: expected a count"))?,
                other => bail!("unknown fault {other:?}: use kill=N, errors=P, duplicates=P, store-outage=DURATION, restart, cut=N"),
            }
        }
        Ok(f)
    }
}

pub(super) fn prob(name: &str, v: &str) -> Result<f64> {
    let p: f64 = v
        .parse()
        .map_err(|_| anyhow!("{name}={v}: expected a probability"))?;
    if !(0.0..=1.0).contains(&p) {
        bail!("{name}={v}: must be between 0 and 1");
    }
    Ok(p)
}

/// Deliberate mistakes, to show that `verify` catches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Sabotage {
    /// Claim at-least-once but settle before the handler (what an auto-ack consumer does).
    AckFirst,
    /// Claim exactly-once but run without the idempotent layer.
    NoDedup,
}

/// `config` with the broker reached through a fresh fault proxy.
pub(super) async fn through_proxy(config: &Config) -> Result<(Config, crate::proxy::FaultProxy)> {
    let mut c = config.clone();
    let Some(target) = c.backend.endpoint() else {
        bail!(
            "cut=N is not available for the {} backend as configured: the fault proxy forwards one broker address (RabbitMQ amqp://, an SQS endpoint such as LocalStack's http://; not the AWS TLS endpoints); Kafka clients connect to the addresses the cluster advertises, and the memory backend has no connection",
            c.backend.kind()
        );
    };
    let (prefix, host_port, rest) = split_authority(&target)?;
    let proxy = crate::proxy::FaultProxy::start(&host_port).await?;
    c.backend
        .set_endpoint(format!("{prefix}{}{rest}", proxy.addr()));
    Ok((c, proxy))
}

/// Split `scheme://[user[:pass]@]host[:port]/rest` into (`scheme://user:pass@`, `host:port`,
/// `/rest`), with the scheme's default port filled in. TLS schemes are refused: the proxy would
/// break the certificate's host name.
pub(super) fn split_authority(url: &str) -> Result<(String, String, String)> {
    let (scheme, after) = url.split_once("://").ok_or_else(|| {
        anyhow!(
            "cannot proxy {}: not a URL",
            courier::config::redact_url(url)
        )
    })?;
    let default_port = match scheme {
        "amqp" => 5672,
        "http" => 80,
        "amqps" | "https" => bail!(
            "cut=N needs a plain-text broker URL ({scheme}:// goes through TLS, whose host name check the proxy would fail)"
        ),
        other => bail!("cut=N cannot proxy a {other}:// URL"),
    };
    let end = after.find(['/', '?']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    let (userinfo, host_port) = match authority.rfind('@') {
        Some(i) => (&authority[..=i], &authority[i + 1..]),
        None => ("", authority),
    };
    let host_port = if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    Ok((format!("{scheme}://{userinfo}"), host_port, rest.to_owned()))
}

pub(super) async fn restart_broker(backend: &str) {
    if backend == "rabbitmq" {
        let run = |args: &'static [&'static str]| async move {
            let _ = tokio::process::Command::new("rabbitmqctl")
                .args(args)
                .output()
                .await;
        };
        run(&["stop_app"]).await;
        run(&["start_app"]).await;
    }
}
