//! Cluster metadata: which topics exist, their partitions and watermarks, and the partition
//! counts the producer routes keys with.
//!
//! librdkafka's metadata and watermark calls block the calling thread until the broker
//! answers, so every call here runs on tokio's blocking pool.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kontext_log::{LogError, PartitionInfo};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;

use crate::error::{code_error, log_error};

/// A group-less consumer used only for metadata and watermark requests (a consumer, not an
/// admin client, because librdkafka offers `query_watermark_offsets` on consumers).
pub(crate) struct MetadataClient {
    client: Arc<BaseConsumer>,
    timeout: Duration,
}

impl MetadataClient {
    pub(crate) fn new(client: BaseConsumer, timeout: Duration) -> Self {
        Self {
            client: Arc::new(client),
            timeout,
        }
    }

    /// Every topic with its partition ids, sorted by partition.
    pub(crate) async fn topics(&self) -> Result<Vec<(String, Vec<i32>)>, LogError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        blocking(move || {
            let metadata = client
                .fetch_metadata(None, timeout)
                .map_err(|e| log_error("fetching metadata", e))?;
            Ok(metadata
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .map(|t| (t.name().to_string(), sorted_partitions(t)))
                .collect())
        })
        .await
    }

    /// The partition ids of `topic`, sorted, or `None` if the topic does not exist.
    pub(crate) async fn partitions(&self, topic: &str) -> Result<Option<Vec<i32>>, LogError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let topic = topic.to_string();
        blocking(move || {
            let metadata = client
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| log_error(&format!("fetching metadata of {topic:?}"), e))?;
            let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
                return Ok(None);
            };
            match found.error().map(RDKafkaErrorCode::from) {
                None => Ok(Some(sorted_partitions(found))),
                Some(RDKafkaErrorCode::UnknownTopicOrPartition) => Ok(None),
                // Shortly after creation a topic may have no leader yet.
                Some(code) => Err(code_error(&format!("metadata of {topic:?}"), code)),
            }
        })
        .await
    }

    /// Low and high watermarks of each partition, asked of the partitions' leaders.
    pub(crate) async fn watermarks(
        &self,
        topic: &str,
        partitions: Vec<i32>,
    ) -> Result<Vec<PartitionInfo>, LogError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let topic = topic.to_string();
        blocking(move || {
            partitions
                .into_iter()
                .map(|partition| {
                    let (low, high) = client
                        .fetch_watermarks(&topic, partition, timeout)
                        .map_err(|e| {
                            log_error(&format!("fetching watermarks of {topic}/{partition}"), e)
                        })?;
                    Ok(PartitionInfo {
                        partition,
                        low_watermark: low,
                        high_watermark: high,
                    })
                })
                .collect()
        })
        .await
    }
}

/// Partition counts of topics, as the producer needs them to route keys. An entry is trusted
/// for `max_age` and dropped early when a send reports that the topology changed.
pub(crate) struct PartitionCounts {
    metadata: Arc<MetadataClient>,
    max_age: Duration,
    counts: Mutex<HashMap<String, (i32, Instant)>>,
}

impl PartitionCounts {
    pub(crate) fn new(metadata: Arc<MetadataClient>, max_age: Duration) -> Self {
        Self {
            metadata,
            max_age,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// The number of partitions of `topic`, from the cache or from the cluster.
    pub(crate) async fn count(&self, topic: &str) -> Result<i32, LogError> {
        if let Some(&(count, fetched)) = self.counts.lock().get(topic) {
            if fetched.elapsed() < self.max_age {
                return Ok(count);
            }
        }
        let partitions = self
            .metadata
            .partitions(topic)
            .await?
            .ok_or_else(|| LogError::UnknownTopic(topic.to_string()))?;
        let count = i32::try_from(partitions.len()).unwrap_or(i32::MAX);
        if count == 0 {
            // Metadata without partitions: a topic in creation. Not cached, so the next send
            // asks again; transient, because waiting helps.
            return Err(LogError::Kafka {
                message: format!("topic {topic:?} has no partitions in the metadata yet"),
                transient: true,
            });
        }
        self.counts
            .lock()
            .insert(topic.to_string(), (count, Instant::now()));
        Ok(count)
    }

    /// Forgets the count of `topic`, so that the next send fetches it again.
    pub(crate) fn invalidate(&self, topic: &str) {
        self.counts.lock().remove(topic);
    }
}

/// Runs a blocking librdkafka call on tokio's blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, LogError>
where
    F: FnOnce() -> Result<T, LogError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        // The closure panicked or the runtime is shutting down: the call's outcome is unknown.
        Err(join) if join.is_cancelled() => Err(LogError::Closed),
        Err(join) => Err(LogError::Kafka {
            message: format!("blocking Kafka call failed: {join}"),
            transient: false,
        }),
    }
}

fn sorted_partitions(topic: &rdkafka::metadata::MetadataTopic) -> Vec<i32> {
    let mut ids: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    ids
}
