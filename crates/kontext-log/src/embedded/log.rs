//! [`EmbeddedLog`]: the directory, its topics, and the [`Log`] implementation.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use kontext_core::partitioner::partition_for_key;
use kontext_core::record::{ProduceRecord, Record, RecordPosition, TopicPartition};
use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::config::{EmbeddedConfig, FsyncPolicy};
use super::consumer::{EmbeddedConsumer, GroupStore};
use super::format;
use super::fsutil;
use super::partition::{Partition, ReadOutcome};
use super::sync::{self, Queue, Shared};
use crate::{
    Consumer, ConsumerConfig, CreateOutcome, Log, LogError, PartitionInfo, Producer,
    TopicDescription, TopicSpec,
};

/// Upper bound on partitions per topic, to catch typos before they create a million directories.
const MAX_PARTITIONS: i32 = 10_000;

/// A durable log in a local directory: Kafka's model (topics, partitions, offsets, consumer
/// groups) for a single process, without a broker. See `docs/log-embedded.md` for the
/// file format, recovery and the guarantees of each [`FsyncPolicy`].
///
/// The directory is locked (an OS file lock on `<dir>/LOCK`) so that a second process cannot
/// open it. Dropping the last handle (including producers and consumers, which hold one)
/// stops the background thread after a final fsync of every partition.
pub struct EmbeddedLog {
    me: Weak<EmbeddedLog>,
    shared: Arc<Shared>,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serializes topic creation, which is rare and does blocking file-system work.
    admin: Mutex<()>,
    pub(crate) groups: GroupStore,
    background: Mutex<Option<JoinHandle<()>>>,
    _dir_lock: File,
}

pub(crate) struct Topic {
    pub spec: TopicSpec,
    pub partitions: Vec<Arc<Partition>>,
}

#[derive(Serialize, Deserialize)]
struct TopicMeta {
    version: u32,
    spec: TopicSpec,
}

