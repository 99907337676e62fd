//! The processor stage: computes the pipeline file's `features:` (aggregates such as
//! `orders_30d`) and `joins:` (an order enriched with its customer's tier) with the operators
//! of `kontext-process`, and writes them to a features topic that the store sinks apply as
//! fields of the target entity.
//!
//! Two loops, as Kafka Streams would split the topology at the re-key:
//!
//! 1. **re-key** (group `kontext.<pipeline>.process`): source topics → [`Router`] → for each
//!    normalized update of a feature's `from` entity, one record keyed by the target entity id
//!    into `<pipeline>-features-repartition` (murmur2-partitioned), carrying the input's event
//!    id, event time, origin coordinates and the fields the features read. For a join, updates
//!    of the `with` entity (the table) are keyed by their own id and updates of the `from`
//!    entity (the stream) by their foreign key, so a customer's rows and its orders meet in one
//!    partition, in one order. Stateless, at-least-once: group offsets are committed after the
//!    produce is acknowledged.
//! 2. **tasks** (group `kontext.<pipeline>.process.features`): one task per repartition
//!    partition and feature group or join, with its state in keyspaces of one fjall database,
//!    `<data_dir>/state/<pipeline>/tasks.fjall` (`<name>.<partition>.agg|dedup|join`). Per polled batch: drop records whose
//!    origin offset is at or below the task's high-water mark for that origin partition (the
//!    re-key loop's duplicates), then deduplicate by event id (optional) and aggregate, or
//!    apply table rows and join stream updates in topic order; then (a) produce the outputs to
//!    `<entity topic>.features` and the state changes to the compacted
//!    `<pipeline>-<name>-changelog`, (b) commit each task's state batch, which carries the
//!    repartition offsets, (c) commit the group's offsets. At start the group is rewound to the
//!    state's offsets where it committed past them. With `exactly_once` on Kafka, (a) and (c)
//!    are one transaction and (b) follows it.
//!
//! The protocol and every crash point are in `docs/processing.md`, "Runtime".

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kontext_core::config::{
    EnrichmentKind, FeatureAgg, FeatureConfig, LogConfig, PipelineConfig, RetryPolicy, StateConfig,
    WindowKind,
};
use kontext_core::envelope::{self, format_time, now_ms};
use kontext_core::partitioner::partition_for_key;
use kontext_core::record::{ProduceRecord, Record, TopicPartition};
use kontext_log::{
    ConsumerConfig, GroupMetadata, Log, LogError, Producer, TopicSpec, TransactionalProducer,
};
use kontext_process::codec::{i64_sortable, Reader};
use kontext_process::store::get_through;
use kontext_process::AggValue;
use kontext_process::{
    changelog_topic_name, repair_records, AggFn, Aggregate, AggregateConfig, AggregateUpdate,
    ChangelogRecord, Coords, DedupConfig, DedupDecision, Deduplicate, Emit, EnrichmentJoin, Event,
    FieldPath, FjallStore, JoinConfig, JoinInput, JoinKey, JoinKind, Roll, StateDb, StateDbOptions,
    StateStore, StoreError, TableMode, TableUpdate, Window, WindowSpec, WriteBatch,
};
use kontext_store::Change;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backlog::{self, MAX_BATCH};
use crate::metrics::{PipelineMetrics, ProcessStep};
use crate::normalize::{Outcome, Router};
use crate::retry::Waiter;
use ticks::{tick_of, tick_record, Ticker};

pub use kontext_core::config::{features_topic, FEATURES_SOURCE};
/// `ce_type` of feature records.
pub const FEATURES_TYPE: &str = "kontext.features.updated";

const POLL_TIMEOUT: Duration = Duration::from_millis(200);
/// How often a task with no input of its own in a batch writes it anyway (its offsets, in its
/// store and changelog), so that a restart re-reads at most this much of its partition.
/// Loop 2, "Idle tasks", in processing.md.
const IDLE_WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// "All time" is one tumbling window starting at the epoch, ending in 146 million years.
const ALL_TIME_MS: i64 = 1 << 62;
/// Runtime metadata in each task's store (`0x00` keys are metadata; operators use letters):
/// the high-water origin offset per origin partition, and the output clock.
const HIGH_WATER_PREFIX: &[u8] = b"\x00kh";
const OUTPUT_TIME_KEY: &[u8] = b"\x00kt";
/// Per key of a tumbling, session or hopping feature group: the window its features show
/// (`\x00kw <key>` -> [`Shown`]).
const SHOWN_WINDOW_PREFIX: &[u8] = b"\x00kw";
/// Tumbling and hopping groups: the keys whose shown window may change without an event of
/// their own, filed under the time it may (`\x00kW <time, sortable> <key>`, empty value), so
/// that a quiet key moves on when stream time reaches it ([`roll_shown_windows`]).
const SHOWN_INDEX_PREFIX: &[u8] = b"\x00kW";
/// Where the last pass over `SHOWN_INDEX_PREFIX` stopped (an index key: the entries below it
/// are done and deleted), so that a pass does not walk the tombstones of those before it.
const SHOWN_INDEX_POSITION: &[u8] = b"\x00kX";
/// Local only (never in the changelog): the next offset of the store's changelog partition
/// after the last batch the store committed. Equal to the changelog's high watermark when the
/// store is current; behind it when another instance (or a batch whose commit a crash
/// prevented) wrote more.
pub(crate) const CHANGELOG_END_KEY: &[u8] = b"\x00kc";
/// What a feature group's accumulators were computed as ([`FeatureGroup::definition`]),
/// written with the store's first batch (so also to its changelog) and checked at every sync:
/// stored accumulators are read by position and window starts by the window size, so state of
/// another definition would be read as wrong values.
pub(crate) const DEFINITION_KEY: &[u8] = b"\x00kd";

/// Errors that stop the processor.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// The log failed permanently (transient errors are retried).
    #[error("log: {0}")]
    Log(#[from] LogError),
    /// A state store failed. Retry meaning: restart; the task resumes from its store's offsets.
    #[error("state store: {0}")]
    State(#[from] StoreError),
    /// The features configuration cannot be run (it passed validation, so this is a bug).
    #[error("features: {0}")]
    Config(String),
    /// A feature group's state was computed under another definition (functions, window size)
    /// than the pipeline's: reading it would give wrong values. Retry meaning: none; the
    /// message says how to compute the group again.
    #[error("{0}")]
    Definition(String),
    /// A Kafka transaction of the task loop failed and was aborted (or its outcome is
    /// uncertain). The loop handles it itself: it rejoins the group and recomputes the batch
    /// from the state's offsets; it only surfaces when it happens during shutdown.
    #[error("transaction: {0}")]
    Transaction(LogError),
}

/// The consumer group of the re-key loop.
pub fn process_group(config: &PipelineConfig) -> String {
    format!("kontext.{}.process", config.name)
}

/// The consumer group of the aggregation tasks.
pub fn features_group(config: &PipelineConfig) -> String {
    format!("kontext.{}.process.features", config.name)
}

/// The source topics the re-key loop reads: those of the entities features are computed
/// from, and of both sides of each join.
fn rekey_topics(config: &PipelineConfig, stages: &[Stage]) -> Vec<String> {
    let froms: BTreeSet<&str> = stages
        .iter()
        .flat_map(|stage| match stage {
            Stage::Features(g) => vec![g.from.as_str()],
            Stage::Join(j) => vec![j.from.as_str(), j.with.as_str()],
        })
        .collect();
    let topics: BTreeSet<&str> = config
        .sources
        .values()
        .filter(|s| froms.contains(s.entity.as_str()) && !is_features_source(s))
        .map(|s| s.topic.as_str())
        .collect();
    topics.into_iter().map(str::to_owned).collect()
}

/// The processor's consumer groups with the topics each reads, upstream of the stores: the
/// re-key loop on source topics, then the aggregation tasks on the repartition topic. Records
/// these groups have not committed yet still owe the stores their feature and join outputs,
/// so a store is caught up only when they have no lag either (`/v1/lag` adds them). Empty
/// without features or joins.
pub fn consumer_stages(config: &PipelineConfig) -> Vec<(String, Vec<String>)> {
    let stages = stages(config);
    if stages.is_empty() {
        return Vec::new();
    }
    vec![
        (process_group(config), rekey_topics(config, &stages)),
        (features_group(config), vec![repartition_topic(config)]),
    ]
}

/// The internal topic the re-key loop writes: inputs keyed by the target entity id.
pub fn repartition_topic(config: &PipelineConfig) -> String {
    format!("{}-features-repartition", config.name)
}

/// The topics the processor writes: features topics (as partitioned as their entity topic),
/// the repartition topic, and one compacted changelog per state store.
pub fn topic_specs(config: &PipelineConfig) -> Vec<TopicSpec> {
    if !config.has_processing() {
        return Vec::new();
    }
    let partitions = repartition_partitions(config);
    let mut specs = BTreeMap::new();
    for name in config.features_topics() {
        let p = config.partitions_of(&name);
        specs.insert(name.clone(), TopicSpec::new(name, p));
    }
    let repartition = repartition_topic(config);
    specs.insert(repartition.clone(), TopicSpec::new(repartition, partitions));
    for stage in stages(config) {
        for store in stage.store_names() {
            let name = changelog_topic_name(&config.name, &store);
            let mut spec = TopicSpec::new(name.clone(), partitions);
            spec.compacted = true;
            specs.insert(name, spec);
        }
    }
    specs.into_values().collect()
}

fn repartition_partitions(config: &PipelineConfig) -> i32 {
    config.topics.partitions
}

/// Features computed together: same input, target, key, window and dedup. One aggregation
/// operator (one function per feature) and one state store per repartition partition.
#[derive(Debug, Clone)]
pub struct FeatureGroup {
    /// The first feature's name: names the state directory and the changelog topic.
    pub name: String,
    pub from: String,
    pub entity: String,
    pub key: String,
    /// Feature names, in the operator's function order.
    pub features: Vec<String>,
    /// Canonical input fields the functions read.
    pub fields: BTreeSet<String>,
    /// Tumbling, session or hopping windows: each feature's value is the key's current
    /// window, written as `{"value", "window_start", "window_end"}`.
    pub windowed: bool,
    /// What its state depends on: input, target and key, the functions in order, and the
    /// window size where the state is laid out by it (tumbling windows, hopping panes). Grace,
    /// a session gap, a rolling span and the dedup window can change on existing state; this
    /// cannot.
    pub definition: String,
    aggregate: Aggregate,
    dedup: Option<Deduplicate>,
}

impl FeatureGroup {
    /// The state stores of each task of this group (`<group>`, and `<group>-dedup`).
    pub fn store_names(&self) -> Vec<String> {
        let mut names = vec![self.name.clone()];
        if self.dedup.is_some() {
            names.push(format!("{}-dedup", self.name));
        }
        names
    }
}

/// Groups the pipeline's features into operators. Features only group when everything but the
/// function matches, so a group's windows and dedup are one configuration.
pub fn plan(config: &PipelineConfig) -> Vec<FeatureGroup> {
    type Spec<'a> = (
        &'a str,
        &'a str,
        &'a str,
        WindowKind,
        Duration,
        Option<Duration>,
    );
    let mut groups: BTreeMap<Spec, Vec<(&String, &FeatureConfig)>> = BTreeMap::new();
    for (name, f) in &config.features {
        let spec = (
            f.from.as_str(),
            f.entity.as_str(),
            f.key.as_str(),
            f.window_kind(),
            f.grace_duration(),
            f.dedup_duration(),
        );
        groups.entry(spec).or_default().push((name, f));
    }
    let mut out = Vec::new();
    for ((from, entity, key, window, grace, dedup), members) in groups {
        let functions = members
            .iter()
            .map(|(name, f)| ((*name).clone(), agg_fn(f)))
            .collect();
        let ms = |d: Duration| d.as_millis() as i64;
        let (window, windowed) = match window {
            WindowKind::AllTime => (
                WindowSpec::Tumbling {
                    size_ms: ALL_TIME_MS,
                },
                false,
            ),
            WindowKind::Rolling(w) => (WindowSpec::Sliding { size_ms: ms(w) }, false),
            WindowKind::Tumbling(w) => (WindowSpec::Tumbling { size_ms: ms(w) }, true),
            WindowKind::Session(gap) => (WindowSpec::Session { gap_ms: ms(gap) }, true),
            WindowKind::Hopping { size, advance } => (
                WindowSpec::Hopping {
                    size_ms: ms(size),
                    advance_ms: ms(advance),
                },
                true,
            ),
        };
        let Ok(aggregate) = Aggregate::new(AggregateConfig {
            window,
            grace_ms: ms(grace),
            functions,
            emit: Emit::OnUpdate,
        }) else {
            continue;
        };
        let definition = format!("{from} → {entity} by {key}, {}", aggregate.definition());
        out.push(FeatureGroup {
            name: members[0].0.clone(),
            from: from.into(),
            entity: entity.into(),
            key: key.into(),
            features: members.iter().map(|(n, _)| (*n).clone()).collect(),
            fields: members
                .iter()
                .filter_map(|(_, f)| f.field.clone())
                .collect(),
            windowed,
            definition,
            aggregate,
            dedup: dedup.map(|d| {
                Deduplicate::new(DedupConfig {
                    window_ms: d.as_millis() as i64,
                })
            }),
        });
    }
    out
}

/// A join of the pipeline file: its table holds, per `with` entity id, the merged fields the
/// join copies; its stream is the `from` entity's updates re-keyed by `key`.
#[derive(Debug, Clone)]
pub struct JoinStage {
    /// The join's name: names the state directory and the changelog topic.
    pub name: String,
    pub from: String,
    pub with: String,
    pub key: String,
    /// Output field ← canonical field of `with`.
    pub fields: Vec<(String, String)>,
    op: EnrichmentJoin,
}

impl JoinStage {
    /// The canonical fields of `with` its table keeps.
    fn table_fields(&self) -> BTreeSet<&str> {
        self.fields.iter().map(|(_, f)| f.as_str()).collect()
    }
}

/// One stateful stage of the processor: a feature group or a join.
#[derive(Debug, Clone)]
pub enum Stage {
    Features(FeatureGroup),
    Join(JoinStage),
}

impl Stage {
    /// Names the stage's state directory; repartition records carry it.
    pub fn name(&self) -> &str {
        match self {
            Stage::Features(g) => &g.name,
            Stage::Join(j) => &j.name,
        }
    }

    /// The entity whose features topic gets the stage's outputs.
    pub fn target(&self) -> &str {
        match self {
            Stage::Features(g) => &g.entity,
            Stage::Join(j) => &j.from,
        }
    }

    /// The state stores of each task of this stage (each has a changelog topic).
    pub fn store_names(&self) -> Vec<String> {
        match self {
            Stage::Features(g) => g.store_names(),
            Stage::Join(j) => vec![j.name.clone()],
        }
    }
}

/// Every stage of the pipeline: feature groups (see [`plan`]), then joins.
pub fn stages(config: &PipelineConfig) -> Vec<Stage> {
    let mut out: Vec<Stage> = plan(config).into_iter().map(Stage::Features).collect();
    for (name, join) in &config.joins {
        out.push(Stage::Join(JoinStage {
            name: name.clone(),
            from: join.from.clone(),
            with: join.with.clone(),
            key: join.key.clone(),
            fields: join
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            op: EnrichmentJoin::new(JoinConfig {
                kind: match join.kind {
                    EnrichmentKind::Left => JoinKind::Left,
                    EnrichmentKind::Inner => JoinKind::Inner,
                },
                // The re-key loop keyed the stream by the foreign key already.
                key: JoinKey::RecordKey,
                field: "with".into(),
                table: TableMode::Merge,
            }),
        }));
    }
    out
}

fn agg_fn(f: &FeatureConfig) -> AggFn {
    let path = || FieldPath::new(f.field.as_deref().unwrap_or_default());
    match f.agg {
        FeatureAgg::Count => AggFn::Count,
        FeatureAgg::Sum => AggFn::Sum(path()),
        FeatureAgg::Avg => AggFn::Avg(path()),
        FeatureAgg::Min => AggFn::Min(path()),
        FeatureAgg::Max => AggFn::Max(path()),
        FeatureAgg::Latest => AggFn::Latest(path()),
        FeatureAgg::DistinctCount => AggFn::DistinctCount(path()),
    }
}

/// The processor stage of one pipeline.
pub struct Processor {
    config: PipelineConfig,
    log: Arc<dyn Log>,
    state_dir: PathBuf,
    stages: Vec<Stage>,
    metrics: Arc<PipelineMetrics>,
    /// Cancelled once the aggregation's state has been synced with the changelogs and its
    /// feature definitions checked ([`check_definition`]): the re-key loop waits for it, so
    /// that a refused configuration writes no repartition records (they carry the fields its
    /// functions read, which the previous definition may need).
    state_checked: CancellationToken,
    /// [`IDLE_WRITE_INTERVAL`]; tests change it.
    idle_write_interval: Duration,
}

impl Processor {
    /// A processor for `config`'s features and joins, keeping state under
    /// `<data_dir>/state/`.
    pub fn new(config: &PipelineConfig, data_dir: &Path, log: Arc<dyn Log>) -> Self {
        Self {
            stages: stages(config),
            config: config.clone(),
            log,
            state_dir: data_dir.join("state").join(&config.name),
            metrics: Arc::default(),
            state_checked: CancellationToken::new(),
            idle_write_interval: IDLE_WRITE_INTERVAL,
        }
    }

