//! The global allocator of the `kontext` binary (`crates/kontext-cli/src/main.rs`), included by
//! every benchmark with `#[path]` so that a benchmark measures the allocator that ships.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
