use candle_core::{Result, Tensor, D};

/// RMSNorm over the last dimension (Llama): y = x · rrms · γ, rrms = 1/√(mean(x²) + ε).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

/// What the backward reads: the input (the statistics are cheaper to recompute than to keep).
pub struct RmsNormSaved {
    x: Tensor,
}

impl RmsNorm {
    /// x [.., D] → y [.., D]
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, RmsNormSaved)> {
        let _span = tracing::trace_span!("rms_norm.forward").entered();
        let y = x
            .broadcast_mul(&self.rrms(x)?)?
            .broadcast_mul(&self.weight)?;
        Ok((y, RmsNormSaved { x: x.clone() }))
    }

    /// dy [.., D] → dx [.., D] = rrms · (g − x̂ · mean(g · x̂)), with g = dy·γ and x̂ = x·rrms.
    pub fn backward(&self, dy: &Tensor, saved: &RmsNormSaved) -> Result<Tensor> {
        let _span = tracing::trace_span!("rms_norm.backward").entered();
        let x = &saved.x;
        let rrms = self.rrms(x)?;
        let xhat = x.broadcast_mul(&rrms)?;
        let g = dy.broadcast_mul(&self.weight)?;
        let mean_gx = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        (g - xhat.broadcast_mul(&mean_gx)?)?.broadcast_mul(&rrms)
    }

    /// [.., 1]
    fn rrms(&self, x: &Tensor) -> Result<Tensor> {
        (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()
    }
}
