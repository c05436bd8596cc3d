//! T5 (Raffel et al. 2020), the model family Lester et al. tuned prompts on, and its v1.1,
//! Flan-T5 and mT5 variants: an encoder-decoder from a Hugging Face directory. Names follow
//! transformers' modeling_t5.py (`T5ForConditionalGeneration`).
//!
//! Pre-norm blocks with T5's RMS-style norm (no mean, no bias); attention without 1/√K scaling
//! whose bias is a learned bucketed relative position bias, computed by each stack's first
//! block and shared by all of its blocks (bidirectional in the encoder, causal in the decoder);
//! cross-attention reads the encoder's output with no position bias; the feed-forward is ReLU
//! (T5) or gated GELU (v1.1 and later).
//!
//! The soft prompt goes in front of the encoder's input. The backbone's "last hidden state" is the
//! decoder's, over the decoder's input (`BackboneInput::decoder`), and its backward runs from
//! there through every cross-attention into the encoder and out to the encoder's input rows.
//!
//! Prefix tuning goes where PEFT's `PREFIX_TUNING` for `SEQ_2_SEQ_LM` puts it: keys and values in
//! front of every decoder block's self-attention, as its past (the decoder's positions count on
//! from the prefix's). The encoder reads no prefix and cross-attention none: PEFT clears the
//! cross-attention cache its prefix had filled. `prefix_slot` says which of the adapter's layers
//! a block reads.
//!
//! Shape letters: B batch, S encoder positions (prompt + input), T decoder positions, D d_model,
//! H heads, K d_kv (H·K need not be D), F d_ff, V vocabulary.

use super::{Activation, Backbone, BackboneInput, InputGradients};
use crate::kernels::{
    biased_attention_backward, biased_attention_forward, causal_mask, gelu_erf_backward,
    gelu_erf_forward, gelu_tanh_backward, gelu_tanh_forward, mask_bias, position_bias,
    relu_backward, relu_forward, BiasedAttentionSaved, GeluSaved, Linear, ReluSaved, RmsNorm,
    RmsNormSaved, Weight,
};
use crate::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

/// The fields of config.json that the architecture reads (transformers' T5Config).
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// "relu" (T5), "gated-gelu" (v1.1, Flan-T5, mT5: GELU's tanh form), "gated-ACT" or "ACT"
    #[serde(default = "default_feed_forward")]
    pub feed_forward_proj: String,
    /// T5 scales the decoder's output by D^-0.5 before a tied LM head; v1.1 configs say false
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// what transformers ≥ 5 writes for the same choice
    #[serde(default)]
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// the longest input the checkpoint was trained on (relative positions have no hard limit)
    #[serde(default = "default_positions")]
    pub n_positions: usize,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_feed_forward() -> String {
    "relu".into()
}
fn default_positions() -> usize {
    512
}

/// The feed-forward of `feed_forward_proj`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedForwardKind {
    pub activation: Activation,
    /// act(wi_0·x) ⊙ wi_1·x instead of act(wi·x)
    pub gated: bool,
}

impl T5Config {
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let cfg: Self = super::read_config(path, "T5")?;
        cfg.feed_forward()
            .and_then(|_| cfg.validate())
            .with_context(|| format!("unsupported model in {}", path.display()))?;
        Ok(cfg)
    }

    /// transformers' reading of `feed_forward_proj`: "gated-" in front gates it, the rest names
    /// the activation ("gated-gelu" meaning GELU's tanh form, for old checkpoints' sake).
    pub fn feed_forward(&self) -> crate::Result<FeedForwardKind> {
        let proj = self.feed_forward_proj.as_str();
        let (gated, name) = match proj.split_once('-') {
            Some(("gated", name)) => (true, name),
            None => (false, proj),
            Some(_) => bail!("feed_forward_proj {proj:?} is neither \"ACT\" nor \"gated-ACT\""),
        };
        let activation = match (proj, name) {
            ("gated-gelu", _) | (_, "gelu_new" | "gelu_pytorch_tanh") => Activation::GeluNew,
            (_, "gelu") => Activation::Gelu,
            (_, "relu") => Activation::Relu,
            _ => bail!("feed_forward_proj {proj:?}: the activation {name:?} is not supported (relu, gelu, gelu_new)"),
        };
        Ok(FeedForwardKind { activation, gated })
    }

    fn validate(&self) -> crate::Result<()> {
        if let Some(t) = &self.model_type {
            if !matches!(t.as_str(), "t5" | "mt5") {
                bail!("model_type is {t:?}; this backbone reads \"t5\" and \"mt5\"");
            }
        }
        if self.num_layers == 0 || self.decoder_layers() == 0 {
            bail!("a T5 needs encoder and decoder layers (num_layers, num_decoder_layers)");
        }
        if self.num_heads == 0 || self.d_kv == 0 || self.relative_attention_num_buckets < 4 {
            bail!(
                "num_heads {}, d_kv {} and relative_attention_num_buckets {} must be positive (buckets at least 4)",
                self.num_heads,
                self.d_kv,
                self.relative_attention_num_buckets
            );
        }
        Ok(())
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// Whether the decoder's output is scaled by D^-0.5 before the LM head (`scale_decoder_outputs`).
    pub fn scales_decoder_output(&self) -> bool {
        self.scale_decoder_outputs
            .or(self.tie_word_embeddings)
            .unwrap_or(true)
    }

    /// The decoder's first input token (T5: the pad token, 0).
    pub fn decoder_start(&self) -> u32 {
        self.decoder_start_token_id
            .or(self.pad_token_id)
            .unwrap_or(0)
    }
}

