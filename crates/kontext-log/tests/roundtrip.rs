//! Produce and fetch through the `Log` interface of the embedded backend.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use kontext_core::envelope::now_ms;
use kontext_core::partitioner::partition_for_key;
use kontext_core::record::{Header, ProduceRecord};
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog, FsyncPolicy};
use kontext_log::{ConsumerConfig, CreateOutcome, Log, LogError, TopicSpec};

#[tokio::test]
async fn round_trips_keys_null_values_headers_and_timestamps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "events", 1).await;
    let producer = log.producer().await.expect("producer");
    let records = vec![
        ProduceRecord {
            topic: "events".into(),
            partition: Some(0),
            key: Some(Bytes::from_static(b"customer-1")),
            value: Some(Bytes::from_static(b"{\"name\":\"Ada\"}")),
            headers: vec![
                Header::new("source", "crm"),
                Header {
                    key: "empty".into(),
                    value: None,
                },
            ],
            timestamp_ms: Some(1_700_000_000_123),
        },
        ProduceRecord {
            topic: "events".into(),
            partition: Some(0),
            key: Some(Bytes::from_static(b"customer-1")),
            value: None, // a tombstone
            ..Default::default()
        },
        ProduceRecord {
            topic: "events".into(),
            partition: Some(0),
            value: Some(Bytes::new()),
            ..Default::default()
        },
    ];
    let before = now_ms();
    let positions = producer.send(records.clone()).await.expect("send");
    assert_eq!(
        positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );

    let got = log.fetch("events", 0, 0, 10).expect("fetch");
    assert_eq!(got.len(), 3);
    for (r, sent) in got.iter().zip(&records) {
        assert_eq!(&*r.topic, "events");
        assert_eq!(r.partition, 0);
        assert_eq!(r.key, sent.key);
        assert_eq!(r.value, sent.value);
        assert_eq!(r.headers, sent.headers);
    }
    assert_eq!(got[0].timestamp_ms, 1_700_000_000_123);
    assert!(got[1].timestamp_ms >= before && got[1].timestamp_ms <= now_ms() + 1);
    assert_eq!(got[0].header("source"), Some(&b"crm"[..]));
    assert_eq!(got[2].value.as_deref(), Some(&b""[..]), "empty is not null");
}

#[tokio::test]
async fn offsets_are_dense_and_monotonic_across_partitions_and_segment_rolls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), small_segments(FsyncPolicy::default()));
    create(&log, "t", 3).await;
    let producer = log.producer().await.expect("producer");
    // Several concurrent senders, so group commit serves many waiters per fsync.
    let mut tasks = Vec::new();
    for task in 0..4 {
        let producer = producer.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for batch in 0..25 {
                let records: Vec<_> = (0..10)
                    .map(|i| value_record("t", (task + i) % 3, format!("{task}-{batch}-{i}")))
                    .collect();
                let pos = producer.send(records.clone()).await.expect("send");
                acked.extend(pos.into_iter().zip(records));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("task"));
    }
    assert_eq!(acked.len(), 1000);
    for partition in 0..3 {
        assert!(
            segments(dir.path(), "t", partition).len() > 2,
            "partition {partition} rolled"
        );
        let got = log.fetch("t", partition, 0, 10_000).expect("fetch");
        let offsets: Vec<i64> = got.iter().map(|r| r.offset).collect();
        assert_eq!(
            offsets,
            (0..got.len() as i64).collect::<Vec<_>>(),
            "dense from 0"
        );
        for (pos, rec) in acked.iter().filter(|(p, _)| p.partition == partition) {
            assert_eq!(
                got[pos.offset as usize].value, rec.value,
                "record at {pos:?}"
            );
        }
    }
    let total: usize = (0..3)
        .map(|p| log.fetch("t", p, 0, 10_000).expect("fetch").len())
        .sum();
    assert_eq!(total, 1000);
    let d = log.describe_topic("t").await.expect("describe");
    assert_eq!(
        d.partitions.iter().map(|p| p.high_watermark).sum::<i64>(),
        1000
    );
    assert!(d.partitions.iter().all(|p| p.low_watermark == 0));
}

#[tokio::test]
async fn keyed_records_use_the_kafka_partitioner_and_keyless_calls_rotate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(
        dir.path(),
        EmbeddedConfig {
            fsync: FsyncPolicy::Never,
            ..Default::default()
        },
    );
    create(&log, "k", 6).await;
    let producer = log.producer().await.expect("producer");
    let keys: Vec<String> = (0..50).map(|i| format!("key-{i}")).collect();
    let records = keys
        .iter()
        .map(|k| {
            ProduceRecord::new(
                "k",
                Some(Bytes::from(k.clone())),
                Some(Bytes::from_static(b"v")),
            )
        })
        .collect();
    let positions = producer.send(records).await.expect("send");
    for (k, pos) in keys.iter().zip(&positions) {
        assert_eq!(pos.partition, partition_for_key(k.as_bytes(), 6), "{k}");
    }
    let mut used = HashSet::new();
    for _ in 0..6 {
        let pos = producer
            .send(vec![
                ProduceRecord::new("k", None, Some(Bytes::from_static(b"a"))),
                ProduceRecord::new("k", None, Some(Bytes::from_static(b"b"))),
            ])
            .await
            .expect("send");
        assert_eq!(
            pos[0].partition, pos[1].partition,
            "keyless records of a call stick together"
        );
        used.insert(pos[0].partition);
    }
    assert_eq!(used.len(), 6, "keyless calls rotate over every partition");
}

