//! Task heads: what reads the backbone's last hidden state, and the loss.

pub mod classify;
pub mod verbalizer;

use serde::{Deserialize, Serialize};

/// What a run trains: a linear head on a pooled vector, or the paper's text-to-text scoring of
/// label words by a decoder's frozen LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Classify,
    Verbalizer,
}
crate::named_choice!(TaskKind, "classify", "verbalizer");
