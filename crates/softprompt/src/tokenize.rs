//! Text → token ids with the model's own `tokenizer.json`.

use anyhow::{anyhow, Context};
use std::path::Path;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// One tokenized example, special tokens included, no padding.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// how many of the last `ids` are a target the model learns to write (`--task causal-lm`); 0 otherwise
    pub target_len: usize,
}

pub struct TextEncoder {
    tokenizer: Tokenizer,
}

impl TextEncoder {
    /// Loads `tokenizer.json` and makes every encoding at most `max_tokens` long. The file's own
    /// padding is turned off (some ship with fixed-length padding): batches pad themselves.
    pub fn from_file(path: &Path, max_tokens: usize) -> anyhow::Result<Self> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load the tokenizer {}: {e}", path.display()))?;
        Self::new(tokenizer, max_tokens)
    }

    /// `from_file` for a tokenizer already in memory (a GGUF file's).
    pub fn new(mut tokenizer: Tokenizer, max_tokens: usize) -> anyhow::Result<Self> {
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
                stride: 0,
            }))
            .map_err(|e| anyhow!("cannot set truncation to {max_tokens} tokens: {e}"))?;
        Ok(Self { tokenizer })
    }

    pub fn encode(&self, text: &str, text_pair: Option<&str>) -> anyhow::Result<Encoded> {
        Ok(self.encode_noting_truncation(text, text_pair)?.0)
    }

    /// Like `encode`, and says whether the text was cut to fit (a server may refuse it instead).
    pub fn encode_noting_truncation(
        &self,
        text: &str,
        text_pair: Option<&str>,
    ) -> anyhow::Result<(Encoded, bool)> {
        let encoding = match text_pair {
            Some(pair) => self.tokenizer.encode((text, pair), true),
            None => self.tokenizer.encode(text, true),
        }
        .map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        let truncated = !encoding.get_overflowing().is_empty();
        Ok((
            Encoded {
                ids: encoding.get_ids().to_vec(),
                type_ids: encoding.get_type_ids().to_vec(),
                target_len: 0,
            },
            truncated,
        ))
    }

    /// The most tokens an encoding may have.
    pub fn max_tokens(&self) -> usize {
        self.tokenizer
            .get_truncation()
            .map_or(usize::MAX, |t| t.max_length)
    }

    /// Token ids without special tokens or truncation (prompt init text, label words).
    pub fn plain_ids(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut plain = self.tokenizer.clone();
        plain.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
        let encoding = plain
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids of ordinary whole-word tokens: letters only, no special, unused or continuation pieces.
    pub fn word_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .tokenizer
            .get_vocab(false)
            .into_iter()
            .filter(|(token, _)| token.len() > 1 && token.chars().all(|c| c.is_alphabetic()))
            .map(|(_, id)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Ids → text, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("cannot decode {ids:?}: {e}"))
    }

    pub fn token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }
}

/// Encodes every example, naming the file and line of one that fails.
pub fn encode_all(
    encoder: &TextEncoder,
    examples: &[crate::data::Example],
    path: &Path,
) -> anyhow::Result<Vec<Encoded>> {
    examples
        .iter()
        .map(|e| {
            encoder
                .encode(&e.text, e.text_pair.as_deref())
                .with_context(|| format!("{} line {}", path.display(), e.line))
        })
        .collect()
}
