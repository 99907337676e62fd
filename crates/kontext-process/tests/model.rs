//! Model-based tests: every operator against a naive reference that recomputes its answer
//! from the whole list of events, over random event orders, late events (within and beyond
//! grace), duplicate ids, and a runtime that crashes before committing state or re-delivers
//! records the store already holds. The outputs go through a downstream versioned upsert
//! (apply only if the version is greater, as the context store does), and the final downstream
//! table must equal the reference. At the end the store's changelog must restore an equal
//! store.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use kontext_process::aggregate::AggregateBatch;
use kontext_process::*;
use proptest::prelude::*;

const TOPIC: &str = "context.orders";

#[derive(Debug, Clone)]
struct Spec {
    key: u8,
    delta: i64,
    back: i64,
    id: u8,
    total: i64,
}

fn specs() -> impl Strategy<Value = Vec<Spec>> {
    prop::collection::vec(
        (
            0u8..3,
            0i64..8,
            prop_oneof![3 => Just(0i64), 1 => 0i64..60],
            0u8..12,
            0i64..9,
        )
            .prop_map(|(key, delta, back, id, total)| Spec {
                key,
                delta,
                back,
                id,
                total,
            }),
        0..60,
    )
}

fn events(specs: &[Spec]) -> Vec<Event> {
    let mut base = 0;
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            base += s.delta;
            Event {
                key: Bytes::from(format!("C-{}", s.key)),
                id: Bytes::from(format!("e{}", s.id)),
                time_ms: base - s.back,
                coords: Coords::new(TOPIC, 0, i as i64),
                value: serde_json::json!({ "total": s.total, "sku": format!("s{}", s.total % 4) }),
            }
        })
        .collect()
}

/// [`events`], with about one in twelve a tick ([`Event::tick`]) instead: the aggregations'
/// input, where a tick moves stream time and joins no key (a quiet input's stream time
/// advanced by the re-key loop).
fn events_and_ticks(specs: &[Spec]) -> Vec<Event> {
    events(specs)
        .into_iter()
        .zip(specs)
        .map(|(e, s)| {
            if s.id == 0 {
                Event::tick(e.time_ms, e.coords)
            } else {
                e
            }
        })
        .collect()
}

/// One step of the runtime: process up to `size` events; `fault` says what goes wrong after the
/// outputs were acknowledged downstream.
#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    /// Crash before the state commit: the batch is re-delivered from the store's offsets.
    CrashBeforeCommit,
    /// The consumer group is behind the store (crash after the state commit, before the
    /// offset commit): re-deliver from `back` records earlier.
    Redeliver(usize),
    /// The process restarts after the state commit: the store is closed and opened again
    /// (a fjall store then starts with an empty value cache).
    Restart,
}

fn plan() -> impl Strategy<Value = Vec<(usize, Fault)>> {
    prop::collection::vec(
        (
            1usize..9,
            prop_oneof![
                6 => Just(Fault::None),
                1 => Just(Fault::CrashBeforeCommit),
                1 => (1usize..10).prop_map(Fault::Redeliver),
                1 => Just(Fault::Restart),
            ],
        ),
        0..30,
    )
}

/// Drives an operator through the plan on an in-memory store; returns the store and its whole
/// changelog.
fn drive<O>(
    events: &[Event],
    plan: &[(usize, Fault)],
    step: impl FnMut(&MemoryStore, &[Event]) -> (O, WriteBatch),
    downstream: impl FnMut(O),
) -> (MemoryStore, Vec<ChangelogRecord>) {
    drive_on(
        MemoryStore::new("state"),
        |s| s,
        events,
        plan,
        step,
        downstream,
    )
}

/// [`drive`] on `store`; `reopen` closes a store and opens it again.
fn drive_on<S: StateStore, O>(
    mut store: S,
    mut reopen: impl FnMut(S) -> S,
    events: &[Event],
    plan: &[(usize, Fault)],
    mut step: impl FnMut(&S, &[Event]) -> (O, WriteBatch),
    mut downstream: impl FnMut(O),
) -> (S, Vec<ChangelogRecord>) {
    let mut changelog = Vec::new();
    let mut pos = 0usize;
    let mut steps = plan
        .iter()
        .copied()
        .chain(std::iter::repeat((8, Fault::None)));
    while pos < events.len() {
        let (size, fault) = steps.next().expect("endless");
        let end = (pos + size).min(events.len());
        let (outputs, state) = step(&store, &events[pos..end]);
        downstream(outputs);
        match fault {
            Fault::CrashBeforeCommit => {
                pos = committed(&store);
            }
            Fault::None | Fault::Redeliver(_) | Fault::Restart => {
                changelog.extend(store.commit(state).expect("commit"));
                pos = end;
                if let Fault::Redeliver(back) = fault {
                    pos = pos.saturating_sub(back);
                }
                if let Fault::Restart = fault {
                    store = reopen(store);
                }
            }
        }
    }
    (store, changelog)
}

