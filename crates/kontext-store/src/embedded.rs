//! The embedded context store: one redb file in the data directory.
//!
//! redb is a B-tree with MVCC: readers (the HTTP API) never block the writer (the pipeline)
//! and always see a committed batch as a whole. Every [`EmbeddedStore::apply`] is one write
//! transaction holding the entity changes, the relation index and the source offsets
//! together.
//!
//! Durability can be decoupled from visibility ([`EmbeddedStore::with_sync_interval`]): a
//! commit is visible to readers at once and becomes durable, with every commit before it, at
//! the next [`EmbeddedStore::flush`] (the sink flushes every sync interval, off the write
//! path). A crash loses only unflushed commits, atomically with their offsets: the store
//! reopens at its last durable commit, and the sink, which commits its group offsets only up
//! to what is durable ([`WriteMarks`]), replays the rest from the log.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

use crate::document::{ContextDocument, RelatedEntity, RelatedList};
use crate::model::{
    merge_fields, parent_id_of, Change, EntityDoc, EntityUpdate, OwnedVersion, Provenance,
    StoreSchema,
};
use crate::StoreError;
pub use cache::CacheStats;
use cache::{Cached, ContextCache, Lookup};

/// `entity_type \0 entity_id` -> JSON [`EntityDoc`]
const ENTITIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entities");
/// `parent_type \0 parent_id \0 child_type \0 child_id` -> ()
const RELATIONS: TableDefinition<&[u8], ()> = TableDefinition::new("relations");
/// `parent_type \0 parent_id \0 child_type \0` -> how many [`RELATIONS`] keys start with it,
/// and the newest of those children by latest version (up to [`list_capacity`] of the type's
/// `related_limit`), newest first ([`codec::encode_related`]). A lookup reads one value for a
/// related list, and a batch rewrites each list it changes once, however many of the parent's
/// children it updates. The entries are always the newest `len` children of the parent: a
/// child newer than the oldest entry enters (pushing that one out when the list is full), an
/// older one stays outside, and a list that falls below `related_limit` while children remain
/// outside (deletes, moves, older versions) is rebuilt from [`RELATIONS`].
const RELATED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("related");
/// child type -> the `related_limit` its [`RELATED`] lists were last built for. A larger limit
/// in the schema rebuilds that type's lists when the store is opened (their entries would be
/// too few to show).
const RELATED_LIMITS: TableDefinition<&str, u64> = TableDefinition::new("related_limits");
/// The layout before [`RELATED`]: one key per child in version order
/// (`parent_type \0 parent_id \0 child_type \0 <version> child_id`), and the counts apart.
/// Found when a store is opened, they are dropped and [`RELATED`] is built anew (a kontext of
/// that layout may have written the store since it was last built; one older still, without
/// these tables, leaves no trace and needs `kontext rebuild` after a downgrade).
const LEGACY_RECENT: TableDefinition<&[u8], ()> = TableDefinition::new("recent");
const LEGACY_COUNTS: TableDefinition<&[u8], u64> = TableDefinition::new("relation_counts");
/// `entity_type \0 entity_id` -> the version of the newest tombstone applied to the entity,
/// and its `events_applied` while it has no document ([`codec::encode_tombstone`]). Kept for
/// good: an upsert older than the tombstone may still arrive (from another partition, or
/// another topic writing the same entity) and must stay out, in whatever order the two come.
const TOMBSTONES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tombstones");
/// (topic, partition) -> next offset to apply
const OFFSETS: TableDefinition<(&str, i32), i64> = TableDefinition::new("offsets");
/// The store's bookkeeping: `format` → the [`crate::STORE_FORMAT`] it was last opened with.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Context documents kept in memory unless [`EmbeddedStore::with_context_cache`] says otherwise.
pub const DEFAULT_CONTEXT_CACHE: usize = 4_096;
/// The pipeline's sync interval (`stores[].sync_interval`) when the file sets none. A store
/// opened directly fsyncs every commit unless [`EmbeddedStore::with_sync_interval`] says
/// otherwise.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// Counts of what one [`EmbeddedStore::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Updates applied (each log record at most once).
    pub applied: u64,
    /// Updates skipped because the store had already applied their offset.
    pub skipped: u64,
    /// Tombstones applied (counted in `applied` too). Each removes what of its entity is not
    /// newer than it: the whole entity, or the older fields of one written since.
    pub deleted: u64,
}

/// An entity's latest version, (event time, topic, partition, offset): what orders children.
type Latest = OwnedVersion;

/// An entity touched by the batch being applied: what the relation index holds for it before
/// the batch, and the document as it will be.
struct Pending {
    /// Whether the store had the entity before the batch.
    existed: bool,
    /// Its latest version before the batch (where its parents' related lists have it).
    latest_before: Option<Latest>,
    /// Per `belongs_to` relation of its type (in schema order), the parent id stored before.
    parents_before: Vec<Option<String>>,
    /// Per `belongs_to` relation, the version of the relation field stored before: a field
    /// the batch wrote again has another. Empty when every child of the type is linked
    /// ([`EmbeddedStore::all_linked`]): then it is not needed.
    parent_fields_before: Vec<Option<Arc<Provenance>>>,
    after: Option<EntityDoc>,
    /// The newest tombstone applied to it: nothing of it at that version or older is kept.
    tomb: Option<Latest>,
    /// Log records applied to it, deleted or not (`events_applied` of the document it has).
    events: u64,
}

