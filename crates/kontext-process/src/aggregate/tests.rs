use bytes::Bytes;

use super::*;
use crate::codec::i64_from_sortable;
use crate::store::MemoryStore;

fn ev(key: &str, t: i64, offset: i64, total: f64) -> Event {
    Event {
        key: Bytes::copy_from_slice(key.as_bytes()),
        id: Bytes::from(format!("e{offset}")),
        time_ms: t,
        coords: Coords::new("orders", 0, offset),
        value: serde_json::json!({ "total": total, "sku": format!("s{}", total as i64 % 3) }),
    }
}

fn config(window: WindowSpec, grace_ms: i64) -> AggregateConfig {
    AggregateConfig {
        window,
        grace_ms,
        functions: vec![
            ("count".into(), AggFn::Count),
            ("sum".into(), AggFn::Sum(FieldPath::new("total"))),
            ("avg".into(), AggFn::Avg(FieldPath::new("total"))),
            ("min".into(), AggFn::Min(FieldPath::new("total"))),
            ("max".into(), AggFn::Max(FieldPath::new("total"))),
            ("latest".into(), AggFn::Latest(FieldPath::new("sku"))),
            ("skus".into(), AggFn::DistinctCount(FieldPath::new("sku"))),
        ],
        emit: Emit::OnUpdate,
    }
}

#[test]
fn tumbling_windows_emit_full_values_and_drop_events_past_grace() {
    let op = Aggregate::new(config(WindowSpec::Tumbling { size_ms: 10 }, 5)).unwrap();
    let mut store = MemoryStore::new("agg");
    let batch = op
        .process(
            &store,
            &[
                ev("c1", 1, 0, 10.0),
                ev("c1", 4, 1, 20.0),
                ev("c1", 12, 2, 5.0),
            ],
        )
        .unwrap();
    assert_eq!(batch.updates.len(), 2);
    let first = &batch.updates[0];
    assert_eq!(first.window, Window { start: 0, end: 10 });
    assert_eq!(
        first.values.as_deref().unwrap()[..5],
        [
            AggValue::Int(2),
            AggValue::Num(30.0),
            AggValue::Num(15.0),
            AggValue::Num(10.0),
            AggValue::Num(20.0)
        ]
    );
    assert_eq!(first.version.offset, 1);
    store.commit(batch.state).unwrap();
    // st = 16 after this one: [0,10) closes at 10 + 5 = 15 <= 16, so t=9 is late.
    let batch = op
        .process(&store, &[ev("c1", 16, 3, 1.0), ev("c1", 9, 4, 1.0)])
        .unwrap();
    assert_eq!(batch.dropped_late, 1);
    assert_eq!(batch.updates.len(), 1);
    assert_eq!(
        batch.updates[0].values.as_deref().unwrap()[0],
        AggValue::Int(2)
    );
}

#[test]
fn tumbling_state_of_the_per_window_index_layout_still_closes() {
    let mut cfg = config(WindowSpec::Tumbling { size_ms: 10 }, 0);
    cfg.emit = Emit::OnClose;
    let op = Aggregate::new(cfg).unwrap();
    let mut store = MemoryStore::new("agg");
    // What the earlier layout held for one event of c1 at t=3: the accumulator and an index
    // entry `x end key start` with an empty value.
    let mut acc = op.new_acc(0);
    acc.add(&op.inputs(&ev("c1", 3, 0, 7.0)), 3, 0);
    let skey = keyed(b'a', b"c1", 0);
    let mut old = WriteBatch::default();
    old.put(&skey, &acc.encode());
    old.put(&index_key(b'x', 10, &skey[1..]), &[]);
    old.set_offset(kontext_core::record::TopicPartition::new("orders", 0), 1);
    store.commit(old).unwrap();
    // c2 opens [10, 20) in the new layout; stream time 25 closes both windows.
    let batch = op
        .process(&store, &[ev("c2", 12, 1, 1.0), ev("c2", 25, 2, 1.0)])
        .unwrap();
    let closed: Vec<_> = batch
        .updates
        .iter()
        .map(|u| {
            (
                u.key.clone(),
                u.window.start,
                u.values.as_ref().unwrap()[1].clone(),
            )
        })
        .collect();
    assert_eq!(
        closed,
        vec![
            (Bytes::from_static(b"c1"), 0, AggValue::Num(7.0)),
            (Bytes::from_static(b"c2"), 10, AggValue::Num(1.0)),
        ]
    );
    store.commit(batch.state).unwrap();
    // Left: c2's open window [20, 30), its index entry, where the expiry scan ended, the batch
    // number and the offsets.
    let left: Vec<u8> = store
        .dump()
        .unwrap()
        .iter()
        .map(|(k, _)| k[0])
        .filter(|tag| *tag != 0)
        .collect();
    assert_eq!(left, b"acnx");
}

#[test]
fn sliding_state_of_the_per_event_index_layout_still_decays() {
    let op = Aggregate::new(config(WindowSpec::Sliding { size_ms: 10 }, 0)).unwrap();
    let mut store = MemoryStore::new("agg");
    // What the earlier layout held for c1's event at t=3: accumulator, inputs, and an index
    // entry `q time key offset` with an empty value.
    let first = ev("c1", 3, 0, 7.0);
    let mut acc = op.new_acc(0);
    acc.add(&op.inputs(&first), 3, 0);
    let mut old = WriteBatch::default();
    old.put(&key_prefix(b'a', b"c1"), &acc.encode());
    let tail = retained_tail(b"c1", 3, 0);
    old.put(
        &[b"r".as_slice(), &tail].concat(),
        &encode_inputs(&op.inputs(&first)),
    );
    let mut index = b"q".to_vec();
    index.extend_from_slice(&i64_sortable(3));
    index.extend_from_slice(&2u32.to_le_bytes());
    index.extend_from_slice(b"c1");
    index.extend_from_slice(&0i64.to_be_bytes());
    old.put(&index, &[]);
    old.set_offset(kontext_core::record::TopicPartition::new("orders", 0), 1);
    store.commit(old).unwrap();
    // c1 again at 8: both in the window; sum 7 + 2.
    let batch = op.process(&store, &[ev("c1", 8, 1, 2.0)]).unwrap();
    assert_eq!(
        batch.updates[0].values.as_ref().unwrap()[1],
        AggValue::Num(9.0)
    );
    store.commit(batch.state).unwrap();
    // Stream time 14: the old-layout event (t=3 <= 4) leaves, the new one stays.
    let batch = op.process(&store, &[ev("c2", 14, 2, 1.0)]).unwrap();
    let c1 = batch.updates.iter().find(|u| u.key == "c1").unwrap();
    assert_eq!(c1.values.as_ref().unwrap()[1], AggValue::Num(2.0));
    store.commit(batch.state).unwrap();
    // c1's events moved inside its entry at its first batch; none is left in `r` entries.
    assert_eq!(store.prefix(b"r").count(), 0);
    assert_eq!(store.get(&index).unwrap(), None);
    let c1 = Bytes::from("c1");
    let c2 = Bytes::from("c2");
    assert_eq!(
        Aggregate::sliding_retained(&store).unwrap(),
        vec![(c1, 8, 1), (c2, 14, 2)]
    );
    // Stream time 30: everything has left; only the batch number and metadata remain.
    let batch = op.process(&store, &[ev("c3", 30, 3, 1.0)]).unwrap();
    store.commit(batch.state).unwrap();
    assert_eq!(
        Aggregate::sliding_retained(&store).unwrap().len(),
        1,
        "c3's own event"
    );
    assert_eq!(store.prefix(b"a").count(), 1, "c3's own entry");
    assert_eq!(store.prefix(b"q").count(), 1, "c3's own index entry");
}

