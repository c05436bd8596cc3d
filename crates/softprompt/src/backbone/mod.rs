//! Frozen backbones: a forward from input embeddings that keeps what its backward needs, and an
//! explicit backward that returns only ∂L/∂(input embeddings). See docs/DESIGN.md, decision 2.

pub mod any;
pub mod bert;
pub mod gguf;
pub mod gpt2;
pub mod llama;
mod stack;
pub mod t5;

use crate::kernels::Weight;
use crate::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

/// The activation a config.json names (`hidden_act`, `activation_function`). Each architecture
/// says which it supports; an unknown name is kept, so that the error can show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// GELU with the exact erf (BERT's "gelu")
    Gelu,
    /// GELU's tanh approximation (GPT-2's "gelu_new"; "gelu_pytorch_tanh" is the same function)
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    /// x·σ(x) (the Llama family's gated MLP)
    Silu,
    /// max(x, 0) (T5's feed-forward)
    Relu,
    #[serde(untagged)]
    Other(String),
}

impl Activation {
    pub fn name(&self) -> &str {
        match self {
            Self::Gelu => "gelu",
            Self::GeluNew => "gelu_new",
            Self::Silu => "silu",
            Self::Relu => "relu",
            Self::Other(name) => name,
        }
    }
}

/// What a backbone reads besides the embeddings. All [B, S], prompt positions included.
pub struct BackboneInput<'a> {
    /// [B, S, D] word embeddings with the soft prompt in front
    pub embeds: &'a Tensor,
    /// [B, S] u32, 1 for a position to attend to, 0 for padding
    pub attention_mask: &'a Tensor,
    /// [B, S] u32 segment ids (BERT's token types); zeros for the prompt
    pub token_type_ids: &'a Tensor,
    /// [B·R] u32: the rows of the B·S that the head reads, the same number R in each batch row, in
    /// order. A backbone may then leave every other row of its last hidden state zero (BERT
    /// computes only these in its last layer, forward and backward).
    pub reads: Option<&'a Tensor>,
    /// prefix tuning's keys and values in front of every layer's attention
    pub prefix: Option<&'a Prefix>,
    /// an encoder-decoder's decoder input [B, T, D]: the embeddings of the decoder start token
    /// and the target, right-padded (T5; the others read none)
    pub decoder: Option<&'a Tensor>,
}

impl BackboneInput<'_> {
    /// P, the prefix positions in front of each row (0 without a prefix).
    pub fn prefix_len(&self) -> usize {
        self.prefix.map_or(0, |p| p.mask.dim(1).unwrap_or(0))
    }

    /// The mask attention reads [B, P + S]: the prefix's, then the input's.
    pub(crate) fn full_mask(&self) -> Result<Tensor> {
        match self.prefix {
            Some(p) => Tensor::cat(
                &[
                    &p.mask.to_dtype(self.attention_mask.dtype())?,
                    self.attention_mask,
                ],
                1,
            ),
            None => Ok(self.attention_mask.clone()),
        }
    }
}

/// Prefix tuning's keys and values (PEFT's PREFIX_TUNING past_key_values): P positions in front
/// of every layer's own, which each input position attends to. The input's positions count on
/// from the prefix's, as in a decoder reading them from its cache.
pub struct Prefix {
    /// [B, P, L·2·Hkv·K]: layer l's keys at columns 2l·Hkv·K.., then its values, each Hkv·K
    /// head by head (PEFT's `prompt_embeddings` row layout)
    pub kv: Tensor,
    /// [B, P] u32: 1 for the prefix positions a row reads (a mixed batch's rows differ)
    pub mask: Tensor,
}

/// What a backbone's backward returns: ∂L/∂(input embeddings), with a prefix ∂L/∂prefix, and an
/// encoder-decoder's ∂L/∂(decoder input).
pub struct InputGradients {
    /// [B, S, D]
    pub embeds: Tensor,
    /// [B, P, L·2·Hkv·K], `Prefix::kv`'s layout
    pub prefix: Option<Tensor>,
    /// [B, T, D], `BackboneInput::decoder`'s
    pub decoder: Option<Tensor>,
}

pub trait Backbone {
    /// The activations one training forward keeps for its backward.
    type Activations;

