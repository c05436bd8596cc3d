//! GPT-2, from a Hugging Face directory. Names follow `transformers`' modeling_gpt2.py; the
//! `transformer.` prefix of GPT2LMHeadModel checkpoints is accepted too. GPT-2 stores its projections
//! as Conv1D, weight [IN, OUT]: they are transposed once at load into Linear's [OUT, IN].

use super::stack::{self, kept, Attend, Block, Pass};
use super::{Activation, Backbone, BackboneInput, Decoder, InputGradients, KvCache};
use crate::kernels::{
    attention_backward, gelu_tanh_backward, gelu_tanh_forward, mask_bias, AttentionSaved,
    AttentionShape, GeluSaved, LayerNorm, LayerNormSaved, Linear, Positions, Weight,
};
use crate::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

/// The fields of config.json that the architecture reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// FFN width; null means 4 · n_embd
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_activation() -> Activation {
    Activation::GeluNew
}
fn default_eps() -> f64 {
    1e-5
}

impl Gpt2Config {
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let cfg: Self = super::read_config(path, "GPT-2")?;
        if let Some(t) = cfg.model_type.as_deref().filter(|t| *t != "gpt2") {
            bail!(
                "{}: model_type is {t:?}; this backbone reads \"gpt2\"",
                path.display()
            );
        }
        if cfg.activation_function != Activation::GeluNew {
            bail!(
                "{}: activation_function {:?} is not supported (gelu_new)",
                path.display(),
                cfg.activation_function.name()
            );
        }
        if cfg.n_layer == 0 {
            bail!(
                "{}: n_layer is 0: the checkpoint's layers would be ignored",
                path.display()
            );
        }
        if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
            bail!(
                "{}: n_embd {} is not a multiple of n_head {}",
                path.display(),
                cfg.n_embd,
                cfg.n_head
            );
        }
        Ok(cfg)
    }

    fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

/// A Conv1D [IN, OUT] loaded as a Linear [OUT, IN].
fn conv1d(vb: &VarBuilder, inp: usize, out: usize) -> Result<Linear> {
    Ok(Linear::new(
        vb.get((inp, out), "weight")?.t()?.contiguous()?,
        Some(vb.get(out, "bias")?),
    ))
}

fn layer_norm(vb: &VarBuilder, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get(dim, "weight")?,
        bias: vb.get(dim, "bias")?,
        eps,
    })
}

/// One `h.{i}`: pre-norm attention and MLP, each added to the residual stream.
struct Gpt2Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

struct Gpt2BlockSaved {
    ln_1: LayerNormSaved,
    /// the packed [T, 3D] projection and the probabilities (a rows pass)
    attention: Option<AttentionSaved>,
    ln_2: LayerNormSaved,
    /// [T, F], before GELU
    gelu: GeluSaved,
}

impl Gpt2Block {
    fn load(vb: VarBuilder, cfg: &Gpt2Config) -> Result<Self> {
        let (d, f, eps) = (cfg.n_embd, cfg.inner(), cfg.layer_norm_epsilon);
        Ok(Self {
            ln_1: layer_norm(&vb.pp("ln_1"), d, eps)?,
            c_attn: conv1d(&vb.pp("attn").pp("c_attn"), d, 3 * d)?,
            attn_proj: conv1d(&vb.pp("attn").pp("c_proj"), d, d)?,
            ln_2: layer_norm(&vb.pp("ln_2"), d, eps)?,
            c_fc: conv1d(&vb.pp("mlp").pp("c_fc"), d, f)?,
            mlp_proj: conv1d(&vb.pp("mlp").pp("c_proj"), f, d)?,
        })
    }
}

