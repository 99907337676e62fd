use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kontext_core::config::PipelineConfig;
use kontext_store::{Change, EmbeddedStore, EntityUpdate, Provenance, StoreSchema};
use kontext_stream::PipelineMetrics;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::context::{fetch_context, ContextQuery};
use crate::{AppState, ContextBody, ContextFormat};

const PIPELINE: &str = r#"
name: shop
entities:
  customer: { key: customer_id, topic: context.customers }
  order:
    key: order_id
    topic: context.orders
    belongs_to: { customer: customer_id }
    related_limit: 5
sources:
  crm:
    topic: context.customers
    entity: customer
    match: { ce_source: crm }
    fields: { given_name: first_name, email: email }
  billing:
    topic: context.customers
    entity: customer
    match: { ce_source: billing }
    fields: { given_name: contact_name, billing_city: billing.city }
  shop:
    topic: context.orders
    entity: order
    fields: { customer_id: customer_ref, status: status }
"#;

fn config() -> PipelineConfig {
    PipelineConfig::parse("test.yaml", PIPELINE).unwrap()
}

/// A store with customers C1, C2 and C3 and one order of C1.
fn state(dir: &tempfile::TempDir) -> AppState {
    let config = config();
    let store = EmbeddedStore::open(
        &dir.path().join("s.redb"),
        StoreSchema::from_config(&config),
    )
    .unwrap();
    let update = |t: &str, id: &str, fields: Value, offset| EntityUpdate {
        entity_type: t.into(),
        entity_id: id.into(),
        change: Change::Upsert(fields.as_object().cloned().unwrap().into()),
        provenance: Provenance {
            source: "crm".into(),
            event_id: format!("e{offset}"),
            event_type: None,
            topic: "context.customers".into(),
            partition: 0,
            offset,
            event_time_ms: 1_700_000_000_000,
        },
    };
    store
        .apply(
            &[
                update("customer", "C1", json!({"given_name": "Ana"}), 0),
                update("customer", "C2", json!({"given_name": "Bo"}), 1),
                update("customer", "C3", json!({"given_name": "Cy"}), 2),
                update(
                    "order",
                    "O1",
                    json!({"customer_id": "C1", "status": "paid"}),
                    3,
                ),
            ],
            &[],
        )
        .unwrap();
    AppState::new(
        Arc::new(store),
        config.entities.keys().cloned().collect(),
        Arc::new(PipelineMetrics::default()),
    )
}

fn server(dir: &tempfile::TempDir) -> KontextMcp {
    KontextMcp::new(state(dir).with_entity_descriptions(EntityCatalog::from_config(&config())))
}

fn context_params(entity_type: &str, entity_id: &str) -> Parameters<GetEntityContextParams> {
    Parameters(GetEntityContextParams {
        entity_type: entity_type.into(),
        entity_id: entity_id.into(),
        format: None,
        max_tokens: None,
        fields: None,
        tokenizer: None,
    })
}

fn list_params(
    entity_type: &str,
    limit: Option<usize>,
    after: Option<&str>,
) -> Parameters<ListEntitiesParams> {
    Parameters(ListEntitiesParams {
        entity_type: entity_type.into(),
        limit,
        after: after.map(str::to_string),
    })
}

/// The `{"code", "message"}` of a failed call.
fn error_of(result: &CallToolResult) -> (String, String) {
    assert_eq!(result.is_error, Some(true), "{result:?}");
    let error = &result.structured_content.as_ref().unwrap()["error"];
    (
        error["code"].as_str().unwrap().to_string(),
        error["message"].as_str().unwrap().to_string(),
    )
}

fn structured(result: CallToolResult) -> Value {
    assert_eq!(result.is_error, Some(false), "{result:?}");
    // Clients that ignore structured content read the same JSON as text.
    let text = &result.content[0].as_text().unwrap().text;
    let value = result.structured_content.unwrap();
    assert_eq!(serde_json::from_str::<Value>(text).unwrap(), value);
    value
}

