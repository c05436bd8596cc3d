//! `softprompt bench`: the train step and the forward pass on random weights of a known shape, timed
//! the way ../shared/reference/pytorch/bench_pt.py times PyTorch + peft, with the same FLOP formulas.

pub mod generation;

use crate::backbone::any::AnyBackbone;
use crate::backbone::bert::{Bert, BertConfig};
use crate::backbone::t5::{T5Config, T5};
use crate::backbone::Decoder;
use crate::batch::{Batch, Batching, EncodedSet, Padding};
use crate::kernels::Weight;
use crate::model::WeightDtype;
use crate::named_choice;
use crate::optim::{clip_grad_norm, Optimizer, OptimizerConfig};
use crate::profile::{Profile, Profiler};
use crate::prompt::SoftPrompt;
use crate::prompt_encoder::TrainablePrompt;
use crate::prompted::{CausalLm, Classifier, PromptedModel, Trainee};
use crate::task::classify::{ClassificationHead, Pool};
use crate::tokenize::Encoded;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    BertBase,
    MinilmL6,
    /// trains as a causal LM, every real token a target (as bench_pt.py's labels = input ids)
    Gpt2Small,
    /// seq2seq: the encoder reads prompt + input, the decoder `T5_TARGET` positions of targets
    T5Small,
    T5Base,
}
named_choice!(
    Arch,
    "bert-base",
    "minilm-l6",
    "gpt2-small",
    "t5-small",
    "t5-base"
);

/// Decoder positions of a T5 bench row (bench_pt.py's `--target-len`): the start token and 15
/// target tokens, each position predicting the next.
const T5_TARGET: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// forward, backward to the prompt, clipping, AdamW step
    Train,
    /// inference logits
    Forward,
}
named_choice!(Mode, "train", "forward");

impl Arch {
    /// The BERT shapes of the reference's `BertConfig`s; `None` for GPT-2.
    pub fn bert_config(self) -> Option<BertConfig> {
        let (layers, hidden, heads, ffn) = match self {
            Arch::BertBase => (12, 768, 12, 3072),
            Arch::MinilmL6 => (6, 384, 12, 1536),
            Arch::Gpt2Small | Arch::T5Small | Arch::T5Base => return None,
        };
        Some(BertConfig {
            vocab_size: 30522,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: ffn,
            hidden_act: crate::backbone::Activation::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: "absolute".into(),
            model_type: Some("bert".into()),
        })
    }

    /// The T5 shapes of the reference's `T5Config`s (ReLU, tied head); `None` for the others.
    pub fn t5_config(self) -> Option<T5Config> {
        let (layers, d, heads, ffn) = match self {
            Arch::T5Small => (6, 512, 8, 2048),
            Arch::T5Base => (12, 768, 12, 3072),
            _ => return None,
        };
        Some(T5Config {
            vocab_size: 32128,
            d_model: d,
            d_kv: 64,
            d_ff: ffn,
            num_layers: layers,
            num_decoder_layers: Some(layers),
            num_heads: heads,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
            tie_word_embeddings: Some(true),
            scale_decoder_outputs: None,
            decoder_start_token_id: Some(0),
            pad_token_id: Some(0),
            n_positions: 512,
            model_type: Some("t5".into()),
        })
    }

    /// (layers, hidden, FFN width, vocabulary)
    fn dims(self) -> (usize, usize, usize, usize) {
        if let Some(c) = self.t5_config() {
            return (c.num_layers, c.d_model, c.d_ff, c.vocab_size);
        }
        match self.bert_config() {
            Some(c) => (
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.vocab_size,
            ),
            None => {
                let c = generation::gpt2_small();
                (c.n_layer, c.n_embd, 4 * c.n_embd, c.vocab_size)
            }
        }
    }
}

