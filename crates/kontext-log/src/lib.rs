//! The Log: topics, partitions, produce, fetch, consumer groups with committed offsets, high
//! watermarks and admin, behind one interface with two backends.
//!
//! - [`embedded`]: a durable on-disk log in the data directory (the default; no Kafka needed).
//! - `kontext-kafka`: Apache Kafka through rdkafka.
//!
//! The log is the source of truth of a kontext pipeline: every store can be rebuilt from it.

pub mod embedded;
mod error;
mod types;

pub use error::LogError;

/// A topic written in Kafka transactions ends with a commit marker and may hold aborted
/// records: offsets a `read_committed` reader never receives, so a consumer that read
/// everything can stay short of the high watermark. Below this many offsets of difference, a
/// gap is worth reading ([`Log::read_partition`]) to tell markers from records still to come;
/// above it, it is counted as records, which keeps the check cheap.
pub const MARKER_GAP: i64 = 64;
pub use types::*;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kontext_core::record::{ProduceRecord, Record, RecordPosition, TopicPartition};

/// A log backend: the admin surface plus factories for producers and consumers.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// `"embedded"` or `"kafka"`, for logs and `topics list`.
    fn backend(&self) -> &'static str;

    /// Creates a topic. Creating a topic that exists with the same partition count is not an
    /// error ([`CreateOutcome::AlreadyExists`]), so that start-up can always ensure its topics.
    async fn create_topic(&self, spec: &TopicSpec) -> Result<CreateOutcome, LogError>;

    /// Topic names, sorted. Internal topics (names starting with `__`) are left out.
    async fn list_topics(&self) -> Result<Vec<String>, LogError>;

    /// Partitions with low and high watermarks, and the topic's configuration.
    async fn describe_topic(&self, topic: &str) -> Result<TopicDescription, LogError>;

    /// A producer. Producers are cheap to clone through the `Arc` and safe to share.
    async fn producer(&self) -> Result<Arc<dyn Producer>, LogError>;

    /// A producer for one loop that produces to many partitions per batch and waits for the
    /// acknowledgements. On Kafka each call creates a client with its own connections, so that
    /// the loop's requests do not wait behind other loops' (a broker serves one connection's
    /// requests one at a time): call it once per loop and keep the result. Dropping the last
    /// handle closes the client, and records not yet acknowledged are lost, so await every
    /// send first. Backends where sharing costs nothing (the embedded log) return the shared
    /// [`Log::producer`], the default; a `Log` that wraps another should forward this call.
    async fn dedicated_producer(&self) -> Result<Arc<dyn Producer>, LogError> {
        self.producer().await
    }

    /// A member of a consumer group subscribed to `config.topics`.
    async fn consumer(&self, config: ConsumerConfig) -> Result<Box<dyn Consumer>, LogError>;

    /// The committed offsets of `group` for every partition of `topic` (`None`: nothing
    /// committed yet). The offset is the next one the group will read, as in Kafka.
    async fn committed_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(i32, Option<i64>)>, LogError>;

    /// Reads the records of one partition with offsets in `[from, to)`, outside any consumer
    /// group (a compacted topic may have gaps: only the records that exist). For restoring
    /// state from a changelog; `to` is usually the high watermark read just before.
    async fn read_partition(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        to: i64,
    ) -> Result<Vec<Record>, LogError> {
        let _ = (partition, from, to);
        Err(LogError::Invalid(format!(
            "{} log cannot read {topic:?} outside a consumer group",
            self.backend()
        )))
    }

    /// A producer whose sends are grouped into transactions that commit atomically with a
    /// consumer group's offsets (Kafka's consume-transform-produce, `transactional.id` =
    /// `transactional_id`). Creating it fences any earlier producer with the same id and aborts
    /// the transaction that producer left open, so give each instance of a task its own stable
    /// id. Only Kafka has transactions; the default refuses.
    async fn transactional_producer(
        &self,
        transactional_id: &str,
    ) -> Result<Arc<dyn TransactionalProducer>, LogError> {
        Err(LogError::Invalid(format!(
            "{} log has no transactions (transactional id {transactional_id:?})",
            self.backend()
        )))
    }

    /// Sets the committed offsets of a group that has no active member, like
    /// `kafka-consumer-groups --reset-offsets`. A store that lost data (or a new store) uses it
    /// to rewind its group to what the store actually holds.
    async fn reset_group_offsets(
        &self,
        group: &str,
        offsets: &[(TopicPartition, i64)],
    ) -> Result<(), LogError> {
        let _ = offsets;
        Err(LogError::Invalid(format!(
            "{} log cannot reset the offsets of group {group:?}",
            self.backend()
        )))
    }

    /// How many members the consumer group `group` has now (0 for a group without members or
    /// unknown to the log), or `None` where a group cannot have more than one (the embedded
    /// log's groups are exclusive to one consumer).
    async fn group_members(&self, group: &str) -> Result<Option<usize>, LogError> {
        let _ = group;
        Ok(None)
    }

    /// Deletes a consumer group that has no active member, with its committed offsets, like
    /// `kafka-consumer-groups --delete`: what a finished job (a store rebuild) does with the
    /// group it used. [`LogError::GroupBusy`] while a member is active; a group that does not
    /// exist is deleted already.
    async fn delete_group(&self, group: &str) -> Result<(), LogError> {
        Err(LogError::Invalid(format!(
            "{} log cannot delete group {group:?}",
            self.backend()
        )))
    }
}

