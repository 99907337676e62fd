//! The MCP server: the context API as Model Context Protocol tools, for AI assistants and
//! agents.
//!
//! Tools: `get_entity_context`, `list_entities`, `describe_entity_types`. They call the same
//! functions as the HTTP API (`crate::context`), so both answer alike, errors included (a
//! failed tool call carries the HTTP API's stable error code and message).
//!
//! Transports: streamable HTTP at `/mcp` on the API's port ([`router`]), and stdio
//! ([`serve_stdio`]) for clients that launch the server as a child process.
//!
//! Files: `server.rs` (the tool handler), `describe.rs` (what `describe_entity_types` says),
//! `http.rs`, `stdio.rs`, `tests.rs`.

mod describe;
mod http;
mod server;
mod stdio;

pub use describe::{EntityCatalog, EntityTypeDescription, Relation};
pub use http::router;
pub use server::{
    GetEntityContextParams, KontextMcp, ListEntitiesParams, ToolFormat, ToolTokenizer, INSTRUCTIONS,
};
pub use stdio::{serve_stdio, StdioError};

#[cfg(test)]
mod tests;
