use bytes::Bytes;

use super::*;
use crate::record::Header;

fn record(key: Option<&[u8]>, value: Option<&[u8]>, headers: &[(&str, &str)]) -> Record {
    Record {
        topic: "context.customers".into(),
        partition: 3,
        offset: 42,
        timestamp_ms: 1_700_000_000_000,
        key: key.map(Bytes::copy_from_slice),
        value: value.map(Bytes::copy_from_slice),
        headers: headers
            .iter()
            .map(|(k, v)| Header::new(*k, Bytes::copy_from_slice(v.as_bytes())))
            .collect(),
    }
}

fn binary_headers() -> Vec<(&'static str, &'static str)> {
    vec![
        ("ce_specversion", "1.0"),
        ("ce_id", "evt-1"),
        ("ce_source", "crm"),
        ("ce_type", "crm.customer.updated"),
        ("ce_time", "2024-05-01T12:00:00.250Z"),
        ("content-type", "application/json"),
    ]
}

#[test]
fn decodes_binary_mode() {
    let r = record(
        Some(b"C-1"),
        Some(br#"{"first_name":"Ana"}"#),
        &binary_headers(),
    );
    let e = decode(&r).unwrap();
    assert_eq!(e.mode, EnvelopeMode::Binary);
    assert_eq!(e.id, "evt-1");
    assert_eq!(e.source.as_deref(), Some("crm"));
    assert_eq!(e.event_type.as_deref(), Some("crm.customer.updated"));
    assert_eq!(e.entity_id, "C-1");
    assert_eq!(format_time(e.time_ms), "2024-05-01T12:00:00.250Z");
    assert_eq!(e.data.unwrap()["first_name"], "Ana");
}

#[test]
fn binary_mode_without_time_uses_record_timestamp() {
    let headers: Vec<_> = binary_headers()
        .into_iter()
        .filter(|(k, _)| *k != "ce_time")
        .collect();
    let e = decode(&record(Some(b"C-1"), Some(b"{}"), &headers)).unwrap();
    assert_eq!(e.time_ms, 1_700_000_000_000);
}

#[test]
fn binary_mode_requires_id_source_and_type() {
    for missing in ["ce_id", "ce_source", "ce_type"] {
        let headers: Vec<_> = binary_headers()
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
        let err = decode(&record(Some(b"C-1"), Some(b"{}"), &headers)).unwrap_err();
        assert_eq!(
            err,
            EnvelopeError::MissingAttribute(match missing {
                "ce_id" => "ce_id",
                "ce_source" => "ce_source",
                _ => "ce_type",
            })
        );
    }
}

#[test]
fn rejects_other_spec_versions_and_bad_times() {
    let mut headers = binary_headers();
    headers[0] = ("ce_specversion", "0.3");
    let err = decode(&record(Some(b"C-1"), Some(b"{}"), &headers)).unwrap_err();
    assert_eq!(err, EnvelopeError::UnsupportedSpecVersion("0.3".into()));

    let mut headers = binary_headers();
    headers[4] = ("ce_time", "yesterday");
    let err = decode(&record(Some(b"C-1"), Some(b"{}"), &headers)).unwrap_err();
    assert_eq!(err.kind(), "invalid_attribute");
    assert!(err.to_string().contains("yesterday"), "{err}");
}

#[test]
fn decodes_structured_mode() {
    let value = br#"{"specversion":"1.0","id":"evt-9","source":"billing","type":"billing.account.updated",
        "time":"2024-05-01T12:00:00Z","datacontenttype":"application/json","data":{"contact_name":"Ana Li"}}"#;
    let r = record(
        Some(b"C-1"),
        Some(value),
        &[(
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        )],
    );
    let e = decode(&r).unwrap();
    assert_eq!(e.mode, EnvelopeMode::Structured);
    assert_eq!(e.id, "evt-9");
    assert_eq!(e.source.as_deref(), Some("billing"));
    assert_eq!(e.data.unwrap()["contact_name"], "Ana Li");
}

/// `data` is optional in a CloudEvent (a "ping" event type has none). Such an event, and one
/// with `"data": null`, is an event about the entity with no payload, not a tombstone: only
/// a null record value deletes (found by review: it deleted the entity, past every filter).
#[test]
fn a_structured_event_without_data_is_not_a_tombstone() {
    for value in [
        &br#"{"specversion":"1.0","id":"1","source":"crm","type":"crm.customer.ping"}"#[..],
        br#"{"specversion":"1.0","id":"1","source":"crm","type":"crm.customer.ping","data":null}"#,
    ] {
        let r = record(
            Some(b"C-1"),
            Some(value),
            &[("content-type", STRUCTURED_CONTENT_TYPE)],
        );
        let e = decode(&r).unwrap();
        assert_eq!(
            e.data,
            Some(Map::new()),
            "{}",
            String::from_utf8_lossy(value)
        );
    }
}

