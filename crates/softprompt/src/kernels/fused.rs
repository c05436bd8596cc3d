//! Fused CPU kernels for the elementwise and row-wise work between the matmuls: one pass over
//! memory instead of candle's five or six, spread over every core with rayon (candle's own
//! elementwise ops run on one thread). f32 and f64; the callers in this module's siblings pick
//! them on the CPU and fall back to composed candle ops elsewhere (and under `with_composed`).

use super::fast_math::{erf_f32, exp_f32, lanes, lanes_sum};
use candle_core::backend::BackendStorage;
use candle_core::cpu::erf::erf_f64;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use gemm::{gemm, Parallelism};
use multiversion::multiversion;
use num_traits::Float;
use rayon::prelude::*;
use std::cell::Cell;

thread_local! {
    static FUSED: Cell<bool> = const { Cell::new(true) };
}

/// Runs `f` with the composed candle-op kernels on this thread: the plain reference the fused
/// kernels are tested against.
pub fn with_composed<R>(f: impl FnOnce() -> R) -> R {
    let before = FUSED.with(|c| c.replace(false));
    let out = f();
    FUSED.with(|c| c.set(before));
    out
}

/// Whether the fused kernels serve this tensor.
pub(super) fn fused_for(t: &Tensor) -> bool {
    FUSED.with(|c| c.get()) && t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The float types the kernels are written for.
pub(super) trait Real: Float + candle_core::WithDType + Send + Sync + 'static {
    /// f32: the vectorizing approximations of `fast_math`; f64: libm's
    fn erf(self) -> Self;
    fn exp_fast(self) -> Self;
    fn of(storage: &CpuStorage) -> Result<&[Self]>;
    fn into_storage(values: Vec<Self>) -> CpuStorage;
    #[inline(always)]
    fn lit(v: f64) -> Self {
        Self::from(v).expect("representable")
    }
}

impl Real for f32 {
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f32(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
    fn of(storage: &CpuStorage) -> Result<&[Self]> {
        storage.as_slice::<f32>()
    }
    fn into_storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(values)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f64(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    fn of(storage: &CpuStorage) -> Result<&[Self]> {
        storage.as_slice::<f64>()
    }
    fn into_storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(values)
    }
}

/// The CPU slice of a contiguous tensor's storage (held by the caller's guard).
pub(super) fn cpu_slice<'a, T: Real>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
) -> Result<&'a [T]> {
    match storage {
        candle_core::Storage::Cpu(cpu) => view(cpu, layout),
        _ => candle_core::bail!("fused kernels run on the CPU"),
    }
}

/// The contiguous slice a layout describes.
fn view<'a, T: Real>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&T::of(storage)?[start..end]),
        None => candle_core::bail!("fused kernels need contiguous inputs"),
    }
}

/// C[m×n] = A[m×k]·B[k×n] (or C += A·B with `accumulate`) through gemm, each operand given by its
/// pointer and (row, column) strides.
///
/// # Safety
/// The pointers and strides must describe memory valid for those shapes; `c` must not alias a or b.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    c: *mut T,
    c_rs: usize,
    accumulate: bool,
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
    parallelism: Parallelism,
) {
    gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        parallelism,
    )
}

/// Rows handed to one rayon task at a time: enough work to pay for the hand-off.
fn rows_per_task(row: usize) -> usize {
    (16384 / row.max(1)).max(1)
}

/// Calls `f(row_index, output_row)` for every row of an output of `n` elements, in parallel.
fn for_rows<T: Real>(n: usize, row: usize, f: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); n];
    let per = rows_per_task(row);
    out.par_chunks_mut(row * per)
        .enumerate()
        .for_each(|(chunk, rows)| {
            for (i, r) in rows.chunks_mut(row).enumerate() {
                f(chunk * per + i, r);
            }
        });
    out
}

macro_rules! dispatch {
    ($storage:expr, $f:ident ( $($arg:expr),* )) => {
        match $storage.dtype() {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            dt => candle_core::bail!("fused kernels take f32 or f64, not {dt:?}"),
        }
    };
}

const ELEMENTS_PER_TASK: usize = 16384;

/// Which GELU: the exact erf one (BERT), or the tanh approximation (GPT-2's "gelu_new").
#[derive(Debug, Clone, Copy)]
pub(super) enum GeluKind {
    Erf,
    Tanh,
}

/// √(2/π), and the cubic coefficient of the tanh approximation.
pub(super) const TANH_SCALE: f64 = 0.797_884_560_802_865_4;
pub(super) const TANH_CUBIC: f64 = 0.044715;

