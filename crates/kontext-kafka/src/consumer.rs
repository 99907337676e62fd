//! A consumer group member whose offsets move only through explicit commits.
//!
//! Pausing ([`Consumer::pause`]) uses librdkafka's pause on the assigned partitions and keeps
//! polling, so the member stays in its group however long the pause lasts. librdkafka's pause
//! is per partition and applies only to partitions assigned at the time, while a rebalance
//! during the pause may assign new ones. So the member remembers what it paused, and every
//! poll while paused first pauses whatever was assigned since. A record that still arrives
//! (from a partition assigned between that check and the poll) is held, not returned and not
//! dropped, and its partition paused at once; held records come first after `resume`.
//! librdkafka's position follows what it handed out, so the partition then continues right
//! after the held record. Held records of a partition that moved to another member by then are
//! dropped: the new owner reads them from the group's committed offset.
//!
//! librdkafka keeps a partition's pause across rebalances (unlike Java), even after it was
//! revoked: `resume` therefore resumes everything it paused as well as the current assignment,
//! so a partition revoked during the pause and assigned back later is not stuck paused.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kontext_core::record::{Header, Record, TopicPartition};
use kontext_log::{Consumer, GroupMetadata, LogError};
use rdkafka::consumer::{CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};

use crate::error::log_error;
use crate::metadata::{blocking, drop_blocking};

/// A partition by name, as librdkafka's lists give them.
type Partition = (String, i32);

/// librdkafka's consumer as group members use it.
pub(crate) type GroupConsumer = StreamConsumer<GroupContext>;

/// A member of a Kafka consumer group, subscribed to its topics. Dropping it leaves the group
/// (librdkafka's close), so the partitions move to the other members at once rather than after
/// the session timeout.
pub struct KafkaConsumer {
    /// `None` only inside `drop`, which takes it out to close it in the right place.
    consumer: Option<Arc<GroupConsumer>>,
    /// The subscribed topics' names, shared by every record instead of allocated per record.
    topics: Vec<Arc<str>>,
    /// An error met after records were already taken from librdkafka's queue in the same poll:
    /// those records are returned first and the error on the next poll, so none is lost.
    pending_error: Option<LogError>,
    /// `Some` while paused: every partition paused since [`Consumer::pause`].
    paused: Option<BTreeSet<Partition>>,
    /// Records that arrived while paused (see the module documentation), returned first after
    /// [`Consumer::resume`]. At most a few per rebalance during the pause.
    held: VecDeque<Record>,
}

impl KafkaConsumer {
    pub(crate) fn new(consumer: GroupConsumer, topics: &[String]) -> Self {
        Self {
            consumer: Some(Arc::new(consumer)),
            topics: topics.iter().map(|t| Arc::from(t.as_str())).collect(),
            pending_error: None,
            paused: None,
            held: VecDeque::new(),
        }
    }

    fn consumer(&self) -> Result<&Arc<GroupConsumer>, LogError> {
        self.consumer.as_ref().ok_or(LogError::Closed)
    }

    /// Pauses the assigned partitions not paused yet (assigned by a rebalance since), plus
    /// `also`. The paused set is updated before waiting, so a poll cancelled here leaves it
    /// right: librdkafka's pause runs to the end on the blocking pool anyway.
    async fn pause_assigned(&mut self, also: Option<Partition>) -> Result<(), LogError> {
        let consumer = self.consumer()?.clone();
        let paused = self.paused.get_or_insert_with(BTreeSet::new);
        let assigned = assignment_of(&consumer)?;
        let mut list = TopicPartitionList::new();
        let mut added = Vec::new();
        for tp in assigned.into_iter().chain(also) {
            if paused.insert(tp.clone()) {
                list.add_partition(&tp.0, tp.1);
                added.push(tp);
            }
        }
        if list.count() == 0 {
            return Ok(());
        }
        // Synchronous in librdkafka: it waits until the fetchers have taken the pause.
        let result = blocking(move || {
            consumer
                .pause(&list)
                .map_err(|e| log_error("pausing partitions", e))
        })
        .await;
        if result.is_err() {
            // Not paused after all: the next paused poll tries them again.
            if let Some(paused) = self.paused.as_mut() {
                for tp in &added {
                    paused.remove(tp);
                }
            }
        }
        result
    }

