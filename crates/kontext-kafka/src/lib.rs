//! The Apache Kafka backend of the kontext [`kontext_log::Log`], through rdkafka (librdkafka).
//!
//! - [`KafkaLog`]: admin (create, list, describe topics; committed offsets of a group) and the
//!   factory of producers and consumers.
//! - Producer: idempotent, `acks=all`; keyed records go to the partition
//!   [`kontext_core::partitioner::partition_for_key`] picks, the same one Kafka's Java client
//!   picks, so kontext, Debezium and Kafka Connect agree on where an entity's events live.
//! - Consumer: a consumer group member that commits only when told to (`commit`), reading
//!   `read_committed`.
//! - Errors keep librdkafka's retriability ([`kontext_log::LogError::is_transient`]).
//!
//! `ARCHITECTURE-kafka.md` beside this crate describes the mapping in full.

mod config;
mod consumer;
mod error;
mod log;
mod metadata;
mod producer;

pub use config::{KafkaConfig, AUTO_COMMIT_INTERVAL_MS, RESERVED_PROPERTIES};
pub use consumer::KafkaConsumer;
pub use error::{code_error, is_transient, is_unavailable, log_error};
pub use log::KafkaLog;
pub use producer::{KafkaProducer, KafkaTransactionalProducer};
