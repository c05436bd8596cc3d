//! A frozen linear layer's two products on the CPU, straight into gemm: candle's matmul zero-fills
//! its output before gemm overwrites it, and a bias is one more pass over [T, OUT] on one thread.
//! Here the output starts as the bias rows (or as nothing at all) and gemm adds the product into
//! it, on every core.

use super::fused::{cpu_slice, matmul, Real};
use candle_core::{Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// x [T, IN] · Wᵀ (+ b) → [T, OUT], with w [OUT, IN] and b [OUT]; x and w contiguous.
pub(super) fn forward<T: Real>(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, inner) = x.dims2()?;
    let out_dim = w.dim(0)?;
    let ((x_s, x_l), (w_s, w_l)) = (x.storage_and_layout(), w.storage_and_layout());
    let (x_v, w_v) = (cpu_slice::<T>(&x_s, x_l)?, cpu_slice::<T>(&w_s, w_l)?);
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
    // SAFETY: x [rows, inner], w [out_dim, inner] read as Wᵀ [inner, out_dim] (row stride 1,
    // column stride inner), out has room for [rows, out_dim]; without a bias gemm writes every
    // element before anything reads it (no accumulating), and the length is set after.
    unsafe {
        matmul(
            (rows, out_dim, inner),
            out.as_mut_ptr(),
            out_dim,
            accumulate,
            x_v.as_ptr(),
            (inner, 1),
            w_v.as_ptr(),
            (1, inner),
            parallelism(),
        );
        out.set_len(rows * out_dim);
    }
    Tensor::from_vec(out, (rows, out_dim), x.device())
}

/// dy [T, OUT] · W → dx [T, IN], with w [OUT, IN]; dy and w contiguous.
pub(super) fn backward<T: Real>(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, out_dim) = dy.dims2()?;
    let inner = w.dim(1)?;
    let ((dy_s, dy_l), (w_s, w_l)) = (dy.storage_and_layout(), w.storage_and_layout());
    let (dy_v, w_v) = (cpu_slice::<T>(&dy_s, dy_l)?, cpu_slice::<T>(&w_s, w_l)?);
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
            (inner, 1),
            parallelism(),
        );
        dx.set_len(rows * inner);
    }
    Tensor::from_vec(dx, (rows, inner), dy.device())
}
