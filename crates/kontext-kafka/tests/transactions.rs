//! Kafka transactions (`Log::transactional_producer`) against the real broker of
//! `scripts/kafka.sh start`: records and group offsets become visible together or not at all,
//! and a second producer with the same transactional id fences the first. What a
//! `read_uncommitted` reader sees is checked with Kafka's own console consumer, so that the
//! aborted records are shown to be in the log (and hidden), not merely never sent.

mod common;

use bytes::Bytes;
use common::{kafka_log, kafka_tool, poll_exactly, unique};
use kontext_core::record::{ProduceRecord, TopicPartition};
use kontext_log::{ConsumerConfig, Log, TopicSpec};

fn values(topic: &str, prefix: &str, n: usize) -> Vec<ProduceRecord> {
    (0..n)
        .map(|i| {
            ProduceRecord::new(
                topic,
                Some(Bytes::from(format!("k{i}"))),
                Some(Bytes::from(format!("{prefix}-{i}"))),
            )
        })
        .collect()
}

/// The values of `topic`'s only partition as kontext's `read_partition` (read_committed)
/// reads them, up to the high watermark.
async fn committed_values(log: &impl Log, topic: &str, high: i64) -> Vec<Bytes> {
    // A commit returns once the coordinator has logged it; it writes the partitions' markers
    // after that, and until then a read_committed reader stops before the transaction.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let now = log.describe_topic(topic).await.unwrap().partitions[0].high_watermark;
        if now >= high {
            assert_eq!(now, high, "more records than expected in {topic}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{topic} stayed at high watermark {now}, expected {high} (records and markers)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    log.read_partition(topic, 0, 0, high)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| r.value)
        .collect()
}

/// The values of `topic`'s only partition as Kafka's console consumer reads them with
/// `isolation`, stopping after `expect` records or 10 s without one.
fn console_values(topic: &str, isolation: &str, expect: usize) -> Vec<String> {
    let out = kafka_tool(
        &[
            "console-consumer",
            "--bootstrap-server",
            &common::bootstrap(),
            "--topic",
            topic,
            "--from-beginning",
            "--isolation-level",
            isolation,
            "--max-messages",
            &expect.to_string(),
            "--timeout-ms",
            "10000",
        ],
        b"",
    );
    out.lines().map(str::to_string).collect()
}

/// A one-partition input topic holding `inputs` records, read by a member of a new group,
/// and an empty one-partition output topic.
struct Setup {
    log: kontext_kafka::KafkaLog,
    input: String,
    output: String,
    group: String,
    consumer: Box<dyn kontext_log::Consumer>,
}

async fn setup(prefix: &str, inputs: usize) -> Setup {
    let log = kafka_log();
    let (input, output) = (
        unique(&format!("{prefix}-in")),
        unique(&format!("{prefix}-out")),
    );
    let group = unique(&format!("{prefix}-g"));
    log.create_topic(&TopicSpec::new(&input, 1)).await.unwrap();
    log.create_topic(&TopicSpec::new(&output, 1)).await.unwrap();
    log.producer()
        .await
        .unwrap()
        .send(values(&input, "in", inputs))
        .await
        .unwrap();
    let mut consumer = log
        .consumer(ConsumerConfig::new(&group, vec![input.clone()]).transactional(true))
        .await
        .unwrap();
    poll_exactly(consumer.as_mut(), inputs).await;
    Setup {
        log,
        input,
        output,
        group,
        consumer,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_offsets_commit_together_and_an_aborted_transaction_shows_nothing() {
    let Setup {
        log,
        input,
        output,
        group,
        consumer,
    } = setup("txn", 10).await;
    let txn = log.transactional_producer(&unique("txn")).await.unwrap();
    let offsets = [(TopicPartition::new(input.as_str(), 0), 10)];

    txn.begin().await.unwrap();
    let sent = txn.send(values(&output, "aborted", 3)).await.unwrap();
    assert_eq!(sent.len(), 3, "sends inside a transaction are acknowledged");
    txn.abort().await.unwrap();
    assert_eq!(
        log.committed_offsets(&group, &input).await.unwrap(),
        vec![(0, None)],
        "an aborted transaction commits no offsets"
    );

    txn.begin().await.unwrap();
    txn.send(values(&output, "committed", 3)).await.unwrap();
    txn.commit(consumer.group_metadata().expect("a group member"), &offsets)
        .await
        .unwrap();

    assert_eq!(
        log.committed_offsets(&group, &input).await.unwrap(),
        vec![(0, Some(10))]
    );
    // The log holds both transactions (3 + 3 records, 2 markers); `read_committed` readers
    // (kontext's own, and Kafka's console consumer) see only the committed one.
    assert_eq!(
        committed_values(&log, &output, 8).await,
        ["committed-0", "committed-1", "committed-2"]
    );
    assert_eq!(
        console_values(&output, "read_uncommitted", 6),
        [
            "aborted-0",
            "aborted-1",
            "aborted-2",
            "committed-0",
            "committed-1",
            "committed-2"
        ]
    );
    assert_eq!(
        console_values(&output, "read_committed", 3),
        ["committed-0", "committed-1", "committed-2"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_producer_with_the_same_id_fences_the_old_one_and_aborts_its_transaction() {
    let Setup {
        log,
        input,
        output,
        group,
        consumer,
    } = setup("fence", 4).await;
    let offsets = [(TopicPartition::new(input.as_str(), 0), 4)];
    let id = unique("fenced");

    let zombie = log.transactional_producer(&id).await.unwrap();
    zombie.begin().await.unwrap();
    zombie.send(values(&output, "zombie", 2)).await.unwrap();
    // The successor's registration aborts the zombie's open transaction and fences it.
    let successor = log.transactional_producer(&id).await.unwrap();
    let fenced = zombie
        .commit(consumer.group_metadata().unwrap(), &offsets)
        .await
        .expect_err("a fenced producer cannot commit");
    assert!(!fenced.is_transient(), "fencing is permanent: {fenced}");
    assert_eq!(
        log.committed_offsets(&group, &input).await.unwrap(),
        vec![(0, None)]
    );

    successor.begin().await.unwrap();
    successor
        .send(values(&output, "successor", 2))
        .await
        .unwrap();
    successor
        .commit(consumer.group_metadata().unwrap(), &offsets)
        .await
        .unwrap();
    // 2 zombie records, the marker of their abort, 2 successor records, its commit marker.
    assert_eq!(
        committed_values(&log, &output, 6).await,
        ["successor-0", "successor-1"]
    );
    assert_eq!(
        log.committed_offsets(&group, &input).await.unwrap(),
        vec![(0, Some(4))]
    );
}

/// The processor's changelog restore reads to the high watermark `describe_topic` reports and
/// records it as where the state is current. With a transaction open on the partition (another
/// instance's batch), that must be the last stable offset: a read_committed reader stops there,
/// and an end recorded past the open transaction would skip its records once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermarks_stop_before_an_open_transaction() {
    let Setup {
        log,
        input,
        output,
        consumer,
        ..
    } = setup("open-txn", 1).await;
    let plain = log.producer().await.unwrap();
    plain.send(values(&output, "plain", 3)).await.unwrap();
    let writer = log.transactional_producer(&unique("open")).await.unwrap();
    writer.begin().await.unwrap();
    // Offsets 3 and 4, written but not committed.
    let positions = writer.send(values(&output, "open", 2)).await.unwrap();
    assert_eq!(positions.last().unwrap().offset, 4);

    let high = log.describe_topic(&output).await.unwrap().partitions[0].high_watermark;
    assert_eq!(high, 3, "the last stable offset, not the log end (5)");
    let read = log.read_partition(&output, 0, 0, 5).await.unwrap();
    assert_eq!(read.len(), 3, "a read stops at the open transaction");

    let offsets = [(TopicPartition::new(input.as_str(), 0), 1)];
    writer
        .commit(consumer.group_metadata().unwrap(), &offsets)
        .await
        .unwrap();
    // The two records and the commit marker.
    assert_eq!(
        committed_values(&log, &output, 6).await,
        ["plain-0", "plain-1", "plain-2", "open-0", "open-1"]
    );
}
