//! Consumer groups of the embedded log: committed offsets, one member per group, polling.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use kontext_core::record::TopicPartition;
use kontext_log::embedded::{EmbeddedConfig, FsyncPolicy};
use kontext_log::{ConsumerConfig, Log, LogError, OffsetReset};

const SHORT: Duration = Duration::from_millis(20);

async fn fill(
    log: &kontext_log::embedded::EmbeddedLog,
    topic: &str,
    partitions: i32,
    per_partition: usize,
) {
    let producer = log.producer().await.expect("producer");
    for p in 0..partitions {
        let records = (0..per_partition)
            .map(|i| value_record(topic, p, format!("{p}:{i}")))
            .collect();
        producer.send(records).await.expect("send");
    }
}

/// Topic `t` of `partitions` partitions, 10 records in each, and a member of group `g` that
/// committed offset 9 on partition 0: a busy group with something committed.
async fn member_that_committed(
    log: &kontext_log::embedded::EmbeddedLog,
    partitions: i32,
) -> Box<dyn kontext_log::Consumer> {
    create(log, "t", partitions).await;
    fill(log, "t", partitions, 10).await;
    let mut c = log
        .consumer(ConsumerConfig::new("g", vec!["t".into()]))
        .await
        .expect("consumer");
    c.commit(&[(TopicPartition::new("t", 0), 9)])
        .await
        .expect("commit");
    c
}

#[tokio::test]
async fn committed_offsets_survive_close_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = open(dir.path(), EmbeddedConfig::default());
        create(&log, "t", 2).await;
        fill(&log, "t", 2, 10).await;
        let mut c = log
            .consumer(ConsumerConfig::new("g", vec!["t".into()]))
            .await
            .expect("consumer");
        let got = c.poll(100, SHORT).await.expect("poll");
        assert_eq!(got.len(), 20);
        c.commit(&[
            (TopicPartition::new("t", 0), 7),
            (TopicPartition::new("t", 1), 10),
        ])
        .await
        .expect("commit");
        assert_eq!(
            log.committed_offsets("g", "t").await.expect("offsets"),
            vec![(0, Some(7)), (1, Some(10))]
        );
    }
    let log = open(dir.path(), EmbeddedConfig::default());
    assert_eq!(
        log.committed_offsets("g", "t").await.expect("offsets"),
        vec![(0, Some(7)), (1, Some(10))]
    );
    assert_eq!(
        log.committed_offsets("other", "t").await.expect("offsets"),
        vec![(0, None), (1, None)]
    );
    let mut c = log
        .consumer(ConsumerConfig::new("g", vec!["t".into()]))
        .await
        .expect("consumer");
    let got = c.poll(100, SHORT).await.expect("poll");
    let coords: Vec<(i32, i64)> = got.iter().map(|r| (r.partition, r.offset)).collect();
    assert_eq!(
        coords,
        vec![(0, 7), (0, 8), (0, 9)],
        "resumes at the committed offsets"
    );
}

#[tokio::test]
async fn background_commits_take_effect_in_order_and_a_commit_waits_for_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "t", 1).await;
    fill(&log, "t", 1, 10).await;
    let mut c = log
        .consumer(ConsumerConfig::new("g", vec!["t".into()]))
        .await
        .expect("consumer");
    for offset in 1..=9 {
        c.commit_in_background(&[(TopicPartition::new("t", 0), offset)])
            .await
            .expect("commit");
    }
    let refused = c
        .commit_in_background(&[(TopicPartition::new("t", 0), -1)])
        .await;
    assert!(matches!(refused, Err(LogError::Invalid(_))), "{refused:?}");
    // An empty commit waits for the one in the background.
    c.commit(&[]).await.expect("wait");
    assert_eq!(
        log.committed_offsets("g", "t").await.expect("offsets"),
        vec![(0, Some(9))]
    );
    // So does dropping the consumer: nothing writes the group's offsets after it left.
    c.commit_in_background(&[(TopicPartition::new("t", 0), 10)])
        .await
        .expect("commit");
    drop(c);
    assert_eq!(
        log.committed_offsets("g", "t").await.expect("offsets"),
        vec![(0, Some(10))]
    );
}

