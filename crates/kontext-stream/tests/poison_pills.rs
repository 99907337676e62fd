//! Poison pills in the middle of good streams, on the embedded log and on the real broker:
//! every good event reaches the store, every bad one is in the dead-letter topic byte for byte
//! with Kafka Connect's error headers, offsets move on, nothing blocks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kontext_core::config::PipelineConfig;
use kontext_core::record::{Header, ProduceRecord, Record};
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::{ConsumerConfig, Log, TopicSpec};
use kontext_store::{EmbeddedStore, StoreSchema};
use kontext_stream::dlq::{headers, DeadLetters};
use kontext_stream::{PipelineMetrics, Router, StoreSink};
use tokio_util::sync::CancellationToken;

/// The pipeline's record size limit: the oversized pill is a valid event just above it.
const MAX_RECORD_BYTES: usize = 4096;

fn pipeline(topic: &str) -> PipelineConfig {
    let yaml = format!(
        r#"
name: pills
entities:
  customer: {{ key: customer_id, topic: {topic} }}
sources:
  crm:
    topic: {topic}
    entity: customer
    match: {{ ce_source: crm }}
    fields:
      given_name: first_name
      credit: {{ path: amount, type: number }}
      tag_list: {{ jq: 'if .tags then (.tags | join(",")) else null end' }}
limits: {{ max_record_bytes: {MAX_RECORD_BYTES} }}
"#
    );
    PipelineConfig::parse("pills.yaml", &yaml).unwrap()
}

