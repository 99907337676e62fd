use serde_json::json;

use super::*;
use crate::document::RelatedEntity;
use crate::model::{Change, Provenance};

fn schema() -> StoreSchema {
    let mut s = StoreSchema::default();
    s.belongs_to.insert(
        "order".into(),
        vec![("customer".into(), "customer_id".into())],
    );
    s.belongs_to.insert("customer".into(), vec![]);
    s.related_limit.insert("order".into(), 2);
    s
}

fn upsert(
    entity_type: &str,
    id: &str,
    fields: serde_json::Value,
    source: &str,
    partition: i32,
    offset: i64,
    time: i64,
) -> EntityUpdate {
    EntityUpdate {
        entity_type: entity_type.into(),
        entity_id: id.into(),
        change: Change::Upsert(fields.as_object().cloned().unwrap_or_default().into()),
        provenance: Provenance {
            source: source.into(),
            event_id: format!("{source}-{offset}"),
            event_type: None,
            topic: format!("context.{entity_type}s"),
            partition,
            offset,
            event_time_ms: time,
        },
    }
}

fn open(dir: &tempfile::TempDir) -> EmbeddedStore {
    EmbeddedStore::open(&dir.path().join("store.redb"), schema()).unwrap()
}

#[test]
fn newer_versions_win_per_field_whatever_the_arrival_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = upsert(
        "customer",
        "C1",
        json!({"given_name": "Ana", "tier": "gold"}),
        "crm",
        0,
        0,
        1_000,
    );
    let b = upsert(
        "customer",
        "C1",
        json!({"given_name": "Anna"}),
        "billing",
        1,
        0,
        2_000,
    );
    let store = open(&dir);
    // b arrives first; a is older for given_name but brings tier.
    store.apply(std::slice::from_ref(&b), &[]).unwrap();
    store.apply(std::slice::from_ref(&a), &[]).unwrap();
    let doc = store.get("customer", "C1").unwrap().unwrap();
    assert_eq!(doc.values()["given_name"], "Anna");
    assert_eq!(doc.values()["tier"], "gold");
    assert_eq!(doc.fields["given_name"].provenance.source, "billing");
    assert_eq!(doc.latest.source, "billing");
    assert_eq!(doc.events_applied, 2);
}

#[test]
fn reapplying_the_same_records_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let batch = vec![
        upsert(
            "customer",
            "C1",
            json!({"given_name": "Ana"}),
            "crm",
            0,
            0,
            1_000,
        ),
        upsert(
            "order",
            "O1",
            json!({"customer_id": "C1", "total": 10}),
            "shop",
            0,
            0,
            1_500,
        ),
    ];
    let first = store
        .apply(
            &batch,
            &[("context.customers", 0, 1), ("context.orders", 0, 1)],
        )
        .unwrap();
    assert_eq!(first.applied, 2);
    let before = store.dump().unwrap();
    let again = store
        .apply(
            &batch,
            &[("context.customers", 0, 1), ("context.orders", 0, 1)],
        )
        .unwrap();
    assert_eq!(
        again,
        ApplyStats {
            applied: 0,
            skipped: 2,
            deleted: 0
        }
    );
    assert_eq!(store.dump().unwrap(), before);
}

#[test]
fn offsets_survive_reopen_and_cover_skipped_records() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir);
        let u = upsert("customer", "C1", json!({"a": 1}), "crm", 3, 7, 1);
        // The batch also covered offsets 8 and 9 (say, an invalid and a filtered record).
        store.apply(&[u], &[("context.customers", 3, 10)]).unwrap();
    }
    let store = open(&dir);
    let offsets = store.applied_offsets().unwrap();
    assert_eq!(offsets[&("context.customers".to_string(), 3)], 10);
    assert_eq!(
        store.get("customer", "C1").unwrap().unwrap().values()["a"],
        1
    );
}

fn marks(applied: u64, durable: u64) -> WriteMarks {
    WriteMarks { applied, durable }
}

/// With a sync interval, a commit is served at once and counted as applied but not durable
/// until a flush; without one every commit is durable when `apply` returns.
#[test]
fn unsynced_commits_are_served_and_counted_until_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir).with_sync_interval(std::time::Duration::from_secs(3600));
        assert_eq!(store.write_marks(), WriteMarks::default());
        let u = upsert("customer", "C1", json!({"a": 1}), "crm", 0, 0, 1);
        store.apply(&[u], &[("context.customers", 0, 1)]).unwrap();
        assert_eq!(
            store.get("customer", "C1").unwrap().unwrap().values()["a"],
            1
        );
        assert_eq!(store.write_marks(), marks(1, 0));
        store.flush().unwrap();
        assert_eq!(store.write_marks(), marks(1, 1));
        store.flush().unwrap();
        assert_eq!(store.write_marks(), marks(1, 1));
        for offset in 1..3 {
            let u = upsert(
                "customer",
                "C1",
                json!({"a": offset + 1}),
                "crm",
                0,
                offset,
                2,
            );
            store
                .apply(&[u], &[("context.customers", 0, offset + 1)])
                .unwrap();
        }
        assert_eq!(store.write_marks(), marks(3, 1));
        store.flush().unwrap();
    }
    let store = open(&dir);
    assert_eq!(
        store.get("customer", "C1").unwrap().unwrap().values()["a"],
        3
    );
    assert_eq!(
        store.applied_offsets().unwrap()[&("context.customers".to_string(), 0)],
        3
    );
    let u = upsert("customer", "C2", json!({"a": 1}), "crm", 0, 3, 3);
    store.apply(&[u], &[("context.customers", 0, 4)]).unwrap();
    assert_eq!(
        store.write_marks(),
        marks(1, 1),
        "no interval: durable at once"
    );
}

