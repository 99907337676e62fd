//! One partition: its segment files, the append path, the read path, recovery and retention.
//!
//! Locking: all mutable state sits behind one `parking_lot::Mutex` per partition, held only for
//! synchronous work (never across `.await`). Readers hold it just long enough to find the
//! segment and file position to read from, then read with positional reads (`pread`) outside
//! the lock. The visible end of the partition is the atomic `acked` high watermark, which only
//! advances once records are acknowledged under the fsync policy, so readers never see a
//! record that a crash could take back.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use kontext_core::record::{ProduceRecord, Record};
use parking_lot::Mutex;

use super::config::{EmbeddedConfig, FsyncPolicy};
use super::format::{self, Peek};
use super::fsutil;
use crate::{LogError, Retention};

/// Recovery and the read path read segments in chunks of at most this size.
const MAX_READ_CHUNK: usize = 1 << 20;
const FIRST_READ_CHUNK: usize = 64 << 10;

pub(crate) struct Partition {
    pub topic: Arc<str>,
    pub id: i32,
    dir: PathBuf,
    retention: Retention,
    compacted: bool,
    /// The high watermark: offsets below it are acknowledged and visible to readers.
    acked: AtomicI64,
    state: Mutex<State>,
}

struct State {
    /// Sorted by base offset; the last one is the active segment. Never empty.
    segments: Vec<Segment>,
    next_offset: i64,
    /// Segments rolled since the last fsync, which the next sync must cover as well.
    pending_sync: Vec<Arc<File>>,
    /// A segment file was created since the last fsync of the partition directory.
    dir_dirty: bool,
    /// Under [`FsyncPolicy::Never`]: a segment was rolled and nobody asked the background
    /// thread to fsync it yet.
    flush_requested: bool,
    /// Reused encode buffer, so appends do not allocate once it has grown.
    buf: Vec<u8>,
    /// Set when a write could not be undone or an fsync failed: the state of the file is then
    /// unknown, so the partition refuses appends until the log is reopened (and recovered).
    failed: Option<String>,
}

struct Segment {
    base: i64,
    /// The offset after the segment's last record.
    end: i64,
    size: u64,
    /// Open only for the active segment: a log with thousands of segments should not need
    /// thousands of file descriptors. Reads of older segments open them on demand.
    file: Option<Arc<File>>,
    path: PathBuf,
    index: SparseIndex,
    last_append: SystemTime,
}

impl Segment {
    fn position_for(&self, offset: i64) -> u64 {
        self.index.lookup(self.base, offset)
    }
}

/// (offset, position) of a record every `index_interval_bytes` or so, stored relative to the
/// segment as two `u32`s: 8 bytes per entry, 0.2% of the data at the default interval.
#[derive(Default)]
struct SparseIndex {
    entries: Vec<(u32, u32)>,
    /// The position of the last indexed record.
    last_pos: Option<u64>,
}

impl SparseIndex {
    /// Adds an entry if the record at `pos` is `interval` bytes past the last one. An entry
    /// that does not fit in `u32` (only a single batch of over 4 GiB could cause that) is
    /// skipped: the index is sparse, a missing entry only means a longer scan.
    fn maybe_push(&mut self, base: i64, offset: i64, pos: u64, interval: u64) {
        if self.last_pos.is_some_and(|p| pos - p < interval) {
            return;
        }
        if let (Ok(o), Ok(p)) = (u32::try_from(offset - base), u32::try_from(pos)) {
            self.entries.push((o, p));
            self.last_pos = Some(pos);
        }
    }

    /// The position of the closest indexed record at or before `offset` (0 if none).
    fn lookup(&self, base: i64, offset: i64) -> u64 {
        let rel = offset - base;
        let i = self.entries.partition_point(|&(o, _)| i64::from(o) <= rel);
        i.checked_sub(1).map_or(0, |i| u64::from(self.entries[i].1))
    }

    /// Undoes pushes after a failed write.
    fn restore(&mut self, len: usize, last_pos: Option<u64>) {
        self.entries.truncate(len);
        self.last_pos = last_pos;
    }
}

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadOutcome {
    /// Records were appended to the output (possibly none); `next` is the offset to read next.
    Read { next: i64 },
    /// The offset is below the low watermark or above the high watermark.
    OutOfRange { low: i64, high: i64 },
}

