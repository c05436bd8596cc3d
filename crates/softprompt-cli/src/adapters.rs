//! What `eval`, `predict` and `inspect` run on: the backbone, one loaded adapter per `--adapter`
//! (or the zero-shot verbalizer), and a tokenizer that leaves room for the longest prompt.

use crate::args::{BatchArgs, InferenceArgs};
use anyhow::Context;
use candle_core::{Device, Tensor};
use softprompt::adapter::Adapter;
use softprompt::backbone::any::AnyBackbone;
use softprompt::backbone::Backbone;
use softprompt::data::Example;
use softprompt::inference::{check_members, ensemble_all, EnsembleAnswer, LoadedAdapter};
use softprompt::model::Model;
use softprompt::tokenize::{encode_all, Encoded, TextEncoder};
use std::path::Path;

pub struct Inference {
    pub backbone: AnyBackbone,
    pub adapters: Vec<LoadedAdapter>,
    pub encoder: TextEncoder,
}

impl Inference {
    /// `data_labels`: the labels of a zero-shot run (eval reads them from the data).
    pub fn load(
        model: Model,
        args: &InferenceArgs,
        data_labels: Option<Vec<String>>,
    ) -> anyhow::Result<Self> {
        let d = model.backbone.hidden_size();
        let adapters = if args.zero_shot {
            let labels =
                data_labels.context("--zero-shot needs labelled data (softprompt eval)")?;
            let template = args
                .template
                .clone()
                .context("--zero-shot needs --template")?;
            let words = args.label_words.clone().unwrap_or_else(|| labels.clone());
            let table = model.backbone.word_embeddings();
            vec![LoadedAdapter {
                prompt: Tensor::zeros((0, d), table.dtype(), &table.device())?,
                head: model.verbalizer_head(template.as_str(), &labels, &words)?,
                labels,
                template: Some(template),
            }]
        } else {
            args.adapters
                .iter()
                .map(|a| LoadedAdapter::new(&model, &Adapter::load(a, d, &Device::Cpu)?))
                .collect::<softprompt::Result<Vec<_>>>()?
        };
        check_members(&adapters.iter().collect::<Vec<_>>())?;
        let longest = adapters
            .iter()
            .map(LoadedAdapter::prompt_len)
            .max()
            .unwrap_or(0);
        let encoder = model.encoder(longest, None)?;
        Ok(Self {
            backbone: model.backbone,
            adapters,
            encoder,
        })
    }

    /// Every input through every adapter, in the inputs' order.
    pub fn answers(
        &self,
        data: &[Encoded],
        batch: &BatchArgs,
    ) -> anyhow::Result<Vec<EnsembleAnswer>> {
        let members: Vec<&LoadedAdapter> = self.adapters.iter().collect();
        let (size, padding) = (batch.batch_size, batch.padding_side);
        Ok(ensemble_all(
            &self.backbone,
            &members,
            data,
            size,
            padding,
            &Device::Cpu,
        )?)
    }

    pub fn labels(&self) -> &[String] {
        &self.adapters[0].labels
    }

    /// Inputs written into the members' template, then tokenized.
    pub fn encode(&self, examples: &[Example], path: &Path) -> anyhow::Result<Vec<Encoded>> {
        let template = self.adapters[0].template.as_ref();
        Ok(encode_all(&self.encoder, examples, template, path)?)
    }
}