    /// Counts late and duplicate inputs, unmatched join updates and restored changelog
    /// records into `metrics` (the `kontext_process_*` counters of `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<PipelineMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Runs both loops until `shutdown` is cancelled or one fails permanently. After
    /// `shutdown`, each loop finishes what its topics hold (the aggregation loop after the
    /// re-key loop), for at most [`DRAIN_TIMEOUT`], so that a clean stop leaves no input without
    /// its features.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ProcessorError> {
        if self.stages.is_empty() {
            return Ok(());
        }
        // A producer per loop, as Kafka Streams has one per stream thread: each waits for its
        // batch's acknowledgements, and on one connection the broker would serve the two
        // loops' requests one after the other (BENCHMARKS.md, "A producer per loop").
        let rekey_producer = self.log.dedicated_producer().await?;
        let tasks_producer = match self.config.log.exactly_once() {
            // Its batches go through a transactional producer; this one only repairs a
            // changelog at a restore.
            true => self.log.producer().await?,
            false => self.log.dedicated_producer().await?,
        };
        let (rekey_done, aggregate_done) = (CancellationToken::new(), CancellationToken::new());
        let rekey = async {
            // Not before the aggregation's state is checked (or the aggregation stopped).
            tokio::select! {
                _ = self.state_checked.cancelled() => {}
                _ = aggregate_done.cancelled() => {
                    rekey_done.cancel();
                    return Ok(());
                }
            }
            let result = self
                .rekey(
                    rekey_producer,
                    Drain::new(&shutdown, None, self.config.retry.waiting_policy()),
                )
                .await;
            rekey_done.cancel();
            result
        };
        let aggregate = async {
            let result = self
                .aggregate(
                    tasks_producer,
                    Drain::new(
                        &shutdown,
                        Some(&rekey_done),
                        self.config.retry.waiting_policy(),
                    ),
                )
                .await;
            aggregate_done.cancel();
            result
        };
        tokio::try_join!(rekey, aggregate)?;
        Ok(())
    }

    /// Loop 1: normalize the inputs and re-key them by target entity id.
    async fn rekey(
        &self,
        producer: Arc<dyn Producer>,
        mut drain: Drain<'_>,
    ) -> Result<(), ProcessorError> {
        let shutdown = drain.shutdown;
        let router = Router::new(&self.config);
        let mut groups: Vec<&FeatureGroup> = Vec::new();
        let mut joins: Vec<&JoinStage> = Vec::new();
        for stage in &self.stages {
            match stage {
                Stage::Features(g) => groups.push(g),
                Stage::Join(j) => joins.push(j),
            }
        }
        let group = process_group(&self.config);
        let mut consumer = self
            .log
            .consumer(ConsumerConfig::new(
                group.clone(),
                rekey_topics(&self.config, &self.stages),
            ))
            .await?;
        let repartition = repartition_topic(&self.config);
        let partitions = repartition_partitions(&self.config);
        let mut ticker = Ticker::new(groups.len(), partitions, Instant::now());
        info!(%group, "processor re-key loop started");
        loop {
            let Some(records) = drain.poll(consumer.as_mut()).await? else {
                return Ok(());
            };
            self.record_wait(ProcessStep::RekeyWait, &records);
            let mut out = Vec::new();
            let mut push = |target: String, value: Value| {
                let key = Bytes::from(target.into_bytes());
                let mut r = ProduceRecord::new(
                    repartition.clone(),
                    Some(key.clone()),
                    Some(Bytes::from(value.to_string())),
                );
                let partition = partition_for_key(&key, partitions);
                r.partition = Some(partition);
                out.push(r);
                partition
            };
            for record in &records {
                // A record over the limit is a dead letter of the sinks (`record_too_large`):
                // no store applies it, so no feature may count it either.
                if envelope::check_size(record, self.config.limits.max_record_bytes).is_err() {
                    continue;
                }
                let Outcome::Update(update) = router.process(record) else {
                    continue; // filtered and invalid records are the sinks' business
                };
                if update.provenance.source == FEATURES_SOURCE {
                    continue; // features never feed features: no loops
                }
                let p = &update.provenance;
                let header = |stage: &str| {
                    json!({
                        "g": stage, "id": p.event_id, "src": p.source, "t": p.event_time_ms,
                        "o": [p.topic, p.partition, p.offset],
                    })
                };
                let fields = match &update.change {
                    Change::Upsert(fields) => Some(fields),
                    Change::Delete => None,
                };
                // Table side: the `with` entity's fields the join copies, or its deletion.
                for j in joins.iter().filter(|j| j.with == update.entity_type) {
                    let row = match fields {
                        Some(fields) => {
                            let row: Map<String, Value> = j
                                .table_fields()
                                .into_iter()
                                .filter_map(|f| fields.get(f).map(|v| (f.to_string(), v.clone())))
                                .collect();
                            if row.is_empty() {
                                continue;
                            }
                            Value::Object(row)
                        }
                        None => Value::Null,
                    };
                    let mut value = header(&j.name);
                    value["s"] = json!("t");
                    value["f"] = row;
                    push(update.entity_id.clone(), value);
                }
                let Some(fields) = fields else {
                    continue;
                };
                // Stream side: a `from` update naming its `with` entity.
                for j in joins.iter().filter(|j| j.from == update.entity_type) {
                    let Some(target) = fields.get(&j.key).and_then(id_of) else {
                        continue;
                    };
                    let mut value = header(&j.name);
                    value["s"] = json!("s");
                    value["k"] = json!(update.entity_id);
                    push(target, value);
                }
                for (gi, g) in groups
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| g.from == update.entity_type)
                {
                    let Some(target) = fields.get(&g.key).and_then(id_of) else {
                        continue;
                    };
                    let needed: Map<String, Value> = g
                        .fields
                        .iter()
                        .filter_map(|f| fields.get(f).map(|v| (f.clone(), v.clone())))
                        .collect();
                    let mut value = header(&g.name);
                    value["f"] = Value::Object(needed);
                    let partition = push(target, value);
                    ticker.routed(gi, partition, p.event_time_ms.max(0), now_ms());
                }
            }
            // Partitions the features' inputs left behind learn the newest event time (not
            // while draining: the tasks stop once their input is quiet).
            if !groups.is_empty() && !shutdown.is_cancelled() {
                for (gi, partition, time_ms) in ticker.due(Instant::now()) {
                    out.push(tick_record(
                        &repartition,
                        partition,
                        &groups[gi].name,
                        time_ms,
                    ));
                }
            }
            // (Nothing to send, e.g. an empty poll without ticks: `send` returns at once.)
            let sending = (!out.is_empty()).then(Instant::now);
            if !send(producer.as_ref(), out, shutdown, &drain.policy).await? {
                return Ok(());
            }
            if let Some(start) = sending {
                self.metrics
                    .record_step(ProcessStep::RekeyProduce, start.elapsed());
            }
            if records.is_empty() {
                continue;
            }
            // In the background: the next batch need not wait for it, and a commit a crash
            // loses only re-keys records again, which the tasks drop (their high water).
            if let Err(e) = consumer.commit_in_background(&next_offsets(&records)).await {
                warn!(error = %e, "re-key offset commit failed; the records are re-keyed again and dropped downstream");
            }
        }
    }

    /// Loop 2: the aggregation tasks.
    async fn aggregate(
        &self,
        producer: Arc<dyn Producer>,
        mut drain: Drain<'_>,
    ) -> Result<(), ProcessorError> {
        // Once, before any state is opened or re-keyed: a refused configuration stops here.
        if !self
            .check_group_names(&self.config.retry.waiting_policy(), drain.shutdown)
            .await?
        {
            return Ok(());
        }
        let partitions = repartition_partitions(&self.config);
        let db = open_state_db(
            &self.state_dir.join(STATE_DB_DIR),
            state_db_options(&self.config.state),
        )?;
        let mut tasks: BTreeMap<(usize, i32), Task> = BTreeMap::new();
        for (si, stage) in self.stages.iter().enumerate() {
            for p in 0..partitions {
                tasks.insert((si, p), Task::open(&db, stage, p)?);
            }
            // The layout before one shared database: a directory per stage. Its state is
            // restored from the changelogs below; the old copy only takes disk space.
            let old = self.state_dir.join(stage.name());
            if old.is_dir() {
                info!(dir = %old.display(), "removing task state of an earlier layout; it is restored from the changelogs");
                if let Err(e) = std::fs::remove_dir_all(&old) {
                    warn!(dir = %old.display(), error = %e, "cannot remove the earlier task state");
                }
            }
        }
        let mut failures = Waiter::new(self.config.retry.waiting_policy());
        loop {
            // Created (again) before the state is synced: registering the transactional id
            // aborts a transaction this instance left open, whose records would otherwise hide
            // the rest of the changelogs from the read_committed restore until it times out.
            let txn = if self.config.log.exactly_once() {
                let Some(txn) = self.transactional_producer(drain.shutdown).await? else {
                    return Ok(());
                };
                Some(txn)
            } else {
                None
            };
            let run = self
                .run_tasks(
                    producer.as_ref(),
                    txn.as_deref(),
                    &mut drain,
                    &mut tasks,
                    &mut failures,
                )
                .await;
            match run {
                Err(ProcessorError::Transaction(e)) if !drain.shutdown.is_cancelled() => {
                    self.metrics
                        .process_transactions_aborted
                        .fetch_add(1, Ordering::Relaxed);
                    let delay = failures.next_delay();
                    warn!(error = %e, retry_in = ?delay, "a processor transaction failed and was aborted; rejoining the group to recompute the batch from the state's offsets");
                    tokio::select! {
                        _ = drain.shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(ProcessorError::Transaction(e)) => {
                    warn!(error = %e, "a processor transaction failed during shutdown; its batch is recomputed at the next start");
                    return Ok(());
                }
                other => return other,
            }
        }
    }

    /// The transactional producer of this instance's task loop, retrying while the cluster
    /// is unavailable; `None` on shutdown.
    async fn transactional_producer(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Arc<dyn TransactionalProducer>>, ProcessorError> {
        let id = self.transactional_id()?;
        let policy = self.config.retry.waiting_policy();
        let txn = retry_transient(
            "registering the transactional producer",
            &policy,
            shutdown,
            || self.log.transactional_producer(&id),
        )
        .await?;
        if txn.is_some() {
            info!(transactional_id = %id, "processor tasks commit in Kafka transactions (exactly_once)");
        }
        Ok(txn)
    }

    /// The task loop's `transactional.id` ([`instance_transactional_id`]); with static
    /// membership it is `<group>.<group.instance.id>`.
    fn transactional_id(&self) -> Result<String, ProcessorError> {
        let group = features_group(&self.config);
        if let LogConfig::Kafka { properties, .. } = &self.config.log {
            if let Some(instance) = properties.get("group.instance.id") {
                return Ok(format!("{group}.{instance}"));
            }
        }
        instance_transactional_id(&group, &self.state_dir)
    }

    /// Loop 2 after the tasks are open: bring their state up to the changelogs, rewind the
    /// group to the state, then process batches until shutdown. With `txn`, each batch's
    /// outputs, changelog records and group offsets are one transaction.
    async fn run_tasks(
        &self,
        producer: &dyn Producer,
        txn: Option<&dyn TransactionalProducer>,
        drain: &mut Drain<'_>,
        tasks: &mut BTreeMap<(usize, i32), Task>,
        failures: &mut Waiter,
    ) -> Result<(), ProcessorError> {
        let shutdown = drain.shutdown;
        let repartition = repartition_topic(&self.config);
        let partitions = repartition_partitions(&self.config);
        let group = features_group(&self.config);
        let all: BTreeSet<i32> = (0..partitions).collect();
        // The group's offsets before the changelogs (see `committed_before_sync`).
        let policy = self.config.retry.waiting_policy();
        let Some(committed) =
            committed_before_sync(self.log.as_ref(), &group, &repartition, &policy, shutdown)
                .await?
        else {
            return Ok(()); // shutdown while waiting for the log: consume nothing
        };
        // Before joining the group, every partition: another instance may own some and be
        // writing their changelogs, so nothing is repaired (`Ownership::Maybe`).
        if !self
            .sync_with_changelogs(producer, tasks, &all, Ownership::Maybe, shutdown)
            .await?
        {
            return Ok(()); // shutdown during the restore: consume nothing
        }
        self.state_checked.cancel();
        if !self
            .rewind(&group, &repartition, tasks, &committed, shutdown)
            .await?
        {
            return Ok(()); // shutdown while waiting for a busy group: consume nothing
        }
        let mut consumer = self
            .log
            .consumer(
                ConsumerConfig::new(group.clone(), vec![repartition.clone()])
                    .transactional(txn.is_some()),
            )
            .await?;
        drain.new_consumer();
        let feature_partitions: BTreeMap<&str, (String, i32)> = self
            .stages
            .iter()
            .filter_map(|stage| {
                let e = self.config.entities.get(stage.target())?;
                let p = self
                    .config
                    .topic_settings(&e.topic)
                    .partitions
                    .unwrap_or(self.config.topics.partitions);
                Some((stage.target(), (features_topic(&e.topic), p)))
            })
            .collect();
        let by_name: BTreeMap<&str, usize> = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, stage)| (stage.name(), i))
            .collect();
        info!(%group, tasks = tasks.len(), "processor aggregation tasks started");
        let mut owned: BTreeSet<i32> = BTreeSet::new();
        // Each task's last written batch ("Idle tasks").
        let mut written: BTreeMap<(usize, i32), Written> = BTreeMap::new();
        // Tasks that skipped batches since their last write, with the end of the last one.
        let mut behind: BTreeMap<(usize, i32), i64> = BTreeMap::new();
        loop {
            let Some(records) = drain.poll(consumer.as_mut()).await? else {
                return Ok(());
            };
            let new = newly_assigned(consumer.as_ref(), &repartition, &mut owned);
            if !new.is_empty() {
                info!(partitions = ?new, "repartition partitions assigned; syncing their state with the changelogs");
                if !self
                    .sync_with_changelogs(producer, tasks, &new, Ownership::Assigned, shutdown)
                    .await?
                {
                    return Ok(());
                }
                // Their state is the changelogs' now: each task writes its next batch.
                written.retain(|&(_, p), _| !new.contains(&p));
            }
            // Only the partitions this member still holds, as it held them before.
            behind.retain(|&(_, p), _| owned.contains(&p) && !new.contains(&p));
            // Per partition, the next offset the batch covers.
            let mut next: BTreeMap<i32, i64> = BTreeMap::new();
            let now = Instant::now();
            if records.is_empty() {
                // Quiet: the tasks behind write their skipped batches once due, so the group's
                // offsets reach what was processed (lag returns to zero). (Not at the stop: it
                // may find the log unreachable, and a restart resumes at the tasks' offsets.)
                for (&(si, p), &end) in &behind {
                    let due = written
                        .get(&(si, p))
                        .is_none_or(|last| now.duration_since(last.at) >= self.idle_write_interval);
                    if due {
                        next.insert(p, end);
                    }
                }
                if next.is_empty() {
                    continue;
                }
            } else {
                self.record_wait(ProcessStep::TasksWait, &records);
            }
            let processing = Instant::now();
            // Per (group, partition): the events.
            let mut inputs: BTreeMap<(usize, i32), Vec<Inbound>> = BTreeMap::new();
            // Records of a group no longer in the pipeline (renamed or removed; the rewind
            // of a new group's empty state re-reads them all), counted once per batch.
            let mut unknown: BTreeMap<String, (u64, String)> = BTreeMap::new();
            for record in &records {
                next.insert(record.partition, record.offset + 1);
                // A tick of a feature group moves its stream time ([`ticks`]).
                if let Some((name, time_ms)) = tick_of(record) {
                    if let Some(&gi) = by_name.get(name.as_str()) {
                        inputs
                            .entry((gi, record.partition))
                            .or_default()
                            .push(Inbound::tick(record, time_ms));
                    }
                    continue;
                }
                match Inbound::decode(record) {
                    Some((name, inbound)) => match by_name.get(name.as_str()) {
                        Some(&gi) => inputs
                            .entry((gi, record.partition))
                            .or_default()
                            .push(inbound),
                        None => {
                            let e = unknown
                                .entry(name)
                                .or_insert_with(|| (0, record.coordinates().to_string()));
                            e.0 += 1;
                        }
                    },
                    None => {
                        warn!(at = %record.coordinates(), "undecodable repartition record; skipped")
                    }
                }
            }
            for (stage, (records, first)) in unknown {
                warn!(%stage, records, %first, "repartition records of a feature group or join the pipeline no longer has; skipped");
            }
            let mut outputs = Vec::new();
            // Changelog records by store index within a task (phase), with the commit each
            // record belongs to.
            let mut changelogs: Vec<Vec<(usize, ProduceRecord)>> = Vec::new();
            let mut commits: Vec<((usize, i32), Pending)> = Vec::new();
            for (&(si, p), task) in tasks.iter() {
                let Some(&end) = next.get(&p) else { continue };
                if records.is_empty() && !behind.contains_key(&(si, p)) {
                    continue; // a quiet poll writes the tasks behind; this one is current
                }
                let events = inputs.remove(&(si, p)).unwrap_or_default();
                // Only other stages' records: the task would write its offsets and nothing
                // else. It does so once per interval, and in every batch while draining.
                if let Some(last) = written.get(&(si, p)) {
                    if events.is_empty()
                        && !shutdown.is_cancelled()
                        && !last.more_rolls
                        && now.duration_since(last.at) < self.idle_write_interval
                    {
                        behind.insert((si, p), end);
                        continue;
                    }
                }
                behind.remove(&(si, p));
                let stage = &self.stages[si];
                let tp = TopicPartition::new(repartition.as_str(), p);
                let pending = task.process(stage, &tp, end, events)?;
                written.insert(
                    (si, p),
                    Written {
                        at: now,
                        end,
                        more_rolls: pending.more_rolls,
                    },
                );
                let (topic, fparts) = &feature_partitions[stage.target()];
                for output in &pending.outputs {
                    outputs.push(feature_record(topic, *fparts, stage.name(), output));
                }
                for (phase, (store, records)) in pending.changelogs().into_iter().enumerate() {
                    if changelogs.len() <= phase {
                        changelogs.push(Vec::new());
                    }
                    let topic = changelog_topic_name(&self.config.name, store);
                    for r in records {
                        let mut pr = ProduceRecord::new(topic.clone(), Some(r.key), r.value);
                        pr.partition = Some(p);
                        changelogs[phase].push((commits.len(), pr));
                    }
                }
                commits.push(((si, p), pending));
            }
            // The group never passes a task's offsets: each partition is committed at its
            // slowest task (the batch's end, or the last write of a task behind). A restart then
            // resumes where every task has its state, and needs no rewind (which waits for an
            // empty group).
            let offsets: Vec<(TopicPartition, i64)> = next
                .into_iter()
                .map(|(p, n)| {
                    let at = behind
                        .keys()
                        .filter(|&&(_, q)| q == p)
                        .filter_map(|id| written.get(id).map(|last| last.end))
                        .fold(n, i64::min);
                    (TopicPartition::new(repartition.as_str(), p), at)
                })
                .collect();
            let m = &self.metrics;
            m.record_step(ProcessStep::TasksProcess, processing.elapsed());
            if let Some(txn) = txn {
                let sending = Instant::now();
                // One transaction: outputs, changelogs and offsets are visible together or not
                // at all, so no phases are needed. The state commits after it (a crash in
                // between: the store restores the batch from its changelog at start).
                let member = consumer.group_metadata();
                let sent = send_transaction(
                    txn,
                    member,
                    outputs,
                    changelogs,
                    &offsets,
                    |owner, phase, offset| note_changelog_end(&mut commits, owner, phase, offset),
                )
                .await;
                if let Err(e) = sent {
                    if let Err(abort) = txn.abort().await {
                        warn!(error = %abort, "aborting the failed transaction failed too; a new producer with the same transactional id will fence it");
                    }
                    return Err(ProcessorError::Transaction(e));
                }
                m.record_step(ProcessStep::TasksTransaction, sending.elapsed());
                *failures = Waiter::new(drain.policy);
            } else {
                // Outputs, then each store's changelog (a task's first store before its
                // second), each acknowledged before the next, and all before any state records
                // the offsets: a complete changelog batch implies its outputs and its task's
                // earlier stores' batches are in the log, so restoring it never gets ahead of
                // them.
                let sending = Instant::now();
                if !send(producer, outputs, shutdown, &drain.policy).await? {
                    return Ok(());
                }
                m.record_step(ProcessStep::TasksOutputs, sending.elapsed());
                let sending = Instant::now();
                for (phase, records) in changelogs.into_iter().enumerate() {
                    let (owners, records): (Vec<usize>, Vec<ProduceRecord>) =
                        records.into_iter().unzip();
                    let Some((positions, retried)) =
                        send_changelog(producer, records, shutdown, &drain.policy).await?
                    else {
                        return Ok(());
                    };
                    for (owner, (first, last)) in changelog_spans(owners, positions) {
                        let id = commits[owner].0;
                        let store = tasks.get(&id).and_then(|t| t.stores().get(phase).copied());
                        if continues_changelog(store, id.1, first, retried)? {
                            note_changelog_end(&mut commits, owner, phase, last);
                        }
                    }
                }
                m.record_step(ProcessStep::TasksChangelogs, sending.elapsed());
            }
            let committing = Instant::now();
            for (id, pending) in commits {
                if let Some(task) = tasks.get_mut(&id) {
                    m.process_dropped_late
                        .fetch_add(pending.late, Ordering::Relaxed);
                    m.process_duplicates
                        .fetch_add(pending.duplicates, Ordering::Relaxed);
                    m.process_join_unmatched
                        .fetch_add(pending.unmatched, Ordering::Relaxed);
                    task.commit(pending)?;
                }
            }
            m.record_step(ProcessStep::TasksStateCommit, committing.elapsed());
            if txn.is_none() {
                // In the background: the stores hold the offsets, and rewind the group to them
                // at start, so a commit a crash loses costs nothing but re-delivery.
                if let Err(e) = consumer.commit_in_background(&offsets).await {
                    warn!(error = %e, "feature offset commit failed; the state skips what is re-delivered");
                }
            }
        }
    }

    /// Records how long the oldest of `records` waited since its log timestamp (none for an
    /// empty poll).
    fn record_wait(&self, step: ProcessStep, records: &[Record]) {
        if let Some(oldest) = records.iter().map(|r| r.timestamp_ms).min() {
            self.metrics.process_steps[step as usize].record_ms(now_ms() - oldest);
        }
    }

    /// Brings the stores of the tasks of `partitions` up to their changelogs
    /// ([`sync_stores_with_changelogs`]); `false` when `shutdown` interrupted it.
    async fn sync_with_changelogs(
        &self,
        producer: &dyn Producer,
        tasks: &mut BTreeMap<(usize, i32), Task>,
        partitions: &BTreeSet<i32>,
        ownership: Ownership,
        shutdown: &CancellationToken,
    ) -> Result<bool, ProcessorError> {
        let restore = Restore {
            ownership,
            shutdown,
            log: self.log.as_ref(),
            producer,
            app: &self.config.name,
            exactly_once: self.config.log.exactly_once(),
            policy: self.config.retry.waiting_policy(),
            metrics: &self.metrics,
        };
        let stores = tasks
            .iter_mut()
            .filter(|((_, p), _)| partitions.contains(p))
            .flat_map(|(&(_, p), task)| task.stores_mut().into_iter().map(move |s| (p, s)))
            .collect();
        if !sync_stores_with_changelogs(&restore, stores).await? {
            return Ok(false);
        }
        for (&(si, p), task) in tasks.iter() {
            if let (Task::Features { agg, .. }, Stage::Features(group)) = (task, &self.stages[si]) {
                if partitions.contains(&p) {
                    check_definition(group, agg, p)?;
                }
            }
        }
        Ok(true)
    }

    /// Refuses a group renamed by a feature added in front of it ([`moved_features`]);
    /// `Ok(false)`: shutdown came first.
    async fn check_group_names(
        &self,
        policy: &RetryPolicy,
        shutdown: &CancellationToken,
    ) -> Result<bool, ProcessorError> {
        let Some(topics) = retry_transient("listing the log's topics", policy, shutdown, || {
            self.log.list_topics()
        })
        .await?
        else {
            return Ok(false);
        };
        for (group, feature, old, own) in moved_features(&self.config.name, &self.stages, &topics) {
            let mut holds = [false, false];
            for (i, topic) in [&old, &own].into_iter().enumerate() {
                let described =
                    retry_transient("describing a changelog topic", policy, shutdown, || async {
                        match self.log.describe_topic(topic).await {
                            Ok(d) => Ok(Some(d)),
                            Err(LogError::UnknownTopic(_)) => Ok(None),
                            Err(e) => Err(e),
                        }
                    })
                    .await?;
                let Some(described) = described else {
                    return Ok(false);
                };
                holds[i] =
                    described.is_some_and(|d| d.partitions.iter().any(|p| p.high_watermark > 0));
            }
            if holds == [true, false] {
                return Err(ProcessorError::Definition(format!(
                    "feature `{feature}` has state in the feature group `{feature}` (changelog \
                     topic `{old}`), but the pipeline now puts it in the group `{}` ({}), named \
                     after its first feature: the state cannot move, and the group's features \
                     would start from zero. Restore the previous features, or start the group \
                     afresh on purpose: rename `{feature}` as well, so that no feature is \
                     taken for one that has state",
                    group.name,
                    group.features.join(", "),
                )));
            }
        }
        Ok(true)
    }

    /// The state's offsets are the truth: where the group had committed (`committed`) past the
    /// slowest store of a partition, rewind it there. `Ok(false)`: shutdown came first.
    async fn rewind(
        &self,
        group: &str,
        topic: &str,
        tasks: &BTreeMap<(usize, i32), Task>,
        committed: &[(i32, Option<i64>)],
        shutdown: &CancellationToken,
    ) -> Result<bool, ProcessorError> {
        let mut resume: BTreeMap<i32, i64> = BTreeMap::new();
        for (&(_, p), task) in tasks {
            let at = task.resume_offset(topic, p)?;
            let e = resume.entry(p).or_insert(at);
            *e = (*e).min(at);
        }
        rewind_to_state(
            self.log.as_ref(),
            group,
            topic,
            &resume,
            committed,
            self.config.retry.waiting_policy(),
            shutdown,
        )
        .await
    }
}

