//! `checkpoint.safetensors`: the trainable tensors, the optimizer's state and where the loop
//! stands, so that `--resume` continues exactly where an interrupted run was.

use super::config::TrainConfig;
use crate::files::{save_tensors, tensors_from_bytes};
use crate::optim::Optimizer;
use crate::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// Where the loop stands: what a checkpoint stores besides tensors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub step: usize,
    pub epoch: usize,
    /// batches of `epoch` already done
    pub batch: usize,
    pub best: Option<f64>,
    /// the dev loss of the best evaluation, which breaks ties in accuracy
    #[serde(default)]
    pub best_loss: Option<f64>,
    pub evals_without_gain: usize,
    pub optimizer_steps: u64,
    /// stopped early: a resumed run has nothing left to do
    pub stopped: bool,
    /// the step whose parameters the adapter on disk holds (the best, or without dev the last)
    #[serde(default)]
    pub adapter_step: Option<usize>,
}

/// What a run reads, as hashes: a resumed run must read the same model and data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// the architecture, its shapes and the first rows of its token embeddings
    pub model: String,
    /// the training file's bytes
    pub train: String,
    /// the dev file's bytes, if there is one
    pub dev: Option<String>,
}

impl Fingerprint {
    /// Names what differs from `saved`, if anything.
    fn differences(&self, saved: &Fingerprint) -> Vec<&'static str> {
        let mut differ = Vec::new();
        if self.model != saved.model {
            differ.push("the model");
        }
        if self.train != saved.train {
            differ.push("the training data");
        }
        if self.dev != saved.dev {
            differ.push("the dev data");
        }
        differ
    }
}

/// FNV-1a, 64 bits, as hex: stable across builds and platforms, unlike std's hasher.
pub fn hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn save(
    path: &Path,
    config: &TrainConfig,
    fingerprint: &Fingerprint,
    params: &[(String, &Var)],
    optimizer: &Optimizer,
    progress: &Progress,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = params
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    tensors.extend(optimizer.state().0);
    let metadata = HashMap::from([
        ("config".to_string(), serde_json::to_string(config)?),
        ("progress".to_string(), serde_json::to_string(progress)?),
        (
            "fingerprint".to_string(),
            serde_json::to_string(fingerprint)?,
        ),
    ]);
    save_tensors(path, &tensors, Some(metadata))
}

/// Sets `params` (by their names, `Trainee::param_names`) and `optimizer` to those of the checkpoint whose bytes are `bytes` (read from
/// `path`: every rank of a job loads rank 0's), after checking that it was written with the same
/// `config`, model and data.
pub fn load(
    bytes: &[u8],
    path: &Path,
    config: &TrainConfig,
    fingerprint: &Fingerprint,
    params: &[(String, &Var)],
    optimizer: &mut Optimizer,
    device: &Device,
) -> Result<Progress> {
    let (tensors, metadata) = tensors_from_bytes(bytes, path, device)?;
    let field = |k: &str| {
        metadata
            .get(k)
            .with_context(|| format!("{} lacks its {k} record", path.display()))
    };
    let saved: TrainConfig = serde_json::from_str(field("config")?)?;
    if &saved != config {
        bail!(
            "--resume: the options differ from the interrupted run's; resume with the same options.\n  checkpoint: {}\n  now:        {}",
            serde_json::to_string(&saved)?,
            serde_json::to_string(config)?
        );
    }
    // checkpoints written before fingerprints were kept have none to compare
    if let Some(saved) = metadata.get("fingerprint") {
        let saved: Fingerprint = serde_json::from_str(saved)?;
        let differ = fingerprint.differences(&saved);
        if !differ.is_empty() {
            bail!(
                "--resume: {} differ from the interrupted run's; resume with the same model and data",
                differ.join(" and ")
            );
        }
    }
    let progress: Progress = serde_json::from_str(field("progress")?)?;
    for (name, var) in params {
        let t: &Tensor = tensors
            .get(name)
            .with_context(|| format!("{} has no tensor {name}", path.display()))?;
        if t.dims() != var.dims() {
            bail!(
                "{}: {name} has shape {:?}, the run's is {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    optimizer.load_state(&tensors, progress.optimizer_steps)?;
    Ok(progress)
}
