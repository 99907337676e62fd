//! Kill -9 a writer process and check that every record it saw acknowledged survives.
//!
//! The parent test re-executes this test binary, running only `crash_child_writer` with
//! `KONTEXT_LOG_CRASH_CHILD=<dir>` set. The child appends from several tasks in a loop and prints
//! `ACK <partition> <offset> <id>` for every acknowledged record. The parent reads some of
//! those lines, kills the child with SIGKILL, reopens the log and looks every one of them up.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kontext_core::record::ProduceRecord;
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog, FsyncPolicy};
use kontext_log::{Log, TopicSpec};

const CHILD_ENV: &str = "KONTEXT_LOG_CRASH_CHILD";
const POLICY_ENV: &str = "KONTEXT_LOG_CRASH_POLICY";
const FIRST_ID_ENV: &str = "KONTEXT_LOG_CRASH_FIRST_ID";
const TOPIC: &str = "crash";
const PARTITIONS: i32 = 3;

fn config(policy: &str) -> EmbeddedConfig {
    let fsync = match policy {
        "always" => FsyncPolicy::Always,
        _ => FsyncPolicy::default(),
    };
    // Small segments so kills also land around segment rolls.
    EmbeddedConfig {
        fsync,
        segment_bytes: 64 * 1024,
        ..Default::default()
    }
}

fn payload(id: u64) -> Vec<u8> {
    let mut v = format!("id={id};").into_bytes();
    v.resize(v.len() + (id % 200) as usize, b'.');
    v
}

#[test]
fn killed_writer_loses_no_acknowledged_record_under_group_commit() {
    run_crash_rounds("group_commit");
}

#[test]
fn killed_writer_loses_no_acknowledged_record_under_always() {
    run_crash_rounds("always");
}

fn run_crash_rounds(policy: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut acked: HashMap<u64, (i32, i64)> = HashMap::new();
    for round in 0..3u64 {
        let mut child = Command::new(&exe)
            .args([
                "crash_child_writer",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env(POLICY_ENV, policy)
            .env(FIRST_ID_ENV, (round * 1_000_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let kill_after = 2000 + round as usize * 1500;
        let mut seen = 0usize;
        let mut line = Vec::new();
        let mut killed = false;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .expect("read child output");
            if n == 0 {
                break;
            }
            // A line cut short by the kill is not counted: only whole lines are acknowledgements.
            if line.last() != Some(&b'\n') {
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            let Some(at) = text.find("ACK ") else {
                continue;
            };
            let fields: Vec<i64> = text[at + 4..]
                .split_whitespace()
                .map(|f| f.parse().expect("number"))
                .collect();
            let [partition, offset, id] = fields[..] else {
                panic!("bad line {text:?}")
            };
            assert!(
                acked
                    .insert(id as u64, (partition as i32, offset))
                    .is_none(),
                "id {id} twice"
            );
            seen += 1;
            if seen == kill_after && !killed {
                child.kill().expect("SIGKILL the child");
                killed = true;
            }
        }
        let status = child.wait().expect("wait");
        assert!(
            killed && !status.success(),
            "child was killed (status {status:?})"
        );

        // Reopen and check every acknowledged record.
        let log = EmbeddedLog::open(dir.path(), config(policy)).expect("reopen after kill");
        let mut by_partition: BTreeMap<i32, Vec<Option<Bytes>>> = BTreeMap::new();
        for p in 0..PARTITIONS {
            let records = log.fetch(TOPIC, p, 0, usize::MAX).expect("fetch");
            for (i, r) in records.iter().enumerate() {
                assert_eq!(r.offset, i as i64, "dense offsets");
            }
            by_partition.insert(p, records.into_iter().map(|r| r.value).collect());
        }
        for (&id, &(partition, offset)) in &acked {
            let value = by_partition[&partition]
                .get(offset as usize)
                .unwrap_or_else(|| {
                    panic!("round {round}: acknowledged {partition}@{offset} (id {id}) is missing")
                });
            assert_eq!(
                value.as_deref(),
                Some(&payload(id)[..]),
                "round {round}: {partition}@{offset}"
            );
        }
        drop(log);
    }
    assert!(
        acked.len() >= 2000 + 3500 + 5000,
        "checked {} acknowledged records",
        acked.len()
    );
}

/// The writer run in a child process; a no-op in a normal test run.
#[test]
fn crash_child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let policy = std::env::var(POLICY_ENV).unwrap_or_default();
    let first_id: u64 = std::env::var(FIRST_ID_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let log = EmbeddedLog::open(dir.as_ref(), config(&policy)).expect("open");
        log.create_topic(&TopicSpec::new(TOPIC, PARTITIONS))
            .await
            .expect("topic");
        let producer = log.producer().await.expect("producer");
        let next_id = Arc::new(AtomicU64::new(first_id));
        let mut tasks = Vec::new();
        for task in 0..4u64 {
            let producer = producer.clone();
            let next_id = next_id.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (task + 1) ^ first_id;
                loop {
                    let n = 1 + (xorshift(&mut rng) % 20) as usize;
                    let ids: Vec<u64> = (0..n)
                        .map(|_| next_id.fetch_add(1, Ordering::Relaxed))
                        .collect();
                    let records = ids
                        .iter()
                        .map(|&id| {
                            let mut r =
                                ProduceRecord::new(TOPIC, None, Some(Bytes::from(payload(id))));
                            match id % 3 {
                                0 => r.partition = Some((id % PARTITIONS as u64) as i32),
                                1 => r.key = Some(Bytes::from(format!("key-{}", id % 17))),
                                _ => {}
                            }
                            r
                        })
                        .collect();
                    let positions = producer.send(records).await.expect("send");
                    let mut out = String::new();
                    for (pos, id) in positions.iter().zip(&ids) {
                        out.push_str(&format!("ACK {} {} {}\n", pos.partition, pos.offset, id));
                    }
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(out.as_bytes()).expect("stdout");
                    stdout.flush().expect("flush");
                }
            }));
        }
        // The parent kills us; this bound only stops a child whose parent died.
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
