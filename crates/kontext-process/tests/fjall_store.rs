//! The fjall store against the in-memory store: same batches, same contents; a reopened fjall
//! store holds every committed batch; a store restored from the changelog equals the original.

use bytes::Bytes;
use kontext_core::record::TopicPartition;
use kontext_process::store::{get_through, Durability};
use kontext_process::*;
use proptest::prelude::*;

fn batches() -> impl Strategy<Value = Vec<Vec<(u8, Option<u8>)>>> {
    prop::collection::vec(
        prop::collection::vec((0u8..32, prop::option::weighted(0.7, any::<u8>())), 0..20),
        1..12,
    )
}

fn to_batch(writes: &[(u8, Option<u8>)], n: usize) -> WriteBatch {
    let mut batch = WriteBatch::default();
    for (key, value) in writes {
        let key = [b'k', *key];
        match value {
            Some(v) => batch.put(&key, &[*v; 3]),
            None => batch.delete(&key),
        }
    }
    batch.set_offset(TopicPartition::new("in", 0), n as i64 + 1);
    batch
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn fjall_survives_reopen_and_restores_from_its_changelog(batches in batches()) {
        let dir = tempfile::tempdir().unwrap();
        let mut memory = MemoryStore::new("s");
        let mut changelog = Vec::new();
        {
            let mut fjall = FjallStore::open(dir.path().join("a"), "s", Durability::Process).unwrap();
            for (n, writes) in batches.iter().enumerate() {
                changelog.extend(fjall.commit(to_batch(writes, n)).unwrap());
                memory.commit(to_batch(writes, n)).unwrap();
            }
            prop_assert_eq!(fjall.dump().unwrap(), memory.dump().unwrap());
        }
        let reopened = FjallStore::open(dir.path().join("a"), "s", Durability::Process).unwrap();
        prop_assert_eq!(reopened.dump().unwrap(), memory.dump().unwrap());
        prop_assert_eq!(
            reopened.offsets().unwrap().get(&TopicPartition::new("in", 0)).copied(),
            Some(batches.len() as i64)
        );

        let mut restored = FjallStore::open(dir.path().join("b"), "s", Durability::Machine).unwrap();
        let tail = restored.restore(&mut changelog.into_iter()).unwrap();
        prop_assert!(tail.is_empty());
        prop_assert_eq!(restored.dump().unwrap(), memory.dump().unwrap());
    }
}

