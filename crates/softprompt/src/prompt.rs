//! The soft prompt: M trainable vectors put in front of the word embeddings, and the ways to
//! initialise them (Lester et al. 2021, sections 2.2 and 3.2).

use crate::backbone::{InputGradients, Prefix};
use crate::kernels::Weight;
use crate::named_choice;
use crate::{bail, Context};
use candle_core::{Result, Tensor, Var};
use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

/// How the prompt's vectors start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptInit {
    /// Uniform in [−0.5, 0.5], the paper's random init.
    Uniform,
    /// N(0, 1): the starting example's randn and PEFT's RANDOM.
    Normal,
    /// Embeddings of real vocabulary tokens drawn at random (PEFT's SAMPLE_VOCAB).
    Vocab,
    /// The embeddings of an init text, repeated or cut to length (PEFT's TEXT).
    Text,
    /// The paper's class-label init: each label's token embeddings averaged, one slot per label,
    /// the remaining slots drawn from the vocabulary.
    Labels,
}
named_choice!(PromptInit, "uniform", "normal", "vocab", "text", "labels");

impl PromptInit {
    /// PEFT's name for the same init, where it has one.
    pub fn peft_name(self) -> &'static str {
        match self {
            PromptInit::Text => "TEXT",
            PromptInit::Vocab => "SAMPLE_VOCAB",
            _ => "RANDOM",
        }
    }
}

/// What an init strategy may read: token ids come from the task's tokenizer.
pub struct InitSource<'a> {
    /// [V, D] frozen token embeddings
    pub word_embeddings: &'a Weight,
    /// ids of ordinary word tokens (no special, unused or sub-word pieces) to draw from
    pub vocab_ids: &'a [u32],
    /// the init text's token ids (for `Text`)
    pub text_ids: &'a [u32],
    /// each label's token ids (for `Labels`)
    pub label_ids: &'a [Vec<u32>],
}

/// Where a prompt's vectors enter the backbone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Placement {
    /// M vectors [M, D] in front of the word embeddings (prompt tuning, P-tuning, residual)
    #[default]
    Embeddings,
    /// M positions of keys and values in front of every layer's [M, L·2·Hkv·K] (prefix tuning)
    Prefix,
}

impl Placement {
    /// The columns a prompt of `m` positions takes in front of the text in the backbone's input
    /// and hidden state: m, or none for a prefix (which the heads then never see).
    pub fn front(self, m: usize) -> usize {
        match self {
            Placement::Embeddings => m,
            Placement::Prefix => 0,
        }
    }
}

/// M trainable vectors, `prompt_embeddings` [M, D] in PEFT's adapter file (prefix tuning's
/// [M, L·2·Hkv·K]).
#[derive(Clone)]
pub struct SoftPrompt {
    pub embeddings: Var,
    pub placement: Placement,
}

impl SoftPrompt {
    pub fn from_tensor(embeddings: &Tensor) -> Result<Self> {
        Self::placed(embeddings, Placement::Embeddings)
    }

    pub fn placed(embeddings: &Tensor, placement: Placement) -> Result<Self> {
        Ok(Self {
            embeddings: Var::from_tensor(embeddings)?,
            placement,
        })
    }

    /// The columns the prompt takes in front of the text in the backbone's input and hidden
    /// state (`Placement::front`).
    pub fn front(&self) -> usize {
        self.placement.front(self.len())
    }

