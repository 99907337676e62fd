//! Crash verifier for the processor stage, in the style of Kafka's EOS system test: keyed
//! events with known values go into the log in chunks, `kontext run` (the real binary) is
//! killed with SIGKILL at random moments and restarted, and at the end count/sum/min/max per
//! key recomputed from the input must equal, for every key, the features in the store.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kontext_core::config::PipelineConfig;
use kontext_core::record::ProduceRecord;
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::Log;
use kontext_store::{EmbeddedStore, StoreSchema};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::{free_port, path_str, Kontext};

const RECORDS: usize = 20_000;
const ACCOUNTS: u32 = 5_000;
const KILLS: usize = 12;

fn pipeline(data_dir: &Path) -> String {
    format!(
        r#"
name: crash
data_dir: {data}
log: {{ backend: embedded, fsync: group_commit }}
topics: {{ partitions: 4 }}
entities:
  account: {{ key: account_id, topic: crash.accounts }}
  tx: {{ key: tx_id, topic: crash.txs }}
sources:
  ledger:
    topic: crash.txs
    entity: tx
    fields: {{ account_id: account, amount: amount }}
features:
  tx_count: {{ from: tx, entity: account, key: account_id, agg: count }}
  tx_sum: {{ from: tx, entity: account, key: account_id, agg: sum, field: amount }}
  tx_min: {{ from: tx, entity: account, key: account_id, agg: min, field: amount }}
  tx_max: {{ from: tx, entity: account, key: account_id, agg: max, field: amount }}
"#,
        data = path_str(data_dir)
    )
}

/// count, sum, min, max
type Expected = BTreeMap<String, (u64, i64, i64, i64)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_counts_every_event_exactly_once() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, pipeline(dir.path())).unwrap();
    let config = PipelineConfig::load(&file).unwrap();
    let seed: u64 = std::env::var("KONTEXT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (KONTEXT_CRASH_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);

    // The input, in one chunk per run: each run has new records to process when it is killed.
    let mut records = Vec::with_capacity(RECORDS);
    let mut expected = Expected::new();
    for i in 0..RECORDS {
        let account = format!("A-{}", rng.random_range(0..ACCOUNTS));
        let amount: i64 = rng.random_range(-1_000..=1_000);
        let e = expected
            .entry(account.clone())
            .or_insert((0, 0, i64::MAX, i64::MIN));
        *e = (e.0 + 1, e.1 + amount, e.2.min(amount), e.3.max(amount));
        records.push(ProduceRecord::new(
            "crash.txs",
            Some(Bytes::from(format!("T-{i}"))),
            Some(Bytes::from(
                json!({"account": account, "amount": amount}).to_string(),
            )),
        ));
    }
    let chunks: Vec<Vec<ProduceRecord>> = records
        .chunks(RECORDS.div_ceil(KILLS + 1))
        .map(<[ProduceRecord]>::to_vec)
        .collect();

    let mut chunks = chunks.into_iter();
    let mut kills = 0;
    loop {
        if let Some(chunk) = chunks.next() {
            append(dir.path(), &config, chunk).await;
        }
        let port = free_port();
        let mut kontext = Kontext::spawn(&[
            "run",
            "-c",
            path_str(&file),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]);
        kontext.wait_for_line("serving on", Duration::from_secs(60));
        if kills == KILLS {
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut wrong = mismatches_over_http(port, &expected).await;
            while !wrong.is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(300)).await;
                wrong = mismatches_over_http(port, &expected).await;
            }
            kontext.interrupt();
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..1_200))).await;
        kontext.kill_9();
        kills += 1;
    }

    // The final word is the store file itself: every key exact, no key the input lacks.
    let store = EmbeddedStore::open(
        &dir.path().join("stores/main.redb"),
        StoreSchema::from_config(&config),
    )
    .unwrap();
    let mut actual = BTreeMap::new();
    for doc in store.dump().unwrap() {
        if doc.entity_type == "account" {
            let values = doc.values();
            actual.insert(doc.entity_id.clone(), values);
        }
    }
    let mut wrong = Vec::new();
    for (account, &(count, sum, min, max)) in &expected {
        let want = json!({"account_id": account, "tx_count": count, "tx_sum": sum as f64,
                          "tx_min": min as f64, "tx_max": max as f64});
        match actual.get(account) {
            Some(got) if same(got, &want) => {}
            got => wrong.push(format!("{account}: expected {want}, store has {got:?}")),
        }
    }
    for account in actual.keys().filter(|a| !expected.contains_key(*a)) {
        wrong.push(format!("{account}: in the store, not in the input"));
    }
    let outputs = topic_records(dir.path(), &config, "crash.accounts.features").await;
    eprintln!(
        "{RECORDS} records over {} keys, {kills} kills, {outputs} feature records for {} keys, {:.1} s",
        expected.len(),
        actual.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        wrong.is_empty(),
        "{} of {} keys differ, e.g.:\n{}",
        wrong.len(),
        expected.len(),
        wrong[..wrong.len().min(10)].join("\n")
    );
    assert_eq!(kills, KILLS);
}

