//! A consumer group member whose offsets move only through explicit commits.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kontext_core::record::{Header, Record, TopicPartition};
use kontext_log::{Consumer, LogError};
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::log_error;
use crate::metadata::blocking;

/// A member of a Kafka consumer group, subscribed to its topics. Dropping it leaves the group
/// (librdkafka's close), so the partitions move to the other members at once rather than after
/// the session timeout.
pub struct KafkaConsumer {
    /// `None` only inside `drop`, which takes it out to close it in the right place.
    consumer: Option<Arc<StreamConsumer>>,
    /// The subscribed topics' names, shared by every record instead of allocated per record.
    topics: Vec<Arc<str>>,
    /// An error met after records were already taken from librdkafka's queue in the same poll:
    /// those records are returned first and the error on the next poll, so none is lost.
    pending_error: Option<LogError>,
}

impl KafkaConsumer {
    pub(crate) fn new(consumer: StreamConsumer, topics: &[String]) -> Self {
        Self {
            consumer: Some(Arc::new(consumer)),
            topics: topics.iter().map(|t| Arc::from(t.as_str())).collect(),
            pending_error: None,
        }
    }

    fn consumer(&self) -> Result<&Arc<StreamConsumer>, LogError> {
        self.consumer.as_ref().ok_or(LogError::Closed)
    }

    fn record(&self, message: &BorrowedMessage<'_>) -> Record {
        let name = message.topic();
        let topic = self
            .topics
            .iter()
            .find(|t| &***t == name)
            .cloned()
            .unwrap_or_else(|| Arc::from(name));
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
}

#[async_trait]
impl Consumer for KafkaConsumer {
    /// Waits up to `timeout` for the first record, then takes whatever else librdkafka has
    /// already fetched, without waiting, up to `max_records`. Polling is also what drives
    /// rebalances, so a member that stops polling for `max.poll.interval.ms` leaves the group.
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
        // `recv` is cancellation safe: a timed-out wait loses no message.
        let consumer = self.consumer()?.clone();
        match tokio::time::timeout(timeout, consumer.recv()).await {
            Err(_elapsed) => return Ok(records),
            Ok(Err(err)) => return Err(log_error("polling", err)),
            Ok(Ok(message)) => records.push(self.record(&message)),
        }
        while records.len() < max_records {
            // A zero timeout polls `recv` once: ready only if a message is already fetched.
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(message)) => records.push(self.record(&message)),
                Ok(Err(err)) => {
                    self.pending_error = Some(log_error("polling", err));
                    break;
                }
                Err(_nothing_ready) => break,
            }
        }
        Ok(records)
    }

    /// Commits synchronously: when this returns `Ok`, the group coordinator has stored the
    /// offsets. Fails (not transient) when the partitions were revoked in a rebalance; their
    /// records will then be delivered again to their new owner.
    async fn commit(&mut self, offsets: &[(TopicPartition, i64)]) -> Result<(), LogError> {
        if offsets.is_empty() {
            return Ok(());
        }
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
        let consumer = self.consumer()?.clone();
        blocking(move || {
            consumer
                .commit(&list, CommitMode::Sync)
                .map_err(|e| log_error("committing offsets", e))
        })
        .await
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        // librdkafka answers from its local state; an error here only means "not assigned".
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

impl Drop for KafkaConsumer {
    /// Closing a consumer blocks until it has left the group. On a multi-threaded runtime that
    /// wait is announced to tokio (`block_in_place`) so other tasks move off this thread; on a
    /// current-thread runtime (where that is not allowed) or outside one it simply blocks.
    fn drop(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        if Arc::strong_count(&consumer) != 1 {
            // A commit on the blocking pool still holds it; the last holder closes it.
            return;
        }
        let in_multi_thread_runtime = tokio::runtime::Handle::try_current()
            .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            .unwrap_or(false);
        if in_multi_thread_runtime {
            tokio::task::block_in_place(move || drop(consumer));
        } else {
            drop(consumer);
        }
    }
}
