//! A frozen linear layer's two products on the CPU, straight into gemm: candle's matmul zero-fills
//! its output before gemm overwrites it, and a bias is one more pass over [T, OUT] on one thread.
//! Here the output starts as the bias rows (or as nothing at all) and gemm adds the product into
//! it, on every core. A few rows (a decode step: one token for each text being written) skip
//! gemm: it would first pack all of W, reading and writing it, to use it a few times; `few_rows`
//! reads each row of W once and forms its dot products with every x row.

use super::fused::{cpu_slice, matmul, Real};
use candle_core::{Layout, Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// W [OUT, IN]'s (row, column) strides where it is stored row by row, as Hugging Face stores it,
/// or column by column (`Linear::from_weight` stores a matrix with IN > OUT so, because gemm
/// runs a product at full speed only when the long inner dimension runs down B's rows); `None`
/// for any other layout, which the fused products do not read.
pub(super) fn weight_strides(layout: &Layout) -> Option<(usize, usize)> {
    let (out_dim, inner) = layout.shape().dims2().ok()?;
    if layout.is_contiguous() {
        Some((inner, 1))
    } else if layout.transpose(0, 1).is_ok_and(|t| t.is_contiguous()) {
        Some((1, out_dim))
    } else {
        None
    }
}

/// W's values in storage order, and its strides (`weight_strides`).
fn weight_view<'a, T: Real>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
) -> Result<(&'a [T], (usize, usize))> {
    let Some(strides) = weight_strides(layout) else {
        candle_core::bail!("a fused linear's weight is stored row by row or column by column")
    };
    let stored = match strides {
        (_, 1) => layout.clone(),
        _ => layout.transpose(0, 1)?,
    };
    Ok((cpu_slice::<T>(storage, &stored)?, strides))
}

/// Rows up to which `forward` reads W once instead of calling gemm.
pub(super) const FEW_ROWS: usize = 16;

/// x [T, IN] · Wᵀ (+ b) → [T, OUT], with w [OUT, IN] and b [OUT]; x and w contiguous.
pub(super) fn forward<T: Real>(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, inner) = x.dims2()?;
    let out_dim = w.dim(0)?;
    let ((x_s, x_l), (w_s, w_l)) = (x.storage_and_layout(), w.storage_and_layout());
    let (x_v, (w_v, (w_rs, w_cs))) = (cpu_slice::<T>(&x_s, x_l)?, weight_view::<T>(&w_s, w_l)?);
    if rows <= FEW_ROWS && inner > 0 && w_cs == 1 {
        let bias = match bias {
            Some(b) => {
                let (b_s, b_l) = b.storage_and_layout();
                Some(cpu_slice::<T>(&b_s, b_l)?.to_vec())
            }
            None => None,
        };
        let out = few_rows(x_v, w_v, bias.as_deref(), rows, inner);
        return Tensor::from_vec(out, (rows, out_dim), x.device());
    }
    let mut out: Vec<T> = Vec::with_capacity(rows * out_dim);
    let accumulate = match bias {
        Some(b) => {
            let (b_s, b_l) = b.storage_and_layout();
            let b_v = cpu_slice::<T>(&b_s, b_l)?;
            out.resize(rows * out_dim, T::zero());
            out.par_chunks_mut(out_dim)
                .for_each(|row| row.copy_from_slice(b_v));
            true
        }
        None => false,
    };
    // SAFETY: x [rows, inner], w [out_dim, inner] at its strides read as Wᵀ [inner, out_dim],
    // out has room for [rows, out_dim]; without a bias gemm writes every element before
    // anything reads it (no accumulating), and the length is set after.
    unsafe {
        matmul(
            (rows, out_dim, inner),
            out.as_mut_ptr(),
            out_dim,
            accumulate,
            x_v.as_ptr(),
            (inner, 1),
            w_v.as_ptr(),
            (w_cs, w_rs),
            parallelism(),
        );
        out.set_len(rows * out_dim);
    }
    Tensor::from_vec(out, (rows, out_dim), x.device())
}

