//! Llama-family models from a GGUF file (llama.cpp's format): the weights dequantized at load under
//! their Hugging Face names, and the tokenizer rebuilt from the file's metadata.
//!
//! llama.cpp's converter permutes the rows of q and k so that RoPE rotates interleaved pairs; our
//! RoPE rotates halves, as transformers does, so the permutation is undone here.

use super::llama::{Llama, LlamaConfig, QuantizedWeights};
use crate::kernels::Weight;
use crate::{bail, Context};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// What a GGUF file holds: the model, its tokenizer, and the token that ends a generation.
pub struct GgufLlama {
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    pub eos_token_id: Option<u32>,
}

/// `keep_quantized`: the quantized matrices stay quantized in memory and are dequantized at each
/// use (`Weight::Quantized`); otherwise all is dequantized now.
pub fn load_llama(
    path: &Path,
    dtype: DType,
    device: &Device,
    keep_quantized: bool,
) -> crate::Result<GgufLlama> {
    let at = path.display();
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {at}"))?;
    let content = Content::read(&mut file).with_context(|| format!("{at} is not a GGUF file"))?;
    let file_len = file
        .metadata()
        .with_context(|| format!("cannot read the size of {at}"))?
        .len();
    check_tensor_sizes(&content, file_len)
        .with_context(|| format!("{at} is not a model this loader can read"))?;
    let meta = |key: &str| {
        content
            .metadata
            .get(key)
            .with_context(|| format!("{at}: no {key} in the GGUF metadata"))
    };
    let arch = meta("general.architecture")?
        .to_string()
        .with_context(|| format!("{at}: general.architecture is not a string"))?
        .clone();
    if arch != "llama" {
        bail!("{at}: GGUF architecture {arch:?} is not supported (llama)");
    }
    let int = |key: &str| -> crate::Result<usize> {
        let key = format!("llama.{key}");
        let value = meta(&key)?.to_u32();
        Ok(value.with_context(|| format!("{at}: {key} is not an unsigned integer"))? as usize)
    };
    let float = |key: &str| -> crate::Result<f64> {
        let key = format!("llama.{key}");
        let value = meta(&key)?.to_f32();
        Ok(value.with_context(|| format!("{at}: {key} is not a float"))? as f64)
    };
    let (heads, kv_heads) = (
        int("attention.head_count")?,
        int("attention.head_count_kv")?,
    );
    let tokens = meta("tokenizer.ggml.tokens")?
        .to_vec()
        .with_context(|| format!("{at}: tokenizer.ggml.tokens is not a list"))?;
    let config = LlamaConfig {
        vocab_size: tokens.len(),
        hidden_size: int("embedding_length")?,
        intermediate_size: int("feed_forward_length")?,
        num_hidden_layers: int("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: None,
        max_position_embeddings: int("context_length")?,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")?,
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        rope_parameters: None,
        mlp_bias: false,
        hidden_act: super::Activation::Silu,
        attention_bias: false,
        model_type: Some("llama".into()),
    };
    config.validate(&at.to_string())?;
    let mut tensors = HashMap::new();
    let mut quantized = QuantizedWeights::new();
    let mut read = |gguf: &str| -> crate::Result<QTensor> {
        content
            .tensor(&mut file, gguf, device)
            .with_context(|| format!("{at}: cannot read tensor {gguf}"))
    };
    let dense = |q: &QTensor, gguf: &str| -> crate::Result<Tensor> {
        let t = q
            .dequantize(device)
            .with_context(|| format!("{at}: cannot dequantize {gguf} ({:?})", q.dtype()))?;
        Ok(t.to_dtype(dtype)?)
    };
    let keep = |q: &QTensor| {
        keep_quantized && !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
    };
    for (gguf, hf) in [
        ("token_embd.weight", "embed_tokens.weight"),
        ("output_norm.weight", "norm.weight"),
        ("output.weight", "lm_head.weight"),
    ] {
        if content.tensor_infos.contains_key(gguf) {
            let q = read(gguf)?;
            // kept quantized, the embeddings dequantize only the rows looked up
            if keep(&q) {
                let blocks = Arc::new(q);
                quantized.insert(hf.to_string(), Weight::Quantized { blocks, dtype });
            } else {
                tensors.insert(hf.to_string(), dense(&q, gguf)?);
            }
        }
    }
    for i in 0..config.num_hidden_layers {
        let (g, h) = (format!("blk.{i}"), format!("layers.{i}"));
        for (gguf, hf) in [
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ] {
            let name = format!("{g}.{gguf}.weight");
            let q = read(&name)?;
            tensors.insert(format!("{h}.{hf}.weight"), dense(&q, &name)?);
        }
        for (gguf, hf) in [
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
        ] {
            let name = format!("{g}.{gguf}.weight");
            let q = read(&name)?;
            let mut weight = if keep(&q) {
                Weight::Quantized {
                    blocks: Arc::new(q),
                    dtype,
                }
            } else {
                Weight::Dense(dense(&q, &name)?)
            };
            if let Some(h) = match gguf {
                "attn_q" => Some(heads),
                "attn_k" => Some(kv_heads),
                _ => None,
            } {
                weight = weight.select_rows(&unpermuted_rows(weight.dims()[0], h))?;
            }
            let hf = format!("{h}.{hf}.weight");
            match weight {
                Weight::Dense(t) => tensors.insert(hf, t).map(|_| ()),
                quantized_weight => quantized.insert(hf, quantized_weight).map(|_| ()),
            };
        }
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let llama = Llama::from_parts(vb, &quantized, config)
        .with_context(|| format!("{at}: the tensors do not fit its metadata"))?;
    let eos_token_id = content
        .metadata
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.to_u32().ok());
    Ok(GgufLlama {
        llama,
        tokenizer: tokenizer(&content, tokens)
            .with_context(|| format!("{at}: cannot rebuild the tokenizer"))?,
        eos_token_id,
    })
}

/// The source row of each row once llama.cpp's q/k row permutation is undone: rows ordered
/// (heads, K/2, 2) go back to (heads, 2, K/2).
fn unpermuted_rows(rows: usize, heads: usize) -> Vec<usize> {
    let k = rows / heads;
    (0..rows)
        .map(|r| {
            let (head, j, i) = (r / k, (r % k) / (k / 2), r % (k / 2));
            head * k + 2 * i + j
        })
        .collect()
}

/// The byte-level BPE tokenizer the metadata describes (tokenizer.ggml.model "gpt2"), with its
/// control tokens as special tokens; digits are split one by one, as SmolLM's and Llama 3's are.
fn tokenizer(content: &Content, tokens: &[Value]) -> crate::Result<Tokenizer> {
    let model = content
        .metadata
        .get("tokenizer.ggml.model")
        .map(|v| v.to_string())
        .transpose()?;
    if model.map(String::as_str) != Some("gpt2") {
        bail!("tokenizer model {model:?} is not supported (gpt2 byte-level BPE)");
    }
    let tokens: Vec<&String> = tokens
        .iter()
        .map(|t| t.to_string())
        .collect::<candle_core::Result<_>>()?;
    let merges: Vec<&String> = match content.metadata.get("tokenizer.ggml.merges") {
        Some(m) => m
            .to_vec()?
            .iter()
            .map(|v| v.to_string())
            .collect::<candle_core::Result<_>>()?,
        None => Vec::new(),
    };
    let types: Vec<u32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(t) => t
            .to_vec()?
            .iter()
            .map(|v| v.to_u32().or_else(|_| v.to_i32().map(|x| x as u32)))
            .collect::<candle_core::Result<_>>()?,
        None => vec![1; tokens.len()],
    };
    const CONTROL: u32 = 3;
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t).clone(), i.into()))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i) == Some(&CONTROL))
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": true})
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    });
    Tokenizer::from_bytes(serde_json::to_vec(&json)?).map_err(|e| crate::invalid!("{e}"))
}

/// Every tensor's declared shape fits in usize, and in the file, dequantized to f32 included:
/// candle multiplies the dimensions unchecked, so a shape that wraps passed its size check and
/// then asked for more memory than exists (found by `fuzz/fuzz_targets/gguf_file.rs`).
fn check_tensor_sizes(content: &Content, file_len: u64) -> crate::Result<()> {
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let elements = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let (block, block_bytes) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
        let bytes = elements.and_then(|n| (n / block).checked_mul(block_bytes));
        let fits = match (elements, bytes) {
            (Some(n), Some(b)) => n.checked_mul(4).is_some() && b as u64 <= file_len,
            _ => false,
        };
        if !fits {
            bail!(
                "tensor {name} claims shape {dims:?} of {:?}, more than the file's {file_len} bytes hold",
                info.ggml_dtype
            );
        }
    }
    Ok(())
}