    fn hidden_size(&self) -> usize;
    /// The longest sequence, prompt included, the model can read.
    fn max_positions(&self) -> usize;
    /// [V, D]: the token embedding table (prompt initialisation reads it); quantized with
    /// `--keep-quantized`.
    fn word_embeddings(&self) -> &Weight;
    /// ids [B, N] u32 → [B, N, D]
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        self.word_embeddings()
            .rows(&ids.flatten_all()?)?
            .reshape((b, n, self.hidden_size()))
    }
    /// → last hidden state [B, S, D], and with `keep` the activations for `backward` (without, each
    /// layer's are dropped as soon as the next layer has run).
    fn run(&self, input: &BackboneInput, keep: bool)
        -> Result<(Tensor, Option<Self::Activations>)>;
    /// → last hidden state [B, S, D]; keeps nothing.
    fn forward(&self, input: &BackboneInput) -> Result<Tensor> {
        Ok(self.run(input, false)?.0)
    }
    /// → last hidden state [B, S, D] and the activations for `backward`.
    fn forward_train(&self, input: &BackboneInput) -> Result<(Tensor, Self::Activations)> {
        match self.run(input, true)? {
            (hidden, Some(activations)) => Ok((hidden, activations)),
            _ => candle_core::bail!("the backbone kept no activations"),
        }
    }
    /// d_hidden [B, S, D] → d_embeds [B, S, D] (and the prefix's gradient, when it read one).
    /// `d_kv` [B, S, L·2·Hkv·K] is what every layer's keys and values got from rows that read them
    /// as a prefix (`keys_values`).
    fn backward(
        &self,
        d_hidden: &Tensor,
        activations: Self::Activations,
        d_kv: Option<&Tensor>,
    ) -> Result<InputGradients>;
    /// Whether rows in front of the input are read by it but never read it (causal attention): a
    /// decoder's prompt, which one pass can then compute for a whole batch (`keys_values`).
    fn shares_prompt(&self) -> bool {
        false
    }
    /// The token an encoder-decoder's decoder reads first (T5's pad); None for the others.
    fn decoder_start(&self) -> Option<u32> {
        None
    }
    /// An encoder-decoder's decoder input for `b` rows that bring none, as a classifier's do (the
    /// labels are scored at the decoder's first position): the start token, embedded [B, 1, D].
    /// None for the others, which return the input's own positions.
    fn start_rows(&self, b: usize) -> Result<Option<Tensor>> {
        let Some(start) = self.decoder_start() else {
            return Ok(None);
        };
        let ids = Tensor::full(start, (b, 1), &self.word_embeddings().device())?;
        self.embed_tokens(&ids).map(Some)
    }
    /// Every layer's keys and values of a training forward's rows [B, S, L·2·Hkv·K]
    /// (`Prefix::kv`'s layout): a shared prompt's, for the batch to read as its prefix, or a
    /// prefix's starting point.
    fn keys_values(&self, _activations: &Self::Activations) -> Result<Tensor> {
        candle_core::bail!("this architecture lends no rows' keys and values")
    }
    /// A prompt [M, D] alone through the stack → every layer's keys and values of its rows
    /// [M, L·2·Hkv·K], which any row of a decoder may read as a prefix (`shares_prompt`), and the
    /// pass's activations for a backward into the prompt.
    fn prompt_pass(&self, prompt: &Tensor) -> Result<(Tensor, Self::Activations)> {
        let embeds = prompt.to_dtype(self.word_embeddings().dtype())?;
        match self.run_row(&embeds, true)? {
            (_, Some(activations)) => {
                Ok((self.keys_values(&activations)?.squeeze(0)?, activations))
            }
            _ => candle_core::bail!("the backbone kept no activations"),
        }
    }
    /// One row of embeddings [S, D], every position read, no segments → last hidden state
    /// [1, S, D] (and with `keep` the activations, as `run`).
    fn run_row(&self, embeds: &Tensor, keep: bool) -> Result<(Tensor, Option<Self::Activations>)> {
        let mask = Tensor::ones((1, embeds.dim(0)?), DType::U32, embeds.device())?;
        let input = BackboneInput {
            embeds: &embeds.unsqueeze(0)?,
            attention_mask: &mask,
            token_type_ids: &mask.zeros_like()?,
            reads: None,
            prefix: None,
            decoder: None,
        };
        self.run(&input, keep)
    }
}