fn committed(store: &dyn StateStore) -> usize {
    store
        .offsets()
        .unwrap()
        .get(&kontext_core::record::TopicPartition::new(TOPIC, 0))
        .map_or(0, |next| *next as usize)
}

fn assert_restores(store: &dyn StateStore, changelog: Vec<ChangelogRecord>) {
    let mut restored = MemoryStore::new("state");
    let tail = restored.restore(&mut changelog.into_iter()).unwrap();
    assert!(tail.is_empty());
    assert_eq!(restored.dump().unwrap(), store.dump().unwrap());
}

// ---------------------------------------------------------------- dedup

fn dedup_reference(events: &[Event], window: i64) -> BTreeSet<i64> {
    let mut forwarded: Vec<&Event> = Vec::new();
    let mut st = i64::MIN;
    for e in events {
        st = st.max(e.time_ms);
        let horizon = st - window;
        if e.time_ms < horizon {
            continue;
        }
        if !forwarded
            .iter()
            .any(|f| f.id == e.id && f.time_ms >= horizon)
        {
            forwarded.push(e);
        }
    }
    forwarded.iter().map(|e| e.coords.offset).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn dedup_forwards_exactly_what_the_reference_forwards(
        specs in specs(), plan in plan(), window in 0i64..60,
    ) {
        let events = events(&specs);
        let op = Deduplicate::new(DedupConfig { window_ms: window });
        let mut forwarded = BTreeSet::new();
        let (store, changelog) = drive(
            &events,
            &plan,
            |store, batch| {
                let out = op.process(store, batch).unwrap();
                let fwd: Vec<i64> = batch
                    .iter()
                    .zip(&out.decisions)
                    .filter(|(_, d)| **d == DedupDecision::Forward)
                    .map(|(e, _)| e.coords.offset)
                    .collect();
                (fwd, out.state)
            },
            |fwd| forwarded.extend(fwd),
        );
        prop_assert_eq!(forwarded, dedup_reference(&events, window));
        assert_restores(&store, changelog);
    }
}

// ---------------------------------------------------------------- aggregation

fn functions() -> Vec<(String, AggFn)> {
    vec![
        ("count".into(), AggFn::Count),
        ("sum".into(), AggFn::Sum(FieldPath::new("total"))),
        ("avg".into(), AggFn::Avg(FieldPath::new("total"))),
        ("min".into(), AggFn::Min(FieldPath::new("total"))),
        ("max".into(), AggFn::Max(FieldPath::new("total"))),
        ("latest".into(), AggFn::Latest(FieldPath::new("sku"))),
        ("skus".into(), AggFn::DistinctCount(FieldPath::new("sku"))),
    ]
}

/// The aggregate of a set of events, computed from scratch.
fn naive(events: &[&Event]) -> Vec<AggValue> {
    let totals: Vec<f64> = events
        .iter()
        .map(|e| e.value["total"].as_f64().unwrap())
        .collect();
    let sum: f64 = totals.iter().sum();
    let latest = events
        .iter()
        .max_by_key(|e| (e.time_ms, e.coords.offset))
        .map(|e| AggValue::Scalar(Scalar::Text(e.value["sku"].as_str().unwrap().into())));
    let skus: BTreeSet<&str> = events
        .iter()
        .map(|e| e.value["sku"].as_str().unwrap())
        .collect();
    vec![
        AggValue::Int(events.len() as u64),
        AggValue::Num(sum),
        if events.is_empty() {
            AggValue::Null
        } else {
            AggValue::Num(sum / events.len() as f64)
        },
        totals
            .iter()
            .copied()
            .reduce(f64::min)
            .map_or(AggValue::Null, AggValue::Num),
        totals
            .iter()
            .copied()
            .reduce(f64::max)
            .map_or(AggValue::Null, AggValue::Num),
        latest.unwrap_or(AggValue::Null),
        AggValue::Int(skus.len() as u64),
    ]
}

