//! State stores: the `StateStore` trait, atomic write batches that carry the task's input
//! offsets, changelog records, and two implementations (in memory, and fjall on local disk).
//!
//! Keys beginning with byte `0x00` are reserved for the store's own metadata (the input
//! offsets); operators' keys begin with an ASCII letter.

mod batch;
mod cache;
mod expiry;
mod fjall;
mod keys;
mod memory;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use bytes::Bytes;
use kontext_core::record::TopicPartition;

pub use self::batch::{ChangelogRecord, WriteBatch};
pub use self::expiry::ExpiryRule;
pub use self::fjall::{Durability, FjallStore, StateDb, StateDbOptions};
pub use self::keys::DEFAULT_KEY_INDEX_BYTES;
pub use self::memory::MemoryStore;

/// Key prefix of the input-offset entries (`0x00 'o' topic 0x00 partition`).
pub(crate) const OFFSETS_PREFIX: &[u8] = b"\x00o";
/// Key of the record that ends every changelog batch.
pub(crate) const BATCH_END_KEY: &[u8] = b"\x00z";

/// Errors of a state store. None of them is transient: a store that failed an I/O operation
/// must be reopened (fjall poisons itself after a failed journal write), and a corrupt entry
/// needs a restore from the changelog.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed (I/O, or it poisoned itself after an earlier failure).
    /// Retry meaning: reopen the store (or restore it from the changelog), then resume from its
    /// offsets.
    #[error("state store {store}: {source}")]
    Engine {
        store: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An entry could not be decoded. Retry meaning: none; rebuild the store from its changelog.
    #[error("state store entry is corrupt: {0}")]
    Corrupt(String),
}

/// A boxed iterator over `(key, value)` pairs in key order.
pub type KvIter<'a> = Box<dyn Iterator<Item = Result<(Bytes, Bytes), StoreError>> + 'a>;

/// A key-value state store owned by one task (one input partition).
///
/// Writes go through [`WriteBatch`]es, which are applied atomically together with the input
/// offsets they record; [`StateStore::commit`] returns the batch's changelog records, which the
/// runtime produces to the compacted topic `<app>-<store>-changelog`.
pub trait StateStore {
    /// The store's name (part of its changelog topic's name).
    fn name(&self) -> &str;

    /// The value under `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError>;

    /// Entries with `start <= key < end`, in key order.
    fn range<'a>(&'a self, start: &[u8], end: &[u8]) -> KvIter<'a>;

    /// Applies every write of `batch` (and its offsets) atomically: after a crash either all of
    /// it is in the store or none of it.
    fn apply(&mut self, batch: &WriteBatch) -> Result<(), StoreError>;

    /// Asks the store to keep the keys under `prefix` in memory, so that reading an absent
    /// one is cheap: for an operator whose reads are mostly of keys it never wrote (dedup's
    /// ids). A hint: reads return the same with or without it, a store that has no use for it
    /// (the memory store) ignores it, and [`FjallStore`] keeps it only while it fits in its
    /// database's budget ([`StateDbOptions::key_index_bytes`]). Call it once, after opening.
    fn index_keys(&mut self, prefix: &[u8]) -> Result<(), StoreError> {
        let _ = prefix;
        Ok(())
    }

    /// Entries whose key starts with `prefix`, in key order.
    fn prefix<'a>(&'a self, prefix: &[u8]) -> KvIter<'a> {
        match prefix_end(prefix) {
            Some(end) => self.range(prefix, &end),
            None => self.range(prefix, &[0xff; 64]),
        }
    }

    /// Writes one entry (a batch of one, without offsets).
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put(key, value);
        self.apply(&batch)
    }

    /// Deletes one entry (a batch of one, without offsets).
    fn delete(&mut self, key: &[u8]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete(key);
        self.apply(&batch)
    }

    /// Applies `batch` atomically and returns its changelog records, in the order they must be
    /// produced (see [`WriteBatch::changelog`]).
    fn commit(&mut self, batch: WriteBatch) -> Result<Vec<ChangelogRecord>, StoreError> {
        let changelog = batch.changelog();
        self.apply(&batch)?;
        Ok(changelog)
    }

    /// Rebuilds state from changelog records, in changelog order (a compacted changelog is
    /// fine): each record is an upsert, or a delete when its value is `None`. Records are
    /// applied one changelog batch at a time, when the batch's end marker is read; records after
    /// the last marker (a batch whose producer crashed half-way) are not applied and are
    /// returned, so the runtime can repair them ([`repair_records`]). Offsets entries are
    /// restored like any other, so the restored store knows where to resume.
    fn restore(
        &mut self,
        records: &mut dyn Iterator<Item = ChangelogRecord>,
    ) -> Result<Vec<ChangelogRecord>, StoreError> {
        let mut pending: Vec<ChangelogRecord> = Vec::new();
        for record in records {
            let end = WriteBatch::is_batch_end(&record.key);
            pending.push(record);
            if end {
                let mut batch = WriteBatch::default();
                // The marker itself is not state.
                pending.pop();
                for record in pending.drain(..) {
                    match record.value {
                        Some(value) => batch.put_bytes(record.key, value),
                        None => batch.delete_bytes(record.key),
                    }
                }
                self.apply(&batch)?;
            }
        }
        Ok(pending)
    }

    /// The next input offset of every input partition this store has seen: where the task
    /// resumes. Records below it are already reflected in the state.
    fn offsets(&self) -> Result<BTreeMap<TopicPartition, i64>, StoreError> {
        let mut out = BTreeMap::new();
        for entry in self.prefix(OFFSETS_PREFIX) {
            let (key, value) = entry?;
            let (tp, next) = batch::decode_offset_entry(&key, &value)?;
            out.insert(tp, next);
        }
        Ok(out)
    }

    /// Every entry, metadata included, in key order: what a restore must reproduce.
    fn dump(&self) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
        self.range(&[], &[0xff; 64]).collect()
    }
}

