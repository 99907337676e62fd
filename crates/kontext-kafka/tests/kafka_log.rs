//! The Kafka backend against the real broker of `scripts/kafka.sh start`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use common::{assert_no_more, kafka_log, kafka_log_with, poll_exactly, unique};
use kontext_core::partitioner::partition_for_key;
use kontext_core::record::{Header, ProduceRecord, Record, TopicPartition};
use kontext_log::{
    Consumer, ConsumerConfig, CreateOutcome, Log, LogError, OffsetReset, Retention, TopicSpec,
};

fn keyed(topic: &str, i: usize) -> ProduceRecord {
    let mut record = ProduceRecord::new(
        topic,
        Some(Bytes::from(format!("entity-{}", i % 37))),
        Some(Bytes::from(format!("value-{i}"))),
    )
    .with_header("seq", i.to_string());
    if i.is_multiple_of(3) {
        // A header without a value must come back without one, not as an empty value.
        record.headers.push(Header {
            key: "tombstone-hint".into(),
            value: None,
        });
    }
    record
}

/// A new topic (`prefix` made unique) of `partitions` holding `keyed` records `0..n`.
async fn filled_topic(log: &impl Log, prefix: &str, partitions: i32, n: usize) -> String {
    let topic = unique(prefix);
    log.create_topic(&TopicSpec::new(&topic, partitions))
        .await
        .unwrap();
    log.producer()
        .await
        .unwrap()
        .send((0..n).map(|i| keyed(&topic, i)).collect())
        .await
        .unwrap();
    topic
}

/// Whether `group` has no committed offset on any partition of `topic`.
async fn nothing_committed(log: &impl Log, group: &str, topic: &str) -> bool {
    log.committed_offsets(group, topic)
        .await
        .unwrap()
        .iter()
        .all(|(_, o)| o.is_none())
}

/// A new member of `group` subscribed to `topic`.
async fn member(log: &impl Log, group: &str, topic: &str) -> Box<dyn Consumer> {
    log.consumer(ConsumerConfig::new(group, vec![topic.to_string()]))
        .await
        .unwrap()
}

