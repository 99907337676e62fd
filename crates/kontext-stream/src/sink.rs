//! The store sink: one consumer group per store, writing batches into the context store and
//! committing offsets only after the store acknowledged them.
//!
//! Per batch: poll -> process every record -> one durable store transaction holding the
//! updates and the batch's next offsets -> commit the group's offsets. A crash anywhere leaves
//! the store's own offsets as the truth: re-delivered records are skipped by the store, so a
//! record is applied exactly once however often it is delivered.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kontext_core::envelope::now_ms;
use kontext_core::record::TopicPartition;
use kontext_log::{ConsumerConfig, Log, LogError};
use kontext_store::{ApplyStats, ContextStore, EntityUpdate, StoreError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::dlq::DeadLetters;
use crate::metrics::PipelineMetrics;
use crate::normalize::{Outcome, Router};

/// Most records taken per batch.
const MAX_BATCH: usize = 2_000;
/// How long a poll waits for the first record.
const POLL_TIMEOUT: Duration = Duration::from_millis(200);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a rewind waits for a group's stale members to expire: longer than Kafka's default
/// `session.timeout.ms` (45 s).
const GROUP_BUSY_WAIT: Duration = Duration::from_secs(60);

/// Errors that stop the sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("log: {0}")]
    Log(#[from] LogError),
    #[error(
        "cannot write to the dead-letter topic, stopping rather than dropping the record: {0}"
    )]
    DeadLetter(LogError),
    #[error("context store: {0}")]
    Store(#[from] StoreError),
}

/// Feeds one context store from the log.
pub struct StoreSink {
    dead_letters: Option<DeadLetters>,
    log: Arc<dyn Log>,
    store: Arc<dyn ContextStore>,
    router: Router,
    consumer: ConsumerConfig,
    metrics: Arc<PipelineMetrics>,
}

impl StoreSink {
    pub fn new(
        log: Arc<dyn Log>,
        store: Arc<dyn ContextStore>,
        router: Router,
        consumer: ConsumerConfig,
        metrics: Arc<PipelineMetrics>,
    ) -> Self {
        Self {
            dead_letters: None,
            log,
            store,
            router,
            consumer,
            metrics,
        }
    }

    /// Parks records that can never be processed in dead-letter topics instead of only
    /// logging and counting them.
    pub fn with_dead_letters(mut self, dead_letters: DeadLetters) -> Self {
        self.dead_letters = Some(dead_letters);
        self
    }

