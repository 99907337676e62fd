//! The markdown layout: which units a document has, what each looks like, and the text of a
//! prefix of them. No budget logic here (that is `budget.rs`).

use std::fmt::Write as _;

use kontext_core::config::{RenderSection, Tokenizer};
use kontext_store::{ContextDocument, ProvenanceView, RelatedEntity};
use serde_json::Value;

use super::tokens::count_cached as count;
use super::{Omission, ProvenanceDetail, RenderOptions};

/// One piece shown whole or not at all: item `item` of section `section` (an index into
/// [`Layout::sections`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unit {
    section: usize,
    item: usize,
}

/// A document with its sections in priority order.
pub(super) struct Layout<'a> {
    doc: &'a ContextDocument,
    options: &'a RenderOptions,
    /// Sections the document has (at least one unit), in priority order.
    sections: Vec<RenderSection>,
    /// The entity's fields in order, for [`Layout::field_line`] by index (a map's `nth` walks
    /// from the start: quadratic in the fields per rendering).
    fields: Vec<(&'a String, &'a Value)>,
}

impl<'a> Layout<'a> {
    pub(super) fn new(doc: &'a ContextDocument, options: &'a RenderOptions) -> Self {
        let mut sections: Vec<RenderSection> = Vec::new();
        let defaults = std::iter::once(RenderSection::Fields)
            .chain(doc.belongs_to.keys().cloned().map(RenderSection::BelongsTo))
            .chain(doc.related.keys().cloned().map(RenderSection::Related))
            .chain(std::iter::once(RenderSection::Provenance));
        for s in options.priority.iter().cloned().chain(defaults) {
            if !sections.contains(&s) {
                sections.push(s);
            }
        }
        let mut layout = Self {
            doc,
            options,
            sections,
            fields: doc.fields.iter().collect(),
        };
        let present: Vec<bool> = layout
            .sections
            .iter()
            .map(|s| layout.section_len(s) > 0)
            .collect();
        let mut keep = present.into_iter();
        layout.sections.retain(|_| keep.next().unwrap_or(false));
        layout
    }

    /// Every unit, in the order a budget keeps them.
    pub(super) fn units(&self) -> Vec<Unit> {
        self.sections
            .iter()
            .enumerate()
            .flat_map(|(section, s)| {
                (0..self.section_len(s)).map(move |item| Unit { section, item })
            })
            .collect()
    }

    /// The header's fixed lines: entity, freshness.
    pub(super) fn title(&self) -> String {
        let doc = self.doc;
        let mut out = format!("# {} {}\n", doc.entity_type, clean(&doc.entity_id));
        let _ = write!(out, "as of {}", compact_time(&doc.as_of.event_time));
        if let Some(ago) = staleness_label(doc, self.options.now_ms) {
            let _ = write!(out, " ({ago})");
        }
        let _ = writeln!(
            out,
            "; {} event{} applied, latest from {}",
            doc.events_applied,
            if doc.events_applied == 1 { "" } else { "s" },
            clean(&doc.as_of.source)
        );
        out
    }

    /// The header line naming what the first `k` units leave out; empty if nothing.
    pub(super) fn omission_lines(&self, units: &[Unit], k: usize, budget: usize) -> String {
        let omitted = self.omissions(units, k);
        if omitted.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = omitted.iter().map(|o| describe(o, self.doc)).collect();
        format!("omitted to fit {budget} tokens: {}\n", parts.join(", "))
    }

    /// Per section, the units past the first `k`.
    pub(super) fn omissions(&self, units: &[Unit], k: usize) -> Vec<Omission> {
        let shown = self.shown(units, k);
        self.sections
            .iter()
            .zip(shown)
            .filter_map(|(s, shown)| {
                let available = self.section_len(s);
                (shown < available).then(|| Omission {
                    section: s.clone(),
                    omitted: available - shown,
                    available,
                })
            })
            .collect()
    }

    /// How many sections the document has.
    pub(super) fn sections_len(&self) -> usize {
        self.sections.len()
    }

