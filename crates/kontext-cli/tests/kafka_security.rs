//! kontext against a secured cluster: the broker `scripts/kafka.sh start` runs also listens
//! with SASL_PLAINTEXT and SCRAM-SHA-512 (`KONTEXT_TEST_KAFKA_SASL`, default 127.0.0.1:9094),
//! with mutual TLS (`KONTEXT_TEST_KAFKA_SSL`, default localhost:9095, certificates in
//! `scripts/kafka.sh tls` or `KONTEXT_TEST_KAFKA_TLS`) and with SCRAM over TLS
//! (`KONTEXT_TEST_KAFKA_SASL_SSL`, default localhost:9096), where its StandardAuthorizer allows
//! nothing without an ACL. Users and ACLs are made with Kafka's own tools through the
//! plaintext listener (whose ANONYMOUS principal is a super user). The pipeline runs with
//! exactly the ACLs `docs/kafka-security.md` lists (without Create on topics made
//! beforehand), and a wrong password, a missing ACL, an
//! untrusted broker certificate or a missing client certificate stops it with an error that
//! says so.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kontext_core::envelope::now_ms;
use kontext_core::record::ProduceRecord;
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::Log;
use serde_json::{json, Value};
use support::{
    free_port, get_json, kafka_bootstrap, kafka_tool_script, path_str, wait_for_zero_lag, Kontext,
};

fn sasl() -> String {
    std::env::var("KONTEXT_TEST_KAFKA_SASL").unwrap_or_else(|_| "127.0.0.1:9094".into())
}

/// The broker's SSL listener, by the name its certificate has.
fn ssl() -> String {
    std::env::var("KONTEXT_TEST_KAFKA_SSL").unwrap_or_else(|_| "localhost:9095".into())
}

/// The broker's SASL_SSL listener (SCRAM over TLS), by the name its certificate has.
fn sasl_ssl() -> String {
    std::env::var("KONTEXT_TEST_KAFKA_SASL_SSL").unwrap_or_else(|_| "localhost:9096".into())
}

/// The principal of the client certificate in [`tls_dir`] (its CN, by the broker's mapping).
const TLS_USER: &str = "kontext_tls";

