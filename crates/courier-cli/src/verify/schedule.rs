//! When `verify` injects its faults during a run: the store outage and broker restart at set
//! shares of the messages, connection cuts after the kills, and the consumer kills at their
//! marks.

use super::*;

/// What the store outage switches: the in-process flag, the consumer processes' stores, or (the
/// transactional mode) PostgreSQL itself.
pub(super) struct StoreSwitch {
    pub(super) down: Arc<AtomicBool>,
    pub(super) fleet: Option<Arc<workers::Fleet>>,
    pub(super) pg: Option<Arc<PgLedger>>,
}

/// The store outage (once a third of the messages had their effect) and the broker restart (at
/// half), each when `faults` asks for it.
pub(super) async fn store_and_broker_faults(
    faults: Faults,
    messages: usize,
    expected: Duration,
    ledger: Arc<Ledger>,
    store: StoreSwitch,
    backend: &'static str,
    stop: CancellationToken,
) {
    let until = |share: usize| ledger.reached(messages / share, Instant::now() + expected * 10);
    if let Some(d) = faults.store_outage {
        until(3).await;
        if let Some(pg) = &store.pg {
            pg.outage(Instant::now() + d, &stop).await;
        } else {
            let switch = |down: bool| {
                store.down.store(down, Ordering::SeqCst);
                if let Some(f) = &store.fleet {
                    f.store_switched(down);
                }
            };
            switch(true);
            tokio::select! { _ = stop.cancelled() => {}, _ = tokio::time::sleep(d) => {} }
            switch(false);
        }
    }
    if faults.restart {
        until(2).await;
        restart_broker(backend).await;
    }
}

/// When [`cut_connections`] cuts: the i-th cut at mark `kills + i` of `marks`.
pub(super) struct CutPlan {
    pub(super) cuts: u32,
    pub(super) kills: u32,
    pub(super) marks: u64,
    pub(super) messages: u64,
    /// How long a cut waits for its mark at most.
    pub(super) wait: Duration,
}

/// Connection cuts, after the kills have landed (or were given up: under at-most-once each cut
/// loses every prefetched delivery, and cuts made early on their time bound could leave too
/// little of the run for a kill's mark to be passed with handlers still starting).
pub(super) async fn cut_connections(
    proxy: Arc<crate::proxy::FaultProxy>,
    plan: CutPlan,
    ledger: Arc<Ledger>,
    connections_cut: Arc<AtomicU64>,
    kills_done: CancellationToken,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = kills_done.cancelled() => {}
    }
    for i in 1..=plan.cuts {
        let target = (plan.messages * (u64::from(plan.kills) + u64::from(i)) / plan.marks) as usize;
        // Or sooner, well before the run could end for lack of progress: under at-most-once a
        // cut may lose more messages than are left to the next target.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ledger.reached(target, Instant::now() + plan.wait) => {}
        }
        // Effects keep coming from deliveries buffered before the previous cut while the client
        // is still reconnecting: cut once it is connected again (bounded).
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = proxy.connected(Duration::from_secs(10)) => {}
        }
        let dropped = proxy.cut();
        tracing::info!(cut = i, connections = dropped, "verify: connections cut");
        connections_cut.fetch_add(dropped, Ordering::Relaxed);
    }
}

/// When and how often [`kill_consumers`] crashes a consumer.
pub(super) struct Kills {
    /// Crashes to inject.
    pub(super) count: u32,
    /// The i-th crash lands when i/`span` of the messages reached a handler.
    pub(super) span: u64,
    /// Messages of the run.
    pub(super) messages: u64,
    /// How long without progress ends the run (a kill waits at most about that long).
    pub(super) stall: Duration,
    /// The run's upper bound.
    pub(super) timeout: Duration,
}

