use super::fused::{fused_for, LayerNormBackward, LayerNormForward};
use candle_core::{Result, Tensor, D};

/// LayerNorm over the last dimension: y = (x − mean)·rstd·γ + β.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

/// What the backward needs: the input itself (the row statistics are cheaper to recompute than to
/// keep).
pub struct LayerNormSaved {
    /// [.., D]
    input: Tensor,
}

impl LayerNorm {
    /// x [.., D] → y [.., D]
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, LayerNormSaved)> {
        let _span = tracing::trace_span!("layer_norm.forward").entered();
        let x = x.contiguous()?;
        let y = if fused_for(&x) {
            x.apply_op3_no_bwd(
                &self.weight,
                &self.bias,
                &LayerNormForward { eps: self.eps },
            )?
        } else {
            let (xhat, _) = self.normalise(&x)?;
            xhat.broadcast_mul(&self.weight)?
                .broadcast_add(&self.bias)?
        };
        Ok((y, LayerNormSaved { input: x }))
    }

    /// dy [.., D] → dx [.., D] = rstd · (g − mean(g) − x̂ · mean(g·x̂)), with g = dy·γ.
    pub fn backward(&self, dy: &Tensor, saved: &LayerNormSaved) -> Result<Tensor> {
        let _span = tracing::trace_span!("layer_norm.backward").entered();
        let dy = dy.contiguous()?;
        if fused_for(&dy) {
            return dy.apply_op3_no_bwd(
                &saved.input,
                &self.weight,
                &LayerNormBackward { eps: self.eps },
            );
        }
        let (xhat, rstd) = self.normalise(&saved.input)?;
        let g = dy.broadcast_mul(&self.weight)?;
        let mean_g = g.mean_keepdim(D::Minus1)?;
        let mean_gx = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        let inner = g
            .broadcast_sub(&mean_g)?
            .sub(&xhat.broadcast_mul(&mean_gx)?)?;
        inner.broadcast_mul(&rstd)
    }

    /// x → (x̂ [.., D], rstd [.., 1]), from candle ops.
    fn normalise(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        Ok((centred.broadcast_mul(&rstd)?, rstd))
    }
}
