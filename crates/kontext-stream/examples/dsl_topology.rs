//! A Rust-DSL topology on the embedded log, start to finish:
//!
//! ```text
//! cargo run -p kontext-stream --example dsl_topology
//! ```
//!
//! Writes a few customers and orders (one of them twice, one a test order), then runs
//! `orders → filter → dedup → join customer (by customer_id) → orders.enriched` and
//! `orders.enriched → aggregate per customer → customers.order-stats` until the stats are in,
//! and prints both output topics.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kontext_core::record::ProduceRecord;
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
use kontext_log::{Log, TopicSpec};
use kontext_process::{
    AggFn, AggregateConfig, DedupConfig, Emit, FieldPath, JoinConfig, JoinKey, JoinKind, Predicate,
    TableMode, Topology, WindowSpec,
};
use kontext_stream::topology::TopologyRunner;
use tokio_util::sync::CancellationToken;

fn event(topic: &str, key: &str, id: &str, json: &str) -> ProduceRecord {
    ProduceRecord::new(
        topic,
        Some(Bytes::from(key.to_owned())),
        Some(Bytes::from(json.to_owned())),
    )
    .with_header("ce_specversion", "1.0")
    .with_header("ce_id", id.to_owned())
    .with_header("ce_source", "shop")
    .with_header("ce_type", "shop.event")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default())?;
    log.create_topic(&TopicSpec::new("customers", 2)).await?;
    log.create_topic(&TopicSpec::new("orders", 2)).await?;
    let producer = log.producer().await?;
    producer
        .send(vec![
            event("customers", "C1", "c1", r#"{"name":"Ada","tier":"gold"}"#),
            event(
                "customers",
                "C2",
                "c2",
                r#"{"name":"Linus","tier":"silver"}"#,
            ),
        ])
        .await?;
    producer
        .send(vec![
            event("orders", "O1", "e1", r#"{"customer_id":"C1","total":120}"#),
            event("orders", "O2", "e2", r#"{"customer_id":"C2","total":35}"#),
            event("orders", "O2", "e2", r#"{"customer_id":"C2","total":35}"#), // a repeat
            event("orders", "O3", "e3", r#"{"customer_id":"C1","total":60}"#),
            event(
                "orders",
                "O4",
                "e4",
                r#"{"customer_id":"C1","status":"test","total":1}"#,
            ),
        ])
        .await?;

    let enrich = Topology::stream("orders")
        .filter(
            "live",
            Predicate::FieldNotEquals {
                field: FieldPath::new("status"),
                value: "test".into(),
            },
        )
        .dedup(
            "orders-dedup",
            DedupConfig {
                window_ms: 3_600_000,
            },
        )
        .join_table(
            "with-customer",
            "customers",
            JoinConfig {
                kind: JoinKind::Left,
                key: JoinKey::Field(FieldPath::new("customer_id")),
                field: "customer".into(),
                table: TableMode::Replace,
            },
        )
        .to("orders.enriched");
    let stats = Topology::stream("orders.enriched")
        .dedup(
            "stats-dedup",
            DedupConfig {
                window_ms: 3_600_000,
            },
        )
        .aggregate(
            "order-stats",
            AggregateConfig {
                window: WindowSpec::Tumbling { size_ms: 1 << 40 },
                grace_ms: 0,
                functions: vec![
                    ("orders".into(), AggFn::Count),
                    ("spent".into(), AggFn::Sum(FieldPath::new("total"))),
                ],
                emit: Emit::OnUpdate,
            },
        )
        .to("customers.order-stats");
    let topology = Topology::new("shop").with(enrich).with(stats);

    let shutdown = CancellationToken::new();
    let runner = TopologyRunner::new(topology, log.clone(), dir.path());
    let run = tokio::spawn(runner.run(shutdown.clone()));
    // Until C1's stats count both of its live orders (10 s at most).
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let done = read(log.as_ref(), "customers.order-stats")
            .await
            .unwrap_or_default()
            .iter()
            .any(|(key, value)| key == "C1" && value.contains(r#""orders":2"#));
        if done {
            break;
        }
    }
    shutdown.cancel();
    run.await??;

    for topic in ["orders.enriched", "customers.order-stats"] {
        println!("{topic}:");
        for (key, value) in read(log.as_ref(), topic).await? {
            println!("  {key}: {value}");
        }
    }
    Ok(())
}

/// Every record of `topic` as (key, value) text.
async fn read(log: &dyn Log, topic: &str) -> Result<Vec<(String, String)>, kontext_log::LogError> {
    let mut out = Vec::new();
    for p in log.describe_topic(topic).await?.partitions {
        for r in log
            .read_partition(topic, p.partition, p.low_watermark, p.high_watermark)
            .await?
        {
            let text =
                |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
            out.push((text(r.key.as_deref()), text(r.value.as_deref())));
        }
    }
    Ok(out)
}