/// The offsets `group` has committed on `topic`, read **before** the stores are synced with
/// their changelogs at start. A task produces a batch's changelog before the group commits
/// the batch's offsets, so a sync that follows this read restores at least up to these offsets
/// on every partition, also those another live instance is processing meanwhile. Read after
/// the sync, they could already include that instance's next batches: the state would look
/// behind, and the rewind would wait for a group that has an active member (60 s) and fail.
/// `None`: `shutdown` came while waiting for the log.
pub(crate) async fn committed_before_sync(
    log: &dyn Log,
    group: &str,
    topic: &str,
    policy: &RetryPolicy,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<(i32, Option<i64>)>>, ProcessorError> {
    // Right after a broker (re)start or for a new group, the coordinator lookup fails
    // transiently (`NotCoordinator`): wait it out like any other transient error.
    retry_transient(
        "fetching the group's committed offsets",
        policy,
        shutdown,
        || log.committed_offsets(group, topic),
    )
    .await
}

/// Rewinds `group` on `topic` to `resume` (the state's next offset per partition, 0 where
/// absent) wherever it had committed (`committed`, [`committed_before_sync`]) past it: the
/// state's offsets are the truth. After a sync this only happens when the changelog lacks what
/// the group committed (offsets that landed without their records, a recreated changelog).
/// (The aggregation loop commits no partition past its slowest task: "Idle tasks".)
/// `Ok(false)`: `shutdown` came while waiting for a busy group (consume nothing).
pub(crate) async fn rewind_to_state(
    log: &dyn Log,
    group: &str,
    topic: &str,
    resume: &BTreeMap<i32, i64>,
    committed: &[(i32, Option<i64>)],
    policy: RetryPolicy,
    shutdown: &CancellationToken,
) -> Result<bool, ProcessorError> {
    let mut rewind = Vec::new();
    for &(p, committed) in committed {
        let stored = resume.get(&p).copied().unwrap_or(0);
        if committed.is_some_and(|c| c > stored) {
            rewind.push((TopicPartition::new(topic, p), stored));
        }
    }
    if rewind.is_empty() {
        return Ok(true);
    }
    warn!(%group, %topic, partitions = rewind.len(), "the group committed past the state; rewinding it to the state's offsets");
    Ok(crate::retry::rewind_group(log, group, &rewind, policy, shutdown).await?)
}

/// The partitions of `topic` this member just got (a rebalance on Kafka; all of them on the
/// first poll), updating `owned`. Another instance may have processed them meanwhile, so their
/// state is brought up to the changelogs before any record of theirs is processed.
pub(crate) fn newly_assigned(
    consumer: &dyn kontext_log::Consumer,
    topic: &str,
    owned: &mut BTreeSet<i32>,
) -> BTreeSet<i32> {
    let assigned: BTreeSet<i32> = consumer
        .assignment()
        .into_iter()
        .filter(|tp| *tp.topic == *topic)
        .map(|tp| tp.partition)
        .collect();
    let new = assigned.difference(owned).copied().collect();
    *owned = assigned;
    new
}

/// A `transactional.id` for a task loop of `group`: stable across restarts of this instance, so
/// that a restart fences its predecessor and aborts the transaction it left open, and distinct
/// between instances: `<group>.<random>`, the random part kept in
/// `<state_dir>/transactional-id` (one per state directory, shared by its loops; the file
/// holds the first id made, `<first group>.<random>`, the format earlier versions wrote).
pub(crate) fn instance_transactional_id(
    group: &str,
    state_dir: &Path,
) -> Result<String, ProcessorError> {
    let path = state_dir.join("transactional-id");
    let io = |e: std::io::Error| {
        ProcessorError::State(StoreError::Engine {
            store: path.display().to_string(),
            source: Box::new(e),
        })
    };
    let stored = match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Some(id.trim().to_string()),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e)),
    };
    if let Some(stored) = stored {
        let random = stored.rsplit('.').next().unwrap_or(&stored);
        return Ok(format!("{group}.{random}"));
    }
    use std::hash::{BuildHasher, Hasher};
    // std's RandomState is seeded from the OS per process: random enough for a name.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    // Written as the first id made from it, as earlier versions wrote (and read) the file.
    let id = format!("{group}.{random:016x}");
    std::fs::create_dir_all(state_dir).map_err(io)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &id).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(id)
}

/// Whether the partitions being restored are this member's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ownership {
    /// The group assigned them: an incomplete batch at the end of a changelog is a dead
    /// writer's (the previous owner's, or this instance's before a crash), and is repaired.
    Assigned,
    /// Not known (at start, before joining the group): another live instance may own them and
    /// be half-way through producing a batch. An incomplete batch is left to its writer; the
    /// store records the changelog end before it, so it is read again at the assignment.
    Maybe,
}

/// What restoring task stores from their changelogs needs.
pub(crate) struct Restore<'a> {
    /// Whether an incomplete batch at a changelog's end may be repaired.
    pub ownership: Ownership,
    pub log: &'a dyn Log,
    /// Writes the repair of a changelog that ends in an incomplete batch.
    pub producer: &'a dyn Producer,
    /// The application id: the prefix of changelog topic names.
    pub app: &'a str,
    /// Whether changelogs are written in Kafka transactions (they end one past a batch).
    pub exactly_once: bool,
    pub policy: RetryPolicy,
    pub metrics: &'a PipelineMetrics,
    /// Ends the waits for an unavailable log (the restore then reports it did not finish).
    pub shutdown: &'a CancellationToken,
}

/// Brings every store in `stores` (with its partition) up to its changelog partition, so that
/// a partition processed by another instance (or by this one before its local state was
/// lost) resumes with the state that instance committed:
///
/// - the store's recorded changelog end equals the high watermark: current, nothing to do;
/// - it is behind (and not below the low watermark): the records after it are restored,
///   whole batches only;
/// - no recorded end (a new or lost state directory) or below the low watermark: the
///   store is cleared and restored from the whole changelog.
///
/// Records after the last complete batch (a producer that died half-way through one) are
/// overwritten in the changelog with the store's values ([`repair_records`]), so the
/// changelog again restores exactly to this state, if the partitions are this member's
/// ([`Ownership::Assigned`]). Otherwise they are left alone: the store's recorded end stays
/// before them, and a later sync reads them again, complete by then or repaired by the owner.
///
/// Transient log errors are waited out; `false` when `restore.shutdown` came first (the stores
/// are then not all current: the caller must not process).
pub(crate) async fn sync_stores_with_changelogs(
    restore: &Restore<'_>,
    stores: Vec<(i32, &mut FjallStore)>,
) -> Result<bool, ProcessorError> {
    let mut watermarks: BTreeMap<String, BTreeMap<i32, (i64, i64)>> = BTreeMap::new();
    let exactly_once = restore.exactly_once;
    for (p, store) in stores {
        let topic = changelog_topic_name(restore.app, store.name());
        if !watermarks.contains_key(&topic) {
            let described = retry_transient(
                "reading a changelog's watermarks",
                &restore.policy,
                restore.shutdown,
                || restore.log.describe_topic(&topic),
            )
            .await?;
            let Some(d) = described else {
                return Ok(false);
            };
            let marks = d
                .partitions
                .iter()
                .map(|w| (w.partition, (w.low_watermark, w.high_watermark)))
                .collect();
            watermarks.insert(topic.clone(), marks);
        }
        let Some(&(low, high)) = watermarks[&topic].get(&p) else {
            continue;
        };
        let recorded = read_i64(store, CHANGELOG_END_KEY)?;
        let from = match recorded {
            Some(end) if end == high => continue,
            // Under exactly_once the recorded end is where the batch's transaction
            // marker went: the changelog ends one past it.
            Some(end) if exactly_once && end + 1 == high => continue,
            Some(end) if end > high => {
                warn!(%topic, partition = p, recorded = end, high, "the changelog ends before what the local state recorded (was it recreated?): keeping the local state; a restore elsewhere would miss what the changelog lacks");
                record_changelog_end(store, high)?;
                continue;
            }
            Some(end) if end >= low => end,
            _ if low == high && recorded.is_none() => {
                // An empty changelog: nothing to restore (a new pipeline).
                record_changelog_end(store, high)?;
                continue;
            }
            _ => {
                store.clear()?;
                low
            }
        };
        let read = retry_transient(
            "reading a changelog",
            &restore.policy,
            restore.shutdown,
            || restore.log.read_partition(&topic, p, from, high),
        )
        .await?;
        let Some(records) = read else {
            return Ok(false);
        };
        let read = records.len();
        // Offsets of the records restored (those with a key), to find where a tail starts.
        let keyed: Vec<i64> = records
            .iter()
            .filter(|r| r.key.is_some())
            .map(|r| r.offset)
            .collect();
        let mut changelog = records.into_iter().filter_map(|r| {
            Some(ChangelogRecord {
                key: r.key?,
                value: r.value,
            })
        });
        let tail = store.restore(&mut changelog)?;
        restore
            .metrics
            .process_restored_records
            .fetch_add((read - tail.len()) as u64, Ordering::Relaxed);
        let mut end = high;
        if !tail.is_empty() && restore.ownership == Ownership::Maybe {
            end = keyed[keyed.len() - tail.len()];
            info!(%topic, partition = p, from = end, records = tail.len(), "the changelog ends in an incomplete batch; left to its writer until this member is assigned the partition");
        } else if !tail.is_empty() {
            let repair = repair_records(store, &tail)?;
            let records = repair
                .into_iter()
                .map(|r| {
                    let mut pr = ProduceRecord::new(topic.clone(), Some(r.key), r.value);
                    pr.partition = Some(p);
                    pr
                })
                .collect();
            let never = CancellationToken::new();
            if let Some(positions) =
                send_positions(restore.producer, records, &never, &restore.policy).await?
            {
                end = positions.last().map_or(high, |pos| pos.offset + 1);
            }
            warn!(%topic, partition = p, records = tail.len(), "repaired an incomplete batch at the end of the changelog");
        }
        record_changelog_end(store, end)?;
        info!(%topic, partition = p, from, to = high, records = read, "state restored from the changelog");
    }
    Ok(true)
}

