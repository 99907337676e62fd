//! Entity context: the one place that turns a request for an entity's context into a
//! response body, shared by the HTTP handlers and the MCP tools.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kontext_core::config::{RenderSection, Tokenizer};
use kontext_core::envelope::now_ms;
use kontext_store::ContextDocument;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::ApiPath;
use crate::render::{render_markdown, ProvenanceDetail, RenderError, RenderOptions};
use crate::{ApiError, AppState};

/// What a caller asks of one entity's context (from a query string or MCP tool arguments).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ContextQuery {
    /// `json` (default) or `markdown`.
    #[serde(default)]
    pub format: ContextFormat,
    /// Token budget of a markdown rendering, header included: 1 to [`MAX_TOKENS`].
    pub max_tokens: Option<usize>,
    /// Canonical fields to keep (the entity's own; related entities keep theirs). Names the
    /// entity does not have are simply absent from the answer: fields are filled by sources over
    /// time, so a name missing today is not a caller's mistake. `None` keeps every field.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// The tokenizer `max_tokens` counts with; `None`: the pipeline's `serve.render.tokenizer`.
    #[serde(default)]
    pub tokenizer: Option<Tokenizer>,
    /// Provenance in markdown: `compact` (source, event time) or `full` (with log coordinates).
    #[serde(default)]
    pub provenance: ProvenanceDetail,
}

/// Largest `max_tokens`: beyond any model's context window, so a bigger number is a mistake.
pub const MAX_TOKENS: usize = 1_000_000;

/// Largest number of lookups in one `POST /v1/context:batchGet`.
pub const MAX_BATCH: usize = 100;

/// Response formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextFormat {
    #[default]
    Json,
    Markdown,
}

/// A context response body.
#[derive(Debug, Clone, PartialEq)]
pub enum ContextBody {
    /// The document, serialized where it is sent (straight into the response body over HTTP).
    Json(Box<ContextResponse>),
    Markdown(String),
}

/// A context response body and, for markdown, what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextReply {
    pub body: ContextBody,
    /// Tokens of a markdown body, with `tokenizer`.
    pub tokens: Option<usize>,
    pub tokenizer: Tokenizer,
}

/// The context document plus how fresh it is.
///
/// Serialized directly (no `serde_json::Value` in between); its keys come out sorted, as they
/// always did: the document's fields are declared in key order and `staleness_ms` sorts last.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContextResponse {
    #[serde(flatten)]
    pub document: Arc<ContextDocument>,
    /// Now minus the newest applied event's time.
    pub staleness_ms: i64,
}

/// Looks up and shapes one entity's context.
pub async fn fetch_context(
    state: &AppState,
    entity_type: &str,
    entity_id: &str,
    query: &ContextQuery,
) -> Result<ContextBody, ApiError> {
    assemble_context(state, entity_type, entity_id, query)
        .await
        .map(|r| r.body)
}

/// [`fetch_context`], with the token count of a markdown rendering.
pub async fn assemble_context(
    state: &AppState,
    entity_type: &str,
    entity_id: &str,
    query: &ContextQuery,
) -> Result<ContextReply, ApiError> {
    check_type(state, entity_type)?;
    check_query(query)?;
    // The embedded store's point reads take microseconds and never wait for the writer
    // (redb's MVCC), so they run on the async worker instead of paying a thread hop.
    let mut document = state
        .store
        .context(entity_type, entity_id)
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "entity_not_found",
                format!("no {entity_type} with id {entity_id:?} in the context store"),
            )
        })?;
    if let Some(fields) = &query.fields {
        let keep: BTreeSet<&str> = fields.iter().map(String::as_str).collect();
        let document = Arc::make_mut(&mut document);
        document.fields.retain(|k, _| keep.contains(k.as_str()));
        document.provenance.retain(|k, _| keep.contains(k.as_str()));
    }
    let now = now_ms();
    let tokenizer = query.tokenizer.unwrap_or(state.render.tokenizer);
    match query.format {
        ContextFormat::Json => {
            let staleness_ms = now - document.as_of_ms;
            Ok(ContextReply {
                body: ContextBody::Json(Box::new(ContextResponse {
                    document,
                    staleness_ms,
                })),
                tokens: None,
                tokenizer,
            })
        }
        ContextFormat::Markdown => {
            let options = RenderOptions {
                max_tokens: query.max_tokens,
                tokenizer,
                // Validated when the pipeline file was loaded.
                priority: state
                    .render
                    .priority
                    .iter()
                    .filter_map(|s| RenderSection::parse(s))
                    .collect(),
                provenance: query.provenance,
                now_ms: Some(now),
            };
            // A document trimmed to `fields` is this request's own copy: rendered, not kept.
            let rendered = match query.fields {
                None => state
                    .markdown_cache
                    .render(entity_type, entity_id, &document, &options),
                Some(_) => render_markdown(&document, &options).map(Arc::new),
            };
            let rendered = rendered.map_err(|e| match e {
                RenderError::BudgetTooSmall { .. } => ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "max_tokens_too_small",
                    format!("{entity_type} {entity_id:?}: {e}"),
                ),
            })?;
            Ok(ContextReply {
                body: ContextBody::Markdown(rendered.text.clone()),
                tokens: Some(rendered.tokens),
                tokenizer,
            })
        }
    }
}