impl EmbeddedLog {
    /// Opens the log in `dir` (created if missing), recovering every partition: segments are
    /// scanned and checksummed in full at open (this also rebuilds the sparse indexes; there
    /// are no index files), and a torn or corrupt tail is truncated.
    pub fn open(dir: &Path, config: EmbeddedConfig) -> Result<Arc<EmbeddedLog>, LogError> {
        config.validate()?;
        let dir = dir.to_path_buf();
        // Durably: a topic or a group's offsets written into them are synced with their own
        // directory, not with this one.
        fsutil::create_dir_durably(&dir.join("topics"))?;
        fsutil::create_dir_durably(&dir.join("groups"))?;
        let lock_path = dir.join("LOCK");
        let dir_lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| LogError::io(&lock_path, e))?;
        match dir_lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LogError::Unavailable(format!(
                    "the log directory {} is in use by another process",
                    dir.display()
                )))
            }
            Err(TryLockError::Error(e)) => return Err(LogError::io(&lock_path, e)),
        }

        let topics = load_topics(&dir, &config)?;
        let partitions = topics
            .values()
            .flat_map(|t| t.partitions.iter().cloned())
            .collect();
        let (data_version, _) = tokio::sync::watch::channel(0u64);
        // Opened before any write of this process, and kept: `syncfs` reports a writeback
        // error of the file system once per open file, for errors since that file was opened.
        // A descriptor opened per round would miss an error that background writeback met
        // before the round (and one another `syncfs` caller was told of first).
        let dir_handle = File::open(&dir).map_err(|e| LogError::io(&dir, e))?;
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            dir_handle,
            config,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            partitions: RwLock::new(partitions),
            data_version,
        });
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("kontext-log-sync".into())
            .spawn(move || sync::run(thread_shared))
            .map_err(|e| LogError::io(&dir, e))?;
        let groups = GroupStore::new(dir.join("groups"));
        Ok(Arc::new_cyclic(|me| EmbeddedLog {
            me: me.clone(),
            shared,
            topics: RwLock::new(topics),
            admin: Mutex::new(()),
            groups,
            background: Mutex::new(Some(handle)),
            _dir_lock: dir_lock,
        }))
    }

    /// The directory this log lives in.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &EmbeddedConfig {
        &self.shared.config
    }

    /// Reads up to `max_records` acknowledged records of one partition starting at `offset`.
    /// An offset equal to the high watermark gives an empty vector; one outside
    /// `[low, high]` gives [`LogError::OffsetOutOfRange`]. Blocking file reads: from async
    /// code this is fine for page-cache-resident data, which is the common case.
    pub fn fetch(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_records: usize,
    ) -> Result<Vec<Record>, LogError> {
        let p = self.partition(topic, partition)?;
        let mut out = Vec::new();
        match p.read(offset, max_records, usize::MAX, &mut out)? {
            ReadOutcome::Read { .. } => Ok(out),
            ReadOutcome::OutOfRange { low, high } => Err(LogError::OffsetOutOfRange {
                topic: topic.to_string(),
                partition,
                offset,
                low,
                high,
            }),
        }
    }

    /// Applies the retention limits of every topic now (the background thread also does it
    /// every `retention_check_interval`, and a partition on each segment roll). Returns the
    /// number of segments deleted.
    pub fn apply_retention(&self) -> usize {
        self.shared.apply_retention()
    }

    /// Appends records from any topics and waits until they are acknowledged under the
    /// fsync policy. All records are validated before any is written. If an I/O error hits
    /// one partition's write, the partitions written before it keep their records (they
    /// become visible with the next sync), as when a Kafka produce request fails for some of
    /// its partitions: a retry of the whole call may duplicate them.
    pub async fn append(
        &self,
        records: &[ProduceRecord],
        round_robin: &AtomicU32,
    ) -> Result<Vec<RecordPosition>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        match self.shared.config.fsync {
            FsyncPolicy::Never => {
                let (positions, touched) = self.append_unsynced(records, round_robin)?;
                self.shared.publish();
                for p in touched {
                    if p.take_flush_request() {
                        self.shared.request_background_sync(p);
                    }
                }
                Ok(positions)
            }
            FsyncPolicy::GroupCommit { .. } => {
                let (positions, touched) = self.append_unsynced(records, round_robin)?;
                match self.shared.enqueue(touched).await {
                    Ok(result) => result.map(|()| positions),
                    Err(_) => Err(LogError::Closed),
                }
            }
            FsyncPolicy::Always => {
                // The fsync blocks for milliseconds: keep it off the async worker threads.
                let me = self.me.upgrade().ok_or(LogError::Closed)?;
                let records = records.to_vec();
                let rr_start = round_robin.fetch_add(1, Ordering::Relaxed);
                let task = tokio::task::spawn_blocking(move || {
                    let rr = AtomicU32::new(rr_start);
                    let (positions, touched) = me.append_unsynced(&records, &rr)?;
                    for p in &touched {
                        p.sync(true)?;
                    }
                    me.shared.publish();
                    Ok(positions)
                });
                task.await.map_err(|e| LogError::Io {
                    path: self.shared.dir.clone(),
                    source: std::io::Error::other(format!("append task failed: {e}")),
                })?
            }
        }
    }

    /// Waits until every append written so far is acknowledged (only group commit has
    /// appends that are written but not yet acknowledged).
    pub async fn flush(&self) -> Result<(), LogError> {
        if !matches!(self.shared.config.fsync, FsyncPolicy::GroupCommit { .. }) {
            return Ok(());
        }
        let pending: Vec<_> = self
            .shared
            .partitions
            .read()
            .iter()
            .filter(|p| p.has_unsynced())
            .cloned()
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        self.shared
            .enqueue(pending)
            .await
            .map_err(|_| LogError::Closed)?
    }

    /// Validates and routes every record, then writes each partition's share with one write.
    /// Returns the positions in input order and the partitions written to.
    fn append_unsynced(
        &self,
        records: &[ProduceRecord],
        round_robin: &AtomicU32,
    ) -> Result<(Vec<RecordPosition>, Vec<Arc<Partition>>), LogError> {
        let max = self.shared.config.max_record_bytes;
        let mut touched: Vec<Arc<Partition>> = Vec::new();
        let mut slot_of: Vec<u32> = Vec::with_capacity(records.len());
        {
            let topics = self.topics.read();
            // Consecutive records usually share a topic: remember the last lookup, and the
            // partition keyless records of this call stick to (like Kafka's sticky partitioner).
            let mut current: Option<(&str, &Arc<Topic>, Option<i32>)> = None;
            for r in records {
                let len = format::frame_len(r);
                if len > max {
                    return Err(LogError::Invalid(format!(
                        "record of {len} bytes for topic {:?} exceeds max_record_bytes ({max})",
                        r.topic
                    )));
                }
                let (topic, sticky) = match current {
                    Some((name, t, sticky)) if name == r.topic => (t, sticky),
                    _ => {
                        let t = topics
                            .get(&r.topic)
                            .ok_or_else(|| LogError::UnknownTopic(r.topic.clone()))?;
                        (t, None)
                    }
                };
                let n = topic.partitions.len() as i32;
                let (partition, sticky) = match (r.partition, &r.key) {
                    (Some(p), _) => {
                        if p < 0 || p >= n {
                            return Err(LogError::UnknownPartition {
                                topic: r.topic.clone(),
                                partition: p,
                            });
                        }
                        (p, sticky)
                    }
                    (None, Some(key)) => (partition_for_key(key, n), sticky),
                    (None, None) => {
                        let p = sticky.unwrap_or_else(|| {
                            (round_robin.fetch_add(1, Ordering::Relaxed) % n as u32) as i32
                        });
                        (p, Some(p))
                    }
                };
                current = Some((r.topic.as_str(), topic, sticky));
                let part = &topic.partitions[partition as usize];
                let slot = match touched.iter().position(|t| Arc::ptr_eq(t, part)) {
                    Some(s) => s,
                    None => {
                        touched.push(part.clone());
                        touched.len() - 1
                    }
                };
                slot_of.push(slot as u32);
            }
        }

        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut positions = vec![
            RecordPosition {
                partition: 0,
                offset: 0
            };
            records.len()
        ];
        let all: Vec<u32> = if touched.len() == 1 {
            (0..records.len() as u32).collect()
        } else {
            Vec::new()
        };
        let mut indices: Vec<u32> = Vec::new();
        for (slot, part) in touched.iter().enumerate() {
            let idx: &[u32] = if touched.len() == 1 {
                &all
            } else {
                indices.clear();
                indices.extend(
                    (0..records.len() as u32).filter(|&i| slot_of[i as usize] == slot as u32),
                );
                &indices
            };
            let (first, _) = part.append(records, idx, now_ms, &self.shared.config)?;
            for (k, &i) in idx.iter().enumerate() {
                positions[i as usize] = RecordPosition {
                    partition: part.id,
                    offset: first + k as i64,
                };
            }
        }
        Ok((positions, touched))
    }

    pub(crate) fn topic(&self, name: &str) -> Result<Arc<Topic>, LogError> {
        self.topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::UnknownTopic(name.to_string()))
    }

    pub(crate) fn partition(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Arc<Partition>, LogError> {
        let t = self.topic(topic)?;
        usize::try_from(partition)
            .ok()
            .and_then(|i| t.partitions.get(i).cloned())
            .ok_or_else(|| LogError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            })
    }

    pub(crate) fn data_version(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.data_version.subscribe()
    }

    pub(crate) fn me(&self) -> Result<Arc<EmbeddedLog>, LogError> {
        self.me.upgrade().ok_or(LogError::Closed)
    }

    fn create_topic_blocking(&self, spec: &TopicSpec) -> Result<CreateOutcome, LogError> {
        spec.check_name()?;
        if spec.partitions < 1 || spec.partitions > MAX_PARTITIONS {
            return Err(LogError::Invalid(format!(
                "topic {:?}: partitions must be between 1 and {MAX_PARTITIONS}, got {}",
                spec.name, spec.partitions
            )));
        }
        let _admin = self.admin.lock();
        if let Some(existing) = self.topics.read().get(&spec.name) {
            return if existing.spec.partitions == spec.partitions {
                Ok(CreateOutcome::AlreadyExists)
            } else {
                Err(LogError::TopicMismatch {
                    topic: spec.name.clone(),
                    existing: existing.spec.partitions,
                    requested: spec.partitions,
                })
            };
        }
        // Partition directories first, meta.json last: a topic exists once its meta.json
        // does, so a crash half-way leaves a directory that open ignores and a retry reuses.
        let topic_dir = self.shared.dir.join("topics").join(&spec.name);
        fsutil::create_dir_durably(&topic_dir)?;
        let topic = open_topic(&topic_dir, spec.clone(), &self.shared.config)?;
        for id in 0..spec.partitions {
            fsutil::sync_dir(&topic_dir.join(id.to_string()))?;
        }
        fsutil::sync_dir(&topic_dir)?;
        let meta = serde_json::to_vec_pretty(&TopicMeta {
            version: 1,
            spec: spec.clone(),
        })
        .map_err(|e| LogError::Invalid(format!("topic spec: {e}")))?;
        fsutil::write_durably(&topic_dir.join("meta.json"), &meta)?;
        self.shared
            .partitions
            .write()
            .extend(topic.partitions.iter().cloned());
        self.topics
            .write()
            .insert(spec.name.clone(), Arc::new(topic));
        Ok(CreateOutcome::Created)
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        self.shared.queue.lock().shutdown = true;
        self.shared.wake.notify_all();
        // Joining makes close deterministic: when the drop returns, the final sync is done and
        // nothing touches the directory any more (so it can be reopened at once).
        if let Some(handle) = self.background.lock().take() {
            if handle.join().is_err() {
                tracing::error!("the embedded log's background thread panicked");
            }
        }
    }
}

