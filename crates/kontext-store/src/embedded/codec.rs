//! How an [`EntityDoc`] is stored in the embedded store: a compact binary record.
//!
//! ```text
//! 0x01                       format
//! str type, str id           (also in the key; kept so a value decodes on its own)
//! varint events_applied
//! varint P, P × provenance   each distinct provenance once: str source, str event_id,
//!                            0 | 1 + str event_type, str topic, zigzag partition, zigzag offset,
//!                            zigzag event_time_ms
//! varint latest              index into the provenances
//! varint F, F × field        str name, str value (JSON text, as serde_json writes it),
//!                            varint provenance index
//! str = varint length + UTF-8 bytes
//! ```
//!
//! An event usually sets several fields, so provenances are stored once and referenced. The
//! first stores wrote JSON (`{"t":..,"i":..,"f":[..],"p":[..],"n":..,"l":..}`); a value that
//! starts with `{` is decoded that way, so existing data directories keep working and are
//! rewritten in the binary form entity by entity as they change.
//!
//! Why binary: a batch commit rewrites every B-tree page the batch touches, so bytes per entity
//! are bytes per commit; this form is about 40% of the JSON one (customer document: 9 fields, 3
//! events), and it encodes and decodes without a JSON parser for the structure.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::Latest;
use crate::document::{EntityView, ProvenanceView};
use crate::model::{EntityDoc, FieldEntry, Provenance};
use crate::StoreError;

const FORMAT_BINARY: u8 = 1;

/// Appends the stored form of `doc` to `out` (cleared first).
pub(super) fn encode(doc: &EntityDoc, out: &mut Vec<u8>) -> Result<(), StoreError> {
    out.clear();
    out.push(FORMAT_BINARY);
    put_str(out, &doc.entity_type);
    put_str(out, &doc.entity_id);
    put_varint(out, doc.events_applied);
    // Distinct provenances in order of first use (fields in name order, then the latest).
    let mut table: Vec<&Provenance> = Vec::new();
    let mut field_index = Vec::with_capacity(doc.fields.len());
    for entry in doc.fields.values() {
        field_index.push(index_of(&entry.provenance, &mut table));
    }
    let latest = index_of(&doc.latest, &mut table);
    put_varint(out, table.len() as u64);
    for p in &table {
        put_str(out, &p.source);
        put_str(out, &p.event_id);
        match &p.event_type {
            None => put_varint(out, 0),
            Some(t) => {
                put_varint(out, 1);
                put_str(out, t);
            }
        }
        put_str(out, &p.topic);
        put_varint(out, zigzag(i64::from(p.partition)));
        put_varint(out, zigzag(p.offset));
        put_varint(out, zigzag(p.event_time_ms));
    }
    put_varint(out, latest);
    put_varint(out, doc.fields.len() as u64);
    let mut value = Vec::new();
    for ((name, entry), index) in doc.fields.iter().zip(field_index) {
        put_str(out, name);
        value.clear();
        serde_json::to_writer(&mut value, &entry.value)
            .map_err(|e| StoreError::Corrupt(format!("field {name}: {e}")))?;
        put_varint(out, value.len() as u64);
        out.extend_from_slice(&value);
        put_varint(out, index);
    }
    Ok(())
}

/// The index of `p` in `table`, added if new.
fn index_of<'a>(p: &'a Provenance, table: &mut Vec<&'a Provenance>) -> u64 {
    // Fields set by one event share its provenance: the pointer test settles most lookups.
    match table.iter().position(|q| std::ptr::eq(*q, p) || *q == p) {
        Some(i) => i as u64,
        None => {
            table.push(p);
            (table.len() - 1) as u64
        }
    }
}

/// Decodes a stored entity, binary or (from older stores) JSON.
pub(super) fn decode(bytes: &[u8]) -> Result<EntityDoc, StoreError> {
    match bytes.first() {
        Some(&FORMAT_BINARY) => decode_binary(&bytes[1..]),
        Some(b'{') => decode_json(bytes),
        Some(other) => Err(StoreError::Corrupt(format!(
            "unknown entity format byte {other:#04x}"
        ))),
        None => Err(StoreError::Corrupt("empty entity record".into())),
    }
}

