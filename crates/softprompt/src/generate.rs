//! Text generation with a decoder: [prompt; input] → next token → … with a KV cache, so each new
//! token costs one position, and a prefix cache, so an adapter's prompt is read once and every
//! request starts from its keys and values.
//!
//! ```text
//! prefix_cache(prompt)  ──clone──▶  extend(input tokens) → sample → extend(token) → sample → …
//! ```
//!
//! An encoder-decoder (T5) reads [prompt; input] with its encoder once, and its decoder writes
//! from the start token on, with a KV cache of its own and the encoder's keys and values.

use crate::backbone::any::AnyBackbone;
use crate::backbone::t5::T5Decoding;
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

/// What every text of one adapter starts from, made once and cloned per text: a decoder's keys
/// and values of the prompt, an encoder-decoder's prompt vectors, which its encoder reads in
/// front of each input (and, for an encoder-decoder prompt, its decoder before the start token),
/// or its prefix, which its decoder reads as its past.
#[derive(Clone)]
pub enum PromptCache {
    Decoder(KvCache),
    /// [M, D]
    Encoder(Tensor),
    /// [2M, D]: M for the encoder, then M for the decoder (`Placement::EncoderDecoder`)
    EncoderDecoder(Tensor),
    /// [M, L·2·H·K]
    Seq2SeqPrefix(Tensor),
}

impl PromptCache {
    /// The positions the prompt takes in front of an input.
    pub fn len(&self) -> usize {
        match self {
            PromptCache::Decoder(cache) => cache.len(),
            PromptCache::Encoder(prompt) | PromptCache::Seq2SeqPrefix(prompt) => {
                prompt.dim(0).unwrap_or(0)
            }
            PromptCache::EncoderDecoder(prompt) => {
                Placement::EncoderDecoder.front(prompt.dim(0).unwrap_or(0))
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The prompt cache of a prompt [M, D] (`PromptCache`), made once for every request of its
/// adapter; on a decoder, a prefix [M, L·2·Hkv·K] is its keys and values already.
pub fn prefix_cache(
    backbone: &AnyBackbone,
    prompt: &Tensor,
    placement: Placement,
) -> crate::Result<PromptCache> {
    if backbone.seq2seq().is_some() {
        return Ok(match placement {
            Placement::Embeddings => PromptCache::Encoder(prompt.clone()),
            Placement::EncoderDecoder => PromptCache::EncoderDecoder(prompt.clone()),
            Placement::Prefix => PromptCache::Seq2SeqPrefix(prompt.clone()),
        });
    }
    Ok(PromptCache::Decoder(decoder_cache(
        backbone, prompt, placement,
    )?))
}

fn decoder_cache(
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
            "generation needs a decoder (GPT-2, Llama family or T5); this model is a {} encoder",
            backbone.architecture()
        )
    })
}

/// Continues `input_ids` after the prefix, calling `on_text` after every token with the piece of
/// text that became final (empty while a possible stop string is held back); `on_text` answers
/// false to stop early (`Cancelled`). A batch of one `Sequence`.
pub fn generate(
    backbone: &AnyBackbone,
    encoder: &TextEncoder,
    prefix: &PromptCache,
    input_ids: &[u32],
    eos: &[u32],
    config: &SamplingConfig,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> crate::Result<Generation> {
    let writer = Writer::text(encoder, config, Box::new(on_text));
    let mut sequence = Sequence::start(backbone, prefix, input_ids, eos, config, writer)?;
    while !sequence.done() {
        step(backbone, std::slice::from_mut(&mut sequence))?;
    }
    sequence.into_generation()
}

/// The tokens alone (no text, no stop strings): what `softprompt bench --mode generate` times.
pub fn generate_tokens(
    backbone: &AnyBackbone,
    prefix: &PromptCache,
    input_ids: &[u32],
    eos: &[u32],
    config: &SamplingConfig,
) -> crate::Result<(Vec<u32>, FinishReason)> {
    let writer = Writer::tokens_only();
    let mut sequence = Sequence::start(backbone, prefix, input_ids, eos, config, writer)?;
    while !sequence.done() {
        step(backbone, std::slice::from_mut(&mut sequence))?;
    }
    let generation = sequence.into_generation()?;
    Ok((generation.tokens, generation.finish))
}

/// What a sequence shows of its text as it is written: each piece that became final, holding
/// back what a stop string could still begin with and an unfinished UTF-8 sequence.
pub struct Writer<'a> {
    /// none: tokens only
    encoder: Option<&'a TextEncoder>,
    stop: Vec<String>,
    text: String,
    emitted: usize,
    cancelled: bool,
    on_text: Box<dyn FnMut(&str) -> bool + 'a>,
}

impl<'a> Writer<'a> {
    /// Text decoded with `encoder`, cut at `config`'s stop strings, shown piece by piece to
    /// `on_text`, which answers false to stop the sequence (`Cancelled`).
    pub fn text(
        encoder: &'a TextEncoder,
        config: &SamplingConfig,
        on_text: Box<dyn FnMut(&str) -> bool + 'a>,
    ) -> Self {
        Self {
            encoder: Some(encoder),
            stop: config.stop.clone(),
            text: String::new(),
            emitted: 0,
            cancelled: false,
            on_text,
        }
    }

