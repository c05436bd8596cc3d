use super::fused::{scaled, Pointwise};
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
        let h = scaled(&up, &gate, Pointwise::Silu).unwrap_or_else(|| gate.silu()? * &up)?;
        let y = self.down.forward(&h)?;
        Ok((y, GatedMlpSaved { gate, up }))
    }

    /// dy [T, D] → dx [T, D]. With s = σ(g): d_up = dh ⊙ g·s; d_gate = dh ⊙ up ⊙ s·(1 + g·(1 − s)).
    pub fn backward(&self, dy: &Tensor, saved: &GatedMlpSaved) -> Result<Tensor> {
        let dh = self.down.backward(dy)?;
        let g = &saved.gate;
        let dh_up = (&dh * &saved.up)?;
        let (d_up, d_gate) = match (
            scaled(&dh, g, Pointwise::Silu),
            scaled(&dh_up, g, Pointwise::SiluSlope),
        ) {
            (Some(d_up), Some(d_gate)) => (d_up?, d_gate?),
            _ => {
                let sigmoid = (g.neg()?.exp()? + 1.0)?.recip()?;
                let slope = (&sigmoid * ((g * (1.0 - &sigmoid)?)? + 1.0)?)?;
                ((&dh * (g * &sigmoid)?)?, (dh_up * slope)?)
            }
        };
        self.gate.backward(&d_gate)? + self.up.backward(&d_up)?
    }
}