/// The values of the sliding updates of `c1` in `batch`: (count, sum, min, max).
fn c1_values(batch: &AggregateBatch) -> (AggValue, AggValue, AggValue, AggValue) {
    let c1 = batch.updates.iter().find(|u| u.key == "c1").unwrap();
    let v = c1.values.clone().unwrap();
    (v[0].clone(), v[1].clone(), v[3].clone(), v[4].clone())
}

#[test]
fn a_leaving_event_that_held_the_minimum_or_maximum_gives_way_to_the_next() {
    for limit in [INLINE_LIMIT, 0] {
        let op = Aggregate::new(config(WindowSpec::Sliding { size_ms: 10 }, 0))
            .unwrap()
            .with_sliding_inline_limit(limit);
        let mut store = MemoryStore::new("agg");
        let events = [
            ev("c1", 0, 0, 1.0),
            ev("c1", 1, 1, 9.0),
            ev("c1", 2, 2, 5.0),
            ev("c1", 3, 3, 7.0),
        ];
        let batch = op.process(&store, &events).unwrap();
        store.commit(batch.state).unwrap();
        let (num, null) = (AggValue::Num, AggValue::Null);
        // (stream time, expected count, sum, min and max of c1)
        let steps = [
            // The event at 0, the minimum, leaves.
            (10, (AggValue::Int(3), num(21.0), num(5.0), num(9.0))),
            // The event at 1, the maximum, leaves.
            (11, (AggValue::Int(2), num(12.0), num(5.0), num(7.0))),
            // Both others leave; the key's entry goes.
            (13, (AggValue::Int(0), num(0.0), null.clone(), null.clone())),
        ];
        for (offset, (st, expected)) in (4..).zip(steps) {
            let batch = op.process(&store, &[ev("c2", st, offset, 0.0)]).unwrap();
            assert_eq!(
                c1_values(&batch),
                expected,
                "limit {limit}, stream time {st}"
            );
            store.commit(batch.state).unwrap();
        }
        assert_eq!(store.get(&key_prefix(b'a', b"c1")).unwrap(), None);
    }
}

#[test]
fn a_sliding_key_moves_out_of_its_entry_and_back() {
    let op = Aggregate::new(config(WindowSpec::Sliding { size_ms: 100 }, 0))
        .unwrap()
        .with_sliding_inline_limit(2);
    let mut store = MemoryStore::new("agg");
    let layout = |store: &MemoryStore| {
        let bytes = store.get(&key_prefix(b'a', b"c1")).unwrap().unwrap();
        let kept = decode_sliding_entry(&bytes).unwrap().1;
        (kept.map(|k| k.len()), store.prefix(b"r").count())
    };
    let batch = op
        .process(&store, &[ev("c1", 0, 0, 3.0), ev("c1", 10, 1, 8.0)])
        .unwrap();
    store.commit(batch.state).unwrap();
    assert_eq!(layout(&store), (Some(2), 0), "two events fit inside");
    let batch = op.process(&store, &[ev("c1", 20, 2, 4.0)]).unwrap();
    store.commit(batch.state).unwrap();
    assert_eq!(layout(&store), (None, 3), "a third one moves them out");
    // Stream time 110: the events at 0 and 10 (the maximum) leave; one is back inside.
    let batch = op.process(&store, &[ev("c2", 110, 3, 1.0)]).unwrap();
    assert_eq!(
        c1_values(&batch),
        (
            AggValue::Int(1),
            AggValue::Num(4.0),
            AggValue::Num(4.0),
            AggValue::Num(4.0)
        )
    );
    store.commit(batch.state).unwrap();
    assert_eq!(layout(&store), (Some(1), 0));
    let batch = op.process(&store, &[ev("c1", 111, 4, 6.0)]).unwrap();
    assert_eq!(c1_values(&batch).1, AggValue::Num(10.0));
    store.commit(batch.state).unwrap();
    assert_eq!(layout(&store), (Some(2), 0));
}

#[test]
fn emit_on_close_emits_only_final_values() {
    let mut cfg = config(WindowSpec::Tumbling { size_ms: 10 }, 0);
    cfg.emit = Emit::OnClose;
    let op = Aggregate::new(cfg).unwrap();
    let mut store = MemoryStore::new("agg");
    let batch = op
        .process(&store, &[ev("c1", 1, 0, 1.0), ev("c1", 2, 1, 1.0)])
        .unwrap();
    assert!(batch.updates.is_empty());
    store.commit(batch.state).unwrap();
    let batch = op.process(&store, &[ev("c2", 10, 2, 1.0)]).unwrap();
    assert_eq!(batch.updates.len(), 1);
    assert!(batch.updates[0].closed);
    assert_eq!(batch.updates[0].events, 2);
    assert_eq!(batch.updates[0].version.offset, 1);
}

#[test]
fn sessions_merge_and_tombstone_the_absorbed_session() {
    let op = Aggregate::new(config(WindowSpec::Session { gap_ms: 5 }, 100)).unwrap();
    let store = MemoryStore::new("agg");
    let batch = op
        .process(
            &store,
            &[
                ev("c1", 0, 0, 1.0),
                ev("c1", 20, 1, 1.0),
                ev("c1", 10, 2, 1.0),
                ev("c1", 15, 3, 1.0),
            ],
        )
        .unwrap();
    let live: Vec<_> = batch
        .updates
        .iter()
        .filter(|u| u.values.is_some())
        .map(|u| (u.window, u.events))
        .collect();
    assert!(
        live.contains(&(Window { start: 10, end: 20 }, 3)),
        "{live:?}"
    );
    assert!(batch
        .updates
        .iter()
        .any(|u| u.values.is_none() && u.window == Window { start: 20, end: 20 }));
}