impl Block for Gpt2Block {
    type Saved = Gpt2BlockSaved;

    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        pass: &mut Pass,
    ) -> Result<(Tensor, Gpt2BlockSaved)> {
        let (a_in, ln_1) = self.ln_1.forward(x)?;
        let qkv = self.c_attn.forward(&a_in)?;
        let (context, attention) = pass.attend(layer, &qkv)?;
        let x1 = (x + self.attn_proj.forward(&context)?)?;
        let (m_in, ln_2) = self.ln_2.forward(&x1)?;
        let (h, gelu) = gelu_tanh_forward(&self.c_fc.forward(&m_in)?)?;
        let y = (&x1 + self.mlp_proj.forward(&h)?)?;
        let saved = Gpt2BlockSaved {
            ln_1,
            attention,
            ln_2,
            gelu,
        };
        Ok((y, saved))
    }

    fn backward(
        &self,
        dy: &Tensor,
        saved: &Gpt2BlockSaved,
        shape: AttentionShape,
        _positions: Positions,
        d_kv: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let d_fc = gelu_tanh_backward(&self.mlp_proj.backward(dy)?, &saved.gelu)?;
        let dx1 = (dy
            + self
                .ln_2
                .backward(&self.c_fc.backward(&d_fc)?, &saved.ln_2)?)?;
        let d_context = self.attn_proj.backward(&dx1)?;
        let (d_qkv, d_prefix) =
            attention_backward(&d_context, kept(&saved.attention)?, shape, d_kv)?;
        let dx = (&dx1
            + self
                .ln_1
                .backward(&self.c_attn.backward(&d_qkv)?, &saved.ln_1)?)?;
        Ok((dx, d_prefix))
    }

    fn attention(saved: &Gpt2BlockSaved) -> &Option<AttentionSaved> {
        &saved.attention
    }
}

/// The frozen GPT-2 decoder stack (token and position embeddings, blocks, final LayerNorm).
pub struct Gpt2 {
    pub config: Gpt2Config,
    /// also the LM head (tied)
    wte: Weight,
    wpe: Tensor,
    blocks: Vec<Gpt2Block>,
    ln_f: LayerNorm,
}

pub struct Gpt2Activations {
    shape: (usize, usize, usize),
    blocks: Vec<Gpt2BlockSaved>,
    ln_f: LayerNormSaved,
}

impl Gpt2 {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        let vb = super::mmap_weights(dir, dtype, device)?;
        Self::from_var_builder(vb, config).with_context(|| super::mismatch(dir, "GPT-2"))
    }

    pub fn from_var_builder(vb: VarBuilder, config: Gpt2Config) -> Result<Self> {
        let vb = if vb.contains_tensor("transformer.wte.weight") {
            vb.pp("transformer")
        } else {
            vb
        };
        let d = config.n_embd;
        let blocks = (0..config.n_layer)
            .map(|i| Gpt2Block::load(vb.pp(format!("h.{i}")), &config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            wte: Weight::Dense(vb.get((config.vocab_size, d), "wte.weight")?),
            wpe: vb.get((config.n_positions, d), "wpe.weight")?,
            blocks,
            ln_f: layer_norm(&vb.pp("ln_f"), d, config.layer_norm_epsilon)?,
            config,
        })
    }

    /// The same model with `f` applied to every matrix, the token embeddings (the LM head)
    /// included: rounded to GGUF blocks, or held in bf16.
    pub fn map_weights(mut self, f: &dyn Fn(&Weight) -> Result<Weight>) -> Result<Self> {
        for block in &mut self.blocks {
            for linear in [
                &mut block.c_attn,
                &mut block.attn_proj,
                &mut block.c_fc,
                &mut block.mlp_proj,
            ] {
                linear.weight = f(&linear.weight)?;
            }
        }
        self.wte = f(&self.wte)?;
        Ok(self)
    }

    fn attention_shape(&self, batch: usize, seq: usize) -> AttentionShape {
        let heads = self.config.n_head;
        AttentionShape {
            batch,
            seq,
            heads,
            kv_heads: heads,
            causal: true,
        }
    }
}

impl Backbone for Gpt2 {
    type Activations = Gpt2Activations;

