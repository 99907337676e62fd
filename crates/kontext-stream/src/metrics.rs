//! Pipeline counters, rendered in the Prometheus text format by the HTTP API.
//!
//! Names follow `kontext_<name>_<unit>_total`; label values are bounded (topics from the
//! pipeline file, error kinds from a fixed list).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::Mutex;

/// Counters of one pipeline run.
#[derive(Debug, Default)]
pub struct PipelineMetrics {
    pub records_consumed: AtomicU64,
    pub records_applied: AtomicU64,
    /// Records the store had already applied (re-delivery after a restart or rebalance).
    pub records_skipped: AtomicU64,
    pub records_filtered: AtomicU64,
    /// Invalid records copied to a dead-letter topic.
    pub records_dead_lettered: AtomicU64,
    pub batches_committed: AtomicU64,
    pub store_retries: AtomicU64,
    /// Milliseconds from event time to applied, for the latest batch's newest event.
    pub last_event_lag_ms: AtomicI64,
    invalid: Mutex<BTreeMap<(String, &'static str), u64>>,
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

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters = [
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
                "kontext_records_dead_lettered_total",
                "Invalid records copied to a dead-letter topic.",
                &self.records_dead_lettered,
            ),
            (
                "kontext_batches_committed_total",
                "Batches made durable and committed.",
                &self.batches_committed,
            ),
            (
                "kontext_store_retries_total",
                "Store writes retried after a transient error.",
                &self.store_retries,
            ),
        ];
        for (name, help, counter) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP kontext_records_invalid_total Records that are not valid context events.\n# TYPE kontext_records_invalid_total counter");
        for ((topic, kind), n) in self.invalid() {
            let _ = writeln!(
                out,
                "kontext_records_invalid_total{{topic=\"{topic}\",reason=\"{kind}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kontext_event_lag_milliseconds Event time to store, newest event of the last batch.\n# TYPE kontext_event_lag_milliseconds gauge\nkontext_event_lag_milliseconds {}",
            self.last_event_lag_ms.load(Ordering::Relaxed)
        );
        out
    }
}
