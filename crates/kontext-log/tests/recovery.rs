//! Recovery from torn and corrupt tails: reopen keeps every complete, checksum-valid record
//! before the damage and continues at the right offset.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use common::*;
use kontext_log::embedded::{EmbeddedConfig, FsyncPolicy};
use kontext_log::Log;

/// Writes `n` records of varying size to one partition and closes the log; returns the
/// values written.
async fn write_records(dir: &Path, config: EmbeddedConfig, n: usize) -> Vec<String> {
    let log = open(dir, config);
    create(&log, "t", 1).await;
    let producer = log.producer().await.expect("producer");
    let values: Vec<String> = (0..n)
        .map(|i| format!("value-{i}-{}", "x".repeat(i % 37)))
        .collect();
    for chunk in values.chunks(7) {
        let records = chunk
            .iter()
            .map(|v| value_record("t", 0, v.as_bytes()))
            .collect();
        producer.send(records).await.expect("send");
    }
    values
}

/// Reopens, checks that exactly the first `expect` records survived, and appends one more,
/// which must get offset `expect`.
async fn check_recovered(dir: &Path, config: EmbeddedConfig, values: &[String], expect: usize) {
    let log = open(dir, config);
    let got = log.fetch("t", 0, 0, 100_000).expect("fetch");
    assert_eq!(got.len(), expect, "records kept");
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.offset, i as i64);
        assert_eq!(r.value.as_deref(), Some(values[i].as_bytes()), "record {i}");
    }
    let producer = log.producer().await.expect("producer");
    let pos = producer
        .send(vec![value_record("t", 0, "next")])
        .await
        .expect("append after recovery");
    assert_eq!(pos[0].offset, expect as i64);
    drop(producer);
    drop(log);
    // And the recovered state is itself stable across another reopen.
    let log = open(dir, EmbeddedConfig::default());
    let got = log.fetch("t", 0, 0, 100_000).expect("fetch");
    assert_eq!(got.len(), expect + 1);
    assert_eq!(got[expect].value.as_deref(), Some(&b"next"[..]));
}

/// The byte positions where each record of the single segment of t/0 starts.
fn record_starts(dir: &Path) -> (std::path::PathBuf, Vec<u64>, u64) {
    let seg = segments(dir, "t", 0).pop().expect("a segment");
    let data = std::fs::read(&seg).expect("read segment");
    let mut starts = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        starts.push(pos as u64);
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        pos += 8 + len;
    }
    (seg, starts, data.len() as u64)
}

/// Writes 400 records into small segments (at least four), then cuts the second segment
/// `into` bytes past the start of the record at or just past its middle. Returns the values
/// written, the segment files before the cut, and the number of records before that one.
async fn cut_the_second_segment(
    dir: &Path,
    config: &EmbeddedConfig,
    into: u64,
) -> (Vec<String>, Vec<std::path::PathBuf>, usize) {
    let values = write_records(dir, config.clone(), 400).await;
    let segs = segments(dir, "t", 0);
    assert!(segs.len() >= 4, "rolled into {} segments", segs.len());
    let second = &segs[1];
    let base: usize = second
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base");
    let data = std::fs::read(second).expect("read");
    let (mut pos, mut kept) = (0usize, 0usize);
    while pos < data.len() / 2 {
        pos += 8 + u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4")) as usize;
        kept += 1;
    }
    OpenOptions::new()
        .write(true)
        .open(second)
        .expect("open")
        .set_len(pos as u64 + into)
        .expect("cut");
    (values, segs, base + kept)
}

#[tokio::test]
async fn a_segment_truncated_mid_record_keeps_every_complete_record() {
    let config = EmbeddedConfig::default();
    // Cut inside the length, inside the checksum, inside the body, and one byte short.
    for (victim, cut_into) in [(40usize, 2u64), (40, 6), (40, 20), (59, 0), (10, 1)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let values = write_records(dir.path(), config.clone(), 60).await;
        let (seg, starts, len) = record_starts(dir.path());
        assert_eq!(starts.len(), 60);
        let cut = if victim == 59 && cut_into == 0 {
            len - 1
        } else {
            starts[victim] + cut_into
        };
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .expect("open")
            .set_len(cut)
            .expect("truncate");
        check_recovered(dir.path(), config.clone(), &values, victim).await;
    }
}

#[tokio::test]
async fn garbage_appended_after_the_last_record_is_removed() {
    for garbage in [
        vec![0u8; 3],
        vec![0u8; 100],
        vec![0xffu8; 64],
        b"\x20\x00\x00\x00junkjunkjunk".to_vec(),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let values = write_records(dir.path(), EmbeddedConfig::default(), 30).await;
        let (seg, _, len) = record_starts(dir.path());
        let mut f = OpenOptions::new().append(true).open(&seg).expect("open");
        f.write_all(&garbage).expect("garbage");
        drop(f);
        drop(open(dir.path(), EmbeddedConfig::default()));
        assert_eq!(
            std::fs::metadata(&seg).expect("meta").len(),
            len,
            "truncated at open"
        );
        check_recovered(dir.path(), EmbeddedConfig::default(), &values, 30).await;
    }
}