impl Pending {
    /// Applies one update, in any order relative to the entity's others: the state after a
    /// set of updates does not depend on the order they came in. A field keeps its newest
    /// value not older than the newest tombstone, and the entity exists while an upsert newer
    /// than that tombstone has been applied.
    fn apply(&mut self, update: &EntityUpdate) {
        self.events += 1;
        let p = &update.provenance;
        match &update.change {
            Change::Upsert(fields) => {
                if self.tomb.as_ref().is_some_and(|t| p.not_newer_than(t)) {
                    // The entity was deleted after this event.
                    return;
                }
                // One copy of the event's provenance, shared by the fields it sets.
                let p = Arc::new(p.clone());
                let doc = self.after.get_or_insert_with(|| EntityDoc {
                    entity_type: update.entity_type.clone(),
                    entity_id: update.entity_id.clone(),
                    fields: BTreeMap::new(),
                    events_applied: 0,
                    latest: Arc::clone(&p),
                });
                merge_fields(doc, fields, &p);
            }
            Change::Delete => {
                let version = p.owned_version();
                if self.tomb.as_ref().is_none_or(|t| version > *t) {
                    self.tomb = Some(version);
                }
                let Some(tomb) = &self.tomb else { return };
                if let Some(doc) = &mut self.after {
                    if doc.latest.not_newer_than(tomb) {
                        self.after = None;
                    } else {
                        doc.fields.retain(|_, f| !f.provenance.not_newer_than(tomb));
                    }
                }
            }
        }
    }
}

/// A lookup through the document cache: the cache, the sequence number it gave before the
/// lookup's snapshot, the stale document the lookup found, if any, and the stamp slots of the
/// entity's record and of its related lists (in `children_of` order).
pub(crate) struct Reading<'a> {
    cache: &'a ContextCache,
    seq: u64,
    stale: Option<Cached>,
    slots: &'a [u32],
}

/// A durable, versioned context store in one file.
pub struct EmbeddedStore {
    db: Database,
    schema: StoreSchema,
    /// Per child type, per `belongs_to` relation (in schema order): whether every stored
    /// child naming a parent in the relation field has its relation key ([`linked_relations`]).
    /// Only a relation added to a type that had data has children without one.
    all_linked: BTreeMap<String, Vec<bool>>,
    /// Assembled documents of hot entities; `None` when switched off.
    cache: Option<ContextCache>,
    /// How often the owner flushes; zero: every commit is durable when `apply` returns.
    pub(crate) sync_interval: Duration,
    /// Commits made by `apply`, and how many of them are durable.
    applied: AtomicU64,
    durable: AtomicU64,
}

