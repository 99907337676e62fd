//! PostgreSQL-specific behaviour: atomicity when the writer dies mid-batch, the skip rule of
//! the batch planner, the collation independence of versions, error classes. The cross-store
//! contract is in `tests/conformance.rs`. Needs `scripts/postgres.sh start` (or
//! `KONTEXT_TEST_POSTGRES`); fails, not skips, without it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::json;

use super::plan;
use super::store::is_transient_state;
use crate::{Change, ContextStore, EmbeddedStore, EntityUpdate, PostgresStore, Provenance};
use crate::{StoreError, StoreSchema};

const DEFAULT_URL: &str = "postgres://kontext@127.0.0.1:55432/kontext";

pub(super) fn url() -> String {
    std::env::var("KONTEXT_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.to_string())
}

fn schema() -> StoreSchema {
    let mut s = StoreSchema::default();
    s.belongs_to.insert(
        "order".into(),
        vec![("customer".into(), "customer_id".into())],
    );
    s.related_limit.insert("order".into(), 2);
    s
}

pub(super) fn namespace() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "kt_unit_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

async fn store_in(ns: &str) -> PostgresStore {
    let url = url();
    match PostgresStore::connect_in_namespace(&url, ns, schema()).await {
        Ok(s) => s,
        Err(e) => panic!(
            "PostgreSQL at {url} is unreachable ({e}): start it with `scripts/postgres.sh start` \
             or point KONTEXT_TEST_POSTGRES at a server"
        ),
    }
}

async fn raw_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL unreachable: run scripts/postgres.sh start");
    tokio::spawn(conn);
    client
}

pub(super) fn update(
    entity_type: &str,
    id: &str,
    fields: serde_json::Value,
    topic: &str,
    partition: i32,
    offset: i64,
    time: i64,
) -> EntityUpdate {
    EntityUpdate {
        entity_type: entity_type.into(),
        entity_id: id.into(),
        change: match fields {
            serde_json::Value::Null => Change::Delete,
            f => Change::Upsert(f.as_object().cloned().unwrap_or_default().into()),
        },
        provenance: Provenance {
            source: "crm".into(),
            event_id: format!("{topic}-{partition}-{offset}"),
            event_type: None,
            topic: topic.into(),
            partition,
            offset,
            event_time_ms: time,
        },
    }
}

/// A batch of `n` orders spread over a few customers, at offsets `from..from + n`.
fn orders(from: i64, n: i64) -> Vec<EntityUpdate> {
    (from..from + n)
        .map(|o| {
            update(
                "order",
                &format!("O{}", o % 50),
                json!({"status": format!("s{o}"), "customer_id": format!("C{}", o % 7)}),
                "orders",
                0,
                o,
                1_000 + o,
            )
        })
        .collect()
}