#[test]
fn dedup_state_in_fjall_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let op = Deduplicate::new(DedupConfig { window_ms: 1_000 });
    let event = |id: &str, offset: i64| Event {
        key: Bytes::from_static(b"C-1"),
        id: Bytes::copy_from_slice(id.as_bytes()),
        time_ms: offset,
        coords: Coords::new("clicks", 0, offset),
        value: serde_json::Value::Null,
    };
    {
        let mut store = FjallStore::open(dir.path(), "dedup", Durability::Machine).unwrap();
        let batch = op.process(&store, &[event("a", 0), event("b", 1)]).unwrap();
        store.commit(batch.state).unwrap();
    }
    let store = FjallStore::open(dir.path(), "dedup", Durability::Machine).unwrap();
    let batch = op
        .process(&store, &[event("a", 0), event("a", 2), event("c", 3)])
        .unwrap();
    assert_eq!(
        batch.decisions,
        vec![
            DedupDecision::AlreadyApplied,
            DedupDecision::Duplicate,
            DedupDecision::Forward
        ]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// fjall leaves expired dedup entries to an expiry rule (hidden, then compacted away); the
    /// in-memory store deletes them. Both must decide alike and hold alike, across compactions,
    /// reopens, a restart with a larger window, and a restore from the changelog.
    #[test]
    fn dedup_on_fjall_decides_and_restores_like_the_memory_store(
        steps in prop::collection::vec((0u8..30, 0i64..40, 0i64..30, 1usize..12), 1..40),
        window in 1i64..120,
        later_window in 1i64..400,
        compact_every in 1usize..6,
    ) {
        let dir = tempfile::tempdir().unwrap();
        // Dedup's stores keep their ids in a key index: decisions must not depend on it.
        let open = |name: &str| {
            let mut store = FjallStore::open(dir.path().join(name), "dedup", Durability::Process).unwrap();
            Deduplicate::prepare_store(&mut store);
            assert!(store.indexed_keys().is_some());
            store
        };
        let mut fjall = open("a");
        let mut memory = MemoryStore::new("dedup");
        let mut changelog = Vec::new();
        let mut op = Deduplicate::new(DedupConfig { window_ms: window });
        let (mut now, mut offset) = (0i64, 0i64);
        for (n, (id, step, back, size)) in steps.iter().enumerate() {
            if n == steps.len() / 2 {
                op = Deduplicate::new(DedupConfig { window_ms: later_window });
            }
            let events: Vec<Event> = (0..*size)
                .map(|i| {
                    now += step / 4;
                    offset += 1;
                    let id = (*id as i64 + i as i64 * 7) % 30;
                    Event {
                        key: Bytes::from_static(b"C-1"),
                        id: Bytes::from(format!("id-{id}")),
                        time_ms: now - (back * i as i64) % 50,
                        coords: Coords::new("clicks", 0, offset),
                        value: serde_json::Value::Null,
                    }
                })
                .collect();
            let on_fjall = op.process(&fjall, &events).unwrap();
            let on_memory = op.process(&memory, &events).unwrap();
            prop_assert_eq!(&on_fjall.decisions, &on_memory.decisions);
            prop_assert_eq!(on_fjall.expired, on_memory.expired);
            changelog.extend(fjall.commit(on_fjall.state).unwrap());
            memory.commit(on_memory.state).unwrap();
            prop_assert_eq!(fjall.dump().unwrap(), memory.dump().unwrap());
            if n % compact_every == 0 {
                fjall.compact().unwrap();
                prop_assert_eq!(fjall.dump().unwrap(), memory.dump().unwrap());
            }
        }
        drop(fjall);
        let fjall = open("a");
        prop_assert_eq!(fjall.dump().unwrap(), memory.dump().unwrap());
        let mut restored = open("b");
        prop_assert!(restored.restore(&mut changelog.into_iter()).unwrap().is_empty());
        prop_assert_eq!(restored.dump().unwrap(), memory.dump().unwrap());
        // And they go on deciding alike: every id once more, far later (expired: forwarded).
        let later: Vec<Event> = (0..30)
            .map(|id| Event {
                key: Bytes::from_static(b"C-1"),
                id: Bytes::from(format!("id-{id}")),
                time_ms: now + 1_000,
                coords: Coords::new("clicks", 0, offset + 1 + id),
                value: serde_json::Value::Null,
            })
            .collect();
        let a = op.process(&fjall, &later).unwrap();
        let b = op.process(&restored, &later).unwrap();
        prop_assert_eq!(&a.decisions, &b.decisions);
        prop_assert!(a.decisions.iter().all(|d| *d == DedupDecision::Forward));
    }
}

/// What happens to a fjall store between reads of every key, in the value-cache lockstep test.
#[derive(Debug, Clone)]
enum CacheStep {
    /// A batch is committed: writes, then `delete_expired` of some keys (no rule covers them).
    Commit(Vec<(u8, Option<u8>)>, Vec<u8>),
    /// A batch is built, read through, and dropped (an aborted transaction, a crash before the
    /// state commit).
    Abort(Vec<(u8, Option<u8>)>),
    /// The store is closed and opened again, in the same database or in a new one.
    Reopen { same_db: bool },
    /// The store is cleared and restored from its changelog.
    ClearAndRestore,
}

