//! The `courier` command-line tool.
//!
//! ```text
//! courier explain --config courier.toml [--guarantee exactly-once] [--json]
//! courier send    --url memory:// --to orders --key customer-7 --header x-tenant=acme 'payload'
//! courier consume --config courier.toml --from orders --group billing --count 10
//! courier inspect --config courier.toml orders --group billing
//! courier top     --config courier.toml orders --group billing --interval 2s
//! ```

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};

use courier::{Config, Guarantee, Message, Subscription};

use courier_cli::{humantime_parse, verify};

#[derive(Parser, Debug)]
#[command(
    name = "courier",
    version,
    about = "Messages over Kafka, RabbitMQ, SQS and memory with an explicit delivery guarantee"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct Target {
    /// TOML config file (default: $COURIER_CONFIG).
    #[arg(long, env = "COURIER_CONFIG", conflicts_with = "url")]
    config: Option<std::path::PathBuf>,
    /// Config as a URL, e.g. kafka://127.0.0.1:9092?guarantee=exactly-once (default: $COURIER_URL).
    #[arg(long, env = "COURIER_URL")]
    url: Option<String>,
    /// Override the configured guarantee.
    #[arg(long)]
    guarantee: Option<Guarantee>,
}

impl Target {
    fn load(&self) -> Result<Config> {
        let mut c = match (&self.config, &self.url) {
            (Some(p), _) => Config::from_file(p)?,
            (None, Some(u)) => Config::from_url(u)?,
            (None, None) => Config::default(),
        };
        if let Some(g) = self.guarantee {
            c.guarantee = g;
        }
        c.validate()?;
        Ok(c)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the effective broker settings a config and guarantee compile into.
    Explain(ExplainArgs),
    /// Publish messages.
    Send(SendArgs),
    /// Receive messages and print them as JSON lines.
    Consume(ConsumeArgs),
    /// What the broker holds for destinations and their consumer groups: stored messages,
    /// per group backlog (Kafka lag), in flight, delayed, consumers, oldest message age.
    Inspect(InspectArgs),
    /// `inspect` as a live table, refreshed every --interval, with each group's backlog change
    /// per second.
    Top(TopArgs),
    /// Remove a destination and what courier created for the named groups (their queues or
    /// committed offsets). Its messages are deleted; the dead-letter destination is kept unless
    /// named too.
    Delete(DeleteArgs),
    /// Check a configuration: what changes on another broker, and live checks of this one.
    Doctor(DoctorArgs),
    /// The transactional outbox: backlog and lag, or run a relay.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Prove the guarantee: publish and consume under injected faults, count loss and duplicate
    /// effects, exit non-zero on a violation.
    Verify(VerifyArgs),
    /// One consumer process of `courier verify` (started by it; reads its spec on stdin).
    #[command(hide = true)]
    VerifyWorker,
    /// The producer process of `courier verify` (started by it; reads its spec on stdin).
    #[command(hide = true)]
    VerifyProducer,
}

#[derive(Args, Debug)]
struct ExplainArgs {
    #[command(flatten)]
    target: Target,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SendArgs {
    #[command(flatten)]
    target: Target,
    /// Destination (topic / queue / exchange).
    #[arg(long)]
    to: String,
    /// Ordering key.
    #[arg(long)]
    key: Option<String>,
    /// Message id (default: a new UUIDv7; with --count, suffixed by -N).
    #[arg(long)]
    id: Option<String>,
    /// Header as name=value (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Create the destination first.
    #[arg(long)]
    create: bool,
    /// Send the payload this many times.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Payload (default: read standard input).
    payload: Option<String>,
}

#[derive(Args, Debug)]
struct ConsumeArgs {
    #[command(flatten)]
    target: Target,
    /// Destination to consume from.
    #[arg(long)]
    from: String,
    /// Consumer group.
    #[arg(long, default_value = "courier-cli")]
    group: String,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<usize>,
    /// Stop when nothing arrives for this long (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = humantime_parse)]
    idle: Duration,
    /// Leave messages unsettled (they will be redelivered) instead of acknowledging.
    #[arg(long)]
    peek: bool,
}

#[derive(Args, Debug)]
struct InspectArgs {
    #[command(flatten)]
    target: Target,
    /// Destinations (topics / queues / exchanges).
    #[arg(required = true)]
    destinations: Vec<String>,
    /// Consumer group to report on (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct TopArgs {
    #[command(flatten)]
    target: Target,
    /// Destinations (topics / queues / exchanges).
    #[arg(required = true)]
    destinations: Vec<String>,
    /// Consumer group to report on (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Time between refreshes.
    #[arg(long, default_value = "2s", value_parser = humantime_parse)]
    interval: Duration,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long)]
    refreshes: Option<usize>,
}

