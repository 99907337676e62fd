//! The context endpoints over HTTP: markdown with token budgets, field selection, batch lookups,
//! and the error codes of each.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use kontext_core::config::{RenderConfig, Tokenizer};
use kontext_serve::render::count;
use kontext_serve::{router, AppState};
use kontext_store::{Change, EmbeddedStore, EntityUpdate, Provenance, StoreSchema};
use kontext_stream::PipelineMetrics;
use serde_json::{json, Value};
use tower::ServiceExt;

fn state(dir: &tempfile::TempDir) -> AppState {
    let mut schema = StoreSchema::default();
    schema.belongs_to.insert(
        "order".into(),
        vec![("customer".into(), "customer_id".into())],
    );
    schema.belongs_to.insert("customer".into(), vec![]);
    let store = EmbeddedStore::open(&dir.path().join("s.redb"), schema).unwrap();
    let update = |t: &str, id: &str, fields: Value, offset: i64| EntityUpdate {
        entity_type: t.into(),
        entity_id: id.into(),
        change: Change::Upsert(fields.as_object().cloned().unwrap().into()),
        provenance: Provenance {
            source: "crm".into(),
            event_id: format!("e{offset}"),
            event_type: None,
            topic: "context.x".into(),
            partition: 0,
            offset,
            event_time_ms: 1_700_000_000_000 + offset * 1000,
        },
    };
    let mut updates = vec![update(
        "customer",
        "C1",
        json!({"given_name": "Ana", "family_name": "Lima", "email": "ana@example.com", "tier": "gold"}),
        0,
    )];
    for i in 1..=8 {
        updates.push(update(
            "order",
            &format!("O{i}"),
            json!({"customer_id": "C1", "status": "shipped", "total": format!("{i}9.90")}),
            i,
        ));
    }
    store.apply(&updates, &[]).unwrap();
    AppState::new(
        Arc::new(store),
        ["customer".to_string(), "order".to_string()]
            .into_iter()
            .collect(),
        Arc::new(PipelineMetrics::default()),
    )
}