/// The offset after the last of `records` in each partition: what a member commits.
fn next_offsets(records: &[Record]) -> BTreeMap<TopicPartition, i64> {
    let mut next = BTreeMap::new();
    for record in records {
        next.insert(record.topic_partition(), record.offset + 1);
    }
    next
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produces_idempotently_and_consumes_every_record_in_partition_order_with_headers() {
    let log = kafka_log();
    let topic = unique("roundtrip");
    log.create_topic(&TopicSpec::new(&topic, 4)).await.unwrap();
    let producer = log.producer().await.unwrap();

    let mut sent = Vec::new();
    for batch in 0..10 {
        let records: Vec<_> = (batch * 100..(batch + 1) * 100)
            .map(|i| keyed(&topic, i))
            .collect();
        let positions = producer.send(records.clone()).await.unwrap();
        assert_eq!(positions.len(), records.len());
        sent.extend(records.into_iter().zip(positions));
    }
    producer.flush().await.unwrap();
    for (record, position) in &sent {
        let key = record.key.as_ref().unwrap();
        assert_eq!(
            position.partition,
            partition_for_key(key, 4),
            "routed by partition_for_key"
        );
    }

    let mut consumer = log
        .consumer(ConsumerConfig::new(unique("g"), vec![topic.clone()]))
        .await
        .unwrap();
    let received = poll_exactly(consumer.as_mut(), sent.len()).await;
    assert_no_more(consumer.as_mut(), Duration::from_millis(500)).await;

    // Offsets strictly increase within each partition, and match what send reported.
    let mut last_offset: HashMap<i32, i64> = HashMap::new();
    let by_position: HashMap<(i32, i64), &ProduceRecord> = sent
        .iter()
        .map(|(r, p)| ((p.partition, p.offset), r))
        .collect();
    for record in &received {
        if let Some(prev) = last_offset.insert(record.partition, record.offset) {
            assert!(
                record.offset > prev,
                "{} after offset {prev}",
                record.coordinates()
            );
        }
        let original = by_position[&(record.partition, record.offset)];
        assert_eq!(&*record.topic, topic);
        assert_eq!(record.key, original.key);
        assert_eq!(record.value, original.value);
        assert_eq!(
            record.headers,
            original.headers,
            "headers of {}",
            record.coordinates()
        );
        assert!(record.timestamp_ms > 0);
    }
    // Per key, records arrive in the order they were sent.
    let mut last_seq: HashMap<Bytes, usize> = HashMap::new();
    for record in &received {
        let seq: usize = std::str::from_utf8(record.header("seq").unwrap())
            .unwrap()
            .parse()
            .unwrap();
        if let Some(prev) = last_seq.insert(record.key.clone().unwrap(), seq) {
            assert!(seq > prev, "key {:?}: seq {seq} after {prev}", record.key);
        }
    }
    assert_eq!(
        consumer.assignment(),
        (0..4)
            .map(|p| TopicPartition::new(topic.as_str(), p))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_commits_are_in_the_group_once_the_member_closed() {
    let log = kafka_log();
    let topic = filled_topic(&log, "background", 1, 50).await;
    let group = unique("g");
    let mut member = log
        .consumer(ConsumerConfig::new(&group, vec![topic.clone()]))
        .await
        .unwrap();
    let processed = poll_exactly(member.as_mut(), 50).await;
    // One background commit per record, in order: the last one is what the group keeps.
    for record in &processed {
        member
            .commit_in_background(&[(record.topic_partition(), record.offset + 1)])
            .await
            .unwrap();
    }
    drop(member); // librdkafka's close waits for the outstanding commits
    assert_eq!(
        log.committed_offsets(&group, &topic).await.unwrap(),
        vec![(0, Some(50))]
    );
}

/// A background commit is stored, and librdkafka commits it on its interval (1 s by default)
/// while the member stays in the group and no further commit is asked for: what a quiet
/// pipeline relies on for `/v1/lag` and `kafka-consumer-groups` to come back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_commit_reaches_the_group_while_the_member_stays() {
    let log = kafka_log();
    let topic = filled_topic(&log, "interval", 1, 30).await;
    let group = unique("g");
    let mut member = member(&log, &group, &topic).await;
    poll_exactly(member.as_mut(), 30).await;
    member
        .commit_in_background(&[(TopicPartition::new(topic.as_str(), 0), 30)])
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while log.committed_offsets(&group, &topic).await.unwrap() != [(0, Some(30))] {
        assert!(
            std::time::Instant::now() < deadline,
            "the stored offset never reached the group: {:?}",
            log.committed_offsets(&group, &topic).await.unwrap()
        );
        assert_no_more(member.as_mut(), Duration::from_millis(200)).await;
    }
}

/// With an interval too long to matter, a rebalance still commits what the member stored
/// before its partitions are revoked, so the next owner does not re-read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_commits_the_offsets_a_member_stored() {
    let log = kafka_log_with(&[("auto.commit.interval.ms", "600000")]);
    let topic = filled_topic(&log, "revoke", 2, 40).await;
    let group = unique("g");
    let mut a = member(&log, &group, &topic).await;
    let records = poll_exactly(a.as_mut(), 40).await;
    let stored: Vec<(TopicPartition, i64)> = next_offsets(&records).into_iter().collect();
    a.commit_in_background(&stored).await.unwrap();
    assert!(
        nothing_committed(&log, &group, &topic).await,
        "stored, not committed yet: the interval is ten minutes"
    );

    // A second member joins; serving the rebalance revokes a's partitions, which commits them
    // (had it not, b would now read some of the 40 records again).
    let mut b = member(&log, &group, &topic).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert_no_more(a.as_mut(), Duration::from_millis(100)).await;
        assert_no_more(b.as_mut(), Duration::from_millis(100)).await;
        if !a.assignment().is_empty() && !b.assignment().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the group did not settle"
        );
    }
    let expected: Vec<(i32, Option<i64>)> = stored
        .iter()
        .map(|(tp, o)| (tp.partition, Some(*o)))
        .collect();
    assert_eq!(
        log.committed_offsets(&group, &topic).await.unwrap(),
        expected
    );
}