fn decode_binary(bytes: &[u8]) -> Result<EntityDoc, StoreError> {
    let mut r = Reader { bytes, at: 0 };
    let entity_type = r.string()?;
    let entity_id = r.string()?;
    let events_applied = r.varint()?;
    let n = r.len()?;
    let mut table = Vec::with_capacity(n);
    for _ in 0..n {
        table.push(Arc::new(r.provenance()?));
    }
    let provenance = |index: u64| {
        table
            .get(index as usize)
            .cloned()
            .ok_or_else(|| out_of_range(index))
    };
    let latest = provenance(r.varint()?)?;
    let n = r.len()?;
    let mut fields = BTreeMap::new();
    for _ in 0..n {
        let name = r.string()?;
        let value = r.value(&name)?;
        let provenance = provenance(r.varint()?)?;
        fields.insert(name, FieldEntry { value, provenance });
    }
    r.end()?;
    Ok(EntityDoc {
        entity_type,
        entity_id,
        fields,
        events_applied,
        latest,
    })
}

/// Decodes a stored entity into what a context shows of it, without building an
/// [`EntityDoc`] first: each distinct provenance becomes one shared [`ProvenanceView`] (its
/// strings moved, not copied, its time formatted once), and the entity type (the caller knows
/// it) is not copied at all.
pub(super) fn decode_view(bytes: &[u8]) -> Result<EntityView, StoreError> {
    if bytes.first() != Some(&FORMAT_BINARY) {
        return decode(bytes).map(|doc| EntityView::from_doc(&doc));
    }
    let mut r = Reader {
        bytes: &bytes[1..],
        at: 0,
    };
    // The type: the caller knows it.
    let n = r.len()?;
    r.take(n)?;
    let entity_id = r.string()?;
    let events_applied = r.varint()?;
    let n = r.len()?;
    let mut table = Vec::with_capacity(n);
    for _ in 0..n {
        let p = r.provenance()?;
        table.push((p.event_time_ms, Arc::new(ProvenanceView::from(p))));
    }
    let view = |index: u64| table.get(index as usize).ok_or_else(|| out_of_range(index));
    let (latest_ms, latest) = view(r.varint()?)?;
    let (latest_ms, latest) = (*latest_ms, Arc::clone(latest));
    let n = r.len()?;
    let mut fields = Map::new();
    let mut provenance = BTreeMap::new();
    for _ in 0..n {
        let name = r.str_ref()?;
        let value = r.value(name)?;
        let (_, p) = view(r.varint()?)?;
        fields.insert(name.to_string(), value);
        provenance.insert(name.to_string(), Arc::clone(p));
    }
    r.end()?;
    Ok(EntityView {
        entity_id,
        fields,
        provenance,
        events_applied,
        latest,
        latest_ms,
    })
}

fn out_of_range(index: u64) -> StoreError {
    StoreError::Corrupt(format!("provenance index {index} out of range"))
}

/// The version of the newest event applied to a stored entity ([`EntityDoc::latest`]), read
/// without decoding its fields: the event time, topic, partition and offset, in the order of
/// [`crate::Version`].
pub(super) fn latest_version(bytes: &[u8]) -> Result<Latest, StoreError> {
    if bytes.first() != Some(&FORMAT_BINARY) {
        return Ok(decode(bytes)?.latest.owned_version());
    }
    let mut r = Reader {
        bytes: &bytes[1..],
        at: 0,
    };
    r.str_ref()?;
    r.str_ref()?;
    r.varint()?;
    let n = r.len()?;
    let mut table = Vec::with_capacity(n);
    for _ in 0..n {
        r.str_ref()?;
        r.str_ref()?;
        if r.varint()? != 0 {
            r.str_ref()?;
        }
        let topic = r.str_ref()?;
        let partition = unzigzag(r.varint()?);
        let offset = unzigzag(r.varint()?);
        let time = unzigzag(r.varint()?);
        table.push((time, topic, partition, offset));
    }
    let index = r.varint()?;
    let (time, topic, partition, offset) = table
        .get(index as usize)
        .ok_or_else(|| out_of_range(index))?;
    let partition = i32::try_from(*partition)
        .map_err(|_| StoreError::Corrupt("partition out of range".into()))?;
    Ok((*time, topic.to_string(), partition, *offset))
}

