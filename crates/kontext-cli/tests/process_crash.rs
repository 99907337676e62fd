//! Crash verifier for the processor stage, in the style of Kafka's EOS system test: keyed
//! events with known values go into the log in chunks, `kontext run` (the real binary) is
//! killed with SIGKILL at random moments and restarted, and at the end count/sum/min/max per
//! key recomputed from the input must equal, for every key, the features in the store. On the
//! embedded log, and on the real broker (`KONTEXT_TEST_KAFKA`, default 127.0.0.1:9092, started
//! by `scripts/kafka.sh start`).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kontext_core::config::PipelineConfig;
use kontext_core::record::ProduceRecord;
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::Log;
use kontext_store::{ContextStore, EmbeddedStore, StoreSchema};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::{free_port, kafka_bootstrap, path_str, Kontext};

const RECORDS: usize = 20_000;
const ACCOUNTS: u32 = 5_000;

/// Where the log is.
enum Backend {
    Embedded,
    /// A unique suffix per run keeps topics and groups of earlier runs apart.
    Kafka {
        bootstrap: String,
        suffix: String,
        /// `exactly_once: true`: the processor commits each batch in a Kafka transaction.
        exactly_once: bool,
    },
}

impl Backend {
    /// The broker of `KONTEXT_TEST_KAFKA` (default 127.0.0.1:9092), with a suffix unique to
    /// this run.
    fn kafka() -> Self {
        let bootstrap = kafka_bootstrap();
        let suffix = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        );
        Backend::Kafka {
            bootstrap,
            suffix,
            exactly_once: false,
        }
    }

    /// [`Backend::kafka`] with the processor's Kafka transactions on.
    fn kafka_exactly_once() -> Self {
        match Self::kafka() {
            Backend::Kafka {
                bootstrap, suffix, ..
            } => Backend::Kafka {
                bootstrap,
                suffix: format!("eos-{suffix}"),
                exactly_once: true,
            },
            Backend::Embedded => unreachable!(),
        }
    }

    fn exactly_once(&self) -> bool {
        matches!(
            self,
            Backend::Kafka {
                exactly_once: true,
                ..
            }
        )
    }

    fn name(&self) -> String {
        match self {
            Backend::Embedded => "crash".into(),
            Backend::Kafka { suffix, .. } => format!("crash-{suffix}"),
        }
    }

    fn log_yaml(&self) -> String {
        match self {
            Backend::Embedded => "{ backend: embedded, fsync: group_commit }".into(),
            // Static membership: a restarted member takes over its partitions at once instead of
            // waiting out the killed one's session.
            Backend::Kafka {
                bootstrap,
                suffix,
                exactly_once,
            } => format!(
                r#"{{ backend: kafka, bootstrap_servers: "{bootstrap}", exactly_once: {exactly_once}, properties: {{ group.instance.id: "crash-{suffix}", session.timeout.ms: "10000" }} }}"#
            ),
        }
    }
}

fn pipeline(data_dir: &Path, backend: &Backend) -> String {
    pipeline_of_instance(data_dir, backend, "")
}

/// The pipeline of one of several instances: on Kafka, each has its own static member id
/// and its own store (a full copy of the context per instance: one consumer group per store),
/// while they share the processor's groups.
fn pipeline_of_instance(data_dir: &Path, backend: &Backend, instance: &str) -> String {
    let store = if instance.is_empty() {
        String::new()
    } else {
        format!("store: {{ name: {instance} }}")
    };
    pipeline_with_store(data_dir, backend, instance, &store)
}

