//! `POST /v1/generate`: one request, one decoding loop on a blocking thread, starting from the
//! adapter's prefix cache (its prompt was read when it was loaded). With `"stream": true` the text
//! comes as server-sent events while it is written; a client that goes away stops the loop.
//!
//! Generation is not batched across requests: each decodes at batch 1, bounded by the same
//! request slots as classification and by `max_new_tokens`.

use crate::routes::{parse, unprocessable, ApiError, AppState};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use softprompt::generate::{generate, Generation, SamplingConfig};
use std::convert::Infallible;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateRequest {
    adapter: String,
    input: String,
    max_new_tokens: Option<usize>,
    #[serde(default)]
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    stream: bool,
}

fn answer(g: &Generation) -> serde_json::Value {
    json!({"text": g.text, "tokens": g.tokens, "finish": g.finish})
}

pub(crate) async fn generate_text(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: GenerateRequest = parse(body)?;
    let generator = state.registry.generator(&request.adapter)?;
    if request.input.trim().is_empty() {
        return Err(unprocessable("\"input\" is empty"));
    }
    let limit = state.config.max_new_tokens;
    let config = SamplingConfig {
        max_new_tokens: request.max_new_tokens.unwrap_or(limit.min(64)),
        temperature: request.temperature,
        top_k: request.top_k,
        top_p: request.top_p,
        stop: request.stop,
        seed: request.seed,
    };
    config
        .validate()
        .map_err(|e| unprocessable(format!("{e:#}")))?;
    if config.max_new_tokens > limit {
        return Err(unprocessable(format!(
            "max_new_tokens {} is over this server's limit of {limit}",
            config.max_new_tokens
        )));
    }
    let ids = state
        .encode(generator.template.as_deref(), &request.input, 0)?
        .ids;
    let slot = state.slot()?;
    let registry = state.registry.clone();
    let run = move |on_text: &mut dyn FnMut(&str) -> bool| {
        let _slot = slot;
        let model = &registry.model;
        generate(
            &model.backbone,
            &registry.encoder,
            &generator.prefix,
            &ids,
            &model.eos_token_ids,
            &config,
            on_text,
        )
    };
    if !request.stream {
        let work = tokio::task::spawn_blocking(move || run(&mut |_| true));
        let generated = tokio::time::timeout(state.config.request_timeout, work)
            .await
            .map_err(|_| {
                ApiError(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "no answer within {} ms",
                        state.config.request_timeout.as_millis()
                    ),
                )
            })?
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        return Ok(Json(answer(&generated)).into_response());
    }
    let (events, receiver) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::task::spawn_blocking(move || {
        let result = run(&mut |piece| {
            events
                .blocking_send(
                    Event::default()
                        .json_data(json!({"text": piece}))
                        .expect("JSON"),
                )
                .is_ok()
        });
        let last = match result {
            Ok(generated) => Event::default().event("done").json_data(answer(&generated)),
            Err(e) => Event::default()
                .event("error")
                .json_data(json!({"error": format!("{e:#}")})),
        };
        let _ = events.blocking_send(last.expect("JSON"));
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), receiver))
    });
    Ok(Sse::new(stream).into_response())
}