/// A key first seen after a restart with a larger grace, below where the expiry scan stopped
/// before the restart, still has its entry deleted once its windows close (its mention was
/// filed after the scan, under the scan's position, and never came due).
#[test]
fn a_key_created_after_a_restart_with_a_larger_grace_expires() {
    let mut store = MemoryStore::new("agg");
    for (grace, event) in [
        (0, ev("c0", 100, 0, 1.0)),
        (29, ev("c1", 75, 1, 1.0)),
        (29, ev("c0", 200, 2, 1.0)),
        (29, ev("c0", 1_000, 3, 1.0)),
    ] {
        let op = Aggregate::new(config(HOPPING, grace)).unwrap();
        let out = op.process(&store, &[event]).unwrap();
        store.commit(out.state).unwrap();
    }
    let keys: Vec<Bytes> = store
        .prefix(b"P")
        .map(|e| e.unwrap().0.slice(5..))
        .collect();
    assert_eq!(keys, vec![Bytes::from("c0")]);
    assert_every_key_is_mentioned(&store);
}

/// A window closed before a restart stays closed after it, whatever the new grace: a late
/// event the larger grace would admit is dropped, where it used to open the closed window
/// again with only itself in it.
#[test]
fn a_restart_with_a_larger_grace_does_not_reopen_closed_windows() {
    let session = WindowSpec::Session { gap_ms: 5 };
    for spec in [WindowSpec::Tumbling { size_ms: 10 }, HOPPING, session] {
        for emit in [Emit::OnUpdate, Emit::OnClose] {
            let mut store = MemoryStore::new("agg");
            let on = |grace| {
                Aggregate::new(AggregateConfig {
                    emit,
                    ..config(spec, grace)
                })
            };
            let first = on(0).unwrap();
            let out = first
                .process(&store, &[ev("c1", 3, 0, 1.0), ev("c1", 4, 1, 2.0)])
                .unwrap();
            store.commit(out.state).unwrap();
            // Stream time 100 closes every window and session of c1.
            let out = first.process(&store, &[ev("c2", 100, 2, 1.0)]).unwrap();
            store.commit(out.state).unwrap();
            // Restarted with a grace that would admit t = 5 (100 - 200 < 5).
            let out = on(200)
                .unwrap()
                .process(&store, &[ev("c1", 5, 3, 7.0)])
                .unwrap();
            let reopened: Vec<_> = out.updates.iter().filter(|u| u.key == "c1").collect();
            assert!(reopened.is_empty(), "{spec:?} {emit:?}: {reopened:?}");
            assert_eq!(out.dropped_late, 1, "{spec:?} {emit:?}");
            store.commit(out.state).unwrap();
        }
    }
}

/// A migration in a batch that admits no event (all re-delivered) and finds no stream time
/// (a store of an early version) still writes the sessions it moved.
#[test]
fn a_session_migration_without_admitted_events_keeps_the_sessions() {
    let op = Aggregate::new(config(WindowSpec::Session { gap_ms: 5 }, 100)).unwrap();
    let mut store = MemoryStore::new("agg");
    let events = [
        ev("c1", 0, 0, 1.0),
        ev("c1", 3, 1, 2.0),
        ev("c2", 4, 2, 1.0),
    ];
    let out = op.process(&store, &events).unwrap();
    store.commit(out.state).unwrap();
    let before = sessions_of(&store);
    assert_eq!(before.len(), 2);
    downgrade_sessions(&mut store);
    store.delete(b"\x00m").unwrap();
    let out = op.process(&store, &events).unwrap();
    assert_eq!(out.already_applied, 3);
    store.commit(out.state).unwrap();
    assert_eq!(sessions_of(&store), before);
    assert_eq!(store.prefix(b"s").count(), 0);
}

#[test]
fn sliding_values_decay_as_stream_time_passes() {
    let op = Aggregate::new(config(WindowSpec::Sliding { size_ms: 100 }, 0)).unwrap();
    let mut store = MemoryStore::new("agg");
    let batch = op
        .process(&store, &[ev("c1", 0, 0, 3.0), ev("c1", 50, 1, 4.0)])
        .unwrap();
    assert_eq!(
        batch.updates[0].values.as_deref().unwrap()[1],
        AggValue::Num(7.0)
    );
    store.commit(batch.state).unwrap();
    // Another key moves stream time to 120: c1's event at 0 leaves its window.
    let batch = op.process(&store, &[ev("c2", 120, 2, 1.0)]).unwrap();
    let c1 = batch.updates.iter().find(|u| u.key == "c1").unwrap();
    assert_eq!(c1.events, 1);
    assert_eq!(c1.values.as_deref().unwrap()[1], AggValue::Num(4.0));
    assert_eq!(
        c1.version.offset, 2,
        "versioned by the input that changed it"
    );
}