impl GeluKind {
    /// erf: x·Φ(x); tanh: ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³)
    #[inline(always)]
    fn value<T: Real>(self, x: T) -> T {
        let half = T::lit(0.5);
        match self {
            GeluKind::Erf => {
                half * x * (T::one() + (x * T::lit(std::f64::consts::FRAC_1_SQRT_2)).erf())
            }
            GeluKind::Tanh => half * x * (T::one() + Self::tanh_u(x)),
        }
    }

    /// erf: Φ(x) + x·φ(x); tanh: ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²)
    #[inline(always)]
    fn slope<T: Real>(self, x: T) -> T {
        let half = T::lit(0.5);
        match self {
            GeluKind::Erf => {
                let cdf = half * (T::one() + (x * T::lit(std::f64::consts::FRAC_1_SQRT_2)).erf());
                let pdf =
                    (-half * x * x).exp_fast() * T::lit(1.0 / (2.0 * std::f64::consts::PI).sqrt());
                cdf + x * pdf
            }
            GeluKind::Tanh => {
                let t = Self::tanh_u(x);
                let du = T::lit(TANH_SCALE) * (T::one() + T::lit(3.0 * TANH_CUBIC) * x * x);
                half * (T::one() + t) + half * x * (T::one() - t * t) * du
            }
        }
    }

    /// tanh u as 1 − 2/(e^{2u} + 1): one exp, several times faster than libm's tanh, and exactly
    /// ±1 where e^{2u} overflows or vanishes.
    #[inline(always)]
    fn tanh_u<T: Real>(x: T) -> T {
        let u = T::lit(TANH_SCALE) * (x + T::lit(TANH_CUBIC) * x * x * x);
        T::one() - T::lit(2.0) / ((u + u).exp_fast() + T::one())
    }
}

/// o = gelu(x), compiled for the CPU's widest vectors (`fast_math`).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn gelu_chunk<T: Real>(kind: GeluKind, o: &mut [T], x: &[T]) {
    // one loop per kind, so that the function inside each is a constant the loop vectorizes
    match kind {
        GeluKind::Erf => o
            .iter_mut()
            .zip(x)
            .for_each(|(o, &x)| *o = GeluKind::Erf.value(x)),
        GeluKind::Tanh => o
            .iter_mut()
            .zip(x)
            .for_each(|(o, &x)| *o = GeluKind::Tanh.value(x)),
    }
}

/// o = a ⊙ f(x), likewise.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn scaled_chunk<T: Real>(f: Pointwise, o: &mut [T], a: &[T], x: &[T]) {
    #[inline(always)]
    fn scale<T: Real>(o: &mut [T], a: &[T], x: &[T], f: impl Fn(T) -> T) {
        for ((o, &a), &x) in o.iter_mut().zip(a).zip(x) {
            *o = a * f(x);
        }
    }
    match f {
        Pointwise::GeluSlope(GeluKind::Erf) => scale(o, a, x, |x| GeluKind::Erf.slope(x)),
        Pointwise::GeluSlope(GeluKind::Tanh) => scale(o, a, x, |x| GeluKind::Tanh.slope(x)),
        Pointwise::Silu => scale(o, a, x, |x| Pointwise::Silu.at(x)),
        Pointwise::SiluSlope => scale(o, a, x, |x| Pointwise::SiluSlope.at(x)),
    }
}

/// GELU: x [..] → gelu(x)
pub(super) struct Gelu(pub GeluKind);

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(kind: GeluKind, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let x = view::<T>(s, l)?;
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(ELEMENTS_PER_TASK)
                .zip(x.par_chunks(ELEMENTS_PER_TASK))
                .for_each(|(o, x)| gelu_chunk(kind, o, x));
            Ok(T::into_storage(out))
        }
        Ok((dispatch!(s, run(self.0, s, l))?, l.shape().clone()))
    }
}

/// A function of one element that scales another tensor: `Scaled`'s f.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pointwise {
    /// gelu'(x), for GELU's backward
    GeluSlope(GeluKind),
    /// silu(x) = x·σ(x), for the gated MLP's forward and its up-projection's gradient
    Silu,
    /// silu'(x) = σ(x)·(1 + x·(1 − σ(x))), for its gate's gradient
    SiluSlope,
}

impl Pointwise {
    #[inline(always)]
    fn at<T: Real>(self, x: T) -> T {
        let sigmoid = || T::one() / (T::one() + (-x).exp_fast());
        match self {
            Pointwise::GeluSlope(kind) => kind.slope(x),
            Pointwise::Silu => x * sigmoid(),
            Pointwise::SiluSlope => {
                let s = sigmoid();
                s * (T::one() + x * (T::one() - s))
            }
        }
    }
}

