//! The key index: the keys a [`FjallStore`] holds under one prefix, in memory, so a point read
//! of an absent key answers without a search of fjall's memtable and tables.
//!
//! Dedup reads each event's id before deciding, and almost every id is new: the read misses,
//! after a skiplist search of the memtable and a bloom filter per table. The value cache
//! cannot help (it holds values, and caching "absent" would fill it with ids read once).
//! With the index a miss is one hash probe.
//!
//! Soundness rests on one invariant: **every key under the prefix that a read would return is
//! in the index.** fjall may hold more (the entries an expiry rule hides, which reads skip),
//! and the index may too (a key put and then hidden by a later rule, until its
//! `delete_expired`); no read returns a key the index lacks:
//! - it is built by a scan of the committed store, through the rules;
//! - it changes only after fjall committed a batch, with that batch's puts (added), deletes
//!   and `delete_expired` keys (removed) under the prefix ([`StateStore::apply`]); a batch
//!   that is never applied never touches it; [`FjallStore::clear`] empties it;
//! - it relies on two contracts of the expiry rules: `delete_expired` names only entries a
//!   rule of the batch covers (fjall writes no delete for them, and reads hide them), and a
//!   rule never hides less than before (a batch that lowers or removes one drops the index);
//! - only an operator's prefix is indexed (not empty, not the metadata's `0x00`, with an end);
//! - when a commit fails (fjall then poisons itself; whether it holds the batch is unknown),
//!   or the keys outgrow the byte budget the indexes of a database share, the store drops the
//!   index and reads go to fjall again, as without one.
//!
//! It holds the keys themselves, not hashes, so no two keys can be mistaken for each other.
//!
//! [`FjallStore`]: super::FjallStore
//! [`FjallStore::clear`]: super::FjallStore::clear
//! [`StateStore::apply`]: super::StateStore::apply

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::WriteBatch;

/// The default budget of the key indexes of a [`StateDb`](super::StateDb): 64 MiB, about a
/// million ids of ~30 bytes, shared by all its stores.
pub const DEFAULT_KEY_INDEX_BYTES: usize = 64 << 20;

/// What a key costs beyond its bytes: its slot in the hash table (a boxed slice and a control
/// byte, at the table's load factor) and the allocation's rounding, estimated.
const KEY_OVERHEAD: usize = 40;

/// The byte budget the key indexes of one database share. Cloning it is cheap (a handle).
#[derive(Debug, Clone)]
pub(super) struct KeyBudget {
    limit: usize,
    used: Arc<AtomicUsize>,
    /// Whether a store already said that its index outgrew this budget.
    outgrown: Arc<AtomicBool>,
}

