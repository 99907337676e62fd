//! The embedded context store: one redb file in the data directory.
//!
//! redb is a B-tree with MVCC: readers (the HTTP API) never block the writer (the pipeline)
//! and always see a committed batch as a whole. Every [`EmbeddedStore::apply`] is one write
//! transaction, fsynced on commit, holding the entity changes, the relation index and the
//! source offsets together.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;

use crate::model::{
    merge_fields, Change, EntityDoc, EntityUpdate, FieldEntry, Provenance, StoreSchema,
};
use crate::StoreError;

/// `entity_type \0 entity_id` -> JSON [`EntityDoc`]
const ENTITIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entities");
/// `parent_type \0 parent_id \0 child_type \0 child_id` -> ()
const RELATIONS: TableDefinition<&[u8], ()> = TableDefinition::new("relations");
/// (topic, partition) -> next offset to apply
const OFFSETS: TableDefinition<(&str, i32), i64> = TableDefinition::new("offsets");

/// Counts of what one [`EmbeddedStore::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Updates applied (each log record at most once).
    pub applied: u64,
    /// Updates skipped because the store had already applied their offset.
    pub skipped: u64,
    /// Entities deleted by tombstones.
    pub deleted: u64,
}

/// An entity touched by the batch being applied: as stored before it, and as it will be.
struct Pending<'a> {
    before: Option<EntityDoc>,
    after: Option<EntityDoc>,
    /// The first update of the batch to this entity (for its type and id).
    update: &'a EntityUpdate,
}

/// A durable, versioned context store in one file.
pub struct EmbeddedStore {
    db: Database,
    schema: StoreSchema,
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
        txn.open_table(ENTITIES).map_err(io)?;
        txn.open_table(RELATIONS).map_err(io)?;
        txn.open_table(OFFSETS).map_err(io)?;
        txn.commit().map_err(io)?;
        Ok(Self { db, schema })
    }

    pub fn schema(&self) -> &StoreSchema {
        &self.schema
    }

    /// Applies `updates` and records `offsets` (topic, partition, next offset) in one durable
    /// transaction. An update whose offset is below the recorded next offset of its partition
    /// was applied before and is skipped, so re-delivered records change nothing.
    pub fn apply(
        &self,
        updates: &[EntityUpdate],
        offsets: &[(&str, i32, i64)],
    ) -> Result<ApplyStats, StoreError> {
        let mut stats = ApplyStats::default();
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut entities = txn.open_table(ENTITIES).map_err(io)?;
            let mut relations = txn.open_table(RELATIONS).map_err(io)?;
            let mut offset_table = txn.open_table(OFFSETS).map_err(io)?;
            let mut applied_upto: BTreeMap<(String, i32), i64> = BTreeMap::new();
            let mut working: HashMap<Vec<u8>, Pending<'_>> = HashMap::new();
            for update in updates {
                let p = &update.provenance;
                let key = (p.topic.clone(), p.partition);
                let next = match applied_upto.get(&key) {
                    Some(n) => *n,
                    None => {
                        let n = offset_table
                            .get((p.topic.as_str(), p.partition))
                            .map_err(io)?
                            .map(|g| g.value())
                            .unwrap_or(0);
                        applied_upto.insert(key.clone(), n);
                        n
                    }
                };
                if p.offset < next {
                    stats.skipped += 1;
                    continue;
                }
                applied_upto.insert(key, p.offset + 1);
                let slot = match working.entry(entity_key(&update.entity_type, &update.entity_id)) {
                    Entry::Occupied(slot) => slot.into_mut(),
                    Entry::Vacant(slot) => {
                        let before = match entities.get(slot.key().as_slice()).map_err(io)? {
                            Some(bytes) => Some(decode_doc(bytes.value())?),
                            None => None,
                        };
                        slot.insert(Pending {
                            after: before.clone(),
                            before,
                            update,
                        })
                    }
                };
                match &update.change {
                    Change::Upsert(fields) => {
                        let doc = slot.after.get_or_insert_with(|| EntityDoc {
                            entity_type: update.entity_type.clone(),
                            entity_id: update.entity_id.clone(),
                            fields: BTreeMap::new(),
                            events_applied: 0,
                            latest: p.clone(),
                        });
                        merge_fields(doc, fields, p);
                        doc.events_applied += 1;
                    }
                    Change::Delete => {
                        if slot.after.take().is_some() {
                            stats.deleted += 1;
                        }
                    }
                }
                stats.applied += 1;
            }
            // Each entity is decoded and encoded once per batch, however many updates it got.
            for (key, pending) in &working {
                let (entity_type, entity_id) =
                    (&pending.update.entity_type, &pending.update.entity_id);
                self.reindex(
                    &mut relations,
                    pending.before.as_ref(),
                    pending.after.as_ref(),
                    entity_type,
                    entity_id,
                )?;
                match &pending.after {
                    Some(doc) => {
                        let bytes = encode_doc(doc)?;
                        entities
                            .insert(key.as_slice(), bytes.as_slice())
                            .map_err(io)?;
                    }
                    None if pending.before.is_some() => {
                        entities.remove(key.as_slice()).map_err(io)?;
                    }
                    None => {}
                }
            }
            // Batch offsets also cover records that produced no update (invalid or filtered).
            for (topic, partition, next) in offsets {
                let entry = applied_upto
                    .entry((topic.to_string(), *partition))
                    .or_insert(0);
                *entry = (*entry).max(*next);
            }
            for ((topic, partition), next) in &applied_upto {
                let stored = offset_table
                    .get((topic.as_str(), *partition))
                    .map_err(io)?
                    .map(|g| g.value())
                    .unwrap_or(0);
                if *next > stored {
                    offset_table
                        .insert((topic.as_str(), *partition), *next)
                        .map_err(io)?;
                }
            }
        }
        txn.commit().map_err(io)?;
        Ok(stats)
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

    /// Keeps the relation index in step with a document's relation fields.
    fn reindex(
        &self,
        relations: &mut redb::Table<&[u8], ()>,
        before: Option<&EntityDoc>,
        after: Option<&EntityDoc>,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<(), StoreError> {
        for (parent_type, field) in self.schema.parents_of(entity_type) {
            let old = before.and_then(|d| parent_id(d, field));
            let new = after.and_then(|d| parent_id(d, field));
            if old == new {
                continue;
            }
            if let Some(old) = old {
                relations
                    .remove(relation_key(parent_type, &old, entity_type, entity_id).as_slice())
                    .map_err(io)?;
            }
            if let Some(new) = new {
                relations
                    .insert(
                        relation_key(parent_type, &new, entity_type, entity_id).as_slice(),
                        (),
                    )
                    .map_err(io)?;
            }
        }
        Ok(())
    }
}