fn good(topic: &str, i: usize) -> ProduceRecord {
    ProduceRecord::new(
        topic,
        Some(Bytes::from(format!("C{i}"))),
        Some(Bytes::from(format!(r#"{{"first_name":"N{i}"}}"#))),
    )
    .with_header("ce_specversion", "1.0")
    .with_header("ce_id", format!("e{i}"))
    .with_header("ce_source", "crm")
    .with_header("ce_type", "crm.customer.updated")
}

/// (record, the error kind it must be dead-lettered with)
fn pills(topic: &str) -> Vec<(ProduceRecord, &'static str)> {
    let mut v = Vec::new();
    let mut bad_json = good(topic, 900);
    bad_json.value = Some(Bytes::from_static(b"{\"first_name\": "));
    v.push((bad_json, "invalid_json"));
    let mut no_key = good(topic, 901);
    no_key.key = None;
    no_key.partition = Some(0);
    v.push((no_key, "missing_key"));
    let mut bad_key = good(topic, 902);
    bad_key.key = Some(Bytes::from_static(&[0xff, 0xfe, 0x00]));
    v.push((bad_key, "key_not_utf8"));
    let mut bad_utf8 = good(topic, 903);
    bad_utf8.value = Some(Bytes::from_static(&[b'{', 0xc3, 0x28, b'}']));
    v.push((bad_utf8, "value_not_utf8"));
    let mut array = good(topic, 904);
    array.value = Some(Bytes::from_static(b"[1,2,3]"));
    v.push((array, "not_an_object"));
    let mut stranger = good(topic, 905);
    stranger.headers.retain(|h| h.key != "ce_source");
    stranger
        .headers
        .push(Header::new("ce_source", Bytes::from_static(b"erp")));
    v.push((stranger, "no_source"));
    let mut bad_time = good(topic, 906);
    bad_time
        .headers
        .push(Header::new("ce_time", Bytes::from_static(b"yesterday")));
    v.push((bad_time, "invalid_attribute"));
    // A valid event, only too large.
    let mut oversized = good(topic, 907);
    oversized.value = Some(Bytes::from(format!(
        r#"{{"first_name":"{}"}}"#,
        "x".repeat(MAX_RECORD_BYTES)
    )));
    v.push((oversized, "record_too_large"));
    // Wrong type: a structured-mode event whose id is an object.
    let mut wrong_type = good(topic, 908);
    wrong_type.headers = vec![Header::new(
        "content-type",
        Bytes::from_static(b"application/cloudevents+json"),
    )];
    wrong_type.value = Some(Bytes::from_static(
        br#"{"specversion":"1.0","id":{"n":908},"source":"crm","type":"crm.customer.updated","data":{"first_name":"W"}}"#,
    ));
    v.push((wrong_type, "wrong_type"));
    // Invalid UTF-8 in a CloudEvents header.
    let mut bad_header = good(topic, 909);
    bad_header.headers.retain(|h| h.key != "ce_id");
    bad_header
        .headers
        .push(Header::new("ce_id", Bytes::from_static(&[0xc3, 0x28])));
    v.push((bad_header, "invalid_attribute"));
    // A plain record (no CloudEvents headers) where only `crm` events are expected: no source
    // and so no entity type for it.
    let mut plain = good(topic, 910);
    plain.headers.clear();
    v.push((plain, "no_source"));
    // Wrong field type for the canonical model: `credit` is declared a number.
    let mut not_a_number = good(topic, 911);
    not_a_number.value = Some(Bytes::from_static(
        br#"{"first_name":"A","amount":"twelve"}"#,
    ));
    v.push((not_a_number, "coercion_failed"));
    // A mapping that fails: jq cannot join a number.
    let mut failing_jq = good(topic, 912);
    failing_jq.value = Some(Bytes::from_static(br#"{"first_name":"J","tags":5}"#));
    v.push((failing_jq, "jq_failed"));
    // An event dated long after its record's timestamp (a producer's clock): it would outrank
    // every later update of the customer until 2099.
    let mut future = good(topic, 913);
    future.headers.push(Header::new(
        "ce_time",
        Bytes::from_static(b"2099-01-01T00:00:00Z"),
    ));
    v.push((future, "time_ahead"));
    v
}

/// The local broker's address, and a suffix that makes this run's topic and group names new.
fn kafka() -> (String, String) {
    let bootstrap = std::env::var("KONTEXT_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let suffix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    (bootstrap, format!("{suffix:x}"))
}

/// Runs a sink of `config` from `topic` into `store` in `group`, dead letters on.
async fn start_sink(
    log: &Arc<dyn Log>,
    store: Arc<EmbeddedStore>,
    config: &PipelineConfig,
    topic: &str,
    group: &str,
    metrics: Arc<PipelineMetrics>,
) -> (
    tokio::task::JoinHandle<Result<(), kontext_stream::sink::SinkError>>,
    CancellationToken,
) {
    let sink = StoreSink::new(
        log.clone(),
        store,
        Router::new(config),
        ConsumerConfig::new(group, vec![topic.to_string()]),
        metrics,
    )
    .with_config(config)
    .with_dead_letters(DeadLetters::new(
        config.dead_letter.clone(),
        config.name.clone(),
        group.to_string(),
        log.producer().await.unwrap(),
    ));
    let shutdown = CancellationToken::new();
    (tokio::spawn(sink.run(shutdown.clone())), shutdown)
}

async fn run_poison_pills(log: Arc<dyn Log>, topic: String, dir: &std::path::Path) {
    let config = pipeline(&topic);
    let dlq_topic = config.dead_letter.topic_for(&topic);
    log.create_topic(&TopicSpec::new(&topic, 3)).await.unwrap();
    log.create_topic(&TopicSpec::new(&dlq_topic, 3))
        .await
        .unwrap();

    // Good records around every pill.
    let producer = log.producer().await.unwrap();
    let mut batch = Vec::new();
    let pills = pills(&topic);
    for (i, (pill, _)) in pills.iter().enumerate() {
        for j in 0..10 {
            batch.push(good(&topic, i * 10 + j));
        }
        batch.push(pill.clone());
    }
    for j in 0..10 {
        batch.push(good(&topic, 500 + j));
    }
    let positions = producer.send(batch.clone()).await.unwrap();
    let mut end: BTreeMap<i32, i64> = BTreeMap::new();
    for p in &positions {
        let e = end.entry(p.partition).or_default();
        *e = (*e).max(p.offset + 1);
    }
    let pill_positions: Vec<(i32, i64)> = batch
        .iter()
        .zip(&positions)
        .filter(|(r, _)| pills.iter().any(|(p, _)| p == *r))
        .map(|(_, p)| (p.partition, p.offset))
        .collect();

    let store = Arc::new(
        EmbeddedStore::open(&dir.join("store.redb"), StoreSchema::from_config(&config)).unwrap(),
    );
    let metrics = Arc::new(PipelineMetrics::default());
    let group = format!("pills-{topic}");
    let (task, shutdown) = start_sink(
        &log,
        store.clone(),
        &config,
        &topic,
        &group,
        metrics.clone(),
    )
    .await;

    // Wait until the store has handled every partition to its end: nothing blocked.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = store.applied_offsets().unwrap();
        if end
            .iter()
            .all(|(p, e)| applied.get(&(topic.clone(), *p)).copied().unwrap_or(0) >= *e)
        {
            break;
        }
        assert!(!task.is_finished(), "the sink stopped: {:?}", task.await);
        assert!(
            Instant::now() < deadline,
            "the sink did not get past the pills: {applied:?} vs {end:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // Every good event is in the store.
    let docs = store.dump().unwrap();
    let good_count = batch.len() - pills.len();
    assert_eq!(docs.len(), good_count, "one customer per good record");
    assert_eq!(
        metrics
            .records_dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        pills.len() as u64
    );

    // Every pill is in the dead-letter topic, same partition, same bytes, with the headers.
    let reader = format!("pills-reader-{topic}");
    let mut consumer = log
        .consumer(ConsumerConfig::new(&reader, vec![dlq_topic.clone()]))
        .await
        .unwrap();
    let mut letters: Vec<Record> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while letters.len() < pills.len() && Instant::now() < deadline {
        letters.extend(
            consumer
                .poll(100, Duration::from_millis(500))
                .await
                .unwrap(),
        );
    }
    assert_eq!(letters.len(), pills.len(), "{letters:?}");
    for (pill, kind) in &pills {
        let letter = letters
            .iter()
            .find(|l| {
                l.value == pill.value
                    && l.key == pill.key
                    && pill.headers.iter().all(|h| l.headers.contains(h))
            })
            .unwrap_or_else(|| panic!("no dead letter for the {kind} pill"));
        let header = |k: &str| {
            letter
                .header(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header(headers::KIND).as_deref(), Some(*kind));
        assert_eq!(header(headers::TOPIC).as_deref(), Some(topic.as_str()));
        let partition: i32 = header(headers::PARTITION).unwrap().parse().unwrap();
        let offset: i64 = header(headers::OFFSET).unwrap().parse().unwrap();
        assert!(
            pill_positions.contains(&(partition, offset)),
            "{kind}: coordinates {partition}/{offset} are not a pill's"
        );
        assert_eq!(
            letter.partition, partition,
            "a dead letter keeps its partition number"
        );
        assert!(header(headers::EXCEPTION_MESSAGE).is_some_and(|m| !m.is_empty()));
        assert!(header(headers::STAGE).is_some());
        let stage = match *kind {
            "no_source" | "coercion_failed" | "jq_failed" => "normalize",
            _ => "decode",
        };
        assert_eq!(header(headers::KONTEXT_STAGE).as_deref(), Some(stage));
        assert_eq!(header(headers::ATTEMPTS).as_deref(), Some("1"));
        assert_eq!(header(headers::CONNECTOR_NAME).as_deref(), Some("pills"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_pills_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    run_poison_pills(log, "context.customers".into(), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_pills_on_kafka() {
    let (bootstrap, suffix) = kafka();
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(KafkaLog::new(KafkaConfig::new(bootstrap)).unwrap());
    run_poison_pills(log, format!("pills-{suffix}"), dir.path()).await;
}

/// A bad record as large as Kafka takes by default (1 010 000 bytes of broken JSON, under the
/// pipeline's default 1 MiB limit): its dead letter would not fit a default producer's
/// `message.max.bytes` (1 000 000). It must not stop the sink on its partition: the letter goes
/// without the value (the record stays in the topic at the letter's coordinates), and the good
/// record behind it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_record_too_large_for_a_dead_letter_does_not_block_on_kafka() {
    let (bootstrap, suffix) = kafka();
    let topic = format!("big-pill-{suffix}");
    let config = PipelineConfig::parse(
        "big.yaml",
        &format!(
            "name: big\nentities:\n  customer: {{ key: customer_id, topic: {topic} }}\nsources:\n  crm: {{ topic: {topic}, entity: customer, fields: {{ given_name: first_name }} }}\n"
        ),
    )
    .unwrap();
    let log: Arc<dyn Log> = Arc::new(KafkaLog::new(KafkaConfig::new(bootstrap.clone())).unwrap());
    let dlq_topic = config.dead_letter.topic_for(&topic);
    log.create_topic(&TopicSpec::new(&topic, 1)).await.unwrap();
    log.create_topic(&TopicSpec::new(&dlq_topic, 1))
        .await
        .unwrap();
    // A producer that takes records up to the broker's limit writes the big one.
    let mut big_config = KafkaConfig::new(bootstrap);
    big_config
        .properties
        .insert("message.max.bytes".into(), "1048576".into());
    let big_log = KafkaLog::new(big_config).unwrap();
    let mut pill = good(&topic, 1);
    let mut value = b"{\"first_name\": \"".to_vec();
    value.resize(1_010_000, b'x');
    pill.value = Some(Bytes::from(value));
    big_log
        .producer()
        .await
        .unwrap()
        .send(vec![pill, good(&topic, 2)])
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        EmbeddedStore::open(
            &dir.path().join("s.redb"),
            StoreSchema::from_config(&config),
        )
        .unwrap(),
    );
    let group = format!("big-{suffix}");
    let metrics = Arc::new(PipelineMetrics::default());
    let (task, shutdown) = start_sink(&log, store.clone(), &config, &topic, &group, metrics).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.get("customer", "C2").unwrap().is_none() {
        assert!(!task.is_finished(), "the sink stopped: {:?}", task.await);
        assert!(
            Instant::now() < deadline,
            "the good record was never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let mut consumer = log
        .consumer(ConsumerConfig::new(
            format!("{group}-reader"),
            vec![dlq_topic],
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut letters = Vec::new();
    while letters.is_empty() && Instant::now() < deadline {
        letters = consumer.poll(10, Duration::from_millis(500)).await.unwrap();
    }
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.value, None);
    assert_eq!(letter.key.as_deref(), Some(&b"C1"[..]));
    let header = |k: &str| {
        let h = letter.headers.iter().find(|h| h.key == k)?;
        Some(String::from_utf8(h.value.clone()?.to_vec()).unwrap())
    };
    assert_eq!(header(headers::VALUE_OMITTED).as_deref(), Some("1010000"));
    assert_eq!(header(headers::KIND).as_deref(), Some("invalid_json"));
    assert_eq!(header(headers::OFFSET).as_deref(), Some("0"));
}
