//! What training moves to make the prompt: the prompt's own M×D vectors (the shallow prompt of
//! Lester et al.), or a small network whose output is the prompt.
//!
//! ```text
//! --method prompt     P = table                                        (PEFT PROMPT_TUNING)
//! --method p-tuning   P = MLP(table), or MLP(BiLSTM(table))            (PEFT P_TUNING, Liu et al. 2021)
//! --method residual   P = table + LayerNorm(W_up ReLU(W_down table))   (Razdaibiedina et al. 2023)
//! --method prefix     P = W₂ tanh(W₁ table), [M, L·2·Hkv·K]            (PEFT PREFIX_TUNING with
//!                                                                        prefix_projection, Li & Liang 2021)
//! --method multitask  P_t = table ⊙ (C_t R_t), one per task            (PEFT MULTITASK_PROMPT_TUNING,
//!                                                                        Wang et al. 2023)
//! ```
//!
//! A prefix is not read as input vectors: its rows are keys and values in front of every layer's
//! attention (`backbone::Prefix`), and the backbone's backward returns their gradient instead.
//! Only P [M, D] enters the backbone, so the backbone's explicit backward yields ∂L/∂P as it does
//! for the shallow prompt; the rest of the way, into the encoder's weights, is candle's tape over
//! the encoder alone: M rows through a few small layers, nothing next to the backbone's cost.
//! Adapters store the computed P (PEFT saves P-tuning the same way), so every command and PEFT
//! load them as prompts; the encoder's weights live in the training checkpoint. A multitask
//! adapter stores the table and the task factors, as PEFT does: they are the adapter.

use crate::named_choice;
use crate::prompt::{task_prompts, Placement, SoftPrompt, TaskFactors};
use crate::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How a prompt is parameterised (`--method`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    #[default]
    Prompt,
    PTuning,
    Residual,
    Prefix,
    Multitask,
}
named_choice!(
    Method,
    "prompt",
    "p-tuning",
    "residual",
    "prefix",
    "multitask"
);

impl Method {
    /// Where the prompt this method computes enters the backbone.
    pub fn placement(self) -> Placement {
        match self {
            Method::Prefix => Placement::Prefix,
            _ => Placement::Embeddings,
        }
    }
}

/// P-tuning's encoder (PEFT's `encoder_reparameterization_type`, written in its upper case in
/// adapter_config.json).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    #[default]
    /// Linear → ReLU → Linear → ReLU → Linear (PEFT's recommended default)
    Mlp,
    /// a two-layer bidirectional LSTM, then Linear → ReLU → Linear
    Lstm,
}
named_choice!(EncoderKind, "mlp", "lstm");

impl EncoderKind {
    pub fn peft_name(self) -> &'static str {
        match self {
            EncoderKind::Mlp => "MLP",
            EncoderKind::Lstm => "LSTM",
        }
    }
}

/// PEFT's `encoder_num_layers` for the LSTM (its default; the MLP ignores it).
pub const LSTM_LAYERS: usize = 2;

/// y = x Wᵀ + b, a PyTorch `nn.Linear` (weight [out, in]).
struct Dense {
    weight: Var,
    bias: Var,
}

impl Dense {
    /// PyTorch's default init: weight and bias uniform in ±1/√in.
    fn init(inputs: usize, outputs: usize, dtype: DType, rng: &mut Init) -> Result<Self> {
        let bound = 1.0 / (inputs as f64).sqrt();
        Ok(Self {
            weight: rng.uniform(&[outputs, inputs], bound, dtype)?,
            bias: rng.uniform(&[outputs], bound, dtype)?,
        })
    }

    /// x [M, in] → [M, out]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    fn named<'a>(&'a self, name: &str, out: &mut Vec<(String, &'a Var)>) {
        out.push((format!("{name}.weight"), &self.weight));
        out.push((format!("{name}.bias"), &self.bias));
    }
}

