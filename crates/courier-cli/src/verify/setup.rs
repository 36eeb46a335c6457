//! A run's set-up: its destinations and consumer group, the ledger, the idempotency store (or
//! the transactional mode's PostgreSQL ledger), the sabotaged clients, the consumer fleet and the
//! spawner that starts (and restarts) its consumers.

use super::*;

/// What a run sets up before anything is published.
pub(super) struct Experiment {
    /// The publishing side's client (through the fault proxy when the run cuts connections).
    pub(super) client: Arc<dyn DeliveryClient>,
    pub(super) proxy: Option<Arc<crate::proxy::FaultProxy>>,
    pub(super) dest: String,
    pub(super) ledger: Arc<Ledger>,
    /// Set while the store-outage fault holds the idempotency store down.
    pub(super) store_down: Arc<AtomicBool>,
    pub(super) pg: Option<Arc<PgLedger>>,
    /// The in-process consumers' idempotent-layer counters.
    pub(super) absorbed: Arc<Mutex<Vec<Arc<courier::idempotency::IdempotencyStats>>>>,
    pub(super) kill: Arc<KillSwitch>,
    /// Consumer processes (none for the memory broker, which lives in this process).
    pub(super) fleet: Option<Arc<workers::Fleet>>,
    pub(super) spawner: Spawner,
    /// The producer process's configuration, secrets included (it goes over its stdin).
    pub(super) producer_toml: String,
}

impl Experiment {
    /// Start publishing: a process of its own next to the consumer processes, else a task here.
    /// Resolves to how many messages were published.
    pub(super) async fn start_producer(
        &self,
        plan: &Plan,
    ) -> Result<tokio::task::JoinHandle<Result<u64>>> {
        Ok(match &plan.workers {
            Workers::Processes(exe) if self.fleet.is_some() => {
                let spec = workers::ProducerSpec {
                    config: self.producer_toml.clone(),
                    dest: self.dest.clone(),
                    messages: plan.messages as u64,
                    duplicates: plan.faults.duplicates,
                };
                workers::spawn_producer(exe, &spec, self.ledger.clone(), self.client.backend())
                    .await?
            }
            _ => {
                let client = self.client.clone();
                let ledger = self.ledger.clone();
                let dest = self.dest.clone();
                let (n, dup) = (plan.messages as u64, plan.faults.duplicates);
                tokio::spawn(async move {
                    Ok(publish_all(&*client, &dest, n, dup, |id| ledger.sent(id)).await)
                })
            }
        })
    }

    /// Duplicates the idempotent layers absorbed, in this process and in the consumer processes.
    pub(super) fn absorbed(&self) -> u64 {
        self.absorbed
            .lock()
            .iter()
            .map(|s| s.duplicates_absorbed.load(Ordering::Relaxed))
            .sum::<u64>()
            + self.fleet.as_ref().map_or(0, |f| f.absorbed())
    }
}

/// Set up a run of `plan` on the broker of `config`.
pub(super) async fn set_up(config: &Config, plan: &Plan) -> Result<Experiment> {
    // With cuts, every connection of the run goes through the fault proxy.
    let (proxied, proxy) = if plan.faults.cut > 0 {
        let (c, p) = through_proxy(config).await?;
        (c, Some(Arc::new(p)))
    } else {
        (config.clone(), None)
    };
    let config = &proxied;
    let client: Arc<dyn DeliveryClient> = courier::connect(config).await?.into();
    let suffix = uuid_suffix();
    let (dest, dlq) = match &plan.destination {
        Some(name) => (name.clone(), format!("{name}-dlq")),
        None => (format!("verify-{suffix}"), format!("verify-{suffix}-dlq")),
    };
    // A group of its own: joining a group other runs' (possibly crashed) members are still in
    // would make every start wait out their session timeouts.
    let group = format!("verify-{suffix}");
    tracing::info!(destination = %dest, group = %group, "verify: the run's destination and consumer group");
    if plan.destination.is_none() {
        client.create_destination(&dest).await?;
        client.create_destination(&dlq).await?;
    }
    let ledger = Arc::new(Ledger::default());
    let store_down = Arc::new(AtomicBool::new(false));
    let section = config.idempotency.clone().unwrap_or_default();
    let (pg, store) = idempotency(config, plan, &suffix, &store_down).await?;
    let absorbed = Arc::new(Mutex::new(
        Vec::<Arc<courier::idempotency::IdempotencyStats>>::new(),
    ));
    let kill = Arc::new(KillSwitch::default());

    let (client, consumer_client) = sabotaged(config, plan, client).await?;
    // Consumer processes (not for the memory broker, which lives in this process).
    let fleet = match &plan.workers {
        Workers::Processes(exe) if !config.backend.traits().in_process => {
            if store.as_ref().is_some_and(|s| s.name() == "memory") {
                bail!("exactly-once with the in-process idempotency store cannot be checked with consumer processes (each would dedup on its own): set [idempotency] store to a redis:// or postgres:// URL, or run the consumers in-process (--in-process)");
            }
            Some(Arc::new(workers::Fleet::new(
                exe.clone(),
                ledger.clone(),
                kill.clone(),
                store_down.clone(),
                client.backend(),
            )))
        }
        _ => None,
    };
    // What consumer processes are told: the consumer side's configuration (the sabotage's
    // guarantee), secrets included — it goes over their stdin.
    let consumer_toml = match plan.sabotage {
        Some(Sabotage::AckFirst) => config.clone().with_guarantee(Guarantee::AtMostOnce),
        Some(Sabotage::NoDedup) => config.clone().with_guarantee(Guarantee::AtLeastOnce),
        None => config.clone(),
    }
    .to_toml_with_secrets()?;
    // The producer process's: the publishing side's configuration (at-least-once under the
    // no-dedup sabotage, as `client` above).
    let producer_toml = match plan.sabotage {
        Some(Sabotage::NoDedup) => config.clone().with_guarantee(Guarantee::AtLeastOnce),
        Some(Sabotage::AckFirst) | None => config.clone(),
    }
    .to_toml_with_secrets()?;
    // Short, so a crashed consumer's message is retried soon; longer than a store outage plus
    // the complete retries after it, so a live worker's lease does not lapse meanwhile.
    let lease = section.lease.unwrap_or(Duration::from_secs(5));
    let spawner = Spawner {
        client: consumer_client.clone(),
        ledger: ledger.clone(),
        store: store.clone(),
        pg: pg.clone(),
        absorbed: absorbed.clone(),
        dest: dest.clone(),
        dlq: dlq.clone(),
        group: group.clone(),
        error_rate: plan.faults.errors,
        run: suffix.clone(),
        kill: kill.clone(),
        fleet: fleet.clone(),
        config: Config::from_toml_str(&consumer_toml)?,
        consumer_toml: consumer_toml.clone(),
        lease,
        ids: AtomicU64::new(0),
    };
    Ok(Experiment {
        client,
        proxy,
        dest,
        ledger,
        store_down,
        pg,
        absorbed,
        kill,
        fleet,
        spawner,
        producer_toml,
    })
}