/// A BERT of the given shape with N(0, 0.02) weights, unit LayerNorm gains and zero biases, under
/// the Hugging Face tensor names.
pub fn random_bert(cfg: &BertConfig, device: &Device) -> crate::Result<Bert> {
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let mut tensors = HashMap::new();
    let mut dense = |name: String, rows: usize, cols: usize| -> candle_core::Result<()> {
        tensors.insert(
            format!("{name}.weight"),
            Tensor::randn(0f32, 0.02, (rows, cols), device)?,
        );
        tensors.insert(
            format!("{name}.bias"),
            Tensor::zeros(rows, DType::F32, device)?,
        );
        Ok(())
    };
    for (name, rows) in [
        ("word", cfg.vocab_size),
        ("position", cfg.max_position_embeddings),
        ("token_type", cfg.type_vocab_size),
    ] {
        dense(format!("embeddings.{name}_embeddings"), rows, d)?;
    }
    for i in 0..cfg.num_hidden_layers {
        let l = format!("encoder.layer.{i}");
        for part in ["query", "key", "value"] {
            dense(format!("{l}.attention.self.{part}"), d, d)?;
        }
        dense(format!("{l}.attention.output.dense"), d, d)?;
        dense(format!("{l}.intermediate.dense"), f, d)?;
        dense(format!("{l}.output.dense"), d, f)?;
    }
    dense("pooler.dense".into(), d, d)?;
    let mut norms = vec!["embeddings.LayerNorm".to_string()];
    for i in 0..cfg.num_hidden_layers {
        norms.push(format!("encoder.layer.{i}.attention.output.LayerNorm"));
        norms.push(format!("encoder.layer.{i}.output.LayerNorm"));
    }
    unit_layer_norms(&mut tensors, &norms, d, device)?;
    Ok(Bert::from_var_builder(
        VarBuilder::from_tensors(tensors, DType::F32, device),
        cfg.clone(),
    )?)
}

/// A T5 of the given shape with N(0, 0.05) matrices, N(0, 1) embeddings and position biases and
/// unit norms, under the Hugging Face tensor names.
pub fn random_t5(cfg: &T5Config, device: &Device) -> crate::Result<T5> {
    let (d, f, inner) = (cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv);
    let mut tensors = HashMap::new();
    let mut norms = Vec::new();
    let mut put = |name: String, shape: (usize, usize), std: f32| -> candle_core::Result<()> {
        tensors.insert(name, Tensor::randn(0f32, std, shape, device)?);
        Ok(())
    };
    put("shared.weight".into(), (cfg.vocab_size, d), 1.0)?;
    for (stack, layers) in [
        ("encoder", cfg.num_layers),
        ("decoder", cfg.decoder_layers()),
    ] {
        let buckets = (cfg.relative_attention_num_buckets, cfg.num_heads);
        put(
            format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            buckets,
            1.0,
        )?;
        norms.push(format!("{stack}.final_layer_norm.weight"));
        for i in 0..layers {
            let block = format!("{stack}.block.{i}");
            let mut attentions = vec![format!("{block}.layer.0.SelfAttention")];
            if stack == "decoder" {
                attentions.push(format!("{block}.layer.1.EncDecAttention"));
            }
            for a in &attentions {
                for part in ["q", "k", "v"] {
                    put(format!("{a}.{part}.weight"), (inner, d), 0.05)?;
                }
                put(format!("{a}.o.weight"), (d, inner), 0.05)?;
            }
            let ff = format!("{block}.layer.{}", attentions.len());
            put(format!("{ff}.DenseReluDense.wi.weight"), (f, d), 0.05)?;
            put(format!("{ff}.DenseReluDense.wo.weight"), (d, f), 0.05)?;
            norms.extend(
                (0..=attentions.len()).map(|l| format!("{block}.layer.{l}.layer_norm.weight")),
            );
        }
    }
    for name in norms {
        tensors.insert(name, Tensor::ones(d, DType::F32, device)?);
    }
    Ok(T5::from_var_builder(
        VarBuilder::from_tensors(tensors, DType::F32, device),
        cfg.clone(),
    )?)
}

