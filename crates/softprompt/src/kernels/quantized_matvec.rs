//! y = x·Wᵀ for a few rows x [T, IN], read straight from a GGUF matrix's quantized blocks.
//!
//! Generating one token multiplies each matrix by a single vector, so the time is the time to
//! read the matrix from memory (about 8 GB/s on a 2-core cloud CPU, which makes an f32 GPT-2 small
//! ~60 ms a token however it is multiplied). Reading a Q4_1 matrix is 0.625 bytes a weight instead
//! of 4. Each block is expanded in registers and multiplied with the f32 activations, so the
//! result is the dequantized matrix's product up to summation order (llama.cpp instead rounds
//! the activations to 8 bits). candle's own quantized matmul is left alone here: its AVX2 dot
//! products are compiled only under `-C target-cpu`, and Q4_1 has none.
//!
//! Block layouts (ggml): Q4_0 `{d: f16, qs: [u8; 16]}` holds d·(q − 8); Q4_1 `{d: f16, m: f16,
//! qs: [u8; 16]}` holds d·q + m; Q8_0 `{d: f16, qs: [i8; 32]}` holds d·q. In the 4-bit types, byte
//! j holds element j in its low nibble and element j + 16 in its high one.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

const BLOCK: usize = 32;

/// The block types read here; others go through dequantize + matmul.
pub fn supports(kind: GgmlDType) -> bool {
    matches!(kind, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

/// blocks [OUT, IN] of a supported type, x [T, IN] f32 on the CPU → [T, OUT] f32.
pub fn matmul_t(blocks: &QTensor, x: &Tensor) -> Result<Tensor> {
    let (out_dim, in_dim) = blocks.shape().dims2()?;
    let (rows, x_in) = x.dims2()?;
    if x_in != in_dim || in_dim % BLOCK != 0 || !supports(blocks.dtype()) {
        candle_core::bail!(
            "quantized matvec: x [{rows}, {x_in}] against {:?} [{out_dim}, {in_dim}]",
            blocks.dtype()
        );
    }
    let data = blocks.data()?;
    let row_bytes = data.len() / out_dim;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    // Σx of each block of each row: the Q4_1 offset m and the Q4_0 bias −8 multiply it
    let block_sums: Vec<f32> = xs.chunks(BLOCK).map(|b| b.iter().sum()).collect();
    let kind = blocks.dtype();
    // y is computed transposed, [OUT, T], so that each thread owns whole matrix rows
    let mut y_t = vec![0f32; out_dim * rows];
    const ROWS_PER_TASK: usize = 64;
    y_t.par_chunks_mut(ROWS_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, y_t)| {
            let w = &data[task * ROWS_PER_TASK * row_bytes..];
            let task = Task {
                kind,
                row_bytes,
                in_dim,
                xs: &xs,
                block_sums: &block_sums,
            };
            if rows == 1 {
                run_one(&task, w, y_t)
            } else {
                run_several(&task, w, y_t)
            }
        });
    Tensor::from_vec(y_t, (out_dim, rows), x.device())?
        .t()?
        .contiguous()
}

/// One thread's share: consecutive matrix rows against every x row.
struct Task<'a> {
    kind: GgmlDType,
    row_bytes: usize,
    in_dim: usize,
    /// [T, IN]
    xs: &'a [f32],
    /// [T, IN / 32]
    block_sums: &'a [f32],
}

/// A task's rows: w, the blocks from its first row on; y_t [rows, T]. The loops below are written so
/// that the compiler turns each block into a few vector instructions. Several x rows run compiled
/// for AVX-512 (16 floats wide) where the CPU has it; one x row runs 8 wide even there, its four
/// AVX2 registers of a block's 32 lanes four independent chains of additions where two AVX-512
/// registers are two (a row alone is bound by reading the matrix, and the chains' latency shows).
/// Each lane's arithmetic is the same at any width, so the results are too.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn run_several(task: &Task, w: &[u8], y_t: &mut [f32]) {
    task.run(w, y_t)
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn run_one(task: &Task, w: &[u8], y_t: &mut [f32]) {
    task.run(w, y_t)
}

