//! The changelog sync of task stores against a real log: what a member may restore and repair
//! when another member may be writing the same changelog partition.

use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::TopicSpec;
use kontext_process::StateStore;

use super::*;

fn records(topic: &str, changelog: Vec<ChangelogRecord>) -> Vec<ProduceRecord> {
    changelog
        .into_iter()
        .map(|r| {
            let mut record = ProduceRecord::new(topic.to_string(), Some(r.key), r.value);
            record.partition = Some(0);
            record
        })
        .collect()
}

/// The store's entries, without its recorded changelog end (which differs between members).
fn state(store: &FjallStore) -> Vec<(Bytes, Bytes)> {
    store
        .dump()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.as_ref() != CHANGELOG_END_KEY)
        .collect()
}

/// A batch setting `k1` and `k2` to `value`, at input offset `value`.
fn batch(value: &str) -> WriteBatch {
    let mut batch = WriteBatch::default();
    batch.put(b"k1", value.as_bytes());
    batch.put(b"k2", value.as_bytes());
    let offset = value.parse().unwrap();
    batch.set_offset(TopicPartition::new("rep", 0), offset);
    batch
}

struct Fixture {
    dir: tempfile::TempDir,
    log: Arc<dyn Log>,
    producer: Arc<dyn Producer>,
    app: String,
    topic: String,
    metrics: PipelineMetrics,
    shutdown: CancellationToken,
}

impl Fixture {
    async fn new(log: Arc<dyn Log>, app: &str) -> Self {
        let topic = changelog_topic_name(app, "agg");
        let mut spec = TopicSpec::new(topic.clone(), 1);
        spec.compacted = true;
        log.create_topic(&spec).await.unwrap();
        let producer = log.producer().await.unwrap();
        Self {
            dir: tempfile::tempdir().unwrap(),
            log,
            producer,
            app: app.to_string(),
            topic,
            metrics: PipelineMetrics::default(),
            shutdown: CancellationToken::new(),
        }
    }

    fn open(&self, member: &str) -> FjallStore {
        let db = StateDb::open(self.dir.path().join(member)).unwrap();
        FjallStore::open_in(&db, "agg.0.agg", "agg", Default::default()).unwrap()
    }

    /// Syncs `store` with the changelog as a member that owns the partition or may not.
    async fn sync(&self, store: &mut FjallStore, ownership: Ownership) {
        let restore = Restore {
            ownership,
            log: self.log.as_ref(),
            producer: self.producer.as_ref(),
            app: &self.app,
            exactly_once: false,
            policy: kontext_core::config::RetryConfig::default().waiting_policy(),
            metrics: &self.metrics,
            shutdown: &self.shutdown,
        };
        assert!(sync_stores_with_changelogs(&restore, vec![(0, store)])
            .await
            .unwrap());
    }

    /// Produces `batch`'s changelog records and commits it to `store`, as a task does: with
    /// the changelog end after it only when it continues the store's changelog.
    async fn commit(&self, store: &mut FjallStore, mut batch: WriteBatch) {
        let sent = self
            .producer
            .send(records(&self.topic, batch.changelog()))
            .await
            .unwrap();
        if continues_changelog(Some(store), 0, sent[0].offset, false).unwrap() {
            let end = sent.last().unwrap().offset + 1;
            batch.put(CHANGELOG_END_KEY, &end.to_le_bytes());
        }
        store.apply(&batch).unwrap();
    }
}