/// A value of the store's tombstone table: the version of the newest tombstone applied to an
/// entity, and the entity's `events_applied` while it is deleted (0 while it has a document,
/// which counts them).
pub(super) fn encode_tombstone(version: &Latest, events: u64, out: &mut Vec<u8>) {
    let (time, topic, partition, offset) = version;
    out.clear();
    put_varint(out, zigzag(*time));
    put_str(out, topic);
    put_varint(out, zigzag(i64::from(*partition)));
    put_varint(out, zigzag(*offset));
    put_varint(out, events);
}

/// What [`encode_tombstone`] wrote.
pub(super) fn decode_tombstone(bytes: &[u8]) -> Result<(Latest, u64), StoreError> {
    let mut r = Reader { bytes, at: 0 };
    let time = unzigzag(r.varint()?);
    let topic = r.string()?;
    let partition = i32::try_from(unzigzag(r.varint()?))
        .map_err(|_| StoreError::Corrupt("partition out of range".into()))?;
    let offset = unzigzag(r.varint()?);
    let events = r.varint()?;
    r.end()?;
    Ok(((time, topic, partition, offset), events))
}

/// A value of the store's related-children table: how many children of one type a parent
/// has, then the newest of them, newest first, each as its latest version and id.
pub(super) fn encode_related(total: u64, newest: &[(Latest, String)], out: &mut Vec<u8>) {
    out.clear();
    put_varint(out, total);
    put_varint(out, newest.len() as u64);
    for ((time, topic, partition, offset), id) in newest {
        put_varint(out, zigzag(*time));
        put_str(out, topic);
        put_varint(out, zigzag(i64::from(*partition)));
        put_varint(out, zigzag(*offset));
        put_str(out, id);
    }
}

/// What [`encode_related`] wrote.
pub(super) fn decode_related(bytes: &[u8]) -> Result<(u64, Vec<(Latest, String)>), StoreError> {
    let mut r = Reader { bytes, at: 0 };
    let total = r.varint()?;
    let n = r.len()?;
    let mut newest = Vec::with_capacity(n);
    for _ in 0..n {
        let time = unzigzag(r.varint()?);
        let topic = r.string()?;
        let partition = i32::try_from(unzigzag(r.varint()?))
            .map_err(|_| StoreError::Corrupt("partition out of range".into()))?;
        let offset = unzigzag(r.varint()?);
        newest.push(((time, topic, partition, offset), r.string()?));
    }
    Ok((total, newest))
}

/// What [`encode_related`] wrote, as a lookup needs it: the total and the ids of the first
/// (newest) `limit` entries, borrowed from `bytes`.
pub(super) fn decode_related_ids(
    bytes: &[u8],
    limit: usize,
) -> Result<(u64, Vec<&str>), StoreError> {
    let mut r = Reader { bytes, at: 0 };
    let total = r.varint()?;
    let n = r.len()?.min(limit);
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        r.varint()?; // time
        r.str_ref()?; // topic
        r.varint()?; // partition
        r.varint()?; // offset
        ids.push(r.str_ref()?);
    }
    Ok((total, ids))
}

/// The first stores' JSON form.
#[derive(serde::Deserialize)]
struct JsonDoc {
    t: String,
    i: String,
    /// (field, value, index into `p`)
    f: Vec<(String, Value, u32)>,
    p: Vec<Provenance>,
    n: u64,
    /// index of the latest event in `p`
    l: u32,
}