#[test]
fn structured_mode_errors_are_specific() {
    let ct = [("content-type", "application/cloudevents+json")];
    let err = decode(&record(
        Some(b"C-1"),
        Some(br#"{"specversion":"1.0","source":"x","type":"t"}"#),
        &ct,
    ))
    .unwrap_err();
    assert_eq!(err, EnvelopeError::MissingAttribute("id"));
    let err = decode(&record(
        Some(b"C-1"),
        Some(br#"{"specversion":"1.0","id":"1","source":"x","type":"t","data":[1]}"#),
        &ct,
    ))
    .unwrap_err();
    assert_eq!(err, EnvelopeError::NotAnObject("an array"));
}

#[test]
fn plain_records_get_ids_from_coordinates() {
    let e = decode(&record(Some(b"C-7"), Some(br#"{"a":1}"#), &[])).unwrap();
    assert_eq!(e.mode, EnvelopeMode::Plain);
    assert_eq!(e.id, "context.customers-3-42");
    assert_eq!(e.time_ms, 1_700_000_000_000);
    assert_eq!(e.source, None);
}

#[test]
fn null_value_is_a_tombstone() {
    let e = decode(&record(Some(b"C-7"), None, &[])).unwrap();
    assert!(e.data.is_none());
}

#[test]
fn rejects_bad_records_with_specific_errors() {
    let cases: Vec<(Record, &str)> = vec![
        (record(None, Some(b"{}"), &[]), "missing_key"),
        (record(Some(b""), Some(b"{}"), &[]), "empty_key"),
        (
            record(Some(&[0xff, 0xfe]), Some(b"{}"), &[]),
            "key_not_utf8",
        ),
        (
            record(Some(b"C-1"), Some(b"{not json"), &[]),
            "invalid_json",
        ),
        (
            record(Some(b"C-1"), Some(&[0x7b, 0xff, 0x7d]), &[]),
            "value_not_utf8",
        ),
        (record(Some(b"C-1"), Some(b"[1,2]"), &[]), "not_an_object"),
        (
            record(
                Some(b"C-1"),
                Some(b"{}"),
                &[("content-type", "application/avro")],
            ),
            "unsupported_content_type",
        ),
    ];
    for (r, kind) in cases {
        assert_eq!(decode(&r).unwrap_err().kind(), kind, "{r:?}");
    }
}

#[test]
fn records_over_the_size_limit_are_rejected_before_parsing() {
    let r = record(Some(b"C-1"), Some(b"{not even json"), &[("h", "vv")]);
    // 3 (key) + 14 (value) + 1 + 2 (header)
    assert_eq!(record_size(&r), 20);
    assert!(check_size(&r, 20).is_ok());
    let err = decode_limited(&r, 19).unwrap_err();
    assert_eq!(err, EnvelopeError::TooLarge { size: 20, max: 19 });
    assert_eq!(err.kind(), "record_too_large");
    assert!(err.to_string().contains("limits.max_record_bytes"), "{err}");
    // Under the limit the record is decoded (and here rejected for its JSON).
    assert_eq!(decode_limited(&r, 1000).unwrap_err().kind(), "invalid_json");
}

#[test]
fn structured_attributes_of_the_wrong_json_type_are_wrong_type() {
    let cases: [(&[u8], &str); 3] = [
        (
            br#"{"specversion":"1.0","id":{"n":1},"source":"crm","type":"t","data":{}}"#,
            "id",
        ),
        (
            br#"{"specversion":"1.0","id":"e","source":7,"type":"t","data":{}}"#,
            "source",
        ),
        (
            br#"{"specversion":"1.0","id":"e","source":"crm","type":"t","time":1700000000,"data":{}}"#,
            "time",
        ),
    ];
    for (value, attribute) in cases {
        let r = record(
            Some(b"C-1"),
            Some(value),
            &[("content-type", STRUCTURED_CONTENT_TYPE)],
        );
        let err = decode(&r).unwrap_err();
        assert_eq!(err.kind(), "wrong_type", "{err}");
        assert!(
            matches!(&err, EnvelopeError::WrongType { name, .. } if *name == attribute),
            "{err:?}"
        );
    }
}

#[test]
fn every_envelope_error_is_permanent() {
    let errors = [
        EnvelopeError::TooLarge { size: 2, max: 1 },
        EnvelopeError::MissingKey,
        EnvelopeError::EmptyKey,
        EnvelopeError::KeyNotUtf8,
        EnvelopeError::ValueNotUtf8("x".into()),
        EnvelopeError::InvalidJson("x".into()),
        EnvelopeError::NotAnObject("a number"),
        EnvelopeError::UnsupportedContentType("x".into()),
        EnvelopeError::UnsupportedSpecVersion("x".into()),
        EnvelopeError::MissingAttribute("ce_id"),
        EnvelopeError::InvalidAttribute {
            name: "ce_time",
            reason: "x".into(),
        },
        EnvelopeError::WrongType {
            name: "id",
            expected: "a string",
            found: "an object",
        },
    ];
    for e in errors {
        assert!(!e.is_transient(), "{e:?}");
    }
}

#[test]
fn a_projection_sees_the_attributes_and_its_map_becomes_the_data() {
    let r = record(
        Some(b"C-1"),
        Some(br#"{"first_name":"Ana","last_name":"Silva"}"#),
        &binary_headers(),
    );
    let e = decode_projected(&r, |event, text| {
        assert_eq!(event.source.as_deref(), Some("crm"));
        assert_eq!(event.data, None);
        assert_eq!(text, r#"{"first_name":"Ana","last_name":"Silva"}"#);
        let mut map = Map::new();
        map.insert("first_name".into(), "Ana".into());
        Some(map)
    })
    .unwrap();
    assert_eq!(
        Value::Object(e.data.clone().unwrap()),
        serde_json::json!({"first_name": "Ana"})
    );
    assert_eq!(
        ContextEvent {
            data: decode(&r).unwrap().data,
            ..e
        },
        decode(&r).unwrap()
    );
}

#[test]
fn a_declined_projection_decodes_like_decode_with_the_same_errors() {
    let mut missing_id = binary_headers();
    missing_id.retain(|(k, _)| *k != "ce_id");
    let structured = [("content-type", STRUCTURED_CONTENT_TYPE)];
    let cases: Vec<Record> = vec![
        record(Some(b"C-1"), Some(br#"{"a":1}"#), &binary_headers()),
        record(Some(b"C-1"), Some(br#"{"a":1}"#), &[]),
        record(Some(b"C-1"), Some(br#"{"a":1"#), &binary_headers()),
        record(Some(b"C-1"), Some(b"[1]"), &binary_headers()),
        record(Some(b"C-1"), Some(b"{\"a\":\"\xff\"}"), &binary_headers()),
        // A payload error wins over an attribute error, as it always did.
        record(Some(b"C-1"), Some(b"nope"), &missing_id),
        record(Some(b"C-1"), Some(b"\xff"), &missing_id),
        record(Some(b"C-1"), Some(b"{}"), &missing_id),
        record(Some(b"C-1"), None, &missing_id),
        record(Some(b"C-1"), None, &binary_headers()),
        record(None, Some(b"{}"), &binary_headers()),
    ];
    for r in &cases {
        assert_eq!(decode_projected(r, |_, _| None), decode(r), "{r:?}");
    }
    // Never asked to parse bytes that are not UTF-8, tombstones, records with a bad envelope,
    // or structured-mode events.
    let never_called =
        |_: &ContextEvent, _: &str| -> Option<Map<String, Value>> { panic!("projection called") };
    for r in &cases[4..] {
        let _ = decode_projected(r, never_called);
    }
    let r = record(
        Some(b"C-1"),
        Some(br#"{"specversion":"1.0","id":"e","source":"s","type":"t","data":{"a":1}}"#),
        &structured,
    );
    assert!(decode_projected(&r, never_called).is_ok());
}

#[test]
fn json_media_types_match_in_any_ascii_case_without_allocating() {
    let reference = |media: &str| {
        let media = media.to_ascii_lowercase();
        media == "application/json" || media == "text/json" || media.ends_with("+json")
    };
    for media in [
        "application/json",
        "Application/JSON",
        "text/json",
        "TEXT/Json",
        "application/vnd.api+json",
        "application/x+JSON",
        "+json",
        "json",
        "",
        "application/xml",
        "text/plain",
        "é+json",
        "application/jsoné",
        "ajson",
    ] {
        assert_eq!(is_json_media_type(media), reference(media), "{media:?}");
    }
}
