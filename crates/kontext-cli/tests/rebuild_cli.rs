//! `kontext rebuild`: a blue/green rebuild of the embedded store while the pipeline ingests
//! and serves, through the real binary.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kontext_core::config::PipelineConfig;
use kontext_store::{EmbeddedStore, StoreSchema};
use support::{
    assert_applied_exactly_once, catch_up, expected_from_log, free_port, get_json, path_str,
    Kontext,
};

const PIPELINE: &str = include_str!("../../../examples/customer-service/pipeline.yaml");

/// Rebuild under load: the generator keeps writing and a reader keeps fetching one customer's
/// context; the rebuild replays the log into version 1 and switches. Every read during it
/// succeeds, the old version's file is gone, and after a restart (which serves version 1 from
/// the pointer file) every valid record in the log was applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_load_switches_without_a_failed_read_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = path_str(dir.path()).to_string();
    let port = free_port();
    let mut kontext = Kontext::spawn(&[
        "quickstart",
        "--data-dir",
        &data,
        "--port",
        &port.to_string(),
        // Enough to keep the sinks busy during the rebuild; at 1000/s a debug build on two
        // loaded cores could not catch up for minutes (the rebuild waits until it has) and
        // the stop then overran its bound.
        "--rate",
        "300",
        "--customers",
        "300",
    ]);
    let line = kontext.wait_for_line("curl -s http://", Duration::from_secs(60));
    let url = line.trim().trim_start_matches("curl -s ").to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (stop, reads, failures, url) = (stop.clone(), reads.clone(), failures.clone(), url);
        tokio::spawn(async move {
            let mut last_failure = None;
            while !stop.load(Ordering::Relaxed) {
                match get_json(&url).await {
                    Some((200, body)) if body["fields"].is_object() => {}
                    other => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        last_failure = Some(format!("{other:?}"));
                    }
                }
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            last_failure
        })
    };

    let api = format!("http://127.0.0.1:{port}");
    let rebuild = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kontext"))
            .args(["rebuild", "--store", "main", "--api", &api])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&rebuild.stdout);
    let stderr = String::from_utf8_lossy(&rebuild.stderr);
    assert!(
        rebuild.status.success(),
        "rebuild failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("version 1 serves"), "{stdout}");
    // A few more reads after the switch, then stop reading.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let last_failure = reader.await.unwrap();
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "reads failed during the rebuild, e.g. {last_failure:?}"
    );

    let (status, body) = get_json(&format!(
        "http://127.0.0.1:{port}/v1/admin/stores/main/rebuild"
    ))
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["state"], "switched", "{body}");
    assert_eq!(body["current_version"], 1, "{body}");
    assert!(body["applied"].as_i64().unwrap() > 0, "{body}");
    // A second rebuild of an unknown store is refused with a stable code.
    let unknown = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{port}/v1/admin/stores/nope/rebuild"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unknown_store");
    kontext.interrupt();

    let stores = dir.path().join("stores");
    // The rebuild's consumer group is deleted with the job; the pipeline's own groups stay.
    let groups: Vec<String> = std::fs::read_dir(dir.path().join("log/groups"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        groups.iter().any(|g| g.ends_with("store%2Emain.json")),
        "{groups:?}"
    );
    assert!(!groups.iter().any(|g| g.contains("rebuild")), "{groups:?}");
    assert!(stores.join("main.v1.redb").exists());
    assert!(
        !stores.join("main.redb").exists(),
        "the replaced version was deleted"
    );
    assert_eq!(
        std::fs::read_to_string(stores.join("main.current"))
            .unwrap()
            .trim(),
        "1"
    );

    // A restart serves version 1 and catches up with the rest of the log.
    let (kontext, _port) = catch_up(&data).await;
    kontext.interrupt();
    let config = PipelineConfig::parse("pipeline.yaml", PIPELINE).unwrap();
    let (expected, total) = expected_from_log(dir.path(), &config).await;
    assert!(total > 1_000, "only {total} records in the log");
    let store = EmbeddedStore::open(
        &stores.join("main.v1.redb"),
        StoreSchema::from_config(&config),
    )
    .unwrap();
    assert_applied_exactly_once(&store, &expected);
}

/// kill -9 while a rebuild runs: the restart serves the version that was current (or, had
/// the switch already happened, the new one) and deletes what the rebuild left behind;
/// either way every valid record is applied exactly once. The API runs on threads of its own
/// here (`--serve-threads`), so the rebuild is started from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_killed_midway_leaves_the_current_version_serving() {
    let dir = tempfile::tempdir().unwrap();
    let data = path_str(dir.path()).to_string();
    let port = free_port();
    let mut kontext = Kontext::spawn(&[
        "quickstart",
        "--data-dir",
        &data,
        "--port",
        &port.to_string(),
        "--rate",
        "2000",
        "--customers",
        "500",
        "--serve-threads",
        "2",
    ]);
    kontext.wait_for_line("curl -s http://", Duration::from_secs(60));
    let started = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{port}/v1/admin/stores/main/rebuild"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    tokio::time::sleep(Duration::from_millis(20)).await;
    kontext.kill_9();

    let stores = dir.path().join("stores");
    let version = match std::fs::read_to_string(stores.join("main.current")) {
        Ok(v) => v.trim().to_string(),
        Err(_) => "0".to_string(),
    };
    let (kontext, _port) = catch_up(&data).await;
    kontext.interrupt();
    let current = if version == "0" {
        assert!(
            !stores.join("main.v1.redb").exists(),
            "the abandoned version was deleted at start-up"
        );
        stores.join("main.redb")
    } else {
        stores.join(format!("main.v{version}.redb"))
    };
    let config = PipelineConfig::parse("pipeline.yaml", PIPELINE).unwrap();
    let (expected, _) = expected_from_log(dir.path(), &config).await;
    let store = EmbeddedStore::open(&current, StoreSchema::from_config(&config)).unwrap();
    assert_applied_exactly_once(&store, &expected);
}
