//! Deduplication by event id within an event-time window.
//!
//! Semantics (the model test checks exactly this): stream time `st` is the largest event time
//! seen so far, this event included. An event with time `t < st - window` is **late**: its id
//! may already have been forgotten, so it is dropped and counted, never guessed at. Otherwise it
//! is a **duplicate** if an earlier forwarded event with the same id has time `>= st - window`,
//! and is **forwarded** if not.
//!
//! State (keys):
//! - `d id` → time and offset of the forwarded event, and the sequence number of the batch
//!   that forwarded it;
//! - `e bucket seq` → the ids batch `seq` forwarded with a time in `[bucket, bucket + g)`: one
//!   expiry entry per batch and time bucket, not one per id;
//! - `w` → the bucket width `g`, [`bucket_width`] of the window the store's first batch ran
//!   with, kept when the window changes, so every entry is found where it was filed;
//! - `n` → the last batch sequence number; `c e`, `c x` → where the next expiry scans of the
//!   two indexes start (`expiry_scan`); `m` → stream time;
//! - `x time id`, empty: the per-id expiry entries of stores written before, still expired;
//! - `0x00 e d` → the expiry rule of the `d` entries ([`ExpiryRule`]): those with a time below
//!   the end of the forgotten buckets, forwarded by a batch up to the one it names, are
//!   forgotten.
//!
//! An id is forgotten at the end of the first batch whose horizon `st - window` has passed the
//! end of its bucket, so it may be kept up to `g` longer than the window; decisions only look at
//! the stored time, so that changes the state's size, never a decision. Forwarding a
//! remembered id again (its time fell below the horizon) removes it from its old expiry entry
//! (a point read by `bucket` and `seq`, once per entry and batch), so every `d` entry has
//! exactly one mention.
//!
//! Forgetting an id deletes its `d` entry with [`WriteBatch::delete_expired`]: the changelog
//! carries the tombstone, and fjall leaves the entry to the rule (hidden from reads, dropped by
//! compaction) instead of writing one more memtable entry per id.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::codec::{i64_sortable, Reader, Writer};
use crate::event::Event;
use crate::progress::Progress;
use crate::store::{
    claim_sequence, expiry_scan, get_through, ExpiryRule, StateStore, StoreError, WriteBatch,
};

/// Key of the last batch sequence number.
const SEQ_KEY: &[u8] = b"n";
/// Key of the bucket width the store files ids with.
const WIDTH_KEY: &[u8] = b"w";
/// Prefix of the ids' entries (`d id`).
const ID_PREFIX: &[u8] = b"d";

/// Configuration of [`Deduplicate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupConfig {
    /// How long (event time) an id is remembered after the event that carried it.
    pub window_ms: i64,
}

/// What happened to one input event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupDecision {
    /// First sighting within the window: emit the event (its output version is its coordinates).
    Forward,
    /// Seen within the window: drop.
    Duplicate,
    /// Older than stream time minus the window: dropped and counted (`dropped-late`).
    Late,
    /// Below the store's input offset for its partition: its effects (and outputs) are already
    /// durable; the runtime is replaying. Nothing to emit.
    AlreadyApplied,
}

/// The result of one batch: a decision per input event, the state changes to commit (input
/// offsets included), and counters.
#[derive(Debug, Default)]
pub struct DedupBatch {
    pub decisions: Vec<DedupDecision>,
    pub state: WriteBatch,
    /// Ids forgotten by this batch (their window passed).
    pub expired: usize,
}

/// The deduplication operator. Holds no state of its own: everything is in the store, so a
/// restored store resumes exactly.
#[derive(Debug, Clone)]
pub struct Deduplicate {
    config: DedupConfig,
}

/// Width of the expiry buckets for a window: a sixteenth of it (at least 1 ms), so ids are
/// kept at most ~6% longer than the window.
pub fn bucket_width(window_ms: i64) -> i64 {
    (window_ms / 16).max(1)
}

/// The ids one batch forwarded, by time bucket: `(time, id)` in forwarding order.
type Mentions = BTreeMap<i64, Vec<(i64, Bytes)>>;

