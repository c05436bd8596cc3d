//! `metrics.jsonl`: one line per training step and one per evaluation, as typed records.

use crate::files::write_atomic;
use crate::Result;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::Path;

pub const METRICS: &str = "metrics.jsonl";

/// One training step. (Fields in name order, as the lines have always been written.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub epoch: usize,
    pub examples_per_s: f64,
    /// the gradients' joint norm before clipping
    pub grad_norm: f64,
    pub loss: f64,
    pub lr: f64,
    pub step: usize,
}

/// One evaluation on the dev set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// accuracy, or a causal LM's exact match
    pub dev_accuracy: f64,
    pub dev_loss: f64,
    pub dev_macro_f1: Option<f64>,
    pub step: usize,
}

/// A line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    Step(StepRecord),
    Eval(EvalRecord),
}

impl Record {
    pub fn step(&self) -> usize {
        match self {
            Record::Step(r) => r.step,
            Record::Eval(r) => r.step,
        }
    }
}

/// The log of one run, appended to as it goes.
pub struct MetricsLog {
    /// none on the ranks of a job that are not rank 0, which alone writes the run's files
    file: Option<File>,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl` for appending after the lines of steps up to `step` (the step a
    /// run resumes at; 0 for a new run): later lines, from a run killed after its checkpoint, are
    /// dropped, so that the log reads as one run.
    pub fn open(dir: &Path, step: usize) -> Result<Self> {
        let path = dir.join(METRICS);
        truncate(&path, step)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self { file: Some(file) })
    }

    /// A log that writes nothing.
    pub fn discarding() -> Self {
        Self { file: None }
    }

    pub fn write(&mut self, record: &Record) -> Result<()> {
        if let Some(file) = &mut self.file {
            writeln!(file, "{}", serde_json::to_string(record)?)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        match &mut self.file {
            Some(file) => Ok(file.flush()?),
            None => Ok(()),
        }
    }
}

/// Every record of a run's `metrics.jsonl`, in order.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)?;
    text.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

fn truncate(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<Record>(l).is_ok_and(|r| r.step() <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}