#[tokio::test]
async fn a_bad_checksum_in_the_tail_truncates_from_that_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let values = write_records(dir.path(), EmbeddedConfig::default(), 30).await;
    let (seg, starts, _) = record_starts(dir.path());
    let mut data = std::fs::read(&seg).expect("read");
    // Flip one bit in the value of record 27: its length is intact, its checksum is not.
    let at = starts[27] as usize + 8 + 30;
    data[at] ^= 0x01;
    std::fs::write(&seg, &data).expect("write");
    check_recovered(dir.path(), EmbeddedConfig::default(), &values, 27).await;
}

#[tokio::test]
async fn damage_in_an_older_segment_drops_everything_after_it() {
    let config = small_segments(FsyncPolicy::Never);
    let dir = tempfile::tempdir().expect("tempdir");
    // Tear the second segment in the middle, 3 bytes into the record just past it: offsets
    // after it cannot stay dense.
    let (values, _, kept) = cut_the_second_segment(dir.path(), &config, 3).await;
    check_recovered(dir.path(), config, &values, kept).await;
    assert_eq!(
        segments(dir.path(), "t", 0).len(),
        2,
        "later segments removed"
    );
}

/// A power loss under `never` can keep a new segment's directory entry and lose the tail of
/// the segment it rolled from, which then ends cleanly, at a record boundary, short of the next
/// segment's base. Recovery keeps that prefix. Under the policies that acknowledge by fsync a
/// roll syncs the old segment first, so there a gap is damage, and the log refuses to open.
#[tokio::test]
async fn a_segment_that_ends_short_of_the_next_one_keeps_the_prefix_under_never() {
    let config = small_segments(FsyncPolicy::Never);
    let dir = tempfile::tempdir().expect("tempdir");
    // Cut at the record boundary just past the middle: no frame is torn.
    let (values, segs, kept) = cut_the_second_segment(dir.path(), &config, 0).await;

    for policy in [FsyncPolicy::default(), FsyncPolicy::Always] {
        let refused = kontext_log::embedded::EmbeddedLog::open(dir.path(), small_segments(policy))
            .err()
            .unwrap_or_else(|| panic!("{policy:?}: a gap opened"));
        assert!(
            matches!(&refused, kontext_log::LogError::Corrupt { reason, .. } if reason.contains("previous one ends")),
            "{refused}"
        );
    }
    assert_eq!(
        segments(dir.path(), "t", 0).len(),
        segs.len(),
        "nothing deleted"
    );

    check_recovered(dir.path(), config, &values, kept).await;
    assert_eq!(
        segments(dir.path(), "t", 0).len(),
        2,
        "later segments removed"
    );
}

#[tokio::test]
async fn an_empty_active_segment_keeps_the_high_watermark() {
    let config = small_segments(FsyncPolicy::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let values = write_records(dir.path(), config.clone(), 200).await;
    // Truncating the active segment to nothing must not lose the offsets of earlier segments.
    let active = segments(dir.path(), "t", 0).pop().expect("active");
    let base: usize = active
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base");
    assert!(base > 0);
    OpenOptions::new()
        .write(true)
        .open(&active)
        .expect("open")
        .set_len(0)
        .expect("cut");
    check_recovered(dir.path(), config, &values, base).await;
}

#[tokio::test]
async fn corruption_found_while_reading_is_an_error_not_silence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "t", 1).await;
    let producer = log.producer().await.expect("producer");
    let records = (0..20)
        .map(|i| value_record("t", 0, format!("value-{i:04}")))
        .collect();
    producer.send(records).await.expect("send");
    let (seg, starts, _) = record_starts(dir.path());
    // Damage record 10 behind the open log's back.
    let mut data = std::fs::read(&seg).expect("read");
    data[starts[10] as usize + 8 + 30] ^= 0x40;
    std::fs::write(&seg, &data).expect("write");
    assert_eq!(
        log.fetch("t", 0, 0, 10).expect("before the damage").len(),
        10
    );
    let err = log.fetch("t", 0, 5, 10).expect_err("reads into the damage");
    assert!(
        matches!(err, kontext_log::LogError::Corrupt { .. }),
        "{err}"
    );
    assert!(!err.is_transient());
    let mut consumer = log
        .consumer(kontext_log::ConsumerConfig::new("g", vec!["t".into()]))
        .await
        .expect("consumer");
    let got = consumer.poll(100, std::time::Duration::ZERO).await;
    assert!(
        matches!(got, Err(kontext_log::LogError::Corrupt { .. })),
        "{got:?}"
    );
}
