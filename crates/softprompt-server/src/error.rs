//! The server's errors, and the one place that chooses each one's HTTP status. Every error
//! answers `{"error": message}`.

use crate::api::ErrorBody;
use crate::registry::RegistryError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// the request is well-formed JSON but asks for something wrong
    #[error("{0}")]
    Invalid(String),
    /// the body could not be read: too large, or not what the route takes
    #[error("{1}")]
    Body(StatusCode, String),
    #[error("missing or wrong API key (send Authorization: Bearer KEY)")]
    Unauthorized,
    #[error("no such path (see /openapi.json)")]
    NoRoute,
    #[error("this path does not take that method (see /openapi.json)")]
    MethodNotAllowed,
    #[error("the server is handling {0} requests already; retry later")]
    Busy(usize),
    #[error("no answer within {0} ms")]
    Timeout(u128),
    #[error("the request body did not arrive within {0} ms")]
    SlowBody(u128),
    /// the server's own failure: the model, a thread
    #[error("{0}")]
    Internal(String),
}

impl From<&ApiError> for StatusCode {
    fn from(error: &ApiError) -> Self {
        match error {
            ApiError::Registry(e) => match e {
                RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
                RegistryError::AlreadyLoaded(_) => StatusCode::CONFLICT,
                RegistryError::BadName(_)
                | RegistryError::Invalid(..)
                | RegistryError::NotAClassifier(_)
                | RegistryError::NotAGenerator(_)
                | RegistryError::Task(..) => StatusCode::UNPROCESSABLE_ENTITY,
            },
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Body(status, _) => *status,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A library error is the client's fault when its input was (an input that does not tokenize, a
/// sampling option out of range), else the server's.
impl From<softprompt::Error> for ApiError {
    fn from(error: softprompt::Error) -> Self {
        match error.is_invalid_input() {
            true => ApiError::Invalid(error.chain()),
            false => ApiError::Internal(error.chain()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from(&self);
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            let bearer = header::HeaderValue::from_static("Bearer");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, bearer);
        }
        response
    }
}
