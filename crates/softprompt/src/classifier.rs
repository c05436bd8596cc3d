//! The whole classifier: tokens → [prompt; word embeddings] → frozen backbone → head → loss, and the
//! gradient back: head (candle's tape) → backbone (explicit backward) → prompt.

use crate::adapter::AdapterHead;
use crate::backbone::{Backbone, EncoderInput};
use crate::batch::{Batch, Padding};
use crate::multitask::{ensemble_all, Task};
use crate::prompt::{extend_front, SoftPrompt};
use crate::task::classify::{cross_entropy, ClassificationHead};
use crate::tokenize::Encoded;
use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor, Var};

pub struct PromptClassifier<B: Backbone> {
    pub backbone: B,
    pub prompt: SoftPrompt,
    pub head: ClassificationHead,
    /// a verbalizer's label words, one per label: its head is the frozen LM head's and does not train
    pub label_words: Option<Vec<String>>,
    pub labels: Vec<String>,
    pub template: Option<String>,
}

/// A batch with the prompt in front: embeddings [B, M + N, D], mask and token types [B, M + N].
struct Prompted {
    embeds: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor,
}

impl Prompted {
    fn input(&self) -> EncoderInput<'_> {
        EncoderInput {
            embeds: &self.embeds,
            attention_mask: &self.attention_mask,
            token_type_ids: &self.token_type_ids,
        }
    }
}

/// The batch with `prompt` in front, on `backbone`'s embeddings.
fn prompted<B: Backbone>(backbone: &B, prompt: &SoftPrompt, batch: &Batch) -> Result<Prompted> {
    let m = prompt.len();
    Ok(Prompted {
        embeds: prompt.prepend(&backbone.embed_tokens(&batch.ids)?)?,
        attention_mask: extend_front(&batch.attention_mask, m, 1)?,
        token_type_ids: extend_front(&batch.type_ids, m, 0)?,
    })
}

/// Inference: [prompt; batch] → last hidden state [B, M + N, D], keeping nothing for a backward.
pub fn prompted_forward<B: Backbone>(
    backbone: &B,
    prompt: &SoftPrompt,
    batch: &Batch,
) -> Result<Tensor> {
    backbone.forward(&prompted(backbone, prompt, batch)?.input())
}

/// What a task head gives back for its loss on the last hidden state.
pub struct HeadBackward {
    pub loss: f64,
    /// ∂L/∂hidden [B, M + N, D]
    pub d_hidden: Tensor,
    /// the gradients of the head's own trainable tensors, if any
    pub param_grads: Vec<Tensor>,
}

/// [prompt; batch] through the frozen backbone, `head` on its last hidden state, and back: the
/// loss, then the gradients of the prompt and of the head's tensors, in that order.
///
/// `head` reads hidden [B, M + N, D] and the mask [B, M + N]; the backbone's backward is explicit.
pub fn prompted_loss_and_grads<B: Backbone>(
    backbone: &B,
    prompt: &SoftPrompt,
    batch: &Batch,
    head: impl FnOnce(&Tensor, &Tensor) -> anyhow::Result<HeadBackward>,
) -> anyhow::Result<(f64, Vec<Tensor>)> {
    let p = prompted(backbone, prompt, batch)?;
    let (hidden, activations) = backbone.forward_train(&p.input())?;
    let head = head(&hidden, &p.attention_mask)?;
    let d_embeds = backbone.backward(&head.d_hidden, activations)?;
    let mut gradients = vec![prompt.gradient(&d_embeds)?.to_dtype(DType::F32)?];
    gradients.extend(head.param_grads);
    Ok((head.loss, gradients))
}

/// A head's loss from candle's tape: `loss` builds it from the hidden state, which is made a
/// fresh `Var` so that ∂L/∂hidden comes back, with the gradients of `params`.
pub fn taped_head(
    hidden: &Tensor,
    params: &[&Var],
    loss: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> anyhow::Result<HeadBackward> {
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
        .collect::<anyhow::Result<_>>()?;
    Ok(HeadBackward {
        loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        d_hidden,
        param_grads,
    })
}

impl<B: Backbone> PromptClassifier<B> {
    /// The trainable tensors, in the order `loss_and_grads` returns their gradients.
    pub fn params(&self) -> Vec<&Var> {
        let mut params = vec![&self.prompt.embeddings];
        if self.label_words.is_none() {
            params.extend([&self.head.weight, &self.head.bias]);
        }
        params
    }

    /// The mean cross-entropy of a labelled batch and the gradients of `params()`.
    pub fn loss_and_grads(&self, batch: &Batch) -> anyhow::Result<(f64, Vec<Tensor>)> {
        let labels = batch
            .labels
            .as_ref()
            .context("a training batch needs labels")?;
        let m = self.prompt.len();
        prompted_loss_and_grads(&self.backbone, &self.prompt, batch, |hidden, mask| {
            taped_head(hidden, &self.params()[1..], |hidden| {
                cross_entropy(&self.head.forward(hidden, mask, m)?, labels)
            })
        })
    }

    /// The head as an adapter stores it.
    pub fn adapter_head(&self) -> AdapterHead {
        match &self.label_words {
            Some(words) => AdapterHead::Verbalizer {
                words: words.clone(),
            },
            None => AdapterHead::Linear {
                weight: self.head.weight.as_tensor().clone(),
                bias: self.head.bias.as_tensor().clone(),
                pool: self.head.pool,
            },
        }
    }

    /// The classifier as it stands, as a task for the inference path (`multitask`).
    pub fn task(&self) -> Task {
        Task {
            prompt: self.prompt.embeddings.as_tensor().detach(),
            head: self.head.clone(),
            labels: self.labels.clone(),
            template: self.template.clone(),
        }
    }

    /// Logits [N, C] for every example, in the data set's order.
    pub fn predict_all(
        &self,
        data: &[Encoded],
        batch_size: usize,
        padding: Padding,
        device: &Device,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let task = self.task();
        let answers = ensemble_all(&self.backbone, &[&task], data, batch_size, padding, device)?;
        Ok(answers
            .into_iter()
            .map(|mut a| a.logits.swap_remove(0))
            .collect())
    }
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