#[tokio::test]
async fn rejects_bad_names_oversized_records_and_unknown_targets_without_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = EmbeddedConfig {
        max_record_bytes: 1000,
        ..Default::default()
    };
    let log = open(dir.path(), config);
    for bad in ["", "a/b", "has space", "..", &"x".repeat(250)] {
        let err = log
            .create_topic(&TopicSpec::new(bad, 1))
            .await
            .expect_err(bad);
        assert!(matches!(err, LogError::Invalid(_)), "{bad}: {err}");
    }
    assert!(matches!(
        log.create_topic(&TopicSpec::new("t", 0)).await,
        Err(LogError::Invalid(_))
    ));
    create(&log, "t", 2).await;
    let producer = log.producer().await.expect("producer");
    let big = value_record("t", 0, vec![0u8; 1000]);
    let err = producer
        .send(vec![value_record("t", 0, "ok"), big])
        .await
        .expect_err("too big");
    assert!(matches!(err, LogError::Invalid(_)), "{err}");
    assert!(!err.is_transient());
    let err = producer
        .send(vec![value_record("t", 2, "x")])
        .await
        .expect_err("partition");
    assert!(
        matches!(err, LogError::UnknownPartition { partition: 2, .. }),
        "{err}"
    );
    let err = producer
        .send(vec![value_record("nope", 0, "x")])
        .await
        .expect_err("topic");
    assert!(matches!(err, LogError::UnknownTopic(_)), "{err}");
    let d = log.describe_topic("t").await.expect("describe");
    assert_eq!(
        d.partitions[0].high_watermark, 0,
        "a rejected batch writes nothing"
    );
    assert!(producer
        .send(vec![value_record("t", 0, vec![0u8; 900])])
        .await
        .is_ok());
}

#[tokio::test]
async fn create_topic_is_idempotent_and_list_hides_internal_topics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    assert_eq!(
        log.create_topic(&TopicSpec::new("b", 2))
            .await
            .expect("create"),
        CreateOutcome::Created
    );
    assert_eq!(
        log.create_topic(&TopicSpec::new("b", 2))
            .await
            .expect("again"),
        CreateOutcome::AlreadyExists
    );
    let err = log
        .create_topic(&TopicSpec::new("b", 3))
        .await
        .expect_err("mismatch");
    assert!(
        matches!(
            err,
            LogError::TopicMismatch {
                existing: 2,
                requested: 3,
                ..
            }
        ),
        "{err}"
    );
    create(&log, "a", 1).await;
    create(&log, "__internal", 1).await;
    assert_eq!(
        log.list_topics().await.expect("list"),
        vec!["a".to_string(), "b".to_string()]
    );
    assert_eq!(log.backend(), "embedded");
    assert!(matches!(
        log.describe_topic("zzz").await,
        Err(LogError::UnknownTopic(_))
    ));
}

#[tokio::test]
async fn topics_specs_and_records_survive_reopen_and_appends_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = open(dir.path(), small_segments(FsyncPolicy::default()));
        let mut spec = TopicSpec::new("orders", 2);
        spec.compacted = true;
        spec.retention.bytes = Some(1 << 20);
        log.create_topic(&spec).await.expect("create");
        let producer = log.producer().await.expect("producer");
        for i in 0..100 {
            producer
                .send(vec![value_record("orders", i % 2, format!("v{i}"))])
                .await
                .expect("send");
        }
    }
    let log = open(dir.path(), small_segments(FsyncPolicy::default()));
    let d = log.describe_topic("orders").await.expect("describe");
    assert!(d.compacted);
    assert_eq!(d.retention.bytes, Some(1 << 20));
    assert_eq!(
        d.partitions
            .iter()
            .map(|p| p.high_watermark)
            .collect::<Vec<_>>(),
        vec![50, 50]
    );
    let producer = log.producer().await.expect("producer");
    let pos = producer
        .send(vec![value_record("orders", 1, "after")])
        .await
        .expect("send");
    assert_eq!(pos[0].offset, 50);
    let got = log.fetch("orders", 1, 48, 10).expect("fetch");
    let values: Vec<_> = got
        .iter()
        .map(|r| r.value.clone().expect("value"))
        .collect();
    assert_eq!(
        values,
        vec![Bytes::from("v97"), Bytes::from("v99"), Bytes::from("after")]
    );
}

#[tokio::test]
async fn a_locked_directory_cannot_be_opened_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    let err = EmbeddedLog::open(dir.path(), EmbeddedConfig::default())
        .err()
        .expect("locked");
    assert!(matches!(err, LogError::Unavailable(_)), "{err}");
    drop(log);
    assert!(
        EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).is_ok(),
        "released on drop"
    );
}

