//! The Llama family (Llama, SmolLM, Qwen2-style q/k/v biases), from a Hugging Face directory. Names
//! follow `transformers`' modeling_llama.py; the `model.` prefix of LlamaForCausalLM checkpoints is
//! accepted too. Pre-norm blocks: RMSNorm, attention with rotary positions and grouped-query heads,
//! RMSNorm, SiLU-gated MLP.

use super::{Backbone, BackboneInput, Decoder, KvCache};
use crate::kernels::{
    attention_backward, attention_forward, cached_attention, heads_of, mask_bias, AttentionShape,
    GatedMlp, GatedMlpSaved, Linear, Positions, RmsNorm, Rope, Weight,
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
    pub hidden_act: String,
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
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let cfg: Self = super::read_config(path, "Llama-family")?;
        let at = path.display();
        if let Some(t) = cfg
            .model_type
            .as_deref()
            .filter(|t| !matches!(*t, "llama" | "qwen2" | "mistral"))
        {
            bail!("{at}: model_type {t:?} is not in the Llama family this backbone reads (llama, qwen2, mistral)");
        }
        if cfg.hidden_act != "silu" {
            bail!(
                "{at}: hidden_act {:?} is not supported (silu)",
                cfg.hidden_act
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
        let kv = cfg.kv_heads();
        if kv == 0 || !cfg.num_attention_heads.is_multiple_of(kv) {
            bail!(
                "{at}: {} attention heads do not split into {kv} key/value heads",
                cfg.num_attention_heads
            );
        }
        Ok(cfg)
    }

    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .unwrap_or(self.rope_theta)
    }

    fn head_dim(&self) -> usize {
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
}

struct LlamaLayerSaved {
    /// [T, D], the block's input (RMSNorm keeps no statistics)
    x: Tensor,
    /// [T, (H + 2·Hkv)·K] after RoPE
    qkv: Tensor,
    /// [B, H, S, S]
    probs: Tensor,
    /// [T, D], after attention
    x1: Tensor,
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
    fn load(vb: VarBuilder, quantized: &QuantizedWeights, cfg: &LlamaConfig) -> Result<Self> {
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
        })
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
    rope: Rope,
}

pub struct LlamaActivations {
    shape: (usize, usize, usize),
    /// [B, S], when not 0..S (`position_ids`)
    position_ids: Option<Tensor>,
    layers: Vec<LlamaLayerSaved>,
    /// [T, D], the input of the final norm
    last: Tensor,
}

