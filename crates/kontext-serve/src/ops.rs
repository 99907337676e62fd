//! Operational endpoints: lag, metrics, health.

use std::fmt::Write;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::{ApiError, AppState};

/// `GET /v1/lag`: consumer lag of the store. Per partition, the log's high watermark minus the
/// next offset the store will apply (the store's own offsets are the truth, not the group's
/// commits).
pub(crate) async fn lag(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(source) = &state.lag else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "lag_unavailable",
            "lag is not tracked here",
        ));
    };
    let applied = state
        .store
        .applied_offsets()
        .await
        .map_err(ApiError::store)?;
    let mut partitions = Vec::new();
    let mut total: i64 = 0;
    for topic in &source.topics {
        let description = source.log.describe_topic(topic).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "log_unavailable",
                e.to_string(),
            )
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

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut text = state.metrics.render();
    if let Some(cache) = state.store.cache_stats() {
        for (name, kind, help, value) in [
            (
                "kontext_context_cache_hits_total",
                "counter",
                "Context lookups served from the store's document cache.",
                cache.hits,
            ),
            (
                "kontext_context_cache_misses_total",
                "counter",
                "Context lookups that assembled the document from the store.",
                cache.misses,
            ),
            (
                "kontext_context_cache_documents",
                "gauge",
                "Context documents in the store's cache.",
                cache.documents as u64,
            ),
        ] {
            let _ = writeln!(
                text,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// `GET /healthz`
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}
