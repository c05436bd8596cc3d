//! The Llama family (Llama, SmolLM, Qwen2-style q/k/v biases), from a Hugging Face directory. Names
//! follow `transformers`' modeling_llama.py; the `model.` prefix of LlamaForCausalLM checkpoints is
//! accepted too. Pre-norm blocks: RMSNorm, attention with rotary positions and grouped-query heads,
//! RMSNorm, SiLU-gated MLP.

use super::stack::{self, kept, Attend, Block, Pass};
use super::{Activation, Backbone, BackboneInput, Decoder, InputGradients, KvCache};
use crate::kernels::{
    attention_backward, mask_bias, AttentionSaved, AttentionShape, GatedMlp, GatedMlpSaved, Linear,
    Positions, RmsNorm, RmsNormSaved, Rope, Weight,
};
use crate::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 writes {"rope_theta", "rope_type"} here instead of the top-level fields
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// q/k/v biases (Qwen2 always has them)
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub model_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_act() -> Activation {
    Activation::Silu
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let cfg: Self = super::read_config(path, "Llama-family")?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Refuses what this backbone cannot run, or what would make no sense (no layers, heads that
    /// do not divide the width); `at` names the file in the error.
    pub fn validate(&self, at: &str) -> crate::Result<()> {
        let cfg = self;
        if let Some(t) = cfg
            .model_type
            .as_deref()
            .filter(|t| !matches!(*t, "llama" | "qwen2" | "mistral"))
        {
            bail!("{at}: model_type {t:?} is not in the Llama family this backbone reads (llama, qwen2, mistral)");
        }
        if cfg.hidden_act != Activation::Silu {
            bail!(
                "{at}: hidden_act {:?} is not supported (silu)",
                cfg.hidden_act.name()
            );
        }
        let rope_type = cfg
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.as_deref())
            .unwrap_or("default");
        if cfg.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) || rope_type != "default" {
            bail!("{at}: scaled RoPE ({rope_type}) is not supported yet");
        }
        if cfg.mlp_bias {
            bail!("{at}: mlp_bias is not supported");
        }
        let (heads, kv) = (cfg.num_attention_heads, cfg.kv_heads());
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            bail!("{at}: {heads} attention heads do not split into {kv} key/value heads");
        }
        if cfg.head_dim.is_none() && !cfg.hidden_size.is_multiple_of(heads) {
            bail!(
                "{at}: the hidden size {} is not a multiple of the {heads} attention heads",
                cfg.hidden_size
            );
        }
        if cfg.head_dim() == 0 || !cfg.head_dim().is_multiple_of(2) {
            bail!(
                "{at}: a head width of {} cannot be rotated (RoPE needs an even width)",
                cfg.head_dim()
            );
        }
        if cfg.num_hidden_layers == 0 || cfg.vocab_size == 0 || cfg.hidden_size == 0 {
            bail!(
                "{at}: {} layers, a vocabulary of {} and a hidden size of {}: nothing to run",
                cfg.num_hidden_layers,
                cfg.vocab_size,
                cfg.hidden_size
            );
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .unwrap_or(self.rope_theta)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type.as_deref() == Some("qwen2")
    }
}

/// One `layers.{i}`. q_proj, k_proj and v_proj are fused into one packed projection at load.
struct LlamaLayer {
    input_layernorm: RmsNorm,
    qkv: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
    /// the model's RoPE tables (shared, not copied) and head layout
    rope: Rope,
    heads: HeadLayout,
}