/// [`pipeline_of_instance`] with the `store:` section given.
fn pipeline_with_store(data_dir: &Path, backend: &Backend, instance: &str, store: &str) -> String {
    let log = backend.log_yaml().replace(
        "group.instance.id: \"crash-",
        &format!("group.instance.id: \"crash{instance}-"),
    );
    format!(
        r#"
name: {name}
data_dir: {data}
log: {log}
topics: {{ partitions: 4 }}
entities:
  account: {{ key: account_id, topic: {name}.accounts }}
  tx: {{ key: tx_id, topic: {name}.txs }}
  note: {{ key: note_id, topic: {name}.notes }}
sources:
  ledger:
    topic: {name}.txs
    entity: tx
    fields: {{ account_id: account, amount: amount }}
  desk:
    topic: {name}.notes
    entity: note
    fields: {{ account_id: account }}
# No notes are written: this group's tasks are idle in every batch ("Idle tasks" in
# docs/processing.md), so the group commits no further than their offsets.
features:
  notes: {{ from: note, entity: account, key: account_id, agg: count }}
  tx_count: {{ from: tx, entity: account, key: account_id, agg: count }}
  tx_sum: {{ from: tx, entity: account, key: account_id, agg: sum, field: amount }}
  tx_min: {{ from: tx, entity: account, key: account_id, agg: min, field: amount }}
  tx_max: {{ from: tx, entity: account, key: account_id, agg: max, field: amount }}
{store}
"#,
        name = backend.name(),
        log = log,
        data = path_str(data_dir)
    )
}

/// count, sum, min, max
type Expected = BTreeMap<String, (u64, i64, i64, i64)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_counts_every_event_exactly_once() {
    verify(Backend::Embedded, 12, 50..1_200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_on_kafka_counts_every_event_exactly_once() {
    // Joining the groups takes a moment on Kafka: kill later, so the runs get work done.
    verify(Backend::kafka(), 10, 0..1_500).await;
}

/// The same with `exactly_once: true`: each batch of the processor's tasks is one Kafka
/// transaction. Besides the kills, one run is fenced while it processes: the test registers a
/// producer with the processor's transactional id, so the processor's next transaction fails;
/// it must abort, rejoin and recompute the batch (`kontext_process_transactions_aborted_total`
/// goes up), and the counts must still be exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_fencing_on_kafka_with_transactions_count_every_event_exactly_once() {
    verify(Backend::kafka_exactly_once(), 10, 0..1_500).await;
}

/// Two instances in one consumer group, each with its own state directory: partitions move
/// between them (B joins, A is killed, A comes back), and a task that gets a partition another
/// instance processed must first restore that instance's state from the changelog. The last
/// feature record of every key must then equal count/sum/min/max of its inputs. Without the
/// restore on assignment, B takes over A's partitions with the state it restored at its start,
/// and the keys A counted since are wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_kafka_hand_partitions_over_through_the_changelogs() {
    let dir = tempfile::tempdir().unwrap();
    two_instances(dir.path(), &Backend::kafka(), |d, backend, instance| {
        pipeline_of_instance(d, backend, instance)
    })
    .await;
}

