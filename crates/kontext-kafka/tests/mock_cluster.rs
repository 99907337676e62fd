//! Error classification on real client paths, against librdkafka's in-process mock cluster
//! (no broker needed): the broker's error codes are injected, kontext's mapping is observed.

use std::time::Duration;

use bytes::Bytes;
use kontext_core::record::ProduceRecord;
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::{ConsumerConfig, Log, LogError};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

fn record(topic: &str) -> ProduceRecord {
    ProduceRecord::new(
        topic,
        Some(Bytes::from_static(b"k")),
        Some(Bytes::from_static(b"v")),
    )
}

fn log_on(mock: &MockCluster<'_, impl rdkafka::ClientContext>) -> KafkaLog {
    let mut config = KafkaConfig::new(mock.bootstrap_servers());
    config.request_timeout = Duration::from_secs(5);
    // Bounds how long librdkafka retries a retriable produce error before giving up.
    config
        .properties
        .insert("delivery.timeout.ms".into(), "1500".into());
    config
        .properties
        .insert("retry.backoff.ms".into(), "50".into());
    KafkaLog::new(config).unwrap()
}

#[tokio::test]
async fn a_produce_the_broker_rejects_is_a_permanent_error() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("t", 3, 1).unwrap();
    let log = log_on(&mock);
    let producer = log.producer().await.unwrap();
    producer
        .send(vec![record("t")])
        .await
        .expect("the mock cluster accepts records");

    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let err = producer.send(vec![record("t")]).await.unwrap_err();
    assert!(
        matches!(
            err,
            LogError::Kafka {
                transient: false,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_retriable_produce_error_that_outlasts_the_delivery_timeout_is_unavailable() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("t", 3, 1).unwrap();
    let log = log_on(&mock);
    let producer = log.producer().await.unwrap();
    producer
        .send(vec![record("t")])
        .await
        .expect("the mock cluster accepts records");

    // librdkafka retries NOT_ENOUGH_REPLICAS itself until delivery.timeout.ms runs out.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 200],
    );
    let err = producer.send(vec![record("t")]).await.unwrap_err();
    assert!(matches!(err, LogError::Unavailable(_)), "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn metadata_errors_keep_their_retriability() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("t", 2, 1).unwrap();
    let log = log_on(&mock);
    let group = || ConsumerConfig::new("g", vec!["t".to_string()]);
    // The mock cluster has no DescribeConfigs, so consumer creation (which checks the topic's
    // metadata first) is the call observed here.
    log.consumer(group()).await.expect("the topic exists");

    mock.topic_error(
        "t",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();
    let err = log.consumer(group()).await.err().unwrap();
    assert!(
        matches!(
            err,
            LogError::Kafka {
                transient: false,
                ..
            }
        ),
        "{err:?}"
    );

    mock.topic_error("t", RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE)
        .unwrap();
    let err = log.consumer(group()).await.err().unwrap();
    assert!(
        matches!(
            err,
            LogError::Kafka {
                transient: true,
                ..
            }
        ),
        "{err:?}"
    );
}

/// A poll dropped while it waits (a shutdown racing it in `select!`, as the processor's loop
/// does) must not have taken records out of librdkafka: whatever it took would be lost.
#[tokio::test]
async fn a_poll_dropped_while_pending_loses_no_record() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("t", 1, 1).unwrap();
    let log = log_on(&mock);
    let producer = log.producer().await.unwrap();
    let sent = 200;
    for _ in 0..sent / 20 {
        producer
            .send((0..20).map(|_| record("t")).collect())
            .await
            .unwrap();
    }
    let mut consumer = log
        .consumer(ConsumerConfig::new("dropped-polls", vec!["t".into()]))
        .await
        .unwrap();

    let mut offsets = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while offsets.len() < sent && tokio::time::Instant::now() < deadline {
        // Poll once and drop the poll if it is not ready.
        let polled = tokio::select! {
            biased;
            polled = consumer.poll(1000, Duration::from_secs(1)) => Some(polled.unwrap()),
            () = std::future::ready(()) => None,
        };
        match polled {
            Some(records) => offsets.extend(records.iter().map(|r| r.offset)),
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let expected: Vec<i64> = (0..sent as i64).collect();
    assert_eq!(offsets, expected, "every record once, in order");
}
