//! The frozen model's linear probe: a classification head trained on the pooled last hidden
//! states of the texts alone, with no prompt. It is the baseline a prompt is weighed against
//! (issue 18): what the frozen model already knows, read by a linear layer.
//!
//! ```text
//! texts → tokens → frozen backbone (no prompt), once → pooled [N, D] → logistic regression → head
//! ```
//! The backbone runs once over every text; training the head is then a logistic regression on
//! those vectors (AdamW on mini-batches, the best epoch on dev kept), seconds on a CPU. The trained
//! probe is a `LoadedAdapter` with an empty prompt, so eval's `Members` scores it like any adapter.

use crate::backbone::Backbone;
use crate::batch::Batching;
use crate::data::{label_ids, label_set, Example};
use crate::inference::{classify_rows, in_length_batches, LoadedAdapter};
use crate::model::Model;
use crate::optim::{Optimizer, OptimizerConfig, OptimizerKind, Schedule};
use crate::prompt::Placement;
use crate::task::classify::{argmax, cross_entropy, ClassificationHead, Pool};
use crate::tokenize::{encode_all, Encoded};
use crate::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How the probe trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeConfig {
    /// what the head reads of the last hidden state
    pub pool: Pool,
    pub lr: f64,
    pub weight_decay: f64,
    /// passes over the training vectors (cheap: the backbone does not run again)
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            pool: Pool::Mean,
            lr: 1e-2,
            weight_decay: 0.0,
            epochs: 20,
            batch_size: 32,
            seed: 0,
        }
    }
}

impl ProbeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 {
            bail!("a probe needs at least one epoch and a batch size of at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("the probe's lr must be a positive number");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!("the probe's weight_decay must be a number ≥ 0");
        }
        Ok(())
    }
}

/// A trained probe and how it got there.
pub struct Probe {
    /// no prompt and the trained head
    pub adapter: LoadedAdapter,
    /// the best dev accuracy, whose epoch's head is kept (None without dev data: the last)
    pub best_dev: Option<f64>,
    /// optimizer steps taken, over every epoch
    pub steps: usize,
}

/// The pooled last hidden state of each text, with no prompt in front: [N, D] f32, in the
/// examples' order. Errors name `source`.
pub fn pooled_features(
    model: &Model,
    examples: &[Example],
    source: &Path,
    pool: Pool,
    batching: &Batching,
) -> Result<Tensor> {
    let d = model.backbone.hidden_size();
    let device = model.backbone.word_embeddings().device();
    // A head whose weight is the identity gives back the pooled vector itself: the features
    // come through the same rows, masks and pooling as every prediction does.
    let identity = model.linear_head(
        &Tensor::eye(d, DType::F32, &device)?,
        &Tensor::zeros(d, DType::F32, &device)?,
        pool,
    )?;
    let reader = no_prompt(model, identity, Vec::new())?;
    let encoded = encode_all(&model.encoder(0, None)?, examples, None, source)?;
    let rows = in_length_batches(&encoded, batching.size, |batch| {
        let inputs: Vec<(&LoadedAdapter, &Encoded)> =
            batch.iter().map(|&i| (&reader, &encoded[i])).collect();
        classify_rows(&model.backbone, &inputs, batching.padding, &device)
    })?;
    let flat: Vec<f32> = rows.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, (encoded.len(), d), &Device::Cpu)?)
}

