use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use std::borrow::Cow;
use std::sync::Arc;

use super::fused::fused_for;
use super::{bf16_matmul, fused_linear, quantized_matvec};

/// Up to this many rows, reading the quantized blocks once per row beats dequantizing the matrix
/// and multiplying (measured on GPT-2 small's MLP matrices, Q8_0 and Q4_1: 16 rows 39 vs 54 ms,
/// 32 rows 64 vs 66 ms).
const MATVEC_ROWS: usize = 32;

/// A frozen matrix [OUT, IN]: dense, held in bf16 (`--dtype bf16`: half the memory, computed
/// with f32 sums), or a GGUF file's quantized blocks kept as they are (`--keep-quantized`) and
/// dequantized at each use, so that only the layer at work is ever dense.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    /// [OUT, IN] bf16, contiguous; products on the CPU's bf16 dot product where it has one
    /// (`bf16_matmul`), else widened to f32 for each use
    Bf16(Tensor),
    Quantized {
        blocks: Arc<QTensor>,
        /// what it is dequantized to
        dtype: DType,
    },
}

impl Weight {
    /// The matrix as a dense tensor; for a quantized one, a copy made now.
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Bf16(t) => t.to_dtype(DType::F32),
            Weight::Quantized { blocks, dtype } => {
                blocks.dequantize(&blocks.device())?.to_dtype(*dtype)
            }
        }
    }

    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(t) | Weight::Bf16(t) => t.dims(),
            Weight::Quantized { blocks, .. } => blocks.shape().dims(),
        }
    }

    /// What it is, or dequantizes to.
    pub fn dtype(&self) -> DType {
        match self {
            Weight::Dense(t) => t.dtype(),
            Weight::Bf16(_) => DType::F32,
            Weight::Quantized { dtype, .. } => *dtype,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Weight::Dense(t) | Weight::Bf16(t) => t.device().clone(),
            Weight::Quantized { blocks, .. } => blocks.device(),
        }
    }

    /// Rows `ids` [N] u32 as a dense [N, IN]: an embedding lookup. A quantized matrix
    /// dequantizes only those rows.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => t.index_select(ids, 0),
            Weight::Bf16(t) => t.index_select(ids, 0)?.to_dtype(DType::F32),
            Weight::Quantized { .. } => {
                let ids: Vec<usize> = ids.to_vec1::<u32>()?.iter().map(|&i| i as usize).collect();
                if let Some(&bad) = ids.iter().find(|&&i| i >= self.dims()[0]) {
                    candle_core::bail!(
                        "row {bad} of a [{}, {}] matrix",
                        self.dims()[0],
                        self.dims()[1]
                    );
                }
                self.select_rows(&ids)?.dense()
            }
        }
    }

    /// x [T, IN] → x·Wᵀ [T, OUT]. A few f32 rows (a generated token) against quantized blocks
    /// read the blocks directly; otherwise the matrix is dense for the product.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Quantized { blocks, .. }
                if x.dim(0)? <= MATVEC_ROWS
                    && x.dtype() == DType::F32
                    && x.device().is_cpu()
                    && quantized_matvec::supports(blocks.dtype()) =>
            {
                quantized_matvec::matmul_t(blocks, x)
            }
            Weight::Bf16(w) if bf16_serves(x) => bf16_matmul::forward(&x.contiguous()?, w, None),
            // a decode step's rows (the next-token head): W read once, not packed for gemm
            Weight::Dense(w)
                if x.dim(0)? <= fused_linear::FEW_ROWS
                    && !x.track_op()
                    && x.is_contiguous()
                    && w.is_contiguous()
                    && x.dtype() == w.dtype()
                    && x.rank() == 2
                    && x.device().is_cpu() =>
            {
                match x.dtype() {
                    DType::F64 => fused_linear::forward::<f64>(x, w, None),
                    DType::F32 => fused_linear::forward::<f32>(x, w, None),
                    _ => x.matmul(&w.t()?),
                }
            }
            _ => x.matmul(&self.dense()?.t()?),
        }
    }

    /// Rows [OUT] in the given order: `rows[i]` is the source row of row i. Quantized blocks run
    /// along a row, so a quantized matrix is reordered without dequantizing it.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Weight> {
        let ids = || -> Result<Tensor> {
            let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            Tensor::new(ids, &self.device())
        };
        match self {
            Weight::Dense(t) => Ok(Weight::Dense(t.index_select(&ids()?, 0)?)),
            Weight::Bf16(t) => Ok(Weight::Bf16(t.index_select(&ids()?, 0)?)),
            Weight::Quantized { blocks, dtype } => {
                let data = blocks.data()?;
                let row_bytes = data.len() / self.dims()[0];
                let bytes = rows
                    .iter()
                    .flat_map(|&r| &data[r * row_bytes..(r + 1) * row_bytes])
                    .copied()
                    .collect();
                let dims = (rows.len(), self.dims()[1]);
                Self::quantized(bytes, blocks.dtype(), dims, *dtype, blocks)
            }
        }
    }

    /// Matrices with the same IN stacked along OUT (q, k and v into one projection). Quantized
    /// ones of one block type stay quantized.
    pub fn cat(parts: &[&Weight]) -> Result<Weight> {
        let quantized: Option<Vec<(&Arc<QTensor>, DType)>> = parts
            .iter()
            .map(|w| match w {
                Weight::Quantized { blocks, dtype } => Some((blocks, *dtype)),
                Weight::Dense(_) | Weight::Bf16(_) => None,
            })
            .collect();
        if parts.iter().all(|w| matches!(w, Weight::Bf16(_))) {
            let bf16: Vec<Tensor> = parts.iter().map(|w| w.bf16()).collect::<Result<_>>()?;
            return Ok(Weight::Bf16(Tensor::cat(&bf16, 0)?));
        }
        match quantized {
            Some(q) if q.iter().all(|(b, _)| b.dtype() == q[0].0.dtype()) => {
                let mut bytes = Vec::new();
                for (b, _) in &q {
                    bytes.extend_from_slice(&b.data()?);
                }
                let rows = parts.iter().map(|w| w.dims()[0]).sum::<usize>();
                let dims = (rows, parts[0].dims()[1]);
                Self::quantized(bytes, q[0].0.dtype(), dims, q[0].1, q[0].0)
            }
            _ => {
                let dense = parts
                    .iter()
                    .map(|w| w.dense())
                    .collect::<Result<Vec<_>>>()?;
                Ok(Weight::Dense(Tensor::cat(&dense, 0)?))
            }
        }
    }

    /// The matrix held in bf16 (rounded to nearest even).
    pub fn to_bf16(&self) -> Result<Weight> {
        Ok(Weight::Bf16(self.bf16()?))
    }

    fn bf16(&self) -> Result<Tensor> {
        match self {
            Weight::Bf16(t) => Ok(t.clone()),
            _ => self.dense()?.to_dtype(DType::BF16)?.contiguous(),
        }
    }

    /// The matrix rounded to GGUF blocks of `kind` (what llama.cpp's quantize would make of it).
    pub fn quantize(&self, kind: GgmlDType) -> Result<Weight> {
        let dense = self.dense()?;
        Ok(Weight::Quantized {
            blocks: Arc::new(QTensor::quantize(&dense.to_dtype(DType::F32)?, kind)?),
            dtype: dense.dtype(),
        })
    }

    fn quantized(
        bytes: Vec<u8>,
        kind: GgmlDType,
        dims: (usize, usize),
        dtype: DType,
        like: &QTensor,
    ) -> Result<Weight> {
        let storage = QStorage::from_data(Cow::Owned(bytes), &like.device(), kind)?;
        Ok(Weight::Quantized {
            blocks: Arc::new(QTensor::new(storage, dims)?),
            dtype,
        })
    }
}

