//! Assembled context documents kept in memory, so a hot entity (the customer an assistant is
//! talking to, fetched on every turn) is served without reading the store again.
//!
//! Invalidation is by **stamps**, not by removal. Every committed [`super::EmbeddedStore::apply`]
//! takes the next sequence number and writes it into the stamp slot of each entity it changed
//! and of each parent of those (before and after the change: a child's change alters its
//! parent's related lists). A cached document remembers the sequence number read *before* the
//! snapshot it was assembled from, and the slots of the entity and of the parents it shows
//! (whether or not they exist yet). It is served only while none of those slots is newer.
//!
//! Why that is exact:
//! - the writer commits, then takes the sequence number, then stamps; a reader reads the
//!   sequence number, then opens its snapshot. A commit whose number a reader saw is in that
//!   reader's snapshot; a commit it did not see stamps a number above the document's;
//! - a document assembled before a commit and cached after it is caught the same way, so no
//!   insert can resurrect a stale document;
//! - slots are hashes, so two entities may share one: that only invalidates more than needed.
//!
//! A read that overlaps an `apply` may still see the document as of before that commit, as it
//! would without a cache; once `apply` has returned, every read sees the change.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::document::ContextDocument;

/// Stamp slots (8 bytes each: 512 KiB).
const SLOTS: usize = 1 << 16;

/// A cached document and what it was assembled from.
#[derive(Clone)]
struct Cached {
    doc: Arc<ContextDocument>,
    /// The sequence number read before the document's snapshot.
    seq: u64,
    /// Stamp slots of the entity and of the parents it shows.
    deps: Arc<[u32]>,
}

/// Bounded cache of context documents, keyed by the store's entity key (`type \0 id`).
pub(crate) struct ContextCache {
    docs: quick_cache::sync::Cache<Vec<u8>, Cached>,
    stamps: Box<[AtomicU64]>,
    seq: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ContextCache {
    /// A cache of at most (about) `capacity` documents.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            docs: quick_cache::sync::Cache::new(capacity),
            stamps: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            seq: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The stamp slot of an entity key.
    pub(crate) fn slot(key: &[u8]) -> u32 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() as usize % SLOTS) as u32
    }

    /// What to remember of the store's state before opening a snapshot to assemble from.
    pub(crate) fn before_read(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// The cached document of `key`, unless something it shows changed since.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Arc<ContextDocument>> {
        let fresh = self.docs.get(key).filter(|cached| {
            cached
                .deps
                .iter()
                .all(|&slot| self.stamps[slot as usize].load(Ordering::Acquire) <= cached.seq)
        });
        let counter = if fresh.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        fresh.map(|cached| cached.doc)
    }

    /// Keeps a document assembled from a snapshot opened after [`ContextCache::before_read`]
    /// returned `seq`; `deps` are the stamp slots of the entity and of its parents.
    pub(crate) fn insert(&self, key: Vec<u8>, doc: Arc<ContextDocument>, seq: u64, deps: Vec<u32>) {
        self.docs.insert(
            key,
            Cached {
                doc,
                seq,
                deps: deps.into(),
            },
        );
    }

    /// Records a committed write that changed the entities (and parents) in `slots`. Call it
    /// after the commit and before reporting the write done.
    pub(crate) fn committed(&self, slots: impl IntoIterator<Item = u32>) {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        for slot in slots {
            self.stamps[slot as usize].fetch_max(seq, Ordering::AcqRel);
        }
    }

    /// Documents held now, lookups served from the cache and lookups that assembled.
    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            documents: self.docs.len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }
}

/// What the context cache of an embedded store holds and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Documents held now.
    pub documents: usize,
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that assembled the document (not cached, or something it shows changed).
    pub misses: u64,
}