impl Partition {
    /// Opens (creating if needed) the partition directory and recovers it: every segment is
    /// scanned and checksummed, which also rebuilds the sparse index. At the first frame that
    /// is torn, fails its checksum or breaks the offset sequence, the segment is truncated and
    /// any later segment removed, leaving the longest valid prefix. A gap between two segments
    /// is repaired the same way under [`FsyncPolicy::Never`] (a power loss makes one) and is
    /// [`LogError::Corrupt`] under the other policies (no crash makes one).
    pub fn open(
        topic: Arc<str>,
        id: i32,
        dir: PathBuf,
        retention: Retention,
        compacted: bool,
        config: &EmbeddedConfig,
    ) -> Result<Partition, LogError> {
        if !dir.exists() {
            fsutil::create_dir_durably(&dir)?;
        }
        let mut files: Vec<(i64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| LogError::io(&dir, e))? {
            let entry = entry.map_err(|e| LogError::io(&dir, e))?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(base) = name
                .strip_suffix(".log")
                .and_then(|b| b.parse::<i64>().ok())
            {
                files.push((base, path));
            }
        }
        files.sort();

        let mut segments: Vec<Segment> = Vec::new();
        let mut iter = files.into_iter();
        while let Some((base, path)) = iter.next() {
            if let Some(prev) = segments.last() {
                if prev.end != base {
                    let reason = format!(
                        "segment starts at offset {base}, the previous one ends at {}",
                        prev.end
                    );
                    // Under `never` a power loss can keep a new segment's directory entry and
                    // lose the unsynced tail of the one it rolled from; nothing after it was
                    // acknowledged by an fsync. Under the other policies a roll syncs the old
                    // segment before the new file exists, so no crash leaves a gap: it is
                    // damage, and repairing it could delete acknowledged records.
                    if config.fsync != FsyncPolicy::Never || prev.end > base {
                        return Err(LogError::Corrupt { path, reason });
                    }
                    tracing::warn!(segment = %path.display(), "removing a segment that does not follow on from the previous one (the tail of an unsynced segment lost in a power loss): {reason}");
                    for later in std::iter::once(path).chain(iter.map(|(_, p)| p)) {
                        fs::remove_file(&later).map_err(|e| LogError::io(&later, e))?;
                    }
                    fsutil::sync_dir(&dir)?;
                    break;
                }
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| LogError::io(&path, e))?;
            let meta = file.metadata().map_err(|e| LogError::io(&path, e))?;
            let scan = scan_segment(&file, &path, base, meta.len(), config.index_interval_bytes)?;
            let last_append = meta.modified().unwrap_or_else(|_| SystemTime::now());
            let valid_len = scan.valid_len;
            let torn = scan.problem.is_some();
            if let Some(problem) = scan.problem {
                tracing::warn!(
                    segment = %path.display(), valid_len, file_len = meta.len(), next_offset = scan.end,
                    "truncating the log after the last valid record: {problem}"
                );
                file.set_len(valid_len)
                    .map_err(|e| LogError::io(&path, e))?;
                file.sync_all().map_err(|e| LogError::io(&path, e))?;
            }
            // Only the last segment keeps its file open: a partition of a thousand segments
            // must not hold a thousand descriptors while it is scanned.
            if let Some(prev) = segments.last_mut() {
                prev.file = None;
            }
            segments.push(Segment {
                base,
                end: scan.end,
                size: valid_len,
                file: Some(Arc::new(file)),
                path,
                index: scan.index,
                last_append,
            });
            if torn {
                // Records after a hole cannot be kept: offsets must stay dense.
                for (_, later) in iter.by_ref() {
                    tracing::warn!(segment = %later.display(), "removing a segment that follows a truncated one");
                    fs::remove_file(&later).map_err(|e| LogError::io(&later, e))?;
                }
                fsutil::sync_dir(&dir)?;
            }
        }
        if segments.is_empty() {
            segments.push(create_segment(&dir, 0)?);
            fsutil::sync_dir(&dir)?;
        }
        let next_offset = segments.last().map_or(0, |s| s.end);
        Ok(Partition {
            topic,
            id,
            dir,
            retention,
            compacted,
            acked: AtomicI64::new(next_offset),
            state: Mutex::new(State {
                segments,
                next_offset,
                pending_sync: Vec::new(),
                dir_dirty: false,
                flush_requested: false,
                buf: Vec::new(),
                failed: None,
            }),
        })
    }

