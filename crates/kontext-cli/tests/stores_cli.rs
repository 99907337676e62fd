//! Several stores in one pipeline (embedded + PostgreSQL), each fed by its own consumer
//! group, the API serving from PostgreSQL, and a blue/green rebuild of the PostgreSQL store.
//! Needs the PostgreSQL of `scripts/postgres.sh start` (or `KONTEXT_TEST_POSTGRES`).

mod support;

use std::time::Duration;

use kontext_core::config::PipelineConfig;
use kontext_store::{ContextStore, EmbeddedStore, PostgresStore, StoreSchema};
use support::{free_port, get_json, initial_load, path_str, wait_for_zero_lag, Kontext};

const PIPELINE: &str = include_str!("../../../examples/customer-service/pipeline.yaml");

fn postgres_url() -> String {
    std::env::var("KONTEXT_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://kontext@127.0.0.1:55432/kontext".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_and_a_postgres_store_fill_independently_and_postgres_rebuilds() {
    let dir = tempfile::tempdir().unwrap();
    let data = path_str(dir.path()).to_string();
    // The log: the quickstart's initial load, applied to the embedded store `main`.
    initial_load(&data, &["--customers", "100"]).await;

    // The same pipeline with a second store in PostgreSQL, which the API serves from.
    let ns = format!("kontext_stores_{}", std::process::id());
    let url = postgres_url();
    let stores = format!(
        "stores:\n  - {{ name: main, kind: embedded }}\n  - {{ name: pg, kind: postgres, url: \"${{KONTEXT_STORES_TEST_URL}}\", schema: {ns} }}\n"
    );
    let text = PIPELINE
        .replace("store:\n  name: main\n  kind: embedded\n", &stores)
        .replace("serve:\n", "serve:\n  store: pg\n");
    let config = PipelineConfig::parse("pipeline.yaml", &text).unwrap();
    assert_eq!(config.served_store().name, "pg");
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, &text).unwrap();

    let port = free_port();
    let mut kontext = Kontext::spawn_with_env(
        &[
            "run",
            "-c",
            path_str(&file),
            "--data-dir",
            &data,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &[("KONTEXT_STORES_TEST_URL", url.as_str())],
    );
    kontext.wait_for_line("serving on http://", Duration::from_secs(60));
    wait_for_zero_lag(port, Duration::from_secs(120)).await;
    let (status, lag) = get_json(&format!("http://127.0.0.1:{port}/v1/lag"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(lag["group"], "kontext.customer-service.store.pg", "{lag}");
    let (status, body) = get_json(&format!(
        "http://127.0.0.1:{port}/v1/context/customer/C-10001"
    ))
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(!body["fields"].as_object().unwrap().is_empty(), "{body}");
    // `/metrics` shows the served store's sink unlabelled and the other store's labelled.
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |prefix: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in\n{metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!(
        value("kontext_records_applied_total ") > 0,
        "the served store, pg"
    );
    // Store main applied the quickstart's records before and resumes after them, so it
    // applies nothing now; its sink holds the partitions of the source topics.
    assert_eq!(value("kontext_records_applied_total{store=\"main\"} "), 0);
    assert!(value("kontext_sink_assigned_partitions{store=\"main\"} ") > 0);
    assert_eq!(
        metrics
            .matches("# TYPE kontext_records_applied_total ")
            .count(),
        1,
        "one family"
    );

    // Blue/green on PostgreSQL: version 1 lives in the schema <ns>_<store>_v1.
    let api = format!("http://127.0.0.1:{port}");
    let rebuild = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kontext"))
            .args(["rebuild", "--store", "pg", "--api", &api])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&rebuild.stdout);
    assert!(
        rebuild.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&rebuild.stderr)
    );
    assert!(stdout.contains("version 1 serves"), "{stdout}");
    let (status, after) = get_json(&format!(
        "http://127.0.0.1:{port}/v1/context/customer/C-10001"
    ))
    .await
    .unwrap();
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["fields"], body["fields"]);
    kontext.interrupt();

    // Both stores hold the same documents, each record applied once.
    let schema = StoreSchema::from_config(&config);
    let embedded = EmbeddedStore::open(&dir.path().join("stores/main.redb"), schema.clone())
        .unwrap()
        .dump()
        .unwrap();
    let v1 = format!("{ns}_pg_v1");
    for namespace in [ns.as_str(), v1.as_str()] {
        let pg = PostgresStore::connect_in_namespace(&url, namespace, schema.clone())
            .await
            .unwrap();
        let dump = pg.dump().await.unwrap();
        assert_eq!(dump.len(), embedded.len(), "schema {namespace}");
        assert!(
            dump == embedded,
            "schema {namespace} differs from the embedded store"
        );
    }
    for namespace in [ns.as_str(), v1.as_str()] {
        kontext_store::postgres::drop_namespace(&url, namespace)
            .await
            .unwrap();
    }
}
