//! Markdown rendering of a realistic customer context (9 fields, 5 orders, 3 tickets,
//! 5 interactions, as the quickstart assembles one) at a 500-token budget, and unbounded.
//!
//! `cold`: the process-wide cache of line token counts is emptied before every render, so every
//! line goes through the BPE (a document rendered for the first time). `warm`: the same document
//! again, its lines' counts cached (a hot entity asked for repeatedly; only changed lines and
//! the staleness line are counted). `uncached`: the cache switched off, every count runs the BPE
//! over its whole text, as renders did before the cache (the same counts on the same texts).
//!
//! `cargo bench -p kontext-serve --bench render`

#[path = "../../../bench/allocator.rs"]
mod allocator;

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use kontext_serve::render::{
    clear_token_cache, render_markdown, set_token_cache_enabled, RenderOptions, Tokenizer,
};

fn render(c: &mut Criterion) {
    let doc = common::customer();
    let mut group = c.benchmark_group("render_markdown");
    for (name, max_tokens, tokenizer) in [
        ("customer_500_tokens_cl100k", Some(500), Tokenizer::Cl100k),
        ("customer_500_tokens_o200k", Some(500), Tokenizer::O200k),
        ("customer_unbounded_cl100k", None, Tokenizer::Cl100k),
    ] {
        let options = RenderOptions {
            max_tokens,
            tokenizer,
            now_ms: Some(common::T0_MS + 60_000),
            ..RenderOptions::default()
        };
        // Builds the BPE outside the measurement: it happens once per process.
        let _ = render_markdown(&doc, &options);
        set_token_cache_enabled(false);
        group.bench_function(format!("{name}/uncached"), |b| {
            b.iter(|| render_markdown(black_box(&doc), black_box(&options)))
        });
        set_token_cache_enabled(true);
        group.bench_function(format!("{name}/cold"), |b| {
            b.iter_batched(
                clear_token_cache,
                |()| render_markdown(black_box(&doc), black_box(&options)),
                BatchSize::PerIteration,
            )
        });
        group.bench_function(format!("{name}/warm"), |b| {
            b.iter(|| render_markdown(black_box(&doc), black_box(&options)))
        });
    }
    group.finish();
}

criterion_group!(benches, render);
criterion_main!(benches);
