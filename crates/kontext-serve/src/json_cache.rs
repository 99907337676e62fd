//! Serialized JSON of context documents, reused while the store hands out the same document.
//!
//! The embedded store serves a hot entity's document from its cache as the same
//! `Arc<ContextDocument>` until something it shows changes. Serializing that document (tens
//! of KB of JSON) is then most of what `GET /v1/context` costs, so the bytes are kept next to
//! the `Arc` they were made from and reused while the store returns that very `Arc`. The
//! cache holds the `Arc`, so its address cannot be reused by another document meanwhile: a
//! pointer match means the same content. Stores that assemble every lookup (PostgreSQL)
//! return a new `Arc` each time and simply never hit.
//!
//! The response is the document's JSON with `"staleness_ms":N` spliced in before the closing
//! brace: the same bytes as serializing [`crate::context::ContextResponse`] (its keys are
//! sorted and `staleness_ms` sorts last), which the golden-file tests hold it to.

use std::io::Write;
use std::sync::Arc;

use axum::body::Bytes;
use kontext_store::ContextDocument;

/// Bytes of serialized documents kept (about 2 000 of the quickstart's 29 KB documents).
const CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Clone)]
struct Entry {
    doc: Arc<ContextDocument>,
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
        let key = (entity_type.to_string(), entity_id.to_string());
        let json = match self.entries.get(&key) {
            Some(entry) if Arc::ptr_eq(&entry.doc, doc) => entry.json,
            _ => {
                let json = Bytes::from(serde_json::to_vec(doc.as_ref())?);
                self.entries.insert(
                    key,
                    Entry {
                        doc: Arc::clone(doc),
                        json: json.clone(),
                    },
                );
                json
            }
        };
        // A document always has keys (`as_of`, `entity_id`, ...), so it ends in `}` after
        // at least one member.
        let open = &json[..json.len() - 1];
        let mut body = Vec::with_capacity(json.len() + 32);
        body.extend_from_slice(open);
        write!(body, ",\"staleness_ms\":{staleness_ms}}}").expect("writing to a Vec");
        Ok(body)
    }
}
