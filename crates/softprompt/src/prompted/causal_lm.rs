//! A decoder learning to write targets (`--task causal-lm`): the loss is the frozen LM head's
//! next-token cross-entropy on the target tokens only (`task::causal_lm`), and the score is how
//! often greedy decoding would write each target exactly.

use super::{DevTally, Head, Prompted};
use crate::adapter::{Adapter, AdapterHead};
use crate::backbone::Backbone;
use crate::batch::{eval_batches, Batch, Batching, EncodedSet};
use crate::data::Example;
use crate::model::Model;
use crate::prompt::SoftPrompt;
use crate::task::causal_lm::{
    encode_pairs, logit_chunks, target_cross_entropy, TargetCounts, TargetScore,
};
use crate::task::classify::log_softmax;
use crate::task::HeadBackward;
use crate::tokenize::Encoded;
use crate::{bail, Result};
use candle_core::{DType, Tensor, Var, D};
use std::path::Path;

/// The decoder's own LM head [V, D], frozen: nothing of it trains or is stored.
pub struct CausalLm {
    pub lm_head: Tensor,
}

impl CausalLm {
    /// What exact match, token accuracy and token loss of `prompt` over encoded (input, target)
    /// pairs are made of.
    pub fn target_counts<B: Backbone>(
        &self,
        backbone: &B,
        prompt: &SoftPrompt,
        data: &[Encoded],
        batching: &Batching,
    ) -> Result<TargetCounts> {
        let lengths: Vec<usize> = data.iter().map(|e| e.ids.len()).collect();
        let mut counts = TargetCounts {
            examples: data.len(),
            ..Default::default()
        };
        for rows in eval_batches(&lengths, batching.size.max(1)) {
            let batch = Batch::new(data, None, &rows, batching.padding, &batching.device)?;
            let prompted = Prompted::new(backbone, prompt, &batch)?;
            let targets = batch.targets(prompted.output_mask().1)?;
            let hidden = backbone.forward(&prompted.input())?;
            let (b, s, d) = hidden.dims3()?;
            let flat = hidden.reshape((b * s, d))?;
            let mut missed = vec![false; batch.len()];
            for chunk in logit_chunks(&flat, &targets, &self.lm_head) {
                let (range, logits) = chunk?;
                let log_probs = log_softmax(&logits)?.to_dtype(DType::F32)?;
                let best = log_probs.argmax(D::Minus1)?.to_vec1::<u32>()?;
                let log_probs = log_probs.to_vec2::<f32>()?;
                for (i, t) in range.enumerate() {
                    let token = targets.tokens[t];
                    let hit = best[i] == token;
                    missed[targets.rows[t]] |= !hit;
                    counts.correct += usize::from(hit);
                    counts.loss -= log_probs[i][token as usize] as f64;
                }
            }
            counts.exact += missed.iter().filter(|&&m| !m).count();
            counts.tokens += targets.tokens.len();
        }
        Ok(counts)
    }
}

impl Head for CausalLm {
    fn params(&self) -> Vec<&Var> {
        Vec::new()
    }

    fn loss(
        &self,
        hidden: &Tensor,
        _mask: &Tensor,
        batch: &Batch,
        prompt_len: usize,
    ) -> Result<HeadBackward> {
        let targets = batch.targets(prompt_len)?;
        if targets.tokens.is_empty() {
            bail!("a causal-lm batch needs target tokens");
        }
        target_cross_entropy(hidden, &targets, &self.lm_head)
    }

    /// the mean is over the target tokens
    fn reads_prompt(&self, batch: &Batch) -> bool {
        batch
            .target_lens
            .iter()
            .zip(&batch.lengths)
            .any(|(target, length)| target >= length)
    }

    fn loss_terms(&self, batch: &Batch, prompt_len: usize) -> Result<usize> {
        Ok(batch.targets(prompt_len)?.tokens.len())
    }

    fn tally<B: Backbone>(
        &self,
        backbone: &B,
        prompt: &SoftPrompt,
        set: &EncodedSet,
        batching: &Batching,
    ) -> Result<DevTally> {
        let counts = self.target_counts(backbone, prompt, &set.data, batching)?;
        Ok(DevTally::Targets(counts))
    }

    fn saved(&self) -> (AdapterHead, Vec<String>) {
        (AdapterHead::Generation, Vec::new())
    }
}

/// A generation adapter's exact match, token accuracy and token loss on (input, target) pairs.
pub fn generation_score(
    model: &Model,
    adapter: &Adapter,
    examples: &[Example],
    source: &Path,
    batching: &Batching,
) -> Result<TargetScore> {
    adapter.fits(&model.backbone)?;
    let encoder = model.encoder(adapter.prompt.dim(0)?, None)?;
    let eos = model.eos_token_ids.first().copied();
    let template = adapter.template.as_ref();
    let decoder_start = model.decoder_start();
    let data = encode_pairs(&encoder, examples, template, source, eos, decoder_start)?;
    let head = CausalLm {
        lm_head: model.lm_head("a generation adapter")?.dense()?,
    };
    let prompt = SoftPrompt::placed(&adapter.prompt, adapter.placement())?;
    let counts = head.target_counts(&model.backbone, &prompt, &data, batching)?;
    Ok(counts.score())
}