/// The same two instances, now sharing one PostgreSQL store: its consumer group
/// (`kontext.<pipeline>.store.pg`) splits between them too, and moves when A dies and comes
/// back. Then every account's features in PostgreSQL must equal count/sum/min/max of its
/// inputs, and every transaction entity must be applied exactly once (its `events_applied`
/// is 1), whichever instance applied it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_kafka_share_one_postgres_store() {
    let url = std::env::var("KONTEXT_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://kontext@127.0.0.1:55432/kontext".into());
    let ns = format!("kontext_two_{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::kafka();
    let store = format!("store: {{ name: pg, kind: postgres, url: \"{url}\", schema: {ns} }}");
    let (config, expected) = two_instances(dir.path(), &backend, |d, backend, instance| {
        pipeline_with_store(d, backend, instance, &store)
    })
    .await;

    let pg = kontext_store::PostgresStore::connect_in_namespace(
        &url,
        &ns,
        StoreSchema::from_config(&config),
    )
    .await
    .unwrap();
    let docs = pg.dump().await.unwrap();
    let mut wrong = Vec::new();
    let mut accounts = BTreeMap::new();
    let mut txs = 0;
    for doc in &docs {
        match doc.entity_type.as_str() {
            "account" => {
                accounts.insert(doc.entity_id.clone(), doc.values());
            }
            "tx" => {
                txs += 1;
                if doc.events_applied != 1 {
                    wrong.push(format!(
                        "tx {} applied {} times",
                        doc.entity_id, doc.events_applied
                    ));
                }
            }
            other => wrong.push(format!("unexpected entity type {other}")),
        }
    }
    for (account, &(count, sum, min, max)) in &expected {
        let want = json!({"account_id": account, "tx_count": count, "tx_sum": sum as f64,
                          "tx_min": min as f64, "tx_max": max as f64});
        match accounts.get(account) {
            Some(got) if same(got, &want) => {}
            got => wrong.push(format!(
                "{account}: expected {want}, PostgreSQL has {got:?}"
            )),
        }
    }
    kontext_store::postgres::drop_namespace(&url, &ns)
        .await
        .unwrap();
    assert_eq!(txs, RECORDS, "every transaction is in the shared store");
    assert_eq!(accounts.len(), expected.len());
    assert!(
        wrong.is_empty(),
        "{} problems in the shared store, e.g.:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(10)].join("\n")
    );
}

/// Runs instances A and B of the pipeline `pipeline(dir, backend, instance)` through joins,
/// a kill and a return while the input arrives in chunks, waits until the last feature record
/// of every key is right (or 120 s passed) and stops both. Returns the pipeline and the
/// expected count/sum/min/max per key.
async fn two_instances(
    dir: &Path,
    backend: &Backend,
    pipeline: impl Fn(&Path, &Backend, &str) -> String,
) -> (PipelineConfig, Expected) {
    let started = Instant::now();
    let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
    let mut files = Vec::new();
    for (d, instance) in [(&dir_a, "a"), (&dir_b, "b")] {
        std::fs::create_dir_all(d).unwrap();
        let file = d.join("pipeline.yaml");
        std::fs::write(&file, pipeline(d, backend, instance)).unwrap();
        files.push(file);
    }
    let config = PipelineConfig::load(&files[0]).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let (chunks, expected) = input(backend, &mut rng, 5);
    let mut chunks = chunks.into_iter();
    let start = |file: &Path| {
        let port = free_port();
        let mut kontext = Kontext::spawn(&[
            "run",
            "-c",
            path_str(file),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]);
        kontext.wait_for_line("serving on", Duration::from_secs(60));
        kontext
    };
    let pace = |secs| tokio::time::sleep(Duration::from_secs(secs));

    append(backend, &dir_a, &config, chunks.next().unwrap()).await;
    let a = start(&files[0]);
    pace(5).await;
    // B joins: the group rebalances and B owns some partitions A processed.
    let b = start(&files[1]);
    pace(8).await;
    append(backend, &dir_a, &config, chunks.next().unwrap()).await;
    pace(5).await;
    // A dies; once its session expires, B owns every partition, some of them with state
    // only A's changelog batches have.
    a.kill_9();
    append(backend, &dir_a, &config, chunks.next().unwrap()).await;
    pace(15).await;
    // A comes back with the state it had: stale for what B processed meanwhile.
    let a = start(&files[0]);
    pace(8).await;
    for chunk in chunks {
        append(backend, &dir_a, &config, chunk).await;
    }
    let topic = format!("{}.accounts.features", backend.name());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut wrong = features_mismatches(backend, &dir_a, &topic, &expected).await;
    while !wrong.is_empty() && Instant::now() < deadline {
        pace(1).await;
        wrong = features_mismatches(backend, &dir_a, &topic, &expected).await;
    }
    a.interrupt();
    b.interrupt();
    eprintln!(
        "two instances: {RECORDS} records over {} keys, {:.1} s",
        expected.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        wrong.is_empty(),
        "{} of {} keys differ in the features topic, e.g.:\n{}",
        wrong.len(),
        expected.len(),
        wrong[..wrong.len().min(10)].join("\n")
    );
    (config, expected)
}

