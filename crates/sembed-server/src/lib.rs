//! `sembed serve`: embeddings over HTTP for OpenAI and text-embeddings-inference (TEI) clients.
//!
//! Routes: `POST /v1/embeddings` (OpenAI), `POST /embed` (TEI), `POST /tokenize`, `GET /health`,
//! `GET /info`, `GET /metrics` (Prometheus). Requests are validated and tokenised off the async
//! runtime, then queued per model and batched under a token budget on the model's own thread
//! ([`batcher`]). Every error is a 4xx/5xx with a JSON body saying what is wrong.

pub mod batcher;
pub mod metrics;
pub mod openapi;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use batcher::{Batcher, Job};
use metrics::Metrics;
use sembed::embed::{Embed, EmbedOptions, InputRole};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A model to serve under a name.
pub struct ServedModel {
    pub name: String,
    pub model: Arc<dyn Embed>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Token budget of one forward batch.
    pub max_batch_tokens: usize,
    /// Texts that may wait in a model's queue; beyond that requests get 429 at once.
    pub max_queue_texts: usize,
    /// Inputs per request.
    pub max_client_batch_size: usize,
    /// Request body bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Bearer key required on every route but /health.
    pub api_key: Option<String>,
    /// Cut over-long inputs instead of refusing them (TEI's `--auto-truncate`); a TEI request's
    /// `truncate` field overrides it.
    pub auto_truncate: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_batch_tokens: 16384,
            max_queue_texts: 4096,
            max_client_batch_size: 512,
            max_body_bytes: 2 * 1024 * 1024,
            api_key: None,
            auto_truncate: false,
        }
    }
}

struct Entry {
    name: String,
    model: Arc<dyn Embed>,
    batcher: Arc<Batcher>,
}

/// A code index to answer `POST /search` from, with the name of the served model that made it.
pub struct ServedIndex {
    pub store: Box<dyn sembed_index::store::Store>,
    /// A served model's name: queries are embedded by it (its batcher, its query prompt).
    pub model: String,
    /// The index's location, for /info.
    pub target: String,
}

struct IndexState {
    store: std::sync::Mutex<Box<dyn sembed_index::store::Store>>,
    model: usize,
    target: String,
}

pub struct AppState {
    models: Vec<Entry>,
    index: Option<IndexState>,
    config: ServerConfig,
    metrics: Arc<Metrics>,
    healthy: AtomicBool,
    /// Unix seconds when the server loaded its models (OpenAI's `created` of every model).
    created: u64,
}

impl AppState {
    /// Pause or resume every model's worker (see [`Batcher::set_paused`]).
    pub fn set_paused(&self, paused: bool) {
        for m in &self.models {
            m.batcher.set_paused(paused);
        }
    }

    /// Let the workers finish what is queued and stop.
    pub fn shutdown(&self) {
        self.healthy.store(false, Ordering::SeqCst);
        for m in &self.models {
            m.batcher.shutdown();
        }
    }
}

/// Build the app: start one worker per model, run a warm-up pass on each (an error here means the
/// server must not start), then report healthy. Blocking; call before serving.
pub fn build(
    models: Vec<ServedModel>,
    config: ServerConfig,
) -> sembed::Result<(Router, Arc<AppState>)> {
    build_with_index(models, config, None)
}

