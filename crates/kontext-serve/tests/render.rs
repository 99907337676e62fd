//! Markdown rendering under token budgets: the budget rules, golden files, and a property test
//! over random documents. `UPDATE_GOLDEN=1 cargo test -p kontext-serve --test render` rewrites
//! the golden files.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use kontext_serve::render::{
    count, render_markdown, Omission, ProvenanceDetail, RenderError, RenderOptions, RenderSection,
    Tokenizer,
};
use kontext_store::{ContextDocument, RelatedEntity, RelatedList};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn budget(max_tokens: usize) -> RenderOptions {
    RenderOptions {
        max_tokens: Some(max_tokens),
        now_ms: Some(common::T0_MS + 125_000),
        ..RenderOptions::default()
    }
}

fn shown_ids(text: &str, prefix: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("- "))
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.split(' ').next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn without_a_budget_everything_is_shown_and_nothing_reported_omitted() {
    let r = render_markdown(&common::customer(), &RenderOptions::default()).unwrap();
    assert!(r.omitted.is_empty());
    assert!(!r.text.contains("omitted"), "{}", r.text);
    assert_eq!(shown_ids(&r.text, "O-").len(), 5);
    assert!(
        r.text
            .contains("- given_name: Kemal (crm, 2026-11-25T12:00:05Z)"),
        "{}",
        r.text
    );
    assert_eq!(r.tokens, count(Tokenizer::Cl100k, &r.text));
}

#[test]
fn never_exceeds_the_budget_and_counts_the_final_text() {
    let doc = common::customer();
    let min = minimum(&doc, Tokenizer::Cl100k);
    // Every 3rd budget: BPE in a debug build is slow, and steps of 3 still cross every unit.
    for max in (min..=700).step_by(3) {
        for tokenizer in [Tokenizer::Cl100k, Tokenizer::O200k] {
            let Ok(r) = render_markdown(
                &doc,
                &RenderOptions {
                    tokenizer,
                    ..budget(max)
                },
            ) else {
                assert_eq!(tokenizer, Tokenizer::O200k);
                continue;
            };
            assert!(r.tokens <= max, "{} > {max}:\n{}", r.tokens, r.text);
            assert_eq!(r.tokens, count(tokenizer, &r.text));
        }
    }
}

#[test]
fn more_budget_never_shows_less() {
    let doc = common::customer();
    let mut previous: Option<Vec<String>> = None;
    for max in (minimum(&doc, Tokenizer::Cl100k)..=700).step_by(2) {
        let r = render_markdown(&doc, &budget(max)).unwrap();
        let body: Vec<String> = r
            .text
            .lines()
            .filter(|l| l.starts_with("- ") || l.starts_with("## "))
            // provenance lengthens field lines: compare what the line is about
            .map(|l| l.split(" (").next().unwrap_or(l).to_string())
            .collect();
        if let Some(prev) = &previous {
            for line in prev {
                assert!(body.contains(line), "{line:?} gone at {max}:\n{}", r.text);
            }
        }
        previous = Some(body);
    }
}

#[test]
fn lists_keep_their_newest_items() {
    let doc = common::customer();
    let priority = vec![RenderSection::Related("order".into())];
    for max in [70, 90, 110, 130] {
        let r = render_markdown(
            &doc,
            &RenderOptions {
                priority: priority.clone(),
                ..budget(max)
            },
        )
        .unwrap();
        let shown = shown_ids(&r.text, "O-");
        let newest: Vec<String> = doc.related["order"].items[..shown.len()]
            .iter()
            .map(|o| o.entity_id.clone())
            .collect();
        assert_eq!(shown, newest, "at {max}:\n{}", r.text);
    }
}