/// Whether the bf16 kernel takes `rows` [T, IN]: f32 on a CPU with the bf16 dot product, and no
/// candle autograd to record.
fn bf16_serves(rows: &Tensor) -> bool {
    rows.dtype() == DType::F32
        && rows.device().is_cpu()
        && rows.rank() == 2
        && !rows.track_op()
        && bf16_matmul::native()
}

/// A frozen affine map, stored as Hugging Face stores it: `weight` [OUT, IN], `bias` [OUT].
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::from_weight(Weight::Dense(weight), bias)
    }

    /// A dense matrix that narrows (IN > OUT) is stored column by column, the same [OUT, IN]
    /// tensor with the other strides: gemm runs a product at full speed only when its long inner
    /// dimension runs along B's rows, and the forward's inner dimension is IN.
    pub fn from_weight(weight: Weight, bias: Option<Tensor>) -> Self {
        let weight = match weight {
            Weight::Dense(w) => Weight::Dense(match w.dims2() {
                Ok((out_dim, inner)) if inner > out_dim && w.device().is_cpu() => w
                    .t()
                    .and_then(|t| t.contiguous())
                    .and_then(|t| t.t())
                    .unwrap_or(w),
                _ => w,
            }),
            other => other,
        };
        Self { weight, bias }
    }

    /// The same map with its weight dense: for a quantized one, dequantized once for several uses.
    pub fn densified(&self) -> Result<Linear> {
        Ok(match &self.weight {
            Weight::Dense(_) | Weight::Bf16(_) => self.clone(),
            Weight::Quantized { .. } => Linear::new(self.weight.dense()?, self.bias.clone()),
        })
    }

    /// The same map with its weight held in bf16.
    pub fn to_bf16(&self) -> Result<Linear> {
        Ok(Linear::from_weight(
            self.weight.to_bf16()?,
            self.bias.clone(),
        ))
    }

    /// The same map with its weight rounded to GGUF blocks of `kind`.
    pub fn quantize(&self, kind: GgmlDType) -> Result<Linear> {
        Ok(Linear::from_weight(
            self.weight.quantize(kind)?,
            self.bias.clone(),
        ))
    }

    /// x [T, IN] → y [T, OUT] = x·Wᵀ + b. Nothing needs saving: the backward reads only W.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = {
            let _span = tracing::trace_span!("linear.forward", shape = %self.shape(), flops = self.flops(x)?)
                .entered();
            if let Some(w) = self.fused_weight(x) {
                let bias = self.bias.as_ref();
                return match x.dtype() {
                    DType::F64 => fused_linear::forward::<f64>(x, w, bias),
                    _ => fused_linear::forward::<f32>(x, w, bias),
                };
            }
            if let (Weight::Bf16(w), true) = (&self.weight, bf16_serves(x)) {
                let bias = self.bias.as_ref().filter(|b| b.dtype() == DType::F32);
                let y = bf16_matmul::forward(&x.contiguous()?, w, bias)?;
                return match (&self.bias, bias) {
                    (Some(b), None) => y.broadcast_add(b),
                    _ => Ok(y),
                };
            }
            self.weight.apply(x)?
        };
        match &self.bias {
            Some(b) => {
                let _span = tracing::trace_span!("bias").entered();
                y.broadcast_add(b)
            }
            None => Ok(y),
        }
    }

    /// dy [T, OUT] → dx [T, IN] = dy·W. The weight gradient (dyᵀ·x) is never formed.
    pub fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        let _span =
            tracing::trace_span!("linear.backward", shape = %self.shape(), flops = self.flops(dy)?)
                .entered();
        match (self.fused_weight(dy), &self.weight) {
            (Some(w), _) if dy.dtype() == DType::F64 => fused_linear::backward::<f64>(dy, w),
            (Some(w), _) => fused_linear::backward::<f32>(dy, w),
            (None, Weight::Bf16(w)) if bf16_serves(dy) => {
                bf16_matmul::backward(&dy.contiguous()?, w)
            }
            (None, _) => dy.matmul(&self.weight.dense()?),
        }
    }

    /// The dense weight, where the fused CPU products serve `rows` [T, ..]: f32 or f64 on the
    /// CPU, everything contiguous and of one dtype, and no candle autograd to record (a taped
    /// head's pooler goes through candle's matmul, which it can differentiate).
    fn fused_weight(&self, rows: &Tensor) -> Option<&Tensor> {
        let fits = |t: &Tensor| t.is_contiguous() && t.dtype() == rows.dtype();
        match &self.weight {
            Weight::Dense(w)
                if fused_for(rows)
                    && !rows.track_op()
                    && rows.rank() == 2
                    && fits(rows)
                    && w.dtype() == rows.dtype()
                    && fused_linear::weight_strides(w.layout()).is_some()
                    && self.bias.as_ref().is_none_or(fits) =>
            {
                Some(w)
            }
            _ => None,
        }
    }

    /// "IN→OUT", which tells the profiler's matmuls apart.
    fn shape(&self) -> String {
        format!("{}→{}", self.weight.dims()[1], self.weight.dims()[0])
    }

    /// The FLOPs of one product of T `rows` [T, ..] with the weight: 2·T·IN·OUT.
    fn flops(&self, rows: &Tensor) -> Result<u64> {
        let t = rows.elem_count() / rows.dim(candle_core::D::Minus1)?.max(1);
        Ok((2 * t * self.weight.dims().iter().product::<usize>()) as u64)
    }
}