type Downstream = BTreeMap<(Bytes, i64, i64), (i64, Option<Vec<AggValue>>)>;

/// A versioned upsert: a value replaces the stored one only if its version is greater.
fn upsert(
    table: &mut Downstream,
    key: (Bytes, i64, i64),
    version: i64,
    value: Option<Vec<AggValue>>,
) {
    match table.get(&key) {
        Some((stored, _)) if *stored >= version => {}
        _ => {
            table.insert(key, (version, value));
        }
    }
}

/// The downstream table of an aggregation: (key, window start, window end) → values.
type Table = BTreeMap<(Bytes, i64, i64), Vec<AggValue>>;

fn run_aggregate(
    events: &[Event],
    plan: &[(usize, Fault)],
    config: AggregateConfig,
    by_key_only: bool,
) -> Table {
    run_aggregate_with_state(events, plan, config, by_key_only).0
}

/// [`run_aggregate`], and the store at the end.
fn run_aggregate_with_state(
    events: &[Event],
    plan: &[(usize, Fault)],
    config: AggregateConfig,
    by_key_only: bool,
) -> (Table, MemoryStore) {
    run_op_with_state(events, plan, Aggregate::new(config).unwrap(), by_key_only)
}

/// [`run_aggregate_with_state`] with an operator built by the caller.
fn run_op_with_state(
    events: &[Event],
    plan: &[(usize, Fault)],
    op: Aggregate,
    by_key_only: bool,
) -> (Table, MemoryStore) {
    run_op_on(
        MemoryStore::new("state"),
        |s| s,
        events,
        plan,
        op,
        by_key_only,
    )
}

/// [`run_op_with_state`] on a fjall store whose value cache holds about `budget` bytes, in
/// `dir`; a restart opens the store again in the same database.
fn run_op_on_fjall(
    dir: &std::path::Path,
    budget: u64,
    events: &[Event],
    plan: &[(usize, Fault)],
    op: Aggregate,
    by_key_only: bool,
) -> (Table, FjallStore) {
    let db = StateDb::open_with_value_cache(dir, budget).unwrap();
    let open = |db: &StateDb| {
        FjallStore::open_in(db, "state", "state", store::Durability::Process).unwrap()
    };
    let reopen = |store: FjallStore| {
        drop(store);
        open(&db)
    };
    run_op_on(open(&db), reopen, events, plan, op, by_key_only)
}

/// [`run_op_with_state`] on `store`.
fn run_op_on<S: StateStore>(
    store: S,
    reopen: impl FnMut(S) -> S,
    events: &[Event],
    plan: &[(usize, Fault)],
    op: Aggregate,
    by_key_only: bool,
) -> (Table, S) {
    let mut table = Downstream::new();
    let (store, changelog) = drive_on(
        store,
        reopen,
        events,
        plan,
        |store, batch| {
            let AggregateBatch { updates, state, .. } = op.process(store, batch).unwrap();
            (updates, state)
        },
        |updates| {
            for u in updates {
                let key = if by_key_only {
                    (u.key.clone(), 0, 0)
                } else {
                    (u.key.clone(), u.window.start, u.window.end)
                };
                upsert(&mut table, key, u.version.offset, u.values);
            }
        },
    );
    assert_restores(&store, changelog);
    let table = table
        .into_iter()
        .filter_map(|(k, (_, v))| Some((k, v?)))
        .collect();
    (table, store)
}

fn fixed_reference(
    events: &[Event],
    spec: WindowSpec,
    grace: i64,
) -> BTreeMap<(Bytes, i64, i64), Vec<AggValue>> {
    let mut members: BTreeMap<(Bytes, i64, i64), Vec<&Event>> = BTreeMap::new();
    let mut st = i64::MIN;
    for e in events {
        st = st.max(e.time_ms);
        if e.is_tick() {
            continue;
        }
        for w in spec.windows_for(e.time_ms) {
            if w.end + grace > st {
                members
                    .entry((e.key.clone(), w.start, w.end))
                    .or_default()
                    .push(e);
            }
        }
    }
    members.into_iter().map(|(k, es)| (k, naive(&es))).collect()
}

