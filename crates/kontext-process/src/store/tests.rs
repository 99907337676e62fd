use kontext_core::record::TopicPartition;

use super::*;

fn exercise(store: &mut dyn StateStore) {
    let mut batch = WriteBatch::default();
    batch.put(b"a/1", b"one");
    batch.put(b"a/2", b"two");
    batch.put(b"b/1", b"bee");
    batch.delete(b"a/3");
    batch.set_offset(TopicPartition::new("orders", 3), 10);
    let changelog = store.commit(batch).unwrap();
    assert_eq!(changelog.len(), 6);
    assert_eq!(changelog[3].value, None, "deletes follow upserts");
    assert!(
        changelog[4].key.starts_with(OFFSETS_PREFIX),
        "then the offsets"
    );
    assert_eq!(
        &changelog[5].key[..],
        BATCH_END_KEY,
        "and the batch-end marker"
    );

    assert_eq!(store.get(b"a/2").unwrap().as_deref(), Some(&b"two"[..]));
    let keys: Vec<_> = store
        .prefix(b"a/")
        .map(|e| e.unwrap().0)
        .collect::<Vec<_>>();
    assert_eq!(keys, vec![&b"a/1"[..], &b"a/2"[..]]);
    store.delete(b"a/1").unwrap();
    assert_eq!(store.get(b"a/1").unwrap(), None);
    assert_eq!(
        store
            .offsets()
            .unwrap()
            .get(&TopicPartition::new("orders", 3)),
        Some(&10)
    );
}

#[test]
fn memory_store_reads_its_batches_and_offsets() {
    exercise(&mut MemoryStore::new("t"));
}

#[test]
fn fjall_store_reads_its_batches_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    exercise(&mut FjallStore::open(dir.path(), "t", Durability::Process).unwrap());
}

#[test]
fn a_cleared_fjall_store_is_empty_and_stays_so_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = FjallStore::open(dir.path(), "t", Durability::Process).unwrap();
        exercise(&mut store);
        store.clear().unwrap();
        assert!(store.offsets().unwrap().is_empty());
        assert_eq!(store.prefix(b"").count(), 0);
        store.put(b"after", b"1").unwrap();
    }
    let store = FjallStore::open(dir.path(), "t", Durability::Process).unwrap();
    let keys: Vec<_> = store.prefix(b"").map(|e| e.unwrap().0).collect();
    assert_eq!(keys, vec![&b"after"[..]]);
    assert!(store.offsets().unwrap().is_empty());
}

#[test]
fn a_later_write_of_the_same_key_in_a_batch_wins() {
    let mut batch = WriteBatch::default();
    batch.put(b"k", b"1");
    batch.delete(b"k");
    batch.put(b"k", b"2");
    let mut store = MemoryStore::new("t");
    let changelog = store.commit(batch).unwrap();
    assert_eq!(changelog.len(), 2, "one write and the marker");
    assert_eq!(store.get(b"k").unwrap().as_deref(), Some(&b"2"[..]));
}

#[test]
fn reads_through_a_pending_batch_see_its_writes() {
    let mut store = MemoryStore::new("t");
    store.put(b"a/1", b"old").unwrap();
    store.put(b"a/2", b"gone").unwrap();
    let mut batch = WriteBatch::default();
    batch.put(b"a/1", b"new");
    batch.delete(b"a/2");
    batch.put(b"a/3", b"added");
    assert_eq!(
        get_through(&store, &batch, b"a/1").unwrap().as_deref(),
        Some(&b"new"[..])
    );
    assert_eq!(get_through(&store, &batch, b"a/2").unwrap(), None);
    let keys: Vec<_> = range_through(&store, &batch, b"a/", b"a0")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec![&b"a/1"[..], &b"a/3"[..]]);
}