/// Where a store's writes stand: `applied` counts the `apply` calls that committed, and the
/// first `durable` of them survive a crash. A store whose every `apply` is durable keeps the
/// two equal (zero for a store that does not count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteMarks {
    pub applied: u64,
    pub durable: u64,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path, schema: StoreSchema) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(io)?;
        {
            // Before any migration: a newer format is left exactly as it is.
            let store = path.display().to_string();
            let mut meta = txn.open_table(META).map_err(|e| match e {
                redb::TableError::TableTypeMismatch { .. } => crate::unreadable_format(&store, e),
                e => io(e),
            })?;
            let recorded = meta.get("format").map_err(io)?.map(|v| v.value());
            crate::check_format(&store, recorded)?;
            if recorded != Some(crate::STORE_FORMAT) {
                meta.insert("format", crate::STORE_FORMAT).map_err(io)?;
            }
        }
        txn.open_table(ENTITIES).map_err(io)?;
        txn.open_table(RELATIONS).map_err(io)?;
        txn.open_table(OFFSETS).map_err(io)?;
        txn.open_table(TOMBSTONES).map_err(io)?;
        build_related(&txn, &schema)?;
        let all_linked = linked_relations(&txn, &schema)?;
        txn.commit().map_err(io)?;
        Ok(Self {
            db,
            schema,
            all_linked,
            cache: Some(ContextCache::new(DEFAULT_CONTEXT_CACHE)),
            sync_interval: Duration::ZERO,
            applied: AtomicU64::new(0),
            durable: AtomicU64::new(0),
        })
    }

    /// Keeps up to `documents` assembled context documents in memory (0: none), served until
    /// something they show changes (see `embedded/cache.rs`). [`DEFAULT_CONTEXT_CACHE`] by
    /// default.
    pub fn with_context_cache(mut self, documents: usize) -> Self {
        self.cache = (documents > 0).then(|| ContextCache::new(documents));
        self
    }

    /// Commits without fsyncing when `interval` is not zero (zero, the default: every
    /// commit is durable). A commit is visible to readers as soon as it returns either way; an
    /// unsynced one becomes durable, with every commit before it, at the next
    /// [`EmbeddedStore::flush`], which the owner calls every `interval` ([`WriteMarks`] say how
    /// far it got). After a crash the store reopens at its last durable commit, data and
    /// offsets together.
    pub fn with_sync_interval(mut self, interval: Duration) -> Self {
        self.sync_interval = interval;
        self
    }

    /// How many commits were made, and how many of them are durable.
    pub fn write_marks(&self) -> WriteMarks {
        // `durable` first: read the other way round, a flush in between could show more
        // durable commits than applied ones.
        let durable = self.durable.load(Ordering::Acquire);
        WriteMarks {
            applied: self.applied.load(Ordering::Acquire),
            durable,
        }
    }

    /// Makes every commit durable (one fsync), if any is not yet.
    pub fn flush(&self) -> Result<(), StoreError> {
        // Under the write transaction no commit can happen, so it covers at least `applied`
        // (a commit that finished just before may not be counted yet).
        let mut txn = self.db.begin_write().map_err(io)?;
        let applied = self.applied.load(Ordering::Acquire);
        if self.durable.load(Ordering::Acquire) == applied {
            return txn.abort().map_err(io);
        }
        txn.set_durability(Durability::Immediate).map_err(io)?;
        txn.commit().map_err(io)?;
        self.durable.fetch_max(applied, Ordering::AcqRel);
        Ok(())
    }

    /// The assembled context of one entity (its parents and related lists); `None` if the
    /// store has never seen it. A document in the cache is served while nothing it shows has
    /// changed; otherwise it is assembled from one snapshot and cached.
    pub fn context(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<Arc<ContextDocument>>, StoreError> {
        let Some(cache) = &self.cache else {
            return Ok(self
                .assemble_context(entity_type, entity_id, None)?
                .map(Arc::new));
        };
        let key = entity_key(entity_type, entity_id);
        let stale = match cache.get(&key) {
            Lookup::Fresh(doc) => return Ok(Some(doc)),
            Lookup::Stale(stale) => Some(stale),
            Lookup::Absent => None,
        };
        // The slots of its record and of its related lists, then of the parents it names
        // (shown or not yet stored).
        let mut deps = vec![ContextCache::slot(&key)];
        for (child_type, _) in self.schema.children_of(entity_type) {
            let list = relation_key(entity_type, entity_id, child_type, "");
            deps.push(ContextCache::slot(&list));
        }
        let seq = cache.before_read();
        let reading = Reading {
            cache,
            seq,
            stale,
            slots: &deps,
        };
        let Some(doc) = self.assemble_context(entity_type, entity_id, Some(reading))? else {
            return Ok(None);
        };
        for (parent_type, field) in self.schema.parents_of(entity_type) {
            if let Some(parent_id) = doc.fields.get(field).and_then(parent_id_of) {
                deps.push(ContextCache::slot(&entity_key(parent_type, &parent_id)));
            }
        }
        let doc = Arc::new(doc);
        cache.insert(key, Arc::clone(&doc), seq, deps);
        Ok(Some(doc))
    }

    /// What the context document cache holds and did (all zero when it is off).
    pub fn context_cache_stats(&self) -> CacheStats {
        self.cache
            .as_ref()
            .map(ContextCache::stats)
            .unwrap_or_default()
    }

    pub fn schema(&self) -> &StoreSchema {
        &self.schema
    }

    /// Applies `updates` and records `offsets` (topic, partition, next offset) in one
    /// transaction, durable at once or at the next flush
    /// ([`EmbeddedStore::with_sync_interval`]). An update whose offset is below the recorded
    /// next offset of its partition was applied before and is skipped, so re-delivered records
    /// change nothing.
    pub fn apply(
        &self,
        updates: &[EntityUpdate],
        offsets: &[(&str, i32, i64)],
    ) -> Result<ApplyStats, StoreError> {
        let mut stats = ApplyStats::default();
        // Cache stamp slots of the entities changed and of the related lists they are in.
        let mut changed = Vec::new();
        let mut txn = self.db.begin_write().map_err(io)?;
        let durable = self.sync_interval.is_zero();
        if !durable {
            txn.set_durability(Durability::None).map_err(io)?;
        }
        {
            let mut entities = txn.open_table(ENTITIES).map_err(io)?;
            let mut relations = txn.open_table(RELATIONS).map_err(io)?;
            let mut related = txn.open_table(RELATED).map_err(io)?;
            let mut moves = BTreeMap::new();
            let mut offset_table = txn.open_table(OFFSETS).map_err(io)?;
            let mut tombstones = txn.open_table(TOMBSTONES).map_err(io)?;
            // Most stores never see a tombstone: no lookup per entity then.
            let any_tombstones = !tombstones.is_empty().map_err(io)?;
            // Borrowed keys: no allocation per update for the bookkeeping.
            let mut applied_upto: BTreeMap<(&str, i32), i64> = BTreeMap::new();
            // In log order: which updates the store has not applied yet.
            let mut live: Vec<usize> = Vec::with_capacity(updates.len());
            for (i, update) in updates.iter().enumerate() {
                let p = &update.provenance;
                let key = (p.topic.as_str(), p.partition);
                let next = match applied_upto.get(&key) {
                    Some(n) => *n,
                    None => {
                        let n = offset_table
                            .get(key)
                            .map_err(io)?
                            .map(|g| g.value())
                            .unwrap_or(0);
                        applied_upto.insert(key, n);
                        n
                    }
                };
                if p.offset < next {
                    stats.skipped += 1;
                    continue;
                }
                applied_upto.insert(key, p.offset + 1);
                live.push(i);
            }
            // Grouped by entity, in key order (the writes walk the B-tree in order), each
            // entity's updates in log order: an entity is read, changed by all its updates,
            // indexed and written while it is in the cache, once per batch.
            let id_of = |i: &usize| {
                let u = &updates[*i];
                (u.entity_type.as_str(), u.entity_id.as_str(), *i)
            };
            live.sort_unstable_by(|a, b| id_of(a).cmp(&id_of(b)));
            let mut buf = Vec::with_capacity(1024);
            for group in live.chunk_by(|a, b| {
                let (a, b) = (&updates[*a], &updates[*b]);
                a.entity_id == b.entity_id && a.entity_type == b.entity_type
            }) {
                let first = &updates[group[0]];
                let (entity_type, entity_id) =
                    (first.entity_type.as_str(), first.entity_id.as_str());
                refuse_nul(entity_type, entity_id, "id", entity_id)?;
                let key = entity_key(entity_type, entity_id);
                let mut pending = self.pending(&entities, entity_type, &key)?;
                // As stored: rewritten only if the batch changes it.
                let mut stored_tomb = None;
                if any_tombstones {
                    if let Some(bytes) = tombstones.get(key.as_slice()).map_err(io)? {
                        let bytes = stored_tomb.insert(bytes.value().to_vec());
                        let (tomb, events) = codec::decode_tombstone(bytes)?;
                        pending.tomb = Some(tomb);
                        if !pending.existed {
                            pending.events = events;
                        }
                    }
                }
                for update in group.iter().map(|i| &updates[*i]) {
                    pending.apply(update);
                    if matches!(update.change, Change::Delete) {
                        stats.deleted += 1;
                    }
                    stats.applied += 1;
                }
                if let Some(doc) = &mut pending.after {
                    doc.events_applied = pending.events;
                }
                if let Some(tomb) = &pending.tomb {
                    let hidden = if pending.after.is_some() {
                        0
                    } else {
                        pending.events
                    };
                    codec::encode_tombstone(tomb, hidden, &mut buf);
                    if stored_tomb.as_deref() != Some(buf.as_slice()) {
                        tombstones
                            .insert(key.as_slice(), buf.as_slice())
                            .map_err(io)?;
                    }
                }
                if self.cache.is_some() {
                    self.changed_slots(&mut changed, &pending, entity_type, &key);
                }
                let mut index = Index {
                    relations: &mut relations,
                    moves: &mut moves,
                };
                self.reindex(&mut index, &pending, entity_type, entity_id)?;
                match &pending.after {
                    Some(doc) => {
                        codec::encode(doc, &mut buf)?;
                        entities
                            .insert(key.as_slice(), buf.as_slice())
                            .map_err(io)?;
                    }
                    None if pending.existed => {
                        entities.remove(key.as_slice()).map_err(io)?;
                    }
                    None => {}
                }
            }
            // After every entity is written: a list rebuilt from the relations reads their
            // versions as of this batch.
            for (prefix, list) in moves {
                self.move_children(&mut related, &relations, &entities, &prefix, list)?;
            }
            // Batch offsets also cover records that produced no update (invalid or filtered).
            for (topic, partition, next) in offsets {
                let entry = applied_upto.entry((topic, *partition)).or_insert(0);
                *entry = (*entry).max(*next);
            }
            for (key, next) in &applied_upto {
                let stored = offset_table
                    .get(*key)
                    .map_err(io)?
                    .map(|g| g.value())
                    .unwrap_or(0);
                if *next > stored {
                    offset_table.insert(*key, *next).map_err(io)?;
                }
            }
        }
        // Pending from before the commit until its stamps are written.
        let writing = self.cache.as_ref().map(|cache| cache.begin_write(changed));
        let result = txn.commit().map_err(io);
        if result.is_ok() {
            // Another apply may already have committed and counted after this one's commit
            // (redb's write lock ends with the commit): `durable` only ever moves up.
            let applied = self.applied.fetch_add(1, Ordering::AcqRel) + 1;
            if durable {
                self.durable.fetch_max(applied, Ordering::AcqRel);
            }
        }
        // Stamped even if the commit failed: a stamp only invalidates, and whether a failed
        // commit left anything visible is the database's business.
        drop(writing);
        result.map(|()| stats)
    }

    /// An entity as stored before the batch, ready to take the batch's updates.
    fn pending(
        &self,
        entities: &impl ReadableTable<&'static [u8], &'static [u8]>,
        entity_type: &str,
        key: &[u8],
    ) -> Result<Pending, StoreError> {
        let before = match entities.get(key).map_err(io)? {
            Some(bytes) => Some(decode_doc(bytes.value())?),
            None => None,
        };
        let parents_before = self
            .schema
            .parents_of(entity_type)
            .iter()
            .map(|(_, field)| {
                before
                    .as_ref()
                    .and_then(|d| parent_id(d, field))
                    .map(Cow::into_owned)
            })
            .collect();
        let all_linked = self
            .all_linked
            .get(entity_type)
            .is_none_or(|linked| linked.iter().all(|l| *l));
        let parent_fields_before = if all_linked {
            Vec::new()
        } else {
            self.schema
                .parents_of(entity_type)
                .iter()
                .map(|(_, field)| {
                    before
                        .as_ref()
                        .and_then(|d| d.fields.get(field))
                        .map(|f| f.provenance.clone())
                })
                .collect()
        };
        Ok(Pending {
            existed: before.is_some(),
            latest_before: before.as_ref().map(latest_of),
            parents_before,
            parent_fields_before,
            events: before.as_ref().map_or(0, |d| d.events_applied),
            after: before,
            tomb: None,
        })
    }

    /// The cache stamp slots an entity's change touches: its own (`key`) and those of the
    /// related lists it is in, of its parents before and after (not the parents' own records,
    /// which it does not change).
    fn changed_slots(
        &self,
        slots: &mut Vec<u32>,
        pending: &Pending,
        entity_type: &str,
        key: &[u8],
    ) {
        slots.push(ContextCache::slot(key));
        let after = pending.after.as_ref();
        for ((parent_type, field), before) in self
            .schema
            .parents_of(entity_type)
            .iter()
            .zip(&pending.parents_before)
        {
            let now = after.and_then(|d| parent_id(d, field));
            for parent in [before.as_deref(), now.as_deref()].into_iter().flatten() {
                let list = relation_key(parent_type, parent, entity_type, "");
                slots.push(ContextCache::slot(&list));
            }
        }
    }

    /// One entity, if the store has it.
    pub fn get(&self, entity_type: &str, entity_id: &str) -> Result<Option<EntityDoc>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let entities = txn.open_table(ENTITIES).map_err(io)?;
        let key = entity_key(entity_type, entity_id);
        match entities.get(key.as_slice()).map_err(io)? {
            Some(bytes) => decode_doc(bytes.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Up to `limit` entity ids of a type, in id order, starting after `after`.
    pub fn list(
        &self,
        entity_type: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let entities = txn.open_table(ENTITIES).map_err(io)?;
        let prefix = entity_key(entity_type, "");
        let start = match after {
            Some(a) => {
                let mut k = entity_key(entity_type, a);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut ids = Vec::new();
        for item in entities.range(start.as_slice()..).map_err(io)? {
            let (k, _) = item.map_err(io)?;
            let k = k.value();
            if !k.starts_with(&prefix) || ids.len() >= limit {
                break;
            }
            ids.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(ids)
    }

    /// The ids of `child_type` entities that belong to the given parent.
    pub fn children(
        &self,
        parent_type: &str,
        parent_id: &str,
        child_type: &str,
    ) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let relations = txn.open_table(RELATIONS).map_err(io)?;
        let prefix = relation_key(parent_type, parent_id, child_type, "");
        let mut ids = Vec::new();
        for item in relations.range(prefix.as_slice()..).map_err(io)? {
            let (k, _) = item.map_err(io)?;
            let k = k.value();
            if !k.starts_with(&prefix) {
                break;
            }
            ids.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(ids)
    }

    /// The assembled context of one entity, read from one snapshot (so the entity, its parents
    /// and its related lists are of the same committed batches).
    ///
    /// A parent may have a long history of children (a customer's every order and interaction);
    /// only the newest `related_limit` of each type are shown. Their order is found from each
    /// child's latest version alone ([`codec::latest_version`], no field decoding), and only the
    /// children shown are decoded: a lookup costs one small read per child plus the documents
    /// it returns, not a full decode of the whole history.
    ///
    /// With `reading` (a cache and the sequence number it gave before this read), parents and
    /// children that did not change since they were last decoded are taken from it, and the
    /// parts of a stale document that did not change are kept (`embedded/cache.rs` says when
    /// that is exact).
    pub(crate) fn assemble_context(
        &self,
        entity_type: &str,
        entity_id: &str,
        reading: Option<Reading<'_>>,
    ) -> Result<Option<ContextDocument>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        // Opened when first read: a document rebuilt from its stale self often needs only one
        // of them (opening one costs about as much as reading a record).
        let (entities, relations, related_lists) =
            (OnceCell::new(), OnceCell::new(), OnceCell::new());
        let entities = || open_once(&entities, &txn, ENTITIES);
        let cache = reading.as_ref().map(|r| (r.cache, r.seq));
        // The record's slot, then the lists' (none without a cache: nothing is kept then).
        let (own_slot, list_slots) = match reading.as_ref().and_then(|r| r.slots.split_first()) {
            Some((own, lists)) => (Some(*own), lists),
            None => (None, &[][..]),
        };
        // Only now that the snapshot is open: what of the stale document it may keep.
        let mut stale = reading.and_then(|r| Some(r.cache.reuse(r.stale?)));
        // A parent or a child: read and decoded only if it may have changed since it was cached.
        let shown = |key: &[u8]| -> Result<Option<Arc<RelatedEntity>>, StoreError> {
            if let Some(entity) = cache.and_then(|(c, seq)| c.unchanged_entity(key, seq)) {
                return Ok(Some(entity));
            }
            let Some(bytes) = entities()?.get(key).map_err(io)? else {
                return Ok(None);
            };
            let stored = bytes.value();
            if let Some(entity) = cache.and_then(|(c, seq)| c.entity(key, stored, seq)) {
                return Ok(Some(entity));
            }
            let entity = Arc::new(codec::decode_view(stored)?.into_related());
            if let Some((c, seq)) = cache {
                c.insert_entity(key, stored, Arc::clone(&entity), seq);
            }
            Ok(Some(entity))
        };
        let view = match (&mut stale, own_slot) {
            (Some((reuse, old)), Some(slot)) if reuse.unchanged(slot) => old.take_view(),
            _ => {
                let key = entity_key(entity_type, entity_id);
                match entities()?.get(key.as_slice()).map_err(io)? {
                    Some(bytes) => codec::decode_view(bytes.value())?,
                    None => return Ok(None),
                }
            }
        };
        let mut belongs_to = BTreeMap::new();
        for (parent_type, field) in self.schema.parents_of(entity_type) {
            let Some(parent_id) = view.fields.get(field).and_then(parent_id_of) else {
                continue;
            };
            let parent_key = entity_key(parent_type, &parent_id);
            let kept = stale.as_mut().and_then(|(reuse, old)| {
                let parent = old.belongs_to.remove(parent_type)?;
                (parent.entity_id == parent_id && reuse.unchanged(ContextCache::slot(&parent_key)))
                    .then_some(parent)
            });
            if let Some(parent) = kept.map_or_else(|| shown(&parent_key), |p| Ok(Some(p)))? {
                belongs_to.insert(parent_type.clone(), parent);
            }
        }
        // The stale document's lists, changed in place: each kept whole if nothing changed
        // it, else a source of its unchanged children.
        let mut related = match &mut stale {
            Some((_, old)) => std::mem::take(&mut old.related),
            None => BTreeMap::new(),
        };
        for (i, (child_type, _)) in self.schema.children_of(entity_type).enumerate() {
            let kept = stale.as_ref().zip(list_slots.get(i));
            if let (Some(((reuse, _), &slot)), true) = (kept, related.contains_key(child_type)) {
                if reuse.unchanged(slot) {
                    continue;
                }
            }
            let prefix = relation_key(entity_type, entity_id, child_type, "");
            let limit = self.schema.related_limit_of(child_type);
            let list = open_once(&related_lists, &txn, RELATED)?
                .get(prefix.as_slice())
                .map_err(io)?;
            let (total, mut ids) = match &list {
                Some(v) => codec::decode_related_ids(v.value(), limit)?,
                None => (0, Vec::new()),
            };
            let total = usize::try_from(total).unwrap_or(usize::MAX);
            let rebuilt;
            if ids.len() < limit.min(total) {
                // Only for a list the store could not keep (a child without its entity
                // record): lists of a grown `related_limit` are rebuilt on open.
                let relations = open_once(&relations, &txn, RELATIONS)?;
                rebuilt = newest_children(relations, entities()?, &prefix, child_type, limit)?.1;
                ids = rebuilt
                    .iter()
                    .take(limit)
                    .map(|(_, id)| id.as_str())
                    .collect();
            }
            // `child_type \0 child_id`, rewritten per child.
            let mut child_key = entity_key(child_type, "");
            let mut items = Vec::with_capacity(ids.len());
            let old_items = stale.as_ref().zip(related.get(child_type));
            for (i, id) in ids.into_iter().enumerate() {
                child_key.truncate(child_type.len() + 1);
                child_key.extend_from_slice(id.as_bytes());
                let kept = old_items.and_then(|((reuse, _), list)| {
                    // Usually where it was, or one place further down (a child moved up).
                    let old = &list.items;
                    let near = [i.wrapping_sub(1), i, i + 1].into_iter();
                    let child = near
                        .filter_map(|j| old.get(j))
                        .chain(old)
                        .find(|c| c.entity_id == id)?;
                    reuse
                        .unchanged(ContextCache::slot(&child_key))
                        .then(|| Arc::clone(child))
                });
                if let Some(child) = kept.map_or_else(|| shown(&child_key), |c| Ok(Some(c)))? {
                    items.push(child);
                }
            }
            let list = RelatedList { items, total };
            match related.get_mut(child_type) {
                Some(old) => *old = list,
                None => {
                    related.insert(child_type.to_string(), list);
                }
            }
        }
        Ok(Some(ContextDocument::from_view(
            entity_type,
            view,
            belongs_to,
            related,
        )))
    }

    /// Next offset to apply per (topic, partition), as recorded with the data.
    pub fn applied_offsets(&self) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(OFFSETS).map_err(io)?;
        let mut out = BTreeMap::new();
        for item in table.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            let (topic, partition) = k.value();
            out.insert((topic.to_string(), partition), v.value());
        }
        Ok(out)
    }

    /// Every entity, in key order (for tests and exports).
    pub fn dump(&self) -> Result<Vec<EntityDoc>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let entities = txn.open_table(ENTITIES).map_err(io)?;
        let mut docs = Vec::new();
        for item in entities.iter().map_err(io)? {
            let (_, v) = item.map_err(io)?;
            docs.push(decode_doc(v.value())?);
        }
        Ok(docs)
    }

    /// Keeps the relation index in step with a document's relation fields, and notes the
    /// related lists the document leaves or enters (applied by [`Self::move_children`]).
    fn reindex(
        &self,
        Index { relations, moves }: &mut Index<'_, '_>,
        pending: &Pending,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<(), StoreError> {
        let after = pending.after.as_ref();
        let latest_after = after.map(latest_of);
        let all_linked = self.all_linked.get(entity_type);
        for (i, ((parent_type, field), old)) in self
            .schema
            .parents_of(entity_type)
            .iter()
            .zip(&pending.parents_before)
            .enumerate()
        {
            let new = after.and_then(|d| parent_id(d, field));
            if let Some(parent) = &new {
                refuse_nul(entity_type, entity_id, field, parent)?;
            }
            let mut moved = |parent: &str, left: bool, entered: Option<&Latest>| {
                moves
                    .entry(relation_key(parent_type, parent, entity_type, ""))
                    .or_insert_with(|| ChildMoves {
                        child_type: entity_type.to_string(),
                        moves: Vec::new(),
                    })
                    .moves
                    .push(Move {
                        child: entity_id.to_string(),
                        left,
                        entered: entered.cloned(),
                    });
            };
            if old.as_deref() == new.as_deref() {
                // The same parent: with a new version, the child takes its new place in the
                // list. A child without a relation key (a `belongs_to` added to a type that had
                // data) is linked when the batch wrote its relation field again, as PostgreSQL
                // links a rewritten field, even by an update older than the child's latest;
                // otherwise it stays out of the list.
                if let (Some(parent), Some(latest)) = (new.as_deref(), &latest_after) {
                    let key = relation_key(parent_type, parent, entity_type, entity_id);
                    if all_linked.is_some_and(|a| a[i])
                        || relations.get(key.as_slice()).map_err(io)?.is_some()
                    {
                        if pending.latest_before != latest_after {
                            moved(parent, true, Some(latest));
                        }
                    } else if rewritten(
                        pending.parent_fields_before.get(i).and_then(Option::as_ref),
                        after,
                        field,
                    ) {
                        relations.insert(key.as_slice(), ()).map_err(io)?;
                        moved(parent, false, Some(latest));
                    }
                }
                continue;
            }
            // What the relation index held decides what a list counts: a parent field without
            // a relation key (a `belongs_to` added to a type that had data) counts nowhere.
            if let Some(old) = old {
                let removed = relations
                    .remove(relation_key(parent_type, old, entity_type, entity_id).as_slice())
                    .map_err(io)?
                    .is_some();
                if removed {
                    moved(old, true, None);
                }
            }
            if let (Some(new), Some(latest)) = (new, &latest_after) {
                let existed = relations
                    .insert(
                        relation_key(parent_type, &new, entity_type, entity_id).as_slice(),
                        (),
                    )
                    .map_err(io)?
                    .is_some();
                moved(&new, existed, Some(latest));
            }
        }
        Ok(())
    }

    /// Applies a batch's moves to one related list ([`RELATED`]), in order, rebuilding it from
    /// `relations` when it fell below the type's `related_limit` with children left outside.
    fn move_children(
        &self,
        related: &mut redb::Table<&[u8], &[u8]>,
        relations: &impl ReadableTable<&'static [u8], ()>,
        entities: &impl ReadableTable<&'static [u8], &'static [u8]>,
        prefix: &[u8],
        ChildMoves { child_type, moves }: ChildMoves,
    ) -> Result<(), StoreError> {
        let limit = self.schema.related_limit_of(&child_type);
        let capacity = list_capacity(limit);
        let (mut total, mut newest) = match related.get(prefix).map_err(io)? {
            Some(v) => codec::decode_related(v.value())?,
            None => (0, Vec::new()),
        };
        for Move {
            child,
            left,
            entered,
        } in moves
        {
            if left {
                total = total.saturating_sub(1);
                if let Some(i) = newest.iter().position(|(_, id)| *id == child) {
                    newest.remove(i);
                }
            }
            if let Some(version) = entered {
                // Whether every child is listed (none outside) before this one joins.
                let complete = newest.len() as u64 == total;
                total += 1;
                let at = newest.partition_point(|(v, id)| (v, id.as_str()) > (&version, &child));
                // Older than every entry while others are outside: it may be older than
                // those too, so it stays outside.
                if complete || at < newest.len() {
                    newest.insert(at, (version, child));
                    newest.truncate(capacity);
                }
            }
        }
        if (newest.len() as u64) < total.min(limit as u64) {
            (total, newest) = newest_children(relations, entities, prefix, &child_type, capacity)?;
        }
        if total == 0 {
            related.remove(prefix).map_err(io)?;
        } else {
            let mut buf = Vec::new();
            codec::encode_related(total, &newest, &mut buf);
            related.insert(prefix, buf.as_slice()).map_err(io)?;
        }
        Ok(())
    }
}

/// The table `definition` of `txn`, opened on first use.
fn open_once<'c, K: redb::Key + 'static, V: redb::Value + 'static>(
    cell: &'c OnceCell<ReadOnlyTable<K, V>>,
    txn: &redb::ReadTransaction,
    definition: TableDefinition<K, V>,
) -> Result<&'c ReadOnlyTable<K, V>, StoreError> {
    if let Some(table) = cell.get() {
        return Ok(table);
    }
    let table = txn.open_table(definition).map_err(io)?;
    Ok(cell.get_or_init(|| table))
}

