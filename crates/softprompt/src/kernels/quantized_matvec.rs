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
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has the features the function is compiled for
                return unsafe { task.run_avx2(w, y_t) };
            }
            task.run(w, y_t)
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

impl Task<'_> {
    /// The loops below are written so that the compiler turns each block into a few vector
    /// instructions; compiled for AVX2 + FMA, they are 8 floats wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, w: &[u8], y_t: &mut [f32]) {
        self.run(w, y_t)
    }

    /// w: the blocks from this task's first row on; y_t [rows, T].
    #[inline(always)]
    fn run(&self, w: &[u8], y_t: &mut [f32]) {
        match self.kind {
            GgmlDType::Q8_0 => self.rows::<Q8_0>(w, y_t),
            GgmlDType::Q4_1 => self.rows::<Q4_1>(w, y_t),
            _ => self.rows::<Q4_0>(w, y_t),
        }
    }

    /// w: the blocks from this task's first row on; y_t [rows, T].
    #[inline(always)]
    fn rows<B: Block>(&self, w: &[u8], y_t: &mut [f32]) {
        let rows = self.xs.len() / self.in_dim;
        let mut dense = vec![0f32; if rows > 1 { self.in_dim } else { 0 }];
        for (w, y) in w.chunks(self.row_bytes).zip(y_t.chunks_mut(rows)) {
            if rows == 1 {
                y[0] = dot_blocks::<B>(w, self.xs, self.block_sums);
                continue;
            }
            // several x rows: expand the matrix row once, then plain dot products
            for (block, out) in w.chunks_exact(B::BYTES).zip(dense.chunks_exact_mut(BLOCK)) {
                out.copy_from_slice(&B::values(block));
            }
            for (y, x) in y.iter_mut().zip(self.xs.chunks_exact(self.in_dim)) {
                *y = dot_f32(&dense, x);
            }
        }
    }
}

#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (a, b) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for j in 0..16 {
            acc[j] += a[j] * b[j];
        }
    }
    acc.iter().sum()
}

/// A block type, as the loops read it. (Generic functions, not closures: a closure is
/// compiled on its own, without the caller's AVX2, and called per block.)
trait Block {
    const BYTES: usize;
    /// the block's unscaled products, lane j holding elements j and j + 16
    fn lanes(block: &[u8], x: &[f32; BLOCK]) -> [f32; 16];
    /// the block's term that does not depend on q: m·Σx (Σ (d·q + m)·x = d·Σ q·x + m·Σ x)
    fn offset(block: &[u8], x_sum: f32) -> f32;
    /// the 32 values d·q + m
    fn values(block: &[u8]) -> [f32; BLOCK];
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
    fn offset(_: &[u8], _: f32) -> f32 {
        0.0
    }
    #[inline(always)]
    fn values(block: &[u8]) -> [f32; BLOCK] {
        let (d, qs): (f32, &[u8; 32]) = (
            half_at(block, 0),
            block[2..34].try_into().expect("a Q8_0 block"),
        );
        let mut v = [0f32; BLOCK];
        for j in 0..BLOCK {
            v[j] = d * (qs[j] as i8) as f32;
        }
        v
    }
}

impl Block for Q4_0 {
    const BYTES: usize = 18;
    #[inline(always)]
    fn lanes(block: &[u8], x: &[f32; BLOCK]) -> [f32; 16] {
        nibbles_times(&block[2..18], x)
    }
    #[inline(always)]
    fn offset(block: &[u8], x_sum: f32) -> f32 {
        -8.0 * half_at(block, 0) * x_sum
    }
    #[inline(always)]
    fn values(block: &[u8]) -> [f32; BLOCK] {
        let d = half_at(block, 0);
        nibble_values(&block[2..18], d, -8.0 * d)
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    #[inline(always)]
    fn lanes(block: &[u8], x: &[f32; BLOCK]) -> [f32; 16] {
        nibbles_times(&block[4..20], x)
    }
    #[inline(always)]
    fn offset(block: &[u8], x_sum: f32) -> f32 {
        half_at(block, 2) * x_sum
    }
    #[inline(always)]
    fn values(block: &[u8]) -> [f32; BLOCK] {
        nibble_values(&block[4..20], half_at(block, 0), half_at(block, 2))
    }
}

#[inline(always)]
fn dot_blocks<B: Block>(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    // lane-wise accumulators: a float sum is only vectorized when its lanes are independent
    let mut acc = [0f32; 16];
    let mut offset = 0f32;
    for ((block, x), &sum) in w
        .chunks_exact(B::BYTES)
        .zip(x.chunks_exact(BLOCK))
        .zip(sums)
    {
        let d = half_at(block, 0);
        let s = B::lanes(block, x.try_into().expect("a block of x"));
        for j in 0..16 {
            acc[j] += d * s[j];
        }
        offset += B::offset(block, sum);
    }
    acc.iter().sum::<f32>() + offset
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

/// The 4-bit quants as d·q + m.
#[inline(always)]
fn nibble_values(qs: &[u8], d: f32, m: f32) -> [f32; BLOCK] {
    let qs: &[u8; 16] = qs.try_into().expect("16 bytes of nibbles");
    let mut v = [0f32; BLOCK];
    for j in 0..16 {
        v[j] = d * (qs[j] & 15) as f32 + m;
        v[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
    v
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
    /// (negative values, an offset, sixteen distinct nibbles), for one x row (read block by
    /// block) and for several (each matrix row expanded once).
    #[test]
    fn matches_dequantized_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0.3f32, 1.0, (70, 96), &dev)?;
        for rows in [1, 3] {
            let x = Tensor::randn(0f32, 1.0, (rows, 96), &dev)?;
            for kind in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
                let q = QTensor::quantize(&w, kind)?;
                let want = x.matmul(&q.dequantize(&dev)?.t()?)?;
                let got = matmul_t(&q, &x)?;
                let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    err <= 1e-5 * scale,
                    "{kind:?}, {rows} rows: max error {err} of {scale}"
                );
            }
        }
        Ok(())
    }
}
