//! The on-disk store: one fjall database (an LSM tree with a write-ahead journal) per task.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use fjall::compaction::filter::{
    CompactionFilter, CompactionFilterResult, Context, Factory, ItemAccessor, Verdict,
};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use kontext_core::record::TopicPartition;

use super::batch::decode_offset_entry;
use super::cache::{StoreCache, ValueCache, DEFAULT_VALUE_CACHE_BYTES};
use super::expiry::{rule_prefix, ExpiryRules, EXPIRY_RULES_PREFIX};
use super::keys::{KeyBudget, KeyIndex, DEFAULT_KEY_INDEX_BYTES};
use super::{ExpiryRule, KvIter, StateStore, StoreError, WriteBatch, OFFSETS_PREFIX};

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
///
/// Point reads go through the database's value cache (`store/cache.rs`): a key read before,
/// and not written since except by batches this store committed, is served from memory. Only
/// committed values enter it, so an aborted batch (one never applied) leaves it as it was.
///
/// Expiry rules ([`ExpiryRule`]) are applied lazily: a delete the batch marks as covered by a
/// rule is not written; reads hide the entries the store's rules cover, and compactions drop
/// them. The rules are entries of the batches, so they are as durable as the deletes they
/// replace.
pub struct FjallStore {
    name: String,
    db: Database,
    keyspace: Keyspace,
    durability: Durability,
    /// The offsets entries, cached: read every batch, and an LSM keeps one version of each per
    /// batch until compaction, so scanning them each time would get slower and slower.
    offsets: BTreeMap<TopicPartition, i64>,
    /// The expiry rules, as of the last applied batch.
    rules: ExpiryRules,
    /// The same, for the keyspace's compaction filter.
    shared_rules: SharedRules,
    /// This instance's namespace in the database's value cache.
    cache: StoreCache,
    /// The keys under one prefix, when an operator asked for them ([`StateStore::index_keys`]).
    index: Option<Box<KeyIndex>>,
    /// What the database's key indexes may take.
    key_budget: KeyBudget,
}

/// The rules of one keyspace, shared with its compaction filter.
type SharedRules = Arc<Mutex<ExpiryRules>>;

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
    /// The expiry rules of each keyspace, by name: fjall assigns a keyspace its compaction
    /// filter when it opens or recovers it, before the store opens it and loads the rules.
    rules: Arc<Mutex<HashMap<String, SharedRules>>>,
    /// Committed values of the stores' keys, one budget for all of them.
    cache: ValueCache,
    /// The budget the stores' key indexes share.
    key_budget: KeyBudget,
}

/// The memory a [`StateDb`] may use besides fjall's own, shared by the stores opened in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateDbOptions {
    /// The value cache in front of point reads (`store/cache.rs`), in bytes of keys, values
    /// and a per-entry overhead; 0 for none. Default 64 MiB.
    pub value_cache_bytes: u64,
    /// The key indexes operators ask for ([`StateStore::index_keys`], `store/keys.rs`), in
    /// bytes of keys and a per-key overhead; 0 for none. Default 64 MiB.
    pub key_index_bytes: usize,
}

impl Default for StateDbOptions {
    fn default() -> Self {
        Self {
            value_cache_bytes: DEFAULT_VALUE_CACHE_BYTES,
            key_index_bytes: DEFAULT_KEY_INDEX_BYTES,
        }
    }
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb").finish_non_exhaustive()
    }
}

