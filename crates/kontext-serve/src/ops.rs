//! Operational endpoints: lag, metrics, health.

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use kontext_log::MARKER_GAP;
use kontext_stream::PipelineMetrics;
use serde_json::json;

use crate::{ApiError, AppState, LagSource};

/// `GET /v1/lag`: how far the store is behind the log. Per partition of the store's topics,
/// the records from the next offset the store will apply to the high watermark (the store's
/// own offsets are the truth, not the group's commits); per partition of each upstream group
/// (the processor's), from its committed offset ([`partition_lags`]). `total_lag` sums both, so 0
/// means the store holds everything the log implies now, feature and join outputs included.
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
    // Upstream first: outputs of what a group committed are in the log before the commit, so
    // the store's high watermarks, read after, include them.
    let mut upstream = Vec::new();
    let mut total: i64 = 0;
    for (group, topics) in &source.upstream {
        let mut committed = BTreeMap::new();
        for topic in topics {
            let offsets = source
                .log
                .committed_offsets(group, topic)
                .await
                .map_err(log_unavailable)?;
            for (partition, next) in offsets {
                committed.insert((topic.clone(), partition), next.unwrap_or(0));
            }
        }
        let (lag, partitions) = partition_lags(source, topics, &committed, "committed").await?;
        total += lag;
        upstream.push(json!({"group": group, "lag": lag, "partitions": partitions}));
    }
    let applied = state
        .store
        .applied_offsets()
        .await
        .map_err(ApiError::store)?;
    let (store_lag, partitions) =
        partition_lags(source, &source.topics, &applied, "applied").await?;
    total += store_lag;
    Ok(Json(json!({
        "group": source.group,
        "total_lag": total,
        "store_lag": store_lag,
        "partitions": partitions,
        "upstream": upstream,
    })))
}

/// Per partition of `topics`: its high watermark, the next offset `next` names (`field`; none
/// or below the low watermark: the low watermark) and the difference (the records between
/// them: with [`LagSource::transactional`], a gap of at most [`MARKER_GAP`] offsets is read,
/// one read per such partition and call); and their sum.
async fn partition_lags(
    source: &LagSource,
    topics: &[String],
    next: &BTreeMap<(String, i32), i64>,
    field: &str,
) -> Result<(i64, Vec<serde_json::Value>), ApiError> {
    let mut partitions = Vec::new();
    let mut total: i64 = 0;
    for topic in topics {
        let description = source
            .log
            .describe_topic(topic)
            .await
            .map_err(log_unavailable)?;
        for p in description.partitions {
            let at = next
                .get(&(topic.clone(), p.partition))
                .copied()
                .unwrap_or(0)
                .max(p.low_watermark);
            let mut lag = (p.high_watermark - at).max(0);
            if source.transactional && lag > 0 && lag <= MARKER_GAP {
                // A topic written in Kafka transactions (`exactly_once`) ends with a commit
                // marker, and aborted records are never delivered: offsets a consumer never
                // sees. Count the records still to read instead (a failed read keeps the
                // offsets' difference).
                if let Ok(records) = source
                    .log
                    .read_partition(topic, p.partition, at, p.high_watermark)
                    .await
                {
                    lag = records.len() as i64;
                }
            }
            total += lag;
            partitions.push(json!({"topic": topic, "partition": p.partition, "high_watermark": p.high_watermark, field: at, "lag": lag}));
        }
    }
    Ok((total, partitions))
}

fn log_unavailable(e: kontext_log::LogError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "log_unavailable",
        e.to_string(),
    )
}

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let others: Vec<(&str, &PipelineMetrics)> = state
        .store_metrics
        .iter()
        .map(|(store, metrics)| (store.as_str(), metrics.as_ref()))
        .collect();
    let mut text = state.metrics.render_with(&others);
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
                "kontext_context_cache_entities_reused_total",
                "counter",
                "Parents and children of assembled documents reused from memory (unchanged since decoded).",
                cache.entities_reused,
            ),
            (
                "kontext_context_cache_parts_reused_total",
                "counter",
                "Entity records, parents, related lists and children of changed documents kept as they were (nothing changed them).",
                cache.parts_reused,
            ),
            (
                "kontext_context_cache_entities_decoded_total",
                "counter",
                "Parents and children of assembled documents decoded from the store.",
                cache.entities_decoded,
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
    let (hits, misses) = state.markdown_cache.stats();
    for (name, help, value) in [
        (
            "kontext_markdown_cache_hits_total",
            "Markdown fetches of whole documents served a rendering kept with the document.",
            hits,
        ),
        (
            "kontext_markdown_cache_misses_total",
            "Markdown fetches of whole documents that rendered it (to the budget, counting tokens).",
            misses,
        ),
    ] {
        let _ = writeln!(
            text,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// `GET /healthz`
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}