#[tokio::test]
async fn get_entity_context_returns_the_http_apis_document() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir);
    let body = structured(
        server
            .get_entity_context(context_params("customer", "C1"))
            .await
            .unwrap(),
    );
    assert_eq!(body["fields"]["given_name"], "Ana");
    assert_eq!(body["provenance"]["given_name"]["source"], "crm");
    assert_eq!(body["related"]["order"]["items"][0]["entity_id"], "O1");
    let Ok(ContextBody::Json(http)) = fetch_context(
        &server.state_for_tests(),
        "customer",
        "C1",
        &ContextQuery::default(),
    )
    .await
    else {
        panic!("the HTTP API's lookup failed");
    };
    // Everything but the clock-dependent staleness is the HTTP API's answer.
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("staleness_ms");
        v
    };
    assert_eq!(strip(body), strip(serde_json::to_value(&http).unwrap()));
}

#[tokio::test]
async fn fields_narrow_the_entitys_own_fields() {
    let dir = tempfile::tempdir().unwrap();
    let params = GetEntityContextParams {
        fields: Some(vec!["given_name".into(), "not_yet_filled".into()]),
        ..context_params("order", "O1").0
    };
    let body = structured(
        server(&dir)
            .get_entity_context(Parameters(params))
            .await
            .unwrap(),
    );
    assert_eq!(body["fields"], json!({}), "{body}");
    let params = GetEntityContextParams {
        fields: Some(vec!["status".into()]),
        ..context_params("order", "O1").0
    };
    let body = structured(
        server(&dir)
            .get_entity_context(Parameters(params))
            .await
            .unwrap(),
    );
    assert_eq!(body["fields"], json!({"status": "paid"}), "{body}");
}

#[tokio::test]
async fn unknown_entities_and_types_fail_with_the_http_apis_stable_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir);
    let missing = server
        .get_entity_context(context_params("customer", "C-404"))
        .await
        .unwrap();
    let (code, message) = error_of(&missing);
    assert_eq!(code, "entity_not_found");
    assert!(message.contains("C-404"), "{message}");
    // The text content says the same, for clients that show only text.
    assert!(missing.content[0]
        .as_text()
        .unwrap()
        .text
        .contains("entity_not_found"));

    let unknown = server
        .get_entity_context(context_params("planet", "P1"))
        .await
        .unwrap();
    let (code, message) = error_of(&unknown);
    assert_eq!(code, "unknown_entity_type");
    assert!(message.contains("customer, order"), "{message}");
    let unknown = server
        .list_entities(list_params("planet", None, None))
        .await
        .unwrap();
    assert_eq!(error_of(&unknown).0, "unknown_entity_type");
}

#[tokio::test]
#[allow(clippy::needless_update)] // ContextQuery is growing options; see server::context_query
async fn markdown_requests_reach_the_shared_context_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir);
    let params = GetEntityContextParams {
        format: Some(ToolFormat::Markdown),
        max_tokens: Some(200),
        ..context_params("customer", "C1").0
    };
    let query = ContextQuery {
        format: ContextFormat::Markdown,
        max_tokens: Some(200),
        ..ContextQuery::default()
    };
    // Rendered (now that the renderer is there), with the entity in it.
    let result_text = fetch_context(&server.state_for_tests(), "customer", "C1", &query).await;
    assert!(
        matches!(&result_text, Ok(ContextBody::Markdown(t)) if t.contains("C1")),
        "{result_text:?}"
    );
    let http = fetch_context(&server.state_for_tests(), "customer", "C1", &query).await;
    let result = server.get_entity_context(Parameters(params)).await.unwrap();
    // Whatever the renderer answers (text, or an error while it is not there), MCP answers alike.
    match http {
        Ok(ContextBody::Markdown(text)) => {
            assert_eq!(result.is_error, Some(false));
            assert_eq!(result.content[0].as_text().unwrap().text, text);
        }
        Ok(ContextBody::Json(_)) => panic!("markdown was asked for"),
        Err(e) => assert_eq!(error_of(&result), (e.code.to_string(), e.message)),
    }
}

