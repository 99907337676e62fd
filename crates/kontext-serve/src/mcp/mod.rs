//! The MCP server (being written): tools over streamable HTTP at `/mcp`, and over stdio.

use axum::Router;

use crate::AppState;

/// Routes of the MCP endpoint, merged into the API's router.
pub fn router(_state: AppState) -> Router {
    Router::new()
}
