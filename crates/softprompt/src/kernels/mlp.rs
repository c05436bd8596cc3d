use super::fused::{scaled, Pointwise};
use super::Linear;
use candle_core::{Result, Tensor};

/// The SiLU-gated MLP of the Llama family: y = down(silu(gate(x)) ⊙ up(x)).
#[derive(Debug, Clone)]
pub struct GatedMlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    /// keep only the input [T, D] for the backward and recompute the two [T, F] projections there:
    /// 2F − D fewer numbers a position for two more matmuls (the low-memory mode of `--keep-quantized`)
    pub recompute: bool,
}

/// What the backward needs: the gate and up projections [T, F] each, or the input [T, D] to
/// recompute them from.
pub enum GatedMlpSaved {
    Projections { gate: Tensor, up: Tensor },
    Input(Tensor),
}

impl GatedMlp {
    /// x [T, D] → y [T, D]
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, GatedMlpSaved)> {
        let (gate, up) = self.projections(x)?;
        let h = {
            let _span = tracing::trace_span!("silu_gate.forward").entered();
            scaled(&up, &gate, Pointwise::Silu).unwrap_or_else(|| gate.silu()? * &up)?
        };
        let y = self.down.forward(&h)?;
        let saved = match self.recompute {
            true => GatedMlpSaved::Input(x.clone()),
            false => GatedMlpSaved::Projections { gate, up },
        };
        Ok((y, saved))
    }

    fn projections(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.gate.forward(x)?, self.up.forward(x)?))
    }

    /// dy [T, D] → dx [T, D]. With s = σ(g): d_up = dh ⊙ g·s; d_gate = dh ⊙ up ⊙ s·(1 + g·(1 − s)).
    pub fn backward(&self, dy: &Tensor, saved: &GatedMlpSaved) -> Result<Tensor> {
        let dh = self.down.backward(dy)?;
        // Recomputing reads the gate and up weights twice: dequantize them once for both.
        let (gate, up) = (self.gate.densified()?, self.up.densified()?);
        let recomputed;
        let (g, up_out) = match saved {
            GatedMlpSaved::Projections { gate, up } => (gate, up),
            GatedMlpSaved::Input(x) => {
                recomputed = (gate.forward(x)?, up.forward(x)?);
                (&recomputed.0, &recomputed.1)
            }
        };
        let (d_up, d_gate) = {
            let _span = tracing::trace_span!("silu_gate.backward").entered();
            let dh_up = (&dh * up_out)?;
            match (
                scaled(&dh, g, Pointwise::Silu),
                scaled(&dh_up, g, Pointwise::SiluSlope),
            ) {
                (Some(d_up), Some(d_gate)) => (d_up?, d_gate?),
                _ => {
                    let sigmoid = (g.neg()?.exp()? + 1.0)?.recip()?;
                    let slope = (&sigmoid * ((g * (1.0 - &sigmoid)?)? + 1.0)?)?;
                    ((&dh * (g * &sigmoid)?)?, (dh_up * slope)?)
                }
            }
        };
        gate.backward(&d_gate)? + up.backward(&d_up)?
    }
}
