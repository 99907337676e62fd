//! A store whose offsets are past the end of the log (the embedded log directory deleted, a
//! Kafka topic deleted and created again, a store copied from another cluster): the sink must
//! say so and stop, not skip every new record below the store's offsets as already applied.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kontext_core::config::PipelineConfig;
use kontext_core::record::ProduceRecord;
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::{ConsumerConfig, Log, TopicSpec};
use kontext_store::{EmbeddedStore, StoreSchema};
use kontext_stream::sink::SinkError;
use kontext_stream::{PipelineMetrics, Router, StoreSink};
use tokio_util::sync::CancellationToken;

fn config() -> PipelineConfig {
    PipelineConfig::parse(
        "recreated.yaml",
        r#"
name: recreated
entities:
  customer: { key: customer_id, topic: t }
sources:
  crm: { topic: t, entity: customer, fields: { given_name: first_name } }
"#,
    )
    .unwrap()
}

fn record(id: &str) -> ProduceRecord {
    ProduceRecord::new(
        "t",
        Some(Bytes::from(id.to_string())),
        Some(Bytes::from(format!(r#"{{"first_name":"N{id}"}}"#))),
    )
    .with_header("ce_specversion", "1.0")
    .with_header("ce_id", format!("e-{id}"))
    .with_header("ce_source", "crm")
    .with_header("ce_type", "crm.customer.updated")
}

/// Writes `ids` to topic `t` of `log` and runs a sink into `store` until it has applied
/// `until` records or stopped by itself; returns how the sink ended, if it did.
async fn feed(
    log: Arc<dyn Log>,
    store: Arc<EmbeddedStore>,
    ids: &[&str],
    until: u64,
) -> (Option<Result<(), SinkError>>, Arc<PipelineMetrics>) {
    let config = config();
    log.create_topic(&TopicSpec::new("t", 1)).await.unwrap();
    let producer = log.producer().await.unwrap();
    producer
        .send(ids.iter().map(|id| record(id)).collect())
        .await
        .unwrap();
    let metrics = Arc::new(PipelineMetrics::default());
    let sink = StoreSink::new(
        log.clone(),
        store,
        Router::new(&config),
        ConsumerConfig::new("kontext.recreated.store.main", vec!["t".into()]),
        metrics.clone(),
    )
    .with_config(&config);
    let stop = CancellationToken::new();
    let mut task = tokio::spawn(sink.run(stop.clone()));
    for _ in 0..800 {
        if metrics.records_applied.load(Ordering::Relaxed) >= until {
            break;
        }
        tokio::select! {
            ended = &mut task => return (Some(ended.unwrap()), metrics),
            _ = tokio::time::sleep(Duration::from_millis(25)) => {}
        }
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    (None, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_ahead_of_a_recreated_log_stops_the_sink_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let schema = StoreSchema::from_config(&config());
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb"), schema).unwrap());
    let first: Arc<dyn Log> =
        EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    let (ended, _) = feed(
        first.clone(),
        store.clone(),
        &["C0", "C1", "C2", "C3", "C4"],
        5,
    )
    .await;
    assert!(ended.is_none(), "the first log is applied: {ended:?}");
    drop(first);
    assert!(store.get("customer", "C4").unwrap().is_some());

    // The log starts over: its new records get offsets 0.. again, below the store's 5.
    std::fs::remove_dir_all(dir.path().join("log")).unwrap();
    let second: Arc<dyn Log> =
        EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    let (ended, metrics) = feed(second, store.clone(), &["N1", "N2", "N3"], 3).await;
    let error = match ended {
        Some(Err(e @ SinkError::StoreAheadOfLog(_))) => e.to_string(),
        other => panic!("the sink should stop and say why, not run on: {other:?}"),
    };
    assert!(error.contains("t/0: store at 5, log ends at 3"), "{error}");
    assert!(error.contains("kontext rebuild"), "{error}");
    assert_eq!(metrics.records_skipped.load(Ordering::Relaxed), 0);
    assert!(store.get("customer", "N1").unwrap().is_none());
}
