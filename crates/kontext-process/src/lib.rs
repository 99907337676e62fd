//! Stateful stream operators for kontext: deduplication, windowed aggregation and the
//! stream-table enrichment join, written as deterministic state machines over event time.
//!
//! Nothing here does I/O on the log. An operator takes a batch of [`Event`]s and a
//! [`StateStore`], and returns its outputs plus a [`WriteBatch`] of state changes that carries
//! the input offsets of the batch. The runtime (not in this crate) produces the outputs, commits
//! the batch (which yields the changelog records), and only then commits consumer offsets. See
//! `docs/processing.md` for the effectively-once protocol this supports.
//!
//! Every output is a **full value** (the whole current aggregate, the whole enriched event),
//! versioned by the input coordinates that produced it, so a downstream versioned upsert turns
//! replays into no-ops.

pub mod aggregate;
pub mod codec;
pub mod dedup;
pub mod event;
pub mod join;
mod progress;
pub mod store;
pub mod topology;
pub mod window;

pub use aggregate::{
    AggFn, AggValue, Aggregate, AggregateBatch, AggregateConfig, AggregateUpdate, Emit, Roll,
};
pub use dedup::{DedupBatch, DedupConfig, DedupDecision, Deduplicate};
pub use event::{Coords, Event, FieldPath, Scalar, TICK_ID};
pub use join::{
    changelog_topic_name, check_copartitioning, next_side, origin_coords, rekey, rekey_as,
    repartition_topic_name, CoPartitionError, EnrichmentJoin, JoinBatch, JoinConfig, JoinInput,
    JoinKey, JoinKind, JoinOutput, Partitioner, RekeyError, Side, TableBatch, TableMode,
    TableUpdate, TopicLayout,
};
pub use store::{
    repair_records, ChangelogRecord, Durability, FjallStore, MemoryStore, StateDb, StateDbOptions,
    StateStore, StoreError, WriteBatch,
};
pub use topology::{Op, Pipeline, Plan, Predicate, Stage, StreamBuilder, Topology, TopologyError};
pub use window::{Window, WindowSpec};
