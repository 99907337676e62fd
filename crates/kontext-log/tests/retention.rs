//! Retention by size and time: whole non-active segments go, the low watermark follows.

mod common;

use std::time::Duration;

use common::*;
use kontext_log::embedded::{EmbeddedLog, FsyncPolicy};
use kontext_log::{ConsumerConfig, Log, LogError, Retention, TopicSpec};

async fn topic_with(log: &EmbeddedLog, retention: Retention) {
    let mut spec = TopicSpec::new("t", 1);
    spec.retention = retention;
    log.create_topic(&spec).await.expect("create");
}

/// Appends `n` records of about 100 bytes in sends of `per_send` records.
async fn write(log: &EmbeddedLog, n: usize, per_send: usize) {
    let producer = log.producer().await.expect("producer");
    let all: Vec<_> = (0..n)
        .map(|i| value_record("t", 0, format!("{i:0>90}")))
        .collect();
    for chunk in all.chunks(per_send) {
        producer.send(chunk.to_vec()).await.expect("send");
    }
}

fn segment_sizes(dir: &std::path::Path) -> Vec<u64> {
    segments(dir, "t", 0)
        .iter()
        .map(|p| std::fs::metadata(p).expect("meta").len())
        .collect()
}

#[tokio::test]
async fn size_retention_deletes_the_oldest_segments_and_moves_the_low_watermark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), small_segments(FsyncPolicy::default()));
    topic_with(
        &log,
        Retention {
            time: None,
            bytes: Some(10_000),
        },
    )
    .await;
    write(&log, 1000, 1).await; // about 126 KB: some 30 segments of 4 KiB
    log.apply_retention();
    let sizes = segment_sizes(dir.path());
    let total: u64 = sizes.iter().sum();
    assert!(
        sizes.len() >= 2 && sizes.len() <= 5,
        "segments left: {sizes:?}"
    );
    assert!(total >= 10_000, "keeps at least retention.bytes: {total}");
    assert!(
        total - sizes[0] < 10_000,
        "and no segment more than that: {sizes:?}"
    );

    let d = log.describe_topic("t").await.expect("describe");
    let p = d.partitions[0];
    assert!(p.low_watermark > 0, "low watermark moved: {p:?}");
    assert_eq!(p.high_watermark, 1000);
    let first = segments(dir.path(), "t", 0)[0].clone();
    let base: i64 = first
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base");
    assert_eq!(p.low_watermark, base);
    let err = log.fetch("t", 0, 0, 10).expect_err("deleted");
    assert!(matches!(err, LogError::OffsetOutOfRange { .. }), "{err}");
    let got = log.fetch("t", 0, p.low_watermark, 10_000).expect("fetch");
    assert_eq!(got.len() as i64, 1000 - p.low_watermark);

    // A consumer positioned before the low watermark restarts at it (earliest).
    let mut c = log
        .consumer(ConsumerConfig::new("g", vec!["t".into()]))
        .await
        .expect("consumer");
    let got = c.poll(5, Duration::from_millis(10)).await.expect("poll");
    assert_eq!(got[0].offset, p.low_watermark);

    // The low watermark survives a restart (it is the first segment's base offset).
    drop(c);
    drop(log);
    let log = open(dir.path(), small_segments(FsyncPolicy::default()));
    let d = log.describe_topic("t").await.expect("describe");
    assert_eq!(d.partitions[0].low_watermark, p.low_watermark);
}

#[tokio::test]
async fn time_retention_deletes_old_segments_but_never_the_active_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), small_segments(FsyncPolicy::Never));
    topic_with(
        &log,
        Retention {
            time: Some(Duration::from_secs(1)),
            bytes: None,
        },
    )
    .await;
    write(&log, 300, 10).await;
    let before = segment_sizes(dir.path()).len();
    assert!(before > 3);
    assert_eq!(log.apply_retention(), 0, "nothing is old yet");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(log.apply_retention(), before - 1);
    let left = segments(dir.path(), "t", 0);
    assert_eq!(
        left.len(),
        1,
        "the active segment stays even though it is old"
    );
    let d = log.describe_topic("t").await.expect("describe");
    let p = d.partitions[0];
    assert!(p.low_watermark > 0 && p.low_watermark < 300, "{p:?}");
    assert_eq!(p.high_watermark, 300);
    assert_eq!(
        log.fetch("t", 0, p.low_watermark, 1000)
            .expect("fetch")
            .len() as i64,
        300 - p.low_watermark
    );
    // Appends continue after retention.
    write(&log, 1, 1).await;
    assert_eq!(log.fetch("t", 0, 300, 10).expect("fetch").len(), 1);
}

#[tokio::test]
async fn unlimited_and_compacted_topics_keep_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), small_segments(FsyncPolicy::Never));
    let mut spec = TopicSpec::new("t", 1);
    spec.compacted = true;
    spec.retention = Retention {
        time: Some(Duration::from_millis(1)),
        bytes: Some(1),
    };
    log.create_topic(&spec).await.expect("create");
    write(&log, 200, 10).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(log.apply_retention(), 0);
    assert_eq!(
        log.describe_topic("t").await.expect("describe").partitions[0].low_watermark,
        0
    );
}

/// A segment retention cannot delete stays, and so does every segment after it: deleting
/// those would leave a gap in the offsets that the next open refuses. Once it can be deleted,
/// the next run catches up.
#[tokio::test]
async fn a_segment_retention_cannot_delete_keeps_the_ones_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_segments(FsyncPolicy::default());
    let log = open(dir.path(), config.clone());
    let retention = Retention {
        time: None,
        bytes: Some(10_000),
    };
    topic_with(&log, retention).await;
    write(&log, 300, 1).await;
    let before = log.describe_topic("t").await.expect("describe").partitions[0];
    let first = segments(dir.path(), "t", 0)[0].clone();
    let saved = std::fs::read(&first).expect("read");
    // unlink(2) of a directory fails, even for root.
    std::fs::remove_file(&first).expect("remove");
    std::fs::create_dir(&first).expect("mkdir");
    write(&log, 300, 1).await; // rolls, and each roll applies retention
    log.apply_retention();
    let stuck = log.describe_topic("t").await.expect("describe").partitions[0];
    assert_eq!(stuck.low_watermark, before.low_watermark, "{stuck:?}");
    assert_eq!(stuck.high_watermark, 600);
    // Everything after the stuck segment is still there.
    let second: i64 = segments(dir.path(), "t", 0)[1]
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base");
    let got = log.fetch("t", 0, second, 100_000).expect("fetch");
    assert_eq!(got.len() as i64, 600 - second);
    drop(log);

    // The segment is a file again: the log opens (no gap) and retention goes on.
    std::fs::remove_dir(&first).expect("rmdir");
    std::fs::write(&first, saved).expect("restore");
    let log = open(dir.path(), config);
    let reopened = log.describe_topic("t").await.expect("describe").partitions[0];
    assert_eq!(reopened.low_watermark, before.low_watermark);
    log.apply_retention();
    let after = log.describe_topic("t").await.expect("describe").partitions[0];
    assert!(after.low_watermark > before.low_watermark, "{after:?}");
    assert_eq!(after.high_watermark, 600);
}