/// Rejects queries that cannot be answered whatever the entity.
fn check_query(query: &ContextQuery) -> Result<(), ApiError> {
    if let Some(n) = query.max_tokens {
        if n == 0 || n > MAX_TOKENS {
            return Err(invalid_max_tokens(&n.to_string()));
        }
        if query.format != ContextFormat::Markdown {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_max_tokens",
                "max_tokens applies to format=markdown; JSON is never cut",
            ));
        }
    }
    if query.tokenizer.is_some() && query.format != ContextFormat::Markdown {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_tokenizer",
            "tokenizer applies to format=markdown, whose max_tokens it counts; JSON is not counted",
        ));
    }
    if query.fields.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_fields",
            "fields names no field: name canonical fields, e.g. given_name and email (fields=given_name,email in a query string)",
        ));
    }
    Ok(())
}

fn invalid_max_tokens(got: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_max_tokens",
        format!("max_tokens must be a whole number from 1 to {MAX_TOKENS}, got {got:?}"),
    )
}

/// Query-string parameters as sent, so bad values get this API's JSON errors rather than the
/// extractor's plain-text rejection.
#[derive(Debug, Default)]
pub(crate) struct RawContextParams {
    pub(crate) format: Option<String>,
    pub(crate) max_tokens: Option<String>,
    pub(crate) fields: Option<String>,
    pub(crate) tokenizer: Option<String>,
    pub(crate) provenance: Option<String>,
}

/// A parameter given as JSON (a batch's body, MCP tool arguments) as the query string would
/// carry it: a string as it is, anything else as its JSON text (`12.5`, `-1`, `true`), which
/// the parsers then reject with the parameter's own code.
pub(crate) fn param_text(value: Value) -> String {
    match value {
        Value::String(s) => s,
        // A whole number sent as a float (`60.0`, as some function-calling clients write
        // integers) is that number; `1.5` stays what it is, and is refused.
        Value::Number(n) if n.is_f64() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// A query string as its (name, value) pairs, in order. Extracting these never fails, so
/// every bad parameter is answered by the handler, in this API's JSON, rather than by the
/// extractor's plain-text rejection (a repeated name, a number that is not one).
pub(crate) type QueryPairs = Query<Vec<(String, String)>>;

/// Sets `slot` to `value`, or fails with `code` if the parameter was given already.
fn once(
    slot: &mut Option<String>,
    name: &str,
    value: String,
    code: &'static str,
) -> Result<(), ApiError> {
    if slot.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            code,
            format!("{name} is given more than once"),
        ));
    }
    *slot = Some(value);
    Ok(())
}

impl RawContextParams {
    /// The parameters of a query string. `fields` may repeat (`fields=a&fields=b`, as many
    /// clients send lists) and adds up; the others may not. Unknown names are ignored.
    fn from_pairs(pairs: Vec<(String, String)>) -> Result<Self, ApiError> {
        let mut raw = Self::default();
        for (name, value) in pairs {
            match name.as_str() {
                "format" => once(&mut raw.format, &name, value, "invalid_format")?,
                "max_tokens" => once(&mut raw.max_tokens, &name, value, "invalid_max_tokens")?,
                "tokenizer" => once(&mut raw.tokenizer, &name, value, "invalid_tokenizer")?,
                "provenance" => once(&mut raw.provenance, &name, value, "invalid_provenance")?,
                "fields" => match &mut raw.fields {
                    Some(fields) => {
                        fields.push(',');
                        fields.push_str(&value);
                    }
                    None => raw.fields = Some(value),
                },
                _ => {}
            }
        }
        Ok(raw)
    }