fn session_reference(
    events: &[Event],
    gap: i64,
    grace: i64,
) -> BTreeMap<(Bytes, i64, i64), Vec<AggValue>> {
    let mut accepted: BTreeMap<Bytes, Vec<&Event>> = BTreeMap::new();
    let mut st = i64::MIN;
    for e in events {
        st = st.max(e.time_ms);
        if e.time_ms >= st - grace && !e.is_tick() {
            accepted.entry(e.key.clone()).or_default().push(e);
        }
    }
    let mut out = BTreeMap::new();
    for (key, mut es) in accepted {
        es.sort_by_key(|e| e.time_ms);
        let mut session: Vec<&Event> = Vec::new();
        for e in es {
            if let Some(last) = session.last() {
                if e.time_ms - last.time_ms > gap {
                    let (s, t) = (session[0].time_ms, last.time_ms);
                    out.insert((key.clone(), s, t), naive(&session));
                    session.clear();
                }
            }
            session.push(e);
        }
        if let (Some(first), Some(last)) = (session.first(), session.last()) {
            out.insert((key.clone(), first.time_ms, last.time_ms), naive(&session));
        }
    }
    out
}

fn sliding_reference(events: &[Event], size: i64) -> BTreeMap<(Bytes, i64, i64), Vec<AggValue>> {
    let mut accepted: BTreeMap<Bytes, Vec<&Event>> = BTreeMap::new();
    let mut st = i64::MIN;
    for e in events {
        st = st.max(e.time_ms);
        if e.time_ms > st - size && !e.is_tick() {
            accepted.entry(e.key.clone()).or_default().push(e);
        }
    }
    accepted
        .into_iter()
        .map(|(key, es)| {
            let live: Vec<&Event> = es.into_iter().filter(|e| e.time_ms > st - size).collect();
            ((key, 0, 0), naive(&live))
        })
        .collect()
}