/// The parent id in a relation field; numbers are accepted and written as text.
fn parent_id(doc: &EntityDoc, field: &str) -> Option<String> {
    match doc.fields.get(field).map(|f| &f.value) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
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

/// How a document is stored: each distinct provenance once, fields pointing at it. An event
/// usually sets several fields, so this is about a third of the size of a provenance per field
/// (store throughput did not change measurably: the batch commit dominates, see BENCHMARKS.md).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredDoc {
    t: String,
    i: String,
    /// (field, value, index into `p`)
    f: Vec<(String, serde_json::Value, u32)>,
    p: Vec<Provenance>,
    n: u64,
    /// index of the latest event in `p`
    l: u32,
}

fn encode_doc(doc: &EntityDoc) -> Result<Vec<u8>, StoreError> {
    let mut table: Vec<Provenance> = Vec::new();
    let mut index_of = |p: &Provenance| -> u32 {
        match table.iter().position(|q| q == p) {
            Some(i) => i as u32,
            None => {
                table.push(p.clone());
                (table.len() - 1) as u32
            }
        }
    };
    let f = doc
        .fields
        .iter()
        .map(|(k, e)| (k.clone(), e.value.clone(), index_of(&e.provenance)))
        .collect();
    let l = index_of(&doc.latest);
    let stored = StoredDoc {
        t: doc.entity_type.clone(),
        i: doc.entity_id.clone(),
        f,
        p: table,
        n: doc.events_applied,
        l,
    };
    serde_json::to_vec(&stored).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode_doc(bytes: &[u8]) -> Result<EntityDoc, StoreError> {
    let StoredDoc { t, i, f, p, n, l } =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let provenance = |index: u32| {
        p.get(index as usize)
            .cloned()
            .ok_or_else(|| StoreError::Corrupt(format!("provenance index {index} out of range")))
    };
    let mut fields = BTreeMap::new();
    for (name, value, index) in f {
        fields.insert(
            name,
            FieldEntry {
                value,
                provenance: provenance(index)?,
            },
        );
    }
    Ok(EntityDoc {
        latest: provenance(l)?,
        entity_type: t,
        entity_id: i,
        fields,
        events_applied: n,
    })
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

#[cfg(test)]
mod tests;