/// Waits until every store has applied every record now in `topics` (their high watermarks,
/// read once at the call), polling every 50 ms; gives up after `timeout`. Used at shutdown,
/// after the processor stopped and before the store sinks stop, so that a store holds every
/// feature record the processor wrote. Returns whether the stores caught up.
///
/// Under Kafka transactions a partition ends with a commit marker (and maybe aborted records)
/// that no reader ever receives, so the stores' offsets stop short of the high watermark: a
/// partition whose offset has not moved for `STALLED` and is at most [`kontext_log::MARKER_GAP`] offsets
/// short counts as caught up when reading from it to the high watermark (`read_committed`)
/// returns nothing. The bound keeps the check cheap while the sinks still have real work (a
/// check over a long range on every stall starved the sinks of a debug build); a partition
/// ending in a large aborted transaction waits out `timeout` as before.
pub async fn wait_until_applied(
    log: &dyn Log,
    stores: &[Arc<dyn kontext_store::ContextStore>],
    topics: &[String],
    timeout: Duration,
) -> bool {
    const STALLED: Duration = Duration::from_millis(500);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut target: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for topic in topics {
        match log.describe_topic(topic).await {
            Ok(d) => target.extend(
                d.partitions
                    .iter()
                    .filter(|p| p.high_watermark > 0)
                    .map(|p| ((topic.clone(), p.partition), p.high_watermark)),
            ),
            Err(e) => {
                warn!(%topic, error = %e, "cannot read the high watermarks to drain");
                return false;
            }
        }
    }
    // Per partition: the slowest store's offset, and since when it has not moved.
    let mut seen: BTreeMap<(String, i32), (i64, tokio::time::Instant)> = BTreeMap::new();
    loop {
        let mut slowest: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for store in stores {
            let applied = store.applied_offsets().await.unwrap_or_default();
            for tp in target.keys() {
                let at = applied.get(tp).copied().unwrap_or(0);
                let e = slowest.entry(tp.clone()).or_insert(at);
                *e = (*e).min(at);
            }
        }
        let now = tokio::time::Instant::now();
        let mut behind = false;
        for (tp, high) in target.iter_mut() {
            let at = slowest.get(tp).copied().unwrap_or(0);
            if at >= *high {
                continue;
            }
            let since = match seen.get(tp) {
                Some(&(before, since)) if before == at => since,
                _ => {
                    seen.insert(tp.clone(), (at, now));
                    now
                }
            };
            if *high - at <= kontext_log::MARKER_GAP && now.duration_since(since) >= STALLED {
                match log.read_partition(&tp.0, tp.1, at, *high).await {
                    Ok(records) if records.is_empty() => {
                        *high = at;
                        continue;
                    }
                    _ => {
                        seen.insert(tp.clone(), (at, now));
                    }
                }
            }
            behind = true;
        }
        if !behind {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                ?timeout,
                "the store sinks did not apply every feature record before stopping"
            );
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One task: the state of a feature group or a join for one repartition partition.
enum Task {
    Features {
        agg: FjallStore,
        dedup: Option<FjallStore>,
    },
    Join {
        store: FjallStore,
    },
}

/// One output: fields of one target entity.
#[derive(Debug)]
struct Output {
    key: Bytes,
    fields: Map<String, Value>,
    time_ms: i64,
    /// The repartition coordinates of the input that produced it (names the record).
    version: Coords,
    /// A quiet key moved on to a later window ([`roll_shown_windows`]): one input rolls many
    /// keys, so the record's id also names the key.
    rolled: bool,
}

/// A task's batch before it is committed.
struct Pending {
    /// State batches by store name, in commit order.
    stores: Vec<(String, WriteBatch)>,
    outputs: Vec<Output>,
    /// Inputs dropped as late, as duplicates; join updates without a table row.
    late: u64,
    duplicates: u64,
    unmatched: u64,
    /// Quiet keys' rolls were cut at [`MAX_ROLLS_PER_BATCH`]: the rest are due in the task's
    /// next batch, so the task writes it even without inputs ("Idle tasks").
    more_rolls: bool,
}

impl Pending {
    fn changelogs(&self) -> Vec<(&str, Vec<ChangelogRecord>)> {
        self.stores
            .iter()
            .map(|(name, batch)| (name.as_str(), batch.changelog()))
            .collect()
    }
}

/// A task's last written batch: when, its end offset, and whether it left rolls due
/// ([`Pending::more_rolls`]).
struct Written {
    at: Instant,
    end: i64,
    more_rolls: bool,
}

/// Which input of a join a repartition record is.
#[derive(Debug, Clone, PartialEq)]
enum JoinSide {
    /// A feature input (not a join).
    None,
    /// A row of the table (`None`: the entity was deleted).
    Table(Option<Value>),
    /// An update of the stream entity with this id.
    Stream(String),
}

/// A repartition record, decoded.
struct Inbound {
    event: Event,
    origin: TopicPartition,
    origin_offset: i64,
    side: JoinSide,
}

impl Inbound {
    /// The tick `record` is ([`ticks`]): its own coordinates stand for its origin, which the
    /// high-water filter does not look at for ticks.
    fn tick(record: &Record, time_ms: i64) -> Inbound {
        Inbound {
            event: Event::tick(
                time_ms,
                Coords::new(record.topic.clone(), record.partition, record.offset),
            ),
            origin: record.topic_partition(),
            origin_offset: record.offset,
            side: JoinSide::None,
        }
    }

    fn decode(record: &Record) -> Option<(String, Inbound)> {
        let value: Value = serde_json::from_slice(record.value.as_deref()?).ok()?;
        let group = value.get("g")?.as_str()?.to_string();
        let origin = value.get("o")?.as_array()?;
        let (topic, partition, offset) = (
            origin.first()?.as_str()?,
            origin.get(1)?.as_i64()?,
            origin.get(2)?.as_i64()?,
        );
        let fields = value.get("f").cloned().unwrap_or(Value::Null);
        let side = match value.get("s").and_then(Value::as_str) {
            None => JoinSide::None,
            Some("t") => JoinSide::Table((!fields.is_null()).then(|| fields.clone())),
            Some("s") => JoinSide::Stream(value.get("k")?.as_str()?.to_string()),
            Some(_) => return None,
        };
        // CloudEvents ids are unique per source: the id dedup compares is the source's
        // (length-prefixed) and the event's. Records re-keyed before "src" existed carry the
        // id alone.
        let id = value.get("id")?.as_str()?;
        let id = match value.get("src").and_then(Value::as_str) {
            Some(source) => format!("{}:{source}{id}", source.len()),
            None => id.to_string(),
        };
        let event = Event {
            key: record.key.clone()?,
            id: Bytes::from(id),
            time_ms: value.get("t")?.as_i64()?.max(0),
            coords: Coords::new(record.topic.clone(), record.partition, record.offset),
            value: fields,
        };
        Some((
            group,
            Inbound {
                event,
                origin: TopicPartition::new(topic, partition as i32),
                origin_offset: offset,
                side,
            },
        ))
    }
}

impl Task {
    /// Opens the task's stores: keyspaces `<stage>.<partition>.agg|dedup|join` of `db`.
    fn open(db: &StateDb, stage: &Stage, partition: i32) -> Result<Self, StoreError> {
        let names = stage.store_names();
        let open = |role: &str, name: &str| {
            let keyspace = format!("{}.{partition}.{role}", stage.name());
            FjallStore::open_in(db, &keyspace, name, Default::default())
        };
        Ok(match stage {
            Stage::Features(_) => {
                let agg = open("agg", &names[0])?;
                let dedup = match names.get(1) {
                    Some(name) => {
                        let mut store = open("dedup", name)?;
                        Deduplicate::prepare_store(&mut store);
                        Some(store)
                    }
                    None => None,
                };
                Task::Features { agg, dedup }
            }
            Stage::Join(_) => Task::Join {
                store: open("join", &names[0])?,
            },
        })
    }

    fn stores(&self) -> Vec<&FjallStore> {
        match self {
            Task::Features { agg, dedup } => std::iter::once(agg).chain(dedup).collect(),
            Task::Join { store } => vec![store],
        }
    }

    fn stores_mut(&mut self) -> Vec<&mut FjallStore> {
        match self {
            Task::Features { agg, dedup } => std::iter::once(agg).chain(dedup).collect(),
            Task::Join { store } => vec![store],
        }
    }

    /// Where this task resumes on `topic`/`partition`: the smallest of its stores' offsets.
    fn resume_offset(&self, topic: &str, partition: i32) -> Result<i64, StoreError> {
        let tp = TopicPartition::new(topic, partition);
        let mut at = i64::MAX;
        for store in self.stores() {
            at = at.min(store.offsets()?.get(&tp).copied().unwrap_or(0));
        }
        Ok(at)
    }

    /// Runs the stage's operators over one partition's share of a batch; `end` is the next
    /// offset the batch covers on `tp` (recorded even when no event of this stage was in it).
    fn process(
        &self,
        stage: &Stage,
        tp: &TopicPartition,
        end: i64,
        events: Vec<Inbound>,
    ) -> Result<Pending, StoreError> {
        match (self, stage) {
            (Task::Features { agg, dedup }, Stage::Features(group)) => {
                features_batch(agg, dedup.as_ref(), group, tp, end, events)
            }
            (Task::Join { store }, Stage::Join(join)) => join_batch(store, join, tp, end, events),
            _ => Err(StoreError::Corrupt(format!(
                "task of {} opened for another kind of stage",
                stage.name()
            ))),
        }
    }

    /// Commits the state batches in order: for features the aggregation first, then the
    /// dedup state, so the dedup store never gets ahead of the aggregation (an event it
    /// forwarded but the aggregation lost would be lost).
    fn commit(&mut self, pending: Pending) -> Result<(), StoreError> {
        let mut batches = pending.stores.iter().map(|(_, batch)| batch);
        match self {
            Task::Features { agg, dedup } => {
                if let Some(batch) = batches.next() {
                    agg.apply(batch)?;
                }
                if let (Some(store), Some(batch)) = (dedup, batches.next()) {
                    store.apply(batch)?;
                }
            }
            Task::Join { store } => {
                if let Some(batch) = batches.next() {
                    store.apply(batch)?;
                }
            }
        }
        Ok(())
    }
}

fn features_batch(
    agg: &FjallStore,
    dedup_store: Option<&FjallStore>,
    group: &FeatureGroup,
    tp: &TopicPartition,
    end: i64,
    events: Vec<Inbound>,
) -> Result<Pending, StoreError> {
    let (mut late, mut duplicates) = (0, 0);
    let (events, dedup) = match (&group.dedup, dedup_store) {
        (Some(op), Some(store)) => {
            let mut hw = HighWater::default();
            let fresh = hw.filter(store, events)?;
            // Ticks pass dedup untouched, in their place among the events.
            let plain: Vec<Event> = fresh
                .iter()
                .filter(|i| !i.event.is_tick())
                .map(|i| i.event.clone())
                .collect();
            let mut out = op.process(store, &plain)?;
            hw.finish(&mut out.state);
            out.state.set_offset(tp.clone(), never_back(store, tp, end));
            for decision in &out.decisions {
                match decision {
                    DedupDecision::Duplicate => duplicates += 1,
                    DedupDecision::Late => late += 1,
                    _ => {}
                }
            }
            let mut decisions = out.decisions.into_iter();
            let forwarded = fresh
                .into_iter()
                .filter(|i| i.event.is_tick() || decisions.next() == Some(DedupDecision::Forward))
                .collect();
            (forwarded, Some((store.name().to_string(), out.state)))
        }
        _ => (events, None),
    };
    let mut hw = HighWater::default();
    let fresh = hw.filter(agg, events)?;
    let plain: Vec<Event> = fresh.into_iter().map(|i| i.event).collect();
    let choices = hopping_choices(group, agg, &plain)?;
    let mut out = match &choices {
        // Only the window each key will show: the others' values would be dropped.
        Some(choices) => group
            .aggregate
            .process_selected(agg, &plain, &|key, window| {
                choices.get(key).is_some_and(|c| window.end == c.show)
            })?,
        None => group.aggregate.process(agg, &plain)?,
    };
    hw.finish(&mut out.state);
    out.state.set_offset(tp.clone(), never_back(agg, tp, end));
    define(agg, &mut out.state, &group.definition)?;
    // The output clock: never behind a value this task already emitted, so a feature's
    // version (event time first) grows with the repartition offset that produced it.
    let stored = read_i64(agg, OUTPUT_TIME_KEY)?.unwrap_or(i64::MIN);
    let time_ms = plain.iter().map(|e| e.time_ms).fold(stored, i64::max);
    let mut outputs = Vec::new();
    let mut more_rolls = false;
    if time_ms != i64::MIN {
        out.state.put(OUTPUT_TIME_KEY, &time_ms.to_le_bytes());
        if group.windowed {
            let updates = std::mem::take(&mut out.updates);
            let due;
            (outputs, due) = current_windows(
                group,
                agg,
                choices.as_ref(),
                updates,
                &mut out.state,
                time_ms,
            )?;
            // The batch's last input moved stream time: it names what it rolled.
            let version = Coords::new(tp.topic.clone(), tp.partition, end - 1);
            let rolled;
            (rolled, more_rolls) =
                roll_shown_windows(group, agg, &mut out.state, time_ms, due, &version)?;
            outputs.extend(rolled);
        }
        for update in out.updates {
            let Some(values) = update.values else {
                continue;
            };
            let fields = group
                .features
                .iter()
                .cloned()
                .zip(values.iter().map(|v| v.to_json()))
                .collect();
            outputs.push(Output {
                key: update.key,
                fields,
                time_ms,
                version: update.version,
                rolled: false,
            });
        }
    }
    late += out.dropped_late;
    let mut stores = vec![(agg.name().to_string(), out.state)];
    stores.extend(dedup);
    Ok(Pending {
        stores,
        outputs,
        late,
        duplicates,
        unmatched: 0,
        more_rolls,
    })
}

/// What a key of a hopping feature group shows after a batch.
struct HoppingChoice {
    /// The window shown now.
    shown: Shown,
    /// The end of the window to show: the one closing next after the key's newest input in
    /// the batch (the one ending last would cover mostly the future), or the shown one if
    /// that ends later.
    show: i64,
}

/// Hopping feature groups only: per key of the batch, which window it shows
/// ([`HoppingChoice`]), read before the aggregation so that it emits only that window.
fn hopping_choices(
    group: &FeatureGroup,
    agg: &FjallStore,
    events: &[Event],
) -> Result<Option<BTreeMap<Bytes, HoppingChoice>>, StoreError> {
    let window = group.aggregate.config().window;
    let WindowSpec::Hopping { .. } = window else {
        return Ok(None);
    };
    let mut newest_input: BTreeMap<&Bytes, i64> = BTreeMap::new();
    for e in events.iter().filter(|e| !e.is_tick()) {
        let t = newest_input.entry(&e.key).or_insert(i64::MIN);
        *t = (*t).max(e.time_ms);
    }
    let mut choices = BTreeMap::new();
    for (key, t) in newest_input {
        let shown_key = [SHOWN_WINDOW_PREFIX, &key[..]].concat();
        let shown = Shown::read(agg, None, &shown_key)?;
        let show = window
            .closing_next(t)
            .map_or(shown.end, |end| end.max(shown.end));
        choices.insert(key.clone(), HoppingChoice { shown, show });
    }
    Ok(Some(choices))
}

/// The outputs of a tumbling, session or hopping feature group: per key, the window it
/// should show now, if the batch updated it and its end is not before the end of the window
/// the key shows already (`SHOWN_WINDOW_PREFIX`). So a late event for an older window (within
/// the grace period) never replaces a newer window's value; a late event for the shown window
/// updates it. The window to show: the updated one with the greatest end (tumbling, session:
/// a session merged into another is a tombstone and skipped, the merged one is emitted), or
/// for hopping windows the one `choices` names. Also returns the keys of a rolling group
/// ([`rolls`]) that now show a window stream time (`time_ms`) has passed already: a late
/// event of a key ([`roll_shown_windows`] moves them on at once).
fn current_windows(
    group: &FeatureGroup,
    agg: &FjallStore,
    choices: Option<&BTreeMap<Bytes, HoppingChoice>>,
    updates: Vec<AggregateUpdate>,
    state: &mut WriteBatch,
    time_ms: i64,
) -> Result<(Vec<Output>, Due), StoreError> {
    let rolling = rolls(group);
    let mut due = Vec::new();
    let mut emitted: BTreeSet<Bytes> = BTreeSet::new();
    let mut per_key: BTreeMap<Bytes, Vec<AggregateUpdate>> = BTreeMap::new();
    for update in updates.into_iter().filter(|u| u.values.is_some()) {
        per_key.entry(update.key.clone()).or_default().push(update);
    }
    let mut outputs = Vec::with_capacity(per_key.len());
    for (key, updates) in per_key {
        let shown_key = [SHOWN_WINDOW_PREFIX, &key[..]].concat();
        let (shown, chosen) = match choices.and_then(|c| c.get(&key)) {
            Some(choice) => (
                choice.shown,
                updates.into_iter().find(|u| u.window.end == choice.show),
            ),
            None => (
                Shown::read(agg, None, &shown_key)?,
                updates.into_iter().max_by_key(|u| u.window.end),
            ),
        };
        let Some(update) = chosen.filter(|u| u.window.end >= shown.end) else {
            continue;
        };
        let now = Shown {
            end: update.window.end,
            filed: rolling.then_some(update.window.end),
        };
        // A rolling key is filed again under the end of the window it now shows, also when
        // the event is in the window it shows already but it was filed elsewhere (an empty
        // window it rolled to, or a later time, which a late event can make too late).
        if now.end > shown.end || (rolling && shown.filed != now.filed) {
            state.put(&shown_key, &now.encode());
            if rolling {
                if let Some(filed) = shown.filed {
                    state.delete(&shown_index_key(filed, &key));
                }
                if now.end > time_ms {
                    state.put(&shown_index_key(now.end, &key), &[]);
                } else {
                    due.push((key.clone(), now));
                }
            }
        }
        let values = update.values.unwrap_or_default();
        emitted.insert(key.clone());
        outputs.push(Output {
            fields: window_fields(group, update.window, &values),
            key,
            time_ms,
            version: update.version,
            rolled: false,
        });
    }
    // A hopping key at the empty window it rolled to, whose late event went to a pane that
    // no window shown holds (the one chosen for it had closed, later ones had not): `roll`
    // shows what the key holds now.
    if let Some(choices) = choices.filter(|_| rolling) {
        for (key, choice) in choices {
            let shown = choice.shown;
            if shown.filed.is_none() && shown.end != i64::MIN && !emitted.contains(key) {
                due.push((key.clone(), shown));
            }
        }
    }
    Ok((outputs, due))
}

/// Keys due to roll ([`roll_shown_windows`]), with what they show once the batch is applied.
type Due = Vec<(Bytes, Shown)>;

/// The features of a windowed group: `{"value": .., "window_start": .., "window_end": ..}`
/// each.
fn window_fields(group: &FeatureGroup, window: Window, values: &[AggValue]) -> Map<String, Value> {
    let (start, end) = (format_time(window.start), format_time(window.end));
    group
        .features
        .iter()
        .zip(values)
        .map(|(name, v)| {
            let value = json!({"value": v.to_json(), "window_start": start, "window_end": end});
            (name.clone(), value)
        })
        .collect()
}

/// Whether a group's keys move on to the current window without events of their own when
/// stream time passes the end of the window they show: tumbling and hopping windows (a
/// session that ended stays the key's last session).
fn rolls(group: &FeatureGroup) -> bool {
    group.windowed
        && matches!(
            group.aggregate.config().window,
            WindowSpec::Tumbling { .. } | WindowSpec::Hopping { .. }
        )
}

/// The window a key of a windowed feature group shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shown {
    /// Its end (`i64::MIN`: none yet).
    end: i64,
    /// Rolling groups: the time the key is filed under in `SHOWN_INDEX_PREFIX` (when what it
    /// shows may change next), `None` when it shows the empty window a quiet key rolled to
    /// ([`roll_shown_windows`]).
    filed: Option<i64>,
}

impl Shown {
    /// The key's entry (`SHOWN_WINDOW_PREFIX key`) as the store holds it, or will once
    /// `batch` is applied: the end, little-endian, then the time the key is filed under, if
    /// it is. (Entries written before keys were filed are the end alone: not filed.)
    fn read<S: StateStore + ?Sized>(
        store: &S,
        batch: Option<&WriteBatch>,
        shown_key: &[u8],
    ) -> Result<Self, StoreError> {
        let value = match batch {
            Some(batch) => get_through(store, batch, shown_key)?,
            None => store.get(shown_key)?,
        };
        let Some(value) = value else {
            return Ok(Shown {
                end: i64::MIN,
                filed: None,
            });
        };
        let end = decode_i64(value.get(..8).unwrap_or_default())?;
        let filed = match value.len() {
            8 => None,
            16 => Some(decode_i64(&value[8..])?),
            _ => return Err(StoreError::Corrupt("shown window".into())),
        };
        Ok(Shown { end, filed })
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = self.end.to_le_bytes().to_vec();
        if let Some(filed) = self.filed {
            out.extend_from_slice(&filed.to_le_bytes());
        }
        out
    }
}

/// `SHOWN_INDEX_PREFIX end key`.
fn shown_index_key(end: i64, key: &[u8]) -> Vec<u8> {
    [SHOWN_INDEX_PREFIX, &i64_sortable(end), key].concat()
}

/// At most this many filed keys roll per batch and task; the rest wait for the next batch
/// of the partition (its next record, or a tick), so the batch after midnight does not carry
/// every key that ordered yesterday.
const MAX_ROLLS_PER_BATCH: usize = if cfg!(test) { 3 } else { 10_000 };

/// Moves on the keys of a tumbling or hopping group that stream time (`time_ms`) reached
/// the time they are filed under (`SHOWN_INDEX_PREFIX`): what they show may have changed
/// without an event of their own ([`Aggregate::roll`]): nothing yet (they are filed again),
/// a later window with the events still in it (hopping windows overlap: "the last hour"
/// shrinks as its events leave it), or the empty window after their last event (counts 0),
/// shown once and not filed again, so a key that stays quiet costs nothing more. `due` are
/// keys [`current_windows`] found due; the others come from the index, read from where the
/// last pass stopped (`SHOWN_INDEX_POSITION`), at most [`MAX_ROLLS_PER_BATCH`]. `version`
/// names the input that moved stream time. Also says whether the index had more keys due
/// than one pass takes.
fn roll_shown_windows(
    group: &FeatureGroup,
    agg: &FjallStore,
    state: &mut WriteBatch,
    time_ms: i64,
    due: Due,
    version: &Coords,
) -> Result<(Vec<Output>, bool), StoreError> {
    if !rolls(group) {
        return Ok((Vec::new(), false));
    }
    // By key: the outputs' order, and one roll per key.
    let mut due: BTreeMap<Bytes, Shown> = due.into_iter().collect();
    let from = get_through(agg, state, SHOWN_INDEX_POSITION)?
        .map_or_else(|| SHOWN_INDEX_PREFIX.to_vec(), |p| p.to_vec());
    let to = shown_index_key(time_ms.saturating_add(1), &[]);
    let mut more = false;
    if from < to {
        let mut position = to.clone();
        let mut entries = Vec::new();
        for entry in agg.range(&from, &to) {
            let (index_key, _) = entry?;
            if matches!(state.get(&index_key), Some(None)) {
                continue; // unfiled by this batch
            }
            if entries.len() == MAX_ROLLS_PER_BATCH {
                position = index_key.to_vec();
                more = true;
                break;
            }
            entries.push(index_key);
        }
        let prefix = SHOWN_INDEX_PREFIX.len();
        for index_key in entries {
            state.delete(&index_key);
            let filed = Reader::new(&index_key[prefix..]).i64_sortable()?;
            let key = index_key.slice(prefix + 8..);
            // Only the entry the key is filed under counts (a stale one is dropped).
            let shown_key = [SHOWN_WINDOW_PREFIX, &key[..]].concat();
            let shown = Shown::read(agg, Some(state), &shown_key)?;
            if shown.filed == Some(filed) {
                due.insert(key, shown);
            }
        }
        state.put(SHOWN_INDEX_POSITION, &position);
    }
    let mut outputs = Vec::new();
    for (key, shown) in due {
        let shown_key = [SHOWN_WINDOW_PREFIX, &key[..]].concat();
        let refresh = shown.filed.is_none();
        let Some(roll) = group
            .aggregate
            .roll(agg, state, &key, shown.end, time_ms, refresh)?
        else {
            continue; // not a tumbling or hopping group: `rolls` said it is
        };
        let (mut now, values) = match roll {
            Roll::Keep { until } => {
                let now = Shown {
                    end: shown.end,
                    filed: Some(until),
                };
                (now, None)
            }
            Roll::Move {
                window,
                values,
                until,
            } => {
                let now = Shown {
                    end: window.end,
                    filed: until,
                };
                let values = values.unwrap_or_else(|| group.aggregate.empty_values());
                (now, Some((window, values)))
            }
        };
        if let Some(until) = now.filed.as_mut() {
            // `roll` files after the stream time; one filed at or below the stored position
            // would never be read again, so never below it, whatever happens.
            debug_assert!(*until > time_ms, "{until} <= {time_ms}");
            *until = (*until).max(time_ms.saturating_add(1));
            state.put(&shown_index_key(*until, &key), &[]);
        }
        state.put(&shown_key, &now.encode());
        if let Some((window, values)) = values {
            outputs.push(Output {
                fields: window_fields(group, window, &values),
                key,
                time_ms,
                version: version.clone(),
                rolled: true,
            });
        }
    }
    Ok((outputs, more))
}

/// Applies the table rows and joins the stream updates of one partition's share of a batch,
/// in repartition order. An output sets the join's fields of the stream entity: the table's
/// values, `null` for a field the row lacks (or for every field when the row is unknown, in a
/// left join). Its time is the stream update's event time, so it is versioned like the update
/// that triggered it.
fn join_batch(
    store: &FjallStore,
    join: &JoinStage,
    tp: &TopicPartition,
    end: i64,
    events: Vec<Inbound>,
) -> Result<Pending, StoreError> {
    let mut hw = HighWater::default();
    let fresh = hw.filter(store, events)?;
    let mut inputs = Vec::with_capacity(fresh.len());
    let mut ids = Vec::with_capacity(fresh.len());
    for inbound in fresh {
        match inbound.side {
            JoinSide::Table(row) => {
                inputs.push(JoinInput::Table(TableUpdate {
                    key: inbound.event.key,
                    value: row.map(|r| Bytes::from(r.to_string())),
                    coords: inbound.event.coords,
                }));
                ids.push(None);
            }
            JoinSide::Stream(id) => {
                inputs.push(JoinInput::Stream(inbound.event));
                ids.push(Some(id));
            }
            JoinSide::None => {} // not a join record: the decoder's business, never routed here
        }
    }
    let mut out = join.op.process_ordered(store, &inputs)?;
    hw.finish(&mut out.state);
    out.state.set_offset(tp.clone(), never_back(store, tp, end));
    let mut outputs = Vec::with_capacity(out.outputs.len());
    for o in &out.outputs {
        let (JoinInput::Stream(event), Some(id)) = (&inputs[o.index], &ids[o.index]) else {
            continue;
        };
        let row: Map<String, Value> = o
            .right
            .as_ref()
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default();
        let fields = join
            .fields
            .iter()
            .map(|(name, from)| (name.clone(), row.get(from).cloned().unwrap_or(Value::Null)))
            .collect();
        outputs.push(Output {
            key: Bytes::from(id.clone().into_bytes()),
            fields,
            time_ms: event.time_ms,
            version: o.version.clone(),
            rolled: false,
        });
    }
    Ok(Pending {
        stores: vec![(store.name().to_string(), out.state)],
        outputs,
        late: 0,
        duplicates: 0,
        unmatched: out.unmatched,
        more_rolls: false,
    })
}

/// Records in `store` (locally, outside its changelog) that it holds its changelog up to `end`.
fn record_changelog_end(store: &mut FjallStore, end: i64) -> Result<(), StoreError> {
    let mut batch = WriteBatch::default();
    batch.put(CHANGELOG_END_KEY, &end.to_le_bytes());
    store.apply(&batch)
}

/// The offset a batch ending at `end` records: never below what the store holds (a store
/// restored from its changelog can be ahead of the records the group re-delivers).
pub(crate) fn never_back(store: &FjallStore, tp: &TopicPartition, end: i64) -> i64 {
    store
        .offsets()
        .ok()
        .and_then(|o| o.get(tp).copied())
        .map_or(end, |stored| stored.max(end))
}

/// The directory of the processor's state database under `<data_dir>/state/<pipeline>/`
/// (feature and join names cannot contain a dot, so no task directory of an earlier layout
/// has this name).
pub(crate) const STATE_DB_DIR: &str = "tasks.fjall";

/// Opens the processor's state database (one fjall database, a keyspace per task store),
/// creating it atomically: fjall's creation of a database is several files, and a process
/// killed half-way leaves a directory fjall refuses to open. A new database is created under
/// `<path>.creating` and renamed into place once complete (a leftover `.creating` directory is
/// an empty database from a killed run: it is recreated).
pub(crate) fn open_state_db(path: &Path, options: StateDbOptions) -> Result<StateDb, StoreError> {
    let io = |e: std::io::Error| StoreError::Engine {
        store: path.display().to_string(),
        source: Box::new(e),
    };
    if !path.exists() {
        let creating = path.with_extension("creating");
        if creating.exists() {
            std::fs::remove_dir_all(&creating).map_err(io)?;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let db = StateDb::open(&creating)?;
        db.sync()?;
        drop(db);
        std::fs::rename(&creating, path).map_err(io)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
    }
    StateDb::open_with(path, options)
}

/// The state database's memory budgets of the pipeline file's `state` section.
pub(crate) fn state_db_options(config: &StateConfig) -> StateDbOptions {
    let default = StateDbOptions::default();
    StateDbOptions {
        value_cache_bytes: config
            .value_cache_bytes
            .unwrap_or(default.value_cache_bytes),
        key_index_bytes: config.key_index_bytes.map_or(default.key_index_bytes, |b| {
            usize::try_from(b).unwrap_or(usize::MAX)
        }),
    }
}

/// Drops the re-key loop's duplicates: per origin partition, records arrive in origin offset
/// order, so a record at or below the highest origin offset a store has applied (or this
/// batch admitted) is a copy. A join keeps a mark per side: in a join of an entity with
/// itself one record is a table row and a stream update, two repartition records with one
/// origin, which may share a partition.
#[derive(Default)]
pub(crate) struct HighWater {
    /// By [`high_water_key`] (and its stream-side variant).
    seen: BTreeMap<Vec<u8>, i64>,
}

impl HighWater {
    fn filter<S: StateStore>(
        &mut self,
        store: &S,
        events: Vec<Inbound>,
    ) -> Result<Vec<Inbound>, StoreError> {
        let mut kept = Vec::with_capacity(events.len());
        for inbound in events {
            // A tick is no origin's copy; the operators skip a replayed one by its offset.
            let mut key = high_water_key(&inbound.origin);
            if let JoinSide::Stream(_) = inbound.side {
                key.push(STREAM_SIDE);
            }
            if inbound.event.is_tick() || self.admit_key(store, key, inbound.origin_offset)? {
                kept.push(inbound);
            }
        }
        Ok(kept)
    }

    /// Whether the record from `origin` at `offset` is new for `store`, recording it.
    pub(crate) fn admit<S: StateStore + ?Sized>(
        &mut self,
        store: &S,
        origin: &TopicPartition,
        offset: i64,
    ) -> Result<bool, StoreError> {
        self.admit_key(store, high_water_key(origin), offset)
    }

    fn admit_key<S: StateStore + ?Sized>(
        &mut self,
        store: &S,
        key: Vec<u8>,
        offset: i64,
    ) -> Result<bool, StoreError> {
        let mark = match self.seen.get(&key) {
            Some(m) => *m,
            None => read_i64(store, &key)?.unwrap_or(-1),
        };
        if offset <= mark {
            self.seen.insert(key, mark);
            return Ok(false);
        }
        self.seen.insert(key, offset);
        Ok(true)
    }

    /// Records the marks in the store's batch.
    pub(crate) fn finish(self, batch: &mut WriteBatch) {
        for (key, mark) in self.seen {
            batch.put(&key, &mark.to_le_bytes());
        }
    }
}

/// Appended to [`high_water_key`] for a join's stream side (a topic name has no NUL, and the
/// partition is four bytes after it, so the key stays distinct).
const STREAM_SIDE: u8 = b's';

fn high_water_key(tp: &TopicPartition) -> Vec<u8> {
    let mut key = HIGH_WATER_PREFIX.to_vec();
    key.extend_from_slice(tp.topic.as_bytes());
    key.push(0);
    key.extend_from_slice(&tp.partition.to_be_bytes());
    key
}

/// The definition `store` was computed under, when it differs from `definition` (none
/// stored: a new store, or one written before definitions were; its first batch stores it).
pub(crate) fn other_definition(
    store: &FjallStore,
    definition: &str,
) -> Result<Option<String>, StoreError> {
    Ok(store
        .get(DEFINITION_KEY)?
        .filter(|stored| **stored != *definition.as_bytes())
        .map(|stored| String::from_utf8_lossy(&stored).into_owned()))
}

/// Puts `definition` into `state` unless `store` has one already: a store's first batch
/// records what its state is computed as ([`DEFINITION_KEY`]).
pub(crate) fn define(
    store: &FjallStore,
    state: &mut WriteBatch,
    definition: &str,
) -> Result<(), StoreError> {
    if store.get(DEFINITION_KEY)?.is_none() {
        state.put(DEFINITION_KEY, definition.as_bytes());
    }
    Ok(())
}

/// A feature group that takes in a feature whose state another group holds. A group is named
/// after its first feature, and its state and changelog after the group: a feature added in
/// front of a group's features (or moved into another group) renames the group, and
/// [`check_definition`] never sees the old state, which would be left behind while the
/// group's features start from zero. Candidates, from the log's `topics`: (group, feature,
/// the changelog named after the feature, the group's own changelog). Only one whose old
/// changelog holds records while the group's own holds none is refused
/// ([`Processor::check_group_names`]): a topic created by a refused run holds nothing, and a
/// group with state of its own has started already.
fn moved_features<'a>(
    app: &str,
    stages: &'a [Stage],
    topics: &[String],
) -> Vec<(&'a FeatureGroup, &'a str, String, String)> {
    let topics: BTreeSet<&str> = topics.iter().map(String::as_str).collect();
    let mut moved = Vec::new();
    for stage in stages {
        let Stage::Features(group) = stage else {
            continue;
        };
        for feature in group.features.iter().filter(|f| **f != group.name) {
            let old = changelog_topic_name(app, feature);
            if topics.contains(old.as_str()) {
                moved.push((
                    group,
                    feature.as_str(),
                    old,
                    changelog_topic_name(app, &group.name),
                ));
            }
        }
    }
    moved
}

/// Refuses state a feature group computed under another [`FeatureGroup::definition`].
fn check_definition(
    group: &FeatureGroup,
    agg: &FjallStore,
    partition: i32,
) -> Result<(), ProcessorError> {
    let Some(stored) = other_definition(agg, &group.definition)? else {
        return Ok(());
    };
    Err(ProcessorError::Definition(format!(
        "feature group `{}` ({}) has state computed as `{}` (partition {partition}), but the pipeline now defines it as `{}`: its stored values cannot be reused. Restore the previous definition, or start the group afresh under a new name: rename its first feature `{}` (the group, its state and its changelog are named after it); the renamed group counts events from then on, so rolling and all-time values start from zero",
        group.name,
        group.features.join(", "),
        stored,
        group.definition,
        group.name,
    )))
}

fn read_i64<S: StateStore + ?Sized>(store: &S, key: &[u8]) -> Result<Option<i64>, StoreError> {
    store.get(key)?.map(|v| decode_i64(&v)).transpose()
}

/// A runtime metadata value: an `i64`, little-endian.
fn decode_i64(value: &[u8]) -> Result<i64, StoreError> {
    value
        .try_into()
        .map(i64::from_le_bytes)
        .map_err(|_| StoreError::Corrupt("runtime metadata".into()))
}

/// An output (feature values or joined fields) as a binary-mode CloudEvent for the target
/// entity's features topic.
fn feature_record(topic: &str, partitions: i32, stage: &str, output: &Output) -> ProduceRecord {
    let version = &output.version;
    let mut id = format!(
        "{stage}/{}/{}@{}",
        version.topic, version.partition, version.offset
    );
    if output.rolled {
        id.push_str("/rolled/");
        id.push_str(&String::from_utf8_lossy(&output.key));
    }
    let mut r = ProduceRecord::new(
        topic.to_string(),
        Some(output.key.clone()),
        Some(Bytes::from(
            serde_json::to_vec(&output.fields).unwrap_or_default(),
        )),
    )
    .with_header("ce_specversion", "1.0")
    .with_header("ce_id", id)
    .with_header("ce_source", FEATURES_SOURCE)
    .with_header("ce_type", FEATURES_TYPE)
    .with_header("ce_time", format_time(output.time_ms))
    .with_header("content-type", "application/json");
    r.partition = Some(partition_for_key(&output.key, partitions));
    r
}

fn is_features_source(source: &kontext_core::config::SourceConfig) -> bool {
    source
        .matcher
        .as_ref()
        .is_some_and(|m| m.ce_source == FEATURES_SOURCE)
}

/// An entity id from a canonical field: strings as they are, numbers as their JSON text.
fn id_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// How long a loop keeps processing what its topics hold after shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// A loop's polling, and its drain after shutdown: keep polling until a poll comes back empty
/// (and the upstream loop, if any, has stopped), or [`DRAIN_TIMEOUT`] passed.
pub(crate) struct Drain<'a> {
    pub shutdown: &'a CancellationToken,
    upstream: Option<&'a CancellationToken>,
    deadline: Option<tokio::time::Instant>,
    /// How the loop waits out a log that is unavailable (`retry.defaults`).
    pub policy: RetryPolicy,
    /// The error of an extra poll that ended a backlog's gathering ([`backlog::gather`]),
    /// raised at the next poll, once the records gathered before it are handled: a Kafka
    /// consumer reports an error once, so dropping it would hide it for good.
    failed: Option<LogError>,
}

