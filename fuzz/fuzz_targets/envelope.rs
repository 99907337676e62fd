//! The CloudEvents envelope decoder on arbitrary records (format: kontext_core::envelope::fuzzing).
#![no_main]

use kontext_core::envelope::{self, fuzzing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let record = fuzzing::record_from_bytes(data);
    match envelope::decode_limited(&record, 64 * 1024) {
        Ok(event) => {
            // The entity id is the key, whole and non-empty.
            assert!(!event.entity_id.is_empty());
            assert_eq!(
                Some(event.entity_id.as_bytes()),
                record.key.as_deref(),
                "entity id differs from the key"
            );
            assert!(!event.id.is_empty());
            let _ = envelope::format_time(event.time_ms);
        }
        Err(e) => {
            assert!(!e.kind().is_empty());
            assert!(!e.is_transient(), "an envelope error is never transient");
            let _ = e.to_string();
        }
    }
});
