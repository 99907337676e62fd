//! The budget: the longest prefix of units (in priority order) whose rendering fits.

use kontext_core::config::{RenderSection, Tokenizer};
use kontext_store::ContextDocument;

use super::markdown::{Layout, Unit};
use super::tokens::count_cached;

/// How to render one document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// Token budget of the whole text, header included; `None` renders everything.
    pub max_tokens: Option<usize>,
    /// The BPE tokens are counted with.
    pub tokenizer: Tokenizer,
    /// Sections in the order a budget keeps them (`fields`, `belongs_to.customer`,
    /// `related.order`, `provenance`); sections the document has but this list does not name
    /// follow in the default order: fields, parents, related types by name, provenance.
    pub priority: Vec<RenderSection>,
    /// How much of each field's provenance to show.
    pub provenance: ProvenanceDetail,
    /// The current time in milliseconds, for the staleness in the header; `None` leaves it out
    /// (golden files need a fixed text).
    pub now_ms: Option<i64>,
}

/// How much provenance a field line carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProvenanceDetail {
    /// Source and event time: enough for a model to weigh a value.
    #[default]
    Compact,
    /// Also the event id and type and the log coordinates (topic/partition@offset).
    Full,
}

/// A rendering and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The markdown.
    pub text: String,
    /// Tokens of `text` with the requested tokenizer.
    pub tokens: usize,
    /// What the budget left out, by section, in priority order; empty when everything fit.
    pub omitted: Vec<Omission>,
}

/// Units of one section the budget left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Omission {
    pub section: RenderSection,
    /// How many units of the section were left out ...
    pub omitted: usize,
    /// ... of how many the document had.
    pub available: usize,
}

/// Why a document could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// Not even the header (entity, freshness, the list of omissions) fits.
    #[error("max_tokens {max_tokens} cannot fit even the header of this context: it needs at least {minimum} tokens ({tokenizer})")]
    BudgetTooSmall {
        max_tokens: usize,
        minimum: usize,
        tokenizer: &'static str,
    },
}

/// Renders `doc` as markdown for a prompt, within `options.max_tokens` if set.
pub fn render_markdown(
    doc: &ContextDocument,
    options: &RenderOptions,
) -> Result<Rendered, RenderError> {
    let layout = Layout::new(doc, options);
    let units = layout.units();
    let n = units.len();
    let Some(budget) = options.max_tokens else {
        return Ok(finish(&layout, &units, n, options.tokenizer));
    };

    // Estimate each unit's cost on its own: the sum is close to the count of the joined text
    // (a section's blank line can merge with the line before it), and the final text is counted
    // exactly below and the prefix shortened if the estimate was low. Every count goes through
    // the line cache (`tokens.rs`), so each distinct line is run through the BPE once.
    let base = count_cached(options.tokenizer, &layout.title());
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0usize);
    for unit in &units {
        let c = layout.unit_cost(unit, options.tokenizer);
        prefix.push(prefix[prefix.len() - 1] + c);
    }
    let estimate = |k: usize| {
        base + prefix[k]
            + count_cached(options.tokenizer, &layout.omission_lines(&units, k, budget))
    };
    // The largest prefix that fits, by its real count. Not a binary search: the omissions line
    // shrinks as the prefix grows, so "fits" is not monotone in k. The estimate overcounts only
    // where each section's heading starts: its blank line, counted alone as "\n", merges with
    // the end of the line before it in the text ("\n\n", one token less; two allowed for
    // lines ending in spaces or punctuation). So the prefixes whose estimate is within that
    // slack are counted for real, longest first. Any that were missed would only show less:
    // every answer is counted exactly, and more budget still never shows less (the candidates
    // and the fitting prefixes both grow with it).
    let slack = 2 * layout.sections_len();
    let estimates: Vec<usize> = (0..=n).map(estimate).collect();
    for k in (0..=n).rev().filter(|&k| estimates[k] <= budget + slack) {
        let rendered = finish(&layout, &units, k, options.tokenizer);
        if rendered.tokens <= budget {
            return Ok(rendered);
        }
    }
    // Nothing fits. The minimum to name is the shortest rendering of any prefix (not always the
    // header alone: the omissions line it carries can outweigh a small unit). A prefix whose
    // estimate exceeds the lowest estimate by more than the slack counts more than that one
    // does, so only the others are rendered: a request with `max_tokens=1` must not render
    // every prefix of a large document.
    let lowest = estimates.iter().copied().min().unwrap_or(base);
    let minimum = (0..=n)
        .filter(|&k| estimates[k] <= lowest + slack)
        .map(|k| finish(&layout, &units, k, options.tokenizer).tokens)
        .min()
        .unwrap_or(base);
    Err(RenderError::BudgetTooSmall {
        max_tokens: budget,
        minimum,
        tokenizer: options.tokenizer.name(),
    })
}

