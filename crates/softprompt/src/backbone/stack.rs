//! The layer stack every backbone is: blocks run in order, each returning what its backward
//! needs, and the backward runs them in reverse. One driver serves the training pass (keep every
//! block's saved tensors), inference (drop them as soon as the next block has run) and a
//! decoder's cached generation pass (new positions on top of a KV cache), so each block is
//! written once.

use super::KvCache;
use crate::kernels::{
    attention_at_forward, attention_forward, cached_attention, heads_of, AttentionSaved,
    AttentionShape, Positions,
};
use candle_core::{Result, Tensor};

/// How a block's self-attention reads the positions.
pub(crate) enum Attend<'a> {
    /// B whole rows of S positions under the padding (and causal) mask [B, 1, 1, S]: training
    /// (`keep`: each block keeps what its backward needs) and inference (nothing kept).
    Rows { bias: &'a Tensor, keep: bool },
    /// N new positions on top of every position a KV cache holds: generation.
    Cached { cache: &'a mut KvCache },
    /// One new position in each of B rows, each on top of its own KV cache: generation for many
    /// texts at once (each its own prompt and length), the weights read once for all.
    Each { caches: &'a mut [KvCache] },
}

/// One pass through the stack: its geometry, the position of every column (RoPE reads them) and
/// how attention reads the positions.
pub(crate) struct Pass<'a> {
    /// B rows of S positions (a cached pass: 1 row of the N new positions)
    pub shape: AttentionShape,
    pub positions: Positions<'a>,
    pub attend: Attend<'a>,
    /// the rows of T the head reads [B·R], R in each batch row: the last block computes only those
    /// (a rows pass; `BackboneInput::reads`)
    pub reads: Option<&'a Tensor>,
    /// prefix tuning's keys and values in front of every layer's [B, P, L·2·Hkv·K] (PEFT's
    /// layout: layer l's keys, then its values, at columns 2l·Hkv·K..)
    pub prefix: Option<&'a Tensor>,
    /// whether the block at work is the last
    last: bool,
}

impl<'a> Pass<'a> {
    pub fn new(shape: AttentionShape, positions: Positions<'a>, attend: Attend<'a>) -> Self {
        Self {
            shape,
            positions,
            attend,
            reads: None,
            prefix: None,
            last: false,
        }
    }

    /// The rows [B·R] the block at work computes, when it computes only those: x [T, D] → y [B·R, D].
    pub fn reading(&self) -> Option<&'a Tensor> {
        self.reads.filter(|_| self.last)
    }

    /// Self-attention of block `layer` on its packed projection qkv [T, (H + 2·Hkv)·K] → context
    /// [T, H·K], and what the backward needs (a rows pass only: generation has no backward).
    pub fn attend(
        &mut self,
        layer: usize,
        qkv: &Tensor,
    ) -> Result<(Tensor, Option<AttentionSaved>)> {
        let shape = self.shape;
        let reading = self.reading();
        let prefix = match self.prefix {
            Some(all) => Some(layer_prefix(all, layer, shape, qkv.dim(1)?)?),
            None => None,
        };
        match &mut self.attend {
            Attend::Rows { bias, keep } => {
                let prefix = prefix.as_ref();
                let (context, saved) = match reading {
                    Some(at) => attention_at_forward(qkv, bias, shape, prefix, at)?,
                    None => attention_forward(qkv, bias, shape, prefix)?,
                };
                Ok((context, keep.then_some(saved)))
            }
            Attend::Cached { cache } => Ok((cached_context(layer, qkv, cache, shape)?, None)),
            Attend::Each { caches } => {
                let contexts = caches
                    .iter_mut()
                    .enumerate()
                    .map(|(b, cache)| cached_context(layer, &qkv.narrow(0, b, 1)?, cache, shape))
                    .collect::<Result<Vec<_>>>()?;
                Ok((Tensor::cat(&contexts, 0)?, None))
            }
        }
    }
}

/// Layer `layer`'s attention of new positions (their packed projection qkv [N, (H + 2·Hkv)·K])
/// over `cache` and themselves → context [N, H·K]; the cache keeps their keys and values.
fn cached_context(
    layer: usize,
    qkv: &Tensor,
    cache: &mut KvCache,
    shape: AttentionShape,
) -> Result<Tensor> {
    let (h, hk) = (shape.heads, shape.kv_heads);
    let k = qkv.dim(1)? / (h + 2 * hk);
    let start = cache.len();
    let keys = heads_of(qkv, h, hk, k)?;
    let values = heads_of(qkv, h + hk, hk, k)?;
    let (keys, values) = cache.append(layer, keys, values)?;
    cached_attention(&heads_of(qkv, 0, h, k)?, &keys, &values, start)
}