#[test]
fn relations_follow_the_parent_field_and_assemble_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .apply(
            &[
                upsert(
                    "customer",
                    "C1",
                    json!({"given_name": "Ana"}),
                    "crm",
                    0,
                    0,
                    1,
                ),
                upsert(
                    "order",
                    "O1",
                    json!({"customer_id": "C1", "total": 1}),
                    "shop",
                    0,
                    0,
                    10,
                ),
                upsert(
                    "order",
                    "O2",
                    json!({"customer_id": "C1", "total": 2}),
                    "shop",
                    0,
                    1,
                    20,
                ),
                upsert(
                    "order",
                    "O3",
                    json!({"customer_id": "C1", "total": 3}),
                    "shop",
                    0,
                    2,
                    30,
                ),
                upsert(
                    "order",
                    "O4",
                    json!({"customer_id": "C2", "total": 4}),
                    "shop",
                    0,
                    3,
                    40,
                ),
            ],
            &[],
        )
        .unwrap();
    // O3 moves to another customer: the index follows.
    store
        .apply(
            &[upsert(
                "order",
                "O3",
                json!({"customer_id": "C2"}),
                "shop",
                0,
                4,
                50,
            )],
            &[],
        )
        .unwrap();
    let ctx = store.context("customer", "C1").unwrap().unwrap();
    let orders = &ctx.related["order"];
    assert_eq!(orders.total, 2);
    let ids: Vec<&str> = orders.items.iter().map(|o| o.entity_id.as_str()).collect();
    assert_eq!(ids, vec!["O2", "O1"]);
    assert_eq!(ctx.provenance["given_name"].source, "crm");

    let order_ctx = store.context("order", "O1").unwrap().unwrap();
    assert_eq!(order_ctx.belongs_to["customer"].fields["given_name"], "Ana");
    // C2 has no profile yet: no context of its own, but the index knows its orders.
    assert!(store.context("customer", "C2").unwrap().is_none());
    assert_eq!(
        store.children("customer", "C2", "order").unwrap(),
        vec!["O3", "O4"]
    );
}

#[test]
fn tombstones_delete_the_entity_and_its_relations() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let mut del = upsert("order", "O1", json!({}), "shop", 0, 1, 20);
    del.change = Change::Delete;
    store
        .apply(
            &[
                upsert("customer", "C1", json!({"n": 1}), "crm", 0, 0, 1),
                upsert(
                    "order",
                    "O1",
                    json!({"customer_id": "C1"}),
                    "shop",
                    0,
                    0,
                    10,
                ),
            ],
            &[],
        )
        .unwrap();
    let stats = store.apply(&[del], &[]).unwrap();
    assert_eq!(stats.deleted, 1);
    assert!(store.get("order", "O1").unwrap().is_none());
    assert!(store
        .children("customer", "C1", "order")
        .unwrap()
        .is_empty());
    let ctx = store.context("customer", "C1").unwrap().unwrap();
    assert_eq!(ctx.related["order"].total, 0);
    assert!(ctx.related["order"].items.is_empty());
}

/// A tombstone is versioned like a field: it removes what is not newer than it, whichever of
/// them arrives first, and keeps out an older upsert that arrives after it (another source's
/// update of the customer, written before the CRM deleted it, read from another partition).
#[test]
fn a_tombstone_removes_what_is_older_whatever_the_order_of_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    // Three partitions: any order of arrival is a possible delivery.
    let mut del = upsert("customer", "C1", json!({}), "crm", 0, 0, 20);
    del.change = Change::Delete;
    let older = upsert(
        "customer",
        "C1",
        json!({"n": 1, "tier": "gold"}),
        "web",
        1,
        0,
        10,
    );
    let newer = upsert("customer", "C1", json!({"n": 2}), "web", 2, 0, 30);
    // The tombstone first, then the older upsert: it stays deleted.
    store.apply(std::slice::from_ref(&del), &[]).unwrap();
    store.apply(std::slice::from_ref(&older), &[]).unwrap();
    assert!(store.get("customer", "C1").unwrap().is_none());
    assert!(store.list("customer", 10, None).unwrap().is_empty());
    // A newer upsert brings it back, with only what is newer than the tombstone; every
    // record counts.
    store.apply(std::slice::from_ref(&newer), &[]).unwrap();
    let doc = store.get("customer", "C1").unwrap().unwrap();
    assert_eq!(doc.values(), json!({"n": 2}).as_object().cloned().unwrap());
    assert_eq!(doc.events_applied, 3);

    // The other order gives the same entity.
    let dir = tempfile::tempdir().unwrap();
    let other = open(&dir);
    other.apply(&[newer, older], &[]).unwrap();
    other.apply(&[del], &[]).unwrap();
    assert_eq!(other.get("customer", "C1").unwrap(), Some(doc));
}

/// An event's provenance is stored once per entity and shared, after a read, by the fields it
/// set (and by `latest` when it is the newest): one copy per event, not one per field.
#[test]
fn fields_of_one_event_share_its_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .apply(
            &[
                upsert("customer", "C1", json!({"a": 1, "b": 2}), "crm", 0, 0, 1),
                upsert("customer", "C1", json!({"c": 3}), "crm", 0, 1, 2),
            ],
            &[],
        )
        .unwrap();
    let doc = store.get("customer", "C1").unwrap().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|k| &doc.fields[k].provenance);
    assert!(std::sync::Arc::ptr_eq(a, b));
    assert!(std::sync::Arc::ptr_eq(c, &doc.latest));
    assert!(!std::sync::Arc::ptr_eq(a, c));
    assert_eq!((a.offset, c.offset), (0, 1));
}

#[test]
fn lists_ids_in_order_with_paging() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let batch: Vec<_> = (0..5)
        .map(|i| {
            upsert(
                "customer",
                &format!("C{i}"),
                json!({"i": i}),
                "crm",
                0,
                i,
                1,
            )
        })
        .collect();
    store.apply(&batch, &[]).unwrap();
    store
        .apply(&[upsert("order", "O1", json!({}), "shop", 0, 0, 1)], &[])
        .unwrap();
    assert_eq!(
        store.list("customer", 3, None).unwrap(),
        vec!["C0", "C1", "C2"]
    );
    assert_eq!(
        store.list("customer", 3, Some("C2")).unwrap(),
        vec!["C3", "C4"]
    );
    assert_eq!(store.list("order", 10, None).unwrap(), vec!["O1"]);
}

