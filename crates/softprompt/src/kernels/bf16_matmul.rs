//! A frozen linear layer's two products with its weight held in bf16, on the AVX512-BF16 dot
//! product (`vdpbf16ps`: 32 bf16 products summed in pairs into 16 f32 lanes). No crate offers
//! it: gemm has no bf16 kernel of its own (it widens to f32), and candle's bf16 matmul is gemm's.
//!
//! ```text
//! forward   x [T, IN] f32 · Wᵀ → [T, OUT] f32 (+ bias)      W [OUT, IN] bf16
//! backward  dy [T, OUT] f32 · W → [T, IN] f32
//! ```
//! The f32 operand is rounded to bf16 as it is packed (round to nearest even, as the CPU's own
//! conversion does), the sums stay f32. Both products are one kernel, C [T, N] += A [T, K] · B
//! [K, N], that reads B as panels of 32 columns holding each pair of consecutive k side by side
//! (what the instruction multiplies): the forward packs those panels from W's rows, the backward
//! from pairs of W's rows. Packing costs one read of W per call, about 1/T of the product.

use candle_core::{CpuStorage, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Rows of C one kernel call computes (8 rows × 2 registers = 16 accumulators).
const MR: usize = 8;
/// Columns of a B panel: two 16-lane registers.
const NR: usize = 32;
const _: () = assert!(NR == 32, "the kernel holds a panel row in two registers");

/// Whether this CPU multiplies bf16 natively.
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// x [T, IN] · Wᵀ (+ b) → [T, OUT]: w [OUT, IN] bf16, x and b f32, all contiguous on the CPU.
pub fn forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (t, k) = x.dims2()?;
    let n = w.dim(0)?;
    let panels = with_bits(w, |w| pack_panels(n, k, |col, row| w[col * k + row]))?;
    let mut out = match bias {
        Some(b) => f32s(b)?.repeat(t),
        None => vec![0f32; t * n],
    };
    multiply(&pack_rows(x)?, t, k, &panels, n, &mut out);
    Tensor::from_vec(out, (t, n), x.device())
}

/// dy [T, OUT] · W → [T, IN]: w [OUT, IN] bf16, dy f32, both contiguous on the CPU.
pub fn backward(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (t, out_dim) = dy.dims2()?;
    let inner = w.dim(1)?;
    // B [OUT, IN] is W itself: element (k = out, column = in)
    let panels = with_bits(w, |w| {
        pack_panels(inner, out_dim, |col, row| w[row * inner + col])
    })?;
    let mut dx = vec![0f32; t * inner];
    multiply(&pack_rows(dy)?, t, out_dim, &panels, inner, &mut dx);
    Tensor::from_vec(dx, (t, inner), dy.device())
}

/// `f` on the bits of a contiguous bf16 tensor on the CPU.
fn with_bits<R>(w: &Tensor, f: impl FnOnce(&[u16]) -> R) -> Result<R> {
    let (storage, layout) = w.storage_and_layout();
    let (Storage::Cpu(CpuStorage::BF16(data)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!(
            "a bf16 product needs a contiguous bf16 weight on the CPU, not {:?}",
            w.dtype()
        );
    };
    Ok(f(as_bits(&data[start..end])))
}

/// bf16 values as their bits.
fn as_bits(values: &[bf16]) -> &[u16] {
    // SAFETY: bf16 is a transparent u16
    unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u16, values.len()) }
}

fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// A [T, K] f32 → bf16 rows of K rounded up to even (the last pair's second half zero).
fn pack_rows(a: &Tensor) -> Result<Vec<u16>> {
    let (t, k) = a.dims2()?;
    let kp = k.next_multiple_of(2);
    let values = a.contiguous()?;
    let (storage, layout) = values.storage_and_layout();
    let data = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            &v[layout.start_offset()..layout.start_offset() + t * k]
        }
        _ => candle_core::bail!("a bf16 product takes f32 rows on the CPU"),
    };
    let mut out = vec![0u16; t * kp];
    out.par_chunks_mut(kp)
        .zip(data.par_chunks(k))
        .for_each(|(dst, src)| to_bf16(src, &mut dst[..k]));
    Ok(out)
}

