//! Assembled context documents kept in memory, so a hot entity (the customer an assistant is
//! talking to, fetched on every turn) is served without reading the store again.
//!
//! Invalidation is by **stamps**, not by removal. Every [`super::EmbeddedStore::apply`] (even
//! one whose commit failed) takes the next sequence number and writes it into the stamp slot
//! of each entity it changed and of each related list those are in (of their parents before
//! and after the change: a child's change alters the list, not the parent's own record). A cached document remembers
//! the sequence number read *before* the snapshot it was assembled from, and the slots of the
//! entity, of the parents it names (whether or not they exist yet) and of its related lists. It
//! is served only while none of those slots is newer.
//!
//! Why that is exact:
//! - the writer commits, then takes the sequence number, then stamps; a reader reads the
//!   sequence number, then opens its snapshot. A commit whose number a reader saw is in that
//!   reader's snapshot; a commit it did not see stamps a number above the document's;
//! - before its commit, the writer marks the slots it will stamp as **pending** (the top bit
//!   of the stamp, which puts it above every number; the commit's number replaces it after the
//!   commit; one write at a time does this, under `stamping`). So a commit is, in each slot it
//!   changes, either stamped or pending from before it is visible to any reader (redb
//!   publishes a commit under its header lock, which `begin_read` takes too). A cached
//!   document is still served while a write that changes it is pending, as it would be before
//!   that write began; what is kept *without reading it* is not;
//! - a document assembled before a commit and cached after it is caught the same way, so no
//!   insert can resurrect a stale document;
//! - slots are hashes, so two entities may share one: that only invalidates more than needed.
//!
//! A read that overlaps an `apply` may still see the document as of before that commit, as it
//! would without a cache; once `apply` has returned, every read sees the change.
//!
//! A document that did change is assembled again, but most of what it shows did not: a
//! customer's new order leaves the other nineteen entities of its context as they were. So the
//! cache also keeps **decoded entities** ([`RelatedEntity`], what a document shows of a parent
//! or a child), each with the stored bytes it was decoded from and a sequence number, and
//! assembly reuses one in either of two ways:
//! - **without reading it**, when the entity's slot is neither pending nor newer than the
//!   entity's sequence number, and that number is not newer than the reader's. The first
//!   says that no commit changed the entity since it was decoded, nor is about to; the second
//!   that it was not decoded from a snapshot newer than the reader's (a commit after the
//!   reader's snapshot has a number above the reader's). The order of the loads matters: the
//!   entry and its number first, then the stamp. An entry that another reader decoded from a
//!   commit not yet numbered (its number read before that commit's) is thus always seen with
//!   the commit's pending mark or its number: the mark was set before the commit became
//!   visible to that other reader;
//! - otherwise **by its bytes**: the reader reads the record from its snapshot and reuses the
//!   decoded entity if the bytes are equal, which also brings its sequence number up to the
//!   reader's.
//!
//! Coarser still, a document that changed is **rebuilt from its stale self**. Its entity's own
//! record and each of its related lists have slots of their own, so a customer's new order
//! leaves the customer's record and its other lists as they were (and the documents of the
//! customer's other orders, which show the customer's record, valid). A lookup that finds its
//! document stale takes it out of the cache and, once its own snapshot is open, keeps the
//! record, each parent (of the same id) and each related list whose slot no commit stamped
//! since the stale document's sequence number, and from a list that changed, each child whose
//! slot did not. That is exact for the same reasons as above: the stale document was taken
//! from the cache before the lookup opened its snapshot, and cached after its own snapshot
//! opened, so its snapshot is not newer than the lookup's; a commit in the lookup's snapshot
//! but not in the stale document's took its number after the stale document's, and marked
//! what it changed pending before it became visible, so the stamps (loaded after the snapshot
//! opened) show it. A write in progress blocks only the parts it changes. A related list's
//! slot covers the list's order, its total and its children's records.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::document::{ContextDocument, RelatedEntity};

/// Set in the stamp of a slot whose write is between its pending mark and its commit's number,
/// over the slot's previous number: above every sequence number, so nothing that depends on
/// the slot is kept without reading it meanwhile.
const PENDING: u64 = 1 << 63;
/// Stamp slots (8 bytes each: 2 MiB).
const SLOTS: usize = 1 << 18;
/// Decoded entities kept per cached document: 32 768 with the default 4 096 documents, each
/// with a copy of its stored record. (A quickstart customer shows 21, but most documents in a
/// cache share their parents, and entities of cold documents are evicted first.)
const ENTITIES_PER_DOCUMENT: usize = 8;

