//! Entity context: the one place that turns a request for an entity's context into a
//! response body, shared by the HTTP handlers and the MCP tools.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use kontext_store::ContextDocument;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{ApiError, AppState};

/// What a caller asks of one entity's context (from a query string or MCP tool arguments).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ContextQuery {
    /// `json` (default) or `markdown`.
    #[serde(default)]
    pub format: ContextFormat,
    /// Token budget of a markdown rendering.
    pub max_tokens: Option<usize>,
}

/// Response formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextFormat {
    #[default]
    Json,
    Markdown,
}

/// A context response body.
#[derive(Debug, Clone, PartialEq)]
pub enum ContextBody {
    Json(serde_json::Value),
    Markdown(String),
}

/// The context document plus how fresh it is.
#[derive(Debug, Serialize)]
pub struct ContextResponse {
    #[serde(flatten)]
    pub document: ContextDocument,
    /// Now minus the newest applied event's time.
    pub staleness_ms: i64,
}

/// Looks up and shapes one entity's context.
pub fn fetch_context(
    state: &AppState,
    entity_type: &str,
    entity_id: &str,
    query: &ContextQuery,
) -> Result<ContextBody, ApiError> {
    check_type(state, entity_type)?;
    if query.format == ContextFormat::Markdown || query.max_tokens.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_format",
            "markdown rendering with a token budget is not available yet",
        ));
    }
    // redb point reads take microseconds and never wait for the writer (MVCC), so they run on
    // the async worker instead of paying a thread hop.
    let document = state
        .store
        .context(entity_type, entity_id)
        .map_err(ApiError::store)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "entity_not_found",
                format!("no {entity_type} with id {entity_id:?} in the context store"),
            )
        })?;
    let staleness_ms = now_ms() - document.as_of_ms;
    let body = serde_json::to_value(ContextResponse {
        document,
        staleness_ms,
    })
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(ContextBody::Json(body))
}

/// `GET /v1/context/{entity_type}/{entity_id}`
pub(crate) async fn get_context(
    State(state): State<AppState>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    Query(query): Query<ContextQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    match fetch_context(&state, &entity_type, &entity_id, &query)? {
        ContextBody::Json(v) => Ok(Json(v).into_response()),
        ContextBody::Markdown(text) => Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                "text/markdown; charset=utf-8",
            )],
            text,
        )
            .into_response()),
    }
}

/// Paging of `GET /v1/entities/{entity_type}`.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    pub limit: Option<usize>,
    pub after: Option<String>,
}

/// Largest page of entity ids.
pub const MAX_LIST_LIMIT: usize = 1_000;

/// Entity ids of a type, paged: `{"entity_type", "ids", "next_after"}`.
pub fn list_entity_ids(
    state: &AppState,
    entity_type: &str,
    params: &ListParams,
) -> Result<serde_json::Value, ApiError> {
    check_type(state, entity_type)?;
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            format!("limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}"),
        ));
    }
    let ids = state
        .store
        .list(entity_type, limit, params.after.as_deref())
        .map_err(ApiError::store)?;
    let next_after = if ids.len() == limit {
        ids.last().cloned()
    } else {
        None
    };
    Ok(json!({"entity_type": entity_type, "ids": ids, "next_after": next_after}))
}

/// `GET /v1/entities/{entity_type}?limit=N&after=ID`
pub(crate) async fn list_entities(
    State(state): State<AppState>,
    Path(entity_type): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    list_entity_ids(&state, &entity_type, &params).map(Json)
}

/// Rejects entity types the pipeline does not declare, naming the ones it does.
pub fn check_type(state: &AppState, entity_type: &str) -> Result<(), ApiError> {
    if state.entity_types.contains(entity_type) {
        return Ok(());
    }
    let known: Vec<&str> = state.entity_types.iter().map(String::as_str).collect();
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_entity_type",
        format!(
            "unknown entity type {entity_type:?}; this pipeline has: {}",
            known.join(", ")
        ),
    ))
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
