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
        let mut line = event.describe();
        match (event, &self.display) {
            (
                Event::Start {
                    total_steps,
                    resumed_at,
                    ..
                },
                display,
            ) => {
                self.total_steps = *total_steps;
                if let Display::Bar(bar) = display {
                    bar.set_length(*total_steps as u64);
                    bar.set_position(*resumed_at as u64);
                    bar.reset_eta();
                }
            }
            (Event::Step(record), Display::Bar(bar)) => {
                bar.set_position(record.step as u64);
                bar.set_message(format!(
                    "loss {:.4}  {:.0} ex/s",
                    record.loss, record.examples_per_s
                ));
            }
            (Event::Step(record), Display::Lines)
                if record.step % (self.total_steps / 10).max(1) == 0 =>
            {
                line = Some(format!(
                    "step {}/{}: loss {:.4}, {:.0} examples/s",
                    record.step, self.total_steps, record.loss, record.examples_per_s
                ));
            }
            _ => {}
        }
        match (&self.display, line) {
            (Display::Bar(bar), Some(line)) => bar.println(line),
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