#[derive(Args, Debug)]
struct DeleteArgs {
    #[command(flatten)]
    target: Target,
    /// Destinations to remove.
    #[arg(required = true)]
    destinations: Vec<String>,
    /// Consumer group to remove with them (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Confirm: without it nothing is removed.
    #[arg(long)]
    yes: bool,
}

#[derive(Args, Debug)]
struct DoctorArgs {
    #[command(flatten)]
    target: Target,
    /// Destinations to check live (topics / queues).
    #[arg(long = "destination")]
    destinations: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    #[command(flatten)]
    target: Target,
    /// Messages to publish.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// 10,000 messages (the README's full matrix size).
    #[arg(long)]
    full: bool,
    /// Concurrent consumers.
    #[arg(long, default_value_t = 3)]
    consumers: usize,
    /// Faults: comma list of kill=N, errors=P, duplicates=P, store-outage=DURATION, restart, cut=N.
    #[arg(long, default_value = "none")]
    faults: verify::Faults,
    /// Deliberately break the setup to see verify catch it.
    #[arg(long, value_enum)]
    sabotage: Option<verify::Sabotage>,
    /// Upper bound on the run.
    #[arg(long, default_value = "300s", value_parser = humantime_parse)]
    timeout: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Use this existing, empty destination and its dead-letter `NAME-dlq` instead of
    /// creating fresh ones (for brokers where courier may not create them).
    #[arg(long)]
    destination: Option<String>,
    /// Run the producer and the consumers as tasks of this process instead of child
    /// processes (a crash is then a task abort, not SIGKILL). The memory backend's always
    /// run in-process.
    #[arg(long)]
    in_process: bool,
    /// Leave the run's destinations and consumer group on the broker (removed by default).
    #[arg(long)]
    keep: bool,
}

#[derive(Subcommand, Debug)]
enum OutboxCommand {
    /// Backlog, lag (age of the oldest unpublished row), published and failed rows.
    Status(OutboxStatusArgs),
    /// Publish the outbox through the configured broker until interrupted (Ctrl-C).
    Relay(OutboxRelayArgs),
}

#[derive(Args, Debug)]
struct OutboxStatusArgs {
    /// PostgreSQL holding the outbox table.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct OutboxRelayArgs {
    #[command(flatten)]
    target: Target,
    /// PostgreSQL holding the outbox table.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Rows claimed per round.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
}

async fn outbox_pool(url: &str) -> Result<sqlx::PgPool> {
    let redacted = courier::config::redact_url(url);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to the outbox database {redacted}"))
}

fn parse_header(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("header {s:?} must be name=value"))
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // verify injects failures on purpose: only errors are worth printing by default.
    let default_level = if matches!(
        cli.command,
        Command::Verify { .. } | Command::VerifyWorker | Command::VerifyProducer
    ) {
        "error"
    } else {
        "warn"
    };
    // lapin logs every channel the broker closes as an error, including the passive declares
    // `inspect` and `delete` use to look for queues that may not exist; courier reports what
    // matters itself.
    let default_filter = format!("{default_level},lapin::channel=off");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COURIER_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect(args).await,
        Command::Top(args) => top(args).await,
        Command::Delete(args) => delete(args).await,
        Command::Doctor(args) => doctor(args).await,
        Command::Outbox(OutboxCommand::Status(args)) => outbox_status(args).await,
        Command::Outbox(OutboxCommand::Relay(args)) => outbox_relay(args).await,
        Command::Verify(args) => verify(args).await,
        Command::VerifyWorker => verify_worker().await,
        Command::VerifyProducer => verify_producer().await,
        Command::Explain(args) => explain(args).await,
        Command::Send(args) => send(args).await,
        Command::Consume(args) => consume(args).await,
    }
}

