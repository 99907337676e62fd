use super::*;
use crate::config::PipelineConfig;

const BASE: &str = r#"
name: demo
entities:
  customer: { key: customer_id, topic: context.customers }
sources:
  crm:
    topic: context.customers
    entity: customer
    fields: { given_name: first_name }
"#;

fn parse(extra: &str) -> Result<PipelineConfig, crate::config::ConfigError> {
    PipelineConfig::parse("p.yaml", &format!("{BASE}{extra}"))
}

#[test]
fn without_a_retry_section_every_stage_has_its_builtin_policy() {
    let c = parse("").unwrap();
    for stage in RetryStage::ALL {
        assert_eq!(c.retry.policy(stage), stage.builtin(), "{stage}");
    }
    let w = c.retry.policy(RetryStage::StoreWrite);
    assert_eq!(w.first_delay, Duration::from_millis(100));
    assert_eq!(w.multiplier, 2.0);
    assert_eq!(w.max_delay, Duration::from_secs(30));
    assert_eq!(w.jitter, Jitter::Equal);
    assert_eq!(w.max_attempts, Some(5));
    assert!(!c.retry.policy(RetryStage::StoreProbe).is_bounded());
    assert_eq!(c.limits.max_record_bytes, DEFAULT_MAX_RECORD_BYTES);
    assert_eq!(c.limits.max_event_time_ahead, Duration::from_secs(3600));
    assert_eq!(c.limits.max_event_time_ahead_ms(), 3_600_000);
}

#[test]
fn a_stage_field_wins_over_defaults_which_win_over_builtins() {
    let c = parse(
        r#"
retry:
  defaults: { first_delay: 50ms, jitter: full, max_attempts: 3 }
  store_write: { first_delay: 10ms, max_elapsed: 0 }
  store_probe: { max_delay: 2s, max_attempts: 0 }
limits: { max_record_bytes: 4096, max_event_time_ahead: 0 }
"#,
    )
    .unwrap();
    let w = c.retry.policy(RetryStage::StoreWrite);
    assert_eq!(w.first_delay, Duration::from_millis(10));
    assert_eq!(w.jitter, Jitter::Full);
    assert_eq!(w.max_attempts, Some(3));
    assert_eq!(w.max_elapsed, None, "0 means no limit");
    let p = c.retry.policy(RetryStage::StoreProbe);
    assert_eq!(p.first_delay, Duration::from_millis(50));
    assert_eq!(p.max_delay, Duration::from_secs(2));
    assert_eq!(p.max_attempts, None, "0 means no limit");
    let d = c.retry.policy(RetryStage::DeadLetter);
    assert_eq!(d.max_attempts, Some(3));
    assert_eq!(d.max_delay, Duration::from_secs(30));
    assert_eq!(c.limits.max_record_bytes, 4096);
    assert_eq!(c.limits.max_event_time_ahead_ms(), 0, "0: no limit");
    let c = parse("limits: { max_event_time_ahead: 24h }\n").unwrap();
    assert_eq!(c.limits.max_event_time_ahead_ms(), 86_400_000);
    let err = parse("limits: { max_event_time_ahead: soon }\n").unwrap_err();
    assert!(
        err.to_string().contains("invalid duration \"soon\""),
        "{err}"
    );
}

#[test]
fn unknown_retry_fields_are_errors() {
    let err = parse("retry: { store_write: { max_retries: 3 } }\n").unwrap_err();
    assert!(err.errors[0].message.contains("max_retries"), "{err}");
    let err = parse("retry: { storewrite: {} }\n").unwrap_err();
    assert!(err.errors[0].message.contains("storewrite"), "{err}");
}

#[test]
fn retry_mistakes_name_the_field_and_the_fix() {
    let err = parse(
        r#"
retry:
  defaults: { multiplier: 0.5 }
  store_write: { max_attempts: 0, max_elapsed: 0 }
  store_probe: { first_delay: 0ms }
  dead_letter: { first_delay: 10s, max_delay: 1s }
limits: { max_record_bytes: 0 }
"#,
    )
    .unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        vec![
            "retry.defaults.multiplier",
            "retry.store_probe.first_delay",
            "retry.dead_letter.first_delay",
            "retry.store_write.max_attempts",
            "limits.max_record_bytes",
        ],
        "{err}"
    );
    assert!(err.errors[0].message.contains("use 1"), "{err}");
    assert!(err.errors[2].message.contains("raise max_delay"), "{err}");
    assert!(err.errors[3].message.contains("set max_attempts"), "{err}");
}

/// Delays that conflict in `defaults` are named there, once, not as three errors about stages
/// the file does not mention; a stage that sets a delay of its own is named itself.
#[test]
fn conflicting_default_delays_are_named_where_they_were_written() {
    let err = parse("retry:\n  defaults: { first_delay: 10s, max_delay: 1s }\n").unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, vec!["retry.defaults.first_delay"], "{err}");
    let err = parse("retry:\n  defaults: { max_delay: 1s }\n  store_probe: { first_delay: 2s }\n")
        .unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, vec!["retry.store_probe.first_delay"], "{err}");
}

#[test]
fn a_retry_section_survives_a_yaml_round_trip() {
    let c = parse("retry: { store_write: { first_delay: 250us, jitter: none } }\n").unwrap();
    let text = serde_yaml_ng::to_string(&c).unwrap();
    let again = PipelineConfig::parse("again.yaml", &text).unwrap();
    assert_eq!(again.retry, c.retry);
    assert_eq!(
        again.retry.policy(RetryStage::StoreWrite).first_delay,
        Duration::from_micros(250)
    );
}

#[test]
fn waits_take_the_default_delays_and_never_give_up() {
    let config = parse(
        "retry:\n  defaults: { first_delay: 50ms, max_delay: 5s, max_attempts: 3, jitter: none }\n",
    )
    .unwrap();
    let policy = config.retry.waiting_policy();
    assert_eq!(policy.first_delay, Duration::from_millis(50));
    assert_eq!(policy.max_delay, Duration::from_secs(5));
    assert_eq!(policy.jitter, Jitter::None);
    assert!(
        !policy.is_bounded(),
        "a wait has no attempt limit: {policy:?}"
    );
    let builtin = parse("").unwrap().retry.waiting_policy();
    assert_eq!(builtin.first_delay, Duration::from_millis(100));
    assert_eq!(builtin.max_delay, Duration::from_secs(30));
}

/// `max_delay` is 1 ms to 1 h, as the reference says: a sub-millisecond cap would make every
/// retry a busy loop.
#[test]
fn max_delay_is_a_millisecond_to_an_hour() {
    for bad in ["500us", "0ms", "2h"] {
        let err = parse(&format!(
            "retry:\n  defaults: {{ first_delay: 1us, max_delay: {bad} }}\n"
        ))
        .expect_err(bad);
        assert!(
            err.errors
                .iter()
                .any(|e| e.field == "retry.defaults.max_delay"),
            "{bad}: {err}"
        );
    }
    parse("retry:\n  defaults: { first_delay: 1ms, max_delay: 1ms }\n").unwrap();
}
