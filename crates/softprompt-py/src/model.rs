//! `softprompt.Model`: a frozen model loaded once, and everything done with it. Every call runs
//! in Rust on the model's worker pool with the GIL released, so other Python threads run meanwhile.

use crate::adapter::Adapter;
use crate::data::{columns, source};
use crate::generation::Pieces;
use crate::progress::Progress;
use crate::threads;
use candle_core::{DType, Device, Tensor};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use softprompt::adapter::AdapterHead;
use softprompt::backbone::Backbone;
use softprompt::batch::{Batching, Padding};
use softprompt::collective::SingleProcess;
use softprompt::data::{Columns, Labels};
use softprompt::generate::{Continuation, SamplingConfig};
use softprompt::inference::{LoadedAdapter, Members};
use softprompt::model;
use softprompt::prompt::Placement;
use softprompt::prompted::generation_score;
use softprompt::template::Template;
use softprompt::train::{train_model, Event, TrainConfig, TrainData};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

/// A frozen pretrained model: a Hugging Face directory (BERT, GPT-2, Llama family) or a
/// Llama-family .gguf file, with its tokenizer.
#[pyclass(frozen, module = "softprompt")]
pub struct Model {
    inner: Arc<model::Model>,
    threads: usize,
}

/// `value` as one of an option's names (`pool="mean"`), or the default.
fn choice<T: FromStr<Err = String>>(option: &str, value: Option<&str>, default: T) -> PyResult<T> {
    match value {
        Some(v) => v
            .parse()
            .map_err(|e| crate::invalid(format!("{option}: {e}"))),
        None => Ok(default),
    }
}

fn template(text: Option<&str>) -> PyResult<Option<Template>> {
    text.map(|t| Template::parse(t).map_err(crate::error))
        .transpose()
}

/// An `Adapter` or a list of them (a prompt ensemble).
fn adapters(value: &Bound<'_, PyAny>) -> PyResult<Vec<Arc<softprompt::adapter::Adapter>>> {
    if let Ok(one) = value.cast::<Adapter>() {
        return Ok(vec![one.get().inner.clone()]);
    }
    if let Ok(list) = value.cast::<PyList>() {
        let members = list
            .iter()
            .map(|a| Ok(a.cast::<Adapter>()?.get().inner.clone()))
            .collect::<PyResult<Vec<_>>>()
            .map_err(|_: PyErr| crate::invalid("an ensemble is a list of softprompt.Adapter"))?;
        if members.is_empty() {
            return Err(crate::invalid("an ensemble needs at least one adapter"));
        }
        return Ok(members);
    }
    Err(crate::invalid(
        "adapter must be a softprompt.Adapter (Adapter.load(path)) or a list of them",
    ))
}

impl Model {
    /// `work` on this model's worker pool, the GIL released; a Ctrl-C meanwhile is raised when it
    /// returns (`work` sees `stop` set, and training stops at its step's end).
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        work: impl FnOnce(&model::Model, &AtomicBool) -> softprompt::Result<T> + Send,
    ) -> PyResult<T> {
        match self.run_until_interrupted(py, work) {
            (_, Some(interrupt)) => Err(interrupt),
            (done, None) => done.map_err(crate::error),
        }
    }

    /// `run`'s work and, apart, the KeyboardInterrupt that came while it ran. The work runs on a
    /// worker while this (Python's main) thread waits: only the main thread hears signals, so it
    /// checks for them every 50 ms and tells the work to stop.
    fn run_until_interrupted<T: Send>(
        &self,
        py: Python<'_>,
        work: impl FnOnce(&model::Model, &AtomicBool) -> softprompt::Result<T> + Send,
    ) -> (softprompt::Result<T>, Option<PyErr>) {
        let pool = match threads::pool(self.threads) {
            Ok(pool) => pool,
            Err(e) => return (Err(softprompt::Error::invalid(e)), None),
        };
        let (model, stop) = (&*self.inner, AtomicBool::new(false));
        let (sender, mut receiver) = std::sync::mpsc::sync_channel(1);
        let mut interrupt = None;
        let done = pool.in_place_scope(|scope| {
            let stop = &stop;
            scope.spawn(move |_| {
                let _ = sender.send(work(model, stop));
            });
            loop {
                let (back, heard) = py.detach(move || {
                    let heard = receiver.recv_timeout(Duration::from_millis(50));
                    (receiver, heard)
                });
                receiver = back;
                match heard {
                    Ok(done) => break done,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = py.check_signals() {
                            interrupt.get_or_insert(e);
                            stop.store(true, Ordering::SeqCst);
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        break Err(softprompt::Error::invalid(
                            "the engine's worker stopped without an answer",
                        ))
                    }
                }
            }
        });
        (done, interrupt)
    }

    fn batching(batch_size: usize, padding_side: Option<&str>) -> PyResult<Batching> {
        if batch_size == 0 {
            return Err(crate::invalid("batch_size must be at least 1"));
        }
        Ok(Batching {
            size: batch_size,
            padding: choice("padding_side", padding_side, Padding::Right)?,
            device: Device::Cpu,
        })
    }
}