mod model {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// The winning write of a field: (event time, topic, partition, offset, value).
    type Winner = (i64, String, i32, i64, serde_json::Value);

    /// (entity, field, value, partition, event time); offsets are assigned in log order.
    fn events() -> impl Strategy<Value = Vec<(u8, u8, u8, u8, i64)>> {
        proptest::collection::vec((0u8..4, 0u8..3, 0u8..10, 0u8..2, 0i64..20), 1..60)
    }

    fn updates(events: &[(u8, u8, u8, u8, i64)]) -> Vec<EntityUpdate> {
        let mut next_offset = [0i64; 2];
        events
            .iter()
            .map(|&(entity, field, value, partition, time)| {
                let offset = next_offset[partition as usize];
                next_offset[partition as usize] += 1;
                let mut u = upsert(
                    "customer",
                    &format!("C{entity}"),
                    json!({}),
                    "crm",
                    partition as i32,
                    offset,
                    time,
                );
                u.provenance.topic = "context.customers".into();
                u.change =
                    Change::Upsert([(format!("f{field}"), json!(value))].into_iter().collect());
                u
            })
            .collect()
    }

    proptest! {
        // Each case creates two durable stores (fsyncs): 64 cases keep this to a few seconds.
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// One big batch, one batch per record, and a naive "max version per field" model agree.
        #[test]
        fn batching_does_not_change_the_result(events in events(), split in 1usize..7) {
            let updates = updates(&events);
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let (whole, pieces) = (open(&a), open(&b));
            whole.apply(&updates, &[]).unwrap();
            for chunk in updates.chunks(split) {
                pieces.apply(chunk, &[]).unwrap();
            }
            // Re-delivery of everything changes nothing.
            prop_assert_eq!(pieces.apply(&updates, &[]).unwrap().applied, 0);
            let dump = whole.dump().unwrap();
            prop_assert_eq!(&dump, &pieces.dump().unwrap());

            let mut expected: BTreeMap<(String, String), Winner> = BTreeMap::new();
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            for u in &updates {
                let Change::Upsert(fields) = &u.change else { unreachable!() };
                *counts.entry(u.entity_id.clone()).or_default() += 1;
                for (name, value) in fields {
                    let p = &u.provenance;
                    let candidate = (p.event_time_ms, p.topic.clone(), p.partition, p.offset, value.clone());
                    let slot = expected.entry((u.entity_id.clone(), name.to_string())).or_insert(candidate.clone());
                    if (candidate.0, &candidate.1, candidate.2, candidate.3) > (slot.0, &slot.1, slot.2, slot.3) {
                        *slot = candidate;
                    }
                }
            }
            for doc in &dump {
                prop_assert_eq!(doc.events_applied, counts[&doc.entity_id]);
                for (name, entry) in &doc.fields {
                    if name == "customer_id" { continue; }
                    prop_assert_eq!(&entry.value, &expected[&(doc.entity_id.clone(), name.clone())].4);
                }
            }
        }
    }
}

mod recency_index {
    use proptest::prelude::*;

    use super::*;

    /// (order id, customer id, event time) per record, applied in batches of `batch`.
    fn apply_all(store: &EmbeddedStore, records: &[(u8, u8, i64)], batch: usize) {
        let updates: Vec<EntityUpdate> = records
            .iter()
            .enumerate()
            .map(|(offset, (order, customer, time))| {
                upsert(
                    "order",
                    &format!("O{order}"),
                    json!({"customer_id": format!("C{customer}")}),
                    "shop",
                    0,
                    offset as i64,
                    *time,
                )
            })
            .collect();
        for chunk in updates.chunks(batch.max(1)) {
            let next = chunk.last().unwrap().provenance.offset + 1;
            store.apply(chunk, &[("context.orders", 0, next)]).unwrap();
        }
    }

    /// The newest two orders of a customer by latest version, and how many it has: recomputed
    /// from the records.
    fn naive(records: &[(u8, u8, i64)], customer: u8) -> (usize, Vec<String>) {
        let mut all = newest_first(records, customer);
        all.truncate(2);
        (newest_first(records, customer).len(), all)
    }

    /// Every order of a customer, newest first by latest version.
    fn newest_first(records: &[(u8, u8, i64)], customer: u8) -> Vec<String> {
        let mut latest: BTreeMap<u8, (u8, (i64, i64))> = BTreeMap::new();
        for (offset, (order, c, time)) in records.iter().enumerate() {
            let version = (*time, offset as i64);
            let e = latest.entry(*order).or_insert((*c, version));
            // The parent field follows last-writer-wins by version, as does `latest`.
            if version >= e.1 {
                *e = (*c, version);
            }
        }
        let mut mine: Vec<((i64, i64), u8)> = latest
            .iter()
            .filter(|(_, (c, _))| *c == customer)
            .map(|(o, (_, v))| (*v, *o))
            .collect();
        mine.sort_by(|a, b| b.cmp(a));
        mine.iter().map(|(_, o)| format!("O{o}")).collect()
    }

    /// A customer's stored related list of orders: its total, and its entries' ids.
    fn stored_list(store: &EmbeddedStore, customer: u8) -> (u64, Vec<String>) {
        let txn = store.db.begin_read().unwrap();
        let related = txn.open_table(RELATED).unwrap();
        let key = relation_key("customer", &format!("C{customer}"), "order", "");
        match related.get(key.as_slice()).unwrap() {
            None => (0, vec![]),
            Some(v) => {
                let (total, newest) = codec::decode_related(v.value()).unwrap();
                (total, newest.into_iter().map(|(_, id)| id).collect())
            }
        }
    }