    /// The high watermark: the offset the next acknowledged record will get.
    pub fn high_watermark(&self) -> i64 {
        self.acked.load(Ordering::Acquire)
    }

    /// The first offset still in the log.
    pub fn low_watermark(&self) -> i64 {
        self.state.lock().segments.first().map_or(0, |s| s.base)
    }

    /// Under [`FsyncPolicy::Never`]: whether a segment rolled since the last call, so the
    /// background thread should fsync it (as Kafka flushes a segment when it rolls).
    pub fn take_flush_request(&self) -> bool {
        std::mem::take(&mut self.state.lock().flush_requested)
    }

    /// Whether appends are waiting for an fsync (group commit).
    pub fn has_unsynced(&self) -> bool {
        self.state.lock().next_offset > self.high_watermark()
    }

    /// Encodes the records `records[i] for i in indices` into one buffer and writes it with one
    /// positional write at the end of the active segment. Returns the first offset assigned
    /// and the offset after the last. Under [`FsyncPolicy::Never`] the records are visible at
    /// once; otherwise the caller has to sync ([`Partition::sync`]) before they are.
    ///
    /// A batch always lands in one segment: the segment is rolled first if the batch would
    /// take it past `segment_bytes`, so a segment exceeds it only when a single batch does.
    pub fn append(
        &self,
        records: &[ProduceRecord],
        indices: &[u32],
        timestamp_now: i64,
        config: &EmbeddedConfig,
    ) -> Result<(i64, i64), LogError> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if let Some(reason) = &st.failed {
            return Err(self.failed_error(reason));
        }
        let batch_len: u64 = indices
            .iter()
            .map(|&i| format::frame_len(&records[i as usize]) as u64)
            .sum();
        let needs_roll = st
            .segments
            .last()
            .is_some_and(|s| s.size > 0 && s.size + batch_len > config.segment_bytes);
        if needs_roll {
            self.roll(st, config)?;
        }
        let first = st.next_offset;
        let interval = u64::from(config.index_interval_bytes);
        let State { segments, buf, .. } = st;
        let Some(active) = segments.last_mut() else {
            return Err(LogError::Corrupt {
                path: self.dir.clone(),
                reason: "partition has no segment".into(),
            });
        };
        let Some(file) = active.file.clone() else {
            return Err(corrupt(
                &active.path,
                "the active segment is not open".into(),
            ));
        };
        let index_before = (active.index.entries.len(), active.index.last_pos);
        buf.clear();
        buf.reserve(batch_len as usize);
        for (k, &i) in indices.iter().enumerate() {
            let offset = first + k as i64;
            let pos = active.size + buf.len() as u64;
            active.index.maybe_push(active.base, offset, pos, interval);
            let record = &records[i as usize];
            format::encode(
                buf,
                offset,
                record.timestamp_ms.unwrap_or(timestamp_now),
                record,
            );
        }
        if let Err(e) = file.write_all_at(buf, active.size) {
            active.index.restore(index_before.0, index_before.1);
            // Cut off whatever part of the batch reached the file, so the segment stays a
            // sequence of whole frames; if even that fails the file is in an unknown state.
            if let Err(e2) = file.set_len(active.size) {
                st.failed = Some(format!("write failed ({e}) and could not be undone ({e2})"));
            }
            return Err(LogError::io(&active.path, e));
        }
        let end = first + indices.len() as i64;
        active.size += buf.len() as u64;
        active.end = end;
        active.last_append = SystemTime::now();
        st.next_offset = end;
        // A very large batch should not pin its buffer forever.
        if st.buf.capacity() > 16 * MAX_READ_CHUNK {
            st.buf = Vec::new();
        }
        if config.fsync == FsyncPolicy::Never {
            self.acked.store(end, Ordering::Release);
        }
        Ok((first, end))
    }

    /// Makes everything appended so far durable (the active segment, segments rolled since the
    /// last sync, the directory entry of new segments), then publishes it to readers.
    ///
    /// With `hold_lock` the partition stays locked through the fsync, serializing it with
    /// appends: the [`FsyncPolicy::Always`] cost model, and safe with concurrent callers.
    /// Without it (the group-commit syncer, the only caller then) appends continue while the
    /// fsync runs: the offsets captured before it are exactly what it covers, because their
    /// bytes were written before the capture and an fsync covers every write that completed
    /// before it started.
    pub fn sync(&self, hold_lock: bool) -> Result<(), LogError> {
        let mut st = self.state.lock();
        let Some(upto) = self.unsynced(&st)? else {
            return Ok(());
        };
        let active = st.segments.last().and_then(|s| s.file.clone());
        let result = if hold_lock {
            let r = sync_files(&self.dir, &st.pending_sync, active.as_ref(), st.dir_dirty);
            if r.is_ok() {
                st.pending_sync.clear();
                st.dir_dirty = false;
            }
            r
        } else {
            let pending = std::mem::take(&mut st.pending_sync);
            let dir_dirty = std::mem::replace(&mut st.dir_dirty, false);
            drop(st);
            let r = sync_files(&self.dir, &pending, active.as_ref(), dir_dirty);
            st = self.state.lock();
            r
        };
        self.synced(&mut st, upto, result)
    }

    /// The first half of a sync that the caller makes for the whole file system at once
    /// (`syncfs`, the group-commit syncer's way when a round touched several partitions):
    /// captures the offset it will cover. `Ok(None)`: nothing to sync. As with
    /// [`Partition::sync`] without the lock, appends continue meanwhile and the captured
    /// offsets are exactly what the sync covers.
    pub fn begin_external_sync(&self) -> Result<Option<i64>, LogError> {
        let mut st = self.state.lock();
        let Some(upto) = self.unsynced(&st)? else {
            return Ok(None);
        };
        // Rolled segments and new directory entries are covered by a file-system sync too.
        st.pending_sync.clear();
        st.dir_dirty = false;
        Ok(Some(upto))
    }

    /// The second half: publishes `upto` as durable, or marks the partition failed.
    pub fn end_external_sync(
        &self,
        upto: i64,
        result: Result<(), LogError>,
    ) -> Result<(), LogError> {
        let mut st = self.state.lock();
        self.synced(&mut st, upto, result)
    }

    /// The offset a sync starting now would cover, `None` if everything is synced already;
    /// an error once the partition failed.
    fn unsynced(&self, st: &State) -> Result<Option<i64>, LogError> {
        if let Some(reason) = &st.failed {
            return Err(self.failed_error(reason));
        }
        let upto = st.next_offset;
        let clean = upto == self.high_watermark() && st.pending_sync.is_empty() && !st.dir_dirty;
        Ok((!clean).then_some(upto))
    }

    fn synced(
        &self,
        st: &mut State,
        upto: i64,
        result: Result<(), LogError>,
    ) -> Result<(), LogError> {
        match result {
            Ok(()) => {
                self.acked.fetch_max(upto, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                // After a failed fsync the kernel may have dropped the dirty pages: nothing
                // written since the last good sync can be trusted until recovery re-reads it.
                st.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Appends the records of `[from, high watermark)` to `out`, at most `max_records` of
    /// them, stopping after about `max_bytes` of frames (at least one record is returned if
    /// any is available).
    pub fn read(
        &self,
        from: i64,
        max_records: usize,
        max_bytes: usize,
        out: &mut Vec<Record>,
    ) -> Result<ReadOutcome, LogError> {
        let high = self.high_watermark();
        if from > high {
            return Ok(ReadOutcome::OutOfRange {
                low: self.low_watermark(),
                high,
            });
        }
        if from == high || max_records == 0 {
            return Ok(ReadOutcome::Read { next: from });
        }
        let mut next = from;
        let mut taken = 0usize;
        let mut bytes = 0usize;
        let mut chunk = FIRST_READ_CHUNK;
        while next < high && taken < max_records && bytes < max_bytes {
            let (open_file, path, mut pos, seg_size, seg_end) = {
                let st = self.state.lock();
                let low = st.segments.first().map_or(0, |s| s.base);
                if next < low || next > high {
                    if taken == 0 {
                        return Ok(ReadOutcome::OutOfRange { low, high });
                    }
                    break;
                }
                let i = st.segments.partition_point(|s| s.base <= next);
                let Some(seg) = i.checked_sub(1).and_then(|i| st.segments.get(i)) else {
                    break;
                };
                if next >= seg.end {
                    break;
                }
                (
                    seg.file.clone(),
                    seg.path.clone(),
                    seg.position_for(next),
                    seg.size,
                    seg.end,
                )
            };
            let file = match open_file {
                Some(f) => f,
                None => match File::open(&path) {
                    Ok(f) => Arc::new(f),
                    // Retention deleted it since the lookup: look again, the low watermark
                    // has moved past it.
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound
                            && self.low_watermark() > next =>
                    {
                        continue;
                    }
                    Err(e) => return Err(LogError::io(&path, e)),
                },
            };
            let stop = seg_end.min(high);
            while next < stop && taken < max_records && bytes < max_bytes {
                let want = (seg_size - pos).min(chunk as u64) as usize;
                if want == 0 {
                    return Err(corrupt(
                        &path,
                        format!("offset {next} missing before the segment end"),
                    ));
                }
                let mut v = vec![0u8; want];
                file.read_exact_at(&mut v, pos)
                    .map_err(|e| LogError::io(&path, e))?;
                let data = Bytes::from(v);
                let mut off = 0usize;
                while off < data.len() {
                    match format::peek(&data[off..]) {
                        Peek::Frame { offset, len } => {
                            // Checked first: with `next < stop`, a frame at or past `stop`
                            // would otherwise end the loop without progress.
                            if offset > next {
                                return Err(corrupt(
                                    &path,
                                    format!("expected offset {next}, found {offset}"),
                                ));
                            }
                            if offset == next {
                                let d = format::decode(&data, off, len).ok_or_else(|| {
                                    corrupt(&path, format!("malformed record at offset {offset}"))
                                })?;
                                out.push(Record {
                                    topic: self.topic.clone(),
                                    partition: self.id,
                                    offset: d.offset,
                                    timestamp_ms: d.timestamp_ms,
                                    key: d.key,
                                    value: d.value,
                                    headers: d.headers,
                                });
                                next += 1;
                                taken += 1;
                                bytes += len;
                            }
                            off += len;
                            if taken >= max_records || bytes >= max_bytes || next >= stop {
                                break;
                            }
                        }
                        Peek::Incomplete { needed } => {
                            let needed = needed.unwrap_or(format::FRAME_HEADER);
                            if pos + (off + needed) as u64 > seg_size {
                                return Err(corrupt(
                                    &path,
                                    format!("record at offset {next} runs past the segment end"),
                                ));
                            }
                            chunk = chunk.max(needed);
                            break;
                        }
                        Peek::Invalid(reason) => {
                            return Err(corrupt(
                                &path,
                                format!("{reason} at position {}", pos + off as u64),
                            ));
                        }
                    }
                }
                pos += off as u64;
                chunk = (chunk * 2).min(MAX_READ_CHUNK).max(chunk);
            }
        }
        Ok(ReadOutcome::Read { next })
    }

    /// Deletes whole non-active segments from the front while the retention limits ask for
    /// it; returns how many were deleted. Only segments whose records are all acknowledged
    /// are eligible, so the low watermark never passes the high watermark. Time is measured
    /// from a segment's last append (its file's mtime after a restart); size as in Kafka: a
    /// segment goes if the partition is still at least `retention.bytes` without it.
    pub fn apply_retention(&self, now: SystemTime) -> usize {
        if self.compacted || (self.retention.time.is_none() && self.retention.bytes.is_none()) {
            return 0;
        }
        let mut st = self.state.lock();
        self.retain_locked(&mut st, now)
    }

    fn retain_locked(&self, st: &mut State, now: SystemTime) -> usize {
        if self.compacted {
            return 0;
        }
        let high = self.high_watermark();
        let mut total: u64 = st.segments.iter().map(|s| s.size).sum();
        let mut removed = 0;
        while st.segments.len() > 1 {
            let s = &st.segments[0];
            if s.end > high {
                break;
            }
            let by_time = self.retention.time.is_some_and(|limit| {
                now.duration_since(s.last_append)
                    .is_ok_and(|age| age > limit)
            });
            let by_size = self
                .retention
                .bytes
                .is_some_and(|limit| total - s.size >= limit);
            if !(by_time || by_size) {
                break;
            }
            // Readers holding the file keep reading it: unlinking does not close it. A segment
            // that cannot be deleted stays, and so do the ones after it: deleting those would
            // leave a gap in the offsets, which the next open refuses.
            if let Err(e) = fs::remove_file(&s.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(segment = %s.path.display(), "retention could not delete a segment; it and the later ones stay until the next retention run: {e}");
                    break;
                }
            }
            let s = st.segments.remove(0);
            total -= s.size;
            removed += 1;
        }
        if removed > 0 {
            tracing::debug!(topic = %self.topic, partition = self.id, removed, "retention deleted segments");
        }
        removed
    }

    fn roll(&self, st: &mut State, config: &EmbeddedConfig) -> Result<(), LogError> {
        // Unless nothing is acknowledged by an fsync (`Never`), the rolled segment's data is
        // durable before the next segment's file exists: otherwise a power loss could keep
        // the new file's directory entry and lose the old file's unsynced tail, a gap in the
        // offsets that recovery cannot tell from damage. Its tail is what was appended since
        // the last sync, so this costs little.
        if config.fsync != FsyncPolicy::Never {
            if let Some(active) = st.segments.last() {
                if let Some(file) = &active.file {
                    if let Err(e) = file.sync_data() {
                        // As after any failed fsync: the dirty pages may be gone.
                        st.failed = Some(format!("fsync of a full segment failed: {e}"));
                        return Err(LogError::io(&active.path, e));
                    }
                }
            }
        }
        let segment = create_segment(&self.dir, st.next_offset)?;
        // The rolled segment and the new directory entry are made durable by the next sync:
        // the covering group commit, the same send under `Always`, a background fsync soon
        // after the roll under `Never` (which acknowledges nothing by it).
        if let Some(old) = st.segments.last_mut().and_then(|s| s.file.take()) {
            st.pending_sync.push(old);
        }
        st.dir_dirty = true;
        st.flush_requested = config.fsync == FsyncPolicy::Never;
        st.segments.push(segment);
        self.retain_locked(st, SystemTime::now());
        Ok(())
    }

    fn failed_error(&self, reason: &str) -> LogError {
        LogError::Io {
            path: self.dir.clone(),
            source: std::io::Error::other(format!(
                "partition disabled after an earlier I/O failure ({reason}); reopen the log to recover"
            )),
        }
    }
}

fn sync_files(
    dir: &Path,
    rolled: &[Arc<File>],
    active: Option<&Arc<File>>,
    dir_dirty: bool,
) -> Result<(), LogError> {
    for f in rolled.iter().chain(active) {
        f.sync_data().map_err(|e| LogError::io(dir, e))?;
    }
    if dir_dirty {
        fsutil::sync_dir(dir)?;
    }
    Ok(())
}

fn corrupt(path: &Path, reason: String) -> LogError {
    LogError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

fn create_segment(dir: &Path, base: i64) -> Result<Segment, LogError> {
    let path = dir.join(format!("{base:020}.log"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| LogError::io(&path, e))?;
    Ok(Segment {
        base,
        end: base,
        size: 0,
        file: Some(Arc::new(file)),
        path,
        index: SparseIndex::default(),
        last_append: SystemTime::now(),
    })
}

struct Scan {
    valid_len: u64,
    end: i64,
    index: SparseIndex,
    /// Why the valid prefix ends before the file does.
    problem: Option<String>,
}

/// Reads a whole segment in large chunks, validating every frame.
fn scan_segment(
    file: &File,
    path: &Path,
    base: i64,
    file_len: u64,
    interval: u32,
) -> Result<Scan, LogError> {
    let mut index = SparseIndex::default();
    let mut pos = 0u64;
    let mut next = base;
    let mut chunk = MAX_READ_CHUNK;
    let mut buf = Vec::new();
    let problem = loop {
        if pos == file_len {
            break None;
        }
        let want = (file_len - pos).min(chunk as u64) as usize;
        buf.resize(want, 0);
        file.read_exact_at(&mut buf, pos)
            .map_err(|e| LogError::io(path, e))?;
        let mut off = 0usize;
        let mut stop = None;
        while off < buf.len() {
            match format::peek(&buf[off..]) {
                Peek::Frame { offset, len } => {
                    if offset != next {
                        stop = Some(format!("expected offset {next}, found {offset}"));
                        break;
                    }
                    let at = pos + off as u64;
                    index.maybe_push(base, offset, at, u64::from(interval));
                    next += 1;
                    off += len;
                }
                Peek::Incomplete { needed } => {
                    let needed = needed.unwrap_or(format::FRAME_HEADER);
                    if pos + (off + needed) as u64 > file_len {
                        stop = Some(format!(
                            "torn record: {} bytes left, {needed} needed",
                            buf.len() - off
                        ));
                    } else {
                        chunk = chunk.max(needed);
                    }
                    break;
                }
                Peek::Invalid(reason) => {
                    stop = Some(reason.to_string());
                    break;
                }
            }
        }
        pos += off as u64;
        if stop.is_some() {
            break stop;
        }
    };
    Ok(Scan {
        valid_len: pos,
        end: next,
        index,
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(value: &str) -> ProduceRecord {
        ProduceRecord::new("t", None, Some(Bytes::copy_from_slice(value.as_bytes())))
    }

    fn config() -> EmbeddedConfig {
        EmbeddedConfig {
            fsync: FsyncPolicy::Never,
            segment_bytes: 1024,
            index_interval_bytes: 100,
            ..Default::default()
        }
    }

    fn open(dir: &Path) -> Partition {
        Partition::open(
            "t".into(),
            0,
            dir.join("0"),
            Retention::default(),
            false,
            &config(),
        )
        .expect("open")
    }

    #[test]
    fn reads_from_any_offset_across_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open(dir.path());
        let records: Vec<_> = (0..200).map(|i| rec(&format!("value-{i:04}"))).collect();
        for chunk in (0..200u32).collect::<Vec<_>>().chunks(7) {
            p.append(&records, chunk, 1, &config()).expect("append");
        }
        {
            let st = p.state.lock();
            let n = st.segments.len();
            assert!(n > 3, "segments rolled");
            assert!(
                st.segments[..n - 1].iter().all(|s| s.file.is_none()),
                "only the active segment holds a descriptor"
            );
        }
        for from in [0, 1, 13, 99, 150, 199] {
            let mut out = Vec::new();
            let r = p.read(from, 1000, usize::MAX, &mut out).expect("read");
            assert_eq!(r, ReadOutcome::Read { next: 200 });
            assert_eq!(out.len() as i64, 200 - from);
            for (k, r) in out.iter().enumerate() {
                let i = from + k as i64;
                assert_eq!(r.offset, i);
                assert_eq!(r.value.as_deref(), Some(format!("value-{i:04}").as_bytes()));
            }
        }
        let mut out = Vec::new();
        assert_eq!(
            p.read(201, 10, usize::MAX, &mut out).expect("read"),
            ReadOutcome::OutOfRange { low: 0, high: 200 }
        );
    }

    #[test]
    fn sparse_index_finds_the_closest_entry_at_or_before_an_offset() {
        let mut ix = SparseIndex::default();
        for (k, pos) in [(0, 0), (1, 50), (2, 120), (3, 130), (4, 300)] {
            ix.maybe_push(1000, 1000 + k, pos, 100);
        }
        assert_eq!(ix.entries, vec![(0, 0), (2, 120), (4, 300)]);
        assert_eq!(ix.lookup(1000, 1001), 0);
        assert_eq!(ix.lookup(1000, 1003), 120);
        assert_eq!(ix.lookup(1000, 1009), 300);
        // Positions past u32 are left out rather than wrapped.
        ix.maybe_push(1000, 1005, 5 << 32, 100);
        assert_eq!(ix.entries.len(), 3);
        assert_eq!(ix.lookup(1000, 1005), 300);
    }

    #[test]
    fn unsynced_appends_are_invisible_until_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = EmbeddedConfig {
            fsync: FsyncPolicy::Always,
            ..config()
        };
        let p = Partition::open(
            "t".into(),
            0,
            dir.path().join("0"),
            Retention::default(),
            false,
            &cfg,
        )
        .expect("open");
        p.append(&[rec("a")], &[0], 1, &cfg).expect("append");
        assert_eq!(p.high_watermark(), 0);
        let mut out = Vec::new();
        p.read(0, 10, usize::MAX, &mut out).expect("read");
        assert!(out.is_empty());
        p.sync(true).expect("sync");
        assert_eq!(p.high_watermark(), 1);
        p.read(0, 10, usize::MAX, &mut out).expect("read");
        assert_eq!(out.len(), 1);
    }
}