/// A member whose offsets go through transactions (`exactly_once`) has librdkafka's automatic
/// commit off, as `send_offsets_to_transaction` requires: offsets stored in it are not
/// committed, neither on the interval nor at close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_member_commits_nothing_on_its_own() {
    let log = kafka_log_with(&[("auto.commit.interval.ms", "100")]);
    let topic = filled_topic(&log, "txn-member", 1, 20).await;
    let group = unique("g");
    let mut member = log
        .consumer(ConsumerConfig::new(&group, vec![topic.clone()]).transactional(true))
        .await
        .unwrap();
    poll_exactly(member.as_mut(), 20).await;
    member
        .commit_in_background(&[(TopicPartition::new(topic.as_str(), 0), 20)])
        .await
        .unwrap();
    // Ten intervals pass while it stays, then it closes.
    assert_no_more(member.as_mut(), Duration::from_secs(1)).await;
    drop(member);
    assert!(
        nothing_committed(&log, &group, &topic).await,
        "{:?}",
        log.committed_offsets(&group, &topic).await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_resumes_from_the_committed_offsets() {
    let log = kafka_log();
    let topic = filled_topic(&log, "resume", 3, 300).await;
    let group = unique("g");

    assert!(
        nothing_committed(&log, &group, &topic).await,
        "a new group has nothing committed"
    );

    // The first member processes 150 records, commits exactly those, and goes away.
    let mut first = log
        .consumer(ConsumerConfig::new(&group, vec![topic.clone()]))
        .await
        .unwrap();
    let processed = poll_exactly(first.as_mut(), 150).await;
    let next = next_offsets(&processed);
    let offsets: Vec<_> = next.clone().into_iter().collect();
    first.commit(&offsets).await.unwrap();
    drop(first);

    let committed = log.committed_offsets(&group, &topic).await.unwrap();
    for (partition, offset) in &committed {
        let expected = next
            .get(&TopicPartition::new(topic.as_str(), *partition))
            .copied();
        assert_eq!(
            *offset, expected,
            "committed offset of partition {partition}"
        );
    }

    // The second member reads exactly the rest.
    let mut second = log
        .consumer(ConsumerConfig::new(&group, vec![topic.clone()]))
        .await
        .unwrap();
    let rest = poll_exactly(second.as_mut(), 150).await;
    assert_no_more(second.as_mut(), Duration::from_secs(1)).await;
    for record in &rest {
        let committed = next.get(&record.topic_partition()).copied().unwrap_or(0);
        assert!(
            record.offset >= committed,
            "{} was committed already",
            record.coordinates()
        );
    }
    let mut all: Vec<_> = processed
        .iter()
        .chain(&rest)
        .map(|r| r.value.clone().unwrap())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        300,
        "every record exactly once across the two members"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_reset_skips_what_was_there_before_the_group_started() {
    let log = kafka_log();
    let topic = unique("latest");
    log.create_topic(&TopicSpec::new(&topic, 1)).await.unwrap();
    let producer = log.producer().await.unwrap();
    producer.send(vec![keyed(&topic, 0)]).await.unwrap();

    let mut config = ConsumerConfig::new(unique("g"), vec![topic.clone()]);
    config.offset_reset = OffsetReset::Latest;
    let mut consumer = log.consumer(config).await.unwrap();
    // Wait for the assignment (and the reset to the end) before producing again.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while consumer.assignment().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no assignment within 30 s"
        );
        assert!(consumer
            .poll(10, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty());
    }
    // The position is only fixed once the reset resolved; give librdkafka a moment.
    assert!(consumer
        .poll(10, Duration::from_secs(1))
        .await
        .unwrap()
        .is_empty());
    producer.send(vec![keyed(&topic, 1)]).await.unwrap();
    let got = poll_exactly(consumer.as_mut(), 1).await;
    assert_eq!(got[0].value.as_deref(), Some(&b"value-1"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_lists_and_describes_topics_with_compaction_and_retention() {
    let log = kafka_log();
    let compacted = unique("compacted");
    let plain = unique("plain");

    let spec = TopicSpec {
        name: compacted.clone(),
        partitions: 3,
        compacted: true,
        retention: Retention {
            time: Some(Duration::from_secs(3600)),
            bytes: Some(10 << 20),
        },
    };
    assert_eq!(
        log.create_topic(&spec).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        log.create_topic(&spec).await.unwrap(),
        CreateOutcome::AlreadyExists
    );
    let mismatch = log
        .create_topic(&TopicSpec {
            partitions: 5,
            ..spec.clone()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            mismatch,
            LogError::TopicMismatch {
                existing: 3,
                requested: 5,
                ..
            }
        ),
        "{mismatch:?}"
    );
    assert_eq!(
        log.create_topic(&TopicSpec::new(&plain, 2)).await.unwrap(),
        CreateOutcome::Created
    );

    let topics = log.list_topics().await.unwrap();
    assert!(
        topics.contains(&compacted) && topics.contains(&plain),
        "{topics:?}"
    );
    assert!(
        topics.iter().all(|t| !t.starts_with("__")),
        "internal topics are hidden"
    );
    assert!(topics.windows(2).all(|w| w[0] <= w[1]), "sorted");

    let described = log.describe_topic(&compacted).await.unwrap();
    assert!(described.compacted);
    assert_eq!(described.retention, spec.retention);
    assert_eq!(described.partitions.len(), 3);

    // A plain topic is unlimited unless asked otherwise (not Kafka's 7-day default).
    let producer = log.producer().await.unwrap();
    let mut record = ProduceRecord::new(&plain, None, Some(Bytes::from_static(b"x")));
    record.partition = Some(1);
    producer
        .send(vec![record.clone(), record.clone(), record])
        .await
        .unwrap();
    let described = log.describe_topic(&plain).await.unwrap();
    assert!(!described.compacted);
    assert_eq!(described.retention, Retention::default());
    let watermarks: Vec<_> = described
        .partitions
        .iter()
        .map(|p| (p.partition, p.low_watermark, p.high_watermark))
        .collect();
    assert_eq!(watermarks, vec![(0, 0, 0), (1, 0, 3)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topics_and_partitions_are_permanent_errors() {
    let log = kafka_log();
    let missing = unique("missing");
    let err = log.describe_topic(&missing).await.unwrap_err();
    assert!(
        matches!(err, LogError::UnknownTopic(ref t) if *t == missing),
        "{err:?}"
    );
    assert!(!err.is_transient());

    let producer = log.producer().await.unwrap();
    let err = producer
        .send(vec![ProduceRecord::new(
            &missing,
            None,
            Some(Bytes::from_static(b"x")),
        )])
        .await
        .unwrap_err();
    assert!(matches!(err, LogError::UnknownTopic(_)), "{err:?}");

    let err = log
        .consumer(ConsumerConfig::new("g", vec![missing.clone()]))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, LogError::UnknownTopic(_)), "{err:?}");

    let topic = unique("two");
    log.create_topic(&TopicSpec::new(&topic, 2)).await.unwrap();
    let mut record = ProduceRecord::new(&topic, None, None);
    record.partition = Some(2);
    let err = producer.send(vec![record]).await.unwrap_err();
    assert!(
        matches!(err, LogError::UnknownPartition { partition: 2, .. }),
        "{err:?}"
    );

    let err = log
        .create_topic(&TopicSpec::new("zero", 0))
        .await
        .unwrap_err();
    assert!(matches!(err, LogError::Invalid(_)), "{err:?}");
    // Names Kafka refuses, refused before any request (librdkafka's metadata call fails on
    // one over 512 bytes without saying why).
    for bad in ["has space", "..", &"x".repeat(600)] {
        let err = log.create_topic(&TopicSpec::new(bad, 1)).await.unwrap_err();
        assert!(matches!(err, LogError::Invalid(_)), "{bad}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_unavailable_and_transient() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let mut config = kontext_kafka::KafkaConfig::new("127.0.0.1:1");
    config.request_timeout = Duration::from_secs(2);
    let log = kontext_kafka::KafkaLog::new(config).unwrap();
    let err = log.list_topics().await.unwrap_err();
    assert!(matches!(err, LogError::Unavailable(_)), "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_of_a_group_split_the_partitions_and_each_record_goes_to_one() {
    let log = kafka_log();
    let topic = unique("split");
    let group = unique("g");
    log.create_topic(&TopicSpec::new(&topic, 4)).await.unwrap();
    let mut a = log
        .consumer(ConsumerConfig::new(&group, vec![topic.clone()]))
        .await
        .unwrap();
    let mut b = log
        .consumer(ConsumerConfig::new(&group, vec![topic.clone()]))
        .await
        .unwrap();

    // Both must poll for the group to settle (polling is what serves rebalances).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(a
            .poll(10, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty());
        assert!(b
            .poll(10, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty());
        let (pa, pb) = (a.assignment(), b.assignment());
        if !pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == 4 {
            assert!(
                pa.iter().all(|p| !pb.contains(p)),
                "disjoint: {pa:?} {pb:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "group did not settle: {pa:?} {pb:?}"
        );
    }
    // DescribeGroups sees both members (a rebuild refuses a store other instances feed).
    assert_eq!(log.group_members(&group).await.unwrap(), Some(2));
    assert_eq!(log.group_members(&unique("nobody")).await.unwrap(), Some(0));
    let producer = log.producer().await.unwrap();
    producer
        .send((0..400).map(|i| keyed(&topic, i)).collect())
        .await
        .unwrap();

    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got_a.len() + got_b.len() < 400 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} + {} of 400",
            got_a.len(),
            got_b.len()
        );
        got_a.extend(a.poll(400, Duration::from_millis(100)).await.unwrap());
        got_b.extend(b.poll(400, Duration::from_millis(100)).await.unwrap());
    }
    assert_eq!(got_a.len() + got_b.len(), 400, "no record delivered twice");
    let assigned_a = a.assignment();
    assert!(got_a
        .iter()
        .all(|r| assigned_a.contains(&r.topic_partition())));
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both members got work"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_member_delivers_nothing_through_a_rebalance_and_resumes_without_gaps() {
    let log = kafka_log();
    let topic = unique("pause");
    let group = unique("g");
    log.create_topic(&TopicSpec::new(&topic, 4)).await.unwrap();
    let producer = log.producer().await.unwrap();
    let batch = |offsets: std::ops::Range<i64>| -> Vec<ProduceRecord> {
        (0..4)
            .flat_map(|p| offsets.clone().map(move |i| (p, i)))
            .map(|(p, i)| ProduceRecord {
                topic: topic.as_str().into(),
                partition: Some(p),
                value: Some(Bytes::from(format!("{p}:{i}"))),
                ..Default::default()
            })
            .collect()
    };
    let member = || log.consumer(ConsumerConfig::new(&group, vec![topic.clone()]));

    // B owns every partition first, reads the first 10 records of each and commits them.
    producer.send(batch(0..10)).await.unwrap();
    let mut b = member().await.unwrap();
    let first = poll_exactly(b.as_mut(), 40).await;
    let mut next: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    for r in &first {
        next.insert(r.topic_partition(), r.offset + 1);
    }
    b.commit(&next.into_iter().collect::<Vec<_>>())
        .await
        .unwrap();

    // A joins paused, before it has any partition: what the rebalance gives it stays paused.
    let mut a = member().await.unwrap();
    a.pause().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(a
            .poll(10, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty());
        assert!(b
            .poll(10, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty());
        let (pa, pb) = (a.assignment(), b.assignment());
        if !pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "group did not settle: {pa:?} {pb:?}"
        );
    }
    producer.send(batch(10..20)).await.unwrap();

    // B leaves: A is assigned B's partitions too, which it had never paused itself. Polling
    // (which serves the rebalance) still delivers nothing.
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while a.assignment().len() < 4 {
        let got = a.poll(100, Duration::from_millis(100)).await.unwrap();
        assert!(got.is_empty(), "delivered while paused: {got:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "A never got B's partitions"
        );
    }
    assert_no_more(a.as_mut(), Duration::from_secs(2)).await;
    assert_eq!(
        a.assignment().len(),
        4,
        "still a member, with every partition"
    );

    // Resumed: exactly the records after the committed offsets, each once.
    a.resume().await.unwrap();
    a.resume().await.unwrap();
    let rest = poll_exactly(a.as_mut(), 40).await;
    assert_no_more(a.as_mut(), Duration::from_secs(1)).await;
    let mut coords: Vec<(i32, i64)> = rest.iter().map(|r| (r.partition, r.offset)).collect();
    coords.sort();
    let want: Vec<(i32, i64)> = (0..4).flat_map(|p| (10..20).map(move |i| (p, i))).collect();
    assert_eq!(coords, want);
    for r in &rest {
        assert_eq!(
            r.value.as_deref(),
            Some(format!("{}:{}", r.partition, r.offset).as_bytes())
        );
    }
}

/// A member that stops polling for longer than `max.poll.interval.ms` is taken out of its
/// group by librdkafka. That is not the end of it: the error is transient, the next poll
/// rejoins, and the records not committed come again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_past_its_poll_interval_gets_a_transient_error_and_rejoins() {
    let mut config = kontext_kafka::KafkaConfig::new(common::bootstrap());
    // 6 s: the broker's smallest session timeout; librdkafka wants the poll interval >= it.
    for (k, v) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "1000"),
        ("max.poll.interval.ms", "6000"),
    ] {
        config.properties.insert(k.into(), v.into());
    }
    let log = kontext_kafka::KafkaLog::new(config).unwrap();
    let topic = filled_topic(&log, "poll-interval", 1, 10).await;
    let group = unique("g");
    let producer = log.producer().await.unwrap();
    let mut consumer = log
        .consumer(ConsumerConfig::new(&group, vec![topic.clone()]))
        .await
        .unwrap();
    poll_exactly(consumer.as_mut(), 10).await;

    // Not polling for well over the interval (the scenario, not a timed assertion).
    tokio::time::sleep(Duration::from_secs(9)).await;
    producer
        .send((10..20).map(|i| keyed(&topic, i)).collect())
        .await
        .unwrap();
    let mut errors = 0;
    let mut offsets = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while offsets.range(10..20).count() < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "got {offsets:?} after {errors} errors"
        );
        match consumer.poll(100, Duration::from_millis(200)).await {
            Ok(records) => offsets.extend(records.iter().map(|r| r.offset)),
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                errors += 1;
            }
        }
    }
    assert!(errors > 0, "the member was expected to leave its group");
    assert_eq!(consumer.assignment().len(), 1, "a member again");
}