    fn shown(store: &EmbeddedStore, customer: u8) -> (usize, Vec<String>) {
        match store.context("customer", &format!("C{customer}")).unwrap() {
            None => (0, vec![]),
            Some(ctx) => {
                let list = &ctx.related["order"];
                let ids = list.items.iter().map(|i| i.entity_id.clone()).collect();
                (list.total, ids)
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Orders move between customers and get newer and older updates in any order: each
        /// customer's related list is its newest orders by latest version, and the total counts
        /// every order it has now.
        #[test]
        fn related_lists_match_a_recount(
            records in proptest::collection::vec((0u8..8, 0u8..3, 0i64..50), 1..60),
            batch in 1usize..20,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = open(&dir);
            // Customers exist so that their context can be assembled.
            for c in 0..3u8 {
                let u = upsert("customer", &format!("C{c}"), json!({"name": "x"}), "crm", 0, c as i64, 0);
                store.apply(&[u], &[]).unwrap();
            }
            apply_all(&store, &records, batch);
            for c in 0..3u8 {
                prop_assert_eq!(shown(&store, c), naive(&records, c), "customer C{}", c);
                // The stored list alone answers the lookup: it is the newest orders, at least
                // as many as the limit (2) shows, and its total is exact.
                let all = newest_first(&records, c);
                let (total, listed) = stored_list(&store, c);
                prop_assert_eq!(total as usize, all.len(), "customer C{}", c);
                prop_assert!(listed.len() >= all.len().min(2), "customer C{}: {:?}", c, listed);
                prop_assert!(listed.len() <= list_capacity(2), "customer C{}: {:?}", c, listed);
                prop_assert_eq!(&listed[..], &all[..listed.len()], "customer C{}", c);
                let id = format!("C{c}");
                prop_assert_eq!(store.context("customer", &id).unwrap().as_deref().cloned(), from_documents(&store, "customer", &id));
            }
            for o in 0..8u8 {
                let id = format!("O{o}");
                prop_assert_eq!(store.context("order", &id).unwrap().as_deref().cloned(), from_documents(&store, "order", &id));
            }
        }
    }

    /// The context as assembled from whole decoded [`EntityDoc`]s (what the PostgreSQL store
    /// does), with the related lists the lookup chose: the lookup decodes the stored bytes
    /// straight into the document and must give the same one.
    fn from_documents(
        store: &EmbeddedStore,
        entity_type: &str,
        id: &str,
    ) -> Option<ContextDocument> {
        let doc = store.get(entity_type, id).unwrap()?;
        let fast = store.context(entity_type, id).unwrap()?;
        let mut belongs_to = BTreeMap::new();
        for (parent_type, field) in store.schema().parents_of(entity_type) {
            let parent = doc.fields.get(field).and_then(|f| f.value.as_str());
            if let Some(parent) = parent.and_then(|p| store.get(parent_type, p).unwrap()) {
                belongs_to.insert(
                    parent_type.clone(),
                    Arc::new(RelatedEntity::from_doc(&parent)),
                );
            }
        }
        let related = fast
            .related
            .iter()
            .map(|(t, list)| {
                let items = list
                    .items
                    .iter()
                    .map(|i| {
                        let child = store.get(t, &i.entity_id).unwrap().unwrap();
                        Arc::new(RelatedEntity::from_doc(&child))
                    })
                    .collect();
                (
                    t.clone(),
                    RelatedList {
                        items,
                        total: list.total,
                    },
                )
            })
            .collect();
        Some(ContextDocument::assemble(&doc, belongs_to, related))
    }

    /// A list keeps at most `list_capacity(2)` = 4 of C0's six orders. Moving three of the
    /// listed ones away leaves one entry with two orders outside: the list is rebuilt from the
    /// relations. Deleting orders shrinks it the same way.
    #[test]
    fn a_list_that_moves_and_deletes_empty_is_rebuilt_from_the_relations() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        // O1..O6 of C0 at times 1..6: the list holds O6, O5, O4, O3.
        let mut records: Vec<(u8, u8, i64)> = (1..=6).map(|o| (o, 0, o as i64)).collect();
        apply_all(&store, &records, 10);
        assert_eq!(stored_list(&store, 0), (6, ids(&[6, 5, 4, 3])));
        // O6, O5 and O4 move to C1 in one batch.
        records.extend([(6, 1, 10), (5, 1, 11), (4, 1, 12)]);
        apply_all(&store, &records, 10);
        assert_eq!(stored_list(&store, 0), (3, ids(&[3, 2, 1])));
        assert_eq!(stored_list(&store, 1), (3, ids(&[4, 5, 6])));
        // Tombstones for O4, O5 and O3.
        let offset = records.len() as i64;
        let deletes: Vec<EntityUpdate> = [4, 5, 3]
            .iter()
            .enumerate()
            .map(|(i, o)| EntityUpdate {
                change: Change::Delete,
                ..upsert(
                    "order",
                    &format!("O{o}"),
                    json!({}),
                    "shop",
                    0,
                    offset + i as i64,
                    20,
                )
            })
            .collect();
        store.apply(&deletes, &[]).unwrap();
        assert_eq!(stored_list(&store, 0), (2, ids(&[2, 1])));
        assert_eq!(stored_list(&store, 1), (1, ids(&[6])));
    }

    /// A `belongs_to` added to a type that had data: its older entities have a parent field
    /// but no relation key, and count in no list (as in the relation index) when they move.
    #[test]
    fn a_parent_field_without_a_relation_key_counts_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        let order = |id: u8, customer: u8, offset: i64| {
            upsert(
                "order",
                &format!("O{id}"),
                json!({"customer_id": format!("C{customer}")}),
                "shop",
                0,
                offset,
                offset,
            )
        };
        {
            let store = EmbeddedStore::open(&dir.path().join("store.redb"), StoreSchema::default())
                .unwrap();
            store.apply(&[order(1, 1, 1), order(2, 1, 2)], &[]).unwrap();
        }
        let store = open(&dir);
        store.apply(&[order(3, 1, 3)], &[]).unwrap();
        assert_eq!(stored_list(&store, 1), (1, ids(&[3])));
        // O1 leaves C1, where the relation index never had it.
        store.apply(&[order(1, 2, 4)], &[]).unwrap();
        assert_eq!(stored_list(&store, 1), (1, ids(&[3])));
        assert_eq!(stored_list(&store, 2), (1, ids(&[1])));
        store.apply(&[order(4, 1, 5)], &[]).unwrap();
        assert_eq!(stored_list(&store, 1), (2, ids(&[4, 3])));
        assert_eq!(
            store.children("customer", "C1", "order").unwrap(),
            ids(&[3, 4])
        );
    }

