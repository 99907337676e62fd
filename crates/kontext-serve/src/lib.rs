//! The HTTP API.
//!
//! - `GET /v1/context/{entity_type}/{entity_id}`: the entity's assembled context
//! - `GET /v1/entities/{entity_type}?limit=N&after=ID`: entity ids, paged
//! - `GET /healthz`: liveness
//! - `GET /metrics`: pipeline counters in the Prometheus text format
//!
//! Errors are JSON `{"error": {"code": ..., "message": ...}}` with a stable code.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use kontext_log::Log;
use kontext_store::{ContextDocument, EmbeddedStore};
use kontext_stream::PipelineMetrics;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<EmbeddedStore>,
    pub entity_types: Arc<BTreeSet<String>>,
    pub metrics: Arc<PipelineMetrics>,
    /// Where `/v1/lag` reads high watermarks; `None` disables the endpoint.
    pub lag: Option<LagSource>,
}

/// The log and topics the store consumes, for lag reporting.
#[derive(Clone)]
pub struct LagSource {
    pub log: Arc<dyn Log>,
    pub group: String,
    pub topics: Vec<String>,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/context/{entity_type}/{entity_id}", get(get_context))
        .route("/v1/entities/{entity_type}", get(list_entities))
        .route("/v1/lag", get(lag))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// An API error: HTTP status, stable code, human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

/// The context document plus how fresh it is.
#[derive(Debug, Serialize)]
struct ContextResponse {
    #[serde(flatten)]
    document: ContextDocument,
    /// Now minus the newest applied event's time.
    staleness_ms: i64,
}

async fn get_context(
    State(state): State<AppState>,
    Path((entity_type, entity_id)): Path<(String, String)>,
) -> Result<Json<ContextResponse>, ApiError> {
    check_type(&state, &entity_type)?;
    // redb point reads take microseconds and never wait for the writer (MVCC), so they run on
    // the async worker instead of paying a thread hop.
    match state.store.context(&entity_type, &entity_id) {
        Ok(Some(document)) => {
            let staleness_ms = now_ms() - document.as_of_ms;
            Ok(Json(ContextResponse {
                document,
                staleness_ms,
            }))
        }
        Ok(None) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "entity_not_found",
            message: format!("no {entity_type} with id {entity_id:?} in the context store"),
        }),
        Err(e) => Err(store_error(e)),
    }
}

#[derive(Debug, Deserialize)]
struct ListParams {
    limit: Option<usize>,
    after: Option<String>,
}

const MAX_LIST_LIMIT: usize = 1_000;

async fn list_entities(
    State(state): State<AppState>,
    Path(entity_type): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_type(&state, &entity_type)?;
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_limit",
            message: format!("limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}"),
        });
    }
    let ids = state
        .store
        .list(&entity_type, limit, params.after.as_deref())
        .map_err(store_error)?;
    let next_after = if ids.len() == limit {
        ids.last().cloned()
    } else {
        None
    };
    Ok(Json(
        json!({"entity_type": entity_type, "ids": ids, "next_after": next_after}),
    ))
}

/// Consumer lag of the store: per partition, the log's high watermark minus the next offset
/// the store will apply (the store's own offsets are the truth, not the group's commits).
async fn lag(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(source) = &state.lag else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "lag_unavailable",
            message: "lag is not tracked here".into(),
        });
    };
    let applied = state.store.applied_offsets().map_err(store_error)?;
    let mut partitions = Vec::new();
    let mut total: i64 = 0;
    for topic in &source.topics {
        let description = source
            .log
            .describe_topic(topic)
            .await
            .map_err(|e| ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "log_unavailable",
                message: e.to_string(),
            })?;
        for p in description.partitions {
            let next = applied
                .get(&(topic.clone(), p.partition))
                .copied()
                .unwrap_or(0)
                .max(p.low_watermark);
            let lag = (p.high_watermark - next).max(0);
            total += lag;
            partitions.push(json!({"topic": topic, "partition": p.partition, "high_watermark": p.high_watermark, "applied": next, "lag": lag}));
        }
    }
    Ok(Json(
        json!({"group": source.group, "total_lag": total, "partitions": partitions}),
    ))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

fn check_type(state: &AppState, entity_type: &str) -> Result<(), ApiError> {
    if state.entity_types.contains(entity_type) {
        Ok(())
    } else {
        let known: Vec<&str> = state.entity_types.iter().map(String::as_str).collect();
        Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "unknown_entity_type",
            message: format!(
                "unknown entity type {entity_type:?}; this pipeline has: {}",
                known.join(", ")
            ),
        })
    }
}

fn store_error(e: kontext_store::StoreError) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "store_unavailable",
        message: e.to_string(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
