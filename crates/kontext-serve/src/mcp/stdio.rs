//! MCP over stdin/stdout, in the process that runs the pipeline.

use rmcp::service::ServerInitializeError;
use rmcp::ServiceExt;
use tokio_util::sync::CancellationToken;

use super::KontextMcp;
use crate::AppState;

/// Why the stdio server stopped early.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The client closed the connection or spoke something other than MCP before the
    /// handshake completed. Not retried: the client owns the pipes.
    #[error("MCP handshake on stdio failed: {0}")]
    Handshake(Box<ServerInitializeError>),
    /// The server task panicked.
    #[error("MCP stdio server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Serves MCP on stdin/stdout until the client closes stdin or `shutdown` is cancelled.
///
/// Stdout then carries only MCP messages: the caller must write nothing else there (logs go to
/// stderr).
pub async fn serve_stdio(state: AppState, shutdown: CancellationToken) -> Result<(), StdioError> {
    // Pipes (how MCP clients launch servers) are read without blocking, so a shutdown does
    // not wait for a blocked read of stdin; a terminal falls back to blocking stdio.
    let transport = rmcp::transport::io::stdio_pipes();
    let running = KontextMcp::new(state)
        .serve_with_ct(transport, shutdown.child_token())
        .await
        .map_err(|e| StdioError::Handshake(Box::new(e)))?;
    let reason = running.waiting().await?;
    tracing::info!(?reason, "MCP stdio session ended");
    Ok(())
}
