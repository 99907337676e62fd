//! kill -9 of `kontext quickstart --kafka` in the middle of ingest, then a restart on the same
//! data directory: every valid record in the Kafka topics is applied to the store exactly once.
//!
//! Its own test binary so that no other test writes to the quickstart's topics meanwhile.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use kontext_core::config::PipelineConfig;
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::{ConsumerConfig, Log};
use kontext_store::{Change, EmbeddedStore, StoreSchema};
use kontext_stream::{Outcome, Router};
use support::{
    assert_applied_exactly_once, free_port, kafka_bootstrap, path_str, wait_for_zero_lag, Kontext,
};

const PIPELINE: &str = include_str!("../../../examples/customer-service/pipeline.yaml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_kafka_loses_nothing_and_applies_nothing_twice() {
    let bootstrap = kafka_bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let data = path_str(dir.path()).to_string();

    let port = free_port().to_string();
    let mut kontext = Kontext::spawn(&[
        "quickstart",
        "--kafka",
        &bootstrap,
        "--data-dir",
        &data,
        "--port",
        &port,
        "--rate",
        "2000",
    ]);
    kontext.wait_for_line("curl -s http://", Duration::from_secs(120));
    tokio::time::sleep(Duration::from_millis(700)).await;
    kontext.kill_9();

    // The killed member stays in the groups until its session times out (45 s): the restart
    // waits that out, then resumes from the committed offsets. Zero lag includes the
    // processor's groups: the store's own topics can be drained while the processor still owes
    // it feature records (a CI run once stopped there and missed them).
    let port = free_port();
    let kontext = Kontext::spawn(&[
        "quickstart",
        "--kafka",
        &bootstrap,
        "--data-dir",
        &data,
        "--port",
        &port.to_string(),
        "--no-generator",
    ]);
    wait_for_zero_lag(port, Duration::from_secs(180)).await;
    kontext.interrupt();

    // Recount every record of the topics with a fresh group.
    let config = PipelineConfig::parse("pipeline.yaml", PIPELINE).unwrap();
    let router = Router::new(&config);
    let log = KafkaLog::new(KafkaConfig::new(bootstrap)).unwrap();
    let mut end: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for topic in config.source_topics() {
        for p in log.describe_topic(&topic).await.unwrap().partitions {
            if p.high_watermark > p.low_watermark {
                end.insert((topic.clone(), p.partition), p.high_watermark);
            }
        }
    }
    let group = format!("recount-{}", std::process::id());
    let mut consumer = log
        .consumer(ConsumerConfig::new(&group, config.source_topics()))
        .await
        .unwrap();
    let mut seen: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut expected: BTreeMap<(String, String), u64> = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while end
        .iter()
        .any(|(k, e)| seen.get(k).copied().unwrap_or(0) < *e)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "recount did not reach the end: {seen:?} vs {end:?}"
        );
        for r in consumer
            .poll(5_000, Duration::from_millis(500))
            .await
            .unwrap()
        {
            seen.insert((r.topic.to_string(), r.partition), r.offset + 1);
            if let Outcome::Update(u) = router.process(&r) {
                assert!(matches!(u.change, Change::Upsert(_)));
                *expected.entry((u.entity_type, u.entity_id)).or_default() += 1;
            }
        }
    }
    drop(consumer);

    let store = EmbeddedStore::open(
        &dir.path().join("stores/main.redb"),
        StoreSchema::from_config(&config),
    )
    .unwrap();
    assert_applied_exactly_once(&store, &expected);
}