/// B [K, N] (element (k, column) from `at(column, k)`) → panels of NR columns: panel j holds, for
/// each pair p of k, NR pairs (B[2p][c], B[2p+1][c]); columns past N and the k past K are zero.
fn pack_panels(n: usize, k: usize, at: impl Fn(usize, usize) -> u16 + Sync) -> Vec<u16> {
    let pairs = k.div_ceil(2);
    let panel = pairs * NR * 2;
    let mut out = vec![0u16; n.div_ceil(NR) * panel];
    out.par_chunks_mut(panel).enumerate().for_each(|(j, dst)| {
        let width = NR.min(n - j * NR);
        for p in 0..pairs {
            for c in 0..width {
                let col = j * NR + c;
                dst[(p * NR + c) * 2] = at(col, 2 * p);
                if 2 * p + 1 < k {
                    dst[(p * NR + c) * 2 + 1] = at(col, 2 * p + 1);
                }
            }
        }
    });
    out
}

/// C [T, N] += A · B, A as `pack_rows` makes it, B as `pack_panels`; panels split across threads.
fn multiply(a: &[u16], t: usize, k: usize, panels: &[u16], n: usize, c: &mut [f32]) {
    let pairs = k.div_ceil(2);
    let panel = pairs * NR * 2;
    let c_ptr = SendPtr(c.as_mut_ptr());
    (0..n.div_ceil(NR)).into_par_iter().for_each(|j| {
        let b = &panels[j * panel..(j + 1) * panel];
        let width = NR.min(n - j * NR);
        for row in (0..t).step_by(MR) {
            let rows = MR.min(t - row);
            let c = c_ptr;
            // SAFETY: panel j writes only columns j·NR.. j·NR + width of rows row..row + rows,
            // which no other panel touches; a and b hold what the kernel reads.
            unsafe {
                tile(
                    &a[row * pairs * 2..],
                    pairs,
                    rows,
                    b,
                    c.0.add(row * n + j * NR),
                    n,
                    width,
                )
            };
        }
    });
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// One tile of `rows` ≤ MR rows by `width` ≤ NR columns: c (row stride `ldc`) += a · b.
///
/// # Safety
/// `a` holds `rows` rows of `pairs` pairs; `b` one panel; c has room for the tile.
unsafe fn tile(
    a: &[u16],
    pairs: usize,
    rows: usize,
    b: &[u16],
    c: *mut f32,
    ldc: usize,
    width: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if native() {
        return avx512::tile(a, pairs, rows, b, c, ldc, width);
    }
    scalar_tile(a, pairs, rows, b, c, ldc, width)
}

/// The same sums without the instruction (and the reference the tests compare it with).
unsafe fn scalar_tile(
    a: &[u16],
    pairs: usize,
    rows: usize,
    b: &[u16],
    c: *mut f32,
    ldc: usize,
    width: usize,
) {
    let f = |bits: u16| bf16::from_bits(bits).to_f32();
    for r in 0..rows {
        for col in 0..width {
            let mut sum = 0f32;
            for p in 0..pairs {
                let (a0, a1) = (a[(r * pairs + p) * 2], a[(r * pairs + p) * 2 + 1]);
                let (b0, b1) = (b[(p * NR + col) * 2], b[(p * NR + col) * 2 + 1]);
                sum += f(a0) * f(b0) + f(a1) * f(b1);
            }
            *c.add(r * ldc + col) += sum;
        }
    }
}

fn to_bf16(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if native() {
        // SAFETY: the CPU has the instructions; both slices have the same length.
        return unsafe { avx512::to_bf16(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(*s).to_bits();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::MR;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    pub(super) unsafe fn to_bf16(src: &[f32], dst: &mut [u16]) {
        let n = src.len();
        let mut i = 0;
        while i + 16 <= n {
            let v = _mm512_loadu_ps(src.as_ptr().add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
            i += 16;
        }
        for j in i..n {
            dst[j] = half::bf16::from_f32(src[j]).to_bits();
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(
        a: &[u16],
        pairs: usize,
        rows: usize,
        b: &[u16],
        c: *mut f32,
        ldc: usize,
        width: usize,
    ) {
        match rows {
            8 => rows_tile::<8>(a, pairs, b, c, ldc, width),
            7 => rows_tile::<7>(a, pairs, b, c, ldc, width),
            6 => rows_tile::<6>(a, pairs, b, c, ldc, width),
            5 => rows_tile::<5>(a, pairs, b, c, ldc, width),
            4 => rows_tile::<4>(a, pairs, b, c, ldc, width),
            3 => rows_tile::<3>(a, pairs, b, c, ldc, width),
            2 => rows_tile::<2>(a, pairs, b, c, ldc, width),
            _ => rows_tile::<1>(a, pairs, b, c, ldc, width),
        }
    }

    /// `tile` for exactly R ≤ MR rows: a fixed trip count, so the 2·R accumulators stay in
    /// registers.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn rows_tile<const R: usize>(
        a: &[u16],
        pairs: usize,
        b: &[u16],
        c: *mut f32,
        ldc: usize,
        width: usize,
    ) {
        const { assert!(R <= MR) };
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let a32 = a.as_ptr() as *const i32;
        let b_ptr = b.as_ptr() as *const __m512i;
        for p in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b_ptr.add(2 * p)));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b_ptr.add(2 * p + 1)));
            for (r, sums) in acc.iter_mut().enumerate() {
                let pair: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a32.add(r * pairs + p)));
                sums[0] = _mm512_dpbf16_ps(sums[0], pair, b0);
                sums[1] = _mm512_dpbf16_ps(sums[1], pair, b1);
            }
        }
        let masks = [lanes(width), lanes(width.saturating_sub(16))];
        for (r, row) in acc.iter().enumerate() {
            for (half, sums) in row.iter().enumerate() {
                let at = c.add(r * ldc + half * 16);
                let old = _mm512_maskz_loadu_ps(masks[half], at);
                _mm512_mask_storeu_ps(at, masks[half], _mm512_add_ps(old, *sums));
            }
        }
    }

    /// The first `n` (at most 16) lanes.
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap();
        diff.max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    fn rounded(t: &Tensor) -> Tensor {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    /// Ragged shapes (rows, columns and k off every block size) against f32 products of the
    /// same bf16-rounded operands: equal but for the order of the f32 sums.
    #[test]
    fn both_products_equal_f32_products_of_the_rounded_operands() {
        let dev = Device::Cpu;
        for (t, k, n) in [
            (1, 1, 1),
            (7, 5, 3),
            (9, 33, 31),
            (17, 64, 65),
            (40, 129, 96),
        ] {
            let x = Tensor::randn(0f32, 1.0, (t, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let bias = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let w32 = w.to_dtype(DType::F32).unwrap();
            let want = rounded(&x)
                .matmul(&w32.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let got = forward(&x, &w, Some(&bias)).unwrap();
            let diff = max_diff(&got, &want);
            assert!(
                diff < 1e-4 * (k as f32).sqrt() * 4.0,
                "forward {t}×{k}×{n}: {diff}"
            );

            let dy = Tensor::randn(0f32, 1.0, (t, n), &dev).unwrap();
            let want = rounded(&dy).matmul(&w32).unwrap();
            let got = backward(&dy, &w).unwrap();
            let diff = max_diff(&got, &want);
            assert!(
                diff < 1e-4 * (n as f32).sqrt() * 4.0,
                "backward {t}×{n}×{k}: {diff}"
            );
        }
    }
}