/// a, x [..] → a ⊙ f(x)
pub(super) struct Scaled(pub Pointwise);

impl CustomOp2 for Scaled {
    fn name(&self) -> &'static str {
        "scaled-pointwise"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            f: Pointwise,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let (a, x) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?);
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(ELEMENTS_PER_TASK)
                .zip(
                    a.par_chunks(ELEMENTS_PER_TASK)
                        .zip(x.par_chunks(ELEMENTS_PER_TASK)),
                )
                .for_each(|(o, (a, x))| scaled_chunk(f, o, a, x));
            Ok(T::into_storage(out))
        }
        Ok((
            dispatch!(s1, run(self.0, s1, l1, s2, l2))?,
            l1.shape().clone(),
        ))
    }
}

/// a ⊙ f(x) on the fused kernel where it serves (f32/f64 on the CPU), else None.
pub(super) fn scaled(a: &Tensor, x: &Tensor, f: Pointwise) -> Option<Result<Tensor>> {
    fused_for(x).then(|| {
        a.contiguous()?
            .apply_op2_no_bwd(&x.contiguous()?, &Scaled(f))
    })
}

/// Mean and reciprocal standard deviation of one row.
#[inline(always)]
fn row_stats<T: Real>(x: &[T], eps: T) -> (T, T) {
    let n = T::from(x.len()).expect("row length");
    let mean = lanes(x, T::zero(), |a, b| a + b) / n;
    let var = lanes_sum(x, x, |v, _| (v - mean) * (v - mean)) / n;
    (mean, T::one() / (var + eps).sqrt())
}

/// One row of LayerNorm: out = (x − mean)·rstd·γ + β.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn layer_norm_row<T: Real>(out: &mut [T], x: &[T], gamma: &[T], beta: &[T], eps: T) {
    let (mean, rstd) = row_stats(x, eps);
    for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
        *o = (v - mean) * rstd * g + b;
    }
}

/// One row of LayerNorm's backward: out = rstd · (g − mean(g) − x̂ · mean(g·x̂)), g = dy·γ.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn layer_norm_backward_row<T: Real>(out: &mut [T], dy: &[T], x: &[T], gamma: &[T], eps: T) {
    let n = T::from(x.len()).expect("row length");
    let (mean, rstd) = row_stats(x, eps);
    // the output row holds g until the last loop overwrites it
    for ((o, &g), &w) in out.iter_mut().zip(dy).zip(gamma) {
        *o = g * w;
    }
    let mean_g = lanes(out, T::zero(), |a, b| a + b) / n;
    let mean_gx = lanes_sum(out, x, |g, v| g * (v - mean)) * rstd / n;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = rstd * (*o - mean_g - (v - mean) * rstd * mean_gx);
    }
}

/// LayerNorm over the last dimension: x [.., D], γ [D], β [D] → y [.., D]
pub(super) struct LayerNormForward {
    pub eps: f64,
}

impl CustomOp3 for LayerNormForward {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            eps: f64,
            [x, gamma, beta]: [(&CpuStorage, &Layout); 3],
        ) -> Result<CpuStorage> {
            let (x, gamma, beta) = (
                view::<T>(x.0, x.1)?,
                view::<T>(gamma.0, gamma.1)?,
                view::<T>(beta.0, beta.1)?,
            );
            let d = gamma.len();
            let eps = T::lit(eps);
            Ok(T::into_storage(for_rows(x.len(), d, |r, out| {
                layer_norm_row(out, &x[r * d..(r + 1) * d], gamma, beta, eps)
            })))
        }
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        Ok((dispatch!(s1, run(self.eps, inputs))?, l1.shape().clone()))
    }
}

/// dy, x [.., D], γ [D] → dx = rstd · (g − mean(g) − x̂ · mean(g·x̂)), g = dy·γ; the row statistics are
/// recomputed from x rather than stored.
pub(super) struct LayerNormBackward {
    pub eps: f64,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            eps: f64,
            [dy, x, gamma]: [(&CpuStorage, &Layout); 3],
        ) -> Result<CpuStorage> {
            let (dy, x, gamma) = (
                view::<T>(dy.0, dy.1)?,
                view::<T>(x.0, x.1)?,
                view::<T>(gamma.0, gamma.1)?,
            );
            let d = gamma.len();
            let eps = T::lit(eps);
            Ok(T::into_storage(for_rows(x.len(), d, |r, out| {
                let (dy, x) = (&dy[r * d..(r + 1) * d], &x[r * d..(r + 1) * d]);
                layer_norm_backward_row(out, dy, x, gamma, eps);
            })))
        }
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        Ok((dispatch!(s1, run(self.eps, inputs))?, l1.shape().clone()))
    }
}
