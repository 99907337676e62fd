//! Runs every input of the fuzz corpus (`fuzz/corpus/`, kept by `cargo fuzz`) through the
//! envelope decoder and the router on stable Rust, with the fuzz targets' checks, so that CI
//! exercises the corpus and every past finding without nightly.

use std::path::{Path, PathBuf};

use kontext_core::config::PipelineConfig;
use kontext_core::envelope::{self, fuzzing};
use kontext_store::Change;
use kontext_stream::{Outcome, Router};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn the_envelope_corpus_decodes_without_panics_and_keeps_its_invariants() {
    let files = corpus("envelope");
    assert!(
        files.len() >= 10,
        "the corpus is missing: {} files",
        files.len()
    );
    let (mut ok, mut rejected) = (0, 0);
    for file in files {
        let record = fuzzing::record_from_bytes(&std::fs::read(&file).unwrap());
        match envelope::decode_limited(&record, 64 * 1024) {
            Ok(event) => {
                ok += 1;
                assert!(!event.entity_id.is_empty(), "{}", file.display());
                assert_eq!(
                    Some(event.entity_id.as_bytes()),
                    record.key.as_deref(),
                    "{}",
                    file.display()
                );
                let _ = envelope::format_time(event.time_ms);
            }
            Err(e) => {
                rejected += 1;
                assert!(!e.is_transient(), "{}: {e}", file.display());
                assert!(!e.kind().is_empty());
            }
        }
    }
    // The corpus covers both sides.
    assert!(ok > 0 && rejected > 0, "{ok} decoded, {rejected} rejected");
}

#[test]
fn the_router_corpus_routes_without_panics_and_keeps_its_invariants() {
    let config = PipelineConfig::parse(
        "fuzz/pipeline.yaml",
        include_str!("../../../fuzz/pipeline.yaml"),
    )
    .unwrap();
    let router = Router::new(&config);
    let files = corpus("router");
    assert!(
        files.len() >= 10,
        "the corpus is missing: {} files",
        files.len()
    );
    let mut outcomes = [0usize; 3];
    for file in files {
        let record = fuzzing::record_from_bytes(&std::fs::read(&file).unwrap());
        match router.process(&record) {
            Outcome::Update(u) => {
                outcomes[0] += 1;
                assert_eq!(Some(u.entity_id.as_bytes()), record.key.as_deref());
                if let Change::Upsert(fields) = &u.change {
                    assert_eq!(
                        fields.get("customer_id"),
                        Some(&serde_json::Value::String(u.entity_id.clone())),
                        "{}",
                        file.display()
                    );
                }
            }
            Outcome::Filtered { .. } => outcomes[1] += 1,
            Outcome::Invalid(e) => {
                outcomes[2] += 1;
                assert!(!e.kind().is_empty());
                assert!(!e.is_transient(), "{}: {e}", file.display());
            }
        }
    }
    assert!(
        outcomes.iter().all(|n| *n > 0),
        "updates, filtered, invalid: {outcomes:?}"
    );
}