impl KeyBudget {
    /// A budget of about `limit` bytes; 0 allows no index.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            limit,
            used: Arc::default(),
            outgrown: Arc::default(),
        }
    }

    /// True the first time it is called: the first store that outgrows the budget says so,
    /// the others (every partition's, at a start with the budget taken) need not.
    pub(super) fn first_outgrown(&self) -> bool {
        !self.outgrown.swap(true, Ordering::Relaxed)
    }

    /// Takes `bytes` from the budget, if it has them.
    fn take(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(total) = used.checked_add(bytes).filter(|t| *t <= self.limit) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(used, total, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    /// False for a budget of 0: no index is worth building.
    pub(super) fn any(&self) -> bool {
        self.limit > 0
    }

    /// The budget, in bytes.
    pub(super) fn limit(&self) -> usize {
        self.limit
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The keys under one prefix (see the module's documentation).
#[derive(Debug)]
pub(super) struct KeyIndex {
    prefix: Box<[u8]>,
    /// The first key after the prefix's keys.
    end: Box<[u8]>,
    keys: HashSet<Box<[u8]>>,
    /// What the keys took from `budget`, given back as they go and when the index drops.
    bytes: usize,
    budget: KeyBudget,
}

/// The index would outgrow its budget; the store drops it.
#[derive(Debug)]
pub(super) struct OverBudget;

impl KeyIndex {
    /// An empty index of the keys under `prefix`, drawing on `budget`; `None` when there is
    /// no index to keep: a budget of 0, or a prefix that is not an operator's (empty, or the
    /// metadata's `0x00`, whose offsets entries are not among a batch's ordered writes) or has
    /// no end (all `0xff`).
    pub(super) fn new(prefix: &[u8], budget: KeyBudget) -> Option<Self> {
        let operator = prefix.first().is_some_and(|b| *b != 0);
        let end = super::prefix_end(prefix).filter(|_| operator && budget.any())?;
        Some(Self {
            prefix: prefix.into(),
            end: end.into(),
            keys: HashSet::new(),
            bytes: 0,
            budget,
        })
    }

    /// Brings the index up to a batch fjall committed: its puts under the prefix are added,
    /// its deletes and `delete_expired` keys removed (hidden by a rule or deleted, no read
    /// returns them: the `delete_expired` contract is that a rule of the batch covers them).
    pub(super) fn committed(&mut self, batch: &WriteBatch) -> Result<(), OverBudget> {
        let (start, end) = (self.prefix.clone(), self.end.clone());
        for (key, value) in batch.range(&start, &end) {
            match value {
                Some(_) => self.put(key)?,
                None => self.delete(key),
            }
        }
        for key in batch.expired() {
            self.delete(key);
        }
        Ok(())
    }

    /// How many keys it holds.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// False when `key` is certainly absent from the store: under the prefix and not held.
    pub(super) fn may_hold(&self, key: &[u8]) -> bool {
        !key.starts_with(&self.prefix) || self.keys.contains(key)
    }

    /// Notes a committed put of `key` (ignored outside the prefix).
    pub(super) fn put(&mut self, key: &[u8]) -> Result<(), OverBudget> {
        if !key.starts_with(&self.prefix) || self.keys.contains(key) {
            return Ok(());
        }
        let cost = key.len() + KEY_OVERHEAD;
        if !self.budget.take(cost) {
            return Err(OverBudget);
        }
        self.bytes += cost;
        self.keys.insert(key.into());
        Ok(())
    }

    /// Notes a committed delete (or `delete_expired`) of `key`.
    pub(super) fn delete(&mut self, key: &[u8]) {
        if key.starts_with(&self.prefix) && self.keys.remove(key) {
            let cost = key.len() + KEY_OVERHEAD;
            self.bytes -= cost;
            self.budget.give_back(cost);
        }
    }

    /// Forgets every key (the store was cleared).
    pub(super) fn clear(&mut self) {
        self.keys.clear();
        self.budget.give_back(std::mem::take(&mut self.bytes));
    }
}

impl Drop for KeyIndex {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_absent_only_for_keys_under_its_prefix_it_does_not_hold() {
        let mut index = KeyIndex::new(b"d", KeyBudget::new(1 << 20)).unwrap();
        index.put(b"dA").unwrap();
        index.put(b"xB").unwrap();
        assert!(index.may_hold(b"dA"));
        assert!(!index.may_hold(b"dB"));
        // Outside the prefix it knows nothing, so it never says absent.
        assert!(index.may_hold(b"xB"));
        assert!(index.may_hold(b"xC"));
        index.delete(b"dA");
        assert!(!index.may_hold(b"dA"));
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn counts_each_key_once_and_refuses_what_exceeds_the_shared_budget() {
        let budget = KeyBudget::new(3 * (2 + KEY_OVERHEAD));
        let mut index = KeyIndex::new(b"d", budget.clone()).unwrap();
        for _ in 0..5 {
            index.put(b"d1").unwrap();
        }
        index.put(b"d2").unwrap();
        let mut other = KeyIndex::new(b"e", budget.clone()).unwrap();
        other.put(b"e1").unwrap();
        assert!(
            index.put(b"d3").is_err(),
            "a fourth key is over the shared budget"
        );
        drop(other);
        index.put(b"d3").unwrap();
        index.delete(b"d3");
        index.delete(b"d3");
        index.put(b"d4").unwrap();
        assert_eq!(index.len(), 3);
        index.clear();
        assert_eq!(index.len(), 0);
        assert!(!index.may_hold(b"d1"));
        assert_eq!(
            budget.used.load(Ordering::Relaxed),
            0,
            "clear gives everything back"
        );
        index.put(b"d1").unwrap();
        drop(index);
        assert_eq!(
            budget.used.load(Ordering::Relaxed),
            0,
            "so does dropping the index"
        );
        assert!(
            budget.first_outgrown(),
            "the first store to outgrow it says so"
        );
        assert!(!budget.clone().first_outgrown(), "no other one does");
    }
}