#[async_trait]
impl Log for EmbeddedLog {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn create_topic(&self, spec: &TopicSpec) -> Result<CreateOutcome, LogError> {
        self.create_topic_blocking(spec)
    }

    async fn list_topics(&self) -> Result<Vec<String>, LogError> {
        Ok(self
            .topics
            .read()
            .keys()
            .filter(|n| !n.starts_with("__"))
            .cloned()
            .collect())
    }

    async fn read_partition(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        to: i64,
    ) -> Result<Vec<Record>, LogError> {
        let mut out = Vec::new();
        let mut at = from;
        while at < to {
            let records = self.fetch(topic, partition, at, 10_000)?;
            let Some(last) = records.last() else { break };
            at = last.offset + 1;
            out.extend(records.into_iter().filter(|r| r.offset < to));
        }
        Ok(out)
    }

    async fn describe_topic(&self, topic: &str) -> Result<TopicDescription, LogError> {
        let t = self.topic(topic)?;
        Ok(TopicDescription {
            name: t.spec.name.clone(),
            compacted: t.spec.compacted,
            retention: t.spec.retention,
            partitions: t
                .partitions
                .iter()
                .map(|p| PartitionInfo {
                    partition: p.id,
                    low_watermark: p.low_watermark(),
                    high_watermark: p.high_watermark(),
                })
                .collect(),
        })
    }