#[test]
fn range_through_merges_stored_and_pending_entries_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut fjall = FjallStore::open(dir.path(), "t", Durability::Process).unwrap();
    let mut memory = MemoryStore::new("t");
    for store in [&mut memory as &mut dyn StateStore, &mut fjall] {
        for key in ["a/0", "a/1", "a/2", "a/4", "b/0"] {
            store.put(key.as_bytes(), b"stored").unwrap();
        }
        let mut batch = WriteBatch::default();
        batch.put(b"a/1", b"new");
        batch.delete(b"a/2");
        batch.put(b"a/3", b"added");
        batch.delete(b"a/5");
        batch.put(b"a/6", b"last");
        let got: Vec<(String, String)> = range_through(&*store, &batch, b"a/", b"a0")
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8(k.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = [
            ("a/0", "stored"),
            ("a/1", "new"),
            ("a/3", "added"),
            ("a/4", "stored"),
            ("a/6", "last"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
    }
}

#[test]
fn prefix_end_skips_trailing_ff() {
    assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
    assert_eq!(prefix_end(b"\xff\xff"), None);
}

#[test]
fn restore_skips_a_half_written_batch_and_repair_undoes_it() {
    let mut original = MemoryStore::new("t");
    let mut changelog = Vec::new();
    for i in 0..3u8 {
        let mut batch = WriteBatch::default();
        batch.put(&[b'k', i], &[i]);
        batch.delete(&[b'k', i.wrapping_sub(1)]);
        batch.set_offset(TopicPartition::new("in", 0), i64::from(i) + 1);
        changelog.extend(original.commit(batch).unwrap());
    }
    // A fourth batch whose producer died after its first record; never committed locally.
    let mut lost = WriteBatch::default();
    lost.put(b"k9", b"x");
    lost.put(b"k2", b"overwritten");
    lost.set_offset(TopicPartition::new("in", 0), 4);
    let partial = lost.changelog()[..1].to_vec();
    changelog.extend(partial.iter().cloned());

    let mut restored = MemoryStore::new("t");
    let tail = restored
        .restore(&mut changelog.clone().into_iter())
        .unwrap();
    assert_eq!(tail, partial);
    assert_eq!(restored.dump().unwrap(), original.dump().unwrap());

    // Repair: the changelog with the repair records appended restores to the original too.
    changelog.extend(repair_records(&original, &tail).unwrap());
    let mut repaired = MemoryStore::new("t");
    assert!(repaired
        .restore(&mut changelog.into_iter())
        .unwrap()
        .is_empty());
    assert_eq!(repaired.dump().unwrap(), original.dump().unwrap());
}

/// A value of an entry under a ruled prefix: time, 12 bytes, batch number.
fn stamped(time: i64, seq: u64) -> Vec<u8> {
    let mut value = time.to_le_bytes().to_vec();
    value.extend_from_slice(&[0; 12]);
    value.extend_from_slice(&seq.to_le_bytes());
    value
}

#[test]
fn expired_deletes_covered_by_a_rule_read_alike_in_both_stores_and_compact_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut fjall = FjallStore::open(dir.path(), "t", Durability::Process).unwrap();
    let mut memory = MemoryStore::new("t");
    let mut changelog = Vec::new();
    let mut first = WriteBatch::default();
    for (i, time) in [10i64, 20, 30, 40].into_iter().enumerate() {
        first.put(&[b'd', b'0' + i as u8], &stamped(time, 1));
    }
    // A value without a batch number (dedup's earlier layout) is never covered.
    first.put(b"dold", &stamped(5, 0)[..20]);
    let mut second = WriteBatch::default();
    // `d2` is written again by batch 2: the rule (through batch 1) must not cover it.
    second.put(b"d2", &stamped(25, 2));
    second.delete_expired(Bytes::from_static(b"d0"));
    second.delete_expired(Bytes::from_static(b"d1"));
    let rule = ExpiryRule {
        below_time: 30,
        through_seq: 1,
    };
    second.put(&ExpiryRule::key(b'd'), &rule.encode());
    second.set_offset(TopicPartition::new("in", 0), 2);
    for batch in [first, second] {
        changelog.extend(fjall.commit(batch.clone()).unwrap());
        memory.commit(batch).unwrap();
    }
    let tombstones: Vec<_> = changelog
        .iter()
        .filter(|r| r.value.is_none())
        .map(|r| r.key.clone())
        .collect();
    assert_eq!(tombstones, vec![&b"d0"[..], &b"d1"[..]]);
    assert_eq!(fjall.dump().unwrap(), memory.dump().unwrap());
    assert_eq!(fjall.get(b"d1").unwrap(), None);
    assert!(fjall.get(b"d2").unwrap().is_some());
    // fjall still holds the covered entries (no tombstones were written)...
    assert_eq!(fjall.held(b"d"), 5);

    // ...until a compaction drops them; reopened, the store still applies its rule.
    fjall.compact().unwrap();
    assert_eq!(fjall.held(b"d"), 3);
    drop(fjall);
    let mut fjall = FjallStore::open(dir.path(), "t", Durability::Process).unwrap();
    assert_eq!(fjall.dump().unwrap(), memory.dump().unwrap());

    // A later rule covers more; a batch without one leaves it in force.
    let mut third = WriteBatch::default();
    third.delete_expired(Bytes::from_static(b"d3"));
    let wider = ExpiryRule {
        below_time: 50,
        through_seq: 1,
    };
    assert!(wider.contains(&rule) && !rule.contains(&wider));
    third.put(&ExpiryRule::key(b'd'), &wider.encode());
    changelog.extend(fjall.commit(third.clone()).unwrap());
    memory.commit(third).unwrap();
    assert_eq!(fjall.dump().unwrap(), memory.dump().unwrap());

    // A store restored from the changelog holds the same, without anything to hide.
    let restored_dir = tempfile::tempdir().unwrap();
    let mut restored = FjallStore::open(restored_dir.path(), "t", Durability::Process).unwrap();
    assert!(restored
        .restore(&mut changelog.into_iter())
        .unwrap()
        .is_empty());
    assert_eq!(restored.dump().unwrap(), memory.dump().unwrap());
    assert_eq!(restored.held(b"d"), 2);
}

#[test]
fn an_expired_delete_without_a_rule_is_a_delete() {
    let dir = tempfile::tempdir().unwrap();
    let mut fjall = FjallStore::open(dir.path(), "t", Durability::Process).unwrap();
    fjall.put(b"d0", &stamped(1, 0)).unwrap();
    let mut batch = WriteBatch::default();
    batch.delete_expired(Bytes::from_static(b"d0"));
    fjall.commit(batch).unwrap();
    assert_eq!(fjall.held(b"d"), 0);
}

// ---------------------------------------------------------------- the value cache

/// A store in a database of its own with a value cache of `budget` bytes.
fn cached_store(dir: &std::path::Path, budget: u64) -> (StateDb, FjallStore) {
    let db = StateDb::open_with_value_cache(dir, budget).unwrap();
    let store = FjallStore::open_in(&db, "t", "t", Durability::Process).unwrap();
    (db, store)
}

fn read(store: &dyn StateStore, key: &[u8]) -> Option<Vec<u8>> {
    store.get(key).unwrap().map(|v| v.to_vec())
}

/// A store with a cache that holds everything, where `entries` were written and read (so
/// cached); the directory and database must outlive the store.
fn store_with_cached(entries: &[(&[u8], &[u8])]) -> (tempfile::TempDir, StateDb, FjallStore) {
    let dir = tempfile::tempdir().unwrap();
    let (db, mut store) = cached_store(dir.path(), 1 << 20);
    for (key, value) in entries {
        store.put(key, value).unwrap();
        assert_eq!(read(&store, key).as_deref(), Some(*value), "now cached");
    }
    (dir, db, store)
}

#[test]
fn a_cached_value_follows_committed_puts_deletes_and_expired_deletes() {
    let (_dir, _db, mut store) = store_with_cached(&[(b"a", b"1"), (b"b", b"1"), (b"c", b"1")]);
    let mut batch = WriteBatch::default();
    batch.put(b"a", b"2");
    batch.delete(b"b");
    // No rule covers `c`: fjall deletes it for real.
    batch.delete_expired(Bytes::from_static(b"c"));
    store.commit(batch).unwrap();
    assert_eq!(read(&store, b"a").as_deref(), Some(&b"2"[..]));
    assert_eq!(read(&store, b"b"), None);
    assert_eq!(read(&store, b"c"), None);
}

#[test]
fn a_batch_that_is_never_applied_leaves_the_cached_values_as_committed() {
    let (_dir, _db, store) = store_with_cached(&[(b"k", b"committed")]);
    let mut aborted = WriteBatch::default();
    aborted.put(b"k", b"aborted");
    aborted.put(b"new", b"aborted");
    assert_eq!(
        get_through(&store, &aborted, b"k").unwrap().as_deref(),
        Some(&b"aborted"[..])
    );
    drop(aborted);
    assert_eq!(read(&store, b"k").as_deref(), Some(&b"committed"[..]));
    assert_eq!(read(&store, b"new"), None);
}

#[test]
fn a_cleared_store_serves_nothing_it_had_cached() {
    let (_dir, _db, mut store) = store_with_cached(&[(b"k", b"1")]);
    store.clear().unwrap();
    assert_eq!(read(&store, b"k"), None);
}

#[test]
fn a_restore_replaces_cached_values() {
    let (_dir, _db, mut store) = store_with_cached(&[(b"k", b"old"), (b"gone", b"old")]);
    let mut source = MemoryStore::new("t");
    let mut batch = WriteBatch::default();
    batch.put(b"k", b"restored");
    batch.delete(b"gone");
    let changelog = source.commit(batch).unwrap();
    assert!(store
        .restore(&mut changelog.into_iter())
        .unwrap()
        .is_empty());
    assert_eq!(read(&store, b"k").as_deref(), Some(&b"restored"[..]));
    assert_eq!(read(&store, b"gone"), None);
}

#[test]
fn a_store_reopened_in_the_same_database_reads_what_was_committed_since() {
    let (_dir, db, first) = store_with_cached(&[(b"k", b"1")]);
    drop(first);
    let mut second = FjallStore::open_in(&db, "t", "t", Durability::Process).unwrap();
    assert_eq!(read(&second, b"k").as_deref(), Some(&b"1"[..]));
    second.put(b"k", b"2").unwrap();
    drop(second);
    let third = FjallStore::open_in(&db, "t", "t", Durability::Process).unwrap();
    assert_eq!(read(&third, b"k").as_deref(), Some(&b"2"[..]));
    // Another keyspace of the database does not see the first's keys.
    let other = FjallStore::open_in(&db, "u", "u", Durability::Process).unwrap();
    assert_eq!(read(&other, b"k"), None);
}

#[test]
fn a_later_expiry_rule_hides_a_cached_value() {
    let (_dir, _db, mut store) = store_with_cached(&[(b"d0", &stamped(10, 1))]);
    let rule = ExpiryRule {
        below_time: 30,
        through_seq: 1,
    };
    store.put(&ExpiryRule::key(b'd'), &rule.encode()).unwrap();
    assert_eq!(read(&store, b"d0"), None);
}

#[test]
fn a_value_too_large_for_the_cache_replaces_the_cached_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, mut store) = cached_store(dir.path(), 4096);
    store.put(b"k", b"small").unwrap();
    assert_eq!(read(&store, b"k").as_deref(), Some(&b"small"[..]));
    let large = vec![7u8; 64 << 10];
    store.put(b"k", &large).unwrap();
    assert_eq!(read(&store, b"k"), Some(large));
}

