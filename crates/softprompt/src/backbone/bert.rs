//! BERT (and its distillations such as MiniLM), from a Hugging Face directory.
//! Struct and tensor names follow `transformers`' modeling_bert.py; a `bert.` prefix (as in
//! BertForSequenceClassification checkpoints) is accepted too.

use super::stack::{self, kept, Attend, Block, Pass};
use super::{Activation, Backbone, BackboneInput, InputGradients};
use crate::kernels::{
    attention_backward, gelu_erf_backward, gelu_erf_forward, mask_bias, rows_read, spread,
    AttentionSaved, AttentionShape, GeluSaved, LayerNorm, LayerNormSaved, Linear, Positions,
    Weight,
};
use crate::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

/// The fields of config.json that the architecture reads.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_hidden_act() -> Activation {
    Activation::Gelu
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}

impl BertConfig {
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let cfg: Self = super::read_config(path, "BERT")?;
        cfg.validate()
            .with_context(|| format!("unsupported model in {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> crate::Result<()> {
        if let Some(t) = &self.model_type {
            if t != "bert" {
                bail!("model_type is {t:?}; this backbone reads \"bert\"");
            }
        }
        if self.hidden_act != Activation::Gelu {
            bail!(
                "hidden_act {:?} is not supported (only \"gelu\", the exact erf form)",
                self.hidden_act.name()
            );
        }
        if self.num_hidden_layers == 0 {
            bail!("num_hidden_layers is 0: the checkpoint's layers would be ignored");
        }
        if self.position_embedding_type != "absolute" {
            bail!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                self.position_embedding_type
            );
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        Ok(())
    }
}

fn linear(vb: &VarBuilder, out_dim: usize, in_dim: usize) -> Result<Linear> {
    Ok(Linear::new(
        vb.get((out_dim, in_dim), "weight")?,
        Some(vb.get(out_dim, "bias")?),
    ))
}

fn layer_norm(vb: &VarBuilder, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get(dim, "weight")?,
        bias: vb.get(dim, "bias")?,
        eps,
    })
}

/// `embeddings.*`: word + position + token type, then LayerNorm.
struct BertEmbeddings {
    word_embeddings: Weight,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    layer_norm: LayerNorm,
}

impl BertEmbeddings {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        Ok(Self {
            word_embeddings: Weight::Dense(
                vb.get((cfg.vocab_size, cfg.hidden_size), "word_embeddings.weight")?,
            ),
            position_embeddings: vb.get(
                (cfg.max_position_embeddings, cfg.hidden_size),
                "position_embeddings.weight",
            )?,
            token_type_embeddings: vb.get(
                (cfg.type_vocab_size, cfg.hidden_size),
                "token_type_embeddings.weight",
            )?,
            layer_norm: layer_norm(&vb.pp("LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
        })
    }

    /// embeds [B, S, D], token types [B, S] and the full mask [B, P + S] → x [T, D]. Positions
    /// count from 0 at the first prompt vector, as when PEFT passes `inputs_embeds`, and skip
    /// padding; after a prefix of P they start at P, as transformers' BERT counted past keys.
    fn forward(
        &self,
        embeds: &Tensor,
        token_type_ids: &Tensor,
        full_mask: &Tensor,
        prefix_len: usize,
    ) -> Result<(Tensor, LayerNormSaved)> {
        let (b, s, d) = embeds.dims3()?;
        let positions = super::learned_positions(&self.position_embeddings, full_mask, prefix_len)?;
        let types = self
            .token_type_embeddings
            .index_select(&token_type_ids.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        let sum = embeds.broadcast_add(&positions)?.add(&types)?;
        self.layer_norm.forward(&sum.reshape((b * s, d))?)
    }

    /// dx [T, D] → d_embeds [B, S, D] (positions and types are constants).
    fn backward(
        &self,
        dx: &Tensor,
        saved: &LayerNormSaved,
        shape: (usize, usize, usize),
    ) -> Result<Tensor> {
        self.layer_norm.backward(dx, saved)?.reshape(shape)
    }
}

/// One `encoder.layer.{i}`. Query, key and value are fused into one [3D, D] matrix at load:
/// one matmul instead of three, forward and backward.
struct BertLayer {
    qkv: Linear,
    attention_output: Linear,
    attention_layer_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_layer_norm: LayerNorm,
}

/// What one layer's backward needs.
struct BertLayerSaved {
    /// the rows [B·R] it computed, when it computed only those (`Pass::reading`)
    read: Option<Tensor>,
    /// the fused query / key / value projection [T, 3D] and the probabilities
    attention: Option<AttentionSaved>,
    attention_ln: LayerNormSaved,
    /// [T, F], before GELU
    gelu: GeluSaved,
    output_ln: LayerNormSaved,
}

impl BertLayer {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let sa = vb.pp("attention").pp("self");
        let part = |name: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                sa.pp(name).get((d, d), "weight")?,
                sa.pp(name).get(d, "bias")?,
            ))
        };
        let ((q_w, q_b), (k_w, k_b), (v_w, v_b)) = (part("query")?, part("key")?, part("value")?);
        let qkv = Linear::new(
            Tensor::cat(&[q_w, k_w, v_w], 0)?,
            Some(Tensor::cat(&[q_b, k_b, v_b], 0)?),
        );
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            qkv,
            attention_output: linear(&vb.pp("attention").pp("output").pp("dense"), d, d)?,
            attention_layer_norm: layer_norm(
                &vb.pp("attention").pp("output").pp("LayerNorm"),
                d,
                eps,
            )?,
            intermediate: linear(&vb.pp("intermediate").pp("dense"), f, d)?,
            output: linear(&vb.pp("output").pp("dense"), d, f)?,
            output_layer_norm: layer_norm(&vb.pp("output").pp("LayerNorm"), d, eps)?,
        })
    }
}

