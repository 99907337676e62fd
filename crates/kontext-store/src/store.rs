//! The interface every context store implements, so the sink and the API can hold any of
//! them behind an `Arc<dyn ContextStore>`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::embedded::{ApplyStats, CacheStats, WriteMarks};
use crate::{ContextDocument, EmbeddedStore, EntityDoc, EntityUpdate, StoreError, StoreSchema};

/// A context store: versioned, idempotent upserts plus the reads serving needs.
///
/// Contract (both implementations are tested against it):
/// - `apply` is atomic: the updates and the offsets become visible together, and durable
///   together (at once, or at the next `flush`: [`ContextStore::write_marks`]);
/// - a field changes only if the update's [`crate::Version`] is greater than the stored one;
/// - a tombstone removes what of its entity is not newer than it (the whole entity unless a
///   newer upsert was applied) and keeps out older upserts that arrive after it, so deletes
///   converge in any order of arrival too;
/// - an update whose offset is below the stored next offset of its (topic, partition) was
///   applied before and is skipped (`ApplyStats::skipped`);
/// - `events_applied` counts each applied log record of the entity once, tombstones included,
///   across deletes.
#[async_trait]
pub trait ContextStore: Send + Sync + 'static {
    /// `"embedded"` or `"postgres"`.
    fn kind(&self) -> &'static str;

    /// The entity types and relations the store was opened with.
    fn schema(&self) -> &StoreSchema;

    /// Applies `updates` and records `offsets` (topic, partition, next offset) atomically.
    async fn apply(
        &self,
        updates: &[EntityUpdate],
        offsets: &[(String, i32, i64)],
    ) -> Result<ApplyStats, StoreError>;

    /// One entity, if the store has it.
    async fn get(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<EntityDoc>, StoreError>;

    /// The assembled context of one entity (parents, related lists). Shared: a store may hand
    /// the same document to every reader until the entity or what it shows changes.
    async fn context(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<Arc<ContextDocument>>, StoreError>;

    /// Up to `limit` entity ids of a type in id order, after `after`.
    async fn list(
        &self,
        entity_type: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<String>, StoreError>;

    /// Next offset to apply per (topic, partition), as recorded with the data.
    async fn applied_offsets(&self) -> Result<BTreeMap<(String, i32), i64>, StoreError>;

    /// Every entity, in (type, id) order: for tests and exports.
    async fn dump(&self) -> Result<Vec<EntityDoc>, StoreError>;

    /// What the store's context document cache holds and did; `None` for a store without one.
    fn cache_stats(&self) -> Option<CacheStats> {
        None
    }

    /// How often the writer should call `flush`: a store that commits without fsyncing
    /// (zero, the default: every `apply` is durable when it returns).
    fn sync_interval(&self) -> Duration {
        Duration::ZERO
    }

    /// Commits made and commits durable. A write counted in `applied` but not in `durable`
    /// would be lost by a crash (with its offsets), so the log's group offsets must not cover
    /// it yet.
    fn write_marks(&self) -> WriteMarks {
        WriteMarks::default()
    }

    /// Makes every applied write durable.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait]
impl ContextStore for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn schema(&self) -> &StoreSchema {
        EmbeddedStore::schema(self)
    }

    async fn apply(
        &self,
        updates: &[EntityUpdate],
        offsets: &[(String, i32, i64)],
    ) -> Result<ApplyStats, StoreError> {
        let borrowed: Vec<(&str, i32, i64)> = offsets
            .iter()
            .map(|(t, p, n)| (t.as_str(), *p, *n))
            .collect();
        // The commit fsyncs: keep it off the async workers where the runtime allows it.
        blocking(|| EmbeddedStore::apply(self, updates, &borrowed))
    }

    async fn get(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<EntityDoc>, StoreError> {
        EmbeddedStore::get(self, entity_type, entity_id)
    }

    async fn context(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<Arc<ContextDocument>>, StoreError> {
        EmbeddedStore::context(self, entity_type, entity_id)
    }

    async fn list(
        &self,
        entity_type: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        EmbeddedStore::list(self, entity_type, limit, after)
    }

    async fn applied_offsets(&self) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        EmbeddedStore::applied_offsets(self)
    }

    async fn dump(&self) -> Result<Vec<EntityDoc>, StoreError> {
        EmbeddedStore::dump(self)
    }

    fn cache_stats(&self) -> Option<CacheStats> {
        Some(self.context_cache_stats())
    }

    fn sync_interval(&self) -> Duration {
        self.sync_interval
    }

    fn write_marks(&self) -> WriteMarks {
        EmbeddedStore::write_marks(self)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        blocking(|| EmbeddedStore::flush(self))
    }
}

/// Runs blocking work in place on a multi-threaded runtime (other tasks move to other
/// workers), or directly where that is not possible.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