/// x [B·L, n·K] → [B, n, L, K]
fn heads_first(x: &Tensor, b: usize, heads: usize) -> Result<Tensor> {
    let (rows, width) = x.dims2()?;
    x.reshape((b, rows / b, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// [B, n, L, K] → [B·L, n·K]
fn rows_first(x: &Tensor) -> Result<Tensor> {
    let (b, n, l, k) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b * l, n * k))
}

/// `SelfAttention` / `EncDecAttention`: queries from x, keys and values from a memory (x itself,
/// or the encoder's output). The key and value maps are fused into one [2·H·K, D] matrix at load.
struct T5Attention {
    q: Linear,
    kv: Linear,
    o: Linear,
    heads: usize,
}

struct T5AttentionSaved {
    attention: BiasedAttentionSaved,
    batch: usize,
    /// the keys' first positions that are a prefix's, not computed from the memory
    prefix_len: usize,
}

impl T5Attention {
    fn load(vb: VarBuilder, cfg: &T5Config) -> Result<Self> {
        let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
        let (k, v) = (
            vb.get((inner, d), "k.weight")?,
            vb.get((inner, d), "v.weight")?,
        );
        Ok(Self {
            q: Linear::new(vb.get((inner, d), "q.weight")?, None),
            kv: Linear::new(Tensor::cat(&[k, v], 0)?, None),
            o: Linear::new(vb.get((d, inner), "o.weight")?, None),
            heads: cfg.num_heads,
        })
    }

    /// The memory's keys and values [B, H, S, K] each: cross-attention's, computed once.
    fn keys_values(&self, memory: &Tensor, b: usize) -> Result<(Tensor, Tensor)> {
        let kv = self.kv.forward(memory)?;
        let half = kv.dim(1)? / 2;
        Ok((
            heads_first(&kv.narrow(1, 0, half)?, b, self.heads)?,
            heads_first(&kv.narrow(1, half, half)?, b, self.heads)?,
        ))
    }

    /// x [B·Q, D], keys and values [B, H, S, K] each (the first `prefix_len` a prefix's), bias
    /// broadcastable to [B, H, Q, S] → y [B·Q, D].
    fn forward(
        &self,
        x: &Tensor,
        (keys, values): (&Tensor, &Tensor),
        bias: &Tensor,
        prefix_len: usize,
    ) -> Result<(Tensor, T5AttentionSaved)> {
        let b = keys.dim(0)?;
        let q = heads_first(&self.q.forward(x)?, b, self.heads)?;
        let (context, attention) = biased_attention_forward(&q, keys, values, bias)?;
        let y = self.o.forward(&rows_first(&context)?)?;
        Ok((
            y,
            T5AttentionSaved {
                attention,
                batch: b,
                prefix_len,
            },
        ))
    }

    /// dy [B·Q, D] → dx [B·Q, D] through the queries, d_memory [B·S, D] through the keys
    /// and values of the memory's S positions, and the prefix's dK and dV [B, H, P, K] when the
    /// keys began with one.
    fn backward(&self, dy: &Tensor, saved: &T5AttentionSaved) -> Result<AttentionGradients> {
        let d_context = heads_first(&self.o.backward(dy)?, saved.batch, self.heads)?;
        let (dq, dk, dv) = biased_attention_backward(&d_context, &saved.attention)?;
        let dx = self.q.backward(&rows_first(&dq)?)?;
        let p = saved.prefix_len;
        let own = dk.dim(2)? - p;
        let prefix = match p {
            0 => None,
            _ => Some((dk.narrow(2, 0, p)?, dv.narrow(2, 0, p)?)),
        };
        let (dk, dv) = (dk.narrow(2, p, own)?, dv.narrow(2, p, own)?);
        let d_kv = Tensor::cat(&[rows_first(&dk)?, rows_first(&dv)?], 1)?;
        Ok(AttentionGradients {
            dx,
            d_memory: self.kv.backward(&d_kv)?,
            prefix,
        })
    }
}

struct AttentionGradients {
    /// [B·Q, D] through the queries
    dx: Tensor,
    /// [B·S, D] through the memory's keys and values
    d_memory: Tensor,
    /// the prefix's dK and dV [B, H, P, K]
    prefix: Option<(Tensor, Tensor)>,
}

/// What an activation's backward reads.
enum ActivationSaved {
    Relu(ReluSaved),
    Gelu(GeluSaved),
}

fn activation_forward(kind: &Activation, x: &Tensor) -> Result<(Tensor, ActivationSaved)> {
    Ok(match kind {
        Activation::Relu => {
            let (y, s) = relu_forward(x)?;
            (y, ActivationSaved::Relu(s))
        }
        Activation::Gelu => {
            let (y, s) = gelu_erf_forward(x)?;
            (y, ActivationSaved::Gelu(s))
        }
        _ => {
            let (y, s) = gelu_tanh_forward(x)?;
            (y, ActivationSaved::Gelu(s))
        }
    })
}

fn activation_backward(kind: &Activation, dy: &Tensor, saved: &ActivationSaved) -> Result<Tensor> {
    match (kind, saved) {
        (_, ActivationSaved::Relu(s)) => relu_backward(dy, s),
        (Activation::Gelu, ActivationSaved::Gelu(s)) => gelu_erf_backward(dy, s),
        (_, ActivationSaved::Gelu(s)) => gelu_tanh_backward(dy, s),
    }
}

/// `DenseReluDense`: y = wo(act(wi·x)), or gated y = wo(act(wi_0·x) ⊙ wi_1·x).
struct T5FeedForward {
    /// wi, or wi_0 when gated
    wi: Linear,
    /// wi_1, when gated
    gate_up: Option<Linear>,
    wo: Linear,
    activation: Activation,
}

struct T5FeedForwardSaved {
    activation: ActivationSaved,
    /// gated: act(wi_0·x) and wi_1·x [T, F]
    gated: Option<(Tensor, Tensor)>,
}

impl T5FeedForward {
    fn load(vb: VarBuilder, cfg: &T5Config, kind: &FeedForwardKind) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        let linear = |name: &str, shape: (usize, usize)| -> Result<Linear> {
            Ok(Linear::new(vb.get(shape, &format!("{name}.weight"))?, None))
        };
        let (wi, gate_up) = match kind.gated {
            true => (linear("wi_0", (f, d))?, Some(linear("wi_1", (f, d))?)),
            false => (linear("wi", (f, d))?, None),
        };
        Ok(Self {
            wi,
            gate_up,
            wo: linear("wo", (d, f))?,
            activation: kind.activation.clone(),
        })
    }

    /// x [T, D] → y [T, D]
    fn forward(&self, x: &Tensor) -> Result<(Tensor, T5FeedForwardSaved)> {
        let (h, activation) = activation_forward(&self.activation, &self.wi.forward(x)?)?;
        let (h, gated) = match &self.gate_up {
            Some(up) => {
                let up = up.forward(x)?;
                ((&h * &up)?, Some((h, up)))
            }
            None => (h, None),
        };
        Ok((
            self.wo.forward(&h)?,
            T5FeedForwardSaved { activation, gated },
        ))
    }

    /// dy [T, D] → dx [T, D]
    fn backward(&self, dy: &Tensor, saved: &T5FeedForwardSaved) -> Result<Tensor> {
        let dh = self.wo.backward(dy)?;
        match (&self.gate_up, &saved.gated) {
            (Some(gate_up), Some((act, up))) => {
                let d_pre = activation_backward(&self.activation, &(&dh * up)?, &saved.activation)?;
                self.wi.backward(&d_pre)? + gate_up.backward(&(dh * act)?)?
            }
            _ => self.wi.backward(&activation_backward(
                &self.activation,
                &dh,
                &saved.activation,
            )?),
        }
    }
}