async fn send(state: AppState, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let response = router(state).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn get(state: AppState, uri: &str) -> (StatusCode, HeaderMap, String) {
    send(state, Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn post(state: AppState, uri: &str, body: &str) -> (StatusCode, Value) {
    let request = Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, _, body) = send(state, request).await;
    (status, serde_json::from_str(&body).unwrap())
}

async fn error_code(state: AppState, uri: &str) -> (StatusCode, String, String) {
    let (status, _, body) = get(state, uri).await;
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (
        status,
        v["error"]["code"].as_str().unwrap_or_default().to_string(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[tokio::test]
async fn markdown_fits_the_budget_and_reports_its_token_count() {
    let dir = tempfile::tempdir().unwrap();
    let (status, headers, text) = get(
        state(&dir),
        "/v1/context/customer/C1?format=markdown&max_tokens=180",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(headers["content-type"], "text/markdown; charset=utf-8");
    assert_eq!(headers["x-kontext-tokenizer"], "cl100k");
    let tokens: usize = headers["x-kontext-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(tokens, count(Tokenizer::Cl100k, &text));
    assert!(tokens <= 180, "{tokens}");
    assert!(text.starts_with("# customer C1\n"), "{text}");
    assert!(text.contains("- given_name: Ana"), "{text}");
    // The newest order is kept, the oldest left out and said so.
    assert!(text.contains("- O8 "), "{text}");
    assert!(!text.contains("- O1 "), "{text}");
    assert!(text.contains("omitted to fit 180 tokens: "), "{text}");
}

#[tokio::test]
async fn markdown_without_a_budget_and_with_o200k() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let (status, headers, text) = get(s.clone(), "/v1/context/customer/C1?format=markdown").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!text.contains("omitted"), "{text}");
    assert!(text.contains("- O1 "), "{text}");
    assert!(
        text.contains("- given_name: Ana (crm, 2023-11-14T22:13:20Z)"),
        "{text}"
    );
    assert_eq!(
        headers["x-kontext-tokens"].to_str().unwrap(),
        count(Tokenizer::Cl100k, &text).to_string()
    );
    let (status, headers, text) = get(
        s,
        "/v1/context/customer/C1?format=markdown&tokenizer=o200k&provenance=full",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-kontext-tokenizer"], "o200k");
    assert_eq!(
        headers["x-kontext-tokens"].to_str().unwrap(),
        count(Tokenizer::O200k, &text).to_string()
    );
    assert!(text.contains("context.x/0@0"), "{text}");
}

#[tokio::test]
async fn configured_priority_puts_orders_before_fields() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir).with_render(RenderConfig {
        priority: vec!["related.order".into()],
        tokenizer: Tokenizer::O200k,
    });
    let (status, headers, text) =
        get(s, "/v1/context/customer/C1?format=markdown&max_tokens=250").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(headers["x-kontext-tokenizer"], "o200k");
    assert!(text.contains("- O8 "), "orders first:\n{text}");
    assert!(
        text.contains("omitted to fit 250 tokens: 3 of 8 orders, 4 fields"),
        "{text}"
    );
    assert!(!text.contains("given_name"), "{text}");
}

#[tokio::test]
async fn fields_select_canonical_fields_in_json_and_markdown() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let (status, _, body) = get(
        s.clone(),
        "/v1/context/customer/C1?fields=given_name,%20tier,not_a_field",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["fields"], json!({"given_name": "Ana", "tier": "gold"}));
    let provenance: Vec<&String> = v["provenance"].as_object().unwrap().keys().collect();
    assert_eq!(provenance, ["given_name", "tier"]);
    assert_eq!(
        v["related"]["order"]["total"], 8,
        "related entities are kept"
    );
    let (status, _, text) = get(s, "/v1/context/customer/C1?format=markdown&fields=email").await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("- email: ana@example.com"), "{text}");
    assert!(!text.contains("given_name"), "{text}");
}

#[tokio::test]
async fn bad_parameters_have_stable_codes() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    for (uri, status, code) in [
        (
            "/v1/context/customer/C1?format=markdown&max_tokens=0",
            StatusCode::BAD_REQUEST,
            "invalid_max_tokens",
        ),
        (
            "/v1/context/customer/C1?format=markdown&max_tokens=abc",
            StatusCode::BAD_REQUEST,
            "invalid_max_tokens",
        ),
        (
            "/v1/context/customer/C1?format=markdown&max_tokens=-5",
            StatusCode::BAD_REQUEST,
            "invalid_max_tokens",
        ),
        (
            "/v1/context/customer/C1?format=markdown&max_tokens=1000001",
            StatusCode::BAD_REQUEST,
            "invalid_max_tokens",
        ),
        (
            "/v1/context/customer/C1?format=markdown&max_tokens=99999999999999999999999",
            StatusCode::BAD_REQUEST,
            "invalid_max_tokens",
        ),
        (
            "/v1/context/customer/C1?max_tokens=100",
            StatusCode::BAD_REQUEST,
            "invalid_max_tokens",
        ),
        (
            "/v1/context/customer/C1?format=xml",
            StatusCode::BAD_REQUEST,
            "invalid_format",
        ),
        (
            "/v1/context/customer/C1?format=markdown&tokenizer=gpt2",
            StatusCode::BAD_REQUEST,
            "invalid_tokenizer",
        ),
        (
            "/v1/context/customer/C1?tokenizer=o200k",
            StatusCode::BAD_REQUEST,
            "invalid_tokenizer",
        ),
        (
            "/v1/context/customer/C1?format=markdown&provenance=some",
            StatusCode::BAD_REQUEST,
            "invalid_provenance",
        ),
        (
            "/v1/context/customer/C1?fields=,",
            StatusCode::BAD_REQUEST,
            "invalid_fields",
        ),
        (
            "/v1/context/planet/X?format=markdown",
            StatusCode::NOT_FOUND,
            "unknown_entity_type",
        ),
        (
            "/v1/context/customer/nobody?format=markdown&max_tokens=100",
            StatusCode::NOT_FOUND,
            "entity_not_found",
        ),
    ] {
        let (got_status, got_code, message) = error_code(s.clone(), uri).await;
        assert_eq!(
            (got_status, got_code.as_str()),
            (status, code),
            "{uri}: {message}"
        );
        assert!(!message.is_empty(), "{uri}");
    }
}

#[tokio::test]
async fn a_budget_too_small_for_the_header_names_the_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let (status, code, message) = error_code(
        s.clone(),
        "/v1/context/customer/C1?format=markdown&max_tokens=5",
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(code, "max_tokens_too_small");
    let minimum: usize = message
        .split("at least ")
        .nth(1)
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no minimum in {message:?}"));
    let (status, headers, _) = get(
        s,
        &format!("/v1/context/customer/C1?format=markdown&max_tokens={minimum}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let tokens: usize = headers["x-kontext-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(tokens <= minimum);
}

#[tokio::test]
async fn batch_get_answers_each_request_with_its_context_or_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let (status, body) = post(
        state(&dir),
        "/v1/context:batchGet",
        r#"{"requests": [
            {"entity_type": "customer", "entity_id": "C1"},
            {"entity_type": "customer", "entity_id": "nobody"},
            {"entity_type": "planet", "entity_id": "X"},
            {"entity_type": "order", "entity_id": "O3"}
        ], "fields": ["given_name", "status"]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(results[0]["entity_id"], "C1");
    assert_eq!(
        results[0]["context"]["fields"],
        json!({"given_name": "Ana"})
    );
    assert_eq!(results[1]["error"]["code"], "entity_not_found");
    assert_eq!(results[1]["error"]["status"], 404);
    assert_eq!(results[2]["error"]["code"], "unknown_entity_type");
    assert_eq!(
        results[3]["context"]["fields"],
        json!({"status": "shipped"})
    );
    assert_eq!(
        results[3]["context"]["belongs_to"]["customer"]["entity_id"],
        "C1"
    );
}

#[tokio::test]
async fn batch_get_renders_markdown_with_token_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (status, body) = post(
        state(&dir),
        "/v1/context:batchGet",
        r#"{"requests": [{"entity_type": "customer", "entity_id": "C1"},
                         {"entity_type": "order", "entity_id": "O1"}],
            "format": "markdown", "max_tokens": 90, "tokenizer": "o200k_base", "fields": "given_name,total"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tokenizer"], "o200k");
    for result in body["results"].as_array().unwrap() {
        let text = result["markdown"].as_str().unwrap();
        assert_eq!(result["tokens"], count(Tokenizer::O200k, text));
        assert!(result["tokens"].as_u64().unwrap() <= 90);
    }
    let first = body["results"][0]["markdown"].as_str().unwrap();
    assert!(first.starts_with("# customer C1\n"), "{first}");
}

#[tokio::test]
async fn batch_get_rejects_bad_batches_as_a_whole() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let too_many: Vec<Value> = (0..101)
        .map(|i| json!({"entity_type": "customer", "entity_id": format!("C{i}")}))
        .collect();
    let body = json!({ "requests": too_many }).to_string();
    for (body, code) in [
        (body.as_str(), "batch_too_large"),
        ("not json", "invalid_request"),
        (
            r#"{"requests": [{"entity_type": "customer"}]}"#,
            "invalid_request",
        ),
        (r#"{"requests": [], "colour": "red"}"#, "invalid_request"),
        (
            r#"{"requests": [], "format": "markdown", "max_tokens": 0}"#,
            "invalid_max_tokens",
        ),
        (
            r#"{"requests": [], "format": "markdown", "max_tokens": 12.5}"#,
            "invalid_max_tokens",
        ),
        (
            r#"{"requests": [], "format": "markdown", "max_tokens": "lots"}"#,
            "invalid_max_tokens",
        ),
        (r#"{"requests": [], "format": "yaml"}"#, "invalid_format"),
        (
            r#"{"requests": [], "tokenizer": "o200k"}"#,
            "invalid_tokenizer",
        ),
    ] {
        let (status, v) = post(s.clone(), "/v1/context:batchGet", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["code"], code, "{body}: {v}");
    }
    // A body over axum's 2 MiB limit: the API's JSON error, not axum's plain text.
    let huge = format!(r#"{{"requests": [], "pad": "{}"}}"#, "x".repeat(3 << 20));
    let (status, v) = post(s.clone(), "/v1/context:batchGet", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
    let (status, v) = post(s, "/v1/context:batchGet", r#"{"requests": []}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["results"], json!([]));
}

#[tokio::test]
async fn the_colon_route_does_not_shadow_entity_context() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    // GET on the batch route is a method mismatch, not a context lookup.
    let (status, _, _) = get(s.clone(), "/v1/context:batchGet").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _, _) = get(s, "/v1/context/customer/C1").await;
    assert_eq!(status, StatusCode::OK);
}

// ---- JSON bodies, byte for byte ----

/// A store whose documents exercise what the JSON encoding could get wrong: fields set by
/// several events (with and without an event type), nested objects and arrays, floats, large
/// integers, escapes and non-ASCII text, a parent, and related lists longer than their limit.
fn rich_state(dir: &tempfile::TempDir) -> AppState {
    let mut schema = StoreSchema::default();
    schema.belongs_to.insert(
        "order".into(),
        vec![("customer".into(), "customer_id".into())],
    );
    schema.belongs_to.insert(
        "ticket".into(),
        vec![("customer".into(), "customer_id".into())],
    );
    schema.belongs_to.insert("customer".into(), vec![]);
    schema.related_limit.insert("order".into(), 3);
    schema.related_limit.insert("ticket".into(), 2);
    let store = EmbeddedStore::open(&dir.path().join("s.redb"), schema).unwrap();
    let update = |t: &str, id: &str, fields: Value, source: &str, offset: i64| EntityUpdate {
        entity_type: t.into(),
        entity_id: id.into(),
        change: Change::Upsert(fields.as_object().cloned().unwrap().into()),
        provenance: Provenance {
            source: source.into(),
            event_id: format!("{source}-{offset}"),
            event_type: (offset % 2 == 0).then(|| format!("{source}.{t}.updated")),
            topic: format!("context.{t}s"),
            partition: (offset % 3) as i32,
            offset,
            event_time_ms: 1_700_000_000_000 + offset * 1_237,
        },
    };
    let mut updates = vec![
        update(
            "customer",
            "C1",
            json!({"given_name": "Ana \"Nana\" Lima", "family_name": "Lima\nSilva", "email": "ana@example.com",
                   "tier": "gold", "balance": 129.9, "visits": 18_446_744_073_709_551_615u64,
                   "opt_in": false, "nickname": null}),
            "crm",
            0,
        ),
        update(
            "customer",
            "C1",
            json!({"address": {"city": "São Paulo", "zip": "01310-100", "lines": ["Av. Paulista, 1000", "\u{1}\t"]},
                   "balance": -0.5, "score": 1e-7}),
            "billing",
            1,
        ),
        update("customer", "C2", json!({"given_name": "Bo"}), "crm", 2),
    ];
    for i in 3..=9 {
        updates.push(update(
            "order",
            &format!("O{i}"),
            json!({"customer_id": "C1", "status": "shipped", "total": i as f64 * 10.25, "items": [{"sku": "A", "qty": i}]}),
            "shop",
            i,
        ));
    }
    for i in 10..=12 {
        updates.push(update(
            "ticket",
            &format!("T{i}"),
            json!({"customer_id": "C1", "subject": "emoji 🚀 and \\ backslash"}),
            "desk",
            i,
        ));
    }
    // A newer event on an old order moves it to the front of the list.
    updates.push(update(
        "order",
        "O3",
        json!({"status": "returned"}),
        "shop",
        13,
    ));
    store.apply(&updates, &[]).unwrap();
    AppState::new(
        Arc::new(store),
        ["customer", "order", "ticket"]
            .into_iter()
            .map(String::from)
            .collect(),
        Arc::new(PipelineMetrics::default()),
    )
}

/// `body` without what depends on the clock: each `staleness_ms` value becomes 0, and the
/// number of days in a markdown header's `N d ago` becomes `N`.
fn without_staleness(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = rest.find("\"staleness_ms\":") {
        let (head, tail) = rest.split_at(at + "\"staleness_ms\":".len());
        out.push_str(head);
        out.push('0');
        rest = tail.trim_start_matches(|c: char| c.is_ascii_digit() || c == '-');
    }
    out.push_str(rest);
    let mut days = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(at) = rest.find(" d ago") {
        days.push_str(rest[..at].trim_end_matches(|c: char| c.is_ascii_digit()));
        days.push('N');
        days.push_str(" d ago");
        rest = &rest[at + " d ago".len()..];
    }
    days.push_str(rest);
    days
}

/// An update of order O9 (one of C1's in `rich_state`) that makes it C1's newest.
fn lost_order() -> EntityUpdate {
    EntityUpdate {
        entity_type: "order".into(),
        entity_id: "O9".into(),
        change: Change::Upsert(
            json!({"status": "lost"})
                .as_object()
                .cloned()
                .unwrap()
                .into(),
        ),
        provenance: Provenance {
            source: "shop".into(),
            event_id: "shop-99".into(),
            event_type: None,
            topic: "context.orders".into(),
            partition: 0,
            offset: 99,
            event_time_ms: 1_800_000_000_000,
        },
    }
}

/// A hot entity's markdown is rendered once per request and reused (`markdown_cache.rs`):
/// the same text again, a field selection in between does not leak into it, and a write to
/// one of its orders shows at once.
#[tokio::test]
async fn a_repeated_markdown_fetch_is_reused_until_the_entity_changes() {
    let dir = tempfile::tempdir().unwrap();
    let s = rich_state(&dir);
    let uri = "/v1/context/customer/C1?format=markdown&max_tokens=4000";
    let first = get(s.clone(), uri).await.2;
    assert!(first.contains("given_name"), "{first}");
    let trimmed = get(s.clone(), &format!("{uri}&fields=balance")).await.2;
    assert!(!trimmed.contains("given_name"), "{trimmed}");
    assert_eq!(get(s.clone(), uri).await.2, first);
    // One rendering, one reuse; the trimmed fetch does not go through the cache.
    let (_, _, metrics) = get(s.clone(), "/metrics").await;
    for line in [
        "kontext_markdown_cache_hits_total 1",
        "kontext_markdown_cache_misses_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }

    let order = lost_order();
    s.store.apply(&[order], &[]).await.unwrap();
    let after = get(s.clone(), uri).await.2;
    assert!(after.contains("O9") && after.contains("lost"), "{after}");
}

/// A hot entity's JSON is serialized once and reused (`json_cache.rs`): the same bytes again,
/// a field selection in between does not leak into it, and a write to one of its orders
/// shows at once.
#[tokio::test]
async fn a_repeated_fetch_reuses_the_json_until_the_entity_changes() {
    let dir = tempfile::tempdir().unwrap();
    let s = rich_state(&dir);
    let uri = "/v1/context/customer/C1";
    let first = without_staleness(&get(s.clone(), uri).await.2);
    let fields = get(s.clone(), &format!("{uri}?fields=balance")).await.2;
    assert!(!fields.contains("given_name"), "{fields}");
    assert_eq!(without_staleness(&get(s.clone(), uri).await.2), first);
    common::golden("context_customer.json", &first);
    // Three lookups: the first assembled, the other two from the cache.
    let (_, _, metrics) = get(s.clone(), "/metrics").await;
    for line in [
        "kontext_context_cache_hits_total 2",
        "kontext_context_cache_misses_total 1",
        "kontext_context_cache_documents 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }

    let order = lost_order();
    let counter = |metrics: &str, name: &str| -> u64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} ")));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    let reused = "kontext_context_cache_entities_reused_total";
    let decoded = "kontext_context_cache_entities_decoded_total";
    let kept = "kontext_context_cache_parts_reused_total";
    let names = [reused, decoded, kept];
    let before = names.map(|name| counter(&metrics, name));
    s.store.apply(&[order], &[]).await.unwrap();
    let (_, _, after) = get(s.clone(), uri).await;
    let after: Value = serde_json::from_str(&after).unwrap();
    let newest = &after["related"]["order"]["items"][0];
    assert_eq!(newest["entity_id"], "O9", "{after}");
    assert_eq!(newest["fields"]["status"], "lost", "{after}");
    // Rebuilt from the stale document: only the changed order was read and decoded. The
    // customer's record, its other lists and its other orders were kept as they were.
    let lists = after["related"].as_object().unwrap();
    let orders = after["related"]["order"]["items"].as_array().unwrap().len() as u64;
    assert!(orders > 1 && lists.len() > 1, "{after}");
    let (_, _, metrics) = get(s.clone(), "/metrics").await;
    let delta = |i: usize| counter(&metrics, names[i]) - before[i];
    assert_eq!((delta(0), delta(1)), (0, 1), "{metrics}");
    assert_eq!(
        delta(2),
        1 + (lists.len() as u64 - 1) + (orders - 1),
        "{metrics}"
    );
}

#[tokio::test]
async fn json_context_bodies_are_byte_for_byte_those_of_the_golden_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = rich_state(&dir);
    for (uri, name) in [
        ("/v1/context/customer/C1", "context_customer.json"),
        ("/v1/context/customer/C2", "context_customer_alone.json"),
        ("/v1/context/order/O3", "context_order.json"),
        (
            "/v1/context/customer/C1?fields=balance,address,nope",
            "context_customer_fields.json",
        ),
    ] {
        let (status, headers, body) = get(s.clone(), uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        assert_eq!(headers["content-type"], "application/json", "{uri}");
        common::golden(name, &without_staleness(&body));
    }
    let request = Request::post("/v1/context:batchGet")
        .header("content-type", "application/json")
        .body(Body::from(
            r#"{"requests": [
                {"entity_type": "customer", "entity_id": "C1"},
                {"entity_type": "customer", "entity_id": "nobody"},
                {"entity_type": "planet", "entity_id": "X"},
                {"entity_type": "ticket", "entity_id": "T11"}
            ]}"#,
        ))
        .unwrap();
    let (status, headers, body) = send(s.clone(), request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    common::golden("batch_json.json", &without_staleness(&body));
    let request = Request::post("/v1/context:batchGet")
        .header("content-type", "application/json")
        .body(Body::from(
            r#"{"requests": [
                {"entity_type": "order", "entity_id": "O3"},
                {"entity_type": "order", "entity_id": "O404"}
            ], "format": "markdown", "max_tokens": 200}"#,
        ))
        .unwrap();
    let (status, _, body) = send(s, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    common::golden("batch_markdown.json", &without_staleness(&body));
}

/// `/v1/lag` counts what the store has yet to apply and what the groups upstream of it (the
/// processor's) have yet to commit: a store whose own topics are drained is not caught up
/// while the processor still owes it outputs.
#[tokio::test]
async fn lag_adds_the_upstream_groups_to_the_store() {
    use kontext_core::record::ProduceRecord;
    use kontext_core::record::TopicPartition;
    use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};
    use kontext_log::{Log, TopicSpec};

    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
    log.create_topic(&TopicSpec::new("context.x", 1))
        .await
        .unwrap();
    log.create_topic(&TopicSpec::new("source", 2))
        .await
        .unwrap();
    let producer = log.producer().await.unwrap();
    let record = |topic: &str, partition: i32| ProduceRecord {
        partition: Some(partition),
        ..ProduceRecord::new(topic, Some("k".into()), Some("{}".into()))
    };
    // The store applied offsets 0..=8 of context.x/0 (see `state`): 3 of 12 left.
    producer
        .send((0..12).map(|_| record("context.x", 0)).collect())
        .await
        .unwrap();
    // The upstream group committed 2 of source/0's 5 records and none of source/1's 4.
    let mut sources: Vec<_> = (0..5).map(|_| record("source", 0)).collect();
    sources.extend((0..4).map(|_| record("source", 1)));
    producer.send(sources).await.unwrap();
    log.reset_group_offsets("proc", &[(TopicPartition::new("source", 0), 2)])
        .await
        .unwrap();
    let state = state(&dir).with_lag(kontext_serve::LagSource {
        log: log.clone(),
        group: "sink".into(),
        topics: vec!["context.x".into()],
        upstream: vec![("proc".into(), vec!["source".into()])],
        transactional: false,
    });

    let (status, _, body) = get(state.clone(), "/v1/lag").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["store_lag"], 3, "{body}");
    assert_eq!(body["partitions"][0]["applied"], 9, "{body}");
    let upstream = &body["upstream"][0];
    assert_eq!(upstream["group"], "proc", "{body}");
    assert_eq!(upstream["lag"], 3 + 4, "{body}");
    assert_eq!(upstream["partitions"][0]["committed"], 2, "{body}");
    assert_eq!(upstream["partitions"][1]["committed"], 0, "{body}");
    assert_eq!(body["total_lag"], 3 + 3 + 4, "{body}");

    // The store drained: only the upstream group's lag is left.
    state
        .store
        .apply(&[], &[("context.x".into(), 0, 12)])
        .await
        .unwrap();
    let (_, _, body) = get(state.clone(), "/v1/lag").await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["store_lag"], 0, "{body}");
    assert_eq!(body["total_lag"], 7, "{body}");

    // The group caught up too.
    log.reset_group_offsets(
        "proc",
        &[
            (TopicPartition::new("source", 0), 5),
            (TopicPartition::new("source", 1), 4),
        ],
    )
    .await
    .unwrap();
    let (_, _, body) = get(state, "/v1/lag").await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["total_lag"], 0, "{body}");
}

