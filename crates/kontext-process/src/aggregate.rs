//! Windowed aggregation per key: count, sum, avg, min, max, latest, distinct count over
//! tumbling, hopping, session and sliding ("last N") windows by event time.
//!
//! Semantics (the model tests check exactly these); `st` is the stream time, the largest
//! event time seen so far including the current event:
//! - tumbling / hopping: an event updates each window `[start, end)` containing it whose
//!   `end + grace > st`; if none is open it is **dropped late**. A window's state is deleted
//!   once `end + grace <= st`.
//! - session: an event with `t < st - grace` is dropped late. Otherwise it joins every session
//!   of its key within `gap` of it (merging them). A session is deleted once
//!   `end + gap < st - grace`: no admissible event can reach it any more.
//! - sliding: an event with `t <= st - size` is dropped late; the key's value covers its events
//!   in `(st - size, st]` and is re-emitted when events leave that range.
//!
//! Outputs are full values: for each (key, window) a batch changed, one [`AggregateUpdate`]
//! with the whole aggregate, versioned by the input coordinates of the latest input that
//! changed it. A merged-away session is an update with `values: None` (a tombstone).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::codec::{i64_sortable, Reader, Writer};
use crate::event::{Coords, Event, FieldPath, Scalar};
use crate::progress::Progress;
use crate::store::{prefix_end, range_through, StateStore, StoreError, WriteBatch};
use crate::window::{Window, WindowSpec};

/// One aggregate function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AggFn {
    /// Number of events.
    Count,
    /// Sum of a numeric field (0 when no event has it).
    Sum(FieldPath),
    /// Mean of a numeric field (null when no event has it).
    Avg(FieldPath),
    /// Smallest value of a numeric field.
    Min(FieldPath),
    /// Largest value of a numeric field.
    Max(FieldPath),
    /// The field's value in the latest event (by event time, then offset) that has it.
    Latest(FieldPath),
    /// Number of distinct values of a field. Exact: the values are kept in the state, so use it
    /// for modest cardinalities per window (products per order window, not users per day).
    DistinctCount(FieldPath),
}

impl AggFn {
    fn field(&self) -> Option<&FieldPath> {
        match self {
            AggFn::Count => None,
            AggFn::Sum(f)
            | AggFn::Avg(f)
            | AggFn::Min(f)
            | AggFn::Max(f)
            | AggFn::Latest(f)
            | AggFn::DistinctCount(f) => Some(f),
        }
    }
}

/// When updates are emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Emit {
    /// Every batch that changes a window emits its current value (default; what a context
    /// store wants: the feature is fresh).
    #[default]
    OnUpdate,
    /// Only the final value, when the window closes (`end + grace <= st`). Not for sliding
    /// windows, which never close.
    OnClose,
}

/// Configuration of an [`Aggregate`].
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateConfig {
    pub window: WindowSpec,
    /// How long after a window's end late events are still admitted (event time).
    pub grace_ms: i64,
    /// Output name and function, in output order.
    pub functions: Vec<(String, AggFn)>,
    pub emit: Emit,
}

/// One aggregate value.
#[derive(Debug, Clone, PartialEq)]
pub enum AggValue {
    /// Counts.
    Int(u64),
    /// Sums, averages, minima, maxima.
    Num(f64),
    /// A latest value.
    Scalar(Scalar),
    /// No input had the field.
    Null,
}

impl AggValue {
    /// The value as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            AggValue::Int(n) => serde_json::Value::from(*n),
            AggValue::Num(n) => Scalar::Num(*n).to_json(),
            AggValue::Scalar(s) => s.to_json(),
            AggValue::Null => serde_json::Value::Null,
        }
    }
}

/// The full current value of one (key, window).
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateUpdate {
    pub key: Bytes,
    pub window: Window,
    /// One value per configured function; `None` when the window no longer exists (a session
    /// merged into another): a tombstone for the downstream store.
    pub values: Option<Vec<AggValue>>,
    /// Number of events in the window.
    pub events: u64,
    /// Input coordinates of the latest input that changed this value: the output's version.
    pub version: Coords,
    /// The window is closed: this is its final value.
    pub closed: bool,
}

