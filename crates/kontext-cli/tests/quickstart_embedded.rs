//! The quickstart end to end on the embedded log, through the real binary.

mod support;

use std::time::Duration;

use kontext_core::config::PipelineConfig;
use kontext_store::{EmbeddedStore, StoreSchema};
use support::{
    assert_applied_exactly_once, assert_joins_match, catch_up, catch_up_with, context_sources,
    expected_from_log, expected_joins_from_log, free_port, get_json, initial_load, path_str,
    run_until_exit, topic_partitions, wait_for_zero_lag, Kontext,
};

const PIPELINE: &str = include_str!("../../../examples/customer-service/pipeline.yaml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn printed_curl_returns_context_merged_from_three_sources() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut kontext = Kontext::spawn(&[
        "quickstart",
        "--data-dir",
        path_str(dir.path()),
        "--port",
        &port.to_string(),
    ]);
    let line = kontext.wait_for_line("curl -s http://", Duration::from_secs(60));
    let url = line.trim().trim_start_matches("curl -s ").to_string();
    let (status, body) = get_json(&url).await.expect("the printed curl answers");
    assert_eq!(status, 200, "{body}");
    // Every field says where it came from.
    for p in body["provenance"].as_object().unwrap().values() {
        for key in [
            "source",
            "event_id",
            "topic",
            "partition",
            "offset",
            "event_time",
        ] {
            assert!(!p[key].is_null(), "provenance lacks {key}: {p}");
        }
    }
    let sources = context_sources(&body);
    assert!(
        sources.len() >= 3,
        "context merges only {sources:?}: {body}"
    );
    // CRM's first_name and billing's contact_name both land in given_name.
    let given_name_source = body["provenance"]["given_name"]["source"].as_str().unwrap();
    assert!(["crm", "billing"].contains(&given_name_source));

    let (status, list) = get_json(&format!(
        "http://127.0.0.1:{port}/v1/entities/customer?limit=5"
    ))
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(list["ids"].as_array().unwrap().len(), 5);
    let (status, health) = get_json(&format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap();
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    // Freshness is measured for every applied update, source events and processor outputs
    // apart (the processor's first outputs may still be on their way: wait for them).
    let timed = |metrics: &str, kind: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "kontext_event_to_applied_seconds_count{{kind=\"{kind}\"}} "
                ))
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {kind} freshness histogram:\n{metrics}"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = metrics_text(port).await;
        if timed(&metrics, "entity") > 0 && timed(&metrics, "features") > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "updates applied but not timed:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kontext.interrupt();
}

/// kill -9 in the middle of ingest, several times, then a clean catch-up run: every valid
/// record in the log is applied to the store exactly once (events_applied per entity equals
/// the number of valid records for it in the log), and nothing acknowledged is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_ingest_loses_nothing_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = path_str(dir.path()).to_string();
    for round in 0..3 {
        let port = free_port().to_string();
        let mut kontext = Kontext::spawn(&[
            "quickstart",
            "--data-dir",
            &data,
            "--port",
            &port,
            "--rate",
            "3000",
            "--customers",
            "300",
        ]);
        kontext.wait_for_line("curl -s http://", Duration::from_secs(60));
        // Let ingest run a while at full speed, a different time each round.
        tokio::time::sleep(Duration::from_millis(300 + 400 * round)).await;
        kontext.kill_9();
    }
    // Lose the group's committed offsets on top of it: every record is delivered again, and
    // the store must recognise each one it already applied.
    let config = PipelineConfig::parse("pipeline.yaml", PIPELINE).unwrap();
    let store_path = dir.path().join("stores/main.redb");
    let applied_before: u64 = {
        let store = EmbeddedStore::open(&store_path, StoreSchema::from_config(&config)).unwrap();
        store.dump().unwrap().iter().map(|d| d.events_applied).sum()
    };
    assert!(applied_before > 0, "the killed runs applied nothing");
    std::fs::remove_dir_all(dir.path().join("log/groups")).unwrap();
    let (kontext, port) = catch_up(&data).await;
    // Zero lag is not enough: a partition the store had fully applied before the kill has no
    // lag from the start, while its re-delivered records may still be on their way. Skips only
    // grow, so wait for them to reach what the store held, then check they stop exactly there.
    let skipped = || async {
        let metrics = metrics_text(port).await;
        let n: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("kontext_records_skipped_total "))
            .and_then(|n| n.parse().ok())
            .unwrap();
        (n, metrics)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut n, mut metrics) = skipped().await;
    while n < applied_before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (n, metrics) = skipped().await;
    }
    wait_for_zero_lag(port, Duration::from_secs(60)).await;
    let (n, _) = skipped().await;
    assert_eq!(
        n, applied_before,
        "re-delivered records must be skipped exactly when already applied:\n{metrics}"
    );
    kontext.interrupt();

    // Recount from the log, the source of truth.
    let (expected, total) = expected_from_log(dir.path(), &config).await;
    assert!(total > 3_000, "the runs produced only {total} records");

    let store = EmbeddedStore::open(&store_path, StoreSchema::from_config(&config)).unwrap();
    assert_applied_exactly_once(&store, &expected);
    // Orders enriched with their customer: exactly what the join gives over the log.
    let joins = expected_joins_from_log(dir.path(), &config).await;
    let checked = assert_joins_match(&store, &config, &joins);
    assert!(checked > 100, "only {checked} orders were enriched");
}

