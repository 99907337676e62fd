//! Pipeline counters, rendered in the Prometheus text format by the HTTP API.
//!
//! Names follow `kontext_<name>_<unit>_total`; label values are bounded (topics from the
//! pipeline file, error kinds from a fixed list).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};

use parking_lot::Mutex;

mod histogram;
pub use histogram::LatencyHistogram;

/// Counters of one pipeline run.
#[derive(Debug, Default)]
pub struct PipelineMetrics {
    pub records_consumed: AtomicU64,
    pub records_applied: AtomicU64,
    /// Records the store had already applied (re-delivery after a restart or rebalance).
    pub records_skipped: AtomicU64,
    pub records_filtered: AtomicU64,
    /// Records copied to a dead-letter topic, every stage together (by topic, stage and kind:
    /// [`PipelineMetrics::dead_lettered`]).
    pub records_dead_lettered: AtomicU64,
    pub batches_committed: AtomicU64,
    /// Store writes retried (also in [`PipelineMetrics::retries`] as `store_write`).
    pub store_retries: AtomicU64,
    /// Milliseconds from event time to applied, for the latest batch's newest event.
    pub last_event_lag_ms: AtomicI64,
    /// Partitions the store sink's consumer holds in its group (checked at most once a
    /// second): fewer than its topics have while it joins, or when other instances share the
    /// group.
    pub sink_assigned_partitions: AtomicI64,
    /// Event time to committed in the store, every applied update, by [`UpdateKind`].
    pub event_to_applied: [LatencyHistogram; 2],
    /// Log append time of the record (its timestamp) to committed in the store: the sink's
    /// own share of [`PipelineMetrics::event_to_applied`], by [`UpdateKind`].
    pub log_to_applied: [LatencyHistogram; 2],
    invalid: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// (topic, stage, kind) -> records
    dead_lettered: Mutex<BTreeMap<(String, &'static str, &'static str), u64>>,
    /// stage -> retries
    retries: Mutex<BTreeMap<&'static str, u64>>,
    breaker_state: AtomicU8,
    breaker_reason: Mutex<&'static str>,
    /// Times the store's circuit breaker opened (the store went down).
    pub breaker_opened: AtomicU64,
    /// Times it closed again (a write succeeded after an outage).
    pub breaker_closed: AtomicU64,
    /// Processor: inputs dropped because they came later than their window allows.
    pub process_dropped_late: AtomicU64,
    /// Processor: inputs a feature's `dedup` dropped (event id seen within the window).
    pub process_duplicates: AtomicU64,
    /// Processor: join updates whose table entity was unknown (nulls for `left`, nothing for
    /// `inner`).
    pub process_join_unmatched: AtomicU64,
    /// Processor: changelog records applied to restore task state.
    pub process_restored_records: AtomicU64,
    /// Processor (`exactly_once`): task-loop transactions that failed and were aborted; each
    /// one's batch was recomputed.
    pub process_transactions_aborted: AtomicU64,
    /// Processor: how long each step of its loops takes per batch, by [`ProcessStep`].
    pub process_steps: [LatencyHistogram; ProcessStep::ALL.len()],
}

/// A step of the processor's two loops (re-key, tasks), the label of
/// [`PipelineMetrics::process_steps`]. Each is recorded once per batch that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStep {
    /// Re-key loop: from the log timestamp of the batch's oldest record to the loop taking
    /// it (the time it waited in the log and behind the batch in progress).
    RekeyWait = 0,
    /// Re-key loop: producing the re-keyed records until the log acknowledged them.
    RekeyProduce = 1,
    /// Tasks: from the log timestamp of the batch's oldest repartition record to the loop
    /// taking it.
    TasksWait = 2,
    /// Tasks: decoding the batch and running the operators over it, in memory.
    TasksProcess = 3,
    /// Tasks (at least once): producing the outputs until acknowledged.
    TasksOutputs = 4,
    /// Tasks (at least once): producing the state stores' changelogs, one store after the
    /// other, until acknowledged.
    TasksChangelogs = 5,
    /// Tasks (`exactly_once`): outputs, changelogs and offsets in one transaction, committed.
    TasksTransaction = 6,
    /// Tasks: applying the batch to the local state stores.
    TasksStateCommit = 7,
}