/// How many children a [`RELATED`] list keeps for a `related_limit`: twice as many, so that
/// deletes and moves rarely shrink it below the limit (which rebuilds it).
fn list_capacity(limit: usize) -> usize {
    limit.saturating_mul(2).max(4)
}

/// The children of one related list (`prefix`, of `child_type`) in [`RELATIONS`]: how many, and
/// the newest `n` by latest version, newest first. Reads every child's version: for building a
/// list, not for lookups.
fn newest_children(
    relations: &impl ReadableTable<&'static [u8], ()>,
    entities: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
    child_type: &str,
    n: usize,
) -> Result<(u64, Vec<(Latest, String)>), StoreError> {
    let end = prefix_end(prefix);
    let mut total = 0;
    let mut all = Vec::new();
    let mut child_key = entity_key(child_type, "");
    for item in relations.range(prefix..end.as_slice()).map_err(io)? {
        let (k, _) = item.map_err(io)?;
        total += 1;
        let id = &k.value()[prefix.len()..];
        child_key.truncate(child_type.len() + 1);
        child_key.extend_from_slice(id);
        if let Some(bytes) = entities.get(child_key.as_slice()).map_err(io)? {
            let version = codec::latest_version(bytes.value())?;
            all.push((version, String::from_utf8_lossy(id).into_owned()));
        }
    }
    all.sort_unstable_by(|a, b| b.cmp(a));
    all.truncate(n);
    Ok((total, all))
}

