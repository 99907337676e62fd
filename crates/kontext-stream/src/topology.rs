//! Runs a [`Topology`] built with `kontext_process`'s Rust DSL, on the embedded log or on
//! Kafka, with the same state, changelog and offset protocol as the pipeline file's
//! processor ([`crate::processor`], `docs/processing.md`).
//!
//! ```no_run
//! # async fn run(log: std::sync::Arc<dyn kontext_log::Log>) -> Result<(), Box<dyn std::error::Error>> {
//! use kontext_process::*;
//! use kontext_stream::topology::TopologyRunner;
//!
//! let orders = Topology::stream("context.orders")
//!     .filter("live", Predicate::FieldNotEquals { field: FieldPath::new("status"), value: "test".into() })
//!     .dedup("orders-dedup", DedupConfig { window_ms: 3_600_000 })
//!     .join_table("with-customer", "context.customers", JoinConfig {
//!         kind: JoinKind::Left,
//!         key: JoinKey::Field(FieldPath::new("customer_id")),
//!         field: "customer".into(),
//!         table: TableMode::Replace,
//!     })
//!     .to("orders.enriched");
//! let runner = TopologyRunner::new(Topology::new("shop").with(orders), log, "data".as_ref());
//! runner.run(tokio_util::sync::CancellationToken::new()).await?;
//! # Ok(()) }
//! ```
//!
//! A pipeline of the topology is cut into **segments** at each join by foreign key, as Kafka
//! Streams cuts sub-topologies at a repartition: a segment consumes one topic (the source, or
//! the repartition topic) plus the table topic of each of its joins, with consumer group
//! `<app>.<first operator>`, and ends by producing to the sink or re-keying into the next
//! segment's repartition topic. Per partition of its input, a segment has one **task**: one
//! state store per stateful operator (dedup, join, aggregate), a keyspace
//! `<operator>.<partition>` of the fjall database `<data_dir>/state/<app>/tasks.fjall`, backed
//! by the compacted changelog `<app>-<operator>-changelog`.
//!
//! Per polled batch and task: decode (invalid records to `<topic>.dlq`, as the sinks do), run
//! the operators in order, then (a) produce the outputs, (b) produce each store's changelog
//! records, downstream store first, each acknowledged before the next, (c) commit the state
//! batches (which carry the input offsets) downstream first, (d) commit the group's offsets.
//! At start and when a partition is assigned the stores are brought up to their changelogs,
//! and the group is rewound to the stores' offsets where it committed past them. So offsets
//! never pass an event whose effects are not durable, a crash between (a) and (c) re-derives
//! the same outputs (every output carries the coordinates of the input that produced it, and
//! an operator skips inputs below its store's offsets), and an upstream store never gets
//! ahead of a downstream one.
//!
//! Events: a source record is decoded as a context event (CloudEvents binary, structured or
//! plain, [`kontext_core::envelope`]): key = record key, id = `ce_id` (or the record's
//! coordinates), time = `ce_time` (or the record timestamp), value = the JSON payload. A
//! tombstone on a stream carries no event and is skipped. Outputs are binary-mode CloudEvents
//! (`ce_source` `kontext/<app>`, `ce_type` `kontext.topology.<operator>`) with the
//! coordinates of the input that produced them in `kontext_origin_*` headers: forwarded and
//! enriched events keep their id, key and time (after a join by foreign key the key is the
//! foreign key, as after Kafka Streams' `selectKey`); an aggregate emits, per updated window,
//! `{"window": {"start", "end"}, "<function>": value, ...}` keyed by the group key.
//!
//! Outputs are at-least-once with stable ids and versions, which the versioned store upserts
//! and a downstream dedup turn into effectively-once results; on Kafka,
//! [`TopologyRunner::with_exactly_once`] commits each batch of a segment in one transaction
//! instead, as the pipeline file's processor does under `exactly_once`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use kontext_core::config::{DeadLetterConfig, RetryConfig, RetryPolicy};
use kontext_core::envelope::{self, format_time};
use kontext_core::jq::{JqInput, JqProgram};
use kontext_core::partitioner::partition_for_key;
use kontext_core::record::{Header, ProduceRecord, Record, TopicPartition};
use kontext_log::{ConsumerConfig, Log, LogError, Producer, TopicSpec, TransactionalProducer};
use kontext_process::{
    changelog_topic_name, next_side, origin_coords, rekey, rekey_as, Aggregate, Coords,
    DedupDecision, Deduplicate, EnrichmentJoin, Event, FieldPath, FjallStore, JoinInput, JoinKind,
    Op, Partitioner, Plan, Predicate, RekeyError, Side, Stage, StateDb, StateDbOptions, StateStore,
    StoreError, TableUpdate, TopicLayout, Topology, TopologyError, WriteBatch,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::dlq::DeadLetters;
use crate::metrics::PipelineMetrics;
use crate::normalize::{NormalizeError, ProcessError};
use crate::processor::{
    changelog_spans, committed_before_sync, continues_changelog, define, instance_transactional_id,
    never_back, newly_assigned, next_offsets, open_state_db, other_definition, retry_transient,
    rewind_to_state, send, send_changelog, send_transaction, sync_stores_with_changelogs, Drain,
    HighWater, Ownership, ProcessorError, Restore, CHANGELOG_END_KEY, STATE_DB_DIR,
};
use crate::retry::Waiter;

/// Why a topology does not run.
#[derive(Debug, thiserror::Error)]
pub enum TopologyRunError {
    /// The topology does not fit the topics (every problem, found at once).
    #[error("the topology cannot run: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<TopologyError>),
    /// The log or a state store failed permanently.
    #[error(transparent)]
    Processor(#[from] ProcessorError),
}

impl From<LogError> for TopologyRunError {
    fn from(e: LogError) -> Self {
        TopologyRunError::Processor(e.into())
    }
}

impl From<StoreError> for TopologyRunError {
    fn from(e: StoreError) -> Self {
        TopologyRunError::Processor(e.into())
    }
}

/// Runs a [`Topology`] until shutdown.
pub struct TopologyRunner {
    topology: Topology,
    log: Arc<dyn Log>,
    state_dir: PathBuf,
    policy: RetryPolicy,
    metrics: Arc<PipelineMetrics>,
    exactly_once: bool,
    state: StateDbOptions,
}

/// A part of a pipeline between two topics, run by one consumer group.
#[derive(Debug)]
struct Segment {
    group: String,
    input: String,
    /// The input is a repartition topic: events keep their original coordinates (headers).
    rekeyed: bool,
    /// The field a repartition input is keyed by (`group_by`, or a join's foreign key).
    keyed_by: Option<String>,
    partitions: i32,
    ops: Vec<Operator>,
    output: Output,
}

#[derive(Debug)]
enum Operator {
    Filter {
        name: String,
        predicate: Predicate,
        jq: Option<JqProgram>,
    },
    Dedup {
        name: String,
        op: Deduplicate,
    },
    Join {
        name: String,
        table: String,
        op: EnrichmentJoin,
    },
    Aggregate {
        name: String,
        op: Aggregate,
    },
}

impl Operator {
    fn name(&self) -> &str {
        match self {
            Operator::Filter { name, .. }
            | Operator::Dedup { name, .. }
            | Operator::Join { name, .. }
            | Operator::Aggregate { name, .. } => name,
        }
    }

    fn stateful(&self) -> bool {
        !matches!(self, Operator::Filter { .. })
    }
}

#[derive(Debug)]
enum Output {
    Sink {
        topic: String,
        partitions: i32,
    },
    Rekey {
        by: FieldPath,
        topic: String,
        partitions: i32,
        missing: Missing,
    },
}

/// What a re-key does with an event that lacks the key field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missing {
    /// Sends it under its own key (a left join emits it unenriched).
    Keep,
    /// Drops it, counted as an unmatched join input (an inner join would drop it too).
    Unmatched,
    /// Drops it, counted as filtered (`group_by`, as Kafka Streams drops a null key).
    Filtered,
}

/// What one life of a segment's consumer works with.
#[derive(Clone, Copy)]
struct SegmentLoop<'a> {
    seg: &'a Segment,
    producer: &'a dyn Producer,
    /// `Some` under `exactly_once`: each batch is one Kafka transaction.
    txn: Option<&'a dyn TransactionalProducer>,
    letters: &'a DeadLetters,
}

