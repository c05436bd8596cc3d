//! Inference for any number of adapters on one frozen model (the paper's section 6 promise): every
//! row of a batch carries its own adapter's prompt and head, so requests for different tasks share
//! one backbone pass, and a prompt ensemble is N rows of the same text with N prompts.
//!
//! ```text
//! rows (adapter, tokens) → [P_adapter; X] per row, right-padded → one backbone pass → each row's own head
//! ```

use crate::adapter::Adapter;
use crate::backbone::{Backbone, BackboneInput, Prefix};
use crate::batch::{Batching, Padding};
use crate::data::{label_ids, Example};
use crate::metrics::Report;
use crate::model::Model;
use crate::prompt::Placement;
use crate::task::classify::{argmax, softmax, ClassificationHead};
use crate::template::Template;
use crate::tokenize::{encode_all, Encoded, TextEncoder};
use crate::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// An adapter made ready to run on a model: its prompt in the backbone's dtype and device, its head.
pub struct LoadedAdapter {
    /// [M, D], or a prefix's [M, L·2·Hkv·K]
    pub prompt: Tensor,
    pub placement: Placement,
    pub head: ClassificationHead,
    pub labels: Vec<String>,
    /// what each input is written into before tokenizing
    pub template: Option<Template>,
}

impl LoadedAdapter {
    /// A multitask adapter is refused: `Adapter::for_task` picks the task's prompt first.
    pub fn new(model: &Model, adapter: &Adapter) -> Result<Self> {
        adapter.fits(&model.backbone)?;
        let adapter = adapter.for_task(None)?;
        let table = model.backbone.word_embeddings();
        let prompt = adapter
            .prompt
            .to_device(&table.device())?
            .to_dtype(table.dtype())?;
        let loaded = Self {
            prompt,
            placement: adapter.placement(),
            head: model.head(&adapter.head, &adapter.labels, adapter.template.as_ref())?,
            labels: adapter.labels.clone(),
            template: adapter.template.clone(),
        };
        loaded.read_once(&model.backbone)
    }

    /// On a decoder, the prompt's keys and values at every layer, read once: every row then
    /// reads them as a prefix instead of computing the prompt's rows again (its rows never read
    /// the input; decision 19). The same answers; a head that reads the prompt's own rows (a
    /// pooled first vector) keeps the prompt in the rows.
    pub fn read_once<B: Backbone>(self, backbone: &B) -> Result<Self> {
        if !backbone.shares_prompt()
            || self.placement != Placement::Embeddings
            || self.head.reads_prompt()
            || self.prompt_len() == 0
        {
            return Ok(self);
        }
        let (kv, _) = backbone.prompt_pass(&self.prompt)?;
        Ok(Self {
            prompt: kv,
            placement: Placement::Prefix,
            ..self
        })
    }

    /// M, the positions the prompt takes (a prefix's too)
    pub fn prompt_len(&self) -> usize {
        self.prompt.dim(0).unwrap_or(0)
    }

    /// The columns the prompt takes in front of the text (`SoftPrompt::front`)
    pub fn front(&self) -> usize {
        self.placement.front(self.prompt_len())
    }

    /// The columns the prompt takes in front of an encoder-decoder's decoder input
    /// (`SoftPrompt::decoder_front`)
    pub fn decoder_front(&self) -> usize {
        self.placement.decoder_front(self.prompt_len())
    }

    /// The prefix's positions (0 for a prompt in the embeddings)
    fn prefix_len(&self) -> usize {
        match self.placement {
            Placement::Prefix => self.prompt_len(),
            Placement::Embeddings | Placement::EncoderDecoder => 0,
        }
    }
}