    /// Runs until `shutdown` is cancelled or a permanent error occurs. Transient errors of the
    /// log or the store are retried with exponential backoff (100 ms doubling to 30 s); the
    /// batch in hand is kept, so nothing is skipped while waiting.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SinkError> {
        // What the store holds: records below these offsets were handled (applied, filtered or
        // dead-lettered) before, so a re-delivered bad record is not dead-lettered twice.
        let mut handled = self.rewind_group_to_store().await?;
        let mut consumer = self.log.consumer(self.consumer.clone()).await?;
        info!(group = %self.consumer.group_id, topics = ?self.consumer.topics, "store sink started");
        loop {
            let records = tokio::select! {
                _ = shutdown.cancelled() => break,
                polled = consumer.poll(MAX_BATCH, POLL_TIMEOUT) => match polled {
                    Ok(r) => r,
                    Err(e) if e.is_transient() => {
                        warn!(error = %e, "poll failed; retrying");
                        tokio::time::sleep(FIRST_BACKOFF).await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            if records.is_empty() {
                continue;
            }
            self.metrics
                .records_consumed
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            let mut updates = Vec::with_capacity(records.len());
            let mut next: BTreeMap<TopicPartition, i64> = BTreeMap::new();
            let mut newest_event_ms = i64::MIN;
            let mut letters = Vec::new();
            for record in &records {
                next.insert(record.topic_partition(), record.offset + 1);
                match self.router.process(record) {
                    Outcome::Update(u) => {
                        newest_event_ms = newest_event_ms.max(u.provenance.event_time_ms);
                        updates.push(u);
                    }
                    Outcome::Filtered { source } => {
                        debug!(at = %record.coordinates(), %source, "filtered");
                        self.metrics
                            .records_filtered
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Invalid(e) => {
                        self.metrics.record_invalid(&record.topic, e.kind());
                        let seen = handled
                            .get(&(record.topic.to_string(), record.partition))
                            .is_some_and(|n| record.offset < *n);
                        match &self.dead_letters {
                            Some(dlq) if !seen => {
                                warn!(at = %record.coordinates(), reason = e.kind(), error = %e, "invalid record dead-lettered");
                                letters.push(dlq.letter(record, &e));
                            }
                            _ => {
                                warn!(at = %record.coordinates(), reason = e.kind(), error = %e, "invalid record skipped")
                            }
                        }
                    }
                }
            }
            // Dead letters are durable before the store records these offsets as handled.
            if let Some(dlq) = &self.dead_letters {
                let n = letters.len() as u64;
                if !dlq
                    .send(letters, &shutdown)
                    .await
                    .map_err(SinkError::DeadLetter)?
                {
                    break;
                }
                self.metrics
                    .records_dead_lettered
                    .fetch_add(n, Ordering::Relaxed);
            }
            for (tp, n) in &next {
                handled.insert((tp.topic.to_string(), tp.partition), *n);
            }
            let offsets: Vec<(TopicPartition, i64)> = next.into_iter().collect();
            let Some(stats) = self.apply_with_retry(updates, &offsets, &shutdown).await? else {
                break; // shut down while the store was unavailable: nothing committed
            };
            self.metrics
                .records_applied
                .fetch_add(stats.applied, Ordering::Relaxed);
            self.metrics
                .records_skipped
                .fetch_add(stats.skipped, Ordering::Relaxed);
            if newest_event_ms != i64::MIN {
                let now = now_ms();
                self.metrics
                    .last_event_lag_ms
                    .store(now - newest_event_ms, Ordering::Relaxed);
            }
            // The store already holds these offsets; a failed commit only means re-delivery,
            // which the store skips.
            if let Err(e) = consumer.commit(&offsets).await {
                warn!(error = %e, "offset commit failed; records will be re-delivered and skipped");
            } else {
                self.metrics
                    .batches_committed
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        info!(group = %self.consumer.group_id, "store sink stopped");
        Ok(())
    }

    /// The store's offsets are the truth. Where the group has committed past them (the store
    /// was deleted or restored from an older copy), rewind the group so that nothing the store
    /// lacks is skipped. A group behind the store needs nothing: the store skips what it has.
    async fn rewind_group_to_store(&self) -> Result<BTreeMap<(String, i32), i64>, SinkError> {
        let applied = self.store.applied_offsets().await?;
        let group = &self.consumer.group_id;
        let mut rewind = Vec::new();
        for topic in &self.consumer.topics {
            for (partition, committed) in self.log.committed_offsets(group, topic).await? {
                let stored = applied
                    .get(&(topic.clone(), partition))
                    .copied()
                    .unwrap_or(0);
                if committed.is_some_and(|c| c > stored) {
                    rewind.push((TopicPartition::new(topic.as_str(), partition), stored));
                }
            }
        }
        if rewind.is_empty() {
            return Ok(applied);
        }
        warn!(%group, partitions = rewind.len(), "the group committed past what the store holds; rewinding it to the store's offsets");
        // A member of a killed process stays in a Kafka group until its session times out
        // (45 s by default): wait that out rather than skip records.
        let deadline = tokio::time::Instant::now() + GROUP_BUSY_WAIT;
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.log.reset_group_offsets(group, &rewind).await {
                Ok(()) => return Ok(applied),
                Err(e) if is_busy_or_transient(&e) && tokio::time::Instant::now() < deadline => {
                    warn!(%group, error = %e, retry_in = ?backoff, "cannot rewind the group yet (a member is still registered); retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn apply_with_retry(
        &self,
        updates: Vec<EntityUpdate>,
        offsets: &[(TopicPartition, i64)],
        shutdown: &CancellationToken,
    ) -> Result<Option<ApplyStats>, SinkError> {
        let offsets: Vec<(String, i32, i64)> = offsets
            .iter()
            .map(|(tp, o)| (tp.topic.to_string(), tp.partition, *o))
            .collect();
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.store.apply(&updates, &offsets).await {
                Ok(stats) => return Ok(Some(stats)),
                Err(e) if e.is_transient() => {
                    self.metrics.store_retries.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, retry_in = ?backoff, "context store write failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn is_busy_or_transient(e: &LogError) -> bool {
    matches!(e, LogError::GroupBusy(_)) || e.is_transient()
}