/// Layer `layer`'s keys and values [B, P, 2·Hkv·K] of every layer's [B, P, L·2·Hkv·K], for a
/// packed projection `width` wide.
fn layer_prefix(all: &Tensor, layer: usize, shape: AttentionShape, width: usize) -> Result<Tensor> {
    let kv = 2 * shape.kv_heads * width / (shape.heads + 2 * shape.kv_heads);
    if all.dim(2)? < (layer + 1) * kv {
        candle_core::bail!(
            "a prefix {} wide has no keys and values for layer {layer} ({kv} a layer)",
            all.dim(2)?
        );
    }
    all.narrow(2, layer * kv, kv)
}

/// What a rows pass kept of a block's attention, for its backward.
pub(crate) fn kept(saved: &Option<AttentionSaved>) -> Result<&AttentionSaved> {
    match saved {
        Some(saved) => Ok(saved),
        None => candle_core::bail!("a cached pass keeps nothing for a backward"),
    }
}

/// One layer of a stack: x [T, D] → y [T, D], and back.
pub(crate) trait Block {
    /// What the block's backward reads.
    type Saved;
    /// x [T, D] → y [T, D] in block `layer` of `pass`.
    fn forward(&self, layer: usize, x: &Tensor, pass: &mut Pass) -> Result<(Tensor, Self::Saved)>;
    /// dy [T, D] → dx [T, D] under the rows pass's `shape` and `positions`, and with a prefix the
    /// gradient of the layer's keys and values [B, P, 2·Hkv·K]; `d_kv` [T, 2·Hkv·K] is what the
    /// layer's own keys and values got from rows that read them as a prefix (`attention_backward`).
    fn backward(
        &self,
        dy: &Tensor,
        saved: &Self::Saved,
        shape: AttentionShape,
        positions: Positions,
        d_kv: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)>;
    /// What a rows pass kept of the block's attention.
    fn attention(saved: &Self::Saved) -> &Option<AttentionSaved>;
}

/// Every layer's keys and values of a rows pass of B rows of S [B, S, L·2·Hkv·K] (`Pass::prefix`'s
/// layout).
pub(crate) fn keys_values<B: Block>(saved: &[B::Saved], shape: AttentionShape) -> Result<Tensor> {
    let layers = saved
        .iter()
        .map(|s| kept(B::attention(s))?.keys_values(shape))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&layers, 1)?.reshape((shape.batch, shape.seq, ()))
}

/// x [T, D] through every block → y [T, D], and for a pass that keeps (training) each block's
/// saved tensors for `backward` (otherwise each block's are dropped once the next has run).
pub(crate) fn forward<B: Block>(
    blocks: &[B],
    mut x: Tensor,
    pass: &mut Pass,
) -> Result<(Tensor, Vec<B::Saved>)> {
    let keep = matches!(pass.attend, Attend::Rows { keep: true, .. });
    let mut kept = Vec::with_capacity(if keep { blocks.len() } else { 0 });
    for (layer, block) in blocks.iter().enumerate() {
        let _span = tracing::trace_span!("forward", layer).entered();
        pass.last = layer + 1 == blocks.len();
        let (y, saved) = block.forward(layer, &x, pass)?;
        if keep {
            kept.push(saved);
        }
        x = y;
    }
    match &mut pass.attend {
        Attend::Cached { cache } => cache.len += x.dim(0)?,
        Attend::Each { caches } => caches.iter_mut().for_each(|cache| cache.len += 1),
        Attend::Rows { .. } => {}
    }
    Ok((x, kept))
}

/// dy [T, D] at the top of the stack → dx [T, D] at its bottom, and with a prefix its gradient
/// [B, P, L·2·Hkv·K] (`Pass::prefix`'s layout). `d_kv` [T, L·2·Hkv·K] is what every layer's keys
/// and values got from rows that read them as a prefix (`keys_values`).
pub(crate) fn backward<B: Block>(
    blocks: &[B],
    mut dy: Tensor,
    saved: &[B::Saved],
    shape: AttentionShape,
    positions: Positions,
    d_kv: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut d_prefix = Vec::new();
    let per_layer = d_kv.map(|d| d.dim(1).unwrap_or(0) / blocks.len().max(1));
    for (layer, (block, saved)) in blocks.iter().zip(saved).enumerate().rev() {
        let _span = tracing::trace_span!("backward", layer).entered();
        let d_kv = match (d_kv, per_layer) {
            (Some(d), Some(w)) => Some(d.narrow(1, layer * w, w)?),
            _ => None,
        };
        let (dx, d_layer) = block.backward(&dy, saved, shape, positions, d_kv.as_ref())?;
        d_prefix.extend(d_layer);
        dy = dx;
    }
    if d_prefix.is_empty() {
        return Ok((dy, None));
    }
    d_prefix.reverse();
    Ok((dy, Some(Tensor::cat(&d_prefix, 2)?)))
}