/// A tick moves stream time like an event and joins no key: sliding values decay, windows
/// close (emitting their final values), and a tick below the store's offsets is skipped.
#[test]
fn ticks_move_stream_time_without_joining_a_key() {
    let tick = |t: i64, offset: i64| Event::tick(t, Coords::new("orders", 0, offset));
    // Sliding: c1's events leave as ticks move stream time, with nothing added to any key.
    let op = Aggregate::new(config(WindowSpec::Sliding { size_ms: 100 }, 0)).unwrap();
    let mut store = MemoryStore::new("agg");
    let batch = op
        .process(&store, &[ev("c1", 0, 0, 3.0), ev("c1", 50, 1, 4.0)])
        .unwrap();
    store.commit(batch.state).unwrap();
    let batch = op.process(&store, &[tick(120, 2)]).unwrap();
    assert_eq!(batch.updates.len(), 1, "{:?}", batch.updates);
    let c1 = &batch.updates[0];
    assert_eq!((c1.key.as_ref(), c1.events), (&b"c1"[..], 1));
    assert_eq!(c1.values.as_deref().unwrap()[1], AggValue::Num(4.0));
    assert_eq!(c1.version.offset, 2, "versioned by the tick");
    store.commit(batch.state).unwrap();
    // Replayed (below the store's offsets): nothing.
    let batch = op.process(&store, &[tick(500, 2)]).unwrap();
    assert!(batch.updates.is_empty() && batch.already_applied == 1);
    let batch = op.process(&store, &[tick(150, 3)]).unwrap();
    let c1 = &batch.updates[0];
    assert_eq!(
        (c1.events, c1.values.as_deref().unwrap()[0].clone()),
        (0, AggValue::Int(0))
    );
    store.commit(batch.state).unwrap();
    assert_eq!(
        store
            .get(&key_prefix(b'a', &Bytes::from_static(b"c1")))
            .unwrap(),
        None
    );
    // An event a tick made late is dropped.
    let batch = op.process(&store, &[ev("c2", 40, 4, 1.0)]).unwrap();
    assert_eq!((batch.dropped_late, batch.updates.len()), (1, 0));
    // An event with an empty key (a null-keyed record of a DSL topology) is an event.
    let batch = op.process(&store, &[ev("", 160, 5, 2.0)]).unwrap();
    assert_eq!(batch.updates.len(), 1, "{:?}", batch.updates);
    assert_eq!(
        (batch.updates[0].key.as_ref(), batch.updates[0].events),
        (&b""[..], 1)
    );

    // Tumbling (emit on close, like hopping and sessions below): a tick closes the window.
    for window in [
        WindowSpec::Tumbling { size_ms: 10 },
        WindowSpec::Hopping {
            size_ms: 10,
            advance_ms: 5,
        },
        WindowSpec::Session { gap_ms: 10 },
    ] {
        let mut cfg = config(window, 0);
        cfg.emit = Emit::OnClose;
        let op = Aggregate::new(cfg).unwrap();
        let mut store = MemoryStore::new("agg");
        let batch = op
            .process(&store, &[ev("c1", 1, 0, 1.0), ev("c1", 2, 1, 1.0)])
            .unwrap();
        assert!(batch.updates.is_empty(), "{window:?}");
        store.commit(batch.state).unwrap();
        let batch = op.process(&store, &[tick(100, 2)]).unwrap();
        assert!(!batch.updates.is_empty(), "{window:?}: nothing closed");
        for update in &batch.updates {
            assert!(
                update.closed && update.key == "c1",
                "{window:?}: {update:?}"
            );
            assert_eq!(update.events, 2, "{window:?}: {update:?}");
        }
    }
}

#[test]
fn accumulators_round_trip_through_their_encoding() {
    let cfg = config(WindowSpec::Tumbling { size_ms: 10 }, 0);
    let op = Aggregate::new(cfg).unwrap();
    let mut acc = op.new_acc(3);
    let e = ev("c", 1, 7, 2.5);
    acc.add(&op.inputs(&e), 1, 7);
    assert_eq!(Acc::decode(&acc.encode()).unwrap(), acc);
    assert!(Acc::decode(&acc.encode()[..10]).is_err());
}

#[test]
fn hopping_windows_keep_one_pane_per_key_and_advance() {
    // 6 windows per event, but one pane per key and 10 ms of event time.
    let spec = WindowSpec::Hopping {
        size_ms: 60,
        advance_ms: 10,
    };
    let op = Aggregate::new(config(spec, 0)).unwrap();
    let mut store = MemoryStore::new("agg");
    let batch = op
        .process(&store, &[ev("c1", 61, 0, 1.0), ev("c1", 65, 1, 2.0)])
        .unwrap();
    assert_eq!(batch.updates.len(), 6);
    let operator_keys: Vec<u8> = batch
        .state
        .range(b"A", b"\xff")
        .map(|(k, _)| k[0])
        .collect();
    // The key's panes, where the expiry scan ended, the batch number, and the key's one
    // index mention.
    assert_eq!(operator_keys, vec![b'P', b'c', b'n', b'v']);
    store.commit(batch.state).unwrap();
    // A later pane: the windows containing both panes merge them.
    let batch = op.process(&store, &[ev("c1", 72, 2, 4.0)]).unwrap();
    let sums: Vec<(i64, AggValue)> = batch
        .updates
        .iter()
        .map(|u| (u.window.start, u.values.as_ref().unwrap()[1].clone()))
        .collect();
    assert_eq!(
        sums,
        vec![
            (20, AggValue::Num(7.0)),
            (30, AggValue::Num(7.0)),
            (40, AggValue::Num(7.0)),
            (50, AggValue::Num(7.0)),
            (60, AggValue::Num(7.0)),
            (70, AggValue::Num(4.0)),
        ]
    );
    store.commit(batch.state).unwrap();
    // st = 121 closes every window containing the pane [60, 70), the last one at 120, where
    // the key was mentioned when its entry was made: the pane goes, the later pane stays,
    // and the key is mentioned again under the later pane's last window end.
    let batch = op.process(&store, &[ev("c2", 121, 3, 1.0)]).unwrap();
    store.commit(batch.state).unwrap();
    let c1 = store.get(&key_prefix(b'P', b"c1")).unwrap().unwrap();
    let starts: Vec<i64> = decode_panes(&c1)
        .unwrap()
        .iter()
        .map(|(start, _)| *start)
        .collect();
    assert_eq!(starts, vec![70]);
    let mentions: Vec<(i64, Vec<(Bytes, i64)>)> = store
        .prefix(b"v")
        .map(|entry| {
            let (vkey, value) = entry.unwrap();
            let expiry = i64_from_sortable(vkey[1..9].try_into().unwrap());
            let tails = split_keyed_tails(&value).unwrap();
            (
                expiry,
                tails.into_iter().map(|t| parse_keyed(t).unwrap()).collect(),
            )
        })
        .collect();
    assert_eq!(
        mentions,
        vec![
            (130, vec![(Bytes::from("c1"), 70)]),
            (180, vec![(Bytes::from("c2"), 120)]),
        ]
    );
}

#[test]
fn decimal_sums_are_exact() {
    let mut cfg = config(WindowSpec::Tumbling { size_ms: 10 }, 0);
    cfg.functions.truncate(3);
    let op = Aggregate::new(cfg).unwrap();
    let store = MemoryStore::new("agg");
    let batch = op
        .process(&store, &[ev("c1", 1, 0, 0.1), ev("c1", 2, 1, 0.2)])
        .unwrap();
    let values = batch.updates[0].values.as_ref().unwrap();
    // A float sum gives 0.30000000000000004.
    assert_eq!(values[1], AggValue::Num(0.3));
    assert_eq!(values[2], AggValue::Num(0.15));
    // Not a decimal of at most 6 digits: a float sum.
    assert_eq!(micros(1.0 / 3.0), None);
    assert_eq!(micros(-129.9), Some(-129_900_000));
    // A negative exact sum survives the encoding; one written before exact sums decodes as a
    // float sum.
    let mut acc = op.new_acc(0);
    acc.add(&op.inputs(&ev("c1", 1, 0, -2.5)), 1, 0);
    assert_eq!(Acc::decode(&acc.encode()).unwrap(), acc);
    let mut old = Writer::default();
    old.u32(0).i64(0).u64(1).u32(1).u8(1).f64(-2.5).u64(1);
    let old = Acc::decode(&old.finish()).unwrap();
    assert_eq!(
        old.fns,
        vec![FnAcc::Sum {
            sum: -2.5,
            n: 1,
            exact: None
        }]
    );
}

