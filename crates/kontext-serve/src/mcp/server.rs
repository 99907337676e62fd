//! The MCP tool handler: three read-only tools over the context store.

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::EntityCatalog;
use crate::context::{
    fetch_context, list_entity_ids, param_text, parse_limit, ListParams, RawContextParams,
};
use crate::{ApiError, AppState, ContextBody, ContextFormat, ContextQuery};
use kontext_core::config::Tokenizer;

/// What the server tells a client (and the model behind it) about itself at the handshake.
pub const INSTRUCTIONS: &str = "\
kontext serves fresh, assembled context about business entities (customers, orders, tickets, \
interactions ...), merged in real time from the source systems that know them (CRM, billing, \
shop, helpdesk, clickstream ...). Every field carries its provenance: the source system, event \
id, log position and event time it came from.
Start with describe_entity_types to learn the entity types, their id fields, relations and \
fields; list_entities pages through the ids of one type; get_entity_context returns one \
entity's context: its fields with provenance, the entities it belongs to, and its newest \
related entities (a customer's recent orders, tickets, interactions). Ask for \
format=markdown with max_tokens for a compact rendering that fits a prompt.
Failed calls return an error whose `code` is stable (entity_not_found, unknown_entity_type, \
invalid_limit, store_unavailable ...).";

/// How many ids `describe_entity_types` shows per type, so a model has something to ask for.
const EXAMPLE_IDS: usize = 3;

/// The kontext MCP server. Cheap to clone: the state is shared, the tool router is a table.
#[derive(Clone)]
pub struct KontextMcp {
    state: AppState,
    tool_router: ToolRouter<Self>,
}

/// Response formats a tool call may ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
// Inline, not a `$ref` into `$defs`: some tool-calling clients do not resolve references.
#[schemars(inline)]
pub enum ToolFormat {
    /// The whole context document as JSON, with provenance per field.
    #[default]
    Json,
    /// A compact markdown rendering for a prompt, within `max_tokens`.
    Markdown,
}

/// Arguments of `get_entity_context`. An argument the tool does not know is an error, not
/// ignored: a model that wrote `maxTokens` learns that no budget applied.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetEntityContextParams {
    /// The entity type, one of those describe_entity_types lists (e.g. "customer").
    pub entity_type: String,
    /// The entity's id as its source systems key it (e.g. "C-10042"); list_entities pages
    /// through them.
    pub entity_id: String,
    /// "json" (default): the full document, every field with its provenance. "markdown": a
    /// compact rendering for a prompt.
    #[serde(default)]
    pub format: Option<ToolFormat>,
    /// Token budget of the markdown rendering, header included: whole fields and related
    /// entities are left out, lowest priority first, until it fits; the header says what was.
    #[serde(default)]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_tokens: Option<usize>,
    /// Only these canonical fields of the entity (describe_entity_types lists them); names it
    /// does not have are simply absent. Default: every field.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// The tokenizer max_tokens counts with: "cl100k" (GPT-4) or "o200k" (GPT-4o and later).
    /// Only with format "markdown", as max_tokens. Default: the pipeline's setting.
    #[serde(default)]
    pub tokenizer: Option<ToolTokenizer>,
}

/// Tokenizers a token budget can be counted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[schemars(inline)]
pub enum ToolTokenizer {
    /// `cl100k_base` (GPT-4, GPT-3.5).
    #[serde(rename = "cl100k")]
    Cl100k,
    /// `o200k_base` (GPT-4o, GPT-4.1, o-series).
    #[serde(rename = "o200k")]
    O200k,
}

/// Arguments of `list_entities` (unknown ones are an error, as for `get_entity_context`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListEntitiesParams {
    /// The entity type, one of those describe_entity_types lists (e.g. "customer").
    pub entity_type: String,
    /// Page size, 1 to 1000 (default 100).
    #[serde(default)]
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<usize>,
    /// Return ids after this one: pass the previous page's `next_after` to continue.
    #[serde(default)]
    pub after: Option<String>,
}

#[tool_router(vis = "pub(crate)")]
impl KontextMcp {
    /// A server answering from `state`.
    pub fn new(state: AppState) -> Self {
        Self {
            state,
            tool_router: Self::tool_router(),
        }
    }