fn rms_norm(vb: &VarBuilder, cfg: &T5Config) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: vb.get(cfg.d_model, "weight")?,
        eps: cfg.layer_norm_epsilon,
    })
}

/// One `{encoder,decoder}.block.{i}`: self-attention, (decoder) cross-attention, feed-forward,
/// each as x + f(norm(x)).
struct T5Block {
    self_norm: RmsNorm,
    self_attention: T5Attention,
    /// `layer.1` of a decoder block
    cross: Option<(RmsNorm, T5Attention)>,
    ff_norm: RmsNorm,
    ff: T5FeedForward,
}

struct T5BlockSaved {
    self_norm: RmsNormSaved,
    self_attention: T5AttentionSaved,
    cross: Option<(RmsNormSaved, T5AttentionSaved)>,
    ff_norm: RmsNormSaved,
    ff: T5FeedForwardSaved,
}

/// What a block attends to beyond its own positions.
struct Attending<'a> {
    /// [B, H, Q, S] or broadcastable: relative position bias plus the masks
    self_bias: &'a Tensor,
    /// the self-attention keys' first positions that are a prefix's
    prefix_len: usize,
    /// the encoder's keys and values of this block's cross-attention, and the encoder mask's
    /// bias [B, 1, 1, S]
    cross: Option<((&'a Tensor, &'a Tensor), &'a Tensor)>,
}

impl T5Block {
    fn load(vb: VarBuilder, cfg: &T5Config, kind: &FeedForwardKind, decoder: bool) -> Result<Self> {
        let layer = |i: usize| vb.pp(format!("layer.{i}"));
        let cross = match decoder {
            true => Some((
                rms_norm(&layer(1).pp("layer_norm"), cfg)?,
                T5Attention::load(layer(1).pp("EncDecAttention"), cfg)?,
            )),
            false => None,
        };
        let ff = layer(if decoder { 2 } else { 1 });
        Ok(Self {
            self_norm: rms_norm(&layer(0).pp("layer_norm"), cfg)?,
            self_attention: T5Attention::load(layer(0).pp("SelfAttention"), cfg)?,
            cross,
            ff_norm: rms_norm(&ff.pp("layer_norm"), cfg)?,
            ff: T5FeedForward::load(ff.pp("DenseReluDense"), cfg, kind)?,
        })
    }