/// `RECORDS` keyed records with known amounts, in `chunks` chunks, and their count, sum, min
/// and max per account.
fn input(
    backend: &Backend,
    rng: &mut StdRng,
    chunks: usize,
) -> (Vec<Vec<ProduceRecord>>, Expected) {
    let mut records = Vec::with_capacity(RECORDS);
    let mut expected = Expected::new();
    for i in 0..RECORDS {
        let account = format!("A-{}", rng.random_range(0..ACCOUNTS));
        let amount: i64 = rng.random_range(-1_000..=1_000);
        let e = expected
            .entry(account.clone())
            .or_insert((0, 0, i64::MAX, i64::MIN));
        *e = (e.0 + 1, e.1 + amount, e.2.min(amount), e.3.max(amount));
        records.push(ProduceRecord::new(
            format!("{}.txs", backend.name()),
            Some(Bytes::from(format!("T-{i}"))),
            Some(Bytes::from(
                json!({"account": account, "amount": amount}).to_string(),
            )),
        ));
    }
    let chunks = records
        .chunks(RECORDS.div_ceil(chunks))
        .map(<[ProduceRecord]>::to_vec)
        .collect();
    (chunks, expected)
}

/// Keys whose last record in the features topic differs from `expected` (or has none).
async fn features_mismatches(
    backend: &Backend,
    data_dir: &Path,
    topic: &str,
    expected: &Expected,
) -> Vec<String> {
    let log = open_log(backend, data_dir);
    let Ok(d) = log.describe_topic(topic).await else {
        return vec!["no features topic yet".into()];
    };
    let mut last: BTreeMap<String, Value> = BTreeMap::new();
    for p in &d.partitions {
        let Ok(records) = log
            .read_partition(topic, p.partition, p.low_watermark, p.high_watermark)
            .await
        else {
            return vec![format!("cannot read {topic}/{}", p.partition)];
        };
        for r in records {
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            let value = serde_json::from_slice(r.value.as_deref().unwrap_or_default())
                .unwrap_or(Value::Null);
            last.insert(key, value);
        }
    }
    let mut wrong = Vec::new();
    for (account, &(count, sum, min, max)) in expected {
        let want = json!({"tx_count": count, "tx_sum": sum as f64, "tx_min": min as f64, "tx_max": max as f64});
        match last.get(account) {
            Some(Value::Object(got)) if same(got, &want) => {}
            got => wrong.push(format!("{account}: expected {want}, last record {got:?}")),
        }
    }
    wrong
}

