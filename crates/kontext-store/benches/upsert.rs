//! Batched versioned upserts, side by side: the embedded store and PostgreSQL.
//!
//! Each iteration applies one batch of updates (3 fields each, over 20 000 orders that belong
//! to 2 000 customers) at new offsets, so nothing is skipped: the steady state of a sink.
//! Throughput is in updates (log records) per second. Batches of 2 000 (what the sink polls at
//! most today) and 20 000 (a sink that gathers several polls per commit), `UPSERT_BATCHES`
//! (comma-separated) to choose others.
//!
//! Three stores: `embedded` fsyncs every commit (`sync_interval` 0), `embedded_flushed`
//! commits without fsync while a thread flushes it every 100 ms (what the sink's flusher does
//! with the default `stores[].sync_interval`: durable within 100 ms), and PostgreSQL.
//!
//!   scripts/postgres.sh start
//!   cargo bench -p kontext-store --bench upsert
//!
//! PostgreSQL is `KONTEXT_TEST_POSTGRES` (default: the URL scripts/postgres.sh prints); each
//! run writes into a fresh schema and drops it afterwards.

#[path = "../../../bench/allocator.rs"]
mod allocator;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kontext_store::{
    Change, ContextStore, EmbeddedStore, EntityUpdate, PostgresStore, Provenance, StoreSchema,
};
use serde_json::{json, Map};

const BATCHES: &[usize] = &[2_000, 20_000];
const DEFAULT_URL: &str = "postgres://kontext@127.0.0.1:55432/kontext";
/// The pipeline's default `stores[].sync_interval`.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

fn schema() -> StoreSchema {
    let mut s = StoreSchema::default();
    s.belongs_to.insert(
        "order".into(),
        vec![("customer".into(), "customer_id".into())],
    );
    s.related_limit.insert("order".into(), 10);
    s
}

/// The batch of `len` updates starting at log offset `from`.
fn batch(from: i64, len: usize) -> Vec<EntityUpdate> {
    (from..from + len as i64)
        .map(|o| {
            let mut fields = Map::new();
            fields.insert(
                "status".into(),
                json!(["placed", "paid", "shipped"][(o % 3) as usize]),
            );
            fields.insert("total".into(), json!(o % 997));
            fields.insert("customer_id".into(), json!(format!("C{}", o % 2_000)));
            EntityUpdate {
                entity_type: "order".into(),
                entity_id: format!("O{}", (o * 7_919) % 20_000),
                change: Change::Upsert(fields.into()),
                provenance: Provenance {
                    source: "shop".into(),
                    event_id: format!("e{o}"),
                    event_type: Some("order.updated".into()),
                    topic: "orders".into(),
                    partition: 0,
                    offset: o,
                    event_time_ms: 1_700_000_000_000 + o,
                },
            }
        })
        .collect()
}

fn upsert(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let url = std::env::var("KONTEXT_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.into());
    let ns = format!("kt_bench_{}", std::process::id());
    let postgres = rt
        .block_on(PostgresStore::connect_in_namespace(&url, &ns, schema()))
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e} (run scripts/postgres.sh start)"));
    let dir = tempfile::tempdir().expect("temp dir");
    let embedded =
        EmbeddedStore::open(&dir.path().join("bench.redb"), schema()).expect("embedded store");
    let flushed = EmbeddedStore::open(&dir.path().join("flushed.redb"), schema())
        .expect("embedded store")
        .with_sync_interval(FLUSH_INTERVAL);
    let stores: [(&str, &dyn ContextStore); 3] = [
        ("embedded", &embedded),
        ("embedded_flushed", &flushed),
        ("postgres", &postgres),
    ];
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(FLUSH_INTERVAL);
                flushed.flush().expect("flush");
            }
        });
        run(c, &rt, &stores);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });

    // Drop the bench schema: the next run starts from empty tables again.
    rt.block_on(async {
        if let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {ns} CASCADE"))
                .await;
        }
    });
}

/// Every batch size against every store.
fn run(c: &mut Criterion, rt: &tokio::runtime::Runtime, stores: &[(&str, &dyn ContextStore)]) {
    let batches: Vec<usize> = std::env::var("UPSERT_BATCHES")
        .ok()
        .map(|v| v.split(',').filter_map(|b| b.trim().parse().ok()).collect())
        .unwrap_or_else(|| BATCHES.to_vec());
    // Offsets keep growing across groups: every batch is new to every store.
    let mut next = vec![0i64; stores.len()];
    for len in batches {
        let mut group = c.benchmark_group(format!("upsert_{len}"));
        group.throughput(Throughput::Elements(len as u64));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(10));
        for (k, (name, store)) in stores.iter().enumerate() {
            let next = &mut next[k];
            group.bench_function(*name, |b| {
                b.to_async(rt).iter_batched(
                    || {
                        let from = *next;
                        *next += len as i64;
                        batch(from, len)
                    },
                    |updates| async move {
                        let stats = store.apply(&updates, &[]).await.expect("apply");
                        assert_eq!(stats.applied, len as u64);
                    },
                    BatchSize::PerIteration,
                )
            });
        }
        group.finish();
    }
}

criterion_group!(benches, upsert);
criterion_main!(benches);