    /// The self-attention's keys and values of x [B·Q, D] → each [B, H, Q, K], and the norm's
    /// saved input.
    fn own_keys_values(
        &self,
        x: &Tensor,
        b: usize,
    ) -> Result<(Tensor, (Tensor, Tensor), RmsNormSaved)> {
        let (normed, saved) = self.self_norm.forward(x)?;
        let kv = self.self_attention.keys_values(&normed, b)?;
        Ok((normed, kv, saved))
    }

    /// x [B·Q, D] → y [B·Q, D], its self-attention's keys and values `kv` (own positions, or a
    /// cache with earlier ones) given.
    fn forward_with(
        &self,
        x: &Tensor,
        normed: &Tensor,
        kv: (&Tensor, &Tensor),
        self_norm: RmsNormSaved,
        attending: &Attending,
    ) -> Result<(Tensor, T5BlockSaved)> {
        let (attended, self_attention) =
            self.self_attention
                .forward(normed, kv, attending.self_bias, attending.prefix_len)?;
        let mut x = (x + attended)?;
        let cross = match (&self.cross, attending.cross) {
            (Some((norm, attention)), Some((memory_kv, bias))) => {
                let (normed, norm_saved) = norm.forward(&x)?;
                let (attended, saved) = attention.forward(&normed, memory_kv, bias, 0)?;
                x = (x + attended)?;
                Some((norm_saved, saved))
            }
            _ => None,
        };
        let (normed, ff_norm) = self.ff_norm.forward(&x)?;
        let (ff_out, ff) = self.ff.forward(&normed)?;
        let saved = T5BlockSaved {
            self_norm,
            self_attention,
            cross,
            ff_norm,
            ff,
        };
        Ok(((x + ff_out)?, saved))
    }

    /// dy [B·Q, D] → dx [B·Q, D], for a decoder block d_memory [B·S, D] through its
    /// cross-attention, and with a prefix its dK and dV [B, H, P, K].
    fn backward(&self, dy: &Tensor, saved: &T5BlockSaved) -> Result<BlockGradients> {
        let d_ff = self.ff.backward(dy, &saved.ff)?;
        let mut dx = (dy + self.ff_norm.backward(&d_ff, &saved.ff_norm)?)?;
        let mut d_memory = None;
        if let (Some((norm, attention)), Some((norm_saved, attention_saved))) =
            (&self.cross, &saved.cross)
        {
            let cross = attention.backward(&dx, attention_saved)?;
            dx = (&dx + norm.backward(&cross.dx, norm_saved)?)?;
            d_memory = Some(cross.d_memory);
        }
        let own = self.self_attention.backward(&dx, &saved.self_attention)?;
        let d_normed = (own.dx + own.d_memory)?;
        let dx = (&dx + self.self_norm.backward(&d_normed, &saved.self_norm)?)?;
        Ok(BlockGradients {
            dx,
            d_memory,
            prefix: own.prefix,
        })
    }
}

struct BlockGradients {
    /// [B·Q, D]
    dx: Tensor,
    /// a decoder block's [B·S, D] through its cross-attention
    d_memory: Option<Tensor>,
    /// its prefix's dK and dV [B, H, P, K]
    prefix: Option<(Tensor, Tensor)>,
}

/// `encoder` or `decoder`: blocks, the first block's relative position table, the final norm.
struct T5Stack {
    blocks: Vec<T5Block>,
    /// `block.0.layer.0.SelfAttention.relative_attention_bias.weight` [N, H]
    relative_bias: Tensor,
    final_norm: RmsNorm,
    /// the encoder's attention sees both ways; the decoder's only back
    bidirectional: bool,
    max_distance: usize,
}

struct T5StackSaved {
    blocks: Vec<T5BlockSaved>,
    final_norm: RmsNormSaved,
}

