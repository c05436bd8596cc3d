use candle_core::{DType, Device, Result, Tensor};

/// Rotary position embeddings in Hugging Face's "rotate half" layout: the first and second halves
/// of each head's K channels form the pairs. y = x·cos + rotate_half(x)·sin, with
/// rotate_half([x₁, x₂]) = [−x₂, x₁].
#[derive(Debug, Clone)]
pub struct Rope {
    /// [S_max, K] each, the half-width tables repeated twice as transformers builds them
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for `max_positions` positions of width `head_dim` with frequency base `theta`.
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        let angles: Vec<f64> = (0..max_positions)
            .flat_map(|p| {
                (0..head_dim)
                    .map(|c| p as f64 * inv_freq[c % half])
                    .collect::<Vec<_>>()
            })
            .collect();
        let angles = Tensor::from_vec(angles, (max_positions, head_dim), device)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    /// x [B, H, S, K] at `positions` → rotated x [B, H, S, K]
    pub fn forward(&self, x: &Tensor, positions: Positions) -> Result<Tensor> {
        let _span = tracing::trace_span!("rope.forward").entered();
        let (cos, sin) = self.tables(x, positions)?;
        x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?
    }

    /// dy [B, H, S, K] → dx = dy·cos + rotate_halfᵀ(dy·sin), with rotate_halfᵀ([z₁, z₂]) = [z₂, −z₁].
    pub fn backward(&self, dy: &Tensor, positions: Positions) -> Result<Tensor> {
        let _span = tracing::trace_span!("rope.backward").entered();
        let (cos, sin) = self.tables(dy, positions)?;
        let z = dy.broadcast_mul(&sin)?;
        let half = z.dim(3)? / 2;
        let transposed = Tensor::cat(&[z.narrow(3, half, half)?, z.narrow(3, 0, half)?.neg()?], 3)?;
        dy.broadcast_mul(&cos)? + transposed
    }

    /// cos and sin at the positions, [S, K] or [B, 1, S, K]
    fn tables(&self, x: &Tensor, positions: Positions) -> Result<(Tensor, Tensor)> {
        match positions {
            Positions::From(offset) => {
                let s = x.dim(2)?;
                Ok((
                    self.cos.narrow(0, offset, s)?,
                    self.sin.narrow(0, offset, s)?,
                ))
            }
            Positions::Ids(ids) => {
                let (b, s) = ids.dims2()?;
                let k = self.cos.dim(1)?;
                let at = |table: &Tensor| {
                    table
                        .index_select(&ids.flatten_all()?, 0)?
                        .reshape((b, 1, s, k))
                };
                Ok((at(&self.cos)?, at(&self.sin)?))
            }
        }
    }
}

/// The position of each of S columns.
#[derive(Debug, Clone, Copy)]
pub enum Positions<'a> {
    /// offset, offset + 1, … in every row
    From(usize),
    /// [B, S] u32, per row: a left-padded row's first real token is not at column 0
    Ids(&'a Tensor),
}

impl<'a> Positions<'a> {
    /// `backbone::input_positions`' answer: per-row ids, or none for offset..offset + S.
    pub fn from_ids(offset: usize, ids: Option<&'a Tensor>) -> Self {
        ids.map_or(Positions::From(offset), Positions::Ids)
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(3)? / 2;
    Tensor::cat(&[x.narrow(3, half, half)?.neg()?, x.narrow(3, 0, half)?], 3)
}
