//! `POST /v1/generate`: one request, one decoding loop on a blocking thread, starting from the
//! adapter's prefix cache (its prompt was read when it was loaded). With `"stream": true` the text
//! comes as server-sent events while it is written; a client that goes away stops the loop.
//!
//! Generation is not batched across requests: each decodes at batch 1, bounded by the same
//! request slots as classification and by `max_new_tokens`.

use crate::api::{ErrorBody, GenerateRequest, GenerateResponse, TextPiece};
use crate::error::ApiError;
use crate::routes::parse;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use softprompt::generate::{generate, SamplingConfig};
use std::convert::Infallible;

pub(crate) async fn generate_text(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: GenerateRequest = parse(body)?;
    let generator = state.registry.generator(&request.adapter)?;
    if request.input.trim().is_empty() {
        return Err(ApiError::Invalid("\"input\" is empty".into()));
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
    config.validate()?;
    if config.max_new_tokens > limit {
        return Err(ApiError::Invalid(format!(
            "max_new_tokens {} is over this server's limit of {limit}",
            config.max_new_tokens
        )));
    }
    let ids = state
        .encode(generator.template.as_ref(), &request.input, 0)?
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
            .map_err(|_| state.timed_out())?
            .map_err(|e| ApiError::Internal(e.to_string()))??;
        return Ok(Json::<GenerateResponse>(generated).into_response());
    }
    let (events, receiver) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::task::spawn_blocking(move || {
        let result = run(&mut |piece| {
            let piece = TextPiece {
                text: piece.to_string(),
            };
            let event = Event::default().json_data(piece).expect("JSON");
            events.blocking_send(event).is_ok()
        });
        let last = match result {
            Ok(generated) => Event::default().event("done").json_data(generated),
            Err(e) => Event::default().event("error").json_data(ErrorBody {
                error: ApiError::from(e).to_string(),
            }),
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