impl Task<'_> {
    #[inline(always)]
    fn run(&self, w: &[u8], y_t: &mut [f32]) {
        match self.kind {
            GgmlDType::Q8_0 => self.rows::<Q8_0>(w, y_t),
            GgmlDType::Q4_1 => self.rows::<Q4_1>(w, y_t),
            _ => self.rows::<Q4_0>(w, y_t),
        }
    }

    /// w: the blocks from this task's first row on; y_t [rows, T]. Each matrix row against eight x
    /// rows at a time, then four (its blocks read once for them, independent chains of products),
    /// the rest one at a time: a row's arithmetic is the same either way, so its result does not
    /// depend on the rows beside it, and a text decodes the same alone as in a batch.
    #[inline(always)]
    fn rows<B: Block>(&self, w: &[u8], y_t: &mut [f32]) {
        let (n, sums_per_row) = (self.in_dim, self.in_dim / BLOCK);
        let rows = self.xs.len() / n;
        let x_row = |r: usize| {
            (
                &self.xs[r * n..(r + 1) * n],
                &self.block_sums[r * sums_per_row..(r + 1) * sums_per_row],
            )
        };
        for (w, y) in w.chunks(self.row_bytes).zip(y_t.chunks_mut(rows)) {
            let mut r = 0;
            while r + 8 <= rows {
                let eight = std::array::from_fn(|i| x_row(r + i));
                y[r..r + 8].copy_from_slice(&dot_blocks_together::<B, 8>(w, eight));
                r += 8;
            }
            while r + 4 <= rows {
                let four = std::array::from_fn(|i| x_row(r + i));
                y[r..r + 4].copy_from_slice(&dot_blocks_together::<B, 4>(w, four));
                r += 4;
            }
            for (r, y) in y.iter_mut().enumerate().skip(r) {
                *y = dot_blocks_together::<B, 1>(w, [x_row(r)])[0];
            }
        }
    }
}

/// A block type, as the loops read it. (Generic functions, not closures: a closure is
/// compiled on its own, without the caller's AVX2, and called per block.)
trait Block {
    const BYTES: usize;
    /// the block's 32 quants as floats (exact: they are small integers)
    fn quants(block: &[u8]) -> [f32; BLOCK];
    /// the factor of Σx in the block's term that does not depend on q: m for d·q + m (Σ (d·q +
    /// m)·x = d·Σ q·x + m·Σ x), −8·d for d·(q − 8)
    fn offset(block: &[u8]) -> f32;
}

struct Q8_0;
struct Q4_0;
struct Q4_1;

impl Block for Q8_0 {
    const BYTES: usize = 34;
    #[inline(always)]
    fn quants(block: &[u8]) -> [f32; BLOCK] {
        let qs: &[u8; 32] = block[2..34].try_into().expect("a Q8_0 block");
        let mut q = [0f32; BLOCK];
        for (q, &b) in q.iter_mut().zip(qs) {
            *q = (b as i8) as f32;
        }
        q
    }
    #[inline(always)]
    fn offset(_: &[u8]) -> f32 {
        0.0
    }
}

