//! Markdown renderings of context documents, reused while the store hands out the same
//! document (`doc_cache.rs` says when) and the header's staleness reads the same.
//!
//! Rendering to a token budget counts tokens with a real BPE, so it costs a hundred times a
//! lookup from the document cache. An assistant fetches the same entity's context turn after
//! turn, with the same budget, while its document changes far less often. A rendering is a
//! function of the document, the request's budget, tokenizer and provenance detail, the
//! pipeline's section priority (fixed for the server) and the staleness label in the header
//! ("just now", "5 s ago", ...), so it is kept under the request and reused while the
//! document and the label are the same.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kontext_core::config::Tokenizer;
use kontext_store::ContextDocument;

use crate::doc_cache::{DocCache, Weigh};
use crate::render::{render_markdown, staleness_label, ProvenanceDetail, RenderError};
use crate::render::{RenderOptions, Rendered};

/// Bytes of renderings kept (about 16 000 renderings of 2 KB).
const CAPACITY_BYTES: u64 = 32 * 1024 * 1024;

/// What a rendering was asked for, besides the document.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Request {
    entity_type: String,
    entity_id: String,
    max_tokens: Option<usize>,
    tokenizer: Tokenizer,
    provenance: ProvenanceDetail,
}

#[derive(Clone)]
struct Kept {
    /// The header's staleness when it was rendered.
    label: Option<String>,
    rendered: Arc<Rendered>,
}

impl Weigh for Kept {
    fn weight(&self) -> u64 {
        self.rendered.text.len() as u64
    }
}

/// Renderings by entity and request.
pub struct MarkdownCache {
    entries: DocCache<Request, Kept>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Default for MarkdownCache {
    fn default() -> Self {
        Self {
            entries: DocCache::new(CAPACITY_BYTES, 2_048),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }
}

impl MarkdownCache {
    /// `render_markdown(doc, options)`, reused while `doc` and its staleness label are the same.
    pub fn render(
        &self,
        entity_type: &str,
        entity_id: &str,
        doc: &Arc<ContextDocument>,
        options: &RenderOptions,
    ) -> Result<Arc<Rendered>, RenderError> {
        let request = Request {
            entity_type: entity_type.to_string(),
            entity_id: entity_id.to_string(),
            max_tokens: options.max_tokens,
            tokenizer: options.tokenizer,
            provenance: options.provenance,
        };
        let label = staleness_label(doc, options.now_ms);
        let mut rendered_now = false;
        let kept = self.entries.get_or_make(
            request,
            doc,
            |kept| kept.label == label,
            || {
                rendered_now = true;
                Ok(Kept {
                    label: label.clone(),
                    rendered: Arc::new(render_markdown(doc, options)?),
                })
            },
        );
        let counter = if rendered_now {
            &self.misses
        } else {
            &self.hits
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(kept?.rendered)
    }

    /// Renderings reused and renderings made (or attempted: a budget too small counts) so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc_cache::test_document as document;

    fn options(max_tokens: Option<usize>, now_ms: i64) -> RenderOptions {
        RenderOptions {
            max_tokens,
            now_ms: Some(now_ms),
            ..RenderOptions::default()
        }
    }

    /// A document the store shares is rendered once per request and label: the same
    /// rendering comes back while the header would read the same.
    #[test]
    fn a_shared_document_is_rendered_once_while_its_staleness_reads_the_same() {
        let cache = MarkdownCache::default();
        let doc = document();
        let held_by_the_store = Arc::clone(&doc);
        let first = cache
            .render("customer", "C1", &doc, &options(None, 200))
            .unwrap();
        let again = cache
            .render("customer", "C1", &doc, &options(None, 900))
            .unwrap();
        assert!(Arc::ptr_eq(&first, &again), "both are \"just now\"");
        assert_eq!(cache.stats(), (1, 1));
        assert_eq!(*first, render_markdown(&doc, &options(None, 900)).unwrap());
        // Five seconds later the header says so: rendered again, and kept in its place.
        let later = cache
            .render("customer", "C1", &doc, &options(None, 5_200))
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &later));
        assert!(later.text.contains("(5 s ago)"), "{}", later.text);
        assert_eq!(
            *later,
            render_markdown(&doc, &options(None, 5_200)).unwrap()
        );
        assert_eq!(cache.entries.len(), 1);
        // Another budget is another request.
        let small = cache
            .render("customer", "C1", &doc, &options(Some(60), 5_200))
            .unwrap();
        assert_eq!(
            *small,
            render_markdown(&doc, &options(Some(60), 5_200)).unwrap()
        );
        assert_eq!(cache.entries.len(), 2);
        assert_eq!(cache.stats(), (1, 3));
        drop(held_by_the_store);
    }

    /// A new document at the same key (the entity changed) is rendered again, and one only
    /// the caller holds (assembled for this lookup) is rendered and not kept.
    #[test]
    fn a_changed_document_is_rendered_again_and_an_unshared_one_is_not_kept() {
        let cache = MarkdownCache::default();
        let doc = document();
        let held_by_the_store = Arc::clone(&doc);
        cache
            .render("customer", "C1", &doc, &options(None, 200))
            .unwrap();
        drop(held_by_the_store);
        let mut changed = (*doc).clone();
        changed.fields.insert("tier".into(), "gold".into());
        let changed = Arc::new(changed);
        let held_by_the_store = Arc::clone(&changed);
        let rendered = cache
            .render("customer", "C1", &changed, &options(None, 200))
            .unwrap();
        assert!(rendered.text.contains("gold"), "{}", rendered.text);
        drop(held_by_the_store);

        let cache = MarkdownCache::default();
        let unshared = document();
        let rendered = cache
            .render("customer", "C1", &unshared, &options(None, 200))
            .unwrap();
        assert_eq!(
            *rendered,
            render_markdown(&unshared, &options(None, 200)).unwrap()
        );
        assert_eq!(cache.entries.len(), 0);
    }
}