/// Mentions to take out of earlier batches' expiry entries, by entry `(bucket, seq)`.
type Removals = BTreeMap<(i64, u64), BTreeSet<(i64, Bytes)>>;

impl Deduplicate {
    /// An operator with this configuration.
    pub fn new(config: DedupConfig) -> Self {
        Self { config }
    }

    /// Readies a task's store for this operator, once after opening it: asks it to keep the
    /// remembered ids in memory ([`StateStore::index_keys`]), so that reading a new id, what
    /// almost every event does, does not search the engine. Decisions are the same without
    /// it, so a store that cannot build the index (a scan error) is only logged: it reads
    /// from disk.
    pub fn prepare_store<S: StateStore + ?Sized>(store: &mut S) {
        if let Err(e) = store.index_keys(ID_PREFIX) {
            tracing::warn!(store = store.name(), error = %e, "cannot index the dedup ids; reading them from disk");
        }
    }

    /// Decides a batch of events (in input order). Commit `state` only after the forwarded
    /// events are acknowledged downstream (see `docs/processing.md`).
    pub fn process<S: StateStore + ?Sized>(
        &self,
        store: &S,
        events: &[Event],
    ) -> Result<DedupBatch, StoreError> {
        let mut out = DedupBatch {
            decisions: Vec::with_capacity(events.len()),
            ..Default::default()
        };
        if events.is_empty() {
            return Ok(out);
        }
        let mut progress = Progress::load(store, &out.state)?;
        let window = self.config.window_ms;
        let width = match get_through(store, &out.state, WIDTH_KEY)? {
            Some(v) => i64::try_from(Reader::new(&v).u64()?)
                .ok()
                .filter(|w| *w > 0)
                .ok_or_else(|| StoreError::Corrupt("dedup bucket width".into()))?,
            None => {
                let width = bucket_width(window);
                out.state.put(WIDTH_KEY, &(width as u64).to_le_bytes());
                width
            }
        };
        let mut seq = None;
        let mut mentions = Mentions::new();
        let mut removals = Removals::new();
        // Ids put over a value of the per-id layout (no batch number): a rule cannot cover
        // that value, so if this batch also forgets them they are deleted for real.
        let mut over_unversioned: BTreeSet<Bytes> = BTreeSet::new();
        for event in events {
            let Some(stream_time) = progress.admit(event) else {
                out.decisions.push(DedupDecision::AlreadyApplied);
                continue;
            };
            let horizon = stream_time.saturating_sub(window);
            if event.time_ms < horizon {
                out.decisions.push(DedupDecision::Late);
                continue;
            }
            let key = id_key(&event.id);
            let seen = get_through(store, &out.state, &key)?
                .map(|v| decode_seen(&v))
                .transpose()?;
            let decision = match seen {
                Some(seen) if seen.time_ms >= horizon => {
                    if seen.partition == event.coords.partition
                        && seen.offset == event.coords.offset
                    {
                        // The very record that was forwarded, replayed after a partial restore.
                        DedupDecision::Forward
                    } else {
                        DedupDecision::Duplicate
                    }
                }
                stale => {
                    let seq = match seq {
                        Some(seq) => seq,
                        None => *seq.insert(claim_sequence(store, &mut out.state, SEQ_KEY)?),
                    };
                    if let Some(stale) = stale {
                        if stale.seq.is_none() {
                            over_unversioned.insert(event.id.clone());
                        }
                        unmention(
                            &mut out.state,
                            &mut mentions,
                            &mut removals,
                            seq,
                            width,
                            &stale,
                            &event.id,
                        );
                    }
                    let mut w = Writer::with_capacity(28);
                    w.i64(event.time_ms)
                        .u32(event.coords.partition as u32)
                        .i64(event.coords.offset)
                        .u64(seq);
                    out.state.put(&key, &w.finish());
                    mentions
                        .entry(bucket_of(event.time_ms, width))
                        .or_default()
                        .push((event.time_ms, event.id.clone()));
                    DedupDecision::Forward
                }
            };
            out.decisions.push(decision);
        }
        let stream_time = progress.stream_time();
        progress.finish(&mut out.state);
        remove_mentions(store, &mut out.state, removals)?;
        let Some(st) = stream_time else {
            return Ok(out);
        };
        let cut = cutoff(st.saturating_sub(window), width);
        let rule = expiry_rule(store, &mut out.state, seq, forgotten_below(cut, width))?;
        if let Some(seq) = seq {
            for (bucket, ids) in mentions {
                if bucket < cut {
                    // Forwarded by this batch and already past the horizon.
                    for (time, id) in ids {
                        let seq = (!over_unversioned.contains(&id)).then_some(seq);
                        forget(&mut out.state, rule, &id, time, seq);
                        out.expired += 1;
                    }
                } else if !ids.is_empty() {
                    // (Empty when the batch forwarded its only id again.)
                    out.state
                        .put(&expiry_key(bucket, seq), &encode_mentions(&ids));
                }
            }
        }
        out.expired += expire(store, &mut out.state, cut, rule)?;
        Ok(out)
    }
}

