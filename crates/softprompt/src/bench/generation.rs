//! `softprompt bench generate`: greedy generation on a random GPT-2 small (the reference's
//! `GPT2Config()`), batch 1, a prompt of virtual tokens plus a few input tokens, timed as
//! bench_pt.py times its manual KV-cache loop, and checked token for token against decoding that
//! rereads the whole sequence for every token.

use crate::backbone::any::AnyBackbone;
use crate::backbone::gpt2::{Gpt2, Gpt2Config};
use crate::backbone::Backbone;
use crate::generate::{generate_tokens, prefix_cache, SamplingConfig};
use crate::prompt::Placement;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;

pub fn gpt2_small() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 50257,
        n_positions: 1024,
        n_embd: 768,
        n_layer: 12,
        n_head: 12,
        n_inner: None,
        activation_function: crate::backbone::Activation::GeluNew,
        layer_norm_epsilon: 1e-5,
        model_type: Some("gpt2".into()),
    }
}

/// A GPT-2 of the given shape with N(0, 0.02) weights, unit LayerNorm gains and zero biases.
pub fn random_gpt2(cfg: &Gpt2Config, device: &Device) -> crate::Result<Gpt2> {
    let (d, f) = (cfg.n_embd, cfg.n_inner.unwrap_or(4 * cfg.n_embd));
    let mut tensors = HashMap::new();
    let normal = |shape: (usize, usize)| Tensor::randn(0f32, 0.02, shape, device);
    tensors.insert("wte.weight".to_string(), normal((cfg.vocab_size, d))?);
    tensors.insert("wpe.weight".to_string(), normal((cfg.n_positions, d))?);
    // Conv1D weights are stored [in, out]
    for i in 0..cfg.n_layer {
        for (name, inp, out) in [
            ("attn.c_attn", d, 3 * d),
            ("attn.c_proj", d, d),
            ("mlp.c_fc", d, f),
            ("mlp.c_proj", f, d),
        ] {
            tensors.insert(format!("h.{i}.{name}.weight"), normal((inp, out))?);
            tensors.insert(
                format!("h.{i}.{name}.bias"),
                Tensor::zeros(out, DType::F32, device)?,
            );
        }
    }
    let mut norms: Vec<String> = vec!["ln_f".into()];
    for i in 0..cfg.n_layer {
        norms.extend([format!("h.{i}.ln_1"), format!("h.{i}.ln_2")]);
    }
    super::unit_layer_norms(&mut tensors, &norms, d, device)?;
    Ok(Gpt2::from_var_builder(
        VarBuilder::from_tensors(tensors, DType::F32, device),
        cfg.clone(),
    )?)
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationBench {
    pub arch: &'static str,
    /// "f32", or the GGUF block type the matrices were rounded to
    pub weights: String,
    pub input_tokens: usize,
    pub num_virtual_tokens: usize,
    pub new_tokens: usize,
    pub steps: usize,
    /// one whole generation (prefix cache, input, every new token)
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub tokens_per_s: f64,
    /// the cached tokens equal decoding without a cache
    pub matches_no_cache: bool,
    pub peak_rss_mib: f64,
}

/// `weights`: None for f32, or the GGUF block type every matrix is rounded to (as
/// `--keep-quantized` holds a GGUF file); the tokens are then checked against the same rounded
/// model decoded without a cache.
pub fn run(
    input_tokens: usize,
    num_virtual_tokens: usize,
    new_tokens: usize,
    steps: usize,
    weights: Option<GgmlDType>,
) -> crate::Result<GenerationBench> {
    let device = Device::Cpu;
    let cfg = gpt2_small();
    let mut gpt2 = random_gpt2(&cfg, &device)?;
    if let Some(kind) = weights {
        gpt2 = gpt2.map_weights(&|w| w.quantize(kind))?;
    }
    let backbone = AnyBackbone::Gpt2(gpt2);
    let prompt = Tensor::randn(0f32, 0.5, (num_virtual_tokens, cfg.n_embd), &device)?;
    let input: Vec<u32> = (0..input_tokens as u32)
        .map(|i| (i * 7919) % 50257)
        .collect();
    let config = SamplingConfig {
        max_new_tokens: new_tokens,
        ..Default::default()
    };
    let once = || -> crate::Result<Vec<u32>> {
        let prefix = prefix_cache(&backbone, &prompt, Placement::Embeddings)?;
        Ok(generate_tokens(&backbone, &prefix, &input, &[], &config)?.0)
    };
    for _ in 0..2 {
        once()?;
    }
    let mut times = Vec::with_capacity(steps.max(1));
    let mut tokens = Vec::new();
    for _ in 0..steps.max(1) {
        let started = Instant::now();
        tokens = once()?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median_s = times[times.len() / 2];
    Ok(GenerationBench {
        arch: "gpt2-small",
        weights: weights.map_or("f32".into(), |k| format!("{k:?}")),
        input_tokens,
        num_virtual_tokens,
        new_tokens,
        steps: times.len(),
        median_s,
        min_s: times[0],
        max_s: times[times.len() - 1],
        tokens_per_s: new_tokens as f64 / median_s,
        matches_no_cache: tokens == greedy_without_cache(&backbone, &prompt, &input, new_tokens)?,
        peak_rss_mib: super::peak_rss_mib(),
    })
}

/// Greedy decoding that reruns [prompt; input; tokens so far] through the full forward for every
/// token: slow, and what the cached path must reproduce.
pub fn greedy_without_cache(
    backbone: &AnyBackbone,
    prompt: &Tensor,
    input: &[u32],
    new_tokens: usize,
) -> crate::Result<Vec<u32>> {
    let decoder = backbone
        .decoder()
        .ok_or_else(|| crate::invalid!("greedy decoding needs a decoder"))?;
    let mut ids = input.to_vec();
    let mut out = Vec::with_capacity(new_tokens);
    for _ in 0..new_tokens {
        let words = backbone
            .word_embeddings()
            .rows(&Tensor::new(ids.as_slice(), prompt.device())?)?;
        let embeds = Tensor::cat(&[prompt, &words], 0)?;
        let s = embeds.dim(0)?;
        let hidden = backbone.run_row(&embeds, false)?.0;
        let last = hidden.squeeze(0)?.narrow(0, s - 1, 1)?;
        let next = decoder
            .next_token_logits(&last)?
            .squeeze(0)?
            .argmax(0)?
            .to_scalar::<u32>()?;
        out.push(next);
        ids.push(next);
    }
    Ok(out)
}