/// Runs `events` through `first`, then (a restart with a changed configuration on the same
/// state) through `second`, in batches of `size`; returns the store and the stream time.
/// `upgrade`: the restart is also an upgrade from a version that kept no scan positions.
fn run_with_restart(
    first: AggregateConfig,
    second: AggregateConfig,
    events: &[Event],
    size: usize,
    upgrade: bool,
) -> (MemoryStore, i64) {
    let (store, st, _) = run_with_restart_emitting(first, second, events, size, upgrade);
    (store, st)
}

/// [`run_with_restart`], also returning every update emitted, in order.
fn run_with_restart_emitting(
    first: AggregateConfig,
    second: AggregateConfig,
    events: &[Event],
    size: usize,
    upgrade: bool,
) -> (MemoryStore, i64, Vec<AggregateUpdate>) {
    let mut updates = Vec::new();
    let mut store = MemoryStore::new("agg");
    let half = events.len() / 2;
    for (part, config) in [(&events[..half], first), (&events[half..], second)] {
        if upgrade {
            let positions: Vec<Bytes> = store.prefix(b"c").map(|e| e.unwrap().0).collect();
            for key in positions {
                store.delete(&key).unwrap();
            }
            downgrade_sessions(&mut store);
            downgrade_panes(&mut store);
            downgrade_sliding(&mut store);
        }
        let op = Aggregate::new(config).unwrap();
        for batch in part.chunks(size) {
            let out = op.process(&store, batch).unwrap();
            updates.extend(out.updates);
            store.commit(out.state).unwrap();
        }
    }
    let st = events.iter().map(|e| e.time_ms).max().unwrap_or(i64::MIN);
    (store, st, updates)
}

/// Rewrites the sessions of `store` in the layout before they were kept per key: an entry
/// `s key end start` → accumulator per session, and no layout mark.
fn downgrade_sessions(store: &mut MemoryStore) {
    let mut old = WriteBatch::default();
    for entry in store.prefix(b"S") {
        let (skey, bytes) = entry.unwrap();
        for session in decode_sessions(&bytes).unwrap() {
            let mut key = key_prefix(b's', &skey[5..]);
            key.extend_from_slice(&i64_sortable(session.end));
            key.extend_from_slice(&i64_sortable(session.start));
            old.put(&key, &session.acc.encode());
        }
        old.delete(&skey);
    }
    old.delete(SESSIONS_PER_KEY);
    store.commit(old).unwrap();
}

/// Rewrites the hopping panes of `store` in the layout before they were kept per key: an
/// entry `p key pane-start` → accumulator per pane, an index mention per pane under its
/// expiry (in one batch entry per expiry, as that layout wrote them) instead of the per-key
/// mentions, and no layout mark. Panes whose windows all closed are left out, as that layout
/// had deleted them (their mentions would be behind the index's scan position).
fn downgrade_panes(store: &mut MemoryStore) {
    let layout = PaneLayout::of(HOPPING);
    let position = store.get(b"cv").unwrap();
    let mut old = WriteBatch::default();
    for entry in store.prefix(b"v") {
        old.delete(&entry.unwrap().0);
    }
    let mut mentions: BTreeMap<i64, Writer> = BTreeMap::new();
    for entry in store.prefix(b"P") {
        let (pkey, bytes) = entry.unwrap();
        let key = &pkey[5..];
        for (start, acc) in decode_panes(&bytes).unwrap() {
            let expiry = layout.expiry(start);
            if position
                .as_ref()
                .is_some_and(|p| index_key(b'v', expiry, &[]) < p.to_vec())
            {
                continue;
            }
            old.put(&keyed(b'p', key, start), &acc.encode());
            mentions
                .entry(expiry)
                .or_default()
                .raw(&keyed_tail(key, start));
        }
        old.delete(&pkey);
    }
    put_created_index(store, &mut old, b'v', mentions).unwrap();
    old.delete(PANES_PER_KEY);
    store.commit(old).unwrap();
}

/// Rewrites a sliding store in the layout before keys kept their events inside their entry:
/// `a key` → accumulator alone, `r key time offset` → inputs per event, and every expiry
/// entry with its events' inputs.
fn downgrade_sliding(store: &mut MemoryStore) {
    let mut old = WriteBatch::default();
    for entry in store.prefix(b"a") {
        let (akey, bytes) = entry.unwrap();
        let Ok((acc, Some(kept))) = decode_sliding_entry(&bytes) else {
            continue;
        };
        for k in kept {
            let rkey = [b"r".as_slice(), &retained_tail(&akey[5..], k.t, k.offset)].concat();
            old.put(
                &rkey,
                &encode_inputs(&decode_kept_inputs(&k.inputs).unwrap()),
            );
        }
        old.put(&akey, &acc.encode());
    }
    // A batch's entry without inputs and its entry with inputs may share their smallest time:
    // with inputs both, they are one entry.
    let mut merged: BTreeMap<(u64, i64), Vec<Retained>> = BTreeMap::new();
    for entry in store.prefix(b"q") {
        let (qkey, value) = entry.unwrap();
        let (seq, mut events) = decode_retained_entry(&qkey, &value).unwrap();
        for event in &mut events {
            let rkey = [
                b"r".as_slice(),
                &retained_tail(&event.key, event.t, event.offset),
            ]
            .concat();
            event.inputs = Some(get_through(&*store, &old, &rkey).unwrap().unwrap());
        }
        old.delete(&qkey);
        let min = events.iter().map(|e| e.t).min().unwrap();
        merged
            .entry((seq.unwrap(), min))
            .or_default()
            .extend(events);
    }
    for ((seq, _), events) in merged {
        put_retained_entry(&mut old, seq, &events);
    }
    store.commit(old).unwrap();
}

