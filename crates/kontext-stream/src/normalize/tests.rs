use bytes::Bytes;
use kontext_core::record::Header;
use serde_json::json;

use super::*;

const PIPELINE: &str = r#"
name: t
entities:
  customer: { key: customer_id, topic: context.customers }
  interaction: { key: interaction_id, topic: context.interactions, belongs_to: { customer: customer_id } }
sources:
  crm:
    topic: context.customers
    entity: customer
    match: { ce_source: crm }
    fields: { given_name: first_name, tier: loyalty.tier }
  billing:
    topic: context.customers
    entity: customer
    match: { ce_source: billing }
    fields: { given_name: contact_name }
  web:
    topic: context.interactions
    entity: interaction
    fields: { customer_id: uid, action: action }
    filter:
      drop_if:
        - { field: action, equals: heartbeat }
        - { field: "@type", in: [web.admin] }
"#;

fn router() -> Router {
    Router::new(&PipelineConfig::parse("t.yaml", PIPELINE).unwrap())
}

fn record(topic: &str, key: &str, value: serde_json::Value, ce: Option<(&str, &str)>) -> Record {
    let mut headers = Vec::new();
    if let Some((source, ty)) = ce {
        for (k, v) in [
            ("ce_specversion", "1.0"),
            ("ce_id", "e1"),
            ("ce_source", source),
            ("ce_type", ty),
        ] {
            headers.push(Header::new(k, Bytes::copy_from_slice(v.as_bytes())));
        }
    }
    Record {
        topic: topic.into(),
        partition: 1,
        offset: 5,
        timestamp_ms: 1_000,
        key: Some(Bytes::copy_from_slice(key.as_bytes())),
        value: Some(Bytes::from(value.to_string())),
        headers,
    }
}

fn update(outcome: Outcome) -> EntityUpdate {
    match outcome {
        Outcome::Update(u) => u,
        other => panic!("expected an update, got {other:?}"),
    }
}

#[test]
fn sources_with_different_names_normalize_to_one_model() {
    let r = router();
    let crm = update(r.process(&record(
        "context.customers",
        "C1",
        json!({"first_name": "Ana", "loyalty": {"tier": "gold"}}),
        Some(("crm", "crm.customer.updated")),
    )));
    let billing = update(r.process(&record(
        "context.customers",
        "C1",
        json!({"contact_name": "Ana Li"}),
        Some(("billing", "billing.account.updated")),
    )));
    let Change::Upsert(a) = &crm.change else {
        panic!()
    };
    let Change::Upsert(b) = &billing.change else {
        panic!()
    };
    assert_eq!(a["given_name"], "Ana");
    assert_eq!(a["tier"], "gold");
    assert_eq!(a["customer_id"], "C1");
    assert_eq!(b["given_name"], "Ana Li");
    assert_eq!(crm.provenance.source, "crm");
    assert_eq!(
        billing.provenance.event_type.as_deref(),
        Some("billing.account.updated")
    );
    assert_eq!(
        (billing.provenance.partition, billing.provenance.offset),
        (1, 5)
    );
}

#[test]
fn unmatched_ce_source_without_fallback_is_invalid() {
    let out = router().process(&record(
        "context.customers",
        "C1",
        json!({}),
        Some(("erp", "x")),
    ));
    assert_eq!(
        out,
        Outcome::Invalid(ProcessError::NoSource {
            topic: "context.customers".into(),
            ce_source: Some("erp".into())
        })
    );
    // The message an operator reads in the dead letter: the source's name, not Rust's
    // `Some("erp")`.
    let Outcome::Invalid(e) = out else {
        unreachable!()
    };
    assert_eq!(
        e.to_string(),
        "no source on topic \"context.customers\" matches ce_source \"erp\"; declare one in the pipeline file"
    );
    let none = ProcessError::NoSource {
        topic: "t".into(),
        ce_source: None,
    };
    assert!(
        none.to_string()
            .contains("matches a record without ce_source"),
        "{none}"
    );
}

#[test]
fn plain_records_go_to_the_fallback_source_and_filters_drop_noise() {
    let r = router();
    let u = update(r.process(&record(
        "context.interactions",
        "I1",
        json!({"uid": "C1", "action": "search"}),
        None,
    )));
    assert_eq!(u.provenance.source, "web");
    assert_eq!(u.provenance.event_id, "context.interactions-1-5");
    let dropped = r.process(&record(
        "context.interactions",
        "I2",
        json!({"uid": "C1", "action": "heartbeat"}),
        None,
    ));
    assert_eq!(
        dropped,
        Outcome::Filtered {
            source: "web".into()
        }
    );
    let admin = r.process(&record(
        "context.interactions",
        "I3",
        json!({"uid": "C1"}),
        Some(("web", "web.admin")),
    ));
    assert_eq!(
        admin,
        Outcome::Filtered {
            source: "web".into()
        }
    );
}

#[test]
fn bad_envelopes_are_invalid_with_their_kind() {
    let mut rec = record("context.customers", "C1", json!({}), None);
    rec.value = Some(Bytes::from_static(b"{oops"));
    match router().process(&rec) {
        Outcome::Invalid(e) => assert_eq!(e.kind(), "invalid_json"),
        other => panic!("{other:?}"),
    }
}

const COMPUTED: &str = r#"
name: t
entities:
  customer: { key: customer_id, topic: context.customers }
  ticket: { key: ticket_id, topic: context.tickets }
