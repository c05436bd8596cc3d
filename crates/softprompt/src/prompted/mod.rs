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
use crate::backbone::{Backbone, BackboneInput, InputGradients, Prefix};
use crate::batch::{Batch, Batching, EncodedSet};
use crate::metrics::Report;
use crate::prompt::{extend_front, Placement, SoftPrompt};
use crate::prompt_encoder::TrainablePrompt;
use crate::task::causal_lm::TargetCounts;
use crate::task::HeadBackward;
use crate::template::Template;
use crate::{Context, Result};
use candle_core::{DType, Tensor, Var};

/// A batch with the prompt in front: embeddings [B, M + N, D], mask and token types [B, M + N];
/// a prefix's M positions are not in them but in `prefix`, in front of every layer's attention.
/// An encoder-decoder's decoder rows are embedded in `decoder` [B, W, D] (the start token alone
/// for a batch that brings none; an encoder-decoder prompt's decoder rows in front), and the
/// backbone returns their hidden states.
pub struct Prompted {
    pub embeds: Tensor,
    pub attention_mask: Tensor,
    pub token_type_ids: Tensor,
    pub prefix: Option<Prefix>,
    pub decoder: Option<Tensor>,
    /// [B, W] u32: 1 for the decoder positions each row reads
    decoder_mask: Option<Tensor>,
    /// the columns of the hidden state the backbone returns that the prompt takes (`output_mask`)
    output_front: usize,
}

impl Prompted {
    /// The batch with `prompt` in front, on `backbone`'s embeddings.
    pub fn new<B: Backbone>(backbone: &B, prompt: &SoftPrompt, batch: &Batch) -> Result<Self> {
        let word = backbone.embed_tokens(&batch.ids)?;
        let prefix = prompt.prefix_for(batch.ids.dim(0)?)?;
        let decoder_rows = match &batch.decoder {
            Some((ids, lengths)) => {
                let width = ids.dim(1)?;
                let real = lengths
                    .iter()
                    .flat_map(|&n| (0..width).map(move |i| u32::from(i < n)));
                let mask = Tensor::from_iter(real, ids.device())?.reshape(ids.shape())?;
                Some((backbone.embed_tokens(ids)?, mask))
            }
            None => match backbone.start_rows(batch.len())? {
                Some(rows) => {
                    let mask =
                        Tensor::ones((rows.dim(0)?, rows.dim(1)?), DType::U32, rows.device())?;
                    Some((rows, mask))
                }
                None => None,
            },
        };
        let (decoder, decoder_mask, output_front) = match decoder_rows {
            Some((rows, mask)) => {
                let n = prompt.decoder_front();
                (
                    Some(prompt.prepend_decoder(&rows, batch.tasks.as_ref())?),
                    Some(extend_front(&mask, n, 1)?),
                    n,
                )
            }
            None => (None, None, prompt.front()),
        };
        if prefix.is_some() {
            return Ok(Self {
                embeds: word,
                attention_mask: batch.attention_mask.clone(),
                token_type_ids: batch.type_ids.clone(),
                prefix,
                decoder,
                decoder_mask,
                output_front,
            });
        }
        let m = prompt.front();
        Ok(Self {
            embeds: prompt.prepend(&word, batch.tasks.as_ref())?,
            attention_mask: extend_front(&batch.attention_mask, m, 1)?,
            token_type_ids: extend_front(&batch.type_ids, m, 0)?,
            prefix,
            decoder,
            decoder_mask,
            output_front,
        })
    }

    /// The mask of the hidden state the backbone returns and the prompt columns in front of it
    /// (`Head::loss`'s): the input's, or an encoder-decoder's decoder rows, which hold only an
    /// encoder-decoder prompt's decoder rows.
    pub fn output_mask(&self) -> (&Tensor, usize) {
        let mask = self.decoder_mask.as_ref().unwrap_or(&self.attention_mask);
        (mask, self.output_front)
    }

