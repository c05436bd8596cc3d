//! A model directory in Hugging Face's layout: config.json, *.safetensors, tokenizer.json.

use crate::adapter::PeftConfig;
use crate::backbone::bert::Bert;
use crate::backbone::Backbone;
use crate::task::classify::{ClassificationHead, Pool};
use crate::tokenize::TextEncoder;
use anyhow::bail;
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
}