#[tokio::test]
async fn two_groups_consume_and_commit_independently() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "t", 1).await;
    fill(&log, "t", 1, 5).await;
    let mut a = log
        .consumer(ConsumerConfig::new("a", vec!["t".into()]))
        .await
        .expect("a");
    let mut b = log
        .consumer(ConsumerConfig::new("b", vec!["t".into()]))
        .await
        .expect("b");
    assert_eq!(a.poll(3, SHORT).await.expect("poll a").len(), 3);
    assert_eq!(b.poll(100, SHORT).await.expect("poll b").len(), 5);
    a.commit(&[(TopicPartition::new("t", 0), 3)])
        .await
        .expect("commit a");
    b.commit(&[(TopicPartition::new("t", 0), 5)])
        .await
        .expect("commit b");
    let rest = a.poll(100, SHORT).await.expect("poll a");
    assert_eq!(
        rest.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![3, 4]
    );
    assert_eq!(
        log.committed_offsets("a", "t").await.expect("a"),
        vec![(0, Some(3))]
    );
    assert_eq!(
        log.committed_offsets("b", "t").await.expect("b"),
        vec![(0, Some(5))]
    );
}

#[tokio::test]
async fn a_second_member_is_refused_until_the_first_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "t", 3).await;
    create(&log, "u", 1).await;
    let first = log
        .consumer(ConsumerConfig::new("g", vec!["t".into(), "u".into()]))
        .await
        .expect("first");
    let mut assignment = first.assignment();
    assignment.sort();
    assert_eq!(
        assignment,
        vec![
            TopicPartition::new("t", 0),
            TopicPartition::new("t", 1),
            TopicPartition::new("t", 2),
            TopicPartition::new("u", 0)
        ]
    );
    let err = log
        .consumer(ConsumerConfig::new("g", vec!["u".into()]))
        .await
        .err()
        .expect("busy");
    assert!(
        matches!(err, LogError::GroupBusy(ref g) if g == "g"),
        "{err}"
    );
    assert!(!err.is_transient());
    assert!(log
        .consumer(ConsumerConfig::new("other", vec!["u".into()]))
        .await
        .is_ok());
    drop(first);
    assert!(
        log.consumer(ConsumerConfig::new("g", vec!["u".into()]))
            .await
            .is_ok(),
        "freed on drop"
    );
    let err = log
        .consumer(ConsumerConfig::new("h", vec!["missing".into()]))
        .await
        .err()
        .expect("unknown");
    assert!(matches!(err, LogError::UnknownTopic(_)), "{err}");
    // A failed subscription does not leave the group taken.
    assert!(log
        .consumer(ConsumerConfig::new("h", vec!["t".into()]))
        .await
        .is_ok());
}

#[tokio::test]
async fn offset_reset_applies_only_without_a_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "t", 1).await;
    fill(&log, "t", 1, 4).await;
    let mut latest = ConsumerConfig::new("late", vec!["t".into()]);
    latest.offset_reset = OffsetReset::Latest;
    let mut c = log.consumer(latest.clone()).await.expect("consumer");
    assert!(
        c.poll(10, SHORT).await.expect("poll").is_empty(),
        "latest skips existing records"
    );
    fill(&log, "t", 1, 1).await;
    let got = c.poll(10, SHORT).await.expect("poll");
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![4]);
    c.commit(&[(TopicPartition::new("t", 0), 1)])
        .await
        .expect("commit");
    drop(c);
    let mut c = log.consumer(latest).await.expect("consumer again");
    assert_eq!(
        c.poll(10, SHORT).await.expect("poll").len(),
        4,
        "a commit wins over latest"
    );
    let mut e = log
        .consumer(ConsumerConfig::new("early", vec!["t".into()]))
        .await
        .expect("earliest");
    assert_eq!(e.poll(10, SHORT).await.expect("poll").len(), 5);
}

#[tokio::test]
async fn poll_is_fair_across_partitions_and_ordered_within_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), small_segments(FsyncPolicy::Never));
    create(&log, "t", 4).await;
    fill(&log, "t", 4, 300).await;
    let mut c = log
        .consumer(ConsumerConfig::new("g", vec!["t".into()]))
        .await
        .expect("consumer");
    let first = c.poll(40, SHORT).await.expect("poll");
    assert_eq!(first.len(), 40);
    let mut per: HashMap<i32, usize> = HashMap::new();
    for r in &first {
        *per.entry(r.partition).or_default() += 1;
    }
    assert_eq!(per.len(), 4, "every partition served: {per:?}");
    assert!(per.values().all(|&n| n == 10), "{per:?}");
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut all = first;
    loop {
        let got = c.poll(128, SHORT).await.expect("poll");
        if got.is_empty() {
            break;
        }
        all.extend(got);
    }
    assert_eq!(all.len(), 1200);
    for r in &all {
        let n = next.entry(r.partition).or_insert(0);
        assert_eq!(r.offset, *n, "partition {} in order", r.partition);
        assert_eq!(
            r.value.as_deref(),
            Some(format!("{}:{}", r.partition, r.offset).as_bytes())
        );
        *n += 1;
    }
}

