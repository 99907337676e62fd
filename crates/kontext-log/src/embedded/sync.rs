//! The background thread: group commit and periodic retention.
//!
//! Under [`FsyncPolicy::GroupCommit`] a send appends to the page cache, queues a [`Waiter`] and
//! awaits it. The thread takes every queued waiter, fsyncs each partition they touched once,
//! publishes the new high watermarks and wakes all of them: one fsync serves every send that
//! was written before it started. Sends arriving meanwhile queue up for the next round, so
//! the batch grows with the load. It is a plain thread rather than a tokio task because fsync
//! blocks, and so it does not depend on the caller's runtime.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::{oneshot, watch};

use super::config::{EmbeddedConfig, FsyncPolicy};
use super::partition::Partition;
use crate::LogError;

/// State shared by the log handle and the background thread.
pub(crate) struct Shared {
    pub dir: PathBuf,
    /// The log directory, open since the log opened: what `syncfs` is called on.
    pub dir_handle: std::fs::File,
    pub config: EmbeddedConfig,
    pub queue: Mutex<Queue>,
    pub wake: Condvar,
    /// Every partition of every topic, for retention and the final sync.
    pub partitions: RwLock<Vec<Arc<Partition>>>,
    /// Bumped whenever a high watermark advances; consumers wait on it instead of polling.
    pub data_version: watch::Sender<u64>,
}

#[derive(Default)]
pub(crate) struct Queue {
    pub waiters: Vec<Waiter>,
    /// Partitions to fsync without anyone waiting (rolled segments under `Never`).
    pub background: Vec<Arc<Partition>>,
    pub shutdown: bool,
}

/// A send (or flush) waiting for its partitions to be synced.
pub(crate) struct Waiter {
    pub partitions: Vec<Arc<Partition>>,
    pub done: oneshot::Sender<Result<(), LogError>>,
}

impl Shared {
    /// Queues a waiter and wakes the thread; the receiver resolves after the covering fsync.
    pub fn enqueue(
        &self,
        partitions: Vec<Arc<Partition>>,
    ) -> oneshot::Receiver<Result<(), LogError>> {
        let (done, rx) = oneshot::channel();
        let mut q = self.queue.lock();
        if q.shutdown {
            let _ = done.send(Err(LogError::Closed));
        } else {
            q.waiters.push(Waiter { partitions, done });
        }
        drop(q);
        self.wake.notify_one();
        rx
    }

    /// Asks the thread to fsync a partition soon; nobody waits for it.
    pub fn request_background_sync(&self, partition: Arc<Partition>) {
        self.queue.lock().background.push(partition);
        self.wake.notify_one();
    }