    /// Such an entity is linked when an update writes its parent field again, even one older
    /// than the entity's newest (as PostgreSQL links any rewritten relation field).
    #[test]
    fn a_rewritten_parent_field_links_even_from_an_older_update() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(&dir.path().join("store.redb"), StoreSchema::default())
                .unwrap();
            let first = upsert(
                "order",
                "O1",
                json!({"customer_id": "C1", "status": "a"}),
                "shop",
                0,
                0,
                10,
            );
            let newest = upsert("order", "O1", json!({"status": "b"}), "shop", 0, 1, 30);
            store.apply(&[first, newest], &[]).unwrap();
        }
        let store = open(&dir);
        assert_eq!(stored_list(&store, 1), (0, ids(&[])));
        // From another partition, dated between the two: the field's version moves, the
        // entity's newest does not.
        let rewrite = upsert("order", "O1", json!({"customer_id": "C1"}), "erp", 1, 0, 20);
        store.apply(&[rewrite], &[]).unwrap();
        assert_eq!(stored_list(&store, 1), (1, ids(&[1])));
    }

    /// Lists keep `list_capacity(related_limit)` entries: a larger limit rebuilds them when the
    /// store is opened, so that a lookup still reads one list and no more.
    #[test]
    fn a_larger_related_limit_rebuilds_the_lists_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(&dir);
            let records: Vec<(u8, u8, i64)> = (1..=12).map(|o| (o, 0, o as i64)).collect();
            apply_all(&store, &records, 5);
            assert_eq!(stored_list(&store, 0), (12, ids(&[12, 11, 10, 9])));
        }
        let mut schema = schema();
        schema.related_limit.insert("order".into(), 5);
        let store = EmbeddedStore::open(&dir.path().join("store.redb"), schema).unwrap();
        assert_eq!(
            stored_list(&store, 0),
            (12, ids(&[12, 11, 10, 9, 8, 7, 6, 5, 4, 3]))
        );
        // A smaller limit again keeps the lists as they are.
        drop(store);
        let store = open(&dir);
        assert_eq!(stored_list(&store, 0).1.len(), 10);
    }

    fn ids(orders: &[u8]) -> Vec<String> {
        orders.iter().map(|o| format!("O{o}")).collect()
    }

    /// What a store can hold when it is opened, besides its entities and relations.
    #[derive(Debug, Clone, Copy)]
    enum Before {
        /// Neither the related lists nor the earlier layout's tables (the first stores).
        Nothing,
        /// The earlier layout: a recency index and counts, no related lists.
        Legacy,
        /// Related lists gone stale under an older kontext that wrote the earlier layout's
        /// tables beside them (a downgrade, then this version again).
        StaleAndLegacy,
    }

    /// However a store's related lists were left, opening it builds them from the relations.
    #[test]
    fn related_lists_are_built_on_open_from_any_earlier_layout() {
        for before in [Before::Nothing, Before::Legacy, Before::StaleAndLegacy] {
            related_lists_are_built_on_open(before);
        }
    }

    fn related_lists_are_built_on_open(before: Before) {
        let dir = tempfile::tempdir().unwrap();
        let records = [(1, 0, 5), (2, 0, 9), (3, 0, 7), (4, 1, 1), (2, 1, 3)];
        let expected = {
            let store = open(&dir);
            for c in 0..2u8 {
                let u = upsert(
                    "customer",
                    &format!("C{c}"),
                    json!({"n": 1}),
                    "crm",
                    0,
                    c as i64,
                    0,
                );
                store.apply(&[u], &[]).unwrap();
            }
            apply_all(&store, &records, 2);
            let expected = [shown(&store, 0), shown(&store, 1)];
            let txn = store.db.begin_write().unwrap();
            match before {
                Before::Nothing => {
                    assert!(txn.delete_table(RELATED).unwrap());
                }
                Before::Legacy => {
                    assert!(txn.delete_table(RELATED).unwrap());
                    legacy_tables(&txn);
                }
                Before::StaleAndLegacy => {
                    let mut related = txn.open_table(RELATED).unwrap();
                    let keys: Vec<Vec<u8>> = related
                        .iter()
                        .unwrap()
                        .map(|item| item.unwrap().0.value().to_vec())
                        .collect();
                    assert!(!keys.is_empty());
                    let mut empty = Vec::new();
                    codec::encode_related(1, &[], &mut empty);
                    for k in keys {
                        related.insert(k.as_slice(), empty.as_slice()).unwrap();
                    }
                    drop(related);
                    legacy_tables(&txn);
                }
            }
            txn.commit().unwrap();
            expected
        };
        let store = open(&dir);
        assert_eq!([shown(&store, 0), shown(&store, 1)], expected, "{before:?}");
        // O2's move to C1 (time 3) is older than its time-9 update: it stays with C0.
        assert_eq!(expected[0], (3, vec!["O2".to_string(), "O3".to_string()]));
        let txn = store.db.begin_write().unwrap();
        assert!(!txn.delete_table(LEGACY_RECENT).unwrap(), "{before:?}");
        assert!(!txn.delete_table(LEGACY_COUNTS).unwrap(), "{before:?}");
    }

    /// The earlier layout's tables, with an entry each.
    fn legacy_tables(txn: &redb::WriteTransaction) {
        txn.open_table(LEGACY_RECENT)
            .unwrap()
            .insert(b"customer\0C0\0order\0x".as_slice(), ())
            .unwrap();
        txn.open_table(LEGACY_COUNTS)
            .unwrap()
            .insert(b"customer\0C0\0order\0".as_slice(), 3)
            .unwrap();
    }
}

