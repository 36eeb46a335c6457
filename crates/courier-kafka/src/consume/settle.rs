//! Settling a Kafka delivery under each guarantee: commit first (at-most-once), store the
//! offset (at-least-once), or leave the outputs and offset for the next transaction
//! (exactly-once); nack re-publishes with the next attempt, dead-letter publishes to the
//! dead-letter topic.

use super::*;

pub(super) struct KafkaSettle {
    pub(super) sub: Arc<Sub>,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) epoch: u64,
    pub(super) attempt: u32,
    pub(super) message: Message,
}

impl KafkaSettle {
    /// At-most-once: commit `wm` and return once the broker confirmed it (or a confirmed commit
    /// already covers it). Commits go one at a time: two lanes committing at once could reach
    /// the broker out of order (a later, lower commit rewinds the group), and a lane whose
    /// offset was covered by a commit still in flight would run its handler before anything was
    /// stored — either way a consumer killed then has its successor handle the same message
    /// again. Guarded by `crash_suite!`'s `sigkilled_consumers_at_most_once_never_handle_twice`
    /// (tests/conformance.rs, `broker`).
    pub(super) async fn commit_sync(&self, wm: i64) -> Result<()> {
        let tracker = &self.sub.tracker;
        let _one = tracker.amo_commits.lock().await;
        if tracker.covered(self.partition, wm) {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.sub.topic, self.partition, Offset::Offset(wm))
            .map_err(|e| kafka_err("offsets", e))?;
        let c = self.sub.consumer.clone();
        blocking(move || c.commit(&tpl, CommitMode::Sync))
            .await?
            .map_err(|e| kafka_err("commit", e))?;
        tracker.confirmed(self.partition, wm);
        Ok(())
    }

    /// An at-least-once output could not be published: the input goes round again (the Kafka
    /// nack: re-published with the next attempt number, a second later) and its after-commit
    /// steps learn that nothing was committed — what the consume loop does when its own publish
    /// of an output fails (`tests/offsets.rs::an_output_that_cannot_be_published_sends_its_input_round_again`).
    pub(super) async fn handle_again(self: Box<Self>, e: &Error, after: AfterCommit) {
        warn!(error = %e, partition = self.partition, offset = self.offset, "publishing a handler output failed; retrying the input");
        if let Err(e) = self.nack(Duration::from_secs(1)).await {
            warn!(error = %e, "re-publishing the input failed; it is read again after a restart or rebalance");
        }
        after.run(false).await;
    }

    pub(super) async fn mark_done(&self) -> Result<()> {
        let tracker = &self.sub.tracker;
        match self.sub.inner.guarantee {
            Guarantee::AtMostOnce => {
                // Commit this message's position before its handler runs (monotonic).
                tracker.done(self.partition, self.epoch, self.offset);
                self.commit_sync(self.offset + 1).await
            }
            Guarantee::AtLeastOnce | Guarantee::ExactlyOnce => {
                if let Some(wm) = tracker.done(self.partition, self.epoch, self.offset) {
                    tracker.stored.lock().insert(self.partition, wm);
                    // rd_kafka_offset_store takes the last processed offset and stores it + 1.
                    if let Err(e) =
                        self.sub
                            .consumer
                            .store_offset(&self.sub.topic, self.partition, wm - 1)
                    {
                        // The partition moved to another consumer: it will process from the last commit.
                        debug!(error = %e, "store_offset after revoke");
                    }
                }
                Ok(())
            }
        }
    }

    /// Settle with `outs`: under exactly-once they go into the next transaction with this
    /// input's offset (returns at once; `after` runs when that transaction ended), otherwise
    /// they are produced (confirmed) before the input is marked done.
    pub(super) async fn settle_with(self, outs: Vec<Out>, after: AfterCommit) -> Result<()> {
        let inner = &self.sub.inner;
        if inner.guarantee == Guarantee::ExactlyOnce {
            let pending = Pending { outs, after };
            return match self
                .sub
                .tracker
                .settle(self.partition, self.epoch, self.offset, pending)
            {
                Ok(()) => Ok(()),
                Err(pending) => {
                    pending.after.run(false).await;
                    Err(Error::broker(
                        crate::BACKEND,
                        "settle",
                        true,
                        format!(
                            "partition {} was revoked or rewound since offset {} was received; it is delivered again",
                            self.partition, self.offset
                        ),
                    ))
                }
            };
        }
        for o in &outs {
            ensure_output_topic(inner, &o.topic).await?;
            inner
                .produce(&o.topic, &o.message, o.attempt, o.not_before)
                .await?;
        }
        let r = self.mark_done().await;
        after.run(r.is_ok()).await;
        r
    }
}

