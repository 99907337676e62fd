//! The per-record cost of the pipeline stages, on one core:
//! - `pipeline/process`: envelope decode + routing + filter + normalization of one CloudEvents
//!   record with the example pipeline's CRM source (paths and one jq field);
//! - `pipeline/store_apply`: durable batches of 2000 normalized updates into the embedded store
//!   (one redb transaction and fsync per batch), over 2000 distinct entities;
//! - `normalize/*`: `Router::process` on the same records with one source mapped four ways
//!   (`path_only`, `path_coerced`, `jq_computed`, `jq_filter`), and `decode_only`, the
//!   envelope decode they all start with, to show where the time goes (a path-only source
//!   parses only the paths it reads, so it does not call `envelope::decode`: `path_dropped`
//!   is `path_only` with a condition that drops every record, i.e. that decode plus routing
//!   and the filter, without the mapping and the update). These measure the
//!   benchmark thread's CPU time, not wall time: throughput per core, even when other
//!   processes share the cores (time spent descheduled is not counted).
//!
//! ```text
//! cargo bench -p kontext-stream --bench pipeline
//! cargo bench -p kontext-stream --bench pipeline -- --warm-up-time 1 --measurement-time 3 normalize
//! ```

#[path = "../../../bench/allocator.rs"]
mod allocator;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kontext_core::config::PipelineConfig;
use kontext_core::envelope;
use kontext_core::record::{Header, Record};
use kontext_store::{EmbeddedStore, StoreSchema};
use kontext_stream::{Outcome, Router};

#[path = "../../../bench/cpu_time.rs"]
mod cpu_time;
use cpu_time::ThreadCpuTime;

const PIPELINE: &str = include_str!("../../../examples/customer-service/pipeline.yaml");
const BATCH: usize = 2000;

fn crm_record(i: usize) -> Record {
    let value = format!(
        r#"{{"customer_id":"C-{i}","first_name":"Ana","last_name":"Silva","email":"ana.silva@example.com","phone":"+1-555-0101","loyalty":{{"tier":"gold","points":1234}},"balance":"129.90","created":"2024-03-01 09:30:00"}}"#
    );
    let header = |k: &str, v: &str| Header::new(k, Bytes::copy_from_slice(v.as_bytes()));
    Record {
        topic: "context.customers".into(),
        partition: (i % 12) as i32,
        offset: i as i64,
        timestamp_ms: 1_700_000_000_000,
        key: Some(Bytes::from(format!("C-{i}"))),
        value: Some(Bytes::from(value)),
        headers: vec![
            header("ce_specversion", "1.0"),
            header("ce_id", &format!("crm-{i}")),
            header("ce_source", "crm"),
            header("ce_type", "crm.customer.updated"),
            header("ce_time", "2026-11-25T12:00:00.000Z"),
            header("content-type", "application/json"),
        ],
    }
}

fn bench(c: &mut Criterion) {
    let config = PipelineConfig::parse("pipeline.yaml", PIPELINE).expect("example pipeline");
    let router = Router::new(&config);
    let records: Vec<Record> = (0..BATCH).map(crm_record).collect();

    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("process", |b| {
        b.iter(|| {
            records
                .iter()
                .filter(|r| matches!(router.process(r), Outcome::Update(_)))
                .count()
        })
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(
        &dir.path().join("bench.redb"),
        StoreSchema::from_config(&config),
    )
    .expect("store");
    let mut round = 0i64;
    group.bench_function("store_apply", |b| {
        b.iter_batched(
            || {
                // Fresh offsets each round, so nothing is skipped as already applied.
                round += 1;
                records
                    .iter()
                    .map(|r| {
                        let mut r = r.clone();
                        r.offset += round * BATCH as i64;
                        match router.process(&r) {
                            Outcome::Update(u) => u,
                            other => panic!("{other:?}"),
                        }
                    })
                    .collect::<Vec<_>>()
            },
            |updates| store.apply(&updates, &[]).expect("apply"),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// One CRM source; `extra_fields` and `drop_if` are YAML lines added to the path-only mapping.
fn normalize_pipeline(extra_fields: &str, drop_if: &str) -> Router {
    let text = format!(
        r#"
name: bench
entities:
  customer: {{ key: customer_id, topic: context.customers }}
sources:
  crm:
    topic: context.customers
    entity: customer
    match: {{ ce_source: crm }}
    fields:
      given_name: first_name
      family_name: last_name
      email: email
      phone: phone
      loyalty_tier: loyalty.tier
      loyalty_points: loyalty.points
{extra_fields}
    filter:
      drop_if:
        - {{ field: "@type", equals: crm.internal.probe }}
{drop_if}
"#
    );
    Router::new(&PipelineConfig::parse("bench.yaml", &text).expect("bench pipeline"))
}

fn bench_normalize(c: &mut Criterion<ThreadCpuTime>) {
    let records: Vec<Record> = (0..BATCH).map(crm_record).collect();
    let mut group = c.benchmark_group("normalize");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("decode_only", |b| {
        b.iter(|| {
            records
                .iter()
                .filter(|r| envelope::decode(r).is_ok())
                .count()
        })
    });
    let variants = [
        ("path_only", normalize_pipeline("", "")),
        (
            "path_coerced",
            normalize_pipeline(
                "      balance: { path: balance, type: number }\n      customer_since: { path: created, type: timestamp }",
                "",
            ),
        ),
        (
            "jq_computed",
            normalize_pipeline(
                r#"      full_name: { jq: '.first_name + " " + .last_name' }"#,
                "",
            ),
        ),
        (
            "jq_filter",
            normalize_pipeline("", r#"        - { jq: '.loyalty.tier == "banned"' }"#),
        ),
    ];
    for (name, router) in &variants {
        // Every variant must produce updates, or the bench measures something else.
        assert!(
            matches!(router.process(&records[0]), Outcome::Update(_)),
            "{name}"
        );
        group.bench_function(*name, |b| {
            b.iter(|| {
                records
                    .iter()
                    .filter(|r| matches!(router.process(r), Outcome::Update(_)))
                    .count()
            })
        });
    }
    let dropped = normalize_pipeline(
        "",
        "        - { field: \"@type\", equals: crm.customer.updated }",
    );
    assert!(matches!(
        dropped.process(&records[0]),
        Outcome::Filtered { .. }
    ));
    group.bench_function("path_dropped", |b| {
        b.iter(|| {
            records
                .iter()
                .filter(|r| matches!(dropped.process(r), Outcome::Filtered { .. }))
                .count()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_group! {
    name = normalize;
    config = Criterion::default().with_measurement(cpu_time::THREAD_CPU_TIME);
    targets = bench_normalize
}
criterion_main!(benches, normalize);