/// `read_partition` reads one partition's range without joining a group (what restoring a
/// task's state from its changelog does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_partition_returns_exactly_the_range_asked_for() {
    let log = kafka_log();
    let topic = unique("read-partition");
    log.create_topic(&TopicSpec::new(&topic, 2)).await.unwrap();
    let producer = log.producer().await.unwrap();
    let records: Vec<_> = (0..300)
        .map(|i| {
            let mut r = keyed(&topic, i);
            r.partition = Some(1);
            r
        })
        .collect();
    producer.send(records).await.unwrap();
    let offsets = |records: &[kontext_core::record::Record]| -> Vec<i64> {
        records.iter().map(|r| r.offset).collect()
    };
    let middle = log.read_partition(&topic, 1, 10, 250).await.unwrap();
    assert_eq!(offsets(&middle), (10..250).collect::<Vec<_>>());
    assert_eq!(middle[0].value.as_deref(), Some(&b"value-10"[..]));
    assert_eq!(middle[0].header("seq"), Some(&b"10"[..]));
    // Past the end: what there is; an empty range or partition: nothing.
    let end = log.read_partition(&topic, 1, 290, 1_000).await.unwrap();
    assert_eq!(offsets(&end), (290..300).collect::<Vec<_>>());
    assert!(log
        .read_partition(&topic, 1, 5, 5)
        .await
        .unwrap()
        .is_empty());
    assert!(log
        .read_partition(&topic, 0, 0, 10)
        .await
        .unwrap()
        .is_empty());
}