/// Trains a probe on `train`'s texts, keeping the epoch with the best accuracy on `dev`.
pub fn train_probe(
    model: &Model,
    train: (&[Example], &Path),
    dev: Option<(&[Example], &Path)>,
    config: &ProbeConfig,
    batching: &Batching,
) -> Result<Probe> {
    config.validate()?;
    let labels = label_set(train.0);
    if labels.len() < 2 {
        bail!(
            "{}: a probe needs at least two different labels, found {labels:?}",
            train.1.display()
        );
    }
    let vectors = |(examples, source): (&[Example], &Path)| -> Result<(Tensor, Vec<u32>)> {
        let gold = label_ids(examples, &labels, source)?;
        Ok((
            pooled_features(model, examples, source, config.pool, batching)?,
            gold,
        ))
    };
    let (x, y) = vectors(train)?;
    let dev = dev.map(vectors).transpose()?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let d = model.backbone.hidden_size();
    // trained on vectors pooled already (through the pooler, for `Pool::Pooler`): the head that
    // learns is the linear layer alone, and the kept one reads with `config.pool`
    let head = ClassificationHead::init(labels.len(), d, Pool::Mean, None, &mut rng, &Device::Cpu)?;
    let optimizer = OptimizerConfig {
        kind: OptimizerKind::Adamw,
        weight_decay: config.weight_decay,
        ..OptimizerConfig::default()
    };
    let mut optimizer = Optimizer::new(optimizer, &[&head.weight, &head.bias])?;
    let per_epoch = y.len().div_ceil(config.batch_size);
    let total = per_epoch * config.epochs;
    let mut order: Vec<usize> = (0..y.len()).collect();
    let mut best: Option<(f64, Tensor, Tensor)> = None;
    for _ in 0..config.epochs {
        order.shuffle(&mut rng);
        for rows in order.chunks(config.batch_size) {
            let ids: Vec<u32> = rows.iter().map(|&i| i as u32).collect();
            let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?;
            let gold: Vec<u32> = rows.iter().map(|&i| y[i]).collect();
            let logits = logits(&head, &x.index_select(&ids, 0)?)?;
            let loss = cross_entropy(&logits, &Tensor::new(gold.as_slice(), &Device::Cpu)?)?;
            let grads = loss.backward()?;
            let grads: Vec<Tensor> = [&head.weight, &head.bias]
                .iter()
                .map(|v| grads.get(v.as_tensor()).cloned())
                .collect::<Option<_>>()
                .context("no gradient reached the probe's head")?;
            let step = optimizer.steps() as usize;
            let lr = Schedule::Linear.lr(config.lr, step, 0, total);
            optimizer.step(&[&head.weight, &head.bias], &grads, lr)?;
        }
        if let Some((dev_x, dev_y)) = &dev {
            let score = accuracy(&logits(&head, dev_x)?, dev_y)?;
            if best.as_ref().is_none_or(|(b, ..)| score > *b) {
                best = Some((
                    score,
                    head.weight.as_tensor().copy()?,
                    head.bias.as_tensor().copy()?,
                ));
            }
        }
    }
    let (best_dev, weight, bias) = match best {
        Some((score, w, b)) => (Some(score), w, b),
        None => (
            None,
            head.weight.as_tensor().copy()?,
            head.bias.as_tensor().copy()?,
        ),
    };
    let device = model.backbone.word_embeddings().device();
    let head = model.linear_head(
        &weight.to_device(&device)?,
        &bias.to_device(&device)?,
        config.pool,
    )?;
    Ok(Probe {
        adapter: no_prompt(model, head, labels)?,
        best_dev,
        steps: optimizer.steps() as usize,
    })
}

/// pooled [N, D] → logits [N, C] (the head's linear layer alone: the vectors are pooled already)
fn logits(head: &ClassificationHead, pooled: &Tensor) -> Result<Tensor> {
    Ok(pooled
        .matmul(&head.weight.as_tensor().t()?)?
        .broadcast_add(head.bias.as_tensor())?)
}

/// The share of rows whose largest logit is their gold label's.
fn accuracy(logits: &Tensor, gold: &[u32]) -> Result<f64> {
    let rows = logits.to_vec2::<f32>()?;
    let right = rows
        .iter()
        .zip(gold)
        .filter(|(r, &g)| argmax(r) == g)
        .count();
    Ok(right as f64 / gold.len().max(1) as f64)
}

/// An adapter of no prompt vectors and `head`, read on the texts as they are.
fn no_prompt(
    model: &Model,
    head: ClassificationHead,
    labels: Vec<String>,
) -> Result<LoadedAdapter> {
    let table = model.backbone.word_embeddings();
    Ok(LoadedAdapter {
        prompt: Tensor::zeros(
            (0, model.backbone.hidden_size()),
            table.dtype(),
            &table.device(),
        )?,
        placement: Placement::Embeddings,
        head,
        labels,
        template: None,
    })
}