    pub fn tokens_only() -> Self {
        Self {
            encoder: None,
            stop: Vec::new(),
            text: String::new(),
            emitted: 0,
            cancelled: false,
            on_text: Box::new(|_| true),
        }
    }

    /// Every token so far → whether to go on (false: a stop string appeared, or the reader
    /// cancelled).
    fn show(&mut self, tokens: &[u32]) -> crate::Result<bool> {
        let Some(encoder) = self.encoder else {
            return Ok(true);
        };
        self.text = encoder.decode(tokens)?;
        let text = &mut self.text;
        if let Some(at) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(at);
            return Ok(false);
        }
        let hold = self.stop.iter().map(String::len).max().unwrap_or(1) - 1;
        let mut safe = text.len().saturating_sub(hold);
        if text.ends_with('\u{FFFD}') {
            safe = safe.min(text.len() - '\u{FFFD}'.len_utf8());
        }
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        self.cancelled = !(self.on_text)(&text[self.emitted..safe.max(self.emitted)]);
        self.emitted = safe.max(self.emitted);
        Ok(!self.cancelled)
    }

    /// The rest of the text, once the sequence is done.
    fn flush(&mut self) {
        if self.text.len() > self.emitted && !self.cancelled {
            (self.on_text)(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
    }
}

/// One text being continued: its own KV cache (its adapter's prefix cache, then its input and
/// every token written), its sampler and what it has shown. `step` moves any number of them
/// on by one token in one backbone pass, so texts of different adapters and lengths decode
/// together; a sequence gets the same tokens in any company.
pub struct Sequence<'a> {
    cache: Cache,
    config: SamplingConfig,
    rng: ChaCha8Rng,
    eos: Vec<u32>,
    /// the model's positions
    room: usize,
    tokens: Vec<u32>,
    /// the token to read next: the last one picked
    next: Option<u32>,
    finish: Option<FinishReason>,
    /// what went wrong with this sequence alone (its text did not decode)
    failed: Option<crate::Error>,
    writer: Writer<'a>,
}

/// What a sequence has read: a decoder's KV cache, or an encoder-decoder's decoding state.
enum Cache {
    Decoder(KvCache),
    Seq2Seq(T5Decoding),
}

impl Cache {
    fn len(&self) -> usize {
        match self {
            Cache::Decoder(cache) => cache.len(),
            Cache::Seq2Seq(state) => state.len(),
        }
    }
}

/// Positions one pass reads while the input is read in: a pass's attention scores are
/// [H, N, T], which for a whole long input at once would take gigabytes.
const PREFILL_CHUNK: usize = 256;

impl<'a> Sequence<'a> {
    /// `input_ids` continued after `prefix`: reads the input (alone, in chunks) and picks the
    /// first token.
    pub fn start(
        backbone: &AnyBackbone,
        prefix: &PromptCache,
        input_ids: &[u32],
        eos: &[u32],
        config: &SamplingConfig,
        writer: Writer<'a>,
    ) -> crate::Result<Self> {
        config.validate()?;
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
        let mut sequence = Self {
            cache: Cache::Decoder(KvCache::default()),
            config: config.clone(),
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            eos: eos.to_vec(),
            room,
            tokens: Vec::new(),
            next: None,
            finish: None,
            failed: None,
            writer,
        };
        if sequence.tokens.len() == config.max_new_tokens {
            sequence.finish = Some(FinishReason::Length);
            return Ok(sequence);
        }
        let table = backbone.word_embeddings();
        let rows = |ids: &[u32]| table.rows(&Tensor::new(ids, &table.device())?);
        let logits = match (prefix, backbone.seq2seq()) {
            (
                PromptCache::Encoder(_)
                | PromptCache::EncoderDecoder(_)
                | PromptCache::Seq2SeqPrefix(_),
                Some(t5),
            ) => {
                let in_front = |prompt: &Tensor, x: Tensor| -> candle_core::Result<Tensor> {
                    Tensor::cat(&[&prompt.to_dtype(table.dtype())?, &x], 0)
                };
                let start = rows(&[t5.config.decoder_start()])?;
                // what the encoder reads, the decoder's past, and its first positions
                let (input, past, first) = match prefix {
                    PromptCache::Encoder(prompt) => {
                        (in_front(prompt, rows(input_ids)?)?, None, start)
                    }
                    PromptCache::EncoderDecoder(prompt) => {
                        let m = Placement::EncoderDecoder.front(prompt.dim(0)?);
                        let (encoder, decoder) = (
                            prompt.narrow(0, 0, m)?,
                            prompt.narrow(0, m, prompt.dim(0)? - m)?,
                        );
                        (
                            in_front(&encoder, rows(input_ids)?)?,
                            None,
                            in_front(&decoder, start)?,
                        )
                    }
                    PromptCache::Seq2SeqPrefix(kv) => (rows(input_ids)?, Some(kv), start),
                    PromptCache::Decoder(_) => bail!("a decoder's prompt cache on T5"),
                };
                let mut state = t5.start_decoding(&input.unsqueeze(0)?, past)?;
                let hidden = t5.extend(&first, &mut state)?;
                sequence.cache = Cache::Seq2Seq(state);
                let last = hidden.dim(0)? - 1;
                t5.lm_head().apply(&hidden.narrow(0, last, 1)?)?
            }
            (PromptCache::Decoder(cache), None) => {
                let decoder = decoder(backbone)?;
                let mut cache = cache.clone();
                let mut hidden = None;
                for chunk in input_ids.chunks(PREFILL_CHUNK) {
                    hidden = Some(decoder.extend(&rows(chunk)?, &mut cache)?);
                }
                sequence.cache = Cache::Decoder(cache);
                let hidden = hidden.context("nothing to read")?;
                let last = hidden.narrow(0, hidden.dim(0)? - 1, 1)?;
                decoder.next_token_logits(&last)?
            }
            _ => bail!("a prompt cache made for another kind of model"),
        };
        let logits = logits.to_dtype(DType::F32)?;
        sequence.take(&logits.squeeze(0)?.to_vec1::<f32>()?);
        Ok(sequence)
    }

