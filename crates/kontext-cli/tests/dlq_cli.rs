//! `kontext dlq list|show|replay` through the real binary, on the embedded log and on the real
//! Kafka broker: poison pills are dead-lettered, listed by stage and error, shown decoded; after
//! a fix (the pipeline learns the source it did not know) replay lands every record in the
//! store exactly once, including after a replay that died between the produce and the ledger
//! write; replaying again replays nothing.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kontext_core::config::PipelineConfig;
use kontext_core::record::ProduceRecord;
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::{Log, TopicSpec};
use kontext_store::{EmbeddedStore, StoreSchema};
use serde_json::Value;
use support::{
    assert_applied_exactly_once, free_port, get_json, kafka_bootstrap, kafka_tool_script, path_str,
    wait_for_zero_lag, Kontext,
};

const PARTITIONS: i32 = 3;

/// Where the scenario runs.
struct Setup {
    /// The pipeline's name (its groups derive from it) and its one entity topic.
    name: String,
    topic: String,
    /// `log:` section of the pipeline file.
    log_yaml: String,
    data_dir: tempfile::TempDir,
    kafka: bool,
}

impl Setup {
    fn embedded() -> Self {
        Self {
            name: "dlqtest".into(),
            topic: "context.customers".into(),
            log_yaml: "log: { backend: embedded }".into(),
            data_dir: tempfile::tempdir().unwrap(),
            kafka: false,
        }
    }

    fn kafka() -> Self {
        let bootstrap = kafka_bootstrap();
        let suffix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Self {
            name: format!("dlqtest-{suffix:x}"),
            topic: format!("dlqtest-{suffix:x}.customers"),
            log_yaml: format!("log: {{ backend: kafka, bootstrap_servers: \"{bootstrap}\" }}"),
            data_dir: tempfile::tempdir().unwrap(),
            kafka: true,
        }
    }

    fn data(&self) -> &str {
        path_str(self.data_dir.path())
    }

    fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.topic)
    }

    /// Writes the pipeline file. `fixed` adds the `erp` source the first version lacks.
    fn pipeline(&self, fixed: bool) -> String {
        let erp = if fixed {
            format!(
                "  erp:\n    topic: {t}\n    entity: customer\n    match: {{ ce_source: erp }}\n    fields: {{ given_name: contact_name }}\n",
                t = self.topic
            )
        } else {
            String::new()
        };
        let yaml = format!(
            "name: {name}\n{log}\ntopics: {{ partitions: {PARTITIONS} }}\nentities:\n  customer: {{ key: customer_id, topic: {t} }}\nsources:\n  crm:\n    topic: {t}\n    entity: customer\n    match: {{ ce_source: crm }}\n    fields: {{ given_name: first_name }}\n{erp}store: {{ name: main, kind: embedded }}\n",
            name = self.name,
            log = self.log_yaml,
            t = self.topic,
        );
        let file = self
            .data_dir
            .path()
            .join(if fixed { "fixed.yaml" } else { "pipeline.yaml" });
        std::fs::write(&file, yaml).unwrap();
        path_str(&file).to_string()
    }

    async fn open_log(&self) -> Arc<dyn Log> {
        if self.kafka {
            Arc::new(KafkaLog::new(KafkaConfig::new(kafka_bootstrap())).unwrap())
        } else {
            EmbeddedLog::open(&self.data_dir.path().join("log"), EmbeddedConfig::default()).unwrap()
        }
    }

    /// Runs the pipeline in `file` until its store has applied the whole log.
    async fn run(&self, file: &str) -> (Kontext, u16) {
        let port = free_port();
        let kontext = Kontext::spawn(&[
            "run",
            "-c",
            file,
            "--data-dir",
            self.data(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]);
        wait_for_zero_lag(port, Duration::from_secs(90)).await;
        (kontext, port)
    }
}

fn event(topic: &str, key: &str, source: &str, value: &[u8]) -> ProduceRecord {
    ProduceRecord::new(
        topic,
        Some(Bytes::from(key.to_string())),
        Some(Bytes::copy_from_slice(value)),
    )
    .with_header("ce_specversion", "1.0")
    .with_header("ce_id", format!("{source}-{key}"))
    .with_header("ce_source", source.to_string())
    .with_header("ce_type", format!("{source}.customer.updated"))
}