/// Asserts that every key with hopping panes in `store` is mentioned in the expiry index at or
/// above where its scan ended, so its entry goes once its windows close.
fn assert_every_key_is_mentioned(store: &MemoryStore) {
    let position = store
        .get(b"cv")
        .unwrap()
        .unwrap_or_else(|| Bytes::from("v"));
    let mut mentioned = BTreeSet::new();
    for entry in store.prefix(b"v") {
        let (vkey, value) = entry.unwrap();
        if vkey >= position {
            for tail in created_index_tails(&vkey, &value).unwrap() {
                mentioned.insert(parse_keyed(tail).unwrap().0);
            }
        }
    }
    for entry in store.prefix(b"P") {
        let key = entry.unwrap().0.slice(5..);
        assert!(mentioned.contains(&key), "{key:?} is not mentioned");
    }
}

/// The hopping windows the tests of layouts and restarts use.
const HOPPING: WindowSpec = WindowSpec::Hopping {
    size_ms: 20,
    advance_ms: 5,
};

/// The hopping panes `store` holds whose windows are not all closed at stream time `st`:
/// (key, start, events).
fn live_panes_of(store: &MemoryStore, grace: i64, st: i64) -> Vec<(Bytes, i64, u64)> {
    let layout = PaneLayout::of(HOPPING);
    let mut out = Vec::new();
    for entry in store.prefix(b"P") {
        let (pkey, bytes) = entry.unwrap();
        for (start, acc) in decode_panes(&bytes).unwrap() {
            if layout.expiry(start) + grace > st {
                out.push((pkey.slice(5..), start, acc.events));
            }
        }
    }
    out
}

/// Rewrites the sliding expiry entries of `store` without their events' inputs, as the
/// layout before them wrote them.
fn strip_retained_inputs(store: &mut MemoryStore) {
    let mut old = WriteBatch::default();
    for entry in store.prefix(b"q") {
        let (qkey, value) = entry.unwrap();
        let (seq, mut events) = decode_retained_entry(&qkey, &value).unwrap();
        for event in &mut events {
            event.inputs = None;
        }
        old.delete(&qkey);
        put_retained_entry(&mut old, seq.unwrap(), &events);
    }
    store.commit(old).unwrap();
}

/// Runs `events` through `op` in batches of `size`; `halfway`, if given, rewrites the store
/// before the middle batch (an upgrade from a store of an earlier layout). Returns every update
/// and the store.
fn run_rewritten(
    op: &Aggregate,
    events: &[Event],
    size: usize,
    halfway: Option<fn(&mut MemoryStore)>,
) -> (Vec<AggregateUpdate>, MemoryStore) {
    let mut store = MemoryStore::new("agg");
    let mut updates = Vec::new();
    for (i, batch) in events.chunks(size).enumerate() {
        if let (Some(rewrite), true) = (halfway, i == events.len() / size / 2) {
            rewrite(&mut store);
        }
        let out = op.process(&store, batch).unwrap();
        updates.extend(out.updates);
        store.commit(out.state).unwrap();
    }
    (updates, store)
}

/// Runs `events` in batches of `size` through an aggregation of `window`, twice: on a store
/// that always had the current layout, and on one that `downgrade` rewrites in an earlier
/// layout halfway. Returns every update and the store of each run.
fn upgraded_halfway(
    window: WindowSpec,
    grace: i64,
    on_close: bool,
    events: &[Event],
    size: usize,
    downgrade: fn(&mut MemoryStore),
) -> [(Vec<AggregateUpdate>, MemoryStore); 2] {
    let emit = if on_close {
        Emit::OnClose
    } else {
        Emit::OnUpdate
    };
    let op = Aggregate::new(AggregateConfig {
        emit,
        ..config(window, grace)
    })
    .unwrap();
    [None, Some(downgrade)].map(|rewrite| run_rewritten(&op, events, size, rewrite))
}

/// The sessions `store` holds: (key, start, end, events).
fn sessions_of(store: &MemoryStore) -> Vec<(Bytes, i64, i64, u64)> {
    let mut out = Vec::new();
    for entry in store.prefix(b"S") {
        let (skey, bytes) = entry.unwrap();
        for s in decode_sessions(&bytes).unwrap() {
            out.push((skey.slice(5..), s.start, s.end, s.acc.events));
        }
    }
    out
}

/// Like [`jittered`], with the totals of `steps`: minima and maxima that leave.
fn varied(steps: &[(i64, i64, u8)]) -> Vec<Event> {
    let mut now = 0;
    steps
        .iter()
        .enumerate()
        .map(|(i, (step, back, total))| {
            now += step;
            ev(
                &format!("c{}", i % 3),
                now - back,
                i as i64,
                f64::from(*total),
            )
        })
        .collect()
}

fn jittered(steps: &[(i64, i64)]) -> Vec<Event> {
    let mut now = 0;
    steps
        .iter()
        .enumerate()
        .map(|(i, (step, back))| {
            now += step;
            ev(&format!("c{}", i % 3), now - back, i as i64, 1.0)
        })
        .collect()
}

