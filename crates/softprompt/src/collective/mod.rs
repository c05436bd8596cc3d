//! What data-parallel training exchanges between its processes ("ranks"), behind one small trait
//! so that the loop does not know what carries it: `SingleProcess` (the default: one rank, nothing
//! to exchange), MPI (`mpi.rs`, cargo feature `mpi`), and later NCCL on GPUs.
//!
//! The backbone is frozen and the same on every rank, so a step exchanges only the gradients of
//! the prompt and the head (20 × 384 + 2 × 385 floats for MiniLM's defaults: 34 KB), and an
//! evaluation only its counts.

#[cfg(feature = "mpi")]
pub mod mpi;

use crate::{bail, Result};
use candle_core::{DType, Tensor};
use std::ops::Range;

/// The collective operations of a fixed group of ranks. Every rank calls each operation in the
/// same order; a rank that calls none while the others wait hangs them, so a rank that fails ends
/// the group (`abort`).
pub trait Collective: Sync {
    /// 0 ..size; rank 0 writes the run's files and speaks for it
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Replaces `values` on every rank by their sum over the ranks.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()>;
    /// `all_reduce_sum` in f64, for the counts and sums of an evaluation.
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Gives every rank rank 0's `bytes`.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;
    /// Returns on each rank once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the group with `code`: what a rank does with an error the others cannot
    /// know of.
    fn abort(&self, code: i32) -> !;
}

/// One process alone: every operation is the identity.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The part of `len` items that `rank` of `size` takes: contiguous, and no two parts differ by
/// more than one item. Items past the ranks' count leave the last ranks an empty part.
pub fn shard(len: usize, rank: usize, size: usize) -> Range<usize> {
    len * rank / size..len * (rank + 1) / size
}

/// Whether `flag` is set on any rank (a Ctrl-C heard by one rank stops them all at one step).
pub fn any(collective: &dyn Collective, flag: bool) -> Result<bool> {
    if collective.size() == 1 {
        return Ok(flag);
    }
    let mut count = [f32::from(u8::from(flag))];
    collective.all_reduce_sum(&mut count)?;
    Ok(count[0] > 0.0)
}

/// Checks that every rank runs the same job: each compares its `description` (one `name: value`
/// per line: the options, the model's shapes, the data's hashes) with rank 0's. When any differs,
/// every rank returns the same error, naming the first rank that differs and its lines that do.
pub fn agree(collective: &dyn Collective, description: &str) -> Result<()> {
    if collective.size() == 1 {
        return Ok(());
    }
    let mut first = description.as_bytes().to_vec();
    collective.broadcast(&mut first)?;
    let first = String::from_utf8_lossy(&first).into_owned();
    let mut differing = vec![0f32; collective.size()];
    differing[collective.rank()] = f32::from(u8::from(first != description));
    collective.all_reduce_sum(&mut differing)?;
    let Some(rank) = differing.iter().position(|&d| d > 0.0) else {
        return Ok(());
    };
    // that rank's description, to every rank: whichever rank's error is printed first says it all
    let theirs = from_one_rank(collective, rank, description.as_bytes())?;
    let theirs = String::from_utf8_lossy(&theirs);
    let ours: Vec<&str> = first.lines().collect();
    let lines: Vec<String> = theirs
        .lines()
        .filter(|line| !ours.contains(line))
        .map(|line| format!("\n  rank {rank}: {line}"))
        .collect();
    let rank_0: Vec<String> = ours
        .iter()
        .filter(|line| !theirs.lines().any(|l| l == **line))
        .map(|line| format!("\n  rank 0: {line}"))
        .collect();
    let others = differing.iter().filter(|&&d| d > 0.0).count();
    bail!(
        "rank {rank} does not run rank 0's job ({others} of {} ranks differ): the model, data and options must be the same on every rank{}{}",
        collective.size(),
        rank_0.concat(),
        lines.concat()
    )
}

/// `bytes` of rank `from`, on every rank (`broadcast` is from rank 0; this is the rare other
/// case, by all-reduce of a buffer only `from` fills).
fn from_one_rank(collective: &dyn Collective, from: usize, bytes: &[u8]) -> Result<Vec<u8>> {
    let ours = collective.rank() == from;
    let mut len = [if ours { bytes.len() as f32 } else { 0.0 }];
    collective.all_reduce_sum(&mut len)?;
    let mut buffer = vec![0f32; len[0] as usize];
    if ours {
        buffer
            .iter_mut()
            .zip(bytes)
            .for_each(|(v, &b)| *v = f32::from(b));
    }
    collective.all_reduce_sum(&mut buffer)?;
    Ok(buffer.into_iter().map(|v| v as u8).collect())
}

/// The gradients of a global batch from each rank's part of it: each rank's `loss` and `grads`
/// are means over its `terms` (its rows, or its target tokens), so the global mean weighs them
/// by `terms`. One all-reduce carries every gradient, the loss and the count. → (loss, grads),
/// the same on every rank.
pub fn mean_over_ranks(
    collective: &dyn Collective,
    loss: f64,
    terms: usize,
    grads: Vec<Tensor>,
) -> Result<(f64, Vec<Tensor>)> {
    if collective.size() == 1 {
        return Ok((loss, grads));
    }
    let weight = terms as f64;
    let mut buffer = Vec::new();
    for g in &grads {
        let values = (g.to_dtype(DType::F64)? * weight)?;
        let values = values
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        buffer.extend(values);
    }
    buffer.extend([(loss * weight) as f32, terms as f32]);
    let _span = tracing::trace_span!("all_reduce", bytes = buffer.len() * 4).entered();
    collective.all_reduce_sum(&mut buffer)?;
    let total = buffer[buffer.len() - 1] as f64;
    if total == 0.0 {
        bail!("no rank had anything to learn from in this batch");
    }
    let mut offset = 0;
    let mut summed = Vec::with_capacity(grads.len());
    for g in &grads {
        let n = g.elem_count();
        let part = Tensor::from_slice(&buffer[offset..offset + n], g.shape(), g.device())?;
        summed.push((part.to_dtype(DType::F64)? / total)?.to_dtype(g.dtype())?);
        offset += n;
    }
    Ok((buffer[offset] as f64 / total, summed))
}

#[cfg(test)]
mod tests {
    use super::shard;

    #[test]
    fn shards_cover_every_item_once_and_differ_by_at_most_one() {
        for len in 0..40 {
            for size in 1..9 {
                let parts: Vec<_> = (0..size).map(|rank| shard(len, rank, size)).collect();
                let flat: Vec<usize> = parts.iter().cloned().flatten().collect();
                assert_eq!(
                    flat,
                    (0..len).collect::<Vec<_>>(),
                    "{len} items over {size}"
                );
                let sizes = parts.iter().map(|p| p.len());
                let (least, most) = (sizes.clone().min().unwrap(), sizes.max().unwrap());
                assert!(most - least <= 1, "{len} items over {size}: {parts:?}");
            }
        }
    }
}