/// A related list's changes in one batch.
struct ChildMoves {
    child_type: String,
    moves: Vec<Move>,
}

/// One child of a related list in one batch: it left the list (a move to another parent, a
/// delete, or a newer version), entered it with a version, or both.
struct Move {
    child: String,
    left: bool,
    entered: Option<Latest>,
}

/// The relation indexes [`EmbeddedStore::apply`] keeps in step with the entities.
struct Index<'a, 't> {
    relations: &'a mut redb::Table<'t, &'static [u8], ()>,
    /// The related lists the batch changes, by [`RELATED`] key.
    moves: &'a mut BTreeMap<Vec<u8>, ChildMoves>,
}

/// Whether `field` of `after` has another version than `before` (the batch wrote it).
fn rewritten(before: Option<&Arc<Provenance>>, after: Option<&EntityDoc>, field: &str) -> bool {
    let after = after
        .and_then(|d| d.fields.get(field))
        .map(|f| &f.provenance);
    match (before, after) {
        (Some(b), Some(a)) => !Arc::ptr_eq(b, a) && b != a,
        (b, a) => b.is_some() != a.is_some(),
    }
}

/// The parent id in a relation field ([`parent_id_of`]).
fn parent_id<'a>(doc: &'a EntityDoc, field: &str) -> Option<Cow<'a, str>> {
    doc.fields.get(field).and_then(|f| parent_id_of(&f.value))
}