/// A cached document and what it was assembled from.
#[derive(Clone)]
pub(crate) struct Cached {
    doc: Arc<ContextDocument>,
    /// The sequence number read before the document's snapshot.
    seq: u64,
    /// Stamp slots of what the document shows: its entity's record, the parents it names,
    /// and its related lists.
    deps: Arc<[u32]>,
}

/// What a lookup found in the cache.
pub(crate) enum Lookup {
    Fresh(Arc<ContextDocument>),
    /// Something the document shows changed; taken out of the cache, to be rebuilt.
    Stale(Cached),
    Absent,
}

/// Which parts of a stale document a reader keeps: those no commit since the document and no
/// write in progress changed (a conservative test of "not changed in the reader's snapshot").
pub(crate) struct Reuse<'a> {
    stamps: &'a [AtomicU64],
    /// The stale document's sequence number.
    seq: u64,
    reused: &'a AtomicU64,
}

impl Reuse<'_> {
    /// Whether no commit stamped `slot` since the stale document was assembled and no write in
    /// progress marked it pending (counted as a part kept when so).
    pub(crate) fn unchanged(&self, slot: u32) -> bool {
        let fresh = self.stamps[slot as usize].load(Ordering::Acquire) <= self.seq;
        if fresh {
            self.reused.fetch_add(1, Ordering::Relaxed);
        }
        fresh
    }
}

/// A decoded entity, the stored record it was decoded from, and the sequence number read
/// before a snapshot that holds exactly that record.
struct Decoded {
    stored: Box<[u8]>,
    entity: Arc<RelatedEntity>,
    seq: AtomicU64,
}

/// Bounded cache of context documents, keyed by the store's entity key (`type \0 id`).
pub(crate) struct ContextCache {
    docs: quick_cache::sync::Cache<Vec<u8>, Cached>,
    /// Decoded parents and children, by entity key.
    entities: quick_cache::sync::Cache<Vec<u8>, Arc<Decoded>>,
    stamps: Box<[AtomicU64]>,
    seq: AtomicU64,
    /// Held by a write from its pending marks to its stamps, so that a write's stamps never
    /// replace the next one's marks.
    stamping: Mutex<()>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Parents and children of assembled documents taken from `entities` (read or not).
    entities_reused: AtomicU64,
    /// ... and decoded from the store.
    entities_decoded: AtomicU64,
    /// Records, lists and children of stale documents kept without reading them.
    parts_reused: AtomicU64,
}

impl ContextCache {
    /// A cache of at most (about) `capacity` documents.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            docs: quick_cache::sync::Cache::new(capacity),
            entities: quick_cache::sync::Cache::new(capacity.saturating_mul(ENTITIES_PER_DOCUMENT)),
            stamps: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            seq: AtomicU64::new(0),
            stamping: Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            entities_reused: AtomicU64::new(0),
            entities_decoded: AtomicU64::new(0),
            parts_reused: AtomicU64::new(0),
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

    /// The cached document of `key`, unless something it shows changed since; then the stale
    /// document, taken out of the cache (the lookup rebuilds it with [`ContextCache::reuse`]).
    pub(crate) fn get(&self, key: &[u8]) -> Lookup {
        let Some(cached) = self.docs.get(key) else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Lookup::Absent;
        };
        let fresh = cached.deps.iter().all(|&slot| {
            self.stamps[slot as usize].load(Ordering::Acquire) & !PENDING <= cached.seq
        });
        if fresh {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Fresh(cached.doc);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Unless another lookup replaced it meanwhile. Out of the cache, the document is
        // usually held by this lookup alone, which can then move its parts.
        self.docs
            .remove_if(key, |other| Arc::ptr_eq(&other.doc, &cached.doc));
        Lookup::Stale(cached)
    }

    /// What of `stale` a reader may keep without reading it: the document (moved out if no
    /// one else holds it, else a copy) and the test for its parts. Test them only after the
    /// reader's snapshot is open.
    pub(crate) fn reuse(&self, stale: Cached) -> (Reuse<'_>, ContextDocument) {
        let reuse = Reuse {
            stamps: &self.stamps,
            seq: stale.seq,
            reused: &self.parts_reused,
        };
        (reuse, Arc::unwrap_or_clone(stale.doc))
    }

    /// Keeps a document assembled from a snapshot opened after [`ContextCache::before_read`]
    /// returned `seq`; `deps` are the stamp slots of the entity's record, of the parents it
    /// names and of its related lists.
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

