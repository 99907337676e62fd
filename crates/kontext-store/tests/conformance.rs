//! Both context stores against one contract: the same records, delivered in the same or in
//! different orders and batchings, give identical stores (`dump`, offsets, `get`, `list` and
//! every entity's `context`).
//!
//! The PostgreSQL side needs the server of `scripts/postgres.sh start` (or
//! `KONTEXT_TEST_POSTGRES`); the tests fail, not skip, when it is unreachable. Each store gets
//! its own PostgreSQL schema, so tests run in parallel and repeatedly.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use kontext_store::{
    Change, ContextDocument, ContextStore, EmbeddedStore, EntityDoc, EntityUpdate, PostgresStore,
    Provenance, StoreSchema,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

const DEFAULT_URL: &str = "postgres://kontext@127.0.0.1:55432/kontext";
const CUSTOMERS: &[&str] = &["C1", "c1", "C2", "42", "é1"];
const ORDERS: &[&str] = &["O1", "o1", "O2", "O3", "O4", "O5", "O6", "O7"];

fn schema() -> StoreSchema {
    let mut s = StoreSchema::default();
    s.belongs_to.insert(
        "order".into(),
        vec![("customer".into(), "customer_id".into())],
    );
    s.belongs_to.insert("customer".into(), vec![]);
    s.related_limit.insert("order".into(), 3);
    s
}

fn postgres_url() -> String {
    std::env::var("KONTEXT_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.to_string())
}

/// A PostgreSQL store in a fresh schema of its own, and that schema's name (dropped by
/// [`drop_schema`] when the test passes; a failing test leaves it to look at).
async fn postgres_store() -> (PostgresStore, String) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let ns = format!(
        "kt_conf_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        nanos
    );
    let url = postgres_url();
    match PostgresStore::connect_in_namespace(&url, &ns, schema()).await {
        Ok(store) => (store, ns),
        Err(e) => panic!(
            "PostgreSQL at {url} is unreachable ({e}): start it with `scripts/postgres.sh start` \
             or point KONTEXT_TEST_POSTGRES at a server"
        ),
    }
}

async fn drop_schema(ns: &str) {
    kontext_store::postgres::drop_namespace(&postgres_url(), ns)
        .await
        .unwrap();
}

fn embedded_store(dir: &tempfile::TempDir, name: &str) -> EmbeddedStore {
    EmbeddedStore::open(&dir.path().join(name), schema()).unwrap()
}

/// One log record: an update, or a record the pipeline filtered out (it still advances the
/// partition's offset).
#[derive(Clone)]
struct Record {
    topic: String,
    partition: i32,
    offset: i64,
    update: Option<EntityUpdate>,
}

type Log = BTreeMap<(String, i32), Vec<Record>>;
type Batch = (Vec<EntityUpdate>, Vec<(String, i32, i64)>);

/// A random log. `keyed`: every entity lives in one partition of one topic, as Kafka's
/// key partitioning places it, so its records keep their order in any delivery. Otherwise
/// an entity's records spread over topics and partitions (and field versions break ties on
/// topic names that sort differently bytewise and in a linguistic collation).
fn random_log(seed: u64, records: usize, keyed: bool) -> Log {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = Log::new();
    for n in 0..records {
        let is_order = rng.random_bool(0.5);
        let (entity_type, ids) = if is_order {
            ("order", ORDERS)
        } else {
            ("customer", CUSTOMERS)
        };
        let id_index = rng.random_range(0..ids.len());
        let id = ids[id_index];
        let (topic, partition) = if keyed {
            let topic = if is_order {
                "Context.orders"
            } else {
                "context.customers"
            };
            (topic.to_string(), (id_index % 3) as i32)
        } else {
            let topic = ["context.customers", "Context.customers", "context.orders"]
                [rng.random_range(0..3)];
            (topic.to_string(), rng.random_range(0..3))
        };
        let records = log.entry((topic.clone(), partition)).or_default();
        let offset = records.len() as i64;
        let update = if rng.random_bool(0.05) {
            None
        } else {
            let change = if rng.random_bool(0.08) {
                Change::Delete
            } else {
                Change::Upsert(random_fields(&mut rng, is_order).into())
            };
            Some(EntityUpdate {
                entity_type: entity_type.into(),
                entity_id: id.into(),
                change,
                provenance: Provenance {
                    source: ["crm", "billing"][rng.random_range(0..2)].into(),
                    event_id: format!("e{n}"),
                    event_type: rng.random_bool(0.5).then(|| "changed".to_string()),
                    topic: topic.clone(),
                    partition,
                    offset,
                    // A narrow range: many ties on event time, broken by log coordinates.
                    event_time_ms: 1_000 + rng.random_range(0..40),
                },
            })
        };
        records.push(Record {
            topic,
            partition,
            offset,
            update,
        });
    }
    log
}