/// Appends records to the log.
#[async_trait]
pub trait Producer: Send + Sync {
    /// Appends `records` and returns, in the same order, where each one landed. The call
    /// returns once every record is acknowledged: for the embedded log that is after the fsync
    /// its [`embedded::FsyncPolicy`] asks for; for Kafka after `acks=all` with idempotence.
    ///
    /// A record without a partition goes to `partition_for_key(key)`; without a key either, to
    /// a partition of the producer's choosing.
    async fn send(&self, records: Vec<ProduceRecord>) -> Result<Vec<RecordPosition>, LogError>;

    /// [`Producer::send`] that leaves the records with the caller, for callers that may send
    /// them again (a retry). Both backends only read the records; the default copies them.
    async fn send_ref(&self, records: &[ProduceRecord]) -> Result<Vec<RecordPosition>, LogError> {
        self.send(records.to_vec()).await
    }

    /// Waits until everything sent so far is acknowledged.
    async fn flush(&self) -> Result<(), LogError>;
}

/// A transactional producer ([`Log::transactional_producer`]). One transaction at a time:
/// [`TransactionalProducer::begin`], any number of [`Producer::send`]s (acknowledged, but
/// invisible to `read_committed` readers until the commit), then
/// [`TransactionalProducer::commit`] with the input offsets, or
/// [`TransactionalProducer::abort`].
///
/// After any error inside a transaction, abort it; if the abort fails too (a fenced or
/// otherwise fatal producer), drop the producer and create a new one with the same id. The
/// outcome of a commit that returned an error is uncertain: it may have landed.
#[async_trait]
pub trait TransactionalProducer: Producer {
    /// Starts a transaction.
    async fn begin(&self) -> Result<(), LogError>;

    /// Adds `offsets` (the next offset to read, per partition) of the group member `group`
    /// ([`Consumer::group_metadata`]) to the transaction, then commits it: the records sent
    /// since [`TransactionalProducer::begin`] and the offsets become visible together, or
    /// neither. The group generation travels with the offsets, so a member the group has
    /// already replaced cannot commit (KIP-447 fencing).
    async fn commit(
        &self,
        group: GroupMetadata,
        offsets: &[(TopicPartition, i64)],
    ) -> Result<(), LogError>;

    /// Aborts the open transaction: its records are never visible to `read_committed` readers.
    async fn abort(&self) -> Result<(), LogError>;
}

