//! Write batches and the changelog records they turn into.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use kontext_core::record::TopicPartition;

use super::{StoreError, BATCH_END_KEY, OFFSETS_PREFIX};

/// One record of a store's compacted changelog topic: the key, and the value or a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogRecord {
    pub key: Bytes,
    /// `None` is a tombstone (the key was deleted).
    pub value: Option<Bytes>,
}

/// State changes to apply atomically, with the input offsets they account for.
///
/// The batch keeps the last write per key (a later put or delete of the same key replaces the
/// earlier one), so it is also the compacted form of its changelog.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    writes: BTreeMap<Bytes, Option<Bytes>>,
    offsets: BTreeMap<TopicPartition, i64>,
    /// Deletes of entries an expiry rule covers ([`WriteBatch::delete_expired`]), in call
    /// order.
    expired: Vec<Bytes>,
}

impl WriteBatch {
    /// Puts `value` under `key`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.put_bytes(Bytes::copy_from_slice(key), Bytes::copy_from_slice(value));
    }

    /// Puts without copying.
    pub fn put_bytes(&mut self, key: Bytes, value: Bytes) {
        debug_assert!(!self.expired.contains(&key), "write after delete_expired");
        self.writes.insert(key, Some(value));
    }

    /// Deletes `key`.
    pub fn delete(&mut self, key: &[u8]) {
        self.delete_bytes(Bytes::copy_from_slice(key));
    }

    /// Deletes without copying.
    pub fn delete_bytes(&mut self, key: Bytes) {
        debug_assert!(!self.expired.contains(&key), "write after delete_expired");
        self.writes.insert(key, None);
    }

    /// Deletes `key`, an entry that the expiry rule of its prefix covers once this batch is
    /// applied ([`ExpiryRule`](super::ExpiryRule)): the changelog carries the tombstone, a
    /// store that knows no rules deletes it, and one that applies them itself
    /// ([`FjallStore`](super::FjallStore)) leaves it to the rule. Replaces a pending write of
    /// the key.
    ///
    /// These deletes are kept apart from the ordered writes (a batch of a steady stream
    /// forgets as many entries as it adds, and the ordered map was a tenth of the dedup's
    /// CPU): [`WriteBatch::get`] and [`WriteBatch::range`] do not see them. Call it after the
    /// batch's last read and write of `key` (checked in debug builds).
    pub fn delete_expired(&mut self, key: Bytes) {
        self.writes.remove(&key);
        self.expired.push(key);
    }

    /// The keys of [`WriteBatch::delete_expired`], in call order.
    pub fn expired(&self) -> &[Bytes] {
        &self.expired
    }

    /// Records that every input record of `tp` below `next_offset` is accounted for by the
    /// state once this batch is applied. Only moves forward.
    pub fn set_offset(&mut self, tp: TopicPartition, next_offset: i64) {
        let entry = self.offsets.entry(tp).or_insert(next_offset);
        *entry = (*entry).max(next_offset);
    }

    /// The pending write of `key`: `Some(None)` is a pending delete, `None` means untouched.
    pub fn get(&self, key: &[u8]) -> Option<Option<&Bytes>> {
        self.writes.get(key).map(Option::as_ref)
    }

    /// Pending writes with `start <= key < end`.
    pub fn range<'a>(
        &'a self,
        start: &[u8],
        end: &[u8],
    ) -> impl Iterator<Item = (&'a Bytes, &'a Option<Bytes>)> + 'a {
        self.writes
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
    }

    /// Number of pending key writes (offsets not counted).
    pub fn len(&self) -> usize {
        self.writes.len() + self.expired.len()
    }

    /// True when there is nothing to write, offsets included.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.expired.is_empty() && self.offsets.is_empty()
    }

    /// The input offsets this batch records.
    pub fn offsets(&self) -> &BTreeMap<TopicPartition, i64> {
        &self.offsets
    }

    /// Every key write in the order the changelog must carry them: the operator's upserts,
    /// its deletes, the metadata (stream time, input offsets), and last a batch-end marker.
    /// [`StateStore::restore`](super::StateStore::restore) applies a batch only once it has
    /// seen its marker, so a batch the producer wrote only partly (a crash, no transaction)
    /// is never restored half-way.
    pub fn changelog(&self) -> Vec<ChangelogRecord> {
        let mut out =
            Vec::with_capacity(self.writes.len() + self.expired.len() + self.offsets.len() + 1);
        let is_meta = |k: &Bytes| k.first() == Some(&0);
        for (key, value) in &self.writes {
            if value.is_some() && !is_meta(key) {
                out.push(ChangelogRecord {
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        for (key, value) in &self.writes {
            if value.is_none() && !is_meta(key) {
                out.push(ChangelogRecord {
                    key: key.clone(),
                    value: None,
                });
            }
        }
        for key in &self.expired {
            out.push(ChangelogRecord {
                key: key.clone(),
                value: None,
            });
        }
        for (key, value) in &self.writes {
            if is_meta(key) {
                out.push(ChangelogRecord {
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        for (key, value) in self.offset_entries() {
            out.push(ChangelogRecord {
                key,
                value: Some(value),
            });
        }
        out.push(ChangelogRecord {
            key: Bytes::from_static(BATCH_END_KEY),
            value: Some(Bytes::copy_from_slice(&(out.len() as u64).to_le_bytes())),
        });
        out
    }

    /// All writes including the offsets entries, as a store that knows no expiry rules must
    /// apply them.
    pub fn entries(&self) -> impl Iterator<Item = (Bytes, Option<Bytes>)> + '_ {
        self.entries_but_expired()
            .chain(self.expired.iter().map(|k| (k.clone(), None)))
    }

    /// [`WriteBatch::entries`] without the deletes of [`WriteBatch::delete_expired`].
    pub fn entries_but_expired(&self) -> impl Iterator<Item = (Bytes, Option<Bytes>)> + '_ {
        self.writes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(self.offset_entries().map(|(k, v)| (k, Some(v))))
    }

    /// True if the batch ends with the batch-end marker's key (used by restore).
    pub(crate) fn is_batch_end(key: &[u8]) -> bool {
        key == BATCH_END_KEY
    }

    fn offset_entries(&self) -> impl Iterator<Item = (Bytes, Bytes)> + '_ {
        self.offsets
            .iter()
            .map(|(tp, next)| (offset_key(tp), Bytes::copy_from_slice(&next.to_le_bytes())))
    }
}

/// `0x00 'o' topic 0x00 partition(big-endian)`.
pub(crate) fn offset_key(tp: &TopicPartition) -> Bytes {
    let mut key = Vec::with_capacity(OFFSETS_PREFIX.len() + tp.topic.len() + 5);
    key.extend_from_slice(OFFSETS_PREFIX);
    key.extend_from_slice(tp.topic.as_bytes());
    key.push(0);
    key.extend_from_slice(&tp.partition.to_be_bytes());
    Bytes::from(key)
}

pub(crate) fn decode_offset_entry(
    key: &[u8],
    value: &[u8],
) -> Result<(TopicPartition, i64), StoreError> {
    let corrupt = || StoreError::Corrupt("offsets entry".into());
    let rest = key.strip_prefix(OFFSETS_PREFIX).ok_or_else(corrupt)?;
    if rest.len() < 5 {
        return Err(corrupt());
    }
    let (topic, partition) = rest.split_at(rest.len() - 5);
    let topic = std::str::from_utf8(topic).map_err(|_| corrupt())?;
    let partition = i32::from_be_bytes(partition[1..].try_into().map_err(|_| corrupt())?);
    let next = i64::from_le_bytes(value.try_into().map_err(|_| corrupt())?);
    Ok((TopicPartition::new(topic, partition), next))
}