/// The expiry rule of the `d` entries ([`ExpiryRule`]) once this batch is applied: it covers
/// every entry with a time below `below` written by this batch or an earlier one, all of which
/// this batch and earlier ones forget. Recorded in the batch when it changes. A rule never
/// covers less than the stored one: when `below` is lower (a restart with a larger window) the
/// stored rule stays, and what it does not cover is deleted entry by entry. `None` while no
/// batch forwarded anything.
fn expiry_rule<S: StateStore + ?Sized>(
    store: &S,
    state: &mut WriteBatch,
    seq: Option<u64>,
    below: i64,
) -> Result<Option<ExpiryRule>, StoreError> {
    let key = ExpiryRule::key(b'd');
    let stored = get_through(store, state, &key)?
        .map(|v| ExpiryRule::decode(&v))
        .transpose()?;
    let last = match seq {
        Some(seq) => Some(seq),
        None => get_through(store, state, SEQ_KEY)?
            .map(|v| Reader::new(&v).u64())
            .transpose()?,
    };
    let Some(last) = last else {
        return Ok(stored);
    };
    let rule = ExpiryRule {
        below_time: below,
        through_seq: last,
    };
    match stored {
        Some(stored) if !rule.contains(&stored) => Ok(Some(stored)),
        stored => {
            if stored != Some(rule) {
                state.put(&key, &rule.encode());
            }
            Ok(Some(rule))
        }
    }
}

/// Deletes the `d` entry of `id`, of time `time` and forwarded by batch `seq`, as its window
/// passes: as one the store may leave to `rule` when the rule covers it. (`seq` is `None` for
/// an entry of the layout before batch numbers, which no rule covers.)
fn forget(
    state: &mut WriteBatch,
    rule: Option<ExpiryRule>,
    id: &[u8],
    time: i64,
    seq: Option<u64>,
) {
    let key = Bytes::from(id_key(id));
    if rule
        .zip(seq)
        .is_some_and(|(rule, seq)| rule.covers_entry(time, seq))
    {
        state.delete_expired(key);
    } else {
        state.delete_bytes(key);
    }
}

/// Forgets every id of the expiry entries with a bucket below `cut` (from where the last scan
/// ended: [`expiry_scan`]; call it after the batch's puts to the index).
fn expire<S: StateStore + ?Sized>(
    store: &S,
    state: &mut WriteBatch,
    cut: i64,
    rule: Option<ExpiryRule>,
) -> Result<usize, StoreError> {
    let mut forgotten = 0;
    // Per-batch entries, then per-id ones of the earlier layout (whose exact times are below
    // the cut, hence below the horizon).
    for tag in [b'e', b'x'] {
        let end = [&[tag][..], &i64_sortable(cut)].concat();
        for (key, value) in expiry_scan(store, state, tag, end)? {
            // Each mentioned id's `d` entry is the one this entry mentions (same time, same
            // batch): forwarding an id again removes its old mention, so no lookup is needed
            // before deleting.
            let seq = entry_seq(&key)?;
            for (time, id) in decode_entry(&key, &value)? {
                forget(state, rule, &id, time, seq);
                forgotten += 1;
            }
            state.delete(&key);
        }
    }
    Ok(forgotten)
}