impl ProcessStep {
    const ALL: [ProcessStep; 8] = [
        ProcessStep::RekeyWait,
        ProcessStep::RekeyProduce,
        ProcessStep::TasksWait,
        ProcessStep::TasksProcess,
        ProcessStep::TasksOutputs,
        ProcessStep::TasksChangelogs,
        ProcessStep::TasksTransaction,
        ProcessStep::TasksStateCommit,
    ];

    /// The `loop` and `step` label values.
    fn labels(self) -> (&'static str, &'static str) {
        match self {
            ProcessStep::RekeyWait => ("rekey", "wait"),
            ProcessStep::RekeyProduce => ("rekey", "produce"),
            ProcessStep::TasksWait => ("tasks", "wait"),
            ProcessStep::TasksProcess => ("tasks", "process"),
            ProcessStep::TasksOutputs => ("tasks", "outputs"),
            ProcessStep::TasksChangelogs => ("tasks", "changelogs"),
            ProcessStep::TasksTransaction => ("tasks", "transaction"),
            ProcessStep::TasksStateCommit => ("tasks", "state_commit"),
        }
    }
}

/// What an applied update came from, the label of the latency histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateKind {
    /// A source event, normalized by the sink (one hop: source topic, store).
    Entity = 0,
    /// A feature or join result of the processor (source topic, re-key, repartition topic,
    /// task, features topic, store).
    Features = 1,
}

impl UpdateKind {
    const ALL: [UpdateKind; 2] = [UpdateKind::Entity, UpdateKind::Features];

    fn label(self) -> &'static str {
        match self {
            UpdateKind::Entity => "entity",
            UpdateKind::Features => "features",
        }
    }
}

/// The store circuit breaker's state, as the `kontext_store_breaker_state` gauge shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BreakerState {
    /// Writes flow (0).
    #[default]
    Closed = 0,
    /// The store is down: consumption is paused and the store is probed with backoff (1).
    Open = 1,
    /// A probe succeeded; the batch in hand is being written again (2).
    HalfOpen = 2,
}

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

impl PipelineMetrics {
    pub fn record_invalid(&self, topic: &str, kind: &'static str) {
        *self
            .invalid
            .lock()
            .entry((topic.to_string(), kind))
            .or_default() += 1;
    }

    /// Invalid records by (topic, error kind).
    pub fn invalid(&self) -> BTreeMap<(String, &'static str), u64> {
        self.invalid.lock().clone()
    }

    pub fn invalid_total(&self) -> u64 {
        self.invalid.lock().values().sum()
    }

    /// Counts one record written to a dead-letter topic.
    pub fn record_dead_letter(&self, topic: &str, stage: &'static str, kind: &'static str) {
        self.records_dead_lettered.fetch_add(1, Ordering::Relaxed);
        *self
            .dead_lettered
            .lock()
            .entry((topic.to_string(), stage, kind))
            .or_default() += 1;
    }

    /// Dead-lettered records by (topic, stage, error kind).
    pub fn dead_lettered(&self) -> BTreeMap<(String, &'static str, &'static str), u64> {
        self.dead_lettered.lock().clone()
    }

    /// Counts one retry of `stage` (`store_write`, `store_probe`, `dead_letter`).
    pub fn record_retry(&self, stage: &'static str) {
        *self.retries.lock().entry(stage).or_default() += 1;
    }

    /// Counts one retried store write (a batch's or the background flush's): in
    /// `store_retries` and as the `store_write` stage alike, so the two never differ.
    pub fn record_store_retry(&self) {
        self.store_retries.fetch_add(1, Ordering::Relaxed);
        self.record_retry(kontext_core::config::RetryStage::StoreWrite.name());
    }

    /// Retries of one stage so far.
    pub fn retries(&self, stage: &str) -> u64 {
        self.retries.lock().get(stage).copied().unwrap_or(0)
    }