#[test]
fn a_store_without_a_value_cache_reads_from_fjall() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, mut store) = cached_store(dir.path(), 0);
    exercise(&mut store);
    store.put(b"k", b"1").unwrap();
    store.put(b"k", b"2").unwrap();
    assert_eq!(read(&store, b"k").as_deref(), Some(&b"2"[..]));
}

#[test]
fn an_indexed_store_answers_a_read_of_a_key_it_never_held_from_memory() {
    // Two handles on one keyspace (what the runtime never does: a task owns its stores) show
    // where a read is answered: the indexed one never asks fjall about a key its commits and
    // its opening scan did not see.
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open_with_value_cache(dir.path(), 0).unwrap();
    let mut indexed = FjallStore::open_in(&db, "s", "s", Durability::Process).unwrap();
    indexed.put(b"d-before", b"1").unwrap();
    indexed.index_keys(b"d").unwrap();
    assert_eq!(indexed.indexed_keys(), Some(1), "the opening scan");
    let mut other = FjallStore::open_in(&db, "s", "s", Durability::Process).unwrap();
    other.put(b"d-behind", b"2").unwrap();
    other.put(b"x-behind", b"3").unwrap();
    assert_eq!(read(&indexed, b"d-behind"), None, "answered by the index");
    assert_eq!(
        read(&indexed, b"x-behind"),
        Some(b"3".to_vec()),
        "outside its prefix"
    );
    assert_eq!(read(&indexed, b"d-before"), Some(b"1".to_vec()));
    indexed.put(b"d-after", b"4").unwrap();
    assert_eq!(read(&indexed, b"d-after"), Some(b"4".to_vec()));
    indexed.delete(b"d-before").unwrap();
    assert_eq!(indexed.indexed_keys(), Some(1));
    indexed.clear().unwrap();
    assert_eq!(
        indexed.indexed_keys(),
        Some(0),
        "a cleared store keeps an empty index"
    );
}