/// A connection is driven by a task on the runtime that opened it. Lookups, and the applied
/// offsets `GET /v1/lag` reads, asked for theirs on the API's runtime (`serve.threads`); with
/// that runtime's only worker blocked, the sink's writes must still go through. With one pool
/// for both they waited for the blocked runtime, and so did writes on a write connection the
/// lag lookup had opened there.
#[test]
fn writes_go_on_while_the_runtime_that_opened_the_lookups_connections_is_blocked() {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let (pipeline, serving) = (runtime(), runtime());
    let store = std::sync::Arc::new(pipeline.block_on(store_in(&namespace())));
    // Concurrent lookups and offset reads, all asked for on the serving runtime.
    serving.block_on(async {
        let lookups: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.context("customer", &format!("C{i}")).await })
            })
            .collect();
        let offsets: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.applied_offsets().await })
            })
            .collect();
        for lookup in lookups {
            assert!(lookup.await.unwrap().unwrap().is_none());
        }
        for read in offsets {
            assert!(read.await.unwrap().unwrap().is_empty());
        }
    });
    let (release, blocked) = std::sync::mpsc::channel::<()>();
    let (started, running) = std::sync::mpsc::channel::<()>();
    serving.spawn(async move {
        started.send(()).unwrap();
        let _ = blocked.recv();
    });
    running.recv().unwrap();
    // Eight batches in a row: with a shared pool they would take the lookups' connections.
    let written = pipeline.block_on(async {
        for batch in 0..8 {
            let offsets = [("orders".to_string(), 0, (batch + 1) * 10)];
            let updates = orders(batch * 10, 10);
            let write = store.apply(&updates, &offsets);
            tokio::time::timeout(Duration::from_secs(30), write)
                .await
                .expect("a write waited 30 s for the blocked serving runtime")
                .unwrap();
        }
        store.applied_offsets().await.unwrap()
    });
    assert_eq!(written.get(&("orders".to_string(), 0)), Some(&80));
    release.send(()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_killed_mid_batch_leaves_nothing_and_a_retry_converges() {
    let ns = namespace();
    let store = store_in(&ns).await;
    let first = orders(0, 100);
    store.apply(&first, &[]).await.unwrap();
    let before = (
        store.dump().await.unwrap(),
        store.applied_offsets().await.unwrap(),
    );

    // The writer connects first: creating its tables would wait for the lock below too.
    let writer = store_in(&ns).await;
    // Another session holds the relation table: the batch's transaction gets through the
    // offsets, tombstones, entities and fields, then waits at the relations. We terminate its
    // backend there, i.e. the writer dies with half of the batch written (uncommitted).
    let mut locker = raw_client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute(&format!(
        "LOCK TABLE {ns}.kontext_relations IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .unwrap();
    let second = orders(100, 200);
    let apply = {
        let second = second.clone();
        tokio::spawn(async move { writer.apply(&second, &[("orders".into(), 0, 300)]).await })
    };
    let killer = raw_client().await;
    let mut waited = 0;
    let killed = loop {
        let rows = killer
            .query(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l
                 WHERE l.relation = $1::text::regclass AND NOT l.granted",
                &[&format!("{ns}.kontext_relations")],
            )
            .await
            .unwrap();
        if !rows.is_empty() {
            break true;
        }
        waited += 1;
        if waited > 200 {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(killed, "the writer never reached the relation table");
    let err = apply.await.unwrap().unwrap_err();
    assert!(err.is_transient(), "a dead connection is transient: {err}");
    lock.commit().await.unwrap();

    let after = (
        store.dump().await.unwrap(),
        store.applied_offsets().await.unwrap(),
    );
    assert_eq!(before, after, "the killed batch left something behind");

    // The sink's retry: the whole batch again, nothing of it skipped.
    let stats = store
        .apply(&second, &[("orders".into(), 0, 300)])
        .await
        .unwrap();
    assert_eq!((stats.applied, stats.skipped), (200, 0));
    let dir = tempfile::tempdir().unwrap();
    let reference = EmbeddedStore::open(&dir.path().join("s.redb"), schema()).unwrap();
    ContextStore::apply(&reference, &first, &[]).await.unwrap();
    ContextStore::apply(&reference, &second, &[("orders".into(), 0, 300)])
        .await
        .unwrap();
    assert_same(&reference, &store, "order", "O", 0..50).await;
    drop_namespace(&ns).await;
}

/// Batches of this many orders; the SIGKILLed writer applies them in a loop.
const KILL_BATCH: i64 = 400;
/// More batches than the writer can finish between its second commit and the kill (at most
/// 150 ms later), so the kill always lands inside the run. With 12, a fast moment let the
/// writer finish every batch first and the test failed now and then.
const KILL_BATCHES: i64 = 1_000;

fn kill_batch(n: i64) -> (Vec<EntityUpdate>, Vec<(String, i32, i64)>) {
    let from = n * KILL_BATCH;
    (
        orders(from, KILL_BATCH),
        vec![("orders".to_string(), 0, from + KILL_BATCH)],
    )
}

/// Run by `a_sigkilled_writer_...` in a child process: applies the batches in order and says
/// which it committed, until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper: run in a child process by a_sigkilled_writer_leaves_whole_batches_only"]
async fn sigkill_child_writer() {
    let Ok(ns) = std::env::var("KONTEXT_TEST_KILL_NAMESPACE") else {
        return;
    };
    let store = store_in(&ns).await;
    for n in 0..KILL_BATCHES {
        let (updates, offsets) = kill_batch(n);
        store.apply(&updates, &offsets).await.unwrap();
        println!("committed {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_writer_leaves_whole_batches_only_and_a_rerun_converges() {
    use std::io::{BufRead, BufReader};
    let ns = namespace();
    let store = store_in(&ns).await;
    // Named, so that we can wait for the server to be done with its connections.
    let app = format!("{ns}_child");
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let child_url = format!("{base}{sep}application_name={app}");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "postgres::tests::sigkill_child_writer",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KONTEXT_TEST_KILL_NAMESPACE", &ns)
        .env("KONTEXT_TEST_POSTGRES", &child_url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for two commits, then kill it somewhere inside a later batch (SIGKILL: no
    // destructor, no rollback sent; the server notices the dead connection).
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut commits = 0;
    while commits < 2 {
        let line = lines
            .next()
            .expect("the child writer exited early")
            .unwrap();
        if line.starts_with("committed ") {
            commits += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(u64::from(std::process::id() % 150)));
    child.kill().unwrap();
    child.wait().unwrap();
    // A COMMIT the child sent just before dying is still executed: wait until the server has
    // ended the child's sessions, so that what we read next is final.
    let observer = raw_client().await;
    for _ in 0..400 {
        let row = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // Whole batches only: the offset is a batch boundary and the data is exactly that of the
    // first k batches.
    let next = store.applied_offsets().await.unwrap()[&("orders".to_string(), 0)];
    assert_eq!(
        next % KILL_BATCH,
        0,
        "a partial batch is visible: next offset {next}"
    );
    let k = next / KILL_BATCH;
    assert!((2..KILL_BATCHES).contains(&k), "killed after {k} batches");
    let dir = tempfile::tempdir().unwrap();
    let reference = EmbeddedStore::open(&dir.path().join("s.redb"), schema()).unwrap();
    for n in 0..k {
        let (updates, offsets) = kill_batch(n);
        ContextStore::apply(&reference, &updates, &offsets)
            .await
            .unwrap();
    }
    assert_eq!(reference.dump().unwrap(), store.dump().await.unwrap());

    // The restarted sink re-delivers from the group's (older) offsets: the committed batches
    // are skipped, the rest applied once; the result equals the reference.
    // Re-deliver the committed batches, the one in flight at the kill, and one more.
    for n in 0..k + 2 {
        let (updates, offsets) = kill_batch(n);
        let stats = store.apply(&updates, &offsets).await.unwrap();
        let expect_applied = if n < k { 0 } else { KILL_BATCH as u64 };
        assert_eq!(stats.applied, expect_applied, "batch {n}");
        if n >= k {
            ContextStore::apply(&reference, &updates, &offsets)
                .await
                .unwrap();
        }
    }
    assert_eq!(reference.dump().unwrap(), store.dump().await.unwrap());
    assert_eq!(
        reference.applied_offsets().unwrap(),
        store.applied_offsets().await.unwrap()
    );
    drop_namespace(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_compare_topics_bytewise_whatever_the_database_collation() {
    let ns = namespace();
    let store = store_in(&ns).await;
    // Same event time: the topic decides. Bytewise "a" (0x61) > "B" (0x42); a linguistic
    // collation (the test database is ICU en-US) would say the opposite.
    let from_a = update("customer", "C1", json!({"tier": "from-a"}), "a", 0, 0, 5);
    let from_b = update("customer", "C1", json!({"tier": "from-b"}), "B", 0, 0, 5);
    store.apply(&[from_a], &[]).await.unwrap();
    store.apply(&[from_b], &[]).await.unwrap();
    let doc = store.get("customer", "C1").await.unwrap().unwrap();
    assert_eq!(doc.values()["tier"], "from-a");
    assert_eq!(doc.latest.topic, "a");
    drop_namespace(&ns).await;
}

/// Customers `C<n>` for `ids`, on their own topic: the parents the orders' relations name.
fn customers(ids: std::ops::Range<i64>) -> Vec<EntityUpdate> {
    ids.map(|c| {
        update(
            "customer",
            &format!("C{c}"),
            json!({"name": c}),
            "c",
            0,
            c,
            1,
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_version_never_overwrites_a_newer_one_within_or_across_batches() {
    let ns = namespace();
    let store = store_in(&ns).await;
    let customers = customers(1..5);
    store.apply(&customers, &[]).await.unwrap();
    // Within one batch: the newer update comes first in the log, the older one after it.
    let newer = update(
        "order",
        "O1",
        json!({"status": "new", "customer_id": "C2"}),
        "t",
        0,
        0,
        20,
    );
    let older = update(
        "order",
        "O1",
        json!({"status": "old", "customer_id": "C1", "note": "n"}),
        "t",
        0,
        1,
        10,
    );
    store.apply(&[newer, older], &[]).await.unwrap();
    // Across batches: an older version at a later offset, to a stored row and to a new field.
    let stale = update(
        "order",
        "O1",
        json!({"status": "stale", "customer_id": "C3", "extra": 1}),
        "t",
        0,
        2,
        5,
    );
    store.apply(&[stale], &[]).await.unwrap();

    let doc = store.get("order", "O1").await.unwrap().unwrap();
    assert_eq!(
        serde_json::Value::Object(doc.values()),
        json!({"status": "new", "customer_id": "C2", "note": "n", "extra": 1})
    );
    assert_eq!((doc.latest.offset, doc.events_applied), (0, 3));
    assert_eq!(doc.fields["status"].provenance.offset, 0);
    assert_eq!(doc.fields["note"].provenance.offset, 1);
    // The relation follows the newest customer_id, not the last one written.
    let ctx = store.context("order", "O1").await.unwrap().unwrap();
    assert_eq!(ctx.belongs_to["customer"].entity_id, "C2");
    // A newer version still replaces it.
    let newest = update(
        "order",
        "O1",
        json!({"status": "newest", "customer_id": "C4"}),
        "t",
        0,
        3,
        30,
    );
    store.apply(&[newest], &[]).await.unwrap();
    let doc = store.get("order", "O1").await.unwrap().unwrap();
    assert_eq!(doc.values()["status"], "newest");
    assert_eq!(doc.latest.offset, 3);
    let ctx = store.context("order", "O1").await.unwrap().unwrap();
    assert_eq!(ctx.belongs_to["customer"].entity_id, "C4");
    drop_namespace(&ns).await;
}

/// Two writers (two partitions, two connection pools) update the same entities at once, new
/// and stored ones, so the upserts meet every race: rows the other one inserts, updates or
/// holds locked. Upserts commute, so the result must equal the embedded store's, whatever
/// the interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_the_same_entities_converge_to_the_newest_versions() {
    let ns = namespace();
    let stores = [store_in(&ns).await, store_in(&ns).await];
    // Each partition's event times interleave with the other's; entities get new ids as the
    // run goes on, so both writers also insert the same new keys.
    let batch = |partition: i32, n: i64| -> Vec<EntityUpdate> {
        (n * 100..(n + 1) * 100)
            .map(|o| {
                let time = 1_000 + (o * 37 + i64::from(partition) * 11) % 997;
                update(
                    "order",
                    &format!("O{}", (o % 40) + n * 10),
                    json!({"status": format!("p{partition}-{o}"), "customer_id": format!("C{}", (o + i64::from(partition)) % 5)}),
                    "orders",
                    partition,
                    o,
                    time,
                )
            })
            .collect()
    };
    const BATCHES: i64 = 30;
    let customers = customers(0..5);
    stores[0].apply(&customers, &[]).await.unwrap();
    // One task: the two transactions still run at once on the server, each on its connection.
    async fn write(store: &PostgresStore, batches: Vec<Vec<EntityUpdate>>) {
        for b in batches {
            store.apply(&b, &[]).await.unwrap();
        }
    }
    let all = |partition| {
        (0..BATCHES)
            .map(|n| batch(partition, n))
            .collect::<Vec<_>>()
    };
    tokio::join!(write(&stores[0], all(0)), write(&stores[1], all(1)));

    let dir = tempfile::tempdir().unwrap();
    let reference = EmbeddedStore::open(&dir.path().join("s.redb"), schema()).unwrap();
    ContextStore::apply(&reference, &customers, &[])
        .await
        .unwrap();
    for partition in [0, 1] {
        for n in 0..BATCHES {
            ContextStore::apply(&reference, &batch(partition, n), &[])
                .await
                .unwrap();
        }
    }
    assert_same(&reference, &stores[0], "customer", "C", 0..5).await;
    drop_namespace(&ns).await;
}

/// Tables created by a kontext before versioned tombstones get the tombstone columns when a
/// store connects, keep their data, and take tombstones from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_of_the_layout_before_versioned_tombstones_are_upgraded_in_place() {
    let ns = namespace();
    let client = raw_client().await;
    client
        .batch_execute(&format!(
            r#"CREATE SCHEMA {ns};
            CREATE TABLE {ns}.kontext_entities (
                entity_type text COLLATE "C" NOT NULL, entity_id text COLLATE "C" NOT NULL,
                events_applied bigint NOT NULL, source text NOT NULL, event_id text NOT NULL,
                event_type text, topic text COLLATE "C" NOT NULL, "partition" integer NOT NULL,
                "offset" bigint NOT NULL, event_time_ms bigint NOT NULL,
                PRIMARY KEY (entity_type, entity_id));
            INSERT INTO {ns}.kontext_entities
                VALUES ('customer', 'C1', 1, 'crm', 'e0', NULL, 't', 0, 0, 10);"#
        ))
        .await
        .unwrap();
    let store = store_in(&ns).await;
    let doc = store.get("customer", "C1").await.unwrap().unwrap();
    assert_eq!((doc.events_applied, doc.latest.offset), (1, 0));
    // A tombstone of an entity never stored still needs its row.
    let batch = [
        update("customer", "C1", serde_json::Value::Null, "t", 0, 1, 20),
        update("customer", "C2", serde_json::Value::Null, "t", 0, 2, 20),
        update("customer", "C2", json!({"name": "old"}), "t", 1, 0, 5),
    ];
    let stats = store.apply(&batch, &[]).await.unwrap();
    assert_eq!((stats.applied, stats.deleted), (3, 2));
    assert!(store.dump().await.unwrap().is_empty());
    // Connecting again leaves the upgraded tables as they are.
    drop(store);
    let store = store_in(&ns).await;
    store
        .apply(
            &[update(
                "customer",
                "C2",
                json!({"name": "new"}),
                "t",
                1,
                1,
                30,
            )],
            &[],
        )
        .await
        .unwrap();
    let doc = store.get("customer", "C2").await.unwrap().unwrap();
    assert_eq!(doc.fields["name"].value, json!("new"));
    assert_eq!(doc.events_applied, 3);
    assert_eq!(store.list("customer", 10, None).await.unwrap(), ["C2"]);
    drop_namespace(&ns).await;
}

/// Stores connecting at once to a fresh schema create its tables once, and writers of one
/// partition at once each apply their batch, whatever the database's default isolation: with
/// a snapshot taken before the DDL lock, the second store would not see the first's tables
/// and migrate them again; under SERIALIZABLE, the second writer behind the offsets lock
/// would fail to serialize instead of seeing the first one's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_connecting_and_writing_at_once_work_whatever_the_default_isolation() {
    let base = url();
    assert!(
        base.starts_with("postgres"),
        "a postgres:// URL, not {base}"
    );
    let option = "-c%20default_transaction_isolation%3Dserializable";
    let serializable = if base.contains("options=") {
        base.replacen("options=", &format!("options={option}%20"), 1)
    } else if base.contains('?') {
        format!("{base}&options={option}")
    } else {
        format!("{base}?options={option}")
    };
    for _ in 0..3 {
        let ns = namespace();
        let connect = || PostgresStore::connect_in_namespace(&serializable, &ns, schema());
        let (a, b, c) = tokio::join!(connect(), connect(), connect());
        let stores: Vec<PostgresStore> = [a, b, c]
            .into_iter()
            .map(|store| store.unwrap_or_else(|e| panic!("connecting at once to {ns}: {e}")))
            .collect();
        // The same records, applied by three writers at once: each applies them or skips
        // them as applied, none fails.
        let batch: Vec<EntityUpdate> = (0..20)
            .map(|i| update("customer", &format!("C{i}"), json!({"n": i}), "t", 0, i, 1))
            .collect();
        let offsets = [("t".to_string(), 0, 20)];
        let (x, y, z) = tokio::join!(
            stores[0].apply(&batch, &offsets),
            stores[1].apply(&batch, &offsets),
            stores[2].apply(&batch, &offsets)
        );
        let mut applied = 0;
        for stats in [x, y, z] {
            applied += stats
                .unwrap_or_else(|e| panic!("writing at once to {ns}: {e}"))
                .applied;
        }
        assert_eq!(applied, 20, "each record applied once");
        drop(stores);
        drop_namespace(&ns).await;
    }
}

/// The store records its format; a store a newer kontext wrote is refused before anything
/// in it changes, and a store of the layout before the record gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_a_newer_format_is_refused_and_left_as_it_is() {
    let ns = namespace();
    let store = store_in(&ns).await;
    let u = update("customer", "C1", json!({"name": "Ana"}), "t", 0, 0, 1);
    store.apply(&[u], &[]).await.unwrap();
    drop(store);
    let client = raw_client().await;
    let query = format!("SELECT value FROM {ns}.kontext_meta WHERE key = 'format'");
    let format = || async {
        client
            .query_one(&query, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(format().await, crate::STORE_FORMAT as i64);
    let newer = crate::STORE_FORMAT as i64 + 1;
    client
        .execute(
            &format!("UPDATE {ns}.kontext_meta SET value = $1 WHERE key = 'format'"),
            &[&newer],
        )
        .await
        .unwrap();
    let err = PostgresStore::connect_in_namespace(&url(), &ns, schema())
        .await
        .err()
        .expect("a newer format is refused");
    assert!(matches!(err, StoreError::Incompatible(_)), "{err}");
    assert!(!err.is_transient());
    let message = err.to_string();
    assert!(message.contains(&format!("schema {ns}")), "{message}");
    assert!(message.contains("newer kontext"), "{message}");
    assert!(message.contains("rebuilt from the log"), "{message}");
    assert_eq!(format().await, newer, "left as it is");
    // Without the record (a store of an earlier kontext) the store opens and records it.
    client
        .execute(&format!("DROP TABLE {ns}.kontext_meta"), &[])
        .await
        .unwrap();
    let store = store_in(&ns).await;
    assert!(store.get("customer", "C1").await.unwrap().is_some());
    assert_eq!(format().await, crate::STORE_FORMAT as i64);
    drop(store);
    // A record of a type this build does not know: refused, not retried as an outage.
    client
        .batch_execute(&format!(
            "ALTER TABLE {ns}.kontext_meta ALTER COLUMN value TYPE text; \
             UPDATE {ns}.kontext_meta SET value = 'two' WHERE key = 'format'"
        ))
        .await
        .unwrap();
    let err = PostgresStore::connect_in_namespace(&url(), &ns, schema())
        .await
        .err()
        .expect("an unreadable format is refused");
    assert!(matches!(err, StoreError::Incompatible(_)), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("cannot read"), "{err}");
    drop_namespace(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_values_read_back_exactly_as_written() {
    let ns = namespace();
    let store = store_in(&ns).await;
    let fields = json!({
        "nul": "a\u{0}b", "tiny": 1e-7, "huge": 1e300, "big": u64::MAX, "neg": -12,
        "float": 0.1, "nested": {"z": [1, {"y": null}], "a": true}, "empty": {}, "s": "ü"
    });
    let u = update("customer", "C1", fields.clone(), "t", 0, 0, 1);
    store.apply(&[u], &[]).await.unwrap();
    let doc = store.get("customer", "C1").await.unwrap().unwrap();
    assert_eq!(serde_json::Value::Object(doc.values()), fields);
    drop_namespace(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_in_an_id_is_a_permanent_error_and_writes_nothing() {
    let ns = namespace();
    let store = store_in(&ns).await;
    let bad = update("customer", "C\u{0}1", json!({"a": 1}), "t", 0, 0, 1);
    let err = store.apply(&[bad], &[]).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert!(!err.is_transient());
    assert!(store.dump().await.unwrap().is_empty());
    assert!(store.applied_offsets().await.unwrap().is_empty());
    drop_namespace(&ns).await;
}

/// Reads never fail on a NUL the way writes must: an id with one names no entity (none can be
/// stored), as on the embedded store. Before, `GET /v1/context/customer/C1%00` failed the
/// query and was answered 503, as if the store were down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_in_a_read_names_no_entity() {
    let ns = namespace();
    let store = store_in(&ns).await;
    let updates = [
        update("customer", "C1", json!({"name": "Ana"}), "t", 0, 0, 1),
        update("customer", "C2", json!({"name": "Bo"}), "t", 0, 1, 1),
    ];
    store.apply(&updates, &[]).await.unwrap();
    assert!(store
        .context("customer", "C1\u{0}")
        .await
        .unwrap()
        .is_none());
    assert!(store.get("customer", "C1\u{0}").await.unwrap().is_none());
    assert_eq!(
        store.list("customer", 10, Some("C1\u{0}x")).await.unwrap(),
        vec!["C2".to_owned()]
    );
    drop_namespace(&ns).await;
}

#[tokio::test]
async fn an_unreachable_server_is_a_transient_error() {
    // Port 1 on the loopback: nothing listens there.
    let err = PostgresStore::connect("postgres://kontext@127.0.0.1:1/kontext", schema())
        .await
        .err()
        .expect("connected to port 1");
    assert!(err.is_transient(), "{err}");
    // The message says why, not only that connecting failed.
    assert!(err.to_string().contains("refused"), "{err}");
}

#[test]
fn sqlstates_that_a_retry_can_fix_are_transient() {
    use tokio_postgres::error::SqlState;
    for s in [
        SqlState::CONNECTION_FAILURE,
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::ADMIN_SHUTDOWN,
        SqlState::TOO_MANY_CONNECTIONS,
        SqlState::LOCK_NOT_AVAILABLE,
    ] {
        assert!(is_transient_state(&s), "{s:?}");
    }
    for s in [
        SqlState::CHARACTER_NOT_IN_REPERTOIRE,
        SqlState::UNDEFINED_TABLE,
        SqlState::UNIQUE_VIOLATION,
        SqlState::INVALID_TEXT_REPRESENTATION,
    ] {
        assert!(!is_transient_state(&s), "{s:?}");
    }
}

#[test]
fn the_planner_skips_what_the_store_applied_and_keeps_the_newest_field_version() {
    let stored: BTreeMap<(String, i32), i64> = [(("t".to_string(), 0), 5)].into();
    let updates = vec![
        update("c", "1", json!({"a": 1}), "t", 0, 3, 100), // below 5: applied before
        update("c", "1", json!({"a": 2, "b": 1}), "t", 0, 6, 200),
        update("c", "1", json!({"a": 3}), "t", 0, 7, 150), // older time: a stays 2
        update("c", "1", json!({"a": 4}), "t", 0, 6, 999), // offset 6 again: skipped
        update("c", "2", json!({"a": 1}), "t", 1, 0, 1),
    ];
    let offsets = [("t".to_string(), 1, 10)];
    let p = plan::plan(&updates, &offsets, &stored);
    assert_eq!((p.stats.applied, p.stats.skipped), (3, 2));
    let one = &p.entities[&("c", "1")];
    assert_eq!(one.events, 2);
    assert_eq!(one.fields["a"].0, &json!(2));
    assert_eq!(one.fields["b"].0, &json!(1));
    assert_eq!(one.latest.map(|l| l.offset), Some(6));
    assert_eq!(p.offsets[&("t", 0)], 8);
    assert_eq!(p.offsets[&("t", 1)], 10);
}

#[test]
fn the_planner_keeps_the_newest_tombstone_and_counts_every_record() {
    let updates = vec![
        update("c", "1", json!({"a": 1}), "t", 0, 0, 500),
        update("c", "1", serde_json::Value::Null, "t", 0, 1, 7),
        update("c", "1", serde_json::Value::Null, "t", 0, 2, 3), // older than the one before
        update("c", "1", json!({"b": 1}), "t", 0, 3, 2),
        update("c", "2", serde_json::Value::Null, "t", 0, 4, 1),
    ];
    let p = plan::plan(&updates, &[], &BTreeMap::new());
    assert_eq!((p.stats.applied, p.stats.deleted), (5, 3));
    let one = &p.entities[&("c", "1")];
    assert_eq!(one.events, 4);
    assert_eq!(one.tomb.map(|t| t.offset), Some(1));
    assert_eq!(one.latest.map(|l| l.offset), Some(0));
    // Both fields go to the SQL, which keeps out `b` (older than the tombstone).
    assert_eq!(one.fields.keys().copied().collect::<Vec<_>>(), ["a", "b"]);
    let two = &p.entities[&("c", "2")];
    assert_eq!((two.events, two.latest), (1, None));
    assert_eq!(two.tomb.map(|t| t.offset), Some(4));
}

/// The same dump as the embedded reference, and the same context for `<prefix><n>`, `n` in `ids`.
async fn assert_same(
    reference: &EmbeddedStore,
    store: &PostgresStore,
    entity_type: &str,
    prefix: &str,
    ids: std::ops::Range<i64>,
) {
    assert_eq!(reference.dump().unwrap(), store.dump().await.unwrap());
    for n in ids {
        let id = format!("{prefix}{n}");
        assert_eq!(
            reference.context(entity_type, &id).unwrap(),
            store.context(entity_type, &id).await.unwrap()
        );
    }
}

async fn drop_namespace(ns: &str) {
    let client = raw_client().await;
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {ns} CASCADE"))
        .await
        .unwrap();
}

/// A schema name the validation accepts (`[a-z_][a-z0-9_]*`) may be an SQL keyword: the store
/// quotes it, so `schema: order` works like any other name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_named_like_an_sql_keyword_works() {
    let ns = "order";
    super::drop_namespace(&url(), ns).await.unwrap();
    let store = store_in(ns).await;
    store.apply(&orders(0, 3), &[]).await.unwrap();
    assert_eq!(store.dump().await.unwrap().len(), 3);
    // A second connection finds the tables through its search_path.
    assert_eq!(store_in(ns).await.dump().await.unwrap().len(), 3);
    super::drop_namespace(&url(), ns).await.unwrap();
}
