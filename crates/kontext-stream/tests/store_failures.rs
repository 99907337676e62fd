//! The two ways a store write fails, on the embedded log with a store that fails on command:
//! - one record keeps failing while the store takes other writes: it is dead-lettered with
//!   stage `store` and its partition moves on;
//! - the store is down (every write fails): the circuit breaker opens, consumption is paused
//!   (on Kafka the member keeps polling and so stays in its group, however long the outage),
//!   nothing is dead-lettered, and the sink resumes where it stopped when the store is back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use kontext_core::config::PipelineConfig;
use kontext_core::record::{ProduceRecord, Record};
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::{ConsumerConfig, Log, TopicSpec};
use kontext_store::{
    ApplyStats, ContextDocument, ContextStore, EmbeddedStore, EntityDoc, EntityUpdate, StoreError,
    StoreSchema, SwitchOutcome, SwitchableStore, WriteMarks,
};
use kontext_stream::dlq::{headers, DeadLetters};
use kontext_stream::metrics::BreakerState;
use kontext_stream::sink::RebuildLetters;
use kontext_stream::{PipelineMetrics, Router, StoreSink, UpdateKind};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// The tests' pipeline file: one source on `topic`, fast retries, store writes tried 3 times.
fn pipeline_yaml(topic: &str) -> String {
    format!(
        r#"
name: failures
entities:
  customer: {{ key: customer_id, topic: {topic} }}
sources:
  crm:
    topic: {topic}
    entity: customer
    match: {{ ce_source: crm }}
    fields: {{ given_name: first_name }}
retry:
  defaults: {{ first_delay: 1ms, max_delay: 20ms }}
  store_write: {{ max_attempts: 3 }}
"#
    )
}

fn pipeline(topic: &str) -> PipelineConfig {
    PipelineConfig::parse("failures.yaml", &pipeline_yaml(topic)).unwrap()
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

/// An embedded store that fails on command: while `down`, every call fails transiently; an
/// update of an entity in `rejected` fails permanently, of one in `timing_out` transiently,
/// whatever else the batch holds.
struct FailingStore {
    inner: EmbeddedStore,
    down: AtomicBool,
    /// Writes fail transiently, reads work (a full disk).
    writes_down: AtomicBool,
    rejected: Mutex<BTreeSet<String>>,
    /// Entities whose update fails with [`StoreError::Config`], as a write on a new
    /// connection does when the server refuses its login while pooled connections work.
    misconfigured: Mutex<BTreeSet<String>>,
    /// Entities whose update times out, alone as in a batch, for the `store_write` budget
    /// (3 tries), and then fails with [`StoreError::Config`]: the one more try after a
    /// probe meets a new connection the server refuses.
    misconfigured_late: Mutex<BTreeSet<String>>,
    /// Calls of `apply` with one update of a `misconfigured_late` entity.
    late_calls: AtomicU64,
    timing_out: Mutex<BTreeSet<String>>,
    /// Calls of `apply` that failed because the store was down.
    refused_while_down: AtomicU64,
    /// Calls of `apply` that wrote.
    written: AtomicU64,
}

impl FailingStore {
    /// `sync_interval`: [`EmbeddedStore::with_sync_interval`] of the store underneath.
    fn new(dir: &std::path::Path, config: &PipelineConfig, sync_interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: EmbeddedStore::open(&dir.join("store.redb"), StoreSchema::from_config(config))
                .unwrap()
                .with_sync_interval(sync_interval),
            down: AtomicBool::new(false),
            writes_down: AtomicBool::new(false),
            rejected: Mutex::new(BTreeSet::new()),
            misconfigured: Mutex::new(BTreeSet::new()),
            misconfigured_late: Mutex::new(BTreeSet::new()),
            late_calls: AtomicU64::new(0),
            timing_out: Mutex::new(BTreeSet::new()),
            refused_while_down: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }

    fn check_up(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Io("connection refused (test outage)".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl ContextStore for FailingStore {
    fn kind(&self) -> &'static str {
        "failing"
    }

    fn schema(&self) -> &StoreSchema {
        ContextStore::schema(&self.inner)
    }

    async fn apply(
        &self,
        updates: &[EntityUpdate],
        offsets: &[(String, i32, i64)],
    ) -> Result<ApplyStats, StoreError> {
        if let Err(e) = self.check_up() {
            self.refused_while_down.fetch_add(1, Ordering::SeqCst);
            return Err(e);
        }
        if self.writes_down.load(Ordering::SeqCst) {
            self.refused_while_down.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Io("no space left on device (test)".into()));
        }
        let ids: Vec<&str> = updates.iter().map(|u| u.entity_id.as_str()).collect();
        if ids.iter().any(|id| self.rejected.lock().contains(*id)) {
            return Err(StoreError::Corrupt("row rejected (test)".into()));
        }
        if ids
            .iter()
            .any(|id| self.misconfigured_late.lock().contains(*id))
        {
            if ids.len() == 1 && self.late_calls.fetch_add(1, Ordering::SeqCst) >= 3 {
                return Err(StoreError::Config(
                    "PostgreSQL refuses the login (test)".into(),
                ));
            }
            return Err(StoreError::Io("lock timeout (test)".into()));
        }
        if ids.iter().any(|id| self.misconfigured.lock().contains(*id)) {
            return Err(StoreError::Config(
                "PostgreSQL refuses the login (test)".into(),
            ));
        }
        if ids.iter().any(|id| self.timing_out.lock().contains(*id)) {
            return Err(StoreError::Io("lock timeout (test)".into()));
        }
        let stats = ContextStore::apply(&self.inner, updates, offsets).await?;
        self.written.fetch_add(1, Ordering::SeqCst);
        Ok(stats)
    }

    async fn get(&self, t: &str, id: &str) -> Result<Option<EntityDoc>, StoreError> {
        self.check_up()?;
        ContextStore::get(&self.inner, t, id).await
    }

    async fn context(&self, t: &str, id: &str) -> Result<Option<Arc<ContextDocument>>, StoreError> {
        self.check_up()?;
        ContextStore::context(&self.inner, t, id).await
    }

    async fn list(
        &self,
        t: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        self.check_up()?;
        ContextStore::list(&self.inner, t, limit, after).await
    }

    async fn applied_offsets(&self) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        self.check_up()?;
        ContextStore::applied_offsets(&self.inner).await
    }

    async fn dump(&self) -> Result<Vec<EntityDoc>, StoreError> {
        ContextStore::dump(&self.inner).await
    }

    fn sync_interval(&self) -> Duration {
        ContextStore::sync_interval(&self.inner)
    }

    fn write_marks(&self) -> WriteMarks {
        self.inner.write_marks()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.check_up()?;
        self.inner.flush()
    }
}

/// A fresh embedded log in `dir` with `topic` and its dead-letter topic (as `config` names
/// it), one partition each.
async fn embedded_with_topic(
    dir: &std::path::Path,
    topic: &str,
    config: &PipelineConfig,
) -> Arc<dyn Log> {
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.join("log"), EmbeddedConfig::default()).unwrap();
    log.create_topic(&TopicSpec::new(topic, 1)).await.unwrap();
    log.create_topic(&TopicSpec::new(config.dead_letter.topic_for(topic), 1))
        .await
        .unwrap();
    log
}

