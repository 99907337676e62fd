//! Throughput of the embedded log: appends under the default group-commit policy (batched,
//! concurrent sends, as a pipeline's producers issue them) and sequential reads.
//!
//! `cargo bench -p kontext-log --bench embedded_log -- --warm-up-time 1 --measurement-time 5`

#[path = "../../../bench/allocator.rs"]
mod allocator;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kontext_core::record::ProduceRecord;
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::{ConsumerConfig, Log, Producer, TopicSpec};

/// Records per send call.
const BATCH: usize = 1000;
/// Send calls in flight at once: group commit shares each fsync among them.
const CONCURRENT_SENDERS: usize = 8;
/// Send calls per sender per measured iteration.
const BATCHES_PER_SENDER: usize = 2;
const PARTITIONS: i32 = 4;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A batch of records whose key and value together are `size` bytes (a 12-byte key).
fn batch(size: usize, partition: i32) -> Vec<ProduceRecord> {
    let value = Bytes::from(vec![b'v'; size - 12]);
    (0..BATCH)
        .map(|i| ProduceRecord {
            topic: "bench".into(),
            partition: Some(partition),
            key: Some(Bytes::from(format!("key-{i:08}"))),
            value: Some(value.clone()),
            ..Default::default()
        })
        .collect()
}

fn open_log(rt: &tokio::runtime::Runtime) -> (tempfile::TempDir, Arc<EmbeddedLog>) {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("tempdir");
    let log = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).expect("open");
    rt.block_on(log.create_topic(&TopicSpec::new("bench", PARTITIONS)))
        .expect("topic");
    (dir, log)
}

fn append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append_group_commit");
    for size in [200usize, 1024] {
        let (_dir, log) = open_log(&rt);
        let producer: Arc<dyn Producer> = rt.block_on(log.producer()).expect("producer");
        let batches: Vec<Vec<ProduceRecord>> = (0..CONCURRENT_SENDERS)
            .map(|s| batch(size, s as i32 % PARTITIONS))
            .collect();
        let records = (BATCH * CONCURRENT_SENDERS * BATCHES_PER_SENDER) as u64;
        if size == 200 {
            group.throughput(Throughput::Elements(records));
        } else {
            group.throughput(Throughput::Bytes(records * size as u64));
        }
        group.bench_function(BenchmarkId::from_parameter(format!("{size}B")), |b| {
            b.iter_custom(|iters| {
                // Steady load: the senders keep going for all `iters` iterations, rather than
                // draining the pipeline (and the group commit) after each one.
                rt.block_on(async {
                    let start = Instant::now();
                    let mut tasks = Vec::with_capacity(CONCURRENT_SENDERS);
                    for records in &batches {
                        let producer = producer.clone();
                        let records = records.clone();
                        tasks.push(tokio::spawn(async move {
                            for _ in 0..iters as usize * BATCHES_PER_SENDER {
                                producer.send(records.clone()).await.expect("send");
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.expect("sender");
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

fn read(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("read");
    for (size, count) in [(200usize, 200_000usize), (1024, 100_000)] {
        let (_dir, log) = open_log(&rt);
        let producer = rt.block_on(log.producer()).expect("producer");
        let records = batch(size, 0);
        rt.block_on(async {
            for _ in 0..count / BATCH {
                producer.send(records.clone()).await.expect("fill");
            }
        });
        if size == 200 {
            group.throughput(Throughput::Elements(count as u64));
        } else {
            group.throughput(Throughput::Bytes((count * size) as u64));
        }
        group.bench_function(BenchmarkId::from_parameter(format!("{size}B")), |b| {
            b.iter(|| {
                let mut offset = 0i64;
                while (offset as usize) < count {
                    let got = log.fetch("bench", 0, offset, BATCH).expect("fetch");
                    offset += got.len() as i64;
                }
                offset
            })
        });
        // The same through a consumer group member (poll of 1000 records at a time).
        let mut round = 0u64;
        group.bench_function(BenchmarkId::new("consumer_poll", format!("{size}B")), |b| {
            b.iter(|| {
                round += 1;
                rt.block_on(async {
                    let config =
                        ConsumerConfig::new(format!("bench-{round}"), vec!["bench".into()]);
                    let mut consumer = log.consumer(config).await.expect("consumer");
                    let mut seen = 0usize;
                    while seen < count {
                        seen += consumer
                            .poll(BATCH, Duration::from_secs(1))
                            .await
                            .expect("poll")
                            .len();
                    }
                    seen
                })
            })
        });
    }
    group.finish();
}

/// Reopening scans and checksums every segment (that is how the index is rebuilt).
fn open(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("open_recovery_scan");
    let (dir, log) = open_log(&rt);
    let producer = rt.block_on(log.producer()).expect("producer");
    let count = 100_000usize;
    rt.block_on(async {
        for i in 0..count / BATCH {
            producer
                .send(batch(1024, i as i32 % PARTITIONS))
                .await
                .expect("fill");
        }
    });
    drop(producer);
    drop(log);
    group.throughput(Throughput::Bytes((count * 1024) as u64));
    group.bench_function("1024B", |b| {
        b.iter(|| EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).expect("reopen"))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    targets = append, read, open
}
criterion_main!(benches);
