//! Input offsets and stream time: what every operator tracks per batch, in one place.

use std::collections::BTreeMap;

use kontext_core::record::TopicPartition;

use crate::event::{Coords, Event};
use crate::store::{get_through, StateStore, StoreError, WriteBatch};

/// Stream time is metadata (key `0x00 m`): it goes with the offsets at the end of a
/// changelog batch.
const STREAM_TIME_KEY: &[u8] = b"\x00m";
/// The close horizon of a windowed aggregation (key `0x00 h`): every window ending at or before
/// it is closed and deleted. Metadata like stream time.
const HORIZON_KEY: &[u8] = b"\x00h";

/// Per batch: which events are new (at or above the store's offsets), the stream time, and
/// the offsets the batch's state will record.
pub(crate) struct Progress {
    committed: BTreeMap<TopicPartition, i64>,
    next: BTreeMap<TopicPartition, i64>,
    stream_time: Option<i64>,
    loaded_stream_time: Option<i64>,
    /// The close horizon the store recorded, if the operator keeps one.
    loaded_horizon: Option<i64>,
    /// The close horizon this batch records, once the operator gives it.
    horizon: Option<i64>,
}

fn read_i64<S: StateStore + ?Sized>(
    store: &S,
    batch: &WriteBatch,
    key: &[u8],
    what: &str,
) -> Result<Option<i64>, StoreError> {
    get_through(store, batch, key)?
        .map(|v| {
            v.as_ref()
                .try_into()
                .map(i64::from_le_bytes)
                .map_err(|_| StoreError::Corrupt(what.into()))
        })
        .transpose()
}

impl Progress {
    /// Reads the store's offsets and stream time.
    pub(crate) fn load<S: StateStore + ?Sized>(
        store: &S,
        batch: &WriteBatch,
    ) -> Result<Self, StoreError> {
        let stream_time = read_i64(store, batch, STREAM_TIME_KEY, "stream time")?;
        Ok(Self {
            committed: store.offsets()?,
            next: BTreeMap::new(),
            stream_time,
            loaded_stream_time: stream_time,
            loaded_horizon: read_i64(store, batch, HORIZON_KEY, "close horizon")?,
            horizon: None,
        })
    }

    /// The close horizon at stream time `st` with `grace`: windows ending at or before it are
    /// closed (an event that only reaches them is late). It is `st - grace`, but never below
    /// the horizon an earlier batch recorded: a restart with a larger grace must not open again
    /// a window whose final value was emitted and whose state was deleted, since it would
    /// start from nothing and replace that value with a partial one.
    pub(crate) fn horizon(&self, st: i64, grace: i64) -> i64 {
        let horizon = st.saturating_sub(grace);
        self.loaded_horizon.map_or(horizon, |h| h.max(horizon))
    }

    /// The horizon at the batch's last stream time `st` ([`Self::horizon`]), marked closed:
    /// [`Self::finish`] records it, and the next batches never admit below it.
    pub(crate) fn close_through(&mut self, st: i64, grace: i64) -> i64 {
        let horizon = self.horizon(st, grace);
        self.horizon = Some(horizon);
        horizon
    }

    /// Admits an event: `None` if it is below the store's offsets (already applied), else the
    /// stream time including this event.
    pub(crate) fn admit(&mut self, event: &Event) -> Option<i64> {
        if !self.admit_offset(&event.coords) {
            return None;
        }
        let st = self
            .stream_time
            .map_or(event.time_ms, |st| st.max(event.time_ms));
        self.stream_time = Some(st);
        Some(st)
    }

    /// Admits an input by its coordinates alone (it does not move stream time): `false` if it
    /// is below the store's offsets.
    pub(crate) fn admit_offset(&mut self, coords: &Coords) -> bool {
        let offset = coords.offset;
        let known = self
            .committed
            .iter()
            .find(|(tp, _)| tp.partition == coords.partition && tp.topic == coords.topic)
            .map(|(_, next)| *next);
        if known.is_some_and(|next| offset < next) {
            return false;
        }
        match self
            .next
            .iter_mut()
            .find(|(tp, _)| tp.partition == coords.partition && tp.topic == coords.topic)
        {
            Some((_, next)) => *next = (*next).max(offset + 1),
            None => {
                self.next.insert(
                    TopicPartition::new(coords.topic.clone(), coords.partition),
                    offset + 1,
                );
            }
        }
        true
    }

    /// The stream time after the events admitted so far.
    pub(crate) fn stream_time(&self) -> Option<i64> {
        self.stream_time
    }

    /// The stream time before this batch. Expiry indexes hold nothing below the horizon it
    /// implied (each batch deletes everything below its horizon, and nothing below it is ever
    /// admitted), so expiry scans start there instead of walking the tombstones the LSM still
    /// holds for everything expired before.
    pub(crate) fn loaded_stream_time(&self) -> Option<i64> {
        self.loaded_stream_time
    }

    /// Records the batch's offsets and stream time in `batch`.
    pub(crate) fn finish(self, batch: &mut WriteBatch) {
        for (tp, next) in self.next {
            batch.set_offset(tp, next);
        }
        if let Some(st) = self.stream_time {
            batch.put(STREAM_TIME_KEY, &st.to_le_bytes());
        }
        if let Some(horizon) = self.horizon {
            batch.put(HORIZON_KEY, &horizon.to_le_bytes());
        }
    }
}