/// A borrowed backbone trains as the backbone itself: a run borrows the model its caller keeps
/// (the Python binding trains many prompts on one loaded model).
impl<B: Backbone> Backbone for &B {
    type Activations = B::Activations;

    fn hidden_size(&self) -> usize {
        (**self).hidden_size()
    }
    fn max_positions(&self) -> usize {
        (**self).max_positions()
    }
    fn word_embeddings(&self) -> &Weight {
        (**self).word_embeddings()
    }
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        (**self).embed_tokens(ids)
    }
    fn run(
        &self,
        input: &BackboneInput,
        keep: bool,
    ) -> Result<(Tensor, Option<Self::Activations>)> {
        (**self).run(input, keep)
    }
    fn backward(
        &self,
        d_hidden: &Tensor,
        activations: Self::Activations,
        d_kv: Option<&Tensor>,
    ) -> Result<InputGradients> {
        (**self).backward(d_hidden, activations, d_kv)
    }
    fn shares_prompt(&self) -> bool {
        (**self).shares_prompt()
    }
    fn decoder_start(&self) -> Option<u32> {
        (**self).decoder_start()
    }
    fn keys_values(&self, activations: &Self::Activations) -> Result<Tensor> {
        (**self).keys_values(activations)
    }
}

/// The keys and values of every position a decoder has read, per layer, each [Hkv, T, K] (keys
/// after RoPE). Cloning is cheap (tensors are shared): a prefix cache is cloned per request.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    /// Positions read so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each cache's next position [B, 1] u32: where `extend_each` puts a row's new position.
    pub fn next_positions(caches: &[KvCache], device: &candle_core::Device) -> Result<Tensor> {
        let positions: Vec<u32> = caches.iter().map(|c| c.len as u32).collect();
        Tensor::from_vec(positions, (caches.len(), 1), device)
    }

    /// Prefix tuning's keys and values [P, L·2·Hkv·K] (`Prefix::kv`'s rows) as a cache of P
    /// positions read: a decoder reads a prefix as its past, so the input's positions start at P.
    pub fn from_prefix(kv: &Tensor, layers: usize, kv_heads: usize) -> Result<Self> {
        let (p, width) = kv.dims2()?;
        let w = width / (2 * layers.max(1));
        if layers == 0 || kv_heads == 0 || width != layers * 2 * w || !w.is_multiple_of(kv_heads) {
            candle_core::bail!(
                "a prefix {width} wide is not {layers} layers of keys and values on {kv_heads} heads"
            );
        }
        let heads = |column: usize| {
            kv.narrow(1, column * w, w)?
                .reshape((p, kv_heads, w / kv_heads))?
                .transpose(0, 1)?
                .contiguous()
        };
        let layers = (0..layers)
            .map(|l| Ok((heads(2 * l)?, heads(2 * l + 1)?)))
            .collect::<Result<_>>()?;
        Ok(Self { layers, len: p })
    }

    /// Adds N new positions' keys and values [Hkv, N, K] to `layer` → all of that layer's so far.
    fn append(&mut self, layer: usize, keys: Tensor, values: Tensor) -> Result<(Tensor, Tensor)> {
        if layer == self.layers.len() {
            self.layers.push((keys, values));
        } else {
            let (k, v) = &self.layers[layer];
            self.layers[layer] = (Tensor::cat(&[k, &keys], 1)?, Tensor::cat(&[v, &values], 1)?);
        }
        Ok(self.layers[layer].clone())
    }
}

/// A backbone that writes text: it reads new positions on top of a cache and predicts the next token.
pub trait Decoder {
    /// embeds [N, D] of the next N positions (after `cache.len()` read before) → hidden [N, D]
    /// after the final norm; the cache grows by N.
    fn extend(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
    /// embeds [B, D], one new position for each of B texts, each after its own `caches[b]` →
    /// hidden [B, D] after the final norm; each cache grows by one. Row b gets what `extend`
    /// gives it alone.
    fn extend_each(&self, embeds: &Tensor, caches: &mut [KvCache]) -> Result<Tensor>;
    /// [V, D]: the next-token output layer; quantized with `--keep-quantized`.
    fn lm_head(&self) -> &Weight;
    /// hidden [N, D] → next-token logits [N, V], for generating: one token's row reads a
    /// quantized head block by block.
    fn next_token_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head().apply(hidden)
    }
}