    pub fn init(
        init: PromptInit,
        length: usize,
        source: &InitSource,
        rng: &mut ChaCha8Rng,
    ) -> crate::Result<Self> {
        if length == 0 {
            bail!("the prompt needs at least one virtual token");
        }
        let table = source.word_embeddings;
        let (d, device) = (table.dims()[1], table.device());
        let random = |rng: &mut ChaCha8Rng, f: &dyn Fn(&mut ChaCha8Rng) -> f32| -> Result<Tensor> {
            let values: Vec<f32> = (0..length * d).map(|_| f(rng)).collect();
            Tensor::from_vec(values, (length, d), &device)?.to_dtype(table.dtype())
        };
        let rows = |ids: &[u32]| -> Result<Tensor> { table.rows(&Tensor::new(ids, &device)?) };
        let sample_vocab = |rng: &mut ChaCha8Rng, n: usize| -> crate::Result<Vec<u32>> {
            if source.vocab_ids.is_empty() {
                bail!("the tokenizer has no ordinary word tokens to draw the prompt from");
            }
            Ok((0..n)
                .map(|_| *source.vocab_ids.choose(rng).expect("not empty"))
                .collect())
        };
        let tensor = match init {
            PromptInit::Uniform => random(rng, &|r| r.random_range(-0.5f32..0.5))?,
            PromptInit::Normal => random(rng, &|r| r.sample(StandardNormal))?,
            PromptInit::Vocab => rows(&sample_vocab(rng, length)?)?,
            PromptInit::Text => {
                if source.text_ids.is_empty() {
                    bail!("--init text needs an --init-text that tokenizes to at least one token");
                }
                let ids: Vec<u32> = source
                    .text_ids
                    .iter()
                    .copied()
                    .cycle()
                    .take(length)
                    .collect();
                rows(&ids)?
            }
            PromptInit::Labels => {
                let mut slots = Vec::with_capacity(length);
                for (i, ids) in source.label_ids.iter().enumerate().take(length) {
                    if ids.is_empty() {
                        bail!("label {i} tokenizes to nothing, so it cannot initialise a prompt vector");
                    }
                    slots.push(rows(ids)?.mean_keepdim(0)?);
                }
                let rest = length - slots.len();
                if rest > 0 {
                    slots.push(rows(&sample_vocab(rng, rest)?)?);
                }
                Tensor::cat(&slots, 0)?
            }
        };
        Self::from_tensor(&tensor).context("cannot create the prompt")
    }

    pub fn len(&self) -> usize {
        self.embeddings.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// word [B, N, D] → [B, M + N, D]. The prompt enters detached: the backbone's backward, not
    /// candle's tape, carries the gradient back to it (`gradient`).
    pub fn prepend(&self, word: &Tensor) -> Result<Tensor> {
        let (b, _, d) = word.dims3()?;
        let prompt = self
            .embeddings
            .as_tensor()
            .detach()
            .unsqueeze(0)?
            .broadcast_as((b, self.len(), d))?;
        Tensor::cat(&[&prompt.to_dtype(word.dtype())?, word], 1)
    }

    /// The backbone's input gradients → d_prompt [M, ·]: every row of the batch used the same
    /// prompt, so its rows of d_embeds [B, M + N, D] (or the prefix's [B, M, L·2·Hkv·K]) summed.
    pub fn gradient(&self, grads: &InputGradients) -> Result<Tensor> {
        match (self.placement, &grads.prefix) {
            (Placement::Embeddings, _) => grads.embeds.narrow(1, 0, self.len())?.sum(0),
            (Placement::Prefix, Some(d_prefix)) => d_prefix.sum(0),
            (Placement::Prefix, None) => {
                candle_core::bail!("the backbone returned no prefix gradient")
            }
        }
    }

    /// The prefix's keys and values for a batch of B rows, or None for a prompt in the embeddings.
    pub fn prefix_for(&self, b: usize) -> Result<Option<Prefix>> {
        if self.placement != Placement::Prefix {
            return Ok(None);
        }
        let table = self.embeddings.as_tensor().detach();
        let (m, w) = table.dims2()?;
        Ok(Some(Prefix {
            kv: table.unsqueeze(0)?.broadcast_as((b, m, w))?,
            mask: Tensor::ones((b, m), candle_core::DType::U32, table.device())?,
        }))
    }
}

/// mask or token types [B, N] → [B, M + N] with `value` in the M prompt positions.
pub fn extend_front(t: &Tensor, prompt_len: usize, value: u32) -> Result<Tensor> {
    let b = t.dim(0)?;
    let front = Tensor::full(value, (b, prompt_len), t.device())?.to_dtype(t.dtype())?;
    Tensor::cat(&[&front, t], 1)
}

/// The `k` vocabulary tokens nearest to each prompt vector by cosine similarity (the paper's
/// section 7 reading of what a prompt learned): prompt [M, D], table [V, D] → per vector,
/// (token id, cosine) best first.
pub fn nearest_tokens(prompt: &Tensor, table: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    let unit = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(candle_core::DType::F32)?;
        t.broadcast_div(&(t.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-12)?)
    };
    let cosine = unit(prompt)?.matmul(&unit(table)?.t()?)?.to_vec2::<f32>()?;
    Ok(cosine
        .into_iter()
        .map(|row| {
            let mut order: Vec<(u32, f32)> = row
                .into_iter()
                .enumerate()
                .map(|(i, c)| (i as u32, c))
                .collect();
            order.sort_by(|a, b| b.1.total_cmp(&a.1));
            order.truncate(k);
            order
        })
        .collect())
}