#[test]
fn header_says_exactly_what_was_left_out() {
    let doc = common::customer();
    let r = render_markdown(&doc, &budget(150)).unwrap();
    let line = r
        .text
        .lines()
        .find(|l| l.starts_with("omitted to fit 150 tokens: "))
        .unwrap_or_else(|| panic!("no omissions line:\n{}", r.text));
    assert!(
        r.text.lines().position(|l| l == line) <= Some(2),
        "{}",
        r.text
    );
    for o in &r.omitted {
        let shown = o.available - o.omitted;
        match &o.section {
            RenderSection::Related(t) => {
                let prefix = &doc.related[t].items[0].entity_id[..2];
                assert_eq!(shown_ids(&r.text, prefix).len(), shown, "{t}:\n{}", r.text);
            }
            RenderSection::Provenance => assert!(line.ends_with("field provenance"), "{line}"),
            _ => {}
        }
    }
    assert!(r.omitted.contains(&Omission {
        section: RenderSection::Related("ticket".into()),
        omitted: 3,
        available: 3
    }));
    assert!(line.contains("3 tickets"), "{line}");
    // A list dropped whole takes its heading ("N in all") with it: the header counts what the
    // entity has (`total`), not the newest `related_limit` the document loaded, or a model
    // reading "5 orders" would conclude there are five.
    assert_eq!(doc.related["order"].total, 12);
    assert_eq!(doc.related["interaction"].total, 8);
    assert!(!r.text.contains("## orders"), "{}", r.text);
    assert!(line.contains("12 orders"), "{line}");
    assert!(line.contains("8 interactions"), "{line}");
    // A list cut short counts against the same total: 1 of the 12 orders shown is "11 of 12",
    // not "4 of 5" (the five the document loaded), beside a heading saying "12 in all".
    let r = render_markdown(&doc, &budget(400)).unwrap();
    assert!(
        r.text.contains("## orders (newest first, 12 in all)"),
        "{}",
        r.text
    );
    assert_eq!(shown_ids(&r.text, "O-").len(), 1, "{}", r.text);
    assert!(r.text.contains("11 of 12 orders"), "{}", r.text);
}

/// A value cannot start a line of its own: line breaks of every kind a reader may honour
/// are escaped.
#[test]
fn values_cannot_break_a_line() {
    let mut doc = common::customer();
    doc.fields.insert(
        "email".into(),
        Value::from("x\u{2028}## forged\u{2029}- fake: 1\u{85}\u{b}\u{c}\r\nend"),
    );
    let r = render_markdown(&doc, &budget(10_000)).unwrap();
    let line = r.text.lines().find(|l| l.starts_with("- email: ")).unwrap();
    assert!(
        line.starts_with(
            "- email: x\\u{2028}## forged\\u{2029}- fake: 1\\u{0085}\\u{000B}\\u{000C}\\r\\nend"
        ),
        "{line}"
    );
}

#[test]
fn priority_decides_which_section_survives() {
    let doc = common::customer();
    let tickets_first = RenderOptions {
        priority: vec![
            RenderSection::Related("ticket".into()),
            RenderSection::Fields,
        ],
        ..budget(200)
    };
    let r = render_markdown(&doc, &tickets_first).unwrap();
    assert_eq!(shown_ids(&r.text, "T-").len(), 3, "{}", r.text);
    let default = render_markdown(&doc, &budget(200)).unwrap();
    assert!(
        shown_ids(&default.text, "T-").is_empty(),
        "{}",
        default.text
    );
    assert!(
        default.text.contains("- given_name: Kemal"),
        "{}",
        default.text
    );
}

#[test]
fn a_budget_below_the_header_is_an_error_naming_the_minimum() {
    let doc = common::customer();
    let min = minimum(&doc, Tokenizer::Cl100k);
    let err = render_markdown(&doc, &budget(min - 1)).unwrap_err();
    assert_eq!(
        err,
        RenderError::BudgetTooSmall {
            max_tokens: min - 1,
            minimum: min,
            tokenizer: "cl100k"
        }
    );
    assert!(err.to_string().contains(&format!("at least {min} tokens")));
    let r = render_markdown(&doc, &budget(min)).unwrap();
    assert!(r.text.starts_with("# customer C-10042\n"), "{}", r.text);
}

#[test]
fn full_provenance_names_the_log_coordinates() {
    let r = render_markdown(
        &common::customer(),
        &RenderOptions {
            provenance: ProvenanceDetail::Full,
            ..RenderOptions::default()
        },
    )
    .unwrap();
    assert!(
        r.text.contains("- given_name: Kemal (crm, 2026-11-25T12:00:05.000Z, event crm-5 crm.updated, context.customers/3@5)"),
        "{}",
        r.text
    );
}

/// The smallest budget that renders: found by trying, as a caller would.
fn minimum(doc: &ContextDocument, tokenizer: Tokenizer) -> usize {
    match render_markdown(
        doc,
        &RenderOptions {
            tokenizer,
            ..budget(1)
        },
    ) {
        Err(RenderError::BudgetTooSmall { minimum, .. }) => minimum,
        Ok(r) => panic!("1 token fit:\n{}", r.text),
    }
}

