//! `kontext topics create|list|describe` on both backends, through the real binary.

use std::process::Command;

fn kontext(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kontext"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kontext");
    assert!(
        out.status.success(),
        "kontext {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn create_list_describe(backend: &[&str], topic: &str) {
    // The backend flags are global to `topics`: they may follow any of its subcommands.
    let args = |rest: &[&str]| -> Vec<String> {
        rest.iter().chain(backend).map(|s| s.to_string()).collect()
    };
    let run = |rest: &[&str]| {
        let a = args(rest);
        kontext(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert!(run(&[
        "topics",
        "create",
        topic,
        "--partitions",
        "3",
        "--compacted"
    ])
    .contains(&format!("created {topic} (3 partitions, compacted)")));
    assert!(run(&["topics", "create", topic, "--partitions", "3"]).contains("already exists"));
    assert!(run(&["topics", "list"]).lines().any(|l| l == topic));
    let described = run(&["topics", "describe", topic]);
    assert!(described.contains("partitions 3"), "{described}");
    assert!(described.contains("compacted true"), "{described}");
    // Header plus one row per partition.
    assert_eq!(
        described
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .count(),
        3,
        "{described}"
    );
}

#[test]
fn topics_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    create_list_describe(&["--data-dir", data], "context.things");
    // --all creates every topic of the pipeline (the built-in one by default) and of its
    // dead-letter tools, and names them.
    let created = kontext(&["topics", "create", "--all", "--data-dir", data]);
    let listed = kontext(&["topics", "list", "--data-dir", data]);
    for t in [
        "context.customers",
        "context.interactions",
        "context.orders",
        "context.tickets",
        "context.orders.features",
        "context.orders.dlq",
        "context.orders.dlq.replayed",
        "customer-service-features-repartition",
        "customer-service-order_total_30d-changelog",
    ] {
        assert!(
            created.lines().any(|l| l == t),
            "{t} missing from {created}"
        );
        assert!(listed.lines().any(|l| l == t), "{t} missing from {listed}");
    }
    assert!(listed.lines().any(|l| l == "context.things"), "{listed}");
}

/// The test broker, and a suffix that makes this run's topic names new on it.
fn kafka_and_suffix() -> (String, String) {
    let bootstrap = std::env::var("KONTEXT_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    (bootstrap, format!("{nanos:x}"))
}

#[test]
fn topics_on_kafka() {
    let (bootstrap, suffix) = kafka_and_suffix();
    create_list_describe(&["--kafka", &bootstrap], &format!("cli-topics-{suffix}"));
}

/// On Kafka: `log.replication_factor` reaches the topics kontext creates. The test broker
/// is a single node, so 2 is refused by the broker and 1 is made.
#[test]
fn the_pipeline_files_replication_factor_reaches_the_broker() {
    let (bootstrap, suffix) = kafka_and_suffix();
    let topic = format!("cli-replicated-{suffix}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pipeline.yaml");
    let pipeline = |factor: u8| {
        format!(
            "name: cli-replicated\nlog: {{ backend: kafka, bootstrap_servers: \"{bootstrap}\", replication_factor: {factor} }}\nentities:\n  thing: {{ key: id, topic: {topic} }}\nsources:\n  feed: {{ topic: {topic}, entity: thing, fields: {{ name: name }} }}\n"
        )
    };
    std::fs::write(&file, pipeline(2)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kontext"))
        .args(["topics", "create", "--all", "-c", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("replication factor"), "{stderr}");
    std::fs::write(&file, pipeline(1)).unwrap();
    kontext(&["topics", "create", "--all", "-c", file.to_str().unwrap()]);
    let listed = kontext(&["topics", "list", "-c", file.to_str().unwrap()]);
    assert!(listed.lines().any(|l| l == topic), "{listed}");
}

/// On Kafka: a pipeline whose entity topic exists with another partition count is refused
/// before anything is created, and the error names the override; with it, the topics are made.
#[test]
fn an_existing_topic_with_another_partition_count_is_refused_on_kafka() {
    let (bootstrap, suffix) = kafka_and_suffix();
    let topic = format!("cli-things-{suffix}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pipeline.yaml");
    let pipeline = format!(
        "name: cli-things\nentities:\n  thing: {{ key: id, topic: {topic} }}\nsources:\n  feed: {{ topic: {topic}, entity: thing, fields: {{ name: name }} }}\n"
    );
    std::fs::write(&file, &pipeline).unwrap();
    let kafka = ["--kafka", bootstrap.as_str()];
    let config = ["-c", file.to_str().unwrap()];
    let args = |rest: &[&str]| -> Vec<String> {
        (rest.iter().chain(&kafka).chain(&config))
            .map(|s| s.to_string())
            .collect()
    };
    let kontext = |rest: &[&str]| {
        let a = args(rest);
        kontext(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    kontext(&["topics", "create", &topic, "--partitions", "3"]);

    let out = Command::new(env!("CARGO_BIN_EXE_kontext"))
        .args(args(&["topics", "create", "--all"]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("topic {topic:?} already exists with 3 partitions, not 12: set topics.overrides.{topic}.partitions: 3 in the pipeline file")),
        "{stderr}"
    );
    let dlq = format!("{topic}.dlq");
    let listed = kontext(&["topics", "list"]);
    assert!(
        !listed.lines().any(|l| l == dlq),
        "created on a refused start: {listed}"
    );

    let fixed = format!("{pipeline}topics:\n  overrides:\n    {topic}: {{ partitions: 3 }}\n");
    std::fs::write(&file, fixed).unwrap();
    kontext(&["topics", "create", "--all"]);
    let described = kontext(&["topics", "describe", &dlq]);
    assert!(described.contains("partitions 3"), "{described}");
}

#[test]
fn a_bad_pipeline_file_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "name: demo\nentities:\n  order: { key: order_id, topic: context.orders, belongs_to: { customer: customer_id } }\nsources:\n  shop: { topic: context.orders, entity: orders, fields: { total: amount } }\nserve: { listen: nowhere }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kontext"))
        .args(["validate", "-c", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml: 3 errors"), "{err}");
    assert!(
        err.contains("entities.order.belongs_to.customer: unknown entity type \"customer\""),
        "{err}"
    );
    assert!(
        err.contains("sources.shop.entity: unknown entity type \"orders\""),
        "{err}"
    );
    assert!(err.contains("serve.listen"), "{err}");
}