#[tokio::test]
async fn commits_of_unknown_partitions_or_negative_offsets_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "t", 1).await;
    let mut c = log
        .consumer(ConsumerConfig::new("g", vec!["t".into()]))
        .await
        .expect("consumer");
    let err = c
        .commit(&[(TopicPartition::new("t", 1), 0)])
        .await
        .expect_err("partition");
    assert!(matches!(err, LogError::UnknownPartition { .. }), "{err}");
    let err = c
        .commit(&[(TopicPartition::new("t", 0), -1)])
        .await
        .expect_err("negative");
    assert!(matches!(err, LogError::Invalid(_)), "{err}");
    assert_eq!(
        log.committed_offsets("g", "t").await.expect("offsets"),
        vec![(0, None)]
    );
}

#[tokio::test]
async fn group_ids_with_path_characters_stay_inside_the_groups_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), EmbeddedConfig::default());
    create(&log, "t", 1).await;
    let mut c = log
        .consumer(ConsumerConfig::new("../../escape", vec!["t".into()]))
        .await
        .expect("consumer");
    c.commit(&[(TopicPartition::new("t", 0), 0)])
        .await
        .expect("commit");
    let files: Vec<_> = std::fs::read_dir(dir.path().join("groups"))
        .expect("groups")
        .collect();
    assert_eq!(files.len(), 1);
    assert!(!dir
        .path()
        .parent()
        .expect("parent")
        .join("escape.json")
        .exists());
}

#[tokio::test]
async fn offsets_of_an_idle_group_can_be_reset_durably() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = open(dir.path(), EmbeddedConfig::default());
        let c = member_that_committed(&log, 2).await;
        let err = log
            .reset_group_offsets("g", &[(TopicPartition::new("t", 0), 2)])
            .await
            .expect_err("busy");
        assert!(matches!(err, LogError::GroupBusy(_)), "{err}");
        drop(c);
        let err = log
            .reset_group_offsets("g", &[(TopicPartition::new("t", 5), 2)])
            .await
            .expect_err("unknown partition");
        assert!(matches!(err, LogError::UnknownPartition { .. }), "{err}");
        let err = log
            .reset_group_offsets("g", &[(TopicPartition::new("t", 0), -3)])
            .await
            .expect_err("negative");
        assert!(matches!(err, LogError::Invalid(_)), "{err}");
        log.reset_group_offsets(
            "g",
            &[
                (TopicPartition::new("t", 0), 2),
                (TopicPartition::new("t", 1), 8),
            ],
        )
        .await
        .expect("reset");
    }
    let log = open(dir.path(), EmbeddedConfig::default());
    assert_eq!(
        log.committed_offsets("g", "t").await.expect("offsets"),
        vec![(0, Some(2)), (1, Some(8))]
    );
    let mut c = log
        .consumer(ConsumerConfig::new("g", vec!["t".into()]))
        .await
        .expect("consumer");
    let got = c.poll(100, SHORT).await.expect("poll");
    assert_eq!(got.len(), 8 + 2, "resumes from the reset offsets");
}

#[tokio::test]
async fn an_idle_group_can_be_deleted_durably_and_a_busy_one_cannot() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = open(dir.path(), EmbeddedConfig::default());
        let c = member_that_committed(&log, 1).await;
        let err = log.delete_group("g").await.expect_err("busy");
        assert!(matches!(err, LogError::GroupBusy(_)), "{err}");
        drop(c);
        log.delete_group("g").await.expect("delete");
        log.delete_group("g").await.expect("deleting it again");
        log.delete_group("never-existed").await.expect("absent");
        assert_eq!(
            log.committed_offsets("g", "t").await.expect("offsets"),
            vec![(0, None)]
        );
    }
    // Gone after a restart too: a new member of the group starts from the reset policy.
    let log = open(dir.path(), EmbeddedConfig::default());
    assert_eq!(
        log.committed_offsets("g", "t").await.expect("offsets"),
        vec![(0, None)]
    );
}
