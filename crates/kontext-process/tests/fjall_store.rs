//! The fjall store against the in-memory store: same batches, same contents; a reopened fjall
//! store holds every committed batch; a store restored from the changelog equals the original.

use bytes::Bytes;
use kontext_core::record::TopicPartition;
use kontext_process::store::Durability;
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
