//! What Python hands in as data → the library's `DataSource`: a path (.tsv, .csv, .jsonl, read as
//! the command line reads it), `(text, label)` pairs, a dict of columns, a pandas DataFrame, or
//! anything that iterates as mappings (a Hugging Face `datasets.Dataset`). Rows from memory are
//! checked as a file's are, and errors name them `<train> line N` (N counts rows from 1).

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};
use softprompt::data::{Columns, DataSource, Example, Labels};
use std::path::PathBuf;

/// The columns a call reads: `text_column`, `text_pair_column`, `label_column` (training's
/// `task_column` is set apart).
pub fn columns(text: &str, text_pair: Option<&str>, label: &str) -> Columns {
    Columns {
        text: text.into(),
        text_pair: text_pair.map(Into::into),
        label: label.into(),
        task: None,
    }
}

/// `data` as a source named `<name>` in errors.
pub fn source(
    data: &Bound<'_, PyAny>,
    name: &str,
    columns: &Columns,
    labels: Labels,
) -> PyResult<DataSource> {
    if let Some(path) = path(data)? {
        return Ok(DataSource::File(path));
    }
    let named = format!("<{name}>");
    let examples = examples(data, &named, columns, labels)?;
    DataSource::rows(&named, examples, columns, labels).map_err(crate::error)
}

/// A `str` or an `os.PathLike`.
fn path(data: &Bound<'_, PyAny>) -> PyResult<Option<PathBuf>> {
    if data.is_instance_of::<PyString>() || data.hasattr("__fspath__")? {
        return Ok(Some(data.extract::<PathBuf>()?));
    }
    Ok(None)
}

fn examples(
    data: &Bound<'_, PyAny>,
    name: &str,
    columns: &Columns,
    labels: Labels,
) -> PyResult<Vec<Example>> {
    let type_module: String = data.get_type().getattr("__module__")?.extract()?;
    if type_module.starts_with("pandas") && data.hasattr("to_dict")? {
        let dict = data.call_method1("to_dict", ("list",))?;
        return from_columns(dict.cast::<PyDict>()?, name, columns, labels);
    }
    if let Ok(dict) = data.cast::<PyDict>() {
        return from_columns(dict, name, columns, labels);
    }
    let rows = data.try_iter().map_err(|_| {
        crate::invalid(format!(
            "{name}: data must be a file path, a list of (text, label) pairs, a dict of columns, a pandas DataFrame or rows as mappings, not {}",
            data.get_type().name().map_or("this".into(), |n| n.to_string())
        ))
    })?;
    rows.enumerate()
        .map(|(i, row)| from_row(&row?, i + 1, name, columns))
        .collect()
}

/// `{"text": [...], "label": [...]}`: one row per index.
fn from_columns(
    dict: &Bound<'_, PyDict>,
    name: &str,
    columns: &Columns,
    labels: Labels,
) -> PyResult<Vec<Example>> {
    let column = |key: &str, required: bool| -> PyResult<Option<Vec<Bound<'_, PyAny>>>> {
        match dict.get_item(key)? {
            Some(values) => Ok(Some(values.try_iter()?.collect::<PyResult<Vec<_>>>()?)),
            None if required => {
                let keys: Vec<String> = dict.keys().iter().map(|k| k.to_string()).collect();
                Err(crate::invalid(format!(
                    "{name}: no column '{key}' (columns: {})",
                    keys.join(", ")
                )))
            }
            None => Ok(None),
        }
    };
    let texts = column(&columns.text, true)?.unwrap_or_default();
    let pairs = match &columns.text_pair {
        Some(key) => column(key, true)?,
        None => None,
    };
    let label_values = column(&columns.label, labels == Labels::Required)?;
    let tasks = match &columns.task {
        Some(key) => column(key, true)?,
        None => None,
    };
    let pair_key = columns.text_pair.as_deref().unwrap_or_default();
    let task_key = columns.task.as_deref().unwrap_or_default();
    for (key, values) in [
        (columns.label.as_str(), &label_values),
        (pair_key, &pairs),
        (task_key, &tasks),
    ] {
        if let Some(values) = values.as_ref().filter(|v| v.len() != texts.len()) {
            return Err(crate::invalid(format!(
                "{name}: column '{key}' has {} values and '{}' {}",
                values.len(),
                columns.text,
                texts.len()
            )));
        }
    }
    (0..texts.len())
        .map(|i| {
            let line = i + 1;
            Ok(Example {
                text: field(&texts[i], name, line, &columns.text)?.unwrap_or_default(),
                text_pair: match &pairs {
                    Some(p) => field(
                        &p[i],
                        name,
                        line,
                        columns.text_pair.as_deref().unwrap_or(""),
                    )?,
                    None => None,
                },
                label: match &label_values {
                    Some(l) => field(&l[i], name, line, &columns.label)?,
                    None => None,
                },
                task: match &tasks {
                    Some(t) => field(&t[i], name, line, task_key)?,
                    None => None,
                },
                line,
            })
        })
        .collect()
}

