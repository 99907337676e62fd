//! Helpers shared by the embedded log's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use kontext_core::record::ProduceRecord;
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog, FsyncPolicy};
use kontext_log::{Log, TopicSpec};

/// A small-segment config so tests roll segments quickly.
pub fn small_segments(fsync: FsyncPolicy) -> EmbeddedConfig {
    EmbeddedConfig {
        fsync,
        segment_bytes: 4096,
        index_interval_bytes: 256,
        ..Default::default()
    }
}

pub fn open(dir: &Path, config: EmbeddedConfig) -> Arc<EmbeddedLog> {
    EmbeddedLog::open(dir, config).expect("open log")
}

pub async fn create(log: &EmbeddedLog, name: &str, partitions: i32) {
    log.create_topic(&TopicSpec::new(name, partitions))
        .await
        .expect("create topic");
}

pub fn value_record(topic: &str, partition: i32, value: impl Into<Vec<u8>>) -> ProduceRecord {
    ProduceRecord {
        topic: topic.into(),
        partition: Some(partition),
        value: Some(Bytes::from(value.into())),
        ..Default::default()
    }
}

/// The segment files of a partition, sorted by base offset.
pub fn segments(dir: &Path, topic: &str, partition: i32) -> Vec<PathBuf> {
    let pdir = dir.join("topics").join(topic).join(partition.to_string());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&pdir)
        .expect("partition dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}