impl T5Stack {
    fn load(vb: VarBuilder, cfg: &T5Config, kind: &FeedForwardKind, decoder: bool) -> Result<Self> {
        let layers = if decoder {
            cfg.decoder_layers()
        } else {
            cfg.num_layers
        };
        let blocks = (0..layers)
            .map(|i| T5Block::load(vb.pp(format!("block.{i}")), cfg, kind, decoder))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            blocks,
            relative_bias: vb.get(
                (cfg.relative_attention_num_buckets, cfg.num_heads),
                "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            )?,
            final_norm: rms_norm(&vb.pp("final_layer_norm"), cfg)?,
            bidirectional: !decoder,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// The position bias [1, H, Q, S] of Q queries from position `first` over keys 0..S, with
    /// the decoder's causal mask.
    fn self_bias(&self, first: usize, queries: usize, keys: usize) -> Result<Tensor> {
        let bias = position_bias(
            &self.relative_bias,
            first,
            queries,
            keys,
            self.bidirectional,
            self.max_distance,
        )?;
        match self.bidirectional {
            true => Ok(bias),
            false => bias.broadcast_add(&causal_mask(queries, keys, first, &bias)?),
        }
    }

    /// x [B·L, D] of B rows of L → y [B·L, D] after the final norm; with `keep` what the
    /// backward needs. `padding` [B, 1, 1, P + L] masks padding keys (the encoder's, or a mixed
    /// batch's prefix positions); `prefix` gives each block's prefix keys and values [B, H, P, K]
    /// (the L positions count on from P); `cross` each block's encoder keys and values and the
    /// encoder mask's bias.
    fn forward(
        &self,
        mut x: Tensor,
        b: usize,
        padding: Option<&Tensor>,
        prefix: Option<&[(Tensor, Tensor)]>,
        cross: Option<(&[(Tensor, Tensor)], &Tensor)>,
        keep: bool,
    ) -> Result<(Tensor, Option<T5StackSaved>)> {
        let l = x.dim(0)? / b;
        let p = match prefix.and_then(|layers| layers.first()) {
            Some((keys, _)) => keys.dim(2)?,
            None => 0,
        };
        let mut bias = self.self_bias(p, l, p + l)?;
        if let Some(padding) = padding {
            bias = bias.broadcast_add(padding)?;
        }
        let mut kept = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let _span = tracing::trace_span!("t5.forward", layer = i).entered();
            let (normed, (mut k, mut v), norm_saved) = block.own_keys_values(&x, b)?;
            if let Some((prefix_k, prefix_v)) = prefix.map(|layers| &layers[i]) {
                k = Tensor::cat(&[prefix_k, &k], 2)?;
                v = Tensor::cat(&[prefix_v, &v], 2)?;
            }
            let attending = Attending {
                self_bias: &bias,
                prefix_len: p,
                cross: cross.map(|(kv, bias)| ((&kv[i].0, &kv[i].1), bias)),
            };
            let (y, saved) = block.forward_with(&x, &normed, (&k, &v), norm_saved, &attending)?;
            if keep {
                kept.push(saved);
            }
            x = y;
        }
        let (y, final_norm) = self.final_norm.forward(&x)?;
        let saved = keep.then_some(T5StackSaved {
            blocks: kept,
            final_norm,
        });
        Ok((y, saved))
    }

    /// Every block's prefix keys and values [B, H, P, K] from a prefix [B, P, L·2·H·K]
    /// (`Prefix::kv`'s layout) of `layers` layers of `heads` heads.
    fn prefix_keys_values(
        &self,
        kv: &Tensor,
        layers: usize,
        heads: usize,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let (b, p, width) = kv.dims3()?;
        let w = width / (2 * layers);
        let column =
            |c: usize| heads_first(&kv.narrow(2, c * w, w)?.reshape((b * p, w))?, b, heads);
        (0..self.blocks.len())
            .map(|block| {
                let slot = prefix_slot(block, layers);
                Ok((column(2 * slot)?, column(2 * slot + 1)?))
            })
            .collect()
    }

    /// dy [B·L, D] → dx [B·L, D], for the decoder d_memory [B·S, D] summed over its blocks,
    /// and with a prefix each block's dK and dV [B, H, P, K], in block order.
    fn backward(&self, dy: &Tensor, saved: &T5StackSaved) -> Result<StackGradients> {
        let mut dx = self.final_norm.backward(dy, &saved.final_norm)?;
        let mut d_memory: Option<Tensor> = None;
        let mut prefix = Vec::new();
        for (i, (block, saved)) in self.blocks.iter().zip(&saved.blocks).enumerate().rev() {
            let _span = tracing::trace_span!("t5.backward", layer = i).entered();
            let grads = block.backward(&dx, saved)?;
            dx = grads.dx;
            d_memory = match (d_memory, grads.d_memory) {
                (Some(sum), Some(d)) => Some((sum + d)?),
                (sum, d) => sum.or(d),
            };
            prefix.extend(grads.prefix);
        }
        prefix.reverse();
        Ok(StackGradients {
            dx,
            d_memory,
            prefix,
        })
    }
}

struct StackGradients {
    dx: Tensor,
    d_memory: Option<Tensor>,
    /// per block, when it read a prefix
    prefix: Vec<(Tensor, Tensor)>,
}

/// The adapter layer whose keys and values decoder block `block` reads, of `layers` (PEFT's
/// `num_layers`, the encoder's). PEFT's `get_prompt` doubles the L·2 rows of its prefix
/// (`torch.cat([kv, kv])`) and cuts them in fours, each block's self keys, self values and the
/// cross-attention's pair that it then throws away; so block l reads layer 2l mod L, and the odd
/// layers are never read (their gradient is zero).
fn prefix_slot(block: usize, layers: usize) -> usize {
    (2 * block) % layers
}

/// The frozen T5: `shared` embeddings, the encoder, the decoder and the LM head.
pub struct T5 {
    pub config: T5Config,
    shared: Weight,
    encoder: T5Stack,
    decoder: T5Stack,
    /// [V, D]: `lm_head.weight` (or `shared` when the checkpoint ties them), times D^-0.5 when
    /// the decoder's output is scaled: the logits are hidden · lm_headᵀ
    lm_head: Weight,
}

/// Activations of one training forward.
pub struct T5Activations {
    /// (B, S, T)
    shape: (usize, usize, usize),
    encoder: T5StackSaved,
    decoder: T5StackSaved,
}

impl T5 {
    /// Loads config.json and model.safetensors (or every *.safetensors file) from `dir`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config = T5Config::from_file(&dir.join("config.json"))?;
        let vb = super::mmap_weights(dir, dtype, device)?;
        Self::from_var_builder(vb, config).with_context(|| super::mismatch(dir, "T5"))
    }

