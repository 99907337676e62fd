//! Stream processing of context events.
//!
//! Data flows one way: a record from the log is decoded ([`kontext_core::envelope`]), routed
//! to the source that produced it, filtered, normalized into the canonical model
//! ([`normalize`]), and written to the context store by the [`sink::StoreSink`] task, which
//! commits the consumer group's offsets only after the store has made the batch durable.

mod backlog;
pub mod dlq;
pub mod metrics;
pub mod normalize;
pub mod processor;
pub mod retry;
pub mod sink;
pub mod topology;

pub use metrics::{LatencyHistogram, PipelineMetrics, ProcessStep, UpdateKind};
pub use normalize::{Outcome, ProcessError, Router};
pub use sink::StoreSink;