#[tokio::test]
async fn list_entities_pages_through_ids() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir);
    let first = structured(
        server
            .list_entities(list_params("customer", Some(2), None))
            .await
            .unwrap(),
    );
    assert_eq!(first["ids"], json!(["C1", "C2"]));
    assert_eq!(first["next_after"], "C2");
    let second = structured(
        server
            .list_entities(list_params("customer", Some(2), Some("C2")))
            .await
            .unwrap(),
    );
    assert_eq!(second["ids"], json!(["C3"]));
    assert_eq!(second["next_after"], Value::Null);
    let invalid = server
        .list_entities(list_params("customer", Some(0), None))
        .await
        .unwrap();
    assert_eq!(error_of(&invalid).0, "invalid_limit");
}

#[tokio::test]
async fn describe_entity_types_names_sources_as_provenance_does() {
    let config = PipelineConfig::parse(
        "p.yaml",
        &PIPELINE
            .replace("match: { ce_source: crm }", "match: { ce_source: crm.example.com }")
            .replace(
                "\nsources:",
                "\nfeatures:\n  orders: { from: order, entity: customer, key: customer_id, agg: count }\nsources:",
            ),
    )
    .unwrap();
    let catalog = EntityCatalog::from_config(&config);
    let customer = &catalog.entity_types[0];
    assert_eq!(customer.entity_type, "customer");
    assert_eq!(
        customer.sources,
        ["billing", "crm.example.com", "kontext.features"]
    );
    assert_eq!(customer.fields["orders"], ["kontext.features"]);
    assert_eq!(customer.fields["email"], ["crm.example.com"]);
}

#[tokio::test]
async fn describe_entity_types_tells_keys_relations_fields_and_example_ids() {
    let dir = tempfile::tempdir().unwrap();
    let body = structured(server(&dir).describe_entity_types().await.unwrap());
    assert_eq!(body["pipeline"], "shop");
    let types = body["entity_types"].as_array().unwrap();
    let customer = &types[0];
    assert_eq!(customer["entity_type"], "customer");
    assert_eq!(customer["key"], "customer_id");
    assert_eq!(customer["topic"], "context.customers");
    assert_eq!(customer["sources"], json!(["billing", "crm"]));
    assert_eq!(customer["fields"]["given_name"], json!(["billing", "crm"]));
    assert_eq!(customer["fields"]["billing_city"], json!(["billing"]));
    // The key field, which documents always hold, filled from every source's record keys.
    assert_eq!(customer["fields"]["customer_id"], json!(["billing", "crm"]));
    assert_eq!(customer["belongs_to"], json!([]));
    assert_eq!(
        customer["has_many"],
        json!([{"entity_type": "order", "field": "customer_id", "listed": 5}])
    );
    assert_eq!(customer["example_ids"], json!(["C1", "C2", "C3"]));
    let order = &types[1];
    assert_eq!(
        order["belongs_to"],
        json!([{"entity_type": "customer", "field": "customer_id"}])
    );
    assert_eq!(order["example_ids"], json!(["O1"]));
}

#[tokio::test]
async fn without_the_pipeline_file_describe_still_tells_relations() {
    let dir = tempfile::tempdir().unwrap();
    let body = structured(
        KontextMcp::new(state(&dir))
            .describe_entity_types()
            .await
            .unwrap(),
    );
    let customer = &body["entity_types"][0];
    assert_eq!(customer["entity_type"], "customer");
    assert!(customer.get("key").is_none());
    assert_eq!(customer["has_many"][0]["entity_type"], "order");
    assert_eq!(
        body["entity_types"][1]["belongs_to"][0]["field"],
        "customer_id"
    );
}