proptest::proptest! {
    /// Emitting only the selected windows changes nothing else: the updates are those of
    /// `process` that the selector accepts, and the state is the same, for every window kind,
    /// emitting on update or on close.
    #[test]
    fn selected_updates_are_the_selected_ones_of_the_full_emission(
        steps in proptest::collection::vec((0i64..6, 0i64..25), 1..60),
        grace in 0i64..30,
        size in 1usize..6,
        modulo in 1i64..4,
        kind in 0usize..4,
        on_close in proptest::bool::ANY,
    ) {
        let window = [
            HOPPING,
            WindowSpec::Tumbling { size_ms: 10 },
            WindowSpec::Session { gap_ms: 4 },
            WindowSpec::Sliding { size_ms: 20 },
        ][kind];
        // Sliding windows never close, so they only emit on update.
        let emit = if on_close && kind != 3 { Emit::OnClose } else { Emit::OnUpdate };
        let op = Aggregate::new(AggregateConfig { emit, ..config(window, grace) }).unwrap();
        let select = |key: &[u8], w: &Window| {
            (i64::from(key[key.len() - 1]) + w.end.div_euclid(5)) % modulo == 0
        };
        let (mut full, mut selected) = (MemoryStore::new("full"), MemoryStore::new("selected"));
        for batch in jittered(&steps).chunks(size) {
            let a = op.process(&full, batch).unwrap();
            let b = op.process_selected(&selected, batch, &select).unwrap();
            let expected: Vec<_> = a.updates.iter().filter(|u| select(&u.key, &u.window)).collect();
            proptest::prop_assert_eq!(b.updates.iter().collect::<Vec<_>>(), expected);
            proptest::prop_assert_eq!(a.dropped_late, b.dropped_late);
            full.commit(a.state).unwrap();
            selected.commit(b.state).unwrap();
        }
        proptest::prop_assert_eq!(full.dump().unwrap(), selected.dump().unwrap());
    }

    /// A restart with a smaller or larger grace closes and deletes every window the new
    /// configuration says is closed (a scan start derived from the configuration skipped
    /// windows closing between the old and the new horizon).
    #[test]
    fn tumbling_windows_close_after_a_restart_with_another_grace(
        steps in proptest::collection::vec((0i64..6, 0i64..25), 1..60),
        grace in 0i64..30,
        later_grace in 0i64..30,
        size in 1usize..6,
        upgrade in proptest::bool::ANY,
    ) {
        let spec = WindowSpec::Tumbling { size_ms: 10 };
        let events = jittered(&steps);
        let (store, st) =
            run_with_restart(config(spec, grace), config(spec, later_grace), &events, size, upgrade);
        for entry in store.prefix(b"a") {
            let (key, _) = entry.unwrap();
            let start = i64_from_sortable(key[key.len() - 8..].try_into().unwrap());
            proptest::prop_assert!(start + 10 + later_grace > st, "window at {start} left open");
        }
    }

    /// The same for hopping windows emitted on close (panes and the window index) and for
    /// sessions.
    #[test]
    fn hopping_panes_and_sessions_expire_after_a_restart_with_another_grace(
        steps in proptest::collection::vec((0i64..6, 0i64..25), 1..60),
        grace in 0i64..30,
        later_grace in 0i64..30,
        size in 1usize..6,
        upgrade in proptest::bool::ANY,
    ) {
        let events = jittered(&steps);
        let on_close = |grace| AggregateConfig { emit: Emit::OnClose, ..config(HOPPING, grace) };
        let (store, st) =
            run_with_restart(on_close(grace), on_close(later_grace), &events, size, upgrade);
        proptest::prop_assert_eq!(store.prefix(b"p").count(), 0, "panes of the earlier layout left");
        assert_every_key_is_mentioned(&store);
        // A pane whose windows closed may wait for its key's next write or mention, but no
        // key keeps an entry once all its windows closed.
        let layout = PaneLayout::of(HOPPING);
        for entry in store.prefix(b"P") {
            let (pkey, bytes) = entry.unwrap();
            let newest = decode_panes(&bytes).unwrap().iter().map(|(start, _)| *start).max().unwrap();
            proptest::prop_assert!(
                layout.expiry(newest) + later_grace > st,
                "key {:?} left with its windows closed", &pkey[5..]
            );
        }
        for entry in store.prefix(b"w") {
            let (key, _) = entry.unwrap();
            let end = i64_from_sortable(key[1..9].try_into().unwrap());
            proptest::prop_assert!(end + later_grace > st, "window ending {end} left open");
        }
        let session = WindowSpec::Session { gap_ms: 4 };
        let (store, st) = run_with_restart(
            config(session, grace), config(session, later_grace), &events, size, upgrade,
        );
        proptest::prop_assert_eq!(store.prefix(b"s").count(), 0, "sessions of the earlier layout left");
        for (_, _, end, _) in sessions_of(&store) {
            proptest::prop_assert!(end + 4 >= st - later_grace, "session ending {end} left");
        }
    }

    /// Whatever the grace after a restart, a window or session closes once: no (key, window)
    /// is emitted closed twice, and a key's closed sessions stay more than the gap apart.
    #[test]
    fn a_restart_with_another_grace_closes_each_window_once(
        steps in proptest::collection::vec((0i64..6, 0i64..40), 1..60),
        grace in 0i64..30,
        later_grace in 0i64..60,
        size in 1usize..6,
    ) {
        let events = jittered(&steps);
        let gap = 4;
        let specs = [WindowSpec::Tumbling { size_ms: 10 }, HOPPING, WindowSpec::Session { gap_ms: gap }];
        for spec in specs {
            let on_close = |grace| AggregateConfig { emit: Emit::OnClose, ..config(spec, grace) };
            let (_, _, updates) = run_with_restart_emitting(
                on_close(grace), on_close(later_grace), &events, size, false,
            );
            let mut closed: BTreeMap<Bytes, Vec<Window>> = BTreeMap::new();
            for u in updates.iter().filter(|u| u.closed) {
                closed.entry(u.key.clone()).or_default().push(u.window);
            }
            for (key, mut windows) in closed {
                windows.sort_by_key(|w| (w.start, w.end));
                for pair in windows.windows(2) {
                    let (a, b) = (pair[0], pair[1]);
                    proptest::prop_assert_ne!(a, b, "{:?}: {:?} {:?} closed twice", spec, key, a);
                    if spec == (WindowSpec::Session { gap_ms: gap }) {
                        proptest::prop_assert!(
                            b.start > a.end + gap,
                            "{:?}: sessions {:?} and {:?} of {:?} overlap", spec, a, b, key
                        );
                    }
                }
            }
        }
    }

    /// Sliding expiry entries of the earlier layout (without the events' inputs) take their
    /// events out of the window as the new ones do.
    #[test]
    fn sliding_entries_without_inputs_continue_unchanged(
        steps in proptest::collection::vec((0i64..6, 0i64..25), 1..60),
        window in 1i64..40,
        size in 1usize..6,
    ) {
        let events = jittered(&steps);
        let op = Aggregate::new(config(WindowSpec::Sliding { size_ms: window }, 0)).unwrap();
        let state = |store: &MemoryStore| -> Vec<_> {
            store.prefix(b"a").chain(store.prefix(b"r")).map(|e| e.unwrap()).collect()
        };
        let (updates, store) = run_rewritten(&op, &events, size, None);
        let (stripped_updates, stripped) =
            run_rewritten(&op, &events, size, Some(strip_retained_inputs));
        let (state, stripped_state) = (state(&store), state(&stripped));
        proptest::prop_assert_eq!(stripped_updates, updates);
        proptest::prop_assert_eq!(stripped_state, state);
    }

    /// A store of the earlier session layout (one entry per session) is moved to per-key
    /// entries at its first batch and then emits, and ends with, what a store that always
    /// had the new layout does.
    #[test]
    fn sessions_of_the_earlier_layout_continue_unchanged(
        steps in proptest::collection::vec((0i64..6, 0i64..25), 1..60),
        grace in 0i64..30,
        size in 1usize..6,
        on_close in proptest::bool::ANY,
    ) {
        let session = WindowSpec::Session { gap_ms: 4 };
        let [(updates, store), (migrated_updates, migrated)] =
            upgraded_halfway(session, grace, on_close, &jittered(&steps), size, downgrade_sessions);
        proptest::prop_assert_eq!(migrated_updates, updates);
        proptest::prop_assert_eq!(sessions_of(&migrated), sessions_of(&store));
        proptest::prop_assert_eq!(migrated.prefix(b"s").count(), 0);
    }

    /// A store of the earlier pane layout (one entry and one index mention per pane) is moved
    /// to per-key entries at its first batch and then emits, and keeps, what a store that
    /// always had the new layout does.
    #[test]
    fn panes_of_the_earlier_layout_continue_unchanged(
        steps in proptest::collection::vec((0i64..6, 0i64..25), 1..60),
        grace in 0i64..30,
        size in 1usize..6,
        on_close in proptest::bool::ANY,
    ) {
        let events = jittered(&steps);
        let [(updates, store), (migrated_updates, migrated)] =
            upgraded_halfway(HOPPING, grace, on_close, &events, size, downgrade_panes);
        let st = events.iter().map(|e| e.time_ms).max().unwrap();
        proptest::prop_assert_eq!(migrated_updates, updates);
        proptest::prop_assert_eq!(
            live_panes_of(&migrated, grace, st),
            live_panes_of(&store, grace, st)
        );
        proptest::prop_assert_eq!(migrated.prefix(b"p").count(), 0);
        assert_every_key_is_mentioned(&migrated);
    }

    /// The same for sliding windows and their size: no event is retained past the window.
    #[test]
    fn sliding_windows_decay_after_a_restart_with_another_size(
        steps in proptest::collection::vec((0i64..6, 0i64..25), 1..60),
        window in 1i64..40,
        later_window in 1i64..40,
        size in 1usize..6,
        upgrade in proptest::bool::ANY,
    ) {
        let sliding = |size_ms| config(WindowSpec::Sliding { size_ms }, 0);
        let events = jittered(&steps);
        let (store, st) = run_with_restart(sliding(window), sliding(later_window), &events, size, upgrade);
        for (_, t, _) in Aggregate::sliding_retained(&store).unwrap() {
            proptest::prop_assert!(t > st - later_window, "event at {t} retained");
        }
    }

    /// Whatever the inline limit, and however often keys move between the two layouts, a
    /// sliding window emits the same updates (values and versions) and retains the same events.
    #[test]
    fn sliding_layouts_emit_the_same_updates(
        steps in proptest::collection::vec((0i64..4, 0i64..25, 0u8..20), 1..80),
        window in 1i64..40,
        size in 1usize..8,
    ) {
        let events = varied(&steps);
        let run = |limit| {
            let op = Aggregate::new(config(WindowSpec::Sliding { size_ms: window }, 0))
                .unwrap()
                .with_sliding_inline_limit(limit);
            let (updates, store) = run_rewritten(&op, &events, size, None);
            (updates, Aggregate::sliding_retained(&store).unwrap())
        };
        let inside = run(INLINE_LIMIT);
        for limit in [0, 1, 2, 3, 5] {
            proptest::prop_assert_eq!(&run(limit), &inside, "limit {}", limit);
        }
    }

    /// A store of the layout before keys kept their events inside their entry (every event in
    /// an `r` entry, expiry entries with inputs) continues as one that always had the new one:
    /// the same updates, the same events retained.
    #[test]
    fn sliding_events_of_the_earlier_layout_continue_unchanged(
        steps in proptest::collection::vec((0i64..4, 0i64..25, 0u8..20), 1..80),
        window in 1i64..40,
        size in 1usize..6,
    ) {
        let events = varied(&steps);
        let sliding = WindowSpec::Sliding { size_ms: window };
        let [(updates, store), (migrated_updates, migrated)] =
            upgraded_halfway(sliding, 0, false, &events, size, downgrade_sliding);
        proptest::prop_assert_eq!(migrated_updates, updates);
        proptest::prop_assert_eq!(
            Aggregate::sliding_retained(&migrated).unwrap(),
            Aggregate::sliding_retained(&store).unwrap()
        );
    }
}