/// One partition's records of a polled batch, and the table rows read ahead of the group
/// ([`TopologyRunner::catch_up_tables`]) by table topic.
struct PartitionRecords<'a> {
    polled: &'a [&'a Record],
    read_ahead: Option<&'a BTreeMap<String, Vec<Record>>>,
}

/// One task's share of a batch, before it is committed.
#[derive(Default)]
struct TaskBatch {
    outputs: Vec<ProduceRecord>,
    letters: Vec<ProduceRecord>,
    /// State batches as (operator index, batch), in commit order (downstream first).
    states: Vec<(usize, WriteBatch)>,
}

impl TopologyRunner {
    /// A runner for `topology`, keeping its state under `<data_dir>/state/<app>/`.
    pub fn new(topology: Topology, log: Arc<dyn Log>, data_dir: &Path) -> Self {
        Self {
            state_dir: data_dir.join("state").join(&topology.app),
            topology,
            log,
            policy: RetryConfig::default().waiting_policy(),
            metrics: Arc::default(),
            exactly_once: false,
            state: StateDbOptions::default(),
        }
    }

    /// The memory the tasks' state may use besides fjall's own, shared by all of them: the
    /// value cache and the dedup key indexes (default 64 MiB each; the pipeline file's
    /// `state` section is the same setting for `kontext run`).
    pub fn with_state_budgets(mut self, options: StateDbOptions) -> Self {
        self.state = options;
        self
    }

    /// Commits each batch's outputs, changelog records and input offsets in one Kafka
    /// transaction (Kafka Streams' `exactly_once_v2`): `read_committed` readers of the sinks
    /// see every output once. Kafka only: on the embedded log the run fails with the log's
    /// "no transactions" error. The transactional id of a segment is
    /// `<segment group>.<random>`, the random part kept in the state directory.
    pub fn with_exactly_once(mut self, exactly_once: bool) -> Self {
        self.exactly_once = exactly_once;
        self
    }