/// How the packed projection [T, (H + 2·Hkv)·K] splits into heads, resolved once from the config.
#[derive(Debug, Clone, Copy)]
struct HeadLayout {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

struct LlamaLayerSaved {
    input_layernorm: RmsNormSaved,
    /// the packed projection after RoPE and the probabilities (a rows pass)
    attention: Option<AttentionSaved>,
    post_attention_layernorm: RmsNormSaved,
    mlp: GatedMlpSaved,
}

/// Matrices kept quantized (`--keep-quantized`), by their full name; the rest come from the VarBuilder.
pub type QuantizedWeights = HashMap<String, Weight>;

fn linear(
    vb: &VarBuilder,
    quantized: &QuantizedWeights,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<Linear> {
    let b = if bias {
        Some(vb.get(out, "bias")?)
    } else {
        None
    };
    let name = format!("{}.weight", vb.prefix());
    let weight = match quantized.get(&name) {
        Some(w) if w.dims() == [out, inp] => w.clone(),
        Some(w) => candle_core::bail!("{name} is {:?}, expected [{out}, {inp}]", w.dims()),
        None => Weight::Dense(vb.get((out, inp), "weight")?),
    };
    Ok(Linear::from_weight(weight, b))
}

impl LlamaLayer {
    fn load(
        vb: VarBuilder,
        quantized: &QuantizedWeights,
        cfg: &LlamaConfig,
        rope: &Rope,
    ) -> Result<Self> {
        let (d, f, k) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (hq, hk) = (cfg.num_attention_heads * k, cfg.kv_heads() * k);
        let eps = cfg.rms_norm_eps;
        let attn = vb.pp("self_attn");
        let parts = [("q_proj", hq), ("k_proj", hk), ("v_proj", hk)]
            .map(|(name, out)| linear(&attn.pp(name), quantized, out, d, cfg.qkv_bias()));
        let [q, k_, v] = parts;
        let (q, k_, v) = (q?, k_?, v?);
        let bias = match (&q.bias, &k_.bias, &v.bias) {
            (Some(a), Some(b), Some(c)) => Some(Tensor::cat(&[a, b, c], 0)?),
            _ => None,
        };
        let mlp = vb.pp("mlp");
        Ok(Self {
            input_layernorm: RmsNorm {
                weight: vb.get(d, "input_layernorm.weight")?,
                eps,
            },
            qkv: Linear::from_weight(Weight::cat(&[&q.weight, &k_.weight, &v.weight])?, bias),
            // Llama biases o_proj with attention_bias; Qwen2 biases only q, k and v
            o_proj: linear(&attn.pp("o_proj"), quantized, d, hq, cfg.attention_bias)?,
            post_attention_layernorm: RmsNorm {
                weight: vb.get(d, "post_attention_layernorm.weight")?,
                eps,
            },
            mlp: {
                let gate = linear(&mlp.pp("gate_proj"), quantized, f, d, false)?;
                // kept-quantized weights mean memory matters more than the two matmuls
                let recompute = matches!(gate.weight, Weight::Quantized { .. });
                GatedMlp {
                    gate,
                    up: linear(&mlp.pp("up_proj"), quantized, f, d, false)?,
                    down: linear(&mlp.pp("down_proj"), quantized, d, f, false)?,
                    recompute,
                }
            },
            rope: rope.clone(),
            heads: HeadLayout {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.kv_heads(),
                head_dim: cfg.head_dim(),
            },
        })
    }

    /// Rotates (or, with `backward`, un-rotates the gradient of) the query and key columns of a
    /// packed projection [T, (H + 2·Hkv)·K] of B rows of S positions; the value columns pass through.
    fn rope_packed(
        &self,
        qkv: &Tensor,
        shape: AttentionShape,
        positions: Positions,
        backward: bool,
    ) -> Result<Tensor> {
        let HeadLayout {
            heads,
            kv_heads,
            head_dim: k,
        } = self.heads;
        let (batch, seq) = (shape.batch, shape.seq);
        let rotate = |start: usize, count: usize| -> Result<Tensor> {
            let x = qkv
                .narrow(1, start * k, count * k)?
                .reshape((batch, seq, count, k))?
                .transpose(1, 2)?
                .contiguous()?;
            let y = if backward {
                self.rope.backward(&x, positions)?
            } else {
                self.rope.forward(&x, positions)?
            };
            y.transpose(1, 2)?.reshape((batch * seq, count * k))
        };
        Tensor::cat(
            &[
                rotate(0, heads)?,
                rotate(heads, kv_heads)?,
                qkv.narrow(1, (heads + kv_heads) * k, kv_heads * k)?,
            ],
            1,
        )
    }
}

impl Block for LlamaLayer {
    type Saved = LlamaLayerSaved;

    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        pass: &mut Pass,
    ) -> Result<(Tensor, LlamaLayerSaved)> {
        let (normed, input_layernorm) = self.input_layernorm.forward(x)?;
        let qkv = self.qkv.forward(&normed)?;
        let qkv = self.rope_packed(&qkv, pass.shape, pass.positions, false)?;
        let (context, attention) = pass.attend(layer, &qkv)?;
        let x1 = (x + self.o_proj.forward(&context)?)?;
        let (normed, post_attention_layernorm) = self.post_attention_layernorm.forward(&x1)?;
        let (m, mlp) = self.mlp.forward(&normed)?;
        let saved = LlamaLayerSaved {
            input_layernorm,
            attention,
            post_attention_layernorm,
            mlp,
        };
        Ok(((&x1 + m)?, saved))
    }

    fn backward(
        &self,
        dy: &Tensor,
        saved: &LlamaLayerSaved,
        shape: AttentionShape,
        positions: Positions,
        d_kv: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let d_norm2 = self.mlp.backward(dy, &saved.mlp)?;
        let dx1 = (dy
            + self
                .post_attention_layernorm
                .backward(&d_norm2, &saved.post_attention_layernorm)?)?;
        let d_context = self.o_proj.backward(&dx1)?;
        let (d_qkv, d_prefix) =
            attention_backward(&d_context, kept(&saved.attention)?, shape, d_kv)?;
        let d_qkv = self.rope_packed(&d_qkv, shape, positions, true)?;
        let d_norm1 = self.qkv.backward(&d_qkv)?;
        let dx = (&dx1
            + self
                .input_layernorm
                .backward(&d_norm1, &saved.input_layernorm)?)?;
        Ok((dx, d_prefix))
    }

    fn attention(saved: &LlamaLayerSaved) -> &Option<AttentionSaved> {
        &saved.attention
    }
}

/// The frozen Llama-family decoder stack: token embeddings, blocks, final RMSNorm.
pub struct Llama {
    pub config: LlamaConfig,
    embed_tokens: Weight,
    /// `lm_head.weight` [V, D] when the checkpoint does not tie it to the embeddings
    lm_head: Option<Weight>,
    layers: Vec<LlamaLayer>,
    norm: RmsNorm,
}

pub struct LlamaActivations {
    shape: (usize, usize, usize),
    /// where positions start (after a prefix), and [B, S] when rows differ (`input_positions`)
    positions: (usize, Option<Tensor>),
    layers: Vec<LlamaLayerSaved>,
    norm: RmsNormSaved,
}

impl Llama {
    /// The same model with `f` applied to every matrix (the token embeddings and the LM head
    /// included): held in bf16, say.
    pub fn map_weights(mut self, f: &dyn Fn(&Weight) -> Result<Weight>) -> Result<Self> {
        for layer in &mut self.layers {
            let mlp = &mut layer.mlp;
            for linear in [
                &mut layer.qkv,
                &mut layer.o_proj,
                &mut mlp.gate,
                &mut mlp.up,
                &mut mlp.down,
            ] {
                linear.weight = f(&linear.weight)?;
            }
        }
        if let Some(head) = &mut self.lm_head {
            *head = f(head)?;
        }
        self.embed_tokens = f(&self.embed_tokens)?;
        Ok(self)
    }

    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let vb = super::mmap_weights(dir, dtype, device)?;
        Self::from_var_builder(vb, config).with_context(|| super::mismatch(dir, "Llama"))
    }