    pub fn input(&self) -> BackboneInput<'_> {
        BackboneInput {
            embeds: &self.embeds,
            attention_mask: &self.attention_mask,
            token_type_ids: &self.token_type_ids,
            reads: None,
            prefix: self.prefix.as_ref(),
            decoder: self.decoder.as_ref(),
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

/// What an evaluation counts, as sums that add up over the parts of a set scored apart (each
/// rank scores a shard of the dev set): `score` makes the figures of the whole.
#[derive(Debug, Clone, PartialEq)]
pub enum DevTally {
    /// confusion[gold][predicted], and the cross-entropy summed over the examples
    Classes {
        labels: Vec<String>,
        confusion: Vec<Vec<usize>>,
        loss: f64,
    },
    Targets(TargetCounts),
}

impl DevTally {
    /// The counts and sums, in a fixed order, to be added up across ranks.
    pub fn sums(&self) -> Vec<f64> {
        match self {
            DevTally::Classes {
                confusion, loss, ..
            } => {
                let counts = confusion.iter().flatten().map(|&n| n as f64);
                counts.chain([*loss]).collect()
            }
            DevTally::Targets(c) => {
                let counts = [c.examples, c.exact, c.correct, c.tokens].map(|n| n as f64);
                counts.into_iter().chain([c.loss]).collect()
            }
        }
    }

    /// The tally of the same kind whose `sums()` are `sums`.
    pub fn with_sums(self, sums: &[f64]) -> Self {
        let count = |x: f64| x.round() as usize;
        match self {
            DevTally::Classes { labels, .. } => {
                let c = labels.len();
                let confusion = (0..c)
                    .map(|g| sums[g * c..(g + 1) * c].iter().map(|&x| count(x)).collect())
                    .collect();
                DevTally::Classes {
                    labels,
                    confusion,
                    loss: sums[c * c],
                }
            }
            DevTally::Targets(_) => DevTally::Targets(TargetCounts {
                examples: count(sums[0]),
                exact: count(sums[1]),
                correct: count(sums[2]),
                tokens: count(sums[3]),
                loss: sums[4],
            }),
        }
    }

    /// This tally and `other`'s, of another part of the same set, added up.
    pub fn plus(self, other: &DevTally) -> Self {
        let mut sums = self.sums();
        sums.iter_mut().zip(other.sums()).for_each(|(s, o)| *s += o);
        self.with_sums(&sums)
    }

    pub fn score(&self) -> DevScore {
        match self {
            DevTally::Classes {
                labels,
                confusion,
                loss,
            } => {
                let report = Report::from_confusion(labels, confusion.clone());
                DevScore {
                    accuracy: report.accuracy,
                    macro_f1: Some(report.macro_f1),
                    loss: loss / report.examples.max(1) as f64,
                }
            }
            DevTally::Targets(counts) => {
                let score = counts.score();
                DevScore {
                    accuracy: score.exact_match,
                    macro_f1: None,
                    loss: score.token_loss,
                }
            }
        }
    }
}

/// What reads the backbone's last hidden state: its trainable tensors, its loss and the loss's
/// gradient, how it is scored, and what of it an adapter stores.
pub trait Head {
    /// The head's own trainable tensors (none for a head that is the frozen model's).
    fn params(&self) -> Vec<&Var>;

    /// hidden [B, M + N, D] and mask [B, M + N] of `batch` with a prompt of `prompt_len` in
    /// front (0 for a prefix: `SoftPrompt::front`; an encoder-decoder's are its decoder's, with
    /// the prompt's decoder rows in front: `Prompted::output_mask`) → the loss, ∂L/∂hidden and
    /// the gradients of `params()`.
    fn loss(
        &self,
        hidden: &Tensor,
        mask: &Tensor,
        batch: &Batch,
        prompt_len: usize,
    ) -> Result<HeadBackward>;

    /// How many terms `loss` is the mean of on `batch` (its examples, or its target tokens): what
    /// a rank's share of a global batch weighs.
    fn loss_terms(&self, batch: &Batch, prompt_len: usize) -> Result<usize>;

    /// What `prompt` on `backbone` gets right and wrong with this head on a labelled set.
    fn tally<B: Backbone>(
        &self,
        backbone: &B,
        prompt: &SoftPrompt,
        set: &EncodedSet,
        batching: &Batching,
    ) -> Result<DevTally>;

    /// What an adapter stores of the head, and the label names.
    fn saved(&self) -> (AdapterHead, Vec<String>);

    /// The rows of the B·S [B·R] that `loss` reads of the hidden state, R in each batch row
    /// (`BackboneInput::reads`); `None` when it reads them all.
    fn reads(&self, _mask: &Tensor, _prompt_len: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether `loss` reads the prompt's own rows of `batch`'s hidden state (a pooled first
    /// vector; a target that starts the input, predicted from the prompt's last row): then a
    /// decoder cannot compute the prompt once for the batch (`shares_prompt`).
    fn reads_prompt(&self, _batch: &Batch) -> bool {
        false
    }
}

/// A frozen backbone, the trainable prompt in front of it and a task head behind it.
pub struct PromptedModel<B: Backbone, H: Head> {
    pub backbone: B,
    pub prompt: TrainablePrompt,
    pub head: H,
    /// what each input is written into before tokenizing
    pub template: Option<Template>,
}

impl<B: Backbone, H: Head> PromptedModel<B, H> {
    /// [prompt; batch] through the frozen backbone, the head on its last hidden state, and back:
    /// the head's loss and gradients, and the backbone's input gradients.
    fn through_backbone(
        &self,
        prompt: &SoftPrompt,
        batch: &Batch,
    ) -> Result<(HeadBackward, InputGradients)> {
        let p = {
            let _span = tracing::trace_span!("embed").entered();
            Prompted::new(&self.backbone, prompt, batch)?
        };
        let (mask, front) = p.output_mask();
        let reads = self.head.reads(mask, front)?;
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
            self.head.loss(&hidden, mask, batch, front)?
        };
        let _span = tracing::trace_span!("backbone.backward").entered();
        let input_grads = self.backbone.backward(&head.d_hidden, activations, None)?;
        Ok((head, input_grads))
    }

    /// The same loss and ∂L/∂P [M, D] with a decoder's prompt rows computed once for the batch,
    /// not once per row: they never read the input (causal attention, the prompt first), so one
    /// pass over P alone gives every layer's keys and values of its rows, the batch reads them as a
    /// prefix (its positions after the prompt's, as in [P; X]), and the prefix's gradient, summed
    /// over the batch, goes back through that one pass into P.
    fn shared_prompt_loss(
        &self,
        prompt: &SoftPrompt,
        batch: &Batch,
    ) -> Result<(HeadBackward, Tensor)> {
        let (m, device) = (prompt.len(), batch.ids.device());
        let (prompt_pass, activations) = {
            let _span = tracing::trace_span!("prompt.forward").entered();
            let table = prompt.embeddings.as_tensor().detach();
            let (kv, activations) = self.backbone.prompt_pass(&table)?;
            (SoftPrompt::placed(&kv, Placement::Prefix)?, activations)
        };
        let (head, input_grads) = self.through_backbone(&prompt_pass, batch)?;
        let _span = tracing::trace_span!("prompt.backward").entered();
        let d_kv = prompt_pass.gradient(&input_grads, None)?.unsqueeze(0)?;
        let d = self.backbone.hidden_size();
        let nothing = Tensor::zeros((1, m, d), d_kv.dtype(), device)?;
        let grads = self.backbone.backward(&nothing, activations, Some(&d_kv))?;
        Ok((head, grads.embeds.squeeze(0)?))
    }
}

/// What the training loop (and `softprompt bench`) trains: one object-safe face for a
/// `PromptedModel` of any head.
pub trait Trainee {
    /// The trainable tensors: the prompt's (or its encoder's), then the head's, in the order of
    /// their gradients.
    fn params(&self) -> Vec<&Var>;
    /// The names `params()` have in the checkpoint.
    fn param_names(&self) -> Vec<String>;
    /// [prompt; batch] through the frozen backbone, the head on its last hidden state, and back:
    /// the loss, then the gradients of `params()`.
    fn loss_and_grads(&self, batch: &Batch) -> Result<(f64, Vec<Tensor>)>;
    /// `Head::loss_terms`
    fn loss_terms(&self, batch: &Batch) -> Result<usize>;
    fn tally(&self, set: &EncodedSet, batching: &Batching) -> Result<DevTally>;
    /// The adapter as it stands.
    fn adapter(&self, peft: &PeftConfig) -> Result<Adapter>;
}

impl<B: Backbone, H: Head> Trainee for PromptedModel<B, H> {
    fn params(&self) -> Vec<&Var> {
        let mut params: Vec<&Var> = self
            .prompt
            .named_params()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        params.extend(self.head.params());
        params
    }

    fn param_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .prompt
            .named_params()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        names.extend(
            ["head.weight", "head.bias"]
                .into_iter()
                .take(self.head.params().len())
                .map(String::from),
        );
        names
    }

    fn loss_and_grads(&self, batch: &Batch) -> Result<(f64, Vec<Tensor>)> {
        let (prompt, encoded) = {
            let _span = tracing::trace_span!("prompt.encode").entered();
            self.prompt.forward()?
        };
        let shared = prompt.placement == Placement::Embeddings
            && !prompt.is_multitask()
            && self.backbone.shares_prompt()
            && !self.head.reads_prompt(batch);
        let (head, d_prompt) = if shared {
            self.shared_prompt_loss(&prompt, batch)?
        } else {
            let (head, input_grads) = self.through_backbone(&prompt, batch)?;
            let _span = tracing::trace_span!("prompt.gradient").entered();
            (head, prompt.gradient(&input_grads, batch.tasks.as_ref())?)
        };
        let mut gradients = Vec::new();
        for g in self.prompt.backward(encoded.as_ref(), d_prompt)? {
            gradients.push(g.to_dtype(DType::F32)?);
        }
        gradients.extend(head.param_grads);
        Ok((head.loss, gradients))
    }

    fn loss_terms(&self, batch: &Batch) -> Result<usize> {
        self.head.loss_terms(batch, self.prompt.front())
    }

    /// A multitask prompt is scored task by task: each task's rows with its own prompt.
    fn tally(&self, set: &EncodedSet, batching: &Batching) -> Result<DevTally> {
        let prompt = self.prompt.current()?;
        if !prompt.is_multitask() {
            return self.head.tally(&self.backbone, &prompt, set, batching);
        }
        let tasks = set
            .tasks
            .as_ref()
            .context("a multitask prompt is scored on rows with tasks")?;
        let mut total: Option<DevTally> = None;
        for t in 0..prompt.embeddings.dim(0)? {
            let rows: Vec<usize> = (0..tasks.len()).filter(|&r| tasks[r] == t as u32).collect();
            if rows.is_empty() {
                continue;
            }
            let part = set.rows(&rows);
            let tally = self
                .head
                .tally(&self.backbone, &prompt.task(t)?, &part, batching)?;
            total = Some(match total {
                Some(sum) => sum.plus(&tally),
                None => tally,
            });
        }
        total.context("no rows to score")
    }

    fn adapter(&self, peft: &PeftConfig) -> Result<Adapter> {
        let (head, labels) = self.head.saved();
        let (prompt, tasks) = self.prompt.saved()?;
        Ok(Adapter {
            config: peft.clone(),
            prompt: prompt.to_dtype(DType::F32)?,
            tasks,
            head,
            labels,
            template: self.template.clone(),
            method: self.prompt.method(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::DevTally;
    use crate::metrics::confusion;
    use crate::task::causal_lm::TargetCounts;

    /// The sums of two halves of a set, added, make the whole set's tally and score.
    #[test]
    fn tallies_of_parts_add_up_to_the_whole() {
        let labels = vec!["a".to_string(), "b".into(), "c".into()];
        let (gold, predicted) = ([0, 1, 2, 2, 1, 0, 0], [0, 2, 2, 1, 1, 0, 1]);
        let losses = [0.1, 1.5, 0.2, 0.9, 0.3, 0.05, 1.1];
        let tally = |rows: std::ops::Range<usize>| DevTally::Classes {
            labels: labels.clone(),
            confusion: confusion(3, &gold[rows.clone()], &predicted[rows.clone()]),
            loss: losses[rows].iter().sum(),
        };
        let whole = tally(0..7);
        let (mut sums, other) = (tally(0..3).sums(), tally(3..7).sums());
        sums.iter_mut().zip(&other).for_each(|(s, o)| *s += o);
        let added = tally(0..0).with_sums(&sums);
        assert_eq!(added.score().accuracy, whole.score().accuracy);
        assert_eq!(added.score().macro_f1, whole.score().macro_f1);
        assert!((added.score().loss - whole.score().loss).abs() < 1e-12);
        assert_eq!(whole.score().accuracy, 4.0 / 7.0);

        let counts = TargetCounts {
            examples: 5,
            exact: 2,
            correct: 9,
            tokens: 14,
            loss: 7.5,
        };
        let targets = DevTally::Targets(counts);
        assert_eq!(targets.clone().with_sums(&targets.sums()), targets);
        assert_eq!(targets.score().accuracy, 0.4);
        assert_eq!(targets.score().loss, 7.5 / 14.0);
    }
}