/// One direction of one LSTM layer, PyTorch's gate order (input, forget, cell, output).
struct LstmCell {
    /// [4H, in]
    weight_ih: Var,
    /// [4H, H]
    weight_hh: Var,
    bias_ih: Var,
    bias_hh: Var,
}

impl LstmCell {
    fn init(inputs: usize, hidden: usize, dtype: DType, rng: &mut Init) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        Ok(Self {
            weight_ih: rng.uniform(&[4 * hidden, inputs], bound, dtype)?,
            weight_hh: rng.uniform(&[4 * hidden, hidden], bound, dtype)?,
            bias_ih: rng.uniform(&[4 * hidden], bound, dtype)?,
            bias_hh: rng.uniform(&[4 * hidden], bound, dtype)?,
        })
    }

    /// x [M, in] read in `order` → h [M, H], row t the state after reading row t.
    fn run(&self, x: &Tensor, order: impl Iterator<Item = usize>) -> Result<Tensor> {
        let hidden = self.weight_hh.dim(1)?;
        // every row's input projection at once; only the recurrence is sequential
        let projected = x
            .matmul(&self.weight_ih.t()?)?
            .broadcast_add(&self.bias_ih)?
            .broadcast_add(&self.bias_hh)?;
        let zeros = Tensor::zeros((1, hidden), x.dtype(), x.device())?;
        let (mut h, mut c) = (zeros.clone(), zeros);
        let mut states = vec![None; x.dim(0)?];
        for t in order {
            let gates = projected
                .narrow(0, t, 1)?
                .add(&h.matmul(&self.weight_hh.t()?)?)?;
            let gate = |k: usize| gates.narrow(1, k * hidden, hidden);
            let (i, f, g, o) = (
                sigmoid(&gate(0)?)?,
                sigmoid(&gate(1)?)?,
                gate(2)?.tanh()?,
                sigmoid(&gate(3)?)?,
            );
            c = f.mul(&c)?.add(&i.mul(&g)?)?;
            h = o.mul(&c.tanh()?)?;
            states[t] = Some(h.clone());
        }
        let states: Vec<Tensor> = states.into_iter().flatten().collect();
        Ok(Tensor::cat(&states, 0)?)
    }
}

/// σ(x) = (1 + tanh(x/2)) / 2: the same function, from ops the tape differentiates.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(((x * 0.5)?.tanh()? + 1.0)?.affine(0.5, 0.0)?)
}

/// PyTorch's `nn.LayerNorm` over the last dimension, composed of taped ops.
fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(variance + 1e-5)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?.broadcast_add(bias)?)
}

enum Network {
    /// PEFT's `mlp_head` = Sequential(Linear, ReLU, Linear, ReLU, Linear)
    Mlp([Dense; 3]),
    /// PEFT's `lstm_head` (per layer: forward, reverse), then `mlp_head` = (Linear, ReLU, Linear)
    Lstm {
        layers: Vec<[LstmCell; 2]>,
        head: [Dense; 2],
    },
    /// the residual reparameterisation's bottleneck `down`, `up` and LayerNorm (weight, bias)
    Residual {
        down: Dense,
        up: Dense,
        norm: [Var; 2],
    },
    /// PEFT's PrefixEncoder `transform` = Sequential(Linear, Tanh, Linear)
    Prefix([Dense; 2]),
    /// PEFT's MultitaskPromptEmbedding `prefix_task_cols` [N, M, r] and `prefix_task_rows` [N, r, D]
    Multitask {
        cols: Var,
        rows: Var,
        names: Vec<String>,
    },
}

/// A prompt computed by a network over a trainable table (`embedding`, PEFT's
/// `prompt_encoder.embedding.weight`).
pub struct PromptEncoder {
    pub method: Method,
    /// where the output enters the backbone: `method`'s placement, or a multitask prompt's on an
    /// encoder-decoder, which may put half of it in front of the decoder
    pub placement: Placement,
    /// [M, D]
    embedding: Var,
    network: Network,
}