fn random_fields(rng: &mut StdRng, is_order: bool) -> Map<String, Value> {
    let names: &[&str] = if is_order {
        &["status", "total", "customer_id", "customer_id"]
    } else {
        &["name", "tier", "score", "tags", "note"]
    };
    let mut fields = Map::new();
    // Sometimes none: an upsert that only counts as an applied event.
    for _ in 0..rng.random_range(0..4) {
        let name = names[rng.random_range(0..names.len())];
        let value = if name == "customer_id" {
            [
                json!("C1"),
                json!("c1"),
                json!("C2"),
                json!("42"),
                json!(42),
                json!("é1"),
                json!(""),
                json!(null),
                json!("C9"),
            ][rng.random_range(0..9)]
            .clone()
        } else {
            random_value(rng)
        };
        fields.insert(name.to_string(), value);
    }
    fields
}

fn random_value(rng: &mut StdRng) -> Value {
    [
        json!("Ana"),
        json!("ana"),
        json!("Ünal"),
        json!("nul\u{0}inside"),
        json!(""),
        json!(7),
        json!(-3),
        json!(u64::MAX),
        json!(1.5),
        json!(1e-7),
        json!(1e300),
        json!(true),
        json!(null),
        json!({"z": 1, "a": [1, {"b": "c"}], "m": {"k": null}}),
        json!(["x", 2, 3.25]),
    ][rng.random_range(0..15)]
    .clone()
}

/// Delivers a log as a consumer would: partitions interleaved at random, random batch
/// sizes, and now and then a partition rewound (a rebalance re-delivering records). Each
/// batch carries the next offset of every partition it covered.
fn deliver(log: &Log, seed: u64) -> Vec<Batch> {
    let mut rng = StdRng::seed_from_u64(seed);
    let keys: Vec<&(String, i32)> = log.keys().collect();
    let mut cursor: Vec<usize> = vec![0; keys.len()];
    let mut batches = Vec::new();
    loop {
        let open: Vec<usize> = (0..keys.len())
            .filter(|&k| cursor[k] < log[keys[k]].len())
            .collect();
        if open.is_empty() {
            break;
        }
        if rng.random_bool(0.1) {
            let k = rng.random_range(0..keys.len());
            cursor[k] = cursor[k].saturating_sub(rng.random_range(1..20));
        }
        let mut updates = Vec::new();
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for _ in 0..rng.random_range(1..6) {
            let open: Vec<usize> = (0..keys.len())
                .filter(|&k| cursor[k] < log[keys[k]].len())
                .collect();
            if open.is_empty() {
                break;
            }
            let k = open[rng.random_range(0..open.len())];
            let records = &log[keys[k]];
            let take = rng.random_range(1..12).min(records.len() - cursor[k]);
            for r in &records[cursor[k]..cursor[k] + take] {
                updates.extend(r.update.clone());
                next.insert((r.topic.clone(), r.partition), r.offset + 1);
            }
            cursor[k] += take;
        }
        let offsets = next.into_iter().map(|((t, p), n)| (t, p, n)).collect();
        batches.push((updates, offsets));
    }
    batches
}

