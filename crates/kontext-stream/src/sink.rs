//! The store sink: one consumer group per store, writing batches into the context store and
//! committing offsets only after the store acknowledged them.
//!
//! Per batch: poll -> process every record -> dead-letter the invalid ones -> one durable store
//! transaction holding the updates and the batch's next offsets -> commit the group's offsets.
//! A crash anywhere leaves the store's own offsets as the truth: re-delivered records are
//! skipped by the store, so a record is applied exactly once however often it is delivered.
//!
//! When a write fails (docs/failures.md):
//! 1. transient errors are retried with the `store_write` policy;
//! 2. then an offsets-only write probes the store. If the probe fails too, the store itself is
//!    down: the circuit breaker opens, the sink pauses its consumer (and keeps polling it, so a
//!    Kafka member stays in its group) and probes with the `store_probe` policy until a probe
//!    succeeds, then writes the same batch again and resumes. Nothing is dead-lettered and
//!    nothing is skipped;
//! 3. if the probe succeeds, some record of the batch is the problem: the batch is split in
//!    halves (by updates) and each half written on its own, down to single records. A single
//!    record that still fails, with its own retries spent and the store accepting writes, is
//!    dead-lettered with stage `store`, and its offset is recorded so the partition moves on.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use kontext_core::config::{
    LimitsConfig, PipelineConfig, RetryConfig, RetryStage, FEATURES_SOURCE,
};
use kontext_core::envelope::{self, now_ms};
use kontext_core::record::{ProduceRecord, Record, TopicPartition};
use kontext_log::{Consumer, ConsumerConfig, Log, LogError};
use kontext_store::{ApplyStats, ContextStore, EntityUpdate, StoreError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backlog::{self, MAX_BATCH};
use crate::dlq::{store_error_kind, DeadLetters, FailedStage};
use crate::metrics::{BreakerState, PipelineMetrics, UpdateKind};
use crate::normalize::{Outcome, ProcessError, Router};
use crate::retry::{Backoff, Waiter};

/// How long a poll waits for the first record.
const POLL_TIMEOUT: Duration = Duration::from_millis(200);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How often the sink publishes its consumer's assignment
/// ([`PipelineMetrics::sink_assigned_partitions`]).
const ASSIGNMENT_CHECK: Duration = Duration::from_secs(1);

/// Errors that stop the sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The log failed permanently.
    #[error("log: {0}")]
    Log(#[from] LogError),
    /// Dead letters could not be written even after the `dead_letter` retries.
    #[error(
        "cannot write to the dead-letter topic, stopping rather than dropping the record: {0}"
    )]
    DeadLetter(LogError),
    /// The store failed permanently for every write (not for one record), or stayed down
    /// longer than the `store_probe` policy allows.
    #[error("context store: {0}")]
    Store(#[from] StoreError),
    /// The store has applied offsets the log does not have (the log was deleted or recreated,
    /// or the store comes from another log): the sink would skip every new record below them.
    #[error("the context store has applied offsets past the end of the log ({0}): was the log deleted or recreated? Rebuild the store from this log (`kontext rebuild --store NAME`) or delete the store's data so that it is rebuilt at start")]
    StoreAheadOfLog(String),
}

/// Feeds one context store from the log.
pub struct StoreSink {
    dead_letters: Option<DeadLetters>,
    /// A rebuild's sink: [`StoreSink::with_rebuild_letters`].
    store_letters: Option<RebuildLetters>,
    log: Arc<dyn Log>,
    store: Arc<dyn ContextStore>,
    router: Router,
    consumer: ConsumerConfig,
    metrics: Arc<PipelineMetrics>,
    retry: RetryConfig,
    /// Set by [`StoreSink::with_retry`]: the dead-letter policy then comes from it.
    retry_configured: bool,
    limits: LimitsConfig,
    /// The store's outage in progress: its probes' backoff and start, kept across half-open
    /// trials until a write succeeds, so a store that answers probes but fails writes is
    /// probed less and less often and the `store_probe` budget runs out.
    outage: std::sync::Mutex<Option<Outage>>,
}

/// See [`StoreSink`]'s `outage`.
struct Outage {
    backoff: Backoff,
    started: Instant,
}

/// Where the store stands: next offset to apply per (topic, partition).
pub type Handled = BTreeMap<(String, i32), i64>;

/// How a rebuild's sink reports bad records ([`StoreSink::with_rebuild_letters`]): an invalid
/// record the live sink reported already is not dead-lettered again; a record the new
/// version's store rejects always is.
pub struct RebuildLetters {
    /// Where the letters go: the store's dead letters, as the live sink's.
    pub dead_letters: DeadLetters,
    /// The version serving, fed by the live sink: an invalid record below its offsets was
    /// dead-lettered by that sink...
    pub live: Arc<dyn ContextStore>,
    /// ...unless it is below these offsets too: the live version handled those records under
    /// an earlier pipeline definition (another mapping, another `limits:`, dead letters off),
    /// which may have applied a record the rebuild finds bad. Those are dead-lettered again
    /// (a record bad under both definitions gets a second letter; `dlq replay` puts it back
    /// once). Empty when the live version was built under the running definition.
    pub earlier_definitions: Handled,
    /// Counts the rebuild's letters (`kontext_records_dead_lettered_total`): the live sink's
    /// metrics (the API exports the served store's), so that a letter is counted wherever it
    /// comes from.
    pub metrics: Arc<PipelineMetrics>,
}