/// [`build`], also answering `POST /search` from a code index.
pub fn build_with_index(
    models: Vec<ServedModel>,
    config: ServerConfig,
    index: Option<ServedIndex>,
) -> sembed::Result<(Router, Arc<AppState>)> {
    if models.is_empty() {
        return Err(sembed::Error::InvalidInput("no models to serve".into()));
    }
    let metrics = Arc::new(Metrics::new());
    let mut entries = Vec::new();
    for m in models {
        if entries.iter().any(|e: &Entry| e.name == m.name) {
            return Err(sembed::Error::InvalidInput(format!(
                "model name `{}` given twice",
                m.name
            )));
        }
        let t = Instant::now();
        m.model
            .embed(&["warm-up".to_string()], &EmbedOptions::default())?;
        tracing::info!(model = %m.name, dimension = m.model.dimension(), warmup_ms = t.elapsed().as_millis() as u64, "model ready");
        let batcher = Batcher::start(
            &m.name,
            m.model.clone(),
            config.max_queue_texts,
            config.max_batch_tokens,
            metrics.clone(),
        );
        entries.push(Entry {
            name: m.name,
            model: m.model,
            batcher,
        });
    }
    let index = match index {
        None => None,
        Some(ix) => {
            let model = entries
                .iter()
                .position(|e| e.name == ix.model)
                .ok_or_else(|| {
                    sembed::Error::InvalidInput(format!(
                        "the index's model `{}` is not served",
                        ix.model
                    ))
                })?;
            let mut store = ix.store;
            // A server answers many searches: the store may keep what they need in memory.
            store.answer_many();
            Some(IndexState {
                store: std::sync::Mutex::new(store),
                model,
                target: ix.target,
            })
        }
    };
    let has_index = index.is_some();
    let state = Arc::new(AppState {
        models: entries,
        index,
        config: config.clone(),
        metrics,
        healthy: AtomicBool::new(true),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let mut protected = Router::new();
    if has_index {
        protected = protected.route("/search", post(search_route));
    }
    let protected = protected
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/v1/models", get(openai_models))
        .route("/v1/models/{id}", get(openai_model))
        .route("/embed", post(tei_embed))
        .route("/tokenize", post(tokenize))
        .route("/info", get(info))
        .route("/metrics", get(metrics_route))
        .route("/openapi.json", get(openapi_json))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let router =
        Router::new()
            .route("/health", get(health))
            .merge(protected)
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(config.max_body_bytes))
            .layer(tower_http::trace::TraceLayer::new_for_http().on_response(
                tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO),
            ))
            .with_state(state.clone());
    Ok((router, state))
}

/// Serve until `shutdown` resolves, then finish in-flight requests and stop the workers.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    state.shutdown();
    result
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    OpenAi,
    Tei,
}

struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    flavor: Flavor,
}

impl ApiError {
    fn new(
        flavor: Flavor,
        status: StatusCode,
        kind: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            flavor,
        }
    }
    /// Invalid request content: 400 for OpenAI clients, 422 for TEI clients (as each upstream does).
    fn validation(flavor: Flavor, message: impl Into<String>) -> Self {
        let status = match flavor {
            Flavor::OpenAi => StatusCode::BAD_REQUEST,
            Flavor::Tei => StatusCode::UNPROCESSABLE_ENTITY,
        };
        Self::new(flavor, status, "validation", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.flavor {
            // OpenAI's error object: a message, a type (`invalid_request_error` for the client's
            // mistakes, `server_error` for ours), the parameter at fault (never singled out here)
            // and a machine-readable code.
            Flavor::OpenAi => {
                let kind = if self.status.is_server_error() {
                    "server_error"
                } else {
                    "invalid_request_error"
                };
                json!({"error": {"message": self.message, "type": kind, "param": null, "code": self.kind}})
            }
            Flavor::Tei => json!({"error": self.message, "error_type": self.kind}),
        };
        (self.status, Json(body)).into_response()
    }
}

/// The OpenAPI document, with `model` in every request body narrowed to the models this server
/// actually serves (so clients and fuzzers see the valid names).
async fn openapi_json(State(state): State<Arc<AppState>>) -> Json<Value> {
    use utoipa::OpenApi as _;
    let mut doc = serde_json::to_value(openapi::ApiDoc::openapi()).unwrap_or(Value::Null);
    if state.index.is_none() {
        if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
            paths.remove("/search");
        }
    }
    let names: Vec<&str> = state.models.iter().map(|m| m.name.as_str()).collect();
    for schema in [
        "OpenAiEmbeddingsRequest",
        "TeiEmbedRequest",
        "TokenizeRequest",
    ] {
        if let Some(model) =
            doc.pointer_mut(&format!("/components/schemas/{schema}/properties/model"))
        {
            *model = json!({
                "type": ["string", "null"],
                "enum": names.iter().map(|n| json!(n)).chain([Value::Null]).collect::<Vec<_>>(),
                "description": "a served model's name (default: the first)",
            });
        }
    }
    Json(doc)
}