/// One backbone pass over rows of different adapters → each row's logits (its adapter's label count).
/// A row gets exactly what it would get in a batch of its own: its prompt sits at columns 0..M
/// of its row and its tokens after it, with the padding (masked out) after them, or between the
/// prompt and the tokens with `Padding::Left`, as in a training batch. A prefix adapter's row has
/// its prefix in the batch's prefix positions instead (the rest of them masked out).
pub fn classify_rows<B: Backbone>(
    backbone: &B,
    rows: &[(&LoadedAdapter, &Encoded)],
    padding: Padding,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let lengths: Vec<usize> = rows.iter().map(|(t, e)| t.front() + e.ids.len()).collect();
    let width = lengths.iter().copied().max().unwrap_or(0);
    let prefix_len = rows.iter().map(|(t, _)| t.prefix_len()).max().unwrap_or(0);
    // a prefix's positions count as the input's, an encoder-decoder prompt's decoder rows do not
    let positions =
        |t: &LoadedAdapter, e: &Encoded| t.prompt_len() - t.decoder_front() + e.ids.len();
    if let Some((t, e)) = rows
        .iter()
        .find(|(t, e)| positions(t, e) > backbone.max_positions())
    {
        bail!(
            "a row of {} positions (prompt included) exceeds the model's {}",
            positions(t, e),
            backbone.max_positions()
        );
    }
    let d = backbone.hidden_size();
    let mut embeds = Vec::with_capacity(rows.len());
    let (mut mask, mut types) = (
        Vec::with_capacity(rows.len() * width),
        Vec::with_capacity(rows.len() * width),
    );
    for ((adapter, encoded), &len) in rows.iter().zip(&lengths) {
        let ids = Tensor::new(encoded.ids.as_slice(), device)?.unsqueeze(0)?;
        let word = backbone.embed_tokens(&ids)?.squeeze(0)?;
        let pad = Tensor::zeros((width - len, d), word.dtype(), device)?;
        let (m, n) = (adapter.front(), encoded.ids.len());
        let text = match padding {
            Padding::Right => [&word, &pad],
            Padding::Left => [&pad, &word],
        };
        let own = adapter.prompt.narrow(0, 0, m)?;
        let mut parts = Vec::with_capacity(3);
        if m > 0 {
            parts.push(&own);
        }
        parts.extend(text);
        embeds.push(Tensor::cat(&parts, 0)?);
        // the prompt, then the tokens padded like a training batch's
        mask.extend(std::iter::repeat_n(1, m));
        mask.extend(padding.row(std::iter::repeat_n(1u32, n), n, width - m, 0));
        types.extend(std::iter::repeat_n(0, m));
        types.extend(padding.row(encoded.type_ids.iter().copied(), n, width - m, 0));
    }
    let embeds = Tensor::stack(&embeds, 0)?;
    let shape = (rows.len(), width);
    let (mask, types) = (
        Tensor::from_vec(mask, shape, device)?,
        Tensor::from_vec(types, shape, device)?,
    );
    let prefix = match prefix_len {
        0 => None,
        p => Some(mixed_prefix(backbone, rows, p, device)?),
    };
    let decoder = decoder_rows(backbone, rows)?;
    let hidden = backbone.forward(&BackboneInput {
        embeds: &embeds,
        attention_mask: &mask,
        token_type_ids: &types,
        reads: None,
        prefix: prefix.as_ref(),
        decoder: decoder.as_ref(),
    })?;
    let read = match &decoder {
        Some(start) => {
            let width = start.dim(1)?;
            let read = rows.iter().flat_map(|(adapter, _)| {
                (0..width).map(|i| u32::from(i <= adapter.decoder_front()))
            });
            Tensor::from_iter(read, device)?.reshape((rows.len(), width))?
        }
        None => mask,
    };
    rows.iter()
        .enumerate()
        .map(|(i, (adapter, _))| {
            let front = match decoder {
                Some(_) => adapter.decoder_front(),
                None => adapter.front(),
            };
            let logits =
                adapter
                    .head
                    .forward(&hidden.narrow(0, i, 1)?, &read.narrow(0, i, 1)?, front)?;
            Ok(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        })
        .collect()
}

/// An encoder-decoder's decoder rows [B, W, D] for a batch of rows of different adapters, which
/// it scores the labels at: the start token, behind each encoder-decoder prompt's decoder rows,
/// right-padded (the decoder is causal: a row's padding comes after what it reads). None for the
/// other backbones.
fn decoder_rows<B: Backbone>(
    backbone: &B,
    rows: &[(&LoadedAdapter, &Encoded)],
) -> Result<Option<Tensor>> {
    let Some(start) = backbone.start_rows(1)? else {
        return Ok(None);
    };
    let start = start.squeeze(0)?;
    let width = 1 + rows
        .iter()
        .map(|(t, _)| t.decoder_front())
        .max()
        .unwrap_or(0);
    let rows = rows
        .iter()
        .map(|(adapter, _)| {
            let n = adapter.decoder_front();
            let own = adapter.prompt.narrow(0, adapter.front(), n)?;
            Tensor::cat(&[&own, &start], 0)?.pad_with_zeros(0, 0, width - n - 1)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Some(Tensor::stack(&rows, 0)?))
}

/// The prefix positions of a batch of rows of different adapters [B, P, L·2·Hkv·K]: each prefix
/// adapter's row has its own in front, masked in; every other position is zero and masked out.
fn mixed_prefix<B: Backbone>(
    backbone: &B,
    rows: &[(&LoadedAdapter, &Encoded)],
    p: usize,
    device: &Device,
) -> Result<Prefix> {
    let width = rows
        .iter()
        .find(|(t, _)| t.prefix_len() > 0)
        .map_or(0, |(t, _)| t.prompt.dim(1).unwrap_or(0));
    let dtype = backbone.word_embeddings().dtype();
    let mut kv = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len() * p);
    for (adapter, _) in rows {
        let own = adapter.prefix_len();
        let rest = || Tensor::zeros((p - own, width), dtype, device);
        kv.push(match own {
            0 => rest()?,
            _ if own == p => adapter.prompt.clone(),
            _ => Tensor::cat(&[&adapter.prompt, &rest()?], 0)?,
        });
        mask.extend((0..p).map(|i| u32::from(i < own)));
    }
    Ok(Prefix {
        kv: Tensor::stack(&kv, 0)?,
        mask: Tensor::from_vec(mask, (rows.len(), p), device)?,
    })
}

/// A prompt ensemble's answer: the majority vote, the mean probability per label, each member's label.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EnsembleAnswer {
    /// the label most members chose (ties go to the higher mean probability)
    pub label: String,
    /// mean over members of each label's probability
    pub scores: Vec<f32>,
    /// each member's label and logits, in the order of the members
    pub members: Vec<String>,
    pub logits: Vec<Vec<f32>>,
}

