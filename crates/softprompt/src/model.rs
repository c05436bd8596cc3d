//! A model directory in Hugging Face's layout: config.json, *.safetensors, tokenizer.json.

use crate::adapter::{Adapter, PeftConfig};
use crate::backbone::bert::Bert;
use crate::backbone::Backbone;
use crate::classifier::PromptClassifier;
use crate::prompt::SoftPrompt;
use crate::task::classify::{ClassificationHead, Pool};
use crate::tokenize::TextEncoder;
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

pub struct Model {
    pub dir: PathBuf,
    pub backbone: Bert,
    tokenizer_file: PathBuf,
}

impl Model {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        let missing: Vec<&str> = ["config.json", "tokenizer.json"]
            .into_iter()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            bail!(
                "model directory {} lacks {}",
                dir.display(),
                missing.join(" and ")
            );
        }
        let backbone = Bert::load(dir, dtype, device)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            backbone,
            tokenizer_file: dir.join("tokenizer.json"),
        })
    }

    /// A tokenizer whose encodings, with a prompt of `prompt_len` in front, fit the model.
    pub fn encoder(
        &self,
        prompt_len: usize,
        max_tokens: Option<usize>,
    ) -> anyhow::Result<TextEncoder> {
        let limit = self.backbone.max_positions().saturating_sub(prompt_len);
        if limit < 2 {
            bail!(
                "a prompt of {prompt_len} vectors leaves no room in a model of {} positions",
                self.backbone.max_positions()
            );
        }
        TextEncoder::from_file(
            &self.tokenizer_file,
            max_tokens.map_or(limit, |m| m.min(limit)),
        )
    }

    /// The PEFT config that describes a prompt for this model.
    pub fn peft_config(
        &self,
        num_virtual_tokens: usize,
        init: &str,
        init_text: Option<String>,
    ) -> PeftConfig {
        let cfg = &self.backbone.config;
        PeftConfig {
            peft_type: "PROMPT_TUNING".into(),
            task_type: Some("SEQ_CLS".into()),
            num_virtual_tokens,
            token_dim: Some(cfg.hidden_size),
            num_transformer_submodules: 1,
            num_attention_heads: Some(cfg.num_attention_heads),
            num_layers: Some(cfg.num_hidden_layers),
            prompt_tuning_init: Some(init.into()),
            prompt_tuning_init_text: init_text,
            tokenizer_name_or_path: Some(self.dir.display().to_string()),
            base_model_name_or_path: Some(self.dir.display().to_string()),
            inference_mode: true,
            modules_to_save: Some(vec!["classifier".into(), "score".into()]),
            revision: None,
            auto_mapping: None,
            tokenizer_kwargs: None,
        }
    }

    fn pooler_for(&self, pool: Pool) -> Option<crate::kernels::Linear> {
        (pool == Pool::Pooler)
            .then(|| self.backbone.pooler.clone())
            .flatten()
    }

    pub fn head(
        &self,
        weight: &candle_core::Tensor,
        bias: &candle_core::Tensor,
        pool: Pool,
    ) -> anyhow::Result<ClassificationHead> {
        ClassificationHead::from_tensors(weight, bias, pool, self.pooler_for(pool))
    }

    /// The classifier an adapter describes, on this model (checked to fit).
    pub fn classifier(self, adapter: &Adapter) -> anyhow::Result<PromptClassifier<Bert>> {
        let device = self.backbone.word_embeddings().device().clone();
        let head = self
            .head(
                &adapter.head_weight.to_device(&device)?,
                &adapter.head_bias.to_device(&device)?,
                adapter.pool,
            )
            .with_context(|| {
                format!(
                    "the adapter cannot run on the model in {}",
                    self.dir.display()
                )
            })?;
        let prompt = SoftPrompt::from_tensor(
            &adapter
                .prompt
                .to_device(&device)?
                .to_dtype(self.backbone.word_embeddings().dtype())?,
        )?;
        Ok(PromptClassifier {
            backbone: self.backbone,
            prompt,
            head,
            labels: adapter.labels.clone(),
        })
    }
}