/// The error flavour of a path: OpenAI's under `/v1/`, TEI's elsewhere.
fn flavor_of(uri: &axum::http::Uri) -> Flavor {
    if uri.path() == "/v1" || uri.path().starts_with("/v1/") {
        Flavor::OpenAi
    } else {
        Flavor::Tei
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        flavor_of(&uri),
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        flavor_of(&uri),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// One model as OpenAI's `GET /v1/models` lists it.
fn model_object(state: &AppState, name: &str) -> Value {
    json!({"id": name, "object": "model", "created": state.created, "owned_by": "sembed"})
}

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = openapi::ModelList),
    (status = 401, body = openapi::OpenAiError)))]
async fn openai_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|m| model_object(&state, &m.name))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[utoipa::path(get, path = "/v1/models/{id}", params(("id" = String, Path, description = "a served model's name")),
    responses((status = 200, body = openapi::ModelObject), (status = 401, body = openapi::OpenAiError),
        (status = 404, body = openapi::OpenAiError)))]
async fn openai_model(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.models.iter().find(|m| m.name == id) {
        Some(m) => Ok(Json(model_object(&state, &m.name))),
        None => Err(ApiError::new(
            Flavor::OpenAi,
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("the model `{id}` does not exist"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Auth

async fn auth(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = subtle::ConstantTimeEq::ct_eq(given.as_bytes(), key.as_bytes()).into();
        if !ok {
            state
                .metrics
                .requests
                .with_label_values(&["unauthorized"])
                .inc();
            let flavor = if request.uri().path().starts_with("/v1/") {
                Flavor::OpenAi
            } else {
                Flavor::Tei
            };
            return ApiError::new(
                flavor,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key (Authorization: Bearer KEY)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

// ---------------------------------------------------------------------------------------------
// Request parsing

fn parse_body(body: Result<Bytes, BytesRejection>, flavor: Flavor) -> Result<Value, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body too large".to_string()
        } else {
            r.body_text()
        };
        ApiError::new(
            flavor,
            status,
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "bad_request"
            },
            message,
        )
    })?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            flavor,
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("malformed JSON body: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::validation(
            flavor,
            "the body must be a JSON object",
        ));
    }
    Ok(value)
}

fn wrong_type(flavor: Flavor, field: &str, expected: &str) -> ApiError {
    ApiError::validation(flavor, format!("`{field}` must be {expected}"))
}

fn opt_str(v: &Value, field: &str, flavor: Flavor) -> Result<Option<String>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(wrong_type(flavor, field, "a string")),
    }
}

fn opt_bool(v: &Value, field: &str, flavor: Flavor) -> Result<Option<bool>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(wrong_type(flavor, field, "a boolean")),
    }
}

fn opt_usize(v: &Value, field: &str, flavor: Flavor) -> Result<Option<usize>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| Some(n as usize))
            .ok_or_else(|| wrong_type(flavor, field, "a positive integer")),
    }
}

