//! A topology built with the Rust DSL, run by `TopologyRunner` on the embedded log and on the
//! local Kafka broker: orders are filtered, deduplicated by event id, enriched with their
//! customer through a foreign-key join (a repartition topic), and counted and summed per
//! customer by a second pipeline that reads the first one's output. The results are compared
//! with a naive computation over the inputs; a second run after the state directory is
//! deleted restores the state from the changelogs and continues exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kontext_core::record::{ProduceRecord, Record};
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::{Log, TopicSpec};
use kontext_process::{
    AggFn, AggregateConfig, DedupConfig, Emit, FieldPath, JoinConfig, JoinKey, JoinKind, Predicate,
    StreamBuilder, TableMode, Topology, TopologyError, WindowSpec,
};
use kontext_stream::topology::{TopologyRunError, TopologyRunner};
use kontext_stream::PipelineMetrics;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const CUSTOMERS: usize = 20;
/// Event time of the first order: every order falls in one window of `WHOLE`.
const T0: i64 = 1_700_000_000_000;
const WHOLE: i64 = 1 << 40;

struct Names {
    customers: String,
    orders: String,
    enriched: String,
    stats: String,
    app: String,
}

fn names(prefix: &str) -> Names {
    Names {
        customers: format!("{prefix}customers"),
        orders: format!("{prefix}orders"),
        enriched: format!("{prefix}orders.enriched"),
        stats: format!("{prefix}customers.order-stats"),
        app: format!("{prefix}shop"),
    }
}

fn topology(n: &Names) -> Topology {
    topology_with(n, true)
}

/// The orders that count: not test orders, with a total, each event id once.
fn live_orders(n: &Names) -> StreamBuilder {
    Topology::stream(n.orders.as_str())
        .filter(
            "live",
            Predicate::FieldNotEquals {
                field: FieldPath::new("status"),
                value: "test".into(),
            },
        )
        .filter("has-total", Predicate::Jq(".total != null".into()))
        .dedup("orders-dedup", DedupConfig { window_ms: WHOLE })
}

/// `dedup_downstream`: whether the second pipeline deduplicates what it reads (needed without
/// transactions, where the first pipeline's outputs are at-least-once).
fn topology_with(n: &Names, dedup_downstream: bool) -> Topology {
    let enrich = live_orders(n)
        .join_table(
            "with-customer",
            n.customers.as_str(),
            JoinConfig {
                kind: JoinKind::Left,
                key: JoinKey::Field(FieldPath::new("customer_id")),
                field: "customer".into(),
                table: TableMode::Replace,
            },
        )
        .to(n.enriched.as_str());
    // The enriched topic is at-least-once (a crash can repeat outputs, with their event id):
    // a pipeline that counts what it reads deduplicates first.
    let mut stats = Topology::stream(n.enriched.as_str());
    if dedup_downstream {
        stats = stats.dedup("stats-dedup", DedupConfig { window_ms: WHOLE });
    }
    let stats = stats
        .aggregate("order-stats", orders_and_spent())
        .to(n.stats.as_str());
    Topology::new(n.app.as_str()).with(enrich).with(stats)
}

/// Count and sum of `total` per key, over all of the test's time (one window).
fn orders_and_spent() -> AggregateConfig {
    AggregateConfig {
        window: WindowSpec::Tumbling { size_ms: WHOLE },
        grace_ms: 0,
        functions: vec![
            ("orders".into(), AggFn::Count),
            ("spent".into(), AggFn::Sum(FieldPath::new("total"))),
        ],
        emit: Emit::OnUpdate,
    }
}

fn event(topic: &str, key: &str, id: &str, time_ms: i64, data: Value) -> ProduceRecord {
    let mut r = ProduceRecord::new(
        topic,
        Some(Bytes::from(key.to_owned())),
        Some(Bytes::from(data.to_string())),
    )
    .with_header("ce_specversion", "1.0")
    .with_header("ce_id", id.to_owned())
    .with_header("ce_source", "shop")
    .with_header("ce_type", "shop.order")
    .with_header("ce_time", kontext_core::envelope::format_time(time_ms));
    r.timestamp_ms = Some(time_ms);
    r
}

/// One order: every 9th is a test order, every 11th has no total, every 13th no customer;
/// every 7th is sent twice with the same event id.
struct Order {
    id: String,
    customer: Option<String>,
    total: Option<i64>,
    test: bool,
}