    /// Whether provenance is ranked above the fields: then every field shown carries it.
    fn provenance_first(&self) -> bool {
        let at = |s: &RenderSection| self.sections.iter().position(|x| x == s);
        match (at(&RenderSection::Provenance), at(&RenderSection::Fields)) {
            (Some(p), Some(f)) => p < f,
            _ => false,
        }
    }

    /// Tokens `unit` adds to a rendering, its section's heading included for the first item.
    pub(super) fn unit_cost(&self, unit: &Unit, tokenizer: Tokenizer) -> usize {
        let mut text = String::new();
        match &self.sections[unit.section] {
            // Ranked above the fields, provenance is charged to each field shown (below).
            RenderSection::Provenance if self.provenance_first() => return 0,
            RenderSection::Provenance => {
                // Ranked below them, it lengthens every field line: its cost is the difference.
                let with: usize = (0..self.doc.fields.len())
                    .map(|i| count(tokenizer, &self.field_line(i, true)))
                    .sum();
                let without: usize = (0..self.doc.fields.len())
                    .map(|i| count(tokenizer, &self.field_line(i, false)))
                    .sum();
                return with.saturating_sub(without);
            }
            RenderSection::Fields => {
                if unit.item == 0 {
                    text.push_str(&self.heading(&self.sections[unit.section]));
                }
                text.push_str(&self.field_line(unit.item, self.provenance_first()));
            }
            s @ RenderSection::BelongsTo(_) => {
                text.push_str(&self.heading(s));
            }
            s @ RenderSection::Related(t) => {
                if unit.item == 0 {
                    text.push_str(&self.heading(s));
                }
                if let Some(item) = self.doc.related.get(t).and_then(|l| l.items.get(unit.item)) {
                    text.push_str(&self.related_line(item));
                }
            }
        }
        count(tokenizer, &text)
    }

    /// The markdown of the first `k` units, header included.
    pub(super) fn render(&self, units: &[Unit], k: usize) -> String {
        let mut out = self.title();
        if let Some(budget) = self.options.max_tokens {
            out.push_str(&self.omission_lines(units, k, budget));
        }
        let shown = self.shown(units, k);
        let with_provenance = self
            .sections
            .iter()
            .zip(&shown)
            .any(|(s, n)| *s == RenderSection::Provenance && *n > 0);
        for (s, &n) in self.sections.iter().zip(&shown) {
            if n == 0 {
                continue;
            }
            match s {
                RenderSection::Provenance => {}
                RenderSection::Fields => {
                    out.push_str(&self.heading(s));
                    for i in 0..n {
                        out.push_str(&self.field_line(i, with_provenance));
                    }
                }
                RenderSection::BelongsTo(_) => out.push_str(&self.heading(s)),
                RenderSection::Related(t) => {
                    out.push_str(&self.heading(s));
                    if let Some(list) = self.doc.related.get(t) {
                        for item in list.items.iter().take(n) {
                            out.push_str(&self.related_line(item));
                        }
                    }
                }
            }
        }
        out
    }

    fn section_len(&self, s: &RenderSection) -> usize {
        let doc = self.doc;
        match s {
            RenderSection::Fields => doc.fields.len(),
            RenderSection::Provenance => {
                usize::from(doc.fields.keys().any(|k| doc.provenance.contains_key(k)))
            }
            RenderSection::BelongsTo(t) => usize::from(doc.belongs_to.contains_key(t)),
            RenderSection::Related(t) => doc.related.get(t).map_or(0, |l| l.items.len()),
        }
    }

    /// Units of each section among the first `k`; sections are contiguous in `units`.
    fn shown(&self, units: &[Unit], k: usize) -> Vec<usize> {
        let mut shown = vec![0; self.sections.len()];
        for u in &units[..k.min(units.len())] {
            shown[u.section] += 1;
        }
        shown
    }