/// A consumer of the run.
pub(super) enum Running {
    Task {
        handle: ConsumerHandle,
        id: u64,
        slot: usize,
    },
    Proc(workers::Proc),
}

impl Running {
    pub(super) fn id(&self) -> u64 {
        match self {
            Running::Task { id, .. } => *id,
            Running::Proc(p) => p.id,
        }
    }

    /// Its place in the fleet: a replacement takes the crashed consumer's slot (and, on Kafka,
    /// its transactional id).
    pub(super) fn slot(&self) -> usize {
        match self {
            Running::Task { slot, .. } => *slot,
            Running::Proc(p) => p.slot,
        }
    }

    /// Crash it mid-handler: abort the task, or `SIGKILL` the process.
    pub(super) async fn crash(self) {
        match self {
            Running::Task { handle, .. } => handle.abort(),
            Running::Proc(p) => p.kill().await,
        }
    }

    /// Stop it gracefully; how many messages it dead-lettered.
    pub(super) async fn shutdown(self) -> Result<u64> {
        Ok(match self {
            Running::Task { handle, .. } => handle.shutdown().await?.dead_lettered,
            Running::Proc(p) => p.shutdown(Duration::from_secs(30)).await?,
        })
    }
}

/// The experiment's consumer: the consume loop tuned for a short run (in the verify process and
/// in consumer processes alike), over the stack `config` asks for — `layer` says which
/// idempotent layer the run uses instead of the configuration's.
pub(super) fn consumer_for(
    config: &Config,
    client: Arc<dyn DeliveryClient>,
    dest: &str,
    group: &str,
    dlq: &str,
    layer: Option<(Arc<dyn IdempotencyStore>, Duration)>,
) -> ConsumerBuilder {
    let builder = ConsumerBuilder::new(
        config,
        client,
        Subscription::new(dest, group).dead_letter(dlq),
    )
    .consumer(|c| {
        c.concurrency(4)
            .retry(
                RetryPolicy::attempts(8)
                    .backoff(Duration::from_millis(10), Duration::from_millis(500)),
            )
            .shutdown_timeout(Duration::from_secs(10))
    });
    match layer {
        // The idempotent layer over a store outside the effect's transaction (Redis,
        // in-process): keys per destination, a short store retry.
        Some((store, lease)) => builder
            .idempotency_store(store)
            .namespace(dest)
            .lease(lease)
            .store_retry_delay(Duration::from_millis(200)),
        None => builder.without_idempotency(),
    }
}