    fn run(&self, input: &BackboneInput, keep: bool) -> Result<(Tensor, Option<Gpt2Activations>)> {
        let shape = input.embeds.dims3()?;
        let (b, s, d) = shape;
        let (full_mask, p) = (input.full_mask()?, input.prefix_len());
        let bias = mask_bias(&full_mask, input.embeds.dtype())?;
        let x = input
            .embeds
            .broadcast_add(&super::learned_positions(&self.wpe, &full_mask, p)?)?
            .reshape((b * s, d))?;
        let mut pass = Pass::new(
            self.attention_shape(b, s),
            Positions::From(0),
            Attend::Rows { bias: &bias, keep },
        );
        pass.prefix = input.prefix.map(|p| &p.kv);
        let (x, blocks) = stack::forward(&self.blocks, x, &mut pass)?;
        let (hidden, ln_f) = self.ln_f.forward(&x)?;
        Ok((
            hidden.reshape(shape)?,
            keep.then_some(Gpt2Activations {
                shape,
                blocks,
                ln_f,
            }),
        ))
    }

    fn hidden_size(&self) -> usize {
        self.config.n_embd
    }

    fn max_positions(&self) -> usize {
        self.config.n_positions
    }

    fn word_embeddings(&self) -> &Weight {
        &self.wte
    }

    fn shares_prompt(&self) -> bool {
        true
    }

    fn keys_values(&self, activations: &Gpt2Activations) -> Result<Tensor> {
        let (b, s, _) = activations.shape;
        stack::keys_values::<Gpt2Block>(&activations.blocks, self.attention_shape(b, s))
    }

    /// The position embeddings are constants, so the gradient to the input embeddings is the
    /// residual stream's gradient at the bottom.
    fn backward(
        &self,
        d_hidden: &Tensor,
        activations: Gpt2Activations,
        d_kv: Option<&Tensor>,
    ) -> Result<InputGradients> {
        let (b, s, d) = activations.shape;
        let dx = self
            .ln_f
            .backward(&d_hidden.reshape((b * s, d))?, &activations.ln_f)?;
        let shape = self.attention_shape(b, s);
        let (dx, prefix) = stack::backward(
            &self.blocks,
            dx,
            &activations.blocks,
            shape,
            Positions::From(0),
            super::flat(d_kv)?.as_ref(),
        )?;
        Ok(InputGradients {
            embeds: dx.reshape(activations.shape)?,
            prefix,
            decoder: None,
        })
    }
}

impl Decoder for Gpt2 {
    fn extend(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let n = embeds.dim(0)?;
        let start = cache.len();
        if start + n > self.config.n_positions {
            candle_core::bail!(
                "GPT-2 reads at most {} positions; {} asked",
                self.config.n_positions,
                start + n
            );
        }
        let x = embeds.broadcast_add(&self.wpe.narrow(0, start, n)?)?;
        let mut pass = Pass::new(
            self.attention_shape(1, n),
            Positions::From(start),
            Attend::Cached { cache },
        );
        let (x, _) = stack::forward(&self.blocks, x, &mut pass)?;
        Ok(self.ln_f.forward(&x)?.0)
    }

    fn extend_each(&self, embeds: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        let limit = self.config.n_positions;
        if let Some(full) = caches.iter().find(|c| c.len() >= limit) {
            candle_core::bail!(
                "GPT-2 reads at most {limit} positions; {} asked",
                full.len() + 1
            );
        }
        let positions = KvCache::next_positions(caches, embeds.device())?;
        let x = (embeds + self.wpe.index_select(&positions.flatten_all()?, 0)?)?;
        let mut pass = Pass::new(
            self.attention_shape(caches.len(), 1),
            Positions::Ids(&positions),
            Attend::Each { caches },
        );
        let (x, _) = stack::forward(&self.blocks, x, &mut pass)?;
        Ok(self.ln_f.forward(&x)?.0)
    }

    /// Tied to the token embeddings.
    fn lm_head(&self) -> &Weight {
        &self.wte
    }
}
