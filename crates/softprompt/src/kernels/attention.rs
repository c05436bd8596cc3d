use super::fused::fused_for;
use super::fused_attention::{self, Heads};
use candle_core::{DType, Result, Tensor, D};

/// Far below any real score, yet finite in f32 and bf16, so masked scores never turn into NaN.
pub(super) const MASKED: f64 = -1e30;

/// Additive mask bias from a 0/1 attention mask: mask [B, S] → bias [B, 1, 1, S], 0 where attended
/// and a large negative number where not (exp underflows to exactly 0, as with transformers).
pub fn mask_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let masked = (1.0 - mask.to_dtype(dtype)?)?;
    (masked * MASKED)?.reshape((b, 1, 1, s))
}

/// The geometry of one attention call: B rows of S positions; H query heads sharing Hkv key/value
/// heads (H = Hkv without grouped-query attention), each K = (query width) / H wide.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// a position attends only to itself and earlier positions (decoders)
    pub causal: bool,
}

impl AttentionShape {
    fn resolve(&self, width: usize) -> Result<Heads> {
        if self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
            || !width.is_multiple_of(self.heads + 2 * self.kv_heads)
        {
            candle_core::bail!(
                "attention: {} query heads, {} key/value heads, width {width}",
                self.heads,
                self.kv_heads
            );
        }
        let head_dim = width / (self.heads + 2 * self.kv_heads);
        Ok(Heads {
            batch: self.batch,
            seq: self.seq,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim,
            causal: self.causal,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }
}

/// What attention's backward reads: the packed projection and the mask; the composed kernels also
/// keep the probabilities, which the fused CPU backward recomputes instead.
pub struct AttentionSaved {
    /// [T, (H + 2·Hkv)·K]
    qkv: Tensor,
    /// [B, 1, 1, S]
    bias: Tensor,
    /// [B, H, S, S] (composed kernels only)
    probs: Option<Tensor>,
    /// the rows of T [B·R] its context was read at (`attention_at_forward`)
    at: Option<Tensor>,
    /// P, the prefix positions in front of each row's S (prefix tuning): `qkv` and `bias` then
    /// hold B rows of P + S
    prefix: usize,
}

/// Softmax attention with a padding mask (and a causal one for decoders), scaled by 1/√K.
/// qkv [T, (H + 2·Hkv)·K] (packed: queries, keys, values), bias [B, 1, 1, P + S] → context [T, H·K].
/// With prefix tuning, `prefix` [B, P, 2·Hkv·K] holds P more keys and values in front of each row's
/// S (PEFT's past_key_values: keys, then values), which every position attends to where the bias
/// lets it; without, P = 0.
/// On the CPU its memory grows with S, not S², in training too: nothing [B, H, S, S] is kept.
pub fn attention_forward(
    qkv: &Tensor,
    bias: &Tensor,
    shape: AttentionShape,
    prefix: Option<&Tensor>,
) -> Result<(Tensor, AttentionSaved)> {
    let (qkv, shape, p) = match prefix {
        Some(prefix) => prepend_prefix(qkv, prefix, shape)?,
        None => (qkv.clone(), shape, 0),
    };
    let h = shape.resolve(qkv.dim(1)?)?;
    let _span = tracing::trace_span!("attention.forward", flops = h.flops()).entered();
    let (context, probs) = match qkv.dtype() {
        DType::F32 if fused_for(&qkv) => (fused_attention::forward::<f32>(&qkv, bias, h)?, None),
        DType::F64 if fused_for(&qkv) => (fused_attention::forward::<f64>(&qkv, bias, h)?, None),
        _ => {
            let (context, probs) = composed_forward(&qkv, bias, h)?;
            (context, Some(probs))
        }
    };
    let context = input_rows(&context, shape, p)?;
    let saved = AttentionSaved {
        qkv,
        bias: bias.clone(),
        probs,
        at: None,
        prefix: p,
    };
    Ok((context, saved))
}

/// qkv [B·S, W] and prefix keys and values [B, P, 2·Hkv·K] → [B·(P + S), W] with each row's P
/// prefix positions in front, and the shape of B rows of P + S. The prefix positions' queries are
/// zero: what they attend to is never read.
fn prepend_prefix(
    qkv: &Tensor,
    prefix: &Tensor,
    shape: AttentionShape,
) -> Result<(Tensor, AttentionShape, usize)> {
    let (b, p, kv) = prefix.dims3()?;
    let (s, w) = (shape.seq, qkv.dim(1)?);
    if b != shape.batch || kv > w {
        candle_core::bail!(
            "attention: a prefix of shape {:?} for {} rows of width {w}",
            prefix.dims(),
            shape.batch
        );
    }
    let queries = Tensor::zeros((b, p, w - kv), qkv.dtype(), qkv.device())?;
    let front = Tensor::cat(&[&queries, &prefix.to_dtype(qkv.dtype())?], 2)?;
    let rows = Tensor::cat(&[&front, &qkv.reshape((b, s, w))?], 1)?.reshape((b * (p + s), w))?;
    Ok((
        rows,
        AttentionShape {
            seq: p + s,
            ..shape
        },
        p,
    ))
}

/// x [B·(P + S), n] of a prefixed shape → the S input rows of each row [B·S, n].
fn input_rows(x: &Tensor, prefixed: AttentionShape, p: usize) -> Result<Tensor> {
    if p == 0 {
        return Ok(x.clone());
    }
    let (b, s) = (prefixed.batch, prefixed.seq - p);
    x.reshape((b, p + s, x.dim(1)?))?
        .narrow(1, p, s)?
        .reshape((b * s, x.dim(1)?))
}

/// `attention_forward` read at R queries in each batch row: what a block needs when the head reads
/// only those positions (the last layer under a pooled classifier: one; under the mean: the
/// positions after the prompt), so that what follows attention runs on those rows only.
/// qkv [T, (H + 2·Hkv)·K], bias [B, 1, 1, P + S], `at` [B·R] u32 (rows of T) → context [B·R, H·K].
/// Attention itself still runs for every query: the fused kernel does all S at the speed a
/// composed one does a few.
pub fn attention_at_forward(
    qkv: &Tensor,
    bias: &Tensor,
    shape: AttentionShape,
    prefix: Option<&Tensor>,
    at: &Tensor,
) -> Result<(Tensor, AttentionSaved)> {
    let (context, mut saved) = attention_forward(qkv, bias, shape, prefix)?;
    saved.at = Some(at.clone());
    Ok((context.index_select(at, 0)?, saved))
}

impl AttentionSaved {
    /// The keys and values of the input's T rows [T, 2·Hkv·K] (a prefix's left out): what a
    /// decoder's prompt rows lend every row of a batch (`Backbone::keys_values`).
    pub fn keys_values(&self, shape: AttentionShape) -> Result<Tensor> {
        let prefixed = AttentionShape {
            seq: shape.seq + self.prefix,
            ..shape
        };
        let h = prefixed.resolve(self.qkv.dim(1)?)?;
        let kv = 2 * h.kv_heads * h.head_dim;
        let keys_values = self.qkv.narrow(1, h.width() - kv, kv)?;
        input_rows(&keys_values, prefixed, self.prefix)
    }
}

/// d_context [T, H·K] → d_qkv [T, (H + 2·Hkv)·K], and with a prefix its gradient [B, P, 2·Hkv·K].
/// dP = dC·Vᵀ; dV = Pᵀ·dC; dS = P ⊙ (dP − rowsum(dP ⊙ P))·scale; dQ = dS·K; dK = dSᵀ·Q; the
/// gradients of a shared key/value head are summed over its query heads. `d_kv` [T, 2·Hkv·K] is
/// what the keys and values got from elsewhere (the rows that read a shared prompt's), added to
/// their columns of d_qkv.
pub fn attention_backward(
    dcontext: &Tensor,
    saved: &AttentionSaved,
    shape: AttentionShape,
    d_kv: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    let (qkv, bias, p) = (&saved.qkv, &saved.bias, saved.prefix);
    let shape = AttentionShape {
        seq: shape.seq + p,
        ..shape
    };
    let h = shape.resolve(qkv.dim(1)?)?;
    // read at a few queries: the others' gradient is zero, and so is the prefix positions'
    let dcontext = spread(
        dcontext.clone(),
        saved.at.as_ref(),
        shape.batch * (shape.seq - p),
    )?;
    let dcontext = &prepend_zeros(dcontext, shape, p)?;
    // the model FLOPs: four products to the forward's two (the fused kernel's recomputation of
    // the probabilities is a third more, not counted)
    let _span = tracing::trace_span!("attention.backward", flops = 2 * h.flops()).entered();
    let d_qkv = match qkv.dtype() {
        DType::F32 if fused_for(qkv) => fused_attention::backward::<f32>(dcontext, qkv, bias, h)?,
        DType::F64 if fused_for(qkv) => fused_attention::backward::<f64>(dcontext, qkv, bias, h)?,
        _ => {
            let probs = match &saved.probs {
                Some(probs) => probs.clone(),
                None => composed_forward(qkv, bias, h)?.1,
            };
            composed_backward(dcontext, qkv, &probs, h)?
        }
    };
    let (b, w, kv) = (shape.batch, qkv.dim(1)?, 2 * h.kv_heads * h.head_dim);
    let d_prefix = match p {
        0 => None,
        _ => Some(
            d_qkv
                .reshape((b, shape.seq, w))?
                .narrow(1, 0, p)?
                .narrow(2, w - kv, kv)?
                .contiguous()?,
        ),
    };
    let d_qkv = input_rows(&d_qkv, shape, p)?;
    let d_qkv = match d_kv {
        Some(d_kv) => {
            let zeros = Tensor::zeros((d_qkv.dim(0)?, w - kv), d_qkv.dtype(), d_qkv.device())?;
            (d_qkv + Tensor::cat(&[&zeros, &d_kv.to_dtype(zeros.dtype())?], 1)?)?
        }
        None => d_qkv,
    };
    Ok((d_qkv, d_prefix))
}

/// x [B·S, n] → [B·(P + S), n] with P zero rows in front of each row's S.
fn prepend_zeros(x: Tensor, prefixed: AttentionShape, p: usize) -> Result<Tensor> {
    if p == 0 {
        return Ok(x);
    }
    let (b, s, n) = (prefixed.batch, prefixed.seq - p, x.dim(1)?);
    let zeros = Tensor::zeros((b, p, n), x.dtype(), x.device())?;
    Tensor::cat(&[&zeros, &x.reshape((b, s, n))?], 1)?.reshape((b * (p + s), n))
}

/// [T, n·K] → [B, n, S, K]
fn heads_first(x: &Tensor, n: usize, h: &Heads) -> Result<Tensor> {
    x.reshape((h.batch, h.seq, n, h.head_dim))?
        .transpose(1, 2)?
        .contiguous()
}

/// [B, n, S, K] → [T, n·K]
fn rows_first(x: &Tensor, h: &Heads) -> Result<Tensor> {
    let n = x.dim(1)?;
    x.transpose(1, 2)?
        .reshape((h.batch * h.seq, n * h.head_dim))
}

/// qkv [T, W] → q [B, H, S, K], and k, v [B, H, S, K] with each key/value head repeated for its
/// query heads.
fn split_heads(qkv: &Tensor, h: &Heads) -> Result<(Tensor, Tensor, Tensor)> {
    let (hq, hk, kd) = (h.heads, h.kv_heads, h.head_dim);
    let q = heads_first(&qkv.narrow(1, 0, hq * kd)?, hq, h)?;
    let repeat = |x: Tensor| -> Result<Tensor> {
        let x = heads_first(&x, hk, h)?;
        let shape = (h.batch, hk, hq / hk, h.seq, kd);
        x.unsqueeze(2)?
            .broadcast_as(shape)?
            .reshape((h.batch, hq, h.seq, kd))
    };
    let k = repeat(qkv.narrow(1, hq * kd, hk * kd)?)?;
    let v = repeat(qkv.narrow(1, (hq + hk) * kd, hk * kd)?)?;
    Ok((q, k, v))
}

/// [S, S]: 0 on and below the diagonal, MASKED above.
fn causal_bias(h: &Heads, like: &Tensor) -> Result<Tensor> {
    let s = h.seq;
    let values: Vec<f64> = (0..s * s)
        .map(|i| if i % s > i / s { MASKED } else { 0.0 })
        .collect();
    Tensor::from_vec(values, (s, s), like.device())?.to_dtype(like.dtype())
}

/// The same attention from candle ops: the reference for the fused kernel, and the path on devices
/// the fused kernel does not serve.
fn composed_forward(qkv: &Tensor, bias: &Tensor, h: Heads) -> Result<(Tensor, Tensor)> {
    let (q, k, v) = split_heads(qkv, &h)?;
    let mut scores = (q.matmul(&k.t()?)? * h.scale)?.broadcast_add(bias)?;
    if h.causal {
        scores = scores.broadcast_add(&causal_bias(&h, &scores)?)?;
    }
    let shifted = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?;
    let e = shifted.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok((rows_first(&probs.matmul(&v)?, &h)?, probs))
}

fn composed_backward(dcontext: &Tensor, qkv: &Tensor, probs: &Tensor, h: Heads) -> Result<Tensor> {
    let (q, k, v) = split_heads(qkv, &h)?;
    let dcontext = heads_first(dcontext, h.heads, &h)?;
    let dprobs = dcontext.matmul(&v.t()?)?;
    let dv = probs.t()?.matmul(&dcontext)?;
    let row = (&dprobs * probs)?.sum_keepdim(D::Minus1)?;
    let dscores = ((dprobs.broadcast_sub(&row)? * probs)? * h.scale)?;
    let dq = dscores.matmul(&k)?;
    let dk = dscores.t()?.matmul(&q)?;
    Tensor::cat(
        &[
            rows_first(&dq, &h)?,
            kv_gradient(dk, &h)?,
            kv_gradient(dv, &h)?,
        ],
        1,
    )
}

/// [B, H, S, K] of every query head → [T, Hkv·K]: a repeated key/value head collects the
/// gradients of all its query heads.
fn kv_gradient(x: Tensor, h: &Heads) -> Result<Tensor> {
    let grouped = x
        .reshape((h.batch, h.kv_heads, h.heads / h.kv_heads, h.seq, h.head_dim))?
        .sum(2)?;
    rows_first(&grouped, h)
}

/// Attention of N new positions, the first at `start`, over a cache of every position so far.
/// q [H, N, K] (RoPE applied), keys and values [Hkv, T, K] with T = start + N → context [N, H·K].
/// Inference only (generation): no probabilities are kept, and position i sees keys 0..=start+i.
pub fn cached_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    start: usize,
) -> Result<Tensor> {
    let (heads, n, k) = q.dims3()?;
    let (kv_heads, t, _) = keys.dims3()?;
    let group = heads / kv_heads;
    // query head h reads key/value head h / group: a group's rows sit together
    let q = q.reshape((kv_heads, group * n, k))?;
    let scores = (q.matmul(&keys.t()?.contiguous()?)? / (k as f64).sqrt())?;
    let visible: Vec<f32> = (0..group * n)
        .flat_map(|row| {
            let last = start + row % n;
            (0..t).map(move |j| if j <= last { 0.0 } else { MASKED as f32 })
        })
        .collect();
    let bias = Tensor::from_vec(visible, (1, group * n, t), q.device())?.to_dtype(q.dtype())?;
    let scores = scores.broadcast_add(&bias)?;
    let exp = scores
        .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
        .exp()?;
    let probs = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?;
    probs
        .matmul(&values.contiguous()?)?
        .reshape((heads, n, k))?
        .transpose(0, 1)?
        .reshape((n, heads * k))
}

/// Heads `first..first + count` of a packed projection [N, (H + 2·Hkv)·K] → [count, N, K].
pub fn heads_of(packed: &Tensor, first: usize, count: usize, head_dim: usize) -> Result<Tensor> {
    let n = packed.dim(0)?;
    packed
        .narrow(1, first * head_dim, count * head_dim)?
        .reshape((n, count, head_dim))?
        .transpose(0, 1)?
        .contiguous()
}

/// The rows `at` [B·R] of x [T, D] → [B·R, D], or x itself when the block computes every row.
pub fn rows_read(x: &Tensor, at: Option<&Tensor>) -> Result<Tensor> {
    match at {
        Some(at) => x.index_select(at, 0),
        None => Ok(x.clone()),
    }
}

/// y [B·R, D] of the rows `at` → [T, D] with zeros in every other row (no head reads them), or y
/// itself when it already has every row.
pub fn spread(y: Tensor, at: Option<&Tensor>, rows: usize) -> Result<Tensor> {
    match at {
        Some(at) => Tensor::zeros((rows, y.dim(1)?), y.dtype(), y.device())?.index_add(at, &y, 0),
        None => Ok(y),
    }
}