impl<'a> Drain<'a> {
    pub fn new(
        shutdown: &'a CancellationToken,
        upstream: Option<&'a CancellationToken>,
        policy: RetryPolicy,
    ) -> Self {
        Self {
            shutdown,
            upstream,
            deadline: None,
            policy,
            failed: None,
        }
    }

    /// The loop made a new consumer (it rejoined its group): an error kept from the old
    /// one's extra poll is not the new one's.
    pub fn new_consumer(&mut self) {
        self.failed = None;
    }

    /// The next records, retrying transient errors; `None` when the loop must stop. A full
    /// poll gathers the backlog behind it into one batch ([`backlog`]). (The loop's last
    /// background commit is settled when it drops its consumer.)
    pub async fn poll(
        &mut self,
        consumer: &mut dyn kontext_log::Consumer,
    ) -> Result<Option<Vec<Record>>, ProcessorError> {
        let mut wait = Waiter::new(self.policy);
        loop {
            let polled = if let Some(e) = self.failed.take() {
                Err(e)
            } else if self.shutdown.is_cancelled() {
                let deadline = *self
                    .deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + DRAIN_TIMEOUT);
                if tokio::time::Instant::now() >= deadline {
                    warn!("processor stopped before it processed everything in its topics");
                    return Ok(None);
                }
                // Whether upstream had stopped before this poll started: then an empty poll
                // means nothing more will come.
                let upstream_done = self.upstream.is_none_or(|u| u.is_cancelled());
                match consumer.poll(MAX_BATCH, POLL_TIMEOUT).await {
                    Ok(r) if r.is_empty() && upstream_done => return Ok(None),
                    other => other,
                }
            } else {
                tokio::select! {
                    _ = self.shutdown.cancelled() => continue,
                    polled = consumer.poll(MAX_BATCH, POLL_TIMEOUT) => polled,
                }
            };
            match polled {
                Ok(r) => {
                    let (records, failed) = backlog::gather(consumer, r).await;
                    self.failed = failed;
                    return Ok(Some(records));
                }
                Err(e) if e.is_transient() => {
                    let delay = wait.next_delay();
                    warn!(error = %e, retry_in = ?delay, "processor poll failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Whether a batch whose changelog records start at `first` continues `store`'s changelog
/// right after its last batch. Not when another writer's records came in between: an
/// instance that stalled past its session while the partition moved (no fencing without
/// `exactly_once`). Recording the end after this batch would then mark those records as
/// restored, and a later sync would skip them for good; instead the store keeps its end, and
/// its next sync (at the next assignment or start) reads them. Neither side restores them at
/// once: neither can tell which of the two the group now considers the owner, and the live
/// owner's state is the right one until then. A `retried` send ([`send_changelog`]) always
/// continues: the records in between are copies of this batch's own, from the attempt that
/// failed (else the end would stay behind for the rest of the run).
pub(crate) fn continues_changelog(
    store: Option<&FjallStore>,
    partition: i32,
    first: i64,
    retried: bool,
) -> Result<bool, StoreError> {
    let Some(store) = store.filter(|_| !retried) else {
        return Ok(true);
    };
    let continues = read_i64(store, CHANGELOG_END_KEY)?.is_none_or(|end| end == first);
    if !continues {
        warn!(store = store.name(), partition, first, "records of another writer came into a changelog since this store's last batch (an instance that stalled past its session?); the store keeps its changelog end, so the next sync of the partition reads them");
    }
    Ok(continues)
}

/// The first and last changelog offset of each owner's records in one send (`owners[i]`
/// wrote the record at `positions[i]`; an owner's records are contiguous).
pub(crate) fn changelog_spans(
    owners: Vec<usize>,
    positions: Vec<kontext_core::record::RecordPosition>,
) -> BTreeMap<usize, (i64, i64)> {
    let mut spans: BTreeMap<usize, (i64, i64)> = BTreeMap::new();
    for (owner, position) in owners.into_iter().zip(positions) {
        spans
            .entry(owner)
            .and_modify(|span| span.1 = position.offset)
            .or_insert((position.offset, position.offset));
    }
    spans
}

/// Records, in the state batch of store `phase` of commit `owner`, the changelog offset after
/// `offset` (the store's changelog end once the batch commits).
fn note_changelog_end(
    commits: &mut [((usize, i32), Pending)],
    owner: usize,
    phase: usize,
    offset: i64,
) {
    if let Some((_, batch)) = commits[owner].1.stores.get_mut(phase) {
        batch.put(CHANGELOG_END_KEY, &(offset + 1).to_le_bytes());
    }
}

/// One batch of the task loop as one transaction: begin, the outputs and every changelog
/// record in one send, the group's offsets, commit. `changelogs` are by phase, each record with
/// its owner; `landed(owner, phase, offset)` is told where each changelog record went. Any
/// error leaves the transaction to be aborted by the caller.
pub(crate) async fn send_transaction(
    txn: &dyn TransactionalProducer,
    member: Option<GroupMetadata>,
    outputs: Vec<ProduceRecord>,
    changelogs: Vec<Vec<(usize, ProduceRecord)>>,
    offsets: &[(TopicPartition, i64)],
    mut landed: impl FnMut(usize, usize, i64),
) -> Result<(), LogError> {
    let member = member.ok_or_else(|| {
        LogError::Invalid("the task loop's consumer is not a member of its group".to_string())
    })?;
    txn.begin().await?;
    let mut records = outputs;
    let first_changelog = records.len();
    let mut owners = Vec::new();
    for (phase, phase_records) in changelogs.into_iter().enumerate() {
        for (owner, record) in phase_records {
            owners.push((owner, phase));
            records.push(record);
        }
    }
    if !records.is_empty() {
        let positions = txn.send(records).await?;
        for ((owner, phase), position) in owners.into_iter().zip(&positions[first_changelog..]) {
            landed(owner, phase, position.offset);
        }
    }
    txn.commit(member, offsets).await
}

/// Produces `records` and waits for the acknowledgement, retrying transient errors (the same
/// records again: duplicates are dropped downstream). `false` on shutdown.
pub(crate) async fn send(
    producer: &dyn Producer,
    records: Vec<ProduceRecord>,
    shutdown: &CancellationToken,
    policy: &RetryPolicy,
) -> Result<bool, ProcessorError> {
    Ok(send_positions(producer, records, shutdown, policy)
        .await?
        .is_some())
}

/// [`send`], returning where each record landed (in the order given); `None` on shutdown.
pub(crate) async fn send_positions(
    producer: &dyn Producer,
    records: Vec<ProduceRecord>,
    shutdown: &CancellationToken,
    policy: &RetryPolicy,
) -> Result<Option<Vec<kontext_core::record::RecordPosition>>, ProcessorError> {
    let sent = send_changelog(producer, records, shutdown, policy).await?;
    Ok(sent.map(|(positions, _retried)| positions))
}

/// [`send_positions`], and whether a transient error made it send the records again. For
/// changelog records [`continues_changelog`] needs to know: an earlier attempt may have written
/// some of them already, so copies of this very batch can sit between the store's recorded end
/// and the positions returned.
pub(crate) async fn send_changelog(
    producer: &dyn Producer,
    records: Vec<ProduceRecord>,
    shutdown: &CancellationToken,
    policy: &RetryPolicy,
) -> Result<Option<(Vec<kontext_core::record::RecordPosition>, bool)>, ProcessorError> {
    if records.is_empty() {
        return Ok(Some((Vec::new(), false)));
    }
    let mut attempts = 0u32;
    let sent = retry_transient("processor produce", policy, shutdown, || {
        attempts += 1;
        producer.send_ref(&records)
    })
    .await?;
    Ok(sent.map(|positions| (positions, attempts > 1)))
}

/// Runs `attempt` until it succeeds, waiting out the log's transient errors with `policy`'s
/// backoff (each logged as `what` failing); `None` when `shutdown` comes during a wait. A
/// permanent error is returned as it is.
pub(crate) async fn retry_transient<T, F, Fut>(
    what: &str,
    policy: &RetryPolicy,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Result<Option<T>, ProcessorError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LogError>>,
{
    let mut wait = Waiter::new(*policy);
    loop {
        match attempt().await {
            Ok(value) => return Ok(Some(value)),
            Err(e) if e.is_transient() => {
                let delay = wait.next_delay();
                warn!(error = %e, retry_in = ?delay, "{what} failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

pub(crate) fn next_offsets(records: &[Record]) -> Vec<(TopicPartition, i64)> {
    let mut next: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    for r in records {
        let e = next.entry(r.topic_partition()).or_insert(r.offset + 1);
        *e = (*e).max(r.offset + 1);
    }
    next.into_iter().collect()
}

mod ticks;

#[cfg(test)]
mod restore_tests;

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
name: shop
entities:
  customer: { key: customer_id, topic: context.customers }
  order: { key: order_id, topic: context.orders, belongs_to: { customer: customer_id } }
sources:
  shop: { topic: context.orders, entity: order, fields: { customer_id: c, total: t } }
features:
  orders_30d: { from: order, entity: customer, key: customer_id, agg: count, window: 30d }
  total_30d: { from: order, entity: customer, key: customer_id, agg: sum, field: total, window: 30d }
  biggest: { from: order, entity: customer, key: customer_id, agg: max, field: total, dedup: 1h }
"#;

    /// An embedded log under `dir` with `config`'s topics and the source topic `source`
    /// (name, partitions).
    async fn embedded_log_with(
        dir: &Path,
        config: &PipelineConfig,
        source: (&str, i32),
    ) -> Arc<dyn Log> {
        use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
        let log: Arc<dyn Log> =
            EmbeddedLog::open(&dir.join("log"), EmbeddedConfig::default()).unwrap();
        for spec in topic_specs(config)
            .into_iter()
            .chain([TopicSpec::new(source.0, source.1)])
        {
            log.create_topic(&spec).await.unwrap();
        }
        log
    }

    /// A consumer that answers its polls from a script, then with empty polls. Its records
    /// go round partitions 0 and 1 of topic `t`, both assigned until `revoke` says otherwise.
    struct Scripted {
        polls: std::collections::VecDeque<Result<usize, LogError>>,
        next_offset: i64,
        /// `max_records` and `timeout` of every poll made.
        made: Vec<(usize, Duration)>,
        /// (n, p): the n-th poll (from 1) serves a rebalance that takes partition p away,
        /// before it takes records (which are then of the other partition only).
        revoke: Option<(usize, i32)>,
    }

    impl Scripted {
        fn new(polls: Vec<Result<usize, LogError>>) -> Self {
            Self {
                polls: polls.into(),
                next_offset: 0,
                made: Vec::new(),
                revoke: None,
            }
        }

        fn revoked(&self) -> Option<i32> {
            self.revoke
                .filter(|(n, _)| self.made.len() >= *n)
                .map(|(_, p)| p)
        }
    }

    #[async_trait::async_trait]
    impl kontext_log::Consumer for Scripted {
        async fn poll(
            &mut self,
            max_records: usize,
            timeout: Duration,
        ) -> Result<Vec<Record>, LogError> {
            self.made.push((max_records, timeout));
            let n = self.polls.pop_front().unwrap_or(Ok(0))?;
            assert!(n <= max_records, "the script gives more than was asked for");
            let revoked = self.revoked();
            let first = self.next_offset;
            self.next_offset += n as i64;
            Ok((first..self.next_offset)
                .map(|n| Record {
                    topic: "t".into(),
                    partition: match revoked {
                        Some(p) => 1 - p,
                        None => (n % 2) as i32,
                    },
                    offset: n,
                    timestamp_ms: 0,
                    key: None,
                    value: None,
                    headers: Vec::new(),
                })
                .collect())
        }

        async fn commit(&mut self, _: &[(TopicPartition, i64)]) -> Result<(), LogError> {
            Ok(())
        }

        fn assignment(&self) -> Vec<TopicPartition> {
            (0..2)
                .filter(|p| self.revoked() != Some(*p))
                .map(|p| TopicPartition::new("t", p))
                .collect()
        }
    }

    fn quick_retries() -> RetryPolicy {
        RetryPolicy {
            first_delay: Duration::from_millis(1),
            multiplier: 1.0,
            max_delay: Duration::from_millis(1),
            jitter: kontext_core::config::Jitter::None,
            max_attempts: None,
            max_elapsed: None,
        }
    }

    fn offsets(records: &[Record]) -> Vec<i64> {
        records.iter().map(|r| r.offset).collect()
    }

    /// A rebalance served by an extra poll ends the gathering, and the batch loses the records
    /// of the partitions it took away: the loop commits its batch as the member it is after
    /// the batch's last poll, and the partitions' new owner reads those records from the
    /// group's offsets. (Handling them would write them twice: here, and at their owner.)
    #[tokio::test]
    async fn a_rebalance_while_gathering_drops_the_records_of_revoked_partitions() {
        let shutdown = CancellationToken::new();
        let mut drain = Drain::new(&shutdown, None, quick_retries());
        let mut consumer = Scripted::new(vec![
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
            Ok(5),
        ]);
        consumer.revoke = Some((3, 1));
        let first = drain.poll(&mut consumer).await.unwrap().unwrap();
        assert!(first.iter().all(|r| r.partition == 0));
        let expected: Vec<i64> = (0..4_000)
            .filter(|o| o % 2 == 0)
            .chain(4_000..6_000)
            .collect();
        assert_eq!(offsets(&first), expected);
        assert_eq!(
            consumer.made.len(),
            3,
            "the gathering stopped at the rebalance"
        );
        let second = drain.poll(&mut consumer).await.unwrap().unwrap();
        assert_eq!(offsets(&second), (6_000..8_005).collect::<Vec<_>>());
    }

    /// A loop that rejoins its group with a new consumer (after a failed transaction) does
    /// not raise the old consumer's poll error.
    #[tokio::test]
    async fn a_new_consumer_does_not_raise_the_old_ones_error() {
        let shutdown = CancellationToken::new();
        let mut drain = Drain::new(&shutdown, None, quick_retries());
        let mut old = Scripted::new(vec![
            Ok(MAX_BATCH),
            Err(LogError::Invalid("the old member was fenced".into())),
        ]);
        assert_eq!(drain.poll(&mut old).await.unwrap().unwrap().len(), 2_000);
        drain.new_consumer();
        let mut new = Scripted::new(vec![Ok(3)]);
        assert_eq!(drain.poll(&mut new).await.unwrap().unwrap().len(), 3);
    }

    /// A full poll means a backlog: the loop takes what else is there without waiting, up to
    /// 16 000 records, and handles it as one batch (one state commit and changelog write per
    /// key instead of one per 2 000 records). A poll that is not full is handled as it is.
    #[tokio::test]
    async fn a_full_poll_gathers_the_backlog_into_one_batch() {
        let shutdown = CancellationToken::new();
        let mut drain = Drain::new(&shutdown, None, quick_retries());
        let mut consumer = Scripted::new(vec![
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
            Ok(500),
            Ok(7),
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
            Ok(MAX_BATCH),
        ]);
        let first = drain.poll(&mut consumer).await.unwrap().unwrap();
        assert_eq!(offsets(&first), (0..4_500).collect::<Vec<_>>());
        assert_eq!(
            consumer.made[1..],
            [(MAX_BATCH, Duration::ZERO); 2],
            "the extra polls do not wait"
        );
        let second = drain.poll(&mut consumer).await.unwrap().unwrap();
        assert_eq!(offsets(&second), (4_500..4_507).collect::<Vec<_>>());
        // Eight full polls reach the limit; the ninth is the next batch's.
        let third = drain.poll(&mut consumer).await.unwrap().unwrap();
        assert_eq!(third.len(), 16_000);
        let fourth = drain.poll(&mut consumer).await.unwrap().unwrap();
        assert_eq!(offsets(&fourth), (20_507..22_507).collect::<Vec<_>>());
    }

    /// An extra poll that fails ends the gathering: the records gathered before it come
    /// first, and the error is raised by the next poll (a Kafka consumer reports an error
    /// once: dropping it would hide it). A permanent error stops the loop; a transient one is
    /// retried, and nothing is lost or repeated either way.
    #[tokio::test]
    async fn an_extra_polls_error_comes_after_the_gathered_records() {
        let shutdown = CancellationToken::new();
        let mut drain = Drain::new(&shutdown, None, quick_retries());
        let mut consumer = Scripted::new(vec![
            Ok(MAX_BATCH),
            Err(LogError::Unavailable("broker went away".into())),
            Ok(MAX_BATCH),
            Ok(3),
            Ok(MAX_BATCH),
            Err(LogError::Invalid("not authorized".into())),
            Ok(9),
        ]);
        let first = drain.poll(&mut consumer).await.unwrap().unwrap();
        assert_eq!(offsets(&first), (0..2_000).collect::<Vec<_>>());
        let second = drain.poll(&mut consumer).await.unwrap().unwrap();
        assert_eq!(offsets(&second), (2_000..4_003).collect::<Vec<_>>());
        let third = drain.poll(&mut consumer).await.unwrap().unwrap();
        assert_eq!(offsets(&third), (4_003..6_003).collect::<Vec<_>>());
        let err = drain.poll(&mut consumer).await.unwrap_err();
        assert!(err.to_string().contains("not authorized"), "{err}");
    }

    /// A rolling feature on a quiet repartition partition decays: the customer whose
    /// partition gets no more clicks loses its clicks from the last hour once another
    /// partition's clicks move event time two hours on (the re-key loop's ticks, which pass
    /// the feature's dedup untouched), on the embedded log with the whole processor running.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_partitions_rolling_feature_decays_as_the_others_move_on() {
        const HOUR: i64 = 3_600_000;
        let dir = tempfile::tempdir().unwrap();
        let yaml = r#"
name: quiet
topics: { partitions: 4 }
entities:
  customer: { key: customer_id, topic: quiet.customers }
  interaction: { key: interaction_id, topic: quiet.interactions }
sources:
  web: { topic: quiet.interactions, entity: interaction, fields: { customer_id: c } }
features:
  clicks_1h: { from: interaction, entity: customer, key: customer_id, agg: count, window: 1h, dedup: 1h }
"#;
        let config = PipelineConfig::parse("p.yaml", yaml).unwrap();
        let log = embedded_log_with(dir.path(), &config, ("quiet.interactions", 4)).await;
        // Two customers on different repartition partitions.
        let quiet = "C-quiet";
        let busy = (0..)
            .map(|i| format!("C-{i}"))
            .find(|c| partition_for_key(c.as_bytes(), 4) != partition_for_key(quiet.as_bytes(), 4))
            .unwrap();
        let producer = log.producer().await.unwrap();
        let click = |n: usize, customer: &str, time_ms: i64| {
            let mut r = ProduceRecord::new(
                "quiet.interactions",
                Some(Bytes::from(format!("I-{n}"))),
                Some(Bytes::from(json!({ "c": customer }).to_string())),
            );
            r.timestamp_ms = Some(time_ms);
            r
        };
        let t0 = 1_700_000_000_000;
        producer
            .send(vec![click(1, quiet, t0), click(2, &busy, t0 + 1)])
            .await
            .unwrap();

        let shutdown = CancellationToken::new();
        let run = tokio::spawn(
            Processor::new(&config, &dir.path().join("data"), log.clone()).run(shutdown.clone()),
        );
        let mut features = log
            .consumer(ConsumerConfig::new(
                "test-reader",
                vec!["quiet.customers.features".into()],
            ))
            .await
            .unwrap();
        // The newest clicks_1h of `customer` read so far, reading until `until` holds or 60 s.
        let mut shown: BTreeMap<String, Value> = BTreeMap::new();
        let mut read_until = async |until: &dyn Fn(&BTreeMap<String, Value>) -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !until(&shown) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "features so far: {shown:?}"
                );
                for r in features
                    .poll(100, Duration::from_millis(200))
                    .await
                    .unwrap()
                {
                    let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
                    let fields: Value = serde_json::from_slice(&r.value.unwrap()).unwrap();
                    shown.insert(key, fields["clicks_1h"].clone());
                }
            }
        };
        read_until(&|s| s.get(quiet) == Some(&json!(1)) && s.get(&busy) == Some(&json!(1))).await;
        // Two hours on, clicks of the busy customer only: the quiet customer's click leaves
        // its hour although nothing more arrives on its partition.
        producer
            .send(vec![
                click(3, &busy, t0 + 2 * HOUR),
                click(4, &busy, t0 + 2 * HOUR + 5),
            ])
            .await
            .unwrap();
        read_until(&|s| s.get(&busy) == Some(&json!(2)) && s.get(quiet) == Some(&json!(0))).await;
        shutdown.cancel();
        run.await.unwrap().unwrap();
    }

    /// A feature added to a group reads the stored accumulators by position, and a tumbling
    /// window of another size reads the stored windows by their start: the processor refuses
    /// such state with a message that says how to compute the group again, and accepts what
    /// can change on it (grace, here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn state_of_another_definition_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = |features: &str| {
            format!(
                r#"
name: redefined
topics: {{ partitions: 2 }}
entities:
  customer: {{ key: customer_id, topic: redefined.customers }}
  order: {{ key: order_id, topic: redefined.orders }}
sources:
  shop: {{ topic: redefined.orders, entity: order, fields: {{ customer_id: c, total: t, refund: r }} }}
features:
{features}"#
            )
        };
        let first = yaml(
            "  orders_30d: { from: order, entity: customer, key: customer_id, agg: count, window: 30d }\n  \
             spend_30d: { from: order, entity: customer, key: customer_id, agg: sum, field: total, window: 30d }\n  \
             orders_today: { from: order, entity: customer, key: customer_id, agg: count, window: { tumbling: 1d } }\n",
        );
        let config = PipelineConfig::parse("p.yaml", &first).unwrap();
        let log = embedded_log_with(dir.path(), &config, ("redefined.orders", 2)).await;
        let order = |n: i64| {
            let mut order = ProduceRecord::new(
                "redefined.orders",
                Some(Bytes::from(format!("O-{n}"))),
                Some(Bytes::from(
                    json!({ "c": "C-1", "t": 10, "r": 0 }).to_string(),
                )),
            );
            order.timestamp_ms = Some(1_700_000_000_000 + n);
            order
        };
        let producer = log.producer().await.unwrap();
        producer.send(vec![order(1)]).await.unwrap();
        let data = dir.path().join("data");
        // Runs the processor until the features topic holds `want` records (two per order:
        // one per group) or the processor stops on its own.
        let run = |yaml: String, want: usize| {
            let (log, data) = (log.clone(), data.clone());
            async move {
                let config = PipelineConfig::parse("p.yaml", &yaml).unwrap();
                let shutdown = CancellationToken::new();
                let run =
                    tokio::spawn(Processor::new(&config, &data, log.clone()).run(shutdown.clone()));
                let mut features = log
                    .consumer(ConsumerConfig::new(
                        format!("reader-{}", yaml.len()),
                        vec!["redefined.customers.features".into()],
                    ))
                    .await
                    .unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                let mut seen = 0;
                while seen < want && !run.is_finished() {
                    assert!(std::time::Instant::now() < deadline, "no features");
                    seen += features
                        .poll(10, Duration::from_millis(200))
                        .await
                        .unwrap()
                        .len();
                }
                shutdown.cancel();
                run.await.unwrap()
            }
        };
        run(first.clone(), 2).await.unwrap();

        // refunds_30d sorts between the two: the stored [count, sum(total)] would be read as
        // [count, sum(refund)] and spend_30d would get nothing.
        let added = first.replace(
            "  spend_30d:",
            "  refunds_30d: { from: order, entity: customer, key: customer_id, agg: sum, field: refund, window: 30d }\n  spend_30d:",
        );
        // An order arrives meanwhile: the refused run must not re-key it with the fields of
        // the refused definition (the previous one may need others).
        producer.send(vec![order(3)]).await.unwrap();
        let repartition = repartition_topic(&config);
        // How many records `topic` holds.
        let records_in = |topic: String| {
            let log = log.clone();
            async move {
                let d = log.describe_topic(&topic).await.unwrap();
                d.partitions.iter().map(|p| p.high_watermark).sum::<i64>() as usize
            }
        };
        let written = || records_in(repartition.clone());
        let before = written().await;
        let err = run(added, usize::MAX).await.unwrap_err().to_string();
        assert!(
            err.contains("`orders_30d`")
                && err.contains("`order → customer by customer_id, sliding: count(), sum(total)`")
                && err.contains("sliding: count(), sum(refund), sum(total)`")
                && err.contains("rename its first feature"),
            "{err}"
        );
        assert_eq!(written().await, before, "nothing re-keyed");
        let resized = first.replace("tumbling: 1d", "tumbling: 7d");
        let err = run(resized, usize::MAX).await.unwrap_err().to_string();
        assert!(
            err.contains("tumbling 86400000 ms: count()`")
                && err.contains("tumbling 604800000 ms: count()`"),
            "{err}"
        );
        // A grace period can change on existing state.
        let graced = first.replace("tumbling: 1d }", "tumbling: 1d }, grace: 1h");
        producer.send(vec![order(2)]).await.unwrap();
        run(graced, 4).await.unwrap();

        // A feature that sorts first renames the group: the group `orders_30d`'s state would
        // be left behind, orders_30d starting from zero, with no definition to compare.
        let in_front = first.replace(
            "  orders_30d:",
            "  avg_total_30d: { from: order, entity: customer, key: customer_id, agg: avg, field: total, window: 30d }\n  orders_30d:",
        );
        // Its topics exist, as `kontext run` creates them before the processor starts.
        for spec in topic_specs(&PipelineConfig::parse("p.yaml", &in_front).unwrap()) {
            log.create_topic(&spec).await.unwrap();
        }
        let before = written().await;
        let err = run(in_front.clone(), usize::MAX)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("feature `orders_30d` has state in the feature group `orders_30d`")
                && err.contains("`redefined-orders_30d-changelog`")
                && err.contains("group `avg_total_30d` (avg_total_30d, orders_30d, spend_30d)")
                && err.contains("rename `orders_30d` as well"),
            "{err}"
        );
        assert_eq!(written().await, before, "nothing re-keyed");
        // Renaming it as well starts the group afresh, on purpose.
        let afresh = in_front.replace("  orders_30d:", "  orders_30d_v2:");
        let features = || records_in("redefined.customers.features".into());
        for spec in topic_specs(&PipelineConfig::parse("p.yaml", &afresh).unwrap()) {
            log.create_topic(&spec).await.unwrap();
        }
        let shown = features().await;
        producer.send(vec![order(4)]).await.unwrap();
        // Order 4, with both groups; the renamed group also computes orders 1 to 3 afresh.
        run(afresh, shown + 2).await.unwrap();
        // The group `avg_total_30d` has state of its own now: orders_30d's old changelog no
        // longer stops a run (the same functions, so its definition is the same too).
        let shown = features().await;
        producer.send(vec![order(5)]).await.unwrap();
        run(in_front, shown + 2).await.unwrap();
    }

    /// Runs the processor of `config` (state in `dir`) until the customer features topic
    /// shows `orders_30d: want`, then stops it; returns its metrics.
    async fn run_until_orders_30d(
        config: &PipelineConfig,
        dir: &Path,
        log: &Arc<dyn Log>,
        want: Value,
    ) -> Arc<PipelineMetrics> {
        let metrics = Arc::new(PipelineMetrics::default());
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(
            Processor::new(config, &dir.join("data"), log.clone())
                .with_metrics(metrics.clone())
                .run(shutdown.clone()),
        );
        let topic = features_topic(&config.entities["customer"].topic);
        let mut features = log
            .consumer(ConsumerConfig::new("reader", vec![topic]))
            .await
            .unwrap();
        newest_orders_30d(features.as_mut(), |v| v.as_ref() == Some(&want)).await;
        shutdown.cancel();
        run.await.unwrap().unwrap();
        metrics
    }

    /// Reads `orders_30d` from a features topic until `done` holds for the newest value read
    /// (60 s at most), and returns it.
    async fn newest_orders_30d(
        features: &mut dyn kontext_log::Consumer,
        done: impl Fn(&Option<Value>) -> bool,
    ) -> Option<Value> {
        let mut newest = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !done(&newest) {
            assert!(
                std::time::Instant::now() < deadline,
                "orders_30d so far: {newest:?}"
            );
            for r in features
                .poll(100, Duration::from_millis(200))
                .await
                .unwrap()
            {
                let fields: Value = serde_json::from_slice(&r.value.unwrap()).unwrap();
                newest = Some(fields["orders_30d"].clone());
            }
        }
        newest
    }

    /// A pipeline `name` with orders and tickets naming their customer (one partition) and
    /// the `features` (YAML lines), and an embedded log with its topics.
    async fn orders_and_tickets(
        dir: &Path,
        name: &str,
        features: &str,
    ) -> (PipelineConfig, Arc<dyn Log>) {
        let yaml = format!(
            r#"
name: {name}
topics: {{ partitions: 1 }}
entities:
  customer: {{ key: customer_id, topic: {name}.customers }}
  order: {{ key: order_id, topic: {name}.orders }}
  ticket: {{ key: ticket_id, topic: {name}.tickets }}
sources:
  shop: {{ topic: {name}.orders, entity: order, fields: {{ customer_id: c }} }}
  desk: {{ topic: {name}.tickets, entity: ticket, fields: {{ customer_id: c }} }}
features:{features}
"#
        );
        let config = PipelineConfig::parse("p.yaml", &yaml).unwrap();
        let log = embedded_log_with(dir, &config, (&format!("{name}.orders"), 1)).await;
        log.create_topic(&TopicSpec::new(format!("{name}.tickets"), 1))
            .await
            .unwrap();
        (config, log)
    }

    /// An event `id` of `customer` for `topic`, at log time `time_ms`.
    fn customer_event(topic: &str, id: &str, customer: &str, time_ms: i64) -> ProduceRecord {
        let mut r = ProduceRecord::new(
            topic.to_string(),
            Some(Bytes::from(id.to_string())),
            Some(Bytes::from(json!({ "c": customer }).to_string())),
        );
        r.timestamp_ms = Some(time_ms);
        r
    }

    /// A batch with only another group's inputs is not written for an idle task (its offsets
    /// alone) until its interval has passed. The group commits no further than the idle
    /// task's offsets (a rewind past it would wait for an empty group on Kafka), also after a
    /// stop, so a restart delivers again what the busy task holds, and it counts nothing
    /// twice; a quiet poll once the interval has passed writes what the idle task skipped,
    /// and the group reaches the end (no lag is left).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_task_writes_its_offsets_once_per_interval_and_a_restart_counts_nothing_twice()
    {
        let dir = tempfile::tempdir().unwrap();
        let (config, log) = orders_and_tickets(
            dir.path(),
            "idle",
            r#"
  orders_30d: { from: order, entity: customer, key: customer_id, agg: count, window: 30d }
  tickets_30d: { from: ticket, entity: customer, key: customer_id, agg: count, window: 30d }"#,
        )
        .await;
        let producer = log.producer().await.unwrap();
        let event = |topic: &str, id: &str| customer_event(topic, id, "C-1", now_ms());
        let data = dir.path().join("data");
        let mut features = log
            .consumer(ConsumerConfig::new(
                "reader",
                vec!["idle.customers.features".into()],
            ))
            .await
            .unwrap();
        // Sends each event in a batch of its own: the next only once its features are out.
        let committed = async || {
            log.committed_offsets(&features_group(&config), &repartition_topic(&config))
                .await
                .unwrap()
        };
        // Runs the processor over `events`, each in a batch of its own (the next is sent once
        // its features are out); the group's committed offsets right after the last one's
        // features, and once `until` holds for them (polled; before the stop); the newest
        // features.
        let mut run =
            async |events: Vec<(&str, &str)>, interval: Duration, until: &dyn Fn(i64) -> bool| {
                let shutdown = CancellationToken::new();
                let mut processor = Processor::new(&config, &data, log.clone());
                processor.idle_write_interval = interval;
                let run = tokio::spawn(processor.run(shutdown.clone()));
                let mut newest = BTreeMap::new();
                for (topic, id) in events {
                    producer.send(vec![event(topic, id)]).await.unwrap();
                    let deadline = std::time::Instant::now() + Duration::from_secs(60);
                    let mut seen = 0;
                    while seen == 0 {
                        assert!(std::time::Instant::now() < deadline, "no features for {id}");
                        for r in features
                            .poll(100, Duration::from_millis(200))
                            .await
                            .unwrap()
                        {
                            let fields: Value = serde_json::from_slice(&r.value.unwrap()).unwrap();
                            for (k, v) in fields.as_object().unwrap() {
                                newest.insert(k.clone(), v.clone());
                            }
                            seen += 1;
                        }
                    }
                }
                let offset = async || committed().await[0].1.unwrap_or(0);
                let after_last = offset().await;
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while !until(offset().await) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "committed: {:?}",
                        committed().await
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                shutdown.cancel();
                run.await.unwrap().unwrap();
                (newest, after_last)
            };
        // Repartition offsets: O-1 0, T-1 1, O-2 2, O-3 3, O-4 4. When O-4's features are out,
        // the commit of O-2's batch has landed (an embedded commit waits for the one before).
        let (first, after_last) = run(
            vec![
                ("idle.orders", "O-1"),
                ("idle.tickets", "T-1"),
                ("idle.orders", "O-2"),
                ("idle.orders", "O-3"),
                ("idle.orders", "O-4"),
            ],
            Duration::from_secs(3_600),
            &|_| true,
        )
        .await;
        assert_eq!(first["orders_30d"], json!(4));
        assert_eq!(first["tickets_30d"], json!(1));
        assert_eq!(
            after_last, 2,
            "not past the tickets task, which wrote up to T-1"
        );
        assert_eq!(committed().await, [(0, Some(2))], "nor after the stop");

        // Batch-end markers in each group's changelog.
        let batches = async |feature: &str| {
            let topic = changelog_topic_name("idle", feature);
            let mut reader = log
                .consumer(ConsumerConfig::new(format!("count-{feature}"), vec![topic]))
                .await
                .unwrap();
            let mut ends = 0;
            loop {
                let polled = reader.poll(100, Duration::from_millis(500)).await.unwrap();
                if polled.is_empty() {
                    return ends;
                }
                ends += polled
                    .iter()
                    .filter(|r| r.key.as_deref() == Some(b"\x00z".as_slice()))
                    .count();
            }
        };
        assert_eq!(batches("orders_30d").await, 4, "O-1 to O-4");
        assert_eq!(
            batches("tickets_30d").await,
            2,
            "its first batch (O-1) and T-1; not O-2 to O-4"
        );

        // The restart delivers O-2 to O-4 again, which the orders task skips. Quiet once its
        // interval has passed, the tickets task writes what it skipped, and the group reaches
        // the end (O-5 5, T-2 6, O-6 7: 8) before any stop.
        let (second, _) = run(
            vec![
                ("idle.orders", "O-5"),
                ("idle.tickets", "T-2"),
                ("idle.orders", "O-6"),
            ],
            Duration::from_millis(100),
            &|offset| offset == 8,
        )
        .await;
        assert_eq!(second["orders_30d"], json!(6), "each order once");
        assert_eq!(second["tickets_30d"], json!(2));
    }

    /// Quiet keys' rolls cut at `MAX_ROLLS_PER_BATCH` (3 in tests) go on in the task's next
    /// batches even when they hold only another group's records: the task is not idle then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_with_rolls_left_writes_batches_without_inputs_of_its_own() {
        const DAY: i64 = 86_400_000;
        let dir = tempfile::tempdir().unwrap();
        let (config, log) = orders_and_tickets(
            dir.path(),
            "rolls",
            r#"
  orders_today: { from: order, entity: customer, key: customer_id, agg: count, window: { tumbling: 1d } }
  tickets_ever: { from: ticket, entity: customer, key: customer_id, agg: count }"#,
        )
        .await;
        let producer = log.producer().await.unwrap();
        let event = customer_event;
        let shutdown = CancellationToken::new();
        let mut processor = Processor::new(&config, &dir.path().join("data"), log.clone());
        processor.idle_write_interval = Duration::from_secs(3_600);
        let run = tokio::spawn(processor.run(shutdown.clone()));
        let mut features = log
            .consumer(ConsumerConfig::new(
                "reader",
                vec!["rolls.customers.features".into()],
            ))
            .await
            .unwrap();
        // orders_today outputs per customer, and tickets_ever outputs; reads until `want`
        // orders_today outputs and `tickets` tickets_ever ones came in all.
        let mut outputs: BTreeMap<String, usize> = BTreeMap::new();
        let mut ticket_outputs = 0;
        let mut read = async |want: usize, tickets: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while outputs.values().sum::<usize>() < want || ticket_outputs < tickets {
                assert!(std::time::Instant::now() < deadline, "outputs: {outputs:?}");
                for r in features
                    .poll(100, Duration::from_millis(200))
                    .await
                    .unwrap()
                {
                    let fields: Value = serde_json::from_slice(&r.value.unwrap()).unwrap();
                    if fields.get("orders_today").is_some() {
                        let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
                        *outputs.entry(key).or_default() += 1;
                    }
                    if fields.get("tickets_ever").is_some() {
                        ticket_outputs += 1;
                    }
                }
            }
            outputs.clone()
        };
        let day10 = (0..7)
            .map(|i| {
                event(
                    "rolls.orders",
                    &format!("O-{i}"),
                    &format!("C-{i}"),
                    10 * DAY + i,
                )
            })
            .collect();
        producer.send(day10).await.unwrap();
        read(7, 0).await;
        // Day 11: C-7's order, and the rolls of C-0..C-6's day 10, three per batch.
        let day11 = event("rolls.orders", "O-7", "C-7", 11 * DAY);
        producer.send(vec![day11]).await.unwrap();
        read(7 + 1 + 3, 0).await;
        // Tickets only, a batch each: the orders task has none of its records, but rolls
        // left: three more, then the last one.
        for n in 0..2 {
            let ticket = event("rolls.tickets", &format!("T-{n}"), "C-0", 11 * DAY + 1);
            producer.send(vec![ticket]).await.unwrap();
            read(0, n + 1).await;
        }
        let outputs = read(7 + 1 + 7, 2).await;
        shutdown.cancel();
        run.await.unwrap().unwrap();
        for i in 0..7 {
            assert_eq!(
                outputs[&format!("C-{i}")],
                2,
                "day 10, then rolled: {outputs:?}"
            );
        }
    }

    /// A record over `limits.max_record_bytes` is dead-lettered by the store sinks and applied
    /// by none: the features must not count it either (found by review: the re-key loop
    /// skipped the size check the sinks make).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_over_the_size_limit_counts_in_no_feature() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = r#"
name: sized
topics: { partitions: 1 }
limits: { max_record_bytes: 300 }
entities:
  customer: { key: customer_id, topic: sized.customers }
  order: { key: order_id, topic: sized.orders }
sources:
  shop: { topic: sized.orders, entity: order, fields: { customer_id: c, note: n } }
features:
  orders_30d: { from: order, entity: customer, key: customer_id, agg: count, window: 30d }
"#;
        let config = PipelineConfig::parse("p.yaml", yaml).unwrap();
        let log = embedded_log_with(dir.path(), &config, ("sized.orders", 1)).await;
        let order = |n: i64, note: usize| {
            let mut r = ProduceRecord::new(
                "sized.orders",
                Some(Bytes::from(format!("O-{n}"))),
                Some(Bytes::from(
                    json!({ "c": "C-1", "n": "x".repeat(note) }).to_string(),
                )),
            );
            r.timestamp_ms = Some(1_700_000_000_000 + n);
            r
        };
        let orders = vec![order(1, 1), order(2, 1_000), order(3, 1)];
        log.producer().await.unwrap().send(orders).await.unwrap();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(
            Processor::new(&config, &dir.path().join("data"), log.clone()).run(shutdown.clone()),
        );
        let mut features = log
            .consumer(ConsumerConfig::new(
                "reader",
                vec!["sized.customers.features".into()],
            ))
            .await
            .unwrap();
        // Once it has written something, stop it: it works through what its topics hold.
        let mut last = newest_orders_30d(features.as_mut(), |v| v.is_some()).await;
        shutdown.cancel();
        run.await.unwrap().unwrap();
        loop {
            let polled = features
                .poll(100, Duration::from_millis(500))
                .await
                .unwrap();
            if polled.is_empty() {
                break;
            }
            for r in polled {
                let fields: Value = serde_json::from_slice(&r.value.unwrap()).unwrap();
                last = Some(fields["orders_30d"].clone());
            }
        }
        assert_eq!(last, Some(json!(2)), "orders 1 and 3; order 2 is too large");
    }