/// LayerNorms that change nothing: unit gains, zero biases.
fn unit_layer_norms(
    tensors: &mut HashMap<String, Tensor>,
    names: &[String],
    d: usize,
    device: &Device,
) -> candle_core::Result<()> {
    for n in names {
        tensors.insert(format!("{n}.weight"), Tensor::ones(d, DType::F32, device)?);
        tensors.insert(format!("{n}.bias"), Tensor::zeros(d, DType::F32, device)?);
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub mode: Mode,
    pub arch: Arch,
    pub batch: usize,
    pub seq: usize,
    pub num_virtual_tokens: usize,
    /// how the random matrices are held (`--dtype`)
    pub weights: WeightDtype,
    pub steps: usize,
    pub warmup: usize,
    /// reset after the warm-up, so that its profile covers the timed steps only
    pub profiler: Option<Profiler>,
    /// what the profile's rates are a share of
    pub fma_peak_gflop_per_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub arch: Arch,
    pub mode: Mode,
    pub batch: usize,
    pub seq: usize,
    pub num_virtual_tokens: usize,
    pub weights: WeightDtype,
    pub steps: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// what the step computes: the reference's model FLOPs less the work skipped (`flops`)
    pub gflop: f64,
    pub gflop_per_s: f64,
    /// the reference's model FLOPs (all of the work), and their rate: what the same step costs
    /// PyTorch + peft
    pub model_gflop: f64,
    pub model_gflop_per_s: f64,
    /// `gflop_per_s` over the FMA peak, where that was given
    pub share_of_peak: Option<f64>,
    pub peak_rss_mib: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
}

/// Model FLOPs of one step, as ../shared/reference/pytorch/bench_pt.py counts them: BERT with the
/// pooler + classifier head of SEQ_CLS, GPT-2 with its LM head on every position. `skipped`: less
/// the work the prompt never needs, as softprompt skips it (the FLOPs actually done): BERT's last
/// layer computes keys, values and attention for every position and the rest for the pooled one.
pub fn flops(arch: Arch, mode: Mode, batch: usize, seq: usize, vt: usize, skipped: bool) -> f64 {
    let (l, d, f, v) = arch.dims();
    let (l, d, f, v) = (l as f64, d as f64, f as f64, v as f64);
    let (b, s) = (batch as f64, (seq + vt) as f64);
    if arch.t5_config().is_some() {
        return t5_flops(mode, (l, d, f, v), b, s, T5_TARGET as f64);
    }
    let t = b * s;
    let per_row = 2.0 * (4.0 * d * d + 2.0 * d * f);
    let lin = match arch {
        Arch::BertBase | Arch::MinilmL6 if skipped => {
            let qkv = 2.0 * 3.0 * d * d;
            (l - 1.0) * t * per_row + t * qkv + b * (per_row - qkv)
        }
        _ => l * t * per_row,
    };
    let attn = l * 4.0 * b * s * s * d;
    let head = match arch {
        Arch::Gpt2Small => 2.0 * t * d * v,
        _ => 2.0 * b * (d * d + d * 2.0),
    };
    match mode {
        Mode::Forward => lin + attn + head,
        Mode::Train => 2.0 * lin + 3.0 * attn + 2.0 * head,
    }
}

/// bench_pt.py's T5 count: the encoder over S = seq + prompt rows; the decoder over `tg` positions
/// with self- and cross-attention; cross-attention's keys and values of the S encoder rows; the LM
/// head on the decoder's positions.
fn t5_flops(mode: Mode, (l, d, f, v): (f64, f64, f64, f64), b: f64, s: f64, tg: f64) -> f64 {
    let lin = l * 2.0 * b * s * (4.0 * d * d + 2.0 * d * f)
        + l * 2.0 * b * tg * (4.0 * d * d + 2.0 * d * d + 2.0 * d * f)
        + l * 2.0 * b * s * 2.0 * d * d;
    let attn = l * 4.0 * b * s * s * d + l * 4.0 * b * tg * tg * d + l * 4.0 * b * tg * s * d;
    let head = 2.0 * b * tg * d * v;
    match mode {
        Mode::Forward => lin + attn + head,
        Mode::Train => 2.0 * lin + 3.0 * attn + 2.0 * head,
    }
}

/// Peak resident memory of this process so far (VmHWM), in MiB; 0 where /proc is not there.
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn run(config: &BenchConfig) -> crate::Result<BenchResult> {
    let device = Device::Cpu;
    let (_, hidden, _, vocab) = config.arch.dims();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let is_lm = config.arch == Arch::Gpt2Small;
    let t5 = config.arch.t5_config();
    let writes = is_lm || t5.is_some();
    let mut tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab as u32)).collect() };
    let data: Vec<Encoded> = (0..config.batch)
        .map(|_| Encoded {
            ids: tokens(config.seq),
            type_ids: vec![0; config.seq],
            target_len: if is_lm { config.seq } else { 0 },
            decoder_ids: match t5 {
                Some(_) => tokens(T5_TARGET),
                None => Vec::new(),
            },
        })
        .collect();
    let set = EncodedSet {
        labels: (!writes).then(|| (0..config.batch).map(|i| (i % 2) as u32).collect()),
        tasks: None,
        data,
    };
    let rows: Vec<usize> = (0..config.batch).collect();
    let batch = Batch::new(
        &set.data,
        set.labels.as_deref(),
        &rows,
        Padding::Right,
        &device,
    )?;
    let prompt = Tensor::randn(0f32, 0.5, (config.num_virtual_tokens, hidden), &device)?;
    let prompt = TrainablePrompt::from(SoftPrompt::from_tensor(&prompt)?);
    let held = |w: &Weight| match config.weights {
        WeightDtype::F32 => Ok(w.clone()),
        WeightDtype::Bf16 => w.to_bf16(),
    };
    let trainee: Box<dyn Trainee> = match (config.arch.bert_config(), t5) {
        (_, Some(cfg)) => {
            let t5 = random_t5(&cfg, &device)?.map_weights(&held)?;
            let head = CausalLm {
                lm_head: t5.lm_head().dense()?,
            };
            Box::new(PromptedModel {
                backbone: AnyBackbone::T5(t5),
                prompt,
                head,
                template: None,
            })
        }
        (Some(cfg), None) => {
            let bert = random_bert(&cfg, &device)?.map_weights(&held)?;
            let pooler = bert.pooler.clone();
            let head =
                ClassificationHead::init(2, hidden, Pool::Pooler, pooler, &mut rng, &device)?;
            Box::new(PromptedModel {
                backbone: AnyBackbone::Bert(bert),
                prompt,
                head: Classifier {
                    head,
                    labels: vec!["a".into(), "b".into()],
                    label_words: None,
                },
                template: None,
            })
        }
        (None, None) => {
            let gpt2 =
                generation::random_gpt2(&generation::gpt2_small(), &device)?.map_weights(&held)?;
            let head = CausalLm {
                lm_head: gpt2.lm_head().dense()?,
            };
            Box::new(PromptedModel {
                backbone: AnyBackbone::Gpt2(gpt2),
                prompt,
                head,
                template: None,
            })
        }
    };
    let mut optimizer = Optimizer::new(OptimizerConfig::default(), &trainee.params())?;
    let mut step = || -> crate::Result<f64> {
        let _span = tracing::debug_span!("step").entered();
        let started = Instant::now();
        match config.mode {
            Mode::Train => {
                let (_, mut grads) = trainee.loss_and_grads(&batch)?;
                let _span = tracing::trace_span!("optimizer").entered();
                clip_grad_norm(&mut grads, 1.0)?;
                optimizer.step(&trainee.params(), &grads, 1e-3)?;
            }
            Mode::Forward => {
                let batching = Batching {
                    size: config.batch,
                    padding: Padding::Right,
                    device: device.clone(),
                };
                trainee.tally(&set, &batching)?;
            }
        }
        Ok(started.elapsed().as_secs_f64())
    };
    for _ in 0..config.warmup {
        step()?;
    }
    if let Some(profiler) = &config.profiler {
        profiler.reset();
    }
    let mut times = (0..config.steps.max(1))
        .map(|_| step())
        .collect::<crate::Result<Vec<f64>>>()?;
    times.sort_by(f64::total_cmp);
    let median_s = times[times.len() / 2];
    let count = |skipped| {
        flops(
            config.arch,
            config.mode,
            config.batch,
            config.seq,
            config.num_virtual_tokens,
            skipped,
        ) / 1e9
    };
    // only training skips work the prompt never needs: inference still computes every position
    let (gflop, model_gflop) = (count(config.mode == Mode::Train), count(false));
    Ok(BenchResult {
        arch: config.arch,
        mode: config.mode,
        batch: config.batch,
        seq: config.seq,
        num_virtual_tokens: config.num_virtual_tokens,
        weights: config.weights,
        steps: times.len(),
        median_s,
        min_s: times[0],
        max_s: times[times.len() - 1],
        gflop,
        gflop_per_s: gflop / median_s,
        model_gflop,
        model_gflop_per_s: model_gflop / median_s,
        share_of_peak: config.fma_peak_gflop_per_s.map(|p| gflop / median_s / p),
        peak_rss_mib: peak_rss_mib(),
        profile: config
            .profiler
            .as_ref()
            .map(|p| p.profile(config.fma_peak_gflop_per_s)),
    })
}
