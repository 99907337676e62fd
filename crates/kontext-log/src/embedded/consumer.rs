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

    /// Deletes a group without an active member: its file and its cached offsets. Blocking
    /// (removes the file, fsyncs the directory).
    pub fn delete(&self, group: &str) -> Result<(), LogError> {
        let active = self.active.lock();
        if active.contains(group) {
            return Err(LogError::GroupBusy(group.to_string()));
        }
        let path = self.dir.join(fsutil::group_file_name(group)?);
        self.groups.lock().remove(group);
        match std::fs::remove_file(&path) {
            Ok(()) => fsutil::sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LogError::io(&path, e)),
        }
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
    /// Set by [`Consumer::pause`]: `poll` reads nothing until [`Consumer::resume`]. The only
    /// member of its group holds every partition, so there is no rebalance to pause through
    /// and no membership to keep alive.
    paused: bool,
    /// The commit [`Consumer::commit_in_background`] started, if it may still run: the next
    /// commit waits for it, so commits take effect in order, and so does dropping the
    /// consumer, so nothing writes the group's offsets after it left the group.
    background: Option<Commit>,
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
        // Member first, then the offsets: `delete_group` refuses a group with a member, so
        // it cannot remove the offsets between the two (a consumer would then start from the
        // deleted group's offsets, and its first commit write them back).
        if !log.groups.active.lock().insert(config.group_id.clone()) {
            return Err(LogError::GroupBusy(config.group_id));
        }
        let offsets = match log.groups.group(&config.group_id) {
            Ok(offsets) => offsets,
            Err(e) => {
                log.groups.active.lock().remove(&config.group_id);
                return Err(e);
            }
        };
        let data_version = log.data_version();
        Ok(Self {
            log,
            group: config.group_id,
            offsets,
            reset: config.offset_reset,
            partitions,
            cursor: 0,
            data_version,
            paused: false,
            background: None,
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

/// A commit running on the blocking pool.
struct Commit {
    task: tokio::task::JoinHandle<Result<(), LogError>>,
    /// Closed when the write is over (or never started), for a wait outside async code.
    /// (In a mutex only so that the consumer stays `Sync`.)
    over: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl EmbeddedConsumer {
    /// Checks `offsets` and starts writing them on the blocking pool (three fsyncs).
    fn start_commit(&self, offsets: &[(TopicPartition, i64)]) -> Result<Commit, LogError> {
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
        let (tx, over) = std::sync::mpsc::channel::<()>();
        let task = tokio::task::spawn_blocking(move || {
            let _over = tx; // dropped when the write is over
            store.lock().commit(&offsets)
        });
        Ok(Commit {
            task,
            over: Mutex::new(over),
        })
    }

    async fn join_commit(&self, commit: Commit) -> Result<(), LogError> {
        commit.task.await.map_err(|e| LogError::Io {
            path: self.log.dir().to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    /// Waits for the background commit, if one was started; logs its failure (the commit
    /// that follows covers its offsets).
    async fn finish_background(&mut self) {
        if let Some(commit) = self.background.take() {
            if let Err(e) = self.join_commit(commit).await {
                tracing::warn!(group = %self.group, error = %e, "background offset commit failed; the next commit covers it");
            }
        }
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
        if self.paused {
            // Positions stay where they are: after `resume` the next poll reads from them.
            tokio::time::sleep(timeout).await;
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
        self.finish_background().await;
        if offsets.is_empty() {
            return Ok(()); // waited for the background commit: all this call is for
        }
        let commit = self.start_commit(offsets)?;
        self.join_commit(commit).await
    }

    async fn commit_in_background(
        &mut self,
        offsets: &[(TopicPartition, i64)],
    ) -> Result<(), LogError> {
        self.finish_background().await;
        self.background = Some(self.start_commit(offsets)?);
        Ok(())
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.partitions.iter().map(|a| a.tp.clone()).collect()
    }

    async fn pause(&mut self) -> Result<(), LogError> {
        self.paused = true;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), LogError> {
        self.paused = false;
        Ok(())
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        if let Some(commit) = self.background.take() {
            // Blocks for at most the commit's fsyncs; an error is what closing the channel
            // without a message means: the write is over, or will never start.
            let _ = commit.over.into_inner().recv();
        }
        self.log.groups.active.lock().remove(&self.group);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use kontext_core::record::ProduceRecord;

    use super::*;
    use crate::{Log, TopicSpec};

    const SHORT: Duration = Duration::from_millis(20);

    async fn send(log: &EmbeddedLog, range: std::ops::Range<usize>) {
        let records = range
            .map(|i| ProduceRecord {
                topic: "t".into(),
                partition: Some((i % 2) as i32),
                value: Some(Bytes::from(i.to_string())),
                ..Default::default()
            })
            .collect();
        log.producer()
            .await
            .expect("producer")
            .send(records)
            .await
            .expect("send");
    }

    #[tokio::test]
    async fn a_paused_consumer_delivers_nothing_and_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EmbeddedLog::open(dir.path(), Default::default()).expect("open");
        log.create_topic(&TopicSpec::new("t", 2))
            .await
            .expect("create");
        send(&log, 0..10).await;
        let mut c = log
            .consumer(ConsumerConfig::new("g", vec!["t".into()]))
            .await
            .expect("consumer");
        let first = c.poll(4, SHORT).await.expect("poll");
        assert_eq!(first.len(), 4);

        c.pause().await.expect("pause");
        c.pause().await.expect("pausing twice changes nothing");
        send(&log, 10..20).await;
        assert!(c.poll(100, SHORT).await.expect("poll").is_empty());
        assert_eq!(c.assignment().len(), 2, "still assigned while paused");
        c.commit(&[(TopicPartition::new("t", 0), 1)])
            .await
            .expect("commit while paused");

        c.resume().await.expect("resume");
        c.resume().await.expect("resuming twice changes nothing");
        let mut rest = Vec::new();
        loop {
            let got = c.poll(100, SHORT).await.expect("poll");
            if got.is_empty() {
                break;
            }
            rest.extend(got);
        }
        let mut seen: Vec<String> = first
            .iter()
            .chain(&rest)
            .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into())
            .collect();
        seen.sort_by_key(|v| v.parse::<usize>().unwrap_or(usize::MAX));
        let want: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        assert_eq!(seen, want, "every record once, none skipped by the pause");
    }
}
