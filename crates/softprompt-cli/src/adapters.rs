//! What `eval` and `predict` run on: the backbone and one loaded adapter per `--adapter` (or the
//! zero-shot verbalizer), made ready by the library's `Members`.

use crate::args::InferenceArgs;
use anyhow::Context;
use candle_core::{Device, Tensor};
use softprompt::adapter::Adapter;
use softprompt::backbone::any::AnyBackbone;
use softprompt::backbone::Backbone;
use softprompt::inference::{LoadedAdapter, Members};
use softprompt::model::Model;
use softprompt::prompt::Placement;

pub struct Inference {
    pub backbone: AnyBackbone,
    pub members: Members,
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
            // an encoder-decoder writes the label word first thing, after no template
            let template = match (&args.template, model.decoder_start()) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(_)) => None,
                (None, None) => anyhow::bail!("--zero-shot needs --template"),
            };
            let spelled_after = template.as_ref().map_or("", |t| t.as_str());
            let words = args.label_words.clone().unwrap_or_else(|| labels.clone());
            let table = model.backbone.word_embeddings();
            vec![LoadedAdapter {
                prompt: Tensor::zeros((0, d), table.dtype(), &table.device())?,
                placement: Placement::Embeddings,
                head: model.verbalizer_head(spelled_after, &labels, &words)?,
                labels,
                template,
            }]
        } else {
            let task = args.task.as_deref();
            args.adapters
                .iter()
                .map(|a| {
                    let adapter = Adapter::load(a, d, &Device::Cpu)?;
                    let adapter = adapter
                        .for_task(task)
                        .with_context(|| format!("adapter {}", a.display()))?;
                    Ok(LoadedAdapter::new(&model, &adapter)?)
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        let members = Members::new(&model, adapters)?;
        Ok(Self {
            backbone: model.backbone,
            members,
        })
    }
}