impl AggregateUpdate {
    /// The update as a JSON document: `{"window": {...}, "<name>": value, ...}`.
    pub fn to_json(&self, config: &AggregateConfig) -> serde_json::Value {
        let mut doc = serde_json::Map::new();
        doc.insert(
            "window".into(),
            serde_json::json!({"start": self.window.start, "end": self.window.end}),
        );
        if let Some(values) = &self.values {
            for ((name, _), value) in config.functions.iter().zip(values) {
                doc.insert(name.clone(), value.to_json());
            }
        }
        serde_json::Value::Object(doc)
    }
}

/// The result of one batch.
#[derive(Debug, Default)]
pub struct AggregateBatch {
    pub updates: Vec<AggregateUpdate>,
    /// State changes, input offsets included. Commit after the updates are acknowledged.
    pub state: WriteBatch,
    /// Events that fell into no open window (`dropped-late`).
    pub dropped_late: u64,
    /// Events below the store's offsets (a replay; nothing emitted for them).
    pub already_applied: u64,
}

/// The aggregation operator. Stateless itself: all state lives in the store.
#[derive(Debug, Clone)]
pub struct Aggregate {
    config: AggregateConfig,
}

impl Aggregate {
    /// Checks the configuration.
    pub fn new(config: AggregateConfig) -> Result<Self, String> {
        config.window.validate()?;
        if config.grace_ms < 0 {
            return Err("grace must not be negative".into());
        }
        if config.emit == Emit::OnClose && matches!(config.window, WindowSpec::Sliding { .. }) {
            return Err("sliding windows never close: use emit on update".into());
        }
        if config.functions.is_empty() {
            return Err("an aggregation needs at least one function".into());
        }
        Ok(Self { config })
    }

    /// The configuration.
    pub fn config(&self) -> &AggregateConfig {
        &self.config
    }

    /// Aggregates a batch of events (in input order).
    pub fn process<S: StateStore + ?Sized>(
        &self,
        store: &S,
        events: &[Event],
    ) -> Result<AggregateBatch, StoreError> {
        let mut out = AggregateBatch::default();
        if events.is_empty() {
            return Ok(out);
        }
        match self.config.window {
            WindowSpec::Tumbling { .. } | WindowSpec::Hopping { .. } => {
                self.process_fixed(store, events, &mut out)?
            }
            WindowSpec::Session { gap_ms } => {
                self.process_session(store, events, gap_ms, &mut out)?
            }
            WindowSpec::Sliding { size_ms } => {
                self.process_sliding(store, events, size_ms, &mut out)?
            }
        }
        Ok(out)
    }

    fn inputs(&self, event: &Event) -> Vec<Option<Scalar>> {
        self.config
            .functions
            .iter()
            .map(|(_, f)| f.field().and_then(|path| event.scalar(path)))
            .collect()
    }

    fn new_acc(&self, partition: i32) -> Acc {
        Acc {
            partition,
            version: i64::MIN,
            events: 0,
            fns: self
                .config
                .functions
                .iter()
                .map(|(_, f)| FnAcc::new(f))
                .collect(),
        }
    }

