use super::fused::{fused_for, MaskedSoftmax, SoftmaxBackward};
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

/// Softmax attention, bidirectional with a padding mask.
/// q, k, v [B, H, S, K]; bias [B, 1, 1, S] → (context [B, H, S, K], probabilities [B, H, S, S]).
/// The probabilities are kept for the backward.
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let raw = q.matmul(&k.t()?)?;
    let probs = if fused_for(&raw) {
        raw.apply_op2_no_bwd(&bias.contiguous()?, &MaskedSoftmax { scale })?
    } else {
        let scores = (raw * scale)?.broadcast_add(bias)?;
        let shifted = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?;
        let e = shifted.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
    };
    let context = probs.matmul(v)?;
    Ok((context, probs))
}

/// dcontext [B, H, S, K] → (dq, dk, dv), each [B, H, S, K].
/// dP = dC·Vᵀ; dV = Pᵀ·dC; dScores = P ⊙ (dP − rowsum(dP ⊙ P)); dQ = dScores·K·scale; dK = dScoresᵀ·Q·scale.
pub fn attention_backward(
    dcontext: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dprobs = dcontext.matmul(&v.t()?)?;
    let dv = probs.t()?.matmul(dcontext)?;
    // dscores already carries the scale, so dq and dk need no further multiply.
    let dscores = if fused_for(&dprobs) {
        dprobs.apply_op2_no_bwd(probs, &SoftmaxBackward { scale })?
    } else {
        let row = (&dprobs * probs)?.sum_keepdim(D::Minus1)?;
        ((dprobs.broadcast_sub(&row)? * probs)? * scale)?
    };
    let dq = dscores.matmul(k)?;
    let dk = dscores.t()?.matmul(q)?;
    Ok((dq, dk, dv))
}