/// Crash consumers while the run is in full swing, the i-th kill at mark i. Arm at the mark:
/// the first handler to start once that many ids reached a handler parks mid-way, and its
/// consumer is crashed there. The next kill is armed as soon as one has parked, before its
/// consumer is torn down and replaced: a fast run can pass the next mark meanwhile (a
/// replacement subscribing on a busy machine took longer than the rest of a 500-message run).
/// Consumers that settle a delivery before its handler (at-most-once, or the ack-first
/// sabotage) lose with each crash everything the victim held — a third of what was left, or
/// more — so their kills are spread over the first half of the run: a later mark would be out
/// of reach, with no handler left to take the kill (the at-most-once `kill` cells of the chaos matrix,
/// `integration/tests/chaos.rs`).
pub(super) async fn kill_consumers(
    consumers: &mut Vec<Running>,
    spawner: &Spawner,
    kill: &KillSwitch,
    ledger: &Ledger,
    fleet: Option<&workers::Fleet>,
    plan: Kills,
) -> courier::Result<u32> {
    let Kills {
        count: kills,
        span,
        messages,
        stall,
        timeout,
    } = plan;
    let target_of = |i: u32| messages * u64::from(i) / span;
    let mut crashes = 0;
    let mut parked = Box::pin(kill.parked.notified());
    parked.as_mut().enable();
    if kills > 0 {
        kill.arm(target_of(1));
    }
    for i in 1..=kills {
        if consumers.is_empty() {
            break;
        }
        let target = target_of(i);
        let mut hit = tokio::select! {
            _ = parked.as_mut() => true,
            // A mark out of reach (effects stopped) does not hold the kill until the deadline.
            _ = ledger.reached_or_idle(
                target as usize,
                Progress::Invocations,
                Some(stall / 2),
                Instant::now() + timeout,
            ) => false,
        };
        if !hit {
            // Mark reached or out of reach: the next handler to start takes it. Handlers can
            // pause for a while — a Kafka group rebalancing after the previous kill, a client
            // reconnecting after a cut — but resume within the stall window; with nothing in
            // flight anywhere for that long (at least 5 s) the kill is skipped, and the report
            // says the fault was not injected.
            if kill
                .armed_at
                .compare_exchange(target, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                kill.rearmed.notify_waiters();
            }
            let window = stall.max(Duration::from_secs(5));
            hit = match tokio::time::timeout(window, parked.as_mut()).await {
                Ok(()) => true,
                // Still armed: nobody took it. Taken just now: its handler is about to notify.
                Err(_) if kill.armed_at.swap(DISARMED, Ordering::SeqCst) != DISARMED => {
                    if let Some(f) = fleet {
                        f.disarm();
                    }
                    false
                }
                Err(_) => tokio::time::timeout(Duration::from_secs(5), parked.as_mut())
                    .await
                    .is_ok(),
            };
        }
        let victim = kill.victim.load(Ordering::SeqCst);
        let parked_on = consumers.iter().position(|c| c.id() == victim);
        if hit {
            kill.doomed.store(victim, Ordering::SeqCst);
        }
        parked = Box::pin(kill.parked.notified());
        parked.as_mut().enable();
        if i < kills {
            kill.arm(target_of(i + 1));
        }
        if let (true, Some(i)) = (hit, parked_on) {
            let crashed = consumers.remove(i);
            let slot = crashed.slot();
            crashed.crash().await;
            crashes += 1;
            // The replacement subscribes while other faults (a connection cut) may be under
            // way: retry a transient failure, as a restarting service would.
            let mut backoff = Duration::from_millis(100);
            let until = Instant::now() + Duration::from_secs(60);
            let fresh = loop {
                match spawner.spawn(slot).await {
                    Ok(c) => break c,
                    Err(e) if e.is_retryable() && Instant::now() < until => {
                        tracing::warn!(error = %e, "verify: starting a replacement consumer failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => return Err(e),
                }
            };
            consumers.push(fresh);
        }
    }
    Ok(crashes)
}

/// The fault tasks of a run beside the kills: the store-outage and broker-restart driver, the
/// connection cutter, and the relay of kill notices from consumer processes.
pub(super) struct FaultTasks {
    /// Kills and cuts share one schedule of this many evenly spaced marks, kills first.
    pub(super) marks: u64,
    stop: CancellationToken,
    kills_done: Option<tokio_util::sync::DropGuard>,
    driver: tokio::task::JoinHandle<()>,
    cutter: Option<tokio::task::JoinHandle<()>>,
    relay: Option<tokio::task::JoinHandle<()>>,
    connections_cut: Arc<AtomicU64>,
}

impl FaultTasks {
    /// Start them for the run `x` of `plan`; `expected` is how long the run should take without
    /// faults, `stall` how long without an effect ends it.
    pub(super) fn start(x: &Experiment, plan: &Plan, expected: Duration, stall: Duration) -> Self {
        let stop = CancellationToken::new();
        let (kills, cuts) = (plan.faults.kill, plan.faults.cut);
        let relay = x
            .fleet
            .clone()
            .map(|f| tokio::spawn(f.relay_kills(stop.clone())));
        let driver = tokio::spawn(store_and_broker_faults(
            plan.faults.clone(),
            plan.messages,
            expected,
            x.ledger.clone(),
            StoreSwitch {
                down: x.store_down.clone(),
                fleet: x.fleet.clone(),
                pg: x.pg.clone(),
            },
            x.client.backend(),
            stop.clone(),
        ));
        // The i-th kill when i/(kills+cuts+1) of the messages reached a handler (half that for
        // consumers that settle first), then the cuts. Under at-most-once a cut loses everything
        // a consumer had buffered, so a kill placed after the cuts could wait for a mark the run
        // never reaches (the at-most-once `kill` and `cut` cells of the chaos matrix,
        // `integration/tests/chaos.rs`).
        let marks = u64::from(kills) + u64::from(cuts) + 1;
        // Connection cuts, the i-th at mark kills+i, once the kills have landed (or were given
        // up): under at-most-once each cut loses every prefetched delivery, and cuts made early
        // on their time bound could leave too little of the run for a kill's mark to be passed
        // with handlers still starting.
        let kills_done = CancellationToken::new();
        let connections_cut = Arc::new(AtomicU64::new(0));
        let cutter = x.proxy.clone().map(|proxy| {
            tokio::spawn(cut_connections(
                proxy,
                CutPlan {
                    cuts,
                    kills,
                    marks,
                    messages: plan.messages as u64,
                    wait: (expected * 10).min(stall / 2),
                },
                x.ledger.clone(),
                connections_cut.clone(),
                kills_done.clone(),
                stop.clone(),
            ))
        });
        FaultTasks {
            marks,
            stop,
            kills_done: Some(kills_done.drop_guard()),
            driver,
            cutter,
            relay,
            connections_cut,
        }
    }

    /// The kills are done (or were given up): the cuts may go ahead.
    pub(super) fn kills_landed(&mut self) {
        self.kills_done.take();
    }

    /// Stop every fault task and wait for it; how many connections were cut.
    pub(super) async fn stop(mut self) -> u64 {
        self.kills_done.take();
        self.stop.cancel();
        let _ = self.driver.await;
        if let Some(cutter) = self.cutter {
            let _ = cutter.await;
        }
        if let Some(relay) = self.relay {
            let _ = relay.await;
        }
        self.connections_cut.load(Ordering::Relaxed)
    }
}
