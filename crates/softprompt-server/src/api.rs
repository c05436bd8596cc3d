//! The bodies the HTTP API takes and gives, as openapi.json describes them (a test checks each
//! type's fields against its schema there). Requests refuse fields they do not know.

use serde::{Deserialize, Serialize};
use softprompt::generate::Generation;
use std::collections::BTreeMap;

/// Every error: `{"error": message}` (openapi.json's `Error`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

/// One loaded adapter (openapi.json's `Adapter`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterInfo {
    pub name: String,
    /// classifiers only
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    pub num_virtual_tokens: usize,
    /// what a classifier's head reads
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    pub template: Option<String>,
    /// "classify", "generate"
    pub can: Vec<String>,
    /// a multitask adapter's tasks, one of which each request names
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterList {
    pub adapters: Vec<AdapterInfo>,
}

/// `POST /v1/adapters`: the subdirectory `name` of an adapters directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unloaded {
    pub unloaded: String,
}

/// `POST /v1/classify`: `adapter` for one adapter, or `adapters` for a prompt ensemble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapters: Option<Vec<String>>,
    /// a multitask adapter's task (every member's)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub inputs: Vec<String>,
}

/// One input's answer (openapi.json's `ClassifyResult`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifyResult {
    pub label: String,
    /// probability per label (the mean over members for an ensemble)
    pub scores: BTreeMap<String, f32>,
    /// ensembles only
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<MemberLabel>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberLabel {
    pub adapter: String,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifyResponse {
    pub results: Vec<ClassifyResult>,
}

/// `POST /v1/generate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub adapter: String,
    /// a multitask adapter's task
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub input: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub stream: bool,
}

/// A finished generation (openapi.json's `Generation`), also the `done` event of a stream.
pub type GenerateResponse = Generation;

/// A piece of text in a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextPiece {
    pub text: String,
}