    pub fn from_var_builder(vb: VarBuilder, config: T5Config) -> Result<Self> {
        let kind = config
            .feed_forward()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (v, d) = (config.vocab_size, config.d_model);
        let shared = vb.get((v, d), "shared.weight")?;
        let head = match vb.contains_tensor("lm_head.weight") {
            true => vb.get((v, d), "lm_head.weight")?,
            false => shared.clone(),
        };
        let head = match config.scales_decoder_output() {
            true => (head * (d as f64).powf(-0.5))?,
            false => head,
        };
        Ok(Self {
            encoder: T5Stack::load(vb.pp("encoder"), &config, &kind, false)?,
            decoder: T5Stack::load(vb.pp("decoder"), &config, &kind, true)?,
            shared: Weight::Dense(shared),
            lm_head: Weight::Dense(head),
            config,
        })
    }

    /// The same model with `f` applied to every matrix: held in bf16, say.
    pub fn map_weights(mut self, f: &dyn Fn(&Weight) -> Result<Weight>) -> Result<Self> {
        for block in self
            .encoder
            .blocks
            .iter_mut()
            .chain(&mut self.decoder.blocks)
        {
            let mut linears = vec![
                &mut block.self_attention.q,
                &mut block.self_attention.kv,
                &mut block.self_attention.o,
                &mut block.ff.wi,
                &mut block.ff.wo,
            ];
            if let Some(up) = &mut block.ff.gate_up {
                linears.push(up);
            }
            if let Some((_, cross)) = &mut block.cross {
                linears.extend([&mut cross.q, &mut cross.kv, &mut cross.o]);
            }
            for linear in linears {
                linear.weight = f(&linear.weight)?;
            }
        }
        self.shared = f(&self.shared)?;
        self.lm_head = f(&self.lm_head)?;
        Ok(self)
    }

    /// [V, D]: the LM head, D^-0.5 folded in where the checkpoint scales the decoder's output.
    pub fn lm_head(&self) -> &Weight {
        &self.lm_head
    }

    /// Every decoder block's cross-attention keys and values of the encoder's output [B·S, D].
    fn cross_keys_values(&self, encoded: &Tensor, b: usize) -> Result<Vec<(Tensor, Tensor)>> {
        self.decoder
            .blocks
            .iter()
            .map(|block| match &block.cross {
                Some((_, attention)) => attention.keys_values(encoded, b),
                None => candle_core::bail!("a T5 decoder block without cross-attention"),
            })
            .collect()
    }

