//! Forward / input-gradient-backward pairs: the primitives every frozen backbone is built from.
//!
//! Each forward returns its output and keeps what its backward needs; each backward returns only the
//! gradient with respect to the input (the weights are frozen, so their gradients are never formed).
//! The pairs are written with candle tensor ops, so they run in f32 for training and in f64 for the
//! finite-difference tests, on CPU or CUDA alike. None of candle's fused ops without backward
//! (`softmax_last_dim`, `ops::layer_norm`, ...) appear here: see ../shared/DESIGN.md.
//!
//! Shape letters: B batch, S positions (prompt + tokens), T = B·S rows, D hidden, F FFN width,
//! H heads, K head width (D = H·K).

mod activation;
mod attention;
mod fused;
mod fused_attention;
mod layer_norm;
mod linear;

pub use activation::{gelu_erf_backward, gelu_erf_forward};
pub use attention::{attention_backward, attention_forward, mask_bias, AttentionShape};
pub use fused::with_composed;
pub use layer_norm::{LayerNorm, LayerNormSaved};
pub use linear::Linear;
