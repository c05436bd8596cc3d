use candle_core::{Result, Tensor};

/// A frozen affine map, stored as Hugging Face stores it: `weight` [OUT, IN], `bias` [OUT].
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// x [T, IN] → y [T, OUT] = x·Wᵀ + b. Nothing needs saving: the backward reads only W.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// dy [T, OUT] → dx [T, IN] = dy·W. The weight gradient (dyᵀ·x) is never formed.
    pub fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        dy.matmul(&self.weight)
    }
}
