//! Consumer groups: durable committed offsets and the single-member consumer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kontext_core::record::{Record, TopicPartition};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::fsutil;
use super::log::EmbeddedLog;
use super::partition::{Partition, ReadOutcome};
use crate::{Consumer, ConsumerConfig, LogError, OffsetReset};

/// A poll reads at most about this many bytes of frames per partition.
const MAX_POLL_BYTES_PER_PARTITION: usize = 8 << 20;

/// The committed offsets of every group, loaded lazily from `<dir>/groups/<group>.json`, and
/// the set of groups that have an active member.
pub(crate) struct GroupStore {
    dir: PathBuf,
    groups: Mutex<HashMap<String, Arc<Mutex<GroupOffsets>>>>,
    active: Mutex<HashSet<String>>,
}

/// One group's committed offsets: topic -> partition -> next offset to read.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct GroupOffsets {
    #[serde(skip)]
    path: PathBuf,
    version: u32,
    offsets: BTreeMap<String, BTreeMap<i32, i64>>,
}

impl GroupOffsets {
    pub fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.offsets
            .get(topic)
            .and_then(|t| t.get(&partition))
            .copied()
    }

    /// Applies `offsets` and rewrites the group's file durably (tmp, fsync, rename, fsync dir).
    /// The in-memory state changes only once the file is written, so a failed commit leaves
    /// both as they were.
    fn commit(&mut self, offsets: &[(TopicPartition, i64)]) -> Result<(), LogError> {
        let mut next = self.offsets.clone();
        for (tp, offset) in offsets {
            next.entry(tp.topic.to_string())
                .or_default()
                .insert(tp.partition, *offset);
        }
        let file = GroupOffsets {
            path: PathBuf::new(),
            version: 1,
            offsets: next,
        };
        let bytes =
            serde_json::to_vec(&file).map_err(|e| LogError::Invalid(format!("offsets: {e}")))?;
        fsutil::write_durably(&self.path, &bytes)?;
        self.offsets = file.offsets;
        Ok(())
    }
}