/// `input` / `inputs`: a string or a non-empty array of non-empty strings, within the request limit.
fn texts(v: &Value, field: &str, flavor: Flavor, limit: usize) -> Result<Vec<String>, ApiError> {
    let texts: Vec<String> = match v.get(field) {
        None | Some(Value::Null) => {
            return Err(ApiError::validation(
                flavor,
                format!("`{field}` is required"),
            ))
        }
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                wrong_type(
                    flavor,
                    field,
                    "a string or an array of strings (token-id inputs are not supported)",
                )
            })?,
        Some(_) => return Err(wrong_type(flavor, field, "a string or an array of strings")),
    };
    if texts.is_empty() {
        return Err(ApiError::validation(
            flavor,
            format!("`{field}` is an empty list"),
        ));
    }
    if texts.len() > limit {
        return Err(ApiError::validation(
            flavor,
            format!(
                "{} inputs, more than the limit of {limit} per request",
                texts.len()
            ),
        ));
    }
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(ApiError::validation(
            flavor,
            format!("input {i} is an empty string"),
        ));
    }
    Ok(texts)
}

fn find_model<'a>(
    state: &'a AppState,
    name: Option<&str>,
    flavor: Flavor,
) -> Result<&'a Entry, ApiError> {
    match name {
        None => Ok(&state.models[0]),
        Some(n) => state.models.iter().find(|m| m.name == n).ok_or_else(|| {
            let names: Vec<&str> = state.models.iter().map(|m| m.name.as_str()).collect();
            ApiError::new(
                flavor,
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("unknown model `{n}`; served: {}", names.join(", ")),
            )
        }),
    }
}

struct Embedded {
    vectors: Vec<Vec<f32>>,
    tokens: usize,
}

/// Validate and count tokens off the runtime, queue, and wait for the batch.
async fn run_embed(
    state: &Arc<AppState>,
    entry: &Entry,
    texts: Vec<String>,
    opts: EmbedOptions,
    flavor: Flavor,
) -> Result<Embedded, ApiError> {
    let started = Instant::now();
    let model = entry.model.clone();
    // Tokenised once, here: the ids counted for usage and the token budget are the ids embedded.
    let encoded = {
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || model.encode(&texts, &opts))
            .await
            .map_err(|e| {
                ApiError::new(
                    flavor,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    e.to_string(),
                )
            })?
    };
    state
        .metrics
        .stage_seconds
        .with_label_values(&["tokenize"])
        .observe(started.elapsed().as_secs_f64());
    let encoded = encoded.map_err(|e| match e {
        sembed::Error::InvalidInput(m) | sembed::Error::Unsupported(m) => {
            ApiError::validation(flavor, m)
        }
        other => ApiError::new(
            flavor,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            other.to_string(),
        ),
    })?;
    let tokens: usize = encoded.token_counts().iter().sum();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job {
        encoded,
        tokens,
        dimensions: opts.dimensions,
        normalize: opts.normalize,
        reply: tx,
        enqueued: Instant::now(),
    };
    entry.batcher.submit(job).map_err(|_| {
        ApiError::new(
            flavor,
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            "the model's queue is full; retry later",
        )
    })?;
    let result = rx.await.map_err(|_| {
        ApiError::new(
            flavor,
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is shutting down",
        )
    })?;
    let vectors = result
        .map_err(|m| ApiError::new(flavor, StatusCode::INTERNAL_SERVER_ERROR, "internal", m))?;
    state
        .metrics
        .stage_seconds
        .with_label_values(&["total"])
        .observe(started.elapsed().as_secs_f64());
    Ok(Embedded { vectors, tokens })
}

fn count_outcome<T>(state: &AppState, r: &Result<T, ApiError>) {
    let outcome = match r {
        Ok(_) => "ok",
        Err(e) if e.status == StatusCode::TOO_MANY_REQUESTS => "overloaded",
        Err(e) if e.status.is_client_error() => "client_error",
        Err(_) => "server_error",
    };
    state.metrics.requests.with_label_values(&[outcome]).inc();
}

// ---------------------------------------------------------------------------------------------
// Routes

