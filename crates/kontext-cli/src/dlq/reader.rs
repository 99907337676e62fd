//! Reading a range of a topic through the `Log` interface.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kontext_core::record::{Record, TopicPartition};
use kontext_log::{Consumer, ConsumerConfig, Log, LogError, TopicDescription};

/// A read that sees no record for this long while records are still expected gives up.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads each chosen partition of a topic from a start offset to the high watermark it had
/// when the reader opened. The `Log` interface reads through consumer groups only, so the
/// reader positions its group with `reset_group_offsets` before joining, and never commits.
pub(super) struct RangeReader {
    pub(super) topic: String,
    pub(super) consumer: Option<Box<dyn Consumer>>,
    /// Partitions not yet read to their end -> end (exclusive).
    pub(super) ends: HashMap<i32, i64>,
    pub(super) last_progress: Instant,
}

impl RangeReader {
    pub(super) fn empty(topic: &str) -> Self {
        Self {
            topic: topic.to_string(),
            consumer: None,
            ends: HashMap::new(),
            last_progress: Instant::now(),
        }
    }

    pub(super) async fn open(
        log: &dyn Log,
        group: &str,
        desc: &TopicDescription,
        starts: &BTreeMap<i32, i64>,
    ) -> Result<Self> {
        let mut reader = Self::empty(&desc.name);
        let mut positions = Vec::with_capacity(desc.partitions.len());
        for p in &desc.partitions {
            let tp = TopicPartition::new(desc.name.as_str(), p.partition);
            match starts.get(&p.partition) {
                Some(start) => {
                    let start = (*start).clamp(p.low_watermark, p.high_watermark);
                    if start < p.high_watermark {
                        reader.ends.insert(p.partition, p.high_watermark);
                    }
                    positions.push((tp, start));
                }
                // Partitions we do not want: start at the end, read nothing.
                None => positions.push((tp, p.high_watermark)),
            }
        }
        if reader.ends.is_empty() {
            return Ok(reader);
        }
        log.reset_group_offsets(group, &positions)
            .await
            .map_err(|e| match e {
                LogError::GroupBusy(_) => anyhow!(
                    "consumer group {group:?} has an active member: another `kontext dlq` \
                     command is reading, or one just died (Kafka frees its place after the \
                     session timeout); try again shortly"
                ),
                e => anyhow::Error::new(e).context(format!("positioning group {group:?}")),
            })?;
        let consumer = log
            .consumer(ConsumerConfig::new(group, vec![desc.name.clone()]))
            .await
            .with_context(|| format!("reading {}", desc.name))?;
        reader.consumer = Some(consumer);
        reader.last_progress = Instant::now();
        Ok(reader)
    }

    /// The next records in range (in offset order per partition); `None` once every
    /// partition is read to its end. The consumer leaves its group at that point, so the next
    /// reader can reuse the group.
    pub(super) async fn next_batch(&mut self) -> Result<Option<Vec<Record>>> {
        loop {
            if self.ends.is_empty() {
                self.consumer = None;
                return Ok(None);
            }
            let Some(consumer) = self.consumer.as_mut() else {
                return Ok(None);
            };
            let records = consumer
                .poll(1000, Duration::from_millis(500))
                .await
                .with_context(|| format!("reading {}", self.topic))?;
            if records.is_empty() {
                if self.last_progress.elapsed() > STALL_TIMEOUT {
                    let mut left: Vec<_> = self.ends.iter().collect();
                    left.sort();
                    bail!(
                        "reading {} stalled: no record for {:?} while partitions (partition, end) \
                         {left:?} are not read to their end",
                        self.topic,
                        STALL_TIMEOUT
                    );
                }
                continue;
            }
            self.last_progress = Instant::now();
            let mut out = Vec::with_capacity(records.len());
            for r in records {
                let Some(end) = self.ends.get(&r.partition).copied() else {
                    continue;
                };
                if r.offset + 1 >= end {
                    self.ends.remove(&r.partition);
                }
                if r.offset < end {
                    out.push(r);
                }
            }
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
    }
}