/// A text alone, `(text, label)` (`(text, text_pair, label)` with a pair column), or a mapping.
fn from_row(
    row: &Bound<'_, PyAny>,
    line: usize,
    name: &str,
    columns: &Columns,
) -> PyResult<Example> {
    let get = |value: Option<Bound<'_, PyAny>>, key: &str| match value {
        Some(v) => field(&v, name, line, key),
        None => Ok(None),
    };
    if row.is_instance_of::<PyString>() {
        return Ok(Example {
            text: row.extract()?,
            text_pair: None,
            label: None,
            task: None,
            line,
        });
    }
    if row.is_instance_of::<PyTuple>() || row.is_instance_of::<PyList>() {
        let items: Vec<Bound<'_, PyAny>> = row.try_iter()?.collect::<PyResult<_>>()?;
        let paired = columns.text_pair.is_some();
        let width = if paired { 3 } else { 2 };
        if items.is_empty() || items.len() > width {
            return Err(crate::invalid(format!(
                "{name} line {line}: a row is {}, and this one has {} items",
                if paired {
                    "(text, text_pair, label)"
                } else {
                    "(text, label)"
                },
                items.len()
            )));
        }
        let mut items = items.into_iter();
        let text = get(items.next(), &columns.text)?.unwrap_or_default();
        let text_pair = match &columns.text_pair {
            Some(key) => get(items.next(), key)?,
            None => None,
        };
        return Ok(Example {
            text,
            text_pair,
            label: get(items.next(), &columns.label)?,
            task: None,
            line,
        });
    }
    let Ok(mapping) = row.cast::<PyMapping>() else {
        return Err(crate::invalid(format!(
            "{name} line {line}: a row must be a text, a (text, label) pair or a mapping, not {}",
            row.get_type()
                .name()
                .map_or("this".into(), |n| n.to_string())
        )));
    };
    let item = |key: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        match mapping.contains(key)? {
            true => Ok(Some(mapping.get_item(key)?)),
            false => Ok(None),
        }
    };
    let text = match item(&columns.text)? {
        Some(v) => field(&v, name, line, &columns.text)?,
        None => {
            return Err(crate::invalid(format!(
                "{name} line {line}: field '{}' is missing",
                columns.text
            )))
        }
    };
    Ok(Example {
        text: text.unwrap_or_default(),
        text_pair: match &columns.text_pair {
            Some(key) => get(item(key)?, key)?,
            None => None,
        },
        label: get(item(&columns.label)?, &columns.label)?,
        task: match &columns.task {
            Some(key) => get(item(key)?, key)?,
            None => None,
        },
        line,
    })
}

/// A field's text, as a JSON lines file gives it: strings as they are, numbers as written, booleans
/// as `true` / `false`; `None` is absent.
fn field(value: &Bound<'_, PyAny>, name: &str, line: usize, key: &str) -> PyResult<Option<String>> {
    if value.is_none() {
        return Ok(None);
    }
    if let Ok(text) = value.cast::<PyString>() {
        return Ok(Some(text.extract::<String>()?));
    }
    if value.is_instance_of::<PyBool>() {
        return Ok(Some(value.extract::<bool>()?.to_string()));
    }
    if value.is_instance_of::<PyInt>() || value.is_instance_of::<PyFloat>() {
        return Ok(Some(value.str()?.extract::<String>()?));
    }
    // NumPy's integers (a pandas column's labels) are not Python ints, but they are indices
    if value.hasattr("__index__")? {
        return Ok(Some(
            value
                .call_method0("__index__")?
                .str()?
                .extract::<String>()?,
        ));
    }
    Err(crate::invalid(format!(
        "{name} line {line}: field '{key}' must be a string, number or boolean, not {}",
        value
            .get_type()
            .name()
            .map_or("this".into(), |n| n.to_string())
    )))
}
