//! Classification as text: the paper's setup for decoders. The input is written into a template
//! ("Review: {text}\nSentiment:"), and each label is scored by the frozen LM head's logit for the
//! first token of the label's word at the last real position. Nothing is trained but the prompt.
//!
//! The scores are a `ClassificationHead` whose weight rows are the LM head's rows for those tokens
//! (frozen), with no bias, reading the last real position: the same head code and the same tape
//! as a trained linear head.

use crate::kernels::Weight;
use crate::task::classify::{ClassificationHead, Pool};
use crate::tokenize::TextEncoder;
use anyhow::bail;
use candle_core::{DType, Tensor};

/// Where the text goes in a template.
pub const TEXT_SLOT: &str = "{text}";

/// The input written into a template; without one, the input as it is.
pub fn render(template: Option<&str>, text: &str) -> String {
    match template {
        Some(t) => t.replace(TEXT_SLOT, text),
        None => text.to_string(),
    }
}

pub fn check_template(template: &str) -> anyhow::Result<()> {
    if !template.contains(TEXT_SLOT) {
        bail!("the template {template:?} has no {TEXT_SLOT} to put the input in");
    }
    Ok(())
}

/// `word` as a model would write it right after `before`: with a leading space, unless one side
/// already has whitespace there.
pub fn continuation(before: &str, word: &str) -> String {
    if before.is_empty()
        || before.ends_with(char::is_whitespace)
        || word.starts_with(char::is_whitespace)
    {
        word.to_string()
    } else {
        format!(" {word}")
    }
}

/// The token each label's word starts with, as the model would write it right after the template.
pub fn label_tokens(
    encoder: &TextEncoder,
    template: &str,
    labels: &[String],
    words: &[String],
) -> anyhow::Result<Vec<u32>> {
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
pub fn head(lm_head: &Weight, tokens: &[u32]) -> anyhow::Result<ClassificationHead> {
    let device = lm_head.device();
    let weight = lm_head
        .rows(&Tensor::new(tokens, &device)?)?
        .to_dtype(DType::F32)?;
    let bias = Tensor::zeros(tokens.len(), DType::F32, &device)?;
    ClassificationHead::from_tensors(&weight, &bias, Pool::Last, None)
}