    /// Moves the store circuit breaker to `state`; `reason` (a bounded error kind) says why
    /// it is not closed. Counts openings and closings.
    pub fn set_breaker(&self, state: BreakerState, reason: &'static str) {
        let before = BreakerState::from_u8(self.breaker_state.swap(state as u8, Ordering::Relaxed));
        match state {
            BreakerState::Open if before == BreakerState::Closed => {
                self.breaker_opened.fetch_add(1, Ordering::Relaxed);
            }
            BreakerState::Closed if before != BreakerState::Closed => {
                self.breaker_closed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        *self.breaker_reason.lock() = if state == BreakerState::Closed {
            "none"
        } else {
            reason
        };
    }

    /// The breaker's state and why it is not closed (`none` when closed).
    pub fn breaker(&self) -> (BreakerState, &'static str) {
        let state = BreakerState::from_u8(self.breaker_state.load(Ordering::Relaxed));
        let reason = *self.breaker_reason.lock();
        (state, if reason.is_empty() { "none" } else { reason })
    }

    /// Records the latencies of one applied update: from its event time and from its record's
    /// log append time to `now_ms`.
    pub fn record_applied(&self, kind: UpdateKind, now_ms: i64, event_ms: i64, log_ms: i64) {
        self.event_to_applied[kind as usize].record_ms(now_ms - event_ms);
        self.log_to_applied[kind as usize].record_ms(now_ms - log_ms);
    }

    /// Records how long `step` took for one batch.
    pub fn record_step(&self, step: ProcessStep, elapsed: std::time::Duration) {
        self.process_steps[step as usize].record(elapsed);
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        self.render_with(&[])
    }

    /// [`PipelineMetrics::render`], plus the store-sink series of `others` (the metrics of
    /// the pipeline's other stores, by store name) labelled `store="<name>"`, each family's
    /// `# HELP`/`# TYPE` once. These metrics' own series stay unlabelled (the served store,
    /// and the processor's `kontext_process_*` counters, which only it holds).
    pub fn render_with(&self, others: &[(&str, &PipelineMetrics)]) -> String {
        let mut exposition = Exposition::default();
        self.write_series(&mut exposition, None);
        for (store, metrics) in others {
            metrics.write_series(&mut exposition, Some(store));
        }
        exposition.finish()
    }

    /// Writes every series into `out`: all of them unlabelled (`store` `None`), or the store
    /// sink's labelled with `store`. Store names need no escaping in a label value: the
    /// pipeline file allows only ASCII letters, digits, `.`, `_` and `-` in them.
    fn write_series(&self, out: &mut Exposition, store: Option<&str>) {
        // A series' label pairs, `store` first when there is one.
        let pairs = |own: &str| match (store, own.is_empty()) {
            (None, _) => own.to_string(),
            (Some(store), true) => format!("store=\"{store}\""),
            (Some(store), false) => format!("store=\"{store}\",{own}"),
        };
        let labels = |own: &str| {
            let pairs = pairs(own);
            if pairs.is_empty() {
                pairs
            } else {
                format!("{{{pairs}}}")
            }
        };
        let sink_counters = [
            (
                "kontext_records_consumed_total",
                "Records read from the log.",
                &self.records_consumed,
            ),
            (
                "kontext_records_applied_total",
                "Records applied to the context store.",
                &self.records_applied,
            ),
            (
                "kontext_records_skipped_total",
                "Re-delivered records the store had already applied.",
                &self.records_skipped,
            ),
            (
                "kontext_records_filtered_total",
                "Records dropped by source filters.",
                &self.records_filtered,
            ),
            (
                "kontext_batches_committed_total",
                "Batches made durable and their offsets handed to the group (committed in the background; on Kafka, stored and committed every auto.commit.interval.ms).",
                &self.batches_committed,
            ),
            (
                "kontext_store_retries_total",
                "Store writes retried after a transient error.",
                &self.store_retries,
            ),
            (
                "kontext_store_breaker_opened_total",
                "Times the store circuit breaker opened: the store was down, consumption paused.",
                &self.breaker_opened,
            ),
            (
                "kontext_store_breaker_closed_total",
                "Times the store circuit breaker closed again after an outage.",
                &self.breaker_closed,
            ),
        ];
        let process_counters = [
            (
                "kontext_process_dropped_late_total",
                "Processor inputs dropped as later than their window allows.",
                &self.process_dropped_late,
            ),
            (
                "kontext_process_duplicates_total",
                "Processor inputs dropped by a feature's dedup (event id seen within the window).",
                &self.process_duplicates,
            ),
            (
                "kontext_process_join_unmatched_total",
                "Join updates whose table entity was unknown when they were processed.",
                &self.process_join_unmatched,
            ),
            (
                "kontext_process_restored_records_total",
                "Changelog records applied to restore the processor's task state.",
                &self.process_restored_records,
            ),
            (
                "kontext_process_transactions_aborted_total",
                "Processor transactions (exactly_once) that failed and were aborted; their batches were recomputed.",
                &self.process_transactions_aborted,
            ),
        ];
        let processor = if store.is_none() {
            &process_counters[..]
        } else {
            &[]
        };
        for (name, help, counter) in sink_counters.iter().chain(processor) {
            let body = out.family(name, "counter", help);
            let _ = writeln!(
                body,
                "{name}{} {}",
                labels(""),
                counter.load(Ordering::Relaxed)
            );
        }
        let by_label: [LabelledCounter; 3] = [
            (
                "kontext_records_invalid_total",
                "Records that are not valid context events.",
                self.invalid()
                    .into_iter()
                    .map(|((topic, kind), n)| (format!("topic=\"{topic}\",reason=\"{kind}\""), n))
                    .collect(),
            ),
            (
                "kontext_records_dead_lettered_total",
                "Records copied to a dead-letter topic, by source topic, failed stage and error kind.",
                self.dead_lettered()
                    .into_iter()
                    .map(|((topic, stage, kind), n)| {
                        (format!("topic=\"{topic}\",stage=\"{stage}\",kind=\"{kind}\""), n)
                    })
                    .collect(),
            ),
            (
                "kontext_retries_total",
                "Attempts repeated after a transient failure, by stage.",
                self.retries
                    .lock()
                    .iter()
                    .map(|(stage, n)| (format!("stage=\"{stage}\""), *n))
                    .collect(),
            ),
        ];
        for (name, help, series) in by_label {
            let body = out.family(name, "counter", help);
            for (pairs, n) in series {
                let _ = writeln!(body, "{name}{} {n}", labels(&pairs));
            }
        }
        let (state, reason) = self.breaker();
        let name = "kontext_store_breaker_state";
        let body = out.family(
            name,
            "gauge",
            "Store circuit breaker: 0 closed, 1 open (store down, consumption paused), 2 half-open; reason is the error kind that opened it.",
        );
        let series = labels(&format!("reason=\"{reason}\""));
        let _ = writeln!(body, "{name}{series} {}", state as u8);
        for (name, help, gauge) in [
            (
                "kontext_event_lag_milliseconds",
                "Event time to store, newest event of the last batch.",
                self.last_event_lag_ms.load(Ordering::Relaxed),
            ),
            (
                "kontext_sink_assigned_partitions",
                "Partitions of the source topics the store sink holds in its consumer group (fewer than they have: still joining, or other instances share the group).",
                self.sink_assigned_partitions.load(Ordering::Relaxed),
            ),
        ] {
            let body = out.family(name, "gauge", help);
            let _ = writeln!(body, "{name}{} {gauge}", labels(""));
        }
        for (name, help, histograms) in [
            (
                "kontext_event_to_applied_seconds",
                "Event time to committed in the context store (freshness), every applied update, by kind (entity: source event; features: processor output).",
                &self.event_to_applied,
            ),
            (
                "kontext_log_to_applied_seconds",
                "Log append time of the consumed record to committed in the context store: the store sink's share of the freshness, by kind.",
                &self.log_to_applied,
            ),
        ] {
            let body = out.family(name, "histogram", help);
            for kind in UpdateKind::ALL {
                let pairs = pairs(&format!("kind=\"{}\"", kind.label()));
                histograms[kind as usize].render(body, name, &pairs);
            }
        }
        // The processor's, like its counters, are the served metrics' only.
        if store.is_none() {
            let name = "kontext_process_step_seconds";
            let body = out.family(
                name,
                "histogram",
                "Time each step of the processor's loops takes per batch, by loop and step (wait: the log timestamp of the batch's oldest record to the loop taking it).",
            );
            for step in ProcessStep::ALL {
                let (lp, st) = step.labels();
                let pairs = format!("loop=\"{lp}\",step=\"{st}\"");
                self.process_steps[step as usize].render(body, name, &pairs);
            }
        }
    }
}

/// A counter family with labels: name, help, and each series' label pairs and value.
type LabelledCounter<'a> = (&'static str, &'a str, Vec<(String, u64)>);

/// A Prometheus text exposition under construction: metric families in the order first
/// written, each with its `# HELP`/`# TYPE` lines once and all its series together, as the
/// format requires when several stores write the same families.
#[derive(Default)]
struct Exposition {
    families: Vec<(&'static str, String)>,
}

impl Exposition {
    /// The series text of family `name`, created with its header if new.
    fn family(&mut self, name: &'static str, kind: &str, help: &str) -> &mut String {
        let at = match self.families.iter().position(|(n, _)| *n == name) {
            Some(at) => at,
            None => {
                self.families.push((
                    name,
                    format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"),
                ));
                self.families.len() - 1
            }
        };
        &mut self.families[at].1
    }

    fn finish(self) -> String {
        self.families.into_iter().map(|(_, text)| text).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::*;

    /// Checks the exposition's shape: each family's `# TYPE` once, before all its series,
    /// which are contiguous. Returns the family names.
    fn families(text: &str) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut order = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(name.clone()), "second # TYPE for {name}");
                order.push(name.clone());
                current = name;
            } else if !line.starts_with('#') {
                let series = line.split(['{', ' ']).next().unwrap();
                assert!(
                    series.starts_with(&current),
                    "{series} outside its family (in {current})"
                );
            }
        }
        order
    }