    /// Whether it has finished: its end token, a stop string, its token limit, the model's
    /// positions, or its reader gone.
    pub fn done(&mut self) -> bool {
        if self.finish.is_none() && self.next.is_some() {
            if self.tokens.len() == self.config.max_new_tokens {
                self.finish = Some(FinishReason::Length);
            } else if self.cache.len() + 1 > self.room {
                self.finish = Some(FinishReason::ContextFull);
            }
        }
        self.finish.is_some() || self.next.is_none()
    }

    /// The next-token logits [V] → the token picked, shown, and read next.
    fn take(&mut self, logits: &[f32]) {
        let token = sample(logits, &self.config, &mut self.rng);
        self.next = None;
        if self.eos.contains(&token) {
            self.finish = Some(FinishReason::Eos);
            return;
        }
        self.tokens.push(token);
        match self.writer.show(&self.tokens) {
            Ok(true) => self.next = Some(token),
            Ok(false) if self.writer.cancelled => self.finish = Some(FinishReason::Cancelled),
            Ok(false) => self.finish = Some(FinishReason::Stop),
            Err(e) => self.failed = Some(e),
        }
    }

    /// What it wrote, once `done`.
    pub fn into_generation(mut self) -> crate::Result<Generation> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        self.writer.flush();
        Ok(Generation {
            text: std::mem::take(&mut self.writer.text),
            tokens: self.tokens,
            finish: self.finish.unwrap_or(FinishReason::Length),
        })
    }
}