fn order(i: usize) -> Order {
    Order {
        id: format!("o{i}"),
        customer: (i % 13 != 5).then(|| format!("C{}", i % CUSTOMERS)),
        total: (i % 11 != 3).then_some((i % 50) as i64 + 1),
        test: i % 9 == 4,
    }
}

fn order_records(n: &Names, range: std::ops::Range<usize>) -> Vec<ProduceRecord> {
    let mut out = Vec::new();
    for i in range {
        let o = order(i);
        let mut data = json!({ "order_id": o.id, "status": if o.test { "test" } else { "paid" } });
        if let Some(c) = &o.customer {
            data["customer_id"] = json!(c);
        }
        if let Some(t) = o.total {
            data["total"] = json!(t);
        }
        let time = T0 + i as i64;
        out.push(event(
            &n.orders,
            &o.id,
            &format!("e-{}", o.id),
            time,
            data.clone(),
        ));
        if i % 7 == 0 {
            out.push(event(&n.orders, &o.id, &format!("e-{}", o.id), time, data));
        }
    }
    out
}

fn customer_records(n: &Names) -> Vec<ProduceRecord> {
    (0..CUSTOMERS)
        .map(|c| {
            let id = format!("C{c}");
            let tier = if c.is_multiple_of(2) {
                "gold"
            } else {
                "silver"
            };
            // Customer rows are older than every order: the join sees them first.
            let mut r = event(&n.customers, &id, &format!("c-{c}"), T0 - 1_000, json!({}));
            r.value = Some(Bytes::from(json!({ "id": id, "tier": tier }).to_string()));
            r
        })
        .collect()
}

/// What the topology must produce for orders `0..upto`: per customer (count, sum). An order
/// without a customer leaves the left join under its own key, so it is a group of its own.
fn expected_stats(upto: usize) -> BTreeMap<String, (i64, f64)> {
    let mut stats: BTreeMap<String, (i64, f64)> = BTreeMap::new();
    for i in 0..upto {
        let o = order(i);
        let (Some(t), false) = (o.total, o.test) else {
            continue;
        };
        let s = stats.entry(o.customer.unwrap_or(o.id)).or_default();
        s.0 += 1;
        s.1 += t as f64;
    }
    stats
}

async fn read_topic(log: &dyn Log, topic: &str) -> Vec<Record> {
    let d = log.describe_topic(topic).await.unwrap();
    let mut out = Vec::new();
    for p in d.partitions {
        let records = log
            .read_partition(topic, p.partition, p.low_watermark, p.high_watermark)
            .await
            .unwrap();
        out.extend(records);
    }
    out
}

/// The newest stats record per customer (one partition per key: the last one read).
async fn stats(log: &dyn Log, n: &Names) -> BTreeMap<String, (i64, f64)> {
    let mut latest = BTreeMap::new();
    for r in read_topic(log, &n.stats).await {
        let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
        let v: Value = serde_json::from_slice(&r.value.unwrap()).unwrap();
        latest.insert(
            key,
            (v["orders"].as_i64().unwrap(), v["spent"].as_f64().unwrap()),
        );
    }
    latest
}

/// Runs the topology until the stats match `want` (or 90 s pass), then stops it.
async fn run_until(
    log: &Arc<dyn Log>,
    n: &Names,
    dir: &std::path::Path,
    want: &BTreeMap<String, (i64, f64)>,
) -> Arc<PipelineMetrics> {
    run_until_with(log, n, dir, want, |n, log, dir| {
        TopologyRunner::new(topology(n), log, dir)
    })
    .await
}

