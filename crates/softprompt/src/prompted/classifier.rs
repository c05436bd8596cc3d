//! Label scores on the last hidden state: a trained linear head on a pooled vector, or the
//! verbalizer's frozen LM-head rows of the label words (then only the prompt trains). Both are a
//! `ClassificationHead` with cross-entropy on the labels; they differ in what trains and in what
//! the adapter stores.

use super::{DevTally, Head, PromptedModel};
use crate::adapter::AdapterHead;
use crate::backbone::Backbone;
use crate::batch::{Batch, Batching, EncodedSet, Padding};
use crate::inference::{ensemble_all, LoadedAdapter};
use crate::metrics::confusion;
use crate::prompt::SoftPrompt;
use crate::task::classify::{argmax, cross_entropy, softmax, ClassificationHead};
use crate::task::{taped_head, HeadBackward};
use crate::tokenize::Encoded;
use crate::{Context, Result};
use candle_core::{Device, Tensor, Var};

pub struct Classifier {
    pub head: ClassificationHead,
    pub labels: Vec<String>,
    /// a verbalizer's label words, one per label: its head is the frozen LM head's and does not train
    pub label_words: Option<Vec<String>>,
}

impl Classifier {
    /// Logits [N, C] for every example, in the data set's order, through the inference path
    /// (`inference::ensemble_all` with this prompt as the one member).
    fn logits<B: Backbone>(
        &self,
        backbone: &B,
        prompt: &SoftPrompt,
        data: &[Encoded],
        batching: &Batching,
    ) -> Result<Vec<Vec<f32>>> {
        let adapter = LoadedAdapter {
            prompt: prompt.embeddings.as_tensor().detach(),
            placement: prompt.placement,
            head: self.head.clone(),
            labels: self.labels.clone(),
            template: None,
        }
        .read_once(backbone)?;
        let Batching {
            size,
            padding,
            device,
        } = batching;
        let answers = ensemble_all(backbone, &[&adapter], data, *size, *padding, device)?;
        Ok(answers
            .into_iter()
            .map(|mut a| a.logits.swap_remove(0))
            .collect())
    }
}

impl Head for Classifier {
    fn params(&self) -> Vec<&Var> {
        match self.label_words {
            Some(_) => Vec::new(),
            None => vec![&self.head.weight, &self.head.bias],
        }
    }

    /// The mean cross-entropy of the labels, through candle's tape (the head is small).
    fn loss(
        &self,
        hidden: &Tensor,
        mask: &Tensor,
        batch: &Batch,
        prompt_len: usize,
    ) -> Result<HeadBackward> {
        let labels = batch
            .labels
            .as_ref()
            .context("a training batch needs labels")?;
        taped_head(hidden, &self.params(), |hidden| {
            cross_entropy(&self.head.forward(hidden, mask, prompt_len)?, labels)
        })
    }

    /// the mean is over the examples
    fn loss_terms(&self, batch: &Batch, _prompt_len: usize) -> Result<usize> {
        Ok(batch.len())
    }

    fn tally<B: Backbone>(
        &self,
        backbone: &B,
        prompt: &SoftPrompt,
        set: &EncodedSet,
        batching: &Batching,
    ) -> Result<DevTally> {
        let gold = set
            .labels
            .as_deref()
            .context("classification needs labels")?;
        let logits = self.logits(backbone, prompt, &set.data, batching)?;
        let predicted: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        let loss = logits
            .iter()
            .zip(gold)
            .map(|(l, &g)| -(softmax(l)[g as usize].max(f32::MIN_POSITIVE) as f64).ln())
            .sum::<f64>();
        Ok(DevTally::Classes {
            labels: self.labels.clone(),
            confusion: confusion(self.labels.len(), gold, &predicted),
            loss,
        })
    }

    fn saved(&self) -> (AdapterHead, Vec<String>) {
        let head = match &self.label_words {
            Some(words) => AdapterHead::Verbalizer {
                words: words.clone(),
            },
            None => AdapterHead::Linear {
                weight: self.head.weight.as_tensor().clone(),
                bias: self.head.bias.as_tensor().clone(),
                pool: self.head.pool,
            },
        };
        (head, self.labels.clone())
    }

    fn reads(&self, mask: &Tensor, prompt_len: usize) -> Result<Option<Tensor>> {
        Ok(Some(self.head.reads(mask, prompt_len)?))
    }

    fn reads_prompt(&self, _batch: &Batch) -> bool {
        self.head.reads_prompt()
    }
}

impl<B: Backbone> PromptedModel<B, Classifier> {
    /// Logits [N, C] for every example, in the data set's order.
    pub fn predict_all(
        &self,
        data: &[Encoded],
        batch_size: usize,
        padding: Padding,
        device: &Device,
    ) -> Result<Vec<Vec<f32>>> {
        let batching = Batching {
            size: batch_size,
            padding,
            device: device.clone(),
        };
        self.head
            .logits(&self.backbone, &self.prompt.current()?, data, &batching)
    }
}
