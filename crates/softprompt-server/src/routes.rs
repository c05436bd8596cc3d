//! The HTTP API: JSON in and out, errors as {"error": "..."} with a 4xx/5xx code. The same
//! API is described in openapi.json, served at /openapi.json.

use crate::batcher::{Batcher, BatcherConfig};
use crate::config::{Overlong, ServerConfig};
use crate::metrics::Metrics;
use crate::registry::{Entry, Registry, RegistryError};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use softprompt::model::Model;
use softprompt::multitask::{check_members, ensemble, Task};
use softprompt::tokenize::Encoded;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;

pub const OPENAPI: &str = include_str!("../openapi.json");

#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub batcher: Arc<Batcher>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ServerConfig>,
    /// one permit per request being handled
    slots: Arc<Semaphore>,
}

impl AppState {
    /// Loads the adapters and starts the batcher, which owns the model's backbone from then on.
    pub fn new(model: Model, config: ServerConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let model = Arc::new(model);
        let registry =
            Registry::open(model.clone(), &config.adapter_dirs, config.max_input_tokens)?;
        let metrics = Arc::new(Metrics::new());
        metrics.adapters.set(registry.len() as i64);
        let batcher = Batcher::start(
            model,
            BatcherConfig {
                max_batch_tokens: config.max_batch_tokens,
                max_wait: config.max_wait,
                mix_adapters: config.mix_adapters,
            },
            metrics.clone(),
        );
        Ok(Self {
            registry: Arc::new(registry),
            batcher: Arc::new(batcher),
            metrics,
            slots: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            config: Arc::new(config),
        })
    }
}

pub fn router(state: AppState) -> Router {
    // the work routes hold a slot while they run; listing and metrics never wait
    let work = Router::new()
        .route("/v1/classify", post(classify))
        .route_layer(middleware::from_fn_with_state(state.clone(), limit));
    // generation holds its slot for as long as it streams, so it takes the slot itself
    let work = work.route("/v1/generate", post(crate::generation::generate_text));
    let api = Router::new()
        .merge(work)
        .route("/v1/adapters", get(list_adapters).post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

pub(crate) struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

pub(crate) fn unprocessable(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, message.into())
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match e {
            RegistryError::BadName(_)
            | RegistryError::Invalid(..)
            | RegistryError::NotAClassifier(_)
            | RegistryError::NotAGenerator(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::AlreadyLoaded(_) => StatusCode::CONFLICT,
        };
        ApiError(status, e.to_string())
    }
}

/// Counts every answer by route and status, and times it.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    let m = &state.metrics;
    m.requests
        .with_label_values(&[endpoint.as_str(), response.status().as_str()])
        .inc();
    m.request_seconds
        .with_label_values(&[endpoint.as_str()])
        .observe(start.elapsed().as_secs_f64());
    response
}

async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
            let mut response = ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (send Authorization: Bearer KEY)".into(),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
            return response;
        }
    }
    next.run(request).await
}

/// Compares in time that does not depend on where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AppState {
    /// Input `i` of a request, tokenized, cut or refused (422) past --max-input-tokens.
    /// `text` written into `template` and tokenized; too long, it is cut or refused (`overlong`).
    pub(crate) fn encode(
        &self,
        template: Option<&str>,
        text: &str,
        i: usize,
    ) -> Result<Encoded, ApiError> {
        let encoder = &self.registry.encoder;
        let (encoded, truncated) = encoder
            .encode_fitted(template, text, None, encoder.max_tokens())
            .map_err(|e| unprocessable(format!("input {i}: {e:#}")))?;
        if truncated && self.config.overlong == Overlong::Reject {
            return Err(unprocessable(format!(
                "input {i} has more than {} tokens",
                self.registry.encoder.max_tokens()
            )));
        }
        Ok(encoded)
    }

    /// A slot for one request, or 429 when all are taken.
    pub(crate) fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the server is handling {} requests already; retry later",
                    self.config.max_concurrent_requests
                ),
            )
        })
    }
}

/// 429 when every slot is taken; 504 when the answer takes longer than the request timeout.
async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let _slot = match state.slot() {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let timeout = state.config.request_timeout;
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer within {} ms", timeout.as_millis()),
        )
        .into_response(),
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

