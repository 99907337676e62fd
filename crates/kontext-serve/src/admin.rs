//! Administrative endpoints: rebuilding a store from the log while it serves.
//!
//! - `POST /v1/admin/stores/{store}/rebuild`: starts a blue/green rebuild (202, its status);
//!   409 `rebuild_running` if one is running already
//! - `GET /v1/admin/stores/{store}/rebuild`: the latest rebuild's status and progress
//! - `DELETE /v1/admin/stores/{store}/rebuild`: interrupts a running rebuild; the current
//!   version is untouched
//!
//! The work is done by whoever runs the pipeline (the `kontext` binary), behind [`Admin`].

use axum::extract::State;
pub use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::error::ApiPath;
use crate::{ApiError, AppState};

/// What a rebuild is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebuildState {
    /// Replaying the log into the new version; the current version serves.
    Running,
    /// The new version caught up and became current.
    Switched,
    /// Interrupted on request; the current version was left as it was.
    Cancelled,
    /// Stopped by an error; the current version was left as it was.
    Failed,
}

/// Status and progress of a store's latest rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildStatus {
    pub store: String,
    pub state: RebuildState,
    /// The version serving now.
    pub current_version: u64,
    /// The version being built (current once switched).
    pub target_version: u64,
    /// Log records the new version has consumed, summed over partitions.
    pub applied: i64,
    /// Records in the log (high watermarks, summed) when last sampled.
    pub total: i64,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// Why the rebuild failed.
    pub error: Option<String>,
    /// What the new version will lack, found when it started: history the log no longer holds
    /// (records removed by retention, topics compacted to their newest record per key). Also
    /// a switch that could not record itself: the new version serves until a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Set when the switch could not record itself: the version a restart serves (the new
    /// one serves until then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_version: Option<u64>,
}

/// Runs rebuilds for the API.
pub trait Admin: Send + Sync + 'static {
    /// Starts rebuilding `store`; fails if it is unknown or a rebuild of it is running.
    fn start_rebuild(&self, store: &str) -> Result<RebuildStatus, ApiError>;
    /// The latest rebuild of `store`.
    fn rebuild_status(&self, store: &str) -> Result<RebuildStatus, ApiError>;
    /// Interrupts the running rebuild of `store`.
    fn cancel_rebuild(&self, store: &str) -> Result<RebuildStatus, ApiError>;
}

fn admin(state: &AppState) -> Result<&dyn Admin, ApiError> {
    state.admin.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "admin_unavailable",
            "this server does not run rebuilds",
        )
    })
}

pub(crate) async fn start_rebuild(
    State(state): State<AppState>,
    ApiPath(store): ApiPath<String>,
) -> Result<Response, ApiError> {
    let status = admin(&state)?.start_rebuild(&store)?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

pub(crate) async fn rebuild_status(
    State(state): State<AppState>,
    ApiPath(store): ApiPath<String>,
) -> Result<Json<RebuildStatus>, ApiError> {
    admin(&state)?.rebuild_status(&store).map(Json)
}

pub(crate) async fn cancel_rebuild(
    State(state): State<AppState>,
    ApiPath(store): ApiPath<String>,
) -> Result<Json<RebuildStatus>, ApiError> {
    admin(&state)?.cancel_rebuild(&store).map(Json)
}