fn config(window: WindowSpec, grace_ms: i64, emit: Emit) -> AggregateConfig {
    AggregateConfig {
        window,
        grace_ms,
        functions: functions(),
        emit,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tumbling_windows_match_the_reference(
        specs in specs(), plan in plan(), size in 1i64..40, grace in 0i64..30,
    ) {
        let events = events_and_ticks(&specs);
        let spec = WindowSpec::Tumbling { size_ms: size };
        let (table, store) =
            run_aggregate_with_state(&events, &plan, config(spec, grace, Emit::OnUpdate), false);
        let reference = fixed_reference(&events, spec, grace);
        // The state holds the open windows and nothing else (closed ones were deleted).
        let st = events.iter().map(|e| e.time_ms).max().unwrap_or(i64::MIN);
        let open = reference.keys().filter(|(_, _, end)| end + grace > st).count();
        prop_assert_eq!(store.prefix(b"a").count(), open);
        prop_assert_eq!(table, reference);
    }

    #[test]
    fn tumbling_windows_emitted_on_close_are_the_closed_reference_windows(
        specs in specs(), plan in plan(), size in 1i64..40, grace in 0i64..30,
    ) {
        let events = events_and_ticks(&specs);
        let spec = WindowSpec::Tumbling { size_ms: size };
        let st = events.iter().map(|e| e.time_ms).max().unwrap_or(i64::MIN);
        let mut expected = fixed_reference(&events, spec, grace);
        expected.retain(|(_, _, end), _| end + grace <= st);
        prop_assert_eq!(
            run_aggregate(&events, &plan, config(spec, grace, Emit::OnClose), false),
            expected
        );
    }

    #[test]
    fn hopping_windows_match_the_reference(
        specs in specs(), plan in plan(), size in 1i64..40, hops in 1i64..5, grace in 0i64..30,
    ) {
        let events = events_and_ticks(&specs);
        let advance = (size / hops).max(1);
        let spec = WindowSpec::Hopping { size_ms: size, advance_ms: advance };
        let (table, store) =
            run_aggregate_with_state(&events, &plan, config(spec, grace, Emit::OnUpdate), false);
        prop_assert_eq!(table, fixed_reference(&events, spec, grace));
        let st = events.iter().map(|e| e.time_ms).max().unwrap_or(i64::MIN);
        // The state holds one pane (gcd(size, advance) of event time) per key for every pane
        // whose last window is still open, and nothing else.
        let pane = (1..=advance).rev().find(|p| size % p == 0 && advance % p == 0).unwrap();
        let is_live = |start: i64| start.div_euclid(advance) * advance + size + grace > st;
        let live: BTreeSet<(Bytes, i64)> = events
            .iter()
            .filter(|e| !e.is_tick())
            .map(|e| (e.key.clone(), e.time_ms.div_euclid(pane) * pane))
            .filter(|(_, start)| is_live(*start))
            .collect();
        if pane == size {
            // A pane as large as the window is a tumbling window's accumulator.
            prop_assert_eq!(store.prefix(b"a").count(), live.len());
        } else {
            // One entry per key (`P len key` → `start acc` per pane). A pane whose windows
            // all closed may wait for its key's next write or index mention, but no entry is
            // left without a live pane.
            let mut stored = BTreeSet::new();
            for entry in store.prefix(b"P") {
                let (pkey, bytes) = entry.unwrap();
                let key = Bytes::copy_from_slice(&pkey[5..]);
                let mut r = kontext_process::codec::Reader::new(&bytes);
                let mut starts = Vec::new();
                while !r.is_empty() {
                    starts.push(r.i64().unwrap());
                    r.bytes().unwrap();
                }
                prop_assert!(starts.iter().any(|s| is_live(*s)), "{key:?}: {starts:?}");
                stored.extend(starts.into_iter().filter(|s| is_live(*s)).map(|s| (key.clone(), s)));
            }
            prop_assert_eq!(stored, live);
        }
    }

    #[test]
    fn a_quiet_keys_roll_depends_on_its_events_and_the_time_only(
        specs in specs(), plan in plan(), size in 1i64..40, hops in 1i64..5, grace in 0i64..30,
        a in 0i64..80, b in 0i64..80, pick in 0usize..4,
    ) {
        let events = events_and_ticks(&specs);
        let advance = (size / hops).max(1);
        let spec = WindowSpec::Hopping { size_ms: size, advance_ms: advance };
        let (_, store) =
            run_aggregate_with_state(&events, &plan, config(spec, grace, Emit::OnUpdate), false);
        let reference = fixed_reference(&events, spec, grace);
        let op = Aggregate::new(config(spec, grace, Emit::OnUpdate)).unwrap();
        let st = events.iter().map(|e| e.time_ms).max().unwrap_or(0);
        let (t1, t2) = (st + a.min(b), st + a.max(b));
        let none = WriteBatch::default();
        // What a key shows at `t`, rolled from `shown` as the processor does: once per time
        // it is due (a move leaves it due only later). `Some(values)` when it moved.
        type Settled = (Window, Option<Option<Vec<AggValue>>>, Option<i64>);
        let settle = |key: &Bytes, shown: Window, t: i64| -> Settled {
            match op.roll(&store, &none, key, shown.end, t, false).unwrap().unwrap() {
                Roll::Keep { until } => {
                    assert!(until > t, "kept until {until}, at {t}");
                    (shown, None, Some(until))
                }
                Roll::Move { window, values, until } => {
                    assert!(until.is_none_or(|u| u > t), "moved until {until:?}, at {t}");
                    (window, Some(values), until)
                }
            }
        };
        let keys: BTreeSet<&Bytes> = events.iter().filter(|e| !e.is_tick()).map(|e| &e.key).collect();
        for key in keys {
            // The window the processor shows after one of the key's events still counted:
            // mostly its newest, sometimes an earlier one (a late event can leave a pane
            // after the window shown, when its own window had closed while later ones had not;
            // not with tumbling windows, where the later window would be the one shown).
            let pick = if advance == size { 0 } else { pick };
            let mut counted: Vec<i64> = events
                .iter()
                .filter(|e| e.key == *key && spec.windows_for(e.time_ms).iter().any(|w| w.end + grace > st))
                .map(|e| e.time_ms)
                .collect();
            counted.sort_unstable();
            let Some(&shown_for) = counted.iter().rev().nth(pick.saturating_sub(1).min(counted.len().saturating_sub(1))) else {
                continue;
            };
            let end = spec.closing_next(shown_for).unwrap();
            let shown = Window { start: end - size, end };
            let (once, once_values, _) = settle(key, shown, t2);
            let (first, first_values, until) = settle(key, shown, t1);
            let (twice, twice_values) = match until {
                Some(until) if until <= t2 => {
                    let (w, v, _) = settle(key, first, t2);
                    (w, v.or(first_values))
                }
                _ => (first, first_values),
            };
            prop_assert_eq!(once, twice, "{:?}: {:?} at {} then {}", key, shown, t1, t2);
            prop_assert_eq!(&once_values, &twice_values);
            // A window moved to, and still open, holds what the reference counts in it.
            if let Some(values) = once_values.filter(|_| once.end + grace > st) {
                prop_assert_eq!(values.as_ref(), reference.get(&(key.clone(), once.start, once.end)));
            }
        }
    }

    #[test]
    fn hopping_windows_emitted_on_close_are_the_closed_reference_windows(
        specs in specs(), plan in plan(), size in 1i64..40, hops in 1i64..5, grace in 0i64..30,
    ) {
        let events = events_and_ticks(&specs);
        let advance = (size / hops).max(1);
        let spec = WindowSpec::Hopping { size_ms: size, advance_ms: advance };
        let st = events.iter().map(|e| e.time_ms).max().unwrap_or(i64::MIN);
        let mut expected = fixed_reference(&events, spec, grace);
        expected.retain(|(_, _, end), _| end + grace <= st);
        prop_assert_eq!(
            run_aggregate(&events, &plan, config(spec, grace, Emit::OnClose), false),
            expected
        );
    }

    #[test]
    fn session_windows_match_the_reference(
        specs in specs(), plan in plan(), gap in 0i64..20, grace in 0i64..30,
    ) {
        let events = events_and_ticks(&specs);
        prop_assert_eq!(
            run_aggregate(&events, &plan, config(WindowSpec::Session { gap_ms: gap }, grace, Emit::OnUpdate), false),
            session_reference(&events, gap, grace)
        );
    }

    #[test]
    fn sliding_windows_match_the_reference(
        specs in specs(), plan in plan(), size in 1i64..60,
        inline_limit in prop_oneof![Just(16usize), 0usize..5],
    ) {
        let events = events_and_ticks(&specs);
        let op = Aggregate::new(config(WindowSpec::Sliding { size_ms: size }, 0, Emit::OnUpdate))
            .unwrap()
            .with_sliding_inline_limit(inline_limit);
        let (table, store) = run_op_with_state(&events, &plan, op, true);
        prop_assert_eq!(table, sliding_reference(&events, size));
        // The state retains exactly the events still in their key's window, inside their
        // key's entry or in entries of their own.
        let st = events.iter().map(|e| e.time_ms).max().unwrap_or(i64::MIN);
        let mut in_window: Vec<(Bytes, i64, i64)> = events
            .iter()
            .filter(|e| e.time_ms > st - size && !e.is_tick())
            .map(|e| (e.key.clone(), e.time_ms, e.coords.offset))
            .collect();
        in_window.sort();
        prop_assert_eq!(Aggregate::sliding_retained(&store).unwrap(), in_window);
    }
}

proptest! {
    // Each case opens a fjall database.
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// The windowed aggregations on fjall, through a value cache that holds every key or so
    /// few that it evicts all the time, across crashes before the commit (batches never
    /// applied), re-deliveries and restarts: the same downstream table as the reference.
    #[test]
    fn windows_on_fjall_through_its_value_cache_match_the_reference(
        specs in specs(), plan in plan(), size in 1i64..40, hops in 1i64..5, grace in 0i64..30,
        budget in prop_oneof![Just(1u64 << 20), Just(600u64)],
        sliding in any::<bool>(), inline_limit in prop_oneof![Just(16usize), 0usize..3],
    ) {
        let events = events_and_ticks(&specs);
        let dir = tempfile::tempdir().unwrap();
        if sliding {
            let op = Aggregate::new(config(WindowSpec::Sliding { size_ms: size }, 0, Emit::OnUpdate))
                .unwrap()
                .with_sliding_inline_limit(inline_limit);
            let (table, _) = run_op_on_fjall(dir.path(), budget, &events, &plan, op, true);
            prop_assert_eq!(table, sliding_reference(&events, size));
        } else {
            let advance = (size / hops).max(1);
            let spec = WindowSpec::Hopping { size_ms: size, advance_ms: advance };
            let op = Aggregate::new(config(spec, grace, Emit::OnUpdate)).unwrap();
            let (table, _) = run_op_on_fjall(dir.path(), budget, &events, &plan, op, false);
            prop_assert_eq!(table, fixed_reference(&events, spec, grace));
        }
    }
}

// ---------------------------------------------------------------- join

#[derive(Debug, Clone)]
enum Step {
    Table { key: u8, value: Option<u8> },
    Stream { key: u8 },
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            (0u8..4, prop::option::weighted(0.8, 0u8..5))
                .prop_map(|(key, value)| Step::Table { key, value }),
            (0u8..5).prop_map(|key| Step::Stream { key }),
        ],
        0..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn join_matches_the_table_as_of_each_event(
        steps in steps(), by_field in any::<bool>(), inner in any::<bool>(), crash_every in 2usize..6,
    ) {
        let join = EnrichmentJoin::new(JoinConfig {
            kind: if inner { JoinKind::Inner } else { JoinKind::Left },
            key: if by_field { JoinKey::Field(FieldPath::new("customer_id")) } else { JoinKey::RecordKey },
            field: "customer".into(),
            table: Default::default(),
        });
        // Reference: replay the steps against a map.
        let mut table: BTreeMap<String, String> = BTreeMap::new();
        let mut expected: BTreeMap<i64, Option<Bytes>> = BTreeMap::new();
        let (mut table_offset, mut stream_offset) = (0i64, 0i64);
        let mut runs: Vec<(bool, Vec<TableUpdate>, Vec<Event>)> = Vec::new();
        for step in &steps {
            match step {
                Step::Table { key, value } => {
                    let key = format!("C-{key}");
                    match value {
                        Some(v) => { table.insert(key.clone(), format!("{{\"v\":{v}}}")); }
                        None => { table.remove(&key); }
                    }
                    let update = TableUpdate {
                        key: Bytes::from(key),
                        value: value.map(|v| Bytes::from(format!("{{\"v\":{v}}}"))),
                        coords: Coords::new("context.customers", 0, table_offset),
                    };
                    table_offset += 1;
                    match runs.last_mut() {
                        Some((true, updates, _)) => updates.push(update),
                        _ => runs.push((true, vec![update], vec![])),
                    }
                }
                Step::Stream { key } => {
                    let customer = format!("C-{key}");
                    let event = Event {
                        key: Bytes::from(if by_field { format!("O-{stream_offset}") } else { customer.clone() }),
                        id: Bytes::from(format!("o{stream_offset}")),
                        time_ms: stream_offset,
                        coords: Coords::new(TOPIC, 0, stream_offset),
                        value: serde_json::json!({ "customer_id": customer }),
                    };
                    let right = table.get(&customer).map(|v| Bytes::from(v.clone()));
                    if right.is_some() || !inner {
                        expected.insert(stream_offset, right);
                    }
                    stream_offset += 1;
                    match runs.last_mut() {
                        Some((false, _, events)) => events.push(event),
                        _ => runs.push((false, vec![], vec![event])),
                    }
                }
            }
        }
        let mut store = MemoryStore::new("customers");
        let mut changelog = Vec::new();
        let mut got: BTreeMap<i64, Option<Bytes>> = BTreeMap::new();
        for (n, (is_table, updates, events)) in runs.iter().enumerate() {
            if *is_table {
                // A crash before commit, then the re-delivery, every few runs.
                if n % crash_every == 0 {
                    let _lost = join.apply_table(&store, updates).unwrap();
                }
                let batch = join.apply_table(&store, updates).unwrap();
                changelog.extend(store.commit(batch.state).unwrap());
                // Re-delivered table records are skipped.
                let again = join.apply_table(&store, updates).unwrap();
                prop_assert_eq!(again.applied, 0);
            } else {
                if n % crash_every == 0 {
                    let lost = join.process(&store, events).unwrap();
                    for o in lost.outputs { got.insert(o.version.offset, o.right); }
                }
                let batch = join.process(&store, events).unwrap();
                for o in batch.outputs { got.insert(o.version.offset, o.right); }
                changelog.extend(store.commit(batch.state).unwrap());
            }
        }
        prop_assert_eq!(got, expected);
        assert_restores(&store, changelog);
    }
}

