//! The on-disk store: one fjall database (an LSM tree with a write-ahead journal) per task.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use kontext_core::record::TopicPartition;

use super::batch::decode_offset_entry;
use super::{KvIter, StateStore, StoreError, WriteBatch, OFFSETS_PREFIX};

/// How durable a committed batch is when [`StateStore::apply`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Written to the OS (fjall's `PersistMode::Buffer`): survives the process being killed,
    /// not a power loss. The changelog topic is the copy that survives losing the machine.
    #[default]
    Process,
    /// `fdatasync` of the journal per batch: survives a power loss on its own.
    Machine,
}

/// A [`StateStore`] in a fjall database on local disk, one per task (topic-partition).
///
/// A batch is one fjall write batch, so it is atomic across crashes; the input offsets are
/// entries of the same batch.
pub struct FjallStore {
    name: String,
    db: Database,
    keyspace: Keyspace,
    durability: Durability,
    /// The offsets entries, cached: read every batch, and an LSM keeps one version of each per
    /// batch until compaction, so scanning them each time would get slower and slower.
    offsets: BTreeMap<TopicPartition, i64>,
}

impl std::fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallStore")
            .field("name", &self.name)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

/// A fjall database holding many stores, one keyspace each: a runtime with many tasks opens
/// one database (one journal, one set of worker threads) instead of one per task. Cloning it
/// is cheap (a handle).
#[derive(Clone)]
pub struct StateDb {
    db: Database,
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb").finish_non_exhaustive()
    }
}

impl StateDb {
    /// Opens (creating if needed) the database in the directory `path`. Only one process may
    /// open a directory at a time.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let db = Database::builder(path.as_ref())
            .open()
            .map_err(|e| StoreError::Engine {
                store: path.as_ref().display().to_string(),
                source: Box::new(e),
            })?;
        Ok(Self { db })
    }

    /// Syncs the journal to disk (also done by fjall when the last handle is dropped).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| StoreError::Engine {
                store: "state database".into(),
                source: Box::new(e),
            })
    }
}

impl FjallStore {
    /// Opens (creating if needed) the store `name` in its own database in the directory
    /// `path`. Only one process may open a directory at a time.
    pub fn open(
        path: impl AsRef<Path>,
        name: impl Into<String>,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        let name = name.into();
        let db = StateDb::open(path).map_err(|e| match e {
            StoreError::Engine { source, .. } => StoreError::Engine {
                store: name.clone(),
                source,
            },
            other => other,
        })?;
        Self::open_in(&db, "state", name, durability)
    }

    /// Opens (creating if needed) the store `name` as the keyspace `keyspace` of a shared
    /// database. Keyspace names: up to 255 letters, digits, `_`, `-`, `.`, `#`, `$`.
    pub fn open_in(
        db: &StateDb,
        keyspace: &str,
        name: impl Into<String>,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        let name = name.into();
        let engine = |e: fjall::Error| StoreError::Engine {
            store: name.clone(),
            source: Box::new(e),
        };
        let db = db.db.clone();
        let keyspace = db
            .keyspace(keyspace, KeyspaceCreateOptions::default)
            .map_err(engine)?;
        let mut store = Self {
            name,
            db,
            keyspace,
            durability,
            offsets: BTreeMap::new(),
        };
        let mut offsets = BTreeMap::new();
        for entry in store.prefix(OFFSETS_PREFIX) {
            let (key, value) = entry?;
            let (tp, next) = decode_offset_entry(&key, &value)?;
            offsets.insert(tp, next);
        }
        store.offsets = offsets;
        Ok(store)
    }

    /// Syncs the journal to disk (also done by fjall when the store is dropped).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| self.engine(e))
    }

    /// Deletes every entry, offsets included, in one atomic batch: the store is then as new
    /// (before a full restore from the changelog).
    pub fn clear(&mut self) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for guard in self.keyspace.iter() {
            let key = guard.key().map_err(|e| self.engine(e))?;
            batch.remove(&self.keyspace, key);
        }
        batch.commit().map_err(|e| self.engine(e))?;
        self.offsets.clear();
        Ok(())
    }

    fn engine(&self, e: fjall::Error) -> StoreError {
        StoreError::Engine {
            store: self.name.clone(),
            source: Box::new(e),
        }
    }
}

impl StateStore for FjallStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        Ok(self
            .keyspace
            .get(key)
            .map_err(|e| self.engine(e))?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    fn range<'a>(&'a self, start: &[u8], end: &[u8]) -> KvIter<'a> {
        if start >= end {
            return Box::new(std::iter::empty());
        }
        Box::new(
            self.keyspace
                .range(start.to_vec()..end.to_vec())
                .map(move |guard| {
                    let (k, v) = guard.into_inner().map_err(|e| self.engine(e))?;
                    Ok((Bytes::copy_from_slice(&k), Bytes::copy_from_slice(&v)))
                }),
        )
    }

    fn apply(&mut self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut fjall_batch = self.db.batch();
        if self.durability == Durability::Machine {
            fjall_batch = fjall_batch.durability(Some(PersistMode::SyncData));
        }
        for (key, value) in batch.entries() {
            match value {
                Some(value) => fjall_batch.insert(&self.keyspace, key.as_ref(), value.as_ref()),
                None => fjall_batch.remove(&self.keyspace, key.as_ref()),
            }
        }
        fjall_batch.commit().map_err(|e| self.engine(e))?;
        for (key, value) in batch.entries() {
            if key.starts_with(OFFSETS_PREFIX) {
                match value {
                    Some(value) => {
                        let (tp, next) = decode_offset_entry(&key, &value)?;
                        self.offsets.insert(tp, next);
                    }
                    None => {
                        let (tp, _) = decode_offset_entry(&key, &0i64.to_le_bytes())?;
                        self.offsets.remove(&tp);
                    }
                }
            }
        }
        Ok(())
    }

    fn offsets(&self) -> Result<BTreeMap<TopicPartition, i64>, StoreError> {
        Ok(self.offsets.clone())
    }
}
