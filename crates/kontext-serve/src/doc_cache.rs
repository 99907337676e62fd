//! Values made from context documents (their JSON, their markdown), reused while the store
//! hands out the same document.
//!
//! The embedded store serves a hot entity's document from its cache as the same
//! `Arc<ContextDocument>` until something it shows changes. Serializing or rendering that
//! document is then most of what a fetch costs, so the result is kept next to a `Weak` of the
//! `Arc` it was made from and reused while the store returns that very `Arc`. A `Weak` keeps
//! the allocation, so its address cannot be reused by another document meanwhile (a pointer
//! match means the same content), but not the content: once the store's cache drops a
//! document, its fields and children are freed, and only the value the weigher counts stays.
//! Stores that assemble every lookup (PostgreSQL) return a new `Arc` each time, which nothing
//! else holds: their values are made and not kept.

use std::hash::Hash;
use std::sync::{Arc, Weak};

use kontext_store::ContextDocument;

/// What a kept value costs the cache's byte budget.
pub(crate) trait Weigh {
    fn weight(&self) -> u64;
}

#[derive(Clone)]
struct Entry<V> {
    doc: Weak<ContextDocument>,
    value: V,
}

#[derive(Clone)]
struct ByWeight;

impl<K, V: Weigh> quick_cache::Weighter<K, Entry<V>> for ByWeight {
    fn weight(&self, _: &K, entry: &Entry<V>) -> u64 {
        entry.value.weight() + 256
    }
}

/// Values by key (an entity and what was asked of it), each valid for one document.
pub(crate) struct DocCache<K, V> {
    entries: quick_cache::sync::Cache<K, Entry<V>, ByWeight>,
}

impl<K: Eq + Hash + Clone, V: Clone + Weigh> DocCache<K, V> {
    /// A cache of about `bytes` of values, most of them about `typical` bytes.
    pub(crate) fn new(bytes: u64, typical: u64) -> Self {
        Self {
            entries: quick_cache::sync::Cache::with_weighter(
                (bytes / typical.max(1)) as usize,
                bytes,
                ByWeight,
            ),
        }
    }

    /// The value under `key` for `doc`: the kept one if it was made from this very document
    /// and `fresh` accepts it, else what `make` gives (kept for the next lookup, unless only
    /// the caller holds `doc`: the store will never hand it out again).
    pub(crate) fn get_or_make<E>(
        &self,
        key: K,
        doc: &Arc<ContextDocument>,
        fresh: impl Fn(&V) -> bool,
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E> {
        if Arc::strong_count(doc) == 1 {
            return make();
        }
        if let Some(entry) = self.entries.get(&key) {
            if std::ptr::eq(entry.doc.as_ptr(), Arc::as_ptr(doc)) && fresh(&entry.value) {
                return Ok(entry.value);
            }
        }
        let value = make()?;
        self.entries.insert(
            key,
            Entry {
                doc: Arc::downgrade(doc),
                value: value.clone(),
            },
        );
        Ok(value)
    }

    /// How many values are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A customer document with one field, its event time at `as_of_ms` 0.
#[cfg(test)]
pub(crate) fn test_document() -> Arc<ContextDocument> {
    use std::collections::BTreeMap;

    use kontext_store::ProvenanceView;
    use serde_json::{json, Map};

    let as_of = Arc::new(ProvenanceView {
        event_id: "e1".into(),
        event_time: "2026-11-25T12:00:07.053Z".into(),
        event_type: None,
        offset: 1,
        partition: 0,
        source: "crm".into(),
        topic: "context.customers".into(),
    });
    let fields: Map<String, serde_json::Value> =
        json!({"given_name": "Ana"}).as_object().cloned().unwrap();
    Arc::new(ContextDocument {
        provenance: BTreeMap::from([("given_name".to_string(), Arc::clone(&as_of))]),
        as_of,
        belongs_to: BTreeMap::new(),
        entity_id: "C1".into(),
        entity_type: "customer".into(),
        events_applied: 1,
        fields,
        related: BTreeMap::new(),
        as_of_ms: 0,
    })
}
