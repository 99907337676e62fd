//! The normalize router (decode, route by ce_source, filter, map fields) on arbitrary records.
#![no_main]

use std::sync::OnceLock;

use kontext_core::config::PipelineConfig;
use kontext_core::envelope::fuzzing;
use kontext_stream::{Outcome, Router};
use libfuzzer_sys::fuzz_target;

/// Shared with the stable corpus test in crates/kontext-stream/tests/fuzz_corpus.rs.
const PIPELINE: &str = include_str!("../pipeline.yaml");

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        Router::new(
            &PipelineConfig::parse("fuzz.yaml", PIPELINE).expect("the fuzz pipeline is valid"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let record = fuzzing::record_from_bytes(data);
    match router().process(&record) {
        Outcome::Update(u) => {
            assert_eq!(u.entity_type, "customer");
            assert_eq!(Some(u.entity_id.as_bytes()), record.key.as_deref());
            assert_eq!(u.provenance.offset, record.offset);
            if let kontext_store::Change::Upsert(fields) = &u.change {
                // The key field always carries the entity id.
                assert_eq!(
                    fields.get("customer_id"),
                    Some(&serde_json::Value::String(u.entity_id.clone()))
                );
            }
        }
        Outcome::Filtered { source } => assert_eq!(source, "crm"),
        Outcome::Invalid(e) => {
            assert!(!e.kind().is_empty());
            assert!(!e.is_transient(), "processing errors are permanent");
            let _ = e.to_string();
        }
    }
});