    /// Tumbling and hopping windows. Keys: `a key start` → accumulator, `x end key start` →
    /// expiry index.
    fn process_fixed<S: StateStore + ?Sized>(
        &self,
        store: &S,
        events: &[Event],
        out: &mut AggregateBatch,
    ) -> Result<(), StoreError> {
        let grace = self.config.grace_ms;
        let mut progress = Progress::load(store, &out.state)?;
        let mut dirty: BTreeMap<Vec<u8>, Slot> = BTreeMap::new();
        for event in events {
            let Some(st) = progress.admit(event) else {
                out.already_applied += 1;
                continue;
            };
            let mut inputs = None;
            let mut open = false;
            for window in self.config.window.windows_for(event.time_ms) {
                if window.end.saturating_add(grace) <= st {
                    continue;
                }
                open = true;
                let skey = keyed(b'a', &event.key, window.start);
                let slot = match dirty.entry(skey) {
                    std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        let stored = store.get(v.key())?.map(|b| Acc::decode(&b)).transpose()?;
                        v.insert(Slot {
                            is_new: stored.is_none(),
                            acc: stored.unwrap_or_else(|| self.new_acc(event.coords.partition)),
                            key: event.key.clone(),
                            window,
                            version: None,
                        })
                    }
                };
                if slot.acc.contains(event) {
                    continue;
                }
                let inputs = inputs.get_or_insert_with(|| self.inputs(event));
                slot.acc.add(inputs, event.time_ms, event.coords.offset);
                slot.version = Some(event.coords.clone());
            }
            if !open {
                out.dropped_late += 1;
            }
        }
        let Some(st) = progress.stream_time() else {
            return Ok(());
        };
        let topic = events[events.len() - 1].coords.topic.clone();
        let from = scan_start(b'x', progress.loaded_stream_time(), |st| {
            st.saturating_sub(grace).saturating_add(1)
        });
        progress.finish(&mut out.state);
        for (skey, mut slot) in dirty {
            let Some(version) = slot.version.take() else {
                continue;
            };
            out.state.put(&skey, &slot.acc.encode());
            if slot.is_new {
                out.state
                    .put(&index_key(b'x', slot.window.end, &skey[1..]), &[]);
            }
            if self.config.emit == Emit::OnUpdate {
                out.updates.push(slot.update(&self.config, version, false));
            }
        }
        // Close windows with end + grace <= st.
        let mut end = b"x".to_vec();
        end.extend_from_slice(&i64_sortable(st.saturating_sub(grace).saturating_add(1)));
        for (xkey, _) in range_through(store, &out.state, &from, &end)? {
            let mut r = Reader::new(&xkey[1..]);
            let window_end = r.i64_sortable()?;
            let rest = r.rest();
            let mut skey = Vec::with_capacity(rest.len() + 1);
            skey.push(b'a');
            skey.extend_from_slice(rest);
            if self.config.emit == Emit::OnClose {
                if let Some(bytes) = crate::store::get_through(store, &out.state, &skey)? {
                    let acc = Acc::decode(&bytes)?;
                    let (key, start) = parse_keyed(rest)?;
                    let version = Coords::new(topic.clone(), acc.partition, acc.version);
                    let slot = Slot {
                        is_new: false,
                        acc,
                        key,
                        window: Window {
                            start,
                            end: window_end,
                        },
                        version: None,
                    };
                    out.updates.push(slot.update(&self.config, version, true));
                }
            }
            out.state.delete(&skey);
            out.state.delete(&xkey);
        }
        Ok(())
    }

    /// Session windows. Keys: `s key end start` → accumulator, `y end key start` → expiry.
    fn process_session<S: StateStore + ?Sized>(
        &self,
        store: &S,
        events: &[Event],
        gap: i64,
        out: &mut AggregateBatch,
    ) -> Result<(), StoreError> {
        let grace = self.config.grace_ms;
        let mut progress = Progress::load(store, &out.state)?;
        // (key, window) → Some((acc, version)) or None (deleted), in emission order.
        let mut emitted: BTreeMap<(Bytes, Window), Option<(Acc, Coords)>> = BTreeMap::new();
        for event in events {
            let Some(st) = progress.admit(event) else {
                out.already_applied += 1;
                continue;
            };
            let t = event.time_ms;
            if t < st.saturating_sub(grace) {
                out.dropped_late += 1;
                continue;
            }
            let prefix = key_prefix(b's', &event.key);
            let mut from = prefix.clone();
            from.extend_from_slice(&i64_sortable(t.saturating_sub(gap)));
            let to = prefix_end(&prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 17]);
            let mut merged = self.new_acc(event.coords.partition);
            let (mut start, mut end) = (t, t);
            let mut absorbed = Vec::new();
            let mut already = false;
            for (skey, bytes) in range_through(store, &out.state, &from, &to)? {
                let mut r = Reader::new(&skey[prefix.len()..]);
                let s_end = r.i64_sortable()?;
                let s_start = r.i64_sortable()?;
                if s_start > t.saturating_add(gap) {
                    break;
                }
                let acc = Acc::decode(&bytes)?;
                if acc.contains(event) {
                    already = true;
                    break;
                }
                merged.merge(&acc);
                start = start.min(s_start);
                end = end.max(s_end);
                absorbed.push((skey, s_start, s_end));
            }
            if already {
                continue;
            }
            merged.add(&self.inputs(event), t, event.coords.offset);
            for (skey, s_start, s_end) in absorbed {
                out.state.delete(&skey);
                out.state
                    .delete(&index_key(b'y', s_end, &session_tail(&event.key, s_start)));
                emitted.insert(
                    (
                        event.key.clone(),
                        Window {
                            start: s_start,
                            end: s_end,
                        },
                    ),
                    None,
                );
            }
            let mut skey = prefix;
            skey.extend_from_slice(&i64_sortable(end));
            skey.extend_from_slice(&i64_sortable(start));
            out.state.put(&skey, &merged.encode());
            out.state
                .put(&index_key(b'y', end, &session_tail(&event.key, start)), &[]);
            emitted.insert(
                (event.key.clone(), Window { start, end }),
                Some((merged, event.coords.clone())),
            );
        }
        let Some(st) = progress.stream_time() else {
            return Ok(());
        };
        let topic = events[events.len() - 1].coords.topic.clone();
        let from = scan_start(b'y', progress.loaded_stream_time(), |st| {
            st.saturating_sub(grace).saturating_sub(gap)
        });
        progress.finish(&mut out.state);
        // Expire sessions with end + gap < st - grace.
        let horizon = st.saturating_sub(grace).saturating_sub(gap);
        let mut to = b"y".to_vec();
        to.extend_from_slice(&i64_sortable(horizon));
        let mut closed = Vec::new();
        for (ykey, _) in range_through(store, &out.state, &from, &to)? {
            let mut r = Reader::new(&ykey[1..]);
            let s_end = r.i64_sortable()?;
            let (key, s_start) = parse_keyed(r.rest())?;
            let mut skey = key_prefix(b's', &key);
            skey.extend_from_slice(&i64_sortable(s_end));
            skey.extend_from_slice(&i64_sortable(s_start));
            if self.config.emit == Emit::OnClose {
                if let Some(bytes) = crate::store::get_through(store, &out.state, &skey)? {
                    let acc = Acc::decode(&bytes)?;
                    let version = Coords::new(topic.clone(), acc.partition, acc.version);
                    closed.push(
                        Slot {
                            is_new: false,
                            acc,
                            key,
                            window: Window {
                                start: s_start,
                                end: s_end,
                            },
                            version: None,
                        }
                        .update(&self.config, version, true),
                    );
                }
            }
            out.state.delete(&skey);
            out.state.delete(&ykey);
        }
        if self.config.emit == Emit::OnUpdate {
            for ((key, window), value) in emitted {
                out.updates.push(match value {
                    Some((acc, version)) => Slot {
                        is_new: false,
                        acc,
                        key,
                        window,
                        version: None,
                    }
                    .update(&self.config, version, false),
                    None => AggregateUpdate {
                        key,
                        window,
                        values: None,
                        events: 0,
                        version: events[events.len() - 1].coords.clone(),
                        closed: false,
                    },
                });
            }
        }
        out.updates.extend(closed);
        Ok(())
    }

    /// Sliding windows. Keys: `a key` → accumulator over the retained events,
    /// `r key time offset` → the event's inputs, `q time key offset` → expiry index.
    fn process_sliding<S: StateStore + ?Sized>(
        &self,
        store: &S,
        events: &[Event],
        size: i64,
        out: &mut AggregateBatch,
    ) -> Result<(), StoreError> {
        let mut progress = Progress::load(store, &out.state)?;
        let mut dirty: BTreeMap<Bytes, Slot> = BTreeMap::new();
        for event in events {
            let Some(st) = progress.admit(event) else {
                out.already_applied += 1;
                continue;
            };
            if event.time_ms <= st.saturating_sub(size) {
                out.dropped_late += 1;
                continue;
            }
            let slot = self.sliding_slot(store, &mut dirty, &event.key, event.coords.partition)?;
            if slot.acc.contains(event) {
                continue;
            }
            let inputs = self.inputs(event);
            slot.acc.add(&inputs, event.time_ms, event.coords.offset);
            slot.version = Some(event.coords.clone());
            let tail = retained_tail(&event.key, event.time_ms, event.coords.offset);
            out.state
                .put(&[b"r".as_slice(), &tail].concat(), &encode_inputs(&inputs));
            out.state.put(
                &[
                    b"q".as_slice(),
                    &i64_sortable(event.time_ms),
                    &key_prefix_tail(&event.key),
                    &event.coords.offset.to_be_bytes(),
                ]
                .concat(),
                &[],
            );
        }
        let Some(st) = progress.stream_time() else {
            return Ok(());
        };
        let last = events[events.len() - 1].coords.clone();
        let from = scan_start(b'q', progress.loaded_stream_time(), |st| {
            st.saturating_sub(size).saturating_add(1)
        });
        progress.finish(&mut out.state);
        // Events with t <= st - size leave their key's window.
        let mut to = b"q".to_vec();
        to.extend_from_slice(&i64_sortable(st.saturating_sub(size).saturating_add(1)));
        let mut recompute = BTreeSet::new();
        for (qkey, _) in range_through(store, &out.state, &from, &to)? {
            let mut r = Reader::new(&qkey[1..]);
            let t = r.i64_sortable()?;
            let key = Bytes::copy_from_slice(r.bytes()?);
            let offset = i64::from_be_bytes(
                r.rest()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("sliding index".into()))?,
            );
            out.state
                .delete(&[b"r".as_slice(), &retained_tail(&key, t, offset)].concat());
            out.state.delete(&qkey);
            recompute.insert(key);
        }
        for key in recompute {
            let partition = last.partition;
            let slot = self.sliding_slot(store, &mut dirty, &key, partition)?;
            let mut acc = self.new_acc(slot.acc.partition);
            acc.version = slot.acc.version;
            let prefix = key_prefix(b'r', &key);
            let to = prefix_end(&prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 17]);
            for (rkey, inputs) in range_through(store, &out.state, &prefix, &to)? {
                let mut r = Reader::new(&rkey[prefix.len()..]);
                let t = r.i64_sortable()?;
                let offset = i64::from_be_bytes(
                    r.rest()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("sliding entry".into()))?,
                );
                acc.add(&decode_inputs(&inputs)?, t, offset);
            }
            slot.acc = acc;
            slot.version = Some(last.clone());
        }
        let window = Window {
            start: st.saturating_sub(size),
            end: st,
        };
        for (key, mut slot) in dirty {
            let Some(version) = slot.version.take() else {
                continue;
            };
            let akey = key_prefix(b'a', &key);
            if slot.acc.events == 0 {
                out.state.delete(&akey);
            } else {
                out.state.put(&akey, &slot.acc.encode());
            }
            slot.window = window;
            out.updates.push(slot.update(&self.config, version, false));
        }
        Ok(())
    }

    fn sliding_slot<'a, S: StateStore + ?Sized>(
        &self,
        store: &S,
        dirty: &'a mut BTreeMap<Bytes, Slot>,
        key: &Bytes,
        partition: i32,
    ) -> Result<&'a mut Slot, StoreError> {
        if !dirty.contains_key(key) {
            let stored = store
                .get(&key_prefix(b'a', key))?
                .map(|b| Acc::decode(&b))
                .transpose()?;
            dirty.insert(
                key.clone(),
                Slot {
                    is_new: stored.is_none(),
                    acc: stored.unwrap_or_else(|| self.new_acc(partition)),
                    key: key.clone(),
                    window: Window { start: 0, end: 0 },
                    version: None,
                },
            );
        }
        dirty
            .get_mut(key)
            .ok_or_else(|| StoreError::Corrupt("sliding slot vanished".into()))
    }
}