fn describe(name: &str, entry: &Entry) -> Value {
    let mut can = Vec::new();
    let mut description = json!({"name": name, "num_virtual_tokens": entry.prompt_len});
    if let Some(task) = &entry.task {
        can.push("classify");
        description["labels"] = json!(task.labels);
        description["pool"] = json!(task.head.pool.to_string());
        description["template"] = json!(task.template);
    }
    if let Some(generator) = &entry.generator {
        can.push("generate");
        description["template"] = json!(generator.template);
    }
    description["can"] = json!(can);
    description
}

async fn list_adapters(State(state): State<AppState>) -> Json<Value> {
    let list: Vec<_> = state
        .registry
        .list()
        .iter()
        .map(|(name, entry)| describe(name, entry))
        .collect();
    Json(json!({"adapters": list}))
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| unprocessable(format!("malformed request: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    name: String,
}

/// `{"name": NAME}`: loads the subdirectory NAME of an adapters directory given at start.
async fn load_adapter(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request: LoadRequest = parse(body)?;
    let registry = state.registry.clone();
    let name = request.name.clone();
    // reading safetensors is blocking file work
    let entry = tokio::task::spawn_blocking(move || registry.load(&name))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    state.metrics.adapters.set(state.registry.len() as i64);
    Ok((StatusCode::CREATED, Json(describe(&request.name, &entry))))
}

async fn unload_adapter(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.registry.unload(&name)?;
    state.metrics.adapters.set(state.registry.len() as i64);
    Ok(Json(json!({"unloaded": name})))
}

/// `{"adapter": NAME, "inputs": [...]}`, or `{"adapters": [NAME, ...], "inputs": [...]}` for a prompt
/// ensemble.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyRequest {
    adapter: Option<String>,
    adapters: Option<Vec<String>>,
    inputs: Vec<String>,
}

async fn classify(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let request: ClassifyRequest = parse(body)?;
    let names = match (request.adapter, request.adapters) {
        (Some(one), None) => vec![one],
        (None, Some(many)) if !many.is_empty() => many,
        _ => {
            return Err(unprocessable(
                "give either \"adapter\" or a non-empty \"adapters\"",
            ))
        }
    };
    let tasks: Vec<Arc<Task>> = names
        .iter()
        .map(|n| state.registry.task(n))
        .collect::<Result<_, _>>()?;
    let members: Vec<&Task> = tasks.iter().map(|t| t.as_ref()).collect();
    check_members(&members).map_err(|e| unprocessable(format!("{e:#}")))?;
    let limit = state.config.max_inputs_per_request;
    match request.inputs.len() {
        0 => return Err(unprocessable("\"inputs\" is empty")),
        n if n > limit => {
            return Err(unprocessable(format!(
                "{n} inputs; a request may have at most {limit}"
            )))
        }
        _ => {}
    }
    let mut rows = Vec::with_capacity(request.inputs.len() * tasks.len());
    for (i, text) in request.inputs.iter().enumerate() {
        if text.trim().is_empty() {
            return Err(unprocessable(format!("input {i} is empty")));
        }
        let encoded = state.encode(members[0].template.as_deref(), text, i)?;
        rows.extend(tasks.iter().map(|t| (t.clone(), encoded.clone())));
    }
    let logits = state
        .batcher
        .run(rows)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let mut results = Vec::with_capacity(request.inputs.len());
    for member_logits in logits.chunks(tasks.len()) {
        let answer =
            ensemble(&members, member_logits).map_err(|e| unprocessable(format!("{e:#}")))?;
        let scores: serde_json::Map<_, _> = members[0]
            .labels
            .iter()
            .zip(&answer.scores)
            .map(|(l, p)| (l.clone(), json!(p)))
            .collect();
        let mut result = json!({"label": answer.label, "scores": scores});
        if members.len() > 1 {
            result["members"] = json!(names
                .iter()
                .zip(&answer.members)
                .map(|(n, l)| json!({"adapter": n, "label": l}))
                .collect::<Vec<_>>());
        }
        results.push(result);
    }
    Ok(Json(json!({"results": results})))
}
