use super::fused::{fused_for, scaled, Gelu, GeluKind, Pointwise, TANH_CUBIC, TANH_SCALE};
use candle_core::{Result, Tensor};
use std::f64::consts::{PI, SQRT_2};

/// The fused kernel of `kind` where it serves x (f32/f64 on the CPU), else None.
fn fused_forward(x: &Tensor, kind: GeluKind) -> Option<Result<Tensor>> {
    let _span = tracing::trace_span!("gelu.forward").entered();
    fused_for(x).then(|| x.contiguous()?.apply_op1_no_bwd(&Gelu(kind)))
}

fn fused_backward(dy: &Tensor, x: &Tensor, kind: GeluKind) -> Option<Result<Tensor>> {
    let _span = tracing::trace_span!("gelu.backward").entered();
    scaled(dy, x, Pointwise::GeluSlope(kind))
}

/// What a GELU's backward reads: its input.
pub struct GeluSaved {
    x: Tensor,
}

/// GELU with the exact erf: x [..] → y [..] = x·Φ(x).
pub fn gelu_erf_forward(x: &Tensor) -> Result<(Tensor, GeluSaved)> {
    let y = fused_forward(x, GeluKind::Erf).unwrap_or_else(|| x.gelu_erf())?;
    Ok((y, GeluSaved { x: x.clone() }))
}

/// dy [..] → dx [..] = dy · (Φ(x) + x·φ(x)), Φ(x) = ½(1 + erf(x/√2)), φ(x) = exp(−x²/2)/√(2π).
pub fn gelu_erf_backward(dy: &Tensor, saved: &GeluSaved) -> Result<Tensor> {
    let x = &saved.x;
    fused_backward(dy, x, GeluKind::Erf).unwrap_or_else(|| {
        let cdf = (((x / SQRT_2)?.erf()? + 1.0)? * 0.5)?;
        let pdf = ((x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * PI).sqrt()))?;
        dy * (cdf + (x * pdf)?)?
    })
}

/// GELU with the tanh approximation (GPT-2's "gelu_new"): x [..] → y [..] = ½x(1 + tanh(u)),
/// u = √(2/π)(x + 0.044715x³).
pub fn gelu_tanh_forward(x: &Tensor) -> Result<(Tensor, GeluSaved)> {
    let y = fused_forward(x, GeluKind::Tanh).unwrap_or_else(|| {
        let t = tanh_arg(x)?.tanh()?;
        (x * 0.5)? * (t + 1.0)?
    })?;
    Ok((y, GeluSaved { x: x.clone() }))
}

/// dy [..] → dx [..] = dy · (½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²)).
pub fn gelu_tanh_backward(dy: &Tensor, saved: &GeluSaved) -> Result<Tensor> {
    let x = &saved.x;
    fused_backward(dy, x, GeluKind::Tanh).unwrap_or_else(|| {
        let t = tanh_arg(x)?.tanh()?;
        let du = ((x.sqr()? * (3.0 * TANH_CUBIC))? + 1.0)? * TANH_SCALE;
        let slope = (((&t + 1.0)? * 0.5)? + (((x * 0.5)? * (1.0 - t.sqr()?)?)? * du?)?)?;
        dy * slope
    })
}

fn tanh_arg(x: &Tensor) -> Result<Tensor> {
    (x + (x.powf(3.0)? * TANH_CUBIC)?)? * TANH_SCALE
}

/// What a ReLU's backward reads: where its input was positive.
pub struct ReluSaved {
    /// [..] 1 where x > 0, else 0 (x's dtype)
    positive: Tensor,
}

/// ReLU (T5's feed-forward): x [..] → y [..] = max(x, 0).
pub fn relu_forward(x: &Tensor) -> Result<(Tensor, ReluSaved)> {
    let positive = x.gt(0.0)?.to_dtype(x.dtype())?;
    Ok(((x * &positive)?, ReluSaved { positive }))
}

/// dy [..] → dx [..] = dy where x > 0, else 0.
pub fn relu_backward(dy: &Tensor, saved: &ReluSaved) -> Result<Tensor> {
    dy * &saved.positive
}