fn decode_json(bytes: &[u8]) -> Result<EntityDoc, StoreError> {
    let JsonDoc { t, i, f, p, n, l } =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let p: Vec<Arc<Provenance>> = p.into_iter().map(Arc::new).collect();
    let provenance = |index: u32| {
        p.get(index as usize)
            .cloned()
            .ok_or_else(|| StoreError::Corrupt(format!("provenance index {index} out of range")))
    };
    let mut fields = BTreeMap::new();
    for (name, value, index) in f {
        fields.insert(
            name,
            FieldEntry {
                value,
                provenance: provenance(index)?,
            },
        );
    }
    Ok(EntityDoc {
        latest: provenance(l)?,
        entity_type: t,
        entity_id: i,
        fields,
        events_applied: n,
    })
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| StoreError::Corrupt("entity record ends early".into()))?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(StoreError::Corrupt("varint too long".into()))
    }

    /// A length, checked against what is left (a corrupt length cannot allocate much).
    fn len(&mut self) -> Result<usize, StoreError> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len() - self.at)
            .ok_or_else(|| StoreError::Corrupt(format!("length {n} past the end of the record")))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| StoreError::Corrupt("entity record ends early".into()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    /// A provenance of the table (see the module doc).
    fn provenance(&mut self) -> Result<Provenance, StoreError> {
        let source = self.string()?;
        let event_id = self.string()?;
        let event_type = match self.varint()? {
            0 => None,
            _ => Some(self.string()?),
        };
        let topic = self.string()?;
        let partition = i32::try_from(unzigzag(self.varint()?))
            .map_err(|_| StoreError::Corrupt("partition out of range".into()))?;
        Ok(Provenance {
            source,
            event_id,
            event_type,
            topic,
            partition,
            offset: unzigzag(self.varint()?),
            event_time_ms: unzigzag(self.varint()?),
        })
    }

    /// A field value: length-prefixed JSON text.
    fn value(&mut self, field: &str) -> Result<Value, StoreError> {
        let len = self.len()?;
        serde_json::from_slice(self.take(len)?)
            .map_err(|e| StoreError::Corrupt(format!("field {field}: {e}")))
    }

    /// Checks that the whole record was read.
    fn end(&self) -> Result<(), StoreError> {
        if self.at != self.bytes.len() {
            return Err(StoreError::Corrupt("trailing bytes after entity".into()));
        }
        Ok(())
    }

    fn string(&mut self) -> Result<String, StoreError> {
        self.str_ref().map(str::to_string)
    }

    fn str_ref(&mut self) -> Result<&'a str, StoreError> {
        let n = self.len()?;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map_err(|_| StoreError::Corrupt("entity record holds invalid UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn prov(offset: i64, event_type: Option<&str>) -> Arc<Provenance> {
        Arc::new(Provenance {
            source: "crm".into(),
            event_id: format!("e-{offset}"),
            event_type: event_type.map(str::to_string),
            topic: "context.customers".into(),
            partition: 7,
            offset,
            event_time_ms: 1_764_072_000_000 + offset,
        })
    }

    fn doc() -> EntityDoc {
        let mut fields = BTreeMap::new();
        for (i, (k, v)) in [
            ("given_name", json!("Kemal")),
            ("balance", json!(-12.5)),
            ("tags", json!(["a", {"b": null}])),
            ("nul", json!("a\u{0}b")),
        ]
        .into_iter()
        .enumerate()
        {
            fields.insert(
                k.to_string(),
                FieldEntry {
                    value: v,
                    provenance: prov(i as i64 % 2, (i % 2 == 0).then_some("crm.updated")),
                },
            );
        }
        EntityDoc {
            entity_type: "customer".into(),
            entity_id: "C-1\u{0}é".into(),
            fields,
            events_applied: 300,
            latest: prov(9, None),
        }
    }

    #[test]
    fn binary_documents_decode_to_what_was_encoded() {
        let mut out = Vec::new();
        encode(&doc(), &mut out).unwrap();
        assert_eq!(decode(&out).unwrap(), doc());
    }

    #[test]
    fn views_decode_to_the_view_of_the_document() {
        let mut out = Vec::new();
        encode(&doc(), &mut out).unwrap();
        let view = decode_view(&out).unwrap();
        assert_eq!(view, EntityView::from_doc(&doc()));
        // One shared view per distinct event, as the stored table has them.
        assert!(Arc::ptr_eq(
            &view.provenance["given_name"],
            &view.provenance["tags"]
        ));
        let json = br#"{"t":"customer","i":"C-1","f":[["given_name","Kemal",0]],"p":[{"source":"crm","event_id":"e-0","topic":"context.customers","partition":7,"offset":0,"event_time_ms":1764072000000}],"n":1,"l":0}"#;
        assert_eq!(
            decode_view(json).unwrap(),
            EntityView::from_doc(&decode(json).unwrap())
        );
    }

    #[test]
    fn the_latest_version_reads_without_decoding_fields() {
        let mut out = Vec::new();
        encode(&doc(), &mut out).unwrap();
        let p = doc().latest;
        assert_eq!(
            latest_version(&out).unwrap(),
            (p.event_time_ms, p.topic.clone(), p.partition, p.offset)
        );
    }

    #[test]
    fn tombstones_decode_to_what_was_encoded() {
        let mut out = Vec::new();
        let version = (-5, "context.customers".to_string(), 3, 1 << 40);
        encode_tombstone(&version, 17, &mut out);
        assert_eq!(decode_tombstone(&out).unwrap(), (version, 17));
        for end in 0..out.len() {
            assert!(matches!(
                decode_tombstone(&out[..end]),
                Err(StoreError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn documents_of_the_json_format_still_decode() {
        let stored = r#"{"t":"customer","i":"C-1","f":[["given_name","Kemal",0]],"p":[{"source":"crm","event_id":"e-0","event_type":"crm.updated","topic":"context.customers","partition":7,"offset":0,"event_time_ms":1764072000000}],"n":1,"l":0}"#;
        let d = decode(stored.as_bytes()).unwrap();
        assert_eq!(d.entity_id, "C-1");
        assert_eq!(d.fields["given_name"].value, json!("Kemal"));
        assert_eq!(d.latest, prov(0, Some("crm.updated")));
    }

    #[test]
    fn truncated_or_unknown_records_are_corrupt_not_panics() {
        let mut out = Vec::new();
        encode(&doc(), &mut out).unwrap();
        for end in 0..out.len() {
            assert!(
                matches!(decode(&out[..end]), Err(StoreError::Corrupt(_))),
                "{end}"
            );
            assert!(
                matches!(decode_view(&out[..end]), Err(StoreError::Corrupt(_))),
                "{end}"
            );
        }
        assert!(matches!(decode(&[7, 1, 2]), Err(StoreError::Corrupt(_))));
        let mut long = out.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode_view(&long), Err(StoreError::Corrupt(_))));
    }

    proptest! {
        /// A lookup's borrowed read of a related list gives the ids the full decode gives, the
        /// newest `limit` of them.
        #[test]
        fn related_ids_are_the_newest_of_the_full_decode(
            entries in proptest::collection::vec(
                ((any::<i64>(), "[a-z.]{0,12}", any::<i32>(), any::<i64>()), "\\PC{0,8}"),
                0..12,
            ),
            total in 0u64..40,
            limit in 0usize..15,
        ) {
            let mut out = Vec::new();
            encode_related(total, &entries, &mut out);
            let (t, ids) = decode_related_ids(&out, limit).unwrap();
            let (full_total, full) = decode_related(&out).unwrap();
            prop_assert_eq!(t, full_total);
            let expected: Vec<&str> = full.iter().take(limit).map(|(_, id)| id.as_str()).collect();
            prop_assert_eq!(ids, expected);
            for end in 0..out.len() {
                if decode_related_ids(&out[..end], usize::MAX).is_ok() {
                    prop_assert!(false, "a list cut at {} decoded", end);
                }
            }
        }

        #[test]
        fn varints_round_trip(v in any::<i64>()) {
            let mut out = Vec::new();
            put_varint(&mut out, zigzag(v));
            let mut r = Reader { bytes: &out, at: 0 };
            prop_assert_eq!(unzigzag(r.varint().unwrap()), v);
            prop_assert_eq!(r.at, out.len());
        }
    }
}
