//! Attention on the CPU, one (batch, key/value head) group per rayon task, reading q, k and v
//! straight out of the packed projection [B·S, (H + 2·Hkv)·K] and writing the context straight into
//! [B·S, H·K] through gemm's strides: no permute copies, and the small per-head matmuls run
//! single-threaded side by side instead of each one splitting across threads. A group owns its
//! key/value head, so the gradients of keys and values shared by several query heads (grouped-query
//! attention) accumulate inside one task.

use super::fast_math::{lanes, lanes_sum};
use super::fused::{self, cpu_slice, Real};
use candle_core::{Result, Tensor};
use gemm::Parallelism;
use multiversion::multiversion;
use num_traits::Float;
use rayon::prelude::*;

/// A raw pointer that rayon tasks may share: each task writes a disjoint block through it.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// Through a method, so that closures capture the whole (Sync) wrapper, not its raw field.
    fn ptr(&self) -> *mut T {
        self.0
    }
}

/// `fused::matmul` on the calling thread: attention's tasks are already one a core.
///
/// # Safety
/// As `fused::matmul`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul<T: Real>(
    shape: (usize, usize, usize),
    c: *mut T,
    c_rs: usize,
    accumulate: bool,
    a: *const T,
    a_strides: (usize, usize),
    b: *const T,
    b_strides: (usize, usize),
) {
    fused::matmul(
        shape,
        c,
        c_rs,
        accumulate,
        a,
        a_strides,
        b,
        b_strides,
        Parallelism::None,
    )
}

/// The geometry of one attention call, resolved.
#[derive(Clone, Copy)]
pub(super) struct Heads {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f64,
}

impl Heads {
    /// The forward's model FLOPs: Q·Kᵀ and P·V, 2·S²·K each per row and query head (the causal
    /// mask's zeros counted, as the reference counts them).
    pub fn flops(&self) -> u64 {
        (4 * self.batch * self.heads * self.seq * self.seq * self.head_dim) as u64
    }

    /// Columns of the packed projection: queries, then keys, then values.
    pub(super) fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn q_col(&self, head: usize) -> usize {
        head * self.head_dim
    }
    fn k_col(&self, kv: usize) -> usize {
        (self.heads + kv) * self.head_dim
    }
    fn v_col(&self, kv: usize) -> usize {
        (self.heads + self.kv_heads + kv) * self.head_dim
    }
}

/// scores [R, S] of the queries `first..first + R` (raw q·kᵀ) → probabilities, in place: scale,
/// padding bias, causal mask, softmax. Compiled for the CPU's widest vectors (`fast_math`).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn softmax_rows<T: Real>(p: &mut [T], first: usize, bias: &[T], h: &Heads) {
    let s = h.seq;
    let scale = T::lit(h.scale);
    for (i, row) in p.chunks_mut(s).enumerate() {
        let visible = if h.causal { first + i + 1 } else { s };
        let (row, hidden) = row.split_at_mut(visible);
        for (x, &m) in row.iter_mut().zip(bias) {
            *x = *x * scale + m;
        }
        let max = lanes(row, T::neg_infinity(), Float::max);
        for x in row.iter_mut() {
            *x = (*x - max).exp_fast();
        }
        let inv = T::one() / lanes(row, T::zero(), |a, b| a + b);
        row.iter_mut().for_each(|x| *x *= inv);
        hidden.iter_mut().for_each(|x| *x = T::zero());
    }
}

/// dP [R, S] → dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale, in place: the softmax's backward (and the
/// scale's), likewise compiled wide.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn softmax_backward_rows<T: Real>(ds: &mut [T], p: &[T], s: usize, scale: T) {
    for (drow, prow) in ds.chunks_mut(s).zip(p.chunks(s)) {
        let dot = lanes_sum(drow, prow, |x, y| x * y);
        for (x, &y) in drow.iter_mut().zip(prow) {
            *x = y * (*x - dot) * scale;
        }
    }
}

/// The probabilities [R, S] of the queries `first..first + R` of row `b`, query head `head`, into
/// `p`: the one place they are computed, so that the backward's recomputation equals the forward.
fn probabilities<T: Real>(
    qkv: &[T],
    bias: &[T],
    h: &Heads,
    (b, head): (usize, usize),
    first: usize,
    p: &mut [T],
) {
    let (s, kd, w) = (h.seq, h.head_dim, h.width());
    let rows = p.len() / s;
    let row0 = b * s * w;
    let (q, k) = (
        &qkv[row0 + first * w + h.q_col(head)..],
        &qkv[row0 + h.k_col(head / h.group())..],
    );
    // SAFETY: q [R, K] and k [S, K] lie within qkv [B·S, W]; p holds [R, S]
    unsafe {
        matmul::<T>(
            (rows, s, kd),
            p.as_mut_ptr(),
            s,
            false,
            q.as_ptr(),
            (w, 1),
            k.as_ptr(),
            (1, w),
        );
    }
    softmax_rows(p, first, &bias[b * s..(b + 1) * s], h);
}

/// Queries per task: a task's scores are [QUERY_BLOCK, S], in a scratch its thread reuses, so
/// attention on S positions needs O(S) memory per thread, forward and backward, and the
/// probabilities [B, H, S, S] are never held (the backward recomputes them, block by block).
const QUERY_BLOCK: usize = 64;

/// The query blocks of S positions: (first query, queries).
fn query_blocks(s: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..s)
        .step_by(QUERY_BLOCK)
        .map(move |first| (first, QUERY_BLOCK.min(s - first)))
}