/// Everything a reader can observe of a store.
#[derive(Debug, PartialEq)]
struct Snapshot {
    dump: Vec<EntityDoc>,
    offsets: BTreeMap<(String, i32), i64>,
    contexts: BTreeMap<(String, String), Option<std::sync::Arc<ContextDocument>>>,
    gets: BTreeMap<(String, String), Option<EntityDoc>>,
    lists: BTreeMap<String, Vec<Vec<String>>>,
}

async fn snapshot(store: &dyn ContextStore) -> Snapshot {
    let mut contexts = BTreeMap::new();
    let mut gets = BTreeMap::new();
    let mut lists = BTreeMap::new();
    for (entity_type, ids) in [("customer", CUSTOMERS), ("order", ORDERS)] {
        for id in ids.iter().chain(&["C9", "missing"]) {
            let key = (entity_type.to_string(), id.to_string());
            contexts.insert(key.clone(), store.context(entity_type, id).await.unwrap());
            gets.insert(key, store.get(entity_type, id).await.unwrap());
        }
        // Paged by two: `after` and `limit` behave alike.
        let mut pages = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.list(entity_type, 2, after.as_deref()).await.unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().cloned();
            pages.push(page);
        }
        lists.insert(entity_type.to_string(), pages);
    }
    Snapshot {
        dump: store.dump().await.unwrap(),
        offsets: store.applied_offsets().await.unwrap(),
        contexts,
        gets,
        lists,
    }
}

