//! The producer: idempotent, `acks=all`, keys routed by kontext's Java-compatible partitioner.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kontext_core::partitioner::partition_for_key;
use kontext_core::record::TopicPartition;
use kontext_core::record::{ProduceRecord, RecordPosition};
use kontext_log::{GroupMetadata, LogError, Producer, TransactionalProducer};
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::error::log_error;
use crate::metadata::{blocking, drop_blocking, PartitionCounts};

/// Appends records to Kafka. One shared per [`crate::KafkaLog`] through an `Arc` (librdkafka
/// producers are thread-safe), and one more per `dedicated_producer` call.
pub struct KafkaProducer {
    /// `None` only once dropped.
    producer: Option<FutureProducer>,
    partitions: Arc<PartitionCounts>,
    /// How long `send` keeps retrying to enqueue into a full local queue (the analogue of the
    /// Java client's `max.block.ms`).
    queue_timeout: Duration,
}

impl KafkaProducer {
    pub(crate) fn new(
        producer: FutureProducer,
        partitions: Arc<PartitionCounts>,
        queue_timeout: Duration,
    ) -> Self {
        Self {
            producer: Some(producer),
            partitions,
            queue_timeout,
        }
    }

    fn client(&self) -> &FutureProducer {
        self.producer.as_ref().expect("taken only when dropped")
    }

    /// The partition of each record: explicit ones are checked, keyed ones computed with
    /// [`partition_for_key`] (librdkafka's default partitioner hashes with crc32 and would
    /// disagree with Java producers), keyless ones left to librdkafka.
    async fn route(&self, records: &[ProduceRecord]) -> Result<Vec<Option<i32>>, LogError> {
        let mut routes = Vec::with_capacity(records.len());
        for record in records {
            // Also checks that the topic exists: librdkafka would only fail the record after
            // `topic.metadata.propagation.max.ms` (30 s).
            let count = self.partitions.count(&record.topic).await?;
            let route = match (record.partition, &record.key) {
                (Some(p), _) if (0..count).contains(&p) => Some(p),
                (Some(p), _) => {
                    return Err(LogError::UnknownPartition {
                        topic: record.topic.clone(),
                        partition: p,
                    })
                }
                (None, Some(key)) => Some(partition_for_key(key, count)),
                (None, None) => None,
            };
            routes.push(route);
        }
        Ok(routes)
    }