/// An accumulator being updated in this batch.
struct Slot {
    is_new: bool,
    acc: Acc,
    key: Bytes,
    window: Window,
    /// Coordinates of the latest input that changed it in this batch; `None` = unchanged.
    version: Option<Coords>,
}

impl Slot {
    fn update(self, config: &AggregateConfig, version: Coords, closed: bool) -> AggregateUpdate {
        AggregateUpdate {
            values: Some(self.acc.values(config)),
            events: self.acc.events,
            key: self.key,
            window: self.window,
            version,
            closed,
        }
    }
}

/// The state of one (key, window): every function's accumulator, and the input offset of the
/// latest event applied (so an event already in it is never applied twice, even when a partial
/// changelog restore put the state ahead of the store's offsets).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Acc {
    partition: i32,
    version: i64,
    events: u64,
    fns: Vec<FnAcc>,
}

#[derive(Debug, Clone, PartialEq)]
enum FnAcc {
    Count,
    Sum { sum: f64, n: u64 },
    Min(Option<f64>),
    Max(Option<f64>),
    Latest(Option<(i64, i64, Scalar)>),
    Distinct(BTreeMap<Vec<u8>, u32>),
}

impl FnAcc {
    fn new(f: &AggFn) -> Self {
        match f {
            AggFn::Count => FnAcc::Count,
            AggFn::Sum(_) | AggFn::Avg(_) => FnAcc::Sum { sum: 0.0, n: 0 },
            AggFn::Min(_) => FnAcc::Min(None),
            AggFn::Max(_) => FnAcc::Max(None),
            AggFn::Latest(_) => FnAcc::Latest(None),
            AggFn::DistinctCount(_) => FnAcc::Distinct(BTreeMap::new()),
        }
    }
}

