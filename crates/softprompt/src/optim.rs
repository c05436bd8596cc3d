//! Optimizers for the few trainable tensors (prompt and head), and learning-rate schedules.
//! Their state is plain named tensors so a checkpoint can store it and a resumed run continue exactly.

use crate::named_choice;
use crate::{bail, Context};
use candle_core::{Result, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam with decoupled weight decay (Loshchilov & Hutter).
    Adamw,
    /// Adafactor (Shazeer & Stern 2018) as the paper ran it: factored second moments, no momentum,
    /// update clipping at RMS 1, an absolute (not relative) learning rate.
    Adafactor,
}
named_choice!(OptimizerKind, "adamw", "adafactor");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Linear warm-up from 0, then linear decay to 0 at the last step.
    Linear,
}
named_choice!(Schedule, "constant", "linear");

impl Schedule {
    /// The learning rate at `step` (0-based) of `total`.
    pub fn lr(self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        let warm = if step < warmup {
            (step + 1) as f64 / warmup as f64
        } else {
            1.0
        };
        match self {
            Schedule::Constant => base * warm,
            Schedule::Linear if step < warmup => base * warm,
            Schedule::Linear => {
                base * (total.saturating_sub(step) as f64 / (total - warmup).max(1) as f64)
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adamw,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl OptimizerKind {
    /// The learning rate used when none is given.
    pub fn default_lr(self) -> f64 {
        match self {
            OptimizerKind::Adamw => 1e-2,
            OptimizerKind::Adafactor => 0.3,
        }
    }
}

pub struct Optimizer {
    config: OptimizerConfig,
    steps: u64,
    /// per parameter: AdamW's first and second moments, or Adafactor's row and column second-moment
    /// averages (a 1-D parameter keeps its full second moment in the first slot).
    moments: Vec<(Tensor, Tensor)>,
}

/// Adafactor's constants, as in the paper's T5X setup: ε₁ = 1e-30, decay exponent 0.8, clip 1.0.
const ADAFACTOR_EPS: f64 = 1e-30;
const ADAFACTOR_DECAY: f64 = 0.8;
const ADAFACTOR_CLIP: f64 = 1.0;

impl Optimizer {
    pub fn new(config: OptimizerConfig, params: &[&Var]) -> Result<Self> {
        let moments = params
            .iter()
            .map(|p| {
                let p = p.as_tensor();
                match (config.kind, p.rank()) {
                    (OptimizerKind::Adafactor, 2) => {
                        let (r, c) = p.dims2()?;
                        Ok((
                            Tensor::zeros(r, p.dtype(), p.device())?,
                            Tensor::zeros(c, p.dtype(), p.device())?,
                        ))
                    }
                    _ => Ok((p.zeros_like()?, p.zeros_like()?)),
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            steps: 0,
            moments,
        })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update of every parameter with its gradient, at learning rate `lr`.
    pub fn step(&mut self, params: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as f64;
        let c = self.config.clone();
        for ((param, grad), (m1, m2)) in params.iter().zip(grads).zip(self.moments.iter_mut()) {
            let p = param.as_tensor();
            let update = match c.kind {
                OptimizerKind::Adamw => {
                    *m1 = ((&*m1 * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
                    *m2 = ((&*m2 * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
                    let m_hat = (&*m1 / (1.0 - c.beta1.powf(t)))?;
                    let v_hat = (&*m2 / (1.0 - c.beta2.powf(t)))?;
                    (m_hat / (v_hat.sqrt()? + c.eps)?)?
                }
                OptimizerKind::Adafactor => {
                    let decay = 1.0 - t.powf(-ADAFACTOR_DECAY);
                    let g2 = (grad.sqr()? + ADAFACTOR_EPS)?;
                    let u = if p.rank() == 2 {
                        *m1 = ((&*m1 * decay)? + (g2.mean(D::Minus1)? * (1.0 - decay))?)?;
                        *m2 = ((&*m2 * decay)? + (g2.mean(0)? * (1.0 - decay))?)?;
                        // v ≈ r·cᵀ / mean(r): the rank-1 estimate of the second moment
                        let row = m1
                            .broadcast_div(&m1.mean_all()?)?
                            .sqrt()?
                            .recip()?
                            .unsqueeze(1)?;
                        let col = m2.sqrt()?.recip()?.unsqueeze(0)?;
                        grad.broadcast_mul(&row)?.broadcast_mul(&col)?
                    } else {
                        *m1 = ((&*m1 * decay)? + (g2 * (1.0 - decay))?)?;
                        (grad / m1.sqrt()?)?
                    };
                    let rms = u.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()? as f64;
                    (u / (rms / ADAFACTOR_CLIP).max(1.0))?
                }
            };
            let decayed = if c.weight_decay > 0.0 {
                (p * (1.0 - lr * c.weight_decay))?
            } else {
                p.clone()
            };
            param.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The state as named tensors (`optim.{i}.m1`, `optim.{i}.m2`) and the step count.
    pub fn state(&self) -> (Vec<(String, Tensor)>, u64) {
        let tensors = self
            .moments
            .iter()
            .enumerate()
            .flat_map(|(i, (a, b))| {
                [
                    (format!("optim.{i}.m1"), a.clone()),
                    (format!("optim.{i}.m2"), b.clone()),
                ]
            })
            .collect();
        (tensors, self.steps)
    }

    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps: u64,
    ) -> crate::Result<()> {
        for (i, (a, b)) in self.moments.iter_mut().enumerate() {
            for (slot, name) in [(a, format!("optim.{i}.m1")), (b, format!("optim.{i}.m2"))] {
                let t = tensors
                    .get(&name)
                    .with_context(|| format!("the checkpoint has no {name}"))?;
                if t.dims() != slot.dims() {
                    bail!(
                        "checkpoint tensor {name} has shape {:?}, expected {:?}",
                        t.dims(),
                        slot.dims()
                    );
                }
                *slot = t.to_device(slot.device())?.to_dtype(slot.dtype())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Scales the gradients so that their joint L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if norm > max_norm && norm > 0.0 {
        let scale = max_norm / norm;
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Both optimizers must bring a quadratic bowl's minimum closer.
    #[test]
    fn optimizers_descend_a_quadratic() {
        for kind in [OptimizerKind::Adamw, OptimizerKind::Adafactor] {
            let target = Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap();
            let p = Var::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
            let mut opt = Optimizer::new(
                OptimizerConfig {
                    kind,
                    ..Default::default()
                },
                &[&p],
            )
            .unwrap();
            let dist = |p: &Var| {
                (p.as_tensor() - &target)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            let before = dist(&p);
            for _ in 0..200 {
                let grad = ((p.as_tensor() - &target).unwrap() * 2.0).unwrap();
                opt.step(
                    &[&p],
                    &[grad],
                    if kind == OptimizerKind::Adamw {
                        0.05
                    } else {
                        0.02
                    },
                )
                .unwrap();
            }
            assert!(
                dist(&p) < before * 0.01,
                "{kind}: {} → {}",
                before,
                dist(&p)
            );
        }
    }

    #[test]
    fn linear_schedule_warms_up_then_decays_to_zero() {
        let lr = |s| Schedule::Linear.lr(1.0, s, 10, 110);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!(lr(109) > 0.0 && lr(109) < 0.02);
        assert_eq!(Schedule::Constant.lr(0.3, 500, 0, 10), 0.3);
    }

    #[test]
    fn clipping_bounds_the_joint_norm() {
        let mut g = vec![
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        ];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let after = g[0].to_vec1::<f32>().unwrap()[0].hypot(g[1].to_vec1::<f32>().unwrap()[0]);
        assert!((after - 1.0).abs() < 1e-6);
    }
}