/// The directory of the test certificates of the running broker.
fn tls_dir() -> String {
    if let Ok(dir) = std::env::var("KONTEXT_TEST_KAFKA_TLS") {
        return dir;
    }
    let script = kafka_tool_script().with_file_name("kafka.sh");
    let out = Command::new(&script)
        .arg("tls")
        .output()
        .expect("run scripts/kafka.sh tls");
    assert!(
        out.status.success(),
        "scripts/kafka.sh tls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The client certificate a client of the SSL listener presents.
enum ClientCert<'a> {
    None,
    /// With its key unencrypted (`client.key`).
    Plain,
    /// With its key encrypted (`client-encrypted.key`), opened with `ssl.key.password`.
    Encrypted {
        key_password: &'a str,
    },
}

/// The password `scripts/test-certs.sh` encrypts `client-encrypted.key` with.
const KEY_PASSWORD: &str = "kontext-test-key";

/// The TLS properties of a client of the listener at `addr` that trusts `ca` (a file in
/// [`tls_dir`]).
fn trusting(addr: &str, ca: &str) -> Vec<(&'static str, String)> {
    let dir = tls_dir();
    assert!(
        std::path::Path::new(&dir).join("ca.pem").is_file()
            && std::net::TcpStream::connect(addr).is_ok(),
        "no TLS listener on {addr} with certificates in {dir}: a broker started before \
         scripts/kafka.sh had one? `scripts/kafka.sh restart`"
    );
    vec![
        ("ssl.ca.location", format!("{dir}/{ca}")),
        // The broker listens on 127.0.0.1 only; `localhost` may resolve to ::1 first.
        ("broker.address.family", "v4".to_owned()),
    ]
}

/// The log properties of a client of the SSL listener that trusts `ca` (a file in
/// [`tls_dir`]) and presents `cert`.
fn tls_properties(ca: &str, cert: ClientCert) -> Vec<(&'static str, String)> {
    let dir = tls_dir();
    let mut properties = vec![("security.protocol", "SSL".to_owned())];
    properties.extend(trusting(&ssl(), ca));
    let key = match cert {
        ClientCert::None => return properties,
        ClientCert::Plain => "client.key",
        ClientCert::Encrypted { key_password } => {
            properties.push(("ssl.key.password", key_password.to_owned()));
            "client-encrypted.key"
        }
    };
    properties.push(("ssl.certificate.location", format!("{dir}/client.pem")));
    properties.push(("ssl.key.location", format!("{dir}/{key}")));
    properties
}

/// The SCRAM properties of `user` over `protocol` (`SASL_PLAINTEXT` or `SASL_SSL`).
fn scram_properties(protocol: &str, user: &str, password: &str) -> Vec<(&'static str, String)> {
    vec![
        ("security.protocol", protocol.to_owned()),
        ("sasl.mechanism", "SCRAM-SHA-512".to_owned()),
        ("sasl.username", user.to_owned()),
        ("sasl.password", password.to_owned()),
    ]
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
    allow_pipeline_with(user, name, topics, &topic_ops);
}

/// [`allow_pipeline`] with `topic_ops` on the topics.
fn allow_pipeline_with(user: &str, name: &str, topics: &str, topic_ops: &[&str]) {
    allow(user, topic_ops, "--topic", topics);
    allow(user, topic_ops, "--topic", &format!("{name}-"));
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
/// from `bootstrap` with the client `properties`.
fn pipeline_yaml(name: &str, bootstrap: &str, properties: &[(&str, String)]) -> String {
    let properties: String = properties
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    format!(
        r#"
name: {name}
log:
  backend: kafka
  bootstrap_servers: "{bootstrap}"
  exactly_once: true
  properties:
{properties}topics: {{ partitions: 3 }}
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
"#
    )
}

fn secured_log(bootstrap: &str, properties: &[(&str, String)]) -> KafkaLog {
    let mut config = KafkaConfig::new(bootstrap.to_owned());
    for (k, v) in properties {
        config.properties.insert((*k).into(), v.clone());
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
    run_over_sasl(&name, &user, password).await;
}

/// [`run_the_pipeline`] as `user` over SASL_PLAINTEXT; the password comes from the
/// environment (`${VAR}`), not the file.
async fn run_over_sasl(name: &str, user: &str, password: &str) {
    let yaml = pipeline_yaml(
        name,
        &sasl(),
        &scram_properties("SASL_PLAINTEXT", user, "${KONTEXT_TEST_SASL_PASSWORD}"),
    );
    let log = secured_log(&sasl(), &scram_properties("SASL_PLAINTEXT", user, password));
    run_the_pipeline(name, &yaml, password, &log).await;
}

/// Topics a platform team created beforehand (here `kontext topics create --all`, run as a
/// super user): the pipeline's principal then needs no Create on them, as the documented ACLs
/// without Create show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_without_create_on_topics_created_beforehand() {
    let name = format!("secpre-{:x}", now_ms());
    let (user, password) = (format!("{name}-user"), "kontext-s3cret-pre");
    add_user(&user, password);
    let topic_ops = ["Describe", "DescribeConfigs", "Read", "Write"];
    allow_pipeline_with(&user, &name, &format!("{name}."), &topic_ops);
    let admin = tempfile::tempdir().unwrap();
    let admin_pipeline = admin.path().join("pipeline.yaml");
    let plaintext = [("security.protocol", "PLAINTEXT".to_string())];
    let admin_yaml = pipeline_yaml(&name, &kafka_bootstrap(), &plaintext);
    std::fs::write(&admin_pipeline, admin_yaml).unwrap();
    let created = Command::new(env!("CARGO_BIN_EXE_kontext"))
        .args(["topics", "create", "--all", "-c", path_str(&admin_pipeline)])
        .args(["--data-dir", path_str(&admin.path().join("data"))])
        .output()
        .expect("run kontext topics create --all");
    assert!(
        created.status.success(),
        "kontext topics create --all failed: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    run_over_sasl(&name, &user, password).await;
}

/// The same pipeline with SCRAM over TLS (`SASL_SSL`, how managed clusters are usually
/// reached): the broker's certificate checked against the test CA and its name, the SASL user
/// the principal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_sasl_ssl_with_the_documented_acls() {
    let name = format!("secssl-{:x}", now_ms());
    let (user, password) = (format!("{name}-user"), "kontext-s3cret-too");
    add_user(&user, password);
    allow_pipeline(&user, &name, &format!("{name}."));
    let properties = |password: &str| {
        let mut properties = scram_properties("SASL_SSL", &user, password);
        properties.extend(trusting(&sasl_ssl(), "ca.pem"));
        properties
    };
    let yaml = pipeline_yaml(
        &name,
        &sasl_ssl(),
        &properties("${KONTEXT_TEST_SASL_PASSWORD}"),
    );
    let log = secured_log(&sasl_ssl(), &properties(password));
    run_the_pipeline(&name, &yaml, password, &log).await;
}

/// The same pipeline over mutual TLS: the broker's certificate checked against the test CA
/// (and its name, `localhost`), the client's certificate its principal, which the ACLs name.
/// The client's key is encrypted, its password read from the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_mutual_tls_with_acls_on_the_certificates_principal() {
    let name = format!("tls-{:x}", now_ms());
    allow_pipeline(TLS_USER, &name, &format!("{name}."));
    let properties =
        |key_password| tls_properties("ca.pem", ClientCert::Encrypted { key_password });
    let yaml = pipeline_yaml(&name, &ssl(), &properties("${KONTEXT_TEST_SASL_PASSWORD}"));
    let log = secured_log(&ssl(), &properties(KEY_PASSWORD));
    run_the_pipeline(&name, &yaml, KEY_PASSWORD, &log).await;
}

/// Runs `yaml` (named `name`, with `password` in `KONTEXT_TEST_SASL_PASSWORD`), writes
/// customers and orders through `log` (the sources, as the same principal), and waits for the
/// feature and the join in a customer's context.
async fn run_the_pipeline(name: &str, yaml: &str, password: &str, log: &KafkaLog) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _kontext = run(dir.path(), yaml, port, password);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while get_json(&format!("{base}/healthz")).await.is_none() {
        assert!(Instant::now() < deadline, "kontext run did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The sources write as the same user: kontext's producer, authenticated and authorized.
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

    // The tools, as the same principal with the same ACLs: a record that is not JSON is
    // dead-lettered, listed and replayed (read the dead letters, write the source topic and
    // the replay ledger), and the store is rebuilt from the log (a group of its own,
    // deleted at the end; the topics' configs described).
    producer
        .send(vec![ProduceRecord::new(
            format!("{name}.customers"),
            Some(Bytes::from_static(b"C-bad")),
            Some(Bytes::from_static(b"{not json")),
        )])
        .await
        .unwrap();
    wait_for_zero_lag(port, Duration::from_secs(60)).await;
    let pipeline = dir.path().join("pipeline.yaml");
    let data = dir.path().join("data");
    let tool = |args: &[&str]| -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_kontext"))
            .args(args)
            .args([
                "-c",
                path_str(&pipeline),
                "--data-dir",
                path_str(&data),
                "--json",
            ])
            .env("RUST_LOG", "warn")
            .env("KONTEXT_TEST_SASL_PASSWORD", password)
            .output()
            .expect("run kontext");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kontext {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    let listed = tool(&["dlq", "list"]);
    assert!(listed.to_string().contains("invalid_json"), "{listed}");
    let replayed = tool(&["dlq", "replay", "--key", "C-bad"]);
    assert_eq!(replayed["replayed"], 1, "{replayed}");
    let rebuild = Command::new(env!("CARGO_BIN_EXE_kontext"))
        .args(["rebuild", "--store", "main", "--api", &base])
        .output()
        .expect("run kontext rebuild");
    let stdout = String::from_utf8_lossy(&rebuild.stdout);
    assert!(
        rebuild.status.success() && stdout.contains("version 1 serves"),
        "rebuild failed: {stdout}{}",
        String::from_utf8_lossy(&rebuild.stderr)
    );
    let (_, ctx) = get_json(&format!("{base}/v1/context/customer/C7"))
        .await
        .unwrap();
    assert_eq!(ctx["fields"]["orders_30d"], 3, "after the rebuild: {ctx}");
    // Two dead letters: the record and its replayed copy; the rebuild, which met both
    // again, added none (the live sink had them).
    let dlq = format!("{name}.customers.dlq");
    let listed = tool(&["dlq", "list"]);
    let letters: u64 = listed["topics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["topic"] == dlq.as_str())
        .flat_map(|t| t["errors"].as_array().unwrap())
        .map(|g| g["count"].as_u64().unwrap())
        .sum();
    assert_eq!(letters, 2, "{listed}");
}

/// Runs `kontext run` on `yaml` until it exits (at most `timeout`), and returns whether it
/// succeeded and what it wrote to stderr.
fn run_pipeline_until_exit(yaml: &str, timeout: Duration) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(&pipeline, yaml).unwrap();
    let data = dir.path().join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    support::run_until_exit(
        &[
            "run",
            "-c",
            path_str(&pipeline),
            "--data-dir",
            path_str(&data),
            "--listen",
            &listen,
        ],
        timeout,
    )
}

/// A wrong password: librdkafka's calls only time out, but `kontext run` stops and says the
/// cluster refuses the credentials, instead of retrying a timeout for ever.
#[test]
fn a_wrong_password_stops_the_pipeline_and_says_why() {
    let name = format!("secpw-{:x}", now_ms());
    let user = format!("{name}-user");
    add_user(&user, "the-right-one");
    allow_pipeline(&user, &name, &format!("{name}."));
    let (ok, stderr) = run_pipeline_until_exit(
        &pipeline_yaml(
            &name,
            &sasl(),
            &scram_properties("SASL_PLAINTEXT", &user, "not-the-right-one"),
        ),
        Duration::from_secs(120),
    );
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("the cluster refuses the credentials"),
        "{stderr}"
    );
    assert!(stderr.contains("sasl.password"), "{stderr}");
}

/// A SASL mechanism the brokers do not enable (they take SCRAM-SHA-512 only): librdkafka's
/// calls only time out, but `kontext run` stops and says which mechanisms the brokers take.
#[test]
fn an_unsupported_sasl_mechanism_stops_the_pipeline_and_says_why() {
    let name = format!("secmech-{:x}", now_ms());
    let mut properties = scram_properties("SASL_PLAINTEXT", "anyone", "anything");
    properties[1].1 = "SCRAM-SHA-256".to_owned();
    let (ok, stderr) = run_pipeline_until_exit(
        &pipeline_yaml(&name, &sasl(), &properties),
        Duration::from_secs(120),
    );
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("does not accept the SASL mechanism")
            && stderr.contains("SCRAM-SHA-512")
            && stderr.contains("`sasl.mechanism`"),
        "{stderr}"
    );
}

/// Authenticated, but without the ACLs: `kontext run` stops at once and says which
/// authorization failed and where the list of ACLs is.
#[test]
fn a_missing_acl_stops_the_pipeline_and_says_which() {
    let name = format!("secacl-{:x}", now_ms());
    let (user, password) = (format!("{name}-user"), "s3cret-enough");
    add_user(&user, password);
    let (ok, stderr) = run_pipeline_until_exit(
        &pipeline_yaml(
            &name,
            &sasl(),
            &scram_properties("SASL_PLAINTEXT", &user, password),
        ),
        Duration::from_secs(120),
    );
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("Topic authorization failed"), "{stderr}");
    assert!(stderr.contains("docs/kafka-security.md"), "{stderr}");
}

