//! `courier inspect` and `courier top`: what the broker holds for destinations and their
//! consumer groups, once or as a live table.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use courier::{DeliveryClient, DestinationInfo};

/// Inspect each destination for `groups`.
pub async fn inspect(
    client: &dyn DeliveryClient,
    destinations: &[String],
    groups: &[String],
) -> Result<Vec<DestinationInfo>> {
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(destinations.len());
    for d in destinations {
        out.push(
            client
                .inspect(d, &groups)
                .await
                .with_context(|| format!("inspecting {d}"))?,
        );
    }
    Ok(out)
}

/// How `courier top` draws.
#[derive(Debug, Clone)]
pub struct TopOptions {
    /// Time between refreshes.
    pub interval: Duration,
    /// Stop after this many refreshes (`None`: until interrupted).
    pub refreshes: Option<usize>,
    /// Clear the screen before each refresh (a terminal); otherwise refreshes follow each other.
    pub clear: bool,
}

/// Refresh the table of `destinations` × `groups` every `interval`: the `inspect` columns plus
/// how fast each group's backlog changes (negative: draining).
pub async fn top(
    client: &dyn DeliveryClient,
    destinations: &[String],
    groups: &[String],
    options: &TopOptions,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let mut previous: Option<(Instant, Vec<DestinationInfo>)> = None;
    let mut n = 0usize;
    loop {
        let now = Instant::now();
        let infos = inspect(client, destinations, groups).await?;
        if options.clear {
            write!(out, "\x1b[2J\x1b[H")?;
        }
        writeln!(
            out,
            "courier top — {} ({}), every {:?}; Ctrl-C stops",
            client.backend(),
            client.guarantee(),
            options.interval
        )?;
        for info in &infos {
            write!(out, "{info}")?;
            if let Some((then, before)) = &previous {
                let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
                let old = before.iter().find(|b| b.destination == info.destination);
                for g in &info.groups {
                    let was = old.and_then(|o| o.group(&g.group)).map(|b| b.backlog);
                    if let Some(was) = was {
                        let rate = (g.backlog as f64 - was as f64) / secs;
                        writeln!(out, "  {:<32} backlog change {rate:+.1}/s", g.group)?;
                    }
                }
            }
        }
        out.flush()?;
        previous = Some((now, infos));
        n += 1;
        if options.refreshes.is_some_and(|r| n >= r) {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(options.interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