fn cache_steps() -> impl Strategy<Value = Vec<CacheStep>> {
    let writes =
        || prop::collection::vec((0u8..24, prop::option::weighted(0.7, any::<u8>())), 0..12);
    prop::collection::vec(
        prop_oneof![
            6 => (writes(), prop::collection::vec(0u8..24, 0..3))
                .prop_map(|(w, e)| CacheStep::Commit(w, e)),
            2 => writes().prop_map(CacheStep::Abort),
            1 => any::<bool>().prop_map(|same_db| CacheStep::Reopen { same_db }),
            1 => Just(CacheStep::ClearAndRestore),
        ],
        1..24,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every key reads the same from fjall (through its value cache, large enough for all keys,
    /// or so small that it evicts all the time, or none; and through a key index of all keys,
    /// of one key, or one that outgrows its budget, or none) as from the in-memory store,
    /// after commits, aborted batches, reopens and restores.
    #[test]
    fn the_value_cache_and_the_key_index_never_serve_what_fjall_does_not_hold(
        steps in cache_steps(),
        budget in prop_oneof![Just(0u64), Just(1_500u64), Just(1u64 << 20)],
        index in prop_oneof![
            Just(None),
            Just(Some((vec![b'k'], 1usize << 20))),
            Just(Some((vec![b'k', 3], 1usize << 20))),
            // Room for 8 keys of 2 bytes: outgrown in most runs.
            Just(Some((vec![b'k'], 8 * 42))),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let open_db = || {
            let options = StateDbOptions {
                value_cache_bytes: budget,
                key_index_bytes: index.as_ref().map_or(0, |(_, bytes)| *bytes),
            };
            StateDb::open_with(dir.path(), options).unwrap()
        };
        let open = |db: &StateDb| {
            let mut store = FjallStore::open_in(db, "s", "s", Durability::Process).unwrap();
            if let Some((prefix, _)) = &index {
                store.index_keys(prefix).unwrap();
            }
            store
        };
        let mut db = open_db();
        let mut fjall = open(&db);
        let mut memory = MemoryStore::new("s");
        let mut changelog = Vec::new();
        for (n, step) in steps.iter().enumerate() {
            match step {
                CacheStep::Commit(writes, expired) => {
                    let mut batch = to_batch(writes, n);
                    for key in expired {
                        batch.delete_expired(Bytes::copy_from_slice(&[b'k', *key]));
                    }
                    changelog.extend(fjall.commit(batch.clone()).unwrap());
                    memory.commit(batch).unwrap();
                }
                CacheStep::Abort(writes) => {
                    let batch = to_batch(writes, n);
                    for key in 0..24u8 {
                        let key = [b'k', key];
                        prop_assert_eq!(
                            get_through(&fjall, &batch, &key).unwrap(),
                            get_through(&memory, &batch, &key).unwrap()
                        );
                    }
                }
                CacheStep::Reopen { same_db } => {
                    drop(fjall);
                    if !same_db {
                        drop(db);
                        db = open_db();
                    }
                    fjall = open(&db);
                }
                CacheStep::ClearAndRestore => {
                    fjall.clear().unwrap();
                    let tail = fjall.restore(&mut changelog.clone().into_iter()).unwrap();
                    prop_assert!(tail.is_empty());
                }
            }
            for key in 0..24u8 {
                let key = [b'k', key];
                prop_assert_eq!(fjall.get(&key).unwrap(), memory.get(&key).unwrap(), "{:?} after {:?}", key, step);
            }
            // A whole index holds exactly the keys under its prefix (no rule hides any here).
            if let (Some((prefix, _)), Some(held)) = (&index, fjall.indexed_keys()) {
                let stored = memory.prefix(prefix).count();
                prop_assert_eq!(held, stored, "index of {:?} after {:?}", prefix, step);
            } else if let Some((_, budget)) = &index {
                prop_assert!(*budget < 1 << 10, "only a small index is ever dropped");
            }
        }
        prop_assert_eq!(fjall.dump().unwrap(), memory.dump().unwrap());
    }
}