/// Rust's `f64` parser reads "NaN", "inf" and "1e999" as numbers; in a sum, min or max they
/// would stick (a NaN sum, an infinite max) until the window closes, forever for all-time
/// features. Only finite numbers count; such strings are skipped like any other text.
#[test]
fn non_finite_numeric_strings_are_not_numbers() {
    let op = Aggregate::new(config(WindowSpec::Tumbling { size_ms: 1 << 40 }, 0)).unwrap();
    let store = MemoryStore::new("agg");
    let event = |offset: i64, total: serde_json::Value| Event {
        value: serde_json::json!({ "total": total, "sku": "s" }),
        ..ev("c1", offset, offset, 0.0)
    };
    let events: Vec<Event> = [
        serde_json::json!("12.5"),
        serde_json::json!("NaN"),
        serde_json::json!("inf"),
        serde_json::json!("-infinity"),
        serde_json::json!("1e999"),
        serde_json::json!(3),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, total)| event(i as i64, total))
    .collect();
    let batch = op.process(&store, &events).unwrap();
    let last = batch.updates.last().unwrap();
    assert_eq!(
        last.values.as_deref().unwrap()[..5],
        [
            AggValue::Int(6),
            AggValue::Num(15.5),
            AggValue::Num(7.75),
            AggValue::Num(3.0),
            AggValue::Num(12.5)
        ]
    );
}

/// State written before non-finite strings stopped counting may hold an infinite max or a
/// NaN sum: removing the event that put it there rebuilds the value instead of keeping it.
#[test]
fn removing_from_a_non_finite_value_of_older_state_asks_for_a_rebuild() {
    let text = |s: &str| Some(Scalar::Text(s.into()));
    for (fns, input) in [
        (vec![FnAcc::Max(Some(f64::INFINITY))], text("inf")),
        (vec![FnAcc::Min(Some(f64::NEG_INFINITY))], text("-inf")),
        (
            vec![FnAcc::Sum {
                sum: f64::NAN,
                n: 2,
                exact: None,
            }],
            text("NaN"),
        ),
    ] {
        let mut acc = Acc {
            partition: 0,
            version: 5,
            events: 2,
            fns: fns.clone(),
        };
        assert!(!acc.remove(&[input], 1, 1), "{fns:?}");
    }
    // Clean state removes a skipped text input without a rebuild.
    let mut acc = Acc {
        partition: 0,
        version: 5,
        events: 2,
        fns: vec![FnAcc::Max(Some(3.0))],
    };
    assert!(acc.remove(&[text("n/a")], 1, 1));
}