// ------------------------------------------- join over one merged input (the runtime's form)

#[derive(Debug, Clone)]
enum MergedStep {
    /// A partial update of customer `key`: field `a` or `b` set to `value`, or a delete.
    Table {
        key: u8,
        field: bool,
        value: Option<u8>,
    },
    Stream {
        key: Option<u8>,
    },
}

fn merged_steps() -> impl Strategy<Value = Vec<MergedStep>> {
    prop::collection::vec(
        prop_oneof![
            (0u8..4, any::<bool>(), prop::option::weighted(0.85, 0u8..5))
                .prop_map(|(key, field, value)| MergedStep::Table { key, field, value }),
            prop::option::weighted(0.9, 0u8..5).prop_map(|key| MergedStep::Stream { key }),
        ],
        0..80,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `process_ordered` with partial table updates merged per key: every event sees the merged
    /// row as of its position, whatever the batch cuts and crashes (a batch processed and lost,
    /// then re-processed from the store's offsets with another cut).
    #[test]
    fn ordered_join_with_merged_rows_matches_the_reference(
        steps in merged_steps(), inner in any::<bool>(),
        cuts in prop::collection::vec(1usize..12, 1..20), crash_every in 2usize..6,
    ) {
        let join = EnrichmentJoin::new(JoinConfig {
            kind: if inner { JoinKind::Inner } else { JoinKind::Left },
            key: JoinKey::Field(FieldPath::new("customer_id")),
            field: "customer".into(),
            table: TableMode::Merge,
        });
        let topic = "p-repartition";
        let mut table: BTreeMap<String, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
        let mut expected: BTreeMap<i64, Option<serde_json::Value>> = BTreeMap::new();
        let mut inputs = Vec::new();
        for (offset, step) in steps.iter().enumerate() {
            let offset = offset as i64;
            let coords = Coords::new(topic, 0, offset);
            match step {
                MergedStep::Table { key, field, value } => {
                    let key = format!("C-{key}");
                    let name = if *field { "a" } else { "b" };
                    let value = value.map(|v| serde_json::json!({ name: v }));
                    match &value {
                        Some(v) => table.entry(key.clone()).or_default().extend(v.as_object().unwrap().clone()),
                        None => { table.remove(&key); }
                    }
                    inputs.push(JoinInput::Table(TableUpdate {
                        key: Bytes::from(key),
                        value: value.map(|v| Bytes::from(v.to_string())),
                        coords,
                    }));
                }
                MergedStep::Stream { key } => {
                    let value = match key {
                        Some(k) => serde_json::json!({ "customer_id": format!("C-{k}") }),
                        None => serde_json::json!({}),
                    };
                    let right = key.and_then(|k| table.get(&format!("C-{k}")).cloned());
                    match (key, &right) {
                        (None, _) if !inner => { expected.insert(offset, None); }
                        (Some(_), None) if !inner => { expected.insert(offset, None); }
                        (Some(_), Some(row)) => {
                            expected.insert(offset, Some(serde_json::Value::Object(row.clone())));
                        }
                        _ => {}
                    }
                    inputs.push(JoinInput::Stream(Event {
                        key: Bytes::from(format!("k{offset}")),
                        id: Bytes::from(format!("o{offset}")),
                        time_ms: offset,
                        coords,
                        value,
                    }));
                }
            }
        }
        let mut store = MemoryStore::new("join");
        let mut changelog = Vec::new();
        let mut got: BTreeMap<i64, Option<serde_json::Value>> = BTreeMap::new();
        let record = |batch: &JoinBatch, got: &mut BTreeMap<i64, Option<serde_json::Value>>| {
            for o in &batch.outputs {
                let right = o.right.as_ref().map(|b| serde_json::from_slice(b).unwrap());
                // A replay must give what the lost attempt gave.
                if let Some(before) = got.insert(o.version.offset, right.clone()) {
                    assert_eq!(before, right, "offset {}", o.version.offset);
                }
            }
        };
        let (mut at, mut n) = (0usize, 0usize);
        while at < inputs.len() {
            let cut = cuts[n % cuts.len()];
            if n % crash_every == 0 {
                // Lost: processed with another cut, never committed.
                let end = (at + cut + 3).min(inputs.len());
                let lost = join.process_ordered(&store, &inputs[at..end]).unwrap();
                record(&lost, &mut got);
            }
            let end = (at + cut).min(inputs.len());
            let batch = join.process_ordered(&store, &inputs[at..end]).unwrap();
            record(&batch, &mut got);
            changelog.extend(store.commit(batch.state).unwrap());
            // Re-delivered, the whole batch is already applied.
            let again = join.process_ordered(&store, &inputs[at..end]).unwrap();
            prop_assert!(again.outputs.is_empty());
            prop_assert_eq!(again.table_applied, 0);
            at = end;
            n += 1;
        }
        prop_assert_eq!(got, expected);
        assert_restores(&store, changelog);
    }
}
