//! Running the real `kontext` binary from tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `kontext` process whose stdout lines arrive on a channel.
pub struct Kontext {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Kontext {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_with_env(args, &[])
    }

    /// [`Kontext::spawn`] with extra environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kontext"))
            .args(args)
            // KONTEXT_TEST_CHILD_LOG (say `info`) to see more of what the child did.
            .env(
                "RUST_LOG",
                std::env::var("KONTEXT_TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kontext");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for a stdout line containing `needle` and returns it.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!("no line containing {needle:?} within {timeout:?} (process status: {status:?})");
                }
            }
        }
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill_9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// SIGINT (Ctrl-C), then waits for a clean exit.
    pub fn interrupt(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill -INT");
        assert!(status.success());
        // A clean stop drains: the processor for at most 15 s, then the sinks apply what it
        // wrote for at most 30 s (docs/processing.md, "Start and stop").
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "kontext exited with {status} after Ctrl-C"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kontext did not stop within 60 s of Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Kontext {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `kontext` with `args` until it exits (at most `timeout`, then kills it and panics
/// with its stderr), and returns whether it succeeded and what it wrote to stderr. For runs
/// that are expected to stop on their own, such as a refused start.
pub fn run_until_exit(args: &[&str], timeout: Duration) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kontext"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kontext");
    // Read on a thread, so a chatty child cannot block on a full pipe.
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).expect("read stderr");
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kontext {args:?} kept running for {timeout:?}: {}",
                reader.join().expect("stderr reader")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.success(), reader.join().expect("stderr reader"))
}

