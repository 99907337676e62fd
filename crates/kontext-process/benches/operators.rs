//! Per-operator throughput on one core, with state in fjall (the on-disk store a task uses)
//! and in memory for comparison. Every benchmark runs twice: `<group>` in wall time, and
//! `<group>_cpu` in CPU time of the whole process (fjall's journal and flush threads included),
//! which a shared, loaded machine disturbs much less than wall time. Each iteration is one batch
//! of 1000 events (`OPERATOR_BATCH`, below): the operator
//! decides the batch and the state batch is committed (fjall: one atomic write batch,
//! `Durability::Process`, i.e. written to the OS, not fsynced). Building the input batch is
//! not timed. Event time advances 1 ms per event, and the state is warmed with two windows of
//! events before measuring and kept across samples, so windows close and ids expire while the
//! benchmark runs: the numbers are of the steady state, expiry included. (Until 2026-12-02
//! each sample started from an empty store, and most samples ended before the first window
//! closed: earlier numbers left out most of the expiry work.)
//!
//! ```text
//! cargo bench -p kontext-process --bench operators -- --warm-up-time 1 --measurement-time 5
//! OPERATOR_BATCH=16000 cargo bench -p kontext-process --bench operators -- ...
//! ```
//!
//! `OPERATOR_BATCH` sets the events per batch (default 1000; the warm-up is ~120 000 events at
//! any size, in whole batches: 112 000 at 16 000, still more than one 60 s window). 16 000 is the batch the processor handles when it is
//! behind (`kontext_stream`'s `backlog`: it gathers up to 16 000 records per poll), which is
//! when its throughput is the limit: across the default 12 partitions, ~1 330 events for a
//! twelfth of the keys per task, the same events per key and batch as 16 000 for all keys in
//! one store here.

#[path = "../../../bench/allocator.rs"]
mod allocator;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::measurement::{Measurement, WallTime};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kontext_process::store::Durability;
use kontext_process::*;

#[path = "../../../bench/cpu_time.rs"]
mod cpu_time;
use cpu_time::ProcessCpuTime;