impl Acc {
    /// Whether `event` is already applied: per partition, events arrive in offset order.
    fn contains(&self, event: &Event) -> bool {
        self.partition == event.coords.partition && self.version >= event.coords.offset
    }

    fn add(&mut self, inputs: &[Option<Scalar>], t: i64, offset: i64) {
        self.events += 1;
        self.version = self.version.max(offset);
        for (acc, input) in self.fns.iter_mut().zip(inputs) {
            let Some(input) = input else { continue };
            match acc {
                FnAcc::Count => {}
                FnAcc::Sum { sum, n } => {
                    if let Some(v) = input.as_f64() {
                        *sum += v;
                        *n += 1;
                    }
                }
                FnAcc::Min(m) => {
                    if let Some(v) = input.as_f64() {
                        *m = Some(m.map_or(v, |m| m.min(v)));
                    }
                }
                FnAcc::Max(m) => {
                    if let Some(v) = input.as_f64() {
                        *m = Some(m.map_or(v, |m| m.max(v)));
                    }
                }
                FnAcc::Latest(latest) => {
                    if latest
                        .as_ref()
                        .is_none_or(|(lt, lo, _)| (t, offset) > (*lt, *lo))
                    {
                        *latest = Some((t, offset, input.clone()));
                    }
                }
                FnAcc::Distinct(values) => {
                    *values.entry(encode_scalar(input)).or_insert(0) += 1;
                }
            }
        }
    }

