//! Shared by the integration tests: the broker `scripts/kafka.sh start` runs, unique names,
//! and polling helpers.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kontext_core::record::Record;
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::Consumer;

/// The broker's address: `KONTEXT_TEST_KAFKA`, or the one `scripts/kafka.sh start` runs.
pub fn bootstrap() -> String {
    std::env::var("KONTEXT_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_string())
}

/// A `KafkaLog` on the test broker. Fails the test, never skips it, when no broker answers:
/// a skipped integration test reads as a green one.
pub fn kafka_log() -> KafkaLog {
    kafka_log_with(&[])
}

/// [`kafka_log`] with these librdkafka `properties`.
pub fn kafka_log_with(properties: &[(&str, &str)]) -> KafkaLog {
    let bootstrap = bootstrap();
    assert_broker_reachable(&bootstrap);
    let mut config = KafkaConfig::new(bootstrap);
    config.request_timeout = Duration::from_secs(20);
    for (key, value) in properties {
        config.properties.insert(key.to_string(), value.to_string());
    }
    KafkaLog::new(config).expect("valid test config")
}

fn assert_broker_reachable(bootstrap: &str) {
    let reachable = bootstrap.split(',').any(|server| {
        server
            .to_socket_addrs()
            .map(|mut addrs| {
                addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
            })
            .unwrap_or(false)
    });
    assert!(
        reachable,
        "no Kafka broker answers at {bootstrap}: run `scripts/kafka.sh start` \
         (or point KONTEXT_TEST_KAFKA at a broker)"
    );
}

/// `prefix` plus a random suffix, so that tests can run again and again on the same broker.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Polls until `count` records arrived (failing after 60 s), and returns them.
pub async fn poll_exactly(consumer: &mut dyn Consumer, count: usize) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut records = Vec::with_capacity(count);
    while records.len() < count {
        assert!(
            Instant::now() < deadline,
            "got {} of {count} records within 60 s",
            records.len()
        );
        let batch = consumer
            .poll(count - records.len(), Duration::from_millis(500))
            .await
            .expect("poll");
        records.extend(batch);
    }
    assert_eq!(records.len(), count, "poll returned more than asked for");
    records
}

/// Asserts that nothing more arrives within `wait`.
pub async fn assert_no_more(consumer: &mut dyn Consumer, wait: Duration) {
    let extra = consumer.poll(100, wait).await.expect("poll");
    assert!(extra.is_empty(), "unexpected records: {extra:?}");
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The classpath of the Kafka jars, from `scripts/kafka.sh classpath`.
pub fn kafka_classpath() -> String {
    let out = Command::new(repo_root().join("scripts/kafka.sh"))
        .arg("classpath")
        .output()
        .expect("run scripts/kafka.sh classpath");
    assert!(
        out.status.success(),
        "scripts/kafka.sh classpath failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 classpath")
        .trim()
        .to_string()
}

/// Runs `scripts/kafka-tool.sh <args>` with `stdin`, returning stdout; fails the test on a
/// non-zero exit.
pub fn kafka_tool(args: &[&str], stdin: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new(repo_root().join("scripts/kafka-tool.sh"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run scripts/kafka-tool.sh");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait for kafka-tool.sh");
    assert!(
        out.status.success(),
        "kafka-tool.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 tool output")
}
