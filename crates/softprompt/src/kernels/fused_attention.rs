//! Attention on the CPU, one (batch, head) pair per rayon task, reading q, k and v straight out of
//! the fused QKV projection [B·S, 3D] and writing the context straight into [B·S, D] through gemm's
//! strides: no permute copies, and small per-head matmuls run single-threaded side by side instead
//! of each one splitting across threads.

use super::fused::{cpu_slice, Real};
use candle_core::{Result, Tensor};
use gemm::{gemm, Parallelism};
use num_traits::Float;
use rayon::prelude::*;

/// A raw pointer that rayon tasks may share: each task writes a disjoint block through it.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// C[m×n] = A[m×k]·B[k×n], every operand given by its pointer and (row, column) strides.
///
/// # Safety
/// The pointers and strides must describe memory valid for those shapes; `c` must not alias a or b.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    c: *mut T,
    c_rs: usize,
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
) {
    gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs as isize,
        false,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        T::zero(),
        T::one(),
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// The shape of one attention call.
#[derive(Clone, Copy)]
pub(super) struct Heads {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f64,
}

impl Heads {
    fn d(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// qkv [B·S, 3D], bias [B, S] (0 or a large negative) → (context [B·S, D], probabilities [B, H, S, S])
pub(super) fn forward<T: Real>(qkv: &Tensor, bias: &Tensor, h: Heads) -> Result<(Tensor, Tensor)> {
    let (qkv, bias) = (qkv.contiguous()?, bias.contiguous()?);
    let ((qkv_s, qkv_l), (bias_s, bias_l)) = (qkv.storage_and_layout(), bias.storage_and_layout());
    let (qkv_v, bias_v) = (
        cpu_slice::<T>(&qkv_s, qkv_l)?,
        cpu_slice::<T>(&bias_s, bias_l)?,
    );
    let (s, kd, d) = (h.seq, h.head_dim, h.d());
    let mut probs = vec![T::zero(); h.batch * h.heads * s * s];
    let mut context = vec![T::zero(); h.batch * s * d];
    let ctx = Shared(context.as_mut_ptr());
    let scale = T::lit(h.scale);
    probs
        .par_chunks_mut(s * s)
        .enumerate()
        .for_each(|(pair, p)| {
            let (b, head) = (pair / h.heads, pair % h.heads);
            let base = b * s * 3 * d + head * kd;
            let (q, k, v) = (&qkv_v[base..], &qkv_v[base + d..], &qkv_v[base + 2 * d..]);
            let ctx = ctx;
            // SAFETY: q, k, v are read within qkv; p is this task's own [S, S]; each task writes a
            // disjoint [S, K] block of the context.
            unsafe {
                matmul::<T>(
                    (s, s, kd),
                    p.as_mut_ptr(),
                    s,
                    q.as_ptr(),
                    (3 * d, 1),
                    k.as_ptr(),
                    (1, 3 * d),
                );
            }
            let bias = &bias_v[b * s..(b + 1) * s];
            for row in p.chunks_mut(s) {
                let mut max = T::neg_infinity();
                for (x, &m) in row.iter_mut().zip(bias) {
                    *x = *x * scale + m;
                    max = Float::max(max, *x);
                }
                let mut sum = T::zero();
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum = sum + *x;
                }
                let inv = T::one() / sum;
                row.iter_mut().for_each(|x| *x = *x * inv);
            }
            unsafe {
                let out = ctx.0.add(b * s * d + head * kd);
                matmul::<T>(
                    (s, kd, s),
                    out,
                    d,
                    p.as_ptr(),
                    (s, 1),
                    v.as_ptr(),
                    (3 * d, 1),
                );
            }
        });
    let device = qkv.device();
    Ok((
        Tensor::from_vec(context, (h.batch * s, d), device)?,
        Tensor::from_vec(probs, (h.batch, h.heads, s, s), device)?,
    ))
}

/// d_context [B·S, D], qkv [B·S, 3D], probabilities [B, H, S, S] → d_qkv [B·S, 3D]
pub(super) fn backward<T: Real>(
    dcontext: &Tensor,
    qkv: &Tensor,
    probs: &Tensor,
    h: Heads,
) -> Result<Tensor> {
    let (dcontext, qkv, probs) = (
        dcontext.contiguous()?,
        qkv.contiguous()?,
        probs.contiguous()?,
    );
    let ((dc_s, dc_l), (qkv_s, qkv_l), (p_s, p_l)) = (
        dcontext.storage_and_layout(),
        qkv.storage_and_layout(),
        probs.storage_and_layout(),
    );
    let dc_v = cpu_slice::<T>(&dc_s, dc_l)?;
    let (qkv_v, p_v) = (cpu_slice::<T>(&qkv_s, qkv_l)?, cpu_slice::<T>(&p_s, p_l)?);
    let (s, kd, d) = (h.seq, h.head_dim, h.d());
    let mut dqkv = vec![T::zero(); h.batch * s * 3 * d];
    let out = Shared(dqkv.as_mut_ptr());
    let scale = T::lit(h.scale);
    (0..h.batch * h.heads).into_par_iter().for_each_init(
        || vec![T::zero(); s * s],
        |ds, pair| {
            let (b, head) = (pair / h.heads, pair % h.heads);
            let base = b * s * 3 * d + head * kd;
            let (q, k, v) = (&qkv_v[base..], &qkv_v[base + d..], &qkv_v[base + 2 * d..]);
            let dc = &dc_v[b * s * d + head * kd..];
            let p = &p_v[pair * s * s..(pair + 1) * s * s];
            let out = out;
            // SAFETY: reads stay within the inputs; this task writes only rows of batch b in the
            // columns of its head in the q, k and v thirds of d_qkv, which no other task touches.
            unsafe {
                // dP = dC·Vᵀ, then dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale, in place
                matmul::<T>(
                    (s, s, kd),
                    ds.as_mut_ptr(),
                    s,
                    dc.as_ptr(),
                    (d, 1),
                    v.as_ptr(),
                    (1, 3 * d),
                );
                for (drow, prow) in ds.chunks_mut(s).zip(p.chunks(s)) {
                    let dot = drow
                        .iter()
                        .zip(prow)
                        .fold(T::zero(), |a, (&x, &y)| a + x * y);
                    for (x, &y) in drow.iter_mut().zip(prow) {
                        *x = y * (*x - dot) * scale;
                    }
                }
                let dq = out.0.add(base);
                matmul::<T>(
                    (s, kd, s),
                    dq,
                    3 * d,
                    ds.as_ptr(),
                    (s, 1),
                    k.as_ptr(),
                    (3 * d, 1),
                );
                matmul::<T>(
                    (s, kd, s),
                    dq.add(d),
                    3 * d,
                    ds.as_ptr(),
                    (1, s),
                    q.as_ptr(),
                    (3 * d, 1),
                );
                matmul::<T>(
                    (s, kd, s),
                    dq.add(2 * d),
                    3 * d,
                    p.as_ptr(),
                    (1, s),
                    dc.as_ptr(),
                    (d, 1),
                );
            }
        },
    );
    Tensor::from_vec(dqkv, (h.batch * s, 3 * d), dcontext.device())
}