impl PromptEncoder {
    /// A `method` encoder of `hidden` units over `table` [M, D] (the prompt's init) whose output
    /// is `width` wide (D; a prefix's L·2·Hkv·K), its weights drawn from `rng`.
    pub fn init(
        method: Method,
        encoder: EncoderKind,
        hidden: usize,
        width: usize,
        table: &Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        if hidden == 0 {
            bail!("--encoder-hidden-size must be at least 1");
        }
        let (d, dtype, device) = (table.dim(1)?, table.dtype(), table.device().clone());
        let rng = &mut Init { rng, device };
        let network = match (method, encoder) {
            (Method::Prompt, _) => bail!("--method prompt has no encoder"),
            (Method::Multitask, _) => {
                bail!("a multitask prompt is made by PromptEncoder::multitask")
            }
            (Method::PTuning, EncoderKind::Mlp) => Network::Mlp([
                Dense::init(d, hidden, dtype, rng)?,
                Dense::init(hidden, hidden, dtype, rng)?,
                Dense::init(hidden, d, dtype, rng)?,
            ]),
            (Method::PTuning, EncoderKind::Lstm) => Network::Lstm {
                layers: (0..LSTM_LAYERS)
                    .map(|l| {
                        let inputs = if l == 0 { d } else { 2 * hidden };
                        Ok([
                            LstmCell::init(inputs, hidden, dtype, rng)?,
                            LstmCell::init(inputs, hidden, dtype, rng)?,
                        ])
                    })
                    .collect::<Result<_>>()?,
                head: [
                    Dense::init(2 * hidden, 2 * hidden, dtype, rng)?,
                    Dense::init(2 * hidden, d, dtype, rng)?,
                ],
            },
            (Method::Residual, _) => Network::Residual {
                down: Dense::init(d, hidden, dtype, rng)?,
                up: Dense::init(hidden, d, dtype, rng)?,
                norm: [
                    Var::from_tensor(&Tensor::ones(d, dtype, &rng.device)?)?,
                    Var::from_tensor(&Tensor::zeros(d, dtype, &rng.device)?)?,
                ],
            },
            (Method::Prefix, _) => Network::Prefix([
                Dense::init(d, hidden, dtype, rng)?,
                Dense::init(hidden, width, dtype, rng)?,
            ]),
        };
        Ok(Self {
            method,
            placement: method.placement(),
            embedding: Var::from_tensor(table)?,
            network,
        })
    }

    /// A multitask prompt over `table` [M, D] for the tasks `names`, each task's factors of rank
    /// `rank`, entering the backbone at `placement`. PEFT draws both factors from N(0, 0.02²),
    /// which starts every task's prompt near zero (the table times ~r·4e-4); here C_t R_t starts
    /// at one plus that noise, so every task starts from the table that `--init` made and the
    /// noise tells the tasks (and the ranks) apart.
    pub fn multitask(
        table: &Tensor,
        names: Vec<String>,
        rank: usize,
        placement: Placement,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        if names.is_empty() || rank == 0 {
            bail!("a multitask prompt needs at least one task and a rank of at least 1");
        }
        let (m, d) = table.dims2()?;
        let (n, dtype, device) = (names.len(), table.dtype(), table.device().clone());
        let rng = &mut Init { rng, device };
        let start = 1.0 / (rank as f64).sqrt();
        Ok(Self {
            method: Method::Multitask,
            placement,
            embedding: Var::from_tensor(table)?,
            network: Network::Multitask {
                cols: rng.normal(&[n, m, rank], start, 0.02, dtype)?,
                rows: rng.normal(&[n, rank, d], start, 0.02, dtype)?,
                names,
            },
        })
    }

