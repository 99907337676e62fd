//! Rendering of context documents for LLM prompts: markdown that fits a token budget.
//!
//! The document is cut into *units* that are shown whole or not at all: each of the entity's
//! fields, each parent entity, each related entity, and the entity's field provenance (one unit:
//! the source and event time appended to every field line). Units are ordered by section priority
//! (`serve.render.priority`), related entities newest first inside their section. Under a budget
//! the rendering is the **longest prefix** of that order that fits together with the header, so:
//!
//! - a unit is never cut (no half field, no half order);
//! - if a unit is shown, every unit ranked above it is shown too (a lower-priority section never
//!   displaces a higher one, and an older order is never shown instead of a newer one);
//! - more budget never shows less: the prefix only grows with the budget.
//!
//! The header's first lines name the entity, when it was last updated and exactly what the budget
//! left out; those lines count against the budget. Tokens are counted with the real BPE
//! (`cl100k_base` by default, `o200k_base` on request) on the final text, not estimated; the counts of
//! lines already seen are reused, which gives the same number (`tokens.rs` says why).

mod budget;
mod markdown;
mod tokens;

pub use budget::{
    count, render_markdown, Omission, ProvenanceDetail, RenderError, RenderOptions, Rendered,
};
pub use kontext_core::config::{RenderSection, Tokenizer};
pub(crate) use markdown::staleness_label;
pub use tokens::{clear_token_cache, set_token_cache_enabled};