#[test]
fn tools_have_descriptions_and_input_schemas() {
    let tools: Vec<_> = KontextMcp::tool_router().list_all();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert_eq!(
        names,
        [
            "describe_entity_types",
            "get_entity_context",
            "list_entities"
        ]
    );
    for tool in &tools {
        assert!(
            tool.description.as_ref().is_some_and(|d| d.len() > 80),
            "{}",
            tool.name
        );
        assert_eq!(tool.input_schema["type"], "object", "{}", tool.name);
        let annotations = tool.annotations.as_ref().unwrap();
        assert_eq!(annotations.read_only_hint, Some(true));
    }
    let get = &tools[1].input_schema;
    assert_eq!(get["required"], json!(["entity_type", "entity_id"]));
    assert!(
        get["properties"]["format"].to_string().contains("markdown"),
        "{get:?}"
    );
    assert!(get["properties"]["entity_id"]["description"].is_string());
    assert!(get.get("$defs").is_none(), "self-contained schema: {get:?}");
}

/// POSTs JSON-RPC to `/mcp` the way a streamable HTTP client does.
async fn post_mcp(state: AppState, message: Value) -> (StatusCode, Value) {
    let request = Request::post("/mcp")
        .header("host", "127.0.0.1:8080")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18")
        .body(Body::from(message.to_string()))
        .unwrap();
    let response = crate::router(state).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

#[tokio::test]
async fn mcp_route_answers_initialize_and_tool_calls_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir);
    let (status, init) = post_mcp(
        state.clone(),
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"}}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{init}");
    assert_eq!(init["result"]["serverInfo"]["name"], "kontext");
    assert!(init["result"]["instructions"]
        .as_str()
        .unwrap()
        .contains("get_entity_context"));
    assert!(init["result"]["capabilities"]["tools"].is_object());

    let (status, call) = post_mcp(
        state,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "get_entity_context",
            "arguments": {"entity_type": "customer", "entity_id": "C1"}}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{call}");
    assert_eq!(call["result"]["isError"], false, "{call}");
    assert_eq!(
        call["result"]["structuredContent"]["fields"]["given_name"],
        "Ana"
    );
}

#[tokio::test]
async fn mcp_route_rejects_foreign_host_headers() {
    // A page on another origin that rebinds its DNS name to 127.0.0.1 sends its own Host.
    let dir = tempfile::tempdir().unwrap();
    let request = Request::post("/mcp")
        .header("host", "attacker.example:8080")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Body::from(
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string(),
        ))
        .unwrap();
    let response = crate::router(state(&dir)).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn mcp_accepts_the_host_names_the_pipeline_allows() {
    let dir = tempfile::tempdir().unwrap();
    let request = |host: &str| {
        Request::post("/mcp")
            .header("host", host)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(Body::from(
                json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string(),
            ))
            .unwrap()
    };
    let state = state(&dir).with_mcp_allowed_hosts(vec!["context.internal".into()]);
    let app = crate::router(state);
    let allowed = app
        .clone()
        .oneshot(request("context.internal:8080"))
        .await
        .unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);
    let other = app.oneshot(request("attacker.example")).await.unwrap();
    assert_eq!(other.status(), StatusCode::FORBIDDEN);
}

