use super::*;

const VALID: &str = r#"
name: demo
entities:
  customer: { key: customer_id, topic: context.customers }
  order:
    key: order_id
    topic: context.orders
    belongs_to: { customer: customer_id }
sources:
  crm:
    topic: context.customers
    entity: customer
    match: { ce_source: crm }
    fields: { given_name: first_name, tier: loyalty.tier }
  shop:
    topic: context.orders
    entity: order
    fields: { customer_id: customer_ref }
    filter:
      drop_if:
        - { field: status, in: [test] }
"#;

#[test]
fn parses_a_valid_file_with_defaults() {
    let c = PipelineConfig::parse("p.yaml", VALID).unwrap();
    assert_eq!(c.topics.partitions, 12);
    assert_eq!(
        c.log,
        LogConfig::Embedded {
            fsync: FsyncMode::GroupCommit
        }
    );
    assert_eq!(c.store_group("main"), "kontext.demo.store.main");
    assert_eq!(
        c.source_topics(),
        vec!["context.customers", "context.orders"]
    );
    assert_eq!(c.entities["order"].belongs_to["customer"], "customer_id");
}

#[test]
fn unknown_keys_are_errors_with_a_location() {
    let text = VALID.replace("name: demo", "name: demo\nbakend: kafka");
    let err = PipelineConfig::parse("p.yaml", &text).unwrap_err();
    assert_eq!(err.file, "p.yaml");
    assert!(err.errors[0].field.starts_with("line "), "{err}");
    assert!(err.errors[0].message.contains("bakend"), "{err}");
}

#[test]
fn reports_all_semantic_errors_at_once() {
    let text = r#"
name: "bad name"
topics: { partitions: 0 }
entities:
  order:
    key: order_id
    topic: "context orders"
    belongs_to: { customer: customer_id }
sources:
  shop:
    topic: context.orders
    entity: orders
    fields: { customer_id: "a..b" }
    filter: { drop_if: [ { field: x } ] }
serve: { listen: nowhere }
"#;
    let err = PipelineConfig::parse("bad.yaml", text).unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    for expected in [
        "name",
        "topics.partitions",
        "entities.order.topic",
        "entities.order.belongs_to.customer",
        "sources.shop.entity",
        "sources.shop.fields.customer_id",
        "sources.shop.filter.drop_if[0]",
        "serve.listen",
    ] {
        assert!(fields.contains(&expected), "missing {expected} in {err}");
    }
    let shown = err.to_string();
    assert!(shown.starts_with("bad.yaml: 8 errors"), "{shown}");
    assert!(
        shown.contains("unknown entity type \"orders\"; declared: order"),
        "{shown}"
    );
}

