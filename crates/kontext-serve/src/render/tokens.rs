//! Exact token counts of rendered markdown, each distinct line counted once while its count
//! stays in the cache.
//!
//! Counting with the real BPE is the cost of rendering (tiktoken-rs runs a backtracking regex
//! over the text, then merges byte pairs per piece): a budgeted render used to count every line
//! about three times. Here a text is cut into *chunks* at line starts, each chunk's count is
//! looked up in a process-wide cache, and the counts are added. That sum is **exact**, not an
//! estimate, for the cuts [`chunks`] makes:
//!
//! tiktoken encodes a text by splitting it with its pre-tokenizer regex into pieces and encoding
//! every piece on its own; the count is the sum over pieces. So the sum over chunks is exact if
//! the pieces of the whole text are the pieces of its chunks, one chunk after the other. We cut
//! at a position `p` only where `text[p-1] == '\n'` and `text[p]` is neither whitespace nor `/`.
//! With the patterns of cl100k_base and o200k_base (see tiktoken-rs' `openai_public.rs`):
//!
//! 1. *No piece of the whole text spans `p`.* Such a piece would contain `"\n"` followed by a
//!    non-space. The letter alternatives (`[^\r\n\p{L}\p{N}]?\p{L}+` and o200k's cased variants)
//!    cannot contain a line break; contractions and `\p{N}{1,3}` neither; the punctuation
//!    alternative ` ?[^\s\p{L}\p{N}]+[\r\n]*` (o200k: `[\r\n/]*`) has line breaks only at its
//!    end, followed by nothing but more breaks (or `/`, which is why `/` is excluded); the
//!    whitespace alternatives match only whitespace.
//! 2. *Pieces before `p` are the same as in the chunk alone.* The patterns have no look-behind.
//!    A match attempt that reaches `p` sees a non-space, non-`/` character there instead of the
//!    end of the text; every greedy or possessive run (`\s*`, `\s+`, `[\r\n]*`, `[\r\n/]*`,
//!    `\p{L}+`) stops at `p` either way. What differs is `\s++$` (cl100k) and `\s+(?!\S)`: they
//!    can only reach `p` from inside the whitespace run that ends with the `"\n"` at `p-1`, and
//!    from there the whole text matches `\s*[\r\n]` (cl100k) / `\s*[\r\n]+` (o200k) up to `p`:
//!    the same piece the chunk alone gives with `\s++$`, resp. the same alternative.
//! 3. *Pieces from `p` on are those of the rest alone*, as matching restarts at `p` (1) and
//!    nothing looks behind.
//!
//! `chunked_counts_equal_whole_counts` checks this on random line-structured texts with both
//! BPEs, and every render test compares the reported count with a direct count of the text.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use kontext_core::config::Tokenizer;

/// Chunks longer than this are counted every time rather than kept (a huge field value should
/// not stay in memory because it was rendered once).
const MAX_CACHED_CHUNK: usize = 1024;
/// Text kept per tokenizer. The cache evicts the chunks used least (quick_cache's S3-FIFO), so
/// the lines a rendering shares with the one before stay while new lines (ingest changes
/// documents all the time) come and go.
const MAX_CACHED_BYTES: u64 = 8 << 20;
/// Bytes counted per kept chunk besides its text. The entry, the table slot and the allocator
/// take more (about 60), so a full cache holds 10–12 MiB per tokenizer.
const CHUNK_OVERHEAD: u64 = 32;

/// Tokens of `text` with `tokenizer`, exactly as [`super::count`] counts them, reusing the
/// counts of lines seen before.
pub(super) fn count_cached(tokenizer: Tokenizer, text: &str) -> usize {
    if !ENABLED.load(Ordering::Relaxed) {
        return super::count(tokenizer, text);
    }
    match tokenizer {
        Tokenizer::Cl100k => CL100K.count(text),
        Tokenizer::O200k => O200K.count(text),
    }
}

/// Forgets every cached count, so the next renders count from scratch (benchmarks measure
/// both cases).
#[doc(hidden)]
pub fn clear_token_cache() {
    CL100K.cache.clear();
    O200K.cache.clear();
}

/// Turns the cache off (every count runs the BPE over the whole text, as renders did before
/// the cache) or back on: for benchmarks that compare the two in one run.
#[doc(hidden)]
pub fn set_token_cache_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// `text` cut at every line start that is not whitespace or `/` (see the module doc for why the
/// counts of these chunks add up to the count of the text).
pub(super) fn chunks(text: &str) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut i = 0;
    std::iter::from_fn(move || {
        if start >= bytes.len() {
            return None;
        }
        // Searches from start + 1: a chunk is never empty.
        i = i.max(start + 1);
        while i < bytes.len() {
            if bytes[i - 1] == b'\n' && cuttable(bytes[i]) {
                let chunk = &text[start..i];
                start = i;
                return Some(chunk);
            }
            i += 1;
        }
        let chunk = &text[start..];
        start = bytes.len();
        Some(chunk)
    })
}

/// A line may be cut before `b`: not whitespace (ASCII or the first byte of a multi-byte
/// character, which the check below treats as whitespace to be safe) and not `/`.
fn cuttable(b: u8) -> bool {
    b.is_ascii() && !b.is_ascii_whitespace() && b != b'/' && b != 0x0b
}

