//! `GET /v1/context/customer/{id}` (JSON) in process: the axum router's whole path (routing,
//! query parsing, the embedded store's lookup, serialization, the body), without a socket.
//!
//! `cargo bench -p kontext-serve --bench context`
//!
//! The store holds 200 customers shaped as the quickstart builds them: 10 fields from two
//! sources, 12 orders and 6 tickets (7 fields each) and 25 interactions (5 fields each); a
//! customer's context shows the newest 5 / 5 / 10 of them (~29 KB of JSON, as the quickstart's
//! after a minute). `lookup_only` is the store's part alone, so the difference is what serving
//! adds. Both run twice: `assembled` (the store's document cache off: every request reads the
//! store and serializes) and `cached` (the default: a hot customer's document and its JSON
//! are reused until it changes; nothing changes during this benchmark).

#[path = "../../../bench/allocator.rs"]
mod allocator;

use std::collections::BTreeSet;
use std::hint::black_box;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::BodyExt;
use kontext_serve::{router, AppState};
use kontext_store::{Change, EmbeddedStore, EntityUpdate, Provenance, StoreSchema};
use kontext_stream::PipelineMetrics;
use serde_json::{json, Value};
use tower::ServiceExt;

const CUSTOMERS: u64 = 200;
const T0: i64 = 1_795_608_000_000;

fn context(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    load(&dir);
    let mut group = c.benchmark_group("context");
    for (mode, cache) in [
        ("assembled", 0),
        ("cached", kontext_store::DEFAULT_CONTEXT_CACHE),
    ] {
        let store = EmbeddedStore::open(&dir.path().join("context.redb"), schema())
            .expect("store")
            .with_context_cache(cache);
        bench_mode(&mut group, mode, Arc::new(store));
    }
    group.finish();
}

fn bench_mode(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    mode: &str,
    store: Arc<EmbeddedStore>,
) {
    let types: BTreeSet<String> = ["customer", "order", "ticket", "interaction"]
        .into_iter()
        .map(String::from)
        .collect();
    let state = AppState::new(store.clone(), types, Arc::new(PipelineMetrics::default()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let app = router(state);
    let get = |i: u64| {
        let app = app.clone();
        async move {
            let uri = format!("/v1/context/customer/C-{}", 10_000 + i % CUSTOMERS);
            let response = app
                .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
                .await
                .expect("response");
            assert!(response.status().is_success());
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
        }
    };
    let body = rt.block_on(get(0));
    println!("customer context: {} bytes of JSON", body.len());

    let mut i = 0u64;
    group.bench_function(format!("get_json/{mode}"), |b| {
        b.iter(|| {
            i += 7;
            black_box(rt.block_on(get(i)))
        })
    });
    group.bench_function(format!("lookup_only/{mode}"), |b| {
        b.iter(|| {
            i += 7;
            let id = format!("C-{}", 10_000 + i % CUSTOMERS);
            black_box(store.context("customer", &id).expect("lookup"))
        })
    });
}

fn schema() -> StoreSchema {
    let mut schema = StoreSchema::default();
    schema.belongs_to.insert("customer".into(), vec![]);
    for (child, limit) in [("order", 5), ("ticket", 5), ("interaction", 10)] {
        schema.belongs_to.insert(
            child.into(),
            vec![("customer".into(), "customer_id".into())],
        );
        schema.related_limit.insert(child.into(), limit);
    }
    schema
}

/// Writes the customers into `dir/context.redb`.
fn load(dir: &tempfile::TempDir) {
    let store = EmbeddedStore::open(&dir.path().join("context.redb"), schema()).expect("store");
    let mut offset = 0i64;
    let mut update = |t: &str, id: String, fields: Value, source: &str| {
        offset += 1;
        EntityUpdate {
            entity_type: t.into(),
            entity_id: id,
            change: Change::Upsert(fields.as_object().cloned().unwrap_or_default().into()),
            provenance: Provenance {
                source: source.into(),
                event_id: format!("{source}-{offset:08}"),
                event_type: Some(format!("{source}.{t}.updated")),
                topic: format!("context.{t}s"),
                partition: (offset % 12) as i32,
                offset,
                event_time_ms: T0 + offset * 37,
            },
        }
    };
    for c in 0..CUSTOMERS {
        let id = format!("C-{}", 10_000 + c);
        let mut batch = vec![
            update(
                "customer",
                id.clone(),
                json!({"customer_id": id, "given_name": "Kemal", "family_name": "Silva",
                       "full_name": "Kemal Silva", "email": "kemal.silva@example.com",
                       "phone": "+1-555-0142", "loyalty_tier": "gold", "loyalty_points": 12_345}),
                "crm",
            ),
            update(
                "customer",
                id.clone(),
                json!({"billing_city": "Lisbon", "credit_balance_cents": 4_200}),
                "billing",
            ),
        ];
        for k in 0..12 {
            batch.push(update(
                "order",
                format!("O-{c}-{k}"),
                json!({"customer_id": id, "order_id": format!("O-{c}-{k}"), "status": "shipped",
                       "total_amount": 129.9, "currency": "EUR",
                       "placed_at": "2026-11-25T12:00:00.000Z", "item_count": 3}),
                "shop",
            ));
        }
        for k in 0..6 {
            batch.push(update(
                "ticket",
                format!("T-{c}-{k}"),
                json!({"customer_id": id, "ticket_id": format!("T-{c}-{k}"),
                       "subject": "Where is my order?", "priority": "normal", "state": "open",
                       "opened_at": "2026-11-25T12:00:00.000Z", "first_response_minutes": 42}),
                "helpdesk",
            ));
        }
        for k in 0..25 {
            batch.push(update(
                "interaction",
                format!("I-{c}-{k}"),
                json!({"customer_id": id, "interaction_id": format!("I-{c}-{k}"),
                       "action": "viewed_product", "page": "/products/42", "channel": "web"}),
                "web",
            ));
        }
        store.apply(&batch, &[]).expect("load");
    }
}

criterion_group!(benches, context);
criterion_main!(benches);