/// qkv [B·S, W], bias [B, 1, 1, S] read as [B, S] (0 or a large negative) → context [B·S, H·K].
/// Each task is QUERY_BLOCK queries of one (row, head) pair.
pub(super) fn forward<T: Real>(qkv: &Tensor, bias: &Tensor, h: Heads) -> Result<Tensor> {
    let (qkv, bias) = (qkv.contiguous()?, bias.contiguous()?);
    let ((qkv_s, qkv_l), (bias_s, bias_l)) = (qkv.storage_and_layout(), bias.storage_and_layout());
    let (qkv_v, bias_v) = (
        cpu_slice::<T>(&qkv_s, qkv_l)?,
        cpu_slice::<T>(&bias_s, bias_l)?,
    );
    let (s, kd, w, d) = (h.seq, h.head_dim, h.width(), h.heads * h.head_dim);
    let mut context = vec![T::zero(); h.batch * s * d];
    let out = Shared(context.as_mut_ptr());
    let blocks: Vec<(usize, usize)> = query_blocks(s).collect();
    (0..h.batch * h.heads * blocks.len())
        .into_par_iter()
        .for_each_init(
            || vec![T::zero(); QUERY_BLOCK * s],
            |scratch, task| {
                let (pair, (first, rows)) = (task / blocks.len(), blocks[task % blocks.len()]);
                let (b, head) = (pair / h.heads, pair % h.heads);
                let p = &mut scratch[..rows * s];
                probabilities(qkv_v, bias_v, &h, (b, head), first, p);
                let v = &qkv_v[b * s * w + h.v_col(head / h.group())..];
                // SAFETY: this task alone writes rows first..first + R of the head's columns
                unsafe {
                    matmul::<T>(
                        (rows, kd, s),
                        out.ptr().add((b * s + first) * d + head * kd),
                        d,
                        false,
                        p.as_ptr(),
                        (s, 1),
                        v.as_ptr(),
                        (w, 1),
                    );
                }
            },
        );
    Tensor::from_vec(context, (h.batch * s, d), qkv.device())
}

/// d_context [B·S, H·K], qkv [B·S, W], bias [B, 1, 1, S] → d_qkv [B·S, W]. Each task is one
/// (row, key/value head) group: for each of its query heads and each block of queries, the
/// probabilities P again, dP = dC·Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale, then dQ = dS·K for
/// the block and dK += dSᵀ·Q, dV += Pᵀ·dC.
pub(super) fn backward<T: Real>(
    dcontext: &Tensor,
    qkv: &Tensor,
    bias: &Tensor,
    h: Heads,
) -> Result<Tensor> {
    let (dcontext, qkv, bias) = (
        dcontext.contiguous()?,
        qkv.contiguous()?,
        bias.contiguous()?,
    );
    let ((dc_s, dc_l), (qkv_s, qkv_l), (bias_s, bias_l)) = (
        dcontext.storage_and_layout(),
        qkv.storage_and_layout(),
        bias.storage_and_layout(),
    );
    let dc_v = cpu_slice::<T>(&dc_s, dc_l)?;
    let (qkv_v, bias_v) = (
        cpu_slice::<T>(&qkv_s, qkv_l)?,
        cpu_slice::<T>(&bias_s, bias_l)?,
    );
    let (s, kd, w, d) = (h.seq, h.head_dim, h.width(), h.heads * h.head_dim);
    let mut dqkv = vec![T::zero(); h.batch * s * w];
    let out = Shared(dqkv.as_mut_ptr());
    let scale = T::lit(h.scale);
    (0..h.batch * h.kv_heads).into_par_iter().for_each_init(
        || {
            (
                vec![T::zero(); QUERY_BLOCK * s],
                vec![T::zero(); QUERY_BLOCK * s],
            )
        },
        |(p_scratch, ds_scratch), task| {
            let (b, kv) = (task / h.kv_heads, task % h.kv_heads);
            let row0 = b * s * w;
            let (k, v) = (&qkv_v[row0 + h.k_col(kv)..], &qkv_v[row0 + h.v_col(kv)..]);
            let base = out.ptr().wrapping_add(row0);
            for (n, head) in (kv * h.group()..(kv + 1) * h.group()).enumerate() {
                for (first, rows) in query_blocks(s) {
                    let (p, ds) = (&mut p_scratch[..rows * s], &mut ds_scratch[..rows * s]);
                    probabilities(qkv_v, bias_v, &h, (b, head), first, p);
                    let q = &qkv_v[row0 + first * w + h.q_col(head)..];
                    let dc = &dc_v[(b * s + first) * d + head * kd..];
                    // the first block of the first query head writes dK and dV, the others add
                    let accumulate = n > 0 || first > 0;
                    // SAFETY: reads stay within the inputs; this task alone writes the rows of
                    // batch b in the columns of its query heads and of its key/value head.
                    unsafe {
                        matmul::<T>(
                            (rows, s, kd),
                            ds.as_mut_ptr(),
                            s,
                            false,
                            dc.as_ptr(),
                            (d, 1),
                            v.as_ptr(),
                            (1, w),
                        );
                        softmax_backward_rows(ds, p, s, scale);
                        matmul::<T>(
                            (rows, kd, s),
                            base.add(first * w + h.q_col(head)),
                            w,
                            false,
                            ds.as_ptr(),
                            (s, 1),
                            k.as_ptr(),
                            (w, 1),
                        );
                        matmul::<T>(
                            (s, kd, rows),
                            base.add(h.k_col(kv)),
                            w,
                            accumulate,
                            ds.as_ptr(),
                            (1, s),
                            q.as_ptr(),
                            (w, 1),
                        );
                        matmul::<T>(
                            (s, kd, rows),
                            base.add(h.v_col(kv)),
                            w,
                            accumulate,
                            p.as_ptr(),
                            (1, s),
                            dc.as_ptr(),
                            (d, 1),
                        );
                    }
                }
            }
        },
    );
    Tensor::from_vec(dqkv, (h.batch * s, w), dcontext.device())
}
