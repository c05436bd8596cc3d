use super::fused::{fused_for, Gelu, GeluBackward};
use candle_core::{Result, Tensor};
use std::f64::consts::{PI, SQRT_2};

/// GELU with the exact erf: y = x·Φ(x). The backward needs x itself, which the caller keeps.
pub fn gelu_erf_forward(x: &Tensor) -> Result<Tensor> {
    if fused_for(x) {
        return x.contiguous()?.apply_op1_no_bwd(&Gelu);
    }
    x.gelu_erf()
}

/// dx = dy · (Φ(x) + x·φ(x)), Φ(x) = ½(1 + erf(x/√2)), φ(x) = exp(−x²/2)/√(2π).
pub fn gelu_erf_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    if fused_for(x) {
        return dy
            .contiguous()?
            .apply_op2_no_bwd(&x.contiguous()?, &GeluBackward);
    }
    let cdf = (((x / SQRT_2)?.erf()? + 1.0)? * 0.5)?;
    let pdf = ((x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * PI).sqrt()))?;
    dy * (cdf + (x * pdf)?)?
}