/// Good CRM events C1..C6; events E1..E3 from `erp`, a source the first pipeline does not
/// know (dead-lettered at TRANSFORMATION, fixable); B1, B2 with invalid JSON (dead-lettered at
/// VALUE_CONVERTER, not fixable by configuration).
fn records(topic: &str) -> Vec<ProduceRecord> {
    let mut v = Vec::new();
    for i in 1..=6 {
        v.push(event(
            topic,
            &format!("C{i}"),
            "crm",
            format!(r#"{{"first_name":"Crm {i}"}}"#).as_bytes(),
        ));
        if i <= 3 {
            v.push(event(
                topic,
                &format!("E{i}"),
                "erp",
                format!(r#"{{"contact_name":"Erp {i}"}}"#).as_bytes(),
            ));
        }
        if i <= 2 {
            v.push(event(
                topic,
                &format!("B{i}"),
                "crm",
                b"{\"first_name\": \x01",
            ));
        }
    }
    v
}

fn kontext(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kontext"))
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(envs.iter().copied())
        .output()
        .expect("run kontext")
}

fn kontext_ok(args: &[&str]) -> String {
    let out = kontext(args, &[]);
    assert!(
        out.status.success(),
        "kontext {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn kontext_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = kontext_ok(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: not JSON: {out}"))
}

/// (replayed, skipped, recovered, filtered, failed) of a replay summary.
fn counts(summary: &Value) -> (u64, u64, u64, u64, u64) {
    let n = |k: &str| {
        summary[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {summary}"))
    };
    (
        n("replayed"),
        n("skipped"),
        n("recovered"),
        n("filtered"),
        n("failed"),
    )
}

/// The error groups of `dlq list --json` for one topic: (stage, kind) -> (count, replayed).
fn groups(listing: &Value, topic: &str) -> BTreeMap<(String, String), (u64, u64)> {
    let t = listing["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == topic)
        .unwrap_or_else(|| panic!("{topic} not in {listing}"));
    t["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                (
                    g["stage"].as_str().unwrap().to_string(),
                    g["kind"].as_str().unwrap().to_string(),
                ),
                (
                    g["count"].as_u64().unwrap(),
                    g["replayed"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

async fn records_in(log: &dyn Log, topic: &str) -> i64 {
    log.describe_topic(topic)
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.high_watermark - p.low_watermark)
        .sum()
}

async fn dead_letters_replay_once(setup: Setup) {
    let topic = setup.topic.clone();
    let dlq = setup.dlq_topic();
    let v1 = setup.pipeline(false);
    let v2 = setup.pipeline(true);
    let base = |cmd: &[&str], file: &str| -> Vec<String> {
        cmd.iter()
            .map(|s| s.to_string())
            .chain([
                "-c".into(),
                file.into(),
                "--data-dir".into(),
                setup.data().into(),
            ])
            .collect()
    };
    let run_ok = |cmd: &[&str], file: &str| {
        let a = base(cmd, file);
        kontext_ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let run_json = |cmd: &[&str], file: &str| {
        let a = base(cmd, file);
        kontext_json(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let sent = records(&topic);
    {
        let log = setup.open_log().await;
        log.create_topic(&TopicSpec::new(&topic, PARTITIONS))
            .await
            .unwrap();
        log.producer()
            .await
            .unwrap()
            .send(sent.clone())
            .await
            .unwrap();
    }

    // 1. The first pipeline dead-letters the five pills and moves on.
    let (running, _port) = setup.run(&v1).await;
    let running = if setup.kafka {
        // Against Kafka the dlq commands work while the pipeline runs.
        Some(running)
    } else {
        // The embedded log belongs to the running pipeline: a clear refusal.
        let a = base(&["dlq", "list"], &v1);
        let out = kontext(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("stop the pipeline"), "{err}");
        assert!(err.contains("Kafka backend"), "{err}");
        running.interrupt();
        None
    };

    // 2. list: by stage and error, with failure times.
    let listing = run_json(&["dlq", "list"], &v1);
    assert_eq!(
        groups(&listing, &dlq),
        BTreeMap::from([
            (("TRANSFORMATION".into(), "no_source".into()), (3, 0)),
            (("VALUE_CONVERTER".into(), "invalid_json".into()), (2, 0)),
        ]),
        "{listing}"
    );
    let t = &listing["topics"][0];
    assert_eq!(t["records"], 5, "{listing}");
    assert!(
        t["oldest"].is_string() && t["newest"].is_string(),
        "{listing}"
    );
    let table = run_ok(&["dlq", "list", "--topic", &topic], &v1);
    assert!(
        table.contains(&format!("{dlq}  5 dead letters, 0 replayed")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("no_source") && l.contains(" 3 ")),
        "{table}"
    );

    // 3. A dry run names the dead letters a filter selects, and writes nothing.
    let dry = run_json(
        &["dlq", "replay", "--dry-run", "--error", "INVALID_JSON"],
        &v1,
    );
    assert_eq!(counts(&dry), (2, 0, 0, 3, 0), "{dry}");
    let broken: Vec<&Value> = dry["topics"][0]["would_replay"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    let mut keys: Vec<&str> = broken.iter().map(|w| w["key"].as_str().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, ["B1", "B2"]);

    // 4. show: the invalid JSON decoded as text and hex, the error headers readable.
    let b1 = broken.iter().find(|w| w["key"] == "B1").unwrap();
    let coord = b1["of"].as_str().unwrap();
    let shown = run_json(&["dlq", "show", coord], &v1);
    assert_eq!(shown["stage"], "VALUE_CONVERTER", "{shown}");
    assert_eq!(shown["kind"], "invalid_json", "{shown}");
    assert_eq!(shown["key"]["text"], "B1");
    assert_eq!(shown["origin"]["topic"], topic.as_str());
    assert_eq!(
        shown["error_headers"]["__connect.errors.topic"],
        topic.as_str()
    );
    assert_eq!(
        shown["value"]["hex"],
        hex(b"{\"first_name\": \x01"),
        "{shown}"
    );
    assert!(shown["value"]["not_json"].is_string(), "{shown}");
    assert!(shown["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["key"] == "ce_source" && h["value"] == "crm"));
    assert!(shown["replayed"].is_null());
    // The same record by --topic/--partition/--offset, as text.
    let (p, o) = {
        let mut parts = coord.rsplit('/');
        let o = parts.next().unwrap().to_string();
        (parts.next().unwrap().to_string(), o)
    };
    let text = run_ok(
        &[
            "dlq",
            "show",
            "--topic",
            &topic,
            "--partition",
            &p,
            "--offset",
            &o,
        ],
        &v1,
    );
    assert!(text.contains(&format!("dead letter {coord}")), "{text}");
    assert!(text.contains("error       invalid_json"), "{text}");
    assert!(text.contains("key         B1"), "{text}");
    assert!(text.contains("value       not JSON"), "{text}");
    assert!(text.contains("|{\"first_name\": .|"), "{text}");
    assert!(text.contains("replayed    no"), "{text}");
    // The source record's own coordinates are not a dead letter's: refused, with the way on.
    // Either form: `/OFFSET`, or `@OFFSET` as the sink logs it.
    let (p, o) = (&shown["origin"]["partition"], &shown["origin"]["offset"]);
    for origin in [format!("{topic}/{p}/{o}"), format!("{topic}/{p}@{o}")] {
        let a = base(&["dlq", "show", &origin], &v1);
        let out = kontext(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!(
                "is a record of the source topic {topic}, not a dead letter"
            )) && err.contains(&format!("kontext dlq replay --topic {topic} --dry-run")),
            "{err}"
        );
    }

    // 5. The fix: the pipeline now knows `erp`. Kafka: the fixed pipeline runs during replay.
    let running = match running {
        Some(v1_running) => {
            v1_running.interrupt();
            Some(setup.run(&v2).await)
        }
        None => None,
    };

    // A replay that dies after its copy of E1 was acknowledged, before the ledger says so.
    let a = base(
        &["dlq", "replay", "--stage", "transformation", "--key", "E1"],
        &v2,
    );
    let crashed = kontext(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("KONTEXT_DLQ_FAILPOINT", "after-produce")],
    );
    assert_eq!(crashed.status.code(), Some(3), "{crashed:?}");

    // The rerun finds E1's copy instead of producing a second one, and replays E2, E3.
    let replayed = run_json(&["dlq", "replay", "--stage", "TRANSFORMATION"], &v2);
    assert_eq!(counts(&replayed), (2, 1, 1, 2, 0), "{replayed}");
    // Again: nothing left to replay.
    let again = run_json(&["dlq", "replay", "--stage", "TRANSFORMATION"], &v2);
    assert_eq!(counts(&again), (0, 3, 0, 2, 0), "{again}");
    // --force would replay them again; dry run only.
    let forced = run_json(
        &["dlq", "replay", "--force", "--key", "E2", "--dry-run"],
        &v2,
    );
    assert_eq!(counts(&forced), (1, 0, 0, 4, 0), "{forced}");

    // Exactly three copies landed in the source topic.
    {
        let log = setup.open_log().await;
        assert_eq!(
            records_in(log.as_ref(), &topic).await,
            sent.len() as i64 + 3
        );
    }
    let listing = run_json(&["dlq", "list"], &v2);
    assert_eq!(
        groups(&listing, &dlq),
        BTreeMap::from([
            (("TRANSFORMATION".into(), "no_source".into()), (3, 3)),
            (("VALUE_CONVERTER".into(), "invalid_json".into()), (2, 0)),
        ]),
        "{listing}"
    );
    let shown = run_json(&["dlq", "show", coord], &v2);
    assert!(
        shown["replayed"].is_null(),
        "B1 was never replayed: {shown}"
    );

    // 6. The fixed pipeline applies each replayed record once.
    let (running, port) = match running {
        Some(r) => {
            wait_for_zero_lag(r.1, Duration::from_secs(90)).await;
            r
        }
        None => setup.run(&v2).await,
    };
    for i in 1..=3 {
        let (status, body) = get_json(&format!("http://127.0.0.1:{port}/v1/context/customer/E{i}"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["fields"]["given_name"], format!("Erp {i}"), "{body}");
        assert_eq!(body["provenance"]["given_name"]["source"], "erp", "{body}");
        assert_eq!(body["events_applied"], 1, "{body}");
    }
    running.interrupt();

    let config = PipelineConfig::load(Path::new(&v2)).unwrap();
    let store = EmbeddedStore::open(
        &setup.data_dir.path().join("stores/main.redb"),
        StoreSchema::from_config(&config),
    )
    .unwrap();
    let expected: BTreeMap<(String, String), u64> = (1..=6)
        .map(|i| format!("C{i}"))
        .chain((1..=3).map(|i| format!("E{i}")))
        .map(|id| (("customer".to_string(), id), 1))
        .collect();
    assert_applied_exactly_once(&store, &expected);

    if setup.kafka {
        // The commands read outside any consumer group: Kafka's own tool lists only the
        // pipeline's groups.
        let out = std::process::Command::new(kafka_tool_script())
            .args([
                "consumer-groups",
                "--bootstrap-server",
                &kafka_bootstrap(),
                "--list",
            ])
            .output()
            .expect("run Kafka's consumer-groups tool");
        let text = String::from_utf8_lossy(&out.stdout);
        let ours: Vec<&str> = text.lines().filter(|l| l.contains(&setup.name)).collect();
        assert!(
            !ours.is_empty(),
            "the pipeline's groups are listed:\n{text}"
        );
        assert!(
            ours.iter().all(|g| !g.contains("dlq-cli")),
            "`kontext dlq` left consumer groups behind: {ours:?}"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_dead_letters_once_on_the_embedded_log() {
    dead_letters_replay_once(Setup::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_dead_letters_once_on_kafka_while_the_pipeline_runs() {
    dead_letters_replay_once(Setup::kafka()).await;
}

/// Creates the source and dead-letter topics and, per `(key, times)`, a malformed record and
/// two dead letters of it (one per store, as a two-store pipeline writes them), each with
/// `kontext.errors.time` set to its time when given.
async fn two_letters_each<const N: usize>(
    setup: &Setup,
    config: &PipelineConfig,
    records: &[(&str, [Option<&str>; 2]); N],
) {
    use kontext_stream::dlq::{headers, DeadLetters};
    let topic = setup.topic.clone();
    let log = setup.open_log().await;
    log.create_topic(&TopicSpec::new(&topic, PARTITIONS))
        .await
        .unwrap();
    log.create_topic(&TopicSpec::new(setup.dlq_topic(), PARTITIONS))
        .await
        .unwrap();
    let producer = log.producer().await.unwrap();
    let error = kontext_stream::ProcessError::Envelope(
        kontext_core::envelope::EnvelopeError::InvalidJson("eof".into()),
    );
    for (key, times) in records {
        let bad = event(&topic, key, "erp", br#"{"contact_name": "#);
        let at = producer.send(vec![bad]).await.unwrap()[0];
        let record = log
            .read_partition(&topic, at.partition, at.offset, at.offset + 1)
            .await
            .unwrap()
            .remove(0);
        let letters: Vec<_> = ["a", "b"]
            .into_iter()
            .zip(times)
            .map(|(store, time)| {
                let mut letter = DeadLetters::new(
                    config.dead_letter.clone(),
                    config.name.clone(),
                    config.store_group(store),
                    producer.clone(),
                )
                .letter(&record, &error);
                if let Some(time) = time {
                    for h in letter.headers.iter_mut().filter(|h| h.key == headers::TIME) {
                        h.value = Some(Bytes::copy_from_slice(time.as_bytes()));
                    }
                }
                letter
            })
            .collect();
        producer.send(letters).await.unwrap();
    }
}

/// Runs with different filters: a record with two letters is still put back once, whichever
/// of its letters an earlier run replayed, even when that letter comes after the one this run
/// selects. E1's letters fail at 10:00 then 12:00; E2's (written in the same order) at 12:00
/// then 10:00. `--until 11:00` replays E1's first letter and E2's second; `--since 11:00`
/// must then replay neither record again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_other_filters_do_not_replay_a_record_twice() {
    let setup = Setup::embedded();
    let file = setup.pipeline(true);
    let config = PipelineConfig::load(Path::new(&file)).unwrap();
    let topic = setup.topic.clone();
    two_letters_each(
        &setup,
        &config,
        &[
            (
                "E1",
                [
                    Some("2026-11-25T10:00:00.000Z"),
                    Some("2026-11-25T12:00:00.000Z"),
                ],
            ),
            (
                "E2",
                [
                    Some("2026-11-25T12:00:00.000Z"),
                    Some("2026-11-25T10:00:00.000Z"),
                ],
            ),
        ],
    )
    .await;
    let before = records_in(setup.open_log().await.as_ref(), &topic).await;
    let replay = |extra: &[&str]| {
        let mut args = vec!["dlq", "replay", "-c", &file, "--data-dir", setup.data()];
        args.extend_from_slice(extra);
        kontext_json(&args)
    };
    let until = replay(&["--until", "2026-11-25T11:00:00Z"]);
    assert_eq!(counts(&until), (2, 0, 0, 2, 0), "{until}");
    let since = replay(&["--since", "2026-11-25T11:00:00Z"]);
    assert_eq!(counts(&since), (0, 0, 0, 2, 0), "{since}");
    assert_eq!(since["duplicates"], 2, "{since}");
    let all = replay(&[]);
    assert_eq!(counts(&all), (0, 2, 0, 0, 0), "{all}");
    let after = records_in(setup.open_log().await.as_ref(), &topic).await;
    assert_eq!(after - before, 2, "one copy per record");
}

/// Two dead letters of one record (a pipeline with two stores dead-letters a bad record once
/// per sink; a letter can also be written again after a restart): `replay` puts the record
/// back once, and a second replay puts back nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dead_letters_of_one_record_replay_it_once() {
    let setup = Setup::embedded();
    let file = setup.pipeline(true);
    let config = PipelineConfig::load(Path::new(&file)).unwrap();
    let topic = setup.topic.clone();
    two_letters_each(&setup, &config, &[("E1", [None, None])]).await;
    let before = records_in(setup.open_log().await.as_ref(), &topic).await;
    let replay = |extra: &[&str]| {
        let mut args = vec!["dlq", "replay", "-c", &file, "--data-dir", setup.data()];
        args.extend_from_slice(extra);
        kontext_json(&args)
    };
    let first = replay(&[]);
    assert_eq!(counts(&first), (1, 0, 0, 0, 0), "{first}");
    assert_eq!(first["duplicates"], 1, "{first}");
    let again = replay(&[]);
    assert_eq!(counts(&again), (0, 1, 0, 0, 0), "{again}");
    assert_eq!(again["duplicates"], 1, "{again}");
    let forced = replay(&["--force"]);
    assert_eq!(counts(&forced), (1, 0, 0, 0, 0), "{forced}");
    let after = records_in(setup.open_log().await.as_ref(), &topic).await;
    assert_eq!(
        after - before,
        2,
        "one copy per replay that replayed, not one per letter"
    );
}