async fn apply_all(store: &dyn ContextStore, batches: &[Batch]) -> Vec<kontext_store::ApplyStats> {
    let mut stats = Vec::new();
    for (updates, offsets) in batches {
        stats.push(store.apply(updates, offsets).await.unwrap());
    }
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_and_postgres_agree_on_random_update_sequences() {
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..4u64 {
        let log = random_log(seed, 400, false);
        let batches = deliver(&log, seed + 100);
        let embedded = embedded_store(&dir, &format!("seed{seed}.redb"));
        let (postgres, ns) = postgres_store().await;
        for (n, (updates, offsets)) in batches.iter().enumerate() {
            let a = ContextStore::apply(&embedded, updates, offsets)
                .await
                .unwrap();
            let b = postgres.apply(updates, offsets).await.unwrap();
            assert_eq!(a, b, "seed {seed}, batch {n}: apply stats differ");
        }
        let (a, b) = (snapshot(&embedded).await, snapshot(&postgres).await);
        assert!(
            !a.dump.is_empty(),
            "seed {seed}: the store should hold something"
        );
        assert_eq!(a, b, "seed {seed}: embedded and postgres differ");
        drop_schema(&ns).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_same_records_twice_changes_nothing_and_skips_all() {
    let dir = tempfile::tempdir().unwrap();
    let embedded = embedded_store(&dir, "store.redb");
    let (postgres, ns) = postgres_store().await;
    let stores: [&dyn ContextStore; 2] = [&embedded, &postgres];
    let log = random_log(7, 300, false);
    let batches = deliver(&log, 8);
    for store in stores {
        apply_all(store, &batches).await;
        let first = snapshot(store).await;
        let replay = apply_all(store, &batches).await;
        for ((updates, _), stats) in batches.iter().zip(&replay) {
            assert_eq!(
                stats.applied,
                0,
                "{}: a replayed record was applied",
                store.kind()
            );
            assert_eq!(stats.skipped, updates.len() as u64, "{}", store.kind());
            assert_eq!(stats.deleted, 0, "{}", store.kind());
        }
        assert_eq!(
            first,
            snapshot(store).await,
            "{}: replay changed the store",
            store.kind()
        );
    }
    drop_schema(&ns).await;
}

/// Delivers `log` in three more ways (seeds `seed * 10 + 1..=3`) to an embedded and a
/// PostgreSQL store each, and requires every store to equal one fed a reference delivery.
async fn assert_deliveries_converge(log: &Log, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let reference = embedded_store(&dir, "reference.redb");
    apply_all(&reference, &deliver(log, 0)).await;
    let expected = snapshot(&reference).await;
    assert!(expected.dump.len() > 5);
    for delivery in 1..4u64 {
        let batches = deliver(log, seed * 10 + delivery);
        let embedded = embedded_store(&dir, &format!("d{delivery}.redb"));
        let (postgres, ns) = postgres_store().await;
        apply_all(&embedded, &batches).await;
        apply_all(&postgres, &batches).await;
        assert_eq!(
            expected,
            snapshot(&embedded).await,
            "embedded, seed {seed}, delivery {delivery}"
        );
        assert_eq!(
            expected,
            snapshot(&postgres).await,
            "postgres, seed {seed}, delivery {delivery}"
        );
        drop_schema(&ns).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_interleavings_and_batchings_converge() {
    assert_deliveries_converge(&random_log(11, 500, true), 0).await;
}

/// The same, with every entity's records spread over topics and partitions, so that its
/// upserts and tombstones arrive in a different order in every delivery: a tombstone removes
/// what is older than it, whenever either arrives, and an upsert older than a tombstone
/// applied before it stays out (an entity is deleted by a CRM at 10:00; an update of 09:59
/// from another source arrives later and must not bring it back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_converge_whatever_order_they_arrive_in() {
    for seed in [21u64, 22] {
        assert_deliveries_converge(&random_log(seed, 500, false), seed).await;
    }
}

/// An upsert of a `t`/0 record at `offset`, event time 1000.
fn upsert_at(entity_type: &str, id: &str, fields: Value, offset: i64) -> EntityUpdate {
    EntityUpdate {
        entity_type: entity_type.into(),
        entity_id: id.into(),
        change: Change::Upsert(Map::from_iter(fields.as_object().unwrap().clone()).into()),
        provenance: Provenance {
            source: "crm".into(),
            event_id: format!("e{offset}"),
            event_type: None,
            topic: "t".into(),
            partition: 0,
            offset,
            event_time_ms: 1_000,
        },
    }
}

/// A relation field holding a number names its parent by the number as text, from both sides:
/// the order is in customer `10042`'s related list, and the customer is the order's
/// `belongs_to` (it was the first only: the assembly read strings alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_numeric_relation_field_names_its_parent_from_both_sides() {
    let updates = vec![
        upsert_at("customer", "10042", json!({"name": "Ana"}), 0),
        upsert_at("order", "O1", json!({"customer_id": 10042, "total": 5}), 1),
    ];
    let dir = tempfile::tempdir().unwrap();
    let embedded = embedded_store(&dir, "numeric.redb");
    let (postgres, ns) = postgres_store().await;
    let stores: [(&str, &dyn ContextStore); 2] = [("embedded", &embedded), ("postgres", &postgres)];
    for (name, store) in stores {
        store.apply(&updates, &[("t".into(), 0, 2)]).await.unwrap();
        let order = store.context("order", "O1").await.unwrap().unwrap();
        let parent = order.belongs_to.get("customer");
        assert_eq!(
            parent.map(|p| p.entity_id.as_str()),
            Some("10042"),
            "{name}: {:?}",
            order.belongs_to
        );
        let customer = store.context("customer", "10042").await.unwrap().unwrap();
        let orders = &customer.related["order"];
        assert_eq!(orders.total, 1, "{name}");
        assert_eq!(orders.items[0].entity_id, "O1", "{name}");
    }
    drop_schema(&ns).await;
}

/// An upsert of order `id` at `offset`, its event time growing with the offset.
fn order_at(id: &str, fields: Value, offset: i64) -> EntityUpdate {
    let mut u = upsert_at("order", id, fields, offset);
    u.provenance.event_time_ms = 1_000 + offset;
    u
}

/// [`schema`] without the order's `belongs_to`.
fn without_order_relations() -> StoreSchema {
    let mut s = schema();
    s.belongs_to.insert("order".into(), vec![]);
    s
}

/// Applies each phase's updates to both stores, reopened with the phase's schema (one
/// embedded file and one PostgreSQL schema throughout), and returns per phase and store
/// customer `C1`'s order list as `(total, ids)`, `None` when its schema has no such list.
async fn c1_orders_by_phase(
    phases: Vec<(StoreSchema, Vec<EntityUpdate>)>,
) -> Vec<Vec<(&'static str, Option<(usize, Vec<String>)>)>> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phases.redb");
    let (postgres, ns) = postgres_store().await;
    drop(postgres);
    let url = postgres_url();
    let mut out = Vec::new();
    for (schema, updates) in phases {
        let next = updates.iter().map(|u| u.provenance.offset).max().unwrap() + 1;
        let embedded = EmbeddedStore::open(&path, schema.clone()).unwrap();
        let postgres = PostgresStore::connect_in_namespace(&url, &ns, schema)
            .await
            .unwrap();
        let stores: [(&'static str, &dyn ContextStore); 2] =
            [("embedded", &embedded), ("postgres", &postgres)];
        let mut phase = Vec::new();
        for (name, store) in stores {
            store
                .apply(&updates, &[("t".into(), 0, next)])
                .await
                .unwrap();
            let customer = store.context("customer", "C1").await.unwrap().unwrap();
            let orders = customer.related.get("order").map(|orders| {
                let ids = orders.items.iter().map(|i| i.entity_id.clone()).collect();
                (orders.total, ids)
            });
            phase.push((name, orders));
        }
        out.push(phase);
    }
    drop_schema(&ns).await;
    out
}

/// A `belongs_to` added to a type that already has data: children stored before have no
/// relation yet. An update that writes the relation field links its child (also with the
/// parent it already named); one that does not leaves it unlinked. Both stores list the same
/// children with the same total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_belongs_to_added_to_existing_data_links_children_alike() {
    let before = vec![
        upsert_at("customer", "C1", json!({"name": "Ana"}), 0),
        order_at("O1", json!({"customer_id": "C1"}), 1),
        order_at("O2", json!({"customer_id": "C1"}), 2),
    ];
    let after = vec![
        // A new child: linked.
        order_at("O3", json!({"customer_id": "C1"}), 3),
        // The relation field written again, same parent: linked now, and the newest.
        order_at("O2", json!({"customer_id": "C1", "status": "x"}), 4),
        // Another field only: still unlinked.
        order_at("O1", json!({"status": "y"}), 5),
    ];
    let phases =
        c1_orders_by_phase(vec![(without_order_relations(), before), (schema(), after)]).await;
    for (name, orders) in &phases[1] {
        let want = (2, vec!["O2".to_string(), "O3".to_string()]);
        assert_eq!(orders.as_ref(), Some(&want), "{name}");
    }
}

/// A relation removed from the schema and added again: children written meanwhile have no
/// relation key, and a later update that does not write the relation field leaves them out
/// of the list in both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_belongs_to_removed_and_added_again_leaves_the_meanwhile_children_unlinked() {
    let phases = c1_orders_by_phase(vec![
        (
            schema(),
            vec![
                upsert_at("customer", "C1", json!({"name": "Ana"}), 0),
                order_at("O1", json!({"customer_id": "C1"}), 1),
            ],
        ),
        (
            without_order_relations(),
            vec![order_at("O2", json!({"customer_id": "C1"}), 2)],
        ),
        (schema(), vec![order_at("O2", json!({"status": "x"}), 3)]),
    ])
    .await;
    let want = Some((1, vec!["O1".to_string()]));
    for (i, phase) in phases.iter().enumerate() {
        for (name, orders) in phase {
            let want = if i == 1 { None } else { want.clone() };
            assert_eq!(*orders, want, "{name}, phase {i}");
        }
    }
}