    /// embeds [B, S, D] (the prompt in front) under mask [B, S] through the encoder → its
    /// output [B, S, D], keeping nothing.
    pub fn encode(&self, embeds: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s, d) = embeds.dims3()?;
        let padding = mask_bias(mask, embeds.dtype())?;
        let x = embeds.reshape((b * s, d))?;
        let (encoded, _) = self
            .encoder
            .forward(x, b, Some(&padding), None, None, false)?;
        encoded.reshape((b, s, d))
    }

    /// One input [1, S, D] (a prompt in front) through the encoder → what decoding reads; a
    /// prefix [P, L·2·H·K] is the decoder's past.
    pub fn start_decoding(&self, embeds: &Tensor, prefix: Option<&Tensor>) -> Result<T5Decoding> {
        let mask = Tensor::ones((1, embeds.dim(1)?), DType::U32, embeds.device())?;
        let encoded = self.encode(embeds, &mask)?.squeeze(0)?;
        let (cache, len) = match prefix {
            Some(kv) => (
                self.prefix_keys_values(&kv.to_dtype(embeds.dtype())?.unsqueeze(0)?)?,
                kv.dim(0)?,
            ),
            None => (Vec::new(), 0),
        };
        Ok(T5Decoding {
            cross: self.cross_keys_values(&encoded, 1)?,
            cache,
            len,
        })
    }

    /// Every decoder block's prefix keys and values [B, H, P, K] of a prefix [B, P, L·2·H·K];
    /// PEFT sizes it by the encoder's layers, so the decoder must have as many.
    fn prefix_keys_values(&self, kv: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        let (layers, heads) = (self.config.num_layers, self.config.num_heads);
        let width = layers * 2 * heads * self.config.d_kv;
        if self.config.decoder_layers() != layers || kv.dim(2)? != width {
            candle_core::bail!(
                "prefix tuning on T5 needs as many decoder layers as encoder layers ({} and {layers} here) and a prefix {width} wide ({} here)",
                self.config.decoder_layers(),
                kv.dim(2)?
            );
        }
        self.decoder.prefix_keys_values(kv, layers, heads)
    }

    /// The decoder blocks' prefix dK and dV [B, H, P, K] → the prefix's gradient [B, P, L·2·H·K]:
    /// each layer's the sum of the blocks that read it (`prefix_slot`), zero where none did.
    fn prefix_gradient(&self, blocks: &[(Tensor, Tensor)]) -> Result<Tensor> {
        let layers = self.config.num_layers;
        let rows = |x: &Tensor| -> Result<Tensor> {
            let (b, h, p, k) = x.dims4()?;
            rows_first(x)?.reshape((b, p, h * k))
        };
        let mut slots: Vec<Option<(Tensor, Tensor)>> = vec![None; layers];
        for (block, (dk, dv)) in blocks.iter().enumerate() {
            let slot = &mut slots[prefix_slot(block, layers)];
            *slot = Some(match slot.take() {
                Some((k, v)) => ((k + rows(dk)?)?, (v + rows(dv)?)?),
                None => (rows(dk)?, rows(dv)?),
            });
        }
        let zeros = rows(&blocks[0].0)?.zeros_like()?;
        let mut columns = Vec::with_capacity(2 * layers);
        for slot in slots {
            match slot {
                Some((k, v)) => columns.extend([k, v]),
                None => columns.extend([zeros.clone(), zeros.clone()]),
            }
        }
        Tensor::cat(&columns, 2)
    }

    /// The decoder's next N positions, embeds [N, D] (after the `state.len()` read before) →
    /// hidden [N, D] after the final norm; the cache grows by N.
    pub fn extend(&self, embeds: &Tensor, state: &mut T5Decoding) -> Result<Tensor> {
        let (n, start) = (embeds.dim(0)?, state.len);
        let bias = self.decoder.self_bias(start, n, start + n)?;
        let no_padding = Tensor::zeros((1, 1, 1, 1), embeds.dtype(), embeds.device())?;
        let mut x = embeds.clone();
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            let (normed, (k, v), norm_saved) = block.own_keys_values(&x, 1)?;
            let (k, v) = match state.cache.get(i) {
                Some((past_k, past_v)) => (
                    Tensor::cat(&[past_k, &k], 2)?,
                    Tensor::cat(&[past_v, &v], 2)?,
                ),
                None => (k, v),
            };
            let attending = Attending {
                self_bias: &bias,
                prefix_len: 0,
                cross: Some(((&state.cross[i].0, &state.cross[i].1), &no_padding)),
            };
            x = block
                .forward_with(&x, &normed, (&k, &v), norm_saved, &attending)?
                .0;
            match state.cache.get_mut(i) {
                Some(slot) => *slot = (k, v),
                None => state.cache.push((k, v)),
            }
        }
        state.len += n;
        Ok(self.decoder.final_norm.forward(&x)?.0)
    }

    /// embeds [B, D], one new decoder position for each of B texts, each after its own state →
    /// hidden [B, D] after the final norm, in one pass (the weights read once for all B); each
    /// state grows by one. Rows of different lengths and encoder inputs are padded to the
    /// longest with their padding masked, so row b gets what `extend` gives it alone.
    pub fn extend_each(&self, embeds: &Tensor, states: &mut [&mut T5Decoding]) -> Result<Tensor> {
        let b = states.len();
        let (dtype, device) = (embeds.dtype(), embeds.device());
        let mask_of = |lens: &[usize], width: usize| -> Result<Tensor> {
            let mask: Vec<u32> = lens
                .iter()
                .flat_map(|&n| (0..width).map(move |j| u32::from(j < n)))
                .collect();
            mask_bias(&Tensor::from_vec(mask, (b, width), device)?, dtype)
        };
        // each row's query sits at its own position, after its own keys
        let keys: Vec<usize> = states.iter().map(|s| s.len + 1).collect();
        let longest = keys.iter().copied().max().unwrap_or(1);
        let relative = states
            .iter()
            .map(|s| {
                self.decoder.self_bias(s.len, 1, s.len + 1)?.pad_with_zeros(
                    3,
                    0,
                    longest - s.len - 1,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let self_bias = Tensor::cat(&relative, 0)?.broadcast_add(&mask_of(&keys, longest)?)?;
        let memory: Vec<usize> = states
            .iter()
            .map(|s| s.cross.first().map_or(Ok(0), |(k, _)| k.dim(2)))
            .collect::<Result<_>>()?;
        let widest = memory.iter().copied().max().unwrap_or(0);
        let cross_bias = mask_of(&memory, widest)?;
        let padded = |rows: Vec<&Tensor>, width: usize| -> Result<Tensor> {
            let rows = rows
                .into_iter()
                .map(|t| t.pad_with_zeros(2, 0, width - t.dim(2)?))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)
        };
        let mut x = embeds.clone();
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            let (normed, (k, v), norm_saved) = block.own_keys_values(&x, b)?;
            for (r, state) in states.iter_mut().enumerate() {
                let (k, v) = (k.narrow(0, r, 1)?, v.narrow(0, r, 1)?);
                match state.cache.get_mut(i) {
                    Some((past_k, past_v)) => {
                        *past_k = Tensor::cat(&[&*past_k, &k], 2)?;
                        *past_v = Tensor::cat(&[&*past_v, &v], 2)?;
                    }
                    None => state.cache.push((k, v)),
                }
            }
            let self_k = padded(states.iter().map(|s| &s.cache[i].0).collect(), longest)?;
            let self_v = padded(states.iter().map(|s| &s.cache[i].1).collect(), longest)?;
            let cross_k = padded(states.iter().map(|s| &s.cross[i].0).collect(), widest)?;
            let cross_v = padded(states.iter().map(|s| &s.cross[i].1).collect(), widest)?;
            let attending = Attending {
                self_bias: &self_bias,
                prefix_len: 0,
                cross: Some(((&cross_k, &cross_v), &cross_bias)),
            };
            x = block
                .forward_with(&x, &normed, (&self_k, &self_v), norm_saved, &attending)?
                .0;
        }
        for state in states.iter_mut() {
            state.len += 1;
        }
        Ok(self.decoder.final_norm.forward(&x)?.0)
    }
}