/// Keys join types, ids and parent ids with NUL separators: a NUL inside one would make a key
/// read as another (a parent `C1\0order\0O9` lists under `C1`). A permanent error for the
/// batch, before anything of it is committed; the sink's bisection dead-letters the record.
fn refuse_nul(
    entity_type: &str,
    entity_id: &str,
    what: &str,
    value: &str,
) -> Result<(), StoreError> {
    if value.contains('\0') {
        return Err(StoreError::Corrupt(format!(
            "{}/{}: a NUL character in its {what} ({:?}), which the embedded store's keys cannot hold",
            entity_type.escape_debug(),
            entity_id.escape_debug(),
            value
        )));
    }
    Ok(())
}

fn entity_key(entity_type: &str, entity_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(entity_type.len() + entity_id.len() + 1);
    k.extend_from_slice(entity_type.as_bytes());
    k.push(0);
    k.extend_from_slice(entity_id.as_bytes());
    k
}

fn relation_key(parent_type: &str, parent_id: &str, child_type: &str, child_id: &str) -> Vec<u8> {
    let mut k = entity_key(parent_type, parent_id);
    k.push(0);
    k.extend_from_slice(child_type.as_bytes());
    k.push(0);
    k.extend_from_slice(child_id.as_bytes());
    k
}

