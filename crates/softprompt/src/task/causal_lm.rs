//! Generation as the task (`--task causal-lm`): each example is an input, written into the template,
//! and a target the model learns to write after it. The loss is the mean cross-entropy of the frozen
//! LM head's next-token prediction over the target tokens only: the prompt and the input are read,
//! never scored. The target ends with EOS (as PEFT's CAUSAL_LM examples do), so that the prompt also
//! learns where to stop.
//!
//! An encoder-decoder (`--task seq2seq`, T5) learns the same from its decoder: the input alone is
//! the encoder's, the decoder reads the start token and the target and predicts each next token.
//!
//! An example counts as an exact match when every target token, EOS included, is the LM head's top
//! choice after the tokens before it: exactly when greedy decoding writes the target and stops.

use crate::batch::Targets;
use crate::data::Example;
use crate::task::HeadBackward;
use crate::template::{continuation, render, Template};
use crate::tokenize::{Encoded, TextEncoder};
use crate::{bail, Context};
use candle_core::{DType, Result, Tensor};
use std::ops::Range;
use std::path::Path;

/// The input's tokens (special tokens included) and then the target's, as the model would write it
/// right after the input, and EOS. The input is cut from its end when both would not fit in
/// `encoder.max_tokens()`; a target that alone does not fit is an error.
pub fn encode_pair(
    encoder: &TextEncoder,
    template: Option<&Template>,
    input: &str,
    target: &str,
    eos: Option<u32>,
) -> crate::Result<Encoded> {
    let mut target_ids = encoder.plain_ids(&continuation(&render(template, input), target))?;
    target_ids.extend(eos);
    if target_ids.is_empty() {
        bail!("the target {target:?} tokenizes to nothing");
    }
    let max = encoder.max_tokens();
    if target_ids.len() >= max {
        bail!(
            "the target has {} tokens (EOS included); at most {} fit beside the prompt and some input",
            target_ids.len(),
            max.saturating_sub(1)
        );
    }
    let (mut encoded, _) = encoder.encode_fitted(template, input, None, max - target_ids.len())?;
    encoded
        .type_ids
        .extend(std::iter::repeat_n(0, target_ids.len()));
    encoded.target_len = target_ids.len();
    encoded.ids.extend(target_ids);
    Ok(encoded)
}

/// An encoder-decoder's example: the input alone for the encoder (with its tokenizer's special
/// tokens: T5's EOS; cut to fit), and the decoder's row `decoder_start`, the target, EOS.
pub fn encode_seq2seq_pair(
    encoder: &TextEncoder,
    template: Option<&Template>,
    input: &str,
    target: &str,
    decoder_start: u32,
    eos: Option<u32>,
) -> crate::Result<Encoded> {
    let mut decoder_ids = vec![decoder_start];
    decoder_ids.extend(encoder.plain_ids(target)?);
    decoder_ids.extend(eos);
    if decoder_ids.len() < 2 {
        bail!("the target {target:?} tokenizes to nothing");
    }
    let (encoded, _) = encoder.encode_fitted(template, input, None, encoder.max_tokens())?;
    Ok(Encoded {
        decoder_ids,
        ..encoded
    })
}

/// Every (input, target) pair of a data set (the target in the label column), the inputs written
/// into `template`: for a decoder one row each (`encode_pair`), for an encoder-decoder, whose
/// decoder starts at `decoder_start`, an input and a decoder row (`encode_seq2seq_pair`). An error
/// names the file and line.
pub fn encode_pairs(
    encoder: &TextEncoder,
    examples: &[Example],
    template: Option<&Template>,
    path: &Path,
    eos: Option<u32>,
    decoder_start: Option<u32>,
) -> crate::Result<Vec<Encoded>> {
    examples
        .iter()
        .map(|e| {
            let target = e.label.as_deref().unwrap_or_default();
            match decoder_start {
                Some(start) => encode_seq2seq_pair(encoder, template, &e.text, target, start, eos),
                None => encode_pair(encoder, template, &e.text, target, eos),
            }
            .with_context(|| format!("{} line {}", path.display(), e.line))
        })
        .collect()
}

/// Positions whose logits are made at once: [256, V] f32 is 51 MB at GPT-2's vocabulary, where all
/// of a batch's targets at once could take gigabytes.
const LOGIT_ROWS: usize = 256;

