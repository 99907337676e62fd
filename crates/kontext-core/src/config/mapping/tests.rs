use crate::config::{Condition, FieldMapping, FieldSpec, FieldType, PipelineConfig};

fn pipeline(fields: &str, drop_if: &str) -> String {
    format!(
        r#"
name: t
entities:
  customer: {{ key: customer_id, topic: context.customers }}
sources:
  crm:
    topic: context.customers
    entity: customer
    fields:
{fields}
    filter:
      drop_if:
{drop_if}
"#
    )
}

const DROP: &str = "        - { field: action, equals: heartbeat }";

fn errors(text: &str) -> Vec<(String, String)> {
    match PipelineConfig::parse("t.yaml", text) {
        Ok(_) => Vec::new(),
        Err(e) => e.errors.into_iter().map(|e| (e.field, e.message)).collect(),
    }
}

#[test]
fn a_string_is_a_path_and_a_map_is_a_computed_or_coerced_field() {
    let text = pipeline(
        r#"      tier: loyalty.tier
      full_name: { jq: '.first + " " + .last' }
      amount: { path: amount, type: number }
      opened: { jq: .opened // .created, type: timestamp }"#,
        DROP,
    );
    let config = PipelineConfig::parse("t.yaml", &text).unwrap();
    let f = &config.sources["crm"].fields;
    assert_eq!(f["tier"], FieldMapping::Path("loyalty.tier".into()));
    assert_eq!(
        f["full_name"],
        FieldMapping::Spec(FieldSpec {
            jq: Some(r#".first + " " + .last"#.into()),
            ..FieldSpec::default()
        })
    );
    assert_eq!(f["amount"].path(), Some("amount"));
    assert_eq!(f["amount"].coerce(), Some(FieldType::Number));
    assert_eq!(f["opened"].jq(), Some(".opened // .created"));
    assert_eq!(f["opened"].coerce(), Some(FieldType::Timestamp));
}

#[test]
fn jq_compile_errors_are_validation_errors_naming_the_field() {
    let text = pipeline(
        r#"      full_name: { jq: '.first +* .last' }
      nick: { jq: 'frobnicate(.a)' }
      tier: loyalty.tier"#,
        "        - { jq: '.action == ' }",
    );
    let errs = errors(&text);
    let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "sources.crm.fields.full_name",
            "sources.crm.fields.nick",
            "sources.crm.filter.drop_if[0].jq"
        ]
    );
    assert_eq!(
        errs[0].1,
        r#"the jq program ".first +* .last" does not compile: unexpected "+*""#
    );
    assert!(
        errs[1].1.ends_with("undefined filter frobnicate/1"),
        "{}",
        errs[1].1
    );
}

#[test]
fn a_mapping_needs_exactly_one_of_path_and_jq() {
    let text = pipeline(
        r#"      both: { path: a, jq: .a }
      neither: { type: number }
      bad_path: { path: "a..b" }"#,
        DROP,
    );
    let errs = errors(&text);
    let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "sources.crm.fields.bad_path",
            "sources.crm.fields.both",
            "sources.crm.fields.neither"
        ]
    );
    assert!(errs[1].1.contains("exactly one of `path`"), "{}", errs[1].1);
}

#[test]
fn unknown_keys_and_types_are_parse_errors_with_a_location() {
    for (fields, needle) in [
        ("      a: { path: a, typo: number }", "unknown field `typo`"),
        (
            "      a: { path: a, type: decimal }",
            "unknown variant `decimal`",
        ),
        ("      a: [x]", "a field path such as `loyalty.tier`"),
    ] {
        let errs = errors(&pipeline(fields, DROP));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].0.starts_with("line "), "{errs:?}");
        assert!(errs[0].1.contains(needle), "{errs:?}");
    }
}

#[test]
fn jq_conditions_stand_alone() {
    let ok = pipeline(
        "      a: a",
        r#"        - { jq: '.action == "heartbeat" or ($type | startswith("admin."))' }
        - { field: "@source", in: [probe] }"#,
    );
    let config = PipelineConfig::parse("t.yaml", &ok).unwrap();
    let drop_if = &config.sources["crm"].filter.as_ref().unwrap().drop_if;
    assert_eq!(
        drop_if[0],
        Condition {
            jq: Some(r#".action == "heartbeat" or ($type | startswith("admin."))"#.into()),
            ..Condition::default()
        }
    );
    let bad = pipeline(
        "      a: a",
        r#"        - { jq: 'true', field: a, equals: 1 }
        - { equals: 1 }
        - { field: "a..b", exists: true }"#,
    );
    let errs = errors(&bad);
    let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "sources.crm.filter.drop_if[0]",
            "sources.crm.filter.drop_if[1]",
            "sources.crm.filter.drop_if[2].field"
        ]
    );
    assert!(errs[0].1.contains("stands alone"), "{}", errs[0].1);
}