impl RebuildLetters {
    /// Whether the live sink reported `record` under the running definition.
    fn reported_by_live(&self, live_offsets: &Handled, record: &Record) -> bool {
        covers(live_offsets, record) && !covers(&self.earlier_definitions, record)
    }
}

/// Whether `offsets` (next offset per partition) are past `record`: it was handled.
fn covers(offsets: &Handled, record: &Record) -> bool {
    offsets
        .get(&(record.topic.to_string(), record.partition))
        .is_some_and(|next| record.offset < *next)
}

/// A dead letter's record in its batch (index), failed stage and kind.
type Lettered = (usize, &'static str, &'static str);

/// The sink's consumer, and what the circuit breaker did to it.
struct Feed {
    consumer: Box<dyn Consumer>,
    /// Paused by the breaker; resumed once the batch in hand is written.
    paused: bool,
    /// Records a poll returned although the consumer was paused (a backend breaking the
    /// pause contract): kept, in order, as the next batch after the outage, and no further
    /// polls until then.
    early: Vec<Record>,
    /// The error of an extra poll that ended a backlog's gathering ([`backlog::gather`]),
    /// raised at the next poll, once the records gathered before it are written: a Kafka
    /// consumer reports an error once, so dropping it would hide it for good.
    failed_poll: Option<LogError>,
}

impl Feed {
    /// Whether the breaker may poll: paused (a consumer whose `pause` was refused is not
    /// polled at all during the outage), and nothing kept from an earlier poll.
    fn keeps_polling(&self) -> bool {
        self.paused && self.early.is_empty()
    }

    /// Pauses for an outage. A backend that cannot pause is simply not polled meanwhile,
    /// which keeps the records but, on Kafka, not the group membership past
    /// `max.poll.interval.ms`.
    async fn pause(&mut self) {
        if self.paused {
            return;
        }
        match self.consumer.pause().await {
            Ok(()) => self.paused = true,
            Err(e) => {
                warn!(error = %e, "cannot pause the consumer; not polling it until the store is back")
            }
        }
    }

    /// Polls the paused consumer until `until` (what keeps a Kafka member in its group), or
    /// sleeps when it may not poll. `Ok(false)`: shutdown.
    async fn idle_until(
        &mut self,
        until: Instant,
        shutdown: &CancellationToken,
    ) -> Result<bool, SinkError> {
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(true);
            }
            if !self.keeps_polling() {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep_until(until) => return Ok(true),
                }
            }
            let timeout = (until - now).min(POLL_TIMEOUT);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                polled = self.consumer.poll(MAX_BATCH, timeout) => match polled {
                    Ok(records) if records.is_empty() => {}
                    Ok(records) => {
                        warn!(records = records.len(), "the paused consumer delivered records; kept for after the outage");
                        self.early = records;
                    }
                    Err(e) if e.is_transient() => {
                        debug!(error = %e, "poll failed while paused; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(false),
                            _ = tokio::time::sleep(FIRST_BACKOFF.min(until - now)) => {}
                        }
                    }
                    Err(e) => return Err(e.into()),
                },
            }
        }
    }
}

/// One polled record's share of the store write.
struct Entry {
    /// Index into the polled records.
    record: usize,
    /// Index into the batch's updates, when the record updates the store.
    update: Option<usize>,
}

impl StoreSink {
    /// A sink with the built-in retry policies and limits; see the `with_*` methods.
    pub fn new(
        log: Arc<dyn Log>,
        store: Arc<dyn ContextStore>,
        router: Router,
        consumer: ConsumerConfig,
        metrics: Arc<PipelineMetrics>,
    ) -> Self {
        Self {
            dead_letters: None,
            store_letters: None,
            log,
            store,
            router,
            consumer,
            metrics,
            retry: RetryConfig::default(),
            retry_configured: false,
            limits: LimitsConfig::default(),
            outage: std::sync::Mutex::new(None),
        }
    }

    /// Parks records that can never be processed in dead-letter topics instead of only
    /// logging and counting them.
    pub fn with_dead_letters(mut self, dead_letters: DeadLetters) -> Self {
        self.dead_letters = Some(dead_letters);
        self
    }

    /// For the sink of a rebuild, which writes a new version of the store that
    /// [`RebuildLetters::live`] stands for: an invalid record is dead-lettered only if the live
    /// sink has not reported it (see [`RebuildLetters`]), a record the new version rejects
    /// always (the live version may have applied it: another schema or server, a timeout, the
    /// retry budget decide, which no definition records). One the rebuild reaches first (the live sink lags, or it is the last
    /// moments before the switch) is below the new version's offsets after the switch: the live
    /// sink skips it, or drops its letter as handled (it re-reads its store's offsets before
    /// writing letters), and only the rebuild's letter is left. A record both sinks report has
    /// two letters, which `dlq replay` puts back once.
    pub fn with_rebuild_letters(mut self, letters: RebuildLetters) -> Self {
        self.store_letters = Some(letters);
        self
    }