/// The API binds to an IP address or a host name it resolves; anything else is refused.
#[test]
fn serve_listen_takes_an_address_or_a_host_name_with_a_port() {
    for ok in [
        "127.0.0.1:8080",
        "0.0.0.0:0",
        "[::1]:8080",
        "localhost:8080",
        "ctx-1.internal:80",
    ] {
        let text = format!("{VALID}serve: {{ listen: \"{ok}\" }}\n");
        PipelineConfig::parse("p.yaml", &text).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in [
        "nowhere",
        "localhost",
        ":8080",
        "localhost:",
        "localhost:99999",
        "a b:80",
        "a..b:80",
    ] {
        let text = format!("{VALID}serve: {{ listen: \"{bad}\" }}\n");
        let err = PipelineConfig::parse("p.yaml", &text).expect_err(bad);
        assert_eq!(err.errors[0].field, "serve.listen", "{bad}: {err}");
    }
}

#[test]
fn two_catch_all_sources_on_one_topic_are_rejected() {
    let text = VALID.replace("    match: { ce_source: crm }\n", "")
        + r#"
  crm2:
    topic: context.customers
    entity: customer
    fields: { email: email }
"#;
    let err = PipelineConfig::parse("p.yaml", &text).unwrap_err();
    assert!(
        err.errors.iter().any(|e| e.field == "sources.crm2.match"),
        "{err}"
    );
}

/// `log.replication_factor`: the topics' replication, for Kafka only, at least 1.
#[test]
fn the_replication_factor_is_a_kafka_setting_of_at_least_one() {
    let with = |log: &str| {
        PipelineConfig::parse(
            "p.yaml",
            &VALID.replace("name: demo", &format!("name: demo\nlog: {log}")),
        )
    };
    match with("{ backend: kafka, bootstrap_servers: \"b:9092\", replication_factor: 3 }")
        .unwrap()
        .log
    {
        LogConfig::Kafka {
            replication_factor, ..
        } => assert_eq!(replication_factor, Some(3)),
        other => panic!("{other:?}"),
    }
    let zero = with("{ backend: kafka, bootstrap_servers: \"b:9092\", replication_factor: 0 }")
        .unwrap_err();
    assert!(
        zero.to_string()
            .contains("log.replication_factor: 0 is not a replication factor"),
        "{zero}"
    );
    let embedded = with("{ replication_factor: 3 }").unwrap_err();
    assert!(
        embedded
            .to_string()
            .contains("log.replication_factor: a setting of backend: kafka"),
        "{embedded}"
    );
}

#[test]
fn kafka_backend_parses() {
    let text = VALID.replace("name: demo", "name: demo\nlog: { backend: kafka, bootstrap_servers: \"127.0.0.1:9092\", properties: { security.protocol: plaintext } }");
    let c = PipelineConfig::parse("p.yaml", &text).unwrap();
    match c.log {
        LogConfig::Kafka {
            bootstrap_servers,
            properties,
            exactly_once,
            replication_factor,
        } => {
            assert!(!exactly_once, "off unless asked for");
            assert_eq!(replication_factor, None, "the brokers' default");
            assert_eq!(bootstrap_servers, "127.0.0.1:9092");
            assert_eq!(properties["security.protocol"], "plaintext");
        }
        other => panic!("expected kafka, got {other:?}"),
    }
}

#[test]
fn render_section_defaults_to_cl100k_and_no_priority() {
    let c = PipelineConfig::parse("p.yaml", VALID).unwrap();
    assert_eq!(c.serve.render, RenderConfig::default());
    assert_eq!(c.serve.render.tokenizer, Tokenizer::Cl100k);
}

#[test]
fn the_api_shares_the_pipelines_runtime_unless_given_threads() {
    let c = PipelineConfig::parse("p.yaml", VALID).unwrap();
    assert_eq!(c.serve.threads, 0);
    let c = PipelineConfig::parse("p.yaml", &format!("{VALID}serve:\n  threads: 2\n")).unwrap();
    assert_eq!(c.serve.threads, 2);
    let err = PipelineConfig::parse("p.yaml", &format!("{VALID}serve:\n  threads: -1\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("threads"), "{err}");
}

#[test]
fn a_realtime_priority_is_for_the_apis_own_threads_only() {
    let c = PipelineConfig::parse("p.yaml", VALID).unwrap();
    assert_eq!(c.serve.realtime_priority, 0);
    let yaml = format!("{VALID}serve:\n  threads: 2\n  realtime_priority: 10\n");
    let c = PipelineConfig::parse("p.yaml", &yaml).unwrap();
    assert_eq!((c.serve.threads, c.serve.realtime_priority), (2, 10));
    let err = PipelineConfig::parse(
        "p.yaml",
        &format!("{VALID}serve:\n  realtime_priority: 10\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("serve.realtime_priority"), "{err}");
    assert!(err.contains("set serve.threads to 1 or more"), "{err}");
    let yaml = format!("{VALID}serve:\n  threads: 2\n  realtime_priority: 100\n");
    let err = PipelineConfig::parse("p.yaml", &yaml)
        .unwrap_err()
        .to_string();
    assert!(err.contains("serve.realtime_priority"), "{err}");
    assert!(err.contains("use 1 to 99"), "{err}");
}

#[test]
fn render_priority_and_tokenizer_parse() {
    let text = format!(
        "{VALID}serve:\n  render:\n    priority: [related.order, fields, belongs_to.customer, provenance]\n    tokenizer: o200k\n"
    );
    let c = PipelineConfig::parse("p.yaml", &text).unwrap();
    assert_eq!(c.serve.render.tokenizer, Tokenizer::O200k);
    let sections: Vec<RenderSection> = c
        .serve
        .render
        .priority
        .iter()
        .filter_map(|s| RenderSection::parse(s))
        .collect();
    assert_eq!(
        sections,
        vec![
            RenderSection::Related("order".into()),
            RenderSection::Fields,
            RenderSection::BelongsTo("customer".into()),
            RenderSection::Provenance,
        ]
    );
}

#[test]
fn render_priority_names_only_sections_the_pipeline_has() {
    let text = format!(
        "{VALID}serve:\n  render:\n    priority: [fields, related.customer, belongs_to.order, related.orders, headers, fields]\n"
    );
    let err = PipelineConfig::parse("p.yaml", &text).unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        vec![
            "serve.render.priority[1]",
            "serve.render.priority[2]",
            "serve.render.priority[3]",
            "serve.render.priority[4]",
            "serve.render.priority[5]",
        ],
        "{err}"
    );
    let shown = err.to_string();
    assert!(shown.contains("related types: order"), "{shown}");
    assert!(shown.contains("listed twice"), "{shown}");
}

#[test]
fn unknown_tokenizer_is_an_error() {
    let text = format!("{VALID}serve:\n  render: {{ tokenizer: gpt2 }}\n");
    let err = PipelineConfig::parse("p.yaml", &text).unwrap_err();
    assert!(err.to_string().contains("gpt2"), "{err}");
}

#[test]
fn one_embedded_store_named_main_by_default() {
    let c = PipelineConfig::parse("p.yaml", VALID).unwrap();
    assert_eq!(c.stores(), vec![StoreConfig::default()]);
    assert_eq!(c.served_store().name, "main");
}

#[test]
fn several_stores_each_with_their_group_and_a_served_one() {
    let text = format!(
        "{VALID}stores:\n  - {{ name: fast, context_cache: 0, sync_interval: 250ms }}\n  - {{ name: pg, kind: postgres, url: \"${{PG_URL}}\", schema: ctx }}\nserve: {{ store: pg }}\n"
    );
    let c = PipelineConfig::parse("p.yaml", &text).unwrap();
    let stores = c.stores();
    assert_eq!(stores.len(), 2);
    assert_eq!(stores[0].context_cache, Some(0));
    assert_eq!(
        stores[0].sync_interval,
        Some(std::time::Duration::from_millis(250))
    );
    assert_eq!(stores[1].sync_interval, None);
    assert_eq!(stores[1].kind, StoreKind::Postgres);
    assert_eq!(c.served_store().name, "pg");
    assert_ne!(c.store_group("fast"), c.store_group("pg"));
}

#[test]
fn store_mistakes_name_the_field_and_the_fix() {
    let text = format!(
        "{VALID}stores:\n  - {{ name: a, kind: postgres }}\n  - {{ name: a, url: \"postgres://x\" }}\n  - {{ name: c, kind: postgres, url: \"mysql://x\" }}\n  - {{ name: d, kind: postgres, url: \"postgres://x\", context_cache: 10, sync_interval: 5ms }}\n  - {{ name: d.v2 }}\n  - {{ name: d.v2b }}\nserve: {{ store: nope }}\n"
    );
    let err = PipelineConfig::parse("p.yaml", &text).unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        vec![
            "stores[0].url",
            "stores[1].name",
            "stores[1].url",
            "stores[2].url",
            "stores[3].context_cache",
            "stores[3].sync_interval",
            "stores[4].name",
            "serve.store"
        ],
        "{err}"
    );
    assert!(
        err.to_string().contains("a postgres store needs `url:"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("ends like a rebuilt version's file"),
        "{err}"
    );
}

/// A dead-letter topic the pipeline reads would feed bad records back in for ever: an empty
/// suffix (every topic its own dead-letter topic), or one that maps a topic onto another.
#[test]
fn a_dead_letter_topic_the_pipeline_reads_is_rejected() {
    let empty = format!("{VALID}dead_letter: {{ suffix: \"\" }}\n");
    let err = PipelineConfig::parse("p.yaml", &empty).unwrap_err();
    assert_eq!(err.errors.len(), 2, "{err}");
    assert!(
        err.errors
            .iter()
            .all(|e| e.field == "dead_letter.suffix" && e.message.contains("reads")),
        "{err}"
    );
    let onto = VALID.replace("topic: context.orders\n", "topic: context.customers.x\n")
        + "dead_letter: { suffix: \".x\" }\n";
    let err = PipelineConfig::parse("p.yaml", &onto).unwrap_err();
    assert_eq!(err.errors.len(), 1, "{err}");
    assert!(err.to_string().contains("\"context.customers.x\""), "{err}");
    let disabled = format!("{VALID}dead_letter: {{ enabled: false, suffix: \"\" }}\n");
    PipelineConfig::parse("p.yaml", &disabled).unwrap();
}

/// The features topics (`<entity topic>.features`) are read too, through built-in sources
/// added after validation: a dead-letter suffix of `.features` would send bad customer records
/// into the customers' features topic, and an entity topic named like one would mix the two.
#[test]
fn the_features_topics_clash_with_no_dead_letter_or_entity_topic() {
    let features = format!(
        "{VALID}features:\n  orders_30d: {{ from: order, entity: customer, key: customer_id, agg: count, window: 30d }}\n"
    );
    PipelineConfig::parse("p.yaml", &features).unwrap();
    let suffix = format!("{features}dead_letter: {{ suffix: \".features\" }}\n");
    let err = PipelineConfig::parse("p.yaml", &suffix).unwrap_err();
    assert!(
        err.errors.iter().any(|e| e.field == "dead_letter.suffix"
            && e.message.contains("\"context.customers.features\"")),
        "{err}"
    );
    // The orders' entity and source topic named like the customers' features topic.
    let entity = features.replace(
        "topic: context.orders\n",
        "topic: context.customers.features\n",
    );
    let err = PipelineConfig::parse("p.yaml", &entity).unwrap_err();
    assert!(
        err.errors.iter().any(|e| e.field == "entities.order.topic"),
        "{err}"
    );
    // A features topic's own dead-letter topic may not be one the pipeline reads either.
    let onto = features.replace(
        "topic: context.orders
",
        "topic: context.customers.features.x
",
    ) + "dead_letter: { suffix: \".x\" }\n";
    let err = PipelineConfig::parse("p.yaml", &onto).unwrap_err();
    assert!(
        err.errors.iter().any(|e| e.field == "dead_letter.suffix"
            && e.message.contains(
                "the dead-letter topic of \"context.customers.features\" would be \"context.customers.features.x\""
            )),
        "{err}"
    );
}

#[test]
fn store_and_stores_together_are_rejected() {
    let text = format!("{VALID}store: {{ name: x }}\nstores: [{{ name: y }}]\n");
    let err = PipelineConfig::parse("p.yaml", &text).unwrap_err();
    assert_eq!(err.errors[0].field, "stores", "{err}");
}

#[test]
fn a_url_from_the_environment_is_resolved_or_named_when_missing() {
    let store = StoreConfig {
        name: "pg".into(),
        kind: StoreKind::Postgres,
        url: Some("${KONTEXT_CONFIG_TEST_UNSET_VAR}".into()),
        schema: None,
        context_cache: None,
        sync_interval: None,
    };
    let e = store.resolved_url().unwrap_err();
    assert!(e.contains("KONTEXT_CONFIG_TEST_UNSET_VAR"), "{e}");
    let plain = StoreConfig {
        url: Some("postgres://u@h/db".into()),
        ..store
    };
    assert_eq!(
        plain.resolved_url().unwrap().as_deref(),
        Some("postgres://u@h/db")
    );
}

#[test]
fn exactly_once_is_a_kafka_setting() {
    let kafka = VALID.replace(
        "name: demo",
        "name: demo\nlog: { backend: kafka, bootstrap_servers: \"127.0.0.1:9092\", exactly_once: true }",
    );
    assert!(PipelineConfig::parse("p.yaml", &kafka)
        .unwrap()
        .log
        .exactly_once());
    assert!(!PipelineConfig::parse("p.yaml", VALID)
        .unwrap()
        .log
        .exactly_once());
    // The embedded log commits a batch in one atomic write already: the setting is refused
    // there, by name, rather than silently ignored.
    let embedded = VALID.replace(
        "name: demo",
        "name: demo\nlog: { backend: embedded, exactly_once: true }",
    );
    let err = PipelineConfig::parse("p.yaml", &embedded).unwrap_err();
    assert_eq!(err.errors[0].field, "log.exactly_once", "{err}");
}

/// A librdkafka setting kontext's guarantees depend on is refused by `validate`, by name, not
/// only when `kontext run` builds its Kafka clients.
#[test]
fn reserved_kafka_properties_are_refused_by_name() {
    let text = VALID.replace(
        "name: demo",
        "name: demo\nlog: { backend: kafka, bootstrap_servers: \"b:9092\", properties: { acks: \"1\", linger.ms: \"5\", group.id: g } }",
    );
    let err = PipelineConfig::parse("p.yaml", &text).unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        ["log.properties.acks", "log.properties.group.id"],
        "{err}"
    );
    assert!(err.errors[0].message.contains("remove it"), "{err}");
}

/// `log:` reports an unknown key where it is (serde's tagged enums report line 1, column 1),
/// a key of the other backend by name, and `backend` defaults to `embedded`.
#[test]
fn log_errors_say_where_and_which_key() {
    let with_log = |log: &str| VALID.replace("name: demo\n", &format!("name: demo\nlog:\n{log}"));
    let err = PipelineConfig::parse("p.yaml", &with_log("  backend: embedded\n  fsynk: never\n"))
        .unwrap_err();
    assert_eq!(err.errors[0].field, "line 5, column 3", "{err}");
    assert!(
        err.errors[0].message.contains("unknown field `fsynk`"),
        "{err}"
    );
    let err = PipelineConfig::parse(
        "p.yaml",
        &with_log("  backend: kafka\n  bootstrap_servers: b:9092\n  fsync: never\n"),
    )
    .unwrap_err();
    assert_eq!(err.errors[0].field, "log.fsync", "{err}");
    let err = PipelineConfig::parse("p.yaml", &with_log("  backend: kafka\n")).unwrap_err();
    assert_eq!(err.errors[0].field, "log.bootstrap_servers", "{err}");
    let c = PipelineConfig::parse("p.yaml", &with_log("  fsync: never\n")).unwrap();
    assert_eq!(
        c.log,
        LogConfig::Embedded {
            fsync: FsyncMode::Never
        }
    );
}

/// Overrides apply to entity topics: one keyed by a features, dead-letter or unknown topic
/// would do nothing, so it is an error naming the topic to set instead.
#[test]
fn an_override_of_a_topic_that_is_not_an_entity_topic_is_rejected() {
    let with = |topic: &str| {
        let text = VALID.replace(
            "entities:",
            &format!("topics: {{ overrides: {{ {topic}: {{ partitions: 3 }} }} }}\nentities:"),
        );
        let err = PipelineConfig::parse("p.yaml", &text).unwrap_err();
        let field = format!("topics.overrides.{topic}");
        let error =
            (err.errors.iter().find(|e| e.field == field)).unwrap_or_else(|| panic!("{err}"));
        error.message.clone()
    };
    let features = with("context.customers.features");
    assert!(
        features.contains("the features topic of entity topic \"context.customers\"")
            && features.contains("set topics.overrides.context.customers instead"),
        "{features}"
    );
    let letters = with("context.customers.dlq");
    assert!(
        letters.contains("a dead-letter topic of entity topic"),
        "{letters}"
    );
    let unknown = with("context.custmers");
    assert!(
        unknown.contains("not an entity topic of this pipeline (context."),
        "{unknown}"
    );
    let ok = VALID.replace(
        "entities:",
        "topics: { overrides: { context.customers: { partitions: 3 } } }\nentities:",
    );
    PipelineConfig::parse("p.yaml", &ok).expect("an entity topic's override");
}

/// Compaction keeps one record per key: on a topic two sources write, a log (and any store
/// rebuilt from it) would keep one source's fields of each entity.
#[test]
fn a_compacted_topic_written_by_several_sources_is_rejected() {
    let compacted = VALID.replace(
        "entities:",
        "topics: { overrides: { context.customers: { compacted: true } } }\nentities:",
    );
    PipelineConfig::parse("p.yaml", &compacted).expect("one source may write a compacted topic");
    let text = compacted
        + r#"
  billing:
    topic: context.customers
    entity: customer
    match: { ce_source: billing }
    fields: { plan: plan }
"#;
    let err = PipelineConfig::parse("p.yaml", &text).unwrap_err();
    let error = err
        .errors
        .iter()
        .find(|e| e.field == "topics.overrides.context.customers.compacted")
        .unwrap_or_else(|| panic!("{err}"));
    assert!(error.message.contains("sources billing, crm"), "{err}");
    assert!(error.message.contains("remove `compacted`"), "{err}");
}

/// The schemas of a PostgreSQL store's rebuilt versions name the store, so two stores in one
/// database never rebuild into (and drop) the same schema; names that would still meet, or
/// not fit PostgreSQL's 63-byte identifiers, are rejected.
#[test]
fn postgres_stores_rebuild_into_schemas_of_their_own() {
    let store = |name: &str, schema: Option<&str>| StoreConfig {
        name: name.into(),
        kind: StoreKind::Postgres,
        url: Some("postgres://u@h/db".into()),
        schema: schema.map(str::to_owned),
        ..StoreConfig::default()
    };
    let (a, b) = (store("a", None), store("b", Some("kontext")));
    assert_eq!(a.version_schema(0), None);
    assert_eq!(b.version_schema(0).as_deref(), Some("kontext"));
    assert_eq!(a.version_schema(1).as_deref(), Some("kontext_a_v1"));
    assert_eq!(b.version_schema(1).as_deref(), Some("kontext_b_v1"));
    assert_eq!(
        store("Pg.Main-1", Some("ctx")).version_schema(7).as_deref(),
        Some("ctx_pg_main_1_v7")
    );

    let with_stores =
        |stores: &str| VALID.replace("entities:", &format!("stores:\n{stores}\nentities:"));
    let ok = with_stores("  - { name: a, kind: postgres, url: \"postgres://u@h/db\" }\n  - { name: b, kind: postgres, url: \"postgres://u@h/db\", schema: kontext }");
    PipelineConfig::parse("p.yaml", &ok).unwrap();
    let clash = with_stores("  - { name: a-b, kind: postgres, url: \"postgres://u@h/db\" }\n  - { name: a_b, kind: postgres, url: \"postgres://u@h/db\" }");
    let err = PipelineConfig::parse("p.yaml", &clash).unwrap_err();
    assert!(
        err.errors
            .iter()
            .any(|e| e.field == "stores[1].name" && e.message.contains("kontext_a_b_v1")),
        "{err}"
    );
    let long = with_stores(&format!(
        "  - {{ name: {}, kind: postgres, url: \"postgres://u@h/db\" }}",
        "n".repeat(50)
    ));
    let err = PipelineConfig::parse("p.yaml", &long).unwrap_err();
    assert!(
        err.errors
            .iter()
            .any(|e| e.field == "stores[0].name" && e.message.contains("63 bytes")),
        "{err}"
    );
}

#[test]
fn a_whole_env_reference_is_resolved_and_a_missing_one_named() {
    std::env::set_var("KONTEXT_TEST_RESOLVE_ENV", "s3cret");
    assert_eq!(
        resolve_env(
            "${KONTEXT_TEST_RESOLVE_ENV}",
            "log.properties.sasl.password"
        )
        .unwrap(),
        "s3cret"
    );
    assert_eq!(resolve_env("plain", "x").unwrap(), "plain");
    assert_eq!(
        resolve_env("a${B}", "x").unwrap(),
        "a${B}",
        "only a whole reference"
    );
    let err = resolve_env(
        "${KONTEXT_TEST_NOT_SET_ANYWHERE}",
        "log.properties.sasl.password",
    )
    .unwrap_err();
    assert!(
        err.contains("log.properties.sasl.password")
            && err.contains("KONTEXT_TEST_NOT_SET_ANYWHERE"),
        "{err}"
    );
}

#[test]
fn state_budgets_default_to_the_runtime_and_parse_in_bytes() {
    let c = PipelineConfig::parse("p.yaml", VALID).unwrap();
    assert_eq!(c.state, StateConfig::default());
    assert_eq!(c.state.key_index_bytes, None);
    let text = format!("{VALID}state: {{ value_cache_bytes: 0, key_index_bytes: 268435456 }}\n");
    let c = PipelineConfig::parse("p.yaml", &text).unwrap();
    assert_eq!(c.state.value_cache_bytes, Some(0));
    assert_eq!(c.state.key_index_bytes, Some(256 << 20));
    let text = format!("{VALID}state: {{ key_index: 1 }}\n");
    let err = PipelineConfig::parse("p.yaml", &text).unwrap_err();
    assert!(err.to_string().contains("key_index"), "{err}");
    let text = format!("{VALID}state: {{ key_index_bytes: 64MiB }}\n");
    let err = PipelineConfig::parse("p.yaml", &text).unwrap_err();
    assert!(err.to_string().contains("state"), "{err}");
}