    /// [`Consumer::poll`] while paused: waits out `timeout` serving the group (rebalances,
    /// the poll interval) and returns nothing; a record that arrives anyway is held.
    async fn poll_paused(&mut self, timeout: Duration) -> Result<Vec<Record>, LogError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.pause_assigned(None).await?;
        loop {
            let consumer = self.consumer()?.clone();
            let record = match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Err(_elapsed) => return Ok(Vec::new()),
                Ok(Err(err)) => return Err(poll_error(err)),
                Ok(Ok(message)) => self.record(&message),
            };
            let tp = (record.topic.to_string(), record.partition);
            tracing::debug!(partition = %record.topic_partition(), offset = record.offset, "a record arrived while paused (assigned by a rebalance during the pause); held until resume");
            self.held.push_back(record);
            // librdkafka's position is now past the held record; pausing also discards what
            // it already fetched behind it, to be fetched again after the resume.
            if let Some(paused) = self.paused.as_mut() {
                paused.remove(&tp);
            }
            self.pause_assigned(Some(tp)).await?;
        }
    }

    fn record(&self, message: &BorrowedMessage<'_>) -> Record {
        let name = message.topic();
        let topic = self
            .topics
            .iter()
            .find(|t| &***t == name)
            .cloned()
            .unwrap_or_else(|| Arc::from(name));
        to_record(message, topic)
    }
}

/// The output of `future` if it is ready on its first poll. (`recv` is then ready only when
/// librdkafka has already fetched a message; a pending one is dropped, which loses nothing.)
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    let mut context = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut context) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// A record of the log from a message of librdkafka.
pub(crate) fn to_record(message: &BorrowedMessage<'_>, topic: Arc<str>) -> Record {
    let headers = message
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| Header {
                    key: h.key.to_string(),
                    value: h.value.map(Bytes::copy_from_slice),
                })
                .collect()
        })
        .unwrap_or_default();
    Record {
        topic,
        partition: message.partition(),
        offset: message.offset(),
        // -1 is Kafka's own "no timestamp".
        timestamp_ms: message.timestamp().to_millis().unwrap_or(-1),
        key: message.key().map(Bytes::copy_from_slice),
        value: message.payload().map(Bytes::copy_from_slice),
        headers,
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    /// Waits up to `timeout` for the first record, then takes whatever else librdkafka has
    /// already fetched, without waiting, up to `max_records`. Polling is also what drives
    /// rebalances, so a member that stops polling for `max.poll.interval.ms` leaves the
    /// group: to wait without consuming, pause and keep polling (it then returns nothing).
    async fn poll(
        &mut self,
        max_records: usize,
        timeout: Duration,
    ) -> Result<Vec<Record>, LogError> {
        if let Some(err) = self.pending_error.take() {
            return Err(err);
        }
        let mut records = Vec::new();
        if max_records == 0 {
            return Ok(records);
        }
        if self.paused.is_some() {
            return self.poll_paused(timeout).await;
        }
        if !self.held.is_empty() {
            // Held while paused: they come before anything librdkafka fetches after them.
            let n = max_records.min(self.held.len());
            return Ok(self.held.drain(..n).collect());
        }
        // `recv` is cancellation safe: a timed-out wait loses no message.
        let consumer = self.consumer()?.clone();
        match tokio::time::timeout(timeout, consumer.recv()).await {
            Err(_elapsed) => return Ok(records),
            Ok(Err(err)) => return Err(poll_error(err)),
            Ok(Ok(message)) => records.push(self.record(&message)),
        }
        // From here on nothing awaits: a caller that drops this poll (a shutdown racing it
        // in `select!`) drops it either before the first record or after the return, never
        // while it holds records librdkafka counts as consumed.
        while records.len() < max_records {
            match ready_now(consumer.recv()) {
                Some(Ok(message)) => records.push(self.record(&message)),
                Some(Err(err)) => {
                    self.pending_error = Some(poll_error(err));
                    break;
                }
                None => break,
            }
        }
        Ok(records)
    }

    /// Commits synchronously: when this returns `Ok`, the group coordinator has stored the
    /// offsets. Fails when the group is rebalancing or this member's generation is no longer
    /// current; the records may then be delivered again to the partitions' owner (the offsets
    /// were also stored: a member that keeps the partitions commits them later). The coordinator
    /// does not check which member owns a partition: a member that rejoined after a rebalance
    /// can commit a partition it lost and rewind it. So commit the offsets of records polled
    /// in the current assignment (kontext's loops commit right after processing a batch;
    /// rebalances happen inside polls, and a batch gathered over several polls drops the
    /// records of partitions a later one took away: `kontext_stream`'s `backlog`).
    ///
    /// The offsets are also stored, as [`Consumer::commit_in_background`] stores them, so
    /// that an older stored offset is not committed over them when a rebalance revokes the
    /// partition or the consumer closes (librdkafka commits the stored offset as it is then).
    async fn commit(&mut self, offsets: &[(TopicPartition, i64)]) -> Result<(), LogError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let list = offset_list(offsets)?;
        let consumer = self.consumer()?.clone();
        // Stores what it can: partitions not assigned (any more) are skipped, and an error
        // means none was; the commit below reports what matters.
        let _ = consumer.store_offsets(&list);
        blocking(move || {
            consumer
                .commit(&list, CommitMode::Sync)
                .map_err(|e| log_error("committing offsets", e))
        })
        .await
    }

    /// Stores the offsets in librdkafka (`store_offsets`, no request), which commits what is
    /// stored every `auto.commit.interval.ms` (1 s unless the `properties` set it), when a
    /// rebalance revokes the partitions (so their new owner starts after them) and when the
    /// consumer closes (dropping it waits for that commit); its outcome is logged by the
    /// consumer's context (`GroupContext`). librdkafka skips offsets of partitions not
    /// assigned to this member (committing those would rewind them under their new owner),
    /// and returns an error only when it stored none. Stored offsets are dropped, not
    /// committed, when the member lost its assignment (a session timeout, `max.poll.interval.ms`
    /// exceeded): their records are delivered again. An empty [`Consumer::commit`] does not
    /// wait for stored offsets.
    async fn commit_in_background(
        &mut self,
        offsets: &[(TopicPartition, i64)],
    ) -> Result<(), LogError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let list = offset_list(offsets)?;
        self.consumer()?
            .store_offsets(&list)
            .map_err(|e| log_error("storing offsets to commit", e))
    }

    /// Pauses the current assignment and whatever a rebalance assigns until
    /// [`Consumer::resume`] (see the module documentation). Keep polling while paused.
    async fn pause(&mut self) -> Result<(), LogError> {
        let was_paused = self.paused.is_some();
        let result = self.pause_assigned(None).await;
        if result.is_err() && !was_paused {
            // The caller takes the consumer as not paused, so it must not act paused.
            self.paused = None;
        }
        result
    }

    /// Resumes every partition paused since [`Consumer::pause`] and the current assignment;
    /// held records of partitions no longer assigned are dropped (their new owner reads them).
    /// On error the consumer stays paused, and `resume` can be called again.
    async fn resume(&mut self) -> Result<(), LogError> {
        let Some(paused) = self.paused.clone() else {
            return Ok(());
        };
        let consumer = self.consumer()?.clone();
        let assigned: BTreeSet<Partition> = assignment_of(&consumer)?.into_iter().collect();
        let mut list = TopicPartitionList::new();
        for tp in paused.union(&assigned) {
            list.add_partition(&tp.0, tp.1);
        }
        blocking(move || {
            consumer
                .resume(&list)
                .map_err(|e| log_error("resuming partitions", e))
        })
        .await?;
        self.paused = None;
        let before = self.held.len();
        self.held
            .retain(|r| assigned.contains(&(r.topic.to_string(), r.partition)));
        if self.held.len() < before {
            tracing::debug!(
                dropped = before - self.held.len(),
                "held records of partitions revoked during the pause dropped; their new owner reads them"
            );
        }
        Ok(())
    }

    fn group_metadata(&self) -> Option<GroupMetadata> {
        let metadata = self.consumer.as_ref()?.group_metadata()?;
        Some(GroupMetadata(Box::new(metadata)))
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        // A request to librdkafka's main thread (short, but it blocks this thread meanwhile);
        // an error here only means "not assigned".
        let Some(Ok(list)) = self.consumer.as_ref().map(|c| c.assignment()) else {
            return Vec::new();
        };
        let mut out: Vec<TopicPartition> = list
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect();
        out.sort();
        out
    }
}