mod context_cache {
    use proptest::prelude::*;

    use super::*;

    /// One change: an order or a ticket (re)assigned to a customer, a customer's name, or a
    /// deletion.
    #[derive(Debug, Clone)]
    enum Op {
        Order { order: u8, customer: u8, time: i64 },
        Ticket { ticket: u8, customer: u8, time: i64 },
        Customer { customer: u8, name: u8, time: i64 },
        DeleteOrder { order: u8 },
        DeleteTicket { ticket: u8 },
        DeleteCustomer { customer: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..6, 0u8..3, 0i64..40).prop_map(|(order, customer, time)| Op::Order { order, customer, time }),
            2 => (0u8..4, 0u8..3, 0i64..40).prop_map(|(ticket, customer, time)| Op::Ticket { ticket, customer, time }),
            2 => (0u8..3, 0u8..5, 0i64..40).prop_map(|(customer, name, time)| Op::Customer { customer, name, time }),
            1 => (0u8..6).prop_map(|order| Op::DeleteOrder { order }),
            1 => (0u8..4).prop_map(|ticket| Op::DeleteTicket { ticket }),
            1 => (0u8..3).prop_map(|customer| Op::DeleteCustomer { customer }),
        ]
    }

    /// The tests' store with a second related list: a customer's tickets.
    fn open_with_tickets(dir: &tempfile::TempDir) -> EmbeddedStore {
        let mut schema = schema();
        schema.belongs_to.insert(
            "ticket".into(),
            vec![("customer".into(), "customer_id".into())],
        );
        EmbeddedStore::open(&dir.path().join("store.redb"), schema).unwrap()
    }

    fn update(op: &Op, offset: i64) -> EntityUpdate {
        let delete = |entity_type: &str, id: String| {
            let mut u = upsert(entity_type, &id, json!({}), "src", 0, offset, 0);
            u.change = Change::Delete;
            u
        };
        match *op {
            Op::Order {
                order,
                customer,
                time,
            } => upsert(
                "order",
                &format!("O{order}"),
                json!({"customer_id": format!("C{customer}"), "n": offset}),
                "shop",
                0,
                offset,
                time,
            ),
            Op::Ticket {
                ticket,
                customer,
                time,
            } => upsert(
                "ticket",
                &format!("T{ticket}"),
                json!({"customer_id": format!("C{customer}"), "n": offset}),
                "desk",
                0,
                offset,
                time,
            ),
            Op::Customer {
                customer,
                name,
                time,
            } => upsert(
                "customer",
                &format!("C{customer}"),
                json!({"name": format!("N{name}")}),
                "crm",
                0,
                offset,
                time,
            ),
            Op::DeleteOrder { order } => delete("order", format!("O{order}")),
            Op::DeleteTicket { ticket } => delete("ticket", format!("T{ticket}")),
            Op::DeleteCustomer { customer } => delete("customer", format!("C{customer}")),
        }
    }

    /// Customer C0's order, ticket or name, written at `offset` (its event time too).
    fn c0_order(order: u8, offset: i64) -> EntityUpdate {
        let op = Op::Order {
            order,
            customer: 0,
            time: offset,
        };
        update(&op, offset)
    }

    fn c0_ticket(ticket: u8, offset: i64) -> EntityUpdate {
        let op = Op::Ticket {
            ticket,
            customer: 0,
            time: offset,
        };
        update(&op, offset)
    }

    fn c0_name(name: u8, offset: i64) -> EntityUpdate {
        let op = Op::Customer {
            customer: 0,
            name,
            time: offset,
        };
        update(&op, offset)
    }

    /// Every context, from the cached store and from one that assembles each lookup afresh.
    fn all_contexts(store: &EmbeddedStore) -> Vec<Option<ContextDocument>> {
        let ids = (0..3).map(|c| ("customer", format!("C{c}")));
        ids.chain((0..6).map(|o| ("order", format!("O{o}"))))
            .chain((0..4).map(|t| ("ticket", format!("T{t}"))))
            .map(|(t, id)| store.context(t, &id).unwrap().as_deref().cloned())
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the writes (orders moving between customers, parents changing or deleted,
        /// children deleted), a lookup through the cache equals a fresh assembly after every
        /// batch: no cached document outlives a change to anything it shows.
        #[test]
        fn cached_contexts_equal_fresh_assembly(
            ops in proptest::collection::vec(op(), 1..60),
            batch in 1usize..8,
        ) {
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let cached = open_with_tickets(&a);
            let fresh = open_with_tickets(&b).with_context_cache(0);
            let updates: Vec<EntityUpdate> =
                ops.iter().enumerate().map(|(i, op)| update(op, i as i64)).collect();
            for chunk in updates.chunks(batch) {
                // Lookups before the batch fill the cache with what the batch may change.
                prop_assert_eq!(all_contexts(&cached), all_contexts(&fresh));
                cached.apply(chunk, &[]).unwrap();
                fresh.apply(chunk, &[]).unwrap();
                prop_assert_eq!(all_contexts(&cached), all_contexts(&fresh));
            }
            prop_assert_eq!(fresh.context_cache_stats(), CacheStats::default());
        }
    }

    /// A hot entity is served from memory: the second lookup returns the same document, and
    /// a write to one of its orders replaces it.
    #[test]
    fn a_repeated_lookup_shares_the_document_until_a_child_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store
            .apply(
                &[update(
                    &Op::Customer {
                        customer: 1,
                        name: 1,
                        time: 1,
                    },
                    0,
                )],
                &[],
            )
            .unwrap();
        let first = store.context("customer", "C1").unwrap().unwrap();
        let second = store.context("customer", "C1").unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &second), "served from the cache");
        let stats = store.context_cache_stats();
        assert_eq!((stats.documents, stats.hits, stats.misses), (1, 1, 1));
        store
            .apply(
                &[update(
                    &Op::Order {
                        order: 1,
                        customer: 1,
                        time: 2,
                    },
                    1,
                )],
                &[],
            )
            .unwrap();
        let third = store.context("customer", "C1").unwrap().unwrap();
        assert!(!Arc::ptr_eq(&first, &third));
        assert_eq!(third.related["order"].total, 1);
    }

    /// A document assembled again (its customer changed) reuses the orders whose records did
    /// not change, and decodes again the one that did.
    #[test]
    fn assembling_again_reuses_unchanged_children_and_decodes_changed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let (order, name) = (c0_order, c0_name);
        store
            .apply(&[name(1, 0), order(1, 1), order(2, 2)], &[])
            .unwrap();
        let first = store.context("customer", "C0").unwrap().unwrap();
        // The customer and order O2 change; O1 does not.
        store.apply(&[name(2, 3), order(2, 4)], &[]).unwrap();
        let second = store.context("customer", "C0").unwrap().unwrap();
        let find = |doc: &ContextDocument, id: &str| {
            let items = &doc.related["order"].items;
            Arc::clone(items.iter().find(|o| o.entity_id == id).unwrap())
        };
        assert!(Arc::ptr_eq(&find(&first, "O1"), &find(&second, "O1")));
        assert!(!Arc::ptr_eq(&find(&first, "O2"), &find(&second, "O2")));
        assert_eq!(find(&second, "O2").fields["n"], json!(4));
        assert_eq!(second.fields["name"], json!("N2"));
        // The same, through an order's context: its customer is shown as the parent.
        let o1 = store.context("order", "O1").unwrap().unwrap();
        assert_eq!(o1.belongs_to["customer"].fields["name"], json!("N2"));
    }

    /// A stale document is rebuilt from what its change left alone: a new ticket keeps the
    /// customer's record, its order list and its other tickets; a new name keeps both lists.
    /// A sibling's change does not touch an order's document at all.
    #[test]
    fn a_stale_document_keeps_the_parts_its_change_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with_tickets(&dir);
        let (order, ticket, name) = (c0_order, c0_ticket, c0_name);
        let batch = [
            name(1, 0),
            order(1, 1),
            order(2, 2),
            ticket(1, 3),
            ticket(2, 4),
        ];
        store.apply(&batch, &[]).unwrap();
        let same_items = |a: &ContextDocument, b: &ContextDocument, list: &str| {
            let (a, b) = (&a.related[list].items, &b.related[list].items);
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
        };
        let fresh = |store: &EmbeddedStore| store.assemble_context("customer", "C0", None);
        let first = store.context("customer", "C0").unwrap().unwrap();
        let o1 = store.context("order", "O1").unwrap().unwrap();

        store.apply(&[ticket(2, 5)], &[]).unwrap();
        let before = store.context_cache_stats();
        let second = store.context("customer", "C0").unwrap().unwrap();
        assert_eq!(Some(second.as_ref().clone()), fresh(&store).unwrap());
        assert!(same_items(&first, &second, "order"));
        let find = |doc: &ContextDocument, id: &str| {
            let items = &doc.related["ticket"].items;
            Arc::clone(items.iter().find(|t| t.entity_id == id).unwrap())
        };
        assert!(Arc::ptr_eq(&find(&first, "T1"), &find(&second, "T1")));
        assert_eq!(find(&second, "T2").fields["n"], json!(5));
        let after = store.context_cache_stats();
        // The record, the order list and ticket T1; T2 read again.
        assert_eq!(after.parts_reused - before.parts_reused, 3);
        assert_eq!(after.entities_decoded - before.entities_decoded, 1);

        store.apply(&[name(2, 6)], &[]).unwrap();
        let third = store.context("customer", "C0").unwrap().unwrap();
        assert_eq!(Some(third.as_ref().clone()), fresh(&store).unwrap());
        assert_eq!(third.fields["name"], json!("N2"));
        assert!(same_items(&second, &third, "order") && same_items(&second, &third, "ticket"));

        // O1 shows the customer, whose record changed: read again. O2's change since then
        // leaves O1's document as it is.
        let o1_again = store.context("order", "O1").unwrap().unwrap();
        assert_eq!(o1_again.belongs_to["customer"].fields["name"], json!("N2"));
        assert!(!Arc::ptr_eq(&o1, &o1_again));
        store.apply(&[order(2, 7)], &[]).unwrap();
        let o1_last = store.context("order", "O1").unwrap().unwrap();
        assert!(Arc::ptr_eq(&o1_again, &o1_last), "served from the cache");
    }

    /// Lookups racing the writer never leave a stale document behind: once the writes are
    /// done, every lookup equals a fresh assembly.
    #[test]
    fn lookups_racing_writes_leave_nothing_stale() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(&dir));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (store, done) = (Arc::clone(&store), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut lookups = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    for (t, id) in [("customer", "C1"), ("order", "O1"), ("order", "O2")] {
                        store.context(t, id).unwrap();
                        lookups += 1;
                    }
                }
                lookups
            })
        };
        for i in 0..300i64 {
            let op = match i % 3 {
                0 => Op::Customer {
                    customer: 1,
                    name: (i % 5) as u8,
                    time: i,
                },
                1 => Op::Order {
                    order: 1,
                    customer: (i % 2) as u8,
                    time: i,
                },
                _ => Op::Order {
                    order: 2,
                    customer: 1,
                    time: i,
                },
            };
            store.apply(&[update(&op, i)], &[]).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        for (t, id) in [("customer", "C1"), ("order", "O1"), ("order", "O2")] {
            let served = store.context(t, id).unwrap().as_deref().cloned();
            assert_eq!(
                served,
                store.assemble_context(t, id, None).unwrap(),
                "{t} {id}"
            );
        }
    }

    /// While a writer moves orders between customers, every document a reader gets is of one
    /// committed state: each order a customer lists names that customer, and the customer's
    /// record, written in the same batch as each move, counts the orders its list totals. (A
    /// document mixing parts of two states, which reusing decoded entities or a stale
    /// document's parts without reading them must never produce, breaks one or the other.)
    #[test]
    fn documents_read_during_moves_are_each_of_one_state() {
        let dir = tempfile::tempdir().unwrap();
        // Unsynced commits: many more of them race the readers per second.
        let store = Arc::new(open(&dir).with_sync_interval(std::time::Duration::from_secs(60)));
        let count = |customer: u8, n: usize, offset: i64| {
            let id = format!("C{customer}");
            upsert(
                "customer",
                &id,
                json!({ "orders": n }),
                "crm",
                0,
                offset,
                offset,
            )
        };
        let customers: Vec<EntityUpdate> = (0..3).map(|c| count(c, 0, i64::from(c))).collect();
        store.apply(&customers, &[]).unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (store, done) = (Arc::clone(&store), Arc::clone(&done));
                std::thread::spawn(move || {
                    let mut checked = 0u64;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        for c in 0..3 {
                            let id = format!("C{c}");
                            let Some(doc) = store.context("customer", &id).unwrap() else {
                                continue;
                            };
                            let orders = doc.related.get("order");
                            let total = orders.map_or(0, |l| l.total);
                            assert_eq!(doc.fields["orders"], json!(total), "{doc:?}");
                            for order in orders.map_or(&[][..], |l| &l.items) {
                                assert_eq!(order.fields["customer_id"], json!(id), "{doc:?}");
                                checked += 1;
                            }
                        }
                    }
                    checked
                })
            })
            .collect();
        let mut owner: [Option<u8>; 6] = [None; 6];
        let mut seed = 7u64;
        for i in 1..3_000i64 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let (order, customer) = (((seed >> 33) % 6) as u8, ((seed >> 40) % 3) as u8);
            let before = owner[usize::from(order)].replace(customer);
            let held = |c: u8| owner.iter().filter(|o| **o == Some(c)).count();
            let op = Op::Order {
                order,
                customer,
                time: 10 * i,
            };
            let mut batch = vec![update(&op, 10 * i), count(customer, held(customer), 10 * i)];
            if let Some(from) = before.filter(|from| *from != customer) {
                batch.push(count(from, held(from), 10 * i + 1));
            }
            store.apply(&batch, &[]).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().unwrap() > 0);
        }
    }
}

