//! Serialized JSON of context documents, reused while the store hands out the same document
//! (`doc_cache.rs` says when).
//!
//! The response is the document's JSON with `"staleness_ms":N` spliced in before the closing
//! brace: the same bytes as serializing [`crate::context::ContextResponse`] (its keys are
//! sorted and `staleness_ms` sorts last), which the golden-file tests hold it to.

use std::io::Write;
use std::sync::Arc;

use axum::body::Bytes;
use kontext_store::ContextDocument;

use crate::doc_cache::{DocCache, Weigh};

/// Bytes of serialized documents kept (about 2 000 of the quickstart's 29 KB documents).
const CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

impl Weigh for Bytes {
    fn weight(&self) -> u64 {
        self.len() as u64
    }
}

/// Serialized context documents by (entity type, id).
pub struct JsonCache {
    entries: DocCache<(String, String), Bytes>,
}

impl Default for JsonCache {
    fn default() -> Self {
        Self {
            entries: DocCache::new(CAPACITY_BYTES, 16_384),
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
        let key = (entity_type.to_string(), entity_id.to_string());
        let json = self.entries.get_or_make(
            key,
            doc,
            |_| true,
            || serde_json::to_vec(doc.as_ref()).map(Bytes::from),
        )?;
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
    use super::*;
    use crate::doc_cache::test_document as document;

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