    async fn producer(&self) -> Result<Arc<dyn Producer>, LogError> {
        Ok(Arc::new(EmbeddedProducer {
            log: self.me()?,
            round_robin: AtomicU32::new(0),
        }))
    }

    async fn consumer(&self, config: ConsumerConfig) -> Result<Box<dyn Consumer>, LogError> {
        Ok(Box::new(EmbeddedConsumer::new(self.me()?, config)?))
    }

    async fn committed_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(i32, Option<i64>)>, LogError> {
        let t = self.topic(topic)?;
        let store = self.groups.group(group)?;
        let offsets = store.lock();
        Ok(t.partitions
            .iter()
            .map(|p| (p.id, offsets.get(topic, p.id)))
            .collect())
    }

    async fn reset_group_offsets(
        &self,
        group: &str,
        offsets: &[(TopicPartition, i64)],
    ) -> Result<(), LogError> {
        for (tp, offset) in offsets {
            self.partition(&tp.topic, tp.partition)?;
            if *offset < 0 {
                return Err(LogError::Invalid(format!(
                    "negative offset {offset} for {tp}"
                )));
            }
        }
        // The durable write fsyncs three times: keep it off the async worker threads.
        let me = self.me()?;
        let group = group.to_string();
        let offsets = offsets.to_vec();
        tokio::task::spawn_blocking(move || me.groups.reset(&group, &offsets))
            .await
            .map_err(|e| LogError::Io {
                path: self.shared.dir.clone(),
                source: std::io::Error::other(format!("offset reset task failed: {e}")),
            })?
    }

