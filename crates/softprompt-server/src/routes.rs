//! The HTTP API: which path goes to which handler, and the layers every request passes (metrics,
//! the API key, the request slots and their timeout). JSON in and out; errors are
//! `{"error": "..."}` (`error.rs`). openapi.json describes it and is served at /openapi.json.

use crate::api::{AdapterInfo, AdapterList, Health, LoadRequest, Unloaded};
use crate::error::ApiError;
use crate::registry::Entry;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use std::time::Instant;
use tracing::Instrument;

pub const OPENAPI: &str = include_str!("../openapi.json");

pub fn router(state: AppState) -> Router {
    // the work routes take a request slot once their body is read (classify for its answer,
    // generation for as long as it writes); listing and metrics never wait
    let api = Router::new()
        .route("/v1/classify", post(crate::classify::classify))
        .route("/v1/generate", post(crate::generation::generate_text))
        .route("/v1/adapters", get(list_adapters).post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Counts every answer by route and status, and times it.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let span = tracing::debug_span!("request", endpoint = endpoint.as_str());
    let start = Instant::now();
    let response = next.run(request).instrument(span).await;
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
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// Compares in time that does not depend on where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

fn describe(name: &str, entry: &Entry) -> AdapterInfo {
    let mut info = AdapterInfo {
        name: name.to_string(),
        labels: None,
        num_virtual_tokens: entry.prompt_len,
        pool: None,
        template: None,
        can: Vec::new(),
        tasks: (!entry.tasks.is_empty()).then(|| entry.tasks.clone()),
    };
    // every task of a multitask adapter has the same head and template
    let served = &entry.served[0];
    if let Some(classifier) = &served.classifier {
        info.can.push("classify".into());
        info.labels = Some(classifier.labels.clone());
        info.pool = Some(classifier.head.pool.to_string());
        info.template = classifier.template.as_ref().map(|t| t.to_string());
    }
    if let Some(generator) = &served.generator {
        info.can.push("generate".into());
        info.template = generator.template.as_ref().map(|t| t.to_string());
    }
    info
}

async fn list_adapters(State(state): State<AppState>) -> Json<AdapterList> {
    let adapters = state
        .registry
        .list()
        .iter()
        .map(|(name, entry)| describe(name, entry))
        .collect();
    Json(AdapterList { adapters })
}

/// Loads the subdirectory NAME of an adapters directory given at start.
async fn load_adapter(
    State(state): State<AppState>,
    body: Body,
) -> Result<(StatusCode, Json<AdapterInfo>), ApiError> {
    let request: LoadRequest = crate::body::read(&state.config, body).await?;
    let registry = state.registry.clone();
    let name = request.name.clone();
    // reading safetensors is blocking file work
    let entry = tokio::task::spawn_blocking(move || registry.load(&name))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    state.metrics.adapters.set(state.registry.len() as i64);
    Ok((StatusCode::CREATED, Json(describe(&request.name, &entry))))
}

async fn unload_adapter(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Unloaded>, ApiError> {
    state.registry.unload(&name)?;
    state.metrics.adapters.set(state.registry.len() as i64);
    Ok(Json(Unloaded { unloaded: name }))
}
