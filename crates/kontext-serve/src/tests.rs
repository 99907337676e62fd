use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kontext_store::{Change, EmbeddedStore, EntityUpdate, Provenance, StoreSchema};
use serde_json::Value;
use tower::ServiceExt;

use super::*;

fn state(dir: &tempfile::TempDir) -> AppState {
    let mut schema = StoreSchema::default();
    schema.belongs_to.insert(
        "order".into(),
        vec![("customer".into(), "customer_id".into())],
    );
    schema.belongs_to.insert("customer".into(), vec![]);
    let store = EmbeddedStore::open(&dir.path().join("s.redb"), schema).unwrap();
    let update = |t: &str, id: &str, fields: Value, offset| EntityUpdate {
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
            event_time_ms: 1_700_000_000_000,
        },
    };
    store
        .apply(
            &[
                update(
                    "customer",
                    "C1",
                    serde_json::json!({"given_name": "Ana"}),
                    0,
                ),
                update("order", "O1", serde_json::json!({"customer_id": "C1"}), 1),
            ],
            &[],
        )
        .unwrap();
    AppState::new(
        Arc::new(store),
        ["customer".to_string(), "order".to_string()]
            .into_iter()
            .collect(),
        Arc::new(PipelineMetrics::default()),
    )
}

async fn get_json(state: AppState, uri: &str) -> (StatusCode, Value) {
    let response = router(state)
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn serves_context_with_provenance_and_related_entities() {
    let dir = tempfile::tempdir().unwrap();
    let (status, body) = get_json(state(&dir), "/v1/context/customer/C1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["fields"]["given_name"], "Ana");
    assert_eq!(body["provenance"]["given_name"]["source"], "crm");
    assert_eq!(
        body["provenance"]["given_name"]["event_time"],
        "2023-11-14T22:13:20.000Z"
    );
    assert_eq!(body["related"]["order"]["items"][0]["entity_id"], "O1");
    assert!(body["staleness_ms"].as_i64().unwrap() > 0);
}

#[tokio::test]
async fn errors_have_stable_codes_and_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let (status, body) = get_json(s.clone(), "/v1/context/planet/X").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "unknown_entity_type");
    let (status, body) = get_json(s.clone(), "/v1/context/customer/nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "entity_not_found");
    let (status, body) = get_json(s, "/v1/entities/customer?limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalid_limit");
}

/// Requests no handler takes (an unknown path, a known path with another method) and paths
/// that do not decode are answered in the API's JSON too, not with an empty or plain-text body.
#[tokio::test]
async fn unknown_routes_and_undecodable_paths_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    for uri in ["/v1/context/customer", "/v2/context/customer/C1", "/"] {
        let (status, body) = get_json(s.clone(), uri).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(body["error"]["code"], "route_not_found", "{uri}");
    }
    let response = router(s.clone())
        .oneshot(
            Request::delete("/v1/context/customer/C1")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    for uri in [
        "/v1/context/customer/%FF",
        "/v1/entities/%FF",
        "/v1/admin/stores/%FF/rebuild",
    ] {
        let (status, body) = get_json(s.clone(), uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(body["error"]["code"], "invalid_path", "{uri}");
    }
}

#[tokio::test]
async fn lists_entity_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (status, body) = get_json(state(&dir), "/v1/entities/customer?limit=5").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["ids"], serde_json::json!(["C1"]));
    assert_eq!(body["next_after"], Value::Null);
}