/// Keys join type, id and parent id with NUL separators, so an id or a parent id holding a
/// NUL character would be read back as another key (PostgreSQL text cannot hold one either).
/// The batch is refused as a permanent error, nothing of it is written, and the sink
/// dead-letters the one record (its bisection finds it).
#[test]
fn a_nul_character_in_an_id_or_a_parent_id_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let fine = upsert(
        "customer",
        "C1",
        json!({"given_name": "Ana"}),
        "crm",
        0,
        0,
        1,
    );
    let nul_id = upsert(
        "customer",
        "C\0order",
        json!({"given_name": "Bo"}),
        "crm",
        0,
        1,
        2,
    );
    let nul_parent = upsert(
        "order",
        "O1",
        json!({"customer_id": "C1\0order\0O9", "total": 1}),
        "shop",
        0,
        0,
        3,
    );
    for bad in [nul_id, nul_parent] {
        match store.apply(&[fine.clone(), bad.clone()], &[]) {
            Err(StoreError::Corrupt(reason)) => assert!(reason.contains("NUL"), "{reason}"),
            other => panic!("{:?}: {other:?}", bad.entity_id),
        }
        assert!(store.dump().unwrap().is_empty());
        assert!(store.applied_offsets().unwrap().is_empty());
    }
    // The same batch without the bad record goes through.
    assert_eq!(store.apply(&[fine], &[]).unwrap().applied, 1);
}