impl Llama {
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
        let layers = (0..config.num_hidden_layers)
            .map(|i| LlamaLayer::load(vb.pp(format!("layers.{i}")), quantized, &config))
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = linear(&vb.pp("embed_tokens"), quantized, v, d, false)?.weight;
        let rope = Rope::new(
            config.head_dim(),
            config.max_position_embeddings,
            config.rope_theta(),
            embed_tokens.dtype(),
            &embed_tokens.device(),
        )?;
        Ok(Self {
            norm: RmsNorm {
                weight: vb.get(d, "norm.weight")?,
                eps: config.rms_norm_eps,
            },
            embed_tokens,
            lm_head,
            layers,
            rope,
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

    /// Rotates (or, with `backward`, un-rotates the gradient of) the query and key columns of a
    /// packed projection [T, (H + 2·Hkv)·K]; the value columns pass through.
    fn rope_packed(
        &self,
        qkv: &Tensor,
        batch: usize,
        seq: usize,
        positions: Positions,
        backward: bool,
    ) -> Result<Tensor> {
        let (k, hq, hk) = (
            self.config.head_dim(),
            self.config.num_attention_heads,
            self.config.kv_heads(),
        );
        let rotate = |start: usize, heads: usize| -> Result<Tensor> {
            let x = qkv
                .narrow(1, start * k, heads * k)?
                .reshape((batch, seq, heads, k))?
                .transpose(1, 2)?
                .contiguous()?;
            let y = if backward {
                self.rope.backward(&x, positions)?
            } else {
                self.rope.forward(&x, positions)?
            };
            y.transpose(1, 2)?.reshape((batch * seq, heads * k))
        };
        Tensor::cat(
            &[
                rotate(0, hq)?,
                rotate(hq, hk)?,
                qkv.narrow(1, (hq + hk) * k, hk * k)?,
            ],
            1,
        )
    }
}

impl Backbone for Llama {
    type Activations = LlamaActivations;

    fn run(&self, input: &BackboneInput, keep: bool) -> Result<(Tensor, Option<LlamaActivations>)> {
        let shape = input.embeds.dims3()?;
        let (b, s, d) = shape;
        let bias = mask_bias(input.attention_mask, input.embeds.dtype())?;
        let attention = self.attention_shape(b, s);
        let position_ids = super::position_ids(input.attention_mask)?;
        let positions = Positions::from_ids(position_ids.as_ref());
        let mut x = input.embeds.reshape((b * s, d))?;
        let mut layers = Vec::with_capacity(if keep { self.layers.len() } else { 0 });
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&layer.input_layernorm.forward(&x)?)?;
            let qkv = self.rope_packed(&qkv, b, s, positions, false)?;
            let (context, probs) = attention_forward(&qkv, &bias, attention)?;
            let x1 = (&x + layer.o_proj.forward(&context)?)?;
            let (m, mlp) = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&x1)?)?;
            let y = (&x1 + m)?;
            if keep {
                layers.push(LlamaLayerSaved {
                    x,
                    qkv,
                    probs,
                    x1,
                    mlp,
                });
            }
            x = y;
        }
        let hidden = self.norm.forward(&x)?.reshape(shape)?;
        Ok((
            hidden,
            keep.then_some(LlamaActivations {
                shape,
                position_ids,
                layers,
                last: x,
            }),
        ))
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

    fn backward(&self, d_hidden: &Tensor, activations: LlamaActivations) -> Result<Tensor> {
        let (b, s, d) = activations.shape;
        let attention = self.attention_shape(b, s);
        let positions = Positions::from_ids(activations.position_ids.as_ref());
        let mut dx = self
            .norm
            .backward(&d_hidden.reshape((b * s, d))?, &activations.last)?;
        for (layer, saved) in self.layers.iter().zip(&activations.layers).rev() {
            let d_norm2 = layer.mlp.backward(&dx, &saved.mlp)?;
            let dx1 = (&dx
                + layer
                    .post_attention_layernorm
                    .backward(&d_norm2, &saved.x1)?)?;
            let d_qkv = attention_backward(
                &layer.o_proj.backward(&dx1)?,
                &saved.qkv,
                &saved.probs,
                attention,
            )?;
            let d_qkv = self.rope_packed(&d_qkv, b, s, positions, true)?;
            let d_norm1 = layer.qkv.backward(&d_qkv)?;
            dx = (&dx1 + layer.input_layernorm.backward(&d_norm1, &saved.x)?)?;
        }
        dx.reshape(activations.shape)
    }
}

impl Decoder for Llama {
    fn extend(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let n = embeds.dim(0)?;
        let start = cache.len();
        let (k, hq, hk) = (
            self.config.head_dim(),
            self.config.num_attention_heads,
            self.config.kv_heads(),
        );
        let rotate = |x: Tensor| {
            self.rope
                .forward(&x.unsqueeze(0)?, Positions::From(start))?
                .squeeze(0)
        };
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let qkv = layer.qkv.forward(&layer.input_layernorm.forward(&x)?)?;
            let q = rotate(heads_of(&qkv, 0, hq, k)?)?;
            let new_keys = rotate(heads_of(&qkv, hq, hk, k)?)?;
            let (keys, values) = cache.append(i, new_keys, heads_of(&qkv, hq + hk, hk, k)?)?;
            let context = cached_attention(&q, &keys, &values, start)?;
            let x1 = (&x + layer.o_proj.forward(&context)?)?;
            let (m, _) = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&x1)?)?;
            x = (&x1 + m)?;
        }
        cache.len += n;
        self.norm.forward(&x)
    }

    /// The checkpoint's own LM head, or the embeddings it is tied to.
    fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}