/// Arguments of the wrong type or value (a negative or fractional `max_tokens`, an unknown
/// format or tokenizer, a negative `limit`) must come back as the HTTP API's error body with
/// its stable code (README: "A failed call is a tool error (`isError: true`) carrying the API's
/// error body"; the HTTP API answers these with `invalid_max_tokens`, `invalid_format`, ...).
/// rmcp's `Parameters<T>` rejects them before the tool runs: the model gets only serde's text,
/// "failed to deserialize parameters: invalid value: integer `-5`, expected usize", with no
/// code and no name of the argument. And `o200k_base`, which the HTTP API accepts, is refused.
#[tokio::test]
async fn bad_tool_arguments_are_tool_errors_with_the_http_apis_codes() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir);
    for (tool, arguments, code) in [
        (
            "get_entity_context",
            json!({"entity_type": "customer", "entity_id": "C1", "format": "markdown", "max_tokens": -5}),
            "invalid_max_tokens",
        ),
        (
            "get_entity_context",
            json!({"entity_type": "customer", "entity_id": "C1", "format": "markdown", "max_tokens": 1.5}),
            "invalid_max_tokens",
        ),
        (
            "get_entity_context",
            json!({"entity_type": "customer", "entity_id": "C1", "format": "xml"}),
            "invalid_format",
        ),
        (
            "get_entity_context",
            json!({"entity_type": "customer", "entity_id": "C1", "format": "markdown", "tokenizer": "gpt2"}),
            "invalid_tokenizer",
        ),
        (
            "get_entity_context",
            json!({"entity_type": "customer", "entity_id": "C1", "tokenizer": "o200k"}),
            "invalid_tokenizer",
        ),
        (
            "list_entities",
            json!({"entity_type": "customer", "limit": -1}),
            "invalid_limit",
        ),
        (
            "get_entity_context",
            json!({"entity_type": "customer"}),
            "invalid_request",
        ),
        (
            "get_entity_context",
            json!({"entity_type": "customer", "entity_id": "C1", "fields": [""]}),
            "invalid_fields",
        ),
        (
            "get_entity_context",
            json!({"entity_type": "customer", "entity_id": "C1", "fields": [1]}),
            "invalid_request",
        ),
        (
            "get_entity_context",
            json!({"entity_type": "customer", "entity_id": "C1", "format": "markdown", "maxTokens": 50}),
            "invalid_request",
        ),
        (
            "list_entities",
            json!({"entity_type": "customer", "page_size": 5}),
            "invalid_request",
        ),
        ("describe_entity_types", json!({"x": 1}), "invalid_request"),
    ] {
        let (status, call) = post_mcp(
            state.clone(),
            json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
                "name": tool, "arguments": arguments}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{call}");
        assert_eq!(call["result"]["isError"], true, "{arguments}: {call}");
        assert_eq!(
            call["result"]["structuredContent"]["error"]["code"], code,
            "{arguments}: {call}"
        );
    }
    // Whole numbers written as floats, as some function-calling clients send integers.
    for (tool, arguments) in [
        (
            "get_entity_context",
            json!({"entity_type": "customer", "entity_id": "C1", "format": "markdown", "max_tokens": 200.0}),
        ),
        (
            "list_entities",
            json!({"entity_type": "customer", "limit": 1.0}),
        ),
    ] {
        let (_, call) = post_mcp(
            state.clone(),
            json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
                "name": tool, "arguments": arguments}}),
        )
        .await;
        assert_eq!(call["result"]["isError"], false, "{arguments}: {call}");
    }
    // What the HTTP API accepts, the tool accepts: `o200k_base` names the same tokenizer.
    let (_, call) = post_mcp(
        state.clone(),
        json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {
            "name": "get_entity_context",
            "arguments": {"entity_type": "customer", "entity_id": "C1", "format": "markdown", "tokenizer": "o200k_base", "max_tokens": "200"}}}),
    )
    .await;
    assert_eq!(call["result"]["isError"], false, "{call}");
    let text = call["result"]["content"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("# customer C1\n"), "{text}");
    // `fields` as the HTTP API reads it: names trimmed, a comma-separated string split.
    for fields in [
        json!([" given_name ", "email"]),
        json!("email, given_name "),
    ] {
        let (_, call) = post_mcp(
            state.clone(),
            json!({"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {
                "name": "get_entity_context",
                "arguments": {"entity_type": "customer", "entity_id": "C1", "fields": fields}}}),
        )
        .await;
        assert_eq!(call["result"]["isError"], false, "{call}");
        let doc = &call["result"]["structuredContent"];
        let names: Vec<&str> = doc["fields"]
            .as_object()
            .map(|f| f.keys().map(String::as_str).collect())
            .unwrap_or_default();
        assert_eq!(names, ["given_name"], "{fields}: {call}");
    }
    // A tool without arguments is called without any.
    let (_, call) = post_mcp(
        state,
        json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
            "name": "describe_entity_types"}}),
    )
    .await;
    assert_eq!(call["result"]["isError"], false, "{call}");
}