/// Token counts of chunks with one tokenizer, shared by every rendering thread. The cache is
/// sharded and evicts a few entries at a time: no rendering waits for another's lookups or for
/// a purge.
struct Counts {
    tokenizer: Tokenizer,
    cache: quick_cache::sync::Cache<Box<str>, u32, ChunkBytes>,
}

#[derive(Clone)]
struct ChunkBytes;

impl quick_cache::Weighter<Box<str>, u32> for ChunkBytes {
    fn weight(&self, chunk: &Box<str>, _: &u32) -> u64 {
        chunk.len() as u64 + CHUNK_OVERHEAD
    }
}

impl Counts {
    /// A cache of about `bytes` of chunks counted with `tokenizer`.
    fn new(tokenizer: Tokenizer, bytes: u64) -> Self {
        Self {
            tokenizer,
            cache: quick_cache::sync::Cache::with_weighter(
                (bytes / (64 + CHUNK_OVERHEAD)) as usize,
                bytes,
                ChunkBytes,
            ),
        }
    }

    /// Tokens of `text`: the sum of its chunks' counts, each looked up or counted (and kept,
    /// unless it is longer than [`MAX_CACHED_CHUNK`]).
    fn count(&self, text: &str) -> usize {
        chunks(text)
            .map(|chunk| match self.cache.get(chunk) {
                Some(n) => n as usize,
                None => {
                    let n = super::count(self.tokenizer, chunk);
                    if chunk.len() <= MAX_CACHED_CHUNK {
                        self.cache
                            .insert(chunk.into(), u32::try_from(n).unwrap_or(u32::MAX));
                    }
                    n
                }
            })
            .sum()
    }
}

static CL100K: LazyLock<Counts> =
    LazyLock::new(|| Counts::new(Tokenizer::Cl100k, MAX_CACHED_BYTES));
static O200K: LazyLock<Counts> = LazyLock::new(|| Counts::new(Tokenizer::O200k, MAX_CACHED_BYTES));

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::render::count;

    #[test]
    fn chunks_start_at_line_starts_that_are_not_space() {
        let text = "# a\nas of x\n\n## fields\n- a: 1\n  indented\n/slash\n- b\n";
        let got: Vec<&str> = chunks(text).collect();
        assert_eq!(
            got,
            [
                "# a\n",
                "as of x\n\n",
                "## fields\n",
                "- a: 1\n  indented\n/slash\n",
                "- b\n"
            ]
        );
        assert_eq!(chunks(text).collect::<String>(), text);
        assert_eq!(chunks("").count(), 0);
        assert_eq!(chunks("\n\nx").collect::<Vec<_>>(), ["\n\n", "x"]);
    }

    #[test]
    fn cached_counts_are_direct_counts() {
        let text = "# customer C-1\nas of 2026-11-25T12:00:07Z\n\n## fields\n- given_name: Kemal (crm, 2026-11-25T12:00:05Z)\n- note: a\\nb\n";
        for t in [Tokenizer::Cl100k, Tokenizer::O200k] {
            assert_eq!(count_cached(t, text), count(t, text));
            // Second time from the cache.
            assert_eq!(count_cached(t, text), count(t, text));
        }
    }

    /// A cache over its size keeps counting exactly, holds about its size, and keeps the
    /// counts of the lines every text shares.
    #[test]
    fn a_full_cache_evicts_some_counts_and_counts_exactly() {
        let shared = "# customer C-1\n## fields\n";
        for t in [Tokenizer::Cl100k, Tokenizer::O200k] {
            let counts = Counts::new(t, 4096);
            for i in 0..500 {
                let text = format!("{shared}- order O-{i}: placed at 12:{:02} (日本)\n", i % 60);
                assert_eq!(counts.count(&text), count(t, &text), "{t:?} {text}");
            }
            assert!(counts.cache.weight() <= 4096, "{}", counts.cache.weight());
            assert!(
                counts.cache.len() < 500,
                "nothing was evicted: {}",
                counts.cache.len()
            );
            for chunk in chunks(shared) {
                assert!(
                    counts.cache.get(chunk).is_some(),
                    "{t:?}: {chunk:?} was evicted"
                );
            }
        }
    }

    /// Lines made of what renders contain (and what field values may): words, numbers,
    /// punctuation, spaces, tabs, unicode, slashes, blank lines, `\r`.
    fn line() -> impl Strategy<Value = String> {
        proptest::string::string_regex(
            "(- |## |# |/|  |\t|)([a-zA-Z0-9 .,:;()/'_-]|é|日本|\u{a0}|\r|\\\\n|'s|'LL){0,30}",
        )
        .expect("valid regex")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn chunked_counts_equal_whole_counts(lines in proptest::collection::vec(line(), 1..12), blank in proptest::collection::vec(0usize..3, 12)) {
            let mut text = String::new();
            for (l, b) in lines.iter().zip(&blank) {
                text.push_str(l);
                for _ in 0..=*b {
                    text.push('\n');
                }
            }
            for t in [Tokenizer::Cl100k, Tokenizer::O200k] {
                let by_chunks: usize = chunks(&text).map(|c| count(t, c)).sum();
                prop_assert_eq!(by_chunks, count(t, &text), "{:?} {:?}", t, text);
            }
        }
    }
}
