//! `POST /v1/generate`: the request's text joins the decoding batch (`decoding`), starting from
//! the adapter's prefix cache (its prompt was read when it was loaded). With `"stream": true` the
//! text comes as server-sent events while it is written; a client that goes away stops its row.
//!
//! Requests are bounded by the same request slots as classification and by `max_new_tokens`. A
//! row stops at the next token once its answer is no longer awaited: past the request timeout,
//! or when the client goes away.
//! An input longer than the model's room is refused, not cut: the model continues the end of
//! a text, and cutting that end would continue a text the user never wrote.

use crate::api::{ErrorBody, GenerateRequest, GenerateResponse, TextPiece};
use crate::decoding::Job;
use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use softprompt::generate::SamplingConfig;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub(crate) async fn generate_text(
    State(state): State<AppState>,
    body: Body,
) -> Result<Response, ApiError> {
    let request: GenerateRequest = crate::body::read(&state.config, body).await?;
    let generator = state
        .registry
        .generator(&request.adapter, request.task.as_deref())?;
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
    // tokenizing is CPU work: off the async runtime
    let (registry, template) = (state.registry.clone(), generator.template.clone());
    let room = registry.encoder.max_tokens();
    let encoded = tokio::task::spawn_blocking(move || {
        registry
            .encoder
            .encode_within(template.as_ref(), &request.input, room)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Invalid(format!("input: {}", e.chain())))?;
    let Some(encoded) = encoded else {
        return Err(ApiError::Invalid(format!(
            "the input has more than {room} tokens, and generation continues the end of a text, so it is not cut: shorten it"
        )));
    };
    let (slot, timeout) = (state.slot()?, state.config.request_timeout);
    let (done, answer) = tokio::sync::oneshot::channel();
    let job = |on_text| Job {
        prefix: generator.prefix.clone(),
        ids: encoded.ids,
        config,
        on_text,
        done,
        slot,
    };
    if !request.stream {
        let abandoned = Abandoned::default();
        let stop = abandoned.flag.clone();
        state
            .decoding
            .submit(job(Box::new(move |_| !stop.load(Ordering::Relaxed))))?;
        // dropped when the answer is no longer awaited (timeout, client gone): the row stops
        let _abandoned = abandoned;
        let generated = tokio::time::timeout(timeout, answer)
            .await
            .map_err(|_| state.timed_out())?
            .map_err(|_| ApiError::Internal("the decoding thread has stopped".into()))??;
        return Ok(Json::<GenerateResponse>(generated).into_response());
    }
    // Unbounded, yet bounded by max_new_tokens: a client that stays connected but stops reading
    // must not hold back the other rows of the batch. A stream ends at the request timeout too.
    let (events, receiver) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let deadline = Instant::now() + timeout;
    let pieces = events.clone();
    state.decoding.submit(job(Box::new(move |piece: &str| {
        if Instant::now() >= deadline || pieces.is_closed() {
            return false;
        }
        if piece.is_empty() {
            return true;
        }
        let piece = TextPiece {
            text: piece.to_string(),
        };
        pieces
            .send(Event::default().json_data(piece).expect("JSON"))
            .is_ok()
    })))?;
    tokio::spawn(async move {
        let last = match answer.await {
            Ok(Ok(_)) if Instant::now() >= deadline => {
                error_event(ApiError::Timeout(timeout.as_millis()))
            }
            Ok(Ok(generated)) => Event::default()
                .event("done")
                .json_data(generated)
                .expect("JSON"),
            Ok(Err(e)) => error_event(e),
            Err(_) => error_event(ApiError::Internal("the decoding thread has stopped".into())),
        };
        let _ = events.send(last);
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), receiver))
    });
    Ok(Sse::new(stream).into_response())
}

/// Raised when dropped: the decode of an answer nobody awaits any more stops at its next token.
#[derive(Default)]
struct Abandoned {
    flag: Arc<AtomicBool>,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        self.flag.store(true, Ordering::Relaxed);
    }
}

/// The last event of a stream that failed.
fn error_event(error: ApiError) -> Event {
    let body = ErrorBody {
        error: error.to_string(),
    };
    Event::default()
        .event("error")
        .json_data(body)
        .expect("JSON")
}
