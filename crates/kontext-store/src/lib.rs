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
    /// The store holds a newer format than this build writes ([`check_format`]). Permanent:
    /// run the newer kontext, or give this one a new store, which it rebuilds from the log.
    #[error("context store is incompatible: {0}")]
    Incompatible(String),
}

/// The layout of the data a context store holds, embedded and PostgreSQL alike: recorded in
/// the store when it opens, and raised whenever a kontext writes what an earlier one would read
/// or write wrongly (new tables, new meanings of columns). A store recording a newer format
/// than this build's is refused ([`check_format`]): an older kontext would apply records
/// without the newer one's bookkeeping, or show what the newer one hides. A store recording
/// none was written before the record existed, by this format or an earlier one, which the
/// opening migrates. Format 1: versioned tombstones, related lists, relation counts.
pub const STORE_FORMAT: u64 = 1;

/// Refuses a store whose recorded format is newer than [`STORE_FORMAT`].
pub fn check_format(store: &str, recorded: Option<u64>) -> Result<(), StoreError> {
    match recorded {
        Some(format) if format > STORE_FORMAT => Err(StoreError::Incompatible(format!(
            "{store} was written by a newer kontext (store format {format}; this kontext {} \
             writes format {STORE_FORMAT}): run that kontext or a newer one, or give this one \
             a store of its own (delete this one, or point at another schema): it is rebuilt \
             from the log",
            env!("CARGO_PKG_VERSION")
        ))),
        _ => Ok(()),
    }
}

/// The store's format record exists but does not read as one (a type this build does not
/// know): only a kontext of another format writes it so, and retrying cannot help.
pub(crate) fn unreadable_format(store: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Incompatible(format!(
        "{store} has a store format record this kontext {} cannot read ({error}): it was \
         written by another kontext; run that one, or give this one a store of its own",
        env!("CARGO_PKG_VERSION")
    ))
}

impl StoreError {
    /// Whether retrying the same call can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Io(_))
    }

    /// Whether the error is about the store's settings or format ([`StoreError::Config`],
    /// [`StoreError::Incompatible`]), never about the records of the call: no record is to
    /// blame, and no retry helps until someone changes the settings.
    pub fn is_configuration(&self) -> bool {
        matches!(self, StoreError::Config(_) | StoreError::Incompatible(_))
    }
}