fn same(got: &serde_json::Map<String, Value>, want: &Value) -> bool {
    want.as_object().unwrap().iter().all(|(k, v)| {
        got.get(k)
            .is_some_and(|g| g == v || (g.as_f64().is_some() && g.as_f64() == v.as_f64()))
    })
}

/// Keys whose features differ from `expected`, asked through the API (100 per request).
async fn mismatches_over_http(port: u16, expected: &Expected) -> Vec<String> {
    let client = reqwest::Client::new();
    let keys: Vec<&String> = expected.keys().collect();
    let mut wrong = Vec::new();
    for chunk in keys.chunks(100) {
        let requests: Vec<Value> = chunk
            .iter()
            .map(|k| json!({"entity_type": "account", "entity_id": k}))
            .collect();
        let Ok(response) = client
            .post(format!("http://127.0.0.1:{port}/v1/context:batchGet"))
            .json(&json!({"requests": requests}))
            .send()
            .await
        else {
            return vec!["API not answering".into()];
        };
        let Ok(body) = response.json::<Value>().await else {
            return vec!["API answer not JSON".into()];
        };
        for (key, result) in chunk
            .iter()
            .zip(body["results"].as_array().into_iter().flatten())
        {
            let (count, sum, min, max) = expected[*key];
            let fields = &result["context"]["fields"];
            let ok = fields["tx_count"].as_u64() == Some(count)
                && fields["tx_sum"].as_f64() == Some(sum as f64)
                && fields["tx_min"].as_f64() == Some(min as f64)
                && fields["tx_max"].as_f64() == Some(max as f64);
            if !ok {
                wrong.push((*key).clone());
            }
        }
    }
    wrong
}

/// Appends records to the embedded log while no kontext runs (it holds the log when it does).
async fn append(data_dir: &Path, config: &PipelineConfig, records: Vec<ProduceRecord>) {
    let log = EmbeddedLog::open(&data_dir.join("log"), EmbeddedConfig::default()).unwrap();
    for topic in ["crash.txs", "crash.accounts"] {
        let _ = log
            .create_topic(&kontext_log::TopicSpec::new(
                topic,
                config.topics.partitions,
            ))
            .await
            .unwrap();
    }
    let producer = log.producer().await.unwrap();
    producer.send(records).await.unwrap();
    producer.flush().await.unwrap();
}

async fn topic_records(data_dir: &Path, _config: &PipelineConfig, topic: &str) -> i64 {
    let log = EmbeddedLog::open(&data_dir.join("log"), EmbeddedConfig::default()).unwrap();
    let d = log.describe_topic(topic).await.unwrap();
    d.partitions
        .iter()
        .map(|p| p.high_watermark - p.low_watermark)
        .sum()
}
