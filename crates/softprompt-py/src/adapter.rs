//! `softprompt.Adapter`: an adapter directory (softprompt's or PEFT's), loaded and checked.

use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use softprompt::adapter::{self, AdapterHead};
use std::path::PathBuf;
use std::sync::Arc;

/// A prompt-tuning adapter: the prompt, and the head that reads behind it (a classifier, a
/// verbalizer's label words, or none for generation).
#[pyclass(frozen, module = "softprompt")]
pub struct Adapter {
    pub inner: Arc<adapter::Adapter>,
    pub path: PathBuf,
    config: serde_json::Value,
}

impl Adapter {
    pub fn open(path: PathBuf) -> PyResult<Self> {
        let inner =
            adapter::Adapter::open(&path, &candle_core::Device::Cpu).map_err(crate::error)?;
        // the files as written, PEFT's fields softprompt does not read included
        let mut config = serde_json::Map::new();
        for file in [adapter::CONFIG_FILE, adapter::EXTRA_FILE] {
            if let Ok(text) = std::fs::read_to_string(path.join(file)) {
                if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(&text) {
                    config.extend(fields);
                }
            }
        }
        Ok(Self {
            inner: Arc::new(inner),
            path,
            config: serde_json::Value::Object(config),
        })
    }
}

#[pymethods]
impl Adapter {
    /// Loads the adapter in directory `path` (adapter_config.json, adapter_model.safetensors and,
    /// if softprompt wrote it, softprompt.json). Raises softprompt.Error saying what is wrong.
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        Self::open(path)
    }

    /// numpy.ndarray [num_virtual_tokens, token_dim], float32: a copy of the prompt.
    #[getter]
    fn prompt<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let prompt = &self.inner.prompt;
        let (m, d) = prompt.dims2().map_err(|e| crate::error(e.into()))?;
        let values = prompt
            .to_dtype(candle_core::DType::F32)
            .and_then(|p| p.flatten_all())
            .and_then(|p| p.to_vec1::<f32>())
            .map_err(|e| crate::error(e.into()))?;
        Ok(PyArray1::from_vec(py, values).reshape([m, d])?.into_any())
    }

    /// The label names, in the order of the classifier's outputs (empty for a generation adapter).
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.inner.labels.clone()
    }

    /// adapter_config.json and softprompt.json, as one dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(pythonize::pythonize(py, &self.config)?)
    }

    /// "classify", "verbalizer" or "generation": what reads the hidden state behind the prompt.
    #[getter]
    fn head(&self) -> &'static str {
        match self.inner.head {
            AdapterHead::Linear { .. } => "classify",
            AdapterHead::Verbalizer { .. } => "verbalizer",
            AdapterHead::Generation => "generation",
        }
    }

    /// A multitask adapter's task names (each call names one as task=...); None for any other.
    #[getter]
    fn tasks(&self) -> Option<Vec<String>> {
        self.inner.tasks.as_ref().map(|t| t.names.clone())
    }

    #[getter]
    fn num_virtual_tokens(&self) -> usize {
        self.inner.prompt.dims()[0]
    }

    /// The directory it was loaded from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "Adapter({:?}, head={:?}, num_virtual_tokens={}, labels={:?})",
            self.path.display().to_string(),
            self.head(),
            self.num_virtual_tokens(),
            self.inner.labels
        )
    }
}
