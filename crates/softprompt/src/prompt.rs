//! The soft prompt: M trainable vectors put in front of the word embeddings, and the ways to
//! initialise them (Lester et al. 2021, sections 2.2 and 3.2).

use crate::backbone::{InputGradients, Prefix};
use crate::kernels::Weight;
use crate::named_choice;
use crate::{bail, Context};
use candle_core::{DType, Result, Tensor, Var};
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
    /// 2M vectors [2M, D]: the first M in front of an encoder-decoder's encoder input, the other
    /// M in front of its decoder's (PEFT's SEQ_2_SEQ_LM multitask prompt, whose
    /// num_transformer_submodules 2 it reads so in training)
    EncoderDecoder,
}

impl Placement {
    /// The columns a prompt of `m` positions takes in front of the text in the backbone's input
    /// and hidden state: m, or none for a prefix (which the heads then never see).
    pub fn front(self, m: usize) -> usize {
        match self {
            Placement::Embeddings => m,
            Placement::Prefix => 0,
            Placement::EncoderDecoder => m / 2,
        }
    }

    /// The rows of a prompt of `m` virtual tokens (PEFT's num_virtual_tokens): 2m for an
    /// encoder-decoder prompt, m otherwise.
    pub fn rows(self, m: usize) -> usize {
        match self {
            Placement::EncoderDecoder => 2 * m,
            Placement::Embeddings | Placement::Prefix => m,
        }
    }

    /// The columns a prompt of `m` positions takes in front of an encoder-decoder's decoder input.
    pub fn decoder_front(self, m: usize) -> usize {
        match self {
            Placement::EncoderDecoder => m - m / 2,
            Placement::Embeddings | Placement::Prefix => 0,
        }
    }
}