    /// Puts one record into librdkafka's queue. When the queue is full, waits for deliveries
    /// to make room (the producer's background thread keeps delivering meanwhile).
    async fn enqueue(
        &self,
        record: &ProduceRecord,
        partition: Option<i32>,
    ) -> Result<DeliveryFuture, LogError> {
        let deadline = Instant::now() + self.queue_timeout;
        loop {
            let queue_full = match self.client().send_result(future_record(record, partition)) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if Instant::now() < deadline =>
                {
                    true
                }
                Err((err, _)) => {
                    return Err(log_error(&format!("enqueueing to {}", record.topic), err))
                }
            };
            if queue_full {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

#[async_trait]
impl Producer for KafkaProducer {
    /// Enqueues every record, then waits for every delivery report. Records of one partition
    /// are enqueued in order and idempotence keeps that order through retries. On failure the
    /// first error is returned, but only after every delivery of this call has settled, so a
    /// caller's retry never overlaps with records of this call still in flight.
    async fn send(&self, records: Vec<ProduceRecord>) -> Result<Vec<RecordPosition>, LogError> {
        self.send_ref(&records).await
    }

    async fn send_ref(&self, records: &[ProduceRecord]) -> Result<Vec<RecordPosition>, LogError> {
        let routes = self.route(records).await?;
        let mut deliveries = Vec::with_capacity(records.len());
        let mut first_error = None;
        for (record, partition) in records.iter().zip(&routes) {
            match self.enqueue(record, *partition).await {
                Ok(delivery) => deliveries.push((record, delivery)),
                Err(err) => {
                    first_error = Some(err);
                    break;
                }
            }
        }

        let mut positions = Vec::with_capacity(deliveries.len());
        for (record, delivery) in deliveries {
            let result = match delivery.await {
                Ok(Ok(d)) => Ok(RecordPosition {
                    partition: d.partition,
                    offset: d.offset,
                }),
                Ok(Err((err, _message))) => {
                    if matches!(
                        err.rdkafka_error_code(),
                        Some(RDKafkaErrorCode::UnknownPartition)
                            | Some(RDKafkaErrorCode::UnknownTopicOrPartition)
                    ) {
                        // The topic changed under us (deleted, recreated smaller).
                        self.partitions.invalidate(&record.topic);
                    }
                    Err(log_error(&format!("producing to {}", record.topic), err))
                }
                // The delivery callback was dropped: the producer is gone.
                Err(_canceled) => Err(LogError::Closed),
            };
            match result {
                Ok(position) => positions.push(position),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(positions),
        }
    }

    /// Waits for every outstanding delivery. Unbounded here because librdkafka bounds every
    /// record by `delivery.timeout.ms` (5 minutes by default) already.
    async fn flush(&self) -> Result<(), LogError> {
        let producer = self.client().clone();
        blocking(move || {
            producer
                .flush(Timeout::Never)
                .map_err(|e| log_error("flushing the producer", e))
        })
        .await
    }
}

/// A transactional producer (`transactional.id` set): the same routing and delivery as
/// [`KafkaProducer`], plus librdkafka's transaction calls, each run on the blocking pool with
/// the configured request timeout.
pub struct KafkaTransactionalProducer {
    inner: KafkaProducer,
    id: String,
    timeout: Duration,
}

impl KafkaTransactionalProducer {
    /// Registers the transactional id with its coordinator (`init_transactions`): fences any
    /// earlier producer with the id and aborts the transaction it left open.
    pub(crate) async fn init(
        producer: FutureProducer,
        id: String,
        partitions: Arc<PartitionCounts>,
        timeout: Duration,
    ) -> Result<Self, LogError> {
        let out = Self {
            inner: KafkaProducer::new(producer, partitions, timeout),
            id,
            timeout,
        };
        out.call("initializing transactions", |p, t| p.init_transactions(t))
            .await?;
        Ok(out)
    }

    async fn call<F>(&self, what: &str, f: F) -> Result<(), LogError>
    where
        F: FnOnce(&FutureProducer, Duration) -> rdkafka::error::KafkaResult<()> + Send + 'static,
    {
        let (producer, timeout) = (self.inner.client().clone(), self.timeout);
        let context = format!("{what} (transactional.id {:?})", self.id);
        blocking(move || f(&producer, timeout).map_err(|e| log_error(&context, e))).await
    }
}

#[async_trait]
impl Producer for KafkaTransactionalProducer {
    async fn send(&self, records: Vec<ProduceRecord>) -> Result<Vec<RecordPosition>, LogError> {
        self.inner.send_ref(&records).await
    }

    async fn send_ref(&self, records: &[ProduceRecord]) -> Result<Vec<RecordPosition>, LogError> {
        self.inner.send_ref(records).await
    }

    async fn flush(&self) -> Result<(), LogError> {
        self.inner.flush().await
    }
}

#[async_trait]
impl TransactionalProducer for KafkaTransactionalProducer {
    async fn begin(&self) -> Result<(), LogError> {
        // Not blocking in librdkafka: it only changes the producer's local state.
        self.inner
            .client()
            .begin_transaction()
            .map_err(|e| log_error(&format!("beginning a transaction of {:?}", self.id), e))
    }

    async fn commit(
        &self,
        group: GroupMetadata,
        offsets: &[(TopicPartition, i64)],
    ) -> Result<(), LogError> {
        let metadata = group.0.downcast::<ConsumerGroupMetadata>().map_err(|_| {
            LogError::Invalid(
                "committing a transaction needs a Kafka consumer group member".to_string(),
            )
        })?;
        let mut list = TopicPartitionList::with_capacity(offsets.len());
        for (tp, next) in offsets {
            list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*next))
                .map_err(|e| log_error("listing the offsets of a transaction", e))?;
        }
        if list.count() > 0 {
            self.call("adding the offsets to the transaction", move |p, t| {
                p.send_offsets_to_transaction(&list, &metadata, t)
            })
            .await?;
        }
        self.call("committing the transaction", |p, t| p.commit_transaction(t))
            .await
    }

    async fn abort(&self) -> Result<(), LogError> {
        self.call("aborting the transaction", |p, t| p.abort_transaction(t))
            .await
    }
}

fn future_record(record: &ProduceRecord, partition: Option<i32>) -> FutureRecord<'_, [u8], [u8]> {
    let mut out = FutureRecord::to(&record.topic);
    if let Some(key) = &record.key {
        out = out.key(key.as_ref());
    }
    if let Some(value) = &record.value {
        out = out.payload(value.as_ref());
    }
    if let Some(partition) = partition {
        out = out.partition(partition);
    }
    if let Some(ts) = record.timestamp_ms {
        out = out.timestamp(ts);
    }
    if !record.headers.is_empty() {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for h in &record.headers {
            // A header without a value stays without one (not an empty value), as in Kafka.
            headers = headers.insert(Header {
                key: &h.key,
                value: h.value.as_deref(),
            });
        }
        out = out.headers(headers);
    }
    out
}

impl Drop for KafkaProducer {
    /// librdkafka's producer, when its last handle goes, joins its poll thread, purges the
    /// records still queued or in flight (rdkafka's `BaseProducer::drop`), then waits up to
    /// 500 ms only to collect their delivery reports: records of a cancelled `send` may or may
    /// not land, and are not sent again. A wait announced to tokio, as a consumer's close is
    /// (`drop_blocking`).
    fn drop(&mut self) {
        if let Some(producer) = self.producer.take() {
            drop_blocking(producer);
        }
    }
}
