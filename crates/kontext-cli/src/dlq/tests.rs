use super::ledger::*;
use super::letter::*;
use super::*;

fn letter_record(extra: &[(&str, &str)]) -> Record {
    let mut headers = vec![
        Header::new("ce_source", Bytes::from_static(b"erp")),
        Header::new(REPLAY_OF, Bytes::from_static(b"old.dlq/0/1")),
    ];
    for (k, v) in [
        (headers::TOPIC, "context.orders"),
        (headers::PARTITION, "4"),
        (headers::OFFSET, "17"),
        (headers::STAGE, "TRANSFORMATION"),
        (
            headers::EXCEPTION_CLASS_NAME,
            "kontext_stream::normalize::Router::no_source",
        ),
        (
            headers::EXCEPTION_MESSAGE,
            "no source for ce_source \"erp\"",
        ),
        (headers::KIND, "no_source"),
        (headers::TIME, "2026-11-25T12:00:00.000Z"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        headers.push(Header::new(k, Bytes::from(v.to_string())));
    }
    Record {
        topic: "context.orders.dlq".into(),
        partition: 4,
        offset: 2,
        timestamp_ms: 1_700_000_000_000,
        key: Some(Bytes::from_static(b"O-1")),
        value: Some(Bytes::from_static(b"{\"total\":1}")),
        headers,
    }
}

#[test]
fn a_replayed_copy_is_the_original_record_with_a_replay_header() {
    let record = letter_record(&[]);
    let letter = DeadLetter::parse(&record);
    let copy = replay_copy(&record, &letter).unwrap();
    assert_eq!(copy.topic, "context.orders");
    assert_eq!(copy.partition, Some(4));
    assert_eq!(copy.key, record.key);
    assert_eq!(copy.value, record.value);
    assert_eq!(copy.timestamp_ms, Some(record.timestamp_ms));
    // Original headers kept in order; error headers and the older replay mark gone.
    let keys: Vec<&str> = copy.headers.iter().map(|h| h.key.as_str()).collect();
    assert_eq!(keys, ["ce_source", REPLAY_OF]);
    assert_eq!(
        copy.headers[1].value.as_deref(),
        Some(&b"context.orders.dlq/4/2"[..])
    );
}

#[test]
fn a_dead_letter_without_origin_headers_cannot_be_replayed() {
    let mut record = letter_record(&[]);
    record.headers.retain(|h| h.key != headers::PARTITION);
    let letter = DeadLetter::parse(&record);
    assert!(replay_copy(&record, &letter).is_err());
}

/// A dead letter written without its value (too large for the log) is never replayed as a
/// tombstone, which would delete the entity: the replay fails and names the original.
#[test]
fn a_dead_letter_without_its_value_is_not_replayed_as_a_tombstone() {
    let mut record = letter_record(&[(headers::VALUE_OMITTED, "1010000")]);
    record.value = None;
    let letter = DeadLetter::parse(&record);
    let why = replay_copy(&record, &letter).unwrap_err();
    assert!(why.contains("1010000 bytes"), "{why}");
    assert!(why.contains("context.orders/4 offset 17"), "{why}");
}

/// A record that already carried error headers (a dead letter re-produced into its topic,
/// headers and all) fails again: its new letter has both sets, its own first. The letter is
/// this failure's: origin, kind and time come from the writer's headers, the last ones.
#[test]
fn a_letter_of_a_record_with_old_error_headers_is_read_by_the_new_ones() {
    let mut record = letter_record(&[]);
    let stale = [
        (headers::TOPIC, "other"),
        (headers::PARTITION, "9"),
        (headers::OFFSET, "3"),
        (headers::KIND, "invalid_json"),
        (headers::TIME, "2026-01-01T00:00:00.000Z"),
    ];
    let own = stale
        .iter()
        .map(|(k, v)| Header::new(*k, Bytes::from(v.to_string())));
    record.headers.splice(0..0, own);
    let letter = DeadLetter::parse(&record);
    assert_eq!(letter.origin, Some(("context.orders".into(), 4, Some(17))));
    assert_eq!(letter.kind, "no_source");
    assert_eq!(
        letter.time_ms,
        Some(parse_time("2026-11-25T12:00:00Z").unwrap())
    );
    let copy = replay_copy(&record, &letter).unwrap();
    assert_eq!(
        (copy.topic.as_str(), copy.partition),
        ("context.orders", Some(4))
    );
}

#[test]
fn headers_say_stage_kind_time_and_origin() {
    let letter = DeadLetter::parse(&letter_record(&[]));
    assert_eq!(letter.stage, "TRANSFORMATION");
    assert_eq!(letter.kind, "no_source");
    assert_eq!(letter.origin, Some(("context.orders".into(), 4, Some(17))));
    assert_eq!(
        letter.time_ms,
        Some(parse_time("2026-11-25T12:00:00Z").unwrap())
    );
    assert_eq!(letter.at.to_string(), "context.orders.dlq/4/2");
}

#[test]
fn filters_all_have_to_hold() {
    let record = letter_record(&[]);
    let letter = DeadLetter::parse(&record);
    let t = |s: &str| Some(parse_time(s).unwrap());
    let yes = [
        Filter::default(),
        Filter {
            error: Some("source".into()),
            ..Default::default()
        },
        Filter {
            stage: Some("transformation".into()),
            key: Some("O-1".into()),
            ..Default::default()
        },
        Filter {
            since_ms: t("2026-11-25T12:00:00Z"),
            until_ms: t("2026-11-25T12:00:01Z"),
            ..Default::default()
        },
    ];
    for f in &yes {
        assert!(f.matches(&letter, &record), "{f:?}");
    }
    let no = [
        Filter {
            error: Some("invalid_json".into()),
            ..Default::default()
        },
        Filter {
            stage: Some("VALUE_CONVERTER".into()),
            ..Default::default()
        },
        Filter {
            key: Some("O-2".into()),
            ..Default::default()
        },
        Filter {
            until_ms: t("2026-11-25T12:00:00Z"),
            ..Default::default()
        },
        Filter {
            since_ms: t("2026-11-25T12:00:00.001Z"),
            ..Default::default()
        },
    ];
    for f in &no {
        assert!(!f.matches(&letter, &record), "{f:?}");
    }
}

#[test]
fn replay_skips_only_what_the_ledger_says_landed() {
    let done = Known::Done {
        topic: "t".into(),
        partition: 0,
        offset: Some(3),
        time: String::new(),
    };
    let pending = Known::Pending {
        topic: "t".into(),
        partition: 0,
        scan_from: 3,
    };
    assert_eq!(decide(false, Some(&done), true), Decision::Filtered);
    assert_eq!(decide(true, None, false), Decision::Replay);
    assert_eq!(decide(true, Some(&done), false), Decision::Skip);
    assert_eq!(decide(true, Some(&done), true), Decision::Replay);
    // An intent whose copy recovery did not find: it never landed.
    assert_eq!(decide(true, Some(&pending), false), Decision::Replay);
}

#[test]
fn the_last_ledger_entry_wins() {
    let mut ledger = Ledger {
        topic: "x.replayed".into(),
        entries: HashMap::new(),
    };
    let entry = |state, offset| LedgerEntry {
        state,
        of: "x/0/1".into(),
        topic: "t".into(),
        partition: 0,
        scan_from: Some(5),
        offset,
        time: String::new(),
        pipeline: "p".into(),
    };
    ledger.apply(entry(EntryState::Intent, None));
    assert!(!ledger.is_done("x/0/1"));
    ledger.apply(entry(EntryState::Done, Some(5)));
    assert!(ledger.is_done("x/0/1"));
    // --force writes a new intent: pending again until its done.
    ledger.apply(entry(EntryState::Intent, None));
    assert!(!ledger.is_done("x/0/1"));
}

#[test]
fn coordinates_round_trip() {
    let c: Coord = "context.orders.dlq/3/17".parse().unwrap();
    assert_eq!(
        (c.topic.as_str(), c.partition, c.offset),
        ("context.orders.dlq", 3, 17)
    );
    assert_eq!(c.to_string(), "context.orders.dlq/3/17");
    assert!("context.orders.dlq/x/17".parse::<Coord>().is_err());
    assert!("17".parse::<Coord>().is_err());
    // The logs' form of the same place.
    let at: Coord = "context.orders.dlq/3@17".parse().unwrap();
    assert_eq!(at.to_string(), "context.orders.dlq/3/17");
    for bad in ["context.orders/3@x", "3@17", "context.orders@17"] {
        assert!(bad.parse::<Coord>().is_err(), "{bad}");
    }
}

#[test]
fn times_are_rfc3339_or_a_duration_ago() {
    assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
    let ago = parse_time("1h").unwrap();
    assert!((now_ms() - ago - 3_600_000).abs() < 60_000);
    assert!(parse_time("yesterday").is_err());
}

#[test]
fn hex_dump_shows_offsets_bytes_and_ascii() {
    let lines = hex_dump(&[b'{', 0xc3, 0x28, b'}']);
    assert_eq!(
        lines,
        ["00000000  7b c3 28 7d".to_string() + &" ".repeat(36) + "  |{.(}|"]
    );
}
