//! kontext against Kafka's own Java code: the Java producer's partitioner, records written by
//! the console producer, and commits as `kafka-consumer-groups` shows them.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use bytes::Bytes;
use common::{kafka_classpath, kafka_log, kafka_tool, poll_exactly, repo_root, unique};
use kontext_core::partitioner::partition_for_key;
use kontext_core::record::{ProduceRecord, TopicPartition};
use kontext_log::{ConsumerConfig, Log, TopicSpec};

const PARTITION_COUNTS: [i32; 4] = [1, 7, 12, 1000];

/// ~10k keys: ASCII ids, non-ASCII UTF-8 (CJK, Cyrillic, emoji, combining marks), the empty
/// key, every length 0..64 and random bytes that are not UTF-8 at all.
fn keys() -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = vec![Vec::new()];
    for i in 0..4000 {
        keys.push(format!("customer-{i}").into_bytes());
    }
    for i in 0..1000 {
        keys.push(format!("顧客-{i}").into_bytes());
        keys.push(format!("ключ-{i}").into_bytes());
        keys.push(format!("🔑{i}e\u{301}").into_bytes());
    }
    for len in 0..64 {
        keys.push((0..len).map(|b| (b * 37 + len) as u8).collect());
    }
    for _ in 0..2936 {
        let len = rand::random_range(0..100);
        keys.push((0..len).map(|_| rand::random::<u8>()).collect());
    }
    keys
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn partition_for_key_agrees_with_the_java_producers_partitioner() {
    let keys = keys();
    let input: String = keys.iter().map(|k| hex(k) + "\n").collect();
    let mut child = Command::new("java")
        .arg("-cp")
        .arg(kafka_classpath())
        .arg(repo_root().join("scripts/kafka/PartitionerCheck.java"))
        .args(PARTITION_COUNTS.map(|c| c.to_string()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("java (run scripts/install-deps.sh)");
    let mut stdin = child.stdin.take().unwrap();
    // Written from a thread: Java answers while reading, and both pipes have bounded buffers.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "PartitionerCheck failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), keys.len());
    for (key, line) in keys.iter().zip(lines) {
        let java: Vec<i32> = line.split(' ').map(|p| p.parse().unwrap()).collect();
        let ours: Vec<i32> = PARTITION_COUNTS
            .iter()
            .map(|&c| partition_for_key(key, c))
            .collect();
        assert_eq!(
            ours,
            java,
            "key {:?} (hex {})",
            String::from_utf8_lossy(key),
            hex(key)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_from_the_console_producer_land_where_partition_for_key_says() {
    let log = kafka_log();
    let topic = unique("java-keys");
    log.create_topic(&TopicSpec::new(&topic, 12)).await.unwrap();

    // The console producer splits each line at the first tab: keys must not contain one.
    let keys: Vec<String> = (0..300)
        .map(|i| format!("customer-{i}"))
        .chain((0..100).map(|i| format!("顧客-{i}")))
        .chain((0..100).map(|i| format!("🔑-{i}")))
        .collect();
    let input: String = keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{k}\tv{i}\n"))
        .collect();
    kafka_tool(
        &[
            "console-producer",
            "--bootstrap-server",
            &common::bootstrap(),
            "--topic",
            &topic,
            "--property",
            "parse.key=true",
            "--property",
            "key.separator=\t",
        ],
        input.as_bytes(),
    );

    let mut consumer = log
        .consumer(ConsumerConfig::new(unique("g"), vec![topic.clone()]))
        .await
        .unwrap();
    let records = poll_exactly(consumer.as_mut(), keys.len()).await;
    let mut seen = 0;
    for record in &records {
        let key = record.key.as_ref().expect("keyed");
        assert_eq!(
            record.partition,
            partition_for_key(key, 12),
            "key {:?} written by the Java producer",
            String::from_utf8_lossy(key)
        );
        seen += 1;
    }
    assert_eq!(seen, keys.len());
    let mut got: Vec<&[u8]> = records.iter().map(|r| r.key.as_deref().unwrap()).collect();
    got.sort();
    let mut want: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    want.sort();
    assert_eq!(got, want, "every key arrived intact (UTF-8 included)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_what_kafka_consumer_groups_describes() {
    let log = kafka_log();
    let topic = unique("groups");
    let group = unique("g");
    log.create_topic(&TopicSpec::new(&topic, 3)).await.unwrap();
    let producer = log.producer().await.unwrap();
    let records: Vec<_> = (0..60)
        .map(|i| {
            ProduceRecord::new(
                &topic,
                Some(Bytes::from(format!("k{i}"))),
                Some(Bytes::from("v")),
            )
        })
        .collect();
    producer.send(records).await.unwrap();

    let mut consumer = log
        .consumer(ConsumerConfig::new(&group, vec![topic.clone()]))
        .await
        .unwrap();
    let got = poll_exactly(consumer.as_mut(), 60).await;
    let mut next: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    for r in &got {
        next.insert(r.topic_partition(), r.offset + 1);
    }
    // Commit one less than everything on partition 0, to see a lag of 1 there.
    let offsets: Vec<_> = next
        .iter()
        .map(|(tp, o)| (tp.clone(), if tp.partition == 0 { o - 1 } else { *o }))
        .collect();
    consumer.commit(&offsets).await.unwrap();
    drop(consumer);

    let out = kafka_tool(
        &[
            "consumer-groups",
            "--bootstrap-server",
            &common::bootstrap(),
            "--describe",
            "--group",
            &group,
        ],
        b"",
    );
    // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
    let mut described: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 6 && cols[0] == group && cols[1] == topic {
            described.insert(
                cols[2].parse().unwrap(),
                (cols[3].parse().unwrap(), cols[5].parse().unwrap()),
            );
        }
    }
    let expected: BTreeMap<i32, (i64, i64)> = offsets
        .iter()
        .map(|(tp, o)| (tp.partition, (*o, if tp.partition == 0 { 1 } else { 0 })))
        .collect();
    assert_eq!(described, expected, "kafka-consumer-groups output:\n{out}");
}