    fn merge(&mut self, other: &Acc) {
        self.events += other.events;
        self.version = self.version.max(other.version);
        for (acc, o) in self.fns.iter_mut().zip(&other.fns) {
            match (acc, o) {
                (FnAcc::Sum { sum, n }, FnAcc::Sum { sum: s2, n: n2 }) => {
                    *sum += s2;
                    *n += n2;
                }
                (FnAcc::Min(a), FnAcc::Min(b)) => *a = min_opt(*a, *b, f64::min),
                (FnAcc::Max(a), FnAcc::Max(b)) => *a = min_opt(*a, *b, f64::max),
                (FnAcc::Latest(a), FnAcc::Latest(Some(b)))
                    if a.as_ref().is_none_or(|(t, o, _)| (b.0, b.1) > (*t, *o)) =>
                {
                    *a = Some(b.clone());
                }
                (FnAcc::Distinct(a), FnAcc::Distinct(b)) => {
                    for (v, c) in b {
                        *a.entry(v.clone()).or_insert(0) += c;
                    }
                }
                _ => {}
            }
        }
    }

    fn values(&self, config: &AggregateConfig) -> Vec<AggValue> {
        self.fns
            .iter()
            .zip(&config.functions)
            .map(|(acc, (_, f))| match (acc, f) {
                (FnAcc::Count, _) => AggValue::Int(self.events),
                (FnAcc::Sum { n: 0, .. }, AggFn::Avg(_)) => AggValue::Null,
                (FnAcc::Sum { sum, n }, AggFn::Avg(_)) => AggValue::Num(sum / *n as f64),
                (FnAcc::Sum { sum, .. }, _) => AggValue::Num(*sum),
                (FnAcc::Min(v) | FnAcc::Max(v), _) => v.map_or(AggValue::Null, AggValue::Num),
                (FnAcc::Latest(v), _) => v
                    .as_ref()
                    .map_or(AggValue::Null, |(_, _, s)| AggValue::Scalar(s.clone())),
                (FnAcc::Distinct(values), _) => AggValue::Int(values.len() as u64),
            })
            .collect()
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(32 + 16 * self.fns.len());
        w.u32(self.partition as u32)
            .i64(self.version)
            .u64(self.events)
            .u32(self.fns.len() as u32);
        for acc in &self.fns {
            match acc {
                FnAcc::Count => {
                    w.u8(0);
                }
                FnAcc::Sum { sum, n } => {
                    w.u8(1).f64(*sum).u64(*n);
                }
                FnAcc::Min(v) | FnAcc::Max(v) => {
                    w.u8(if matches!(acc, FnAcc::Min(_)) { 2 } else { 3 });
                    match v {
                        Some(v) => w.u8(1).f64(*v),
                        None => w.u8(0),
                    };
                }
                FnAcc::Latest(v) => {
                    w.u8(4);
                    match v {
                        Some((t, o, s)) => w.u8(1).i64(*t).i64(*o).bytes(&encode_scalar(s)),
                        None => w.u8(0),
                    };
                }
                FnAcc::Distinct(values) => {
                    w.u8(5).u32(values.len() as u32);
                    for (v, c) in values {
                        w.bytes(v).u32(*c);
                    }
                }
            }
        }
        w.finish()
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader::new(bytes);
        let partition = r.u32()? as i32;
        let version = r.i64()?;
        let events = r.u64()?;
        let n = r.u32()? as usize;
        let mut fns = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            fns.push(match r.u8()? {
                0 => FnAcc::Count,
                1 => FnAcc::Sum {
                    sum: r.f64()?,
                    n: r.u64()?,
                },
                tag @ (2 | 3) => {
                    let v = if r.u8()? == 1 { Some(r.f64()?) } else { None };
                    if tag == 2 {
                        FnAcc::Min(v)
                    } else {
                        FnAcc::Max(v)
                    }
                }
                4 => FnAcc::Latest(if r.u8()? == 1 {
                    Some((r.i64()?, r.i64()?, decode_scalar(r.bytes()?)?))
                } else {
                    None
                }),
                5 => {
                    let len = r.u32()?;
                    let mut values = BTreeMap::new();
                    for _ in 0..len {
                        let v = r.bytes()?.to_vec();
                        values.insert(v, r.u32()?);
                    }
                    FnAcc::Distinct(values)
                }
                other => return Err(StoreError::Corrupt(format!("accumulator tag {other}"))),
            });
        }
        Ok(Acc {
            partition,
            version,
            events,
            fns,
        })
    }
}