#[test]
fn key_indexes_share_their_database_budget_and_one_outgrowing_it_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    // Room for two keys of 2 bytes (40 bytes of overhead each).
    let options = StateDbOptions {
        key_index_bytes: 2 * 42,
        ..Default::default()
    };
    let db = StateDb::open_with(dir.path(), options).unwrap();
    let mut a = FjallStore::open_in(&db, "a", "a", Durability::Process).unwrap();
    let mut b = FjallStore::open_in(&db, "b", "b", Durability::Process).unwrap();
    a.index_keys(b"d").unwrap();
    b.index_keys(b"d").unwrap();
    a.put(b"d1", b"1").unwrap();
    b.put(b"d1", b"1").unwrap();
    assert_eq!((a.indexed_keys(), b.indexed_keys()), (Some(1), Some(1)));
    a.put(b"d2", b"2").unwrap();
    assert_eq!(a.indexed_keys(), None, "outgrown by a commit");
    assert_eq!(read(&a, b"d2"), Some(b"2".to_vec()), "reads go to fjall");
    // Dropping a's index gave its key back: b has room for one more.
    b.put(b"d2", b"2").unwrap();
    assert_eq!(b.indexed_keys(), Some(2));
    a.index_keys(b"d").unwrap();
    assert_eq!(a.indexed_keys(), None, "outgrown by the opening scan");
    assert_eq!(read(&a, b"d1"), Some(b"1".to_vec()));
    drop(b);
    a.index_keys(b"d").unwrap();
    assert_eq!(
        a.indexed_keys(),
        Some(2),
        "a closed store gives its index's bytes back"
    );
}

