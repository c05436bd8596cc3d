use super::Linear;
use candle_core::{Result, Tensor};

/// The SiLU-gated MLP of the Llama family: y = down(silu(gate(x)) ⊙ up(x)).
#[derive(Debug, Clone)]
pub struct GatedMlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// What the backward needs: the gate and up projections, [T, F] each.
pub struct GatedMlpSaved {
    gate: Tensor,
    up: Tensor,
}

impl GatedMlp {
    /// x [T, D] → y [T, D]
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, GatedMlpSaved)> {
        let (gate, up) = (self.gate.forward(x)?, self.up.forward(x)?);
        let y = self.down.forward(&(gate.silu()? * &up)?)?;
        Ok((y, GatedMlpSaved { gate, up }))
    }

    /// dy [T, D] → dx [T, D]. With s = σ(g): d_up = dh ⊙ g·s; d_gate = dh ⊙ up ⊙ s·(1 + g·(1 − s)).
    pub fn backward(&self, dy: &Tensor, saved: &GatedMlpSaved) -> Result<Tensor> {
        let dh = self.down.backward(dy)?;
        let g = &saved.gate;
        let sigmoid = (g.neg()?.exp()? + 1.0)?.recip()?;
        let d_up = (&dh * (g * &sigmoid)?)?;
        let slope = (&sigmoid * ((g * (1.0 - &sigmoid)?)? + 1.0)?)?;
        let d_gate = ((&dh * &saved.up)? * slope)?;
        self.gate.backward(&d_gate)? + self.up.backward(&d_up)?
    }
}
