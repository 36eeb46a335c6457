//! Offset tracking per partition: what was received, what is settled, and the watermark that
//! may be committed — never past an unprocessed message.

use super::*;

/// What an exactly-once settle leaves for the next transaction.
pub(super) struct Pending {
    pub(super) outs: Vec<Out>,
    pub(super) after: AfterCommit,
}

pub(super) enum Slot {
    /// Received, not settled yet.
    Handling,
    /// Settled: at-least-once/at-most-once done; exactly-once waiting for a transaction.
    Settled(Option<Pending>),
    /// In the transaction being committed.
    Committing,
}

#[derive(Default)]
pub(super) struct Part {
    /// Bumped when the partition is revoked or rewound: settles of deliveries received before
    /// are stale and refused.
    pub(super) epoch: u64,
    /// Where a rewind goes: the first offset received since the partition was assigned, then
    /// each committed watermark.
    pub(super) base: Option<i64>,
    /// Offsets received and not yet committed, in order.
    pub(super) inflight: BTreeMap<i64, Slot>,
}

/// One exactly-once transaction's worth of settled inputs.
#[derive(Default)]
pub(super) struct Batch {
    /// (partition, epoch, offset, what its settle left), in offset order per partition.
    pub(super) items: Vec<(i32, u64, i64, Pending)>,
    /// (partition, epoch, watermark) committed with the outputs.
    pub(super) offsets: Vec<(i32, u64, i64)>,
}

/// Per-partition state shared by the receive task, the settles and the rebalance callback.
pub(crate) struct Tracker {
    pub(super) parts: Mutex<HashMap<i32, Part>>,
    /// At-most-once: the last watermark per partition whose commit the broker confirmed.
    pub(super) committed: Mutex<HashMap<i32, i64>>,
    /// At-most-once: one commit at a time, each confirmed before the next is sent (see
    /// `KafkaSettle::commit_sync`).
    pub(super) amo_commits: tokio::sync::Mutex<()>,
    /// At-least-once: the last stored watermark per partition (committed explicitly on close).
    pub(super) stored: Mutex<HashMap<i32, i64>>,
    /// Exactly-once: settled inputs waiting for a transaction.
    pub(super) waiting: std::sync::atomic::AtomicUsize,
    /// Woken when `max_inputs` settled inputs wait, so a full batch commits before the interval
    /// ends.
    pub(super) settled: Notify,
    pub(super) max_inputs: usize,
}

/// The watermark after the leading settled offsets of `part` (removing them), if any.
pub(super) fn pop_settled(part: &mut Part) -> Option<i64> {
    let mut wm = None;
    while let Some(entry) = part.inflight.first_entry() {
        if !matches!(entry.get(), Slot::Settled(_)) {
            break;
        }
        let off = *entry.key();
        entry.remove();
        wm = Some(off + 1);
    }
    if wm.is_some() {
        part.base = wm;
    }
    wm
}

impl Tracker {
    pub(super) fn new(max_inputs: usize) -> Self {
        Tracker {
            parts: Mutex::default(),
            committed: Mutex::default(),
            amo_commits: tokio::sync::Mutex::new(()),
            stored: Mutex::default(),
            waiting: Default::default(),
            settled: Notify::new(),
            max_inputs: max_inputs.max(1),
        }
    }

    /// Track a received offset; returns the partition's epoch to settle it under.
    pub(super) fn received(&self, p: i32, o: i64) -> u64 {
        let mut parts = self.parts.lock();
        let part = parts.entry(p).or_default();
        part.base.get_or_insert(o);
        part.inflight.insert(o, Slot::Handling);
        part.epoch
    }

    pub(super) fn epoch(&self, p: i32) -> u64 {
        self.parts.lock().get(&p).map(|x| x.epoch).unwrap_or(0)
    }

    /// At-least-once / at-most-once: mark `o` done; returns the new watermark when it advanced.
    pub(super) fn done(&self, p: i32, epoch: u64, o: i64) -> Option<i64> {
        let mut parts = self.parts.lock();
        let part = parts.get_mut(&p).filter(|x| x.epoch == epoch)?;
        if let Some(slot) = part.inflight.get_mut(&o) {
            *slot = Slot::Settled(None);
        }
        pop_settled(part)
    }

