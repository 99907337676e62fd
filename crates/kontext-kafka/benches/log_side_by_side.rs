//! The two Log backends side by side, through the same `Log` trait, in one run: Apache Kafka
//! (rdkafka, against the broker of `scripts/kafka.sh start`) and the embedded log (segment
//! files in a temporary directory, default group-commit fsync policy).
//!
//! ```text
//! scripts/kafka.sh start
//! cargo bench -p kontext-kafka --bench log_side_by_side
//! ```
//!
//! - `produce/<size>/<backend>`: `SENDERS` concurrent tasks, each sending batches of `BATCH`
//!   keyed records (12-byte key + value = `size` bytes) and awaiting each batch's
//!   acknowledgement (Kafka: idempotent, acks=all; embedded: fsynced by group commit).
//! - `consume/<size>/<backend>`: a fresh consumer group reads `CONSUME_RECORDS` records from
//!   the start. Timed from the first record received, so the group join (Kafka's join/sync
//!   round trips, hundreds of ms) is not counted as read throughput.
//!
//! Set `KONTEXT_TEST_KAFKA` to use another broker.

#[path = "../../../bench/allocator.rs"]
mod allocator;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kontext_core::record::ProduceRecord;
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::{ConsumerConfig, Log, Producer, TopicSpec};

/// Records per send call.
const BATCH: usize = 1000;
/// Send calls in flight at once.
const SENDERS: usize = 4;
/// Send calls per sender per measured iteration.
const BATCHES_PER_SENDER: usize = 2;
const PARTITIONS: i32 = 4;
/// Records read per consume iteration.
const CONSUME_RECORDS: usize = 100_000;
const SIZES: [usize; 2] = [200, 1024];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The backends under test, each with its own topic names so repeated runs never collide.
struct Backends {
    logs: Vec<(&'static str, Arc<dyn Log>)>,
    run: u64,
    _embedded_dir: tempfile::TempDir,
}

impl Backends {
    fn open(rt: &tokio::runtime::Runtime) -> Self {
        let bootstrap =
            std::env::var("KONTEXT_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_string());
        let kafka = KafkaLog::new(KafkaConfig::new(&bootstrap)).expect("kafka config");
        if let Err(err) = rt.block_on(kafka.list_topics()) {
            panic!("no Kafka broker at {bootstrap} ({err}): run `scripts/kafka.sh start`");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let embedded = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).expect("embedded");
        Self {
            logs: vec![("kafka", Arc::new(kafka)), ("embedded", embedded)],
            run: rand::random::<u64>(),
            _embedded_dir: dir,
        }
    }

    fn topic(&self, purpose: &str, size: usize) -> String {
        format!("bench-{purpose}-{size}-{:016x}", self.run)
    }
}

/// `BATCH` records of `size` bytes (key + value), keys spread over the partitions by the
/// partitioner as a pipeline's entity ids would be.
fn batch(topic: &str, size: usize, sender: usize) -> Vec<ProduceRecord> {
    let value = Bytes::from(vec![b'v'; size - 12]);
    (0..BATCH)
        .map(|i| {
            ProduceRecord::new(
                topic,
                Some(Bytes::from(format!("k{sender:02}-{i:08}"))),
                Some(value.clone()),
            )
        })
        .collect()
}

fn throughput(size: usize, records: usize) -> Throughput {
    // Records per second for the small size (per-record overhead), bytes for the large one.
    if size == 200 {
        Throughput::Elements(records as u64)
    } else {
        Throughput::Bytes((records * size) as u64)
    }
}

fn produce(c: &mut Criterion) {
    let rt = runtime();
    let backends = Backends::open(&rt);
    for size in SIZES {
        let mut group = c.benchmark_group(format!("produce/{size}B"));
        group.throughput(throughput(size, BATCH * SENDERS * BATCHES_PER_SENDER));
        for (name, log) in &backends.logs {
            let topic = backends.topic("produce", size);
            rt.block_on(log.create_topic(&TopicSpec::new(&topic, PARTITIONS)))
                .expect("create topic");
            let producer: Arc<dyn Producer> = rt.block_on(log.producer()).expect("producer");
            let batches: Vec<Vec<ProduceRecord>> =
                (0..SENDERS).map(|s| batch(&topic, size, s)).collect();
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        let tasks: Vec<_> = batches
                            .iter()
                            .map(|records| {
                                let producer = producer.clone();
                                let records = records.clone();
                                tokio::spawn(async move {
                                    for _ in 0..iters as usize * BATCHES_PER_SENDER {
                                        producer.send(records.clone()).await.expect("send");
                                    }
                                })
                            })
                            .collect();
                        for task in tasks {
                            task.await.expect("sender");
                        }
                        start.elapsed()
                    })
                })
            });
        }
        group.finish();
    }
}

fn consume(c: &mut Criterion) {
    let rt = runtime();
    let backends = Backends::open(&rt);
    for size in SIZES {
        let mut group = c.benchmark_group(format!("consume/{size}B"));
        group.throughput(throughput(size, CONSUME_RECORDS));
        for (name, log) in &backends.logs {
            let topic = backends.topic("consume", size);
            rt.block_on(async {
                log.create_topic(&TopicSpec::new(&topic, PARTITIONS))
                    .await
                    .expect("topic");
                let producer = log.producer().await.expect("producer");
                for i in 0..CONSUME_RECORDS / BATCH {
                    producer.send(batch(&topic, size, i)).await.expect("fill");
                }
            });
            let mut round = 0u64;
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            round += 1;
                            let group_id = format!("{topic}-g{round}");
                            let mut consumer = log
                                .consumer(ConsumerConfig::new(group_id, vec![topic.clone()]))
                                .await
                                .expect("consumer");
                            let mut read = 0usize;
                            let mut start = None;
                            while read < CONSUME_RECORDS {
                                let got = consumer
                                    .poll(10_000, Duration::from_secs(10))
                                    .await
                                    .expect("poll");
                                assert!(!got.is_empty(), "no records within 10 s");
                                start.get_or_insert_with(Instant::now);
                                read += got.len();
                            }
                            total += start.map(|s| s.elapsed()).unwrap_or_default();
                            drop(consumer);
                        }
                        total
                    })
                })
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = produce, consume
}
criterion_main!(benches);