/// The position of every column of an attention mask [B, S]: in each row the real columns count
/// 0, 1, 2, … whatever padding lies before or between them (a padding column takes the next
/// real column's number; it is masked out anyway). None when every row's real columns already
/// start at column 0 and run unbroken, as with padding on the right only: positions 0..S then.
///
/// This is what makes left padding correct: counting positions by column instead would shift a
/// left-padded row's tokens, and with a prompt in front ([prompt, padding, text]) would also
/// open a gap between the prompt and the text.
pub fn position_ids(mask: &Tensor) -> Result<Option<Tensor>> {
    let rows = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    if rows.iter().all(|r| r.windows(2).all(|w| w[0] >= w[1])) {
        return Ok(None);
    }
    let ids: Vec<u32> = rows
        .iter()
        .flat_map(|row| {
            row.iter().scan(0u32, |real_before, &m| {
                let position = *real_before;
                *real_before += (m != 0) as u32;
                Some(position)
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(ids, mask.dims2()?, mask.device())?))
}

/// A per-row tensor [B, S, n] as the stack's rows [B·S, n].
pub(crate) fn flat(x: Option<&Tensor>) -> Result<Option<Tensor>> {
    x.map(|x| {
        let (b, s, n) = x.dims3()?;
        x.reshape((b * s, n))
    })
    .transpose()
}

/// The positions of the S input columns of a full mask [B, P + S] (`BackboneInput::full_mask`):
/// counted on from the prefix's (`position_ids`), as an offset (every row's P..P + S) or per row.
pub(crate) fn input_positions(
    full_mask: &Tensor,
    prefix_len: usize,
) -> Result<(usize, Option<Tensor>)> {
    let s = full_mask.dim(1)? - prefix_len;
    Ok(match position_ids(full_mask)? {
        None => (prefix_len, None),
        Some(ids) => (0, Some(ids.narrow(1, prefix_len, s)?.contiguous()?)),
    })
}

/// The rows of a learned position table [P, D] for the S input columns of a full mask
/// [B, P + S]: [S, D] when every row's positions are the same, else [B, S, D] (see
/// `input_positions`). Added to embeddings [B, S, D].
pub(crate) fn learned_positions(
    table: &Tensor,
    full_mask: &Tensor,
    prefix_len: usize,
) -> Result<Tensor> {
    let b = full_mask.dim(0)?;
    match input_positions(full_mask, prefix_len)? {
        (offset, None) => table.narrow(0, offset, full_mask.dim(1)? - prefix_len),
        (_, Some(ids)) => {
            table
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, ids.dim(1)?, table.dim(1)?))
        }
    }
}

/// A config.json read into an architecture's config struct; `what` names the architecture in errors.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
) -> crate::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a {what} config.json", path.display()))
}

/// The safetensors weights of a Hugging Face model directory, memory-mapped.
pub(crate) fn mmap_weights(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> crate::Result<VarBuilder<'static>> {
    let files = safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; changing them while loaded is the user's error.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .with_context(|| format!("cannot read the safetensors weights in {}", dir.display()))
}

/// The error of weights that do not fit a config.json.
pub(crate) fn mismatch(dir: &Path, architecture: &str) -> String {
    format!(
        "the weights in {} do not match its config.json (or are not a {architecture} checkpoint)",
        dir.display()
    )
}

/// model.safetensors, or the shards of a sharded checkpoint, in name order.
fn safetensors_files(dir: &Path) -> crate::Result<Vec<PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the model directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "no *.safetensors weights in {} (expected model.safetensors)",
            dir.display()
        );
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::Activation;

    #[test]
    fn activations_read_by_their_config_names() {
        let read = |name: &str| serde_json::from_value::<Activation>(name.into()).unwrap();
        assert_eq!(read("gelu"), Activation::Gelu);
        assert_eq!(read("gelu_new"), Activation::GeluNew);
        assert_eq!(read("gelu_pytorch_tanh"), Activation::GeluNew);
        assert_eq!(read("silu"), Activation::Silu);
        assert_eq!(read("relu"), Activation::Relu);
        assert_eq!(read("tanh"), Activation::Other("tanh".into()));
    }
}
