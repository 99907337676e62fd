//! Context stores: where processed context becomes queryable by AI applications.
//!
//! Writes are **versioned upserts**. Every field carries the [`Provenance`] of the event that
//! wrote it, and a field is only replaced by an event with a greater [`Version`] (event time,
//! then log coordinates), so replays and out-of-order retries converge to the same state.
//! Each batch also records, atomically with the data, the next offset of every source
//! partition it covered: a restarted consumer skips records the store already applied, which
//! makes application exactly-once even for non-idempotent bookkeeping such as
//! [`EntityDoc::events_applied`].

mod document;
mod embedded;
mod model;
pub mod postgres;
mod store;
mod switch;

pub use document::{ContextDocument, ProvenanceView, RelatedEntity, RelatedList};
pub use embedded::{
    ApplyStats, CacheStats, EmbeddedStore, WriteMarks, DEFAULT_CONTEXT_CACHE, DEFAULT_SYNC_INTERVAL,
};
pub use model::*;
pub use postgres::PostgresStore;
pub use store::ContextStore;
pub use switch::{SwitchOutcome, SwitchableStore};

/// Errors of a context store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's files could not be opened, read or written. Transient: disks recover,
    /// locks are released.
    #[error("context store I/O error: {0}")]
    Io(String),
    /// Stored bytes do not decode. Permanent: needs a rebuild from the log.
    #[error("context store data is corrupt: {0}")]
    Corrupt(String),
    /// The store's settings are wrong (a malformed URL, an invalid schema name). Permanent:
    /// fix the pipeline file.
    #[error("context store misconfigured: {0}")]
    Config(String),
}

impl StoreError {
    /// Whether retrying the same call can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Io(_))
    }
}