// ---- review: request errors that escape the API's JSON error format ----

/// The README promises JSON errors with a stable code (`invalid_limit` among them), but a
/// `limit` that is not a whole number is rejected by axum's `Query` extractor before the handler
/// runs: a `text/plain` 400 with no code.
#[tokio::test]
async fn a_limit_that_is_not_a_number_is_a_json_invalid_limit() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    for uri in [
        "/v1/entities/customer?limit=abc",
        "/v1/entities/customer?limit=-1",
        "/v1/entities/customer?limit=99999999999999999999999",
        "/v1/entities/customer?limit=2&limit=3",
    ] {
        let (status, headers, body) = get(s.clone(), uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_eq!(headers["content-type"], "application/json", "{uri}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_limit", "{uri}: {body}");
    }
}

/// `?fields=a&fields=b` is how many HTTP clients (and OpenAPI's default `explode: true`) send a
/// list. It reaches no handler: `Query<RawContextParams>` fails with "duplicate field", a
/// `text/plain` 400 without a code. The same goes for any repeated parameter.
#[tokio::test]
async fn repeated_query_parameters_get_an_answer_in_the_apis_json() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let (status, headers, body) = get(
        s.clone(),
        "/v1/context/customer/C1?fields=given_name&fields=email",
    )
    .await;
    assert_eq!(
        headers["content-type"], "application/json",
        "{status}: {body}"
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["fields"],
        json!({"email": "ana@example.com", "given_name": "Ana"})
    );
    let (status, headers, body) =
        get(s, "/v1/context/customer/C1?format=markdown&format=json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(headers["content-type"], "application/json", "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "invalid_format", "{body}");
}
