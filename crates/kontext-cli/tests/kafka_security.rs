//! kontext against a secured cluster: the broker `scripts/kafka.sh start` runs also listens
//! with SASL_PLAINTEXT and SCRAM-SHA-512 (`KONTEXT_TEST_KAFKA_SASL`, default 127.0.0.1:9094),
//! where its StandardAuthorizer allows nothing without an ACL. Users and ACLs are made with
//! Kafka's own tools through the plaintext listener (whose ANONYMOUS principal is a super
//! user). The pipeline runs with exactly the ACLs `docs/kafka-security.md` lists, and a wrong
//! password or a missing ACL stops it with an error that says so.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kontext_core::envelope::now_ms;
use kontext_core::record::ProduceRecord;
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::Log;
use serde_json::json;
use support::{
    free_port, get_json, kafka_bootstrap, kafka_tool_script, path_str, wait_for_zero_lag, Kontext,
};

fn sasl() -> String {
    std::env::var("KONTEXT_TEST_KAFKA_SASL").unwrap_or_else(|_| "127.0.0.1:9094".into())
}

/// Runs one of Kafka's tools against the plaintext listener (as a super user).
fn kafka_tool(tool: &str, args: &[&str]) -> String {
    let bootstrap = kafka_bootstrap();
    let out = Command::new(kafka_tool_script())
        .arg(tool)
        .args(["--bootstrap-server", &bootstrap])
        .args(args)
        .output()
        .expect("run scripts/kafka-tool.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kafka-{tool} {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A SCRAM-SHA-512 user (and a check that the broker has the SASL listener).
fn add_user(name: &str, password: &str) {
    let addr = sasl();
    assert!(
        std::net::TcpStream::connect(&addr).is_ok(),
        "no SASL listener on {addr}: a broker started before scripts/kafka.sh had one? `scripts/kafka.sh restart`"
    );
    let scram = format!("SCRAM-SHA-512=[iterations=4096,password={password}]");
    kafka_tool(
        "configs",
        &[
            "--alter",
            "--add-config",
            &scram,
            "--entity-type",
            "users",
            "--entity-name",
            name,
        ],
    );
}

/// Allows `user` the `operations` on the resources of `kind` (`--topic`, `--group`,
/// `--transactional-id`) whose names start with `prefix`.
fn allow(user: &str, operations: &[&str], kind: &str, prefix: &str) {
    let principal = format!("User:{user}");
    let mut args = vec!["--add", "--allow-principal", &principal];
    for op in operations {
        args.extend(["--operation", op]);
    }
    args.extend([kind, prefix, "--resource-pattern-type", "prefixed"]);
    kafka_tool("acls", &args);
}

/// The ACLs `docs/kafka-security.md` gives a pipeline named `name` whose topics start with
/// `topics`.
fn allow_pipeline(user: &str, name: &str, topics: &str) {
    let topic_ops = ["Create", "Describe", "DescribeConfigs", "Read", "Write"];
    allow(user, &topic_ops, "--topic", topics);
    allow(user, &topic_ops, "--topic", &format!("{name}-"));
    let pipeline_prefix = format!("kontext.{name}.");
    allow(
        user,
        &["Read", "Describe", "Delete"],
        "--group",
        &pipeline_prefix,
    );
    allow(
        user,
        &["Write", "Describe"],
        "--transactional-id",
        &pipeline_prefix,
    );
}

/// A pipeline with a feature and a join (so the processor's repartition and changelog
/// topics, its groups and, with `exactly_once`, its transactions are all exercised), read
/// with SASL/SCRAM as `user`.
fn pipeline_yaml(name: &str, user: &str, password: &str) -> String {
    format!(
        r#"
name: {name}
log:
  backend: kafka
  bootstrap_servers: "{bootstrap}"
  exactly_once: true
  properties:
    security.protocol: SASL_PLAINTEXT
    sasl.mechanism: SCRAM-SHA-512
    sasl.username: "{user}"
    sasl.password: "{password}"
topics: {{ partitions: 3 }}
entities:
  customer: {{ key: customer_id, topic: {name}.customers }}
  order: {{ key: order_id, topic: {name}.orders, belongs_to: {{ customer: customer_id }} }}
sources:
  crm:
    topic: {name}.customers
    entity: customer
    fields: {{ given_name: first_name, tier: tier }}
  shop:
    topic: {name}.orders
    entity: order
    fields: {{ customer_id: customer_ref, total: total_amount }}
features:
  orders_30d: {{ from: order, entity: customer, key: customer_id, agg: count, window: 30d, dedup: 1h }}
joins:
  order_customer:
    from: order
    with: customer
    key: customer_id
    fields: {{ customer_tier: tier }}
"#,
        bootstrap = sasl()
    )
}

fn sasl_log(user: &str, password: &str) -> KafkaLog {
    let mut config = KafkaConfig::new(sasl());
    for (k, v) in [
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", user),
        ("sasl.password", password),
    ] {
        config.properties.insert(k.into(), v.into());
    }
    KafkaLog::new(config).unwrap()
}

/// Starts `kontext run` on a pipeline file written into `dir`, with `KONTEXT_TEST_SASL_PASSWORD`
/// set to `password`.
fn run(dir: &std::path::Path, yaml: &str, port: u16, password: &str) -> Kontext {
    let pipeline = dir.join("pipeline.yaml");
    std::fs::write(&pipeline, yaml).unwrap();
    Kontext::spawn_with_env(
        &[
            "run",
            "-c",
            path_str(&pipeline),
            "--data-dir",
            path_str(&dir.join("data")),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &[("KONTEXT_TEST_SASL_PASSWORD", password)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_on_a_secured_cluster_with_the_documented_acls() {
    let name = format!("sec-{:x}", now_ms());
    let (user, password) = (format!("{name}-user"), "kontext-s3cret");
    add_user(&user, password);
    allow_pipeline(&user, &name, &format!("{name}."));

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The password comes from the environment (`${VAR}`), not the file.
    let yaml = pipeline_yaml(&name, &user, "${KONTEXT_TEST_SASL_PASSWORD}");
    let _kontext = run(dir.path(), &yaml, port, password);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while get_json(&format!("{base}/healthz")).await.is_none() {
        assert!(Instant::now() < deadline, "kontext run did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The sources write as the same user: kontext's producer, authenticated and authorized.
    let log = sasl_log(&user, password);
    let producer = log.producer().await.unwrap();
    let mut records = Vec::new();
    for i in 0..10 {
        let customer = json!({"customer_id": format!("C{i}"), "first_name": format!("Ana{i}"), "tier": "gold"});
        records.push(ProduceRecord::new(
            format!("{name}.customers"),
            Some(Bytes::from(format!("C{i}"))),
            Some(Bytes::from(customer.to_string())),
        ));
    }
    producer.send(records).await.unwrap();
    // The join's table is materialized from the customers: orders read before their customer
    // would be joined with nulls (a left join), so they come once the customers are through.
    wait_for_zero_lag(port, Duration::from_secs(60)).await;
    let mut orders = Vec::new();
    for i in 0..30 {
        let order = json!({"order_id": format!("O{i}"), "customer_ref": format!("C{}", i % 10), "total_amount": 10 + i});
        orders.push(ProduceRecord::new(
            format!("{name}.orders"),
            Some(Bytes::from(format!("O{i}"))),
            Some(Bytes::from(order.to_string())),
        ));
    }
    producer.send(orders).await.unwrap();

    // Each customer has three orders: counted by the feature, and its tier joined into them.
    let deadline = Instant::now() + Duration::from_secs(90);
    let ctx = loop {
        let (_, ctx) = get_json(&format!("{base}/v1/context/customer/C7"))
            .await
            .unwrap_or_default();
        let joined = ctx["related"]["order"]["items"]
            .as_array()
            .is_some_and(|items| {
                items.len() == 3 && items.iter().all(|o| o["fields"]["customer_tier"] == "gold")
            });
        if ctx["fields"]["orders_30d"] == 3 && joined {
            break ctx;
        }
        assert!(Instant::now() < deadline, "no features or joins yet: {ctx}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ctx["fields"]["given_name"], "Ana7", "{ctx}");
    // The features topics end with transaction markers (`exactly_once`): not lag.
    wait_for_zero_lag(port, Duration::from_secs(60)).await;
}

/// Runs `kontext run` on `yaml` until it exits (at most `timeout`), and returns whether it
/// succeeded and what it wrote to stderr.
fn run_until_exit(yaml: &str, timeout: Duration) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(&pipeline, yaml).unwrap();
    let port = free_port().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kontext"))
        .args(["run", "-c", path_str(&pipeline), "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kontext");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kontext run kept running for {timeout:?}: {}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status.success(), reader.join().unwrap())
}

/// A wrong password: librdkafka's calls only time out, but `kontext run` stops and says the
/// cluster refuses the credentials, instead of retrying a timeout for ever.
#[test]
fn a_wrong_password_stops_the_pipeline_and_says_why() {
    let name = format!("secpw-{:x}", now_ms());
    let user = format!("{name}-user");
    add_user(&user, "the-right-one");
    allow_pipeline(&user, &name, &format!("{name}."));
    let (ok, stderr) = run_until_exit(
        &pipeline_yaml(&name, &user, "not-the-right-one"),
        Duration::from_secs(120),
    );
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("the cluster refuses the credentials"),
        "{stderr}"
    );
    assert!(stderr.contains("sasl.password"), "{stderr}");
}

/// Authenticated, but without the ACLs: `kontext run` stops at once and says which
/// authorization failed and where the list of ACLs is.
#[test]
fn a_missing_acl_stops_the_pipeline_and_says_which() {
    let name = format!("secacl-{:x}", now_ms());
    let (user, password) = (format!("{name}-user"), "s3cret-enough");
    add_user(&user, password);
    let (ok, stderr) = run_until_exit(
        &pipeline_yaml(&name, &user, password),
        Duration::from_secs(120),
    );
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("Topic authorization failed"), "{stderr}");
    assert!(stderr.contains("docs/kafka-security.md"), "{stderr}");
}
