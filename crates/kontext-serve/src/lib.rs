//! The serving layer: assembled entity context for AI applications, over HTTP (and MCP).
//!
//! - `GET /v1/context/{entity_type}/{entity_id}`: the entity's assembled context, as JSON or as
//!   markdown within a token budget (`?format=markdown&max_tokens=N`)
//! - `POST /v1/context:batchGet`: many entities' contexts, one result (or error) each
//! - `GET /v1/entities/{entity_type}?limit=N&after=ID`: entity ids, paged
//! - `GET /v1/lag`: the store's consumer lag per partition, and the processor's
//! - `GET /healthz`: liveness
//! - `GET /metrics`: pipeline counters in the Prometheus text format
//! - `POST|GET|DELETE /v1/admin/stores/{store}/rebuild`: rebuild a store from the log,
//!   blue/green, while it serves (see [`admin`])
//!
//! Errors are JSON `{"error": {"code": ..., "message": ...}}` with a stable code.
//!
//! Files: `context.rs` (context and entity lookups, shared by HTTP and MCP), `render/`
//! (markdown for prompts), `mcp/` (the MCP server), `ops.rs` (lag, metrics, health),
//! `error.rs`.

pub mod admin;
pub mod context;
mod doc_cache;
mod error;
pub mod json_cache;
pub mod markdown_cache;
pub mod mcp;
mod ops;
pub mod render;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use kontext_core::config::RenderConfig;
use kontext_log::Log;
use kontext_store::ContextStore;
use kontext_stream::PipelineMetrics;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use context::{
    assemble_context, fetch_context, ContextBody, ContextFormat, ContextQuery, ContextReply,
};
pub use error::ApiError;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The store the API serves from (embedded or PostgreSQL).
    pub store: Arc<dyn ContextStore>,
    pub entity_types: Arc<BTreeSet<String>>,
    pub metrics: Arc<PipelineMetrics>,
    /// The sink metrics of the pipeline's other stores, by store name: `/metrics` shows them
    /// labelled `store="<name>"`.
    pub store_metrics: Arc<Vec<(String, Arc<PipelineMetrics>)>>,
    /// Where `/v1/lag` reads high watermarks; `None` disables the endpoint.
    pub lag: Option<LagSource>,
    /// Markdown rendering: section priority and default tokenizer (`serve.render`).
    pub render: Arc<RenderConfig>,
    /// What the MCP tool `describe_entity_types` says about each entity type (key, topic,
    /// fields per source); `None` describes only names and relations, from the store schema.
    pub entity_descriptions: Option<Arc<mcp::EntityCatalog>>,
    /// Runs store rebuilds; `None` answers the admin endpoints with 404.
    pub admin: Option<Arc<dyn admin::Admin>>,
    /// `Host` names `/mcp` accepts besides loopback ones (`serve.mcp.allowed_hosts`).
    pub mcp_allowed_hosts: Arc<Vec<String>>,
    /// Serialized documents of `GET /v1/context` (JSON), reused while the store hands out the
    /// same document.
    pub json_cache: Arc<json_cache::JsonCache>,
    /// Markdown renderings of `GET /v1/context`, batch lookups and MCP, reused while the store
    /// hands out the same document and its staleness label reads the same.
    pub markdown_cache: Arc<markdown_cache::MarkdownCache>,
}

impl AppState {
    /// State for a store and the entity types of its pipeline; lag reporting off.
    pub fn new(
        store: Arc<dyn ContextStore>,
        entity_types: BTreeSet<String>,
        metrics: Arc<PipelineMetrics>,
    ) -> Self {
        Self {
            store,
            entity_types: Arc::new(entity_types),
            metrics,
            store_metrics: Arc::default(),
            lag: None,
            render: Arc::new(RenderConfig::default()),
            entity_descriptions: None,
            admin: None,
            mcp_allowed_hosts: Arc::new(Vec::new()),
            json_cache: Arc::default(),
            markdown_cache: Arc::default(),
        }
    }

    /// Renders markdown with the pipeline's `serve.render` settings instead of the defaults.
    pub fn with_render(mut self, render: RenderConfig) -> Self {
        self.render = Arc::new(render);
        // Kept renderings follow the settings they were made with (the section priority is
        // not in their key): a state with other settings starts with none.
        self.markdown_cache = Arc::default();
        self
    }

    /// Turns on `/v1/lag` for the store's consumer group.
    pub fn with_lag(mut self, lag: LagSource) -> Self {
        self.lag = Some(lag);
        self
    }

    /// Adds the sink metrics of the pipeline's other stores to `/metrics`, by store name.
    pub fn with_store_metrics(mut self, stores: Vec<(String, Arc<PipelineMetrics>)>) -> Self {
        self.store_metrics = Arc::new(stores);
        self
    }

    /// Lets remote MCP clients reach `/mcp` under these `Host` names (see
    /// [`kontext_core::config::McpConfig`]).
    pub fn with_mcp_allowed_hosts(mut self, hosts: Vec<String>) -> Self {
        self.mcp_allowed_hosts = Arc::new(hosts);
        self
    }

    /// Turns on the admin endpoints (store rebuilds).
    pub fn with_admin(mut self, admin: Arc<dyn admin::Admin>) -> Self {
        self.admin = Some(admin);
        self
    }

    /// Lets MCP clients learn the pipeline's entity types in full (see [`mcp::EntityCatalog`]).
    pub fn with_entity_descriptions(mut self, catalog: mcp::EntityCatalog) -> Self {
        self.entity_descriptions = Some(Arc::new(catalog));
        self
    }
}

/// What `/v1/lag` reports on: the store sink's group and topics, and the consumer groups
/// upstream of it.
#[derive(Clone)]
pub struct LagSource {
    pub log: Arc<dyn Log>,
    /// The store sink's consumer group, and the topics it consumes.
    pub group: String,
    pub topics: Vec<String>,
    /// Consumer groups whose outputs reach the store through `topics` (the processor's), each
    /// with the topics it consumes: their lag is the group's committed offsets against the
    /// high watermarks, as `kafka-consumer-groups --describe` shows it.
    pub upstream: Vec<(String, Vec<String>)>,
    /// The processor writes in Kafka transactions (`exactly_once`): its topics end with commit
    /// markers, offsets no consumer sees, so a small gap is counted in records read.
    pub transactional: bool,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/context/{entity_type}/{entity_id}",
            get(context::get_context),
        )
        // axum 0.8 captures only `{name}` segments: the `:` of Google-style custom methods is
        // literal (tested).
        .route("/v1/context:batchGet", post(context::batch_get))
        .route("/v1/entities/{entity_type}", get(context::list_entities))
        .route("/v1/lag", get(ops::lag))
        .route(
            "/v1/admin/stores/{store}/rebuild",
            post(admin::start_rebuild)
                .get(admin::rebuild_status)
                .delete(admin::cancel_rebuild),
        )
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .with_state(state.clone())
        .merge(mcp::router(state))
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
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

#[cfg(test)]
mod tests;