/// Where an expiry scan starts: the previous batch's horizon (everything below it is gone;
/// scanning from it skips the tombstones the LSM keeps until compaction).
fn scan_start(tag: u8, loaded: Option<i64>, horizon: impl Fn(i64) -> i64) -> Vec<u8> {
    let mut from = vec![tag];
    if let Some(st) = loaded {
        from.extend_from_slice(&i64_sortable(horizon(st)));
    }
    from
}

fn min_opt(a: Option<f64>, b: Option<f64>, pick: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn encode_scalar(s: &Scalar) -> Vec<u8> {
    match s {
        Scalar::Num(n) => [&[0u8][..], &n.to_bits().to_be_bytes()].concat(),
        Scalar::Text(t) => [&[1u8][..], t.as_bytes()].concat(),
    }
}

fn decode_scalar(b: &[u8]) -> Result<Scalar, StoreError> {
    match b.split_first() {
        Some((0, n)) => Ok(Scalar::Num(f64::from_bits(u64::from_be_bytes(
            n.try_into()
                .map_err(|_| StoreError::Corrupt("scalar".into()))?,
        )))),
        Some((1, t)) => Ok(Scalar::Text(
            String::from_utf8(t.to_vec()).map_err(|_| StoreError::Corrupt("scalar".into()))?,
        )),
        _ => Err(StoreError::Corrupt("scalar".into())),
    }
}

fn encode_inputs(inputs: &[Option<Scalar>]) -> Vec<u8> {
    let mut w = Writer::with_capacity(8 + 12 * inputs.len());
    w.u32(inputs.len() as u32);
    for input in inputs {
        match input {
            Some(s) => w.u8(1).bytes(&encode_scalar(s)),
            None => w.u8(0),
        };
    }
    w.finish()
}

fn decode_inputs(bytes: &[u8]) -> Result<Vec<Option<Scalar>>, StoreError> {
    let mut r = Reader::new(bytes);
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        out.push(if r.u8()? == 1 {
            Some(decode_scalar(r.bytes()?)?)
        } else {
            None
        });
    }
    Ok(out)
}

