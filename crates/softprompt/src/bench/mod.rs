//! `softprompt bench`: the train step and the forward pass on random weights of a known shape, timed
//! the way ../shared/reference/pytorch/bench_pt.py times PyTorch + peft, with the same FLOP formulas.

pub mod generation;

use crate::backbone::bert::{Bert, BertConfig};
use crate::batch::Batch;
use crate::classifier::PromptClassifier;
use crate::named_choice;
use crate::optim::{clip_grad_norm, Optimizer, OptimizerConfig};
use crate::prompt::SoftPrompt;
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
}
named_choice!(Arch, "bert-base", "minilm-l6");

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
    pub fn config(self) -> BertConfig {
        let (layers, hidden, heads, ffn) = match self {
            Arch::BertBase => (12, 768, 12, 3072),
            Arch::MinilmL6 => (6, 384, 12, 1536),
        };
        BertConfig {
            vocab_size: 30522,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: ffn,
            hidden_act: "gelu".into(),
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: "absolute".into(),
            model_type: Some("bert".into()),
        }
    }
}

/// A BERT of the given shape with N(0, 0.02) weights, unit LayerNorm gains and zero biases, under
/// the Hugging Face tensor names.
pub fn random_bert(cfg: &BertConfig, device: &Device) -> anyhow::Result<Bert> {
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
    pub steps: usize,
    pub warmup: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub arch: Arch,
    pub mode: Mode,
    pub batch: usize,
    pub seq: usize,
    pub num_virtual_tokens: usize,
    pub steps: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub gflop: f64,
    pub gflop_per_s: f64,
    pub peak_rss_mib: f64,
}

/// Model FLOPs of one step, as ../shared/reference/pytorch/README.md counts them (BERT with the
/// pooler + classifier head of SEQ_CLS).
pub fn flops(cfg: &BertConfig, mode: Mode, batch: usize, seq: usize, vt: usize) -> f64 {
    let (l, d, f) = (
        cfg.num_hidden_layers as f64,
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
    );
    let (b, s) = (batch as f64, (seq + vt) as f64);
    let t = b * s;
    let lin = l * 2.0 * t * (4.0 * d * d + 2.0 * d * f);
    let attn = l * 4.0 * b * s * s * d;
    let head = 2.0 * b * (d * d + d * 2.0);
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

pub fn run(config: &BenchConfig) -> anyhow::Result<BenchResult> {
    let device = Device::Cpu;
    let cfg = config.arch.config();
    let bert = random_bert(&cfg, &device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let data: Vec<Encoded> = (0..config.batch)
        .map(|_| Encoded {
            ids: (0..config.seq)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect(),
            type_ids: vec![0; config.seq],
            target_len: 0,
        })
        .collect();
    let labels: Vec<u32> = (0..config.batch).map(|i| (i % 2) as u32).collect();
    let rows: Vec<usize> = (0..config.batch).collect();
    let batch = Batch::new(&data, Some(&labels), &rows, &device)?;
    let prompt = Tensor::randn(
        0f32,
        0.5,
        (config.num_virtual_tokens, cfg.hidden_size),
        &device,
    )?;
    let pooler = bert.pooler.clone();
    let head =
        ClassificationHead::init(2, cfg.hidden_size, Pool::Pooler, pooler, &mut rng, &device)?;
    let classifier = PromptClassifier {
        backbone: bert,
        prompt: SoftPrompt::from_tensor(&prompt)?,
        head,
        label_words: None,
        labels: vec!["a".into(), "b".into()],
        template: None,
    };
    let mut optimizer = Optimizer::new(OptimizerConfig::default(), &classifier.params())?;
    let mut step = || -> anyhow::Result<f64> {
        let started = Instant::now();
        match config.mode {
            Mode::Train => {
                let (_, mut grads) = classifier.loss_and_grads(&batch)?;
                clip_grad_norm(&mut grads, 1.0)?;
                optimizer.step(&classifier.params(), &grads, 1e-3)?;
            }
            Mode::Forward => {
                classifier.predict_all(&data, config.batch, &device)?;
            }
        }
        Ok(started.elapsed().as_secs_f64())
    };
    for _ in 0..config.warmup {
        step()?;
    }
    let mut times = (0..config.steps.max(1))
        .map(|_| step())
        .collect::<anyhow::Result<Vec<f64>>>()?;
    times.sort_by(f64::total_cmp);
    let median_s = times[times.len() / 2];
    let gflop = flops(
        &cfg,
        config.mode,
        config.batch,
        config.seq,
        config.num_virtual_tokens,
    ) / 1e9;
    Ok(BenchResult {
        arch: config.arch,
        mode: config.mode,
        batch: config.batch,
        seq: config.seq,
        num_virtual_tokens: config.num_virtual_tokens,
        steps: times.len(),
        median_s,
        min_s: times[0],
        max_s: times[times.len() - 1],
        gflop,
        gflop_per_s: gflop / median_s,
        peak_rss_mib: peak_rss_mib(),
    })
}