#[tokio::test]
async fn fetch_outside_the_watermarks_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "t", 1).await;
    let producer = log.producer().await.expect("producer");
    producer
        .send(vec![value_record("t", 0, "a")])
        .await
        .expect("send");
    assert!(log.fetch("t", 0, 1, 10).expect("at the end").is_empty());
    let err = log.fetch("t", 0, 2, 10).expect_err("past the end");
    assert!(
        matches!(
            err,
            LogError::OffsetOutOfRange {
                low: 0,
                high: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn read_partition_returns_exactly_the_range_asked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "t", 1).await;
    let producer = log.producer().await.expect("producer");
    let records: Vec<_> = (0..25_000)
        .map(|i| value_record("t", 0, i.to_string()))
        .collect();
    producer.send(records).await.expect("send");
    let offsets = |records: Vec<kontext_core::record::Record>| -> Vec<i64> {
        records.iter().map(|r| r.offset).collect()
    };
    // Across several internal fetches, and stopping before `to`.
    let all = log.read_partition("t", 0, 3, 24_990).await.expect("read");
    assert_eq!(offsets(all), (3..24_990).collect::<Vec<_>>());
    assert!(log
        .read_partition("t", 0, 7, 7)
        .await
        .expect("empty")
        .is_empty());
    let tail = log
        .read_partition("t", 0, 24_998, 25_000)
        .await
        .expect("tail");
    assert_eq!(tail[1].value.as_deref(), Some(&b"24999"[..]));
}

#[tokio::test]
async fn poll_wakes_up_for_records_appended_while_waiting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "t", 2).await;
    let mut consumer = log
        .consumer(ConsumerConfig::new("g", vec!["t".into()]))
        .await
        .expect("consumer");
    let started = std::time::Instant::now();
    assert!(consumer
        .poll(10, Duration::from_millis(50))
        .await
        .expect("poll")
        .is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "waited the timeout"
    );

    let producer = log.producer().await.expect("producer");
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        producer
            .send(vec![value_record("t", 1, "late")])
            .await
            .expect("send");
    });
    let started = std::time::Instant::now();
    let got = consumer
        .poll(10, Duration::from_secs(20))
        .await
        .expect("poll");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value.as_deref(), Some(&b"late"[..]));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken by the append, not the timeout"
    );
    sender.await.expect("sender");
}

#[tokio::test]
async fn group_commit_hides_records_until_their_fsync_and_acknowledges_them_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A long spacing between fsyncs makes the window before the second sync observable.
    let config = EmbeddedConfig {
        fsync: FsyncPolicy::GroupCommit {
            interval: Duration::from_millis(600),
        },
        ..Default::default()
    };
    let log = open(dir.path(), config);
    create(&log, "t", 1).await;
    let producer = log.producer().await.expect("producer");
    producer
        .send(vec![value_record("t", 0, "first")])
        .await
        .expect("first send is synced at once");
    let mut senders = Vec::new();
    for i in 0..3 {
        let producer = producer.clone();
        senders.push(tokio::spawn(async move {
            producer
                .send(vec![value_record("t", 0, format!("later-{i}"))])
                .await
                .expect("send")
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        senders.iter().all(|s| !s.is_finished()),
        "not acknowledged before the next fsync"
    );
    assert_eq!(
        log.fetch("t", 0, 0, 10).expect("fetch").len(),
        1,
        "unacknowledged records are invisible"
    );
    let mut consumer = log
        .consumer(ConsumerConfig::new("g", vec!["t".into()]))
        .await
        .expect("consumer");
    assert_eq!(
        consumer.poll(10, Duration::ZERO).await.expect("poll").len(),
        1
    );
    let mut offsets = Vec::new();
    for s in senders {
        offsets.push(s.await.expect("sender")[0].offset);
    }
    offsets.sort();
    assert_eq!(offsets, vec![1, 2, 3]);
    assert_eq!(log.fetch("t", 0, 0, 10).expect("fetch").len(), 4);
    assert_eq!(
        consumer
            .poll(10, Duration::from_secs(5))
            .await
            .expect("poll")
            .len(),
        3
    );
    producer.flush().await.expect("flush with nothing pending");
}

#[tokio::test]
async fn one_send_can_span_several_topics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "a", 2).await;
    create(&log, "b", 1).await;
    let producer = log.producer().await.expect("producer");
    let pos = producer
        .send(vec![
            value_record("a", 1, "a1"),
            value_record("b", 0, "b0"),
            value_record("a", 1, "a1'"),
            value_record("a", 0, "a0"),
        ])
        .await
        .expect("send");
    let coords: Vec<(i32, i64)> = pos.iter().map(|p| (p.partition, p.offset)).collect();
    assert_eq!(coords, vec![(1, 0), (0, 0), (1, 1), (0, 0)]);
    assert_eq!(
        log.fetch("a", 1, 0, 10).expect("a/1")[1].value.as_deref(),
        Some(&b"a1'"[..])
    );
    assert_eq!(
        log.fetch("b", 0, 0, 10).expect("b/0")[0].value.as_deref(),
        Some(&b"b0"[..])
    );
}