/// The store records its format; a store a newer kontext wrote is refused before anything in
/// it changes, and a store of the layout before the record gets it.
#[test]
fn a_store_of_a_newer_format_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = open(&dir);
    store
        .apply(
            &[upsert(
                "customer",
                "C1",
                json!({"name": "Ana"}),
                "crm",
                0,
                0,
                1,
            )],
            &[],
        )
        .unwrap();
    drop(store);
    let set_format = |format: Option<u64>| {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        match format {
            Some(format) => {
                txn.open_table(META)
                    .unwrap()
                    .insert("format", format)
                    .unwrap();
            }
            None => {
                txn.delete_table(META).unwrap();
            }
        }
        txn.commit().unwrap();
    };
    let format = || {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        meta.get("format").unwrap().map(|v| v.value())
    };
    assert_eq!(format(), Some(crate::STORE_FORMAT));
    set_format(Some(crate::STORE_FORMAT + 1));
    let err = EmbeddedStore::open(&path, schema()).err().expect("refused");
    assert!(matches!(err, StoreError::Incompatible(_)), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("newer kontext"), "{err}");
    assert!(err.to_string().contains("store.redb"), "{err}");
    assert_eq!(format(), Some(crate::STORE_FORMAT + 1), "left as it is");
    set_format(None);
    let store = open(&dir);
    assert!(store.get("customer", "C1").unwrap().is_some());
    drop(store);
    assert_eq!(format(), Some(crate::STORE_FORMAT));
    // A record of a type this build does not know: refused the same way, not an I/O error.
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(META).unwrap();
        let other: TableDefinition<&str, &str> = TableDefinition::new("meta");
        txn.open_table(other)
            .unwrap()
            .insert("format", "two")
            .unwrap();
        txn.commit().unwrap();
    }
    let err = EmbeddedStore::open(&path, schema()).err().expect("refused");
    assert!(matches!(err, StoreError::Incompatible(_)), "{err}");
    assert!(err.to_string().contains("cannot read"), "{err}");
}