/// The plaintext listener of the test broker (`KONTEXT_TEST_KAFKA`, default 127.0.0.1:9092).
pub fn kafka_bootstrap() -> String {
    std::env::var("KONTEXT_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// `scripts/kafka-tool.sh`: Kafka's own command-line tools.
pub fn kafka_tool_script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kafka-tool.sh")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// GET a URL and parse the JSON body; `None` while the server is not answering.
pub async fn get_json(url: &str) -> Option<(u16, serde_json::Value)> {
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    let body = response.json().await.ok()?;
    Some((status, body))
}

/// Polls `/v1/lag` until the store has applied everything in the log, including every output
/// the processor has yet to write (its groups' lag counts in `total_lag`).
pub async fn wait_for_zero_lag(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let url = format!("http://127.0.0.1:{port}/v1/lag");
    loop {
        let answer = get_json(&url).await;
        if let Some((200, body)) = &answer {
            if body["total_lag"] == 0 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "lag did not reach zero within {timeout:?}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Spawns `kontext quickstart` on `data_dir` at a free port with `args`; returns the process
/// and its port.
fn spawn_quickstart(data_dir: &str, args: &[&str]) -> (Kontext, u16) {
    let port = free_port();
    let port_arg = port.to_string();
    let mut all = vec!["quickstart", "--data-dir", data_dir, "--port", &port_arg];
    all.extend_from_slice(args);
    (Kontext::spawn(&all), port)
}

/// Runs `kontext quickstart --rate 0` (the generator's initial load only, then nothing) on
/// `data_dir` with more `args`, until the store has applied all of it, and stops it.
pub async fn initial_load(data_dir: &str, args: &[&str]) {
    let (mut kontext, port) = spawn_quickstart(data_dir, &[&["--rate", "0"], args].concat());
    kontext.wait_for_line("curl -s http://", Duration::from_secs(60));
    wait_for_zero_lag(port, Duration::from_secs(60)).await;
    kontext.interrupt();
}

/// Runs `kontext quickstart --no-generator` on `data_dir` until the store has applied the
/// whole log; returns the running process and its port.
pub async fn catch_up(data_dir: &str) -> (Kontext, u16) {
    catch_up_with(data_dir, &[]).await
}

/// [`catch_up`] with more arguments for the quickstart.
pub async fn catch_up_with(data_dir: &str, args: &[&str]) -> (Kontext, u16) {
    let (kontext, port) = spawn_quickstart(data_dir, &[&["--no-generator"], args].concat());
    wait_for_zero_lag(port, Duration::from_secs(60)).await;
    (kontext, port)
}

/// Asserts that the store applied every valid record exactly once: for each entity, its
/// `events_applied` equals `expected` (valid records per (entity type, id) recounted from the
/// log), and the store holds no other entity.
pub fn assert_applied_exactly_once(
    store: &kontext_store::EmbeddedStore,
    expected: &std::collections::BTreeMap<(String, String), u64>,
) {
    let actual: std::collections::BTreeMap<(String, String), u64> = store
        .dump()
        .expect("dump the store")
        .into_iter()
        .map(|d| ((d.entity_type, d.entity_id), d.events_applied))
        .collect();
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "entities in the log but not in the store: {missing:?}"
    );
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, n)| actual.get(*k) != Some(n))
        .take(5)
        .map(|(k, n)| (k.clone(), *n, actual.get(k).copied()))
        .collect();
    assert!(
        wrong.is_empty(),
        "(entity, records in the log, applied in the store) differ: {wrong:?}"
    );
    assert_eq!(
        actual.len(),
        expected.len(),
        "the store holds entities the log does not explain"
    );
}

/// Every source named in a context document's provenance, related entities included.
pub fn context_sources(body: &serde_json::Value) -> std::collections::BTreeSet<String> {
    let mut sources = std::collections::BTreeSet::new();
    let mut add = |provenance: &serde_json::Value| {
        for p in provenance.as_object().into_iter().flat_map(|m| m.values()) {
            sources.insert(p["source"].as_str().unwrap_or_default().to_string());
        }
    };
    add(&body["provenance"]);
    for list in body["related"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
    {
        for item in list["items"].as_array().into_iter().flatten() {
            add(&item["provenance"]);
        }
    }
    sources
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The embedded log of `data_dir` (no kontext may be running on it).
fn open_embedded_log(data_dir: &Path) -> std::sync::Arc<kontext_log::embedded::EmbeddedLog> {
    kontext_log::embedded::EmbeddedLog::open(
        &data_dir.join("log"),
        kontext_log::embedded::EmbeddedConfig::default(),
    )
    .expect("open the log")
}

/// The partition count of every topic in the embedded log of `data_dir`, by name.
pub async fn topic_partitions(data_dir: &Path) -> std::collections::BTreeMap<String, usize> {
    use kontext_log::Log;
    let log = open_embedded_log(data_dir);
    let mut counts = std::collections::BTreeMap::new();
    for topic in log.list_topics().await.expect("list topics") {
        let description = log.describe_topic(&topic).await.expect("describe");
        counts.insert(topic, description.partitions.len());
    }
    counts
}

/// Every record of `topic`, partition by partition in offset order. Asserts each partition is
/// dense from its low to its high watermark (no gap, no skipped offset).
async fn dense_partitions(
    log: &kontext_log::embedded::EmbeddedLog,
    topic: &str,
) -> Vec<Vec<kontext_core::record::Record>> {
    use kontext_log::Log;
    let description = log.describe_topic(topic).await.expect("describe");
    let mut out = Vec::new();
    for p in description.partitions {
        let mut records = Vec::new();
        let mut offset = p.low_watermark;
        while offset < p.high_watermark {
            let fetched = log.fetch(topic, p.partition, offset, 1_000).expect("fetch");
            assert!(
                !fetched.is_empty(),
                "{topic}/{} has a gap at {offset}",
                p.partition
            );
            for r in fetched {
                assert_eq!(r.offset, offset, "offsets are dense");
                offset += 1;
                records.push(r);
            }
        }
        out.push(records);
    }
    out
}

/// Valid records per (entity type, id), recounted from the embedded log in `data_dir/log`
/// (the source of truth), and the number of records in it. Asserts the log is dense (no gap,
/// no skipped offset) and holds upserts only (the generator writes no tombstones).
pub async fn expected_from_log(
    data_dir: &Path,
    config: &kontext_core::config::PipelineConfig,
) -> (std::collections::BTreeMap<(String, String), u64>, u64) {
    let router = kontext_stream::Router::new(config);
    let log = open_embedded_log(data_dir);
    let mut expected = std::collections::BTreeMap::new();
    let mut total = 0u64;
    for topic in config.source_topics() {
        for r in dense_partitions(&log, &topic).await.iter().flatten() {
            total += 1;
            if let kontext_stream::Outcome::Update(u) = router.process(r) {
                assert!(matches!(u.change, kontext_store::Change::Upsert(_)));
                *expected.entry((u.entity_type, u.entity_id)).or_default() += 1;
            }
        }
    }
    (expected, total)
}

/// `(entity type, id)` → the joins' fields of that entity.
#[allow(dead_code)]
pub type JoinedFields =
    std::collections::BTreeMap<(String, String), serde_json::Map<String, serde_json::Value>>;

/// The joins' expected outputs, recomputed naively from the repartition topic (the log the
/// processor's join tasks read): per partition in offset order, re-keyed copies dropped (an
/// origin offset at or below the highest seen for its origin partition), table rows merged,
/// deleted on a tombstone, each stream update joined with the row as it stands. Per stream
/// entity, the output of its newest update (event time, then repartition offset) is what
/// the store must hold. Returns `(entity type, id)` → the join's fields.
#[allow(dead_code)]
pub async fn expected_joins_from_log(
    data_dir: &Path,
    config: &kontext_core::config::PipelineConfig,
) -> JoinedFields {
    use serde_json::{Map, Value};
    use std::collections::BTreeMap;
    let log = open_embedded_log(data_dir);
    let topic = format!("{}-features-repartition", config.name);
    // (entity, id) -> (the newest update's (event time, offset), its fields)
    type Versioned = ((i64, i64), Map<String, Value>);
    let mut best: BTreeMap<(String, String), Versioned> = BTreeMap::new();
    for partition in dense_partitions(&log, &topic).await {
        let mut rows: BTreeMap<(String, String), Map<String, Value>> = BTreeMap::new();
        let mut marks: BTreeMap<(String, String, i64), i64> = BTreeMap::new();
        for r in partition {
            let v: Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
            let name = v["g"].as_str().unwrap().to_string();
            let Some(join) = config.joins.get(&name) else {
                continue;
            };
            let origin = (
                name.clone(),
                v["o"][0].as_str().unwrap().to_string(),
                v["o"][1].as_i64().unwrap(),
            );
            let at = v["o"][2].as_i64().unwrap();
            let mark = marks.entry(origin).or_insert(-1);
            if at <= *mark {
                continue;
            }
            *mark = at;
            let key = (name, String::from_utf8(r.key.unwrap().to_vec()).unwrap());
            match v["s"].as_str() {
                Some("t") => match &v["f"] {
                    Value::Object(changes) => rows
                        .entry(key)
                        .or_default()
                        .extend(changes.iter().map(|(k, v)| (k.clone(), v.clone()))),
                    _ => {
                        rows.remove(&key);
                    }
                },
                Some("s") => {
                    let row = rows.get(&key);
                    if row.is_none() && join.kind == kontext_core::config::EnrichmentKind::Inner {
                        continue;
                    }
                    let fields: Map<String, Value> = join
                        .fields
                        .iter()
                        .map(|(out, from)| {
                            let value = row.and_then(|r| r.get(from)).cloned();
                            (out.clone(), value.unwrap_or(Value::Null))
                        })
                        .collect();
                    let id = v["k"].as_str().unwrap().to_string();
                    let version = (v["t"].as_i64().unwrap().max(0), r.offset);
                    let slot = best
                        .entry((join.from.clone(), id))
                        .or_insert((version, Map::new()));
                    if version >= slot.0 {
                        *slot = (version, fields);
                    }
                }
                other => panic!("a join record of side {other:?}"),
            }
        }
    }
    best.into_iter().map(|(k, (_, f))| (k, f)).collect()
}

/// Asserts the store holds exactly the joins' expected fields (see
/// [`expected_joins_from_log`]); returns how many entities were checked.
#[allow(dead_code)]
pub fn assert_joins_match(
    store: &kontext_store::EmbeddedStore,
    config: &kontext_core::config::PipelineConfig,
    expected: &JoinedFields,
) -> usize {
    let join_fields: std::collections::BTreeSet<&str> = config
        .joins
        .values()
        .flat_map(|j| j.fields.keys().map(String::as_str))
        .collect();
    let mut checked = 0;
    for doc in store.dump().expect("dump the store") {
        let key = (doc.entity_type.clone(), doc.entity_id.clone());
        let actual: serde_json::Map<String, serde_json::Value> = doc
            .fields
            .iter()
            .filter(|(k, _)| join_fields.contains(k.as_str()))
            .map(|(k, f)| (k.clone(), f.value.clone()))
            .collect();
        match expected.get(&key) {
            Some(fields) => {
                assert_eq!(&actual, fields, "joined fields of {key:?}");
                checked += 1;
            }
            None => assert!(
                actual.is_empty(),
                "{key:?} has joined fields the log does not explain: {actual:?}"
            ),
        }
    }
    assert_eq!(checked, expected.len(), "entities with joined fields");
    checked
}