    pub fn from_var_builder(root: VarBuilder, config: LlamaConfig) -> Result<Self> {
        Self::from_parts(root, &QuantizedWeights::new(), config)
    }

    /// `from_var_builder`, with the matrices named in `quantized` taken from there instead.
    pub fn from_parts(
        root: VarBuilder,
        quantized: &QuantizedWeights,
        config: LlamaConfig,
    ) -> Result<Self> {
        let (v, d) = (config.vocab_size, config.hidden_size);
        let lm_head = match root.contains_tensor("lm_head.weight")
            || quantized.contains_key("lm_head.weight")
        {
            true => Some(linear(&root.pp("lm_head"), quantized, v, d, false)?.weight),
            false => None,
        };
        let vb = if root.contains_tensor("model.embed_tokens.weight") {
            root.pp("model")
        } else {
            root
        };
        let embed_tokens = linear(&vb.pp("embed_tokens"), quantized, v, d, false)?.weight;
        let rope = Rope::new(
            config.head_dim(),
            config.max_position_embeddings,
            config.rope_theta(),
            embed_tokens.dtype(),
            &embed_tokens.device(),
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| LlamaLayer::load(vb.pp(format!("layers.{i}")), quantized, &config, &rope))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: RmsNorm {
                weight: vb.get(d, "norm.weight")?,
                eps: config.rms_norm_eps,
            },
            embed_tokens,
            lm_head,
            layers,
            config,
        })
    }

    fn attention_shape(&self, batch: usize, seq: usize) -> AttentionShape {
        let c = &self.config;
        AttentionShape {
            batch,
            seq,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            causal: true,
        }
    }
}