    /// A section's heading, with the blank line before it. For a parent, the whole block.
    fn heading(&self, s: &RenderSection) -> String {
        let doc = self.doc;
        match s {
            RenderSection::Fields => "\n## fields\n".into(),
            RenderSection::Provenance => String::new(),
            RenderSection::BelongsTo(t) => {
                let Some(parent) = doc.belongs_to.get(t) else {
                    return String::new();
                };
                let mut out = format!("\n## {t} {} (parent)", clean(&parent.entity_id));
                if let Some(p) = latest(parent) {
                    let _ = write!(
                        out,
                        ", updated {} by {}",
                        compact_time(&p.event_time),
                        clean(&p.source)
                    );
                }
                out.push('\n');
                for (name, value) in &parent.fields {
                    let _ = writeln!(out, "- {}: {}", clean(name), value_text(value));
                }
                out
            }
            RenderSection::Related(t) => {
                let total = doc.related.get(t).map_or(0, |l| l.total);
                format!("\n## {} (newest first, {total} in all)\n", plural(t, 2))
            }
        }
    }

    fn field_line(&self, i: usize, with_provenance: bool) -> String {
        let Some(&(name, value)) = self.fields.get(i) else {
            return String::new();
        };
        let mut line = format!("- {}: {}", clean(name), value_text(value));
        if with_provenance {
            if let Some(p) = self.doc.provenance.get(name) {
                let _ = write!(line, " ({})", provenance_text(p, self.options.provenance));
            }
        }
        line.push('\n');
        line
    }

    /// `- O-1 (2026-11-25T12:00:07Z, shop): status: shipped; total: 129.9`. Fields holding this
    /// entity's id (the child's pointer back to it) or the item's own id (`order_id`) are left
    /// out: the line says so already, and every token counts.
    fn related_line(&self, item: &RelatedEntity) -> String {
        let mut line = format!("- {}", clean(&item.entity_id));
        if let Some(p) = latest(item) {
            let _ = write!(
                line,
                " ({}, {})",
                compact_time(&p.event_time),
                clean(&p.source)
            );
        }
        let parts: Vec<String> = item
            .fields
            .iter()
            .filter(|(_, v)| {
                let v = v.as_str();
                v != Some(self.doc.entity_id.as_str()) && v != Some(item.entity_id.as_str())
            })
            .map(|(k, v)| format!("{}: {}", clean(k), value_text(v)))
            .collect();
        if !parts.is_empty() {
            let _ = write!(line, ": {}", parts.join("; "));
        }
        line.push('\n');
        line
    }
}

/// How an omission reads in the header: `3 of 8 fields`, `116 of 118 tickets`, `12 orders`,
/// `field provenance`. Related entities are counted by how many the entity has, not by how
/// many of them the document loaded (its newest `related_limit`): a list left out whole is
/// `12 orders`, one cut short says how many of them all are not shown.
fn describe(o: &Omission, doc: &ContextDocument) -> String {
    let (one, many) = match &o.section {
        RenderSection::Provenance => return "field provenance".into(),
        RenderSection::BelongsTo(t) => return format!("parent {t}"),
        RenderSection::Fields => ("field".to_string(), "fields".to_string()),
        RenderSection::Related(t) => (t.clone(), plural(t, 2)),
    };
    let all = match &o.section {
        RenderSection::Related(t) => doc.related.get(t).map_or(0, |list| list.total),
        _ => 0,
    }
    .max(o.available);
    let shown = o.available - o.omitted;
    let noun = if all == 1 { one } else { many };
    if shown == 0 {
        format!("{all} {noun}")
    } else {
        format!("{} of {all} {noun}", all - shown)
    }
}

/// English plural of an entity type name, good enough for `order`, `ticket`, `activity`, `box`.
fn plural(t: &str, n: usize) -> String {
    if n == 1 {
        t.to_string()
    } else if let Some(stem) = t
        .strip_suffix('y')
        .filter(|s| !s.ends_with(['a', 'e', 'i', 'o', 'u']))
    {
        format!("{stem}ies")
    } else if t.ends_with(['s', 'x', 'z']) || t.ends_with("ch") || t.ends_with("sh") {
        format!("{t}es")
    } else {
        format!("{t}s")
    }
}

