//! A training run's events, heard between steps with the GIL taken back for a moment: a progress
//! bar on a terminal, lines where stderr is not one (a notebook: through Python's `sys.stderr`,
//! which the notebook shows), and the user's `on_event`. An exception from `on_event` (as a
//! Ctrl-C, which `Model::run` hears) stops the run at the end of the step, checkpointed there;
//! it is raised once `train` returns.

use indicatif::{ProgressBar, ProgressStyle};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use softprompt::train::Event;
use std::ops::ControlFlow;

pub struct Progress {
    display: Display,
    on_event: Option<Py<PyAny>>,
    total_steps: usize,
    /// what stopped the run, raised when `train` returns
    pub error: Option<PyErr>,
}

enum Display {
    None,
    Bar(ProgressBar),
    /// a line every tenth of the run and at each evaluation
    Lines,
}

impl Progress {
    pub fn new(py: Python<'_>, show: bool, on_event: Option<Py<PyAny>>) -> PyResult<Self> {
        let stderr = py.import("sys")?.getattr("stderr")?;
        let terminal = !stderr.is_none() && stderr.call_method0("isatty")?.is_truthy()?;
        let display = match (show, terminal) {
            (false, _) => Display::None,
            (true, true) => {
                let bar = ProgressBar::new(0);
                let style = ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
                )
                .expect("a valid template");
                bar.set_style(style);
                Display::Bar(bar)
            }
            (true, false) => Display::Lines,
        };
        Ok(Self {
            display,
            on_event,
            total_steps: 0,
            error: None,
        })
    }

    /// Called by the training loop after each step and evaluation, on the thread that released the GIL.
    pub fn hear(&mut self, event: Event) -> ControlFlow<()> {
        Python::attach(|py| {
            let heard = self
                .show(py, &event)
                .and_then(|()| self.forward(py, &event));
            match heard {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    self.error.get_or_insert(e);
                    ControlFlow::Break(())
                }
            }
        })
    }

    pub fn finish(&self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish_and_clear();
        }
    }

    fn show(&mut self, py: Python<'_>, event: &Event) -> PyResult<()> {
        let line = match event {
            Event::Start {
                total_steps,
                steps_per_epoch,
                resumed_at,
                train_examples,
            } => {
                self.total_steps = *total_steps;
                if let Display::Bar(bar) = &self.display {
                    bar.set_length(*total_steps as u64);
                    bar.set_position(*resumed_at as u64);
                    bar.reset_eta();
                }
                let resumed = match resumed_at {
                    0 => String::new(),
                    n => format!("; resumed at step {n}"),
                };
                Some(format!("training on {train_examples} examples: {steps_per_epoch} steps an epoch, {total_steps} steps in all{resumed}"))
            }
            Event::Step(record) => {
                let text = format!(
                    "step {}/{}: loss {:.4}, {:.0} examples/s",
                    record.step, self.total_steps, record.loss, record.examples_per_s
                );
                if let Display::Bar(bar) = &self.display {
                    bar.set_position(record.step as u64);
                    bar.set_message(format!(
                        "loss {:.4}  {:.0} ex/s",
                        record.loss, record.examples_per_s
                    ));
                }
                let tenth = (self.total_steps / 10).max(1);
                (record.step % tenth == 0).then_some(text)
            }
            Event::Eval { record, improved } => {
                let measures = match record.dev_macro_f1 {
                    Some(f1) => format!("accuracy {:.4}, macro-F1 {f1:.4}", record.dev_accuracy),
                    None => format!("exact match {:.4}", record.dev_accuracy),
                };
                let mark = if *improved { "  (best, saved)" } else { "" };
                Some(format!(
                    "step {}: dev {measures}, loss {:.4}{mark}",
                    record.step, record.dev_loss
                ))
            }
            Event::EarlyStop { step } => Some(format!(
                "stopping early at step {step}: dev accuracy stopped improving"
            )),
        };
        match (&self.display, line) {
            (Display::Bar(bar), Some(line)) if !matches!(event, Event::Step(_)) => {
                bar.println(line)
            }
            (Display::Lines, Some(line)) => {
                let stderr = py.import("sys")?.getattr("stderr")?;
                stderr.call_method1("write", (line + "\n",))?;
                stderr.call_method0("flush")?;
            }
            _ => {}
        }
        Ok(())
    }

    /// `on_event({"event": "step", **the metrics.jsonl record})`, and "eval" (with `improved`),
    /// "start" and "early_stop".
    fn forward(&self, py: Python<'_>, event: &Event) -> PyResult<()> {
        let Some(on_event) = &self.on_event else {
            return Ok(());
        };
        let dict = match event {
            Event::Start {
                total_steps,
                steps_per_epoch,
                resumed_at,
                train_examples,
            } => {
                let dict = PyDict::new(py);
                dict.set_item("total_steps", total_steps)?;
                dict.set_item("steps_per_epoch", steps_per_epoch)?;
                dict.set_item("resumed_at", resumed_at)?;
                dict.set_item("train_examples", train_examples)?;
                (dict, "start")
            }
            Event::Step(record) => (record_dict(py, *record)?, "step"),
            Event::Eval { record, improved } => {
                let dict = record_dict(py, *record)?;
                dict.set_item("improved", improved)?;
                (dict, "eval")
            }
            Event::EarlyStop { step } => {
                let dict = PyDict::new(py);
                dict.set_item("step", step)?;
                (dict, "early_stop")
            }
        };
        let (dict, kind) = dict;
        dict.set_item("event", kind)?;
        on_event.call1(py, (dict,))?;
        Ok(())
    }
}

fn record_dict<'py>(
    py: Python<'py>,
    record: &impl serde::Serialize,
) -> PyResult<Bound<'py, PyDict>> {
    let value = pythonize::pythonize(py, record)?;
    Ok(value.cast_into::<PyDict>()?)
}