/// Takes out the mention of a remembered id that is being forwarded again: from this batch's
/// mentions, from the expiry entry of the batch that forwarded it (noted in `removals`, done
/// once per entry by [`remove_mentions`]), or (a store written before expiry entries were per
/// batch) the id's own entry `x time id`.
fn unmention(
    state: &mut WriteBatch,
    mentions: &mut Mentions,
    removals: &mut Removals,
    seq: u64,
    width: i64,
    stale: &Seen,
    id: &Bytes,
) {
    let bucket = bucket_of(stale.time_ms, width);
    match stale.seq {
        Some(s) if s == seq => {
            if let Some(ids) = mentions.get_mut(&bucket) {
                ids.retain(|m| m.0 != stale.time_ms || m.1 != id);
            }
        }
        Some(s) => {
            removals
                .entry((bucket, s))
                .or_default()
                .insert((stale.time_ms, id.clone()));
        }
        None => {
            let mut key = Vec::with_capacity(id.len() + 9);
            key.push(b'x');
            key.extend_from_slice(&i64_sortable(stale.time_ms));
            key.extend_from_slice(id);
            state.delete(&key);
        }
    }
}

/// Rewrites each earlier expiry entry that lost mentions in this batch, once.
fn remove_mentions<S: StateStore + ?Sized>(
    store: &S,
    state: &mut WriteBatch,
    removals: Removals,
) -> Result<(), StoreError> {
    for ((bucket, seq), gone) in removals {
        let key = expiry_key(bucket, seq);
        if let Some(value) = get_through(store, state, &key)? {
            let mut ids = decode_entry(&key, &value)?;
            ids.retain(|m| !gone.contains(m));
            if ids.is_empty() {
                state.delete(&key);
            } else {
                state.put(&key, &encode_mentions(&ids));
            }
        }
    }
    Ok(())
}

/// Expiry entries of keys below this bucket are past the horizon: every time in them is below
/// `horizon`. `i64::MIN` (nothing is) when `horizon - width` is below the range of `i64`.
fn cutoff(horizon: i64, width: i64) -> i64 {
    let cut = i128::from(horizon) - i128::from(width) + 1;
    i64::try_from(cut).unwrap_or(i64::MIN)
}

/// The end of the buckets below `cut`: an id is forgotten at `cut` exactly when its time is
/// below it.
fn forgotten_below(cut: i64, width: i64) -> i64 {
    if cut == i64::MIN {
        return i64::MIN;
    }
    let end = i128::from(bucket_of(cut - 1, width)) + i128::from(width);
    i64::try_from(end).unwrap_or(i64::MAX)
}

fn bucket_of(time_ms: i64, width: i64) -> i64 {
    time_ms.saturating_sub(time_ms.rem_euclid(width))
}

struct Seen {
    time_ms: i64,
    partition: i32,
    offset: i64,
    /// `None` in entries written before expiry entries were per batch.
    seq: Option<u64>,
}

fn decode_seen(v: &[u8]) -> Result<Seen, StoreError> {
    let mut r = Reader::new(v);
    Ok(Seen {
        time_ms: r.i64()?,
        partition: r.u32()? as i32,
        offset: r.i64()?,
        seq: if v.len() > 20 { Some(r.u64()?) } else { None },
    })
}

fn encode_mentions(ids: &[(i64, Bytes)]) -> Vec<u8> {
    let mut w = Writer::with_capacity(ids.iter().map(|(_, id)| id.len() + 12).sum());
    for (time, id) in ids {
        w.i64(*time).bytes(id);
    }
    w.finish()
}

