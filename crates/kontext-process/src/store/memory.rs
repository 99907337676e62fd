//! An in-memory store for tests and for operators whose state may be rebuilt from the
//! changelog at every start.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

use super::{KvIter, StateStore, StoreError, WriteBatch};

/// A `BTreeMap` behind the [`StateStore`] trait.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStore {
    name: String,
    entries: BTreeMap<Bytes, Bytes>,
}

impl MemoryStore {
    /// An empty store called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            entries: BTreeMap::new(),
        }
    }
}

impl StateStore for MemoryStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        Ok(self.entries.get(key).cloned())
    }

    fn range<'a>(&'a self, start: &[u8], end: &[u8]) -> KvIter<'a> {
        if start >= end {
            return Box::new(std::iter::empty());
        }
        Box::new(
            self.entries
                .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
                .map(|(k, v)| Ok((k.clone(), v.clone()))),
        )
    }

    fn apply(&mut self, batch: &WriteBatch) -> Result<(), StoreError> {
        for (key, value) in batch.entries() {
            match value {
                Some(value) => {
                    self.entries.insert(key, value);
                }
                None => {
                    self.entries.remove(&key);
                }
            }
        }
        Ok(())
    }
}
