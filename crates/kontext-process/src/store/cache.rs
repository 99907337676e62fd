//! The value cache in front of fjall's point reads: one byte budget per [`StateDb`], shared by
//! the stores opened in it.
//!
//! A point read in fjall's memtable is a skiplist search (~2 µs in a 64 MiB memtable, keys with
//! long common prefixes); the windowed aggregations read every touched key's entry once per
//! batch, so those searches were a fifth to a quarter of their CPU time.
//!
//! Coherence rests on three rules, enforced by [`FjallStore`]:
//! - **Only committed values enter.** A value enters when a read misses (it is what fjall
//!   holds), and a cached key takes the value of a write only after fjall committed the batch
//!   that wrote it ([`StateStore::apply`]); a deleted key, or one a batch forgets with
//!   `delete_expired`, is removed. A batch that is never applied (an aborted transaction, a
//!   failed operator) never touches the cache. Pending writes are read from the batch itself
//!   (`get_through`), never from here.
//! - **One namespace per store instance.** Each opened [`FjallStore`] draws a fresh namespace
//!   number; it only ever sees the values it read or committed itself. A reopened store, a
//!   store after [`FjallStore::clear`], or one whose commit failed (fjall then poisons itself;
//!   what it holds is unknown) starts on a new, empty namespace. Like the store's cached
//!   offsets and expiry rules, this assumes the one owner per keyspace that the runtime has
//!   (a task owns its stores).
//! - **Values are cached raw**, as fjall holds them: the expiry rules are applied on every
//!   read, hit or miss, so a rule added later hides a cached value as it hides fjall's.
//!
//! Absent keys are not cached: dedup's reads are mostly of ids never seen, which would fill the
//! budget with entries read once. A process kill loses the cache with everything else in
//! memory; a restart opens new stores.
//!
//! [`StateDb`]: super::StateDb
//! [`FjallStore`]: super::FjallStore
//! [`FjallStore::clear`]: super::FjallStore::clear
//! [`StateStore::apply`]: super::StateStore::apply

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::{Equivalent, Weighter};

/// The default budget of a [`StateDb`](super::StateDb)'s value cache: 64 MiB.
pub(crate) const DEFAULT_VALUE_CACHE_BYTES: u64 = 64 << 20;

/// What an entry costs beyond its key and value bytes (the cache's slot, the two `Bytes`
/// handles, the hash table's share): an estimate, so that many small entries still count.
const ENTRY_OVERHEAD: u64 = 96;

/// A cache of committed values, shared by the stores of one database. Cloning it is cheap (a
/// handle).
#[derive(Clone)]
pub(crate) struct ValueCache {
    /// `None` when the budget is 0 (no cache).
    entries: Option<Arc<Cache<CacheKey, Bytes, EntryWeight>>>,
}

/// One store instance's view of a [`ValueCache`]: its namespace in it.
pub(crate) struct StoreCache {
    cache: ValueCache,
    namespace: u64,
}

impl ValueCache {
    /// A cache holding up to about `budget` bytes of keys and values (0: none).
    pub(crate) fn new(budget: u64) -> Self {
        let entries = (budget > 0).then(|| {
            let estimated_items = (budget / 512).clamp(16, 1 << 20) as usize;
            Arc::new(Cache::with_weighter(estimated_items, budget, EntryWeight))
        });
        Self { entries }
    }

    /// A fresh, empty namespace for a store instance.
    pub(crate) fn namespace(&self) -> StoreCache {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        StoreCache {
            cache: self.clone(),
            namespace: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl StoreCache {
    /// The cached value of `key`, as fjall holds it (expiry rules not applied).
    pub(crate) fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.cache.entries.as_ref()?.get(&CacheKeyRef {
            namespace: self.namespace,
            key,
        })
    }

    /// Records what a read found in fjall. Call it only with the value fjall holds now.
    pub(crate) fn fill(&self, key: &[u8], value: &Bytes) {
        if let Some(entries) = &self.cache.entries {
            entries.insert(self.key(Bytes::copy_from_slice(key)), value.clone());
        }
    }

    /// Records a committed write of `key`: a cached key takes the new value (or leaves, for a
    /// delete); an uncached one stays uncached (most written keys are not read again soon).
    pub(crate) fn committed(&self, key: &Bytes, value: Option<&Bytes>) {
        let Some(entries) = &self.cache.entries else {
            return;
        };
        let cache_key = CacheKeyRef {
            namespace: self.namespace,
            key,
        };
        match value {
            // `replace` also drops the old value when the new one does not fit.
            Some(value) => {
                let _ = entries.replace(self.key(key.clone()), value.clone(), true);
            }
            None => {
                entries.remove(&cache_key);
            }
        }
    }

    /// Forgets everything this instance cached and moves it to a new namespace: after a
    /// clear, or a commit whose outcome is unknown.
    pub(crate) fn reset(&mut self) {
        let fresh = self.cache.namespace();
        let old = std::mem::replace(self, fresh);
        drop(old);
    }

    fn key(&self, key: Bytes) -> CacheKey {
        CacheKey {
            namespace: self.namespace,
            key,
        }
    }
}

impl Drop for StoreCache {
    /// Gives the budget back: nothing can read this namespace again.
    fn drop(&mut self) {
        if let Some(entries) = &self.cache.entries {
            let namespace = self.namespace;
            entries.retain(|key, _| key.namespace != namespace);
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
struct CacheKey {
    namespace: u64,
    key: Bytes,
}

/// A [`CacheKey`] to look up without copying the key.
struct CacheKeyRef<'a> {
    namespace: u64,
    key: &'a [u8],
}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        CacheKeyRef {
            namespace: self.namespace,
            key: &self.key,
        }
        .hash(state);
    }
}

impl Hash for CacheKeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.namespace);
        state.write(self.key);
    }
}

impl Equivalent<CacheKey> for CacheKeyRef<'_> {
    fn equivalent(&self, key: &CacheKey) -> bool {
        self.namespace == key.namespace && self.key == key.key.as_ref()
    }
}

#[derive(Clone)]
struct EntryWeight;

impl Weighter<CacheKey, Bytes> for EntryWeight {
    fn weight(&self, key: &CacheKey, value: &Bytes) -> u64 {
        key.key.len() as u64 + value.len() as u64 + ENTRY_OVERHEAD
    }
}
