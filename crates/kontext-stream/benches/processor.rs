//! Whole-processor throughput: N keyed records are written into a source topic first, then
//! the processor stage (`features:` count/sum/min/max per account, one of them deduplicated)
//! runs until both of its consumer groups have committed everything: decode, route,
//! normalize, re-key through the repartition topic, dedup, aggregate, produce the outputs and
//! the changelogs, commit the state. Measured: wall time and the CPU time of this process
//! (every thread: tokio workers, fjall's, librdkafka's or the embedded log's), so that
//! "events per CPU-second" is the cost per core even on a shared machine. On Kafka the
//! broker's CPU is not counted (another process).
//!
//! ```text
//! cargo bench -p kontext-stream --bench processor                       # embedded log
//! KONTEXT_BENCH_KAFKA=127.0.0.1:9092 cargo bench -p kontext-stream --bench processor
//! KONTEXT_BENCH_KAFKA=127.0.0.1:9092 KONTEXT_BENCH_EXACTLY_ONCE=1 cargo bench ...
//! KONTEXT_BENCH_EVENTS=400000 ...                                       # default 200000
//! ```

#[path = "../../../bench/allocator.rs"]
mod allocator;

use std::time::{Duration, Instant};

use kontext_core::config::PipelineConfig;
use kontext_log::TopicSpec;
use kontext_stream::processor::{self, Processor};
use tokio_util::sync::CancellationToken;

mod support;

use support::{caught_up, cpu_time, PARTITIONS};

fn pipeline(name: &str, data_dir: &str, log: &str) -> String {
    format!(
        r#"
name: {name}
data_dir: {data_dir}
log: {log}
topics: {{ partitions: {PARTITIONS} }}
entities:
  account: {{ key: account_id, topic: {name}.accounts }}
  tx: {{ key: tx_id, topic: {name}.txs }}
sources:
  ledger:
    topic: {name}.txs
    entity: tx
    fields: {{ account_id: account, amount: amount }}
features:
  tx_count: {{ from: tx, entity: account, key: account_id, agg: count, dedup: 1h }}
  tx_sum: {{ from: tx, entity: account, key: account_id, agg: sum, field: amount }}
  tx_min: {{ from: tx, entity: account, key: account_id, agg: min, field: amount }}
  tx_max: {{ from: tx, entity: account, key: account_id, agg: max, field: amount }}
"#
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events = support::events();
    let kafka = std::env::var("KONTEXT_BENCH_KAFKA").ok();
    let exactly_once = std::env::var("KONTEXT_BENCH_EXACTLY_ONCE").is_ok_and(|v| v == "1");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let name = format!("bench-{}", std::process::id());
    let log = support::log(kafka.as_deref(), dir.path());
    let log_yaml = match &kafka {
        None => "{ backend: embedded, fsync: group_commit }".to_string(),
        Some(bootstrap) => format!(
            r#"{{ backend: kafka, bootstrap_servers: "{bootstrap}", exactly_once: {exactly_once} }}"#
        ),
    };
    let config =
        PipelineConfig::parse("bench.yaml", &pipeline(&name, &data, &log_yaml)).expect("pipeline");
    let source = format!("{name}.txs");
    for spec in processor::topic_specs(&config)
        .into_iter()
        .chain([TopicSpec::new(&source, PARTITIONS)])
    {
        log.create_topic(&spec).await.unwrap();
    }

    support::write_transactions(log.as_ref(), &source, events).await;

    let shutdown = CancellationToken::new();
    let cpu_before = cpu_time();
    let started = Instant::now();
    let run = tokio::spawn(Processor::new(&config, dir.path(), log.clone()).run(shutdown.clone()));
    let repartition = processor::repartition_topic(&config);
    let (rekey, tasks) = (
        processor::process_group(&config),
        processor::features_group(&config),
    );
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if run.is_finished() {
            panic!("the processor stopped: {:?}", run.await);
        }
        if caught_up(log.as_ref(), &rekey, &source, 0).await
            && caught_up(log.as_ref(), &tasks, &repartition, 0).await
        {
            break;
        }
    }
    let wall = started.elapsed();
    let cpu = cpu_time() - cpu_before;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    let outputs: i64 = log
        .describe_topic(&format!("{name}.accounts.features"))
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.high_watermark)
        .sum();
    let outputs = format!(", {outputs} output offsets");
    let on_kafka = kafka.is_some();
    support::report(
        "processor",
        on_kafka,
        exactly_once,
        events,
        &outputs,
        wall,
        cpu,
    );
}