async fn inspect(args: InspectArgs) -> Result<()> {
    let InspectArgs {
        target,
        destinations,
        groups,
        json,
    } = args;
    let config = target.load()?;
    let client = courier::connect(&config).await?;
    let infos = courier_cli::admin::inspect(&*client, &destinations, &groups).await;
    client.close().await?;
    let infos = infos?;
    if json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
    } else {
        for i in &infos {
            print!("{i}");
        }
    }
    Ok(())
}

async fn top(args: TopArgs) -> Result<()> {
    let TopArgs {
        target,
        destinations,
        groups,
        interval,
        refreshes,
    } = args;
    let config = target.load()?;
    let client = courier::connect(&config).await?;
    let options = courier_cli::admin::TopOptions {
        interval,
        refreshes,
        clear: std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    let r = courier_cli::admin::top(
        &*client,
        &destinations,
        &groups,
        &options,
        &mut std::io::stdout(),
    )
    .await;
    client.close().await?;
    r?;
    Ok(())
}

async fn delete(args: DeleteArgs) -> Result<()> {
    let DeleteArgs {
        target,
        destinations,
        groups,
        yes,
    } = args;
    if !yes {
        bail!(
            "courier delete removes {} and its messages: add --yes to confirm",
            destinations.join(", ")
        );
    }
    let config = target.load()?;
    let client = courier::connect(&config).await?;
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    for d in &destinations {
        let removed = client
            .delete_destination(d, &groups)
            .await
            .with_context(|| format!("deleting {d}"))?;
        if removed.is_empty() {
            println!("{d}: nothing to remove");
        }
        for r in removed {
            println!("removed {r}");
        }
    }
    client.close().await?;
    Ok(())
}

async fn doctor(args: DoctorArgs) -> Result<()> {
    let DoctorArgs {
        target,
        destinations,
        json,
    } = args;
    let config = target.load()?;
    let mut findings = courier::doctor::portability(&config);
    findings.extend(courier::doctor::live(&config, &destinations).await);
    if json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        println!(
            "courier doctor: {} backend, {}",
            config.backend.kind(),
            config.guarantee
        );
        let (here, elsewhere): (Vec<_>, Vec<_>) = findings
            .iter()
            .partition(|f| f.backend == config.backend.kind());
        println!("\nthis broker ({}):", config.backend.kind());
        if here.is_empty() {
            println!("  no problems found");
        }
        for f in &here {
            println!("  {f}");
        }
        println!("\nif this config moved to another broker:");
        for f in &elsewhere {
            println!("  {f}");
        }
    }
    let fatal = findings.iter().any(|f| {
        f.backend == config.backend.kind() && f.severity >= courier::doctor::Severity::Warning
    });
    if fatal {
        std::process::exit(3);
    }
    Ok(())
}

