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

use std::time::{Duration, Instant};

use kontext_log::TopicSpec;
use kontext_process::{AggFn, AggregateConfig, DedupConfig, Emit, FieldPath, Topology, WindowSpec};
use kontext_stream::topology::TopologyRunner;
use tokio_util::sync::CancellationToken;

mod support;

use support::{caught_up, cpu_time, PARTITIONS};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events = support::events();
    let kafka = std::env::var("KONTEXT_BENCH_KAFKA").ok();
    let exactly_once = std::env::var("KONTEXT_BENCH_EXACTLY_ONCE").is_ok_and(|v| v == "1");
    let dir = tempfile::tempdir().unwrap();
    let app = format!("bench-{}", std::process::id());
    let log = support::log(kafka.as_deref(), dir.path());
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

    support::write_transactions(log.as_ref(), &source, events).await;

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
        // Under transactions a partition ends with a commit marker the group never reads past.
        let markers = i64::from(exactly_once);
        if caught_up(log.as_ref(), &format!("{app}.tx-dedup"), &source, markers).await
            && caught_up(
                log.as_ref(),
                &format!("{app}.tx-stats"),
                &repartition,
                markers,
            )
            .await
        {
            break;
        }
    }
    let wall = started.elapsed();
    let cpu = cpu_time() - cpu_before;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    let on_kafka = kafka.is_some();
    support::report("topology", on_kafka, exactly_once, events, "", wall, cpu);
}