impl Block for BertLayer {
    type Saved = BertLayerSaved;

    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        pass: &mut Pass,
    ) -> Result<(Tensor, BertLayerSaved)> {
        // every row's keys and values, but after attention only the rows read, if it reads some
        let qkv = self.qkv.forward(x)?;
        let read = pass.reading();
        let (context, attention) = pass.attend(layer, &qkv)?;
        let attended = self.attention_output.forward(&context)?;
        let residual = rows_read(x, read)?;
        let (h1, attention_ln) = self.attention_layer_norm.forward(&(attended + residual)?)?;
        let (h, gelu) = gelu_erf_forward(&self.intermediate.forward(&h1)?)?;
        let out = self.output.forward(&h)?;
        let (y, output_ln) = self.output_layer_norm.forward(&(out + &h1)?)?;
        let saved = BertLayerSaved {
            read: read.cloned(),
            attention,
            attention_ln,
            gelu,
            output_ln,
        };
        Ok((spread(y, read, x.dim(0)?)?, saved))
    }

    fn backward(
        &self,
        dy: &Tensor,
        saved: &BertLayerSaved,
        shape: AttentionShape,
        _positions: Positions,
        d_kv: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let read = saved.read.as_ref();
        let dy = rows_read(dy, read)?;
        let d_sum2 = self.output_layer_norm.backward(&dy, &saved.output_ln)?;
        let d_gelu = self.output.backward(&d_sum2)?;
        let d_intermediate = gelu_erf_backward(&d_gelu, &saved.gelu)?;
        let d_h1 = (self.intermediate.backward(&d_intermediate)? + d_sum2)?;
        let d_sum1 = self
            .attention_layer_norm
            .backward(&d_h1, &saved.attention_ln)?;
        let d_context = self.attention_output.backward(&d_sum1)?;
        let (d_qkv, d_prefix) =
            attention_backward(&d_context, kept(&saved.attention)?, shape, d_kv)?;
        let rows = d_qkv.dim(0)?;
        let dx = (self.qkv.backward(&d_qkv)? + spread(d_sum1, read, rows)?)?;
        Ok((dx, d_prefix))
    }

    fn attention(saved: &BertLayerSaved) -> &Option<AttentionSaved> {
        &saved.attention
    }
}

/// The frozen BERT encoder, plus its pooler (`pooler.dense`, read by the `pooler` head) when the
/// checkpoint has one.
pub struct Bert {
    pub config: BertConfig,
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    pub pooler: Option<Linear>,
}