#[async_trait]
impl Settle for KafkaSettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        if self.sub.inner.guarantee == Guarantee::ExactlyOnce {
            return self.settle_with(Vec::new(), AfterCommit::default()).await;
        }
        self.mark_done().await
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        if self.sub.inner.guarantee == Guarantee::AtMostOnce {
            return Ok(());
        }
        // No per-message nack in Kafka: re-publish with the next attempt number and a not-before
        // time, then settle the original.
        let out = Out {
            topic: self.sub.topic.clone(),
            message: self.message.clone(),
            attempt: Some(self.attempt + 1),
            not_before: Some(now_ms() + delay.as_millis() as u64),
        };
        self.settle_with(vec![out], AfterCommit::default()).await
    }

    /// Re-published with the *same* attempt number: a deferral does not spend the retry budget
    /// (`tests/conformance.rs`, scenario `deferrals_never_dead_letter`).
    async fn defer(self: Box<Self>, delay: Duration) -> Result<()> {
        if self.sub.inner.guarantee == Guarantee::AtMostOnce {
            return Ok(());
        }
        let out = Out {
            topic: self.sub.topic.clone(),
            message: self.message.clone(),
            attempt: Some(self.attempt),
            not_before: Some(now_ms() + delay.as_millis() as u64),
        };
        self.settle_with(vec![out], AfterCommit::default()).await
    }

    async fn dead_letter(self: Box<Self>, message: &Message, why: DeadLetter) -> Result<()> {
        let m = why.stamp(message, &self.sub.topic);
        let out = Out {
            topic: self.sub.dlq.clone(),
            message: m,
            attempt: None,
            not_before: None,
        };
        self.settle_with(vec![out], AfterCommit::default()).await
    }

    fn atomic_outputs(&self) -> bool {
        self.sub.inner.guarantee == Guarantee::ExactlyOnce
    }

    fn publishes_outputs(&self) -> bool {
        self.sub.inner.guarantee != Guarantee::AtMostOnce
    }

    /// Exactly-once: into the next transaction. At-least-once: the outputs are enqueued now, in
    /// the handler's order, and the input is marked done once every one is confirmed — in the
    /// background, so the lane moves on (guarded by the conformance suite's output scenarios
    /// and `benches/kafka.rs`). An output that fails sends the input round again.
    async fn ack_with_outputs(
        self: Box<Self>,
        outputs: Vec<Outgoing>,
        after: AfterCommit,
    ) -> Result<()> {
        let outs: Vec<Out> = outputs
            .into_iter()
            .map(|o| Out {
                topic: o.destination,
                message: o.message,
                attempt: None,
                not_before: None,
            })
            .collect();
        if self.sub.inner.guarantee == Guarantee::ExactlyOnce {
            return self.settle_with(outs, after).await;
        }
        let inner = self.sub.inner.clone();
        let enqueued = async {
            for o in &outs {
                ensure_output_topic(&inner, &o.topic).await?;
            }
            inner
                .enqueue_all(
                    outs.iter()
                        .map(|o| (o.topic.as_str(), &o.message, o.attempt, o.not_before)),
                )
                .await
        }
        .await;
        let acks = match enqueued {
            Ok(acks) => acks,
            Err(e) => {
                self.handle_again(&e, after).await;
                return Ok(());
            }
        };
        let confirming = self.sub.confirming.clone();
        confirming.start();
        tokio::spawn(async move {
            match crate::connection::confirm(acks).await {
                Ok(()) => {
                    let r = self.mark_done().await;
                    after.run(r.is_ok()).await;
                }
                Err(e) => self.handle_again(&e, after).await,
            }
            confirming.finish();
        });
        Ok(())
    }
}