impl Block for Q4_0 {
    const BYTES: usize = 18;
    #[inline(always)]
    fn quants(block: &[u8]) -> [f32; BLOCK] {
        nibbles(&block[2..18])
    }
    #[inline(always)]
    fn offset(block: &[u8]) -> f32 {
        -8.0 * half_at(block, 0)
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    #[inline(always)]
    fn quants(block: &[u8]) -> [f32; BLOCK] {
        nibbles(&block[4..20])
    }
    #[inline(always)]
    fn offset(block: &[u8]) -> f32 {
        half_at(block, 2)
    }
}

/// The dot products of one matrix row (its blocks `w`) with N x rows and their block sums: a
/// block's quants are widened and scaled, and its scales read, once for the N (eight rows share
/// a block's scalar work twice as well as four: 8 texts of SmolLM2 Q4_1 decode 1.17× as fast),
/// and each row's sums are the same as with N = 1.
#[inline(always)]
fn dot_blocks_together<B: Block, const N: usize>(w: &[u8], xs: [(&[f32], &[f32]); N]) -> [f32; N] {
    let (mut acc, mut offset) = ([[0f32; BLOCK]; N], [0f32; N]);
    for (b, block) in w.chunks_exact(B::BYTES).enumerate() {
        let (scaled, m) = (scaled_quants::<B>(block), B::offset(block));
        for ((acc, offset), (x, sums)) in acc.iter_mut().zip(&mut offset).zip(&xs) {
            let x = &x[b * BLOCK..(b + 1) * BLOCK];
            add_block(acc, offset, (&scaled, m), x, sums[b]);
        }
    }
    std::array::from_fn(|r| acc[r].iter().sum::<f32>() + offset[r])
}

/// d·q of each of a block's elements: its weights but for the offset.
#[inline(always)]
fn scaled_quants<B: Block>(block: &[u8]) -> [f32; BLOCK] {
    let (mut q, d) = (B::quants(block), half_at(block, 0));
    for q in &mut q {
        *q *= d;
    }
    q
}

/// One block of a dot product: element j's product into lane j of `acc` by a fused
/// multiply-add (a float sum is only vectorized when its lanes are independent), the block's
/// offset term into `offset`.
#[inline(always)]
fn add_block(
    acc: &mut [f32; BLOCK],
    offset: &mut f32,
    (scaled, m): (&[f32; BLOCK], f32),
    x: &[f32],
    x_sum: f32,
) {
    let x: &[f32; BLOCK] = x.try_into().expect("a block of x");
    for j in 0..BLOCK {
        acc[j] = scaled[j].mul_add(x[j], acc[j]);
    }
    *offset += m * x_sum;
}

/// The 4-bit quants in element order: byte j holds element j in its low nibble, j + 16 in its
/// high one.
#[inline(always)]
fn nibbles(qs: &[u8]) -> [f32; BLOCK] {
    let qs: &[u8; 16] = qs.try_into().expect("16 bytes of nibbles");
    let mut q = [0f32; BLOCK];
    for j in 0..16 {
        q[j] = (qs[j] & 15) as f32;
        q[j + 16] = (qs[j] >> 4) as f32;
    }
    q
}

/// The f16 at a byte offset, converted without branches: the exponent and mantissa moved into
/// an f32's place and rescaled by 2^112 (the difference of the biases, exact; it also normalizes
/// an f16 subnormal), all-ones exponents kept infinite or NaN. half's `to_f32` is a call that
/// spills the accumulators, its `to_f32_const` branches on the exponent in every block.
#[inline(always)]
fn half_at(block: &[u8], at: usize) -> f32 {
    let h = u16::from_le_bytes([block[at], block[at + 1]]) as u32;
    let magnitude = f32::from_bits((h & 0x7fff) << 13) * f32::from_bits(0x7780_0000);
    let magnitude = if h & 0x7c00 == 0x7c00 {
        f32::from_bits(((h & 0x3ff) << 13) | 0x7f80_0000)
    } else {
        magnitude
    };
    f32::from_bits(magnitude.to_bits() | ((h & 0x8000) << 16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Each block type against dequantize + matmul, on rows with all of a block's structure
    /// (negative values, an offset, sixteen distinct nibbles), for one x row and for several
    /// (eight and four at a time and the rest); and each row of several equals that row alone,
    /// bit for bit.
    #[test]
    fn matches_dequantized_matmul_and_rows_do_not_depend_on_their_company() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0.3f32, 1.0, (70, 96), &dev)?;
        for rows in [1, 3, 13] {
            let x = Tensor::randn(0f32, 1.0, (rows, 96), &dev)?;
            for kind in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
                let q = QTensor::quantize(&w, kind)?;
                let want = x.matmul(&q.dequantize(&dev)?.t()?)?;
                let got = matmul_t(&q, &x)?;
                let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    err <= 1e-5 * scale,
                    "{kind:?}, {rows} rows: max error {err} of {scale}"
                );
                for r in 0..rows {
                    let alone = matmul_t(&q, &x.narrow(0, r, 1)?)?;
                    assert_eq!(
                        alone.flatten_all()?.to_vec1::<f32>()?,
                        got.get(r)?.to_vec1::<f32>()?,
                        "{kind:?}: row {r} of {rows} differs from itself alone"
                    );
                }
            }
        }
        Ok(())
    }

    /// Every f16 (zeros, subnormals, normals, infinities, NaNs of both signs) as half reads it.
    #[test]
    fn half_at_reads_every_f16_as_half_does() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = half_at(&h.to_le_bytes(), 0);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got:e} against {want:e}"
            );
        }
    }
}