    /// Each loop times its steps once per batch, in `kontext_process_step_seconds`: the wait
    /// from the oldest record's log timestamp, the produce round trips, the operators and
    /// the state commit; without `exactly_once`, no transaction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_loops_time_each_step_of_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = r#"
name: timed
topics: { partitions: 1 }
entities:
  customer: { key: customer_id, topic: timed.customers }
  order: { key: order_id, topic: timed.orders }
sources:
  shop: { topic: timed.orders, entity: order, fields: { customer_id: c } }
features:
  orders_30d: { from: order, entity: customer, key: customer_id, agg: count, window: 30d, dedup: 1h }
"#;
        let config = PipelineConfig::parse("p.yaml", yaml).unwrap();
        let log = embedded_log_with(dir.path(), &config, ("timed.orders", 1)).await;
        // Event and log time two minutes ago: the re-key loop's wait is above 60 s.
        let long_ago = now_ms() - 120_000;
        let orders = (0..3)
            .map(|n| {
                let mut r = ProduceRecord::new(
                    "timed.orders",
                    Some(Bytes::from(format!("O-{n}"))),
                    Some(Bytes::from(json!({ "c": "C-1" }).to_string())),
                );
                r.timestamp_ms = Some(long_ago + n);
                r
            })
            .collect();
        log.producer().await.unwrap().send(orders).await.unwrap();
        let metrics = run_until_orders_30d(&config, dir.path(), &log, json!(3)).await;