/// x [T, IN] (T ≤ `FEW_ROWS`) · Wᵀ (+ b) with w [OUT, IN] → [T, OUT]: each task takes whole rows
/// of W and their dot products with every x row, so W is read once. A row's result does not
/// depend on the others: a text decodes the same in any batch.
fn few_rows<T: Real>(x: &[T], w: &[T], bias: Option<&[T]>, rows: usize, inner: usize) -> Vec<T> {
    const W_ROWS_PER_TASK: usize = 32;
    let out_dim = w.len() / inner;
    // computed transposed, [OUT, T], so that each task owns whole rows of W
    let mut y_t = vec![T::zero(); out_dim * rows];
    y_t.par_chunks_mut(W_ROWS_PER_TASK * rows)
        .zip(w.par_chunks(W_ROWS_PER_TASK * inner))
        .for_each(|(y_t, w)| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has the features the function is compiled for
                return unsafe { dots_avx2(w, x, inner, y_t, |a, b, c| a.mul_add(b, c)) };
            }
            dots(w, x, inner, y_t, |a, b, c| a * b + c)
        });
    let mut out = Vec::with_capacity(rows * out_dim);
    for t in 0..rows {
        out.extend((0..out_dim).map(|o| {
            let b = bias.map_or(T::zero(), |b| b[o]);
            y_t[o * rows + t] + b
        }));
    }
    out
}

/// `dots` where the CPU fuses a·b + c into one instruction (`mul_add` is a library call without).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<T: Real>(
    w: &[T],
    x: &[T],
    inner: usize,
    y_t: &mut [T],
    fma: impl Fn(T, T, T) -> T,
) {
    dots(w, x, inner, y_t, fma)
}

/// Rows of W [n, IN] against every x row [T, IN] → y_t [n, T], `fma(a, b, c)` = a·b + c. Four x
/// rows at a time against each piece of a W row: 4 × 16 lanes are 8 independent chains of 8-wide
/// FMAs, enough to hide the FMA's latency, and each piece of W is loaded once for the four.
#[inline(always)]
fn dots<T: Real>(w: &[T], x: &[T], inner: usize, y_t: &mut [T], fma: impl Fn(T, T, T) -> T) {
    const LANES: usize = 16;
    const AT_ONCE: usize = 4;
    let rows = x.len() / inner;
    for (w_row, y) in w.chunks_exact(inner).zip(y_t.chunks_exact_mut(rows)) {
        for (xs, y) in x.chunks(AT_ONCE * inner).zip(y.chunks_mut(AT_ONCE)) {
            let pieces = inner / LANES;
            // what is past the last whole piece of each row
            let mut rest = [T::zero(); AT_ONCE];
            for (x_row, rest) in xs.chunks_exact(inner).zip(&mut rest) {
                let (w, x) = (&w_row[pieces * LANES..], &x_row[pieces * LANES..]);
                *rest = w.iter().zip(x).fold(T::zero(), |s, (&a, &b)| fma(a, b, s));
            }
            let mut lanes = [[T::zero(); LANES]; AT_ONCE];
            for piece in 0..pieces {
                let w = &w_row[piece * LANES..(piece + 1) * LANES];
                for (x_row, lanes) in xs.chunks_exact(inner).zip(&mut lanes) {
                    let x = &x_row[piece * LANES..(piece + 1) * LANES];
                    // zipped, not indexed: no bounds checks, so the lanes vectorize
                    for (lane, (&w, &x)) in lanes.iter_mut().zip(w.iter().zip(x)) {
                        *lane = fma(w, x, *lane);
                    }
                }
            }
            for ((y, lanes), rest) in y.iter_mut().zip(&lanes).zip(rest) {
                *y = lanes.iter().fold(rest, |s, &l| s + l);
            }
        }
    }
}

/// dy [T, OUT] · W → dx [T, IN], with w [OUT, IN]; dy and w contiguous.
pub(super) fn backward<T: Real>(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, out_dim) = dy.dims2()?;
    let inner = w.dim(1)?;
    let ((dy_s, dy_l), (w_s, w_l)) = (dy.storage_and_layout(), w.storage_and_layout());
    let (dy_v, (w_v, w_strides)) = (cpu_slice::<T>(&dy_s, dy_l)?, weight_view::<T>(&w_s, w_l)?);
    let mut dx: Vec<T> = Vec::with_capacity(rows * inner);
    // SAFETY: dy [rows, out_dim], w [out_dim, inner], dx has room for [rows, inner], every
    // element of which gemm writes (no accumulating) before the length is set.
    unsafe {
        matmul(
            (rows, inner, out_dim),
            dx.as_mut_ptr(),
            inner,
            false,
            dy_v.as_ptr(),
            (out_dim, 1),
            w_v.as_ptr(),
            w_strides,
            parallelism(),
        );
        dx.set_len(rows * inner);
    }
    Tensor::from_vec(dx, (rows, inner), dy.device())
}
