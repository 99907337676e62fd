//! The pipeline against the real Apache Kafka broker that `scripts/kafka.sh start` runs
//! (`KONTEXT_TEST_KAFKA`, default 127.0.0.1:9092), fed by kontext and by clients nobody here
//! wrote: Kafka's Java console producer, kcat and Confluent's Python client; checked with
//! Kafka's own consumer-groups tool.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kontext_core::envelope::{format_time, now_ms, STRUCTURED_CONTENT_TYPE};
use kontext_core::partitioner::partition_for_key;
use kontext_core::record::ProduceRecord;
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::Log;
use serde_json::json;
use support::{
    context_sources, free_port, get_json, kafka_bootstrap, kafka_tool_script, path_str,
    wait_for_zero_lag, Kontext,
};

fn pipeline_yaml(suffix: &str, bootstrap: &str) -> String {
    format!(
        r#"
name: e2e-{suffix}
log: {{ backend: kafka, bootstrap_servers: "{bootstrap}" }}
topics: {{ partitions: 6 }}
entities:
  customer: {{ key: customer_id, topic: e2e-{suffix}.customers }}
  order: {{ key: order_id, topic: e2e-{suffix}.orders, belongs_to: {{ customer: customer_id }} }}
sources:
  crm:
    topic: e2e-{suffix}.customers
    entity: customer
    match: {{ ce_source: crm }}
    fields: {{ given_name: first_name, tier: loyalty.tier }}
  billing:
    topic: e2e-{suffix}.customers
    entity: customer
    match: {{ ce_source: billing }}
    fields: {{ given_name: contact_name, city: billing.city }}
  shop:
    topic: e2e-{suffix}.orders
    entity: order
    fields: {{ customer_id: customer_ref, total: total_amount }}
"#
    )
}

