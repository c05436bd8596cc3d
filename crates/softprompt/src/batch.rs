//! Encoded examples → padded batches, ordered so that each batch holds examples of similar length
//! (less padding, less work) while the order still changes every epoch.

use crate::named_choice;
use crate::tokenize::Encoded;
use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Which end of a row its padding goes on. Results do not depend on it: the backbones count
/// positions from the attention mask (`backbone::position_ids`), and the heads find the real
/// tokens through the mask. With a prompt in front, a left-padded row is [prompt, padding, text].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    #[default]
    Right,
    Left,
}
named_choice!(Padding, "right", "left");

impl Padding {
    /// One row of `width` columns: its `n` real items and `width − n` fillers, in order.
    pub fn row<T: Copy>(
        self,
        real: impl IntoIterator<Item = T>,
        n: usize,
        width: usize,
        filler: T,
    ) -> Vec<T> {
        let pad = std::iter::repeat_n(filler, width - n);
        match self {
            Padding::Right => real.into_iter().chain(pad).collect(),
            Padding::Left => pad.chain(real).collect(),
        }
    }
}

/// How examples go through the model in evaluation: rows per batch, which end of a row is
/// padded, and on which device.
#[derive(Debug, Clone)]
pub struct Batching {
    pub size: usize,
    pub padding: Padding,
    pub device: Device,
}

/// A tokenized data set: a label per example for classification (a causal LM's targets are in
/// the tokens), and for a multitask prompt each example's task.
pub struct EncodedSet {
    pub data: Vec<Encoded>,
    pub labels: Option<Vec<u32>>,
    pub tasks: Option<Vec<u32>>,
}

impl EncodedSet {
    /// The examples in `rows` (a rank's shard), with their labels.
    pub fn part(&self, rows: std::ops::Range<usize>) -> EncodedSet {
        self.rows(&rows.collect::<Vec<_>>())
    }

    /// The examples `rows`, in that order, with their labels and tasks.
    pub fn rows(&self, rows: &[usize]) -> EncodedSet {
        let pick = |v: &Vec<u32>| rows.iter().map(|&r| v[r]).collect();
        EncodedSet {
            data: rows.iter().map(|&r| self.data[r].clone()).collect(),
            labels: self.labels.as_ref().map(pick),
            tasks: self.tasks.as_ref().map(pick),
        }
    }
}

/// One batch, padded to its longest row. The soft prompt is not in it yet.
pub struct Batch {
    /// [B, N] u32
    pub ids: Tensor,
    /// [B, N] u32
    pub type_ids: Tensor,
    /// [B, N] u32: 1 for a real token, 0 for padding
    pub attention_mask: Tensor,
    /// [B] u32, when the examples are labelled
    pub labels: Option<Tensor>,
    /// [B] u32, each row's task of a multitask prompt (`with_tasks`)
    pub tasks: Option<Tensor>,
    /// each row's index in the data set
    pub rows: Vec<usize>,
    /// per row, how many of its last real tokens are a target to predict (`Encoded::target_len`)
    pub target_lens: Vec<usize>,
    /// per row, its real tokens
    pub lengths: Vec<usize>,
    pub padding: Padding,
    /// an encoder-decoder's decoder rows [B, W] u32 (`Encoded::decoder_ids`), right-padded
    /// (causal attention never reads what lies after a position), and each row's length
    pub decoder: Option<(Tensor, Vec<usize>)>,
}

