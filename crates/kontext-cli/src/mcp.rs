//! `--mcp-stdio`: speak MCP on stdin/stdout in the process that runs the pipeline.
//!
//! The embedded log and store are single-process files, so an MCP client cannot start a second
//! `kontext` next to a running pipeline; it launches the pipeline itself with this flag. Stdout
//! then belongs to MCP: logs already go to stderr, and so does everything the commands would
//! otherwise print.

use kontext_serve::AppState;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Serves MCP on stdio next to the pipeline. The client closing stdin is how MCP clients stop
/// a server, so it stops the whole process cleanly (it cancels `shutdown`); a shutdown from a
/// signal ends the MCP session too.
pub fn spawn_stdio(state: AppState, shutdown: CancellationToken) -> JoinHandle<()> {
    info!("serving MCP on stdin/stdout");
    tokio::spawn(async move {
        if let Err(e) = kontext_serve::mcp::serve_stdio(state, shutdown.clone()).await {
            warn!(error = %e, "MCP on stdio stopped");
        }
        shutdown.cancel();
    })
}

/// Prints a message for the person at the terminal: on stdout, or on stderr when stdout
/// carries MCP.
pub fn say(mcp_stdio: bool, text: &str) {
    if mcp_stdio {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
}