#[utoipa::path(post, path = "/v1/embeddings", request_body = openapi::OpenAiEmbeddingsRequest,
    responses((status = 200, body = openapi::OpenAiEmbeddingsResponse),
        (status = 400, body = openapi::OpenAiError), (status = 401, body = openapi::OpenAiError),
        (status = 404, body = openapi::OpenAiError), (status = 413, body = openapi::OpenAiError),
        (status = 429, body = openapi::OpenAiError), (status = 500, body = openapi::OpenAiError),
        (status = 503, body = openapi::OpenAiError)))]
async fn openai_embeddings(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = openai_inner(&state, body).await;
    count_outcome(&state, &r);
    r.into_response()
}

async fn openai_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<OpenAiResponse>, ApiError> {
    let f = Flavor::OpenAi;
    let v = parse_body(body, f)?;
    let input = texts(&v, "input", f, state.config.max_client_batch_size)?;
    let entry = find_model(state, opt_str(&v, "model", f)?.as_deref(), f)?;
    let base64 = match opt_str(&v, "encoding_format", f)?.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::validation(
                f,
                format!("encoding_format `{other}`: expected `float` or `base64`"),
            ))
        }
    };
    let role = match opt_str(&v, "input_type", f)? {
        None => None,
        Some(s) => Some(
            s.parse::<InputRole>()
                .map_err(|e| ApiError::validation(f, e.to_string()))?,
        ),
    };
    let opts = EmbedOptions {
        role,
        dimensions: opt_usize(&v, "dimensions", f)?,
        truncate: state.config.auto_truncate,
        ..Default::default()
    };
    let out = run_embed(state, entry, input, opts, f).await?;
    let data: Vec<OpenAiEmbedding> = out
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, e)| OpenAiEmbedding {
            object: "embedding",
            embedding: if base64 {
                let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Vector::Float(e)
            },
            index,
        })
        .collect();
    Ok(Json(OpenAiResponse {
        object: "list",
        data,
        model: entry.name.clone(),
        usage: Usage {
            prompt_tokens: out.tokens,
            total_tokens: out.tokens,
        },
    }))
}

// Typed responses: vectors serialise as f32 (shortest round-trip form), not widened to f64.
#[derive(serde::Serialize)]
struct OpenAiResponse {
    object: &'static str,
    data: Vec<OpenAiEmbedding>,
    model: String,
    usage: Usage,
}

#[derive(serde::Serialize)]
struct OpenAiEmbedding {
    object: &'static str,
    embedding: Vector,
    index: usize,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(serde::Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[utoipa::path(post, path = "/embed", request_body = openapi::TeiEmbedRequest,
    responses((status = 200, body = Vec<Vec<f32>>), (status = 400, body = openapi::TeiError),
        (status = 401, body = openapi::TeiError), (status = 404, body = openapi::TeiError),
        (status = 413, body = openapi::TeiError), (status = 422, body = openapi::TeiError),
        (status = 429, body = openapi::TeiError), (status = 500, body = openapi::TeiError),
        (status = 503, body = openapi::TeiError)))]
async fn tei_embed(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = tei_inner(&state, body).await;
    count_outcome(&state, &r);
    r.into_response()
}

fn tei_truncate_left(v: &Value, f: Flavor) -> Result<Option<bool>, ApiError> {
    match opt_str(v, "truncation_direction", f)?.as_deref() {
        None => Ok(None),
        Some("Right") | Some("right") => Ok(Some(false)),
        Some("Left") | Some("left") => Ok(Some(true)),
        Some(other) => Err(ApiError::validation(
            f,
            format!("truncation_direction `{other}`: expected `Right` or `Left`"),
        )),
    }
}

async fn tei_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<Vec<f32>>>, ApiError> {
    let f = Flavor::Tei;
    let v = parse_body(body, f)?;
    let inputs = texts(&v, "inputs", f, state.config.max_client_batch_size)?;
    let entry = find_model(state, opt_str(&v, "model", f)?.as_deref(), f)?;
    let opts = EmbedOptions {
        task: opt_str(&v, "prompt_name", f)?,
        dimensions: opt_usize(&v, "dimensions", f)?,
        normalize: opt_bool(&v, "normalize", f)?.unwrap_or(true),
        truncate: opt_bool(&v, "truncate", f)?.unwrap_or(state.config.auto_truncate),
        truncate_left: tei_truncate_left(&v, f)?,
        ..Default::default()
    };
    if let Some(t) = &opts.task {
        if !entry.model.knows_task(t) {
            return Err(ApiError::validation(
                f,
                format!(
                    "unknown prompt name `{t}`; known: {}",
                    entry.model.task_names().join(", ")
                ),
            ));
        }
    }
    let out = run_embed(state, entry, inputs, opts, f).await?;
    Ok(Json(out.vectors))
}

#[utoipa::path(post, path = "/search", request_body = openapi::SearchRequest,
    responses((status = 200, body = openapi::SearchResponse),
        (status = 400, body = openapi::TeiError), (status = 401, body = openapi::TeiError),
        (status = 413, body = openapi::TeiError), (status = 422, body = openapi::TeiError),
        (status = 429, body = openapi::TeiError), (status = 500, body = openapi::TeiError),
        (status = 503, body = openapi::TeiError)))]