/// The log is the source of truth: delete the store (keeping the group's committed offsets)
/// and the next run rewinds the group and rebuilds exactly the same store from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_store_is_rebuilt_identically_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = path_str(dir.path()).to_string();
    initial_load(&data, &[]).await;

    let config = PipelineConfig::parse("pipeline.yaml", PIPELINE).unwrap();
    let store_path = dir.path().join("stores/main.redb");
    let dump = |path: &std::path::Path| {
        let store = EmbeddedStore::open(path, StoreSchema::from_config(&config)).unwrap();
        (store.dump().unwrap(), store.applied_offsets().unwrap())
    };
    let before = dump(&store_path);
    assert!(
        before.0.len() >= 390,
        "the initial load holds 200 customers and their first orders: {}",
        before.0.len()
    );
    std::fs::remove_dir_all(dir.path().join("stores")).unwrap();

    let (kontext, _port) = catch_up(&data).await;
    kontext.interrupt();
    assert_eq!(dump(&store_path), before);
}

/// `--partitions N` creates every topic of the example with N partitions. Topics are created
/// once: a later run asking for another count refuses to start and names the flag, and the
/// topics are unchanged; a run with the same N starts and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_another_partition_count_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = path_str(dir.path()).to_string();
    initial_load(&data, &["--partitions", "3"]).await;

    let config = PipelineConfig::parse("pipeline.yaml", PIPELINE).unwrap();
    let partitions = topic_partitions(dir.path()).await;
    assert!(
        partitions.len() > config.entities.len(),
        "entity, dead-letter and processor topics: {partitions:?}"
    );
    assert!(
        partitions.values().all(|&n| n == 3),
        "every topic has the 3 partitions asked for: {partitions:?}"
    );

    // Without the flag the example asks for 12.
    let (ok, stderr) = run_until_exit(
        &[
            "quickstart",
            "--data-dir",
            &data,
            "--port",
            "0",
            "--no-generator",
        ],
        Duration::from_secs(60),
    );
    assert!(
        !ok,
        "a run without --partitions started on topics with 3: {stderr}"
    );
    assert!(
        stderr.contains("already exists with 3 partitions, not 12 (and ")
            && stderr.contains("): run it with --partitions 3, or with a new --data-dir"),
        "{stderr}"
    );
    assert_eq!(topic_partitions(dir.path()).await, partitions);

    let (kontext, _port) = catch_up_with(&data, &["--partitions", "3"]).await;
    kontext.interrupt();
    assert_eq!(topic_partitions(dir.path()).await, partitions);
}

/// Without the generator, on an empty data directory, nothing will arrive that the banner
/// could point at: it says so and gives the API's address instead of waiting for a customer.
#[test]
fn without_the_generator_the_banner_names_the_api_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut kontext = Kontext::spawn(&[
        "quickstart",
        "--data-dir",
        path_str(dir.path()),
        "--port",
        &port.to_string(),
        "--no-generator",
    ]);
    kontext.wait_for_line(
        "the generator is off (--no-generator)",
        Duration::from_secs(60),
    );
    let line = kontext.wait_for_line("/v1/entities/customer?limit=10", Duration::from_secs(5));
    assert!(
        line.contains(&format!("http://127.0.0.1:{port}/")),
        "{line}"
    );
    kontext.interrupt();
}

/// The `/metrics` page of the quickstart on `port`.
async fn metrics_text(port: impl std::fmt::Display) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