#[test]
fn a_key_index_is_kept_only_for_an_operator_prefix_and_while_rules_only_grow() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = FjallStore::open(dir.path(), "s", Durability::Process).unwrap();
    for prefix in [&b""[..], b"\x00o", b"\xff\xff"] {
        store.index_keys(prefix).unwrap();
        assert_eq!(store.indexed_keys(), None, "{prefix:?}");
    }
    store.index_keys(b"d").unwrap();
    let rule = |below_time| ExpiryRule {
        below_time,
        through_seq: 1,
    };
    let mut batch = WriteBatch::default();
    batch.put(b"d1", &stamped(10, 1));
    batch.put(b"d2", &stamped(40, 1));
    store.commit(batch).unwrap();
    let mut forget = WriteBatch::default();
    forget.put(&ExpiryRule::key(b'd'), &rule(30).encode());
    forget.delete_expired(Bytes::from_static(b"d1"));
    store.commit(forget).unwrap();
    assert_eq!(store.indexed_keys(), Some(1), "d1 is hidden by the rule");
    assert_eq!(read(&store, b"d1"), None);
    let mut grown = WriteBatch::default();
    grown.put(&ExpiryRule::key(b'd'), &rule(35).encode());
    store.commit(grown).unwrap();
    assert_eq!(
        store.indexed_keys(),
        Some(1),
        "a rule that hides more keeps it"
    );
    // A lower rule shows d1 again, which the index left out: the index goes.
    let mut lowered = WriteBatch::default();
    lowered.put(&ExpiryRule::key(b'd'), &rule(5).encode());
    store.commit(lowered).unwrap();
    assert_eq!(store.indexed_keys(), None);
    assert!(read(&store, b"d1").is_some());
    store.index_keys(b"d").unwrap();
    let mut removed = WriteBatch::default();
    removed.delete(&ExpiryRule::key(b'd'));
    store.commit(removed).unwrap();
    assert_eq!(store.indexed_keys(), None, "so does a removed rule");
}
