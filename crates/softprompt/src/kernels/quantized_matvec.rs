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
use half::f16;
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
/// for AVX-512 (16 floats wide) where the CPU has it; one x row runs 8 wide even there, its two
/// AVX2 registers two independent chains of additions where one AVX-512 register is one chain
/// (1536 × 576 in Q4_1 on Zen 5: 61–72 µs against 92–103). Each lane's arithmetic is the same at any
/// width, so the results are too.
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

    /// w: the blocks from this task's first row on; y_t [rows, T]. Each matrix row against four x
    /// rows at a time (its blocks read once for the four, four independent chains of products),
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
            while r + 4 <= rows {
                let four = [x_row(r), x_row(r + 1), x_row(r + 2), x_row(r + 3)];
                y[r..r + 4].copy_from_slice(&dot_blocks_four::<B>(w, four));
                r += 4;
            }
            for (r, y) in y.iter_mut().enumerate().skip(r) {
                *y = dot_blocks::<B>(w, x_row(r));
            }
        }
    }
}

/// A block type, as the loops read it. (Generic functions, not closures: a closure is
/// compiled on its own, without the caller's AVX2, and called per block.)
trait Block {
    const BYTES: usize;
    /// the block's unscaled products, lane j holding elements j and j + 16
    fn lanes(block: &[u8], x: &[f32; BLOCK]) -> [f32; 16];
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
    fn lanes(block: &[u8], x: &[f32; BLOCK]) -> [f32; 16] {
        let qs: &[u8; 32] = block[2..34].try_into().expect("a Q8_0 block");
        let mut s = [0f32; 16];
        for j in 0..16 {
            s[j] = (qs[j] as i8) as f32 * x[j] + (qs[j + 16] as i8) as f32 * x[j + 16];
        }
        s
    }
    #[inline(always)]
    fn offset(_: &[u8]) -> f32 {
        0.0
    }
}

impl Block for Q4_0 {
    const BYTES: usize = 18;
    #[inline(always)]
    fn lanes(block: &[u8], x: &[f32; BLOCK]) -> [f32; 16] {
        nibbles_times(&block[2..18], x)
    }
    #[inline(always)]
    fn offset(block: &[u8]) -> f32 {
        -8.0 * half_at(block, 0)
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    #[inline(always)]
    fn lanes(block: &[u8], x: &[f32; BLOCK]) -> [f32; 16] {
        nibbles_times(&block[4..20], x)
    }
    #[inline(always)]
    fn offset(block: &[u8]) -> f32 {
        half_at(block, 2)
    }
}

/// The dot product of one matrix row (its blocks `w`) with one x row and its block sums.
#[inline(always)]
fn dot_blocks<B: Block>(w: &[u8], (x, sums): (&[f32], &[f32])) -> f32 {
    let (mut acc, mut offset) = ([0f32; 16], 0f32);
    for ((block, x), &sum) in w
        .chunks_exact(B::BYTES)
        .zip(x.chunks_exact(BLOCK))
        .zip(sums)
    {
        // `add_block`'s arithmetic written out: through the helper the compiler reads the
        // block's offset ahead of its quants and this loop runs 35 % slower (1536 × 576 Q4_1 on
        // Zen 5: 93–104 µs against 68–72)
        let d = half_at(block, 0);
        let s = B::lanes(block, x.try_into().expect("a block of x"));
        for j in 0..16 {
            acc[j] += d * s[j];
        }
        offset += B::offset(block) * sum;
    }
    acc.iter().sum::<f32>() + offset
}

/// `dot_blocks` for four x rows at once: a block's scales are read once for the four, and each
/// row's sums are those `dot_blocks` forms for it alone.
#[inline(always)]
fn dot_blocks_four<B: Block>(w: &[u8], xs: [(&[f32], &[f32]); 4]) -> [f32; 4] {
    let (mut acc, mut offset) = ([[0f32; 16]; 4], [0f32; 4]);
    for (b, block) in w.chunks_exact(B::BYTES).enumerate() {
        let (d, m) = (half_at(block, 0), B::offset(block));
        for ((acc, offset), (x, sums)) in acc.iter_mut().zip(&mut offset).zip(&xs) {
            let x = &x[b * BLOCK..(b + 1) * BLOCK];
            add_block::<B>(acc, offset, (block, d, m), x, sums[b]);
        }
    }
    std::array::from_fn(|r| acc[r].iter().sum::<f32>() + offset[r])
}

/// One block of a dot product: lane-wise into `acc` (a float sum is only vectorized when its
/// lanes are independent), its offset term into `offset`.
#[inline(always)]
fn add_block<B: Block>(
    acc: &mut [f32; 16],
    offset: &mut f32,
    (block, d, m): (&[u8], f32, f32),
    x: &[f32],
    x_sum: f32,
) {
    let s = B::lanes(block, x.try_into().expect("a block of x"));
    for j in 0..16 {
        acc[j] += d * s[j];
    }
    *offset += m * x_sum;
}

/// The 4-bit quants times x: lane j is q[j]·x[j] + q[j + 16]·x[j + 16].
#[inline(always)]
fn nibbles_times(qs: &[u8], x: &[f32; BLOCK]) -> [f32; 16] {
    let qs: &[u8; 16] = qs.try_into().expect("16 bytes of nibbles");
    let mut s = [0f32; 16];
    for j in 0..16 {
        s[j] = (qs[j] & 15) as f32 * x[j] + (qs[j] >> 4) as f32 * x[j + 16];
    }
    s
}

/// The f16 at a byte offset; the const conversion inlines into the vector loop, where `to_f32`
/// is a call that spills the accumulators.
#[inline(always)]
fn half_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32_const()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Each block type against dequantize + matmul, on rows with all of a block's structure
    /// (negative values, an offset, sixteen distinct nibbles), for one x row and for several
    /// (four at a time and the rest); and each row of several equals that row alone, bit for bit.
    #[test]
    fn matches_dequantized_matmul_and_rows_do_not_depend_on_their_company() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0.3f32, 1.0, (70, 96), &dev)?;
        for rows in [1, 3, 9] {
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
}