async fn search_route(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = search_inner(&state, body).await;
    count_outcome(&state, &r);
    r.into_response()
}

/// Most hits one search may ask for.
const MAX_SEARCH_K: usize = 1000;

async fn search_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let f = Flavor::Tei;
    let v = parse_body(body, f)?;
    let query = match opt_str(&v, "query", f)? {
        Some(q) if !q.is_empty() => q,
        Some(_) => return Err(ApiError::validation(f, "`query` is an empty string")),
        None => return Err(ApiError::validation(f, "`query` is required")),
    };
    let k = opt_usize(&v, "k", f)?.unwrap_or(10);
    if k == 0 || k > MAX_SEARCH_K {
        return Err(ApiError::validation(
            f,
            format!("`k` {k}: between 1 and {MAX_SEARCH_K}"),
        ));
    }
    let filter = sembed_index::store::Filter::new(opt_str(&v, "lang", f)?, opt_str(&v, "path", f)?)
        .map_err(|e| ApiError::validation(f, e))?;
    let mode: sembed_index::search::Mode = match opt_str(&v, "mode", f)? {
        Some(m) => m.parse().map_err(|e: String| ApiError::validation(f, e))?,
        None => sembed_index::search::Mode::Hybrid,
    };
    let index = state
        .index
        .as_ref()
        .expect("the route exists only with an index");
    let entry = &state.models[index.model];
    let opts = EmbedOptions {
        role: Some(sembed::InputRole::Query),
        truncate: true,
        ..Default::default()
    };
    let started = Instant::now();
    // Hybrid: the lexical ranking needs no vector, so it runs while the query is embedded.
    let lexical = (mode == sembed_index::search::Mode::Hybrid).then(|| {
        let (st, text, filter) = (state.clone(), query.clone(), filter.clone());
        tokio::task::spawn_blocking(move || {
            let ix = st.index.as_ref().expect("checked");
            let mut store = ix.store.lock().unwrap_or_else(|p| p.into_inner());
            sembed_index::search::lexical_ranking(store.as_mut(), &text, k, &filter)
        })
    });
    let q = if mode == sembed_index::search::Mode::Lexical {
        None
    } else {
        let mut out = run_embed(state, entry, vec![query.clone()], opts, f).await?;
        Some(out.vectors.pop().unwrap_or_default())
    };
    // A blocking task that panicked or was cancelled.
    let lost = |e: tokio::task::JoinError| {
        ApiError::new(
            f,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )
    };
    let lexical = match lexical {
        Some(task) => Some(task.await.map_err(lost)?),
        None => None,
    };
    let st = state.clone();
    let text = query.clone();
    let searched = tokio::task::spawn_blocking(move || {
        let ix = st.index.as_ref().expect("checked");
        let mut store = ix.store.lock().unwrap_or_else(|p| p.into_inner());
        let lexical = lexical.transpose()?;
        sembed_index::search::ranked(
            store.as_mut(),
            &text,
            q.as_deref(),
            k,
            &filter,
            mode,
            lexical,
        )
    })
    .await
    .map_err(lost)?;
    let results = searched.map_err(|e| match e {
        sembed_index::Error::Invalid(m) => ApiError::validation(f, m),
        other => ApiError::new(
            f,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            other.to_string(),
        ),
    })?;
    state
        .metrics
        .stage_seconds
        .with_label_values(&["search"])
        .observe(started.elapsed().as_secs_f64());
    Ok(Json(json!({
        "query": query,
        "mode": results.mode,
        "lexical_weight": results.lexical_weight,
        "name_weight": results.name_weight,
        "method": results.method,
        "hits": results.hits,
    })))
}

