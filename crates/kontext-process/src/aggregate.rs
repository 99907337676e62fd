//! Windowed aggregation per key: count, sum, avg, min, max, latest, distinct count over
//! tumbling, hopping, session and sliding ("last N") windows by event time.
//!
//! Semantics (the model tests check exactly these); `st` is the stream time, the largest
//! event time seen so far including the current event, and `h` the close horizon,
//! `st - grace` (but never below the horizon an earlier batch recorded, so a restart with a
//! larger grace does not open closed windows again):
//! - tumbling / hopping: an event updates each window `[start, end)` containing it whose
//!   `end > h`; if none is open it is **dropped late**. A window's state is deleted once
//!   `end <= h`.
//! - session: an event with `t < h` is dropped late. Otherwise it joins every session
//!   of its key within `gap` of it (merging them). A session is deleted once
//!   `end + gap < h`: no admissible event can reach it any more.
//! - sliding: an event with `t <= st - size` is dropped late; the key's value covers its events
//!   in `(st - size, st]` and is re-emitted when events leave that range.
//!
//! Outputs are full values: for each (key, window) a batch changed, one [`AggregateUpdate`]
//! with the whole aggregate, versioned by the input coordinates of the latest input that
//! changed it. A merged-away session is an update with `values: None` (a tombstone).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;

use crate::codec::{i64_sortable, Reader, Writer};
use crate::event::{Coords, Event, FieldPath, Scalar};
use crate::progress::Progress;
use crate::store::{
    claim_sequence, expiry_scan, get_through, prefix_end, range_through, StateStore, StoreError,
    WriteBatch,
};
use crate::window::{Window, WindowSpec};

/// Key of the last batch number (the per-batch expiry entries of tumbling, hopping and sliding
/// windows).
const SEQ_KEY: &[u8] = b"n";

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
    /// The function's name, as the pipeline file spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            AggFn::Count => "count",
            AggFn::Sum(_) => "sum",
            AggFn::Avg(_) => "avg",
            AggFn::Min(_) => "min",
            AggFn::Max(_) => "max",
            AggFn::Latest(_) => "latest",
            AggFn::DistinctCount(_) => "distinct_count",
        }
    }

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

/// What a quiet key of a tumbling or hopping aggregation shows next ([`Aggregate::roll`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Roll {
    /// No event of the shown window has left it: keep showing it, and ask again once stream
    /// time reaches `until`.
    Keep { until: i64 },
    /// Show `window`, with the values of its events, `None` when it has none (then show
    /// [`Aggregate::empty_values`]; nothing changes before the key's next event). `until`:
    /// when its oldest event leaves it, if it has events.
    Move {
        window: Window,
        values: Option<Vec<AggValue>>,
        until: Option<i64>,
    },
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
    /// A sliding key keeps at most this many retained events inside its entry.
    inline_limit: usize,
}

/// How many retained events a sliding key keeps inside its entry by default. A key with more
/// keeps them in entries of their own (`r`), since rewriting them all whenever the key changes
/// would cost more than the writes it saves.
const INLINE_LIMIT: usize = 16;