impl Backbone for Llama {
    type Activations = LlamaActivations;

    fn run(&self, input: &BackboneInput, keep: bool) -> Result<(Tensor, Option<LlamaActivations>)> {
        let shape = input.embeds.dims3()?;
        let (b, s, d) = shape;
        let (full_mask, p) = (input.full_mask()?, input.prefix_len());
        let bias = mask_bias(&full_mask, input.embeds.dtype())?;
        let (offset, position_ids) = super::input_positions(&full_mask, p)?;
        let mut pass = Pass::new(
            self.attention_shape(b, s),
            Positions::from_ids(offset, position_ids.as_ref()),
            Attend::Rows { bias: &bias, keep },
        );
        pass.prefix = input.prefix.map(|p| &p.kv);
        let x = input.embeds.reshape((b * s, d))?;
        let (x, layers) = stack::forward(&self.layers, x, &mut pass)?;
        let (hidden, norm) = self.norm.forward(&x)?;
        let activations = keep.then_some(LlamaActivations {
            shape,
            positions: (offset, position_ids.clone()),
            layers,
            norm,
        });
        Ok((hidden.reshape(shape)?, activations))
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn word_embeddings(&self) -> &Weight {
        &self.embed_tokens
    }

    fn shares_prompt(&self) -> bool {
        true
    }

    fn keys_values(&self, activations: &LlamaActivations) -> Result<Tensor> {
        let (b, s, _) = activations.shape;
        stack::keys_values::<LlamaLayer>(&activations.layers, self.attention_shape(b, s))
    }

    fn backward(
        &self,
        d_hidden: &Tensor,
        activations: LlamaActivations,
        d_kv: Option<&Tensor>,
    ) -> Result<InputGradients> {
        let (b, s, d) = activations.shape;
        let dx = self
            .norm
            .backward(&d_hidden.reshape((b * s, d))?, &activations.norm)?;
        let shape = self.attention_shape(b, s);
        let (offset, ids) = &activations.positions;
        let positions = Positions::from_ids(*offset, ids.as_ref());
        let d_kv = super::flat(d_kv)?;
        let (dx, prefix) = stack::backward(
            &self.layers,
            dx,
            &activations.layers,
            shape,
            positions,
            d_kv.as_ref(),
        )?;
        Ok(InputGradients {
            embeds: dx.reshape(activations.shape)?,
            prefix,
            decoder: None,
        })
    }
}

impl Decoder for Llama {
    fn extend(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let n = embeds.dim(0)?;
        let mut pass = Pass::new(
            self.attention_shape(1, n),
            Positions::From(cache.len()),
            Attend::Cached { cache },
        );
        let (x, _) = stack::forward(&self.layers, embeds.clone(), &mut pass)?;
        Ok(self.norm.forward(&x)?.0)
    }

    fn extend_each(&self, embeds: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        let positions = KvCache::next_positions(caches, embeds.device())?;
        let mut pass = Pass::new(
            self.attention_shape(caches.len(), 1),
            Positions::Ids(&positions),
            Attend::Each { caches },
        );
        let (x, _) = stack::forward(&self.layers, embeds.clone(), &mut pass)?;
        Ok(self.norm.forward(&x)?.0)
    }

    /// The checkpoint's own LM head, or the embeddings it is tied to.
    fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}