/// A broker certificate signed by an authority the client does not trust: librdkafka's calls
/// only time out, but `kontext run` stops and says the TLS handshake fails, and why.
#[test]
fn an_untrusted_broker_certificate_stops_the_pipeline_and_says_why() {
    let stderr = refused_over_tls("tlsca", "other-ca.pem", ClientCert::Plain);
    assert!(
        stderr.contains("certificate verify failed") && stderr.contains("ssl.ca.location"),
        "{stderr}"
    );
}

/// The broker requires a client certificate and the pipeline has none: stopped, with the
/// broker's TLS alert as the reason.
#[test]
fn a_missing_client_certificate_stops_the_pipeline_and_says_why() {
    let stderr = refused_over_tls("tlscert", "ca.pem", ClientCert::None);
    assert!(
        stderr.contains("alert") && stderr.contains("ssl.certificate.location"),
        "{stderr}"
    );
}

/// An encrypted client key with a wrong `ssl.key.password`: librdkafka cannot create the
/// client, and `kontext run` stops at once naming the settings to check.
#[test]
fn a_wrong_key_password_stops_the_pipeline_and_says_why() {
    let name = format!("tlskey-{:x}", now_ms());
    let properties = tls_properties(
        "ca.pem",
        ClientCert::Encrypted {
            key_password: "not-the-key-password",
        },
    );
    let (ok, stderr) = run_pipeline_until_exit(
        &pipeline_yaml(&name, &ssl(), &properties),
        Duration::from_secs(60),
    );
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("ssl.key.location failed") && stderr.contains("ssl.key.password"),
        "{stderr}"
    );
}

/// Runs a pipeline over TLS with [`tls_properties`]`(ca, cert)` and the ACLs it needs,
/// checks that it stops because the TLS handshake fails, and returns its stderr.
fn refused_over_tls(prefix: &str, ca: &str, cert: ClientCert) -> String {
    let name = format!("{prefix}-{:x}", now_ms());
    allow_pipeline(TLS_USER, &name, &format!("{name}."));
    let yaml = pipeline_yaml(&name, &ssl(), &tls_properties(ca, cert));
    let (ok, stderr) = run_pipeline_until_exit(&yaml, Duration::from_secs(120));
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("the TLS handshake with the cluster fails"),
        "{stderr}"
    );
    stderr
}