/// `(time, topic, partition, offset)` of an entity's latest update.
fn latest_of(doc: &EntityDoc) -> Latest {
    doc.latest.owned_version()
}

/// The first key after every key starting with `prefix` (which ends with `\0`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// [`EmbeddedStore::all_linked`]: a relation is known complete by a `linked\0<child>\0<parent>
/// \0<field>` entry in [`META`]; without one (a new store, a relation new to the schema, a store
/// written before the entry existed) the type's children are checked once, and the entry
/// written when each has its relation key. Entries of relations the schema no longer has are
/// removed: children written meanwhile are not linked.
fn linked_relations(
    txn: &redb::WriteTransaction,
    schema: &StoreSchema,
) -> Result<BTreeMap<String, Vec<bool>>, StoreError> {
    const PREFIX: &str = "linked\0";
    let flag =
        |child: &str, parent: &str, field: &str| format!("{PREFIX}{child}\0{parent}\0{field}");
    let mut meta = txn.open_table(META).map_err(io)?;
    let wanted: BTreeSet<String> = schema
        .belongs_to
        .iter()
        .flat_map(|(child, parents)| parents.iter().map(move |(p, f)| flag(child, p, f)))
        .collect();
    let mut stale = Vec::new();
    for item in meta.range(PREFIX..).map_err(io)? {
        let key = item.map_err(io)?.0.value().to_string();
        if !key.starts_with(PREFIX) {
            break;
        }
        if !wanted.contains(&key) {
            stale.push(key);
        }
    }
    for key in stale {
        meta.remove(key.as_str()).map_err(io)?;
    }
    let entities = txn.open_table(ENTITIES).map_err(io)?;
    let relations = txn.open_table(RELATIONS).map_err(io)?;
    let mut out = BTreeMap::new();
    for (child, parents) in &schema.belongs_to {
        let mut linked = Vec::with_capacity(parents.len());
        for (parent, field) in parents {
            let key = flag(child, parent, field);
            let mut complete = meta.get(key.as_str()).map_err(io)?.is_some();
            if !complete {
                complete = true;
                let prefix = entity_key(child, "");
                let end = prefix_end(&prefix);
                for item in entities
                    .range(prefix.as_slice()..end.as_slice())
                    .map_err(io)?
                {
                    let (k, v) = item.map_err(io)?;
                    let doc = decode_doc(v.value())?;
                    let Some(parent_id) = parent_id(&doc, field) else {
                        continue;
                    };
                    let id = String::from_utf8_lossy(&k.value()[prefix.len()..]);
                    let relation = relation_key(parent, &parent_id, child, &id);
                    if relations.get(relation.as_slice()).map_err(io)?.is_none() {
                        complete = false;
                        break;
                    }
                }
                if complete {
                    meta.insert(key.as_str(), 1).map_err(io)?;
                }
            }
            linked.push(complete);
        }
        out.insert(child.clone(), linked);
    }
    Ok(out)
}