    /// Exactly-once: leave `pending` for the next transaction. Gives it back when the
    /// delivery is stale (its partition was revoked or rewound since it was received).
    pub(super) fn settle(
        &self,
        p: i32,
        epoch: u64,
        o: i64,
        pending: Pending,
    ) -> std::result::Result<(), Pending> {
        let mut parts = self.parts.lock();
        let Some(slot) = parts
            .get_mut(&p)
            .filter(|x| x.epoch == epoch)
            .and_then(|x| x.inflight.get_mut(&o))
            .filter(|s| matches!(s, Slot::Handling))
        else {
            return Err(pending);
        };
        *slot = Slot::Settled(Some(pending));
        drop(parts);
        let waiting = self
            .waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if waiting == self.max_inputs {
            self.settled.notify_one();
        }
        Ok(())
    }

    pub(super) fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Exactly-once: the settled inputs whose predecessors in their partition are all settled,
    /// marked as committing.
    pub(super) fn take_ready(&self) -> Batch {
        let mut batch = Batch::default();
        let mut parts = self.parts.lock();
        for (&p, part) in parts.iter_mut() {
            let mut wm = None;
            for (&o, slot) in part.inflight.iter_mut() {
                match std::mem::replace(slot, Slot::Committing) {
                    Slot::Settled(pending) => {
                        batch.items.push((
                            p,
                            part.epoch,
                            o,
                            pending.unwrap_or_else(|| Pending {
                                outs: Vec::new(),
                                after: AfterCommit::default(),
                            }),
                        ));
                        wm = Some(o + 1);
                    }
                    other => {
                        *slot = other;
                        break;
                    }
                }
            }
            if let Some(wm) = wm {
                batch.offsets.push((p, part.epoch, wm));
            }
        }
        self.waiting
            .fetch_sub(batch.items.len(), std::sync::atomic::Ordering::Relaxed);
        batch
    }

    /// Exactly-once: the transaction holding `offsets` committed.
    pub(super) fn committed_batch(&self, offsets: &[(i32, u64, i64)]) {
        let mut parts = self.parts.lock();
        for &(p, epoch, wm) in offsets {
            if let Some(part) = parts.get_mut(&p).filter(|x| x.epoch == epoch) {
                part.inflight.retain(|&o, _| o >= wm);
                part.base = Some(wm);
            }
        }
    }

    /// Forget everything received from `p` (it will be read again from `base`): returns `base`
    /// and what was waiting for a transaction (to be told it never committed).
    pub(super) fn rewind(&self, p: i32, epoch: u64) -> (Option<i64>, Vec<AfterCommit>) {
        let mut parts = self.parts.lock();
        let Some(part) = parts.get_mut(&p).filter(|x| x.epoch == epoch) else {
            return (None, Vec::new());
        };
        part.epoch += 1;
        let dropped = self.drain(part);
        (part.base, dropped)
    }

    pub(super) fn drain(&self, part: &mut Part) -> Vec<AfterCommit> {
        let mut hooks = Vec::new();
        for (_, slot) in std::mem::take(&mut part.inflight) {
            if let Slot::Settled(Some(pending)) = slot {
                self.waiting
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                hooks.push(pending.after);
            }
        }
        hooks
    }

    /// The partition moved to another consumer: nothing received from it may settle any more.
    pub(super) fn revoke(&self, p: i32) -> Vec<AfterCommit> {
        let hooks = {
            let mut parts = self.parts.lock();
            let part = parts.entry(p).or_default();
            part.epoch += 1;
            part.base = None;
            self.drain(part)
        };
        self.committed.lock().remove(&p);
        self.stored.lock().remove(&p);
        hooks
    }

    /// At-most-once: whether a confirmed commit already covers `wm`.
    pub(super) fn covered(&self, p: i32, wm: i64) -> bool {
        self.committed.lock().get(&p).is_some_and(|&c| c >= wm)
    }

    /// At-most-once: the broker confirmed the commit of `wm`.
    pub(super) fn confirmed(&self, p: i32, wm: i64) {
        let mut c = self.committed.lock();
        let cur = c.entry(p).or_insert(i64::MIN);
        *cur = (*cur).max(wm);
    }
}
