//! One type for whichever architecture a model directory or GGUF file holds, so that training,
//! inference and the server are written once. Each call dispatches to the architecture's own file.

use super::bert::{Bert, BertActivations};
use super::gpt2::{Gpt2, Gpt2Activations};
use super::llama::{Llama, LlamaActivations};
use super::t5::{T5Activations, T5};
use super::{Backbone, BackboneInput, Decoder, InputGradients};
use crate::kernels::{Linear, Weight};
use candle_core::{Result, Tensor};

pub enum AnyBackbone {
    Bert(Bert),
    Gpt2(Gpt2),
    Llama(Llama),
    T5(T5),
}

pub enum AnyActivations {
    Bert(BertActivations),
    Gpt2(Gpt2Activations),
    Llama(LlamaActivations),
    T5(T5Activations),
}

/// `$body` with `$b` bound to the backbone inside, whatever its architecture.
macro_rules! each {
    ($self:expr, $b:ident => $body:expr) => {
        match $self {
            AnyBackbone::Bert($b) => $body,
            AnyBackbone::Gpt2($b) => $body,
            AnyBackbone::Llama($b) => $body,
            AnyBackbone::T5($b) => $body,
        }
    };
}

/// What PEFT's adapter_config.json records of a model's shape.
pub struct Shape {
    pub layers: usize,
    pub heads: usize,
    /// key/value heads (fewer than `heads` under grouped-query attention)
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Shape {
    /// A layer's keys (or values) of one position, Hkv·K: PEFT's `token_dim` for prefix tuning.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// One prefix position's keys and values at every layer, L·2·Hkv·K (`Prefix::kv`'s rows).
    pub fn prefix_width(&self) -> usize {
        self.layers * 2 * self.kv_width()
    }
}

impl AnyBackbone {
    /// The same backbone with `f` applied to every matrix (`Bert::map_weights` and its kin).
    pub fn map_weights(self, f: &dyn Fn(&Weight) -> Result<Weight>) -> Result<Self> {
        Ok(match self {
            Self::Bert(b) => Self::Bert(b.map_weights(f)?),
            Self::Gpt2(b) => Self::Gpt2(b.map_weights(f)?),
            Self::Llama(b) => Self::Llama(b.map_weights(f)?),
            Self::T5(b) => Self::T5(b.map_weights(f)?),
        })
    }

    pub fn architecture(&self) -> &'static str {
        match self {
            Self::Bert(_) => "bert",
            Self::Gpt2(_) => "gpt2",
            Self::Llama(_) => "llama",
            Self::T5(_) => "t5",
        }
    }

    pub fn shape(&self) -> Shape {
        match self {
            Self::Bert(b) => Shape {
                layers: b.config.num_hidden_layers,
                heads: b.config.num_attention_heads,
                kv_heads: b.config.num_attention_heads,
                head_dim: b.config.hidden_size / b.config.num_attention_heads,
            },
            Self::Gpt2(b) => Shape {
                layers: b.config.n_layer,
                heads: b.config.n_head,
                kv_heads: b.config.n_head,
                head_dim: b.config.n_embd / b.config.n_head,
            },
            Self::Llama(b) => Shape {
                layers: b.config.num_hidden_layers,
                heads: b.config.num_attention_heads,
                kv_heads: b.config.kv_heads(),
                head_dim: b.config.head_dim(),
            },
            Self::T5(b) => Shape {
                layers: b.config.num_layers,
                heads: b.config.num_heads,
                kv_heads: b.config.num_heads,
                head_dim: b.config.d_kv,
            },
        }
    }

    /// BERT's `pooler.dense`, when the checkpoint has one.
    pub fn pooler(&self) -> Option<Linear> {
        match self {
            Self::Bert(b) => b.pooler.clone(),
            _ => None,
        }
    }

    /// The decoder inside, for generation and the LM head; `None` for an encoder.
    pub fn decoder(&self) -> Option<&dyn Decoder> {
        match self {
            Self::Bert(_) | Self::T5(_) => None,
            Self::Gpt2(b) => Some(b),
            Self::Llama(b) => Some(b),
        }
    }

    /// [V, D]: the next-token output layer of a decoder (T5's, its output scale folded in);
    /// `None` for an encoder, which has none.
    pub fn lm_head(&self) -> Option<&Weight> {
        match self {
            Self::T5(t5) => Some(t5.lm_head()),
            _ => self.decoder().map(|d| d.lm_head()),
        }
    }

    /// The encoder-decoder inside, whose output the decoder writes; `None` for the others.
    pub fn seq2seq(&self) -> Option<&T5> {
        match self {
            Self::T5(t5) => Some(t5),
            _ => None,
        }
    }
}

impl Backbone for AnyBackbone {
    type Activations = AnyActivations;

    fn hidden_size(&self) -> usize {
        each!(self, b => b.hidden_size())
    }

    fn max_positions(&self) -> usize {
        each!(self, b => b.max_positions())
    }

    fn word_embeddings(&self) -> &Weight {
        each!(self, b => b.word_embeddings())
    }

    fn run(&self, input: &BackboneInput, keep: bool) -> Result<(Tensor, Option<AnyActivations>)> {
        Ok(match self {
            Self::Bert(b) => {
                let (h, a) = b.run(input, keep)?;
                (h, a.map(AnyActivations::Bert))
            }
            Self::Gpt2(b) => {
                let (h, a) = b.run(input, keep)?;
                (h, a.map(AnyActivations::Gpt2))
            }
            Self::Llama(b) => {
                let (h, a) = b.run(input, keep)?;
                (h, a.map(AnyActivations::Llama))
            }
            Self::T5(b) => {
                let (h, a) = b.run(input, keep)?;
                (h, a.map(AnyActivations::T5))
            }
        })
    }

    fn backward(
        &self,
        d_hidden: &Tensor,
        activations: AnyActivations,
        d_kv: Option<&Tensor>,
    ) -> Result<InputGradients> {
        match (self, activations) {
            (Self::Bert(b), AnyActivations::Bert(a)) => b.backward(d_hidden, a, d_kv),
            (Self::Gpt2(b), AnyActivations::Gpt2(a)) => b.backward(d_hidden, a, d_kv),
            (Self::Llama(b), AnyActivations::Llama(a)) => b.backward(d_hidden, a, d_kv),
            (Self::T5(b), AnyActivations::T5(a)) => b.backward(d_hidden, a, d_kv),
            _ => candle_core::bail!("activations of another architecture"),
        }
    }

    fn shares_prompt(&self) -> bool {
        each!(self, b => b.shares_prompt())
    }

    fn decoder_start(&self) -> Option<u32> {
        each!(self, b => b.decoder_start())
    }

    fn keys_values(&self, activations: &AnyActivations) -> Result<Tensor> {
        match (self, activations) {
            (Self::Bert(b), AnyActivations::Bert(a)) => b.keys_values(a),
            (Self::Gpt2(b), AnyActivations::Gpt2(a)) => b.keys_values(a),
            (Self::Llama(b), AnyActivations::Llama(a)) => b.keys_values(a),
            (Self::T5(b), AnyActivations::T5(a)) => b.keys_values(a),
            _ => candle_core::bail!("activations of another architecture"),
        }
    }
}
