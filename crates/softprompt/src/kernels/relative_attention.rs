//! T5's attention (Raffel et al. 2020): no 1/√K scaling, and an additive bias per head, the
//! relative position bias of bucketed query–key distances plus the padding (and causal) mask.
//! Queries and keys may differ in length: the decoder's cross-attention reads the encoder.
//!
//! Shape letters: B batch, H heads, Q query positions, S key positions, K head width, N buckets.

use super::attention::MASKED;
use candle_core::{Result, Tensor, D};

/// T5's bucket of a key at `key - query` positions from its query (`_relative_position_bucket`
/// in transformers): half the buckets for each direction when bidirectional (the encoder), else
/// only keys before the query count (the decoder); the first half of a direction's buckets are
/// exact distances, the rest logarithmically wider up to `max_distance`, where they saturate.
pub fn relative_position_bucket(
    relative: i64,
    bidirectional: bool,
    buckets: usize,
    max_distance: usize,
) -> u32 {
    let (mut n, mut bucket) = (buckets as i64, 0i64);
    let distance = if bidirectional {
        n /= 2;
        bucket += if relative > 0 { n } else { 0 };
        relative.abs()
    } else {
        (-relative).max(0)
    };
    let exact = n / 2;
    if distance < exact {
        return (bucket + distance) as u32;
    }
    // in f32, as transformers computes it, so that the bucket edges agree
    let log_ratio =
        (distance as f32 / exact as f32).ln() / (max_distance as f64 / exact as f64).ln() as f32;
    let large = exact + (log_ratio * (n - exact) as f32) as i64;
    (bucket + large.min(n - 1)) as u32
}

/// The relative position bias [1, H, Q, S] of queries at positions `first_query..first_query + Q`
/// over keys at 0..S: the rows of `table` [N, H] (`relative_attention_bias.weight`) their
/// buckets pick.
pub fn position_bias(
    table: &Tensor,
    first_query: usize,
    queries: usize,
    keys: usize,
    bidirectional: bool,
    max_distance: usize,
) -> Result<Tensor> {
    let (buckets, heads) = table.dims2()?;
    let ids: Vec<u32> = (0..queries)
        .flat_map(|q| {
            let q = (first_query + q) as i64;
            (0..keys as i64)
                .map(move |k| relative_position_bucket(k - q, bidirectional, buckets, max_distance))
        })
        .collect();
    let ids = Tensor::from_vec(ids, queries * keys, table.device())?;
    table
        .index_select(&ids, 0)?
        .reshape((queries, keys, heads))?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()
}

/// [Q, S]: 0 where key s ≤ query q + `offset`, MASKED after (a decoder's causal mask, its queries
/// starting `offset` positions in).
pub fn causal_mask(queries: usize, keys: usize, offset: usize, like: &Tensor) -> Result<Tensor> {
    let values: Vec<f64> = (0..queries * keys)
        .map(|i| {
            if i % keys > i / keys + offset {
                MASKED
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(values, (queries, keys), like.device())?.to_dtype(like.dtype())
}

/// What the backward reads.
pub struct BiasedAttentionSaved {
    /// [B, H, Q, K]
    q: Tensor,
    /// [B, H, S, K]
    k: Tensor,
    /// [B, H, S, K]
    v: Tensor,
    /// [B, H, Q, S]
    probs: Tensor,
}

/// Softmax attention without scaling: q [B, H, Q, K], k and v [B, H, S, K], bias broadcastable
/// to [B, H, Q, S] → context [B, H, Q, K] = softmax(q·kᵀ + bias)·v.
pub fn biased_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
) -> Result<(Tensor, BiasedAttentionSaved)> {
    let _span = tracing::trace_span!("relative_attention.forward").entered();
    let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
    let e = scores
        .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
        .exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let context = probs.matmul(v)?;
    let saved = BiasedAttentionSaved {
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        probs,
    };
    Ok((context, saved))
}

/// d_context [B, H, Q, K] → (dq [B, H, Q, K], dk, dv [B, H, S, K]). With P the probabilities:
/// dP = dC·vᵀ; dv = Pᵀ·dC; dS = P ⊙ (dP − rowsum(dP ⊙ P)); dq = dS·k; dk = dSᵀ·q.
pub fn biased_attention_backward(
    dcontext: &Tensor,
    saved: &BiasedAttentionSaved,
) -> Result<(Tensor, Tensor, Tensor)> {
    let _span = tracing::trace_span!("relative_attention.backward").entered();
    let probs = &saved.probs;
    let dprobs = dcontext.matmul(&saved.v.t()?)?;
    let dv = probs.t()?.matmul(dcontext)?;
    let row = (&dprobs * probs)?.sum_keepdim(D::Minus1)?;
    let dscores = (dprobs.broadcast_sub(&row)? * probs)?;
    let dq = dscores.matmul(&saved.k)?;
    let dk = dscores.t()?.matmul(&saved.q)?;
    Ok((dq, dk, dv))
}