impl GroupStore {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            groups: Mutex::new(HashMap::new()),
            active: Mutex::new(HashSet::new()),
        }
    }

    /// Sets the committed offsets of a group that has no active member (the embedded
    /// `kafka-consumer-groups --reset-offsets`).
    /// Blocking (three fsyncs). The set of active groups stays locked until the offsets are
    /// written, so no member can join between the check and the commit.
    pub fn reset(&self, group: &str, offsets: &[(TopicPartition, i64)]) -> Result<(), LogError> {
        let active = self.active.lock();
        if active.contains(group) {
            return Err(LogError::GroupBusy(group.to_string()));
        }
        let g = self.group(group)?;
        let mut g = g.lock();
        g.commit(offsets)
    }

    /// The offsets of `group`, read from its file on first use.
    pub fn group(&self, group: &str) -> Result<Arc<Mutex<GroupOffsets>>, LogError> {
        let mut groups = self.groups.lock();
        if let Some(g) = groups.get(group) {
            return Ok(g.clone());
        }
        let path = self.dir.join(fsutil::group_file_name(group)?);
        let offsets = match std::fs::read(&path) {
            Ok(raw) => {
                let mut g: GroupOffsets =
                    serde_json::from_slice(&raw).map_err(|e| LogError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                g.path = path;
                g
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => GroupOffsets {
                path,
                version: 1,
                ..Default::default()
            },
            Err(e) => return Err(LogError::io(&path, e)),
        };
        let g = Arc::new(Mutex::new(offsets));
        groups.insert(group.to_string(), g.clone());
        Ok(g)
    }
}

/// The embedded log's [`Consumer`]: the only member of its group, assigned every partition of
/// its topics. Dropping it frees the group.
pub struct EmbeddedConsumer {
    log: Arc<EmbeddedLog>,
    group: String,
    offsets: Arc<Mutex<GroupOffsets>>,
    reset: OffsetReset,
    partitions: Vec<Assigned>,
    /// Where the next poll starts, rotated so every partition gets to go first in turn.
    cursor: usize,
    data_version: watch::Receiver<u64>,
}

struct Assigned {
    tp: TopicPartition,
    partition: Arc<Partition>,
    /// The next offset to read; `None` until the first poll decides from the committed offset
    /// or the reset policy.
    position: Option<i64>,
}

impl EmbeddedConsumer {
    pub(crate) fn new(log: Arc<EmbeddedLog>, config: ConsumerConfig) -> Result<Self, LogError> {
        if config.topics.is_empty() {
            return Err(LogError::Invalid(format!(
                "consumer group {:?} subscribes to no topic",
                config.group_id
            )));
        }
        let mut partitions = Vec::new();
        let mut seen = HashSet::new();
        for name in &config.topics {
            if !seen.insert(name.as_str()) {
                continue;
            }
            let topic = log.topic(name)?;
            for p in &topic.partitions {
                partitions.push(Assigned {
                    tp: TopicPartition::new(p.topic.clone(), p.id),
                    partition: p.clone(),
                    position: None,
                });
            }
        }
        let offsets = log.groups.group(&config.group_id)?;
        if !log.groups.active.lock().insert(config.group_id.clone()) {
            return Err(LogError::GroupBusy(config.group_id));
        }
        let data_version = log.data_version();
        Ok(Self {
            log,
            group: config.group_id,
            offsets,
            reset: config.offset_reset,
            partitions,
            cursor: 0,
            data_version,
        })
    }

    /// Reads what is available now, fairly: every partition first gets a share of
    /// `max_records`, then what is left goes to partitions with more data, starting at a
    /// rotating partition.
    fn read_available(&mut self, max_records: usize) -> Result<Vec<Record>, LogError> {
        let n = self.partitions.len();
        let mut out = Vec::new();
        if n == 0 {
            return Ok(out);
        }
        let share = max_records.div_ceil(n).max(1);
        let start = self.cursor;
        self.cursor = (self.cursor + 1) % n;
        for pass in 0..2 {
            for k in 0..n {
                let left = max_records - out.len();
                if left == 0 {
                    return Ok(out);
                }
                let quota = if pass == 0 { share.min(left) } else { left };
                let i = (start + k) % n;
                let before = out.len();
                if let Err(e) = self.read_partition(i, quota, &mut out) {
                    // Records handed out must match positions advanced: drop this partition's
                    // partial read (its position did not move). Records already read from
                    // other partitions are returned; the error comes back on the next poll.
                    out.truncate(before);
                    if out.is_empty() {
                        return Err(e);
                    }
                    tracing::warn!(group = %self.group, "poll stops early: {e}");
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    fn read_partition(
        &mut self,
        i: usize,
        quota: usize,
        out: &mut Vec<Record>,
    ) -> Result<(), LogError> {
        let reset = self.reset;
        let offsets = self.offsets.clone();
        let a = &mut self.partitions[i];
        let position = match a.position {
            Some(p) => p,
            None => {
                let p = offsets
                    .lock()
                    .get(&a.tp.topic, a.tp.partition)
                    .unwrap_or_else(|| match reset {
                        OffsetReset::Earliest => a.partition.low_watermark(),
                        OffsetReset::Latest => a.partition.high_watermark(),
                    });
                a.position = Some(p);
                p
            }
        };
        if position == a.partition.high_watermark() {
            return Ok(());
        }
        match a
            .partition
            .read(position, quota, MAX_POLL_BYTES_PER_PARTITION, out)?
        {
            ReadOutcome::Read { next } => a.position = Some(next),
            ReadOutcome::OutOfRange { low, high } => {
                // Retention passed the position, or it was committed beyond the end: do what
                // Kafka's auto.offset.reset does.
                let to = match reset {
                    OffsetReset::Earliest => low,
                    OffsetReset::Latest => high,
                };
                tracing::warn!(group = %self.group, partition = %a.tp, position, low, high, to, "offset out of range, resetting");
                a.position = Some(to);
                if let ReadOutcome::Read { next } =
                    a.partition
                        .read(to, quota, MAX_POLL_BYTES_PER_PARTITION, out)?
                {
                    a.position = Some(next);
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn poll(
        &mut self,
        max_records: usize,
        timeout: Duration,
    ) -> Result<Vec<Record>, LogError> {
        if max_records == 0 {
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Mark the current version seen before reading, so an append that lands after the
            // read still changes the version and wakes the wait below.
            self.data_version.borrow_and_update();
            let out = self.read_available(max_records)?;
            if !out.is_empty() {
                return Ok(out);
            }
            match tokio::time::timeout_at(deadline, self.data_version.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(LogError::Closed),
                Err(_) => return Ok(Vec::new()),
            }
        }
    }

    async fn commit(&mut self, offsets: &[(TopicPartition, i64)]) -> Result<(), LogError> {
        for (tp, offset) in offsets {
            self.log.partition(&tp.topic, tp.partition)?;
            if *offset < 0 {
                return Err(LogError::Invalid(format!(
                    "negative offset {offset} for {tp}"
                )));
            }
        }
        let store = self.offsets.clone();
        let offsets = offsets.to_vec();
        // Three fsyncs: keep them off the async worker threads.
        tokio::task::spawn_blocking(move || store.lock().commit(&offsets))
            .await
            .map_err(|e| LogError::Io {
                path: self.log.dir().to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.partitions.iter().map(|a| a.tp.clone()).collect()
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        self.log.groups.active.lock().remove(&self.group);
    }
}