/// The `(time, id)` mentions of an expiry entry. An entry of the earlier layout, `x time id`,
/// mentions one id.
fn decode_entry(key: &[u8], value: &[u8]) -> Result<Vec<(i64, Bytes)>, StoreError> {
    if key.first() == Some(&b'x') {
        let mut r = Reader::new(&key[1..]);
        let time = r.i64_sortable()?;
        return Ok(vec![(time, Bytes::copy_from_slice(r.rest()))]);
    }
    let mut r = Reader::new(value);
    let mut out = Vec::new();
    while !r.is_empty() {
        let time = r.i64()?;
        out.push((time, Bytes::copy_from_slice(r.bytes()?)));
    }
    Ok(out)
}

/// The batch of an expiry entry `e bucket seq`; `None` for an entry `x time id` of the
/// earlier layout (whose `d` values carry no batch either).
fn entry_seq(key: &[u8]) -> Result<Option<u64>, StoreError> {
    if key.first() == Some(&b'x') {
        return Ok(None);
    }
    key.get(9..17)
        .and_then(|s| s.try_into().ok())
        .map(|s| Some(u64::from_be_bytes(s)))
        .ok_or_else(|| StoreError::Corrupt("dedup expiry entry key".into()))
}

fn id_key(id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 1);
    key.extend_from_slice(ID_PREFIX);
    key.extend_from_slice(id);
    key
}

