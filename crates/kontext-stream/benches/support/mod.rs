//! What the whole-processor and whole-topology benches share: the input (N transactions
//! keyed by transaction id over 20 000 accounts), the log, and the clocks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kontext_core::record::ProduceRecord;
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::Log;

#[path = "../../../../bench/cpu_time.rs"]
mod cpu_time;

pub const ACCOUNTS: usize = 20_000;
pub const PARTITIONS: i32 = 4;

/// `KONTEXT_BENCH_EVENTS` (default 200 000).
pub fn events() -> usize {
    std::env::var("KONTEXT_BENCH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000)
}

/// The local broker at `KONTEXT_BENCH_KAFKA`, or an embedded log under `dir`.
pub fn log(kafka: Option<&str>, dir: &std::path::Path) -> Arc<dyn Log> {
    match kafka {
        None => EmbeddedLog::open(&dir.join("log"), EmbeddedConfig::default()).unwrap(),
        Some(bootstrap) => Arc::new(
            kontext_kafka::KafkaLog::new(kontext_kafka::KafkaConfig::new(bootstrap.to_owned()))
                .unwrap(),
        ),
    }
}

/// Writes `events` transactions to `source` (plain JSON values `{"account", "amount"}`: the
/// event id is the record's coordinates), before the clock starts.
pub async fn write_transactions(log: &dyn Log, source: &str, events: usize) {
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
                    source.to_owned(),
                    Some(Bytes::from(format!("T-{i}"))),
                    Some(Bytes::from(value)),
                )
            })
            .collect();
        producer.send(records).await.unwrap();
    }
    producer.flush().await.unwrap();
}

/// CPU time of this process so far (every thread).
pub fn cpu_time() -> Duration {
    Duration::from_nanos(cpu_time::ProcessCpuTime::now_ns())
}

/// Whether `group` has committed everything in `topic`, allowing `markers` offsets per
/// partition for transaction markers the group never reads past.
pub async fn caught_up(log: &dyn Log, group: &str, topic: &str, markers: i64) -> bool {
    let Ok(d) = log.describe_topic(topic).await else {
        return false;
    };
    let Ok(committed) = log.committed_offsets(group, topic).await else {
        return false;
    };
    d.partitions.iter().all(|p| {
        p.high_watermark == 0
            || committed.iter().any(|(cp, c)| {
                *cp == p.partition && c.is_some_and(|c| c + markers >= p.high_watermark)
            })
    })
}

/// Prints one result line: `<what> on <backend>: <events> events[, <extra>], wall ..., CPU ...`.
pub fn report(
    what: &str,
    kafka: bool,
    exactly_once: bool,
    events: usize,
    extra: &str,
    wall: Duration,
    cpu: Duration,
) {
    println!(
        "{what} on {}{}: {events} events{extra}, wall {:.2} s ({:.0} ev/s), CPU {:.2} s ({:.0} ev per CPU-s)",
        if kafka { "kafka" } else { "embedded" },
        if exactly_once { " exactly_once" } else { "" },
        wall.as_secs_f64(),
        events as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64(),
        events as f64 / cpu.as_secs_f64(),
    );
}