    pub(crate) fn parse(&self) -> Result<ContextQuery, ApiError> {
        let bad = |code, message: String| ApiError::new(StatusCode::BAD_REQUEST, code, message);
        let format = match self.format.as_deref() {
            None | Some("json") => ContextFormat::Json,
            Some("markdown") => ContextFormat::Markdown,
            Some(other) => {
                return Err(bad(
                    "invalid_format",
                    format!("unknown format {other:?}: use json or markdown"),
                ))
            }
        };
        let max_tokens = match self.max_tokens.as_deref() {
            None => None,
            Some(s) => Some(
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| invalid_max_tokens(s))?,
            ),
        };
        let tokenizer = match self.tokenizer.as_deref() {
            None => None,
            Some(s) => Some(Tokenizer::parse(s).ok_or_else(|| {
                bad(
                    "invalid_tokenizer",
                    format!("unknown tokenizer {s:?}: use cl100k or o200k"),
                )
            })?),
        };
        let provenance = match self.provenance.as_deref() {
            None | Some("compact") => ProvenanceDetail::Compact,
            Some("full") => ProvenanceDetail::Full,
            Some(other) => {
                return Err(bad(
                    "invalid_provenance",
                    format!("unknown provenance {other:?}: use compact or full"),
                ))
            }
        };
        let fields = self.fields.as_deref().map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(str::to_owned)
                .collect()
        });
        Ok(ContextQuery {
            format,
            max_tokens,
            fields,
            tokenizer,
            provenance,
        })
    }
}

/// `GET /v1/context/{entity_type}/{entity_id}?format=&max_tokens=&fields=&tokenizer=&provenance=`
pub(crate) async fn get_context(
    State(state): State<AppState>,
    ApiPath((entity_type, entity_id)): ApiPath<(String, String)>,
    Query(pairs): QueryPairs,
) -> Result<Response, ApiError> {
    let query = RawContextParams::from_pairs(pairs)?.parse()?;
    let reply = assemble_context(&state, &entity_type, &entity_id, &query).await?;
    Ok(match reply.body {
        // The whole document as the store shares it: its serialization can be reused.
        ContextBody::Json(response) if query.fields.is_none() => {
            let body = state
                .json_cache
                .response_body(
                    &entity_type,
                    &entity_id,
                    &response.document,
                    response.staleness_ms,
                )
                .map_err(internal)?;
            json_bytes(body)
        }
        ContextBody::Json(response) => json_response(&response)?,
        ContextBody::Markdown(text) => {
            let mut response = (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/markdown; charset=utf-8",
                )],
                text,
            )
                .into_response();
            if let Some(tokens) = reply.tokens {
                let headers = response.headers_mut();
                headers.insert("x-kontext-tokens", HeaderValue::from(tokens));
                headers.insert(
                    "x-kontext-tokenizer",
                    HeaderValue::from_static(reply.tokenizer.name()),
                );
            }
            response
        }
    })
}

/// A JSON response written straight from `body` into one buffer, with the header
/// [`axum::Json`] sets.
fn json_response(body: &impl Serialize) -> Result<Response, ApiError> {
    // Context documents are tens of KB: start big enough to skip the first few regrowths.
    let mut buf = Vec::with_capacity(16 * 1024);
    serde_json::to_writer(&mut buf, body).map_err(internal)?;
    Ok(json_bytes(buf))
}

fn json_bytes(body: Vec<u8>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn internal(e: serde_json::Error) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

/// The body of `POST /v1/context:batchGet`: lookups and the options they share.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    requests: Vec<BatchItem>,
    format: Option<String>,
    /// A number; anything else is reported as `invalid_max_tokens`, not as a parse error.
    max_tokens: Option<Value>,
    fields: Option<FieldList>,
    tokenizer: Option<String>,
    provenance: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem {
    entity_type: String,
    entity_id: String,
}

/// `["a", "b"]` or `"a,b"`, as in the query string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FieldList {
    List(Vec<String>),
    Csv(String),
}

/// `POST /v1/context:batchGet`: up to [`MAX_BATCH`] lookups; one result per request, in order,
/// each with its context or its own error, so a missing entity does not fail the batch.
pub(crate) async fn batch_get(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // axum's own rejection (a body over its 2 MiB limit: 413) is plain text; answer with the
    // API's JSON error instead.
    let body = body.map_err(|e| {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "request_too_large"
        } else {
            "invalid_request"
        };
        ApiError::new(e.status(), code, e.body_text())
    })?;
    let bad = |code, message: String| ApiError::new(StatusCode::BAD_REQUEST, code, message);
    let request: BatchRequest = serde_json::from_slice(&body).map_err(|e| {
        bad(
            "invalid_request",
            format!(
                "the body must be {{\"requests\": [{{\"entity_type\", \"entity_id\"}}], ...}}: {e}"
            ),
        )
    })?;
    if request.requests.len() > MAX_BATCH {
        return Err(bad(
            "batch_too_large",
            format!(
                "{} requests in one batch; at most {MAX_BATCH}: split it",
                request.requests.len()
            ),
        ));
    }
    let raw = RawContextParams {
        format: request.format,
        max_tokens: request.max_tokens.map(param_text),
        fields: request.fields.map(|f| match f {
            FieldList::List(v) => v.join(","),
            FieldList::Csv(s) => s,
        }),
        tokenizer: request.tokenizer,
        provenance: request.provenance,
    };
    let query = raw.parse()?;
    check_query(&query)?;
    let tokenizer = query.tokenizer.unwrap_or(state.render.tokenizer);
    let markdown = query.format == ContextFormat::Markdown;
    let mut results = Vec::with_capacity(request.requests.len());
    for item in &request.requests {
        results.push(batch_result(&state, item, &query).await);
    }
    json_response(&BatchResponse {
        results,
        tokenizer: markdown.then(|| tokenizer.name()),
    })
}