    /// The trainable tensors by their checkpoint names (PEFT's, under `prompt_encoder.`).
    pub fn named_params(&self) -> Vec<(String, &Var)> {
        let mut out = vec![(
            "prompt_encoder.embedding.weight".to_string(),
            &self.embedding,
        )];
        match &self.network {
            Network::Mlp(layers) => {
                for (layer, index) in layers.iter().zip([0, 2, 4]) {
                    layer.named(&format!("prompt_encoder.mlp_head.{index}"), &mut out);
                }
            }
            Network::Lstm { layers, head } => {
                for (l, directions) in layers.iter().enumerate() {
                    for (cell, suffix) in directions.iter().zip(["", "_reverse"]) {
                        let name =
                            |what: &str| format!("prompt_encoder.lstm_head.{what}_l{l}{suffix}");
                        out.push((name("weight_ih"), &cell.weight_ih));
                        out.push((name("weight_hh"), &cell.weight_hh));
                        out.push((name("bias_ih"), &cell.bias_ih));
                        out.push((name("bias_hh"), &cell.bias_hh));
                    }
                }
                for (layer, index) in head.iter().zip([0, 2]) {
                    layer.named(&format!("prompt_encoder.mlp_head.{index}"), &mut out);
                }
            }
            Network::Residual { down, up, norm } => {
                down.named("prompt_encoder.residual_mlp.0", &mut out);
                up.named("prompt_encoder.residual_mlp.2", &mut out);
                out.push(("prompt_encoder.residual_mlp.3.weight".into(), &norm[0]));
                out.push(("prompt_encoder.residual_mlp.3.bias".into(), &norm[1]));
            }
            Network::Prefix(layers) => {
                for (layer, index) in layers.iter().zip([0, 2]) {
                    layer.named(&format!("prompt_encoder.transform.{index}"), &mut out);
                }
            }
            Network::Multitask { cols, rows, .. } => {
                out.push(("prompt_encoder.prefix_task_cols".into(), cols));
                out.push(("prompt_encoder.prefix_task_rows".into(), rows));
            }
        }
        out
    }

    /// table → P [M, D] (a multitask prompt's [N, M, D]), on the tape of the encoder's weights.
    pub fn forward(&self) -> Result<Tensor> {
        let table = self.embedding.as_tensor();
        Ok(match &self.network {
            Network::Mlp([a, b, c]) => {
                c.forward(&b.forward(&a.forward(table)?.relu()?)?.relu()?)?
            }
            Network::Lstm { layers, head } => {
                let m = table.dim(0)?;
                let mut x = table.clone();
                for [forward, reverse] in layers {
                    x = Tensor::cat(&[forward.run(&x, 0..m)?, reverse.run(&x, (0..m).rev())?], 1)?;
                }
                head[1].forward(&head[0].forward(&x)?.relu()?)?
            }
            Network::Residual { down, up, norm } => {
                let bottleneck = up.forward(&down.forward(table)?.relu()?)?;
                (table + layer_norm(&bottleneck, &norm[0], &norm[1])?)?
            }
            Network::Prefix([a, b]) => b.forward(&a.forward(table)?.tanh()?)?,
            Network::Multitask { cols, rows, .. } => task_prompts(table, cols, rows)?,
        })
    }

    /// ∂L/∂P [M, D] at the output of `forward` → the gradients of `named_params()`, in order.
    pub fn backward(&self, output: &Tensor, d_prompt: &Tensor) -> Result<Vec<Tensor>> {
        let grads = (output * d_prompt.to_dtype(output.dtype())?.detach())?
            .sum_all()?
            .backward()?;
        self.named_params()
            .into_iter()
            .map(|(name, var)| match grads.get(var.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => bail!("no gradient reached {name}"),
            })
            .collect()
    }
}

/// Uniform draws from the run's seeded generator, as tensors.
struct Init<'a> {
    rng: &'a mut ChaCha8Rng,
    device: Device,
}