impl Aggregate {
    /// What the operator's stored state depends on, as text: the functions in order (its
    /// accumulators are stored as a list and read by position) and, for tumbling and hopping
    /// windows, the size and advance (state keys hold a window's or pane's start, not its
    /// size), e.g. `tumbling 86400000 ms: count(), sum(total)`. Grace, emit, a session gap
    /// and a sliding size can change on existing state; state of another definition would be
    /// read as wrong values, so a runtime stores this with the state and refuses a mismatch.
    pub fn definition(&self) -> String {
        let window = match self.config.window {
            WindowSpec::Tumbling { size_ms } => format!("tumbling {size_ms} ms"),
            WindowSpec::Hopping {
                size_ms,
                advance_ms,
            } => format!("hopping {size_ms} ms by {advance_ms} ms"),
            WindowSpec::Session { .. } => "session".into(),
            WindowSpec::Sliding { .. } => "sliding".into(),
        };
        let functions: Vec<String> = self
            .config
            .functions
            .iter()
            .map(|(_, f)| {
                format!(
                    "{}({})",
                    f.kind(),
                    f.field().map(|p| p.to_string()).unwrap_or_default()
                )
            })
            .collect();
        format!("{window}: {}", functions.join(", "))
    }

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
        Ok(Self {
            config,
            inline_limit: INLINE_LIMIT,
        })
    }

    /// Keeps at most `limit` retained events inside a sliding key's entry (default 16); a key
    /// with more keeps each in an entry of its own, and goes back once it has at most
    /// `limit / 2`. Any limit gives the same outputs: it trades state writes of busy keys for
    /// those of sparse ones. 0 keeps every event in an entry of its own, the layout before
    /// December 2026. A key's entry is rewritten whole at every change, so a large limit makes
    /// each event of a busy key cost a write of all its retained events.
    pub fn with_sliding_inline_limit(mut self, limit: usize) -> Self {
        self.inline_limit = limit;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &AggregateConfig {
        &self.config
    }

    /// The events a sliding window's state retains, `(key, time, offset)` each, in either
    /// layout (inside their key's entry or in entries of their own). For tests and diagnostics:
    /// it reads the whole state.
    pub fn sliding_retained<S: StateStore + ?Sized>(
        store: &S,
    ) -> Result<Vec<(Bytes, i64, i64)>, StoreError> {
        let corrupt = || StoreError::Corrupt("sliding entry".into());
        let mut out = Vec::new();
        for entry in store.prefix(b"a") {
            let (akey, bytes) = entry?;
            if akey.len() < 5 {
                return Err(corrupt());
            }
            let key = akey.slice(5..);
            for k in decode_sliding_entry(&bytes)?.1.unwrap_or_default() {
                out.push((key.clone(), k.t, k.offset));
            }
        }
        for entry in store.prefix(b"r") {
            let (rkey, _) = entry?;
            let mut r = Reader::new(&rkey[1..]);
            let key = Bytes::copy_from_slice(r.bytes()?);
            let t = r.i64_sortable()?;
            let offset = i64::from_be_bytes(r.rest().try_into().map_err(|_| corrupt())?);
            out.push((key, t, offset));
        }
        out.sort();
        Ok(out)
    }

    /// Aggregates a batch of events (in input order).
    pub fn process<S: StateStore + ?Sized>(
        &self,
        store: &S,
        events: &[Event],
    ) -> Result<AggregateBatch, StoreError> {
        self.process_selected(store, events, &|_, _| true)
    }

    /// [`Aggregate::process`], emitting only the updates whose key and window `select`
    /// accepts; the state changes are the same. For a consumer that shows one window per key:
    /// a hopping window of size `s` and advance `a` changes `s / a` windows per event, and
    /// building the others' values is most of what emission costs (hopping windows skip
    /// them; other kinds filter what they built).
    pub fn process_selected<S: StateStore + ?Sized>(
        &self,
        store: &S,
        events: &[Event],
        select: &dyn Fn(&[u8], &Window) -> bool,
    ) -> Result<AggregateBatch, StoreError> {
        let mut out = AggregateBatch::default();
        if events.is_empty() {
            return Ok(out);
        }
        match self.config.window {
            WindowSpec::Tumbling { .. } | WindowSpec::Hopping { .. } => {
                if PaneLayout::of(self.config.window).one_pane_per_window() {
                    self.process_tumbling(store, events, &mut out)?
                } else {
                    self.process_fixed(store, events, select, &mut out)?
                }
            }
            WindowSpec::Session { gap_ms } => {
                self.process_session(store, events, gap_ms, &mut out)?
            }
            WindowSpec::Sliding { size_ms } => {
                self.process_sliding(store, events, size_ms, &mut out)?
            }
        }
        out.updates.retain(|u| select(&u.key, &u.window));
        Ok(out)
    }

    /// What a key that shows the window ending at `shown_end` (a tumbling or hopping window)
    /// and had no event since should show once stream time is `st`, for a consumer that shows
    /// one window per key (the features processor); `None` for session and sliding windows.
    ///
    /// The shown window's value changes only when one of its events leaves it: when stream
    /// time passes the end of the last window holding the event. Until then the key keeps
    /// it ([`Roll::Keep`]). Then it shows the first window after the newest event that left,
    /// with the events still in it (which every later window holds too, until the next one
    /// leaves), or, when none are, the empty window after its newest event ([`Roll::Move`]).
    /// So what a key shows depends on its events and `st` only, not on how batches were cut,
    /// as long as its state is there: a key whose roll comes after the batch that dropped its
    /// state shows the current window, empty.
    ///
    /// `refresh`: what the key shows may not be the shown window's value (the empty window a
    /// key rolled to, which a late event has since added to): never keep it, show its value.
    ///
    /// Reads the key's state as `batch` leaves it, plus what `batch` deleted of it: the batch
    /// whose stream time closes a key's windows may drop their state in the same batch.
    pub fn roll<S: StateStore + ?Sized>(
        &self,
        store: &S,
        batch: &WriteBatch,
        key: &[u8],
        shown_end: i64,
        st: i64,
        refresh: bool,
    ) -> Result<Option<Roll>, StoreError> {
        let (WindowSpec::Tumbling { .. } | WindowSpec::Hopping { .. }) = self.config.window else {
            return Ok(None);
        };
        let read = |k: &[u8]| match batch.get(k) {
            Some(Some(value)) => Ok(Some(value.clone())),
            _ => store.get(k),
        };
        let layout = PaneLayout::of(self.config.window);
        let shown = Window {
            start: shown_end - layout.size,
            end: shown_end,
        };
        // The key's panes, by start (a tumbling window is one pane: a key has no events in
        // a later one, which it would show).
        let panes: Vec<(i64, Acc)> = if layout.one_pane_per_window() {
            let stored = read(&keyed(b'a', key, shown.start))?;
            stored
                .map(|bytes| Acc::decode(&bytes))
                .transpose()?
                .map(|acc| vec![(shown.start, acc)])
                .unwrap_or_default()
        } else {
            let pkey = key_prefix(b'P', key);
            let mut by_start: BTreeMap<i64, Acc> = BTreeMap::new();
            for bytes in [store.get(&pkey)?, batch.get(&pkey).flatten().cloned()]
                .into_iter()
                .flatten()
            {
                by_start.extend(decode_panes(&bytes)?);
            }
            by_start.into_iter().collect()
        };
        let panes: Vec<(i64, Acc)> = panes
            .into_iter()
            .filter(|(start, acc)| acc.events > 0 && *start >= shown.start)
            .collect();
        let advance = layout.advance;
        // Panes leave in start order (`expiry` grows with the start).
        let newest_left = panes
            .iter()
            .map(|(start, _)| *start)
            .filter(|start| layout.expiry(*start) <= st)
            .max();
        let newest = panes.iter().map(|(start, _)| *start).max();
        let start = match (newest_left, newest) {
            // Nothing left, and the shown window holds every pane: keep it. (Refreshed, the
            // arm below moves to the shown window itself.)
            (None, Some(newest)) if newest < shown.end && !refresh => {
                let until = panes.iter().map(|(s, _)| layout.expiry(*s)).min();
                return Ok(Some(Roll::Keep {
                    until: until.unwrap_or(shown.end),
                }));
            }
            // The first window after the newest pane that left and holding the newest pane
            // (a late event can leave a pane after the shown window, whose own window had
            // closed while later ones had not).
            (left, Some(newest)) => {
                let after_left =
                    left.map_or(shown.start, |l| (l.div_euclid(advance) + 1) * advance);
                let holding_newest = (newest - layout.size).div_euclid(advance) * advance + advance;
                after_left.max(holding_newest)
            }
            // No state left (the key's panes were dropped in an earlier batch, when its roll
            // waited behind others): the current window, empty.
            (_, None) => {
                let end = self.config.window.closing_next(st).unwrap_or(shown.end);
                end - layout.size
            }
        };
        let window = Window {
            start,
            end: start + layout.size,
        };
        let mut merged: Option<Acc> = None;
        let mut until: Option<i64> = None;
        for (pane, acc) in &panes {
            if *pane >= window.start && *pane < window.end {
                merged = merge_accs(merged, Some(acc.clone()));
                let expiry = layout.expiry(*pane);
                until = Some(until.map_or(expiry, |u| u.min(expiry)));
            }
        }
        Ok(Some(Roll::Move {
            window,
            values: merged.map(|acc| acc.values(&self.config)),
            until,
        }))
    }

    /// The values of a window without events: counts and sums 0, the others null.
    pub fn empty_values(&self) -> Vec<AggValue> {
        self.new_acc(0).values(&self.config)
    }

    fn inputs(&self, event: &Event) -> Vec<Option<Scalar>> {
        self.config
            .functions
            .iter()
            .map(|(_, f)| f.field().and_then(|path| event.scalar(path)))
            .collect()
    }

    /// An empty accumulator that keeps `acc`'s partition and version (the inputs it applied
    /// stay applied), for a key whose window emptied or is rebuilt.
    fn emptied(&self, acc: &Acc) -> Acc {
        let mut empty = self.new_acc(acc.partition);
        empty.version = acc.version;
        empty
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

    /// Tumbling windows (and hopping ones with `advance == size`): one accumulator per window.
    /// Keys: `a key start` → accumulator; `x end seq` → the windows ending at `end` that batch
    /// `seq` created (`len key start` each): the expiry index, one entry per batch and window
    /// end rather than one per window (an entry `x end key start` with an empty value, of the
    /// earlier layout, names one window); `n` → the last batch number. Kept apart from
    /// the pane code, which would give the same layout here (a pane is the window) but is
    /// 10-20% slower per event for it (grouping by key, merging at emission).
    fn process_tumbling<S: StateStore + ?Sized>(
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
            if event.is_tick() {
                continue; // it moved stream time; it joins no key
            }
            let mut inputs = None;
            let mut open = false;
            let horizon = progress.horizon(st, grace);
            for window in self.config.window.windows_for(event.time_ms) {
                if window.end <= horizon {
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
        let horizon = progress.close_through(st, grace);
        progress.finish(&mut out.state);
        // The windows this batch created, by end: `len key start` each.
        let mut created: BTreeMap<i64, Writer> = BTreeMap::new();
        for (skey, mut slot) in dirty {
            let Some(version) = slot.version.take() else {
                continue;
            };
            out.state.put(&skey, &slot.acc.encode());
            if slot.is_new {
                created.entry(slot.window.end).or_default().raw(&skey[1..]);
            }
            if self.config.emit == Emit::OnUpdate {
                out.updates.push(slot.update(&self.config, version, false));
            }
        }
        put_created_index(store, &mut out.state, b'x', created)?;
        // Close windows with end <= horizon.
        let mut end = b"x".to_vec();
        end.extend_from_slice(&i64_sortable(horizon.saturating_add(1)));
        for (xkey, windows) in expiry_scan(store, &mut out.state, b'x', end)? {
            let window_end = Reader::new(&xkey[1..]).i64_sortable()?;
            for tail in created_index_tails(&xkey, &windows)? {
                let mut skey = Vec::with_capacity(tail.len() + 1);
                skey.push(b'a');
                skey.extend_from_slice(tail);
                if self.config.emit == Emit::OnClose {
                    if let Some(bytes) = get_through(store, &out.state, &skey)? {
                        let acc = Acc::decode(&bytes)?;
                        let (key, start) = parse_keyed(tail)?;
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
            }
            out.state.delete(&xkey);
        }
        Ok(())
    }

    /// Hopping windows, kept as **panes**: a pane is `gcd(size, advance)` of event time, every
    /// window is a whole number of panes, and a window's value is the merge of its panes. An
    /// event updates one pane (not `size / advance` windows); windows are merged from their
    /// panes when emitted.
    ///
    /// Keys: `P key` → the key's panes (start and accumulator each, by start), read with one
    /// point lookup, where emitting a window reads up to `size / pane` of them;
    /// `v expiry seq` → expiry index: the keys (`len key pane-start` each) whose entry batch
    /// `seq` created, or kept when it expired the panes of an earlier mention, under the
    /// expiry of the entry's newest pane (the end of its last window); `n` → the last batch
    /// number; with emit on close also `w end key start` → the window has events (what closes
    /// when stream time passes `end + grace`).
    ///
    /// A pane whose windows all closed is dropped when its key is next written, or when a
    /// mention of its key expires; a key left with panes is then mentioned again under its
    /// newest pane's expiry. So a busy key costs an index mention per `size + grace` of event
    /// time, not one per pane, and an idle key's entry goes when its last window closes.
    /// A store of the earlier layout (`p key pane-start` → accumulator, and an index mention
    /// per pane) is moved to this one at its first batch ([`Self::migrate_panes`]).
    fn process_fixed<S: StateStore + ?Sized>(
        &self,
        store: &S,
        events: &[Event],
        select: &dyn Fn(&[u8], &Window) -> bool,
        out: &mut AggregateBatch,
    ) -> Result<(), StoreError> {
        let grace = self.config.grace_ms;
        let layout = PaneLayout::of(self.config.window);
        let mut progress = Progress::load(store, &out.state)?;
        Self::migrate_panes(store, &mut out.state)?;
        let loaded = progress.loaded_stream_time();
        // A window with `end > horizon(bound)` is open for the whole batch, so every event this
        // batch adds to one of its panes is in it. The others ("at risk": they may close during
        // the batch, after which events still reach their panes through later windows) keep
        // what the batch added to them separately.
        let bound = events
            .iter()
            .map(|e| e.time_ms)
            .chain(loaded)
            .max()
            .unwrap_or(i64::MIN);
        let risk_horizon = progress.horizon(bound, grace);
        let at_risk = |w: &Window| w.end <= risk_horizon;
        let on_close = self.config.emit == Emit::OnClose;
        let mut keys: HashMap<Bytes, KeyPanes> = HashMap::new();
        let mut window_index = Vec::new();
        for (position, event) in events.iter().enumerate() {
            let Some(st) = progress.admit(event) else {
                out.already_applied += 1;
                continue;
            };
            if event.is_tick() {
                continue; // it moved stream time; it joins no key
            }
            let horizon = progress.horizon(st, grace);
            let mut open = self.config.window.windows_for(event.time_ms);
            open.retain(|w| w.end > horizon);
            if open.is_empty() {
                out.dropped_late += 1;
                continue;
            }
            let kp = key_panes(store, &out.state, &mut keys, &event.key)?;
            let start = layout.pane_start(event.time_ms);
            let pane = kp.pane(start);
            if pane.current.as_ref().is_some_and(|acc| acc.contains(event)) {
                continue;
            }
            if on_close {
                for window in &open {
                    if kp.window_acc(*window, true).is_none() {
                        window_index.push(index_key(
                            b'w',
                            window.end,
                            &keyed_tail(&event.key, window.start),
                        ));
                    }
                }
            }
            let inputs = self.inputs(event);
            let pane = kp.pane(start);
            if pane.last.is_none() {
                pane.stored = pane.current.clone();
            }
            pane.current
                .get_or_insert_with(|| self.new_acc(event.coords.partition))
                .add(&inputs, event.time_ms, event.coords.offset);
            pane.last = Some((position, event.coords.clone()));
            for window in open.iter().filter(|w| at_risk(w)) {
                let delta = match kp.deltas.iter_mut().find(|d| d.start == window.start) {
                    Some(delta) => delta,
                    None => {
                        kp.deltas.push(WindowDelta {
                            start: window.start,
                            acc: self.new_acc(event.coords.partition),
                            version: event.coords.clone(),
                        });
                        kp.deltas.last_mut().expect("just pushed")
                    }
                };
                delta.acc.add(&inputs, event.time_ms, event.coords.offset);
                delta.version = event.coords.clone();
            }
        }
        let Some(st) = progress.stream_time() else {
            return Ok(());
        };
        let topic = events[events.len() - 1].coords.topic.clone();
        let horizon = progress.close_through(st, grace);
        let to = |tag| {
            let mut end = vec![tag];
            end.extend_from_slice(&i64_sortable(horizon.saturating_add(1)));
            end
        };
        progress.finish(&mut out.state);
        // The keys of the batch's events (and, below, of the windows it closes), sorted once
        // for the emission and the index of created entries.
        let mut order = key_order(&keys);
        if self.config.emit == Emit::OnUpdate {
            for key in &order {
                let kp = keys
                    .get_mut(key)
                    .ok_or_else(|| StoreError::Corrupt("key vanished".into()))?;
                self.emit_changed(layout, kp, &at_risk, select, &mut out.updates)?;
            }
        } else {
            for wkey in window_index {
                out.state.put_bytes(Bytes::from(wkey), Bytes::new());
            }
            // Close windows with end <= horizon.
            for (wkey, _) in expiry_scan(store, &mut out.state, b'w', to(b'w'))? {
                let mut r = Reader::new(&wkey[1..]);
                let end = r.i64_sortable()?;
                let (key, start) = parse_keyed(r.rest())?;
                let window = Window { start, end };
                let kp = key_panes(store, &out.state, &mut keys, &key)?;
                let stored = kp.window_acc(window, false);
                let delta = kp
                    .deltas
                    .iter()
                    .position(|d| d.start == start)
                    .map(|i| kp.deltas.swap_remove(i).acc);
                if let Some(acc) = merge_accs(stored, delta) {
                    let version = Coords::new(topic.clone(), acc.partition, acc.version);
                    out.updates
                        .push(update(&self.config, key, window, acc, version, true));
                }
                out.state.delete(&wkey);
            }
            order = key_order(&keys);
        }
        // A key's panes are written without those whose windows all closed
        // (expiry <= horizon); a key is mentioned under its newest pane's expiry.
        let live = |pane: &&Pane| pane.current.is_some() && layout.expiry(pane.start) > horizon;
        let mention = |mentions: &mut BTreeMap<i64, Writer>, key: &[u8], newest: i64| {
            mentions
                .entry(layout.expiry(newest))
                .or_default()
                .raw(&keyed_tail(key, newest));
        };
        // The keys whose entry this batch creates are mentioned before the scan, which starts
        // at the batch's lowest mention when that is below where the last scan ended (after a
        // restart with a larger grace, in a store of a version that recorded no horizon, it can
        // be).
        let mut created: BTreeMap<i64, Writer> = BTreeMap::new();
        for key in &order {
            let kp = &keys[key];
            if let (false, Some(newest)) = (
                kp.stored,
                kp.panes.iter().filter(live).map(|p| p.start).max(),
            ) {
                mention(&mut created, &kp.key, newest);
            }
        }
        put_created_index(store, &mut out.state, b'v', created)?;
        // Keys mentioned under an expiry that passed (expiry <= horizon).
        for (vkey, mentions) in expiry_scan(store, &mut out.state, b'v', to(b'v'))? {
            for tail in created_index_tails(&vkey, &mentions)? {
                let (key, _) = parse_keyed(tail)?;
                key_panes(store, &out.state, &mut keys, &key)?.mentioned = true;
            }
            out.state.delete(&vkey);
        }
        // Write the keys the batch changed or that were mentioned; mention again those of the
        // mentioned keys that keep panes (at or above where the scan ended).
        let mut again: BTreeMap<i64, Writer> = BTreeMap::new();
        for key in key_order(&keys) {
            let kp = &keys[&key];
            let changed = kp.panes.iter().any(|p| p.last.is_some());
            let kept: Vec<&Pane> = kp.panes.iter().filter(live).collect();
            let pruned = kept.len() < kp.panes.iter().filter(|p| p.current.is_some()).count();
            let pkey = key_prefix(b'P', &kp.key);
            let Some(newest) = kept.iter().map(|p| p.start).max() else {
                if kp.stored {
                    out.state.delete(&pkey);
                }
                continue;
            };
            if changed || pruned {
                out.state.put(&pkey, &encode_panes(kept));
            }
            if kp.stored && kp.mentioned {
                mention(&mut again, &kp.key, newest);
            }
        }
        put_created_index(store, &mut out.state, b'v', again)?;
        Ok(())
    }

    /// Moves the panes of a store written before they were kept per key (`p key pane-start` →
    /// accumulator) into per-key entries in `batch`, once, and marks the store
    /// ([`PANES_PER_KEY`]). The index mentions of the earlier layout (one per pane, as
    /// `len key pane-start`) name the keys as the new ones do.
    fn migrate_panes<S: StateStore + ?Sized>(
        store: &S,
        batch: &mut WriteBatch,
    ) -> Result<(), StoreError> {
        if get_through(store, batch, PANES_PER_KEY)?.is_some() {
            return Ok(());
        }
        let mut keys: BTreeMap<Bytes, Writer> = BTreeMap::new();
        // In key order: by key, then pane start.
        for (pkey, bytes) in range_through(store, batch, b"p", b"q")? {
            let (key, start) = parse_keyed(&pkey[1..])?;
            keys.entry(key).or_default().i64(start).bytes(&bytes);
            batch.delete(&pkey);
        }
        for (key, panes) in keys {
            batch.put(&key_prefix(b'P', &key), &panes.finish());
        }
        batch.put(PANES_PER_KEY, &[1]);
        Ok(())
    }

    /// Emits every window of `kp` the batch changed that `select` accepts, by window start.
    fn emit_changed(
        &self,
        layout: PaneLayout,
        kp: &mut KeyPanes,
        at_risk: &dyn Fn(&Window) -> bool,
        select: &dyn Fn(&[u8], &Window) -> bool,
        updates: &mut Vec<AggregateUpdate>,
    ) -> Result<(), StoreError> {
        let mut starts: Vec<i64> = kp.deltas.iter().map(|d| d.start).collect();
        for pane in kp.panes.iter().filter(|p| p.last.is_some()) {
            for window in self.config.window.windows_for(pane.start) {
                if !at_risk(&window) {
                    starts.push(window.start);
                }
            }
        }
        starts.sort_unstable();
        starts.dedup();
        starts.retain(|start| {
            let window = Window {
                start: *start,
                end: start.saturating_add(layout.size),
            };
            select(&kp.key, &window)
        });
        for start in starts {
            let window = Window {
                start,
                end: start.saturating_add(layout.size),
            };
            let (acc, version) = if at_risk(&window) {
                let Some(i) = kp.deltas.iter().position(|d| d.start == start) else {
                    continue;
                };
                let delta = kp.deltas.swap_remove(i);
                let stored = kp.window_acc(window, false);
                (merge_accs(stored, Some(delta.acc)), delta.version)
            } else {
                let acc = kp.window_acc(window, true);
                let version = kp
                    .panes
                    .iter()
                    .filter(|p| p.start >= window.start && p.start < window.end)
                    .filter_map(|p| p.last.as_ref())
                    .max_by_key(|(position, _)| *position)
                    .map(|(_, coords)| coords.clone())
                    .ok_or_else(|| StoreError::Corrupt("changed window has no pane".into()))?;
                (acc, version)
            };
            let acc = acc.ok_or_else(|| StoreError::Corrupt("changed window is empty".into()))?;
            updates.push(update(
                &self.config,
                kp.key.clone(),
                window,
                acc,
                version,
                false,
            ));
        }
        Ok(())
    }

    /// Session windows. Keys: `S key` → the key's sessions (bounds and accumulator each, by
    /// start), `y end key start` → expiry. One entry per key, read with a point lookup: an
    /// event finds the sessions it joins without a range scan, which in an LSM would walk the
    /// tombstones of the session's earlier ends (one per event that extended it, until
    /// compaction). A store of the earlier layout (`s key end start` → accumulator) is moved
    /// to this one at its first batch ([`Self::migrate_sessions`]).
    fn process_session<S: StateStore + ?Sized>(
        &self,
        store: &S,
        events: &[Event],
        gap: i64,
        out: &mut AggregateBatch,
    ) -> Result<(), StoreError> {
        let grace = self.config.grace_ms;
        let mut progress = Progress::load(store, &out.state)?;
        let mut keys = Self::migrate_sessions(store, &mut out.state)?;
        let mut dirty: BTreeSet<Bytes> = keys.keys().cloned().collect();
        // (key, window) → Some((acc, version)) or None (deleted), in emission order.
        let mut emitted: BTreeMap<(Bytes, Window), Option<(Acc, Coords)>> = BTreeMap::new();
        for event in events {
            let Some(st) = progress.admit(event) else {
                out.already_applied += 1;
                continue;
            };
            if event.is_tick() {
                continue; // it moved stream time; it joins no key
            }
            let t = event.time_ms;
            if t < progress.horizon(st, grace) {
                out.dropped_late += 1;
                continue;
            }
            let sessions = key_sessions(store, &out.state, &mut keys, &event.key)?;
            let (lo, hi) = (t.saturating_sub(gap), t.saturating_add(gap));
            let joins = |s: &Session| s.end >= lo && s.start <= hi;
            if sessions.iter().any(|s| joins(s) && s.acc.contains(event)) {
                continue;
            }
            let (absorbed, kept): (Vec<Session>, Vec<Session>) =
                std::mem::take(sessions).into_iter().partition(joins);
            *sessions = kept;
            let mut merged = self.new_acc(event.coords.partition);
            let (mut start, mut end) = (t, t);
            for s in &absorbed {
                merged.merge(&s.acc);
                start = start.min(s.start);
                end = end.max(s.end);
            }
            merged.add(&self.inputs(event), t, event.coords.offset);
            for s in absorbed {
                out.state
                    .delete(&index_key(b'y', s.end, &keyed_tail(&event.key, s.start)));
                let window = Window {
                    start: s.start,
                    end: s.end,
                };
                emitted.insert((event.key.clone(), window), None);
            }
            out.state
                .put(&index_key(b'y', end, &keyed_tail(&event.key, start)), &[]);
            emitted.insert(
                (event.key.clone(), Window { start, end }),
                Some((merged.clone(), event.coords.clone())),
            );
            let at = sessions.partition_point(|s| s.start < start);
            sessions.insert(
                at,
                Session {
                    start,
                    end,
                    acc: merged,
                },
            );
            dirty.insert(event.key.clone());
        }
        let Some(st) = progress.stream_time() else {
            // No event admitted and no stream time: still write what a migration moved.
            put_sessions(&mut out.state, &keys, dirty);
            return Ok(());
        };
        let topic = events[events.len() - 1].coords.topic.clone();
        let horizon = progress.close_through(st, grace);
        progress.finish(&mut out.state);
        // Expire sessions with end + gap < horizon.
        let mut to = b"y".to_vec();
        to.extend_from_slice(&i64_sortable(horizon.saturating_sub(gap)));
        let mut closed = Vec::new();
        for (ykey, _) in expiry_scan(store, &mut out.state, b'y', to)? {
            let mut r = Reader::new(&ykey[1..]);
            let s_end = r.i64_sortable()?;
            let (key, s_start) = parse_keyed(r.rest())?;
            out.state.delete(&ykey);
            let sessions = key_sessions(store, &out.state, &mut keys, &key)?;
            let Some(at) = sessions
                .iter()
                .position(|s| (s.start, s.end) == (s_start, s_end))
            else {
                continue;
            };
            let session = sessions.remove(at);
            dirty.insert(key.clone());
            if self.config.emit == Emit::OnClose {
                let acc = session.acc;
                let version = Coords::new(topic.clone(), acc.partition, acc.version);
                let window = Window {
                    start: s_start,
                    end: s_end,
                };
                closed.push(
                    Slot {
                        is_new: false,
                        acc,
                        key,
                        window,
                        version: None,
                    }
                    .update(&self.config, version, true),
                );
            }
        }
        put_sessions(&mut out.state, &keys, dirty);
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

    /// Moves the sessions of a store written before they were kept per key (`s key end start`
    /// → accumulator) into per-key entries, once: returns them by key, for the batch to write,
    /// and marks the store ([`SESSIONS_PER_KEY`]). The expiry index is the same in both.
    fn migrate_sessions<S: StateStore + ?Sized>(
        store: &S,
        batch: &mut WriteBatch,
    ) -> Result<BTreeMap<Bytes, Vec<Session>>, StoreError> {
        let mut keys: BTreeMap<Bytes, Vec<Session>> = BTreeMap::new();
        if get_through(store, batch, SESSIONS_PER_KEY)?.is_some() {
            return Ok(keys);
        }
        for (skey, bytes) in range_through(store, batch, b"s", b"t")? {
            let mut r = Reader::new(&skey[1..]);
            let key = Bytes::copy_from_slice(r.bytes()?);
            let end = r.i64_sortable()?;
            let start = r.i64_sortable()?;
            let acc = Acc::decode(&bytes)?;
            keys.entry(key)
                .or_default()
                .push(Session { start, end, acc });
            batch.delete(&skey);
        }
        for sessions in keys.values_mut() {
            sessions.sort_by_key(|s| s.start);
        }
        batch.put(SESSIONS_PER_KEY, &[1]);
        Ok(keys)
    }

    /// Sliding windows. Keys: `a key` → accumulator over the key's retained events and, while
    /// they are at most `inline_limit`, the events themselves (time, offset, inputs each); a
    /// key with more keeps each in `r key time offset` → inputs instead (the only layout
    /// before December 2026, whose `a` entries hold the accumulator alone). `q min seq` →
    /// expiry index: the events batch `seq` retained in one time bucket (`size / 16` wide),
    /// `(time, key, offset)` each, under the smallest time among them, with their inputs
    /// (key suffix `1`) when their key keeps them in `r` entries. When the horizon passes that
    /// time, the entry's expired events leave their keys and the rest is written back under
    /// its new smallest time, so an event costs one index mention instead of an index entry's
    /// put and delete. (An entry `q time key offset` with an empty value, of the earliest
    /// layout, names one event.)
    fn process_sliding<S: StateStore + ?Sized>(
        &self,
        store: &S,
        events: &[Event],
        size: i64,
        out: &mut AggregateBatch,
    ) -> Result<(), StoreError> {
        let mut progress = Progress::load(store, &out.state)?;
        let mut dirty: HashMap<Bytes, SlidingSlot> = HashMap::new();
        let width = (size / 16).max(1);
        // The events this batch retains, by time bucket.
        let mut retained: BTreeMap<i64, Vec<Retained>> = BTreeMap::new();
        for event in events {
            let Some(st) = progress.admit(event) else {
                out.already_applied += 1;
                continue;
            };
            if event.is_tick() {
                continue; // it moved stream time; it joins no key
            }
            if event.time_ms <= st.saturating_sub(size) {
                out.dropped_late += 1;
                continue;
            }
            let slot = self.sliding_slot(store, &mut dirty, &event.key, event.coords.partition)?;
            if slot.slot.acc.contains(event) {
                continue;
            }
            let inputs = self.inputs(event);
            let (t, offset) = (event.time_ms, event.coords.offset);
            slot.slot.acc.add(&inputs, t, offset);
            slot.slot.version = Some(event.coords.clone());
            // A key that keeps its events inside its entry needs no inputs in the index (and
            // keeps the layout it has now to the end of the batch, where it may move); one
            // that keeps them in `r` entries takes them from the index when they leave.
            let indexed = match &mut slot.kept {
                Some(kept) => {
                    let at = kept.partition_point(|k| (k.t, k.offset) < (t, offset));
                    kept.insert(at, Kept::new(t, offset, &inputs));
                    None
                }
                None => {
                    let encoded = Bytes::from(encode_inputs(&inputs));
                    let rkey = [b"r".as_slice(), &retained_tail(&event.key, t, offset)].concat();
                    out.state.put(&rkey, &encoded);
                    Some(encoded)
                }
            };
            retained
                .entry(t.div_euclid(width))
                .or_default()
                .push(Retained {
                    t,
                    key: event.key.clone(),
                    offset,
                    inputs: indexed,
                });
        }
        let Some(st) = progress.stream_time() else {
            return Ok(());
        };
        let last = events[events.len() - 1].coords.clone();
        progress.finish(&mut out.state);
        if !retained.is_empty() {
            let seq = claim_sequence(store, &mut out.state, SEQ_KEY)?;
            for events in retained.into_values() {
                let (with_inputs, without): (Vec<_>, Vec<_>) =
                    events.into_iter().partition(|e| e.inputs.is_some());
                put_retained_entry(&mut out.state, seq, &with_inputs);
                put_retained_entry(&mut out.state, seq, &without);
            }
        }
        // Events with t <= st - size leave their key's window.
        let horizon = st.saturating_sub(size);
        let mut to = b"q".to_vec();
        to.extend_from_slice(&i64_sortable(horizon.saturating_add(1)));
        // Keys whose accumulator cannot take a leaving event out exactly (it held the minimum,
        // the maximum or the latest value, or a sum that is not exact): rebuilt from their
        // retained events instead.
        let mut recompute = BTreeSet::new();
        for (qkey, value) in expiry_scan(store, &mut out.state, b'q', to)? {
            out.state.delete(&qkey);
            let (seq, events) = decode_retained_entry(&qkey, &value)?;
            let mut rest = Vec::new();
            for event in events {
                if event.t > horizon {
                    rest.push(event);
                    continue;
                }
                let Retained {
                    t,
                    key,
                    offset,
                    inputs,
                } = event;
                let slot = self.sliding_slot(store, &mut dirty, &key, last.partition)?;
                let rebuilt = recompute.contains(&key);
                let inputs = match &mut slot.kept {
                    Some(kept) => {
                        let at = kept
                            .binary_search_by(|k| (k.t, k.offset).cmp(&(t, offset)))
                            .ok();
                        let inputs = at.map(|at| kept.remove(at).inputs);
                        if rebuilt {
                            continue;
                        }
                        inputs.map(|i| decode_kept_inputs(&i)).transpose()?
                    }
                    None => {
                        let rkey = [b"r".as_slice(), &retained_tail(&key, t, offset)].concat();
                        // An index entry of an earlier layout, or written while the key kept
                        // its events inside its entry, does not hold the inputs: read them.
                        let inputs = match inputs {
                            _ if rebuilt => None,
                            Some(inputs) => Some(inputs),
                            None => get_through(store, &out.state, &rkey)?,
                        };
                        out.state.delete(&rkey);
                        if rebuilt {
                            continue;
                        }
                        inputs.map(|bytes| decode_inputs(&bytes)).transpose()?
                    }
                };
                let slot = &mut slot.slot;
                match inputs {
                    Some(inputs) if slot.acc.remove(&inputs, t, offset) => {
                        if slot.acc.events == 0 {
                            slot.acc = self.emptied(&slot.acc);
                        }
                        slot.version = Some(last.clone());
                    }
                    _ => {
                        recompute.insert(key);
                    }
                }
            }
            if let (Some(seq), false) = (seq, rest.is_empty()) {
                put_retained_entry(&mut out.state, seq, &rest);
            }
        }
        for key in recompute {
            let slot = self.sliding_slot(store, &mut dirty, &key, last.partition)?;
            let mut acc = self.emptied(&slot.slot.acc);
            match &mut slot.kept {
                Some(kept) => {
                    kept.retain(|k| k.t > horizon);
                    for k in kept.iter() {
                        acc.add(&decode_kept_inputs(&k.inputs)?, k.t, k.offset);
                    }
                }
                None => {
                    for (t, offset, inputs) in
                        retained_in_entries(store, &out.state, &key, horizon)?
                    {
                        acc.add(&decode_inputs(&inputs)?, t, offset);
                    }
                }
            }
            slot.slot.acc = acc;
            slot.slot.version = Some(last.clone());
        }
        let window = Window {
            start: horizon,
            end: st,
        };
        // In key order: the same batch and outputs whatever the map's order.
        let mut dirty: Vec<(Bytes, SlidingSlot)> = dirty.into_iter().collect();
        dirty.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, slot) in dirty {
            let SlidingSlot { mut slot, kept } = slot;
            let Some(version) = slot.version.take() else {
                continue;
            };
            let akey = key_prefix(b'a', &key);
            if slot.acc.events == 0 {
                out.state.delete(&akey);
            } else {
                let kept =
                    self.sliding_layout(store, &mut out.state, &key, kept, &slot.acc, horizon)?;
                out.state
                    .put(&akey, &encode_sliding_entry(&slot.acc, kept.as_deref()));
            }
            slot.window = window;
            out.updates.push(slot.update(&self.config, version, false));
        }
        Ok(())
    }

    fn sliding_slot<'a, S: StateStore + ?Sized>(
        &self,
        store: &S,
        dirty: &'a mut HashMap<Bytes, SlidingSlot>,
        key: &Bytes,
        partition: i32,
    ) -> Result<&'a mut SlidingSlot, StoreError> {
        let slot = match dirty.entry(key.clone()) {
            Entry::Occupied(slot) => return Ok(slot.into_mut()),
            Entry::Vacant(slot) => slot,
        };
        let (acc, kept) = match store.get(&key_prefix(b'a', key))? {
            Some(bytes) => decode_sliding_entry(&bytes)?,
            // A new key keeps its events inside its entry (unless the limit is 0).
            None => (
                self.new_acc(partition),
                (self.inline_limit > 0).then(Vec::new),
            ),
        };
        Ok(slot.insert(SlidingSlot {
            slot: Slot {
                is_new: false,
                acc,
                key: key.clone(),
                window: Window { start: 0, end: 0 },
                version: None,
            },
            kept,
        }))
    }

    /// Where `key`, with `acc` over its retained events, keeps them after this batch: inside
    /// its entry (`Some`) while they are at most the inline limit, else in `r` entries. A key
    /// goes back inside only once it has at most half the limit, so a key near it does not
    /// move at every batch.
    fn sliding_layout<S: StateStore + ?Sized>(
        &self,
        store: &S,
        state: &mut WriteBatch,
        key: &[u8],
        kept: Option<Vec<Kept>>,
        acc: &Acc,
        horizon: i64,
    ) -> Result<Option<Vec<Kept>>, StoreError> {
        match kept {
            Some(kept) if kept.len() > self.inline_limit => {
                for k in &kept {
                    let rkey = [b"r".as_slice(), &retained_tail(key, k.t, k.offset)].concat();
                    state.put(&rkey, &encode_inputs(&decode_kept_inputs(&k.inputs)?));
                }
                Ok(None)
            }
            None if acc.events as usize <= self.inline_limit / 2 => {
                let mut kept = Vec::new();
                for (t, offset, inputs) in retained_in_entries(store, state, key, horizon)? {
                    state.delete(&[b"r".as_slice(), &retained_tail(key, t, offset)].concat());
                    kept.push(Kept::new(t, offset, &decode_inputs(&inputs)?));
                }
                Ok(Some(kept))
            }
            kept => Ok(kept),
        }
    }
}

/// A sliding key being updated in this batch: its accumulator, and its retained events when
/// it keeps them inside its entry (`None`: in `r` entries).
struct SlidingSlot {
    slot: Slot,
    kept: Option<Vec<Kept>>,
}

/// A retained event kept inside its key's sliding entry.
struct Kept {
    t: i64,
    offset: i64,
    /// Encoded as [`encode_kept_inputs`] does; a slice of the entry it was read from.
    inputs: Bytes,
}

impl Kept {
    fn new(t: i64, offset: i64, inputs: &[Option<Scalar>]) -> Self {
        let inputs = Bytes::from(encode_kept_inputs(inputs));
        Self { t, offset, inputs }
    }
}

/// The events `key` keeps in `r` entries above `horizon`, `(time, offset, inputs)` each in time
/// order, as the store will hold them once `state` is applied.
fn retained_in_entries<S: StateStore + ?Sized>(
    store: &S,
    state: &WriteBatch,
    key: &[u8],
    horizon: i64,
) -> Result<Vec<(i64, i64, Bytes)>, StoreError> {
    let prefix = key_prefix(b'r', key);
    let to = prefix_end(&prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 17]);
    // Everything at or below the horizon is deleted (before or by this batch): start above
    // it, not at the key's first entry, so the scan does not walk the tombstones the LSM
    // keeps of them until compaction.
    let mut from = prefix.clone();
    from.extend_from_slice(&i64_sortable(horizon.saturating_add(1)));
    let mut out = Vec::new();
    for (rkey, inputs) in range_through(store, state, &from, &to)? {
        let mut r = Reader::new(&rkey[prefix.len()..]);
        let t = r.i64_sortable()?;
        let offset = i64::from_be_bytes(
            r.rest()
                .try_into()
                .map_err(|_| StoreError::Corrupt("sliding entry".into()))?,
        );
        out.push((t, offset, inputs));
    }
    Ok(out)
}

/// Marks the events kept inside a sliding entry, after its accumulator.
const KEPT_INSIDE: u8 = 1;

/// A sliding key's entry: the accumulator, then (when `kept` is given) `1 count` and, per
/// event in time order, its time and offset (each as the difference to the previous event's)
/// and its inputs, all as varints. An entry without them keeps its events in `r` entries.
fn encode_sliding_entry(acc: &Acc, kept: Option<&[Kept]>) -> Vec<u8> {
    let mut bytes = acc.encode();
    if let Some(kept) = kept {
        let len = kept.iter().map(|k| k.inputs.len() + 8).sum::<usize>();
        let mut w = Writer::with_capacity(len + 6);
        w.u8(KEPT_INSIDE).var_u64(kept.len() as u64);
        let (mut t, mut offset) = (0i64, 0i64);
        for k in kept {
            w.var_i64(k.t.wrapping_sub(t))
                .var_i64(k.offset.wrapping_sub(offset))
                .var_bytes(&k.inputs);
            (t, offset) = (k.t, k.offset);
        }
        bytes.extend_from_slice(&w.finish());
    }
    bytes
}

fn decode_sliding_entry(bytes: &Bytes) -> Result<(Acc, Option<Vec<Kept>>), StoreError> {
    let mut r = Reader::new(bytes);
    let acc = Acc::decode_from(&mut r)?;
    if r.is_empty() {
        return Ok((acc, None));
    }
    if r.u8()? != KEPT_INSIDE {
        return Err(StoreError::Corrupt("sliding entry".into()));
    }
    let n = r.var_u64()? as usize;
    let mut kept = Vec::with_capacity(n.min(1024));
    let (mut t, mut offset) = (0i64, 0i64);
    for _ in 0..n {
        t = t.wrapping_add(r.var_i64()?);
        offset = offset.wrapping_add(r.var_i64()?);
        let inputs = bytes.slice_ref(r.var_bytes()?);
        kept.push(Kept { t, offset, inputs });
    }
    Ok((acc, Some(kept)))
}

/// An event's inputs inside its key's sliding entry: their count, then per function `0` (no
/// input), `1 f64` (a number), `2 len text`, or `3 i` (the same as function `i`'s, for
/// functions of one field). Half the size of [`encode_inputs`] for a count, sum and max of
/// one field.
fn encode_kept_inputs(inputs: &[Option<Scalar>]) -> Vec<u8> {
    let mut w = Writer::with_capacity(2 + 9 * inputs.len());
    w.var_u64(inputs.len() as u64);
    for (i, input) in inputs.iter().enumerate() {
        let same = |other: &Option<Scalar>| match (input, other) {
            (Some(Scalar::Num(a)), Some(Scalar::Num(b))) => a.to_bits() == b.to_bits(),
            (Some(Scalar::Text(a)), Some(Scalar::Text(b))) => a == b,
            _ => false,
        };
        match (input, inputs[..i].iter().position(same)) {
            (None, _) => w.u8(0),
            (Some(_), Some(earlier)) => w.u8(3).var_u64(earlier as u64),
            (Some(Scalar::Num(n)), None) => w.u8(1).f64(*n),
            (Some(Scalar::Text(t)), None) => w.u8(2).var_bytes(t.as_bytes()),
        };
    }
    w.finish()
}

fn decode_kept_inputs(bytes: &[u8]) -> Result<Vec<Option<Scalar>>, StoreError> {
    let corrupt = || StoreError::Corrupt("sliding inputs".into());
    let mut r = Reader::new(bytes);
    let n = r.var_u64()? as usize;
    let mut out: Vec<Option<Scalar>> = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let input = match r.u8()? {
            0 => None,
            1 => Some(Scalar::Num(r.f64()?)),
            2 => Some(Scalar::Text(
                String::from_utf8(r.var_bytes()?.to_vec()).map_err(|_| corrupt())?,
            )),
            3 => {
                let earlier = r.var_u64()? as usize;
                Some(out.get(earlier).cloned().flatten().ok_or_else(corrupt)?)
            }
            _ => return Err(corrupt()),
        };
        out.push(input);
    }
    Ok(out)
}

/// An event a sliding window retains, as its expiry entry names it.
struct Retained {
    t: i64,
    key: Bytes,
    offset: i64,
    /// Its inputs as encoded in its `r` entry, so that it leaves its accumulator without a
    /// read; `None` in an entry of the earlier layout.
    inputs: Option<Bytes>,
}

/// Marks a sliding expiry entry whose events carry their inputs: the last byte of its key.
const WITH_INPUTS: u8 = 1;

/// Writes the sliding expiry entry of `events` (one batch's, in one time bucket), under their
/// smallest time: `q min seq 1` → `time key offset inputs` per event (without the inputs and
/// the last byte of the key when an event of an earlier entry has none).
fn put_retained_entry(state: &mut WriteBatch, seq: u64, events: &[Retained]) {
    let Some(min) = events.iter().map(|e| e.t).min() else {
        return;
    };
    let with_inputs = events.iter().all(|e| e.inputs.is_some());
    let mut w = Writer::with_capacity(events.iter().map(|e| e.key.len() + 32).sum());
    for e in events {
        w.i64(e.t).bytes(&e.key).i64(e.offset);
        if let (true, Some(inputs)) = (with_inputs, &e.inputs) {
            w.bytes(inputs);
        }
    }
    let mut key = index_key(b'q', min, &seq.to_be_bytes());
    if with_inputs {
        key.push(WITH_INPUTS);
    }
    state.put(&key, &w.finish());
}

/// A sliding expiry entry: its batch number and events. An empty value is an entry of the
/// earliest layout, `q time key offset`, naming one event (no batch number).
fn decode_retained_entry(
    key: &[u8],
    value: &[u8],
) -> Result<(Option<u64>, Vec<Retained>), StoreError> {
    let corrupt = || StoreError::Corrupt("sliding index".into());
    let mut r = Reader::new(&key[1..]);
    let t = r.i64_sortable()?;
    if value.is_empty() {
        let key = Bytes::copy_from_slice(r.bytes()?);
        let offset = i64::from_be_bytes(r.rest().try_into().map_err(|_| corrupt())?);
        let event = Retained {
            t,
            key,
            offset,
            inputs: None,
        };
        return Ok((None, vec![event]));
    }
    let rest = r.rest();
    let (seq, with_inputs) = match rest.len() {
        8 => (rest, false),
        9 if rest[8] == WITH_INPUTS => (&rest[..8], true),
        _ => return Err(corrupt()),
    };
    let seq = u64::from_be_bytes(seq.try_into().map_err(|_| corrupt())?);
    let mut r = Reader::new(value);
    let mut events = Vec::new();
    while !r.is_empty() {
        let t = r.i64()?;
        let key = Bytes::copy_from_slice(r.bytes()?);
        let offset = r.i64()?;
        let inputs = if with_inputs {
            Some(Bytes::copy_from_slice(r.bytes()?))
        } else {
            None
        };
        events.push(Retained {
            t,
            key,
            offset,
            inputs,
        });
    }
    Ok((Some(seq), events))
}

/// Marks a store whose sessions are kept per key (`S key`), not per session.
const SESSIONS_PER_KEY: &[u8] = b"\x00ls";

/// One session window of a key.
struct Session {
    start: i64,
    end: i64,
    acc: Acc,
}

/// The sessions of `key`, read once per batch into `keys` (from the batch, else the store).
fn key_sessions<'a, S: StateStore + ?Sized>(
    store: &S,
    batch: &WriteBatch,
    keys: &'a mut BTreeMap<Bytes, Vec<Session>>,
    key: &Bytes,
) -> Result<&'a mut Vec<Session>, StoreError> {
    if !keys.contains_key(key) {
        let sessions = match get_through(store, batch, &key_prefix(b'S', key))? {
            Some(bytes) => decode_sessions(&bytes)?,
            None => Vec::new(),
        };
        keys.insert(key.clone(), sessions);
    }
    keys.get_mut(key)
        .ok_or_else(|| StoreError::Corrupt("session list vanished".into()))
}

