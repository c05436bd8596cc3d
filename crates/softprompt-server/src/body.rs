//! Request bodies read into their typed form (`api`), with the error that says why one is not.
//! A body is read under the read timeout and the size limit, before the request takes a slot:
//! a client that uploads slowly gets 408 and costs only its connection meanwhile.

use crate::config::ServerConfig;
use crate::error::ApiError;
use axum::body::{Body, HttpBody};
use axum::http::StatusCode;
use futures_util::StreamExt;

/// A request body as `T`: 413 past `max_body_bytes`, 408 past the read timeout, 422 for JSON
/// that is not a `T`.
pub async fn read<T: serde::de::DeserializeOwned>(
    config: &ServerConfig,
    body: Body,
) -> Result<T, ApiError> {
    let limit = config.max_body_bytes;
    let too_large = || {
        ApiError::Body(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {limit} bytes"),
        )
    };
    // a declared Content-Length over the limit is refused before a byte is read
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    let mut frames = body.into_data_stream();
    let collect = async {
        while let Some(frame) = frames.next().await {
            let frame = frame.map_err(|e| {
                ApiError::Body(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {e}"),
                )
            })?;
            if bytes.len() + frame.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&frame);
        }
        Ok(())
    };
    tokio::time::timeout(config.read_timeout, collect)
        .await
        .map_err(|_| ApiError::SlowBody(config.read_timeout.as_millis()))??;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::Invalid(format!("malformed request: {e}")))
}