/// One token more for every sequence not `done`, all in one backbone pass: each row reads its
/// last token on top of its own cache, and picks its next with its own sampler.
pub fn step(backbone: &AnyBackbone, sequences: &mut [Sequence]) -> crate::Result<()> {
    let mut active: Vec<&mut Sequence> = sequences
        .iter_mut()
        .filter_map(|s| (!s.done()).then_some(s))
        .collect();
    let tokens: Vec<u32> = active.iter().filter_map(|s| s.next).collect();
    if tokens.is_empty() {
        return Ok(());
    }
    let table = backbone.word_embeddings();
    let embeds = table.rows(&Tensor::new(tokens.as_slice(), &table.device())?)?;
    if let Some(t5) = backbone.seq2seq() {
        let mut states = Vec::with_capacity(active.len());
        for sequence in active.iter_mut() {
            let Cache::Seq2Seq(state) = &mut sequence.cache else {
                bail!("a decoder's sequence stepped on T5");
            };
            states.push(state);
        }
        let hidden = t5.extend_each(&embeds, &mut states)?;
        let logits = t5.lm_head().apply(&hidden)?.to_dtype(DType::F32)?;
        for (sequence, row) in active.iter_mut().zip(logits.to_vec2::<f32>()?) {
            sequence.take(&row);
        }
        return Ok(());
    }
    let decoder = decoder(backbone)?;
    let mut caches = Vec::with_capacity(active.len());
    for sequence in active.iter_mut() {
        match std::mem::replace(&mut sequence.cache, Cache::Decoder(KvCache::default())) {
            Cache::Decoder(cache) => caches.push(cache),
            Cache::Seq2Seq(_) => bail!("a T5 sequence stepped on a decoder"),
        }
    }
    let hidden = decoder.extend_each(&embeds, &mut caches);
    for (sequence, cache) in active.iter_mut().zip(caches) {
        sequence.cache = Cache::Decoder(cache);
    }
    let logits = decoder.next_token_logits(&hidden?)?.to_dtype(DType::F32)?;
    for (sequence, row) in active.iter_mut().zip(logits.to_vec2::<f32>()?) {
        sequence.take(&row);
    }
    Ok(())
}

/// What continues texts behind one prompt: its prefix cache, read once, the tokenizer that
/// leaves room for it, and the template texts are written into (`softprompt generate`, Python).
pub struct Continuation {
    prefix: PromptCache,
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

    /// `text` written into the template and continued (`generate`).
    pub fn write(
        &self,
        model: &Model,
        text: &str,
        config: &SamplingConfig,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> crate::Result<Generation> {
        let ids = self.encode(text)?;
        let eos = &model.eos_token_ids;
        generate(
            &model.backbone,
            &self.encoder,
            &self.prefix,
            &ids,
            eos,
            config,
            on_text,
        )
    }

    /// Every text continued at once, a token for all of them a step (`step`): each gets what
    /// `write` gives it alone.
    pub fn write_all(
        &self,
        model: &Model,
        texts: &[String],
        config: &SamplingConfig,
    ) -> crate::Result<Vec<Generation>> {
        let mut sequences = Vec::with_capacity(texts.len());
        for text in texts {
            let ids = self.encode(text)?;
            let writer = Writer::text(&self.encoder, config, Box::new(|_| true));
            let eos = &model.eos_token_ids;
            let backbone = &model.backbone;
            sequences.push(Sequence::start(
                backbone,
                &self.prefix,
                &ids,
                eos,
                config,
                writer,
            )?);
        }
        while !sequences.iter_mut().all(|s| s.done()) {
            step(&model.backbone, &mut sequences)?;
        }
        sequences
            .into_iter()
            .map(Sequence::into_generation)
            .collect()
    }

    /// `text` written into the template and tokenized. Generation continues the end of a text,
    /// so a text too long for the model is refused, not cut.
    fn encode(&self, text: &str) -> crate::Result<Vec<u32>> {
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
        Ok(encoded.ids)
    }
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