/// An ensemble needs members, and they must share one label set.
pub fn check_members(members: &[&LoadedAdapter]) -> Result<()> {
    let labels = &members
        .first()
        .context("an ensemble needs at least one member")?
        .labels;
    if let Some(odd) = members.iter().find(|t| &t.labels != labels) {
        bail!(
            "ensemble members disagree on the labels: {:?} vs {:?}",
            labels,
            odd.labels
        );
    }
    // the members read one encoding of each input
    if let Some(odd) = members.iter().find(|t| t.template != members[0].template) {
        bail!(
            "ensemble members write their inputs into different templates: {:?} vs {:?}",
            members[0].template,
            odd.template
        );
    }
    Ok(())
}

/// Combines the members' logits for one input; the members must share one label set.
pub fn ensemble(members: &[&LoadedAdapter], logits: &[Vec<f32>]) -> Result<EnsembleAnswer> {
    check_members(members)?;
    let labels = &members[0].labels;
    let mut scores = vec![0f32; labels.len()];
    let mut votes = vec![0usize; labels.len()];
    let mut chosen = Vec::with_capacity(logits.len());
    for l in logits {
        for (s, p) in scores.iter_mut().zip(softmax(l)) {
            *s += p / logits.len() as f32;
        }
        let choice = argmax(l) as usize;
        votes[choice] += 1;
        chosen.push(labels[choice].clone());
    }
    let best = (0..labels.len())
        .max_by(|&a, &b| {
            votes[a]
                .cmp(&votes[b])
                .then(scores[a].total_cmp(&scores[b]))
        })
        .unwrap_or(0);
    Ok(EnsembleAnswer {
        label: labels[best].clone(),
        scores,
        members: chosen,
        logits: logits.to_vec(),
    })
}

