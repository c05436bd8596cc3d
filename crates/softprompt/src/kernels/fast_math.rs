//! exp and erf for f32 that vectorize: libm's are calls, one element at a time, and they took a
//! quarter of a MiniLM training step (GELU's erf and exp, attention's softmax). Both are
//! branch-free polynomials, so a loop over them compiles to the widest vectors of the function it
//! is inlined into: the kernels' loops are `#[multiversion]` functions, compiled for AVX-512, for
//! AVX2 + FMA and for baseline x86-64 (SSE2) and picked at run time. Their arithmetic is
//! elementwise or in explicit lanes (`lanes`), and Rust never contracts a multiply and an add into
//! one FMA by itself, so every width gives the same bits. f64 keeps libm's exact functions: the
//! finite-difference tests run there.

/// e^x within 1e-7 relative (cephes' expf: x = n·ln 2 + r, a degree-6 polynomial in r, 2ⁿ from the
/// exponent bits); exactly 0 below the smallest normal result, so masked scores vanish as with libm.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LOWEST: f32 = -87.336_55;
    const HIGHEST: f32 = 88.376_26;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer without a branch
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(LOWEST, HIGHEST);
    let n = (clamped * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let two_to_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < LOWEST {
        0.0
    } else {
        e * two_to_n
    }
}

/// erf(x) within 5e-7 (Eigen's rational approximation for f32: x·P(x²)/Q(x²) on [−4, 4], ±1 beyond).
#[inline(always)]
pub(super) fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10f32 + 2.770_681_4e-8;
    p = x2 * p - 2.101_024e-6;
    p = x2 * p - 5.692_506_4e-5;
    p = x2 * p - 7.349_906_3e-4;
    p = x2 * p - 2.954_600_1e-3;
    p = x2 * p - 1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5f32 - 2.133_740_6e-4;
    q = x2 * q - 1.682_827e-3;
    q = x2 * q - 7.373_329_2e-3;
    q = x2 * q - 1.426_473_9e-2;
    x * p / q
}

/// A reduction of `x` by `f` in sixteen independent lanes, so that it vectorizes (one running
/// value would order every step after the last); the same result at any vector width.
#[inline(always)]
pub(super) fn lanes<T: Copy>(x: &[T], init: T, f: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = f(*a, v);
        }
    }
    let mut total = rest.iter().fold(init, |a, &v| f(a, v));
    for a in acc {
        total = f(total, a);
    }
    total
}

/// Σ f(aᵢ, bᵢ) in sixteen independent lanes, as `lanes`.
#[inline(always)]
pub(super) fn lanes_sum<T: num_traits::Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::zero(); 16];
    let (chunks_a, chunks_b) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + f(x, y));
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for ((acc, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *acc = *acc + f(x, y);
        }
    }
    acc.iter().fold(rest, |s, &x| s + x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 10⁻⁴ or so across the range, against f64's libm.
    fn grid(from: f32, to: f32, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |i| from + (to - from) * i as f32 / n as f32)
    }

    #[test]
    fn exp_is_within_two_ulps_and_vanishes_where_libm_does() {
        let worst = grid(-87.0, 88.0, 2_000_000)
            .map(|x| {
                let exact = (x as f64).exp();
                ((exp_f32(x) as f64 - exact) / exact).abs()
            })
            .fold(0.0, f64::max);
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-1e30), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(88.3).is_finite() && exp_f32(88.3) > 1e38);
    }

    #[test]
    fn erf_is_within_5e_7_and_odd() {
        let erf = |x: f64| candle_core::cpu::erf::erf_f64(x);
        let worst = grid(-7.0, 7.0, 2_000_000)
            .map(|x| (erf_f32(x) as f64 - erf(x as f64)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "worst absolute error {worst:e}");
        for x in [1e-20f32, 1e-3, 0.5, 2.0] {
            assert_eq!(erf_f32(-x), -erf_f32(x));
            let relative = (erf_f32(x) as f64 / erf(x as f64) - 1.0).abs();
            assert!(relative < 5e-7, "erf({x}) relative error {relative:e}");
        }
        assert_eq!(erf_f32(10.0), erf_f32(4.0));
    }
}