async fn verify(backend: Backend, kills_wanted: usize, kill_after_ms: std::ops::Range<u64>) {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, pipeline(dir.path(), &backend)).unwrap();
    let config = PipelineConfig::load(&file).unwrap();
    let seed: u64 = std::env::var("KONTEXT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (KONTEXT_CRASH_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);

    // The input, in one chunk per run: each run has new records to process when it is killed.
    // Under exactly_once one more, for the run that is fenced.
    let fence_at = backend.exactly_once().then_some(kills_wanted / 3);
    let (chunks, expected) = input(
        &backend,
        &mut rng,
        kills_wanted + 1 + usize::from(fence_at.is_some()),
    );
    let mut chunks = chunks.into_iter();
    let mut kills = 0;
    let mut state_lost = false;
    loop {
        if let Some(chunk) = chunks.next() {
            append(&backend, dir.path(), &config, chunk).await;
        }
        let port = free_port();
        let mut kontext = Kontext::spawn(&[
            "run",
            "-c",
            path_str(&file),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]);
        kontext.wait_for_line("serving on", Duration::from_secs(60));
        if std::mem::take(&mut state_lost) {
            // This run found no state: it restores every task from its changelog (rather than
            // recomputing from the repartition topic) before it processes anything.
            let restored = restored_records(port).await;
            assert!(restored > 0, "nothing restored from the changelogs");
        }
        if fence_at == Some(kills) {
            // Let the processor get going, take its transactional id, then give it work: its
            // next transaction finds itself fenced.
            let id = format!(
                "kontext.{}.process.features.crash-{}",
                backend.name(),
                match &backend {
                    Backend::Kafka { suffix, .. } => suffix.as_str(),
                    Backend::Embedded => unreachable!(),
                }
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
            let fencer = open_log(&backend, dir.path())
                .transactional_producer(&id)
                .await
                .unwrap();
            append(&backend, dir.path(), &config, chunks.next().unwrap()).await;
            let aborted = process_metric(port, "kontext_process_transactions_aborted_total").await;
            assert!(
                aborted > 0,
                "the fenced processor did not abort a transaction"
            );
            drop(fencer);
        }
        if kills == kills_wanted {
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut wrong = mismatches_over_http(port, &expected).await;
            while !wrong.is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(300)).await;
                wrong = mismatches_over_http(port, &expected).await;
            }
            kontext.interrupt();
            break;
        }
        tokio::time::sleep(Duration::from_millis(
            rng.random_range(kill_after_ms.clone()),
        ))
        .await;
        kontext.kill_9();
        kills += 1;
        if kills == kills_wanted / 2 {
            // A lost disk on top of it: the next run restores every task from its changelog.
            match std::fs::remove_dir_all(dir.path().join("state")) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => {
                    other.unwrap();
                    // Early runs on Kafka may be killed before they processed anything.
                    state_lost = changelog_records(&backend, dir.path()).await > 0;
                }
            }
        }
    }

    // The final word is the store file itself: every key exact, no key the input lacks.
    let store = EmbeddedStore::open(
        &dir.path().join("stores/main.redb"),
        StoreSchema::from_config(&config),
    )
    .unwrap();
    let mut actual = BTreeMap::new();
    for doc in store.dump().unwrap() {
        if doc.entity_type == "account" {
            let values = doc.values();
            actual.insert(doc.entity_id.clone(), values);
        }
    }
    let mut wrong = Vec::new();
    for (account, &(count, sum, min, max)) in &expected {
        let want = json!({"account_id": account, "tx_count": count, "tx_sum": sum as f64,
                          "tx_min": min as f64, "tx_max": max as f64});
        match actual.get(account) {
            Some(got) if same(got, &want) => {}
            got => wrong.push(format!("{account}: expected {want}, store has {got:?}")),
        }
    }
    for account in actual.keys().filter(|a| !expected.contains_key(*a)) {
        wrong.push(format!("{account}: in the store, not in the input"));
    }
    let outputs = topic_records(
        &backend,
        dir.path(),
        &format!("{}.accounts.features", backend.name()),
    )
    .await;
    eprintln!(
        "{}: {RECORDS} records over {} keys, {kills} kills, {outputs} feature records for {} keys, {:.1} s",
        backend.name(),
        expected.len(),
        actual.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        wrong.is_empty(),
        "{} of {} keys differ, e.g.:\n{}",
        wrong.len(),
        expected.len(),
        wrong[..wrong.len().min(10)].join("\n")
    );
    assert_eq!(kills, kills_wanted);
}

/// Committed records in the pipeline's changelog topics: what a restore finds.
async fn changelog_records(backend: &Backend, data_dir: &Path) -> i64 {
    let log = open_log(backend, data_dir);
    let prefix = format!("{}-", backend.name());
    let mut total = 0;
    for topic in log.list_topics().await.unwrap() {
        if topic.starts_with(&prefix) && topic.ends_with("-changelog") {
            // Read, not high minus low watermark: under transactions the log also holds
            // aborted records and markers, which no restore can use.
            let d = log.describe_topic(&topic).await.unwrap();
            for p in &d.partitions {
                let records = log
                    .read_partition(&topic, p.partition, p.low_watermark, p.high_watermark)
                    .await
                    .unwrap();
                total += records.len() as i64;
            }
        }
    }
    total
}