struct Harness {
    topic: String,
    log: Arc<dyn Log>,
    store: Arc<FailingStore>,
    metrics: Arc<PipelineMetrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), kontext_stream::sink::SinkError>>,
    _dir: tempfile::TempDir,
}

/// Which log the harness runs on.
#[derive(Clone, Copy)]
enum Backend {
    Embedded,
    Kafka,
}

async fn start(backend: Backend, setup: impl FnOnce(&FailingStore)) -> Harness {
    start_with(backend, &[], 0, setup).await
}

/// [`start`], with librdkafka `properties` for every Kafka client and `backlog` good records
/// in the topic before the sink starts.
async fn start_with(
    backend: Backend,
    properties: &[(&str, &str)],
    backlog: usize,
    setup: impl FnOnce(&FailingStore),
) -> Harness {
    start_synced(backend, properties, backlog, Duration::ZERO, setup).await
}

/// [`start_with`] on a store that fsyncs only when flushed (every `sync_interval`).
async fn start_synced(
    backend: Backend,
    properties: &[(&str, &str)],
    backlog: usize,
    sync_interval: Duration,
    setup: impl FnOnce(&FailingStore),
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (log, topic): (Arc<dyn Log>, String) = match backend {
        Backend::Embedded => (
            EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap(),
            "context.customers".into(),
        ),
        Backend::Kafka => {
            let bootstrap =
                std::env::var("KONTEXT_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let mut config = KafkaConfig::new(bootstrap);
            for (k, v) in properties {
                config.properties.insert(k.to_string(), v.to_string());
            }
            (
                Arc::new(KafkaLog::new(config).unwrap()),
                format!("failures-{nanos:x}"),
            )
        }
    };
    let config = pipeline(&topic);
    log.create_topic(&TopicSpec::new(&topic, 2)).await.unwrap();
    log.create_topic(&TopicSpec::new(config.dead_letter.topic_for(&topic), 2))
        .await
        .unwrap();
    let records = (0..backlog).map(|i| good(&topic, i)).collect();
    log.producer().await.unwrap().send(records).await.unwrap();
    let store = FailingStore::new(dir.path(), &config, sync_interval);
    setup(&store);
    let metrics = Arc::new(PipelineMetrics::default());
    let group = format!("failures-{topic}");
    let sink = StoreSink::new(
        log.clone(),
        store.clone(),
        Router::new(&config),
        ConsumerConfig::new(&group, vec![topic.clone()]),
        metrics.clone(),
    )
    .with_config(&config)
    .with_dead_letters(DeadLetters::new(
        config.dead_letter.clone(),
        config.name.clone(),
        group,
        log.producer().await.unwrap(),
    ));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sink.run(shutdown.clone()));
    Harness {
        topic,
        log,
        store,
        metrics,
        shutdown,
        task,
        _dir: dir,
    }
}

impl Harness {
    /// Sends records and returns the end offset of every partition they went to.
    async fn send(&self, records: Vec<ProduceRecord>) -> BTreeMap<i32, i64> {
        let positions = self
            .log
            .producer()
            .await
            .unwrap()
            .send(records)
            .await
            .unwrap();
        let mut end = BTreeMap::new();
        for p in positions {
            let e = end.entry(p.partition).or_insert(0);
            *e = (p.offset + 1).max(*e);
        }
        end
    }

