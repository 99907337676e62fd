//! In-process context lookups: latency percentiles of `EmbeddedStore::context` (the entity, its
//! parent and its related lists, what `GET /v1/context/...` assembles before serializing), idle
//! and while a writer applies batches at the rate of a busy pipeline, as the store sink does.
//!
//!   cargo bench -p kontext-store --bench lookup
//!
//! The store holds 1 000 customers (9 fields each) with 10 orders, 5 tickets and 20
//! interactions each (36 000 entities), the shape the quickstart builds. Every lookup is one
//! customer's context: 1 + 35 entity reads, the newest 5 / 5 / 10 kept. Percentiles come from
//! every single lookup (sorted), not from batch means, so they are real tails. Each phase runs
//! twice, side by side: `assembled` (the document cache off: every lookup reads the store) and
//! `cached` (the default cache: a document is assembled again only after a write to it, one of
//! its children or its parent). Environment:
//! `LOOKUPS` (default 100 000 per phase), `LOOKUP_RATE` (lookups/s, default 10 000), `INGEST_RATE` (updates/s of the writer, default 5 000,
//! applied every 50 ms), `HISTORY` (multiplies the children per customer, default 1; the
//! quickstart's customers have ~400 children after two minutes at 1 000 events/s: `HISTORY=12`),
//! `PHASES` (comma-separated, default `assembled,cached`: which of the two to run),
//! `SYNC_INTERVAL_MS` (default 100, the stores' default `sync_interval`: the writer commits
//! without fsync and a flusher thread fsyncs every interval, as the store sink does; `0`: every
//! commit fsyncs before it returns).

#[path = "../../../bench/allocator.rs"]
mod allocator;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kontext_store::{Change, EmbeddedStore, EntityUpdate, Provenance, StoreSchema};
use serde_json::{json, Map, Value};

const CUSTOMERS: u64 = 1_000;
const CHILDREN: [(&str, u64, usize); 3] =
    [("order", 10, 5), ("ticket", 5, 5), ("interaction", 20, 10)];
const T0: i64 = 1_764_072_000_000;

fn main() {
    let lookups: usize = env_or("LOOKUPS", 100_000);
    let ingest_rate: u64 = env_or("INGEST_RATE", 5_000);
    let history: u64 = env_or("HISTORY", 1);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("lookup.redb");
    let store = EmbeddedStore::open(&path, schema()).expect("store");

    let offset = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for c in 0..CUSTOMERS {
        load.push(customer(c, &offset));
        for (child, per_customer, _) in CHILDREN {
            for k in 0..per_customer * history {
                load.push(child_update(child, c, k, &offset));
            }
        }
        if load.len() >= 10_000 {
            store.apply(&load, &[]).expect("initial load");
            load.clear();
        }
    }
    store.apply(&load, &[]).expect("initial load");
    drop(store);
    println!(
        "customers={CUSTOMERS} children_per_customer={}",
        35 * history
    );
    // Side by side: every lookup assembled from the store, then through the document cache.
    let only = std::env::var("PHASES").ok();
    for (name, cache) in [
        ("assembled", 0),
        ("cached", kontext_store::DEFAULT_CONTEXT_CACHE),
    ] {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|p| p == name))
        {
            continue;
        }
        let store = EmbeddedStore::open(&path, schema())
            .expect("store")
            .with_context_cache(cache)
            .with_sync_interval(sync_interval());
        phases(name, Arc::new(store), lookups, ingest_rate, &offset);
    }
}

