//! `POST /v1/classify`: a request's inputs, once per member adapter, become rows of the batching
//! queue; each input's answer is its members' vote.

use crate::api::{ClassifyRequest, ClassifyResponse, ClassifyResult, MemberLabel};
use crate::error::ApiError;
use crate::routes::parse;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use softprompt::inference::{check_members, ensemble, LoadedAdapter};
use std::sync::Arc;

pub(crate) async fn classify(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let request: ClassifyRequest = parse(body)?;
    let names = match (request.adapter, request.adapters) {
        (Some(one), None) => vec![one],
        (None, Some(many)) if !many.is_empty() => many,
        _ => {
            return Err(ApiError::Invalid(
                "give either \"adapter\" or a non-empty \"adapters\"".into(),
            ))
        }
    };
    let adapters: Vec<Arc<LoadedAdapter>> = names
        .iter()
        .map(|n| state.registry.classifier(n))
        .collect::<Result<_, _>>()?;
    let members: Vec<&LoadedAdapter> = adapters.iter().map(|a| a.as_ref()).collect();
    check_members(&members)?;
    let limit = state.config.max_inputs_per_request;
    match request.inputs.len() {
        0 => return Err(ApiError::Invalid("\"inputs\" is empty".into())),
        n if n > limit => {
            return Err(ApiError::Invalid(format!(
                "{n} inputs; a request may have at most {limit}"
            )))
        }
        _ => {}
    }
    let mut rows = Vec::with_capacity(request.inputs.len() * adapters.len());
    for (i, text) in request.inputs.iter().enumerate() {
        if text.trim().is_empty() {
            return Err(ApiError::Invalid(format!("input {i} is empty")));
        }
        let encoded = state.encode(members[0].template.as_ref(), text, i)?;
        rows.extend(adapters.iter().map(|a| (a.clone(), encoded.clone())));
    }
    let logits = state.batcher.run(rows).await?;
    let mut results = Vec::with_capacity(request.inputs.len());
    for member_logits in logits.chunks(adapters.len()) {
        let answer = ensemble(&members, member_logits)?;
        let scores = members[0]
            .labels
            .iter()
            .cloned()
            .zip(answer.scores.iter().copied())
            .collect();
        let members = (members.len() > 1).then(|| {
            names
                .iter()
                .zip(&answer.members)
                .map(|(adapter, label)| MemberLabel {
                    adapter: adapter.clone(),
                    label: label.clone(),
                })
                .collect()
        });
        results.push(ClassifyResult {
            label: answer.label,
            scores,
            members,
        });
    }
    Ok(Json(ClassifyResponse { results }))
}