/// `kontext_process_restored_records_total` once it is above 0 (the processor restores before
/// its first poll), or 0 if it stays there for 60 s.
async fn restored_records(port: u16) -> u64 {
    process_metric(port, "kontext_process_restored_records_total").await
}

/// The counter `name` of `/metrics` once it is above 0, or 0 if it stays there for 60 s.
async fn process_metric(port: u16, name: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let prefix = format!("{name} ");
    loop {
        let n = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
        if n > 0 || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn same(got: &serde_json::Map<String, Value>, want: &Value) -> bool {
    want.as_object().unwrap().iter().all(|(k, v)| {
        got.get(k)
            .is_some_and(|g| g == v || (g.as_f64().is_some() && g.as_f64() == v.as_f64()))
    })
}

/// Keys whose features differ from `expected`, asked through the API (100 per request).
async fn mismatches_over_http(port: u16, expected: &Expected) -> Vec<String> {
    let client = reqwest::Client::new();
    let keys: Vec<&String> = expected.keys().collect();
    let mut wrong = Vec::new();
    for chunk in keys.chunks(100) {
        let requests: Vec<Value> = chunk
            .iter()
            .map(|k| json!({"entity_type": "account", "entity_id": k}))
            .collect();
        let Ok(response) = client
            .post(format!("http://127.0.0.1:{port}/v1/context:batchGet"))
            .json(&json!({"requests": requests}))
            .send()
            .await
        else {
            return vec!["API not answering".into()];
        };
        let Ok(body) = response.json::<Value>().await else {
            return vec!["API answer not JSON".into()];
        };
        for (key, result) in chunk
            .iter()
            .zip(body["results"].as_array().into_iter().flatten())
        {
            let (count, sum, min, max) = expected[*key];
            let fields = &result["context"]["fields"];
            let ok = fields["tx_count"].as_u64() == Some(count)
                && fields["tx_sum"].as_f64() == Some(sum as f64)
                && fields["tx_min"].as_f64() == Some(min as f64)
                && fields["tx_max"].as_f64() == Some(max as f64);
            if !ok {
                wrong.push((*key).clone());
            }
        }
    }
    wrong
}

fn open_log(backend: &Backend, data_dir: &Path) -> std::sync::Arc<dyn Log> {
    match backend {
        Backend::Embedded => {
            EmbeddedLog::open(&data_dir.join("log"), EmbeddedConfig::default()).unwrap()
        }
        Backend::Kafka { bootstrap, .. } => std::sync::Arc::new(
            kontext_kafka::KafkaLog::new(kontext_kafka::KafkaConfig::new(bootstrap.clone()))
                .unwrap(),
        ),
    }
}

/// Appends records to the log, while no kontext runs (on the embedded log, it holds the log
/// when it does).
async fn append(
    backend: &Backend,
    data_dir: &Path,
    config: &PipelineConfig,
    records: Vec<ProduceRecord>,
) {
    let log = open_log(backend, data_dir);
    let name = backend.name();
    for topic in [format!("{name}.txs"), format!("{name}.accounts")] {
        let _ = log
            .create_topic(&kontext_log::TopicSpec::new(
                topic,
                config.topics.partitions,
            ))
            .await
            .unwrap();
    }
    let producer = log.producer().await.unwrap();
    producer.send(records).await.unwrap();
    producer.flush().await.unwrap();
}

async fn topic_records(backend: &Backend, data_dir: &Path, topic: &str) -> i64 {
    let log = open_log(backend, data_dir);
    let d = log.describe_topic(topic).await.unwrap();
    d.partitions
        .iter()
        .map(|p| p.high_watermark - p.low_watermark)
        .sum()
}
