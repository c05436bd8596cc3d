use super::fused::fused_for;
use super::fused_attention::{self, Heads};
use candle_core::{DType, Result, Tensor, D};

/// Far below any real score, yet finite in f32 and bf16, so masked scores never turn into NaN.
const MASKED: f64 = -1e30;

/// Additive mask bias from a 0/1 attention mask: mask [B, S] → bias [B, 1, 1, S], 0 where attended
/// and a large negative number where not (exp underflows to exactly 0, as with transformers).
pub fn mask_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let masked = (1.0 - mask.to_dtype(dtype)?)?;
    (masked * MASKED)?.reshape((b, 1, 1, s))
}

/// The geometry of one attention call: B rows of S positions, H heads of width K = D / H.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
}

impl AttentionShape {
    fn heads_of(&self, d: usize) -> Heads {
        let head_dim = d / self.heads;
        Heads {
            batch: self.batch,
            seq: self.seq,
            heads: self.heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        }
    }
}

/// Bidirectional softmax attention with a padding mask, scaled by 1/√K.
/// qkv [T, 3D] (the fused projection: q, then k, then v), bias [B, 1, 1, S]
/// → (context [T, D], probabilities [B, H, S, S]); the probabilities are kept for the backward.
pub fn attention_forward(
    qkv: &Tensor,
    bias: &Tensor,
    shape: AttentionShape,
) -> Result<(Tensor, Tensor)> {
    let h = shape.heads_of(qkv.dim(1)? / 3);
    match qkv.dtype() {
        DType::F32 if fused_for(qkv) => fused_attention::forward::<f32>(qkv, bias, h),
        DType::F64 if fused_for(qkv) => fused_attention::forward::<f64>(qkv, bias, h),
        _ => composed_forward(qkv, bias, h),
    }
}

/// d_context [T, D] → d_qkv [T, 3D].
/// dP = dC·Vᵀ; dV = Pᵀ·dC; dS = P ⊙ (dP − rowsum(dP ⊙ P))·scale; dQ = dS·K; dK = dSᵀ·Q.
pub fn attention_backward(
    dcontext: &Tensor,
    qkv: &Tensor,
    probs: &Tensor,
    shape: AttentionShape,
) -> Result<Tensor> {
    let h = shape.heads_of(qkv.dim(1)? / 3);
    match qkv.dtype() {
        DType::F32 if fused_for(qkv) => fused_attention::backward::<f32>(dcontext, qkv, probs, h),
        DType::F64 if fused_for(qkv) => fused_attention::backward::<f64>(dcontext, qkv, probs, h),
        _ => composed_backward(dcontext, qkv, probs, h),
    }
}

/// qkv [T, 3D] → q, k, v [B, H, S, K]
fn split_heads(qkv: &Tensor, h: Heads) -> Result<(Tensor, Tensor, Tensor)> {
    let qkv = qkv
        .reshape((h.batch, h.seq, 3, h.heads, h.head_dim))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?;
    Ok((qkv.get(0)?, qkv.get(1)?, qkv.get(2)?))
}

/// [B, H, S, K] → [T, D]
fn merge_heads(x: &Tensor, h: Heads) -> Result<Tensor> {
    x.transpose(1, 2)?
        .reshape((h.batch * h.seq, h.heads * h.head_dim))
}

/// The same attention from candle ops: the reference for the fused kernel, and the path on devices
/// the fused kernel does not serve.
fn composed_forward(qkv: &Tensor, bias: &Tensor, h: Heads) -> Result<(Tensor, Tensor)> {
    let (q, k, v) = split_heads(qkv, h)?;
    let scores = (q.matmul(&k.t()?)? * h.scale)?.broadcast_add(bias)?;
    let shifted = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?;
    let e = shifted.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok((merge_heads(&probs.matmul(&v)?, h)?, probs))
}

fn composed_backward(dcontext: &Tensor, qkv: &Tensor, probs: &Tensor, h: Heads) -> Result<Tensor> {
    let (q, k, v) = split_heads(qkv, h)?;
    let dcontext = dcontext
        .reshape((h.batch, h.seq, h.heads, h.head_dim))?
        .transpose(1, 2)?
        .contiguous()?;
    let dprobs = dcontext.matmul(&v.t()?)?;
    let dv = probs.t()?.matmul(&dcontext)?;
    let row = (&dprobs * probs)?.sum_keepdim(D::Minus1)?;
    let dscores = ((dprobs.broadcast_sub(&row)? * probs)? * h.scale)?;
    let dq = dscores.matmul(&k)?;
    let dk = dscores.t()?.matmul(&q)?;
    // [3, B, H, S, K] → [T, 3D]
    let d = h.heads * h.head_dim;
    Tensor::stack(&[dq, dk, dv], 0)?
        .permute((1, 3, 0, 2, 4))?
        .reshape((h.batch * h.seq, 3 * d))
}