    /// `get_entity_context`: one entity's assembled context.
    #[tool(
        description = "Get the current, assembled context of one entity (e.g. a customer): its \
            canonical fields merged from every source system, each with provenance (source, \
            event id, topic/partition/offset, event time), the entities it belongs to, its \
            newest related entities (a customer's orders, tickets, interactions) with totals, \
            and how stale it is. format=markdown (optionally with max_tokens) returns a compact \
            text rendering for a prompt instead of JSON. Unknown ids fail with code \
            entity_not_found.",
        annotations(
            title = "Get entity context",
            read_only_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    pub async fn get_entity_context(
        &self,
        Parameters(params): Parameters<GetEntityContextParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let query = context_query(&params);
        Ok(
            match fetch_context(&self.state, &params.entity_type, &params.entity_id, &query).await {
                Ok(ContextBody::Json(document)) => match serde_json::to_value(&document) {
                    Ok(document) => CallToolResult::structured(document),
                    Err(e) => tool_error(ApiError::new(
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        e.to_string(),
                    )),
                },
                Ok(ContextBody::Markdown(text)) => {
                    CallToolResult::success(vec![ContentBlock::text(text)])
                }
                Err(e) => tool_error(e),
            },
        )
    }

    /// `list_entities`: a page of entity ids of one type.
    #[tool(
        description = "List the ids of the entities of one type in the context store, in id \
            order, one page at a time. Returns {entity_type, ids, next_after}; pass next_after \
            as `after` for the next page (null when there is none).",
        annotations(
            title = "List entities",
            read_only_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    pub async fn list_entities(
        &self,
        Parameters(params): Parameters<ListEntitiesParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let list = ListParams {
            limit: params.limit,
            after: params.after,
        };
        Ok(
            match list_entity_ids(&self.state, &params.entity_type, &list).await {
                Ok(page) => CallToolResult::structured(page),
                Err(e) => tool_error(e),
            },
        )
    }

    /// `describe_entity_types`: what the pipeline knows about.
    #[tool(
        description = "Describe the entity types this pipeline serves: for each, its id field \
            (key), log topic, relations (belongs_to: parents, with the field holding the \
            parent's id; has_many: children listed in its context), its canonical fields with \
            the source systems that fill them, and a few example ids. Call this first.",
        annotations(
            title = "Describe entity types",
            read_only_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    pub async fn describe_entity_types(&self) -> Result<CallToolResult, ErrorData> {
        Ok(match self.describe().await {
            Ok(description) => CallToolResult::structured(description),
            Err(e) => tool_error(e),
        })
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for KontextMcp {
    /// Checks the arguments as the HTTP API checks its parameters before the typed tool runs,
    /// so a bad one is a tool error with the API's code (`invalid_max_tokens`, ...) rather
    /// than rmcp's bare deserialization message; values the API accepts in other spellings
    /// (`o200k_base`, `"200"`) reach the tool in the one its arguments take.
    async fn call_tool(
        &self,
        mut request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let arguments = request.arguments.get_or_insert_with(JsonObject::new);
        if let Err(e) = check_arguments(&request.name, arguments) {
            return Ok(tool_error(e).into());
        }
        let call = ToolCallContext::new(self, request, context);
        self.tool_router.call(call).await
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new("kontext", env!("CARGO_PKG_VERSION"))
                    .with_title("kontext: real-time context for AI applications"),
            )
            .with_instructions(INSTRUCTIONS)
    }
}

impl KontextMcp {
    /// The catalog of entity types, with example ids read from the store now.
    async fn describe(&self) -> Result<Value, ApiError> {
        let fallback;
        let catalog = match &self.state.entity_descriptions {
            Some(catalog) => catalog.as_ref(),
            None => {
                fallback =
                    EntityCatalog::from_schema(&self.state.entity_types, self.state.store.schema());
                &fallback
            }
        };
        let mut value = serde_json::to_value(catalog).map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
            )
        })?;
        let types = value
            .get_mut("entity_types")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten();
        for description in types {
            let Some(entity_type) = description["entity_type"].as_str().map(str::to_string) else {
                continue;
            };
            let page = list_entity_ids(
                &self.state,
                &entity_type,
                &ListParams {
                    limit: Some(EXAMPLE_IDS),
                    after: None,
                },
            )
            .await?;
            description["example_ids"] = page["ids"].clone();
        }
        Ok(value)
    }
}

/// The HTTP API's query for these arguments.
// `..Default::default()`: ContextQuery grows options with serde defaults (provenance detail is
// one the tool leaves at its default); tools gain them by adding arguments here.
#[allow(clippy::needless_update)]
fn context_query(params: &GetEntityContextParams) -> ContextQuery {
    ContextQuery {
        format: match params.format.unwrap_or_default() {
            ToolFormat::Json => ContextFormat::Json,
            ToolFormat::Markdown => ContextFormat::Markdown,
        },
        max_tokens: params.max_tokens,
        fields: params.fields.clone(),
        tokenizer: params.tokenizer.map(|t| match t {
            ToolTokenizer::Cl100k => Tokenizer::Cl100k,
            ToolTokenizer::O200k => Tokenizer::O200k,
        }),
        ..ContextQuery::default()
    }
}

/// Validates and normalizes a tool's arguments with the HTTP API's parsers (see
/// [`KontextMcp::call_tool`]); tools not named here take their arguments as they are.
fn check_arguments(tool: &str, arguments: &mut JsonObject) -> Result<(), ApiError> {
    let text = |name: &str| {
        arguments
            .get(name)
            .filter(|v| !v.is_null())
            .cloned()
            .map(param_text)
    };
    match tool {
        "get_entity_context" => {
            // `fields` as the HTTP API takes it: a list (or one comma-separated string), each
            // name trimmed, none empty.
            let fields = match arguments.get("fields") {
                Some(Value::Array(names)) if names.iter().all(Value::is_string) => Some(
                    names
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                Some(Value::String(names)) => Some(names.clone()),
                _ => None, // absent, or of a type the schema check below refuses
            };
            let raw = RawContextParams {
                format: text("format"),
                max_tokens: text("max_tokens"),
                tokenizer: text("tokenizer"),
                fields,
                ..RawContextParams::default()
            };
            let query = raw.parse()?;
            if let Some(names) = &query.fields {
                arguments.insert("fields".into(), names.clone().into());
            }
            if raw.format.is_some() {
                let format = match query.format {
                    ContextFormat::Json => "json",
                    ContextFormat::Markdown => "markdown",
                };
                arguments.insert("format".into(), format.into());
            }
            if let Some(n) = query.max_tokens {
                arguments.insert("max_tokens".into(), n.into());
            }
            if let Some(t) = query.tokenizer {
                arguments.insert("tokenizer".into(), t.name().into());
            }
            typed::<GetEntityContextParams>(arguments)
        }
        "list_entities" => {
            if let Some(limit) = text("limit") {
                let limit = parse_limit(&limit)?;
                arguments.insert("limit".into(), limit.into());
            }
            typed::<ListEntitiesParams>(arguments)
        }
        "describe_entity_types" => match arguments.keys().next() {
            None => Ok(()),
            Some(name) => Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("describe_entity_types takes no arguments, got {name:?}"),
            )),
        },
        _ => Ok(()),
    }
}

/// What is left to reject (a missing `entity_id`, `fields` that are not strings) as the API
/// rejects a malformed request.
fn typed<T: DeserializeOwned>(arguments: &JsonObject) -> Result<(), ApiError> {
    serde_json::from_value::<T>(Value::Object(arguments.clone()))
        .map(drop)
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("the arguments do not match the tool's input schema: {e}"),
            )
        })
}

/// A failed call as the model sees it: the HTTP API's error body, `{"error": {"code",
/// "message"}}`, as structured content and text. A tool error rather than a protocol error, so
/// clients show the message to the model instead of hiding it.
fn tool_error(e: ApiError) -> CallToolResult {
    CallToolResult::structured_error(json!({"error": {"code": e.code, "message": e.message}}))
}

#[cfg(test)]
impl KontextMcp {
    pub(crate) fn state_for_tests(&self) -> AppState {
        self.state.clone()
    }
}
