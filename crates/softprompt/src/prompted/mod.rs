//! The method itself (Lester et al. 2021): the soft prompt goes in front of the word embeddings,
//! the frozen backbone reads [P; X], a task head scores its last hidden state, and the gradient
//! comes back through the backbone's explicit backward to the prompt's rows.
//!
//! ```text
//! Batch ──embed──▶ [P; X] [B, M + N, D] ──Backbone::forward_train──▶ hidden [B, M + N, D]
//!                                                                       │ Head::loss
//! d_prompt [M, D] ◀──rows 0..M, summed over B── d_embeds ◀──backward── d_hidden
//! ```
//!
//! `PromptedModel` is that for any `Head`: the classifier (a linear layer, or the verbalizer's
//! frozen LM-head rows; `classifier.rs`) and the causal LM that learns to write targets
//! (`causal_lm.rs`). The training loop and the bench drive it through `Trainee`, whatever the head.

mod causal_lm;
mod classifier;

pub use causal_lm::{generation_score, CausalLm};
pub use classifier::Classifier;

use crate::adapter::{Adapter, AdapterHead, PeftConfig};
use crate::backbone::{Backbone, BackboneInput};
use crate::batch::{Batch, Batching, EncodedSet};
use crate::prompt::{extend_front, SoftPrompt};
use crate::task::HeadBackward;
use crate::template::Template;
use crate::Result;
use candle_core::{DType, Tensor, Var};

/// A batch with the prompt in front: embeddings [B, M + N, D], mask and token types [B, M + N].
pub struct Prompted {
    pub embeds: Tensor,
    pub attention_mask: Tensor,
    pub token_type_ids: Tensor,
}

impl Prompted {
    /// The batch with `prompt` in front, on `backbone`'s embeddings.
    pub fn new<B: Backbone>(backbone: &B, prompt: &SoftPrompt, batch: &Batch) -> Result<Self> {
        let m = prompt.len();
        Ok(Self {
            embeds: prompt.prepend(&backbone.embed_tokens(&batch.ids)?)?,
            attention_mask: extend_front(&batch.attention_mask, m, 1)?,
            token_type_ids: extend_front(&batch.type_ids, m, 0)?,
        })
    }

    pub fn input(&self) -> BackboneInput<'_> {
        BackboneInput {
            embeds: &self.embeds,
            attention_mask: &self.attention_mask,
            token_type_ids: &self.token_type_ids,
            reads: None,
        }
    }
}

/// Inference: [prompt; batch] → last hidden state [B, M + N, D], keeping nothing for a backward.
pub fn prompted_forward<B: Backbone>(
    backbone: &B,
    prompt: &SoftPrompt,
    batch: &Batch,
) -> Result<Tensor> {
    Ok(backbone.forward(&Prompted::new(backbone, prompt, batch)?.input())?)
}

/// A dev-set evaluation. `accuracy` is what early stopping and the best adapter follow: a
/// classifier's accuracy, a causal LM's exact match.
#[derive(Debug, Clone, PartialEq)]
pub struct DevScore {
    pub accuracy: f64,
    /// classification only
    pub macro_f1: Option<f64>,
    /// mean cross-entropy per example (classification) or per target token (causal LM)
    pub loss: f64,
}

/// What reads the backbone's last hidden state: its trainable tensors, its loss and the loss's
/// gradient, how it is scored, and what of it an adapter stores.
pub trait Head {
    /// The head's own trainable tensors (none for a head that is the frozen model's).
    fn params(&self) -> Vec<&Var>;

    /// hidden [B, M + N, D] and mask [B, M + N] of `batch` with a prompt of `prompt_len` in
    /// front → the loss, ∂L/∂hidden and the gradients of `params()`.
    fn loss(
        &self,
        hidden: &Tensor,
        mask: &Tensor,
        batch: &Batch,
        prompt_len: usize,
    ) -> Result<HeadBackward>;

    /// How well `prompt` on `backbone` does with this head on a labelled set.
    fn score<B: Backbone>(
        &self,
        backbone: &B,
        prompt: &SoftPrompt,
        set: &EncodedSet,
        batching: &Batching,
    ) -> Result<DevScore>;

    /// What an adapter stores of the head, and the label names.
    fn saved(&self) -> (AdapterHead, Vec<String>);

    /// The rows of the B·S [B·R] that `loss` reads of the hidden state, R in each batch row
    /// (`BackboneInput::reads`); `None` when it reads them all.
    fn reads(&self, _mask: &Tensor, _prompt_len: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// A frozen backbone, the trainable prompt in front of it and a task head behind it.
pub struct PromptedModel<B: Backbone, H: Head> {
    pub backbone: B,
    pub prompt: SoftPrompt,
    pub head: H,
    /// what each input is written into before tokenizing
    pub template: Option<Template>,
}

/// What the training loop (and `softprompt bench`) trains: one object-safe face for a
/// `PromptedModel` of any head.
pub trait Trainee {
    /// The trainable tensors: the prompt, then the head's, in the order of their gradients and of
    /// the checkpoint's names.
    fn params(&self) -> Vec<&Var>;
    /// [prompt; batch] through the frozen backbone, the head on its last hidden state, and back:
    /// the loss, then the gradients of `params()`.
    fn loss_and_grads(&self, batch: &Batch) -> Result<(f64, Vec<Tensor>)>;
    fn score(&self, set: &EncodedSet, batching: &Batching) -> Result<DevScore>;
    /// The adapter as it stands.
    fn adapter(&self, peft: &PeftConfig) -> Result<Adapter>;
}

impl<B: Backbone, H: Head> Trainee for PromptedModel<B, H> {
    fn params(&self) -> Vec<&Var> {
        let mut params = vec![&self.prompt.embeddings];
        params.extend(self.head.params());
        params
    }

    fn loss_and_grads(&self, batch: &Batch) -> Result<(f64, Vec<Tensor>)> {
        let p = {
            let _span = tracing::trace_span!("embed").entered();
            Prompted::new(&self.backbone, &self.prompt, batch)?
        };
        let reads = self.head.reads(&p.attention_mask, self.prompt.len())?;
        let (hidden, activations) = {
            let _span = tracing::trace_span!("backbone.forward").entered();
            let input = BackboneInput {
                reads: reads.as_ref(),
                ..p.input()
            };
            self.backbone.forward_train(&input)?
        };
        let head = {
            let _span = tracing::trace_span!("head").entered();
            self.head
                .loss(&hidden, &p.attention_mask, batch, self.prompt.len())?
        };
        let d_embeds = {
            let _span = tracing::trace_span!("backbone.backward").entered();
            self.backbone.backward(&head.d_hidden, activations)?
        };
        let _span = tracing::trace_span!("prompt.gradient").entered();
        let mut gradients = vec![self.prompt.gradient(&d_embeds)?.to_dtype(DType::F32)?];
        gradients.extend(head.param_grads);
        Ok((head.loss, gradients))
    }

    fn score(&self, set: &EncodedSet, batching: &Batching) -> Result<DevScore> {
        self.head.score(&self.backbone, &self.prompt, set, batching)
    }

    fn adapter(&self, peft: &PeftConfig) -> Result<Adapter> {
        let (head, labels) = self.head.saved();
        Ok(Adapter {
            config: peft.clone(),
            prompt: self.prompt.embeddings.as_tensor().to_dtype(DType::F32)?,
            head,
            labels,
            template: self.template.clone(),
        })
    }
}