#[pymethods]
impl Model {
    /// Loads a model directory (config.json, model.safetensors, tokenizer.json) or a .gguf file.
    /// keep_quantized: a GGUF's matrices stay quantized in memory (less memory, the same numbers).
    /// dtype: "f32", or "bf16" (the matrices in half the memory; on a CPU with AVX512-BF16 its
    /// bf16 dot products multiply them, with f32 sums; elsewhere each is widened as it is used).
    /// threads: worker threads for every call on this model (default: the cores this process may use).
    #[staticmethod]
    #[pyo3(signature = (path, keep_quantized=false, dtype="f32", threads=None))]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        keep_quantized: bool,
        dtype: &str,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let weights: model::WeightDtype = choice("dtype", Some(dtype), model::WeightDtype::F32)?;
        let threads = threads.unwrap_or_else(threads::default_threads);
        if threads == 0 {
            return Err(crate::invalid("threads must be at least 1"));
        }
        let pool = threads::pool(threads)?;
        let loaded = py
            .detach(|| {
                pool.install(|| {
                    model::Model::load_with(&path, DType::F32, &Device::Cpu, keep_quantized)?
                        .hold_weights(weights)
                })
            })
            .map_err(crate::error)?;
        Ok(Self {
            inner: Arc::new(loaded),
            threads,
        })
    }

    /// "bert", "gpt2" or "llama".
    #[getter]
    fn architecture(&self) -> &'static str {
        self.inner.backbone.architecture()
    }

    #[getter]
    fn hidden_size(&self) -> usize {
        self.inner.backbone.hidden_size()
    }

    /// The longest sequence, prompt included, the model reads.
    #[getter]
    fn max_positions(&self) -> usize {
        self.inner.backbone.max_positions()
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.threads
    }

    fn __repr__(&self) -> String {
        format!(
            "Model({:?}, architecture={:?}, hidden_size={})",
            self.inner.path.display().to_string(),
            self.architecture(),
            self.hidden_size()
        )
    }

    /// Trains a soft prompt (and the task's head) on `train` and writes the adapter to `output`;
    /// returns it. The options are the command line's (`softprompt train --help`), with the same
    /// defaults. `train` and `dev`: a file path, (text, label) pairs, a dict of columns, a pandas
    /// DataFrame, or rows as mappings. on_event(dict) hears every step and evaluation (what
    /// metrics.jsonl holds). Ctrl-C stops at the end of the step with a checkpoint there, which
    /// resume=True continues exactly.
    ///
    /// An option left None takes the command line's default: task="classify",
    /// num_virtual_tokens=20, method="prompt" (or "p-tuning", "residual", "prefix"), encoder="mlp"
    /// (or "lstm", for p-tuning), encoder_hidden_size=the model's hidden size,
    /// prefix_projection=True (False: a prefix trained as it is), init="vocab",
    /// pool="mean", optimizer="adamw", lr=1e-2 (adamw; 1e-3 for a prefix, 3e-2 without its projection) or
    /// 0.3 (adafactor), weight_decay=0, schedule="linear", warmup_steps=0, epochs=3,
    /// min_steps=300, batch_size=32, padding_side="right", max_grad_norm=1.0 (0: no clipping),
    /// eval_every=four times an epoch, patience=4 (0: never stop early), seed=0.
    #[pyo3(signature = (
        train, output, dev=None, *, task=None, template=None, label_words=None,
        num_virtual_tokens=None, method=None, encoder=None, encoder_hidden_size=None, prefix_projection=None, task_rank=None, init=None,
        init_text=None, pool=None, optimizer=None, lr=None,
        weight_decay=None, schedule=None, warmup_steps=None, epochs=None, min_steps=None,
        max_steps=None, batch_size=None, padding_side=None, max_grad_norm=None, eval_every=None,
        patience=None, seed=None, max_tokens=None, text_column="text", text_pair_column=None, task_column=None,
        label_column="label", progress=true, on_event=None, resume=false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn train(
        &self,
        py: Python<'_>,
        train: &Bound<'_, PyAny>,
        output: PathBuf,
        dev: Option<&Bound<'_, PyAny>>,
        task: Option<&str>,
        template: Option<&str>,
        label_words: Option<Vec<String>>,
        num_virtual_tokens: Option<usize>,
        method: Option<&str>,
        encoder: Option<&str>,
        encoder_hidden_size: Option<usize>,
        prefix_projection: Option<bool>,
        task_rank: Option<usize>,
        init: Option<&str>,
        init_text: Option<String>,
        pool: Option<&str>,
        optimizer: Option<&str>,
        lr: Option<f64>,
        weight_decay: Option<f64>,
        schedule: Option<&str>,
        warmup_steps: Option<usize>,
        epochs: Option<usize>,
        min_steps: Option<usize>,
        max_steps: Option<usize>,
        batch_size: Option<usize>,
        padding_side: Option<&str>,
        max_grad_norm: Option<f64>,
        eval_every: Option<usize>,
        patience: Option<usize>,
        seed: Option<u64>,
        max_tokens: Option<usize>,
        text_column: &str,
        text_pair_column: Option<&str>,
        task_column: Option<&str>,
        label_column: &str,
        progress: bool,
        on_event: Option<Py<PyAny>>,
        resume: bool,
    ) -> PyResult<Adapter> {
        let d = TrainConfig::default();
        let config = TrainConfig {
            task: choice("task", task, d.task)?,
            template: self::template(template)?,
            label_words,
            num_virtual_tokens: num_virtual_tokens.unwrap_or(d.num_virtual_tokens),
            method: choice("method", method, d.method)?,
            encoder: choice("encoder", encoder, d.encoder)?,
            encoder_hidden_size,
            prefix_projection: prefix_projection.unwrap_or(d.prefix_projection),
            task_rank,
            init: choice("init", init, d.init)?,
            init_text,
            pool: choice("pool", pool, d.pool)?,
            optimizer: choice("optimizer", optimizer, d.optimizer)?,
            lr,
            weight_decay: weight_decay.unwrap_or(d.weight_decay),
            schedule: choice("schedule", schedule, d.schedule)?,
            warmup_steps: warmup_steps.unwrap_or(d.warmup_steps),
            epochs: epochs.unwrap_or(d.epochs),
            min_steps: min_steps.unwrap_or(d.min_steps),
            max_steps,
            batch_size: batch_size.unwrap_or(d.batch_size),
            padding: choice("padding_side", padding_side, d.padding)?,
            // 0 turns clipping and early stopping off, as on the command line
            max_grad_norm: max_grad_norm.map_or(d.max_grad_norm, |n| (n != 0.0).then_some(n)),
            eval_every,
            patience: patience.map_or(d.patience, |p| (p > 0).then_some(p)),
            seed: seed.unwrap_or(d.seed),
            max_tokens,
        };
        let columns = Columns {
            task: task_column.map(Into::into),
            ..columns(text_column, text_pair_column, label_column)
        };
        let data = TrainData {
            train: source(train, "train", &columns, Labels::Required)?,
            dev: dev
                .map(|dev| source(dev, "dev", &columns, Labels::Required))
                .transpose()?,
            columns,
        };
        let mut listener = Progress::new(py, progress, on_event)?;
        let (summary, interrupt) = self.run_until_interrupted(py, |model, stop| {
            let mut hear = |e: Event| match stop.load(Ordering::SeqCst) {
                true => ControlFlow::Break(()),
                false => listener.hear(e),
            };
            train_model(
                model,
                &data,
                &output,
                &config,
                resume,
                &SingleProcess,
                &mut hear,
            )
        });
        listener.finish();
        let summary = summary.map_err(crate::error)?;
        if summary.interrupted {
            let stopped = interrupt
                .or(listener.error.take())
                .unwrap_or_else(|| crate::invalid("training stopped"));
            let note = format!(
                "softprompt: stopped at step {}, checkpointed in {}: train(..., resume=True) continues it",
                summary.steps,
                output.display()
            );
            let _ = py
                .import("sys")?
                .getattr("stderr")?
                .call_method1("write", (note + "\n",));
            return Err(stopped);
        }
        if let Some(interrupt) = interrupt {
            // a Ctrl-C after the last step: the run is whole, and the interrupt is still raised
            return Err(interrupt);
        }
        Adapter::open(output)
    }

    /// Scores `adapter` (or a list of adapters: a prompt ensemble) on labelled `data` (what
    /// `train` takes). A classifier gives accuracy, macro_f1, per_class, confusion and labels; a
    /// generation adapter exact_match, token_accuracy and token_loss.
    #[pyo3(signature = (adapter, data, *, task=None, text_column="text", text_pair_column=None, label_column="label", batch_size=32, padding_side=None))]
    #[allow(clippy::too_many_arguments)]
    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        adapter: &Bound<'py, PyAny>,
        data: &Bound<'py, PyAny>,
        task: Option<&str>,
        text_column: &str,
        text_pair_column: Option<&str>,
        label_column: &str,
        batch_size: usize,
        padding_side: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let members = adapters(adapter)?;
        let columns = columns(text_column, text_pair_column, label_column);
        let data = source(data, "data", &columns, Labels::Required)?;
        let batching = Self::batching(batch_size, padding_side)?;
        if let [only] = members.as_slice() {
            if matches!(only.head, AdapterHead::Generation) {
                let score = self.run(py, |model, _| {
                    only.fits(&model.backbone)?;
                    let only = only.for_task(task)?;
                    let examples = data.examples(&columns, Labels::Required)?;
                    generation_score(model, &only, &examples, data.name(), &batching)
                })?;
                return Ok(pythonize::pythonize(py, &score)?);
            }
        }
        let report = self.run(py, |model, _| {
            let examples = data.examples(&columns, Labels::Required)?;
            let members = loaded(model, &members, task)?;
            members.report(&model.backbone, &examples, data.name(), &batching)
        })?;
        Ok(pythonize::pythonize(py, &report)?)
    }

    /// Labels `texts` (a list of strings, or any data `train` takes; labels are not read) with
    /// `adapter`, or with a list of adapters in one batch (a prompt ensemble: majority vote,
    /// mean probability). Each answer: {"label", "scores": {label: probability}, "logits"}, and
    /// for an ensemble "members" (each member's label) with one list of logits per member.
    #[pyo3(signature = (adapter, texts, *, task=None, text_column="text", text_pair_column=None, batch_size=32, padding_side=None))]
    #[allow(clippy::too_many_arguments)]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        adapter: &Bound<'py, PyAny>,
        texts: &Bound<'py, PyAny>,
        task: Option<&str>,
        text_column: &str,
        text_pair_column: Option<&str>,
        batch_size: usize,
        padding_side: Option<&str>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        if texts.is_instance_of::<pyo3::types::PyString>() {
            return Err(crate::invalid(
                "predict takes a list of texts: predict(adapter, [text])",
            ));
        }
        let members = adapters(adapter)?;
        let columns = columns(text_column, text_pair_column, "label");
        let data = source(texts, "texts", &columns, Labels::Optional)?;
        let batching = Self::batching(batch_size, padding_side)?;
        let (labels, answers) = self.run(py, |model, _| {
            let examples = data.examples(&columns, Labels::Optional)?;
            let members = loaded(model, &members, task)?;
            let encoded = members.encode(&examples, data.name())?;
            let answers = members.answers(&model.backbone, &encoded, &batching)?;
            Ok((members.labels().to_vec(), answers))
        })?;
        let ensemble = members.len() > 1;
        answers
            .into_iter()
            .map(|answer| {
                let dict = PyDict::new(py);
                dict.set_item("label", &answer.label)?;
                let scores = PyDict::new(py);
                for (label, p) in labels.iter().zip(&answer.scores) {
                    scores.set_item(label, p)?;
                }
                dict.set_item("scores", scores)?;
                if ensemble {
                    dict.set_item("members", &answer.members)?;
                    dict.set_item("logits", &answer.logits)?;
                } else {
                    dict.set_item("logits", &answer.logits[0])?;
                }
                Ok(dict)
            })
            .collect()
    }

    /// Continues `text` with a decoder, behind `adapter`'s prompt if given (its template too,
    /// unless `template` is given). temperature 0 is greedy; `stop`: a string or a list, not part
    /// of the answer. stream=True returns an iterator of pieces of text as they are written.
    #[pyo3(signature = (text, adapter=None, *, task=None, template=None, max_new_tokens=None, temperature=0.0, top_k=None, top_p=None, stop=None, seed=0, stream=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        text: String,
        adapter: Option<&Bound<'py, Adapter>>,
        task: Option<&str>,
        template: Option<&str>,
        max_new_tokens: Option<usize>,
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        stop: Option<&Bound<'py, PyAny>>,
        seed: u64,
        stream: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let stop: Vec<String> = match stop {
            None => Vec::new(),
            Some(s) if s.is_instance_of::<pyo3::types::PyString>() => vec![s.extract()?],
            Some(s) => s.extract()?,
        };
        let config = SamplingConfig {
            max_new_tokens: max_new_tokens.unwrap_or(SamplingConfig::default().max_new_tokens),
            temperature,
            top_k,
            top_p,
            stop,
            seed,
        };
        config.validate().map_err(crate::error)?;
        let adapter = match adapter {
            Some(a) => Some(
                a.get()
                    .inner
                    .for_task(task)
                    .map_err(crate::error)?
                    .into_owned(),
            ),
            None => None,
        };
        let template = match self::template(template)? {
            Some(t) => Some(t),
            None => adapter.as_ref().and_then(|a| a.template.clone()),
        };
        let (prompt, placement) = match &adapter {
            Some(a) => {
                a.fits(&self.inner.backbone).map_err(crate::error)?;
                (a.prompt.clone(), a.placement())
            }
            None => (
                Tensor::zeros((0, self.hidden_size()), DType::F32, &Device::Cpu)
                    .map_err(|e| crate::error(e.into()))?,
                Placement::Embeddings,
            ),
        };
        let continuation = self.run(py, |model, _| {
            Continuation::new(model, &prompt, placement, template)
        })?;
        if stream {
            let (model, pool) = (self.inner.clone(), threads::pool(self.threads)?);
            let pieces = Pieces::spawn(move |send| {
                pool.install(|| continuation.write(&model, &text, &config, send).map(drop))
            });
            return Ok(Bound::new(py, pieces)?.into_any());
        }
        let written = self.run(py, |model, _| {
            continuation.write(model, &text, &config, &mut |_| true)
        })?;
        Ok(written.text.into_pyobject(py)?.into_any())
    }
}

/// The adapters made ready on `model` (their hidden size checked, a multitask adapter's `task`
/// chosen), sharing one set of labels.
fn loaded(
    model: &model::Model,
    adapters: &[Arc<softprompt::adapter::Adapter>],
    task: Option<&str>,
) -> softprompt::Result<Members> {
    let adapters = adapters
        .iter()
        .map(|a| LoadedAdapter::new(model, &*a.for_task(task)?))
        .collect::<softprompt::Result<Vec<_>>>()?;
    Members::new(model, adapters)
}