/// `delete_group` is `kafka-consumer-groups --delete`: refused while a member is in the group,
/// then the group and its offsets are gone, and deleting it again is not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_group_is_deleted_with_its_offsets_and_a_busy_one_is_refused() {
    let log = kafka_log();
    let topic = filled_topic(&log, "delete-group", 2, 20).await;
    let group = unique("g");
    let mut member = log
        .consumer(ConsumerConfig::new(&group, vec![topic.clone()]))
        .await
        .unwrap();
    let records = poll_exactly(member.as_mut(), 20).await;
    let next = next_offsets(&records);
    member
        .commit(&next.into_iter().collect::<Vec<_>>())
        .await
        .unwrap();
    let err = log.delete_group(&group).await.unwrap_err();
    assert!(matches!(err, LogError::GroupBusy(_)), "{err}");

    drop(member); // leaves the group
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match log.delete_group(&group).await {
            Ok(()) => break,
            Err(LogError::GroupBusy(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("deleting the idle group: {e}"),
        }
    }
    assert!(
        nothing_committed(&log, &group, &topic).await,
        "the offsets went with the group"
    );
    log.delete_group(&group).await.expect("deleting it again");
}

/// `dedicated_producer` is a client of its own each time (the shared `producer` is one; the
/// broker sees a producer id per client), and records from both land in one partition in the
/// order they were acknowledged, with their offsets reported right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedicated_producer_is_its_own_client_and_writes_beside_the_shared_one() {
    let log = kafka_log();
    let topic = unique("dedicated");
    log.create_topic(&TopicSpec::new(&topic, 1)).await.unwrap();
    let shared = log.producer().await.unwrap();
    let (one, two) = (
        log.dedicated_producer().await.unwrap(),
        log.dedicated_producer().await.unwrap(),
    );
    let same = |a: &std::sync::Arc<dyn kontext_log::Producer>,
                b: &std::sync::Arc<dyn kontext_log::Producer>| {
        std::ptr::addr_eq(std::sync::Arc::as_ptr(a), std::sync::Arc::as_ptr(b))
    };
    assert!(same(&shared, &log.producer().await.unwrap()));
    assert!(!same(&one, &shared) && !same(&two, &shared) && !same(&one, &two));

    let mut offsets = Vec::new();
    for (i, producer) in [&shared, &one, &two, &one, &shared].into_iter().enumerate() {
        let positions = producer.send(vec![keyed(&topic, i)]).await.unwrap();
        offsets.push(positions[0].offset);
    }
    assert_eq!(offsets, (0..5).collect::<Vec<i64>>());
    let read = log.read_partition(&topic, 0, 0, 5).await.unwrap();
    let values: Vec<_> = read.iter().map(|r| r.value.clone().unwrap()).collect();
    let expected: Vec<_> = (0..5).map(|i| Bytes::from(format!("value-{i}"))).collect();
    assert_eq!(values, expected);
    // The broker's own view, through Kafka's tool: three idempotent clients wrote the
    // partition, each under a producer id of its own.
    let out = common::kafka_tool(
        &[
            "transactions",
            "--bootstrap-server",
            &common::bootstrap(),
            "describe-producers",
            "--topic",
            &topic,
            "--partition",
            "0",
        ],
        b"",
    );
    let ids: std::collections::BTreeSet<&str> = (out.lines().skip(1))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(
        ids.len(),
        3,
        "kafka-transactions describe-producers:\n{out}"
    );
}