    /// How the runner waits out an unavailable log (default: `retry.defaults`' built-in
    /// policy).
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Counts late and duplicate inputs, unmatched joins and restored changelog records into
    /// `metrics` (the `kontext_process_*` counters).
    pub fn with_metrics(mut self, metrics: Arc<PipelineMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Checks the topology against the log's topics and creates what it needs: repartition
    /// topics, compacted changelogs, the dead-letter topic of each consumed topic, and sink
    /// topics that do not exist yet (with the partition count of the topic they are fed
    /// from). Returns the plan. [`TopologyRunner::run`] calls it first.
    pub async fn prepare(&self) -> Result<Plan, TopologyRunError> {
        Ok(self.segments().await?.0)
    }

    async fn segments(&self) -> Result<(Plan, Vec<Segment>), TopologyRunError> {
        let mut layouts: BTreeMap<String, Option<TopicLayout>> = BTreeMap::new();
        for pipeline in &self.topology.pipelines {
            let tables = pipeline.ops.iter().filter_map(|op| match op {
                Op::JoinTable { table, .. } => Some(table),
                _ => None,
            });
            let ends = [&pipeline.source, &pipeline.sink];
            for topic in ends.into_iter().chain(tables) {
                if !layouts.contains_key(topic) {
                    let layout = self.layout(topic).await?;
                    layouts.insert(topic.clone(), layout);
                }
            }
        }
        // A sink that another pipeline reads is created by the runner: plan with the layout it
        // will get (the partitions of the segment writing it), resolving chains in any order.
        for _ in 0..self.topology.pipelines.len() {
            for pipeline in &self.topology.pipelines {
                if layouts.get(&pipeline.sink).is_some_and(Option::is_some) {
                    continue;
                }
                let fk_table = pipeline.ops.iter().rev().find_map(|op| match op {
                    Op::JoinTable { table, config, .. }
                        if matches!(config.key, kontext_process::JoinKey::Field(_)) =>
                    {
                        layouts.get(table).cloned().flatten()
                    }
                    _ => None,
                });
                let from = fk_table.or_else(|| layouts.get(&pipeline.source).cloned().flatten());
                if let Some(from) = from {
                    let layout = TopicLayout {
                        name: pipeline.sink.clone(),
                        ..from
                    };
                    layouts.insert(pipeline.sink.clone(), Some(layout));
                }
            }
        }
        let plan = self
            .topology
            .plan(&|topic: &str| layouts.get(topic).cloned().flatten())
            .map_err(TopologyRunError::Invalid)?;
        let mut segments = Vec::new();
        for stages in &plan.pipelines {
            // Input, the field it is keyed by when it is a repartition topic, partitions, ops.
            let mut current: Option<(String, Option<String>, i32, Vec<Operator>)> = None;
            for (i, stage) in stages.iter().enumerate() {
                match stage {
                    Stage::Source { topic } => {
                        let partitions = layouts
                            .get(topic)
                            .cloned()
                            .flatten()
                            .map_or(1, |l| l.partitions);
                        current = Some((topic.clone(), None, partitions, Vec::new()));
                    }
                    Stage::Operator { op, .. } => {
                        if let Some((_, _, _, ops)) = &mut current {
                            ops.push(compile(op)?);
                        }
                    }
                    Stage::Repartition {
                        op,
                        by,
                        topic,
                        partitions,
                    } => {
                        // A left join still gets an event without the foreign key (it emits it
                        // unenriched); an inner join and a group_by drop it.
                        let missing = match stages.get(i + 1) {
                            Some(Stage::Operator {
                                op: Op::JoinTable { name, config, .. },
                                ..
                            }) if name == op => match config.kind {
                                JoinKind::Left => Missing::Keep,
                                JoinKind::Inner => Missing::Unmatched,
                            },
                            _ => Missing::Filtered,
                        };
                        if let Some((input, rekeyed, p, ops)) = current.take() {
                            segments.push(segment(
                                &self.topology.app,
                                input,
                                rekeyed,
                                p,
                                ops,
                                Output::Rekey {
                                    by: by.clone(),
                                    topic: topic.clone(),
                                    partitions: *partitions,
                                    missing,
                                },
                                op,
                            ));
                        }
                        current =
                            Some((topic.clone(), Some(by.to_string()), *partitions, Vec::new()));
                    }
                    Stage::Sink { topic } => {
                        if let Some((input, rekeyed, p, ops)) = current.take() {
                            // Outputs are partitioned like Kafka's default partitioner does
                            // over the sink's own partition count.
                            let partitions = layouts
                                .get(topic)
                                .cloned()
                                .flatten()
                                .map_or(p, |l| l.partitions);
                            let sink = Output::Sink {
                                topic: topic.clone(),
                                partitions,
                            };
                            let name = format!("{input}-to-{topic}");
                            segments.push(segment(
                                &self.topology.app,
                                input,
                                rekeyed,
                                p,
                                ops,
                                sink,
                                &name,
                            ));
                        }
                    }
                }
            }
        }
        self.create_topics(&segments).await?;
        Ok((plan, segments))
    }

    /// The layout of `topic`, `None` if it does not exist.
    async fn layout(&self, topic: &str) -> Result<Option<TopicLayout>, LogError> {
        match self.log.describe_topic(topic).await {
            Ok(d) => Ok(Some(TopicLayout {
                name: topic.to_owned(),
                partitions: d.partitions.len() as i32,
                // Both backends partition keyed records with murmur2: kontext's producers
                // set it on Kafka, as Kafka's Java clients do by default.
                partitioner: Partitioner::Murmur2,
            })),
            Err(LogError::UnknownTopic(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn create_topics(&self, segments: &[Segment]) -> Result<(), LogError> {
        let dlq = DeadLetterConfig::default();
        let mut specs: BTreeMap<String, TopicSpec> = BTreeMap::new();
        for s in segments {
            let mut add = |spec: TopicSpec| {
                specs.entry(spec.name.clone()).or_insert(spec);
            };
            add(TopicSpec::new(dlq.topic_for(&s.input), s.partitions));
            for op in &s.ops {
                if let Operator::Join { table, .. } = op {
                    add(TopicSpec::new(dlq.topic_for(table), s.partitions));
                }
                if op.stateful() {
                    let mut spec = TopicSpec::new(
                        changelog_topic_name(&self.topology.app, op.name()),
                        s.partitions,
                    );
                    spec.compacted = true;
                    add(spec);
                }
            }
            match &s.output {
                Output::Sink { topic, partitions } => {
                    if self.layout(topic).await?.is_none() {
                        add(TopicSpec::new(topic.clone(), *partitions));
                    }
                }
                Output::Rekey {
                    topic, partitions, ..
                } => add(TopicSpec::new(topic.clone(), *partitions)),
            }
        }
        for spec in specs.values() {
            self.log.create_topic(spec).await?;
        }
        Ok(())
    }

    /// Runs every segment until `shutdown`; then each finishes what its topics hold (a
    /// segment after the one feeding it), for at most [`crate::processor::DRAIN_TIMEOUT`].
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), TopologyRunError> {
        let (_, segments) = self.segments().await?;
        let db = open_state_db(&self.state_dir.join(STATE_DB_DIR), self.state)?;
        if self.exactly_once {
            // Creates the instance's random id part once, before the segments read it
            // concurrently (each would otherwise write its own on a first run).
            instance_transactional_id(&self.topology.app, &self.state_dir)?;
        }
        // A producer per segment, as the pipeline file's processor has one per loop: each
        // segment waits for its batch's acknowledgements, which on one shared connection the
        // broker would serve one segment after the other. The first segment takes the log's
        // shared producer; under exactly_once all do, their batches going through
        // transactional producers.
        let shared = self.log.producer().await?;
        let mut producers = Vec::new();
        for i in 0..segments.len() {
            producers.push(match i > 0 && !self.exactly_once {
                true => self.log.dedicated_producer().await?,
                false => shared.clone(),
            });
        }
        let done: Vec<CancellationToken> =
            segments.iter().map(|_| CancellationToken::new()).collect();
        let mut runs = Vec::new();
        let this = &self;
        for ((i, seg), producer) in segments.iter().enumerate().zip(producers) {
            // A rekeyed segment drains after the segment before it (same pipeline) stopped.
            let upstream = (seg.rekeyed && i > 0).then(|| &done[i - 1]);
            let drain = Drain::new(&shutdown, upstream, self.policy);
            let (db, done) = (&db, &done[i]);
            runs.push(async move {
                let result = this.run_segment(seg, db, producer, drain).await;
                done.cancel();
                result
            });
        }
        futures_util::future::try_join_all(runs).await?;
        Ok(())
    }

    async fn run_segment(
        &self,
        seg: &Segment,
        db: &StateDb,
        producer: Arc<dyn Producer>,
        mut drain: Drain<'_>,
    ) -> Result<(), ProcessorError> {
        let mut tasks: BTreeMap<i32, Vec<Option<FjallStore>>> = BTreeMap::new();
        for p in 0..seg.partitions {
            let mut stores = Vec::new();
            for op in &seg.ops {
                stores.push(if op.stateful() {
                    let keyspace = format!("{}.{p}", op.name());
                    let mut store =
                        FjallStore::open_in(db, &keyspace, op.name(), Default::default())?;
                    if let Operator::Dedup { .. } = op {
                        Deduplicate::prepare_store(&mut store);
                    }
                    Some(store)
                } else {
                    None
                });
            }
            tasks.insert(p, stores);
        }
        let letters = DeadLetters::new(
            DeadLetterConfig::default(),
            self.topology.app.clone(),
            seg.group.clone(),
            producer.clone(),
        )
        .with_retry(self.policy);
        let mut failures = Waiter::new(self.policy);
        loop {
            // Registered (again) before the state is synced: registering the transactional id
            // aborts a transaction this instance left open, whose records would otherwise hide
            // the rest of the changelogs from the read_committed restore until it times out.
            let txn = if self.exactly_once {
                let id = instance_transactional_id(&seg.group, &self.state_dir)?;
                let registered = retry_transient(
                    "registering the transactional producer",
                    &self.policy,
                    drain.shutdown,
                    || self.log.transactional_producer(&id),
                )
                .await?;
                let Some(txn) = registered else {
                    return Ok(());
                };
                info!(group = %seg.group, transactional_id = %id, "topology segment commits in Kafka transactions");
                Some(txn)
            } else {
                None
            };
            let loop_ = SegmentLoop {
                seg,
                producer: producer.as_ref(),
                txn: txn.as_deref(),
                letters: &letters,
            };
            match self
                .run_tasks(loop_, &mut tasks, &mut drain, &mut failures)
                .await
            {
                Err(ProcessorError::Transaction(e)) if !drain.shutdown.is_cancelled() => {
                    self.metrics
                        .process_transactions_aborted
                        .fetch_add(1, Ordering::Relaxed);
                    let delay = failures.next_delay();
                    warn!(group = %seg.group, error = %e, retry_in = ?delay, "a topology transaction failed and was aborted; rejoining the group to recompute the batch from the state's offsets");
                    tokio::select! {
                        _ = drain.shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(ProcessorError::Transaction(e)) => {
                    warn!(group = %seg.group, error = %e, "a topology transaction failed during shutdown; its batch is recomputed at the next start");
                    return Ok(());
                }
                other => return other,
            }
        }
    }

    /// One life of a segment's consumer (a failed transaction ends it): bring the state up to
    /// the changelogs, rewind the group to it, then process batches until shutdown.
    async fn run_tasks(
        &self,
        ctx: SegmentLoop<'_>,
        tasks: &mut BTreeMap<i32, Vec<Option<FjallStore>>>,
        drain: &mut Drain<'_>,
        failures: &mut Waiter,
    ) -> Result<(), ProcessorError> {
        let SegmentLoop {
            seg,
            producer,
            txn,
            letters,
        } = ctx;
        let topics: Vec<String> = std::iter::once(seg.input.clone())
            .chain(seg.ops.iter().filter_map(|op| match op {
                Operator::Join { table, .. } => Some(table.clone()),
                _ => None,
            }))
            .collect();
        let all: BTreeSet<i32> = (0..seg.partitions).collect();
        // The group's offsets before the changelogs (see `committed_before_sync`).
        let mut committed = BTreeMap::new();
        for topic in &topics {
            let log = self.log.as_ref();
            let read = committed_before_sync(log, &seg.group, topic, &self.policy, drain.shutdown);
            let Some(offsets) = read.await? else {
                return Ok(()); // shutdown while waiting for the log: consume nothing
            };
            committed.insert(topic.clone(), offsets);
        }
        // Before joining the group: another instance may own some partitions (no repairs).
        if !self
            .sync(producer, tasks, &all, Ownership::Maybe, drain.shutdown)
            .await?
        {
            return Ok(()); // shutdown during the restore: consume nothing
        }
        self.check_definitions(seg, tasks, &all)?;
        for topic in &topics {
            let mut resume: BTreeMap<i32, i64> = BTreeMap::new();
            for (&p, stores) in tasks.iter() {
                let tp = TopicPartition::new(topic.as_str(), p);
                let tracking = seg.ops.iter().zip(stores).filter_map(|(op, store)| {
                    let store = store.as_ref()?;
                    let tracks = *topic == seg.input
                        || matches!(op, Operator::Join { table, .. } if table == topic);
                    tracks.then_some(store)
                });
                for store in tracking {
                    let at = store.offsets()?.get(&tp).copied().unwrap_or(0);
                    let e = resume.entry(p).or_insert(at);
                    *e = (*e).min(at);
                }
            }
            if !resume.is_empty() {
                let log = self.log.as_ref();
                let committed = &committed[topic];
                let shutdown = drain.shutdown;
                let rewind = rewind_to_state(
                    log,
                    &seg.group,
                    topic,
                    &resume,
                    committed,
                    self.policy,
                    shutdown,
                );
                if !rewind.await? {
                    return Ok(()); // shutdown while waiting for a busy group: consume nothing
                }
            }
        }
        let mut consumer = self
            .log
            .consumer(
                ConsumerConfig::new(seg.group.clone(), topics.clone()).transactional(txn.is_some()),
            )
            .await?;
        drain.new_consumer();
        info!(group = %seg.group, input = %seg.input, tasks = tasks.len(), "topology segment started");
        let mut owned: BTreeSet<i32> = BTreeSet::new();
        loop {
            let Some(records) = drain.poll(consumer.as_mut()).await? else {
                return Ok(());
            };
            let new = newly_assigned(consumer.as_ref(), &seg.input, &mut owned);
            if !new.is_empty() {
                info!(group = %seg.group, partitions = ?new, "partitions assigned; syncing their state with the changelogs");
                if !self
                    .sync(producer, tasks, &new, Ownership::Assigned, drain.shutdown)
                    .await?
                {
                    return Ok(());
                }
                self.check_definitions(seg, tasks, &new)?;
                check_colocated(consumer.as_ref(), seg, &owned)?;
            }
            if records.is_empty() {
                continue;
            }
            let offsets = next_offsets(&records);
            let next: BTreeMap<&TopicPartition, i64> =
                offsets.iter().map(|(tp, n)| (tp, *n)).collect();
            let mut by_partition: BTreeMap<i32, Vec<&Record>> = BTreeMap::new();
            for record in &records {
                by_partition
                    .entry(record.partition)
                    .or_default()
                    .push(record);
            }
            let Some(tables) = self
                .catch_up_tables(seg, tasks, &by_partition, drain.shutdown)
                .await?
            else {
                return Ok(());
            };
            let mut batches: Vec<(i32, TaskBatch)> = Vec::new();
            for (p, records) in by_partition {
                let Some(stores) = tasks.get(&p) else {
                    // Never commit past records no task processed.
                    return Err(ProcessorError::Config(format!(
                        "partition {p} of {} appeared after the topology started ({} partitions); restart it to add the partition's tasks",
                        records[0].topic, seg.partitions
                    )));
                };
                let input = PartitionRecords {
                    polled: &records,
                    read_ahead: tables.get(&p),
                };
                let batch = self.process(seg, stores, p, input, &next, letters)?;
                batches.push((p, batch));
            }
            let dead: Vec<ProduceRecord> = batches
                .iter_mut()
                .flat_map(|(_, b)| std::mem::take(&mut b.letters))
                .collect();
            if !dead.is_empty() {
                self.metrics
                    .records_dead_lettered
                    .fetch_add(dead.len() as u64, Ordering::Relaxed);
                if !letters.send(dead, drain.shutdown).await? {
                    return Ok(());
                }
            }
            let outputs: Vec<ProduceRecord> = batches
                .iter_mut()
                .flat_map(|(_, b)| std::mem::take(&mut b.outputs))
                .collect();
            // Changelogs in commit order: phase k holds every task's k-th state batch.
            let changelogs = self.changelog_phases(seg, &batches);
            if let Some(txn) = txn {
                // One transaction: outputs, changelogs and offsets are visible together or
                // not at all. The state commits after it (a crash in between: the store
                // restores the batch from its changelog at start).
                let member = consumer.group_metadata();
                let mut landed = |owner, phase, offset| {
                    note_changelog_end(&mut batches, owner, phase, offset);
                };
                let sent =
                    send_transaction(txn, member, outputs, changelogs, &offsets, &mut landed).await;
                if let Err(e) = sent {
                    if let Err(abort) = txn.abort().await {
                        warn!(error = %abort, "aborting the failed transaction failed too; a new producer with the same transactional id will fence it");
                    }
                    return Err(ProcessorError::Transaction(e));
                }
                *failures = Waiter::new(self.policy);
            } else {
                if !send(producer, outputs, drain.shutdown, &drain.policy).await? {
                    return Ok(());
                }
                let mut ends = Vec::new();
                for (phase, records) in changelogs.into_iter().enumerate() {
                    let (owners, records): (Vec<usize>, Vec<ProduceRecord>) =
                        records.into_iter().unzip();
                    let Some((positions, retried)) =
                        send_changelog(producer, records, drain.shutdown, &drain.policy).await?
                    else {
                        return Ok(());
                    };
                    for (owner, (first, last)) in changelog_spans(owners, positions) {
                        let (p, batch) = &batches[owner];
                        let store = batch
                            .states
                            .get(phase)
                            .and_then(|(oi, _)| tasks.get(p)?.get(*oi)?.as_ref());
                        if continues_changelog(store, *p, first, retried)? {
                            ends.push((owner, phase, last));
                        }
                    }
                }
                for (owner, phase, last) in ends {
                    note_changelog_end(&mut batches, owner, phase, last);
                }
            }
            for (p, batch) in batches {
                let Some(stores) = tasks.get_mut(&p) else {
                    continue;
                };
                for (oi, state) in batch.states {
                    if let Some(store) = stores[oi].as_mut() {
                        store.apply(&state)?;
                    }
                }
            }
            if txn.is_none() {
                // In the background, as the processor's: the stores hold the offsets.
                if let Err(e) = consumer.commit_in_background(&offsets).await {
                    warn!(group = %seg.group, error = %e, "topology offset commit failed; the state skips what is re-delivered");
                }
            }
        }
    }

    /// The changelog records of a batch's state batches, by phase (phase k: every task's k-th
    /// state batch in commit order), each with the index of its batch.
    fn changelog_phases(
        &self,
        seg: &Segment,
        batches: &[(i32, TaskBatch)],
    ) -> Vec<Vec<(usize, ProduceRecord)>> {
        let phases = batches.iter().map(|(_, b)| b.states.len()).max();
        (0..phases.unwrap_or(0))
            .map(|phase| {
                let mut records = Vec::new();
                for (bi, (p, batch)) in batches.iter().enumerate() {
                    let Some((oi, state)) = batch.states.get(phase) else {
                        continue;
                    };
                    let topic = changelog_topic_name(&self.topology.app, seg.ops[*oi].name());
                    for r in state.changelog() {
                        let mut pr = ProduceRecord::new(topic.clone(), Some(r.key), r.value);
                        pr.partition = Some(*p);
                        records.push((bi, pr));
                    }
                }
                records
            })
            .collect()
    }

    /// The table records each join must apply before the stream events of this batch: for
    /// every partition with stream events, the join's table partition from the store's offset
    /// to its high watermark now, so an event always meets the rows written before it was
    /// processed (rows then merge with the events by timestamp). The group re-delivers these
    /// records later; the store skips them. Keyed by partition, then table topic.
    async fn catch_up_tables(
        &self,
        seg: &Segment,
        tasks: &BTreeMap<i32, Vec<Option<FjallStore>>>,
        batch: &BTreeMap<i32, Vec<&Record>>,
        shutdown: &CancellationToken,
    ) -> Result<Option<BTreeMap<i32, BTreeMap<String, Vec<Record>>>>, ProcessorError> {
        let mut out: BTreeMap<i32, BTreeMap<String, Vec<Record>>> = BTreeMap::new();
        for (oi, op) in seg.ops.iter().enumerate() {
            let Operator::Join { table, .. } = op else {
                continue;
            };
            let mut highs: Option<BTreeMap<i32, i64>> = None;
            for (&p, records) in batch {
                if !records.iter().any(|r| *r.topic == *seg.input) {
                    continue;
                }
                let Some(Some(store)) = tasks.get(&p).map(|stores| &stores[oi]) else {
                    continue;
                };
                let highs = match &mut highs {
                    Some(highs) => highs,
                    None => {
                        let described = retry_transient(
                            "reading the table's watermarks",
                            &self.policy,
                            shutdown,
                            || self.log.describe_topic(table),
                        )
                        .await?;
                        let Some(d) = described else {
                            return Ok(None);
                        };
                        highs.insert(
                            d.partitions
                                .iter()
                                .map(|w| (w.partition, w.high_watermark))
                                .collect(),
                        )
                    }
                };
                let tp = TopicPartition::new(table.as_str(), p);
                let from = store.offsets()?.get(&tp).copied().unwrap_or(0);
                let high = highs.get(&p).copied().unwrap_or(0);
                if high > from {
                    let read = retry_transient("reading the table", &self.policy, shutdown, || {
                        self.log.read_partition(table, p, from, high)
                    })
                    .await?;
                    let Some(rows) = read else {
                        return Ok(None);
                    };
                    out.entry(p).or_default().insert(table.clone(), rows);
                }
            }
        }
        Ok(Some(out))
    }

    /// Brings the stores of `partitions` up to their changelogs; `false` when `shutdown`
    /// interrupted it.
    async fn sync(
        &self,
        producer: &dyn Producer,
        tasks: &mut BTreeMap<i32, Vec<Option<FjallStore>>>,
        partitions: &BTreeSet<i32>,
        ownership: Ownership,
        shutdown: &CancellationToken,
    ) -> Result<bool, ProcessorError> {
        let restore = Restore {
            ownership,
            shutdown,
            log: self.log.as_ref(),
            producer,
            app: &self.topology.app,
            exactly_once: self.exactly_once,
            policy: self.policy,
            metrics: &self.metrics,
        };
        let stores = tasks
            .iter_mut()
            .filter(|(p, _)| partitions.contains(p))
            .flat_map(|(&p, stores)| stores.iter_mut().flatten().map(move |s| (p, s)))
            .collect();
        sync_stores_with_changelogs(&restore, stores).await
    }

    /// Refuses an aggregate's state computed under another [`Aggregate::definition`]
    /// (another function list or window size): it would be read as wrong values.
    fn check_definitions(
        &self,
        seg: &Segment,
        tasks: &BTreeMap<i32, Vec<Option<FjallStore>>>,
        partitions: &BTreeSet<i32>,
    ) -> Result<(), ProcessorError> {
        for (p, stores) in tasks.iter().filter(|(p, _)| partitions.contains(p)) {
            for (op, store) in seg.ops.iter().zip(stores) {
                let (Operator::Aggregate { name, op }, Some(store)) = (op, store) else {
                    continue;
                };
                let definition = aggregate_definition(seg, op);
                if let Some(stored) = other_definition(store, &definition)? {
                    return Err(ProcessorError::Definition(format!(
                        "aggregate `{name}` of topology `{}` has state computed as `{stored}` (partition {p}), but the topology now defines it as `{definition}`: its stored values cannot be reused. Restore the previous definition, or give the operator another name (its state and changelog are named after it) to start afresh",
                        self.topology.app
                    )));
                }
            }
        }
        Ok(())
    }

    /// Runs the segment's operators over one partition's records of a batch.
    fn process(
        &self,
        seg: &Segment,
        stores: &[Option<FjallStore>],
        p: i32,
        input: PartitionRecords<'_>,
        next: &BTreeMap<&TopicPartition, i64>,
        letters: &DeadLetters,
    ) -> Result<TaskBatch, StoreError> {
        let m = &self.metrics;
        let mut batch = TaskBatch::default();
        let (records, tables) = (input.polled, input.read_ahead);
        let input = TopicPartition::new(seg.input.as_str(), p);
        // The events flowing through the operators, with the record each came from and, after
        // a repartition, that record's origin (the record the upstream segment consumed).
        let mut from: Vec<(&Record, Option<Origin>)> = Vec::new();
        let mut events: Vec<Event> = Vec::new();
        for record in records.iter().filter(|r| *r.topic == *seg.input) {
            match decode(record, seg.rekeyed) {
                Ok(Some((event, origin))) => {
                    from.push((record, origin));
                    events.push(event);
                }
                Ok(None) => debug!(at = %record.coordinates(), "tombstone on a stream; skipped"),
                Err(e) => batch.letters.push(letters.letter(record, &e)),
            }
        }
        // Records the offsets the batch covers on `tp` in `state`: never back from what the
        // store or the operator (table rows read ahead of the group) already recorded.
        let cover = |state: &mut WriteBatch, store: &FjallStore, tp: &TopicPartition| {
            if let Some(&end) = next.get(tp) {
                let end = state.offsets().get(tp).map_or(end, |&o| o.max(end));
                state.set_offset(tp.clone(), never_back(store, tp, end));
            }
        };
        let mut states = Vec::new();
        let mut aggregated = None;
        for (oi, op) in seg.ops.iter().enumerate() {
            let store = stores[oi].as_ref();
            // After a repartition, each store first drops the copies the upstream segment
            // wrote again (a crash or a retried send): per origin partition the records come
            // in origin order, so one at or below the store's mark is a copy.
            let mut marks = HighWater::default();
            if let (true, Some(store)) = (seg.rekeyed, store) {
                let mut keep = Vec::with_capacity(from.len());
                for (_, origin) in &from {
                    keep.push(match origin {
                        Some((tp, offset)) => marks.admit(store, tp, *offset)?,
                        None => true,
                    });
                }
                retain(&mut events, &mut from, &keep);
            }
            match (op, store) {
                (
                    Operator::Filter {
                        name,
                        predicate,
                        jq,
                    },
                    _,
                ) => {
                    let mut keep = Vec::with_capacity(events.len());
                    for (event, (record, _)) in events.iter().zip(&from) {
                        let verdict = match (predicate.matches_field(event), jq) {
                            (Some(verdict), _) => Ok(verdict),
                            (None, Some(program)) => jq_holds(program, event),
                            (None, None) => Ok(true),
                        };
                        match verdict {
                            Ok(k) => keep.push(k),
                            Err(message) => {
                                keep.push(false);
                                let code = program_code(predicate);
                                let error = ProcessError::Normalize(NormalizeError::Jq {
                                    at: format!("{}.{name}", self.topology.app),
                                    code,
                                    message,
                                });
                                batch.letters.push(letters.letter(record, &error));
                            }
                        }
                    }
                    retain(&mut events, &mut from, &keep);
                }
                (Operator::Dedup { op, .. }, Some(store)) => {
                    let mut out = op.process(store, &events)?;
                    marks.finish(&mut out.state);
                    cover(&mut out.state, store, &input);
                    let keep: Vec<bool> = out
                        .decisions
                        .iter()
                        .map(|d| *d == DedupDecision::Forward)
                        .collect();
                    for d in &out.decisions {
                        match d {
                            DedupDecision::Duplicate => {
                                m.process_duplicates.fetch_add(1, Ordering::Relaxed);
                            }
                            DedupDecision::Late => {
                                m.process_dropped_late.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                    retain(&mut events, &mut from, &keep);
                    states.push((oi, out.state));
                }
                (Operator::Join { op, table, .. }, Some(store)) => {
                    let table_tp = TopicPartition::new(table.as_str(), p);
                    let polled: Vec<&Record> = records
                        .iter()
                        .copied()
                        .filter(|r| *r.topic == **table)
                        .collect();
                    // A row without a key cannot be a table row: dead-lettered when polled
                    // (read-ahead copies of it are skipped).
                    for record in polled.iter().filter(|r| r.key.is_none()) {
                        batch.letters.push(letters.letter(
                            record,
                            &ProcessError::Envelope(envelope::EnvelopeError::MissingKey),
                        ));
                    }
                    // The rows read ahead up to the high watermark, then any polled row past
                    // them (a watermark read from a lagging replica may end before them).
                    let read: Vec<&Record> = tables
                        .and_then(|t| t.get(table))
                        .map(|rows| rows.iter().collect())
                        .unwrap_or_default();
                    let read_end = read.last().map_or(i64::MIN, |r| r.offset + 1);
                    let mut rows = Vec::new();
                    for record in read
                        .into_iter()
                        .chain(polled.into_iter().filter(|r| r.offset >= read_end))
                    {
                        if let Some(row) = TableUpdate::from_record(record) {
                            rows.push((record.timestamp_ms, row));
                        }
                    }
                    let inputs = merge(std::mem::take(&mut events), rows);
                    let mut out = op.process_ordered(store, &inputs)?;
                    marks.finish(&mut out.state);
                    cover(&mut out.state, store, &input);
                    cover(&mut out.state, store, &table_tp);
                    m.process_join_unmatched
                        .fetch_add(out.unmatched, Ordering::Relaxed);
                    // Inputs are in merged order; map stream inputs back to their records.
                    let mut stream_records = std::mem::take(&mut from).into_iter();
                    let mut record_of: Vec<_> = inputs
                        .iter()
                        .map(|i| match i {
                            JoinInput::Stream(_) => stream_records.next(),
                            JoinInput::Table(_) => None,
                        })
                        .collect();
                    for output in &out.outputs {
                        let (JoinInput::Stream(event), Some(record)) =
                            (&inputs[output.index], record_of[output.index].take())
                        else {
                            continue;
                        };
                        let mut enriched = event.clone();
                        enriched.value = op.enrich(event, output);
                        events.push(enriched);
                        from.push(record);
                    }
                    states.push((oi, out.state));
                }
                (Operator::Aggregate { name, op }, Some(store)) => {
                    let mut out = op.process(store, &events)?;
                    marks.finish(&mut out.state);
                    define(store, &mut out.state, &aggregate_definition(seg, op))?;
                    cover(&mut out.state, store, &input);
                    m.process_dropped_late
                        .fetch_add(out.dropped_late, Ordering::Relaxed);
                    aggregated = Some((name, op, std::mem::take(&mut out.updates)));
                    states.push((oi, out.state));
                }
                (op, None) => {
                    return Err(StoreError::Corrupt(format!(
                        "operator {} has no state store",
                        op.name()
                    )))
                }
            }
        }
        // Downstream first: an upstream store never records an input whose effects a
        // downstream store could still lack.
        states.reverse();
        batch.states = states;
        let app = &self.topology.app;
        if let Some((name, op, updates)) = aggregated {
            let Output::Sink { topic, partitions } = &seg.output else {
                return Err(StoreError::Corrupt(format!(
                    "aggregate {name} does not end its stream"
                )));
            };
            let newest: BTreeMap<&Bytes, i64> = events.iter().fold(BTreeMap::new(), |mut t, e| {
                let at = t.entry(&e.key).or_insert(e.time_ms);
                *at = (*at).max(e.time_ms);
                t
            });
            for update in &updates {
                if update.values.is_none() {
                    continue; // a session merged into another: the merged one is emitted
                }
                let time = newest
                    .get(&update.key)
                    .copied()
                    .unwrap_or(update.window.start);
                let id = format!(
                    "{name}/{}-{}-{}/{}",
                    update.version.topic,
                    update.version.partition,
                    update.version.offset,
                    update.window.start
                );
                batch.outputs.push(output_record(
                    app,
                    name,
                    topic,
                    *partitions,
                    &update.key,
                    id.as_bytes(),
                    time,
                    &update.version,
                    update.to_json(op.config()),
                ));
            }
            return Ok(batch);
        }
        let last = seg.ops.last().map_or("forward", Operator::name);
        for event in &events {
            match &seg.output {
                Output::Sink { topic, partitions } => batch.outputs.push(output_record(
                    app,
                    last,
                    topic,
                    *partitions,
                    &event.key,
                    &event.id,
                    event.time_ms,
                    &event.coords,
                    event.value.clone(),
                )),
                Output::Rekey {
                    by,
                    topic,
                    partitions,
                    missing,
                } => match (rekey(event, by, topic, *partitions), missing) {
                    (Ok(record), _) => batch.outputs.push(record),
                    (Err(RekeyError::MissingKey(_)), Missing::Keep) => batch
                        .outputs
                        .push(rekey_as(event, event.key.clone(), topic, *partitions)),
                    (Err(RekeyError::MissingKey(_)), Missing::Unmatched) => {
                        m.process_join_unmatched.fetch_add(1, Ordering::Relaxed);
                    }
                    (Err(RekeyError::MissingKey(field)), Missing::Filtered) => {
                        debug!(id = %String::from_utf8_lossy(&event.id), %field, "event without the group_by field; dropped");
                        m.records_filtered.fetch_add(1, Ordering::Relaxed);
                    }
                },
            }
        }
        Ok(batch)
    }
}

/// A join's task reads its table partition through the same group as its stream partition:
/// both must be assigned to this member together (Kafka's range assignor, librdkafka's
/// default, does so for co-partitioned topics).
fn check_colocated(
    consumer: &dyn kontext_log::Consumer,
    seg: &Segment,
    input: &BTreeSet<i32>,
) -> Result<(), ProcessorError> {
    let assignment = consumer.assignment();
    for op in &seg.ops {
        let Operator::Join { table, .. } = op else {
            continue;
        };
        let tables: BTreeSet<i32> = assignment
            .iter()
            .filter(|tp| *tp.topic == **table)
            .map(|tp| tp.partition)
            .collect();
        if tables != *input {
            return Err(ProcessorError::Config(format!(
                "group {} got partitions {input:?} of {} but {tables:?} of its table {table}: a join needs both sides of a partition on one member; use the range assignor (partition.assignment.strategy=range)",
                seg.group, seg.input
            )));
        }
    }
    Ok(())
}

/// Records, in the state batch of `phase` of batch `owner`, the changelog offset after
/// `offset`, where that batch's changelog record landed: the store's changelog end once the
/// state batch commits.
fn note_changelog_end(batches: &mut [(i32, TaskBatch)], owner: usize, phase: usize, offset: i64) {
    if let Some((_, state)) = batches[owner].1.states.get_mut(phase) {
        state.put(CHANGELOG_END_KEY, &(offset + 1).to_le_bytes());
    }
}

/// What an aggregate's state depends on: its segment's input (and the field a repartition
/// input is keyed by), then [`Aggregate::definition`].
fn aggregate_definition(seg: &Segment, op: &Aggregate) -> String {
    match &seg.keyed_by {
        Some(by) => format!("{} by {by}, {}", seg.input, op.definition()),
        None => format!("{}, {}", seg.input, op.definition()),
    }
}

fn segment(
    app: &str,
    input: String,
    keyed_by: Option<String>,
    partitions: i32,
    ops: Vec<Operator>,
    output: Output,
    fallback: &str,
) -> Segment {
    let name = match (ops.first(), &output) {
        (Some(op), _) => op.name().to_owned(),
        (None, Output::Rekey { .. }) => format!("{fallback}-rekey"),
        (None, Output::Sink { .. }) => fallback.to_owned(),
    };
    Segment {
        group: format!("{app}.{name}"),
        input,
        rekeyed: keyed_by.is_some(),
        keyed_by,
        partitions,
        ops,
        output,
    }
}

fn compile(op: &Op) -> Result<Operator, TopologyRunError> {
    let invalid = |name: &str, reason: String| {
        TopologyRunError::Invalid(vec![TopologyError::InvalidOperator {
            name: name.to_owned(),
            reason,
        }])
    };
    Ok(match op {
        Op::Filter { name, predicate } => Operator::Filter {
            name: name.clone(),
            jq: match predicate {
                Predicate::Jq(code) => {
                    Some(JqProgram::compile(code).map_err(|e| invalid(name, e))?)
                }
                _ => None,
            },
            predicate: predicate.clone(),
        },
        Op::Dedup { name, config } => Operator::Dedup {
            name: name.clone(),
            op: Deduplicate::new(*config),
        },
        Op::JoinTable {
            name,
            table,
            config,
        } => Operator::Join {
            name: name.clone(),
            table: table.clone(),
            // After a repartition the operator still reads the foreign key from the value,
            // so an event without one (a left join's, sent under its own key) is handled there.
            op: EnrichmentJoin::new(config.clone()),
        },
        Op::Aggregate { name, config } => Operator::Aggregate {
            name: name.clone(),
            op: Aggregate::new(config.clone()).map_err(|e| invalid(name, e))?,
        },
        // The plan makes it a repartition stage, never an operator stage.
        Op::GroupBy { name, .. } => {
            return Err(invalid(name, "group_by is run as a repartition".into()))
        }
    })
}

/// The partition and offset of the record an upstream segment consumed to write a
/// repartition record.
type Origin = (TopicPartition, i64);

/// A record of a segment's input as an event, with its origin after a repartition (the
/// record the upstream segment consumed); `None` for a tombstone.
fn decode(record: &Record, rekeyed: bool) -> Result<Option<(Event, Option<Origin>)>, ProcessError> {
    if rekeyed {
        // Written by `rekey`: the value is the event's JSON, its id, time and original
        // coordinates in headers.
        let header = |name| {
            record
                .header(name)
                .and_then(|h| std::str::from_utf8(h).ok())
        };
        let invalid = |reason: &str| {
            ProcessError::Envelope(envelope::EnvelopeError::InvalidJson(format!(
                "repartition record: {reason}"
            )))
        };
        let value: Value = serde_json::from_slice(record.value.as_deref().unwrap_or(b"null"))
            .map_err(|e| invalid(&e.to_string()))?;
        let origin = origin_coords(record).ok_or_else(|| invalid("no origin headers"))?;
        let event = Event {
            key: record.key.clone().unwrap_or_default(),
            id: Bytes::copy_from_slice(header("ce_id").unwrap_or_default().as_bytes()),
            time_ms: header("ce_time_ms")
                .and_then(|t| t.parse().ok())
                .unwrap_or(record.timestamp_ms),
            // The operators version by this record: one task writes each partition of the
            // segment's input, in order (the origin is for the copy filter).
            coords: Coords::new(record.topic.clone(), record.partition, record.offset),
            value,
        };
        let tp = TopicPartition::new(origin.topic, origin.partition);
        return Ok(Some((event, Some((tp, origin.offset)))));
    }
    let event = envelope::decode(record)?;
    let Some(data) = event.data else {
        return Ok(None);
    };
    let event = Event {
        key: record.key.clone().unwrap_or_default(),
        id: Bytes::from(event.id),
        time_ms: event.time_ms,
        coords: Coords::new(record.topic.clone(), record.partition, record.offset),
        value: Value::Object(data),
    };
    Ok(Some((event, None)))
}

fn jq_holds(program: &JqProgram, event: &Event) -> Result<bool, String> {
    let empty = serde_json::Map::new();
    let data = event.value.as_object().unwrap_or(&empty);
    program
        .holds(&JqInput::new(data, None, None))
        .map_err(|e| e.0)
}

fn program_code(predicate: &Predicate) -> String {
    match predicate {
        Predicate::Jq(code) => code.clone(),
        other => format!("{other:?}"),
    }
}

/// Keeps the events (and what goes with each) whose `keep` is true.
fn retain<T>(events: &mut Vec<Event>, from: &mut Vec<T>, keep: &[bool]) {
    let mut k = keep.iter();
    events.retain(|_| *k.next().unwrap_or(&false));
    let mut k = keep.iter();
    from.retain(|_| *k.next().unwrap_or(&false));
}

/// Stream events and table rows in one order: by timestamp, the table first on ties
/// ([`next_side`]), each side keeping its own order.
fn merge(events: Vec<Event>, rows: Vec<(i64, TableUpdate)>) -> Vec<JoinInput> {
    let mut merged = Vec::with_capacity(events.len() + rows.len());
    let mut events = events.into_iter().peekable();
    let mut rows = rows.into_iter().peekable();
    loop {
        let side = next_side(
            events.peek().map(|e| e.time_ms),
            rows.peek().map(|(t, _)| *t),
        );
        match side {
            Some(Side::Stream) => merged.extend(events.next().map(JoinInput::Stream)),
            Some(Side::Table) => merged.extend(rows.next().map(|(_, r)| JoinInput::Table(r))),
            None => return merged,
        }
    }
}

/// A binary-mode CloudEvent of an output, partitioned by murmur2 of its key.
#[allow(clippy::too_many_arguments)]
fn output_record(
    app: &str,
    operator: &str,
    topic: &str,
    partitions: i32,
    key: &Bytes,
    id: &[u8],
    time_ms: i64,
    version: &Coords,
    value: Value,
) -> ProduceRecord {
    let key = (!key.is_empty()).then(|| key.clone());
    let partition = key
        .as_ref()
        .map(|k| partition_for_key(k, partitions.max(1)));
    ProduceRecord {
        topic: topic.to_owned(),
        partition,
        key,
        value: Some(Bytes::from(value.to_string())),
        headers: vec![
            Header::new("ce_specversion", envelope::SPEC_VERSION),
            Header::new("ce_id", Bytes::copy_from_slice(id)),
            Header::new("ce_source", format!("kontext/{app}")),
            Header::new("ce_type", format!("kontext.topology.{operator}")),
            Header::new("ce_time", format_time(time_ms)),
            Header::new("content-type", "application/json"),
            Header::new(
                kontext_process::join::ORIGIN_TOPIC_HEADER,
                version.topic.to_string(),
            ),
            Header::new(
                kontext_process::join::ORIGIN_PARTITION_HEADER,
                version.partition.to_string(),
            ),
            Header::new(
                kontext_process::join::ORIGIN_OFFSET_HEADER,
                version.offset.to_string(),
            ),
        ],
        timestamp_ms: Some(time_ms),
    }
}