/// A consumer's group membership as a transaction coordinator needs it (group, generation,
/// member id), opaque outside its backend.
pub struct GroupMetadata(pub Box<dyn std::any::Any + Send + Sync>);

/// A consumer group member. Offsets are committed explicitly, only after the records' effects
/// are durable downstream (at-least-once; stores make it effectively-once).
#[async_trait]
pub trait Consumer: Send {
    /// Up to `max_records` records, waiting at most `timeout` for the first one. An empty
    /// vector means nothing new arrived in time. Records of one partition come in offset order.
    /// Cancel safe: a poll dropped before it returns (a shutdown racing it in `select!`) has
    /// taken no record, so the next poll returns them.
    async fn poll(
        &mut self,
        max_records: usize,
        timeout: Duration,
    ) -> Result<Vec<Record>, LogError>;

    /// Commits, for each partition, the offset of the next record to read.
    async fn commit(&mut self, offsets: &[(TopicPartition, i64)]) -> Result<(), LogError>;

    /// [`Consumer::commit`] without waiting until it is durable, for a caller whose own state
    /// records how far it got, so that a commit a crash loses (or a late one that lands after
    /// a newer one) only re-delivers records the caller skips. The next poll then does not
    /// wait out a round trip to the group coordinator (Kafka) or the offsets file's fsyncs
    /// (embedded). Embedded: each commit starts once the one before it ended. Kafka: the
    /// offsets are stored in the client, which commits the newest stored ones every
    /// `auto.commit.interval.ms` (1 s by default), when a rebalance revokes their partitions
    /// and at close, so many calls cost one request (a retried older commit may still land
    /// after a newer one). One that fails is logged by the backend,
    /// and the next one covers its offsets. An error returned here is one found before
    /// starting (an invalid offset; on Kafka, no partition of them assigned to this member).
    /// Dropping the consumer waits for them (embedded: `Drop`; Kafka: librdkafka's close); on
    /// the embedded log, so does [`Consumer::commit`] with no offsets. The default waits, as
    /// [`Consumer::commit`].
    async fn commit_in_background(
        &mut self,
        offsets: &[(TopicPartition, i64)],
    ) -> Result<(), LogError> {
        self.commit(offsets).await
    }

    /// The partitions currently assigned to this member.
    fn assignment(&self) -> Vec<TopicPartition>;

    /// Stops delivering records without leaving the group, until [`Consumer::resume`].
    ///
    /// The contract, for every backend:
    /// - while paused, `poll` returns no record of any partition, including partitions a
    ///   rebalance assigns after the pause; it still waits up to its timeout;
    /// - the caller keeps calling `poll` while paused: that is what keeps the member in its
    ///   group (on Kafka, a member that does not poll for `max.poll.interval.ms` is removed,
    ///   and polling serves the group's rebalances);
    /// - nothing is skipped: after `resume`, each partition still assigned continues with the
    ///   first record `poll` has not returned yet. A partition that moved to another member
    ///   meanwhile continues there from the group's committed offset, as in any rebalance;
    /// - `commit` and `assignment` work as usual; pausing a paused consumer and resuming one
    ///   that is not paused change nothing.
    ///
    /// The default refuses (a permanent [`LogError::Invalid`]) for backends that cannot
    /// pause; callers then stop polling instead, which keeps the records just as well but not,
    /// on Kafka, the group membership.
    async fn pause(&mut self) -> Result<(), LogError> {
        Err(LogError::Invalid(
            "this consumer cannot pause its partitions".to_string(),
        ))
    }

    /// Delivers records again after [`Consumer::pause`]. The default does nothing: a consumer
    /// whose `pause` refuses is never paused.
    async fn resume(&mut self) -> Result<(), LogError> {
        Ok(())
    }

    /// The membership a [`TransactionalProducer`] commits offsets for; `None` for backends
    /// without transactions (the default) or before the member joined its group.
    fn group_metadata(&self) -> Option<GroupMetadata> {
        None
    }
}
