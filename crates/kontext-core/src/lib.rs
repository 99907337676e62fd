//! Types every kontext crate shares: log records, the CloudEvents envelope of context events,
//! Kafka-compatible key partitioning, and the pipeline definition.

pub mod config;
pub mod duration;
pub mod envelope;
pub mod jq;
pub mod partitioner;
pub mod record;