/// Tokens of `text` with `tokenizer`, counted directly (renders count through a cache of line
/// counts that gives the same numbers). The BPE tables are built once per process, on first use
/// (tens of milliseconds), from data compiled into the binary.
pub fn count(tokenizer: Tokenizer, text: &str) -> usize {
    // `count_ordinary`: field values are data, so "<|endoftext|>" in a value is text, not a
    // special token.
    match tokenizer {
        Tokenizer::Cl100k => tiktoken_rs::cl100k_base_singleton().count_ordinary(text),
        Tokenizer::O200k => tiktoken_rs::o200k_base_singleton().count_ordinary(text),
    }
}

fn finish(layout: &Layout<'_>, units: &[Unit], k: usize, tokenizer: Tokenizer) -> Rendered {
    let text = layout.render(units, k);
    Rendered {
        // Exact: chunk counts add up to the count of the text (proof in `tokens.rs`).
        tokens: count_cached(tokenizer, &text),
        omitted: layout.omissions(units, k),
        text,
    }
}

/// The render tests' fixed documents.
#[cfg(test)]
#[path = "../../tests/common/mod.rs"]
mod common;

#[cfg(test)]
mod tests {
    use super::common;
    use super::*;

    /// The rendering under a budget is "the longest prefix of that order that fits, header
    /// included" (ARCHITECTURE.md, `render/mod.rs`): checked against every prefix's real count.
    fn assert_longest_prefix_fits(doc: &ContextDocument, priority: &[RenderSection]) {
        // Every other budget (a debug build runs the BPE slowly); odd ones cross the boundaries
        // these documents had wrong (61, 77).
        for max in (41..=421).step_by(2) {
            let options = RenderOptions {
                max_tokens: Some(max),
                priority: priority.to_vec(),
                now_ms: Some(common::T0_MS + 125_000),
                ..RenderOptions::default()
            };
            let layout = Layout::new(doc, &options);
            let units = layout.units();
            let longest = (0..=units.len())
                .rev()
                .find(|&k| count(options.tokenizer, &layout.render(&units, k)) <= max);
            match (render_markdown(doc, &options), longest) {
                (Ok(r), Some(k)) => assert_eq!(
                    r.text,
                    layout.render(&units, k),
                    "{priority:?} at {max}: shown {} tokens, the longest prefix that fits has {k} units",
                    r.tokens
                ),
                (Err(_), None) => {}
                (got, want) => panic!("{priority:?} at {max}: {got:?}, longest fitting prefix {want:?}"),
            }
        }
    }

    #[test]
    fn the_default_order_renders_the_longest_prefix_that_fits() {
        assert_longest_prefix_fits(&common::customer(), &[]);
        assert_longest_prefix_fits(&common::order(), &[]);
    }

    /// With provenance ranked above the fields, the provenance unit is estimated as if every
    /// field were shown (its cost is summed over all of them) and each field without it; a
    /// budget that fits the first fields with their provenance shows none of them.
    #[test]
    fn provenance_ranked_first_renders_the_longest_prefix_that_fits() {
        let priority = [RenderSection::Provenance, RenderSection::Fields];
        assert_longest_prefix_fits(&common::customer(), &priority);
        assert_longest_prefix_fits(&common::order(), &priority);
    }
}