/// Produces CRM (binary CloudEvents), billing (structured CloudEvents) and shop (plain)
/// events for `customers` customers through kontext's Kafka producer.
async fn produce_sources(log: &KafkaLog, suffix: &str, customers: usize) {
    let producer = log.producer().await.expect("producer");
    let mut batch = Vec::new();
    for i in 0..customers {
        let id = format!("C{i}");
        let crm = json!({"first_name": format!("Ana{i}"), "loyalty": {"tier": "gold"}});
        batch.push(
            ProduceRecord::new(
                format!("e2e-{suffix}.customers"),
                Some(Bytes::from(id.clone())),
                Some(Bytes::from(crm.to_string())),
            )
            .with_header("ce_specversion", "1.0")
            .with_header("ce_id", format!("crm-{i}"))
            .with_header("ce_source", "crm")
            .with_header("ce_type", "crm.customer.updated")
            .with_header("ce_time", format_time(now_ms() - 60_000)),
        );
        let billing = json!({
            "specversion": "1.0", "id": format!("billing-{i}"), "source": "billing", "type": "billing.account.updated",
            "time": format_time(now_ms() - 120_000), "data": {"contact_name": "ignored-older", "billing": {"city": "Lisbon"}}
        });
        batch.push(
            ProduceRecord::new(
                format!("e2e-{suffix}.customers"),
                Some(Bytes::from(id.clone())),
                Some(Bytes::from(billing.to_string())),
            )
            .with_header("content-type", STRUCTURED_CONTENT_TYPE),
        );
        let order = json!({"customer_ref": id, "total_amount": "10.50"});
        batch.push(ProduceRecord::new(
            format!("e2e-{suffix}.orders"),
            Some(Bytes::from(format!("O{i}"))),
            Some(Bytes::from(order.to_string())),
        ));
    }
    // A malformed record in the middle must not stop anything.
    batch.push(ProduceRecord::new(
        format!("e2e-{suffix}.orders"),
        Some(Bytes::from_static(b"O-bad")),
        Some(Bytes::from_static(b"{not json")),
    ));
    let positions = producer.send(batch).await.expect("send");
    assert_eq!(positions.len(), customers * 3 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_from_kafka_to_the_context_api_with_java_clients() {
    let suffix = format!("{:x}", now_ms());
    let bootstrap = kafka_bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(&pipeline, pipeline_yaml(&suffix, &bootstrap)).unwrap();

    let port = free_port();
    let kontext = Kontext::spawn(&[
        "run",
        "-c",
        path_str(&pipeline),
        "--data-dir",
        path_str(&dir.path().join("data")),
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    let base = format!("http://127.0.0.1:{port}");
    // `run` creates the topics; wait until the API answers, then produce.
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_json(&format!("{base}/healthz")).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "kontext run did not come up: is the broker running? (scripts/kafka.sh start)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = KafkaLog::new(KafkaConfig::new(bootstrap.clone())).unwrap();
    produce_sources(&log, &suffix, 40).await;
    wait_for_zero_lag(port, Duration::from_secs(60)).await;

    let (status, ctx) = get_json(&format!("{base}/v1/context/customer/C7"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{ctx}");
    // The CRM event is newer than the billing one: its first_name wins given_name.
    assert_eq!(ctx["fields"]["given_name"], "Ana7");
    assert_eq!(ctx["provenance"]["given_name"]["source"], "crm");
    assert_eq!(ctx["fields"]["city"], "Lisbon");
    assert_eq!(ctx["provenance"]["city"]["source"], "billing");
    assert_eq!(ctx["related"]["order"]["items"][0]["entity_id"], "O7");
    assert_eq!(
        ctx["related"]["order"]["items"][0]["provenance"]["total"]["source"],
        "shop"
    );
    let (_, metrics) = (
        0,
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert!(metrics.contains(&format!("kontext_records_invalid_total{{topic=\"e2e-{suffix}.orders\",reason=\"invalid_json\"}} 1")), "{metrics}");

    // Kafka's own console producer, CloudEvents headers, key = customer id, its batch
    // compressed with zstd (as Java producers, Debezium and Connect often write).
    let marker = format!("Zed-{suffix}");
    let line = format!(
        "ce_specversion:1.0,ce_id:console-{suffix},ce_source:crm,ce_type:crm.customer.updated,ce_time:{}\tC7\t{{\"first_name\":\"{marker}\"}}\n",
        format_time(now_ms())
    );
    let sent = Instant::now();
    let mut producer = Command::new(kafka_tool_script())
        .args([
            "console-producer",
            "--bootstrap-server",
            &bootstrap,
            "--topic",
            &format!("e2e-{suffix}.customers"),
            "--property",
            "parse.key=true",
            "--property",
            "parse.headers=true",
            "--compression-codec",
            "zstd",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run Kafka's console producer");
    producer
        .stdin
        .take()
        .unwrap()
        .write_all(line.as_bytes())
        .unwrap();
    assert!(
        producer.wait().unwrap().success(),
        "console producer failed"
    );
    let produced_after = sent.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen_after = loop {
        let (_, ctx) = get_json(&format!("{base}/v1/context/customer/C7"))
            .await
            .unwrap();
        if ctx["fields"]["given_name"] == marker.as_str() {
            assert_eq!(
                ctx["provenance"]["given_name"]["event_id"],
                format!("console-{suffix}")
            );
            break sent.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the console producer's event never reached the context: {ctx}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Reported, not asserted (no timed assertions in tests): the JVM start dominates.
    eprintln!(
        "console producer event: producer exited after {produced_after:?}, visible in context {:?} after it exited",
        seen_after.saturating_sub(produced_after)
    );

    // kcat, librdkafka's C command-line client.
    let customers = format!("e2e-{suffix}.customers");
    let kcat_marker = format!("Kat-{suffix}");
    kcat_produce(
        &bootstrap,
        &customers,
        &format!("C8\t{{\"first_name\":\"{kcat_marker}\"}}"),
        &format!("kcat-{suffix}"),
        now_ms(),
    );
    wait_for_field(&base, "C8", "given_name", &kcat_marker).await;

    // A tombstone from kcat (`-Z`: an empty value goes as NULL) deletes C8 from the context.
    let deleted_at = now_ms();
    kcat_produce(
        &bootstrap,
        &customers,
        "C8\t",
        &format!("kcat-delete-{suffix}"),
        deleted_at,
    );
    wait_for_status(&base, "C8", 404).await;
    // An update written before the delete but arriving after it (another system's late event)
    // does not bring C8 back; a newer one does, with only what is newer than the delete.
    let late = format!("Late-{suffix}");
    kcat_produce(
        &bootstrap,
        &customers,
        &format!("C8\t{{\"first_name\":\"{late}\"}}"),
        &format!("kcat-late-{suffix}"),
        deleted_at - 60_000,
    );
    wait_for_zero_lag(port, Duration::from_secs(30)).await;
    wait_for_status(&base, "C8", 404).await;
    let back = format!("Back-{suffix}");
    kcat_produce(
        &bootstrap,
        &customers,
        &format!("C8\t{{\"first_name\":\"{back}\"}}"),
        &format!("kcat-back-{suffix}"),
        deleted_at + 1,
    );
    wait_for_field(&base, "C8", "given_name", &back).await;
    let (_, c8) = get_json(&format!("{base}/v1/context/customer/C8"))
        .await
        .unwrap();
    assert!(
        c8["fields"].get("tier").is_none(),
        "C8's tier was set before the delete: {c8}"
    );

    // Confluent's Python client, which also reports where the record landed: the partition
    // kontext computes for the key.
    let py_marker = format!("Py-{suffix}");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/confluent_produce.py");
    let out = Command::new("python3")
        .arg(script)
        .args([
            &bootstrap,
            &format!("e2e-{suffix}.customers"),
            "C9",
            &format!("{{\"first_name\":\"{py_marker}\"}}"),
        ])
        .args([
            "ce_specversion=1.0",
            &format!("ce_id=py-{suffix}"),
            "ce_source=crm",
            "ce_type=crm.customer.updated",
        ])
        .args([format!("ce_time={}", format_time(now_ms()))])
        .output()
        .expect("run python3 (scripts/install-deps.sh installs confluent-kafka)");
    assert!(
        out.status.success(),
        "confluent-kafka producer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let delivered: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        delivered["partition"],
        partition_for_key(b"C9", 6),
        "{delivered}"
    );
    wait_for_field(&base, "C9", "given_name", &py_marker).await;

    // Kafka's own consumer-groups tool sees the store's group and its committed offsets.
    wait_for_zero_lag(port, Duration::from_secs(30)).await;
    let group = format!("kontext.e2e-{suffix}.store.main");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(kafka_tool_script())
            .args([
                "consumer-groups",
                "--bootstrap-server",
                &bootstrap,
                "--describe",
                "--group",
                &group,
            ])
            .output()
            .expect("run Kafka's consumer-groups tool");
        let text = String::from_utf8_lossy(&out.stdout);
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("e2e-{suffix}.")))
            .collect();
        // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
        let caught_up = rows.len() == 12
            && rows.iter().all(|r| {
                let cols: Vec<&str> = r.split_whitespace().collect();
                cols.len() > 5 && cols[3] == cols[4] && cols[5] == "0"
            });
        if caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumer-groups never showed the group caught up:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    kontext.interrupt();
}

/// Produces one binary-mode CloudEvent of the CRM with kcat, librdkafka's C command-line
/// client: `line` is `key<TAB>value`, an empty value a tombstone (`-Z`).
fn kcat_produce(bootstrap: &str, topic: &str, line: &str, id: &str, time_ms: i64) {
    let mut kcat = Command::new("kcat")
        .args(["-b", bootstrap, "-t", topic, "-P", "-Z", "-K", "\t"])
        // The Java-compatible partitioner, as any non-Java producer feeding kontext should use.
        .args(["-X", "partitioner=murmur2_random"])
        .args(["-H", "ce_specversion=1.0", "-H", &format!("ce_id={id}")])
        .args(["-H", "ce_source=crm", "-H", "ce_type=crm.customer.updated"])
        .args(["-H", &format!("ce_time={}", format_time(time_ms))])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run kcat (scripts/install-deps.sh installs it)");
    kcat.stdin
        .take()
        .unwrap()
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
    assert!(kcat.wait().unwrap().success(), "kcat failed");
}

/// Polls a customer's context until the API answers `status`.
async fn wait_for_status(base: &str, customer: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (got, body) = get_json(&format!("{base}/v1/context/customer/{customer}"))
            .await
            .unwrap();
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{customer} never answered {status}: {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls a customer's context until `field` holds `value`.
async fn wait_for_field(base: &str, customer: &str, field: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, ctx) = get_json(&format!("{base}/v1/context/customer/{customer}"))
            .await
            .unwrap();
        if ctx["fields"][field] == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{customer}.{field} never became {value:?}: {ctx}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_runs_against_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut kontext = Kontext::spawn(&[
        "quickstart",
        "--kafka",
        &kafka_bootstrap(),
        "--data-dir",
        path_str(dir.path()),
        "--port",
        &port.to_string(),
    ]);
    let line = kontext.wait_for_line("curl -s http://", Duration::from_secs(90));
    let url = line.trim().trim_start_matches("curl -s ").to_string();
    let (status, body) = get_json(&url).await.expect("the printed curl answers");
    assert_eq!(status, 200, "{body}");
    let sources = context_sources(&body);
    assert!(
        sources.len() >= 3,
        "context merges only {sources:?}: {body}"
    );
    kontext.interrupt();
}
