//! The embedded backend: a durable log in a local directory, for single-process deployments.
//!
//! Per-partition append-only segment files of checksummed records, group-commit fsync,
//! crash recovery by truncating to the last valid record, consumer groups with durable
//! committed offsets, and time/size retention. See `docs/log-embedded.md`.

mod config;
mod consumer;
mod format;
mod fsutil;
mod log;
mod partition;
mod sync;

pub use config::{EmbeddedConfig, FsyncPolicy};
pub use consumer::EmbeddedConsumer;
pub use log::{EmbeddedLog, EmbeddedProducer};
