//! `import softprompt`: the library's models, adapters, training, evaluation, prediction and
//! generation from Python, with the engine's own speed (each call runs in Rust, the GIL released).
//!
//! ```text
//! model.rs       Model: load, train, evaluate, predict, generate
//! adapter.rs     Adapter: an adapter directory, its prompt as a NumPy array, its config
//! data.rs        what Python hands in (a path, (text, label) pairs, columns, a DataFrame, rows
//!                as mappings) → the library's DataSource
//! progress.rs    a training run's events → the progress bar or lines, `on_event`, Ctrl-C
//! threads.rs     the process's own worker pool: `threads=`, and a fresh one after fork()
//! generation.rs  generate(stream=True): pieces of text as an iterator
//! ```

mod adapter;
mod data;
mod generation;
mod model;
mod progress;
mod threads;

use pyo3::create_exception;
use pyo3::prelude::*;

create_exception!(
    softprompt,
    Error,
    pyo3::exceptions::PyValueError,
    "Bad input to softprompt: a data row (file, line, field), an option, an adapter or model that does not fit. The message says what and where."
);

/// The library's error as `softprompt.Error`, with its whole chain ("cannot read a.tsv: No such file or directory").
pub(crate) fn error(e: softprompt::Error) -> PyErr {
    Error::new_err(format!("{e:#}"))
}

/// An `Error` from a message of the binding's own.
pub(crate) fn invalid(message: impl Into<String>) -> PyErr {
    Error::new_err(message.into())
}

#[pymodule]
#[pyo3(name = "softprompt")]
fn softprompt_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // the command line's allocator settings, for the command line's speed (memory.rs says why)
    softprompt::memory::keep_freed_memory();
    softprompt::threads::tell_candle(threads::default_threads());
    m.add("Error", m.py().get_type::<Error>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<model::Model>()?;
    m.add_class::<adapter::Adapter>()?;
    m.add_class::<generation::Pieces>()?;
    Ok(())
}
