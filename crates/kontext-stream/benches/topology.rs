//! Whole-topology throughput of a Rust-DSL topology run by `TopologyRunner`, on the same input
//! as `benches/processor.rs` (N transactions keyed by transaction id, 20 000 accounts, 4
//! partitions): `stream(txs).dedup(1h).group_by(account).aggregate(count, sum, min, max)
//! .to(features)`: decode, dedup with its store and changelog, re-key through the repartition
//! topic, aggregate with its store and changelog, produce the outputs, commit. Runs until both
//! consumer groups have committed everything. Measured: wall time and the CPU time of this
//! process (every thread), so that "events per CPU-second" is the cost per core.
//!
//! ```text
//! cargo bench -p kontext-stream --bench topology                       # embedded log
//! KONTEXT_BENCH_KAFKA=127.0.0.1:9092 cargo bench -p kontext-stream --bench topology
//! KONTEXT_BENCH_KAFKA=127.0.0.1:9092 KONTEXT_BENCH_EXACTLY_ONCE=1 cargo bench ...
//! KONTEXT_BENCH_EVENTS=400000 ...                                      # default 200000
//! ```

#[path = "../../../bench/allocator.rs"]
mod allocator;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kontext_core::record::ProduceRecord;
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::{Log, TopicSpec};
use kontext_process::{AggFn, AggregateConfig, DedupConfig, Emit, FieldPath, Topology, WindowSpec};
use kontext_stream::topology::TopologyRunner;
use tokio_util::sync::CancellationToken;

#[path = "../../../bench/cpu_time.rs"]
mod cpu_time;

const ACCOUNTS: usize = 20_000;
const PARTITIONS: i32 = 4;

fn cpu_time() -> Duration {
    Duration::from_nanos(cpu_time::ProcessCpuTime::now_ns())
}

async fn caught_up(log: &dyn Log, group: &str, topic: &str) -> bool {
    let Ok(d) = log.describe_topic(topic).await else {
        return false;
    };
    let Ok(committed) = log.committed_offsets(group, topic).await else {
        return false;
    };
    // Under transactions a partition ends with a commit marker the group never reads past.
    d.partitions.iter().all(|p| {
        p.high_watermark == 0
            || committed
                .iter()
                .any(|(cp, c)| *cp == p.partition && c.is_some_and(|c| c + 1 >= p.high_watermark))
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: usize = std::env::var("KONTEXT_BENCH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let kafka = std::env::var("KONTEXT_BENCH_KAFKA").ok();
    let exactly_once = std::env::var("KONTEXT_BENCH_EXACTLY_ONCE").is_ok_and(|v| v == "1");
    let dir = tempfile::tempdir().unwrap();
    let app = format!("bench-{}", std::process::id());
    let log: Arc<dyn Log> = match &kafka {
        None => EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap(),
        Some(bootstrap) => Arc::new(
            kontext_kafka::KafkaLog::new(kontext_kafka::KafkaConfig::new(bootstrap.clone()))
                .unwrap(),
        ),
    };
    let source = format!("{app}.txs");
    log.create_topic(&TopicSpec::new(&source, PARTITIONS))
        .await
        .unwrap();
    let topology = Topology::new(app.as_str()).with(
        Topology::stream(source.as_str())
            .dedup(
                "tx-dedup",
                DedupConfig {
                    window_ms: 3_600_000,
                },
            )
            .group_by("by-account", FieldPath::new("account"))
            .aggregate(
                "tx-stats",
                AggregateConfig {
                    window: WindowSpec::Tumbling { size_ms: 1 << 40 },
                    grace_ms: 0,
                    functions: vec![
                        ("tx_count".into(), AggFn::Count),
                        ("tx_sum".into(), AggFn::Sum(FieldPath::new("amount"))),
                        ("tx_min".into(), AggFn::Min(FieldPath::new("amount"))),
                        ("tx_max".into(), AggFn::Max(FieldPath::new("amount"))),
                    ],
                    emit: Emit::OnUpdate,
                },
            )
            .to(format!("{app}.accounts.features")),
    );

    // The input, written before the clock starts (plain JSON values: the event id is the
    // record's coordinates, the time its timestamp).
    let producer = log.producer().await.unwrap();
    let batch = 5_000;
    for start in (0..events).step_by(batch) {
        let records = (start..(start + batch).min(events))
            .map(|i| {
                let value = format!(
                    r#"{{"account":"A-{}","amount":{}}}"#,
                    i % ACCOUNTS,
                    (i * 7919) % 2001
                );
                ProduceRecord::new(
                    source.clone(),
                    Some(Bytes::from(format!("T-{i}"))),
                    Some(Bytes::from(value)),
                )
            })
            .collect();
        producer.send(records).await.unwrap();
    }
    producer.flush().await.unwrap();

    let runner =
        TopologyRunner::new(topology, log.clone(), dir.path()).with_exactly_once(exactly_once);
    runner.prepare().await.unwrap();
    let shutdown = CancellationToken::new();
    let cpu_before = cpu_time();
    let started = Instant::now();
    let run = tokio::spawn(runner.run(shutdown.clone()));
    let repartition = format!("{app}-by-account-repartition");
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if run.is_finished() {
            panic!("the runner stopped: {:?}", run.await);
        }
        if caught_up(log.as_ref(), &format!("{app}.tx-dedup"), &source).await
            && caught_up(log.as_ref(), &format!("{app}.tx-stats"), &repartition).await
        {
            break;
        }
    }
    let wall = started.elapsed();
    let cpu = cpu_time() - cpu_before;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    println!(
        "topology on {}{}: {events} events, wall {:.2} s ({:.0} ev/s), CPU {:.2} s ({:.0} ev per CPU-s)",
        if kafka.is_some() { "kafka" } else { "embedded" },
        if exactly_once { " exactly_once" } else { "" },
        wall.as_secs_f64(),
        events as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64(),
        events as f64 / cpu.as_secs_f64(),
    );
}