async fn outbox_status(args: OutboxStatusArgs) -> Result<()> {
    let OutboxStatusArgs { database_url, json } = args;
    let pool = outbox_pool(&database_url).await?;
    let st = courier::outbox::status(&pool).await?;
    if json {
        let v = serde_json::json!({
            "backlog": st.backlog,
            "lag_seconds": st.oldest_pending.map(|d| d.as_secs_f64()),
            "published": st.published,
            "published_last_minute": st.published_last_minute,
            "failed": st.failed,
            "backlog_by_destination": st.backlog_by_destination,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{st}");
    }
    Ok(())
}

async fn outbox_relay(args: OutboxRelayArgs) -> Result<()> {
    let OutboxRelayArgs {
        target,
        database_url,
        batch_size,
    } = args;
    let config = target.load()?;
    let pool = outbox_pool(&database_url).await?;
    let client: std::sync::Arc<dyn courier::DeliveryClient> =
        std::sync::Arc::from(courier::connect(&config).await?);
    let relay = courier::outbox::Relay::new(pool, client.clone())
        .batch_size(batch_size)
        .spawn()
        .await?;
    eprintln!(
        "courier outbox relay: publishing through {} ({}); Ctrl-C stops",
        config.backend.kind(),
        config.guarantee
    );
    tokio::signal::ctrl_c().await?;
    let stats = relay.shutdown().await?;
    client.close().await?;
    eprintln!(
        "published {} rows",
        stats.published.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

async fn verify(args: VerifyArgs) -> Result<()> {
    let VerifyArgs {
        target,
        messages,
        full,
        consumers,
        faults,
        sabotage,
        timeout,
        json,
        destination,
        in_process,
        keep,
    } = args;
    let config = target.load()?;
    let workers = if in_process {
        verify::Workers::Tasks
    } else {
        verify::Workers::Processes(std::env::current_exe().context(
            "cannot find the courier executable to start consumer processes (use --in-process)",
        )?)
    };
    let plan = verify::Plan {
        messages: if full { 10_000 } else { messages },
        consumers,
        faults,
        sabotage,
        timeout,
        progress: !json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        destination,
        workers,
        keep,
    };
    let report = verify::run(&config, &plan).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    if !report.holds {
        std::process::exit(2);
    }
    Ok(())
}

async fn verify_worker() -> Result<()> {
    verify::worker().await?;
    // Exit here: tokio's stdin read cannot be cancelled, and the runtime's shutdown
    // would wait for it (for the parent's next line, which never comes).
    std::process::exit(0);
}

async fn verify_producer() -> Result<()> {
    verify::producer().await?;
    std::process::exit(0);
}

async fn explain(args: ExplainArgs) -> Result<()> {
    let ExplainArgs { target, json } = args;
    let config = target.load()?;
    let e = courier::explain(&config)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{e}");
    }
    Ok(())
}

async fn send(args: SendArgs) -> Result<()> {
    let SendArgs {
        target,
        to,
        key,
        id,
        headers,
        create,
        count,
        payload,
    } = args;
    let config = target.load()?;
    let payload = match payload {
        Some(p) => p.into_bytes(),
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the payload from stdin")?;
            buf
        }
    };
    let client = courier::connect(&config).await?;
    if create {
        client.create_destination(&to).await?;
    }
    for i in 0..count {
        let mut m = Message::new(payload.clone());
        if let Some(id) = &id {
            m = m.with_id(if count == 1 {
                id.clone()
            } else {
                format!("{id}-{i}")
            });
        }
        if let Some(k) = &key {
            m = m.with_key(k.clone());
        }
        for (k, v) in &headers {
            m = m.with_header(k.clone(), v.clone());
        }
        let r = client.publish(&to, m).await?;
        println!(
            "{}",
            serde_json::json!({"id": r.id.as_str(), "destination": r.destination, "position": r.position.to_string(), "deduplicated": r.deduplicated})
        );
    }
    client.close().await?;
    Ok(())
}

async fn consume(args: ConsumeArgs) -> Result<()> {
    let ConsumeArgs {
        target,
        from,
        group,
        count,
        idle,
        peek,
    } = args;
    let config = target.load()?;
    let client = courier::connect(&config).await?;
    let mut deliveries = client.subscribe(Subscription::new(&from, &group)).await?;
    let mut n = 0usize;
    while count.is_none_or(|c| n < c) {
        let Some(d) = deliveries.next_timeout(idle).await else {
            break;
        };
        let d = d?;
        let m = &d.message;
        println!(
            "{}",
            serde_json::json!({
                "id": m.id.as_str(),
                "key": m.key,
                "headers": m.headers,
                "payload": String::from_utf8_lossy(&m.payload),
                "attempt": d.attempt,
                "position": d.position.to_string(),
            })
        );
        n += 1;
        if !peek {
            d.ack().await?;
        }
    }
    deliveries.close().await?;
    client.close().await?;
    if let Some(c) = count {
        if n < c {
            bail!("only {n} of {c} messages arrived within the idle timeout");
        }
    }
    Ok(())
}