/// Writes the session lists of the `dirty` keys (deletes the entry of a key left without).
fn put_sessions(
    state: &mut WriteBatch,
    keys: &BTreeMap<Bytes, Vec<Session>>,
    dirty: BTreeSet<Bytes>,
) {
    for key in dirty {
        let skey = key_prefix(b'S', &key);
        match keys.get(&key) {
            Some(sessions) if !sessions.is_empty() => state.put(&skey, &encode_sessions(sessions)),
            _ => state.delete(&skey),
        }
    }
}

/// `start end acc` per session, by start.
fn encode_sessions(sessions: &[Session]) -> Vec<u8> {
    let mut w = Writer::with_capacity(sessions.len() * 64);
    for s in sessions {
        w.i64(s.start).i64(s.end).bytes(&s.acc.encode());
    }
    w.finish()
}

fn decode_sessions(bytes: &[u8]) -> Result<Vec<Session>, StoreError> {
    let mut r = Reader::new(bytes);
    let mut sessions = Vec::new();
    while !r.is_empty() {
        let (start, end) = (r.i64()?, r.i64()?);
        let acc = Acc::decode(r.bytes()?)?;
        sessions.push(Session { start, end, acc });
    }
    Ok(sessions)
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
        update(config, self.key, self.window, self.acc, version, closed)
    }
}