impl Batch {
    pub fn new(
        data: &[Encoded],
        labels: Option<&[u32]>,
        rows: &[usize],
        padding: Padding,
        device: &Device,
    ) -> Result<Self> {
        let width = rows.iter().map(|&r| data[r].ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut type_ids = Vec::with_capacity(rows.len() * width);
        let mut mask = Vec::with_capacity(rows.len() * width);
        for &r in rows {
            let e = &data[r];
            let n = e.ids.len();
            ids.extend(padding.row(e.ids.iter().copied(), n, width, 0));
            type_ids.extend(padding.row(e.type_ids.iter().copied(), n, width, 0));
            mask.extend(padding.row(std::iter::repeat_n(1u32, n), n, width, 0));
        }
        let shape = (rows.len(), width);
        Ok(Self {
            ids: Tensor::from_vec(ids, shape, device)?,
            type_ids: Tensor::from_vec(type_ids, shape, device)?,
            attention_mask: Tensor::from_vec(mask, shape, device)?,
            labels: labels
                .map(|l| Tensor::from_iter(rows.iter().map(|&r| l[r]), device))
                .transpose()?,
            tasks: None,
            rows: rows.to_vec(),
            target_lens: rows.iter().map(|&r| data[r].target_len).collect(),
            lengths: rows.iter().map(|&r| data[r].ids.len()).collect(),
            padding,
            decoder: decoder_rows(data, rows, device)?,
        })
    }

    /// The batch with each row's task id, `tasks` holding one per example of the data set.
    pub fn with_tasks(self, tasks: Option<&[u32]>) -> Result<Self> {
        let device = self.ids.device().clone();
        let tasks = tasks
            .map(|t| Tensor::from_iter(self.rows.iter().map(|&r| t[r]), &device))
            .transpose()?;
        Ok(Self { tasks, ..self })
    }

    /// The target tokens with `prompt_len` vectors in front of every row. A target token at the
    /// very first position has nothing before it to predict it and is left out. With decoder
    /// rows, the targets are theirs (`prompt_len` then counts the prompt's rows in front of the
    /// decoder's): every token after the first, predicted at the position before, in
    /// [B, prompt_len + W].
    pub fn targets(&self, prompt_len: usize) -> Result<Targets> {
        if let Some((ids, lengths)) = &self.decoder {
            let width = prompt_len + ids.dim(1)?;
            let mut targets = Targets::default();
            for (b, row) in ids.to_vec2::<u32>()?.iter().enumerate() {
                for (i, &token) in row.iter().enumerate().take(lengths[b]).skip(1) {
                    targets
                        .positions
                        .push((b * width + prompt_len + i - 1) as u32);
                    targets.tokens.push(token);
                    targets.rows.push(b);
                }
            }
            return Ok(targets);
        }
        let ids = self.ids.to_vec2::<u32>()?;
        let width = prompt_len + ids.first().map_or(0, Vec::len);
        let mut targets = Targets::default();
        for (b, row) in ids.iter().enumerate() {
            let (n, t) = (self.lengths[b], self.target_lens[b]);
            // the column of the row's first real token
            let first = match self.padding {
                Padding::Right => 0,
                Padding::Left => row.len() - n,
            };
            for (i, &token) in row.iter().enumerate().skip(first).take(n).skip(n - t) {
                // the position before, skipping left padding back to the prompt
                let before = match i == first {
                    true => (prompt_len + i).checked_sub(1 + first),
                    false => Some(prompt_len + i - 1),
                };
                if let Some(before) = before {
                    targets.positions.push((b * width + before) as u32);
                    targets.tokens.push(token);
                    targets.rows.push(b);
                }
            }
        }
        Ok(targets)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// The decoder rows of `rows` [B, W], right-padded with 0 (T5's pad), and their lengths; None
/// when the examples have none.
fn decoder_rows(
    data: &[Encoded],
    rows: &[usize],
    device: &Device,
) -> Result<Option<(Tensor, Vec<usize>)>> {
    let lengths: Vec<usize> = rows.iter().map(|&r| data[r].decoder_ids.len()).collect();
    let width = lengths.iter().copied().max().unwrap_or(0);
    if width == 0 {
        return Ok(None);
    }
    let ids: Vec<u32> = rows
        .iter()
        .flat_map(|&r| {
            Padding::Right.row(
                data[r].decoder_ids.iter().copied(),
                data[r].decoder_ids.len(),
                width,
                0,
            )
        })
        .collect();
    Ok(Some((
        Tensor::from_vec(ids, (rows.len(), width), device)?,
        lengths,
    )))
}

/// The target tokens of a batch, in row order.
#[derive(Debug, Default, PartialEq)]
pub struct Targets {
    /// for each token, the flat index into [B, M + N] of the position that predicts it (the one before)
    pub positions: Vec<u32>,
    pub tokens: Vec<u32>,
    /// for each token, its row in the batch
    pub rows: Vec<usize>,
}

/// How many batches make one pool whose rows are sorted by length before being cut into batches.
const BUCKET_POOL: usize = 50;

/// The batches of one training epoch: a shuffle that depends only on (seed, epoch), so a resumed
/// run sees the same batches; then pools of 50 batches sorted by length; then the batches shuffled.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(epoch as u64),
    );
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mut batches = Vec::new();
    for pool in order.chunks_mut(batch_size * BUCKET_POOL) {
        pool.sort_by_key(|&i| lengths[i]);
        batches.extend(pool.chunks(batch_size).map(|c| c.to_vec()));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Evaluation batches: sorted by length, no shuffle (results are put back in file order by `rows`).
pub fn eval_batches(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    order.chunks(batch_size).map(|c| c.to_vec()).collect()
}