/// The run's idempotency: the transactional mode's PostgreSQL ledger, or the store of the
/// layer (wrapped so the outage fault can take it down), or neither.
async fn idempotency(
    config: &Config,
    plan: &Plan,
    suffix: &str,
    store_down: &Arc<AtomicBool>,
) -> Result<(Option<Arc<PgLedger>>, Option<Arc<dyn IdempotencyStore>>)> {
    let section = config.idempotency.clone().unwrap_or_default();
    // The facade's rule (at-most-once with a section needs the layer to skip an id published
    // twice across consumer processes; the consumer's own window covers one process).
    let use_layer =
        ConsumerBuilder::wants_idempotency(config) && plan.sabotage != Some(Sabotage::NoDedup);
    let url = section.store.expose();
    let transactional =
        use_layer && (url.starts_with("postgres://") || url.starts_with("postgresql://"));
    if transactional && section.on_store_error == StoreFailurePolicy::FailOpen {
        return Err(courier::Error::config(
            "idempotency.on_store_error = \"fail-open\" is not honoured with a postgres:// store: verify runs the transactional mode, where the effect and its key commit in one PostgreSQL transaction, so an unreachable database can only defer; remove on_store_error (fail-closed) or use a redis:// store",
        )
        .into());
    }
    let pg = if transactional {
        Some(Arc::new(PgLedger::connect(url, suffix).await?))
    } else {
        None
    };
    // The store of the non-transactional layer; none without the layer (an at-least-once run
    // does not need Redis to be up).
    let store = if use_layer && pg.is_none() {
        Some(Arc::new(Flaky {
            inner: courier::idempotency_store(&section).await?,
            down: store_down.clone(),
        }) as Arc<dyn IdempotencyStore>)
    } else {
        None
    };
    Ok((pg, store))
}

/// The publishing and consuming clients. Sabotage: ack-first = an at-most-once consumer posing
/// as the configured guarantee; no-dedup = at-least-once everywhere (no broker dedup, no
/// idempotent layer) posing as exactly-once.
async fn sabotaged(
    config: &Config,
    plan: &Plan,
    client: Arc<dyn DeliveryClient>,
) -> Result<(Arc<dyn DeliveryClient>, Arc<dyn DeliveryClient>)> {
    Ok(match plan.sabotage {
        Some(Sabotage::AckFirst) => (
            client,
            courier::connect(&config.clone().with_guarantee(Guarantee::AtMostOnce))
                .await?
                .into(),
        ),
        Some(Sabotage::NoDedup) => {
            let alo: Arc<dyn DeliveryClient> =
                courier::connect(&config.clone().with_guarantee(Guarantee::AtLeastOnce))
                    .await?
                    .into();
            (alo.clone(), alo)
        }
        None => (client.clone(), client),
    })
}

/// Starts the run's consumers: a process of the fleet, or a task of this process running the
/// run's idempotent layer (if any) over the experiment's handler.
pub(super) struct Spawner {
    client: Arc<dyn DeliveryClient>,
    ledger: Arc<Ledger>,
    store: Option<Arc<dyn IdempotencyStore>>,
    pg: Option<Arc<PgLedger>>,
    absorbed: Arc<Mutex<Vec<Arc<courier::idempotency::IdempotencyStats>>>>,
    dest: String,
    dlq: String,
    group: String,
    error_rate: f64,
    run: String,
    kill: Arc<KillSwitch>,
    fleet: Option<Arc<workers::Fleet>>,
    /// The consumer side's configuration, for consumer processes.
    consumer_toml: String,
    /// The consumer side's configuration (`consumer_toml`, parsed).
    config: Config,
    lease: Duration,
    ids: AtomicU64,
}

impl Spawner {
    /// A new consumer in `slot` (a replacement takes the slot of the one it replaces).
    pub(super) async fn spawn(&self, slot: usize) -> courier::Result<Running> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        if let Some(fleet) = &self.fleet {
            let layer = match (&self.pg, &self.store) {
                (Some(_), _) => workers::Layer::Transactional,
                (None, Some(_)) => workers::Layer::Store {
                    lease_ms: self.lease.as_millis() as u64,
                },
                (None, None) => workers::Layer::None,
            };
            let spec = workers::WorkerSpec {
                config: self.consumer_toml.clone(),
                consumer: id,
                slot,
                dest: self.dest.clone(),
                dlq: self.dlq.clone(),
                group: self.group.clone(),
                run: self.run.clone(),
                error_rate: self.error_rate,
                layer,
            };
            return fleet.spawn(&spec).await.map(Running::Proc);
        }
        let work = Work {
            sink: Sink::Local {
                ledger: self.ledger.clone(),
                kill: self.kill.clone(),
            },
            error_rate: self.error_rate,
            consumer: id,
            run: self.run.clone(),
        };
        let consumer = |layer| {
            consumer_for(
                &self.config,
                self.client.clone(),
                &self.dest,
                &self.group,
                &self.dlq,
                layer,
            )
        };
        let handle = match (&self.pg, &self.store) {
            (Some(pg), _) => {
                let layer =
                    TransactionalIdempotent::new(work, &pg.store).namespace(self.dest.clone());
                self.absorbed.lock().push(layer.stats());
                consumer(None).spawn(layer).await?
            }
            (None, Some(store)) => {
                let (handle, stats) = consumer(Some((store.clone(), self.lease)))
                    .spawn_counted(work)
                    .await?;
                self.absorbed.lock().extend(stats);
                handle
            }
            (None, None) => consumer(None).spawn(work).await?,
        };
        Ok(Running::Task { handle, id, slot })
    }
}