/// A poll's error. `PollExceeded` (the member did not poll for `max.poll.interval.ms`, so
/// librdkafka took it out of the group) is transient: the next poll rejoins the group, and
/// the records not committed are delivered again.
fn poll_error(err: KafkaError) -> LogError {
    if err.rdkafka_error_code() == Some(RDKafkaErrorCode::PollExceeded) {
        return LogError::Kafka {
            message: format!(
                "polling: {err}; the member left its group and rejoins at the next poll"
            ),
            transient: true,
        };
    }
    log_error("polling", err)
}

/// `offsets` as librdkafka's list; a negative offset is refused.
fn offset_list(offsets: &[(TopicPartition, i64)]) -> Result<TopicPartitionList, LogError> {
    let mut list = TopicPartitionList::with_capacity(offsets.len());
    for (tp, offset) in offsets {
        if *offset < 0 {
            return Err(LogError::Invalid(format!(
                "cannot commit offset {offset} for {tp}"
            )));
        }
        list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset))
            .map_err(|e| log_error(&format!("committing {tp}"), e))?;
    }
    Ok(list)
}

/// The client context of group members: logs the outcome of background offset commits,
/// which librdkafka reports only here.
pub(crate) struct GroupContext;

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, partitions = offsets.count(), "offset commit failed; the next commit covers its offsets");
        }
    }
}

/// The partitions assigned to `consumer`, from librdkafka's local state.
fn assignment_of(consumer: &GroupConsumer) -> Result<Vec<Partition>, LogError> {
    let list = consumer
        .assignment()
        .map_err(|e| log_error("reading the assignment", e))?;
    Ok(list
        .elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect())
}

impl Drop for KafkaConsumer {
    /// Closing a consumer blocks until it has left the group (`drop_blocking`).
    fn drop(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        if Arc::strong_count(&consumer) != 1 {
            // A commit on the blocking pool still holds it; the last holder closes it.
            return;
        }
        drop_blocking(consumer);
    }
}
