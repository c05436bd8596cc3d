//! softprompt: prompt tuning (Lester, Al-Rfou, Constant 2021) of frozen transformers.
//!
//! The data flows through the modules in this order (docs/DESIGN.md says why it is built so):
//!
//! ```text
//! data        file rows → Example { text, label, task }
//! template    where an input goes in the text a model reads ("Review: {text}\nSentiment:")
//! tokenize    text → token ids (the model's tokenizer.json)
//! batch       ids → padded, length-bucketed batches
//! prompt      the soft prompt: its initialisations; [B, N, D] → [P; X] [B, M + N, D]
//! prompt_encoder  what training moves to make the prompt: its own vectors, or an encoder's
//!             (P-tuning, residual prompt tuning, prefix tuning's projection, a multitask
//!             prompt's task factors)
//! backbone    frozen BERT / GPT-2 / Llama / T5: a forward that keeps what the explicit backward to the
//!             embeddings needs; a decoder's cached forward for generation
//! kernels     the forward / input-gradient pairs the backbones are built from
//! task        heads on the last hidden state: classification, verbalizer, causal LM (a decoder's, or
//!             T5's decoder: seq2seq); their losses
//! prompted    the method: [P; X] → backbone → head → loss, and the gradient back to the prompt
//! optim       AdamW, Adafactor, schedules, clipping
//! train       the loop: evaluation, early stopping, checkpoints, resume, metrics.jsonl
//! collective  what data-parallel ranks exchange (gradients, dev counts): one process, or MPI
//! adapter     PEFT-format adapter directories
//! model       a model directory or GGUF file: backbone, tokenizer, heads made from adapters
//! inference   any number of adapters in one batch: each row its own prompt and head; ensembles
//! metrics     accuracy, macro-F1, per-class precision / recall, confusion matrix
//! generate    [prompt; input] → tokens, with a KV cache and a per-adapter prefix cache; many
//!             texts decoded together, a token for all of them a pass
//! bench       timed train steps, forwards and generation on random weights of known shapes
//! profile     where a step's time goes: every span's time, and each matmul's GFLOP/s
//! ```
//! `error` is the library's error type, `files` writes files atomically, `enum_names` gives the
//! option enums their command-line names, `memory` the allocator settings the binaries choose.

pub mod adapter;
pub mod backbone;
pub mod batch;
pub mod bench;
pub mod collective;
pub mod data;
mod enum_names;
pub mod error;
pub mod files;
pub mod generate;
pub mod inference;
pub mod kernels;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod probe;
pub mod profile;
pub mod prompt;
pub mod prompt_encoder;
pub mod prompted;
pub mod task;
pub mod template;
pub mod threads;
pub mod tokenize;
pub mod train;

pub use error::{Context, Error, Result};
