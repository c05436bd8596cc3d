//! The HTTP API: JSON in and out, errors as {"error": "..."} with a 4xx code.

use crate::batcher::Batcher;
use crate::registry::Registry;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use softprompt::multitask::{ensemble, Task};
use softprompt::tokenize::TextEncoder;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    /// leaves room for the longest prompt of the registry
    pub encoder: Arc<TextEncoder>,
    pub batcher: Arc<Batcher>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/adapters", get(adapters))
        .route("/v1/classify", post(classify))
        .with_state(state)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn unprocessable(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, message.into())
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<AppState>) -> String {
    let s = &state.batcher.stats;
    format!(
        "# TYPE softprompt_requests_total counter\nsoftprompt_requests_total {}\n\
         # TYPE softprompt_batches_total counter\nsoftprompt_batches_total {}\n\
         # TYPE softprompt_batch_rows_total counter\nsoftprompt_batch_rows_total {}\n",
        s.requests.load(Ordering::Relaxed),
        s.batches.load(Ordering::Relaxed),
        s.rows.load(Ordering::Relaxed),
    )
}

async fn adapters(State(state): State<AppState>) -> Json<serde_json::Value> {
    let list: Vec<_> = state
        .registry
        .iter()
        .map(|(name, task)| {
            json!({"name": name, "labels": task.labels, "num_virtual_tokens": task.prompt_len(),
                   "pool": task.head.pool.to_string()})
        })
        .collect();
    Json(json!({"adapters": list}))
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
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.batcher.stats.requests.fetch_add(1, Ordering::Relaxed);
    let request: ClassifyRequest = serde_json::from_slice(&body)
        .map_err(|e| unprocessable(format!("malformed request: {e}")))?;
    let names = match (request.adapter, request.adapters) {
        (Some(one), None) => vec![one],
        (None, Some(many)) if !many.is_empty() => many,
        _ => {
            return Err(unprocessable(
                "give either \"adapter\" or a non-empty \"adapters\"",
            ))
        }
    };
    let tasks: Vec<Arc<Task>> =
        names
            .iter()
            .map(|n| {
                state.registry.get(n).cloned().ok_or_else(|| {
                    ApiError(StatusCode::NOT_FOUND, format!("unknown adapter {n:?}"))
                })
            })
            .collect::<Result<_, _>>()?;
    if request.inputs.is_empty() {
        return Err(unprocessable("\"inputs\" is empty"));
    }
    let mut rows = Vec::with_capacity(request.inputs.len() * tasks.len());
    for (i, text) in request.inputs.iter().enumerate() {
        if text.trim().is_empty() {
            return Err(unprocessable(format!("input {i} is empty")));
        }
        let encoded = state
            .encoder
            .encode(text, None)
            .map_err(|e| unprocessable(format!("input {i}: {e:#}")))?;
        rows.extend(tasks.iter().map(|t| (t.clone(), encoded.clone())));
    }
    let logits = state
        .batcher
        .run(rows)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let members: Vec<&Task> = tasks.iter().map(|t| t.as_ref()).collect();
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