fn provenance_text(p: &ProvenanceView, detail: ProvenanceDetail) -> String {
    match detail {
        ProvenanceDetail::Compact => {
            format!("{}, {}", clean(&p.source), compact_time(&p.event_time))
        }
        ProvenanceDetail::Full => {
            let mut s = format!(
                "{}, {}, event {}",
                clean(&p.source),
                p.event_time,
                clean(&p.event_id)
            );
            if let Some(t) = &p.event_type {
                let _ = write!(s, " {}", clean(t));
            }
            let _ = write!(s, ", {}/{}@{}", clean(&p.topic), p.partition, p.offset);
            s
        }
    }
}

/// The provenance of an entity's most recently changed field.
fn latest(e: &RelatedEntity) -> Option<&ProvenanceView> {
    // RFC 3339 times in one format (UTC, milliseconds) order as strings.
    e.provenance
        .values()
        .map(|p| &**p)
        .max_by(|a, b| a.event_time.cmp(&b.event_time))
}

/// Strings as they are, anything else as JSON; line breaks escaped so a value cannot break the
/// list structure (or forge a heading) of the markdown: CommonMark's (`\n`, `\r`) and those
/// other readers and models take for one (U+2028, U+2029, U+0085, vertical tab, form feed).
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => clean(s),
        other => clean(&other.to_string()),
    }
}

fn clean(s: &str) -> String {
    const BREAKS: [char; 7] = [
        '\n', '\r', '\u{2028}', '\u{2029}', '\u{0085}', '\u{000B}', '\u{000C}',
    ];
    if !s.contains(BREAKS) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if BREAKS.contains(&c) => {
                let _ = write!(out, "\\u{{{:04X}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// `2026-11-25T12:00:07.053Z` -> `2026-11-25T12:00:07Z`: milliseconds cost tokens and tell a
/// model nothing.
fn compact_time(t: &str) -> String {
    match (t.find('.'), t.strip_suffix('Z')) {
        (Some(dot), Some(_)) => format!("{}Z", &t[..dot]),
        _ => t.to_string(),
    }
}

/// The staleness the header shows at `now_ms` (`None`: none). It is all of a rendering that
/// depends on the time: a rendering kept with its label is exact while the label is the same.
pub(crate) fn staleness_label(doc: &ContextDocument, now_ms: Option<i64>) -> Option<String> {
    now_ms.map(|now| ago(now - doc.as_of_ms))
}

/// `812 ms` -> `just now`, `95 s` -> `1 min ago` ...: staleness a model can read.
fn ago(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        i64::MIN..=0 => "just now".into(),
        1..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_of_entity_types() {
        assert_eq!(plural("order", 2), "orders");
        assert_eq!(plural("activity", 2), "activities");
        assert_eq!(plural("day", 2), "days");
        assert_eq!(plural("box", 2), "boxes");
        assert_eq!(plural("order", 1), "order");
    }

    #[test]
    fn times_drop_milliseconds_and_staleness_reads_as_words() {
        assert_eq!(
            compact_time("2026-11-25T12:00:07.053Z"),
            "2026-11-25T12:00:07Z"
        );
        assert_eq!(compact_time("yesterday"), "yesterday");
        assert_eq!(ago(-5), "just now");
        assert_eq!(ago(812), "just now");
        assert_eq!(ago(42_000), "42 s ago");
        assert_eq!(ago(3 * 3_600_000 + 5), "3 h ago");
    }

    #[test]
    fn values_cannot_break_the_markdown() {
        assert_eq!(value_text(&Value::from("a\n## b")), "a\\n## b");
        assert_eq!(value_text(&serde_json::json!(12.5)), "12.5");
        assert_eq!(value_text(&serde_json::json!({"a": 1})), "{\"a\":1}");
    }
}