/// One text being decoded: the encoder's keys and values for every cross-attention, computed
/// once, and the decoder's own KV cache.
pub struct T5Decoding {
    /// per decoder block, [1, H, S, K] each
    cross: Vec<(Tensor, Tensor)>,
    /// per decoder block, [1, H, len, K] each
    cache: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl T5Decoding {
    /// Decoder positions read so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Backbone for T5 {
    type Activations = T5Activations;

    fn hidden_size(&self) -> usize {
        self.config.d_model
    }

    fn max_positions(&self) -> usize {
        self.config.n_positions
    }

    fn word_embeddings(&self) -> &Weight {
        &self.shared
    }

    fn decoder_start(&self) -> Option<u32> {
        Some(self.config.decoder_start())
    }

    /// The encoder reads `embeds` under `attention_mask`; the decoder reads `decoder` [B, T, D]
    /// (causal, every position real: batches pad it on the right) and the encoder's output →
    /// the decoder's last hidden state [B, T, D], unscaled (`lm_head` holds the scale).
    fn run(&self, input: &BackboneInput, keep: bool) -> Result<(Tensor, Option<T5Activations>)> {
        let Some(decoder_embeds) = input.decoder else {
            candle_core::bail!("T5 writes its output with the decoder: give it the decoder's input (--task seq2seq)");
        };
        let (b, s, d) = input.embeds.dims3()?;
        let t = decoder_embeds.dim(1)?;
        let padding = mask_bias(input.attention_mask, input.embeds.dtype())?;
        let (encoded, encoder) = self.encoder.forward(
            input.embeds.reshape((b * s, d))?,
            b,
            Some(&padding),
            None,
            None,
            keep,
        )?;
        let cross = self.cross_keys_values(&encoded, b)?;
        let (prefix, prefix_padding) = match input.prefix {
            Some(prefix) => {
                let decoder_mask = Tensor::ones((b, t), prefix.mask.dtype(), prefix.mask.device())?;
                let mask = Tensor::cat(&[&prefix.mask, &decoder_mask], 1)?;
                (
                    Some(self.prefix_keys_values(&prefix.kv)?),
                    Some(mask_bias(&mask, input.embeds.dtype())?),
                )
            }
            None => (None, None),
        };
        let (hidden, decoder) = self.decoder.forward(
            decoder_embeds.reshape((b * t, d))?,
            b,
            prefix_padding.as_ref(),
            prefix.as_deref(),
            Some((&cross, &padding)),
            keep,
        )?;
        let activations = match (encoder, decoder) {
            (Some(encoder), Some(decoder)) => Some(T5Activations {
                shape: (b, s, t),
                encoder,
                decoder,
            }),
            _ => None,
        };
        Ok((hidden.reshape((b, t, d))?, activations))
    }

    /// d_hidden [B, T, D] of the decoder → d_embeds [B, S, D] of the encoder's input and the
    /// decoder input's [B, T, D].
    fn backward(
        &self,
        d_hidden: &Tensor,
        activations: T5Activations,
        d_kv: Option<&Tensor>,
    ) -> Result<InputGradients> {
        if d_kv.is_some() {
            candle_core::bail!("T5's prompt is not shared across a batch");
        }
        let (b, s, t) = activations.shape;
        let d = self.config.d_model;
        let decoder = self
            .decoder
            .backward(&d_hidden.reshape((b * t, d))?, &activations.decoder)?;
        let d_encoded = match decoder.d_memory {
            Some(d) => d,
            None => candle_core::bail!("no gradient reached the encoder"),
        };
        let encoder = self.encoder.backward(&d_encoded, &activations.encoder)?;
        let prefix = match decoder.prefix.is_empty() {
            true => None,
            false => Some(self.prefix_gradient(&decoder.prefix)?),
        };
        Ok(InputGradients {
            embeds: encoder.dx.reshape((b, s, d))?,
            prefix,
            decoder: Some(decoder.dx.reshape((b, t, d))?),
        })
    }
}