    /// Waits until the store's offsets reach `end` on every partition (lag zero).
    async fn wait_caught_up(&mut self, end: &BTreeMap<i32, i64>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let applied = self.store.inner.applied_offsets().unwrap();
            if end
                .iter()
                .all(|(p, e)| applied.get(&(self.topic.clone(), *p)).copied().unwrap_or(0) >= *e)
            {
                return;
            }
            assert!(
                !self.task.is_finished(),
                "the sink stopped: {:?}",
                (&mut self.task).await
            );
            assert!(
                Instant::now() < deadline,
                "stuck at {applied:?}, want {end:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_for(&mut self, what: &str, cond: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond(self) {
            assert!(
                !self.task.is_finished(),
                "the sink stopped: {:?}",
                (&mut self.task).await
            );
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(
        self,
    ) -> (
        Arc<FailingStore>,
        Arc<PipelineMetrics>,
        Arc<dyn Log>,
        String,
    ) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        (self.store, self.metrics, self.log, self.topic)
    }

    fn goods(&self, range: std::ops::Range<usize>) -> Vec<ProduceRecord> {
        range.map(|i| good(&self.topic, i)).collect()
    }
}

async fn dead_letters(log: &Arc<dyn Log>, topic: &str, want: usize) -> Vec<Record> {
    let dlq = format!("{topic}.dlq");
    let mut consumer = log
        .consumer(ConsumerConfig::new(
            format!("dlq-reader-{topic}"),
            vec![dlq],
        ))
        .await
        .unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < want && Instant::now() < deadline {
        out.extend(
            consumer
                .poll(100, Duration::from_millis(100))
                .await
                .unwrap(),
        );
    }
    // Anything more than `want` would be a bug too: read what else is there.
    out.extend(
        consumer
            .poll(100, Duration::from_millis(200))
            .await
            .unwrap(),
    );
    out
}

fn header(r: &Record, k: &str) -> Option<String> {
    r.header(k).map(|v| String::from_utf8_lossy(v).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_store_rejects_are_dead_lettered_and_their_partition_moves_on() {
    records_the_store_rejects(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_store_rejects_are_dead_lettered_on_kafka() {
    records_the_store_rejects(Backend::Kafka).await;
}

async fn records_the_store_rejects(backend: Backend) {
    let mut h = start(backend, |s| {
        s.rejected.lock().insert("C13".into());
        s.timing_out.lock().insert("C77".into());
    })
    .await;
    let end = h.send(h.goods(0..200)).await;
    h.wait_caught_up(&end).await;
    let (store, metrics, log, topic) = h.stop().await;

    // Every other record is in the store, each applied once.
    let docs = store.dump().await.unwrap();
    let ids: BTreeSet<String> = docs.iter().map(|d| d.entity_id.clone()).collect();
    let want: BTreeSet<String> = (0..200)
        .map(|i| format!("C{i}"))
        .filter(|id| id != "C13" && id != "C77")
        .collect();
    assert_eq!(ids, want);
    assert!(docs.iter().all(|d| d.events_applied == 1));

    // The two bad rows are dead letters of stage `store`, byte for byte.
    let letters = dead_letters(&log, &topic, 2).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    for (id, kind) in [("C13", "store_rejected"), ("C77", "store_unavailable")] {
        let l = letters
            .iter()
            .find(|l| l.key.as_deref() == Some(id.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {id}"));
        let n: usize = id[1..].parse().unwrap();
        assert_eq!(l.value, good(&topic, n).value);
        assert_eq!(header(l, headers::KONTEXT_STAGE).as_deref(), Some("store"));
        assert_eq!(header(l, headers::STAGE).as_deref(), Some("TASK_PUT"));
        assert_eq!(header(l, headers::KIND).as_deref(), Some(kind));
        let attempts: u32 = header(l, headers::ATTEMPTS).unwrap().parse().unwrap();
        assert!(attempts >= 2, "{id}: {attempts} attempts");
        assert_eq!(header(l, headers::TOPIC).as_deref(), Some(topic.as_str()));
    }
    let by_kind = metrics.dead_lettered();
    assert_eq!(
        by_kind.get(&(topic.clone(), "store", "store_rejected")),
        Some(&1)
    );
    assert_eq!(
        by_kind.get(&(topic.clone(), "store", "store_unavailable")),
        Some(&1)
    );
    // A bad row is not an outage.
    assert_eq!(metrics.breaker_opened.load(Ordering::Relaxed), 0);
    assert!(metrics.retries("store_write") > 0);
    let text = metrics.render();
    assert!(
        text.contains(&format!(
            r#"kontext_records_dead_lettered_total{{topic="{topic}",stage="store",kind="store_rejected"}} 1"#
        )),
        "{text}"
    );
    assert!(
        text.contains(r#"kontext_store_breaker_state{reason="none"} 0"#),
        "{text}"
    );
}

/// The embedded store itself (nothing injected) refuses an entity id with a NUL character,
/// which its keys cannot hold, as PostgreSQL does: that record alone is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_the_embedded_store_cannot_key_is_dead_lettered_and_the_rest_applied() {
    let mut h = start(Backend::Embedded, |_| {}).await;
    let mut records = h.goods(0..50);
    let mut nul = good(&h.topic, 50);
    nul.key = Some(Bytes::from_static(b"C\0NUL"));
    records.insert(25, nul.clone());
    let end = h.send(records).await;
    h.wait_caught_up(&end).await;
    let (store, metrics, log, topic) = h.stop().await;

    assert_eq!(store.dump().await.unwrap().len(), 50);
    let letters = dead_letters(&log, &topic, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].key, nul.key);
    assert_eq!(letters[0].value, nul.value);
    assert_eq!(
        header(&letters[0], headers::KIND).as_deref(),
        Some("store_rejected")
    );
    assert_eq!(metrics.breaker_opened.load(Ordering::Relaxed), 0);
}

/// Every bad record of a store's partitions gets a dead letter across a rebuild and its
/// switch, an invalid one exactly one. The rebuild's sink letters no invalid record the live
/// version handled (the live sink did), every one it had not handled yet (after the switch
/// the new version's offsets cover those, so a lagging live sink skips them or drops its
/// letters of them), and every record its store rejects (the live version may have applied
/// it: a second letter for the one the live sink lettered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_and_its_switch_dead_letter_every_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    let topic = "context.customers".to_string();
    let config = pipeline(&topic);
    let log = embedded_with_topic(dir.path(), &topic, &config).await;
    // Offsets 0..40 in two halves: NUL ids (which the embedded store cannot key) at 10 and
    // 30, malformed records at 15 and 35.
    let records = |range: std::ops::Range<usize>| -> Vec<ProduceRecord> {
        range
            .map(|i| {
                let mut r = good(&topic, i);
                match i {
                    10 | 30 => r.key = Some(Bytes::from(format!("C\0{i}"))),
                    15 | 35 => r.value = Some(Bytes::from_static(b"{not json")),
                    _ => {}
                }
                r
            })
            .collect()
    };
    let schema = StoreSchema::from_config(&config);
    let open =
        |name: &str| Arc::new(EmbeddedStore::open(&dir.path().join(name), schema.clone()).unwrap());
    let live = Arc::new(SwitchableStore::new(open("blue.redb")));
    let group = "failures-live".to_string();
    let run_until = |sink: StoreSink, done: Box<dyn Fn() -> bool + Send>| async move {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sink.run(shutdown.clone()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(!task.is_finished() && Instant::now() < deadline, "stuck");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        task.await.unwrap().unwrap();
    };
    let live_sink = |metrics: Arc<PipelineMetrics>| {
        StoreSink::new(
            log.clone(),
            live.clone(),
            Router::new(&config),
            ConsumerConfig::new(&group, vec![topic.clone()]),
            metrics,
        )
        .with_config(&config)
    };

    // The live sink handles the first half.
    log.producer()
        .await
        .unwrap()
        .send(records(0..20))
        .await
        .unwrap();
    let blue = live.current();
    let sink = live_sink(Arc::new(PipelineMetrics::default()))
        .with_dead_letters(store_letters(&config, &log, &group).await);
    run_until(
        sink,
        Box::new(move || offset_of(&blue, "context.customers") == 20),
    )
    .await;

    // The second half arrives; a rebuild reads it all before the live sink does.
    log.producer()
        .await
        .unwrap()
        .send(records(20..40))
        .await
        .unwrap();
    let green = open("green.redb");
    let live_metrics = Arc::new(PipelineMetrics::default());
    let rebuild = StoreSink::new(
        log.clone(),
        green.clone(),
        Router::new(&config),
        ConsumerConfig::new(format!("{group}.rebuild.v1"), vec![topic.clone()]),
        Arc::new(PipelineMetrics::default()),
    )
    .with_config(&config)
    .with_rebuild_letters(RebuildLetters {
        dead_letters: store_letters(&config, &log, &group).await,
        live: live.clone(),
        earlier_definitions: Default::default(),
        metrics: live_metrics.clone(),
    });
    let green_dyn: Arc<dyn ContextStore> = green.clone();
    let watched = green_dyn.clone();
    run_until(
        rebuild,
        Box::new(move || offset_of(&watched, "context.customers") == 40),
    )
    .await;

    // The live sink was lagging: it started on the old version (its `handled` says 20) and
    // polls the second half only after the switch. Each bad record there has its letter from
    // the rebuild; the live sink skips the rejected one by offset and drops its letter of the
    // invalid one as handled (it re-reads the store's offsets, the new version's now).
    let gate = Arc::new(AtomicBool::new(false));
    let consumers = Arc::new(AtomicU64::new(0));
    let gated: Arc<dyn Log> = Arc::new(GatedLog {
        gate: gate.clone(),
        consumers: consumers.clone(),
        ..GatedLog::over(log.clone())
    });
    let sink = lettering_sink(gated, &log, live.clone(), &config, &group).await;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sink.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumers.load(Ordering::SeqCst) == 0 {
        assert!(
            !task.is_finished() && Instant::now() < deadline,
            "no consumer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (outcome, _) = live
        .switch_if_caught_up(&green_dyn, std::slice::from_ref(&topic))
        .await
        .unwrap();
    assert_eq!(outcome, SwitchOutcome::Switched);
    gate.store(true, Ordering::SeqCst);
    // Its batch is written and committed.
    while log.committed_offsets(&group, &topic).await.unwrap() != [(0, Some(40))] {
        assert!(!task.is_finished() && Instant::now() < deadline, "stuck");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let letters = dead_letters(&log, &topic, 5).await;
    let mut offsets: Vec<String> = letters
        .iter()
        .filter_map(|l| header(l, headers::OFFSET))
        .collect();
    offsets.sort();
    assert_eq!(offsets, ["10", "10", "15", "30", "35"], "{letters:?}");
    assert_eq!(green.dump().unwrap().len(), 36);
    // The rebuild's three letters are counted where the API exports the live sink's.
    let counted = live_metrics.dead_lettered();
    assert_eq!(
        counted.get(&(topic.clone(), "store", "store_rejected")),
        Some(&2)
    );
    assert_eq!(counted.values().sum::<u64>(), 3, "{counted:?}");
}

/// A rebuild under a changed pipeline file: a record the live sink applied under the earlier
/// definition (within its larger `limits.max_record_bytes`) is too large for the running one.
/// Below `earlier_definitions` the rebuild dead-letters it; without them (the live version
/// built under the running definition) it would count as reported by the live sink, and a
/// second rebuild writes no letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_dead_letters_what_the_live_sink_applied_under_an_earlier_definition() {
    let dir = tempfile::tempdir().unwrap();
    let topic = "context.customers".to_string();
    let earlier = pipeline(&topic);
    let mut running = earlier.clone();
    running.limits.max_record_bytes = 1024;
    let log = embedded_with_topic(dir.path(), &topic, &earlier).await;
    let mut records: Vec<ProduceRecord> = (0..20).map(|i| good(&topic, i)).collect();
    let padding = "x".repeat(2048);
    records[5].value = Some(Bytes::from(format!(
        r#"{{"first_name":"N5","notes":"{padding}"}}"#
    )));
    log.producer().await.unwrap().send(records).await.unwrap();

    let schema = StoreSchema::from_config(&earlier);
    let open =
        |name: &str| Arc::new(EmbeddedStore::open(&dir.path().join(name), schema.clone()).unwrap());
    let group = "definitions-live".to_string();
    let run_until = |sink: StoreSink, store: Arc<dyn ContextStore>| async move {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sink.run(shutdown.clone()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while offset_of(&store, "context.customers") < 20 {
            assert!(!task.is_finished() && Instant::now() < deadline, "stuck");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        task.await.unwrap().unwrap();
    };
    // The live sink, under the earlier definition, applies all twenty.
    let live: Arc<dyn ContextStore> = open("blue.redb");
    let sink = StoreSink::new(
        log.clone(),
        live.clone(),
        Router::new(&earlier),
        ConsumerConfig::new(&group, vec![topic.clone()]),
        Arc::new(PipelineMetrics::default()),
    )
    .with_config(&earlier)
    .with_dead_letters(store_letters(&earlier, &log, &group).await);
    run_until(sink, live.clone()).await;
    assert_eq!(live.dump().await.unwrap().len(), 20);

    let rebuild = |version: u32, earlier_definitions: BTreeMap<(String, i32), i64>| {
        let (log, live, running, group) = (log.clone(), live.clone(), running.clone(), &group);
        let topic = topic.clone();
        let green: Arc<dyn ContextStore> = open(&format!("green{version}.redb"));
        let metrics = Arc::new(PipelineMetrics::default());
        async move {
            let sink = StoreSink::new(
                log.clone(),
                green.clone(),
                Router::new(&running),
                ConsumerConfig::new(format!("{group}.rebuild.v{version}"), vec![topic]),
                Arc::new(PipelineMetrics::default()),
            )
            .with_config(&running)
            .with_rebuild_letters(RebuildLetters {
                dead_letters: store_letters(&running, &log, group).await,
                live,
                earlier_definitions,
                metrics: metrics.clone(),
            });
            run_until(sink, green.clone()).await;
            (green, metrics)
        }
    };
    let below = BTreeMap::from([((topic.clone(), 0), 20)]);
    let (green, metrics) = rebuild(1, below).await;
    assert_eq!(green.dump().await.unwrap().len(), 19);
    let letters = dead_letters(&log, &topic, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(header(&letters[0], headers::OFFSET).as_deref(), Some("5"));
    assert_eq!(metrics.dead_lettered().values().sum::<u64>(), 1);

    // Had the live version been built under the running definition, its sink would have
    // dead-lettered record 5 itself: the rebuild writes none.
    let (green, metrics) = rebuild(2, BTreeMap::new()).await;
    assert_eq!(green.dump().await.unwrap().len(), 19);
    let dlq = log
        .describe_topic(&earlier.dead_letter.topic_for(&topic))
        .await
        .unwrap();
    assert_eq!(dlq.partitions[0].high_watermark, 1, "one letter in all");
    assert_eq!(metrics.dead_lettered().values().sum::<u64>(), 0);
}

/// Polls that keep failing (a broker down) are retried with the retry settings' growing
/// delays, not every 100 ms for ever; a poll that works starts them over. (Paused clock: the
/// gaps are the delays exactly.)
#[tokio::test(start_paused = true)]
async fn failing_polls_are_retried_with_growing_delays() {
    let dir = tempfile::tempdir().unwrap();
    let topic = "context.customers".to_owned();
    let mut config = pipeline(&topic);
    config.retry.defaults.jitter = Some(kontext_core::config::Jitter::None);
    let log = embedded_with_topic(dir.path(), &topic, &config).await;
    let store = FailingStore::new(dir.path(), &config, Duration::ZERO);
    let polled_at: Arc<std::sync::Mutex<Vec<tokio::time::Instant>>> = Arc::default();
    let gated: Arc<dyn Log> = Arc::new(GatedLog {
        transient_failures: Arc::new(AtomicU64::new(5)),
        polled_at: polled_at.clone(),
        ..GatedLog::over(log.clone())
    });
    let group = "failures-polls".to_owned();
    let sink = lettering_sink(gated, &log, store, &config, &group).await;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sink.run(shutdown.clone()));
    while polled_at.lock().unwrap().len() < 7 {
        assert!(!task.is_finished(), "{:?}", task.await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let at = polled_at.lock().unwrap().clone();
    let gaps: Vec<u128> = at.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    // Five failures, the waiting policy's delays doubling from its first (this file's pipeline
    // sets 1 ms; jitter is off here); the sixth poll works.
    let policy = config.retry.waiting_policy();
    let first = policy.first_delay.as_millis();
    assert_eq!(policy.multiplier, 2.0);
    assert_eq!(
        gaps[..5],
        [first, 2 * first, 4 * first, 8 * first, 16 * first],
        "{gaps:?}"
    );
}

/// A Kafka consumer reports an error once. When that error meets the extra poll that gathers
/// a backlog, the sink writes what it gathered, then stops with the error. (It was logged at
/// debug level and dropped: the sink went on as if nothing had happened.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_of_the_poll_gathering_a_backlog_stops_the_sink_after_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let topic = "context.customers".to_owned();
    let config = pipeline(&topic);
    let log = embedded_with_topic(dir.path(), &topic, &config).await;
    let records = (0..2500).map(|i| good(&topic, i)).collect();
    log.producer().await.unwrap().send(records).await.unwrap();
    let store = FailingStore::new(dir.path(), &config, Duration::ZERO);
    let gated: Arc<dyn Log> = Arc::new(GatedLog {
        fail_after_full: Arc::new(AtomicBool::new(true)),
        ..GatedLog::over(log.clone())
    });
    let group = "failures-backlog".to_owned();
    let sink = lettering_sink(gated, &log, store.clone(), &config, &group).await;
    let shutdown = CancellationToken::new();
    let ran = tokio::time::timeout(Duration::from_secs(30), sink.run(shutdown.clone())).await;
    shutdown.cancel();
    let err = ran
        .expect("the sink kept running: the poll error was dropped")
        .expect_err("the sink stopped without an error");
    assert!(err.to_string().contains("injected"), "{err}");
    // The 2 000 records of the full poll were written before it stopped; the other 500 are
    // for the next start.
    let dyn_store: Arc<dyn ContextStore> = store.clone();
    assert_eq!(offset_of(&dyn_store, &topic), 2000);
}

/// A group that committed past the store is rewound before the sink consumes, and while a
/// member is still registered (a live one here; on Kafka, a killed one until its session
/// expires) the rewind waits, for up to a minute. A shutdown meanwhile ends the start-up at
/// once and without an error. (It used to wait out the minute and then fail.)
#[tokio::test(start_paused = true)]
async fn a_shutdown_ends_the_wait_for_a_busy_group_to_rewind() {
    let dir = tempfile::tempdir().unwrap();
    let topic = "context.customers".to_owned();
    let config = pipeline(&topic);
    let log = embedded_with_topic(dir.path(), &topic, &config).await;
    let records = (0..10).map(|i| good(&topic, i)).collect();
    log.producer().await.unwrap().send(records).await.unwrap();
    // A live member that committed all ten; the store holds none of them.
    let group = "failures-busy".to_owned();
    let mut member = log
        .consumer(ConsumerConfig::new(&group, vec![topic.clone()]))
        .await
        .unwrap();
    let polled = member.poll(100, Duration::from_millis(200)).await.unwrap();
    assert_eq!(polled.len(), 10);
    let tp = kontext_core::record::TopicPartition::new(topic.as_str(), 0);
    member.commit(&[(tp, 10)]).await.unwrap();
    let store = FailingStore::new(dir.path(), &config, Duration::ZERO);
    let sink = lettering_sink(log.clone(), &log, store.clone(), &config, &group).await;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sink.run(shutdown.clone()));
    // Paused clock: these are the retries' sleeps, well inside the minute.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!task.is_finished(), "{:?}", task.await);
    shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(10), task).await;
    ended
        .expect("the sink kept waiting for the group after the shutdown")
        .unwrap()
        .expect("a shutdown is not an error");
    let dyn_store: Arc<dyn ContextStore> = store;
    assert_eq!(offset_of(&dyn_store, &topic), 0, "nothing was consumed");
    let committed = log.committed_offsets(&group, &topic).await.unwrap();
    assert_eq!(committed, vec![(0, Some(10))], "the group was left alone");
    drop(member);
}

/// A sink of `store` reading the config's topic through `log` as `group`, with its dead
/// letters written through `letters`.
async fn lettering_sink(
    log: Arc<dyn Log>,
    letters: &Arc<dyn Log>,
    store: Arc<dyn ContextStore>,
    config: &PipelineConfig,
    group: &str,
) -> StoreSink {
    StoreSink::new(
        log,
        store,
        Router::new(config),
        ConsumerConfig::new(group, config.source_topics()),
        Arc::new(PipelineMetrics::default()),
    )
    .with_config(config)
    .with_dead_letters(store_letters(config, letters, group).await)
}

/// A log whose consumers deliver nothing until `gate` opens: a member that joined and lags.
struct GatedLog {
    inner: Arc<dyn Log>,
    gate: Arc<AtomicBool>,
    /// Consumers created so far.
    consumers: Arc<AtomicU64>,
    /// While set, the poll after a full one fails once, with a permanent error (then it is
    /// cleared): a Kafka consumer reports an error once.
    fail_after_full: Arc<AtomicBool>,
    /// Polls to fail with a transient error before polling the log, and when each was made.
    transient_failures: Arc<AtomicU64>,
    polled_at: Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
}

impl GatedLog {
    /// Over `inner`: open, failing nothing.
    fn over(inner: Arc<dyn Log>) -> Self {
        Self {
            inner,
            gate: Arc::new(AtomicBool::new(true)),
            consumers: Arc::default(),
            fail_after_full: Arc::default(),
            transient_failures: Arc::default(),
            polled_at: Arc::default(),
        }
    }
}

struct GatedConsumer {
    inner: Box<dyn kontext_log::Consumer>,
    gate: Arc<AtomicBool>,
    fail_after_full: Arc<AtomicBool>,
    last_was_full: bool,
    transient_failures: Arc<AtomicU64>,
    polled_at: Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
}

#[async_trait]
impl Log for GatedLog {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn create_topic(
        &self,
        spec: &TopicSpec,
    ) -> Result<kontext_log::CreateOutcome, kontext_log::LogError> {
        self.inner.create_topic(spec).await
    }

    async fn list_topics(&self) -> Result<Vec<String>, kontext_log::LogError> {
        self.inner.list_topics().await
    }

    async fn describe_topic(
        &self,
        topic: &str,
    ) -> Result<kontext_log::TopicDescription, kontext_log::LogError> {
        self.inner.describe_topic(topic).await
    }

    async fn producer(&self) -> Result<Arc<dyn kontext_log::Producer>, kontext_log::LogError> {
        self.inner.producer().await
    }

    async fn dedicated_producer(
        &self,
    ) -> Result<Arc<dyn kontext_log::Producer>, kontext_log::LogError> {
        self.inner.dedicated_producer().await
    }

    async fn consumer(
        &self,
        config: ConsumerConfig,
    ) -> Result<Box<dyn kontext_log::Consumer>, kontext_log::LogError> {
        let inner = self.inner.consumer(config).await?;
        self.consumers.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(GatedConsumer {
            inner,
            gate: self.gate.clone(),
            fail_after_full: self.fail_after_full.clone(),
            last_was_full: false,
            transient_failures: self.transient_failures.clone(),
            polled_at: self.polled_at.clone(),
        }))
    }

    async fn committed_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(i32, Option<i64>)>, kontext_log::LogError> {
        self.inner.committed_offsets(group, topic).await
    }

    async fn reset_group_offsets(
        &self,
        group: &str,
        offsets: &[(kontext_core::record::TopicPartition, i64)],
    ) -> Result<(), kontext_log::LogError> {
        self.inner.reset_group_offsets(group, offsets).await
    }
}

#[async_trait]
impl kontext_log::Consumer for GatedConsumer {
    async fn poll(
        &mut self,
        max_records: usize,
        timeout: Duration,
    ) -> Result<Vec<Record>, kontext_log::LogError> {
        if !self.gate.load(Ordering::SeqCst) {
            tokio::time::sleep(timeout.min(Duration::from_millis(20))).await;
            return Ok(Vec::new());
        }
        self.polled_at
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        let failures = &self.transient_failures;
        if failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(kontext_log::LogError::Unavailable(
                "broker unreachable (injected)".into(),
            ));
        }
        if std::mem::take(&mut self.last_was_full)
            && self.fail_after_full.swap(false, Ordering::SeqCst)
        {
            return Err(kontext_log::LogError::Kafka {
                message: "consumer fatal error (injected)".into(),
                transient: false,
            });
        }
        let records = self.inner.poll(max_records, timeout).await?;
        self.last_was_full = records.len() == max_records;
        Ok(records)
    }

    async fn commit(
        &mut self,
        offsets: &[(kontext_core::record::TopicPartition, i64)],
    ) -> Result<(), kontext_log::LogError> {
        self.inner.commit(offsets).await
    }

    fn assignment(&self) -> Vec<kontext_core::record::TopicPartition> {
        self.inner.assignment()
    }

    async fn pause(&mut self) -> Result<(), kontext_log::LogError> {
        self.inner.pause().await
    }

    async fn resume(&mut self) -> Result<(), kontext_log::LogError> {
        self.inner.resume().await
    }
}

/// The dead letters of the store behind `group`.
async fn store_letters(config: &PipelineConfig, log: &Arc<dyn Log>, group: &str) -> DeadLetters {
    DeadLetters::new(
        config.dead_letter.clone(),
        config.name.clone(),
        group.to_string(),
        log.producer().await.unwrap(),
    )
}

/// A store's next offset of `topic`'s partition 0, read on a thread of its own (the
/// conditions `run_until` polls are synchronous).
fn offset_of(store: &Arc<dyn ContextStore>, topic: &str) -> i64 {
    let store = store.clone();
    let key = (topic.to_string(), 0);
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(store.applied_offsets())
            .unwrap()
            .get(&key)
            .copied()
            .unwrap_or(0)
    })
    .join()
    .unwrap()
}

/// A member that took over a partition (a rebalance) gets again what the member before it
/// handled but had not committed to the group yet; the bad records among them were
/// dead-lettered by that member, so not again by this one. The store says what was handled:
/// here partition 0 was handled (by "another member", writing the shared store after this
/// sink started), partition 1 not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_record_another_member_handled_is_not_dead_lettered_again() {
    let mut h = start(Backend::Embedded, |_| {}).await;
    let topic = h.topic.clone();
    // After the sink's start-up (which would refuse offsets past the log's end).
    let mut first = good(&topic, 99);
    first.partition = Some(1);
    let end = h.send(vec![first]).await;
    h.wait_caught_up(&end).await;
    h.store.inner.apply(&[], &[(&topic, 0, 1_000)]).unwrap();
    let mut records = Vec::new();
    for partition in [0, 1] {
        for i in 0..6 {
            let mut r = if i % 3 == 2 {
                let mut bad = good(&topic, i);
                bad.value = Some(Bytes::from_static(b"{not json"));
                bad
            } else {
                good(&topic, partition as usize * 10 + i)
            };
            r.partition = Some(partition);
            records.push(r);
        }
    }
    h.send(records).await;
    // Partition 0's four good records are skipped (the store has them) after their batch's
    // letters were written.
    h.wait_for("every record", |h| {
        h.metrics.invalid_total() == 4 && h.metrics.records_skipped.load(Ordering::Relaxed) == 4
    })
    .await;
    let end = BTreeMap::from([(1, 7)]);
    h.wait_caught_up(&end).await;
    let (_, metrics, log, topic) = h.stop().await;

    let letters = dead_letters(&log, &topic, 2).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters
            .iter()
            .all(|l| header(l, headers::PARTITION).as_deref() == Some("1")),
        "{letters:?}"
    );
    assert_eq!(metrics.records_dead_lettered.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_pauses_the_sink_and_loses_nothing() {
    store_outage(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_on_kafka_pauses_the_sink_and_loses_nothing() {
    store_outage(Backend::Kafka).await;
}

async fn store_outage(backend: Backend) {
    let mut h = start(backend, |_| {}).await;
    let end = h.send(h.goods(0..100)).await;
    h.wait_caught_up(&end).await;

    // The store goes down, and records keep coming.
    h.store.down.store(true, Ordering::SeqCst);
    let end = h.send(h.goods(100..300)).await;
    h.wait_for("the breaker to open", |h| {
        h.metrics.breaker().0 == BreakerState::Open
    })
    .await;
    assert_eq!(h.metrics.breaker().1, "store_unavailable");
    assert!(h
        .metrics
        .render()
        .contains(r#"kontext_store_breaker_state{reason="store_unavailable"} 1"#));
    // While open, the sink keeps probing (and nothing is dead-lettered).
    let probes = h.metrics.retries("store_probe");
    h.wait_for("more probes", |h| {
        h.metrics.retries("store_probe") > probes + 2
    })
    .await;
    assert_eq!(h.metrics.records_dead_lettered.load(Ordering::Relaxed), 0);

    // Back up: it resumes where it stopped.
    h.store.down.store(false, Ordering::SeqCst);
    h.wait_caught_up(&end).await;
    let end = h.send(h.goods(300..350)).await;
    h.wait_caught_up(&end).await;
    let (store, metrics, log, topic) = h.stop().await;

    assert!(store.refused_while_down.load(Ordering::SeqCst) > 0);
    let docs = store.dump().await.unwrap();
    assert_eq!(docs.len(), 350, "every record reached the store");
    assert!(
        docs.iter().all(|d| d.events_applied == 1),
        "none applied twice"
    );
    assert_eq!(metrics.records_dead_lettered.load(Ordering::Relaxed), 0);
    assert!(dead_letters(&log, &topic, 0).await.is_empty());
    assert_eq!(metrics.breaker_opened.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.breaker_closed.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.breaker(), (BreakerState::Closed, "none"));
    // Failed background flushes during the outage count as store-write retries in both.
    assert_eq!(
        metrics.store_retries.load(Ordering::Relaxed),
        metrics.retries("store_write")
    );
}

/// Kafka removes a member that does not poll for `max.poll.interval.ms`: it would rejoin after
/// the outage with a rebalance, and the group would deliver the batch in hand again. A paused
/// member keeps polling, so it keeps its partitions: nothing is delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_longer_than_the_poll_interval_keeps_the_kafka_member_in_its_group() {
    // 6 s is the broker's smallest session timeout (`group.min.session.timeout.ms`), and
    // librdkafka wants `max.poll.interval.ms` >= `session.timeout.ms`.
    let poll_interval = Duration::from_secs(6);
    let mut h = start_with(
        Backend::Kafka,
        &[
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "1000"),
            ("max.poll.interval.ms", "6000"),
        ],
        0,
        |_| {},
    )
    .await;
    let end = h.send(h.goods(0..100)).await;
    h.wait_caught_up(&end).await;

    h.store.down.store(true, Ordering::SeqCst);
    let end = h.send(h.goods(100..300)).await;
    h.wait_for("the breaker to open", |h| {
        h.metrics.breaker().0 == BreakerState::Open
    })
    .await;
    // An outage of two and a half poll intervals (the scenario, not an assertion on time).
    tokio::time::sleep(poll_interval * 5 / 2).await;
    assert_eq!(h.metrics.breaker().0, BreakerState::Open);
    assert!(!h.task.is_finished(), "the sink stopped during the outage");

    h.store.down.store(false, Ordering::SeqCst);
    h.wait_caught_up(&end).await;
    let end = h.send(h.goods(300..350)).await;
    h.wait_caught_up(&end).await;
    let (store, metrics, _log, _topic) = h.stop().await;

    assert_eq!(
        metrics.records_skipped.load(Ordering::Relaxed),
        0,
        "no record was delivered twice: the member kept its partitions through the outage"
    );
    let docs = store.dump().await.unwrap();
    assert_eq!(docs.len(), 350, "every record reached the store");
    assert!(docs.iter().all(|d| d.events_applied == 1));
    assert_eq!(metrics.records_dead_lettered.load(Ordering::Relaxed), 0);
    assert_eq!(metrics.breaker_opened.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.breaker(), (BreakerState::Closed, "none"));
}

/// A sink that finds a backlog gathers it into one store write (group commit) instead of a
/// durable commit per poll of 2 000, and still writes every record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_written_in_one_store_transaction() {
    let backlog = 7_000;
    let mut h = start_with(Backend::Embedded, &[], backlog, |_| {}).await;
    let end: BTreeMap<i32, i64> = h
        .log
        .describe_topic(&h.topic)
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| (p.partition, p.high_watermark))
        .collect();
    assert_eq!(end.values().sum::<i64>(), backlog as i64);
    h.wait_caught_up(&end).await;
    let (store, metrics, _, _) = h.stop().await;
    assert_eq!(store.written.load(Ordering::SeqCst), 1, "one store write");
    assert_eq!(metrics.batches_committed.load(Ordering::Relaxed), 1);
    assert_eq!(
        metrics.records_applied.load(Ordering::Relaxed),
        backlog as u64
    );
    assert_eq!(store.inner.dump().unwrap().len(), backlog);
}

/// A store that commits without fsyncing: the records are served at once, but the group's
/// offsets do not pass them until the store flushed (here only at shutdown: the interval is
/// an hour), and stopping the sink flushes and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_offsets_wait_for_the_store_to_be_durable() {
    let backlog = 300;
    let mut h = start_synced(
        Backend::Embedded,
        &[],
        backlog,
        Duration::from_secs(3600),
        |_| {},
    )
    .await;
    let end = h.send(h.goods(backlog..backlog + 200)).await;
    h.wait_caught_up(&end).await;
    assert_eq!(
        h.store.inner.dump().unwrap().len(),
        backlog + 200,
        "served before durable"
    );
    let marks = h.store.inner.write_marks();
    assert!(marks.applied > 0 && marks.durable == 0, "{marks:?}");
    let group = format!("failures-{}", h.topic);
    let committed = h.log.committed_offsets(&group, &h.topic).await.unwrap();
    assert!(
        committed.iter().all(|(_, c)| c.is_none()),
        "committed past writes a crash could lose: {committed:?}"
    );
    assert_eq!(h.metrics.batches_committed.load(Ordering::Relaxed), 0);

    let (store, metrics, log, topic) = h.stop().await;
    let marks = store.inner.write_marks();
    assert_eq!(marks.durable, marks.applied, "flushed at shutdown");
    let committed: BTreeMap<i32, i64> = log
        .committed_offsets(&group, &topic)
        .await
        .unwrap()
        .into_iter()
        .map(|(p, c)| (p, c.unwrap_or(0)))
        .collect();
    for (p, e) in &end {
        assert_eq!(
            committed.get(p),
            Some(e),
            "partition {p} committed at shutdown"
        );
    }
    assert_eq!(
        metrics.event_to_applied[UpdateKind::Entity as usize].count(),
        (backlog + 200) as u64,
        "every applied update timed"
    );
}

/// With a short interval the flusher runs while the sink does: the group's offsets catch up
/// without a shutdown, and the store's marks say everything is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flusher_lets_the_group_commit_while_running() {
    let mut h = start_synced(Backend::Embedded, &[], 0, Duration::from_millis(20), |_| {}).await;
    let end = h.send(h.goods(0..400)).await;
    h.wait_caught_up(&end).await;
    let group = format!("failures-{}", h.topic);
    let log = h.log.clone();
    let topic = h.topic.clone();
    let committed_all = |committed: &[(i32, Option<i64>)]| {
        end.iter().all(|(p, e)| {
            committed
                .iter()
                .any(|(q, c)| q == p && c.is_some_and(|c| c >= *e))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let committed = log.committed_offsets(&group, &topic).await.unwrap();
        if committed_all(&committed) {
            break;
        }
        assert!(!h.task.is_finished(), "the sink stopped");
        assert!(Instant::now() < deadline, "never committed: {committed:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let marks = h.store.inner.write_marks();
    assert_eq!(marks.durable, marks.applied, "{marks:?}");
    assert!(marks.applied > 0);
    h.stop().await;
}

/// A store that answers reads but fails every write (a full disk): the breaker's half-open
/// trials fail one after the other. The probes' backoff and budget run across them, from the
/// outage's start, so a bounded `store_probe` stops the sink with the store's error; before,
/// each trial started the backoff afresh, and the sink retried every few milliseconds forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_reads_but_cannot_write_runs_out_the_probe_budget() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> =
        EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    let topic = "context.customers";
    let yaml = pipeline_yaml(topic);
    let config = PipelineConfig::parse(
        "full-disk.yaml",
        &yaml.replace(
            "store_write: { max_attempts: 3 }",
            "store_write: { max_attempts: 3 }\n  store_probe: { max_elapsed: 1s }",
        ),
    )
    .unwrap();
    log.create_topic(&TopicSpec::new(topic, 1)).await.unwrap();
    log.producer()
        .await
        .unwrap()
        .send(vec![good(topic, 1)])
        .await
        .unwrap();
    let store = FailingStore::new(dir.path(), &config, Duration::ZERO);
    store.writes_down.store(true, Ordering::SeqCst);
    let sink = StoreSink::new(
        log,
        store.clone(),
        Router::new(&config),
        ConsumerConfig::new("full-disk", vec![topic.into()]),
        Arc::new(PipelineMetrics::default()),
    )
    .with_config(&config);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sink.run(shutdown.clone()));
    let ended = tokio::time::timeout(Duration::from_secs(60), task).await;
    shutdown.cancel();
    let result = ended
        .expect("the sink kept retrying a store that cannot write")
        .unwrap();
    match result {
        Err(kontext_stream::sink::SinkError::Store(e)) => {
            assert!(e.to_string().contains("no space left"), "{e}")
        }
        other => panic!("the sink should stop with the store's error: {other:?}"),
    }
}

/// A store that refuses on its settings, for some writes only (new connections refused while
/// pooled ones work), blames no record: the sink stops with the error, dead-letters nothing,
/// and its offsets stop before the refused record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_store_stops_the_sink_and_dead_letters_nothing() {
    misconfigured_store(|s| {
        s.misconfigured.lock().insert("C5".into());
    })
    .await;
}

/// The same when the refusal comes only on the single record's last try, after its
/// timeouts and a probe that passed: a record is parked only for what it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_misconfigured_at_the_last_try_stops_the_sink_too() {
    misconfigured_store(|s| {
        s.misconfigured_late.lock().insert("C5".into());
    })
    .await;
}

async fn misconfigured_store(setup: impl FnOnce(&FailingStore)) {
    let h = start(Backend::Embedded, setup).await;
    let positions = h
        .log
        .producer()
        .await
        .unwrap()
        .send(h.goods(0..20))
        .await
        .unwrap();
    let refused = positions[5];
    let ended = tokio::time::timeout(Duration::from_secs(60), h.task).await;
    h.shutdown.cancel();
    match ended.expect("the sink kept going").unwrap() {
        Err(kontext_stream::sink::SinkError::Store(StoreError::Config(m))) => {
            assert!(m.contains("refuses the login (test)"), "{m}")
        }
        other => panic!("the sink should stop with the store's error: {other:?}"),
    }
    assert!(dead_letters(&h.log, &h.topic, 0).await.is_empty());
    let applied = h.store.inner.applied_offsets().unwrap();
    let next = applied
        .get(&(h.topic.clone(), refused.partition))
        .copied()
        .unwrap_or(0);
    assert!(next <= refused.offset, "{next} passed {refused:?}");
    assert_eq!(h.metrics.dead_lettered().len(), 0);
}

/// Waits until `gauge` reads `want`.
async fn until_gauge(metrics: &PipelineMetrics, want: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while metrics.sink_assigned_partitions.load(Ordering::Relaxed) != want {
        assert!(
            Instant::now() < deadline,
            "{what}: the sink holds {} partitions, not {want}",
            metrics.sink_assigned_partitions.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sink publishes the partitions it holds in its group: on the real broker, a second
/// member of the store's group (another instance sharing the store) takes one of the topic's
/// two, and the first holds both again once it leaves. A rebuild reads this to refuse
/// switching a store other instances write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_publishes_the_partitions_it_holds_on_kafka() {
    let h = start(Backend::Kafka, |_| {}).await;
    until_gauge(&h.metrics, 2, "alone").await;

    let dir = tempfile::tempdir().unwrap();
    let config = pipeline(&h.topic);
    let other_metrics = Arc::new(PipelineMetrics::default());
    let other = StoreSink::new(
        h.log.clone(),
        FailingStore::new(dir.path(), &config, Duration::ZERO),
        Router::new(&config),
        ConsumerConfig::new(format!("failures-{}", h.topic), vec![h.topic.clone()]),
        other_metrics.clone(),
    )
    .with_config(&config);
    let other_stop = CancellationToken::new();
    let other_task = tokio::spawn(other.run(other_stop.clone()));
    until_gauge(&h.metrics, 1, "sharing").await;
    until_gauge(&other_metrics, 1, "the other member").await;

    other_stop.cancel();
    other_task.await.unwrap().unwrap();
    until_gauge(&h.metrics, 2, "alone again").await;
    let text = h.metrics.render();
    assert!(
        text.contains("kontext_sink_assigned_partitions 2"),
        "{text}"
    );
    h.stop().await;
}