impl StateDb {
    /// Opens (creating if needed) the database in the directory `path`, with the default
    /// [`StateDbOptions`]. Only one process may open a directory at a time.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, StateDbOptions::default())
    }

    /// [`StateDb::open`] with a value cache of about `bytes` bytes (keys, values and a
    /// per-entry overhead), shared by all the stores opened in it; 0 for none.
    pub fn open_with_value_cache(path: impl AsRef<Path>, bytes: u64) -> Result<Self, StoreError> {
        Self::open_with(
            path,
            StateDbOptions {
                value_cache_bytes: bytes,
                ..Default::default()
            },
        )
    }

    /// [`StateDb::open`] with these memory budgets.
    pub fn open_with(path: impl AsRef<Path>, options: StateDbOptions) -> Result<Self, StoreError> {
        let rules: Arc<Mutex<HashMap<String, SharedRules>>> = Arc::default();
        let registry = rules.clone();
        let db = Database::builder(path.as_ref())
            .with_compaction_filter_factories(Arc::new(move |keyspace: &str| {
                let rules = rules_of(&registry, keyspace);
                Some(Arc::new(ExpiryFilterFactory { rules }) as Arc<dyn Factory>)
            }))
            .open()
            .map_err(|e| StoreError::Engine {
                store: path.as_ref().display().to_string(),
                source: Box::new(e),
            })?;
        Ok(Self {
            db,
            rules,
            cache: ValueCache::new(options.value_cache_bytes),
            key_budget: KeyBudget::new(options.key_index_bytes),
        })
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
        let shared_rules = rules_of(&db.rules, keyspace);
        let cache = db.cache.namespace();
        let key_budget = db.key_budget.clone();
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
            rules: ExpiryRules::default(),
            shared_rules,
            cache,
            index: None,
            key_budget,
        };
        let mut offsets = BTreeMap::new();
        for entry in store.prefix(OFFSETS_PREFIX) {
            let (key, value) = entry?;
            let (tp, next) = decode_offset_entry(&key, &value)?;
            offsets.insert(tp, next);
        }
        store.offsets = offsets;
        let mut rules = ExpiryRules::default();
        for entry in store.prefix(EXPIRY_RULES_PREFIX) {
            let (key, value) = entry?;
            if let Some(prefix) = rule_prefix(&key) {
                rules.set(prefix, Some(ExpiryRule::decode(&value)?));
            }
        }
        store.set_rules(rules);
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
        self.cache.reset();
        // Whatever the commit below does, the index is safe empty only if it succeeds.
        let index = self.index.take();
        let mut batch = self.db.batch();
        for guard in self.keyspace.iter() {
            let key = guard.key().map_err(|e| self.engine(e))?;
            batch.remove(&self.keyspace, key);
        }
        batch.commit().map_err(|e| self.engine(e))?;
        self.offsets.clear();
        self.set_rules(ExpiryRules::default());
        self.index = index.map(|mut index| {
            index.clear();
            index
        });
        Ok(())
    }

    /// How many keys the key index holds, `None` without one (never asked for, outgrown its
    /// budget, or dropped after a failed commit).
    pub fn indexed_keys(&self) -> Option<usize> {
        self.index.as_ref().map(|index| index.len())
    }

    /// Flushes the memtable and compacts the store into one run (what fjall's workers do in
    /// time): for tests of what compaction keeps.
    #[doc(hidden)]
    pub fn compact(&self) -> Result<(), StoreError> {
        self.keyspace
            .rotate_memtable_and_wait()
            .and_then(|()| self.keyspace.major_compact())
            .map_err(|e| self.engine(e))
    }

    /// How many entries under `prefix` fjall holds, covered ones included.
    #[cfg(test)]
    pub(super) fn held(&self, prefix: &[u8]) -> usize {
        self.keyspace.prefix(prefix).count()
    }

    fn set_rules(&mut self, rules: ExpiryRules) {
        *self
            .shared_rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = rules.clone();
        self.rules = rules;
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
        if self
            .index
            .as_ref()
            .is_some_and(|index| !index.may_hold(key))
        {
            return Ok(None);
        }
        let value = match self.cache.get(key) {
            Some(value) => value,
            None => match self.keyspace.get(key).map_err(|e| self.engine(e))? {
                Some(value) => {
                    let value = Bytes::copy_from_slice(&value);
                    self.cache.fill(key, &value);
                    value
                }
                None => return Ok(None),
            },
        };
        Ok((!self.rules.covers(key, &value)).then_some(value))
    }

    fn range<'a>(&'a self, start: &[u8], end: &[u8]) -> KvIter<'a> {
        if start >= end {
            return Box::new(std::iter::empty());
        }
        Box::new(
            self.keyspace
                .range(start.to_vec()..end.to_vec())
                .map(move |guard| guard.into_inner().map_err(|e| self.engine(e)))
                .filter(move |entry| !matches!(entry, Ok((k, v)) if self.rules.covers(k, v)))
                .map(|entry| {
                    let (k, v) = entry?;
                    Ok((Bytes::copy_from_slice(&k), Bytes::copy_from_slice(&v)))
                }),
        )
    }

    fn apply(&mut self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut rules = self.rules.clone();
        let mut rules_changed = false;
        // The key index leaves out what a rule hides; a rule that hides less (lowered or
        // removed: no operator does so) would make such keys readable again.
        let mut rules_shrank = false;
        for (key, value) in batch.range(EXPIRY_RULES_PREFIX, b"\x00f") {
            if let Some(prefix) = rule_prefix(key) {
                let rule = value.as_deref().map(ExpiryRule::decode).transpose()?;
                if let Some(old) = self.rules.of(&[prefix]) {
                    rules_shrank |= !rule.is_some_and(|rule| rule.contains(old));
                }
                rules.set(prefix, rule);
                rules_changed = true;
            }
        }
        let mut fjall_batch = self.db.batch();
        if self.durability == Durability::Machine {
            fjall_batch = fjall_batch.durability(Some(PersistMode::SyncData));
        }
        for (key, value) in batch.entries_but_expired() {
            match value {
                Some(value) => fjall_batch.insert(&self.keyspace, key.as_ref(), value.as_ref()),
                None => fjall_batch.remove(&self.keyspace, key.as_ref()),
            }
        }
        for key in batch.expired() {
            // Covered by a rule: hidden from reads, dropped by compaction. Without a rule, or
            // with a write of the key after its `delete_expired` (the operator broke the
            // contract; other stores and the changelog delete it), delete it.
            if rules.of(key).is_none() || batch.get(key).is_some() {
                fjall_batch.remove(&self.keyspace, key.as_ref());
            }
        }
        if let Err(e) = fjall_batch.commit() {
            // Whether fjall holds the batch is unknown (it poisons itself): cache nothing, and
            // trust no index.
            self.cache.reset();
            self.index = None;
            return Err(self.engine(e));
        }
        if rules_shrank {
            self.index = None;
        }
        self.index_committed(batch);
        for (key, value) in batch.entries_but_expired() {
            self.cache.committed(&key, value.as_ref());
        }
        for key in batch.expired() {
            self.cache.committed(key, None);
        }
        if rules_changed {
            self.set_rules(rules);
        }
        for (key, value) in batch.entries_but_expired() {
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

    /// Builds the index by a scan of `prefix` (what reads see, through the rules); kept up to
    /// date by every commit from then on (`store/keys.rs`). When the keys do not fit in what
    /// is left of the database's key-index budget ([`StateDbOptions`]), the store keeps no
    /// index and reads go to fjall. A second call replaces the first. Only an operator's
    /// prefix is indexed: one that is empty, starts with the metadata byte `0x00`, or is all
    /// `0xff` (no end) gets no index.
    fn index_keys(&mut self, prefix: &[u8]) -> Result<(), StoreError> {
        self.index = None;
        let Some(mut index) = KeyIndex::new(prefix, self.key_budget.clone()) else {
            return Ok(());
        };
        for entry in self.prefix(prefix) {
            let (key, _) = entry?;
            if index.put(&key).is_err() {
                self.outgrown();
                return Ok(());
            }
        }
        self.index = Some(Box::new(index));
        Ok(())
    }
}

impl FjallStore {
    /// Says that the key index no longer fits: reads are slower from now on, and the fix is a
    /// setting. Warns once per database (a start with the budget taken would otherwise warn
    /// for every partition's store), then at debug level.
    fn outgrown(&self) {
        let message = "the store's key index no longer fits in the state's key-index budget; reads of absent keys go to disk until the store is opened again (raise state.key_index_bytes)";
        let budget_bytes = self.key_budget.limit();
        if self.key_budget.first_outgrown() {
            tracing::warn!(store = %self.name, keyspace = %self.keyspace.name(), budget_bytes, "{message}");
        } else {
            tracing::debug!(store = %self.name, keyspace = %self.keyspace.name(), budget_bytes, "{message}");
        }
    }

    /// Brings the key index up to a batch fjall committed; drops it when it outgrows its
    /// budget.
    fn index_committed(&mut self, batch: &WriteBatch) {
        if let Some(index) = &mut self.index {
            if index.committed(batch).is_err() {
                self.index = None;
                self.outgrown();
            }
        }
    }
}

/// The shared rules of `keyspace`, created empty when first asked for.
fn rules_of(registry: &Mutex<HashMap<String, SharedRules>>, keyspace: &str) -> SharedRules {
    registry
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(keyspace.to_owned())
        .or_default()
        .clone()
}

/// Makes the compaction filters of one keyspace: each drops the entries its store's expiry
/// rules cover.
struct ExpiryFilterFactory {
    rules: SharedRules,
}

impl Factory for ExpiryFilterFactory {
    fn name(&self) -> &str {
        "kontext-expiry-rules"
    }

    fn make_filter(&self, _: &Context) -> Box<dyn CompactionFilter> {
        // The rules as the compaction starts: rules only ever cover more, so a compaction
        // that started earlier keeps entries a later rule covers (reads hide them).
        let rules = self
            .rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Box::new(ExpiryFilter { rules })
    }
}

struct ExpiryFilter {
    rules: ExpiryRules,
}

impl CompactionFilter for ExpiryFilter {
    fn filter_item(&mut self, item: ItemAccessor<'_>, _: &Context) -> CompactionFilterResult {
        if self.rules.is_empty() || self.rules.of(item.key()).is_none() {
            return Ok(Verdict::Keep);
        }
        // A tombstone, not `Destroy`: lsm-tree judges the next older version of the key on
        // its own once this one is destroyed, and an older version need not be covered (a
        // dedup value of the per-id layout has no batch number). At the last level the
        // tombstone is evicted together with every older version.
        Ok(if self.rules.covers(item.key(), &item.value()?) {
            Verdict::Remove
        } else {
            Verdict::Keep
        })
    }
}
