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
