//! Serialized JSON of context documents, reused while the store hands out the same document.
//!
//! The embedded store serves a hot entity's document from its cache as the same
//! `Arc<ContextDocument>` until something it shows changes. Serializing that document (tens
//! of KB of JSON) is then most of what `GET /v1/context` costs, so the bytes are kept next to
//! a `Weak` of the `Arc` they were made from and reused while the store returns that very
//! `Arc`. A `Weak` keeps the allocation, so its address cannot be reused by another document
//! meanwhile (a pointer match means the same content), but not the content: once the store's
//! cache drops a document, its fields and children are freed, and only the JSON the weigher
//! counts stays. Stores that assemble every lookup (PostgreSQL)
//! return a new `Arc` each time, which nothing else holds: those are serialized and not kept.
//!
//! The response is the document's JSON with `"staleness_ms":N` spliced in before the closing
//! brace: the same bytes as serializing [`crate::context::ContextResponse`] (its keys are
//! sorted and `staleness_ms` sorts last), which the golden-file tests hold it to.

use std::io::Write;
use std::sync::{Arc, Weak};

use axum::body::Bytes;
use kontext_store::ContextDocument;

/// Bytes of serialized documents kept (about 2 000 of the quickstart's 29 KB documents).
const CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Clone)]
struct Entry {
    doc: Weak<ContextDocument>,
    json: Bytes,
}

#[derive(Clone)]
struct ByLength;

impl quick_cache::Weighter<(String, String), Entry> for ByLength {
    fn weight(&self, _: &(String, String), entry: &Entry) -> u64 {
        entry.json.len() as u64 + 256
    }
}

/// Serialized context documents by (entity type, id).
pub struct JsonCache {
    entries: quick_cache::sync::Cache<(String, String), Entry, ByLength>,
}

impl Default for JsonCache {
    fn default() -> Self {
        Self {
            entries: quick_cache::sync::Cache::with_weighter(
                (CAPACITY_BYTES / 16_384) as usize,
                CAPACITY_BYTES,
                ByLength,
            ),
        }
    }
}

impl JsonCache {
    /// The response body for `doc`: `{...document...,"staleness_ms":N}`.
    pub fn response_body(
        &self,
        entity_type: &str,
        entity_id: &str,
        doc: &Arc<ContextDocument>,
        staleness_ms: i64,
    ) -> serde_json::Result<Vec<u8>> {
        // A document only the caller holds was assembled for this lookup (PostgreSQL, or the
        // embedded store without its cache): the store will never hand it out again, so
        // keeping it would never hit and would keep the whole decoded document alive, several
        // times the JSON bytes the weigher counts.
        if Arc::strong_count(doc) == 1 {
            return Ok(with_staleness(
                &serde_json::to_vec(doc.as_ref())?,
                staleness_ms,
            ));
        }
        let key = (entity_type.to_string(), entity_id.to_string());
        let json = match self.entries.get(&key) {
            Some(entry) if std::ptr::eq(entry.doc.as_ptr(), Arc::as_ptr(doc)) => entry.json,
            _ => {
                let json = Bytes::from(serde_json::to_vec(doc.as_ref())?);
                self.entries.insert(
                    key,
                    Entry {
                        doc: Arc::downgrade(doc),
                        json: json.clone(),
                    },
                );
                json
            }
        };
        Ok(with_staleness(&json, staleness_ms))
    }
}

/// `json` (a document) with `"staleness_ms":N` spliced in before its closing brace.
fn with_staleness(json: &[u8], staleness_ms: i64) -> Vec<u8> {
    // A document always has keys (`as_of`, `entity_id`, ...), so it ends in `}` after at least
    // one member.
    let open = &json[..json.len() - 1];
    let mut body = Vec::with_capacity(json.len() + 32);
    body.extend_from_slice(open);
    write!(body, ",\"staleness_ms\":{staleness_ms}}}").expect("writing to a Vec");
    body
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kontext_store::ProvenanceView;
    use serde_json::{json, Map};

    use super::*;

    fn document() -> Arc<ContextDocument> {
        let as_of = Arc::new(ProvenanceView {
            event_id: "e1".into(),
            event_time: "2026-11-25T12:00:07.053Z".into(),
            event_type: None,
            offset: 1,
            partition: 0,
            source: "crm".into(),
            topic: "context.customers".into(),
        });
        let fields: Map<String, serde_json::Value> =
            json!({"given_name": "Ana"}).as_object().cloned().unwrap();
        Arc::new(ContextDocument {
            provenance: BTreeMap::from([("given_name".to_string(), Arc::clone(&as_of))]),
            as_of,
            belongs_to: BTreeMap::new(),
            entity_id: "C1".into(),
            entity_type: "customer".into(),
            events_applied: 1,
            fields,
            related: BTreeMap::new(),
            as_of_ms: 0,
        })
    }

    fn expected(doc: &ContextDocument, staleness_ms: i64) -> Vec<u8> {
        let mut value = serde_json::to_value(doc).unwrap();
        value["staleness_ms"] = staleness_ms.into();
        serde_json::to_vec(&value).unwrap()
    }

    /// PostgreSQL (and the embedded store without its cache) assemble a new document per
    /// lookup: keeping it could never hit, and would hold every decoded document served until
    /// 64 MiB of their JSON had passed.
    #[test]
    fn documents_only_the_caller_holds_are_not_kept() {
        let cache = JsonCache::default();
        for staleness in [5, 7] {
            let doc = document();
            let body = cache
                .response_body("customer", "C1", &doc, staleness)
                .unwrap();
            assert_eq!(body, expected(&doc, staleness));
        }
        assert_eq!(cache.entries.len(), 0);
    }

    /// A document the store shares (its cache holds it) is serialized once and reused.
    #[test]
    fn shared_documents_are_kept_and_reused() {
        let cache = JsonCache::default();
        let doc = document();
        let held_by_the_store = Arc::clone(&doc);
        let first = cache.response_body("customer", "C1", &doc, 5).unwrap();
        assert_eq!(cache.entries.len(), 1);
        let again = cache.response_body("customer", "C1", &doc, 9).unwrap();
        assert_eq!(first, expected(&doc, 5));
        assert_eq!(again, expected(&doc, 9));
        drop(held_by_the_store);
    }

    /// A kept entry does not keep the document's content alive once the store dropped it (the
    /// weigher counts only the JSON), and a new document at the same key is not served the
    /// old bytes.
    #[test]
    fn a_kept_entry_does_not_keep_the_document_alive() {
        let cache = JsonCache::default();
        let doc = document();
        let held_by_the_store = Arc::clone(&doc);
        cache.response_body("customer", "C1", &doc, 5).unwrap();
        let probe = Arc::downgrade(&doc);
        drop(held_by_the_store);
        drop(doc);
        assert!(probe.upgrade().is_none(), "the cache kept the document");
        assert_eq!(cache.entries.len(), 1);
        let mut changed = (*document()).clone();
        changed.fields.insert("tier".into(), "gold".into());
        let changed = Arc::new(changed);
        let held_by_the_store = Arc::clone(&changed);
        let body = cache.response_body("customer", "C1", &changed, 5).unwrap();
        assert_eq!(body, expected(&changed, 5));
        drop(held_by_the_store);
    }
}
