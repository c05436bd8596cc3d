//! Text → token ids with the model's own `tokenizer.json`.

use crate::template::{render, Template};
use crate::Context;
use std::path::Path;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// One tokenized example, special tokens included, no padding.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// how many of the last `ids` are a target the model learns to write (`--task causal-lm`); 0 otherwise
    pub target_len: usize,
    /// an encoder-decoder's decoder row (`--task seq2seq`): the decoder start token, the target
    /// and EOS, each position predicting the next; empty otherwise
    pub decoder_ids: Vec<u32>,
}

pub struct TextEncoder {
    /// cuts an encoding at the most tokens an example may have
    tokenizer: Tokenizer,
    /// the same without the cut, to measure and to cut more carefully (`encode_fitted`)
    whole: Tokenizer,
}

impl TextEncoder {
    /// Loads `tokenizer.json` and makes every encoding at most `max_tokens` long. The file's own
    /// padding is turned off (some ship with fixed-length padding): batches pad themselves.
    pub fn from_file(path: &Path, max_tokens: usize) -> crate::Result<Self> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| crate::invalid!("cannot load the tokenizer {}: {e}", path.display()))?;
        Self::new(tokenizer, max_tokens)
    }

    /// `from_file` for a tokenizer already in memory (a GGUF file's).
    pub fn new(mut tokenizer: Tokenizer, max_tokens: usize) -> crate::Result<Self> {
        tokenizer.with_padding(None);
        let mut whole = tokenizer.clone();
        whole
            .with_truncation(None)
            .map_err(|e| crate::invalid!("{e}"))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
                stride: 0,
            }))
            .map_err(|e| crate::invalid!("cannot set truncation to {max_tokens} tokens: {e}"))?;
        Ok(Self { tokenizer, whole })
    }

    /// `encode_fitted` without a template, in at most `max_tokens`.
    pub fn encode(&self, text: &str, text_pair: Option<&str>) -> crate::Result<Encoded> {
        Ok(self
            .encode_fitted(None, text, text_pair, self.max_tokens())?
            .0)
    }

    /// `text` written into `template`, with `text_pair` after it, encoded
    /// in at most `room` tokens (and at most `max_tokens`); says whether anything was cut. What is
    /// cut is the end of `text`, at a token boundary, never the template around it: a template's
    /// tail ("…\nSentiment:") is what the model answers after. Only when the template and the
    /// pair do not fit even with no text at all does the tokenizer cut the whole.
    pub fn encode_fitted(
        &self,
        template: Option<&Template>,
        text: &str,
        text_pair: Option<&str>,
        room: usize,
    ) -> crate::Result<(Encoded, bool)> {
        let room = room.min(self.max_tokens());
        let text = self.long_enough_head(text, room)?;
        let encode =
            |tokenizer: &Tokenizer, text: &str| encode_with(tokenizer, template, text, text_pair);
        let whole = encode(&self.whole, text)?;
        if whole.ids.len() <= room {
            return Ok((whole, false));
        }
        // where the text may be cut: after each of its tokens, longest kept first found by bisection
        let ends: Vec<usize> = self
            .whole
            .encode(text, false)
            .map_err(|e| crate::invalid!("cannot tokenize {:?}: {e}", preview(text)))?
            .get_offsets()
            .iter()
            .map(|&(_, end)| end)
            .filter(|&end| text.is_char_boundary(end))
            .collect();
        let cut_at = |keep: usize| &text[..if keep == 0 { 0 } else { ends[keep - 1] }];
        let (mut fits, mut fails) = (None, ends.len());
        let mut lo = 0;
        while lo < fails {
            let mid = (lo + fails) / 2;
            let encoded = encode(&self.whole, cut_at(mid))?;
            if encoded.ids.len() <= room {
                fits = Some(encoded);
                lo = mid + 1;
            } else {
                fails = mid;
            }
        }
        let mut encoded = match fits {
            Some(encoded) => encoded,
            None => encode(&self.tokenizer, text)?,
        };
        encoded.ids.truncate(room);
        encoded.type_ids.truncate(room);
        Ok((encoded, true))
    }

    /// `text` written into `template` and encoded whole, or `None` if that is more than `room`
    /// tokens (generation continues a text's end, so it is never cut). A text whose head alone is
    /// over twice that is refused without tokenizing the rest.
    pub fn encode_within(
        &self,
        template: Option<&Template>,
        text: &str,
        room: usize,
    ) -> crate::Result<Option<Encoded>> {
        let room = room.min(self.max_tokens());
        if self.long_enough_head(text, room)?.len() < text.len() {
            return Ok(None);
        }
        let encoded = encode_with(&self.whole, template, text, None)?;
        Ok((encoded.ids.len() <= room).then_some(encoded))
    }

    /// A text far longer than `room` tokens can hold is cut to a head that still holds over
    /// twice as many, so that the cut point is found in that head (a 1 MB input costs what its
    /// first kilobytes do). Where the head holds fewer (runs of whitespace, say), the whole text
    /// is kept, so the answer is the same either way.
    fn long_enough_head<'t>(&self, text: &'t str, room: usize) -> crate::Result<&'t str> {
        // no tokenizer here spends more than this many bytes on one token of ordinary text
        const BYTES_PER_TOKEN: usize = 64;
        let mut end = room.saturating_mul(BYTES_PER_TOKEN);
        if end >= text.len() {
            return Ok(text);
        }
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let head = &text[..end];
        let tokens = self
            .whole
            .encode(head, false)
            .map_err(|e| crate::invalid!("cannot tokenize {:?}: {e}", preview(head)))?
            .len();
        Ok(if tokens > 2 * room { head } else { text })
    }

    /// The most tokens an encoding may have.
    pub fn max_tokens(&self) -> usize {
        self.tokenizer
            .get_truncation()
            .map_or(usize::MAX, |t| t.max_length)
    }

    /// Token ids without special tokens or truncation (prompt init text, label words).
    pub fn plain_ids(&self, text: &str) -> crate::Result<Vec<u32>> {
        let encoding = self
            .whole
            .encode(text, false)
            .map_err(|e| crate::invalid!("cannot tokenize {text:?}: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids of ordinary whole-word tokens: letters only, no special, unused or continuation pieces.
    pub fn word_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .tokenizer
            .get_vocab(false)
            .into_iter()
            .filter(|(token, _)| {
                // SentencePiece (T5) marks a word's start with '▁'
                let word = token.strip_prefix('\u{2581}').unwrap_or(token);
                word.chars().count() > 1 && word.chars().all(|c| c.is_alphabetic())
            })
            .map(|(_, id)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Ids → text, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> crate::Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| crate::invalid!("cannot decode {ids:?}: {e}"))
    }

    pub fn token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }
}