        let step = |s: ProcessStep| &metrics.process_steps[s as usize];
        let rekey_wait = step(ProcessStep::RekeyWait);
        assert!(rekey_wait.count() >= 1);
        let mut out = String::new();
        rekey_wait.render(&mut out, "w", "");
        assert!(
            out.contains("w_bucket{le=\"60\"} 0\n"),
            "the re-key loop waited from the records' log time, two minutes ago: {out}"
        );
        assert!(step(ProcessStep::RekeyProduce).count() >= 1);
        let batches = step(ProcessStep::TasksWait).count();
        assert!(batches >= 1);
        for s in [
            ProcessStep::TasksProcess,
            ProcessStep::TasksOutputs,
            ProcessStep::TasksChangelogs,
            ProcessStep::TasksStateCommit,
        ] {
            assert_eq!(step(s).count(), batches, "{s:?}: one per batch");
        }
        assert_eq!(step(ProcessStep::TasksTransaction).count(), 0);
        let mut out = String::new();
        step(ProcessStep::TasksWait).render(&mut out, "t", "");
        assert!(
            out.contains(&format!("t_bucket{{le=\"60\"}} {batches}\n")),
            "repartition records are the re-key loop's, just written: {out}"
        );
    }

    /// CloudEvents ids are unique per source only: dedup drops an id seen again from the same
    /// source, not another source's event that reuses the id.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dedup_compares_ids_within_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = r#"
name: sourced
topics: { partitions: 1 }
entities:
  customer: { key: customer_id, topic: sourced.customers }
  order: { key: order_id, topic: sourced.orders }
sources:
  shop: { topic: sourced.orders, entity: order, match: { ce_source: shop }, fields: { customer_id: c } }
  pos: { topic: sourced.orders, entity: order, match: { ce_source: pos }, fields: { customer_id: c } }
features:
  orders_30d: { from: order, entity: customer, key: customer_id, agg: count, window: 30d, dedup: 1h }
"#;
        let config = PipelineConfig::parse("p.yaml", yaml).unwrap();
        let log = embedded_log_with(dir.path(), &config, ("sourced.orders", 1)).await;
        let now = now_ms();
        let order = |n: i64, source: &'static str, id: &'static str| {
            let mut r = ProduceRecord::new(
                "sourced.orders",
                Some(Bytes::from(format!("O-{n}"))),
                Some(Bytes::from(json!({ "c": "C-1" }).to_string())),
            )
            .with_header("ce_specversion", "1.0")
            .with_header("ce_id", id)
            .with_header("ce_source", source)
            .with_header("ce_type", "order.placed");
            r.timestamp_ms = Some(now + n);
            r
        };
        // The shop's order 1001 twice (a producer's retry), and the till's own order 1001.
        let orders = vec![
            order(0, "shop", "1001"),
            order(1, "shop", "1001"),
            order(2, "pos", "1001"),
        ];
        log.producer().await.unwrap().send(orders).await.unwrap();
        // The partition's records are processed in order: the retry is dropped before the
        // till's order is counted.
        let metrics = run_until_orders_30d(&config, dir.path(), &log, json!(2)).await;
        let text = metrics.render();
        assert!(
            text.contains("\nkontext_process_duplicates_total 1\n"),
            "{text}"
        );
    }

    #[test]
    fn features_with_one_window_share_an_operator() {
        let config = PipelineConfig::parse("p.yaml", YAML).unwrap();
        let groups = plan(&config);
        let names: Vec<Vec<&str>> = groups
            .iter()
            .map(|g| g.features.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(
            names,
            vec![vec!["biggest"], vec!["orders_30d", "total_30d"]]
        );
        assert_eq!(groups[0].store_names(), vec!["biggest", "biggest-dedup"]);
        let topics: Vec<String> = topic_specs(&config).into_iter().map(|t| t.name).collect();
        assert_eq!(
            topics,
            vec![
                "context.customers.features",
                "shop-biggest-changelog",
                "shop-biggest-dedup-changelog",
                "shop-features-repartition",
                "shop-orders_30d-changelog",
            ]
        );
    }

    #[test]
    fn the_sinks_map_feature_records_into_the_target_entity() {
        let config = PipelineConfig::parse("p.yaml", YAML).unwrap();
        // The parsed pipeline already has the built-in source of the features topic.
        let router = Router::new(&config);
        let output = Output {
            key: Bytes::from_static(b"C-1"),
            fields: [("orders_30d", json!(2)), ("total_30d", json!(129.9))]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            time_ms: 1_700_000_000_000,
            version: Coords::new("shop-features-repartition", 3, 41),
            rolled: false,
        };
        let r = feature_record("context.customers.features", 12, "orders_30d", &output);
        let record = Record {
            topic: r.topic.as_str().into(),
            partition: r.partition.unwrap(),
            offset: 7,
            // Appended just after the input's event time.
            timestamp_ms: 1_700_000_000_100,
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
        };
        let Outcome::Update(u) = router.process(&record) else {
            panic!("not an update: {:?}", router.process(&record));
        };
        assert_eq!(u.entity_type, "customer");
        assert_eq!(u.entity_id, "C-1");
        assert_eq!(u.provenance.event_time_ms, 1_700_000_000_000);
        let Change::Upsert(fields) = u.change else {
            panic!()
        };
        assert_eq!(fields["orders_30d"], json!(2));
        assert_eq!(fields["total_30d"], json!(129.9));
        assert_eq!(
            r.partition,
            Some(partition_for_key(b"C-1", 12)),
            "co-partitioned with context.customers"
        );
    }

    /// Crash points of one task, replayed by hand: after the outputs but before any commit,
    /// and between the aggregation and the dedup commit. The final value counts each distinct
    /// event once, and replays emit values no larger than the final one.
    #[test]
    fn a_task_replayed_after_partial_commits_counts_each_event_once() {
        let config = PipelineConfig::parse("p.yaml", YAML).unwrap();
        let stages = stages(&config);
        let group = &stages[0]; // biggest: max of total, with dedup
        assert_eq!(group.name(), "biggest");
        let dir = tempfile::tempdir().unwrap();
        let tp = TopicPartition::new("rep", 0);
        let inbound = |rep: i64, origin: i64, id: &str, total: f64| Inbound {
            event: Event {
                key: Bytes::from_static(b"C-1"),
                id: Bytes::from(id.to_string()),
                time_ms: 1_000 + rep,
                coords: Coords::new("rep", 0, rep),
                value: json!({ "total": total }),
            },
            origin: TopicPartition::new("orders", 0),
            origin_offset: origin,
            side: JoinSide::None,
        };
        let batch1 = || vec![inbound(0, 0, "a", 5.0), inbound(1, 1, "a", 50.0)];
        let batch2 = || vec![inbound(2, 2, "b", 7.0), inbound(3, 3, "c", 9.0)];
        let max_of = |p: &Pending| p.outputs.last().map(|o| o.fields["biggest"].clone());

        let mut task = Task::open(&StateDb::open(dir.path()).unwrap(), group, 0).unwrap();
        let first = task.process(group, &tp, 2, batch1()).unwrap();
        // "a" again within the dedup window is a duplicate: 50 is never the max.
        assert_eq!(max_of(&first), Some(json!(5.0)));
        // Crash before any commit: the replay emits the same value.
        let replay = task.process(group, &tp, 2, batch1()).unwrap();
        assert_eq!(max_of(&replay), Some(json!(5.0)));
        task.commit(replay).unwrap();
        // Crash between the aggregation and the dedup commit of the next batch.
        let second = task.process(group, &tp, 4, batch2()).unwrap();
        assert_eq!(max_of(&second), Some(json!(9.0)));
        let Task::Features { agg, .. } = &mut task else {
            panic!("a feature task")
        };
        agg.apply(&second.stores[0].1).unwrap();
        drop(task);
        let mut task = Task::open(&StateDb::open(dir.path()).unwrap(), group, 0).unwrap();
        assert_eq!(
            task.resume_offset("rep", 0).unwrap(),
            2,
            "the dedup store is behind"
        );
        let again = task.process(group, &tp, 4, batch2()).unwrap();
        assert!(
            again.outputs.is_empty(),
            "already aggregated: {:?}",
            again.outputs
        );
        task.commit(again).unwrap();
        assert_eq!(task.resume_offset("rep", 0).unwrap(), 4);
        // A re-keyed copy of origin 3 (new repartition offset) changes nothing.
        let copy = task
            .process(group, &tp, 5, vec![inbound(4, 3, "c", 9.0)])
            .unwrap();
        assert!(copy.outputs.is_empty());
    }

    /// The `state` section sizes the dedup task's key index; with or without it the task
    /// decides the same.
    #[test]
    fn a_dedup_task_keeps_its_ids_in_a_key_index_the_state_section_sizes() {
        for (section, indexed) in [("", Some(2)), ("state: { key_index_bytes: 0 }\n", None)] {
            let config = PipelineConfig::parse("p.yaml", &format!("{YAML}{section}")).unwrap();
            let stages = stages(&config);
            let group = &stages[0]; // biggest: max of total, with dedup
            let dir = tempfile::tempdir().unwrap();
            let db = StateDb::open_with(dir.path(), state_db_options(&config.state)).unwrap();
            let mut task = Task::open(&db, group, 0).unwrap();
            let tp = TopicPartition::new("rep", 0);
            let events = (0..3)
                .map(|n| Inbound {
                    event: Event {
                        key: Bytes::from_static(b"C-1"),
                        id: Bytes::from(["a", "b", "a"][n]),
                        time_ms: 1_000 + n as i64,
                        coords: Coords::new("rep", 0, n as i64),
                        value: json!({ "total": ([5.0, 7.0, 50.0][n]) }),
                    },
                    origin: TopicPartition::new("orders", 0),
                    origin_offset: n as i64,
                    side: JoinSide::None,
                })
                .collect();
            let pending = task.process(group, &tp, 3, events).unwrap();
            let last = pending.outputs.last().map(|o| o.fields["biggest"].clone());
            assert_eq!(last, Some(json!(7.0)), "the second \"a\" is a duplicate");
            task.commit(pending).unwrap();
            let Task::Features {
                dedup: Some(dedup), ..
            } = &task
            else {
                panic!("a feature task with dedup")
            };
            assert_eq!(dedup.indexed_keys(), indexed, "{section}");
        }
    }

    const JOIN_YAML: &str = r#"
name: shop
entities:
  customer: { key: customer_id, topic: context.customers }
  order: { key: order_id, topic: context.orders, belongs_to: { customer: customer_id } }
sources:
  shop: { topic: context.orders, entity: order, fields: { customer_id: c, total: t } }
  crm: { topic: context.customers, entity: customer, match: { ce_source: crm }, fields: { tier: t } }
  billing: { topic: context.customers, entity: customer, match: { ce_source: billing }, fields: { city: c } }
joins:
  order_customer:
    from: order
    with: customer
    key: customer_id
    fields: { customer_tier: tier, customer_city: city }
"#;

    #[test]
    fn a_join_is_a_stage_with_a_changelog_and_writes_the_stream_entity() {
        let config = PipelineConfig::parse("p.yaml", JOIN_YAML).unwrap();
        let stages = stages(&config);
        assert_eq!(stages.len(), 1);
        assert_eq!(stages[0].name(), "order_customer");
        assert_eq!(stages[0].target(), "order");
        let topics: Vec<String> = topic_specs(&config).into_iter().map(|t| t.name).collect();
        assert_eq!(
            topics,
            vec![
                "context.orders.features",
                "shop-features-repartition",
                "shop-order_customer-changelog",
            ]
        );
    }

    /// Table rows from two sources merge; each order sees the row as of its place in the
    /// repartition topic; a replay after a crash before the commit emits the same; re-keyed
    /// copies are dropped; a deleted customer leaves later orders with nulls (left join).
    #[test]
    fn a_join_task_enriches_in_topic_order_and_replays_identically() {
        let config = PipelineConfig::parse("p.yaml", JOIN_YAML).unwrap();
        let stage = &stages(&config)[0];
        let dir = tempfile::tempdir().unwrap();
        let tp = TopicPartition::new("rep", 0);
        let inbound = |rep: i64, origin: (&str, i64), side: JoinSide, fields: Value| Inbound {
            event: Event {
                key: Bytes::from_static(b"C-1"),
                id: Bytes::from(format!("e{rep}")),
                time_ms: 1_000 + rep,
                coords: Coords::new("rep", 0, rep),
                value: fields,
            },
            origin: TopicPartition::new(origin.0, 0),
            origin_offset: origin.1,
            side,
        };
        let table = |rep, origin, row: Value| {
            inbound(
                rep,
                ("customers", origin),
                JoinSide::Table(Some(row.clone())),
                row,
            )
        };
        let order = |rep, origin, id: &str| {
            inbound(
                rep,
                ("orders", origin),
                JoinSide::Stream(id.into()),
                Value::Null,
            )
        };
        let batch1 = || {
            vec![
                order(0, 0, "O-0"),
                table(1, 0, json!({ "tier": "gold" })),
                order(2, 1, "O-1"),
                table(3, 1, json!({ "city": "Lyon" })),
                order(4, 2, "O-2"),
            ]
        };
        let mut task = Task::open(&StateDb::open(dir.path()).unwrap(), stage, 0).unwrap();
        let first = task.process(stage, &tp, 5, batch1()).unwrap();
        let expected = vec![
            (
                "O-0".to_string(),
                json!({ "customer_city": null, "customer_tier": null }),
            ),
            (
                "O-1".to_string(),
                json!({ "customer_city": null, "customer_tier": "gold" }),
            ),
            (
                "O-2".to_string(),
                json!({ "customer_city": "Lyon", "customer_tier": "gold" }),
            ),
        ];
        assert_eq!(outputs_of(&first), expected);
        assert_eq!(first.outputs[2].time_ms, 1_004);
        // Crash before the commit: the replay emits the same.
        let replay = task.process(stage, &tp, 5, batch1()).unwrap();
        assert_eq!(outputs_of(&replay), expected);
        task.commit(replay).unwrap();
        drop(task);
        let mut task = Task::open(&StateDb::open(dir.path()).unwrap(), stage, 0).unwrap();
        assert_eq!(task.resume_offset("rep", 0).unwrap(), 5);
        // The re-key loop sent the gold row again (origin 0) after a crash: dropped, so the
        // order after it still sees Lyon. Then the customer is deleted.
        let batch2 = vec![
            table(5, 0, json!({ "tier": "gold" })),
            order(6, 3, "O-3"),
            inbound(7, ("customers", 2), JoinSide::Table(None), Value::Null),
            order(8, 4, "O-4"),
        ];
        let second = task.process(stage, &tp, 9, batch2).unwrap();
        assert_eq!(
            outputs_of(&second),
            vec![
                (
                    "O-3".to_string(),
                    json!({ "customer_city": "Lyon", "customer_tier": "gold" })
                ),
                (
                    "O-4".to_string(),
                    json!({ "customer_city": null, "customer_tier": null })
                ),
            ]
        );
        task.commit(second).unwrap();
    }

    /// A join task's outputs: (key, fields), in order.
    fn outputs_of(p: &Pending) -> Vec<(String, Value)> {
        p.outputs
            .iter()
            .map(|o| {
                let key = String::from_utf8(o.key.to_vec()).unwrap();
                (key, Value::Object(o.fields.clone()))
            })
            .collect()
    }

    /// A join of an entity with itself (a customer's referrer): one record is both a table row
    /// and a stream update, two repartition records with one origin. Both count; copies of
    /// either are still dropped.
    #[test]
    fn a_self_join_takes_both_sides_of_one_record() {
        let yaml = r#"
name: shop
entities:
  customer: { key: customer_id, topic: context.customers }
sources:
  crm: { topic: context.customers, entity: customer, fields: { name: n, referred_by: r } }
joins:
  referrer:
    from: customer
    with: customer
    key: referred_by
    fields: { referrer_name: name }
"#;
        let config = PipelineConfig::parse("p.yaml", yaml).unwrap();
        let stage = &stages(&config)[0];
        let dir = tempfile::tempdir().unwrap();
        let tp = TopicPartition::new("rep", 0);
        let inbound = |rep: i64, origin: i64, key: &'static str, side: JoinSide| Inbound {
            event: Event {
                key: Bytes::from_static(key.as_bytes()),
                id: Bytes::from(format!("e{origin}")),
                time_ms: 1_000 + rep,
                coords: Coords::new("rep", 0, rep),
                value: Value::Null,
            },
            origin: TopicPartition::new("context.customers", 0),
            origin_offset: origin,
            side,
        };
        let row = |name: &str| JoinSide::Table(Some(json!({ "name": name })));
        // Y, then X referred by Y: X's record is a row (key X) and a stream update (key Y).
        let batch = || {
            vec![
                inbound(0, 0, "Y", row("Yan")),
                inbound(1, 1, "X", row("Xi")),
                inbound(2, 1, "Y", JoinSide::Stream("X".into())),
            ]
        };
        let mut task = Task::open(&StateDb::open(dir.path()).unwrap(), stage, 0).unwrap();
        let first = task.process(stage, &tp, 3, batch()).unwrap();
        let want = vec![("X".to_string(), json!({ "referrer_name": "Yan" }))];
        assert_eq!(outputs_of(&first), want);
        task.commit(first).unwrap();
        // The re-key loop sent X's record again after a crash: both copies are dropped.
        let copies = vec![
            inbound(3, 1, "X", row("Xi")),
            inbound(4, 1, "Y", JoinSide::Stream("X".into())),
        ];
        let again = task.process(stage, &tp, 5, copies).unwrap();
        assert_eq!(outputs_of(&again), vec![]);
    }

    const WINDOWED_YAML: &str = r#"
