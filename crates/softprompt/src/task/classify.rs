//! Sequence classification: pool the last hidden state, a linear layer, cross-entropy.
//!
//! The head runs on candle's autograd: it is small, and its input is made a `Var` so that the
//! tape hands back ∂L/∂hidden for the backbone's explicit backward.

use crate::kernels::Linear;
use crate::named_choice;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::Normal;
use serde::{Deserialize, Serialize};

/// Which vector of the last hidden state [B, M + N, D] the head reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The raw hidden state of the first prompt vector (the starting example).
    First,
    /// The checkpoint's frozen BERT pooler (dense + tanh) on the first prompt vector: PEFT's
    /// SEQ_CLS with BertForSequenceClassification.
    Pooler,
    /// The hidden state of the real [CLS] token: the first real token after the prompt.
    Cls,
    /// The mean over the real tokens (prompt and padding left out).
    Mean,
    /// The last real token: what a decoder has read everything before.
    Last,
}
named_choice!(Pool, "first", "pooler", "cls", "mean", "last");

/// A linear layer on the pooled vector: `weight` [C, D], `bias` [C] (PEFT's `classifier`).
#[derive(Clone)]
pub struct ClassificationHead {
    pub weight: Var,
    pub bias: Var,
    pub pool: Pool,
    /// `pooler.dense` of the backbone, frozen; present when `pool` is `Pooler`.
    pooler: Option<Linear>,
}

impl ClassificationHead {
    /// Whether the head reads the prompt's own rows (the first prompt vector, pooled or not).
    pub fn reads_prompt(&self) -> bool {
        matches!(self.pool, Pool::First | Pool::Pooler)
    }

    /// N(0, 0.02) weights and zero bias, as transformers initialises a classifier.
    pub fn init(
        num_labels: usize,
        hidden: usize,
        pool: Pool,
        pooler: Option<Linear>,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> crate::Result<Self> {
        let normal = Normal::new(0.0f32, 0.02).expect("valid std");
        let w: Vec<f32> = (0..num_labels * hidden)
            .map(|_| rng.sample(normal))
            .collect();
        let weight = Tensor::from_vec(w, (num_labels, hidden), device)?;
        let bias = Tensor::zeros(num_labels, DType::F32, device)?;
        Self::from_tensors(&weight, &bias, pool, pooler)
    }

    pub fn from_tensors(
        weight: &Tensor,
        bias: &Tensor,
        pool: Pool,
        pooler: Option<Linear>,
    ) -> crate::Result<Self> {
        if pool == Pool::Pooler && pooler.is_none() {
            crate::bail!("--pool pooler needs the checkpoint's pooler.dense weights, and this model has none");
        }
        Ok(Self {
            weight: Var::from_tensor(weight)?,
            bias: Var::from_tensor(bias)?,
            pool,
            pooler,
        })
    }

    pub fn num_labels(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// The rows of the B·S that the pooled vectors come from (mask [B, M + N]): one a batch row
    /// [B] u32, or for the mean the N after the prompt [B·N] (padding included).
    pub fn reads(&self, mask: &Tensor, prompt_len: usize) -> Result<Tensor> {
        Ok(match self.pool {
            // the first prompt vector; with no prompt, the first real token wherever padding puts it
            Pool::First | Pool::Pooler => real_rows(mask, |real| real.first().copied())?,
            Pool::Cls => real_rows(mask, |real| {
                real.iter().find(|&&i| i >= prompt_len).copied()
            })?,
            Pool::Last => real_rows(mask, |real| real.last().copied())?,
            Pool::Mean => {
                let (b, s) = mask.dims2()?;
                let rows =
                    (0..b).flat_map(|row| (row * s + prompt_len..(row + 1) * s).map(|r| r as u32));
                Tensor::from_vec(
                    rows.collect::<Vec<u32>>(),
                    b * (s - prompt_len),
                    mask.device(),
                )?
            }
        })
    }

    /// hidden [B, M + N, D], mask [B, M + N] (u32) → pooled [B, D]
    fn pooled(&self, hidden: &Tensor, mask: &Tensor, prompt_len: usize) -> Result<Tensor> {
        let (b, s, d) = hidden.dims3()?;
        match self.pool {
            Pool::First | Pool::Pooler | Pool::Cls | Pool::Last => {
                let rows = self.reads(mask, prompt_len)?;
                let picked = hidden.reshape((b * s, d))?.index_select(&rows, 0)?;
                match &self.pooler {
                    Some(pooler) if self.pool == Pool::Pooler => pooler.forward(&picked)?.tanh(),
                    _ => Ok(picked),
                }
            }
            // over the real tokens
            Pool::Mean => {
                let real = mask
                    .narrow(1, prompt_len, s - prompt_len)?
                    .to_dtype(hidden.dtype())?;
                let real = real.reshape((b, s - prompt_len, 1))?;
                let sum = hidden
                    .narrow(1, prompt_len, s - prompt_len)?
                    .broadcast_mul(&real)?
                    .sum(1)?;
                sum.broadcast_div(&real.sum(1)?)
            }
        }
    }

    /// hidden [B, M + N, D], mask [B, M + N] → logits [B, C]
    pub fn forward(&self, hidden: &Tensor, mask: &Tensor, prompt_len: usize) -> Result<Tensor> {
        let pooled = self.pooled(hidden, mask, prompt_len)?;
        let weight = self.weight.as_tensor().to_dtype(pooled.dtype())?;
        let bias = self.bias.as_tensor().to_dtype(pooled.dtype())?;
        pooled.matmul(&weight.t()?)?.broadcast_add(&bias)
    }
}

/// mask [B, S] → [B] u32: in each row, the column `choose` picks from the row's real columns
/// (mask 1, in order), or column 0 when it picks none, as a row of the B·S.
fn real_rows(mask: &Tensor, choose: impl Fn(&[usize]) -> Option<usize>) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let rows: Vec<u32> = mask
        .to_dtype(DType::U32)?
        .to_vec2::<u32>()?
        .iter()
        .enumerate()
        .map(|(row, m)| {
            let real: Vec<usize> = (0..s).filter(|&i| m[i] != 0).collect();
            (row * s + choose(&real).unwrap_or(0)) as u32
        })
        .collect();
    Tensor::from_vec(rows, b, mask.device())
}

/// logits [B, C], labels [B] u32 → mean cross-entropy (a scalar).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let log_probs = log_softmax(logits)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

/// logits [B, C] → log-probabilities [B, C], from differentiable ops.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Index of the largest value (the predicted class).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Probabilities from logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}