#[utoipa::path(post, path = "/tokenize", request_body = openapi::TokenizeRequest,
    responses((status = 200, description = "per input, its tokens: id, text, special"),
        (status = 400, body = openapi::TeiError), (status = 401, body = openapi::TeiError),
        (status = 404, body = openapi::TeiError), (status = 413, body = openapi::TeiError),
        (status = 422, body = openapi::TeiError)))]
async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let f = Flavor::Tei;
    let r: Result<Json<Value>, ApiError> = async {
        let v = parse_body(body, f)?;
        let inputs = texts(&v, "inputs", f, state.config.max_client_batch_size)?;
        let entry = find_model(&state, opt_str(&v, "model", f)?.as_deref(), f)?;
        let opts = EmbedOptions {
            task: opt_str(&v, "prompt_name", f)?,
            truncate: true,
            truncate_left: tei_truncate_left(&v, f)?,
            ..Default::default()
        };
        let model = entry.model.clone();
        let tokens = tokio::task::spawn_blocking(move || model.tokens(&inputs, &opts))
            .await
            .map_err(|e| {
                ApiError::new(
                    f,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    e.to_string(),
                )
            })?
            .map_err(|e| ApiError::validation(f, e.to_string()))?;
        Ok(Json(json!(tokens)))
    }
    .await;
    r.into_response()
}

#[utoipa::path(get, path = "/health", responses((status = 200, description = "serving"),
    (status = 503, description = "shutting down, or a model's worker is being restarted")))]
async fn health(State(state): State<Arc<AppState>>) -> Response {
    // Unhealthy while shutting down, and while any model's worker is down (being restarted).
    if state.healthy.load(Ordering::SeqCst) && state.models.iter().all(|m| m.batcher.alive()) {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable"})),
        )
            .into_response()
    }
}

#[utoipa::path(get, path = "/info", responses((status = 200, description = "models, limits, engines, CPU kernels")))]
async fn info(State(state): State<Arc<AppState>>) -> Json<Value> {
    let models: Vec<Value> = state
        .models
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "dimension": m.model.dimension(),
                "max_input_length": m.model.max_length(),
                "tasks": m.model.task_names(),
                "engine": m.model.engine(),
                "engine_reasons": m.model.engine_reasons(),
            })
        })
        .collect();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "models": models,
        "max_batch_tokens": state.config.max_batch_tokens,
        "max_queue_texts": state.config.max_queue_texts,
        "max_client_batch_size": state.config.max_client_batch_size,
        "max_body_bytes": state.config.max_body_bytes,
        "auto_truncate": state.config.auto_truncate,
        "index": state.index.as_ref().map(|ix| json!({
            "target": ix.target,
            "model": state.models[ix.model].name,
        })),
        "cpu": {
            "features": sembed::fast::cpu::describe_cpu(),
            "kernels": sembed::fast::cpu::active().name(),
            "bf16_kernel": sembed::fast::cpu::bf16_description(),
            "int8_kernel": sembed::fast::quant::int8_description(),
        },
    }))
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
async fn metrics_route(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
