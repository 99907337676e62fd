//! Deduplication by event id within an event-time window.
//!
//! Semantics (the model test checks exactly this): stream time `st` is the largest event time
//! seen so far, this event included. An event with time `t < st - window` is **late**: its id
//! may already have been forgotten, so it is dropped and counted, never guessed at. Otherwise it
//! is a **duplicate** if an earlier forwarded event with the same id has time `>= st - window`,
//! and is **forwarded** if not. Ids are forgotten once their time falls below `st - window`.
//!
//! State (keys): `d id` → time and offset of the forwarded event; `x time id` → expiry index;
//! `m` → stream time.

use crate::codec::{i64_sortable, Reader, Writer};
use crate::event::Event;
use crate::progress::Progress;
use crate::store::{get_through, range_through, StateStore, StoreError, WriteBatch};

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

impl Deduplicate {
    /// An operator with this configuration.
    pub fn new(config: DedupConfig) -> Self {
        Self { config }
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
                    if let Some(stale) = stale {
                        out.state.delete(&expiry_key(stale.time_ms, &event.id));
                    }
                    let mut w = Writer::with_capacity(20);
                    w.i64(event.time_ms)
                        .u32(event.coords.partition as u32)
                        .i64(event.coords.offset);
                    out.state.put(&key, &w.finish());
                    out.state.put(&expiry_key(event.time_ms, &event.id), &[]);
                    DedupDecision::Forward
                }
            };
            out.decisions.push(decision);
        }
        let stream_time = progress.stream_time();
        let from = progress
            .loaded_stream_time()
            .map_or(i64::MIN, |st| st.saturating_sub(window));
        progress.finish(&mut out.state);
        if let Some(st) = stream_time {
            out.expired = self.expire(store, &mut out.state, from, st.saturating_sub(window))?;
        }
        Ok(out)
    }

    /// Forgets ids whose time is in `[from, horizon)` (nothing is left below `from`).
    fn expire<S: StateStore + ?Sized>(
        &self,
        store: &S,
        state: &mut WriteBatch,
        from: i64,
        horizon: i64,
    ) -> Result<usize, StoreError> {
        let start = [b"x".as_slice(), &i64_sortable(from)].concat();
        let end = [b"x".as_slice(), &i64_sortable(horizon)].concat();
        let expired = range_through(store, state, &start, &end)?;
        for (key, _) in &expired {
            let mut r = Reader::new(&key[1..]);
            let _time = r.i64_sortable()?;
            // The index entry is the id's current one: forwarding an id again deletes its old
            // index entry, so no lookup is needed before deleting the id.
            state.delete(&id_key(r.rest()));
            state.delete(key);
        }
        Ok(expired.len())
    }
}

struct Seen {
    time_ms: i64,
    partition: i32,
    offset: i64,
}

fn decode_seen(v: &[u8]) -> Result<Seen, StoreError> {
    let mut r = Reader::new(v);
    Ok(Seen {
        time_ms: r.i64()?,
        partition: r.u32()? as i32,
        offset: r.i64()?,
    })
}

fn id_key(id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 1);
    key.push(b'd');
    key.extend_from_slice(id);
    key
}

fn expiry_key(time_ms: i64, id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 9);
    key.push(b'x');
    key.extend_from_slice(&i64_sortable(time_ms));
    key.extend_from_slice(id);
    key
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::event::Coords;
    use crate::store::MemoryStore;

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