/// Builds [`RELATED`] from [`RELATIONS`] and the children's versions: all of it when it is
/// empty while relations exist (a store written before it), or when the tables of the earlier
/// layout are there (dropped here: an older kontext may have changed the store since); the
/// lists of each child type whose `related_limit` grew since they were built
/// ([`RELATED_LIMITS`]).
fn build_related(txn: &redb::WriteTransaction, schema: &StoreSchema) -> Result<(), StoreError> {
    let legacy = txn.delete_table(LEGACY_RECENT).map_err(io)?;
    let legacy = txn.delete_table(LEGACY_COUNTS).map_err(io)? || legacy;
    if legacy {
        txn.delete_table(RELATED).map_err(io)?;
    }
    let mut related = txn.open_table(RELATED).map_err(io)?;
    let relations = txn.open_table(RELATIONS).map_err(io)?;
    let mut limits = txn.open_table(RELATED_LIMITS).map_err(io)?;
    let child_types: BTreeMap<&str, usize> = schema
        .belongs_to
        .iter()
        .filter(|(_, parents)| !parents.is_empty())
        .map(|(child, _)| (child.as_str(), schema.related_limit_of(child)))
        .collect();
    // `None`: every type.
    let rebuild: Option<Vec<&str>> = if related.is_empty().map_err(io)? {
        None
    } else {
        let mut grown = Vec::new();
        for (child, limit) in &child_types {
            let built = limits.get(*child).map_err(io)?.map(|v| v.value());
            if built.is_none_or(|b| b < *limit as u64) {
                grown.push(*child);
            }
        }
        Some(grown)
    };
    if rebuild.as_ref().is_none_or(|types| !types.is_empty())
        && !relations.is_empty().map_err(io)?
    {
        let entities = txn.open_table(ENTITIES).map_err(io)?;
        // The distinct list prefixes: each key's first three `\0`-terminated parts.
        let mut prefixes: Vec<(Vec<u8>, String)> = Vec::new();
        for item in relations.iter().map_err(io)? {
            let (k, _) = item.map_err(io)?;
            let key = k.value();
            let mut zeros = key
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == 0)
                .map(|(i, _)| i);
            let (Some(_), Some(type_start), Some(end)) = (zeros.next(), zeros.next(), zeros.next())
            else {
                return Err(StoreError::Corrupt("malformed relation key".into()));
            };
            let child_type = &key[type_start + 1..end];
            let wanted = rebuild
                .as_ref()
                .is_none_or(|types| types.iter().any(|t| t.as_bytes() == child_type));
            if wanted
                && prefixes
                    .last()
                    .is_none_or(|(p, _)| p.as_slice() != &key[..=end])
            {
                let child_type = String::from_utf8_lossy(child_type).into_owned();
                prefixes.push((key[..=end].to_vec(), child_type));
            }
        }
        let mut buf = Vec::new();
        for (prefix, child_type) in prefixes {
            let limit = schema.related_limit_of(&child_type);
            let (total, newest) = newest_children(
                &relations,
                &entities,
                &prefix,
                &child_type,
                list_capacity(limit),
            )?;
            codec::encode_related(total, &newest, &mut buf);
            related
                .insert(prefix.as_slice(), buf.as_slice())
                .map_err(io)?;
        }
    }
    for (child, limit) in child_types {
        limits.insert(child, limit as u64).map_err(io)?;
    }
    Ok(())
}

fn decode_doc(bytes: &[u8]) -> Result<EntityDoc, StoreError> {
    codec::decode(bytes)
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

mod cache;
mod codec;
#[cfg(test)]
mod tests;