    pub fn publish(&self) {
        self.data_version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Applies retention to every partition now; returns the number of deleted segments.
    pub fn apply_retention(&self) -> usize {
        let partitions = self.partitions.read().clone();
        let now = SystemTime::now();
        partitions.iter().map(|p| p.apply_retention(now)).sum()
    }
}

/// Makes every partition of a round durable with one `syncfs` of the log's file system: the
/// journal commits once instead of once per partition file.
#[cfg(target_os = "linux")]
fn sync_together(
    shared: &Shared,
    partitions: &HashMap<*const Partition, &Arc<Partition>>,
) -> HashMap<*const Partition, Result<(), String>> {
    let mut results = HashMap::new();
    let mut covered = Vec::new();
    for (key, p) in partitions {
        match p.begin_external_sync() {
            Ok(Some(upto)) => covered.push((*key, *p, upto)),
            Ok(None) => {
                results.insert(*key, Ok(()));
            }
            Err(e) => {
                results.insert(*key, Err(e.to_string()));
            }
        }
    }
    if covered.is_empty() {
        return results;
    }
    let outcome =
        super::fsutil::sync_filesystem(&shared.dir_handle, &shared.dir).map_err(|e| e.to_string());
    for (key, p, upto) in covered {
        let result = outcome.clone().map_err(|msg| LogError::Io {
            path: shared.dir.clone(),
            source: std::io::Error::other(msg),
        });
        results.insert(
            key,
            p.end_external_sync(upto, result).map_err(|e| e.to_string()),
        );
    }
    results
}

/// Without `syncfs`, file by file.
#[cfg(not(target_os = "linux"))]
fn sync_together(
    _: &Shared,
    partitions: &HashMap<*const Partition, &Arc<Partition>>,
) -> HashMap<*const Partition, Result<(), String>> {
    sync_each(partitions)
}

/// Fsyncs each partition's files in turn. (Threads per partition were tried: on these disks
/// parallel fdatasyncs are slower than the same ones in a row.)
fn sync_each(
    partitions: &HashMap<*const Partition, &Arc<Partition>>,
) -> HashMap<*const Partition, Result<(), String>> {
    partitions
        .iter()
        .map(|(key, p)| (*key, p.sync(false).map_err(|e| e.to_string())))
        .collect()
}

/// The thread's main loop; returns after [`Queue::shutdown`] is set and a final sync of every
/// partition (so that a clean close is durable under every policy).
pub(crate) fn run(shared: Arc<Shared>) {
    let spacing = match shared.config.fsync {
        FsyncPolicy::GroupCommit { interval } => interval,
        _ => std::time::Duration::ZERO,
    };
    let mut last_sync: Option<Instant> = None;
    let mut next_retention = Instant::now() + shared.config.retention_check_interval;
    loop {
        let mut q = shared.queue.lock();
        while !q.shutdown
            && q.waiters.is_empty()
            && q.background.is_empty()
            && Instant::now() < next_retention
        {
            shared.wake.wait_until(&mut q, next_retention);
        }
        if !q.waiters.is_empty() {
            // Space fsyncs at least `interval` apart; appends keep queuing meanwhile.
            if let Some(earliest) = last_sync.map(|t| t + spacing) {
                while !q.shutdown && Instant::now() < earliest {
                    shared.wake.wait_until(&mut q, earliest);
                }
            }
        }
        let waiters = std::mem::take(&mut q.waiters);
        let background = std::mem::take(&mut q.background);
        let shutdown = q.shutdown;
        drop(q);

        for p in background {
            if let Err(e) = p.sync(false) {
                tracing::error!(topic = %p.topic, partition = p.id, "background fsync of a rolled segment failed: {e}");
            }
        }
        if !waiters.is_empty() {
            last_sync = Some(Instant::now());
            commit(&shared, waiters);
        }
        if shutdown {
            let partitions = shared.partitions.read().clone();
            for p in partitions {
                if let Err(e) = p.sync(false) {
                    tracing::error!(topic = %p.topic, partition = p.id, "final sync failed: {e}");
                }
            }
            shared.publish();
            return;
        }
        if Instant::now() >= next_retention {
            shared.apply_retention();
            next_retention = Instant::now() + shared.config.retention_check_interval;
        }
    }
}

/// One group commit: make each partition durable once, then answer every waiter.
fn commit(shared: &Shared, waiters: Vec<Waiter>) {
    let mut distinct: HashMap<*const Partition, &Arc<Partition>> = HashMap::new();
    for w in &waiters {
        for p in &w.partitions {
            distinct.entry(Arc::as_ptr(p)).or_insert(p);
        }
    }
    // One partition: its own fdatasync costs what a syncfs does and touches nothing else.
    let results = if distinct.len() > 1 {
        sync_together(shared, &distinct)
    } else {
        sync_each(&distinct)
    };
    shared.publish();
    for w in waiters {
        let failure = w
            .partitions
            .iter()
            .find_map(|p| results.get(&Arc::as_ptr(p)).and_then(|r| r.as_ref().err()));
        let answer = match failure {
            None => Ok(()),
            Some(msg) => Err(LogError::Io {
                path: shared.dir.clone(),
                source: std::io::Error::other(msg.clone()),
            }),
        };
        // The sender may have given up (its future was dropped); the records are durable anyway.
        let _ = w.done.send(answer);
    }
}