/// Activations of one training forward: the embedding LayerNorm's and each layer's.
pub struct BertActivations {
    shape: (usize, usize, usize),
    embeddings: LayerNormSaved,
    layers: Vec<BertLayerSaved>,
}

impl Bert {
    /// The same model with `f` applied to every matrix (the word embeddings and the pooler
    /// included): held in bf16, say.
    pub fn map_weights(mut self, f: &dyn Fn(&Weight) -> Result<Weight>) -> Result<Self> {
        for layer in &mut self.layers {
            for linear in [
                &mut layer.qkv,
                &mut layer.attention_output,
                &mut layer.intermediate,
                &mut layer.output,
            ] {
                linear.weight = f(&linear.weight)?;
            }
        }
        if let Some(pooler) = &mut self.pooler {
            pooler.weight = f(&pooler.weight)?;
        }
        let words = &mut self.embeddings.word_embeddings;
        *words = f(words)?;
        Ok(self)
    }

    /// Loads config.json and model.safetensors (or every *.safetensors file) from `dir`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let vb = super::mmap_weights(dir, dtype, device)?;
        Self::from_var_builder(vb, config).with_context(|| super::mismatch(dir, "BERT"))
    }

    pub fn from_var_builder(vb: VarBuilder, config: BertConfig) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let embeddings = BertEmbeddings::load(vb.pp("embeddings"), &config)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::load(vb.pp("encoder").pp(format!("layer.{i}")), &config))
            .collect::<Result<Vec<_>>>()?;
        let pooler = if vb.contains_tensor("pooler.dense.weight") {
            Some(linear(
                &vb.pp("pooler").pp("dense"),
                config.hidden_size,
                config.hidden_size,
            )?)
        } else {
            None
        };
        Ok(Self {
            config,
            embeddings,
            layers,
            pooler,
        })
    }

    fn attention_shape(&self, batch: usize, seq: usize) -> AttentionShape {
        let heads = self.config.num_attention_heads;
        AttentionShape {
            batch,
            seq,
            heads,
            kv_heads: heads,
            causal: false,
        }
    }
}

impl Backbone for Bert {
    type Activations = BertActivations;

    fn run(&self, input: &BackboneInput, keep: bool) -> Result<(Tensor, Option<BertActivations>)> {
        let shape = input.embeds.dims3()?;
        let (b, s, d) = shape;
        let (full_mask, p) = (input.full_mask()?, input.prefix_len());
        let bias = mask_bias(&full_mask, input.embeds.dtype())?;
        let (x, embeddings) =
            self.embeddings
                .forward(input.embeds, input.token_type_ids, &full_mask, p)?;
        let mut pass = Pass::new(
            self.attention_shape(b, s),
            Positions::From(0),
            Attend::Rows { bias: &bias, keep },
        );
        pass.reads = input.reads;
        pass.prefix = input.prefix.map(|p| &p.kv);
        let (x, layers) = stack::forward(&self.layers, x, &mut pass)?;
        let activations = keep.then_some(BertActivations {
            shape,
            embeddings,
            layers,
        });
        Ok((x.reshape((b, s, d))?, activations))
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn word_embeddings(&self) -> &Weight {
        &self.embeddings.word_embeddings
    }

    /// A prefix trained as it is (`--prefix-projection false`) starts as these of its init's
    /// vectors.
    fn keys_values(&self, activations: &BertActivations) -> Result<Tensor> {
        let (b, s, _) = activations.shape;
        stack::keys_values::<BertLayer>(&activations.layers, self.attention_shape(b, s))
    }

    fn backward(
        &self,
        d_hidden: &Tensor,
        activations: BertActivations,
        d_kv: Option<&Tensor>,
    ) -> Result<InputGradients> {
        let (b, s, d) = activations.shape;
        let dx = d_hidden.reshape((b * s, d))?;
        let shape = self.attention_shape(b, s);
        let (dx, prefix) = stack::backward(
            &self.layers,
            dx,
            &activations.layers,
            shape,
            Positions::From(0),
            super::flat(d_kv)?.as_ref(),
        )?;
        let embeds = self
            .embeddings
            .backward(&dx, &activations.embeddings, activations.shape)?;
        Ok(InputGradients {
            embeds,
            prefix,
            decoder: None,
        })
    }
}