/// M trainable vectors, `prompt_embeddings` [M, D] in PEFT's adapter file (prefix tuning's
/// [M, L·2·Hkv·K]); a multitask prompt is one for each of its N tasks, [N, M, D], and each row
/// of a batch reads its own task's (`Batch::tasks`).
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

    /// The columns the prompt takes in front of an encoder-decoder's decoder input
    /// (`Placement::decoder_front`).
    pub fn decoder_front(&self) -> usize {
        self.placement.decoder_front(self.len())
    }

    /// Whether this is a multitask prompt, one [M, D] for each task.
    pub fn is_multitask(&self) -> bool {
        self.embeddings.rank() == 3
    }

    /// Task `t`'s prompt [M, ·] of a multitask prompt; any other prompt is its own.
    pub fn task(&self, t: usize) -> Result<Self> {
        match self.embeddings.rank() {
            3 => Self::placed(&self.embeddings.as_tensor().get(t)?, self.placement),
            _ => Ok(self.clone()),
        }
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
        let dims = self.embeddings.dims();
        dims.len().checked_sub(2).map_or(0, |i| dims[i])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The prompt each of a batch's B rows reads [B, M, ·]: the one prompt, or each row's task's
    /// (`tasks` [B] u32). Detached: the backbone's backward, not candle's tape, carries the
    /// gradient back to it (`gradient`).
    fn rows(&self, b: usize, tasks: Option<&Tensor>) -> Result<Tensor> {
        let table = self.embeddings.as_tensor().detach();
        match (table.rank(), tasks) {
            (3, Some(tasks)) => table.index_select(tasks, 0),
            (3, None) => candle_core::bail!("a multitask prompt needs each row's task"),
            _ => {
                let (m, w) = table.dims2()?;
                table.unsqueeze(0)?.broadcast_as((b, m, w))
            }
        }
    }

    /// word [B, N, D] → [B, M + N, D] (M = `front()`); `tasks` [B] picks a multitask prompt's
    /// row by row.
    pub fn prepend(&self, word: &Tensor, tasks: Option<&Tensor>) -> Result<Tensor> {
        self.prepend_rows(word, tasks, 0, self.front())
    }

    /// An encoder-decoder's decoder input [B, T, D] → [B, M' + T, D], M' = `decoder_front()`:
    /// the prompt's rows after the encoder's.
    pub fn prepend_decoder(&self, decoder: &Tensor, tasks: Option<&Tensor>) -> Result<Tensor> {
        self.prepend_rows(decoder, tasks, self.front(), self.decoder_front())
    }

    fn prepend_rows(
        &self,
        x: &Tensor,
        tasks: Option<&Tensor>,
        first: usize,
        n: usize,
    ) -> Result<Tensor> {
        if n == 0 {
            // nothing in front (a prefix, or the decoder behind an encoder's prompt), and a
            // prefix's rows are not as wide as x
            return Ok(x.clone());
        }
        let prompt = self.rows(x.dim(0)?, tasks)?.narrow(1, first, n)?;
        Tensor::cat(&[&prompt.to_dtype(x.dtype())?, x], 1)
    }

    /// The backbone's input gradients → d_prompt, shaped as the prompt: its rows of d_embeds
    /// [B, M + N, D] (or the prefix's [B, M, L·2·Hkv·K]; an encoder-decoder prompt's encoder rows,
    /// then its decoder rows) summed over the rows that read it (every row, or each task's rows
    /// of a multitask prompt).
    pub fn gradient(&self, grads: &InputGradients, tasks: Option<&Tensor>) -> Result<Tensor> {
        let rows = match (self.placement, &grads.prefix, &grads.decoder) {
            (Placement::Embeddings, ..) => grads.embeds.narrow(1, 0, self.len())?,
            (Placement::Prefix, Some(d_prefix), _) => d_prefix.clone(),
            (Placement::Prefix, None, _) => {
                candle_core::bail!("the backbone returned no prefix gradient")
            }
            (Placement::EncoderDecoder, _, Some(d_decoder)) => Tensor::cat(
                &[
                    &grads.embeds.narrow(1, 0, self.front())?,
                    &d_decoder.narrow(1, 0, self.decoder_front())?,
                ],
                1,
            )?,
            (Placement::EncoderDecoder, _, None) => {
                candle_core::bail!("the backbone returned no decoder input gradient")
            }
        };
        match (self.embeddings.rank(), tasks) {
            (3, Some(tasks)) => self
                .embeddings
                .zeros_like()?
                .to_dtype(rows.dtype())?
                .index_add(tasks, &rows.contiguous()?, 0),
            (3, None) => candle_core::bail!("a multitask prompt needs each row's task"),
            _ => rows.sum(0),
        }
    }

    /// The prefix's keys and values for a batch of B rows, or None for a prompt in the embeddings.
    pub fn prefix_for(&self, b: usize) -> Result<Option<Prefix>> {
        if self.placement != Placement::Prefix {
            return Ok(None);
        }
        Ok(Some(Prefix {
            kv: self.rows(b, None)?,
            mask: Tensor::ones((b, self.len()), DType::U32, self.embeddings.device())?,
        }))
    }
}

/// A multitask prompt's task-specific factors (PEFT's MULTITASK_PROMPT_TUNING, Wang et al. 2023):
/// task t reads the shared prompt P [M, D] scaled elementwise by a rank-r matrix, P ⊙ (C_t R_t).
#[derive(Clone)]
pub struct TaskFactors {
    /// the tasks by name; a task's id is its place
    pub names: Vec<String>,
    /// `prefix_task_cols` [N, M, r]
    pub cols: Tensor,
    /// `prefix_task_rows` [N, r, D]
    pub rows: Tensor,
}

impl TaskFactors {
    /// Every task's prompt [N, M, D] from the shared P [M, D].
    pub fn prompts(&self, shared: &Tensor) -> Result<Tensor> {
        task_prompts(shared, &self.cols, &self.rows)
    }

    /// The id of the task named `name`.
    pub fn id(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

/// P [M, D], C [N, M, r], R [N, r, D] → P ⊙ (C_t R_t) for every t, [N, M, D].
pub fn task_prompts(shared: &Tensor, cols: &Tensor, rows: &Tensor) -> Result<Tensor> {
    shared.unsqueeze(0)?.broadcast_mul(&cols.matmul(rows)?)
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