/// The LM head's logits [C, V] at the target positions of hidden [B·S, D], `LOGIT_ROWS` positions
/// at a time, each with the range of `targets` it covers.
pub(crate) fn logit_chunks<'a>(
    flat: &'a Tensor,
    targets: &'a Targets,
    lm_head: &'a Tensor,
) -> impl Iterator<Item = Result<(Range<usize>, Tensor)>> + 'a {
    let n = targets.tokens.len();
    (0..n).step_by(LOGIT_ROWS).map(move |start| {
        let range = start..(start + LOGIT_ROWS).min(n);
        let positions = Tensor::new(&targets.positions[range.clone()], flat.device())?;
        let logits = flat.index_select(&positions, 0)?.matmul(&lm_head.t()?)?;
        Ok((range, logits))
    })
}

/// The mean cross-entropy of the target tokens, forward and backward together (no tape), a chunk
/// of positions at a time:
///   -log p(token) = log Σ_v exp(logit_v) - logit_token, and its ∂/∂h = (softmax - onehot) · W
///   = softmax · W - W[token], so no one-hot and no [T, V] gradient is ever made.
///
/// hidden [B, S, D], targets (`Batch::targets`), lm_head W [V, D] → loss and d_hidden [B, S, D]
/// (zero away from the target positions).
pub fn target_cross_entropy(
    hidden: &Tensor,
    targets: &Targets,
    lm_head: &Tensor,
) -> crate::Result<HeadBackward> {
    let (b, s, d) = hidden.dims3()?;
    let device = hidden.device();
    let flat = hidden.reshape((b * s, d))?;
    let n = targets.tokens.len();
    let scale = 1.0 / n.max(1) as f64;
    let mut loss = 0f64;
    let mut d_rows = Vec::with_capacity(n.div_ceil(LOGIT_ROWS));
    for chunk in logit_chunks(&flat, targets, lm_head) {
        let (range, logits) = chunk?;
        let tokens = Tensor::new(&targets.tokens[range], device)?;
        let max = logits.max_keepdim(1)?;
        let exp = logits.broadcast_sub(&max)?.exp()?;
        let sum = exp.sum_keepdim(1)?;
        let picked = logits.gather(&tokens.unsqueeze(1)?, 1)?;
        let nll = ((sum.log()? + max)? - picked)?;
        loss += nll.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        let softmax = exp.broadcast_div(&sum)?;
        let d = (softmax.matmul(lm_head)? - lm_head.index_select(&tokens, 0)?)?;
        d_rows.push((d * scale)?);
    }
    let d_hidden = match n {
        0 => flat.zeros_like()?,
        _ => flat.zeros_like()?.index_add(
            &Tensor::new(targets.positions.as_slice(), device)?,
            &Tensor::cat(&d_rows, 0)?,
            0,
        )?,
    };
    Ok(HeadBackward {
        loss: loss * scale,
        d_hidden: d_hidden.reshape((b, s, d))?,
        param_grads: Vec::new(),
    })
}

/// What `TargetScore` is made of, as counts and sums that add up over parts of a data set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TargetCounts {
    pub examples: usize,
    /// examples whose every target token is the top choice
    pub exact: usize,
    /// target tokens that are the top choice
    pub correct: usize,
    pub tokens: usize,
    /// cross-entropy summed over the target tokens
    pub loss: f64,
}

impl TargetCounts {
    pub fn score(&self) -> TargetScore {
        let ratio = |a: f64, b: usize| if b == 0 { 0.0 } else { a / b as f64 };
        TargetScore {
            examples: self.examples,
            exact_match: ratio(self.exact as f64, self.examples),
            token_accuracy: ratio(self.correct as f64, self.tokens),
            token_loss: ratio(self.loss, self.tokens),
        }
    }
}

/// How well a prompt writes the targets of a data set.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TargetScore {
    pub examples: usize,
    /// the share of examples whose every target token is the top choice (greedy decoding writes it)
    pub exact_match: f64,
    /// the share of target tokens that are the top choice
    pub token_accuracy: f64,
    /// mean cross-entropy per target token
    pub token_loss: f64,
}

impl std::fmt::Display for TargetScore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "examples        {}", self.examples)?;
        writeln!(f, "exact match     {:.4}", self.exact_match)?;
        writeln!(f, "token accuracy  {:.4}", self.token_accuracy)?;
        writeln!(f, "token loss      {:.4}", self.token_loss)
    }
}