// ---- golden files ----

#[test]
fn golden_customer_at_several_budgets() {
    let doc = common::customer();
    let full = render_markdown(
        &doc,
        &RenderOptions {
            now_ms: Some(common::T0_MS + 125_000),
            ..RenderOptions::default()
        },
    )
    .unwrap();
    common::golden("customer_unbounded.md", &full.text);
    for max in [4000, 400, 150, 80] {
        let r = render_markdown(&doc, &budget(max)).unwrap();
        assert!(r.tokens <= max);
        common::golden(&format!("customer_{max}.md"), &r.text);
    }
}

#[test]
fn golden_order_with_its_customer() {
    let doc = common::order();
    for max in [400, 80] {
        let r = render_markdown(&doc, &budget(max)).unwrap();
        common::golden(&format!("order_{max}.md"), &r.text);
    }
}

// ---- random documents ----

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[a-zA-Z0-9 ,.!?\\n#<|>-]{0,40}".prop_map(Value::from),
        any::<i32>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
    ]
}

fn fields() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map("[a-z_]{1,12}", value(), 0..8).prop_map(|m| m.into_iter().collect())
}

fn related() -> impl Strategy<Value = Arc<RelatedEntity>> {
    ("[A-Z]-[0-9]{1,6}", fields()).prop_map(|(id, fields)| {
        let provenance = fields
            .keys()
            .map(|k| (k.clone(), common::prov("shop", "t", 1, common::T0_MS)))
            .collect();
        Arc::new(RelatedEntity {
            entity_id: id,
            fields,
            provenance,
        })
    })
}

fn document() -> impl Strategy<Value = ContextDocument> {
    (
        fields(),
        prop::collection::btree_map(
            "(order|ticket|activity)",
            prop::collection::vec(related(), 0..12),
            0..3,
        ),
        prop::option::of(related()),
    )
        .prop_map(|(fields, lists, parent)| {
            let mut doc = common::customer();
            doc.provenance = fields
                .keys()
                .map(|k| (k.clone(), common::prov("crm", "t", 2, common::T0_MS)))
                .collect();
            doc.fields = fields;
            doc.related = lists
                .into_iter()
                .map(|(t, items)| {
                    let total = items.len() + 3;
                    (t, RelatedList { total, items })
                })
                .collect();
            doc.belongs_to = parent
                .map(|p| ("account".to_string(), p))
                .into_iter()
                .collect::<BTreeMap<_, _>>();
            doc
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_documents_never_exceed_the_budget(doc in document(), max in 1usize..600, o200k in any::<bool>()) {
        let tokenizer = if o200k { Tokenizer::O200k } else { Tokenizer::Cl100k };
        let options = RenderOptions { tokenizer, ..budget(max) };
        match render_markdown(&doc, &options) {
            Ok(r) => {
                prop_assert!(r.tokens <= max, "{} > {}:\n{}", r.tokens, max, r.text);
                prop_assert_eq!(r.tokens, count(tokenizer, &r.text));
                // More budget shows at least the same units.
                let more = render_markdown(&doc, &RenderOptions { max_tokens: Some(max + 37), ..options.clone() });
                let more = more.map_err(|e| TestCaseError::fail(e.to_string()))?;
                for (before, after) in omitted_by_section(&r.omitted, &doc).iter().zip(omitted_by_section(&more.omitted, &doc)) {
                    prop_assert!(after <= *before);
                }
            }
            Err(RenderError::BudgetTooSmall { minimum, .. }) => {
                prop_assert!(minimum > max);
                let r = render_markdown(&doc, &RenderOptions { max_tokens: Some(minimum), ..options.clone() });
                prop_assert!(r.is_ok());
            }
        }
    }
}

/// Omitted units per section in a fixed section order, so two renderings compare.
fn omitted_by_section(omitted: &[Omission], doc: &ContextDocument) -> Vec<usize> {
    let sections = std::iter::once(RenderSection::Fields)
        .chain(std::iter::once(RenderSection::Provenance))
        .chain(doc.belongs_to.keys().cloned().map(RenderSection::BelongsTo))
        .chain(doc.related.keys().cloned().map(RenderSection::Related));
    sections
        .map(|s| {
            omitted
                .iter()
                .find(|o| o.section == s)
                .map_or(0, |o| o.omitted)
        })
        .collect()
}