/// Reads `key` as the store will see it once `batch` is applied (read-your-writes for
/// operators that accumulate a batch).
pub fn get_through<S: StateStore + ?Sized>(
    store: &S,
    batch: &WriteBatch,
    key: &[u8],
) -> Result<Option<Bytes>, StoreError> {
    match batch.get(key) {
        Some(pending) => Ok(pending.cloned()),
        None => store.get(key),
    }
}

/// Claims the next number of the sequence kept under `key` (0 first) and records it in
/// `batch`. Operators number their batches with it to give per-batch state entries unique
/// keys.
pub(crate) fn claim_sequence<S: StateStore + ?Sized>(
    store: &S,
    batch: &mut WriteBatch,
    key: &[u8],
) -> Result<u64, StoreError> {
    let next = match get_through(store, batch, key)? {
        Some(v) => crate::codec::Reader::new(&v).u64()? + 1,
        None => 0,
    };
    batch.put(key, &next.to_le_bytes());
    Ok(next)
}

/// The entries of expiry index `tag` in `[from, to)` that a batch must expire, where `from` is
/// where the previous batch's scan ended, stored under `c tag` (the start of the index in a
/// store written before that was stored: one scan over its tombstones, once). Stored rather
/// than derived from the configuration, because a restart with a smaller grace or window
/// would otherwise start above entries nobody expired. Lowered to the batch's lowest entry of
/// the index when the batch filed one below it (a restart with a larger one admits events the
/// last scan had passed). Records where this scan ends (starting above the tombstones the LSM
/// keeps of everything expired until compaction). Call it after the batch's puts to the index.
pub(crate) fn expiry_scan<S: StateStore + ?Sized>(
    store: &S,
    batch: &mut WriteBatch,
    tag: u8,
    to: Vec<u8>,
) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
    let position = [b'c', tag];
    let stored = get_through(store, batch, &position)?.map(|b| b.to_vec());
    let mut from = stored.clone().unwrap_or_else(|| vec![tag]);
    let lowest = batch
        .range(&[tag], &[tag + 1])
        .find(|(_, value)| value.is_some())
        .map(|(key, _)| key.to_vec());
    if let Some(lowest) = lowest.filter(|lowest| *lowest < from) {
        from = lowest;
    }
    let (entries, next) = if from < to {
        (range_through(store, batch, &from, &to)?, to)
    } else {
        (Vec::new(), from)
    };
    if stored.as_ref() != Some(&next) {
        batch.put(&position, &next);
    }
    Ok(entries)
}

/// Entries with `start <= key < end` as the store will hold them once `batch` is applied.
pub fn range_through<S: StateStore + ?Sized>(
    store: &S,
    batch: &WriteBatch,
    start: &[u8],
    end: &[u8],
) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
    let mut merged: BTreeMap<Bytes, Bytes> = BTreeMap::new();
    for entry in store.range(start, end) {
        let (k, v) = entry?;
        merged.insert(k, v);
    }
    for (k, v) in batch.range(start, end) {
        match v {
            Some(v) => {
                merged.insert(k.clone(), v.clone());
            }
            None => {
                merged.remove(k);
            }
        }
    }
    Ok(merged.into_iter().collect())
}

/// Changelog records that undo a partly written changelog batch: for every key in `tail`
/// (the changelog records after the last batch the local store committed), the store's current
/// value or a tombstone, then a batch-end marker. The runtime produces them before resuming,
/// so that the changelog again restores to exactly the local store.
pub fn repair_records<S: StateStore + ?Sized>(
    store: &S,
    tail: &[ChangelogRecord],
) -> Result<Vec<ChangelogRecord>, StoreError> {
    let keys: std::collections::BTreeSet<&Bytes> = tail
        .iter()
        .map(|r| &r.key)
        .filter(|k| !WriteBatch::is_batch_end(k))
        .collect();
    let mut out = Vec::with_capacity(keys.len() + 1);
    for key in keys {
        out.push(ChangelogRecord {
            key: key.clone(),
            value: store.get(key)?,
        });
    }
    out.push(ChangelogRecord {
        key: Bytes::from_static(BATCH_END_KEY),
        value: Some(Bytes::copy_from_slice(&(out.len() as u64).to_le_bytes())),
    });
    Ok(out)
}

/// The smallest key greater than every key starting with `prefix`; `None` if there is none
/// (the prefix is all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