/// The answer of `POST /v1/context:batchGet`. As every body here, its keys are in sorted order
/// (fields declared so), as they were when it was built as a `serde_json::Value`.
#[derive(Serialize)]
struct BatchResponse<'a> {
    results: Vec<BatchResult<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokenizer: Option<&'static str>,
}

/// One lookup of a batch: the request's ids and its context, markdown or error.
#[derive(Serialize)]
struct BatchResult<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<Box<ContextResponse>>,
    entity_id: &'a str,
    entity_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<BatchError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    markdown: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<usize>,
}

#[derive(Serialize)]
struct BatchError {
    code: &'static str,
    message: String,
    status: u16,
}

async fn batch_result<'a>(
    state: &AppState,
    item: &'a BatchItem,
    query: &ContextQuery,
) -> BatchResult<'a> {
    let mut result = BatchResult {
        context: None,
        entity_id: &item.entity_id,
        entity_type: &item.entity_type,
        error: None,
        markdown: None,
        tokens: None,
    };
    match assemble_context(state, &item.entity_type, &item.entity_id, query).await {
        Ok(ContextReply {
            body: ContextBody::Json(context),
            ..
        }) => result.context = Some(context),
        Ok(ContextReply {
            body: ContextBody::Markdown(text),
            tokens,
            ..
        }) => {
            result.markdown = Some(text);
            result.tokens = tokens;
        }
        Err(e) => {
            result.error = Some(BatchError {
                code: e.code,
                message: e.message,
                status: e.status.as_u16(),
            })
        }
    }
    result
}

/// Paging of `GET /v1/entities/{entity_type}`.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    pub limit: Option<usize>,
    pub after: Option<String>,
}

/// Largest page of entity ids.
pub const MAX_LIST_LIMIT: usize = 1_000;

/// Entity ids of a type, paged: `{"entity_type", "ids", "next_after"}`.
pub async fn list_entity_ids(
    state: &AppState,
    entity_type: &str,
    params: &ListParams,
) -> Result<serde_json::Value, ApiError> {
    check_type(state, entity_type)?;
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            format!("limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}"),
        ));
    }
    let ids = state
        .store
        .list(entity_type, limit, params.after.as_deref())
        .await
        .map_err(ApiError::store)?;
    let next_after = if ids.len() == limit {
        ids.last().cloned()
    } else {
        None
    };
    Ok(json!({"entity_type": entity_type, "ids": ids, "next_after": next_after}))
}

impl ListParams {
    /// The paging parameters of a query string: `limit` a whole number (else
    /// `invalid_limit`, as an out-of-range one), each at most once.
    fn from_pairs(pairs: Vec<(String, String)>) -> Result<Self, ApiError> {
        let (mut limit, mut after) = (None, None);
        for (name, value) in pairs {
            match name.as_str() {
                "limit" => once(&mut limit, &name, value, "invalid_limit")?,
                "after" => once(&mut after, &name, value, "invalid_after")?,
                _ => {}
            }
        }
        let limit = limit.as_deref().map(parse_limit).transpose()?;
        Ok(Self { limit, after })
    }
}

/// A page size as sent; its range is checked where it is used ([`list_entity_ids`]).
pub(crate) fn parse_limit(s: &str) -> Result<usize, ApiError> {
    s.trim().parse::<usize>().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            format!("limit must be a whole number from 1 to {MAX_LIST_LIMIT}, got {s:?}"),
        )
    })
}

/// `GET /v1/entities/{entity_type}?limit=N&after=ID`
pub(crate) async fn list_entities(
    State(state): State<AppState>,
    ApiPath(entity_type): ApiPath<String>,
    Query(pairs): QueryPairs,
) -> Result<Json<serde_json::Value>, ApiError> {
    let params = ListParams::from_pairs(pairs)?;
    list_entity_ids(&state, &entity_type, &params)
        .await
        .map(Json)
}

/// Rejects entity types the pipeline does not declare, naming the ones it does.
pub fn check_type(state: &AppState, entity_type: &str) -> Result<(), ApiError> {
    if state.entity_types.contains(entity_type) {
        return Ok(());
    }
    let known: Vec<&str> = state.entity_types.iter().map(String::as_str).collect();
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_entity_type",
        format!(
            "unknown entity type {entity_type:?}; this pipeline has: {}",
            known.join(", ")
        ),
    ))
}
