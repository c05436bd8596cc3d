//! Task heads: what reads the backbone's last hidden state, the loss and its gradient there.
//! `prompted` puts them behind the prompted backbone.

pub mod causal_lm;
pub mod classify;
pub mod verbalizer;

use crate::{Context, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// What a run trains: a linear head on a pooled vector, the paper's text-to-text scoring of label
/// words by a decoder's frozen LM head, a decoder writing free-form targets, or an
/// encoder-decoder (T5) writing them from its decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Classify,
    Verbalizer,
    #[serde(rename = "causal-lm")]
    CausalLm,
    Seq2Seq,
}
crate::named_choice!(TaskKind, "classify", "verbalizer", "causal-lm", "seq2seq");

impl TaskKind {
    /// Whether the model learns to write each example's target text (the label column), scored
    /// by exact match, token accuracy and token loss, rather than to pick one of the labels.
    pub fn writes_targets(self) -> bool {
        matches!(self, TaskKind::CausalLm | TaskKind::Seq2Seq)
    }
}

/// What a task head gives back for its loss on the last hidden state.
pub struct HeadBackward {
    pub loss: f64,
    /// ∂L/∂hidden [B, M + N, D]
    pub d_hidden: Tensor,
    /// the gradients of the head's own trainable tensors, if any
    pub param_grads: Vec<Tensor>,
}

/// A head's loss from candle's tape: `loss` builds it from the hidden state, which is made a
/// fresh `Var` so that ∂L/∂hidden comes back, with the gradients of `params`.
pub fn taped_head(
    hidden: &Tensor,
    params: &[&Var],
    loss: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<HeadBackward> {
    let hidden = Var::from_tensor(hidden)?;
    let loss = loss(hidden.as_tensor())?;
    let grads = loss.backward()?;
    let d_hidden = grads
        .get(hidden.as_tensor())
        .context("no gradient reached the hidden state")?
        .clone();
    let param_grads = params
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .cloned()
                .context("no gradient reached the head")
        })
        .collect::<Result<_>>()?;
    Ok(HeadBackward {
        loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        d_hidden,
        param_grads,
    })
}