    /// A rebuild's letters, when this is a rebuild's sink (its own dead letters win).
    fn rebuild(&self) -> Option<&RebuildLetters> {
        self.store_letters
            .as_ref()
            .filter(|_| self.dead_letters.is_none())
    }

    /// Where this sink's letters go: its own dead letters, or a rebuild's.
    fn letter_sink(&self) -> Option<&DeadLetters> {
        match self.rebuild() {
            Some(rebuild) => Some(&rebuild.dead_letters),
            None => self.dead_letters.as_ref(),
        }
    }

    /// Where this sink's letters are counted: its own metrics, or a rebuild's live sink's.
    fn letter_metrics(&self) -> &PipelineMetrics {
        match self.rebuild() {
            Some(rebuild) => &rebuild.metrics,
            None => &self.metrics,
        }
    }

    /// Retries with the pipeline file's `retry:` policies (store writes, store probes while
    /// the circuit breaker is open, dead-letter writes).
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self.retry_configured = true;
        self
    }

    /// Applies the pipeline file's `limits:` (the largest record processed).
    pub fn with_limits(mut self, limits: LimitsConfig) -> Self {
        self.limits = limits;
        self
    }

    /// [`StoreSink::with_retry`] and [`StoreSink::with_limits`] from a pipeline file.
    pub fn with_config(self, config: &PipelineConfig) -> Self {
        self.with_retry(config.retry.clone())
            .with_limits(config.limits.clone())
    }

    /// Runs until `shutdown` is cancelled or a permanent error occurs. Transient errors of the
    /// log or the store are retried; the batch in hand is kept, so nothing is skipped while
    /// waiting (see the module documentation for what happens when writes keep failing).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), SinkError> {
        if self.retry_configured {
            let policy = self.retry.policy(RetryStage::DeadLetter);
            self.dead_letters = self.dead_letters.take().map(|d| d.with_retry(policy));
            self.store_letters = self.store_letters.take().map(|r| RebuildLetters {
                dead_letters: r.dead_letters.with_retry(policy),
                ..r
            });
        }
        // What the store holds: records below these offsets were handled (applied, filtered or
        // dead-lettered) before, so a re-delivered bad record is not dead-lettered twice.
        let Some(mut handled) = self.start_up(&shutdown).await? else {
            return Ok(());
        };
        let mut feed = Feed {
            consumer: self.log.consumer(self.consumer.clone()).await?,
            paused: false,
            early: Vec::new(),
            failed_poll: None,
        };
        info!(group = %self.consumer.group_id, topics = ?self.consumer.topics, "store sink started");
        // Next offsets the store has applied but the group has not committed, each with the
        // store's write mark after it: committed once the store says that write is durable.
        let mut uncommitted: VecDeque<(u64, Vec<(TopicPartition, i64)>)> = VecDeque::new();
        let flusher = self.spawn_flusher(&shutdown);
        let mut assignment_checked: Option<Instant> = None;
        // The delays between failing polls (or resumes): growing while they fail, from the
        // retry settings' waiting policy; cleared by a poll that works.
        let mut failing: Option<Waiter> = None;
        loop {
            if assignment_checked.is_none_or(|at| at.elapsed() >= ASSIGNMENT_CHECK) {
                let held = feed.consumer.assignment().len() as i64;
                self.metrics
                    .sink_assigned_partitions
                    .store(held, Ordering::Relaxed);
                assignment_checked = Some(Instant::now());
            }
            if feed.paused {
                // The breaker closed (the batch in hand is written): consume again.
                match feed.consumer.resume().await {
                    Ok(()) => feed.paused = false,
                    Err(e) if e.is_transient() => {
                        let delay = self.next_failure_delay(&mut failing);
                        warn!(error = %e, retry_in = ?delay, "resuming the consumer failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let polled = if let Some(e) = feed.failed_poll.take() {
                Err(e)
            } else if !feed.early.is_empty() {
                Ok(std::mem::take(&mut feed.early))
            } else {
                // While offsets wait for the flusher, a quiet log must not keep them waiting
                // for the next write.
                let sync = self.store.sync_interval();
                let timeout = if uncommitted.is_empty() || sync.is_zero() {
                    POLL_TIMEOUT
                } else {
                    POLL_TIMEOUT.min(sync)
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    polled = feed.consumer.poll(MAX_BATCH, timeout) => match polled {
                        Ok(r) => {
                            failing = None;
                            let (records, failed) = backlog::gather(feed.consumer.as_mut(), r).await;
                            feed.failed_poll = failed;
                            Ok(records)
                        }
                        Err(e) => Err(e),
                    },
                }
            };
            let records = match polled {
                Ok(records) => records,
                Err(e) if e.is_transient() => {
                    let delay = self.next_failure_delay(&mut failing);
                    warn!(error = %e, retry_in = ?delay, "poll failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if records.is_empty() {
                self.commit_durable(&mut feed, &mut uncommitted).await;
                continue;
            }
            self.metrics
                .records_consumed
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            let Some(stats) = self
                .handle_batch(&records, &mut handled, &mut feed, &shutdown)
                .await?
            else {
                break; // shut down while waiting for the store or the dead-letter topic
            };
            self.metrics
                .records_applied
                .fetch_add(stats.applied, Ordering::Relaxed);
            self.metrics
                .records_skipped
                .fetch_add(stats.skipped, Ordering::Relaxed);
            let mark = self.store.write_marks().applied;
            uncommitted.push_back((mark, next_offsets(&records)));
            self.commit_durable(&mut feed, &mut uncommitted).await;
        }
        // Stopping: what the store applied becomes durable, and the group says so.
        if let Some((stop, handle)) = flusher {
            stop.cancel();
            if let Err(e) = handle.await {
                // What it flushed is in the write marks; the final flush below covers the rest.
                warn!(error = %e, "the store's flusher task failed");
            }
        }
        let marks = self.store.write_marks();
        if marks.durable < marks.applied {
            if let Err(e) = self.store.flush().await {
                warn!(error = %e, "fsyncing the store at shutdown failed; its unsynced writes will be replayed from the log");
            }
        }
        // In the background, like every commit here: dropping the consumer (below, with
        // `feed`) waits for it.
        self.commit_durable(&mut feed, &mut uncommitted).await;
        info!(group = %self.consumer.group_id, "store sink stopped");
        Ok(())
    }

    /// Commits the group's offsets of the writes the store holds durably (offsets never pass a
    /// write a crash could lose), in the background
    /// ([`kontext_log::Consumer::commit_in_background`]): the next poll does not wait for the
    /// coordinator or the offsets file's fsyncs. The store already holds these offsets, so a
    /// failed or lost commit only means re-delivery, which the store skips; the next commit of
    /// a partition supersedes it. (Keeping failed offsets for a retry would make one refused
    /// partition, say one a rebalance moved away, fail every later commit.)
    async fn commit_durable(
        &self,
        feed: &mut Feed,
        uncommitted: &mut VecDeque<(u64, Vec<(TopicPartition, i64)>)>,
    ) {
        let durable = self.store.write_marks().durable;
        let mut offsets = BTreeMap::new();
        while uncommitted
            .front()
            .is_some_and(|(mark, _)| *mark <= durable)
        {
            if let Some((_, next)) = uncommitted.pop_front() {
                merge_offsets(&mut offsets, next);
            }
        }
        if offsets.is_empty() {
            return;
        }
        let offsets: Vec<(TopicPartition, i64)> = offsets.into_iter().collect();
        if let Err(e) = feed.consumer.commit_in_background(&offsets).await {
            warn!(error = %e, "offset commit failed; records will be re-delivered and skipped");
        } else {
            self.metrics
                .batches_committed
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// For a store that commits without fsyncing: a task that flushes it every sync interval,
    /// so durability costs the write path nothing. Stopped by the returned token (or
    /// `shutdown`).
    fn spawn_flusher(
        &self,
        shutdown: &CancellationToken,
    ) -> Option<(CancellationToken, tokio::task::JoinHandle<()>)> {
        let interval = self.store.sync_interval();
        if interval.is_zero() {
            return None;
        }
        let stop = shutdown.child_token();
        let store = Arc::clone(&self.store);
        let metrics = Arc::clone(&self.metrics);
        let stopped = stop.clone();
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let marks = store.write_marks();
                if marks.durable >= marks.applied {
                    continue;
                }
                if let Err(e) = store.flush().await {
                    metrics.record_store_retry();
                    warn!(error = %e, "fsyncing the store failed; retrying at the next interval (offsets stay uncommitted until then)");
                }
            }
        });
        Some((stop, handle))
    }

    /// Drops the letters of records handled elsewhere. A live sink asks its store, and brings
    /// `handled` up to it: `handled` is read at start, and a partition this member took over
    /// later (a rebalance) may have been handled further by the member before it, which
    /// dead-lettered its bad records already (its group offsets lag its store writes, so they
    /// are delivered again here); after a rebuild's switch, the new version's offsets cover
    /// records the rebuild dead-lettered. A rebuild's sink asks the live version (and keeps
    /// `handled`, its own). Read only when a batch has letters: bad records are rare.
    async fn not_handled_elsewhere(
        &self,
        records: &[Record],
        letters: Vec<ProduceRecord>,
        lettered: Vec<Lettered>,
        handled: &mut Handled,
    ) -> (Vec<ProduceRecord>, Vec<Lettered>) {
        let rebuild = self.rebuild();
        let elsewhere = match rebuild {
            Some(rebuild) => &rebuild.live,
            None => &self.store,
        };
        let stored = match elsewhere.applied_offsets().await {
            Ok(stored) => stored,
            Err(e) => {
                // A second letter is better than none.
                warn!(error = %e, "reading the store's offsets failed; dead-lettering the batch's bad records");
                return (letters, lettered);
            }
        };
        if rebuild.is_none() {
            for (tp, next) in &stored {
                let n = handled.entry(tp.clone()).or_insert(0);
                *n = (*n).max(*next);
            }
        }
        letters
            .into_iter()
            .zip(lettered)
            .filter(|(_, (i, _, _))| {
                let record = &records[*i];
                let seen = match rebuild {
                    Some(rebuild) => rebuild.reported_by_live(&stored, record),
                    None => covers(&stored, record),
                };
                if seen {
                    info!(at = %record.coordinates(), "invalid record handled by the store already (dead-lettered by another member, or by a rebuild or the live sink); not dead-lettered again");
                }
                !seen
            })
            .unzip()
    }

    /// Processes, dead-letters and writes one polled batch. `Ok(None)`: shutdown came first
    /// and nothing of the batch may be committed.
    async fn handle_batch(
        &self,
        records: &[Record],
        handled: &mut Handled,
        feed: &mut Feed,
        shutdown: &CancellationToken,
    ) -> Result<Option<ApplyStats>, SinkError> {
        let mut updates = Vec::with_capacity(records.len());
        let mut entries = Vec::with_capacity(records.len());
        let mut letters = Vec::new();
        let mut lettered = Vec::new();
        let mut newest_event_ms = i64::MIN;
        let mut already = 0u64;
        for (i, record) in records.iter().enumerate() {
            let seen = covers(handled, record);
            let mut update = None;
            match self.process(record) {
                // The store has it: skip here, so that a record the store rejected once is
                // not written (and dead-lettered) again.
                Outcome::Update(_) if seen => already += 1,
                Outcome::Update(u) => {
                    newest_event_ms = newest_event_ms.max(u.provenance.event_time_ms);
                    update = Some(updates.len());
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
                    match self.letter_sink() {
                        Some(dlq) if !seen => {
                            // Whether it is dead-lettered here is known once the store was
                            // asked (`not_handled_elsewhere`): said after sending.
                            warn!(at = %record.coordinates(), reason = e.kind(), error = %e, "invalid record");
                            letters.push(dlq.letter(record, &e));
                            lettered.push((i, FailedStage::of(&e).name(), e.kind()));
                        }
                        _ => {
                            warn!(at = %record.coordinates(), reason = e.kind(), error = %e, "invalid record skipped")
                        }
                    }
                }
            }
            entries.push(Entry { record: i, update });
        }
        if !letters.is_empty() {
            (letters, lettered) = self
                .not_handled_elsewhere(records, letters, lettered, handled)
                .await;
        }
        // Dead letters are durable before the store records these offsets as handled.
        if let Some(dlq) = self.letter_sink() {
            if !self.send_letters(dlq, letters, shutdown).await? {
                return Ok(None);
            }
            for (i, stage, kind) in lettered {
                info!(at = %records[i].coordinates(), reason = kind, "invalid record dead-lettered");
                self.letter_metrics()
                    .record_dead_letter(&records[i].topic, stage, kind);
            }
        }
        let Some(mut stats) = self
            .write(records, &updates, &entries, handled, feed, shutdown)
            .await?
        else {
            return Ok(None);
        };
        stats.skipped += already;
        let now = now_ms();
        for entry in &entries {
            if let Some(u) = entry.update.map(|i| &updates[i]) {
                let kind = if u.provenance.source == FEATURES_SOURCE {
                    UpdateKind::Features
                } else {
                    UpdateKind::Entity
                };
                let log_ms = records[entry.record].timestamp_ms;
                self.metrics
                    .record_applied(kind, now, u.provenance.event_time_ms, log_ms);
            }
        }
        if newest_event_ms != i64::MIN {
            self.metrics
                .last_event_lag_ms
                .store(now - newest_event_ms, Ordering::Relaxed);
        }
        Ok(Some(stats))
    }

    fn process(&self, record: &Record) -> Outcome {
        match envelope::check_size(record, self.limits.max_record_bytes) {
            Ok(()) => self.router.process(record),
            Err(e) => Outcome::Invalid(ProcessError::Envelope(e)),
        }
    }

    async fn send_letters(
        &self,
        dlq: &DeadLetters,
        letters: Vec<kontext_core::record::ProduceRecord>,
        shutdown: &CancellationToken,
    ) -> Result<bool, SinkError> {
        match dlq
            .send_counted(letters, shutdown)
            .await
            .map_err(SinkError::DeadLetter)?
        {
            None => Ok(false),
            Some(retries) => {
                for _ in 0..retries {
                    self.metrics.record_retry(RetryStage::DeadLetter.name());
                }
                Ok(true)
            }
        }
    }

    /// Writes the batch's updates and offsets, splitting it when the store rejects part of it
    /// and waiting (circuit breaker open) when the store is down. Ranges are written left to
    /// right, so the offsets of a partition only move forward.
    async fn write(
        &self,
        records: &[Record],
        updates: &[EntityUpdate],
        entries: &[Entry],
        handled: &mut Handled,
        feed: &mut Feed,
        shutdown: &CancellationToken,
    ) -> Result<Option<ApplyStats>, SinkError> {
        let mut total = ApplyStats::default();
        // (entries, whether its one update was dead-lettered and is left out)
        let mut work: Vec<(Range<usize>, bool)> = vec![(0..entries.len(), false)];
        let mut whole = true;
        while let Some((range, dropped)) = work.pop() {
            let part = &entries[range.clone()];
            let ups = if dropped {
                &[][..]
            } else {
                &updates[update_range(part)]
            };
            let offsets = range_offsets(records, part);
            // The whole batch and single records get the full retry budget; the halves in
            // between one attempt each: a failing half is split again anyway.
            let budgeted = whole || ups.len() <= 1;
            whole = false;
            let (error, attempts) =
                match self.apply_retrying(ups, &offsets, budgeted, shutdown).await {
                    Ok(Some(stats)) => {
                        self.written(&mut total, stats, &offsets, handled);
                        continue;
                    }
                    Ok(None) => return Ok(None),
                    Err(failed) => failed,
                };
            // A store refusing on its settings (a login or a certificate refused on a new
            // connection, a newer format) refuses every record alike: none is to blame, so
            // none is parked. Stop with the error, as after an outage past its budget.
            if error.is_configuration() {
                return Err(SinkError::Store(error));
            }
            // Is it the store, or these records?
            match self.probe(&offsets, handled).await {
                Err(e) if e.is_transient() => {
                    if !self.wait_for_store(e, Some(&mut *feed), shutdown).await? {
                        return Ok(None);
                    }
                    work.push((range, dropped)); // the same range again: the half-open trial
                    continue;
                }
                Err(e) => return Err(SinkError::Store(e)),
                Ok(()) => {}
            }
            if ups.len() > 1 {
                let mid = split_point(part);
                work.push((range.start + mid..range.end, false));
                work.push((range.start..range.start + mid, false));
                debug!(records = part.len(), error = %error, "store write failed while the store accepts writes; splitting the batch");
                continue;
            }
            if ups.is_empty() {
                // Offsets alone failed although a probe just passed: the store is flapping.
                if !self
                    .wait_for_store(error, Some(&mut *feed), shutdown)
                    .await?
                {
                    return Ok(None);
                }
                work.push((range, dropped));
                continue;
            }
            // One record, and the store takes other writes: one more try, then park it.
            let error = match self.store.apply(ups, &offsets).await {
                Ok(stats) => {
                    self.written(&mut total, stats, &offsets, handled);
                    continue;
                }
                Err(e) if e.is_configuration() => return Err(SinkError::Store(e)),
                Err(e) => e,
            };
            if error.is_transient() && self.probe(&offsets, handled).await.is_err() {
                // The store went down meanwhile: not this record's fault.
                if !self
                    .wait_for_store(error, Some(&mut *feed), shutdown)
                    .await?
                {
                    return Ok(None);
                }
                work.push((range, dropped));
                continue;
            }
            let Some(entry) = part.iter().find(|e| e.update.is_some()) else {
                continue; // unreachable: ups has one update
            };
            let record = &records[entry.record];
            let kind = store_error_kind(&error);
            // A rebuild letters every record its store rejects, whatever the live sink did
            // with it: the live version may have applied it (another schema or server, a
            // timeout, the retry budget: outcomes no definition records). Rejections are
            // rare, and `dlq replay` puts a record with two letters back once.
            match self.letter_sink() {
                Some(dlq) => {
                    warn!(at = %record.coordinates(), reason = kind, error = %error, attempts = attempts + 1, "the store rejects this record; dead-lettered");
                    let letter = dlq.store_letter(record, &error, attempts + 1);
                    if !self.send_letters(dlq, vec![letter], shutdown).await? {
                        return Ok(None);
                    }
                    self.letter_metrics().record_dead_letter(
                        &record.topic,
                        FailedStage::Store.name(),
                        kind,
                    );
                }
                None => {
                    warn!(at = %record.coordinates(), reason = kind, error = %error, "the store rejects this record; skipped (dead letters are off)")
                }
            }
            self.metrics.record_invalid(&record.topic, kind);
            work.push((range, true));
        }
        Ok(Some(total))
    }

    /// Books a successful write: stats, the store's new offsets, and the breaker closed.
    fn written(
        &self,
        total: &mut ApplyStats,
        stats: ApplyStats,
        offsets: &[(String, i32, i64)],
        handled: &mut Handled,
    ) {
        total.applied += stats.applied;
        total.skipped += stats.skipped;
        total.deleted += stats.deleted;
        for (t, p, n) in offsets {
            let e = handled.entry((t.clone(), *p)).or_insert(*n);
            *e = (*e).max(*n);
        }
        if self.metrics.breaker().0 != BreakerState::Closed {
            info!("context store write succeeded; circuit breaker closed");
            self.metrics.set_breaker(BreakerState::Closed, "none");
        }
        self.outage_over();
    }

    /// The store works again (a write, or the start-up's reads, succeeded): the next outage
    /// starts its probes afresh.
    fn outage_over(&self) {
        *self.outage.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// One write, retried with the `store_write` policy when `budgeted`. Permanent errors
    /// return at once. `Err` carries the last error and the attempts made; `Ok(None)`:
    /// shutdown.
    async fn apply_retrying(
        &self,
        updates: &[EntityUpdate],
        offsets: &[(String, i32, i64)],
        budgeted: bool,
        shutdown: &CancellationToken,
    ) -> Result<Option<ApplyStats>, (StoreError, u32)> {
        let mut backoff = Backoff::unseeded(self.retry.policy(RetryStage::StoreWrite));
        let started = Instant::now();
        loop {
            match self.store.apply(updates, offsets).await {
                Ok(stats) => return Ok(Some(stats)),
                Err(e) if e.is_transient() && budgeted => {
                    let Some(delay) = backoff.next_delay(started.elapsed()) else {
                        return Err((e, backoff.attempts()));
                    };
                    self.metrics.record_store_retry();
                    debug!(error = %e, retry_in = ?delay, "context store write failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => return Err((e, backoff.attempts() + 1)),
            }
        }
    }

    /// Whether the store takes writes at all: an offsets-only write of what it already holds
    /// for the partitions of `offsets` (stores keep the highest offset, so this changes
    /// nothing).
    async fn probe(
        &self,
        offsets: &[(String, i32, i64)],
        handled: &Handled,
    ) -> Result<(), StoreError> {
        let current: Vec<(String, i32, i64)> = offsets
            .iter()
            .map(|(t, p, _)| {
                let n = handled.get(&(t.clone(), *p)).copied().unwrap_or(0);
                (t.clone(), *p, n)
            })
            .collect();
        self.store.apply(&[], &current).await.map(|_| ())
    }

    /// The circuit breaker: the store is down. The consumer (`feed`; `None` before it exists)
    /// is paused and polled between probes, so it delivers nothing yet stays in its group
    /// (it is resumed once the batch in hand is written, see [`StoreSink::run`]); the store is
    /// probed with the `store_probe` policy until a probe succeeds (`Ok(true)`, half-open: the
    /// caller writes the batch in hand again), shutdown comes (`Ok(false)`), the policy gives
    /// up or a probe fails permanently (`Err`).
    async fn wait_for_store(
        &self,
        error: StoreError,
        mut feed: Option<&mut Feed>,
        shutdown: &CancellationToken,
    ) -> Result<bool, SinkError> {
        let reason = store_error_kind(&error);
        if self.metrics.breaker().0 != BreakerState::Open {
            warn!(error = %error, "the context store is down: circuit breaker open, consumption paused until it answers");
        }
        self.metrics.set_breaker(BreakerState::Open, reason);
        if let Some(feed) = feed.as_deref_mut() {
            feed.pause().await;
        }
        // The outage this continues (a half-open trial failed), or a new one.
        let outage = self
            .outage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Outage {
            mut backoff,
            started,
        } = outage.unwrap_or_else(|| Outage {
            backoff: Backoff::unseeded(self.retry.policy(RetryStage::StoreProbe)),
            started: Instant::now(),
        });
        let mut last = error;
        loop {
            let Some(delay) = backoff.next_delay(started.elapsed()) else {
                return Err(SinkError::Store(last));
            };
            let waited = match feed.as_deref_mut() {
                Some(feed) => feed.idle_until(Instant::now() + delay, shutdown).await?,
                None => tokio::select! {
                    _ = shutdown.cancelled() => false,
                    _ = tokio::time::sleep(delay) => true,
                },
            };
            if !waited {
                return Ok(false);
            }
            self.metrics.record_retry(RetryStage::StoreProbe.name());
            match self.store.applied_offsets().await {
                Ok(_) => {
                    info!(down_for = ?started.elapsed(), "the context store answers again: circuit breaker half-open, retrying the batch");
                    self.metrics.set_breaker(BreakerState::HalfOpen, reason);
                    let outage = Outage { backoff, started };
                    *self.outage.lock().unwrap_or_else(PoisonError::into_inner) = Some(outage);
                    return Ok(true);
                }
                Err(e) if e.is_transient() => {
                    debug!(error = %e, "context store still down");
                    last = e;
                }
                Err(e) => return Err(SinkError::Store(e)),
            }
        }
    }

    /// [`StoreSink::rewind_group_to_store`], waiting out transient errors: a store that is
    /// down behind the circuit breaker, a log with backoff. `Ok(None)`: shutdown.
    async fn start_up(&self, shutdown: &CancellationToken) -> Result<Option<Handled>, SinkError> {
        let mut backoff = Backoff::unseeded(self.retry.policy(RetryStage::StoreProbe));
        let started = Instant::now();
        loop {
            match self.rewind_group_to_store(shutdown).await {
                Ok(None) => return Ok(None),
                Ok(Some(handled)) => {
                    if self.metrics.breaker().0 != BreakerState::Closed {
                        self.metrics.set_breaker(BreakerState::Closed, "none");
                    }
                    self.outage_over();
                    return Ok(Some(handled));
                }
                Err(SinkError::Store(e)) if e.is_transient() => {
                    // No consumer yet: no group membership to keep.
                    if !self.wait_for_store(e, None, shutdown).await? {
                        return Ok(None);
                    }
                }
                Err(SinkError::Log(e)) if e.is_transient() => {
                    let delay = backoff
                        .next_delay(started.elapsed())
                        .ok_or(SinkError::Log(e))?;
                    warn!(retry_in = ?delay, "reading the group's offsets failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The store's offsets are the truth. Where the group has committed past them (the store
    /// was deleted or restored from an older copy), rewind the group so that nothing the store
    /// lacks is skipped. A group behind the store needs nothing: the store skips what it has.
    /// `Ok(None)`: `shutdown` came while waiting for a busy group.
    async fn rewind_group_to_store(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Handled>, SinkError> {
        let applied = self.store.applied_offsets().await?;
        self.check_store_within_log(&applied).await?;
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
            return Ok(Some(applied));
        }
        warn!(%group, partitions = rewind.len(), "the group committed past what the store holds; rewinding it to the store's offsets");
        let rewound = crate::retry::rewind_group(
            self.log.as_ref(),
            group,
            &rewind,
            self.retry.waiting_policy(),
            shutdown,
        )
        .await?;
        Ok(rewound.then_some(applied))
    }

    /// The wait before retrying a failed poll or resume: the retry settings' waiting policy
    /// (growing with jitter, capped), started by the first failure of a run of them.
    fn next_failure_delay(&self, failing: &mut Option<Waiter>) -> Duration {
        failing
            .get_or_insert_with(|| Waiter::new(self.retry.waiting_policy()))
            .next_delay()
    }

    /// Fails when the store has applied offsets past a partition's high watermark: new records
    /// would get offsets the store takes for applied, and be skipped without a word.
    async fn check_store_within_log(&self, applied: &Handled) -> Result<(), SinkError> {
        let mut ahead = Vec::new();
        for topic in &self.consumer.topics {
            let description = match self.log.describe_topic(topic).await {
                Ok(description) => description,
                // Not there yet: nothing to be ahead of (its records are all new to the store).
                Err(LogError::UnknownTopic(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            for p in &description.partitions {
                let stored = applied.get(&(topic.clone(), p.partition)).copied();
                if let Some(stored) = stored.filter(|&s| s > p.high_watermark) {
                    ahead.push(format!(
                        "{topic}/{}: store at {stored}, log ends at {}",
                        p.partition, p.high_watermark
                    ));
                }
            }
        }
        if ahead.is_empty() {
            Ok(())
        } else {
            Err(SinkError::StoreAheadOfLog(ahead.join(", ")))
        }
    }
}

/// The next offset of every partition in `records`.
fn next_offsets(records: &[Record]) -> Vec<(TopicPartition, i64)> {
    let mut next: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    for r in records {
        let e = next.entry(r.topic_partition()).or_insert(r.offset + 1);
        *e = (*e).max(r.offset + 1);
    }
    next.into_iter().collect()
}

/// Adds `next` offsets to `into`, keeping the greater offset of a partition.
fn merge_offsets(into: &mut BTreeMap<TopicPartition, i64>, next: Vec<(TopicPartition, i64)>) {
    for (tp, offset) in next {
        let e = into.entry(tp).or_insert(offset);
        *e = (*e).max(offset);
    }
}

/// The next offsets a range of entries covers, as the store takes them.
fn range_offsets(records: &[Record], part: &[Entry]) -> Vec<(String, i32, i64)> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for e in part {
        let r = &records[e.record];
        let n = next.entry((&r.topic, r.partition)).or_insert(r.offset + 1);
        *n = (*n).max(r.offset + 1);
    }
    next.into_iter()
        .map(|((t, p), n)| (t.to_string(), p, n))
        .collect()
}

/// The updates of a range of entries: contiguous, because updates are made in record order.
fn update_range(part: &[Entry]) -> Range<usize> {
    let first = part.iter().find_map(|e| e.update);
    let last = part.iter().rev().find_map(|e| e.update);
    match (first, last) {
        (Some(first), Some(last)) => first..last + 1,
        _ => 0..0,
    }
}

/// Where to cut a range so that each side has about half its updates (at least one each).
fn split_point(part: &[Entry]) -> usize {
    let with_update: Vec<usize> = part
        .iter()
        .enumerate()
        .filter(|(_, e)| e.update.is_some())
        .map(|(i, _)| i)
        .collect();
    with_update[with_update.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(updates: &[bool]) -> Vec<Entry> {
        let mut n = 0;
        updates
            .iter()
            .enumerate()
            .map(|(i, has)| Entry {
                record: i,
                update: has.then(|| {
                    n += 1;
                    n - 1
                }),
            })
            .collect()
    }

    #[test]
    fn a_split_leaves_updates_on_both_sides() {
        for pattern in [
            vec![true, true],
            vec![false, true, false, true, false],
            vec![true, false, false, false, true, true, true],
        ] {
            let part = entries(&pattern);
            let mid = split_point(&part);
            let (left, right) = part.split_at(mid);
            assert!(left.iter().any(|e| e.update.is_some()), "{pattern:?}");
            assert!(right.iter().any(|e| e.update.is_some()), "{pattern:?}");
            let l = update_range(left);
            let r = update_range(right);
            assert_eq!(
                l.end, r.start,
                "{pattern:?}: the halves' updates are contiguous"
            );
        }
    }

    #[test]
    fn update_range_of_a_range_without_updates_is_empty() {
        assert!(update_range(&entries(&[false, false])).is_empty());
        assert_eq!(update_range(&entries(&[false, true, false])), 0..1);
    }
}
