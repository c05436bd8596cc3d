//! `POST /v1/classify`: a request's inputs, once per member adapter, become rows of the batching
//! queue; each input's answer is its members' vote. The request takes its slot only once its body
//! is read and checked (a slow upload holds none), and its work is bounded: at most
//! `max_ensemble` adapters, `max_rows_per_request` rows and `max_positions_per_request` positions.

use crate::api::{ClassifyRequest, ClassifyResponse, ClassifyResult, MemberLabel};
use crate::batcher::Rows;
use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::Json;
use softprompt::inference::{check_members, ensemble, LoadedAdapter};
use std::sync::Arc;

pub(crate) async fn classify(
    State(state): State<AppState>,
    body: Body,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let request: ClassifyRequest = crate::body::read(&state.config, body).await?;
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
        .map(|n| state.registry.classifier(n, request.task.as_deref()))
        .collect::<Result<_, _>>()?;
    let members: Vec<&LoadedAdapter> = adapters.iter().map(|a| a.as_ref()).collect();
    check_members(&members)?;
    let config = &state.config;
    let (inputs, limit) = (request.inputs.len(), config.max_inputs_per_request);
    match inputs {
        0 => return Err(ApiError::Invalid("\"inputs\" is empty".into())),
        n if n > limit => {
            return Err(ApiError::Invalid(format!(
                "{n} inputs; a request may have at most {limit}"
            )))
        }
        _ => {}
    }
    if names.len() > config.max_ensemble {
        return Err(ApiError::Invalid(format!(
            "{} adapters; an ensemble may have at most {}",
            names.len(),
            config.max_ensemble
        )));
    }
    if inputs * names.len() > config.max_rows_per_request {
        return Err(ApiError::Invalid(format!(
            "{inputs} inputs × {} adapters is {} rows; a request may cost at most {}",
            names.len(),
            inputs * names.len(),
            config.max_rows_per_request
        )));
    }
    if let Some(i) = request.inputs.iter().position(|t| t.trim().is_empty()) {
        return Err(ApiError::Invalid(format!("input {i} is empty")));
    }
    let _slot = state.slot()?;
    let work = async {
        // tokenizing is CPU work: off the async runtime, which answers /health meanwhile
        let (encoder_state, texts) = (state.clone(), request.inputs.clone());
        let template = members[0].template.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .enumerate()
                .map(|(i, text)| encoder_state.encode(template.as_ref(), text, i))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        let rows: Rows = encoded
            .iter()
            .flat_map(|e| adapters.iter().map(move |a| (a.clone(), e.clone())))
            .collect();
        // what the request costs the backbone: every input once per member, behind its prompt
        let positions = crate::batcher::positions(&rows);
        if positions > config.max_positions_per_request {
            return Err(ApiError::Invalid(format!(
                "this request costs {positions} positions (inputs × adapters, prompts included); a request may cost at most {}",
                config.max_positions_per_request
            )));
        }
        state.batcher.run(rows).await
    };
    let logits = tokio::time::timeout(config.request_timeout, work)
        .await
        .map_err(|_| state.timed_out())??;
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