name: shop
entities:
  customer: { key: customer_id, topic: context.customers }
  order: { key: order_id, topic: context.orders }
sources:
  shop: { topic: context.orders, entity: order, fields: { customer_id: c, total: t } }
features:
  orders_today: { from: order, entity: customer, key: customer_id, agg: count, window: { tumbling: 1d }, grace: 1h }
  spend_today: { from: order, entity: customer, key: customer_id, agg: sum, field: total, window: { tumbling: 1d }, grace: 1h }
  orders_this_visit: { from: order, entity: customer, key: customer_id, agg: count, window: { session: 30m }, grace: 1h }
  orders_last_hour: { from: order, entity: customer, key: customer_id, agg: count, window: { hopping: { size: 1h, advance: 15m } }, grace: 1h }
"#;

    /// Tumbling, session and hopping features show the key's current window with its bounds;
    /// a late event for the shown window updates it, one for an older window (within grace)
    /// does not replace it; a late event that joins two sessions shows the merged session.
    #[test]
    fn windowed_features_show_the_newest_window_and_late_events_never_regress_it() {
        const DAY: i64 = 86_400_000;
        const MIN: i64 = 60_000;
        let config = PipelineConfig::parse("p.yaml", WINDOWED_YAML).unwrap();
        let stages = stages(&config);
        let names: Vec<&str> = stages.iter().map(Stage::name).collect();
        assert_eq!(
            names,
            vec!["orders_today", "orders_this_visit", "orders_last_hour"]
        );
        let dir = tempfile::tempdir().unwrap();
        let tp = TopicPartition::new("rep", 0);
        let mut rep = 0i64;
        let mut inbound = |time_ms: i64, total: f64| {
            rep += 1;
            Inbound {
                event: Event {
                    key: Bytes::from_static(b"C-1"),
                    id: Bytes::from(format!("e{rep}")),
                    time_ms,
                    coords: Coords::new("rep", 0, rep),
                    value: json!({ "total": total }),
                },
                origin: TopicPartition::new("orders", 0),
                origin_offset: rep,
                side: JoinSide::None,
            }
        };
        let shown = |p: &Pending, feature: &str| -> Vec<Value> {
            p.outputs
                .iter()
                .map(|o| o.fields[feature].clone())
                .collect()
        };
        let window = |value: Value, start: i64, end: i64| json!({"value": value, "window_start": format_time(start), "window_end": format_time(end)});

        // Tumbling, one day: two orders on day 10, then one on day 11.
        let today = &stages[0];
        let mut task = Task::open(&StateDb::open(dir.path()).unwrap(), today, 0).unwrap();
        let day10 = 10 * DAY;
        let batch = vec![inbound(day10 + 5, 2.0), inbound(day10 + 9, 3.0)];
        let first = task.process(today, &tp, 2, batch).unwrap();
        assert_eq!(
            shown(&first, "orders_today"),
            vec![window(json!(2), day10, day10 + DAY)]
        );
        assert_eq!(
            shown(&first, "spend_today"),
            vec![window(json!(5.0), day10, day10 + DAY)]
        );
        task.commit(first).unwrap();
        let next = task
            .process(today, &tp, 3, vec![inbound(day10 + DAY + 1, 7.0)])
            .unwrap();
        assert_eq!(
            shown(&next, "orders_today"),
            vec![window(json!(1), day10 + DAY, day10 + 2 * DAY)]
        );
        task.commit(next).unwrap();
        // A late order for day 10 (within the hour of grace) is counted there, but day 11 stays
        // what the customer shows; a late one for day 11 updates it.
        let late = task
            .process(today, &tp, 4, vec![inbound(day10 + 100, 1.0)])
            .unwrap();
        assert!(late.outputs.is_empty(), "{:?}", late.outputs);
        task.commit(late).unwrap();
        let late = task
            .process(today, &tp, 5, vec![inbound(day10 + DAY + 2, 1.0)])
            .unwrap();
        assert_eq!(
            shown(&late, "spend_today"),
            vec![window(json!(8.0), day10 + DAY, day10 + 2 * DAY)]
        );
        task.commit(late).unwrap();
        drop(task);

        // Sessions, 30 minutes of gap: two visits, then a late event that joins them.
        let visit = &stages[1];
        let mut task = Task::open(&StateDb::open(dir.path()).unwrap(), visit, 0).unwrap();
        let t = 1_000 * DAY;
        let batch = vec![
            inbound(t, 1.0),
            inbound(t + 10 * MIN, 1.0),
            inbound(t + 60 * MIN, 1.0),
        ];
        let first = task.process(visit, &tp, 3, batch).unwrap();
        assert_eq!(
            shown(&first, "orders_this_visit"),
            vec![window(json!(1), t + 60 * MIN, t + 60 * MIN)]
        );
        task.commit(first).unwrap();
        let joined = task
            .process(visit, &tp, 4, vec![inbound(t + 35 * MIN, 1.0)])
            .unwrap();
        assert_eq!(
            shown(&joined, "orders_this_visit"),
            vec![window(json!(4), t, t + 60 * MIN)]
        );
        drop(task);

        // Hopping, an hour every 15 minutes: the window shown is the one closing next after
        // the newest order (the last hour up to it), not the one ending last (mostly future).
        let hour = &stages[2];
        let mut task = Task::open(&StateDb::open(dir.path()).unwrap(), hour, 0).unwrap();
        let h10 = 2_000 * DAY + 600 * MIN;
        let batch = vec![inbound(h10 + 5 * MIN, 1.0), inbound(h10 + 20 * MIN, 1.0)];
        let first = task.process(hour, &tp, 2, batch).unwrap();
        assert_eq!(
            shown(&first, "orders_last_hour"),
            vec![window(json!(2), h10 - 30 * MIN, h10 + 30 * MIN)]
        );
        task.commit(first).unwrap();
        let next = task
            .process(hour, &tp, 3, vec![inbound(h10 + 50 * MIN, 1.0)])
            .unwrap();
        assert_eq!(
            shown(&next, "orders_last_hour"),
            vec![window(json!(3), h10, h10 + 60 * MIN)]
        );
        task.commit(next).unwrap();
        // Late, inside the shown hour: it updates it. Late, before it: the shown hour stays.
        let late = task
            .process(hour, &tp, 4, vec![inbound(h10 + 10 * MIN, 1.0)])
            .unwrap();
        assert_eq!(
            shown(&late, "orders_last_hour"),
            vec![window(json!(4), h10, h10 + 60 * MIN)]
        );
        task.commit(late).unwrap();
        let older = task
            .process(hour, &tp, 5, vec![inbound(h10 - 20 * MIN, 1.0)])
            .unwrap();
        assert!(older.outputs.is_empty(), "{:?}", older.outputs);
    }

    /// A tumbling or hopping feature of a quiet key moves on when stream time (another key's
    /// event, or a tick) passes the end of the window it shows: a day without orders shows 0,
    /// "the last hour" decays as its orders leave it. Once at the empty window, a quiet key gets
    /// no more updates; its next event shows its window as usual. The index survives a restart.
    #[test]
    fn a_quiet_keys_windowed_features_move_on_when_its_window_ends() {
        const DAY: i64 = 86_400_000;
        const MIN: i64 = 60_000;
        let config = PipelineConfig::parse("p.yaml", WINDOWED_YAML).unwrap();
        let stages = stages(&config);
        let dir = tempfile::tempdir().unwrap();
        let tp = TopicPartition::new("rep", 0);
        let mut rep = 0i64;
        let mut inbound = |key: &'static str, time_ms: i64| {
            rep += 1;
            let coords = Coords::new("rep", 0, rep);
            let event = match key {
                "tick" => Event::tick(time_ms, coords),
                key => Event {
                    key: Bytes::from_static(key.as_bytes()),
                    id: Bytes::from(format!("e{rep}")),
                    time_ms,
                    coords,
                    value: json!({ "total": 2.5 }),
                },
            };
            (
                rep + 1,
                vec![Inbound {
                    event,
                    origin: TopicPartition::new("orders", 0),
                    origin_offset: rep,
                    side: JoinSide::None,
                }],
            )
        };
        let window = |value: Value, start: i64, end: i64| json!({"value": value, "window_start": format_time(start), "window_end": format_time(end)});
        // (key, feature) of each output, in output order.
        let shown = |p: &Pending, feature: &str| -> Vec<(String, Value)> {
            p.outputs
                .iter()
                .map(|o| {
                    let key = String::from_utf8_lossy(&o.key).to_string();
                    (key, o.fields[feature].clone())
                })
                .collect()
        };
        let at = |key: &str, value: Value| (key.to_string(), value);

        // Tumbling, one day.
        let today = &stages[0];
        let open = || Task::open(&StateDb::open(dir.path()).unwrap(), today, 0).unwrap();
        let mut task = open();
        let run = |task: &mut Task, (end, batch): (i64, Vec<Inbound>)| {
            let pending = task.process(today, &tp, end, batch).unwrap();
            let outputs = (
                shown(&pending, "orders_today"),
                shown(&pending, "spend_today"),
            );
            let ids: Vec<String> = pending
                .outputs
                .iter()
                .map(|o| feature_record("f", 1, "orders_today", o))
                .map(|r| r.headers.into_iter().find(|h| h.key == "ce_id").unwrap())
                .map(|h| String::from_utf8(h.value.unwrap().to_vec()).unwrap())
                .collect();
            task.commit(pending).unwrap();
            (outputs, ids)
        };
        let d10 = 10 * DAY;
        let (d11, d12, d13) = (d10 + DAY, d10 + 2 * DAY, d10 + 3 * DAY);
        run(&mut task, inbound("C-1", d10 + 5));
        run(&mut task, inbound("C-2", d10 + 9));
        // Day 11: C-1 orders; C-2 shows day 11 with nothing in it.
        let ((orders, spend), ids) = run(&mut task, inbound("C-1", d11 + 1));
        assert_eq!(
            orders,
            vec![
                at("C-1", window(json!(1), d11, d12)),
                at("C-2", window(json!(0), d11, d12))
            ]
        );
        assert_eq!(spend[1], at("C-2", window(json!(0.0), d11, d12)));
        assert_eq!(ids[1], format!("{}/rolled/C-2", ids[0]), "ids: {ids:?}");
        drop(task);
        let mut task = open();
        // C-2 orders on day 11 after all: it shows it, and waits for its end again.
        let ((orders, _), _) = run(&mut task, inbound("C-2", d11 + 5));
        assert_eq!(orders, vec![at("C-2", window(json!(1), d11, d12))]);
        let ((orders, _), _) = run(&mut task, inbound("C-1", d12 + 1));
        assert_eq!(
            orders,
            vec![
                at("C-1", window(json!(1), d12, d13)),
                at("C-2", window(json!(0), d12, d13))
            ]
        );
        // C-2, at an empty window, gets nothing more until its next order.
        let ((orders, _), _) = run(&mut task, inbound("C-1", d12 + 3));
        assert_eq!(orders, vec![at("C-1", window(json!(2), d12, d13))]);
        let ((orders, _), _) = run(&mut task, inbound("C-2", d12 + 2));
        assert_eq!(orders, vec![at("C-2", window(json!(1), d12, d13))]);
        // A tick on day 13 moves both on.
        let ((orders, _), _) = run(&mut task, inbound("tick", d13 + 7));
        assert_eq!(
            orders,
            vec![
                at("C-1", window(json!(0), d13, d13 + DAY)),
                at("C-2", window(json!(0), d13, d13 + DAY))
            ]
        );
        let ((orders, _), _) = run(&mut task, inbound("tick", d13 + 5 * DAY));
        assert!(orders.is_empty(), "{orders:?}");
        drop(task);

        // Hopping, an hour every 15 minutes: "the last hour" of a quiet C-2 decays step by
        // step as stream time moves on.
        let hour = &stages[2];
        let mut task = Task::open(&StateDb::open(dir.path()).unwrap(), hour, 0).unwrap();
        let mut run = |(end, batch): (i64, Vec<Inbound>)| {
            let pending = task.process(hour, &tp, end, batch).unwrap();
            let outputs = shown(&pending, "orders_last_hour");
            task.commit(pending).unwrap();
            outputs
        };
        let h = 2_000 * DAY + 600 * MIN;
        run(inbound("C-2", h + 5 * MIN));
        assert_eq!(
            run(inbound("C-2", h + 20 * MIN)),
            vec![at("C-2", window(json!(2), h - 30 * MIN, h + 30 * MIN))]
        );
        // Nothing of C-2's hour has left it yet.
        assert_eq!(
            run(inbound("C-1", h + 35 * MIN)),
            vec![at("C-1", window(json!(1), h - 15 * MIN, h + 45 * MIN))]
        );
        // Its first order left: the first hour after it.
        assert_eq!(
            run(inbound("C-1", h + 70 * MIN)),
            vec![
                at("C-1", window(json!(2), h + 15 * MIN, h + 75 * MIN)),
                at("C-2", window(json!(1), h + 15 * MIN, h + 75 * MIN))
            ]
        );
        // Every order left: each shows the empty hour after its last order.
        assert_eq!(
            run(inbound("tick", h + 140 * MIN)),
            vec![
                at("C-1", window(json!(0), h + 75 * MIN, h + 135 * MIN)),
                at("C-2", window(json!(0), h + 30 * MIN, h + 90 * MIN))
            ]
        );
        assert!(run(inbound("tick", h + 600 * MIN)).is_empty());
    }

    /// The `n`th repartition record of partition 0 (offset `n`): an order of `key` (`{total:
    /// 1}`) at `time_ms`, or a tick when `key` is `None`.
    fn order_or_tick(n: i64, key: Option<&str>, time_ms: i64) -> Inbound {
        let coords = Coords::new("rep", 0, n);
        let event = match key {
            None => Event::tick(time_ms, coords),
            Some(key) => Event {
                key: Bytes::from(key.to_string().into_bytes()),
                id: Bytes::from(format!("e{n}")),
                time_ms,
                coords,
                value: json!({ "total": 1 }),
            },
        };
        Inbound {
            event,
            origin: TopicPartition::new("orders", 0),
            origin_offset: n,
            side: JoinSide::None,
        }
    }

    /// A hopping key at the empty window it rolled to gets a late event whose own window had
    /// closed while later ones had not (grace 0): no window update shows it, so the key is
    /// rolled at once and shows the count, then moves on when the event leaves.
    #[test]
    fn a_late_event_for_a_key_at_its_empty_window_is_shown() {
        const MIN: i64 = 60_000;
        let yaml = WINDOWED_YAML.replace(
            "window: { hopping: { size: 1h, advance: 15m } }, grace: 1h",
            "window: { hopping: { size: 1h, advance: 15m } }",
        );
        let config = PipelineConfig::parse("p.yaml", &yaml).unwrap();
        let hour = &stages(&config)[2];
        let dir = tempfile::tempdir().unwrap();
        let mut task = Task::open(&StateDb::open(dir.path()).unwrap(), hour, 0).unwrap();
        let tp = TopicPartition::new("rep", 0);
        let mut rep = 0i64;
        let mut run = |key: &'static str, time_ms: i64| {
            rep += 1;
            let inbound = order_or_tick(rep, (key != "tick").then_some(key), time_ms);
            let pending = task.process(hour, &tp, rep + 1, vec![inbound]).unwrap();
            let shown: Vec<(String, Value)> = pending
                .outputs
                .iter()
                .map(|o| {
                    let key = String::from_utf8_lossy(&o.key).to_string();
                    (key, o.fields["orders_last_hour"].clone())
                })
                .collect();
            task.commit(pending).unwrap();
            shown
        };
        let window = |value: i64, start: i64, end: i64| json!({"value": value, "window_start": format_time(start), "window_end": format_time(end)});
        let h = 2_000 * 86_400_000 + 600 * MIN;
        run("X", h + 10 * MIN);
        // Its order leaves: the empty hour after it.
        assert_eq!(
            run("tick", h + 60 * MIN),
            [("X".to_string(), window(0, h + 15 * MIN, h + 75 * MIN))]
        );
        // Another key moves stream time past h+75; then an order of X from h+50 comes late:
        // the hour closing next after it (ending h+75, the one shown) has closed, the hour
        // ending h+105 has not. X shows the order at once.
        assert_eq!(
            run("C-1", h + 80 * MIN),
            [("C-1".to_string(), window(1, h + 30 * MIN, h + 90 * MIN))]
        );
        assert_eq!(
            run("X", h + 50 * MIN),
            [("X".to_string(), window(1, h + 15 * MIN, h + 75 * MIN))]
        );
        // It leaves at h+105 (C-1's order is still in its hour: nothing for C-1).
        assert_eq!(
            run("tick", h + 110 * MIN),
            [("X".to_string(), window(0, h + 60 * MIN, h + 120 * MIN))]
        );
    }

    /// When more keys are due than a batch rolls, the rest roll in the next batches, each
    /// once.
    #[test]
    fn keys_due_beyond_a_batchs_share_roll_in_the_next_batches() {
        const DAY: i64 = 86_400_000;
        let config = PipelineConfig::parse("p.yaml", WINDOWED_YAML).unwrap();
        let today = &stages(&config)[0];
        let dir = tempfile::tempdir().unwrap();
        let mut task = Task::open(&StateDb::open(dir.path()).unwrap(), today, 0).unwrap();
        let tp = TopicPartition::new("rep", 0);
        let mut rep = 0i64;
        let mut run = |key: Option<String>, time_ms: i64| {
            rep += 1;
            let inbound = order_or_tick(rep, key.as_deref(), time_ms);
            let pending = task.process(today, &tp, rep + 1, vec![inbound]).unwrap();
            let keys: Vec<String> = pending
                .outputs
                .iter()
                .map(|o| String::from_utf8_lossy(&o.key).to_string())
                .collect();
            task.commit(pending).unwrap();
            keys
        };
        for i in 0..7 {
            run(Some(format!("C-{i}")), 10 * DAY + i);
        }
        let mut rolled = run(None, 11 * DAY);
        assert_eq!(rolled, ["C-0", "C-1", "C-2"]);
        rolled.extend(run(None, 11 * DAY + 1));
        rolled.extend(run(None, 11 * DAY + 2));
        rolled.extend(run(None, 11 * DAY + 3));
        let expected: Vec<String> = (0..7).map(|i| format!("C-{i}")).collect();
        assert_eq!(rolled, expected);
    }

    #[test]
    fn high_water_drops_re_keyed_copies() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FjallStore::open(dir.path(), "t", Default::default()).unwrap();
        let inbound = |rep: i64, origin: i64| Inbound {
            event: Event {
                key: Bytes::from_static(b"k"),
                id: Bytes::from(format!("e{origin}")),
                time_ms: 1,
                coords: Coords::new("rep", 0, rep),
                value: Value::Null,
            },
            origin: TopicPartition::new("in", 0),
            origin_offset: origin,
            side: JoinSide::None,
        };
        let mut hw = HighWater::default();
        let kept = hw
            .filter(&store, vec![inbound(0, 5), inbound(1, 9)])
            .unwrap();
        assert_eq!(kept.len(), 2);
        let mut batch = WriteBatch::default();
        hw.finish(&mut batch);
        store.apply(&batch).unwrap();
        // The re-key loop crashed before its commit and sent origin 5 and 9 again, then 12.
        let mut hw = HighWater::default();
        let kept = hw
            .filter(&store, vec![inbound(2, 5), inbound(3, 9), inbound(4, 12)])
            .unwrap();
        let offsets: Vec<i64> = kept.iter().map(|i| i.origin_offset).collect();
        assert_eq!(offsets, vec![12]);
    }
}
