//! Classification as text: the paper's setup for decoders. The input is written into a template
//! ("Review: {text}\nSentiment:"), and each label is scored by the frozen LM head's logit for the
//! first token of the label's word at the last real position. Nothing is trained but the prompt.
//!
//! The scores are a `ClassificationHead` whose weight rows are the LM head's rows for those tokens
//! (frozen), with no bias, reading the last real position: the same head code and the same tape
//! as a trained linear head.

use crate::kernels::Weight;
use crate::task::classify::{ClassificationHead, Pool};
use crate::template::continuation;
use crate::tokenize::TextEncoder;
use crate::{bail, Result};
use candle_core::{DType, Tensor};

/// The token each label's word starts with, as the model would write it right after the template.
pub fn label_tokens(
    encoder: &TextEncoder,
    template: &str,
    labels: &[String],
    words: &[String],
) -> Result<Vec<u32>> {
    if words.len() != labels.len() {
        bail!(
            "{} label words for {} labels ({labels:?}); give one word per label, in the labels' order",
            words.len(),
            labels.len()
        );
    }
    let mut ids: Vec<u32> = Vec::with_capacity(words.len());
    for (label, word) in labels.iter().zip(words) {
        let written = continuation(template, word.trim());
        let Some(&first) = encoder.plain_ids(&written)?.first() else {
            bail!("the word {word:?} of label {label:?} tokenizes to nothing");
        };
        if let Some(i) = ids.iter().position(|&id| id == first) {
            bail!(
                "the words of labels {:?} and {label:?} both start with the token {:?}; give --label-words that differ in their first token",
                labels[i],
                encoder.token(first).unwrap_or_default()
            );
        }
        ids.push(first);
    }
    Ok(ids)
}

/// The scoring head: lm_head [V, D] rows of `tokens` → a frozen [C, D] head on the last position.
pub fn head(lm_head: &Weight, tokens: &[u32]) -> Result<ClassificationHead> {
    let device = lm_head.device();
    let weight = lm_head
        .rows(&Tensor::new(tokens, &device)?)?
        .to_dtype(DType::F32)?;
    let bias = Tensor::zeros(tokens.len(), DType::F32, &device)?;
    ClassificationHead::from_tensors(&weight, &bias, Pool::Last, None)
}
