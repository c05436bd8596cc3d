//! Text generation with a decoder: [prompt; input] → next token → … with a KV cache, so each new
//! token costs one position, and a prefix cache, so an adapter's prompt is read once and every
//! request starts from its keys and values.
//!
//! ```text
//! prefix_cache(prompt)  ──clone──▶  extend(input tokens) → sample → extend(token) → sample → …
//! ```

use crate::backbone::any::AnyBackbone;
use crate::backbone::{Backbone, KvCache};
use crate::model::Model;
use crate::prompt::Placement;
use crate::template::Template;
use crate::tokenize::TextEncoder;
use crate::{bail, Context};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How tokens are picked and when to stop.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0: greedy (always the most likely token)
    pub temperature: f64,
    /// keep only the k most likely tokens
    pub top_k: Option<usize>,
    /// keep the fewest most likely tokens whose probabilities reach p
    pub top_p: Option<f64>,
    /// stop before the first of these appears in the output (it is not part of the answer)
    pub stop: Vec<String>,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            stop: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> crate::Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("the temperature must be 0 (greedy) or positive");
        }
        if self.top_k == Some(0) {
            bail!("top-k must be at least 1");
        }
        if self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            bail!("top-p must be in (0, 1]");
        }
        if self.stop.iter().any(String::is_empty) {
            bail!("a stop string is empty");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// max_new_tokens reached
    Length,
    /// a stop string appeared
    Stop,
    /// the model wrote its end-of-sequence token
    Eos,
    /// the model's positions are all used
    ContextFull,
    /// the caller stopped it (a client went away)
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// The keys and values of a prompt [M, D], read once and shared by every request of its adapter;
/// a prefix [M, L·2·Hkv·K] is those keys and values already.
pub fn prefix_cache(
    backbone: &AnyBackbone,
    prompt: &Tensor,
    placement: Placement,
) -> crate::Result<KvCache> {
    let decoder = decoder(backbone)?;
    if placement == Placement::Prefix {
        let shape = backbone.shape();
        return Ok(KvCache::from_prefix(prompt, shape.layers, shape.kv_heads)?);
    }
    let mut cache = KvCache::default();
    if prompt.dim(0)? > 0 {
        decoder.extend(prompt, &mut cache)?;
    }
    Ok(cache)
}

fn decoder(backbone: &AnyBackbone) -> crate::Result<&dyn crate::backbone::Decoder> {
    backbone.decoder().with_context(|| {
        format!(
            "generation needs a decoder (GPT-2 or Llama family); this model is a {} encoder",
            backbone.architecture()
        )
    })
}

/// Continues `input_ids` after the prefix, calling `on_text` after every token with the piece of
/// text that became final (empty while a possible stop string is held back); `on_text` answers
/// false to stop early (`Cancelled`).
pub fn generate(
    backbone: &AnyBackbone,
    encoder: &TextEncoder,
    prefix: &KvCache,
    input_ids: &[u32],
    eos: &[u32],
    config: &SamplingConfig,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> crate::Result<Generation> {
    // an empty stop string would make `hold` underflow (and would stop at once)
    config.validate()?;
    let mut text = String::new();
    let mut emitted = 0;
    let mut cancelled = false;
    let hold = config.stop.iter().map(String::len).max().unwrap_or(1) - 1;
    let (tokens, finish) =
        generate_tokens(backbone, prefix, input_ids, eos, config, &mut |tokens| {
            text = encoder.decode(tokens)?;
            if let Some(at) = config
                .stop
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(at);
                return Ok(false);
            }
            // hold back what a stop string could still begin with, and an unfinished UTF-8 sequence
            let mut safe = text.len().saturating_sub(hold);
            if text.ends_with('\u{FFFD}') {
                safe = safe.min(text.len() - '\u{FFFD}'.len_utf8());
            }
            while !text.is_char_boundary(safe) {
                safe -= 1;
            }
            cancelled = !on_text(&text[emitted..safe.max(emitted)]);
            emitted = safe.max(emitted);
            Ok(!cancelled)
        })?;
    if text.len() > emitted && !cancelled {
        on_text(&text[emitted..]);
    }
    Ok(Generation {
        text,
        tokens,
        finish: if cancelled {
            FinishReason::Cancelled
        } else {
            finish
        },
    })
}

/// What continues texts behind one prompt: its prefix cache, read once, the tokenizer that
/// leaves room for it, and the template texts are written into (`softprompt generate`, Python).
pub struct Continuation {
    prefix: KvCache,
    encoder: TextEncoder,
    template: Option<Template>,
}

impl Continuation {
    /// `prompt` [M, D] (M may be 0: the model alone), or a prefix [M, L·2·Hkv·K].
    pub fn new(
        model: &Model,
        prompt: &Tensor,
        placement: Placement,
        template: Option<Template>,
    ) -> crate::Result<Self> {
        let prefix = prefix_cache(&model.backbone, prompt, placement)?;
        let encoder = model.encoder(prefix.len(), None)?;
        Ok(Self {
            prefix,
            encoder,
            template,
        })
    }

    /// `text` written into the template and continued (`generate`). Generation continues the
    /// end of a text, so a text too long for the model is refused, not cut.
    pub fn write(
        &self,
        model: &Model,
        text: &str,
        config: &SamplingConfig,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> crate::Result<Generation> {
        if text.trim().is_empty() {
            bail!("a text to continue is empty");
        }
        let room = self.encoder.max_tokens();
        let (encoded, truncated) = self
            .encoder
            .encode_fitted(self.template.as_ref(), text, None, room)
            .with_context(|| format!("cannot tokenize {text:?}"))?;
        if truncated {
            bail!("the text has more than {room} tokens, and generation continues the end of a text, so it is not cut: shorten it");
        }
        let eos = &model.eos_token_ids;
        let (backbone, encoder) = (&model.backbone, &self.encoder);
        generate(
            backbone,
            encoder,
            &self.prefix,
            &encoded.ids,
            eos,
            config,
            on_text,
        )
    }
}

/// Positions one pass reads while the input is read in: a pass's attention scores are
/// [H, N, T], which for a whole long input at once would take gigabytes.
const PREFILL_CHUNK: usize = 256;

/// The token loop under `generate`: extend the cache, pick the next token, until EOS, the token
/// limit, the model's positions, or `on_token` (shown every token so far) answers false (`Stop`).
pub fn generate_tokens(
    backbone: &AnyBackbone,
    prefix: &KvCache,
    input_ids: &[u32],
    eos: &[u32],
    config: &SamplingConfig,
    on_token: &mut dyn FnMut(&[u32]) -> crate::Result<bool>,
) -> crate::Result<(Vec<u32>, FinishReason)> {
    config.validate()?;
    let decoder = decoder(backbone)?;
    if input_ids.is_empty() {
        bail!("nothing to continue: the input has no tokens");
    }
    let room = backbone.max_positions();
    if prefix.len() + input_ids.len() > room {
        bail!(
            "the prompt and input take {} positions; the model has {room}",
            prefix.len() + input_ids.len()
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut cache = prefix.clone();
    let mut next_input = input_ids.to_vec();
    let mut tokens = Vec::new();
    let finish = loop {
        if tokens.len() == config.max_new_tokens {
            break FinishReason::Length;
        }
        if cache.len() + next_input.len() > room {
            break FinishReason::ContextFull;
        }
        let table = backbone.word_embeddings();
        let mut hidden = None;
        for chunk in next_input.chunks(PREFILL_CHUNK) {
            let embeds = table.rows(&Tensor::new(chunk, &table.device())?)?;
            hidden = Some(decoder.extend(&embeds, &mut cache)?);
        }
        let hidden = hidden.context("nothing to read")?;
        let last = hidden.narrow(0, hidden.dim(0)? - 1, 1)?;
        let logits = decoder
            .next_token_logits(&last)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let token = sample(&logits, config, &mut rng);
        if eos.contains(&token) {
            break FinishReason::Eos;
        }
        tokens.push(token);
        next_input = vec![token];
        if !on_token(&tokens)? {
            break FinishReason::Stop;
        }
    };
    Ok((tokens, finish))
}

/// The next token from next-token logits [V]: greedy at temperature 0, else sampled from the
/// top-k / top-p part of the tempered distribution.
pub fn sample(logits: &[f32], config: &SamplingConfig, rng: &mut ChaCha8Rng) -> u32 {
    if config.temperature == 0.0 {
        return crate::task::classify::argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(config.top_k.unwrap_or(order.len()).max(1));
    let top = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / config.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = config.top_p {
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|q| {
                mass += q;
                mass >= p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let mut x = rng.random::<f64>() * probs.iter().sum::<f64>();
    for (i, p) in probs.iter().enumerate() {
        x -= p;
        if x <= 0.0 {
            return order[i] as u32;
        }
    }
    order[probs.len() - 1] as u32
}