sources:
  billing:
    topic: context.customers
    entity: customer
    match: { ce_source: billing }
    fields:
      full_name: { jq: '.first + " " + .last' }
      initials: { jq: '[.first, .last] | map(select(. != null) | .[0:1]) | join("")' }
      nickname: { jq: .nick }
      credit: { path: amount, type: number }
      vip: { path: flags.vip, type: boolean }
      since: { jq: '.since // .created', type: timestamp }
    filter:
      drop_if:
        - { jq: '$type | startswith("billing.admin.")' }
        - { jq: '.internal and (.amount | tonumber) > 0' }
  support:
    topic: context.tickets
    entity: ticket
    fields:
      opened_at: { path: opened_at, type: timestamp }
      minutes: { path: first_response_minutes, type: integer }
      subject: subject
"#;

fn computed_router() -> Router {
    Router::new(&PipelineConfig::parse("t.yaml", COMPUTED).unwrap())
}

fn billing(value: serde_json::Value) -> Record {
    record(
        "context.customers",
        "C1",
        value,
        Some(("billing", "billing.account.updated")),
    )
}

fn upsert(outcome: Outcome) -> Map<String, Value> {
    match update(outcome).change {
        Change::Upsert(fields) => fields.to_map(),
        Change::Delete => panic!("expected an upsert"),
    }
}

fn invalid(outcome: Outcome) -> NormalizeError {
    match outcome {
        Outcome::Invalid(ProcessError::Normalize(e)) => e,
        other => panic!("expected a normalize error, got {other:?}"),
    }
}

#[test]
fn computed_fields_run_jq_and_coercions_convert_values() {
    let fields = upsert(computed_router().process(&billing(json!({
        "first": "Ana", "last": "Silva", "amount": "129.90",
        "flags": {"vip": "TRUE"}, "created": "2026-11-25 12:00:00"
    }))));
    assert_eq!(
        Value::Object(fields),
        json!({
            "customer_id": "C1",
            "full_name": "Ana Silva",
            "initials": "AS",
            "credit": 129.9,
            "vip": true,
            "since": "2026-11-25T12:00:00.000Z",
        })
    );
}

#[test]
fn jq_results_that_are_null_or_empty_leave_the_field_out_like_an_absent_path() {
    let fields = upsert(computed_router().process(&billing(json!({"nick": null, "last": "Li"}))));
    assert_eq!(fields.get("nickname"), None);
    assert_eq!(fields.get("since"), None);
    assert_eq!(fields.get("credit"), None);
    assert_eq!(
        fields["full_name"], " Li",
        "jq's null + string is the string"
    );
    assert_eq!(fields["initials"], "L");
}

#[test]
fn a_failed_coercion_is_a_permanent_error_naming_the_field_and_the_value() {
    let out = computed_router().process(&billing(json!({"amount": "12,50"})));
    let e = invalid(out.clone());
    assert_eq!(
        e,
        NormalizeError::Coercion {
            at: "sources.billing.fields.credit".into(),
            value: "\"12,50\"".into(),
            expected: FieldType::Number,
        }
    );
    assert_eq!(
        e.to_string(),
        r#"sources.billing.fields.credit: cannot convert "12,50" to number"#
    );
    let Outcome::Invalid(pe) = out else { panic!() };
    assert_eq!(pe.kind(), "coercion_failed");

    let legacy = record(
        "context.tickets",
        "T1",
        json!({"opened_at": "last tuesday", "subject": "x"}),
        None,
    );
    let e = invalid(computed_router().process(&legacy));
    assert_eq!(
        e.to_string(),
        r#"sources.support.fields.opened_at: cannot convert "last tuesday" to timestamp"#
    );
    let fractional = record(
        "context.tickets",
        "T1",
        json!({"first_response_minutes": 4.5}),
        None,
    );
    assert!(matches!(
        invalid(computed_router().process(&fractional)),
        NormalizeError::Coercion {
            expected: FieldType::Integer,
            ..
        }
    ));
}

#[test]
fn legacy_timestamps_become_rfc3339() {
    let r = computed_router();
    for opened in [
        json!(1_795_608_000),
        json!("1795608000000"),
        json!("Wed, 25 Nov 2026 12:00:00 +0000"),
    ] {
        let fields = upsert(r.process(&record(
            "context.tickets",
            "T1",
            json!({"opened_at": opened, "first_response_minutes": "12"}),
            None,
        )));
        assert_eq!(fields["opened_at"], "2026-11-25T12:00:00.000Z", "{opened}");
        assert_eq!(fields["minutes"], 12);
    }
}