    /// The decoded entity of `key`, if no commit changed it since it was decoded and it is
    /// not newer than a snapshot opened after [`ContextCache::before_read`] returned `seq`:
    /// then it is what that snapshot holds, and the reader need not read it.
    pub(crate) fn unchanged_entity(&self, key: &[u8], seq: u64) -> Option<Arc<RelatedEntity>> {
        let decoded = self.entities.get(key)?;
        let at = decoded.seq.load(Ordering::Acquire);
        // Only now, after the entry and its number: the entry may come from a reader whose
        // snapshot holds a commit not yet numbered, whose pending mark must show here.
        let stamp = self.stamps[Self::slot(key) as usize].load(Ordering::Acquire);
        let fresh = stamp <= at && at <= seq;
        if fresh {
            self.entities_reused.fetch_add(1, Ordering::Relaxed);
        }
        fresh.then(|| Arc::clone(&decoded.entity))
    }

    /// The entity decoded from `stored`, the record of `key` in a snapshot opened after
    /// [`ContextCache::before_read`] returned `seq`, if it was decoded from these bytes before.
    pub(crate) fn entity(&self, key: &[u8], stored: &[u8], seq: u64) -> Option<Arc<RelatedEntity>> {
        let decoded = self.entities.get(key)?;
        if *decoded.stored != *stored {
            return None;
        }
        // The reader's snapshot holds exactly these bytes: as good as decoded from it.
        decoded.seq.fetch_max(seq, Ordering::AcqRel);
        self.entities_reused.fetch_add(1, Ordering::Relaxed);
        Some(Arc::clone(&decoded.entity))
    }

    /// Keeps `entity`, decoded from `stored` (read as in [`ContextCache::entity`]), for the
    /// next documents that show it.
    pub(crate) fn insert_entity(
        &self,
        key: &[u8],
        stored: &[u8],
        entity: Arc<RelatedEntity>,
        seq: u64,
    ) {
        self.entities_decoded.fetch_add(1, Ordering::Relaxed);
        self.entities.insert(
            key.to_vec(),
            Arc::new(Decoded {
                stored: stored.into(),
                entity,
                seq: AtomicU64::new(seq),
            }),
        );
    }

    /// Marks the `slots` a write changes (its entities and the related lists they are in) as
    /// pending. Call it before the commit; dropping the result after the commit (or its
    /// failure) stamps them with the commit's number, which must happen before the write is
    /// reported done.
    pub(crate) fn begin_write(&self, slots: Vec<u32>) -> WriteInProgress<'_> {
        let stamping = self.stamping.lock().unwrap_or_else(PoisonError::into_inner);
        for &slot in &slots {
            self.stamps[slot as usize].fetch_or(PENDING, Ordering::AcqRel);
        }
        WriteInProgress {
            cache: self,
            slots,
            _stamping: stamping,
        }
    }

    /// Documents held now, lookups served from the cache and lookups that assembled.
    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            documents: self.docs.len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entities_reused: self.entities_reused.load(Ordering::Relaxed),
            entities_decoded: self.entities_decoded.load(Ordering::Relaxed),
            parts_reused: self.parts_reused.load(Ordering::Relaxed),
        }
    }
}

/// A write between its pending marks and its stamps; stamps when dropped.
pub(crate) struct WriteInProgress<'a> {
    cache: &'a ContextCache,
    slots: Vec<u32>,
    _stamping: MutexGuard<'a, ()>,
}