/// Events per batch: `OPERATOR_BATCH`, else 1000.
fn batch_size() -> usize {
    static SIZE: OnceLock<usize> = OnceLock::new();
    *SIZE.get_or_init(|| {
        std::env::var("OPERATOR_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000)
    })
}
const KEYS: u64 = 10_000;
const CUSTOMERS: u64 = 100_000;
/// Batches run before measuring: two 60 s windows of event time (1 ms per event).
const WARM_BATCHES: u64 = 120;

/// A deterministic stream: the n-th event of the benchmark.
struct Stream {
    next: u64,
    keys: u64,
    templates: Vec<serde_json::Value>,
}

impl Stream {
    /// Events of `keys` keys (the aggregation key), evenly.
    fn new(keys: u64) -> Self {
        let templates = (0..256u64)
            .map(|i| {
                serde_json::json!({
                    "customer_id": format!("C-{}", mix(i) % CUSTOMERS),
                    "total": (mix(i + 7) % 20_000) as f64 / 100.0,
                    "sku": format!("s{}", mix(i + 11) % 50),
                })
            })
            .collect();
        Self {
            next: 0,
            keys,
            templates,
        }
    }

    /// `dup_every`: every n-th event repeats the id of an event ~500 events earlier.
    fn batch(&mut self, dup_every: u64) -> Vec<Event> {
        (0..batch_size())
            .map(|_| {
                let n = self.next;
                self.next += 1;
                let id = if dup_every > 0 && n.is_multiple_of(dup_every) && n > 500 {
                    n - 500
                } else {
                    n
                };
                let value = self.templates[(n % 256) as usize].clone();
                let customer = value["customer_id"].as_str().unwrap_or_default().to_owned();
                Event {
                    key: Bytes::from(format!("K-{}", mix(n) % self.keys)),
                    id: Bytes::from(format!("click-{id}")),
                    time_ms: 1_700_000_000_000 + n as i64,
                    coords: Coords::new("context.interactions", 0, n as i64),
                    value: if customer.is_empty() {
                        serde_json::Value::Null
                    } else {
                        value
                    },
                }
            })
            .collect()
    }
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Times `iters` batches with `M`'s clock: `step` decides and commits one batch; building it
/// is not timed.
fn timed<M: Clock, S: StateStore + ?Sized>(
    iters: u64,
    store: &mut S,
    stream: &mut Stream,
    dup_every: u64,
    mut step: impl FnMut(&mut S, &[Event]),
) -> M::Value {
    let mut total = 0;
    for _ in 0..iters {
        let events = stream.batch(dup_every);
        let start = M::now_ns();
        step(store, &events);
        total += M::now_ns().saturating_sub(start);
    }
    M::value(total)
}

fn with_stores<M: Clock>(
    c: &mut Criterion<M>,
    group_name: &str,
    keys: u64,
    prepare: impl Fn(&mut dyn StateStore),
    run: impl Fn(&mut dyn StateStore, &mut Stream, u64) -> M::Value,
) {
    let mut group = c.benchmark_group(format!("{group_name}{}", M::SUFFIX));
    group.throughput(Throughput::Elements(batch_size() as u64));
    group.sample_size(20);
    // Criterion calls a benchmark's closure once per sample: the store and the stream are
    // made at the first call (so a benchmark the filter skips costs nothing) and kept, so
    // every sample continues where the last one stopped. They are warmed first with two
    // windows' worth of batches, so that from the first sample on, windows close and ids
    // expire as fast as they open (steady state).
    // The store before its directory: fields drop in order.
    let mut fjall: Option<(FjallStore, Stream, tempfile::TempDir)> = None;
    group.bench_function("fjall", |b| {
        let (store, stream, _dir) = fjall.get_or_insert_with(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut store =
                FjallStore::open(dir.path(), group_name, Durability::Process).expect("open fjall");
            prepare(&mut store);
            let mut stream = Stream::new(keys);
            run(
                &mut store,
                &mut stream,
                WARM_BATCHES * 1000 / batch_size() as u64,
            );
            (store, stream, dir)
        });
        b.iter_custom(|iters| run(store, stream, iters));
    });
    drop(fjall);
    let mut memory: Option<(MemoryStore, Stream)> = None;
    group.bench_function("memory", |b| {
        let (store, stream) = memory.get_or_insert_with(|| {
            let mut store = MemoryStore::new(group_name);
            prepare(&mut store);
            let mut stream = Stream::new(keys);
            run(
                &mut store,
                &mut stream,
                WARM_BATCHES * 1000 / batch_size() as u64,
            );
            (store, stream)
        });
        b.iter_custom(|iters| run(store, stream, iters));
    });
    group.finish();
}

fn dedup<M: Clock>(c: &mut Criterion<M>) {
    let op = Deduplicate::new(DedupConfig { window_ms: 60_000 });
    with_stores(
        c,
        "dedup",
        KEYS,
        |store| Deduplicate::prepare_store(store),
        |store, stream, iters| {
            timed::<M, _>(iters, store, stream, 10, |store, events| {
                let out = op.process(store, events).expect("dedup");
                store.commit(out.state).expect("commit");
            })
        },
    );
}

fn join<M: Clock>(c: &mut Criterion<M>) {
    let op = EnrichmentJoin::new(JoinConfig {
        kind: JoinKind::Left,
        key: JoinKey::Field(FieldPath::new("customer_id")),
        field: "customer".into(),
        table: Default::default(),
    });
    let load = |store: &mut dyn StateStore| {
        for chunk in 0..CUSTOMERS / 10_000 {
            let updates: Vec<TableUpdate> = (chunk * 10_000..(chunk + 1) * 10_000)
                .map(|i| TableUpdate {
                    key: Bytes::from(format!("C-{i}")),
                    value: Some(Bytes::from(format!(
                        r#"{{"customer_id":"C-{i}","given_name":"Ana","family_name":"Silva","loyalty_tier":"gold","billing_city":"Lisbon"}}"#
                    ))),
                    coords: Coords::new("context.customers", 0, i as i64),
                })
                .collect();
            let batch = op.apply_table(&*store, &updates).expect("table");
            store.commit(batch.state).expect("commit");
        }
    };
    with_stores(c, "join", KEYS, load, |store, stream, iters| {
        timed::<M, _>(iters, store, stream, 0, |store, events| {
            let out = op.process(store, events).expect("join");
            assert_eq!(out.outputs.len(), events.len());
            store.commit(out.state).expect("commit");
        })
    });
}

/// `keys`: how many keys share the stream, so how many events a key has in a window.
fn aggregation<M: Clock>(c: &mut Criterion<M>, name: &str, window: WindowSpec, keys: u64) {
    aggregation_showing(c, name, window, keys, false)
}

/// With `shown_only`, a hopping aggregation emits only the window a feature shows, as the
/// processor runs it: per key, the window closing next after the key's newest event in the
/// batch (`Aggregate::process_selected`; the selection is timed too).
fn aggregation_showing<M: Clock>(
    c: &mut Criterion<M>,
    name: &str,
    window: WindowSpec,
    keys: u64,
    shown_only: bool,
) {
    let op = Aggregate::new(AggregateConfig {
        window,
        grace_ms: 5_000,
        functions: vec![
            ("orders".into(), AggFn::Count),
            ("spend".into(), AggFn::Sum(FieldPath::new("total"))),
            ("max_ticket".into(), AggFn::Max(FieldPath::new("total"))),
        ],
        emit: Emit::OnUpdate,
    })
    .expect("config");
    with_stores(
        c,
        name,
        keys,
        |_| {},
        |store, stream, iters| {
            timed::<M, _>(iters, store, stream, 0, |store, events| {
                let out = if shown_only {
                    let mut newest: HashMap<&[u8], i64> = HashMap::new();
                    for e in events {
                        let t = newest.entry(&e.key[..]).or_insert(i64::MIN);
                        *t = (*t).max(e.time_ms);
                    }
                    op.process_selected(store, events, &|key, w| {
                        newest
                            .get(key)
                            .is_some_and(|t| window.closing_next(*t) == Some(w.end))
                    })
                } else {
                    op.process(store, events)
                }
                .expect("aggregate");
                store.commit(out.state).expect("commit");
            })
        },
    );
}

fn aggregations<M: Clock>(c: &mut Criterion<M>) {
    aggregation(
        c,
        "tumbling_60s",
        WindowSpec::Tumbling { size_ms: 60_000 },
        KEYS,
    );
    aggregation(
        c,
        "hopping_60s_by_10s",
        WindowSpec::Hopping {
            size_ms: 60_000,
            advance_ms: 10_000,
        },
        KEYS,
    );
    aggregation_showing(
        c,
        "hopping_60s_by_10s_shown",
        WindowSpec::Hopping {
            size_ms: 60_000,
            advance_ms: 10_000,
        },
        KEYS,
        true,
    );
    aggregation(
        c,
        "sliding_60s",
        WindowSpec::Sliding { size_ms: 60_000 },
        KEYS,
    );
    // Rolling features of busy keys: 600 events per key in the window (an hour of a busy
    // customer's clicks, scaled down), and sessions that stay open (an event every 100 ms).
    aggregation(
        c,
        "sliding_60s_100_keys",
        WindowSpec::Sliding { size_ms: 60_000 },
        100,
    );
    aggregation(
        c,
        "session_10s_100_keys",
        WindowSpec::Session { gap_ms: 10_000 },
        100,
    );
}

/// A clock for [`timed`]: nanoseconds, and the criterion measurement they are reported in.
trait Clock: Measurement {
    /// Appended to the group name, so wall and CPU results never share a baseline.
    const SUFFIX: &'static str;
    fn now_ns() -> u64;
    fn value(ns: u64) -> Self::Value;
}

impl Clock for WallTime {
    const SUFFIX: &'static str = "";
    fn now_ns() -> u64 {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
    fn value(ns: u64) -> Duration {
        Duration::from_nanos(ns)
    }
}

impl Clock for ProcessCpuTime {
    const SUFFIX: &'static str = "_cpu";
    fn now_ns() -> u64 {
        ProcessCpuTime::now_ns()
    }
    fn value(ns: u64) -> u64 {
        ns
    }
}

criterion_group!(
    wall,
    dedup::<WallTime>,
    join::<WallTime>,
    aggregations::<WallTime>
);
criterion_group! {
    name = cpu;
    config = Criterion::default().with_measurement(cpu_time::PROCESS_CPU_TIME);
    targets = dedup::<ProcessCpuTime>, join::<ProcessCpuTime>, aggregations::<ProcessCpuTime>
}
criterion_main!(wall, cpu);