#[test]
fn a_failing_jq_mapping_is_a_permanent_error_naming_the_field() {
    let e = invalid(computed_router().process(&billing(json!({"first": 1, "last": "x"}))));
    let NormalizeError::Jq { at, code, message } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(at, "sources.billing.fields.full_name");
    assert_eq!(code, r#".first + " " + .last"#);
    assert!(message.contains("cannot"), "{message}");
    assert_eq!(e.kind(), "jq_failed");
}

#[test]
fn jq_predicates_drop_records_and_failing_ones_reject_them() {
    let r = computed_router();
    let admin = record(
        "context.customers",
        "C1",
        json!({"first": "Ana"}),
        Some(("billing", "billing.admin.reindex")),
    );
    assert_eq!(
        r.process(&admin),
        Outcome::Filtered {
            source: "billing".into()
        }
    );
    let internal = billing(json!({"internal": true, "amount": "5"}));
    assert_eq!(
        r.process(&internal),
        Outcome::Filtered {
            source: "billing".into()
        }
    );
    // `and` short-circuits: no tonumber on a missing amount when not internal.
    upsert(r.process(&billing(json!({"internal": false}))));
    let broken = billing(json!({"internal": true, "amount": "many"}));
    let e = invalid(r.process(&broken));
    let NormalizeError::Jq { at, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(at, "sources.billing.filter.drop_if[1]");
}

/// A structured CloudEvent without `data` goes through filters and mappings like any event
/// (it deleted the entity before, past every filter).
#[test]
fn a_structured_event_without_data_is_filtered_and_mapped_not_deleted() {
    let structured = |id: &str, ty: &str| {
        let mut rec = record(
            "context.interactions",
            id,
            json!({"specversion": "1.0", "id": id, "source": "web", "type": ty}),
            None,
        );
        rec.headers = vec![Header::new(
            "content-type",
            Bytes::from_static(envelope::STRUCTURED_CONTENT_TYPE.as_bytes()),
        )];
        rec
    };
    let r = router();
    assert_eq!(
        r.process(&structured("I1", "web.admin")),
        Outcome::Filtered {
            source: "web".into()
        }
    );
    let u = update(r.process(&structured("I2", "web.ping")));
    assert!(
        matches!(&u.change, Change::Upsert(fields) if fields.get("action").is_none()),
        "{:?}",
        u.change
    );
}

/// `equals: null` tests for a null value (serde read a present `null` as absent, and
/// validation asked for one of `equals`, `in` or `exists`).
#[test]
fn a_condition_can_equal_null() {
    let yaml = PIPELINE.replace(
        "        - { field: action, equals: heartbeat }",
        "        - { field: action, equals: heartbeat }\n        - { field: deleted_at, equals: null }",
    );
    let r = Router::new(&PipelineConfig::parse("t.yaml", &yaml).unwrap());
    let rec =
        |key: &str, value: serde_json::Value| record("context.interactions", key, value, None);
    assert_eq!(
        r.process(&rec("I1", json!({"uid": "C1", "deleted_at": null}))),
        Outcome::Filtered {
            source: "web".into()
        }
    );
    update(r.process(&rec("I2", json!({"uid": "C1", "deleted_at": "2026-11-25"}))));
    update(r.process(&rec("I3", json!({"uid": "C1"}))));
}

#[test]
fn tombstones_skip_filters_and_mappings() {
    let mut rec = billing(json!({}));
    rec.value = None;
    assert_eq!(
        update(computed_router().process(&rec)).change,
        Change::Delete
    );
}

/// A tombstone without `ce_source` deletes on a topic whose sources all match by
/// `ce_source` (no catch-all): every source of a topic maps one entity type. One with an
/// unknown `ce_source` still names no source.
#[test]
fn a_tombstone_without_ce_source_deletes_by_topic_and_key() {
    let r = router();
    let mut plain = record("context.customers", "C1", json!({}), None);
    plain.value = None;
    let deleted = update(r.process(&plain));
    assert_eq!(deleted.change, Change::Delete);
    assert_eq!(deleted.entity_type, "customer");
    assert_eq!(deleted.entity_id, "C1");
    let mut unknown = record("context.customers", "C1", json!({}), Some(("erp", "x")));
    unknown.value = None;
    assert!(matches!(
        r.process(&unknown),
        Outcome::Invalid(ProcessError::NoSource { .. })
    ));
    // Not on a features topic: its one source is kontext's, and a tombstone there would
    // delete the whole customer.
    let with_features = PipelineConfig::parse(
        "t.yaml",
        &format!(
            "{PIPELINE}features:\n  clicks: {{ from: interaction, entity: customer, key: customer_id, agg: count }}\n"
        ),
    )
    .unwrap();
    let mut on_features = record("context.customers.features", "C1", json!({}), None);
    on_features.value = None;
    assert!(matches!(
        Router::new(&with_features).process(&on_features),
        Outcome::Invalid(ProcessError::NoSource { .. })
    ));
    // A record with a value and no ce_source still needs a catch-all source.
    assert!(matches!(
        r.process(&record(
            "context.customers",
            "C1",
            json!({"first_name": "A"}),
            None
        )),
        Outcome::Invalid(ProcessError::NoSource { .. })
    ));
}

/// An event dated more than `limits.max_event_time_ahead` after its record's timestamp is
/// refused (a tombstone too): it would outrank every later update. `0` lifts the limit.
#[test]
fn an_event_dated_far_after_its_record_is_refused() {
    let at = |ce_time: &str, value: Option<serde_json::Value>| {
        let mut r = record(
            "context.customers",
            "C1",
            json!({"first_name": "A"}),
            Some(("crm", "crm.customer.updated")),
        );
        r.timestamp_ms = 1_795_608_000_000; // 2026-11-25T12:00:00Z
        r.value = value.map(|v| Bytes::from(v.to_string()));
        r.headers.push(Header::new(
            "ce_time",
            Bytes::copy_from_slice(ce_time.as_bytes()),
        ));
        r
    };
    let r = router();
    let payload = Some(json!({"first_name": "A"}));
    // Within the hour: a producer's clock a little ahead.
    update(r.process(&at("2026-11-25T12:59:00Z", payload.clone())));
    for value in [payload.clone(), None] {
        match r.process(&at("2026-11-25T13:01:00Z", value)) {
            Outcome::Invalid(e) => {
                assert_eq!(e.kind(), "time_ahead");
                assert!(
                    e.to_string()
                        .contains("limits.max_event_time_ahead (3600 s)"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    let mut config = PipelineConfig::parse("t.yaml", PIPELINE).unwrap();
    config.limits.max_event_time_ahead = std::time::Duration::ZERO;
    update(Router::new(&config).process(&at("2099-01-01T00:00:00Z", payload)));
}

#[test]
fn an_unvalidated_config_with_a_broken_program_rejects_records_instead_of_panicking() {
    let mut config = PipelineConfig::parse("t.yaml", COMPUTED).unwrap();
    config.sources.get_mut("billing").unwrap().fields.insert(
        "oops".into(),
        FieldMapping::Spec(kontext_core::config::FieldSpec {
            jq: Some(".a +* 1".into()),
            ..Default::default()
        }),
    );
    let e = invalid(Router::new(&config).process(&billing(json!({"first": "A"}))));
    assert!(e.to_string().contains("does not compile"), "{e}");
}

mod dead_letters {
    use std::sync::Arc;

    use kontext_core::config::DeadLetterConfig;
    use kontext_core::record::{ProduceRecord, RecordPosition};
    use kontext_log::{LogError, Producer};

    use super::*;
    use crate::dlq::{headers, DeadLetters};

    struct NoProducer;

    #[async_trait::async_trait]
    impl Producer for NoProducer {
        async fn send(&self, _: Vec<ProduceRecord>) -> Result<Vec<RecordPosition>, LogError> {
            Err(LogError::Invalid("unused".into()))
        }
        async fn flush(&self) -> Result<(), LogError> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_coercion_becomes_a_dead_letter_of_the_transformation_stage() {
        let rec = billing(json!({"amount": "12,50"}));
        let Outcome::Invalid(error) = computed_router().process(&rec) else {
            panic!("expected a rejection")
        };
        let dlq = DeadLetters::new(
            DeadLetterConfig::default(),
            "t".into(),
            "g".into(),
            Arc::new(NoProducer),
        );
        let letter = dlq.letter(&rec, &error);
        assert_eq!(letter.topic, "context.customers.dlq");
        assert_eq!(letter.value, rec.value);
        let get = |k: &str| {
            letter
                .headers
                .iter()
                .find(|h| h.key == k)
                .and_then(|h| h.value.clone())
                .map(|v| String::from_utf8(v.to_vec()).unwrap())
        };
        assert_eq!(get(headers::KIND).as_deref(), Some("coercion_failed"));
        assert_eq!(get(headers::STAGE).as_deref(), Some("TRANSFORMATION"));
        assert_eq!(
            get(headers::EXCEPTION_MESSAGE).as_deref(),
            Some(r#"sources.billing.fields.credit: cannot convert "12,50" to number"#)
        );
    }
}

mod path_mappings {
    use proptest::prelude::*;

    use super::*;

    /// The router before computed fields existed: every mapping a path, copied when present.
    fn reference(
        fields: &BTreeMap<String, String>,
        data: &Map<String, Value>,
    ) -> Map<String, Value> {
        let mut out = Map::new();
        for (canonical, path) in fields {
            let mut current = Some(data);
            let mut found = None;
            let segments: Vec<&str> = path.split('.').collect();
            for (i, segment) in segments.iter().enumerate() {
                let Some(obj) = current else { break };
                match obj.get(*segment) {
                    Some(v) if i + 1 == segments.len() => found = Some(v.clone()),
                    Some(v) => current = v.as_object(),
                    None => break,
                }
            }
            if let Some(v) = found {
                out.insert(canonical.clone(), v);
            }
        }
        out.insert("customer_id".into(), json!("C1"));
        out
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z ]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                prop::collection::btree_map("[abc]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec("[abc]", 1..4).prop_map(|s| s.join("."))
    }

    proptest! {
        #[test]
        fn path_only_mappings_give_the_same_fields_as_before(
            fields in prop::collection::btree_map("[a-z]{1,3}", path(), 1..5),
            data in prop::collection::btree_map("[abc]", value(), 0..4),
        ) {
            prop_assume!(!fields.contains_key("customer_id"));
            let mut config = PipelineConfig::parse("t.yaml", PIPELINE).unwrap();
            config.sources.get_mut("crm").unwrap().fields = fields
                .iter()
                .map(|(k, p)| (k.clone(), FieldMapping::Path(p.clone())))
                .collect();
            prop_assert!(config.validate().is_empty());
            let data: Map<String, Value> = data.into_iter().collect();
            let out = Router::new(&config).process(&record(
                "context.customers",
                "C1",
                Value::Object(data.clone()),
                Some(("crm", "crm.customer.updated")),
            ));
            prop_assert_eq!(upsert(out), reference(&fields, &data));
        }
    }
}

/// A pipeline whose one source, `crm`, maps `fields` (a YAML flow map) of the customers topic's
/// records with `ce_source: crm` and drops those matching one of `drop_if` (YAML flow maps).
fn crm_pipeline(fields: &str, drop_if: &[&str]) -> PipelineConfig {
    let text = format!(
        r#"
name: t
entities:
  customer: {{ key: customer_id, topic: context.customers }}
sources:
  crm:
    topic: context.customers
    entity: customer
    match: {{ ce_source: crm }}
    fields: {fields}
    filter:
      drop_if:
        - {}
"#,
        drop_if.join("\n        - ")
    );
    PipelineConfig::parse("t.yaml", &text).unwrap()
}

#[test]
fn fields_mapping_the_same_or_nested_paths_each_get_the_whole_value() {
    let config = crm_pipeline(
        "{ a: loyalty.tier, b: loyalty, c: loyalty.tier, d: name, e: name, f: loyalty.points }",
        &[
            r#"{ field: "@source", exists: false }"#,
            r#"{ field: "@type", in: [crm.internal.probe] }"#,
            r#"{ field: "@type", equals: crm.internal.ping }"#,
        ],
    );
    let r = Router::new(&config);
    let data = json!({"name": "Ana", "loyalty": {"tier": "gold", "points": 7}});
    let out = upsert(r.process(&record(
        "context.customers",
        "C1",
        data.clone(),
        Some(("crm", "crm.customer.updated")),
    )));
    assert_eq!(
        Value::Object(out),
        json!({
            "a": "gold", "b": {"tier": "gold", "points": 7}, "c": "gold", "d": "Ana",
            "e": "Ana", "f": 7, "customer_id": "C1",
        })
    );
    for ty in ["crm.internal.probe", "crm.internal.ping"] {
        let dropped = r.process(&record(
            "context.customers",
            "C1",
            data.clone(),
            Some(("crm", ty)),
        ));
        assert_eq!(
            dropped,
            Outcome::Filtered {
                source: "crm".into()
            },
            "{ty}"
        );
    }
}

/// The key field is placed among the fields in name order (so every field is appended), and a
/// field of the key's own name is overwritten by the record's key, with or without jq.
#[test]
fn the_key_sorts_among_the_fields_and_wins_over_a_field_of_its_name() {
    for fields in [
        "{ a: name, zz: name }",
        "{ customer_id: uid, a: name, zz: name }",
        "{ customer_id: uid, a: name, zz: { jq: .name } }",
    ] {
        let config = crm_pipeline(
            fields,
            &[r#"{ field: "@type", equals: crm.internal.ping }"#],
        );
        let outcome = Router::new(&config).process(&record(
            "context.customers",
            "C1",
            json!({"name": "Ana", "uid": "not-the-key"}),
            Some(("crm", "crm.customer.updated")),
        ));
        let update = update(outcome);
        let Change::Upsert(out) = &update.change else {
            panic!("{fields}: {update:?}");
        };
        let names: Vec<&str> = out.keys().collect();
        assert_eq!(names, ["a", "customer_id", "zz"], "{fields}");
        assert_eq!(out.get("customer_id"), Some(&json!("C1")), "{fields}");
        assert_eq!(out.get("zz"), Some(&json!("Ana")), "{fields}");
    }
}

/// A mapping of the key field is dropped, conversion included: its value would be replaced
/// by the key, so it cannot fail the record either.
#[test]
fn a_mapping_of_the_key_field_is_neither_read_nor_converted() {
    for fields in [
        "{ customer_id: { path: uid, type: integer }, a: name }",
        "{ customer_id: { jq: '.uid | error(\"never run\")' }, a: name }",
    ] {
        let config = crm_pipeline(fields, &[r#"{ field: "@type", equals: crm.ping }"#]);
        let outcome = Router::new(&config).process(&record(
            "context.customers",
            "C1",
            json!({"name": "Ana", "uid": "not-a-number"}),
            Some(("crm", "crm.customer.updated")),
        ));
        let update = update(outcome);
        let Change::Upsert(out) = &update.change else {
            panic!("{fields}: {update:?}");
        };
        assert_eq!(out.get("customer_id"), Some(&json!("C1")), "{fields}");
        assert_eq!(out.get("a"), Some(&json!("Ana")), "{fields}");
    }
}

/// The projected parse (`project.rs`) against the full one: same outcome for every record.
mod projection {
    use proptest::prelude::*;

    use super::project::Projection;
    use super::*;

    fn source() -> PipelineConfig {
        crm_pipeline(
            "{ tier: loyalty.tier, name: name, points: { path: loyalty.points, type: number } }",
            &[
                "{ field: flags.test, equals: true }",
                r#"{ field: "@type", equals: crm.internal.probe }"#,
            ],
        )
    }

    fn raw(value: &[u8], headers: &[(&str, &str)]) -> Record {
        Record {
            topic: "context.customers".into(),
            partition: 1,
            offset: 5,
            timestamp_ms: 1_000,
            key: Some(Bytes::from_static(b"C1")),
            value: Some(Bytes::copy_from_slice(value)),
            headers: headers
                .iter()
                .map(|(k, v)| Header::new(*k, Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
        }
    }

    const CE: [(&str, &str); 4] = [
        ("ce_specversion", "1.0"),
        ("ce_id", "e1"),
        ("ce_source", "crm"),
        ("ce_type", "crm.customer.updated"),
    ];

    fn split(paths: &[&str]) -> Vec<Vec<String>> {
        paths.iter().map(|p| split_path(p)).collect()
    }

    fn projection(paths: &[&str]) -> Projection {
        let paths = split(paths);
        Projection::new(paths.iter().map(Vec::as_slice))
    }

    /// The value of each path in `text` parsed with their projection (`None`: rejected).
    fn read(paths: &[&str], text: &str) -> Option<Vec<Option<Value>>> {
        let projection = projection(paths);
        let payload = Payload::Projected(projection.parse(text)?);
        let values = paths.iter().map(|p| {
            let mut path = PayloadPath::new(p);
            path.slot = projection.slot(&path.segments);
            payload.get(&path).cloned()
        });
        Some(values.collect())
    }

    /// The value of each path in `text` parsed in full.
    fn read_full(paths: &[&str], text: &str) -> Option<Vec<Option<Value>>> {
        // As the envelope parses a payload: into a `Value`, which must be an object.
        let Value::Object(map) = serde_json::from_str::<Value>(text).ok()? else {
            return None;
        };
        let payload = Payload::Full(map);
        let values = paths
            .iter()
            .map(|p| payload.get(&PayloadPath::new(p)).cloned());
        Some(values.collect())
    }

    /// Outcomes of the projecting router and of the one parsing in full, which must agree.
    fn both(config: &PipelineConfig, record: &Record) -> (Outcome, Outcome) {
        let projected = Router::new(config).process(record);
        let full = Router::new(config).without_projection().process(record);
        (projected, full)
    }

    #[test]
    fn only_path_sources_without_jq_conditions_are_projected() {
        let config = source();
        let crm = |config: &PipelineConfig| {
            Router::new(config).topics["context.customers"].by_ce_source["crm"]
                .projection
                .clone()
        };
        assert_eq!(
            crm(&config),
            Some(projection(&[
                "flags.test",
                "name",
                "loyalty.points",
                "loyalty.tier"
            ]))
        );
        let mut jq_field = config.clone();
        jq_field.sources.get_mut("crm").unwrap().fields.insert(
            "full".into(),
            FieldMapping::Spec(kontext_core::config::FieldSpec {
                jq: Some(".name".into()),
                ..Default::default()
            }),
        );
        assert_eq!(crm(&jq_field), None);
        let mut jq_condition = config.clone();
        let filter = jq_condition.sources.get_mut("crm").unwrap().filter.as_mut();
        filter.unwrap().drop_if.push(Condition {
            jq: Some(".name == 1".into()),
            ..Default::default()
        });
        assert_eq!(crm(&jq_condition), None);
    }

    #[test]
    fn the_projection_finds_every_path_a_full_parse_finds() {
        let paths = ["a.b", "a", "a.x", "c.d.e", "c.f", "c.d.z.y", "g", "h.i"];
        let text = r#"{"a":{"x":[1,{"y":2}]},"c":{"d":{"e":"\u00e9","z":1},"f":null,"q":"\ud83d\ude00"},
                "g":[1,2],"h":{"i":1e300},"\u0067":"last g wins"}"#;
        let values = read(&paths, text);
        assert_eq!(values, read_full(&paths, text));
        assert_eq!(
            values,
            Some(vec![
                None,
                Some(json!({"x": [1, {"y": 2}]})),
                Some(json!([1, {"y": 2}])),
                Some(json!("é")),
                Some(json!(null)),
                None,
                Some(json!("last g wins")),
                Some(json!(1e300)),
            ])
        );
    }

    #[test]
    fn non_objects_and_duplicates_under_an_inner_path_find_nothing_the_last_one_winning() {
        let paths = ["a.b", "a.c.d"];
        for (text, b, d) in [
            (r#"{"a":[{"b":1}]}"#, None, None),
            (r#"{"a":"b"}"#, None, None),
            (r#"{"a":{"b":1,"c":{"d":2}},"a":5}"#, None, None),
            (r#"{"a":5,"a":{"b":1}}"#, Some(json!(1)), None),
            (r#"{"a":{"b":1},"a":{"c":{"d":2}}}"#, None, Some(json!(2))),
            (r#"{"a":{"c":{"d":2},"c":[]}}"#, None, None),
            (r#"{"a":{"b":1,"b":{"x":2}}}"#, Some(json!({"x": 2})), None),
        ] {
            assert_eq!(read(&paths, text), Some(vec![b, d]), "{text}");
            assert_eq!(read(&paths, text), read_full(&paths, text), "{text}");
        }
    }

    #[test]
    fn the_projection_rejects_what_a_full_parse_rejects_even_in_skipped_values() {
        let deep = format!(r#"{{"z":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        for text in [
            r#"{"z":"\ud800"}"#,
            r#"{"z":1e400}"#,
            r#"{"z":"\q"}"#,
            "{\"z\":\"\u{1}\"}",
            r#"{"z":01}"#,
            r#"{"z":[1,]}"#,
            deep.as_str(),
            r#"{"a":1} x"#,
            r#"{"a":1"#,
            r#"[{"a":1}]"#,
            "1",
            "",
        ] {
            assert_eq!(read(&["a"], text), None, "{text}");
            assert_eq!(read_full(&["a"], text), None, "{text}");
        }
        assert_eq!(read(&["a"], " {\"a\":1} \n"), Some(vec![Some(json!(1))]));
    }

    #[test]
    fn records_the_projection_rejects_fail_with_the_full_parse_error() {
        let config = source();
        let mut no_id = CE.to_vec();
        no_id.retain(|(k, _)| *k != "ce_id");
        let structured = [("content-type", envelope::STRUCTURED_CONTENT_TYPE)];
        let cases = [
            raw(br#"{"name":"Ana","z":"\ud800"}"#, &CE),
            raw(br#"{"name":"Ana"} x"#, &CE),
            raw(b"[1]", &CE),
            raw(b"{\"name\":\"\xff\"}", &CE),
            raw(br#"{"name":"Ana","#, &no_id),
            raw(br#"{"name":"Ana"}"#, &no_id),
            raw(br#"{"loyalty":{"points":"x"}}"#, &CE),
            raw(
                br#"{"specversion":"1.0","id":"e","source":"crm","type":"t","data":{"name":"A"}}"#,
                &structured,
            ),
        ];
        for record in &cases {
            let (projected, full) = both(&config, record);
            assert_eq!(projected, full, "{record:?}");
        }
        let (projected, _) = both(&config, &cases[0]);
        assert!(
            matches!(
                &projected,
                Outcome::Invalid(ProcessError::Envelope(EnvelopeError::InvalidJson(_)))
            ),
            "{projected:?}"
        );
    }

    /// A JSON text, valid or not: values, keys and numbers drawn so that duplicates, escapes,
    /// paths through non-objects and the full parse's rejections all come up.
    fn json(depth: u32) -> BoxedStrategy<String> {
        let key = prop::sample::select(vec!["a", "b", "c", r"\u0061", "b\\n", "d"]);
        let valid = prop::sample::select(vec![
            "null",
            "true",
            "false",
            "0",
            "-1",
            "1.5",
            "-0",
            "2e3",
            "18446744073709551616",
            r#""x""#,
            r#""""#,
            r#""a\"b\\c\n""#,
            r#""\u00e9\ud83d\ude00""#,
            r#""é""#,
        ]);
        // Each rejected by a full parse.
        let invalid = prop::sample::select(vec![
            "1e400",
            "01",
            r#""\ud800""#,
            "\"\u{1}\"",
            r#""\x""#,
            "nul",
        ]);
        let leaf = prop_oneof![20 => valid, 1 => invalid].prop_map(str::to_owned);
        if depth == 0 {
            return leaf.boxed();
        }
        let inner = json(depth - 1);
        prop_oneof![
            2 => leaf,
            1 => prop::collection::vec(inner.clone(), 0..3).prop_map(|v| format!("[{}]", v.join(","))),
            3 => prop::collection::vec((key, inner, any::<bool>()), 0..5).prop_map(|kv| {
                let members: Vec<String> = kv
                    .iter()
                    .map(|(k, v, space)| {
                        let sp = if *space { " " } else { "" };
                        format!("{sp}\"{k}\"{sp}:{sp}{v}")
                    })
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
        .boxed()
    }

    /// A payload: mostly an object, sometimes damaged (cut short, trailing text, a byte that
    /// is not UTF-8) or not an object.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        let object = prop::collection::vec(
            (prop::sample::select(vec!["a", "b", "c", "d"]), json(3)),
            0..6,
        )
        .prop_map(|kv| {
            let members: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", members.join(","))
        });
        (object, 0..12u8, any::<prop::sample::Index>()).prop_map(|(text, damage, at)| {
            let mut bytes = text.into_bytes();
            let i = at.index(bytes.len());
            match damage {
                0 => bytes.truncate(i),
                1 => bytes.extend_from_slice(b" x"),
                2 => bytes[i] = 0xFF,
                3 => {
                    bytes.insert(0, b'[');
                    bytes.push(b']');
                }
                4 => bytes.extend_from_slice(b" \n"),
                _ => {}
            }
            bytes
        })
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..4)
            .prop_map(|s| s.join("."))
    }

    fn small_value() -> impl Strategy<Value = Value> {
        prop::sample::select(vec![
            json!(null),
            json!(true),
            json!(1),
            json!(1.5),
            json!("x"),
            json!({}),
        ])
    }

    fn condition() -> impl Strategy<Value = Condition> {
        (path(), 0..3u8, small_value(), any::<bool>()).prop_map(|(field, test, v, b)| {
            let mut c = Condition {
                field: Some(field),
                ..Default::default()
            };
            match test {
                0 => c.equals = Some(v),
                1 => c.one_of = Some(vec![v, json!("x")]),
                _ => c.exists = Some(b),
            }
            c
        })
    }

    fn mapping() -> impl Strategy<Value = FieldMapping> {
        let coerce = prop::option::of(prop::sample::select(vec![
            FieldType::Number,
            FieldType::String,
            FieldType::Boolean,
        ]));
        (path(), coerce).prop_map(|(path, coerce)| match coerce {
            None => FieldMapping::Path(path),
            Some(ty) => FieldMapping::Spec(kontext_core::config::FieldSpec {
                path: Some(path),
                jq: None,
                coerce: Some(ty),
            }),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_projected_parse_gives_the_outcome_of_the_full_parse(
            fields in prop::collection::btree_map("[a-z]{1,3}", mapping(), 0..5),
            drop_if in prop::collection::vec(condition(), 0..3),
            value in payload(),
            envelope in 0..8u8,
        ) {
            prop_assume!(!fields.contains_key("customer_id"));
            let mut config = source();
            let crm = config.sources.get_mut("crm").unwrap();
            crm.fields = fields;
            crm.filter = Some(kontext_core::config::FilterConfig { drop_if });
            let mut headers = CE.to_vec();
            match envelope {
                0 => headers.retain(|(k, _)| *k != "ce_type"),
                1 => headers.push(("content-type", envelope::STRUCTURED_CONTENT_TYPE)),
                _ => {}
            }
            let mut record = raw(&value, &headers);
            if envelope == 2 {
                record.value = None;
            }
            let (projected, full) = both(&config, &record);
            prop_assert_eq!(projected, full);
        }

        #[test]
        fn the_projection_accepts_what_the_full_parse_accepts_and_agrees_on_every_path(
            paths in prop::collection::vec(path(), 1..5),
            value in payload(),
        ) {
            let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
            let text = std::str::from_utf8(&value);
            let full = text.ok().and_then(|t| read_full(&paths, t));
            let projected = text.ok().and_then(|t| read(&paths, t));
            prop_assert_eq!(projected, full);
        }
    }
    /// Keys `serde_json`'s `Value` treats specially, and inputs at the edges of the parser.
    mod edges {
        use super::*;

        /// A CloudEvent from `ce_source` on `topic`.
        fn rec(topic: &str, value: &[u8], ce_source: &str) -> Record {
            let mut headers = CE;
            headers[2].1 = ce_source;
            let mut record = raw(value, &headers);
            record.topic = topic.into();
            record
        }

        fn source() -> PipelineConfig {
            crm_pipeline(
                "{ tier: loyalty.tier, name: name }",
                &["{ field: flags.test, equals: true }"],
            )
        }

        /// With serde_json's `raw_value` feature (on in the `kontext` binary through axum, and for
        /// these tests through the dev-dependency), a full parse into `Value` treats an object
        /// whose first key is "$serde_json::private::RawValue" as the JSON text of its value; the
        /// projection declines such keys, so the full parse decides.
        #[test]
        fn raw_value_token_keys_give_the_same_outcome() {
            let config = source();
            let cases: [&[u8]; 5] = [
                // Skipped subtree: full parse rejects (value must be a string), projection accepts.
                br#"{"name":"Ana","z":{"$serde_json::private::RawValue":5}}"#,
                // Skipped subtree: full parse rejects (string is not JSON).
                br#"{"name":"Ana","z":{"$serde_json::private::RawValue":"[1,"}}"#,
                // Root: full parse sees {"name":"Eve"}, projection sees no name.
                br#"{"$serde_json::private::RawValue":"{\"name\":\"Eve\"}"}"#,
                // Inner trie node: full parse sees loyalty.tier = gold.
                br#"{"loyalty":{"$serde_json::private::RawValue":"{\"tier\":\"gold\"}"}}"#,
                // Same, key spelled with an escape.
                br#"{"loyalty":{"\u0024serde_json::private::RawValue":"{\"tier\":\"gold\"}"}}"#,
            ];
            let mut diffs = Vec::new();
            for text in cases {
                let record = raw(text, &CE);
                let (projected, full) = both(&config, &record);
                if projected != full {
                    diffs.push(format!(
                        "{}\n  projected: {projected:?}\n  full:      {full:?}",
                        String::from_utf8_lossy(text)
                    ));
                }
            }
            assert!(diffs.is_empty(), "{}", diffs.join("\n"));
        }

        fn check(config: &PipelineConfig, records: &[Record]) {
            let mut diffs = Vec::new();
            for r in records {
                let (p, f) = both(config, r);
                if p != f {
                    diffs.push(format!("{:?}\n  p={p:?}\n  f={f:?}", r.value));
                }
            }
            assert!(diffs.is_empty(), "{}", diffs.join("\n"));
        }

        #[test]
        fn inputs_at_the_edges_give_the_same_outcome() {
            let config = crm_pipeline(
                r#"{ w: "a", v: "a.b", u: "a.b", k: "d.e.f" }"#,
                &[
                    r#"{ field: "d", equals: { "e": { "f": [1, {"g": 2}] } } }"#,
                    r#"{ field: "n", exists: true }"#,
                ],
            );
            let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
            let mut texts: Vec<String> = vec![
                r#"{"a":{"":{"b":1},"b":2,"":{"b":3}}}"#.into(),
                r#"{"a":{"":5},"a":{"b":{"x":1}}}"#.into(),
                r#"{"d":{"e":{"f":[1,{"g":2}]}}}"#.into(),
                r#"{"d":{"e":{"f":[1,{"g":2}]},"e":{"f":[1,{"g":2}]}}}"#.into(),
                r#"{"d":{"e":{"f":[1,{"g":2.0}]}}}"#.into(),
                r#"{"d":{"e":{"f":[1,{"g":2}]}},"d":null}"#.into(),
                r#"{"n":null}"#.into(),
                r#"{"\u006e":1,"a":-0,"d":{"e":{"f":-0.0}}}"#.into(),
                r#"{"a":1e400}"#.into(),
                r#"{"a":123456789012345678901234567890}"#.into(),
                r#"{"a":{"b":"\udc00"}}"#.into(),
                r#"{"a":{"\ud800":1}}"#.into(),
                r#"{"zz":{"\ud800":1}}"#.into(),
                "{\"a\":{\"b\":1}}\u{0}".into(),
                "null".into(),
                "\u{feff}{}".into(),
            ];
            for n in [125, 126, 127, 128, 129] {
                texts.push(format!(r#"{{"a":{{"b":{}}}}}"#, deep(n)));
                texts.push(format!(r#"{{"a":{}}}"#, deep(n)));
                texts.push(format!(r#"{{"zz":{{"q":{}}}}}"#, deep(n)));
                texts.push(format!(r#"{{"d":{{"e":{}}}}}"#, deep(n)));
            }
            let mut records: Vec<Record> = texts
                .iter()
                .map(|t| rec("context.customers", t.as_bytes(), "crm"))
                .collect();
            // No source (unknown ce_source, no fallback), with good and bad payloads.
            records.push(rec("context.customers", b"{\"a\":1}", "other"));
            records.push(rec("context.customers", b"{\"a\":", "other"));
            records.push(rec("nope", b"[1]", "crm"));
            check(&config, &records);
        }
    }
}
