//! Forward / input-gradient-backward pairs: the primitives every frozen backbone is built from.
//!
//! Each forward returns its output and what its backward needs (`*Saved`; a linear layer and RoPE
//! need nothing); each backward returns only the
//! gradient with respect to the input (the weights are frozen, so their gradients are never formed).
//! The pairs are written with candle tensor ops, so they run in f32 for training and in f64 for the
//! finite-difference tests, on CPU or CUDA alike; linear layers, layer norm, GELU and attention also
//! have fused, multithreaded CPU versions (`fused_linear`, `fused`, `fused_attention`; f32 exp and
//! erf in `fast_math`) that the CPU takes by default, with the composed ones as their tested
//! reference (`with_composed`). candle-nn's own fused softmax and
//! norm ops have no backward, so none of them is used here: see docs/DESIGN.md (candle pitfalls).
//! RMS norm, RoPE, the SiLU-gated MLP and tanh GELU are the decoder families' pairs; ReLU and the
//! relative-position attention without scaling (`relative_attention`) are T5's.
//!
//! Shape letters: B batch, S positions (prompt + tokens), T = B·S rows, D hidden, F FFN width,
//! H heads (Hkv key/value heads), K head width (D = H·K).

mod activation;
mod attention;
mod bf16_matmul;
mod fast_math;
mod fused;
mod fused_attention;
mod fused_linear;
mod layer_norm;
mod linear;
mod mlp;
mod quantized_matvec;
mod relative_attention;
mod rms_norm;
mod rope;

pub use activation::{
    gelu_erf_backward, gelu_erf_forward, gelu_tanh_backward, gelu_tanh_forward, relu_backward,
    relu_forward, GeluSaved, ReluSaved,
};
pub use attention::{
    attention_at_forward, attention_backward, attention_forward, cached_attention, heads_of,
    mask_bias, rows_read, spread, AttentionSaved, AttentionShape,
};
pub use bf16_matmul::native as bf16_native;
pub use fused::with_composed;
pub use layer_norm::{LayerNorm, LayerNormSaved};
pub use linear::{Linear, Weight};
pub use mlp::{GatedMlp, GatedMlpSaved};
pub use relative_attention::{
    biased_attention_backward, biased_attention_forward, causal_mask, position_bias,
    relative_position_bucket, BiasedAttentionSaved,
};
pub use rms_norm::{RmsNorm, RmsNormSaved};
pub use rope::{Positions, Rope};