/// Member A owns the partition and is half-way through producing a batch's changelog when
/// member B starts. B's start-up sync (every partition, owned or not) must not take A's
/// records for a dead writer's and "repair" them: the repair would land in the middle of A's
/// batch, and every later restore would lose A's first records (found by review: `k1` came
/// back as 1 with the offsets of batch 2).
async fn a_starting_member_leaves_a_live_writers_batch_alone(log: Arc<dyn Log>, app: &str) {
    let f = Fixture::new(log, app).await;
    let mut a = f.open("a");
    f.commit(&mut a, batch("1")).await;
    let mut b = f.open("b");
    f.sync(&mut b, Ownership::Maybe).await;
    assert_eq!(state(&b), state(&a));

    // A: batch 2's first changelog record has landed, the rest are in flight.
    let mut second = batch("2");
    let mut changelog = records(&f.topic, second.changelog());
    let rest = changelog.split_off(1);
    f.producer.send(changelog).await.unwrap();
    // B restarts and syncs before joining the group.
    f.sync(&mut b, Ownership::Maybe).await;
    // A's batch completes and A commits its state.
    let sent = f.producer.send(rest).await.unwrap();
    second.put(
        CHANGELOG_END_KEY,
        &(sent.last().unwrap().offset + 1).to_le_bytes(),
    );
    a.apply(&second).unwrap();

    // The partition moves to B; and a member with no state restores the whole changelog.
    f.sync(&mut b, Ownership::Assigned).await;
    let mut c = f.open("c");
    f.sync(&mut c, Ownership::Assigned).await;
    assert_eq!(c.get(b"k1").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(
        state(&c),
        state(&a),
        "a full restore gives the owner's state"
    );
    assert_eq!(
        state(&b),
        state(&a),
        "the member it moved to has the owner's state"
    );
}

/// A writer that died half-way through a batch (its state never committed the batch): a
/// member assigned the partition repairs the changelog, so it restores to the committed state;
/// the same member's start-up sync before that left the records alone.
async fn an_assigned_member_repairs_a_dead_writers_batch(log: Arc<dyn Log>, app: &str) {
    let f = Fixture::new(log, app).await;
    let mut a = f.open("a");
    f.commit(&mut a, batch("1")).await;
    let mut changelog = records(&f.topic, batch("2").changelog());
    changelog.truncate(1);
    f.producer.send(changelog).await.unwrap();
    // A died here. B starts: the incomplete batch is not applied, nor repaired yet.
    let mut b = f.open("b");
    f.sync(&mut b, Ownership::Maybe).await;
    assert_eq!(state(&b), state(&a));
    let mut c = f.open("c");
    f.sync(&mut c, Ownership::Maybe).await;
    assert_eq!(state(&c), state(&a));
    // B is assigned the partition: it repairs the changelog.
    f.sync(&mut b, Ownership::Assigned).await;
    assert_eq!(state(&b), state(&a));
    let mut d = f.open("d");
    f.sync(&mut d, Ownership::Assigned).await;
    assert_eq!(
        state(&d),
        state(&a),
        "the repaired changelog restores A's state"
    );
    // C, which left the tail alone, reads it again and gets the same.
    f.sync(&mut c, Ownership::Assigned).await;
    assert_eq!(state(&c), state(&a));
}

/// Without `exactly_once` nothing fences a member that stalled past its session: A, stalled,
/// commits a batch after B took the partition over and committed one. A's changelog end must
/// not move past B's batch, or A, assigned the partition again later, would take its state
/// for current and never restore B's batch (found by review).
async fn a_stale_writers_batch_does_not_hide_the_batch_before_it(log: Arc<dyn Log>, app: &str) {
    let f = Fixture::new(log, app).await;
    let mut a = f.open("a");
    f.sync(&mut a, Ownership::Assigned).await;
    let mut b = f.open("b");
    f.sync(&mut b, Ownership::Assigned).await;
    let mut by_b = batch("2");
    by_b.put(b"k3", b"by b");
    f.commit(&mut b, by_b).await;
    // A wakes up and finishes its stale batch; later the group assigns it the partition again.
    f.commit(&mut a, batch("1")).await;
    f.sync(&mut a, Ownership::Assigned).await;
    assert_eq!(
        a.get(b"k3").unwrap().as_deref(),
        Some(&b"by b"[..]),
        "B's batch is restored into A's state"
    );
}

/// A producer whose first send writes half of the records and then fails transiently, as a
/// Kafka send does when one partition's leader is unreachable past the delivery timeout.
struct HalfThenTransient {
    inner: Arc<dyn Producer>,
    failed: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Producer for HalfThenTransient {
    async fn send(
        &self,
        records: Vec<ProduceRecord>,
    ) -> Result<Vec<kontext_core::record::RecordPosition>, LogError> {
        if !self.failed.swap(true, Ordering::Relaxed) {
            let half = records[..records.len() / 2].to_vec();
            self.inner.send(half).await?;
            return Err(LogError::Kafka {
                message: "leader not available".into(),
                transient: true,
            });
        }
        self.inner.send(records).await
    }

    async fn flush(&self) -> Result<(), LogError> {
        self.inner.flush().await
    }
}

/// A send retried after it wrote part of a batch leaves copies of the batch's first records
/// between the store's changelog end and the batch's positions. That is the store's own
/// batch, not another writer's: its end must still move past it, or it would stay behind for
/// the rest of the run (found by review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_retried_after_a_partial_write_still_records_the_changelog_end() {
    let (_dir, log) = embedded();
    let f = Fixture::new(log, "retried").await;
    let mut a = f.open("a");
    f.sync(&mut a, Ownership::Assigned).await;
    let flaky = HalfThenTransient {
        inner: f.producer.clone(),
        failed: Default::default(),
    };
    let records = records(&f.topic, batch("1").changelog());
    let policy = kontext_core::config::RetryConfig::default().waiting_policy();
    let (positions, retried) = send_changelog(&flaky, records, &f.shutdown, &policy)
        .await
        .unwrap()
        .unwrap();
    assert!(retried);
    assert!(
        positions[0].offset > 0,
        "the first attempt's records came first"
    );
    assert!(continues_changelog(Some(&a), 0, positions[0].offset, retried).unwrap());
    assert!(
        !continues_changelog(Some(&a), 0, positions[0].offset, false).unwrap(),
        "the same gap without a retry is another writer's"
    );
}

/// Member B starts while member A is processing partition 0: A completes a batch (changelog,
/// then the group's offsets) between B's sync and B's rewind. B must not see the group "past
/// its state" and try to rewind a group with an active member (which waits 60 s for it to
/// leave, then fails the processor): it compares with the offsets read before its sync,
/// which the changelog it then read covers.
async fn a_starting_member_does_not_rewind_past_a_live_member(log: Arc<dyn Log>, app: &str) {
    let f = Fixture::new(log.clone(), app).await;
    let (group, input) = (format!("{app}.features"), format!("{app}-rep"));
    log.create_topic(&TopicSpec::new(input.clone(), 1))
        .await
        .unwrap();
    let tp = TopicPartition::new(input.as_str(), 0);
    let batch_at = |offset: i64| {
        let mut batch = WriteBatch::default();
        batch.put(b"k1", offset.to_string().as_bytes());
        batch.set_offset(tp.clone(), offset);
        batch
    };
    // A, a live member of the group, has processed up to offset 1 and committed it.
    let mut a = f.open("a");
    f.commit(&mut a, batch_at(1)).await;
    let mut member = log
        .consumer(ConsumerConfig::new(group.clone(), vec![input.clone()]))
        .await
        .unwrap();
    // Joined first: a member without its assignment yet cannot commit (one short poll was
    // not always enough on a busy machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while member.assignment().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never assigned");
        member.poll(10, Duration::from_millis(200)).await.unwrap();
    }
    member.commit(&[(tp.clone(), 1)]).await.unwrap();

    // B starts: the group's offsets, then the sync.
    let policy = kontext_core::config::RetryConfig::default().waiting_policy();
    let committed = committed_before_sync(log.as_ref(), &group, &input, &policy, &f.shutdown)
        .await
        .unwrap()
        .unwrap();
    let mut b = f.open("b");
    f.sync(&mut b, Ownership::Maybe).await;
    // Meanwhile A completes its next batch: changelog, state, the group's offsets.
    f.commit(&mut a, batch_at(2)).await;
    member.commit(&[(tp.clone(), 2)]).await.unwrap();

    let resume = BTreeMap::from([(0, b.offsets().unwrap()[&tp])]);
    assert_eq!(resume[&0], 1);
    let rewound = rewind_to_state(
        log.as_ref(),
        &group,
        &input,
        &resume,
        &committed,
        policy,
        &f.shutdown,
    )
    .await
    .expect("nothing to rewind: the state covers what the group had committed");
    assert!(rewound, "no shutdown");
    let now = log.committed_offsets(&group, &input).await.unwrap();
    assert_eq!(now, vec![(0, Some(2))], "A's progress is left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_member_does_not_rewind_past_a_live_member_on_the_embedded_log() {
    let (_dir, log) = embedded();
    a_starting_member_does_not_rewind_past_a_live_member(log, "app").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_member_does_not_rewind_past_a_live_member_on_kafka() {
    let (log, app) = kafka();
    a_starting_member_does_not_rewind_past_a_live_member(log, &app).await;
}

/// A member starting behind its group waits for the group's members to leave before it
/// rewinds it (up to a minute: a killed member's session). A shutdown ends that wait at once,
/// without an error and without touching the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_ends_the_wait_to_rewind_a_busy_group() {
    let (_dir, log) = embedded();
    let (group, input) = ("app.features".to_owned(), "app-rep".to_owned());
    log.create_topic(&TopicSpec::new(input.clone(), 1))
        .await
        .unwrap();
    let tp = TopicPartition::new(input.as_str(), 0);
    let mut member = log
        .consumer(ConsumerConfig::new(group.clone(), vec![input.clone()]))
        .await
        .unwrap();
    member.poll(10, Duration::from_millis(200)).await.unwrap();
    member.commit(&[(tp.clone(), 5)]).await.unwrap();
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let policy = kontext_core::config::RetryConfig::default().waiting_policy();
    let resume = BTreeMap::from([(0, 0)]);
    let committed = [(0, Some(5))];
    let rewound = rewind_to_state(
        log.as_ref(),
        &group,
        &input,
        &resume,
        &committed,
        policy,
        &shutdown,
    )
    .await
    .expect("a shutdown is not an error");
    assert!(!rewound, "shutdown came first: no reset was attempted");
    let now = log.committed_offsets(&group, &input).await.unwrap();
    assert_eq!(now, vec![(0, Some(5))]);
}

fn embedded() -> (tempfile::TempDir, Arc<dyn Log>) {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    (dir, log)
}

fn kafka() -> (Arc<dyn Log>, String) {
    use kontext_kafka::{KafkaConfig, KafkaLog};
    let bootstrap = std::env::var("KONTEXT_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let log: Arc<dyn Log> = Arc::new(KafkaLog::new(KafkaConfig::new(bootstrap)).unwrap());
    (log, format!("restore{nanos:x}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_writers_batch_does_not_hide_the_batch_before_it_on_the_embedded_log() {
    let (_dir, log) = embedded();
    a_stale_writers_batch_does_not_hide_the_batch_before_it(log, "stale").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_writers_batch_does_not_hide_the_batch_before_it_on_kafka() {
    let (log, app) = kafka();
    a_stale_writers_batch_does_not_hide_the_batch_before_it(log, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_member_leaves_a_live_writers_batch_alone_on_the_embedded_log() {
    let (_dir, log) = embedded();
    a_starting_member_leaves_a_live_writers_batch_alone(log, "app").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_member_leaves_a_live_writers_batch_alone_on_kafka() {
    let (log, app) = kafka();
    a_starting_member_leaves_a_live_writers_batch_alone(log, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assigned_member_repairs_a_dead_writers_batch_on_the_embedded_log() {
    let (_dir, log) = embedded();
    an_assigned_member_repairs_a_dead_writers_batch(log, "app").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assigned_member_repairs_a_dead_writers_batch_on_kafka() {
    let (log, app) = kafka();
    an_assigned_member_repairs_a_dead_writers_batch(log, &app).await;
}
