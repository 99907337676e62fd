//! Expiry rules: entries under a key prefix that are deleted by one rule instead of one
//! delete each in the local store.
//!
//! An operator whose entries expire by their time (dedup's `d<id>`) records, in the same
//! batch as the deletes of the expired entries, a rule that covers exactly them: "the entries
//! under prefix `p` with a time below `below_time`, written by a batch numbered at most
//! `through_seq`". It still deletes each one, so the changelog carries every tombstone and a
//! restored store holds none of them; but it marks those deletes as covered
//! ([`WriteBatch::delete_expired`](super::WriteBatch::delete_expired)), and a store may then
//! leave the entries in place, hide them from reads, and drop them when it compacts
//! ([`FjallStore`](super::FjallStore) does: the deletes were ~a third of the dedup's memtable
//! inserts, and their tombstones doubled what fjall flushed and compacted). Both kinds of
//! store answer every read the same.
//!
//! The rule is stored under `0x00 'e' p` (metadata: it travels with the offsets at the end of
//! a changelog batch) and only ever covers more: a batch whose cut is lower (a restart with a
//! larger window) keeps the stored rule and deletes the rest one by one. Entries under a ruled
//! prefix have values that start with their time (`i64`, little-endian) and carry at bytes
//! 20..28 the sequence number of the batch that wrote them (`u64`, little-endian): the layout
//! of dedup's `d` entries. A shorter value (dedup's layout before batch numbers) is never
//! covered: such entries are deleted one by one.

use crate::codec::Reader;

use super::StoreError;

/// Key prefix of the expiry rules (`0x00 'e' prefix`).
pub(crate) const EXPIRY_RULES_PREFIX: &[u8] = b"\x00e";

/// Where an entry's batch sequence number sits in its value.
const SEQ_AT: usize = 20;

/// The entries under one key prefix that a store may treat as deleted (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryRule {
    /// Entries with a time below this one...
    pub below_time: i64,
    /// ...written by a batch numbered at most this one.
    pub through_seq: u64,
}

impl ExpiryRule {
    /// The metadata key of the rule of the entries under `prefix`.
    pub fn key(prefix: u8) -> [u8; 3] {
        [EXPIRY_RULES_PREFIX[0], EXPIRY_RULES_PREFIX[1], prefix]
    }

    /// True if the entry with this value is covered (deleted, though a store may still hold
    /// it). A value too short to carry a batch number is not.
    pub fn covers(&self, value: &[u8]) -> bool {
        let (Some(time), Some(seq)) = (value.get(..8), value.get(SEQ_AT..SEQ_AT + 8)) else {
            return false;
        };
        let time = i64::from_le_bytes(time.try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(seq.try_into().unwrap_or_default());
        self.covers_entry(time, seq)
    }

    /// True if the rule covers an entry of this time written by batch `seq`.
    pub fn covers_entry(&self, time: i64, seq: u64) -> bool {
        time < self.below_time && seq <= self.through_seq
    }

    /// True if this rule covers every entry `earlier` covers.
    pub fn contains(&self, earlier: &ExpiryRule) -> bool {
        self.below_time >= earlier.below_time && self.through_seq >= earlier.through_seq
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.below_time.to_le_bytes());
        out[8..].copy_from_slice(&self.through_seq.to_le_bytes());
        out
    }

    pub fn decode(value: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader::new(value);
        Ok(Self {
            below_time: r.i64()?,
            through_seq: r.u64()?,
        })
    }
}

/// The prefix byte of a rule's metadata key, if `key` is one.
pub(crate) fn rule_prefix(key: &[u8]) -> Option<u8> {
    match key.strip_prefix(EXPIRY_RULES_PREFIX) {
        Some(&[prefix]) => Some(prefix),
        _ => None,
    }
}

/// The rules of a store, by prefix: few (one per expiring operator), so a list.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExpiryRules(Vec<(u8, ExpiryRule)>);

impl ExpiryRules {
    /// The rule of the prefix `key` starts with.
    pub(crate) fn of(&self, key: &[u8]) -> Option<&ExpiryRule> {
        let first = *key.first()?;
        self.0.iter().find(|(p, _)| *p == first).map(|(_, r)| r)
    }

    /// True if a rule covers the entry `key` → `value`.
    pub(crate) fn covers(&self, key: &[u8], value: &[u8]) -> bool {
        self.of(key).is_some_and(|rule| rule.covers(value))
    }

    pub(crate) fn set(&mut self, prefix: u8, rule: Option<ExpiryRule>) {
        self.0.retain(|(p, _)| *p != prefix);
        if let Some(rule) = rule {
            self.0.push((prefix, rule));
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
