//! Reading a range of a topic through the `Log` interface.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use kontext_core::record::Record;
use kontext_log::{Log, TopicDescription};

/// Records read per call: bounds memory for large dead-letter topics.
const CHUNK: i64 = 10_000;

/// Reads each chosen partition of a topic from a start offset to the high watermark it had
/// when the reader opened, with `Log::read_partition`: outside any consumer group, so nothing
/// is committed, no group is left behind, and concurrent readers do not disturb each other.
pub(super) struct RangeReader {
    pub(super) topic: String,
    log: Option<Arc<dyn Log>>,
    /// Partitions not yet read to their end -> (next offset, end exclusive).
    ranges: BTreeMap<i32, (i64, i64)>,
}

impl RangeReader {
    pub(super) fn empty(topic: &str) -> Self {
        Self {
            topic: topic.to_string(),
            log: None,
            ranges: BTreeMap::new(),
        }
    }

    pub(super) fn open(
        log: Arc<dyn Log>,
        desc: &TopicDescription,
        starts: &BTreeMap<i32, i64>,
    ) -> Self {
        let mut reader = Self::empty(&desc.name);
        for p in &desc.partitions {
            if let Some(start) = starts.get(&p.partition) {
                let start = (*start).clamp(p.low_watermark, p.high_watermark);
                if start < p.high_watermark {
                    reader.ranges.insert(p.partition, (start, p.high_watermark));
                }
            }
        }
        reader.log = Some(log);
        reader
    }

    /// The next records in range (in offset order per partition, partition by partition);
    /// `None` once every partition is read to its end.
    pub(super) async fn next_batch(&mut self) -> Result<Option<Vec<Record>>> {
        let Some(log) = self.log.clone() else {
            return Ok(None);
        };
        while let Some((&partition, &(from, end))) = self.ranges.iter().next() {
            let to = end.min(from.saturating_add(CHUNK));
            let records = log
                .read_partition(&self.topic, partition, from, to)
                .await
                .with_context(|| format!("reading {}/{partition}", self.topic))?;
            // A compacted topic has gaps: the chunk is done even if its last offsets are not.
            if to >= end {
                self.ranges.remove(&partition);
            } else {
                self.ranges.insert(partition, (to, end));
            }
            if !records.is_empty() {
                return Ok(Some(records));
            }
        }
        Ok(None)
    }
}