/// Lookups idle, then while a writer applies `ingest_rate` updates/s.
fn phases(
    name: &str,
    store: Arc<EmbeddedStore>,
    lookups: usize,
    ingest_rate: u64,
    offset: &Arc<AtomicU64>,
) {
    // Warm the page cache and the code paths.
    for i in 0..10_000u64 {
        let _ = store.context("customer", &customer_id(i % CUSTOMERS));
    }
    let before = store.context_cache_stats();
    let (idle, idle_misses) = measure(&store, lookups);
    report(&format!("{name} idle"), &idle, None);
    report_misses(&format!("{name} idle"), &idle_misses);
    print_hits(&store, before);

    let stop = Arc::new(AtomicBool::new(false));
    let flusher = (!sync_interval().is_zero()).then(|| {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(sync_interval());
                store.flush().expect("flush");
            }
        })
    });
    let writer = {
        let (store, stop, offset) = (Arc::clone(&store), Arc::clone(&stop), Arc::clone(offset));
        std::thread::spawn(move || {
            let per_tick = (ingest_rate / 20).max(1);
            let mut written = 0u64;
            let mut seed = 1u64;
            let start = Instant::now();
            let mut next = start;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<EntityUpdate> = (0..per_tick)
                    .map(|_| {
                        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        let c = (seed >> 33) % CUSTOMERS;
                        match (seed >> 20) % 4 {
                            0 => customer(c, &offset),
                            1 => child_update("order", c, (seed >> 40) % 10, &offset),
                            2 => child_update("ticket", c, (seed >> 40) % 5, &offset),
                            _ => child_update("interaction", c, (seed >> 40) % 20, &offset),
                        }
                    })
                    .collect();
                store.apply(&batch, &[]).expect("ingest batch");
                written += per_tick;
                next += Duration::from_millis(50);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            written as f64 / start.elapsed().as_secs_f64()
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let before = store.context_cache_stats();
    let (busy, busy_misses) = measure(&store, lookups);
    stop.store(true, Ordering::Relaxed);
    let achieved = writer.join().expect("writer");
    if let Some(flusher) = flusher {
        flusher.join().expect("flusher");
    }
    report(&format!("{name} during_ingest"), &busy, Some(achieved));
    report_misses(&format!("{name} during_ingest"), &busy_misses);
    print_hits(&store, before);
}

/// How often the writer's commits are fsynced (zero: each one).
fn sync_interval() -> Duration {
    Duration::from_millis(env_or("SYNC_INTERVAL_MS", 100))
}

/// The cache's hit ratio since `before`, and how the documents it assembled got their parents
/// and children.
fn print_hits(store: &EmbeddedStore, before: kontext_store::CacheStats) {
    let now = store.context_cache_stats();
    let (hits, misses) = (now.hits - before.hits, now.misses - before.misses);
    if hits + misses > 0 {
        println!(
            "  cache: hits={hits} misses={misses} hit_ratio={:.4} entities_reused={} entities_decoded={} parts_reused={}",
            hits as f64 / (hits + misses) as f64,
            now.entities_reused - before.entities_reused,
            now.entities_decoded - before.entities_decoded,
            now.parts_reused - before.parts_reused,
        );
    }
}

/// Latency of each of `n` customer-context lookups, in nanoseconds, sorted; and, separately,
/// of those the document cache did not answer (they assembled the document). Lookups are
/// paced at `LOOKUP_RATE` per second (default 10 000), so that a phase spans the same time
/// (and the same writes) whether lookups take 0.2 µs or 60 µs; a lookup that falls behind
/// schedule runs at once.
fn measure(store: &EmbeddedStore, n: usize) -> (Vec<u64>, Vec<u64>) {
    let rate: u64 = env_or("LOOKUP_RATE", 10_000);
    let start = Instant::now();
    let mut out = Vec::with_capacity(n);
    let mut misses = Vec::new();
    for i in 0..n as u64 {
        let id = customer_id((i * 7_919) % CUSTOMERS);
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate.max(1));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let before = store.context_cache_stats().misses;
        let t = Instant::now();
        let doc = store.context("customer", &id).expect("lookup");
        let took = t.elapsed().as_nanos() as u64;
        out.push(took);
        if store.context_cache_stats().misses != before {
            misses.push(took);
        }
        assert!(doc.is_some(), "{id} is in the store");
    }
    out.sort_unstable();
    misses.sort_unstable();
    (out, misses)
}

/// The lookups that assembled their document although the cache was on.
fn report_misses(phase: &str, sorted: &[u64]) {
    if !sorted.is_empty() {
        report(&format!("{phase} (cache misses only)"), sorted, None);
    }
}

fn report(phase: &str, sorted: &[u64], ingest: Option<f64>) {
    let q =
        |p: f64| sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)] as f64 / 1000.0;
    let mean = sorted.iter().sum::<u64>() as f64 / sorted.len() as f64 / 1000.0;
    let ingest = ingest.map_or(String::new(), |r| format!(" ingest_updates_per_s={r:.0}"));
    println!(
        "lookup {phase}: n={} mean_us={mean:.1} p50_us={:.1} p99_us={:.1} p99.9_us={:.1} max_us={:.1}{ingest}",
        sorted.len(),
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0),
    );
}

fn schema() -> StoreSchema {
    let mut s = StoreSchema::default();
    for (child, _, limit) in CHILDREN {
        s.belongs_to.insert(
            child.into(),
            vec![("customer".into(), "customer_id".into())],
        );
        s.related_limit.insert(child.into(), limit);
    }
    s
}

fn customer_id(c: u64) -> String {
    format!("C-{}", 10_000 + c)
}

fn customer(c: u64, offset: &AtomicU64) -> EntityUpdate {
    let fields: Map<String, Value> = [
        ("customer_id", json!(customer_id(c))),
        ("given_name", json!("Kemal")),
        ("family_name", json!("Silva")),
        ("email", json!(format!("kemal.silva{c}@example.com"))),
        ("loyalty_tier", json!("silver")),
        ("billing_city", json!("Lisbon")),
        ("plan", json!("pro")),
        ("balance", json!(129.9)),
        ("phone", json!("+351 912 345 678")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    update("customer", customer_id(c), fields, "crm", offset)
}

fn child_update(child: &str, c: u64, k: u64, offset: &AtomicU64) -> EntityUpdate {
    let id = format!("{}-{}-{k}", &child[..1].to_uppercase(), 10_000 + c);
    let mut fields = Map::new();
    fields.insert("customer_id".into(), json!(customer_id(c)));
    fields.insert(
        "status".into(),
        json!(["open", "paid", "shipped"][(k % 3) as usize]),
    );
    fields.insert("total".into(), json!(k * 17 % 300));
    update(child, id, fields, "shop", offset)
}

fn update(
    entity_type: &str,
    entity_id: String,
    fields: Map<String, Value>,
    source: &str,
    offset: &AtomicU64,
) -> EntityUpdate {
    let o = offset.fetch_add(1, Ordering::Relaxed) as i64;
    EntityUpdate {
        entity_type: entity_type.into(),
        entity_id,
        change: Change::Upsert(fields.into()),
        provenance: Provenance {
            source: source.into(),
            event_id: format!("{source}-{o}"),
            event_type: Some(format!("{source}.{entity_type}.updated")),
            topic: format!("context.{entity_type}s"),
            partition: 0,
            offset: o,
            event_time_ms: T0 + o,
        },
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