/// [`run_until`] with the runner `runner` makes.
async fn run_until_with(
    log: &Arc<dyn Log>,
    n: &Names,
    dir: &std::path::Path,
    want: &BTreeMap<String, (i64, f64)>,
    runner: impl Fn(&Names, Arc<dyn Log>, &std::path::Path) -> TopologyRunner,
) -> Arc<PipelineMetrics> {
    let metrics = Arc::new(PipelineMetrics::default());
    let shutdown = CancellationToken::new();
    let runner = runner(n, log.clone(), dir).with_metrics(metrics.clone());
    let run = tokio::spawn(runner.run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let has_stats = log.describe_topic(&n.stats).await.is_ok();
        if has_stats && stats(log.as_ref(), n).await == *want {
            break;
        }
        if tokio::time::Instant::now() > deadline || run.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();
    metrics
}

/// Creates the customers (3 partitions) and orders (2) topics and writes the customers.
async fn with_customers(log: &dyn Log, n: &Names) -> Arc<dyn kontext_log::Producer> {
    log.create_topic(&TopicSpec::new(&n.customers, 3))
        .await
        .unwrap();
    log.create_topic(&TopicSpec::new(&n.orders, 2))
        .await
        .unwrap();
    let producer = log.producer().await.unwrap();
    producer.send(customer_records(n)).await.unwrap();
    producer
}

async fn dsl_topology_end_to_end(log: Arc<dyn Log>, prefix: &str) {
    let n = names(prefix);
    let dir = tempfile::tempdir().unwrap();
    let producer = with_customers(log.as_ref(), &n).await;
    producer.send(order_records(&n, 0..600)).await.unwrap();
    // A record that is no context event: dead-lettered, the rest goes on.
    producer
        .send(vec![ProduceRecord::new(
            n.orders.as_str(),
            Some(Bytes::from_static(b"bad")),
            Some(Bytes::from_static(b"{not json")),
        )
        .with_header("ce_specversion", "1.0")
        .with_header("ce_id", "bad")
        .with_header("ce_source", "shop")
        .with_header("ce_type", "shop.order")])
        .await
        .unwrap();

    let metrics = run_until(&log, &n, dir.path(), &expected_stats(600)).await;
    assert_eq!(stats(log.as_ref(), &n).await, expected_stats(600));
    assert!(
        metrics
            .process_duplicates
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    let dead = read_topic(log.as_ref(), &format!("{}.dlq", n.orders)).await;
    assert_eq!(dead.len(), 1, "the bad record is dead-lettered once");

    // Enriched orders: each live order with a total once, with its customer's row (or
    // null without a customer), keyed by the customer.
    let mut seen = BTreeSet::new();
    for r in read_topic(log.as_ref(), &n.enriched).await {
        let v: Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        let id = v["order_id"].as_str().unwrap().to_owned();
        let i: usize = id[1..].parse().unwrap();
        let o = order(i);
        assert!(!o.test && o.total.is_some(), "{id} must have been filtered");
        match &o.customer {
            Some(c) => {
                assert_eq!(
                    r.key.as_deref(),
                    Some(c.as_bytes()),
                    "{id} is keyed by its customer"
                );
                let c: usize = c[1..].parse().unwrap();
                let tier = if c.is_multiple_of(2) {
                    "gold"
                } else {
                    "silver"
                };
                assert_eq!(v["customer"]["tier"], json!(tier), "{id}: {v}");
            }
            None => {
                assert_eq!(
                    r.key.as_deref(),
                    Some(id.as_bytes()),
                    "{id} keeps its own key"
                );
                assert_eq!(v["customer"], Value::Null, "{id}: {v}");
            }
        }
        assert_eq!(
            r.header("ce_id"),
            Some(format!("e-{id}").as_bytes()),
            "{id} keeps its event id"
        );
        assert!(seen.insert(id.clone()), "{id} enriched twice");
    }
    let live = (0..600)
        .filter(|&i| !order(i).test && order(i).total.is_some())
        .count();
    assert_eq!(seen.len(), live);

    // Lose the local state: the second run restores it from the changelogs. The new orders
    // include repeats of first-run event ids, which the restored dedup state must drop.
    drop(dir);
    let dir = tempfile::tempdir().unwrap();
    let mut more = order_records(&n, 600..900);
    more.extend(order_records(&n, 590..600));
    producer.send(more).await.unwrap();
    let metrics = run_until(&log, &n, dir.path(), &expected_stats(900)).await;
    assert_eq!(stats(log.as_ref(), &n).await, expected_stats(900));
    assert!(
        metrics
            .process_restored_records
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the state came from the changelogs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dsl_topology_runs_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    dsl_topology_end_to_end(log, "").await;
}

/// Kafka's EOS system test, in process: the runner is aborted at random moments (its future
/// dropped at whatever await it was in: mid-produce, between the outputs and the state
/// commits, before the offset commit) ten times while orders keep arriving; then it runs to
/// the end. Every aggregate must count every order exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dsl_topology_aborted_at_random_moments_counts_every_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> =
        EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    let repeats = aborted_at_random_moments(log, &names(""), dir.path(), false).await;
    println!("enriched orders written more than once after aborts: {repeats}");
}

/// The same on Kafka with transactions, and without the second pipeline's dedup: its input is
/// read_committed, so it sees each enriched order once, and so does the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_transactions_on_kafka_an_aborted_topology_outputs_every_order_once() {
    let bootstrap = std::env::var("KONTEXT_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let log: Arc<dyn Log> = Arc::new(KafkaLog::new(KafkaConfig::new(bootstrap)).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let n = names(&format!("x{nanos:x}."));
    let repeats = aborted_at_random_moments(log, &n, dir.path(), true).await;
    assert_eq!(
        repeats, 0,
        "read_committed, no enriched order is seen twice"
    );
}

/// Runs the topology aborted ten times, then to the end; checks the stats and that every
/// live order was enriched. Returns how many enriched records repeat an order.
async fn aborted_at_random_moments(
    log: Arc<dyn Log>,
    n: &Names,
    dir: &std::path::Path,
    exactly_once: bool,
) -> usize {
    let producer = with_customers(log.as_ref(), n).await;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut rng = seed;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // With transactions the second pipeline counts without deduplicating.
    let runner = |n: &Names, log: Arc<dyn Log>, dir: &std::path::Path| {
        TopologyRunner::new(topology_with(n, !exactly_once), log, dir)
            .with_exactly_once(exactly_once)
    };
    const CHUNK: usize = 250;
    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        producer
            .send(order_records(n, round * CHUNK..(round + 1) * CHUNK))
            .await
            .unwrap();
        let run = tokio::spawn(runner(n, log.clone(), dir).run(CancellationToken::new()));
        tokio::time::sleep(Duration::from_millis(50 + next() % 1000)).await;
        run.abort();
        if let Ok(result) = run.await {
            result.unwrap();
        }
    }
    let total = ROUNDS * CHUNK;
    run_until_with(&log, n, dir, &expected_stats(total), runner).await;
    assert_eq!(
        stats(log.as_ref(), n).await,
        expected_stats(total),
        "seed {seed}"
    );
    let written = read_topic(log.as_ref(), &n.enriched).await;
    let enriched: BTreeSet<String> = written
        .iter()
        .map(|r| String::from_utf8(r.header("ce_id").unwrap().to_vec()).unwrap())
        .collect();
    let live = (0..total)
        .filter(|&i| !order(i).test && order(i).total.is_some())
        .count();
    assert_eq!(enriched.len(), live, "every live order enriched");
    written.len() - enriched.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dsl_topology_runs_on_kafka() {
    let bootstrap = std::env::var("KONTEXT_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let log: Arc<dyn Log> = Arc::new(KafkaLog::new(KafkaConfig::new(bootstrap)).unwrap());
    dsl_topology_end_to_end(log, &format!("t{nanos:x}.")).await;
}

#[tokio::test]
async fn a_topology_that_does_not_fit_the_topics_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    let n = names("");
    log.create_topic(&TopicSpec::new(&n.orders, 2))
        .await
        .unwrap();
    let runner = TopologyRunner::new(topology(&n), log, dir.path());
    let err = runner.prepare().await.unwrap_err();
    let TopologyRunError::Invalid(errors) = &err else {
        panic!("{err}");
    };
    assert_eq!(errors, &[TopologyError::UnknownTopic(n.customers.clone())]);
    assert!(
        err.to_string().contains("topic customers does not exist"),
        "{err}"
    );
}

/// `group_by` re-keys through a repartition topic so that an aggregate counts per customer
/// without a join; orders without a customer are dropped and counted as filtered. The orders
/// arrive in chunks while the topology runs, so a customer's orders from the two source
/// partitions reach the aggregate interleaved across batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_re_keys_a_stream_for_its_aggregate() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> =
        EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    let n = names("");
    let producer = with_customers(log.as_ref(), &n).await;
    // A sink that exists already, with its own partition count.
    log.create_topic(&TopicSpec::new(&n.stats, 5))
        .await
        .unwrap();
    let per_customer = live_orders(&n)
        .group_by("by-customer", FieldPath::new("customer_id"))
        .aggregate("order-stats", orders_and_spent())
        .to(n.stats.as_str());
    let topology = Topology::new(n.app.as_str()).with(per_customer);
    let plan = TopologyRunner::new(topology.clone(), log.clone(), dir.path())
        .prepare()
        .await
        .unwrap();
    assert!(plan
        .internal_topics
        .contains(&format!("{}-by-customer-repartition", n.app)));
    let mut want = expected_stats(500);
    want.retain(|key, _| key.starts_with('C'));
    let without_customer = (0..500)
        .filter(|&i| {
            let o = order(i);
            !o.test && o.total.is_some() && o.customer.is_none()
        })
        .count() as u64;
    let feed = {
        let producer = producer.clone();
        let n = names("");
        tokio::spawn(async move {
            for chunk in 0..10 {
                let records = order_records(&n, chunk * 50..(chunk + 1) * 50);
                producer.send(records).await.unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    let metrics = run_until_with(&log, &n, dir.path(), &want, |_, log, dir| {
        TopologyRunner::new(topology.clone(), log, dir)
    })
    .await;
    feed.await.unwrap();
    assert_eq!(stats(log.as_ref(), &n).await, want);
    for r in read_topic(log.as_ref(), &n.stats).await {
        let key = r.key.clone().unwrap();
        assert_eq!(
            r.partition,
            kontext_core::partitioner::partition_for_key(&key, 5),
            "outputs are partitioned over the sink's own partitions"
        );
    }
    assert_eq!(
        metrics
            .records_filtered
            .load(std::sync::atomic::Ordering::Relaxed),
        without_customer
    );
}

/// Two repartitions in one pipeline: a join by foreign key, then `group_by` a field the join
/// added, then an aggregate per tier; the orders arrive in chunks while it runs, so the second
/// repartition topic gets each source partition's orders through several tasks of the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_then_group_by_counts_every_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> =
        EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    let n = names("");
    let producer = with_customers(log.as_ref(), &n).await;
    let per_tier = Topology::stream(n.orders.as_str())
        .filter(
            "has-total",
            Predicate::Jq(".total != null and .status != \"test\"".into()),
        )
        .dedup("orders-dedup", DedupConfig { window_ms: WHOLE })
        .join_table(
            "with-customer",
            n.customers.as_str(),
            JoinConfig {
                kind: JoinKind::Inner,
                key: JoinKey::Field(FieldPath::new("customer_id")),
                field: "customer".into(),
                table: TableMode::Replace,
            },
        )
        .group_by("by-tier", FieldPath::new("customer.tier"))
        .aggregate("tier-stats", orders_and_spent())
        .to(n.stats.as_str());
    let topology = Topology::new(n.app.as_str()).with(per_tier);
    let mut want: BTreeMap<String, (i64, f64)> = BTreeMap::new();
    for (customer, (count, sum)) in expected_stats(600) {
        let Some(c) = customer.strip_prefix('C') else {
            continue; // no customer: the inner join drops it
        };
        let c: usize = c.parse().unwrap();
        let tier = if c.is_multiple_of(2) {
            "gold"
        } else {
            "silver"
        };
        let t = want.entry(tier.to_string()).or_default();
        t.0 += count;
        t.1 += sum;
    }
    let feed = {
        let producer = producer.clone();
        let n = names("");
        tokio::spawn(async move {
            for chunk in 0..12 {
                let records = order_records(&n, chunk * 50..(chunk + 1) * 50);
                producer.send(records).await.unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    run_until_with(&log, &n, dir.path(), &want, |_, log, dir| {
        TopologyRunner::new(topology.clone(), log, dir)
    })
    .await;
    feed.await.unwrap();
    assert_eq!(stats(log.as_ref(), &n).await, want);
}

/// An aggregate's state is a list of accumulators read by position: a topology restarted with
/// another function list under the same operator name is refused, saying what was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_redefined_on_existing_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> =
        EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    let n = names("");
    let producer = with_customers(log.as_ref(), &n).await;
    producer.send(order_records(&n, 0..20)).await.unwrap();
    run_until(&log, &n, dir.path(), &expected_stats(20)).await;

    // The same topology with a max before the sum: the stored [count, sum] would be read as
    // [count, max].
    let mut stats = Topology::stream(n.enriched.as_str())
        .dedup("stats-dedup", DedupConfig { window_ms: WHOLE });
    let mut config = orders_and_spent();
    config
        .functions
        .insert(1, ("biggest".into(), AggFn::Max(FieldPath::new("total"))));
    stats = stats.aggregate("order-stats", config);
    let topology = Topology::new(n.app.as_str())
        .with(live_orders(&n).to(n.enriched.as_str()))
        .with(stats.to(n.stats.as_str()));
    let err = TopologyRunner::new(topology, log.clone(), dir.path())
        .run(CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`order-stats`")
            && err.contains("orders.enriched, tumbling 1099511627776 ms: count(), sum(total)`")
            && err.contains(
                "orders.enriched, tumbling 1099511627776 ms: count(), max(total), sum(total)`"
            ),
        "{err}"
    );
}