impl Init<'_> {
    fn normal(&mut self, shape: &[usize], mean: f64, std: f64, dtype: DType) -> Result<Var> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (mean + std * self.rng.sample::<f64, _>(rand_distr::StandardNormal)) as f32)
            .collect();
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(dtype)?;
        Ok(Var::from_tensor(&t)?)
    }

    fn uniform(&mut self, shape: &[usize], bound: f64, dtype: DType) -> Result<Var> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-bound as f32..bound as f32))
            .collect();
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(dtype)?;
        Ok(Var::from_tensor(&t)?)
    }
}

/// What training moves to make the prompt.
pub enum TrainablePrompt {
    /// the shallow prompt, or a prefix without its projection: the rows are the parameters
    Direct(SoftPrompt),
    /// the output of an encoder (P-tuning, residual)
    Encoded(PromptEncoder),
}

impl TrainablePrompt {
    /// The trainable tensors by their checkpoint names.
    pub fn named_params(&self) -> Vec<(String, &Var)> {
        match self {
            TrainablePrompt::Direct(p) => vec![("prompt".to_string(), &p.embeddings)],
            TrainablePrompt::Encoded(e) => e.named_params(),
        }
    }

    pub fn method(&self) -> Method {
        match self {
            TrainablePrompt::Direct(p) if p.placement == Placement::Prefix => Method::Prefix,
            TrainablePrompt::Direct(_) => Method::Prompt,
            TrainablePrompt::Encoded(e) => e.method,
        }
    }

    /// Where the prompt enters the backbone.
    pub fn placement(&self) -> Placement {
        match self {
            TrainablePrompt::Direct(p) => p.placement,
            TrainablePrompt::Encoded(e) => e.placement,
        }
    }

    /// The columns the prompt takes in front of the text (`SoftPrompt::front`).
    pub fn front(&self) -> usize {
        self.placement().front(self.len())
    }

    /// M, the number of virtual tokens
    pub fn len(&self) -> usize {
        match self {
            TrainablePrompt::Direct(p) => p.len(),
            TrainablePrompt::Encoded(e) => e.embedding.dim(0).unwrap_or(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The prompt the backbone reads now, and (for an encoder) the taped output that `backward`
    /// differentiates.
    pub fn forward(&self) -> Result<(SoftPrompt, Option<Tensor>)> {
        match self {
            TrainablePrompt::Direct(p) => Ok((p.clone(), None)),
            TrainablePrompt::Encoded(e) => {
                let output = e.forward()?;
                let prompt = SoftPrompt::placed(&output.detach(), e.placement)?;
                Ok((prompt, Some(output)))
            }
        }
    }

    /// The prompt as it stands, for evaluation.
    pub fn current(&self) -> Result<SoftPrompt> {
        Ok(self.forward()?.0)
    }

    /// What an adapter stores: the computed prompt [M, ·]; for a multitask prompt, its shared
    /// table and each task's factors (from which every task's prompt is computed).
    pub fn saved(&self) -> Result<(Tensor, Option<TaskFactors>)> {
        if let TrainablePrompt::Encoded(PromptEncoder {
            embedding,
            network: Network::Multitask { cols, rows, names },
            ..
        }) = self
        {
            let factors = TaskFactors {
                names: names.clone(),
                cols: cols.as_tensor().clone(),
                rows: rows.as_tensor().clone(),
            };
            return Ok((embedding.as_tensor().clone(), Some(factors)));
        }
        Ok((self.current()?.embeddings.as_tensor().clone(), None))
    }

    /// ∂L/∂P [M, D] → the gradients of `named_params()`.
    pub fn backward(&self, output: Option<&Tensor>, d_prompt: Tensor) -> Result<Vec<Tensor>> {
        match (self, output) {
            (TrainablePrompt::Encoded(e), Some(output)) => e.backward(output, &d_prompt),
            _ => Ok(vec![d_prompt]),
        }
    }
}

impl From<SoftPrompt> for TrainablePrompt {
    fn from(prompt: SoftPrompt) -> Self {
        TrainablePrompt::Direct(prompt)
    }
}