impl Drop for WriteInProgress<'_> {
    fn drop(&mut self) {
        // After the commit: a reader that sees this number has the commit in its snapshot.
        let seq = self.cache.seq.fetch_add(1, Ordering::AcqRel) + 1;
        for &slot in &self.slots {
            // Not `fetch_max`: the pending mark is above every number. Only this write
            // stamps now (`stamping`), and `seq` is above every number before it.
            self.cache.stamps[slot as usize].store(seq, Ordering::Release);
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
    /// Parents and children of assembled documents reused from memory (their record
    /// unchanged since they were decoded).
    pub entities_reused: u64,
    /// Parents and children of assembled documents decoded from the store.
    pub entities_decoded: u64,
    /// Records, parents, related lists and children of stale documents kept as they were,
    /// without reading them (nothing changed them since).
    pub parts_reused: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that changed `slots`, from its pending marks to its stamps.
    fn commit<const N: usize>(cache: &ContextCache, slots: [u32; N]) {
        drop(cache.begin_write(slots.to_vec()));
    }

    fn entity(id: &str) -> Arc<RelatedEntity> {
        Arc::new(RelatedEntity {
            entity_id: id.into(),
            fields: Default::default(),
            provenance: Default::default(),
        })
    }

    /// The conditions under which a decoded entity is reused without reading it, each
    /// refused on its own.
    #[test]
    fn an_entity_is_reused_unread_only_when_nothing_can_have_changed_it() {
        let cache = ContextCache::new(16);
        let key = b"order\0O1".as_slice();
        while cache.before_read() < 5 {
            commit(&cache, []);
        }
        cache.insert_entity(key, b"v1", entity("O1"), 5);
        assert!(cache.unchanged_entity(key, 5).is_some());
        assert!(cache.unchanged_entity(key, 9).is_some());
        // Decoded from a snapshot newer than the reader's.
        assert!(cache.unchanged_entity(key, 4).is_none());
        // A write in progress that does not change it (it commits as 6), then one that does.
        let other = ContextCache::slot(b"order\0O2");
        assert_ne!(other, ContextCache::slot(key));
        let writing = cache.begin_write(vec![other]);
        assert!(cache.unchanged_entity(key, 9).is_some());
        drop(writing);
        let writing = cache.begin_write(vec![ContextCache::slot(key)]);
        assert!(cache.unchanged_entity(key, 9).is_none());
        drop(writing);
        // Its commit (7 > 5) changed it; decoded again after it, it is reused again.
        assert_eq!(cache.before_read(), 7);
        assert!(cache.unchanged_entity(key, 9).is_none());
        cache.insert_entity(key, b"v2", entity("O1"), 7);
        assert!(cache.unchanged_entity(key, 9).is_some());
    }

    /// A stale document's part is kept unless a commit since the document changed it or a
    /// write in progress is about to; the document itself is served until that write's stamps.
    #[test]
    fn a_stale_part_is_kept_unless_a_write_since_or_in_progress_touches_it() {
        let cache = ContextCache::new(16);
        let (a, b) = (
            ContextCache::slot(b"customer\0C1"),
            ContextCache::slot(b"customer\0C2"),
        );
        assert_ne!(a, b);
        commit(&cache, [a]);
        let seq = cache.before_read();
        let doc = Arc::new(ContextDocument {
            as_of: Arc::new(crate::document::ProvenanceView {
                event_id: "e1".into(),
                event_time: "2026-12-04T00:00:00Z".into(),
                event_type: None,
                offset: 0,
                partition: 0,
                source: "crm".into(),
                topic: "context.customers".into(),
            }),
            belongs_to: Default::default(),
            entity_id: "C1".into(),
            entity_type: "customer".into(),
            events_applied: 1,
            fields: Default::default(),
            provenance: Default::default(),
            related: Default::default(),
            as_of_ms: 0,
        });
        cache.insert(b"customer\0C1".to_vec(), doc, seq, vec![a, b]);
        // Still served while a write that changes it is pending, as before that write began.
        let writing = cache.begin_write(vec![b]);
        assert!(matches!(cache.get(b"customer\0C1"), Lookup::Fresh(_)));
        drop(writing);
        let Lookup::Stale(stale) = cache.get(b"customer\0C1") else {
            panic!("b changed since");
        };
        let (reuse, _) = cache.reuse(stale);
        assert!(reuse.unchanged(a) && !reuse.unchanged(b));
        let writing = cache.begin_write(vec![a]);
        assert!(!reuse.unchanged(a), "pending");
        drop(writing);
        assert!(!reuse.unchanged(a), "stamped");
        assert_eq!(cache.stats().parts_reused, 1);
    }

    /// A reader that finds the same bytes in its snapshot brings the entity up to its sequence
    /// number, so the next readers reuse it unread again; other bytes are not reused.
    #[test]
    fn equal_bytes_renew_an_entity_and_other_bytes_do_not_match() {
        let cache = ContextCache::new(16);
        let key = b"order\0O1".as_slice();
        cache.insert_entity(key, b"v1", entity("O1"), 1);
        commit(&cache, [ContextCache::slot(key)]);
        commit(&cache, [ContextCache::slot(key)]);
        assert!(cache.unchanged_entity(key, 2).is_none());
        assert!(cache.entity(key, b"v2", 2).is_none());
        assert!(cache.entity(key, b"v1", 2).is_some());
        assert!(cache.unchanged_entity(key, 2).is_some());
    }
}
