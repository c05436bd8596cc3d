//! softprompt: prompt tuning (Lester, Al-Rfou, Constant 2021) of frozen transformers.
//!
//! The data flows through the modules in this order:
//!
//! ```text
//! data        file rows → Example { text, label }
//! tokenize    text → token ids (the model's tokenizer.json)
//! batch       ids → padded, length-bucketed batches
//! prompt      word embeddings [B, N, D] → [P; X] [B, M + N, D]
//! backbone    frozen BERT / GPT-2 / Llama forward, keeping activations; explicit backward to the
//!             embeddings; a decoder's cached forward for generation
//! kernels     the forward / input-gradient pairs the backbones are built from
//! model       a model directory or GGUF file: backbone, tokenizer, heads made from adapters
//! task        pooled hidden state → head → cross-entropy (candle's autograd, small); the
//!             verbalizer's label words scored by a decoder's frozen LM head
//! classifier  all of the above for one batch; the prompt's gradient
//! optim       AdamW, Adafactor, schedules, clipping
//! train       the loop: evaluation, early stopping, checkpoints, resume
//! adapter     PEFT-format adapter directories
//! multitask   many adapters in one batch: each row its own prompt and head; prompt ensembles
//! metrics     accuracy, macro-F1, per-class precision / recall, confusion matrix
//! generate    [prompt; input] → tokens, with a KV cache and a per-adapter prefix cache
//! ```

pub mod adapter;
pub mod backbone;
pub mod batch;
pub mod bench;
mod choice;
pub mod classifier;
pub mod data;
pub mod fsutil;
pub mod generate;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod multitask;
pub mod optim;
pub mod prompt;
pub mod task;
pub mod tokenize;
pub mod train;