/// `len(key) key`: keys are length-prefixed so one key is never a prefix of another.
fn key_prefix_tail(key: &[u8]) -> Vec<u8> {
    let mut w = Writer::with_capacity(key.len() + 4);
    w.bytes(key);
    w.finish()
}

fn key_prefix(tag: u8, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 21);
    out.push(tag);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out
}

/// `tag len(key) key start`.
fn keyed(tag: u8, key: &[u8], start: i64) -> Vec<u8> {
    let mut out = key_prefix(tag, key);
    out.extend_from_slice(&i64_sortable(start));
    out
}

fn parse_keyed(tail: &[u8]) -> Result<(Bytes, i64), StoreError> {
    let mut r = Reader::new(tail);
    let key = Bytes::copy_from_slice(r.bytes()?);
    let start = r.i64_sortable()?;
    Ok((key, start))
}

fn session_tail(key: &[u8], start: i64) -> Vec<u8> {
    keyed(0, key, start)[1..].to_vec()
}

fn retained_tail(key: &[u8], t: i64, offset: i64) -> Vec<u8> {
    let mut out = key_prefix(0, key);
    out.remove(0);
    out.extend_from_slice(&i64_sortable(t));
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

/// `tag end tail`: an expiry index entry ordered by window end.
fn index_key(tag: u8, end: i64, tail: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tail.len() + 9);
    out.push(tag);
    out.extend_from_slice(&i64_sortable(end));
    out.extend_from_slice(tail);
    out
}

#[cfg(test)]
mod tests;
