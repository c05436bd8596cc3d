//! Request bodies read into their typed form (`api`), with the error that says why one is not.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;

/// A request body as `T`: 413 and the like for a body that could not be read, 422 for JSON that
/// is not a `T`.
pub fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::Body(e.status(), e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| ApiError::Invalid(format!("malformed request: {e}")))
}