    #[test]
    fn the_served_store_renders_unlabelled_and_others_with_their_store_label() {
        let served = PipelineMetrics::default();
        served.records_applied.store(5, Ordering::Relaxed);
        served.process_duplicates.store(2, Ordering::Relaxed);
        served.record_applied(UpdateKind::Entity, 1_010, 1_000, 1_005);
        served.record_step(ProcessStep::TasksOutputs, Duration::from_micros(2_500));
        let pg = PipelineMetrics::default();
        pg.records_applied.store(7, Ordering::Relaxed);
        pg.record_applied(UpdateKind::Features, 1_100, 1_000, 1_050);

        let alone = served.render();
        assert_eq!(families(&alone), families(&served.render_with(&[])));
        assert!(
            alone.contains("\nkontext_records_applied_total 5\n"),
            "{alone}"
        );
        assert!(
            alone.contains("\nkontext_process_duplicates_total 2\n"),
            "{alone}"
        );
        assert!(!alone.contains("store="), "{alone}");
        assert!(
            alone.contains(
                "\nkontext_process_step_seconds_bucket{loop=\"tasks\",step=\"outputs\",le=\"0.003\"} 1\n"
            ),
            "{alone}"
        );
        assert!(
            alone.contains(
                "\nkontext_process_step_seconds_count{loop=\"tasks\",step=\"changelogs\"} 0\n"
            ),
            "{alone}"
        );

        let both = served.render_with(&[("pg", &pg)]);
        assert_eq!(families(&both), families(&alone), "the same families");
        assert!(
            both.contains("\nkontext_records_applied_total 5\n"),
            "{both}"
        );
        assert!(
            both.contains("\nkontext_records_applied_total{store=\"pg\"} 7\n"),
            "{both}"
        );
        assert!(both.contains(
            "\nkontext_event_to_applied_seconds_count{store=\"pg\",kind=\"features\"} 1\n"
        ));
        assert!(both.contains("\nkontext_store_breaker_state{store=\"pg\",reason=\"none\"} 0\n"));
        // The processor's counters are the served metrics' only.
        assert!(
            !both.contains("kontext_process_duplicates_total{store="),
            "{both}"
        );
        assert!(
            !both.contains("kontext_process_step_seconds_count{store="),
            "{both}"
        );
    }
}
