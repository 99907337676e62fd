//! Input offsets and stream time: what every operator tracks per batch, in one place.

use std::collections::BTreeMap;

use kontext_core::record::TopicPartition;

use crate::event::{Coords, Event};
use crate::store::{get_through, StateStore, StoreError, WriteBatch};

/// Stream time is metadata (key `0x00 m`): it goes with the offsets at the end of a
/// changelog batch.
const STREAM_TIME_KEY: &[u8] = b"\x00m";

/// Per batch: which events are new (at or above the store's offsets), the stream time, and
/// the offsets the batch's state will record.
pub(crate) struct Progress {
    committed: BTreeMap<TopicPartition, i64>,
    next: BTreeMap<TopicPartition, i64>,
    stream_time: Option<i64>,
    loaded_stream_time: Option<i64>,
}

impl Progress {
    /// Reads the store's offsets and stream time.
    pub(crate) fn load<S: StateStore + ?Sized>(
        store: &S,
        batch: &WriteBatch,
    ) -> Result<Self, StoreError> {
        let stream_time = get_through(store, batch, STREAM_TIME_KEY)?
            .map(|v| {
                v.as_ref()
                    .try_into()
                    .map(i64::from_le_bytes)
                    .map_err(|_| StoreError::Corrupt("stream time".into()))
            })
            .transpose()?;
        Ok(Self {
            committed: store.offsets()?,
            next: BTreeMap::new(),
            stream_time,
            loaded_stream_time: stream_time,
        })
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
    }
}
