//! Task heads: what reads the backbone's last hidden state, and the loss.

pub mod causal_lm;
pub mod classify;
pub mod verbalizer;

use serde::{Deserialize, Serialize};

/// What a run trains: a linear head on a pooled vector, the paper's text-to-text scoring of label
/// words by a decoder's frozen LM head, or a decoder writing free-form targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Classify,
    Verbalizer,
    #[serde(rename = "causal-lm")]
    CausalLm,
}
crate::named_choice!(TaskKind, "classify", "verbalizer", "causal-lm");
