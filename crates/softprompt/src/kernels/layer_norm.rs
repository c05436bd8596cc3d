use candle_core::{Result, Tensor, D};

/// LayerNorm over the last dimension: y = (x − mean)·rstd·γ + β.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

/// What the backward needs: the normalised input and the reciprocal standard deviation.
pub struct LayerNormSaved {
    /// [.., D]
    xhat: Tensor,
    /// [.., 1]
    rstd: Tensor,
}

impl LayerNorm {
    /// x [.., D] → y [.., D]
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, LayerNormSaved)> {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let xhat = centred.broadcast_mul(&rstd)?;
        let y = xhat
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?;
        Ok((y, LayerNormSaved { xhat, rstd }))
    }

    /// dy [.., D] → dx [.., D] = rstd · (g − mean(g) − x̂ · mean(g·x̂)), with g = dy·γ.
    pub fn backward(&self, dy: &Tensor, saved: &LayerNormSaved) -> Result<Tensor> {
        let g = dy.broadcast_mul(&self.weight)?;
        let mean_g = g.mean_keepdim(D::Minus1)?;
        let mean_gx = (&g * &saved.xhat)?.mean_keepdim(D::Minus1)?;
        let inner = g
            .broadcast_sub(&mean_g)?
            .sub(&saved.xhat.broadcast_mul(&mean_gx)?)?;
        inner.broadcast_mul(&saved.rstd)
    }
}