/// Every input through every member, `batch_size` inputs (× members rows) per backbone pass, in
/// the inputs' order. One member is plain prediction.
pub fn ensemble_all<B: Backbone>(
    backbone: &B,
    members: &[&LoadedAdapter],
    data: &[Encoded],
    batch_size: usize,
    padding: Padding,
    device: &Device,
) -> Result<Vec<EnsembleAnswer>> {
    if members.is_empty() {
        bail!("no adapter to predict with");
    }
    in_length_batches(data, batch_size, |inputs| {
        let rows: Vec<(&LoadedAdapter, &Encoded)> = inputs
            .iter()
            .flat_map(|&i| members.iter().map(move |t| (*t, &data[i])))
            .collect();
        let logits = classify_rows(backbone, &rows, padding, device)?;
        logits
            .chunks(members.len())
            .map(|member_logits| ensemble(members, member_logits))
            .collect()
    })
}

/// `run` over the inputs in batches of `batch_size` of similar length (`eval_batches`: less
/// padding), one output an input, given back in the inputs' order.
pub fn in_length_batches<T>(
    data: &[Encoded],
    batch_size: usize,
    mut run: impl FnMut(&[usize]) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let lengths: Vec<usize> = data.iter().map(|e| e.ids.len()).collect();
    let mut outputs: Vec<Option<T>> = (0..data.len()).map(|_| None).collect();
    for inputs in crate::batch::eval_batches(&lengths, batch_size.max(1)) {
        for (&i, output) in inputs.iter().zip(run(&inputs)?) {
            outputs[i] = Some(output);
        }
    }
    Ok(outputs.into_iter().flatten().collect())
}

/// Adapters ready on one model, with a tokenizer that leaves room for the longest prompt: what
/// eval, predict and the Python binding run. One member is plain prediction; more, an ensemble.
pub struct Members {
    pub adapters: Vec<LoadedAdapter>,
    pub encoder: TextEncoder,
}

impl Members {
    pub fn new(model: &Model, adapters: Vec<LoadedAdapter>) -> Result<Self> {
        check_members(&adapters.iter().collect::<Vec<_>>())?;
        let longest = adapters.iter().map(LoadedAdapter::prompt_len).max();
        let encoder = model.encoder(longest.unwrap_or(0), None)?;
        Ok(Self { adapters, encoder })
    }

    pub fn labels(&self) -> &[String] {
        &self.adapters[0].labels
    }

    /// Inputs written into the members' template, then tokenized; errors name `source`.
    pub fn encode(&self, examples: &[Example], source: &Path) -> Result<Vec<Encoded>> {
        let template = self.adapters[0].template.as_ref();
        encode_all(&self.encoder, examples, template, source)
    }

    /// Every input through every member, in the inputs' order.
    pub fn answers<B: Backbone>(
        &self,
        backbone: &B,
        data: &[Encoded],
        batching: &Batching,
    ) -> Result<Vec<EnsembleAnswer>> {
        let members: Vec<&LoadedAdapter> = self.adapters.iter().collect();
        let (size, padding) = (batching.size, batching.padding);
        ensemble_all(backbone, &members, data, size, padding, &batching.device)
    }

    /// Accuracy, macro-F1, per-class figures and the confusion matrix on labelled examples.
    pub fn report<B: Backbone>(
        &self,
        backbone: &B,
        examples: &[Example],
        source: &Path,
        batching: &Batching,
    ) -> Result<Report> {
        let labels = self.labels();
        let gold = label_ids(examples, labels, source)?;
        let answers = self.answers(backbone, &self.encode(examples, source)?, batching)?;
        let predicted: Vec<u32> = answers
            .iter()
            .map(|a| labels.iter().position(|l| *l == a.label).unwrap_or(0) as u32)
            .collect();
        Ok(Report::new(labels, &gold, &predicted))
    }
}