fn expiry_key(bucket: i64, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(17);
    key.push(b'e');
    key.extend_from_slice(&i64_sortable(bucket));
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::event::Coords;
    use crate::store::{Durability, FjallStore, MemoryStore};

    /// Checks the state's bookkeeping after a commit: every remembered id is mentioned exactly
    /// once, by the expiry entry of its bucket and batch, and nothing past the horizon's cut is
    /// left.
    fn assert_bookkeeping(store: &MemoryStore, window: i64) {
        let width = match store.get(WIDTH_KEY).unwrap() {
            Some(v) => Reader::new(&v).u64().unwrap() as i64,
            None => bucket_width(window),
        };
        let mut remembered = BTreeMap::new();
        for entry in store.prefix(b"d") {
            let (key, value) = entry.unwrap();
            let seen = decode_seen(&value).unwrap();
            remembered.insert(key[1..].to_vec(), (seen.time_ms, seen.seq.unwrap()));
        }
        let mut mentioned = BTreeMap::new();
        assert_eq!(
            store.prefix(b"x").count(),
            0,
            "no per-id entries are written"
        );
        for entry in store.prefix(b"e") {
            let (key, value) = entry.unwrap();
            let mut r = Reader::new(&key[1..]);
            let bucket = r.i64_sortable().unwrap();
            let seq = u64::from_be_bytes(r.rest().try_into().unwrap());
            for (time, id) in decode_entry(&key, &value).unwrap() {
                assert_eq!(
                    bucket_of(time, width),
                    bucket,
                    "mention in the wrong bucket"
                );
                let again = mentioned.insert(id.to_vec(), (time, seq));
                assert!(again.is_none(), "{id:?} is mentioned twice");
            }
        }
        assert_eq!(remembered, mentioned);
        if let Some(st) = store.get(b"\x00m").unwrap() {
            let st = i64::from_le_bytes(st.as_ref().try_into().unwrap());
            let cut = cutoff(st - window, width);
            for (id, (time, _)) in &remembered {
                assert!(bucket_of(*time, width) >= cut, "{id:?} outlived its window");
            }
        }
    }

    proptest! {
        #[test]
        fn every_remembered_id_has_one_expiry_mention_and_expires(
            events in prop::collection::vec((0u8..20, 0i64..40, 0i64..30), 0..120),
            sizes in prop::collection::vec(1usize..12, 1..20),
            window in 0i64..200,
            later_window in 0i64..400,
        ) {
            // Half-way the pipeline is restarted with another window on the same state.
            let mut op = Deduplicate::new(DedupConfig { window_ms: window });
            let mut window = window;
            let mut store = MemoryStore::new("dedup");
            let mut now = 0;
            let events: Vec<Event> = events
                .iter()
                .enumerate()
                .map(|(i, (id, step, back))| {
                    now += step;
                    ev(&format!("e{id}"), now - back, i as i64)
                })
                .collect();
            let mut sizes = sizes.iter().cycle();
            let mut pos = 0;
            while pos < events.len() {
                if pos >= events.len() / 2 && window != later_window {
                    window = later_window;
                    op = Deduplicate::new(DedupConfig { window_ms: window });
                }
                let end = (pos + sizes.next().unwrap()).min(events.len());
                let batch = op.process(&store, &events[pos..end]).unwrap();
                store.commit(batch.state).unwrap();
                assert_bookkeeping(&store, window);
                pos = end;
            }
        }
    }

    #[test]
    fn a_restart_with_another_window_keeps_deduplicating() {
        use DedupDecision::*;
        let mut store = MemoryStore::new("dedup");
        let op = Deduplicate::new(DedupConfig { window_ms: 160 });
        let batch = op.process(&store, &[ev("a", 15, 0)]).unwrap();
        assert_eq!(batch.decisions, vec![Forward]);
        store.commit(batch.state).unwrap();
        // A wider window: `a` is past it at 340 and forwarded again, then remembered.
        let op = Deduplicate::new(DedupConfig { window_ms: 320 });
        for (events, want) in [
            (
                vec![ev("z", 340, 1), ev("a", 340, 2)],
                vec![Forward, Forward],
            ),
            (vec![ev("y", 360, 3)], vec![Forward]),
            (vec![ev("a", 361, 4)], vec![Duplicate]),
        ] {
            let batch = op.process(&store, &events).unwrap();
            assert_eq!(batch.decisions, want);
            store.commit(batch.state).unwrap();
        }
        // A narrower one: `b` at 400 is still within 50 of 440 and must not be forgotten.
        let op = Deduplicate::new(DedupConfig { window_ms: 50 });
        for (events, want) in [
            (vec![ev("b", 400, 5)], vec![Forward]),
            (vec![ev("x", 440, 6)], vec![Forward]),
            (vec![ev("b", 445, 7)], vec![Duplicate]),
        ] {
            let batch = op.process(&store, &events).unwrap();
            assert_eq!(batch.decisions, want);
            store.commit(batch.state).unwrap();
        }
    }

    #[test]
    fn ids_at_the_start_of_time_are_remembered() {
        use DedupDecision::*;
        let op = Deduplicate::new(DedupConfig { window_ms: 0 });
        let mut store = MemoryStore::new("dedup");
        let batch = op.process(&store, &[ev("a", i64::MIN, 0)]).unwrap();
        assert_eq!((batch.decisions, batch.expired), (vec![Forward], 0));
        store.commit(batch.state).unwrap();
        let batch = op.process(&store, &[ev("a", i64::MIN, 1)]).unwrap();
        assert_eq!(batch.decisions, vec![Duplicate]);
    }

    #[test]
    fn state_of_the_per_id_expiry_layout_still_expires_and_dedups() {
        use DedupDecision::*;
        let op = Deduplicate::new(DedupConfig { window_ms: 100 });
        let mut store = MemoryStore::new("dedup");
        // What the previous layout wrote for `a` at 0 and `b` at 90 (stream time 90).
        store
            .commit(per_id_layout_state(&[("a".into(), 0), ("b".into(), 90)]))
            .unwrap();
        // `a` is past the horizon and forwarded again; `b` is still remembered.
        let batch = op
            .process(&store, &[ev("a", 150, 2), ev("b", 150, 3)])
            .unwrap();
        assert_eq!(batch.decisions, vec![Forward, Duplicate]);
        store.commit(batch.state).unwrap();
        assert_bookkeeping_except_old(&store);
        // Much later both are forgotten, old layout and new.
        let batch = op.process(&store, &[ev("c", 1_000, 4)]).unwrap();
        assert_eq!(batch.expired, 2);
        store.commit(batch.state).unwrap();
        assert_bookkeeping(&store, 100);
        let ids: Vec<_> = store.prefix(b"d").map(|e| e.unwrap().0).collect();
        assert_eq!(ids, vec![Bytes::from_static(b"dc")]);
    }

    #[test]
    fn fjall_forgets_the_per_id_layout_like_the_memory_store() {
        let dir = tempfile::tempdir().unwrap();
        // The previous layout's state: ids at every time from 0 to 99 (window 100, so the
        // buckets are 6 wide and each expiry scan by exact time stops inside one).
        let ids: Vec<(String, i64)> = (0..100).map(|t| (format!("old{t}"), t)).collect();
        let (mut fjall, mut memory) = per_id_layout_stores(&dir, &ids);
        let op = Deduplicate::new(DedupConfig { window_ms: 100 });
        // Stream time creeps up while every old id comes back: each is forgotten (Forward) or
        // remembered (Duplicate) alike, and each store holds the same.
        for step in 0..100i64 {
            let events = [
                ev(&format!("new{step}"), 100 + step, 100 + 2 * step),
                ev(&format!("old{step}"), 100 + step, 101 + 2 * step),
            ];
            let (a, b) = process_both(&op, &mut fjall, &mut memory, &events);
            assert_eq!(a, b, "step {step}");
            assert_eq!(fjall.dump().unwrap(), memory.dump().unwrap(), "step {step}");
        }
    }

    /// An id of the per-id layout forwarded again and forgotten in the same batch: the batch's
    /// put is replaced by the forgetting, so what fjall holds is the per-id value, which no
    /// rule covers; it must be deleted, as the memory store does.
    #[test]
    fn a_per_id_layout_id_forwarded_and_forgotten_in_one_batch_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut fjall, mut memory) = per_id_layout_stores(&dir, &[("a".into(), 0)]);
        let op = Deduplicate::new(DedupConfig { window_ms: 100 });
        let events = [ev("a", 150, 2), ev("z", 300, 3)];
        let (a, b) = process_both(&op, &mut fjall, &mut memory, &events);
        assert_eq!(a, b);
        let in_fjall = fjall.get(b"da").unwrap();
        let in_memory = memory.get(b"da").unwrap();
        // Restart with a larger window: the resurfaced time-0 entry is within it.
        let big = Deduplicate::new(DedupConfig {
            window_ms: 1_000_000,
        });
        let (a2, b2) = process_both(&big, &mut fjall, &mut memory, &[ev("a", 400, 4)]);
        assert_eq!(
            (in_fjall, a2),
            (in_memory, b2),
            "fjall must not keep the per-id `d a` visible"
        );
    }

    /// An id of the per-id layout forwarded again (a value with a batch number) and later
    /// forgotten by the rule: compaction must not drop the newest version in a way that lets
    /// the per-id version below it come back.
    #[test]
    fn compaction_does_not_bring_back_a_per_id_layout_version() {
        let dir = tempfile::tempdir().unwrap();
        let (mut fjall, mut memory) = per_id_layout_stores(&dir, &[("a".into(), 0)]);
        fjall.compact().unwrap();
        let op = Deduplicate::new(DedupConfig { window_ms: 100 });
        let (a, b) = process_both(&op, &mut fjall, &mut memory, &[ev("a", 150, 2)]);
        assert_eq!(a, b);
        let (a, b) = process_both(&op, &mut fjall, &mut memory, &[ev("z", 300, 3)]);
        assert_eq!(a, b);
        assert_eq!(
            fjall.dump().unwrap(),
            memory.dump().unwrap(),
            "before compaction"
        );
        fjall.compact().unwrap();
        let in_fjall = fjall.get(b"da").unwrap();
        let big = Deduplicate::new(DedupConfig {
            window_ms: 1_000_000,
        });
        let (a2, b2) = process_both(&big, &mut fjall, &mut memory, &[ev("a", 400, 4)]);
        assert_eq!(
            (in_fjall, a2),
            (None, b2),
            "after compaction fjall must not show the per-id `d a` again"
        );
    }

    /// A fjall store and a memory store, both holding [`per_id_layout_state`] of `ids`.
    fn per_id_layout_stores(
        dir: &tempfile::TempDir,
        ids: &[(String, i64)],
    ) -> (FjallStore, MemoryStore) {
        let mut fjall = FjallStore::open(dir.path(), "dedup", Durability::Process).unwrap();
        let mut memory = MemoryStore::new("dedup");
        let old = per_id_layout_state(ids);
        fjall.commit(old.clone()).unwrap();
        memory.commit(old).unwrap();
        (fjall, memory)
    }

    /// Runs one batch on both stores and commits it; their decisions.
    fn process_both(
        op: &Deduplicate,
        fjall: &mut FjallStore,
        memory: &mut MemoryStore,
        events: &[Event],
    ) -> (Vec<DedupDecision>, Vec<DedupDecision>) {
        let a = op.process(&*fjall, events).unwrap();
        let b = op.process(&*memory, events).unwrap();
        fjall.commit(a.state).unwrap();
        memory.commit(b.state).unwrap();
        (a.decisions, b.decisions)
    }

    /// What the layout of per-id expiry entries wrote for these `(id, time)`, the n-th at
    /// offset n: `d` values without a batch number, `x` entries, stream time the last time.
    fn per_id_layout_state(ids: &[(String, i64)]) -> WriteBatch {
        let mut old = WriteBatch::default();
        for (offset, (id, time)) in ids.iter().enumerate() {
            let mut w = Writer::default();
            w.i64(*time).u32(0).i64(offset as i64);
            old.put(&id_key(id.as_bytes()), &w.finish());
            old.put(
                &[b"x".as_slice(), &i64_sortable(*time), id.as_bytes()].concat(),
                &[],
            );
        }
        if let Some((_, last)) = ids.last() {
            old.put(b"\x00m", &last.to_le_bytes());
        }
        old.set_offset(
            kontext_core::record::TopicPartition::new("clicks", 0),
            ids.len() as i64,
        );
        old
    }

    /// After the first batch on an old store, `b` still has its old-layout entry and value.
    fn assert_bookkeeping_except_old(store: &MemoryStore) {
        let old_b = [b"x".as_slice(), &i64_sortable(90), b"b"].concat();
        let old_a = [b"x".as_slice(), &i64_sortable(0), b"a"].concat();
        assert!(store.get(&old_b).unwrap().is_some());
        assert!(
            store.get(&old_a).unwrap().is_none(),
            "a's old entry is removed"
        );
    }

    fn ev(id: &str, t: i64, offset: i64) -> Event {
        Event {
            key: Bytes::from_static(b"k"),
            id: Bytes::copy_from_slice(id.as_bytes()),
            time_ms: t,
            coords: Coords::new("clicks", 0, offset),
            value: serde_json::Value::Null,
        }
    }

    #[test]
    fn drops_a_repeated_id_within_the_window_and_forgets_it_after() {
        use DedupDecision::*;
        let op = Deduplicate::new(DedupConfig { window_ms: 100 });
        let mut store = MemoryStore::new("dedup");
        let batch = op
            .process(
                &store,
                &[
                    ev("a", 0, 0),
                    ev("a", 50, 1),
                    ev("b", 60, 2),
                    ev("a", 300, 3),
                ],
            )
            .unwrap();
        assert_eq!(batch.decisions, vec![Forward, Duplicate, Forward, Forward]);
        store.commit(batch.state).unwrap();
        let batch = op
            .process(&store, &[ev("a", 301, 4), ev("c", 10, 5)])
            .unwrap();
        assert_eq!(batch.decisions, vec![Duplicate, Late]);
    }

    #[test]
    fn a_replayed_batch_below_the_committed_offsets_emits_nothing() {
        let op = Deduplicate::new(DedupConfig { window_ms: 100 });
        let mut store = MemoryStore::new("dedup");
        let events = [ev("a", 0, 0), ev("b", 1, 1)];
        let batch = op.process(&store, &events).unwrap();
        store.commit(batch.state).unwrap();
        let again = op.process(&store, &events).unwrap();
        assert_eq!(again.decisions, vec![DedupDecision::AlreadyApplied; 2]);
    }
}
