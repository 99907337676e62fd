//! MCP over streamable HTTP at `/mcp`, on the HTTP API's listener.

use std::sync::Arc;

use axum::Router;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use super::KontextMcp;
use crate::AppState;

/// The path MCP clients connect to.
pub const MCP_PATH: &str = "/mcp";

/// The `/mcp` route, merged into the API's router.
///
/// Stateless, with plain JSON responses: every tool is a read that answers at once, so there
/// is nothing to stream and no session worth keeping. That keeps no per-client state in the
/// server, lets graceful shutdown finish without waiting on idle event streams, and works
/// behind a load balancer. `Host` must be a loopback name or one of
/// `serve.mcp.allowed_hosts` (rmcp's guard against DNS rebinding by web pages).
pub fn router(state: AppState) -> Router {
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(String::from)
        .collect();
    hosts.extend(state.mcp_allowed_hosts.iter().cloned());
    // The tool router (names, descriptions, schemas) is built once; each request clones it.
    let server = KontextMcp::new(state);
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None);
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    Router::new().route_service(MCP_PATH, service)
}