/// Encodes every example, written into `template`, naming the file and line of one that fails.
pub fn encode_all(
    encoder: &TextEncoder,
    examples: &[crate::data::Example],
    template: Option<&Template>,
    path: &Path,
) -> crate::Result<Vec<Encoded>> {
    examples
        .iter()
        .map(|e| {
            let room = encoder.max_tokens();
            Ok(encoder
                .encode_fitted(template, &e.text, e.text_pair.as_deref(), room)
                .with_context(|| format!("{} line {}", path.display(), e.line))?
                .0)
        })
        .collect()
}

/// `text` written into `template`, with `text_pair` after it, encoded with special tokens.
fn encode_with(
    tokenizer: &Tokenizer,
    template: Option<&Template>,
    text: &str,
    text_pair: Option<&str>,
) -> crate::Result<Encoded> {
    let input = render(template, text);
    match text_pair {
        Some(pair) => tokenizer.encode((input.as_str(), pair), true),
        None => tokenizer.encode(input.as_str(), true),
    }
    .map(|e| Encoded {
        ids: e.get_ids().to_vec(),
        type_ids: e.get_type_ids().to_vec(),
        target_len: 0,
        decoder_ids: Vec::new(),
    })
    .map_err(|e| crate::invalid!("cannot tokenize {:?}: {e}", preview(text)))
}

/// The start of a text, for an error message about it.
fn preview(text: &str) -> String {
    const SHOWN: usize = 80;
    match text.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}