    async fn delete_group(&self, group: &str) -> Result<(), LogError> {
        let me = self.me()?;
        let group = group.to_string();
        tokio::task::spawn_blocking(move || me.groups.delete(&group))
            .await
            .map_err(|e| LogError::Io {
                path: self.shared.dir.clone(),
                source: std::io::Error::other(format!("group deletion task failed: {e}")),
            })?
    }
}

/// The embedded log's [`Producer`]: appends go straight to the partitions' segment files.
pub struct EmbeddedProducer {
    log: Arc<EmbeddedLog>,
    round_robin: AtomicU32,
}

#[async_trait]
impl Producer for EmbeddedProducer {
    async fn send(&self, records: Vec<ProduceRecord>) -> Result<Vec<RecordPosition>, LogError> {
        self.log.append(&records, &self.round_robin).await
    }

    async fn send_ref(&self, records: &[ProduceRecord]) -> Result<Vec<RecordPosition>, LogError> {
        self.log.append(records, &self.round_robin).await
    }

    async fn flush(&self) -> Result<(), LogError> {
        self.log.flush().await
    }
}

fn load_topics(
    dir: &Path,
    config: &EmbeddedConfig,
) -> Result<BTreeMap<String, Arc<Topic>>, LogError> {
    let topics_dir = dir.join("topics");
    let mut topics = BTreeMap::new();
    let mut seen = HashSet::new();
    for entry in fs::read_dir(&topics_dir).map_err(|e| LogError::io(&topics_dir, e))? {
        let entry = entry.map_err(|e| LogError::io(&topics_dir, e))?;
        let topic_dir = entry.path();
        if !topic_dir.is_dir() {
            continue;
        }
        let meta_path = topic_dir.join("meta.json");
        let raw = match fs::read(&meta_path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(dir = %topic_dir.display(), "ignoring a topic directory without meta.json (interrupted creation)");
                continue;
            }
            Err(e) => return Err(LogError::io(&meta_path, e)),
        };
        let meta: TopicMeta = serde_json::from_slice(&raw).map_err(|e| LogError::Corrupt {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        if !seen.insert(meta.spec.name.clone())
            || Some(meta.spec.name.as_str()) != topic_dir.file_name().and_then(|n| n.to_str())
        {
            return Err(LogError::Corrupt {
                path: meta_path,
                reason: "topic name does not match its directory".into(),
            });
        }
        let topic = open_topic(&topic_dir, meta.spec, config)?;
        topics.insert(topic.spec.name.clone(), Arc::new(topic));
    }
    Ok(topics)
}

fn open_topic(
    topic_dir: &Path,
    spec: TopicSpec,
    config: &EmbeddedConfig,
) -> Result<Topic, LogError> {
    let name: Arc<str> = spec.name.as_str().into();
    let partitions = (0..spec.partitions)
        .map(|id| {
            let dir: PathBuf = topic_dir.join(id.to_string());
            Partition::open(
                name.clone(),
                id,
                dir,
                spec.retention,
                spec.compacted,
                config,
            )
            .map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Topic { spec, partitions })
}