/// How fixed windows are cut into panes (see [`Aggregate::process_fixed`]).
#[derive(Debug, Clone, Copy)]
struct PaneLayout {
    pane: i64,
    advance: i64,
    size: i64,
}

impl PaneLayout {
    fn of(spec: WindowSpec) -> Self {
        let (size, advance) = match spec {
            WindowSpec::Hopping {
                size_ms,
                advance_ms,
            } => (size_ms, advance_ms),
            WindowSpec::Tumbling { size_ms } => (size_ms, size_ms),
            // Not fixed windows: never used with a pane layout.
            WindowSpec::Session { .. } | WindowSpec::Sliding { .. } => (1, 1),
        };
        Self {
            pane: gcd(size, advance).max(1),
            advance,
            size,
        }
    }

    /// Tumbling windows (or hopping ones with `advance == size`): a pane would be the window.
    fn one_pane_per_window(&self) -> bool {
        self.pane == self.size
    }

    fn pane_start(&self, t: i64) -> i64 {
        t.div_euclid(self.pane) * self.pane
    }

    /// The end of the last window containing the pane starting at `start`.
    fn expiry(&self, start: i64) -> i64 {
        (start.div_euclid(self.advance) * self.advance).saturating_add(self.size)
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    let (mut a, mut b) = (a.abs(), b.abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Marks a store whose hopping panes are kept per key (`P key`), not per pane.
const PANES_PER_KEY: &[u8] = b"\x00lp";

/// One key's panes, as a batch read and changed them, and what it added to its at-risk
/// windows.
struct KeyPanes {
    key: Bytes,
    /// The key had an entry before the batch (so a mention of it is pending).
    stored: bool,
    /// A mention of the key expired in this batch.
    mentioned: bool,
    /// By start. Few: the panes of the windows still open, and those closed since the key
    /// was last written.
    panes: Vec<Pane>,
    deltas: Vec<WindowDelta>,
}

struct Pane {
    start: i64,
    /// As stored before the batch, once the batch changed it (until then, `current`).
    stored: Option<Acc>,
    /// With the batch's events.
    current: Option<Acc>,
    /// Position in the batch and coordinates of the latest event the batch added; `None` =
    /// unchanged.
    last: Option<(usize, Coords)>,
}

/// What a batch added to a window that may close during the batch.
struct WindowDelta {
    start: i64,
    acc: Acc,
    /// Coordinates of the latest input that changed the window.
    version: Coords,
}

impl Pane {
    /// The pane as stored before the batch.
    fn before(&self) -> &Option<Acc> {
        if self.last.is_some() {
            &self.stored
        } else {
            &self.current
        }
    }
}

impl KeyPanes {
    /// The pane starting at `start` (empty if the key has none there).
    fn pane(&mut self, start: i64) -> &mut Pane {
        let i = self.panes.partition_point(|p| p.start < start);
        if self.panes.get(i).is_none_or(|p| p.start != start) {
            let pane = Pane {
                start,
                stored: None,
                current: None,
                last: None,
            };
            self.panes.insert(i, pane);
        }
        &mut self.panes[i]
    }

    /// The merge of `window`'s panes, with this batch's events (`current`) or as stored
    /// before it; `None` if they are all empty.
    fn window_acc(&self, window: Window, current: bool) -> Option<Acc> {
        let mut merged: Option<Acc> = None;
        for pane in self
            .panes
            .iter()
            .filter(|p| p.start >= window.start && p.start < window.end)
        {
            let acc = if current {
                &pane.current
            } else {
                pane.before()
            };
            if let Some(acc) = acc {
                match &mut merged {
                    Some(m) => m.merge(acc),
                    None => merged = Some(acc.clone()),
                }
            }
        }
        merged
    }
}

/// The panes of `key`, read once per batch into `keys` (from the batch, else the store).
fn key_panes<'a, S: StateStore + ?Sized>(
    store: &S,
    batch: &WriteBatch,
    keys: &'a mut HashMap<Bytes, KeyPanes>,
    key: &Bytes,
) -> Result<&'a mut KeyPanes, StoreError> {
    // Looked up before inserting: cloning the key for every event costs more.
    if !keys.contains_key(key) {
        let stored = get_through(store, batch, &key_prefix(b'P', key))?;
        let panes = match &stored {
            Some(bytes) => decode_panes(bytes)?,
            None => Vec::new(),
        };
        let kp = KeyPanes {
            key: key.clone(),
            stored: stored.is_some(),
            mentioned: false,
            panes: panes
                .into_iter()
                .map(|(start, acc)| Pane {
                    start,
                    stored: None,
                    current: Some(acc),
                    last: None,
                })
                .collect(),
            deltas: Vec::new(),
        };
        keys.insert(key.clone(), kp);
    }
    keys.get_mut(key)
        .ok_or_else(|| StoreError::Corrupt("pane list vanished".into()))
}

/// `start acc` per pane (given by start).
fn encode_panes(panes: Vec<&Pane>) -> Vec<u8> {
    let mut w = Writer::with_capacity(panes.len() * 64);
    for pane in panes {
        if let Some(acc) = &pane.current {
            w.i64(pane.start).bytes(&acc.encode());
        }
    }
    w.finish()
}

/// The `(start, acc)` pairs of a pane list ([`encode_panes`]).
fn decode_panes(bytes: &[u8]) -> Result<Vec<(i64, Acc)>, StoreError> {
    let mut r = Reader::new(bytes);
    let mut panes = Vec::new();
    while !r.is_empty() {
        let start = r.i64()?;
        panes.push((start, Acc::decode(r.bytes()?)?));
    }
    Ok(panes)
}

/// The keys of `keys` in the order of their state entries (length-prefixed key).
fn key_order(keys: &HashMap<Bytes, KeyPanes>) -> Vec<Bytes> {
    let mut order: Vec<Bytes> = keys.keys().cloned().collect();
    order.sort_unstable_by(|a, b| {
        (a.len() as u32)
            .to_le_bytes()
            .cmp(&(b.len() as u32).to_le_bytes())
            .then_with(|| a.cmp(b))
    });
    order
}

fn merge_accs(a: Option<Acc>, b: Option<Acc>) -> Option<Acc> {
    match (a, b) {
        (Some(mut a), Some(b)) => {
            a.merge(&b);
            Some(a)
        }
        (a, None) => a,
        (None, b) => b,
    }
}

fn update(
    config: &AggregateConfig,
    key: Bytes,
    window: Window,
    acc: Acc,
    version: Coords,
    closed: bool,
) -> AggregateUpdate {
    AggregateUpdate {
        values: Some(acc.values(config)),
        events: acc.events,
        key,
        window,
        version,
        closed,
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
    /// `sum` as a float, and exactly, in millionths, while every input was a decimal with at
    /// most 6 fractional digits ([`micros`]); `exact` then decides the value, so decimal sums
    /// (amounts of money) are exact and do not depend on the order events were added or
    /// merged in.
    Sum {
        sum: f64,
        n: u64,
        exact: Option<i128>,
    },
    Min(Option<f64>),
    Max(Option<f64>),
    Latest(Option<(i64, i64, Scalar)>),
    Distinct(BTreeMap<Vec<u8>, u32>),
}

impl FnAcc {
    fn new(f: &AggFn) -> Self {
        match f {
            AggFn::Count => FnAcc::Count,
            AggFn::Sum(_) | AggFn::Avg(_) => FnAcc::Sum {
                sum: 0.0,
                n: 0,
                exact: Some(0),
            },
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
                FnAcc::Sum { sum, n, exact } => {
                    if let Some(v) = input.as_f64() {
                        *sum += v;
                        *n += 1;
                        *exact = exact.zip(micros(v)).and_then(|(e, m)| e.checked_add(m));
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

    /// Takes an event added with `inputs` at `t`, `offset` out again; `false` when that cannot
    /// be done exactly (the accumulator is then left half-updated, to be rebuilt): it held the
    /// minimum or maximum (the next one is unknown), the latest value, or a sum that is not
    /// exact (floating-point subtraction would make the value depend on the order of adds and
    /// removals).
    fn remove(&mut self, inputs: &[Option<Scalar>], t: i64, offset: i64) -> bool {
        if self.events == 0 {
            return false;
        }
        self.events -= 1;
        for (acc, input) in self.fns.iter_mut().zip(inputs) {
            let Some(input) = input else { continue };
            let exact = match acc {
                FnAcc::Count => true,
                // A non-finite value in state came from a `"NaN"` or `"inf"` string before such
                // strings stopped counting as numbers: rebuild rather than keep it.
                FnAcc::Sum { sum, n, exact } => match input.as_f64() {
                    None => sum.is_finite(),
                    Some(v) => match (*exact, micros(v)) {
                        (Some(e), Some(m)) if *n > 0 => {
                            let e = e - m;
                            *exact = Some(e);
                            *sum = e as f64 / 1e6;
                            *n -= 1;
                            true
                        }
                        _ => false,
                    },
                },
                FnAcc::Min(m) => match input.as_f64() {
                    None => m.is_none_or(f64::is_finite),
                    Some(v) => m.is_some_and(|m| v > m),
                },
                FnAcc::Max(m) => match input.as_f64() {
                    None => m.is_none_or(f64::is_finite),
                    Some(v) => m.is_some_and(|m| v < m),
                },
                FnAcc::Latest(latest) => latest
                    .as_ref()
                    .is_some_and(|(lt, lo, _)| (*lt, *lo) != (t, offset)),
                FnAcc::Distinct(values) => {
                    let value = encode_scalar(input);
                    match values.get_mut(&value) {
                        Some(1) => {
                            values.remove(&value);
                            true
                        }
                        Some(c) => {
                            *c -= 1;
                            true
                        }
                        None => false,
                    }
                }
            };
            if !exact {
                return false;
            }
        }
        true
    }

    fn merge(&mut self, other: &Acc) {
        self.events += other.events;
        self.version = self.version.max(other.version);
        for (acc, o) in self.fns.iter_mut().zip(&other.fns) {
            match (acc, o) {
                (
                    FnAcc::Sum { sum, n, exact },
                    FnAcc::Sum {
                        sum: s2,
                        n: n2,
                        exact: e2,
                    },
                ) => {
                    *sum += s2;
                    *n += n2;
                    *exact = exact.zip(*e2).and_then(|(a, b)| a.checked_add(b));
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
                (FnAcc::Sum { sum, n, exact }, AggFn::Avg(_)) => {
                    AggValue::Num(sum_value(*sum, *exact) / *n as f64)
                }
                (FnAcc::Sum { sum, exact, .. }, _) => AggValue::Num(sum_value(*sum, *exact)),
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
                FnAcc::Sum { sum, n, exact } => {
                    w.u8(6).f64(*sum).u64(*n);
                    match exact {
                        Some(e) => w.u8(1).u64(*e as u64).u64((*e >> 64) as u64),
                        None => w.u8(0),
                    };
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
        Self::decode_from(&mut Reader::new(bytes))
    }

    /// Decodes an accumulator from the start of `r`, leaving what follows it.
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, StoreError> {
        let partition = r.u32()? as i32;
        let version = r.i64()?;
        let events = r.u64()?;
        let n = r.u32()? as usize;
        let mut fns = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            fns.push(match r.u8()? {
                0 => FnAcc::Count,
                // Written before sums were also kept exactly.
                1 => FnAcc::Sum {
                    sum: r.f64()?,
                    n: r.u64()?,
                    exact: None,
                },
                6 => FnAcc::Sum {
                    sum: r.f64()?,
                    n: r.u64()?,
                    exact: if r.u8()? == 1 {
                        let low = r.u64()? as u128;
                        let high = r.u64()? as u128;
                        Some((high << 64 | low) as i128)
                    } else {
                        None
                    },
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

/// Largest magnitude of an exact sum, in millionths, that converts to `f64` without rounding.
const EXACT_LIMIT: i128 = 1 << 53;

/// `v` in millionths, if it is a decimal with at most 6 fractional digits (the nearest `f64`
/// to one, as JSON parsing gives) and its millionths convert back exactly.
fn micros(v: f64) -> Option<i128> {
    let m = (v * 1e6).round();
    (m.abs() < EXACT_LIMIT as f64 && m / 1e6 == v).then_some(m as i128)
}

/// A sum's value: from the exact decimal sum when there is one (the `f64` nearest to it while
/// it is below [`EXACT_LIMIT`] millionths, one correctly rounded division; above, within a
/// rounding of it, and still a function of the exact sum alone), else the float sum.
fn sum_value(sum: f64, exact: Option<i128>) -> f64 {
    match exact {
        Some(e) => e as f64 / 1e6,
        None => sum,
    }
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

/// Writes the expiry index of the windows a batch created (or the keys whose panes it
/// mentions): one entry `tag expiry seq` per expiry time, listing their `len key start` tails,
/// where `seq` numbers the batch (a batch that files twice claims two numbers). Exact, unlike
/// a bucketed index: they share their expiry times, and a closed window never reopens (its
/// events are late).
fn put_created_index<S: StateStore + ?Sized>(
    store: &S,
    state: &mut WriteBatch,
    tag: u8,
    created: BTreeMap<i64, Writer>,
) -> Result<(), StoreError> {
    if created.is_empty() {
        return Ok(());
    }
    let seq = claim_sequence(store, state, SEQ_KEY)?;
    for (expiry, tails) in created {
        state.put(&index_key(tag, expiry, &seq.to_be_bytes()), &tails.finish());
    }
    Ok(())
}

/// The `len key start` tails an expiry index entry names. An entry with an empty value is one
/// of the earlier layout, `tag expiry len key start`, naming one.
fn created_index_tails<'a>(key: &'a [u8], value: &'a [u8]) -> Result<Vec<&'a [u8]>, StoreError> {
    if value.is_empty() {
        return key
            .get(9..)
            .map(|tail| vec![tail])
            .ok_or_else(|| StoreError::Corrupt("expiry entry".into()));
    }
    split_keyed_tails(value)
}

/// Splits concatenated `len key start` tails.
fn split_keyed_tails(mut bytes: &[u8]) -> Result<Vec<&[u8]>, StoreError> {
    let corrupt = || StoreError::Corrupt("expiry entry".into());
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = bytes.get(..4).ok_or_else(corrupt)?;
        let len = u32::from_le_bytes(len.try_into().map_err(|_| corrupt())?) as usize;
        let (tail, rest) = bytes.split_at_checked(len + 12).ok_or_else(corrupt)?;
        out.push(tail);
        bytes = rest;
    }
    Ok(out)
}

fn parse_keyed(tail: &[u8]) -> Result<(Bytes, i64), StoreError> {
    let mut r = Reader::new(tail);
    let key = Bytes::copy_from_slice(r.bytes()?);
    let start = r.i64_sortable()?;
    Ok((key, start))
}

/// `len key start`: a window, session or pane of a key in an expiry index entry.
fn keyed_tail(key: &[u8], start: i64) -> Vec<u8> {
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
