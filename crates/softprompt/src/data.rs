//! Labelled text files → examples. TSV (no quoting), CSV (RFC 4180 quoting) and JSON lines, told
//! apart by the file's extension. Every error names the file, the line and the field.

use crate::{bail, Context};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Which columns (or JSON fields) hold the text, the optional second text of a pair, the label,
/// and (for a multitask prompt) each row's task.
#[derive(Debug, Clone)]
pub struct Columns {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: String,
    pub task: Option<String>,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            text: "text".into(),
            text_pair: None,
            label: "label".into(),
            task: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: Option<String>,
    /// which task of a multitask prompt the row is for (`Columns::task`)
    pub task: Option<String>,
    /// 1-based line in the source file, for error messages
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Tsv,
    Csv,
    JsonLines,
}

fn format_of(path: &Path) -> crate::Result<Format> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    Ok(match ext.as_str() {
        "tsv" | "tab" => Format::Tsv,
        "csv" => Format::Csv,
        "jsonl" | "ndjson" | "json" => Format::JsonLines,
        _ => bail!(
            "{}: unknown data format; use a .tsv, .csv or .jsonl file",
            path.display()
        ),
    })
}

/// Whether the label column must be present in every row (training and evaluation) or may be absent
/// (prediction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Labels {
    Required,
    Optional,
}

/// Where a data set comes from: a file, or rows already in memory (the Python binding's lists,
/// dicts and DataFrames), checked as a file's rows are and named in errors as a file is.
#[derive(Debug, Clone)]
pub enum DataSource {
    File(PathBuf),
    Rows {
        name: PathBuf,
        examples: Vec<Example>,
    },
}

impl DataSource {
    /// Rows from memory, each `line` its 1-based row number; `name` stands for the file in errors
    /// ("<train> line 3: field 'text' is empty").
    pub fn rows(
        name: &str,
        examples: Vec<Example>,
        columns: &Columns,
        labels: Labels,
    ) -> crate::Result<Self> {
        let name = PathBuf::from(name);
        if examples.is_empty() {
            bail!("{}: no examples", name.display());
        }
        let examples = examples
            .into_iter()
            .map(|e| {
                if labels == Labels::Required && e.label.is_none() {
                    bail!(
                        "{} line {}: field '{}' is missing",
                        name.display(),
                        e.line,
                        columns.label
                    );
                }
                check(e, &name, columns)
            })
            .collect::<crate::Result<_>>()?;
        Ok(Self::Rows { name, examples })
    }

    /// What errors call it: the file's path, or the rows' name.
    pub fn name(&self) -> &Path {
        match self {
            Self::File(path) => path,
            Self::Rows { name, .. } => name,
        }
    }

    pub fn examples(&self, columns: &Columns, labels: Labels) -> crate::Result<Cow<'_, [Example]>> {
        match self {
            Self::File(path) => Ok(Cow::Owned(read_examples(path, columns, labels)?)),
            Self::Rows { examples, .. } => Ok(Cow::Borrowed(examples)),
        }
    }

    /// The bytes that decide what the examples are (a file's own; the rows' fields), which a
    /// resumed run checks are unchanged.
    pub fn content(&self) -> crate::Result<Vec<u8>> {
        match self {
            Self::File(path) => {
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
            }
            Self::Rows { examples, .. } => Ok(examples
                .iter()
                .flat_map(|e| {
                    let fields = [
                        Some(&e.text),
                        e.text_pair.as_ref(),
                        e.label.as_ref(),
                        e.task.as_ref(),
                    ];
                    fields.into_iter().flat_map(|f| {
                        let bytes = f.map_or(&[0xff][..], |f| f.as_bytes());
                        bytes.iter().copied().chain([0])
                    })
                })
                .collect()),
        }
    }
}

pub fn read_examples(
    path: &Path,
    columns: &Columns,
    labels: Labels,
) -> crate::Result<Vec<Example>> {
    let format = format_of(path)?;
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read data file {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| crate::invalid!("{}: not UTF-8 text: {e}", path.display()))?;
    // a byte-order mark is no part of the first line, in any format
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
    let examples = match format {
        Format::JsonLines => read_json_lines(path, text, columns, labels)?,
        Format::Tsv | Format::Csv => read_delimited(path, text, format, columns, labels)?,
    };
    if examples.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(examples)
}

fn read_delimited(
    path: &Path,
    text: &str,
    format: Format,
    columns: &Columns,
    labels: Labels,
) -> crate::Result<Vec<Example>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(if format == Format::Tsv { b'\t' } else { b',' })
        .quoting(format == Format::Csv)
        .flexible(true)
        .from_reader(text.as_bytes());
    let file = path.display();
    let headers = reader
        .headers()
        .with_context(|| format!("{file} line 1: cannot read the header"))?
        .clone();
    let find = |name: &str| headers.iter().position(|h| h.trim() == name);
    let missing = |name: &str| {
        crate::invalid!(
            "{file} line 1: no column '{name}' in the header (columns: {})",
            listing(&headers.iter().collect::<Vec<_>>())
        )
    };
    let text_col = find(&columns.text).ok_or_else(|| missing(&columns.text))?;
    let pair_col = match &columns.text_pair {
        Some(name) => Some(find(name).ok_or_else(|| missing(name))?),
        None => None,
    };
    let label_col = match (find(&columns.label), labels) {
        (None, Labels::Required) => return Err(missing(&columns.label)),
        (col, _) => col,
    };
    let task_col = match &columns.task {
        Some(name) => Some((find(name).ok_or_else(|| missing(name))?, name)),
        None => None,
    };
    let records = reader
        .records()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{file}: malformed row"))?;
    // a quote that is never closed swallows the rest of the file, lines and all, into the last
    // row's field (an unquoted field cannot hold a line break)
    let swallowed = records
        .last()
        .filter(|r| format == Format::Csv && r.iter().any(|f| f.contains('\n')));
    let from = |r: &csv::StringRecord| r.position().map_or(0, |p| p.byte() as usize);
    let unclosed =
        |r: &&csv::StringRecord| text[from(r).min(text.len())..].matches('"').count() % 2 == 1;
    if let Some(last) = swallowed.filter(unclosed) {
        let line = last.position().map_or(1, |p| p.line());
        bail!("{file} line {line}: a quoted field is never closed (a \" without its pair)");
    }
    let mut examples = Vec::new();
    for record in records {
        let line = record.position().map_or(0, |p| p.line() as usize);
        let field = |col: usize, name: &str| -> crate::Result<String> {
            match record.get(col) {
                Some(v) => Ok(v.to_string()),
                None => bail!(
                    "{file} line {line}: field '{name}' is missing (the row has {} fields)",
                    record.len()
                ),
            }
        };
        if record.len() == 1 && record.get(0).is_some_and(|f| f.trim().is_empty()) {
            continue; // a blank line
        }
        // fields past the header are a stray delimiter, unless empty (a trailing tab or comma)
        if record
            .iter()
            .skip(headers.len())
            .any(|f| !f.trim().is_empty())
        {
            bail!(
                "{file} line {line}: the row has {} fields and the header {} (a stray {}?)",
                record.len(),
                headers.len(),
                if format == Format::Tsv {
                    "tab"
                } else {
                    "comma, or a text that needs quotes"
                }
            );
        }
        let example = Example {
            text: field(text_col, &columns.text)?,
            text_pair: match (pair_col, &columns.text_pair) {
                (Some(col), Some(name)) => Some(field(col, name)?),
                _ => None,
            },
            label: label_col
                .map(|col| field(col, &columns.label))
                .transpose()?,
            task: task_col.map(|(col, name)| field(col, name)).transpose()?,
            line,
        };
        examples.push(check(example, path, columns)?);
    }
    Ok(examples)
}

fn read_json_lines(
    path: &Path,
    text: &str,
    columns: &Columns,
    labels: Labels,
) -> crate::Result<Vec<Example>> {
    let file = path.display();
    let mut examples = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(raw)
            .with_context(|| format!("{file} line {line}: not valid JSON"))?;
        let object = value
            .as_object()
            .ok_or_else(|| crate::invalid!("{file} line {line}: not a JSON object"))?;
        let field = |name: &str, required: bool| -> crate::Result<Option<String>> {
            match object.get(name) {
                None | Some(serde_json::Value::Null) if required => {
                    bail!("{file} line {line}: field '{name}' is missing")
                }
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    Ok(Some(v.to_string()))
                }
                Some(_) => {
                    bail!("{file} line {line}: field '{name}' must be a string, number or boolean")
                }
            }
        };
        let example = Example {
            text: field(&columns.text, true)?.unwrap_or_default(),
            text_pair: match &columns.text_pair {
                Some(name) => field(name, true)?,
                None => None,
            },
            label: field(&columns.label, labels == Labels::Required)?,
            task: match &columns.task {
                Some(name) => field(name, true)?,
                None => None,
            },
            line,
        };
        examples.push(check(example, path, columns)?);
    }
    Ok(examples)
}

fn check(example: Example, path: &Path, columns: &Columns) -> crate::Result<Example> {
    let at = |name: &str| format!("{} line {}: field '{name}'", path.display(), example.line);
    if example.text.trim().is_empty() {
        bail!("{} is empty", at(&columns.text));
    }
    if let (Some(pair), Some(name)) = (&example.text_pair, &columns.text_pair) {
        if pair.trim().is_empty() {
            bail!("{} is empty", at(name));
        }
    }
    if example
        .label
        .as_deref()
        .is_some_and(|l| l.trim().is_empty())
    {
        bail!("{} is empty", at(&columns.label));
    }
    if let (Some(task), Some(name)) = (&example.task, &columns.task) {
        if task.trim().is_empty() {
            bail!("{} is empty", at(name));
        }
    }
    Ok(example)
}

/// The label names a training file defines, sorted so the same file always gives the same ids.
/// A class label is its text without surrounding spaces ("positive " is "positive").
pub fn label_set(examples: &[Example]) -> Vec<String> {
    sorted_names(examples, |e| e.label.as_deref())
}

/// Label name → id, with an error naming the file and line of a label the adapter does not know.
pub fn label_ids(examples: &[Example], labels: &[String], path: &Path) -> crate::Result<Vec<u32>> {
    ids_of(examples, |e| e.label.as_deref(), labels, path, "label")
}

/// The tasks a multitask training file defines, sorted as labels are: a task's id is its place.
pub fn task_set(examples: &[Example]) -> Vec<String> {
    sorted_names(examples, |e| e.task.as_deref())
}

/// Task name → id, with an error naming the file and line of a task the adapter does not serve.
pub fn task_ids(examples: &[Example], tasks: &[String], path: &Path) -> crate::Result<Vec<u32>> {
    ids_of(examples, |e| e.task.as_deref(), tasks, path, "task")
}

fn sorted_names(examples: &[Example], value: fn(&Example) -> Option<&str>) -> Vec<String> {
    examples
        .iter()
        .filter_map(|e| value(e).map(|v| v.trim().to_string()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn ids_of(
    examples: &[Example],
    value: fn(&Example) -> Option<&str>,
    names: &[String],
    path: &Path,
    what: &str,
) -> crate::Result<Vec<u32>> {
    examples
        .iter()
        .map(|e| {
            let name = value(e).unwrap_or_default().trim();
            names
                .iter()
                .position(|l| l == name)
                .map(|i| i as u32)
                .ok_or_else(|| {
                    crate::invalid!(
                        "{} line {}: {what} '{name}' was never seen in training (known {what}s: {})",
                        path.display(),
                        e.line,
                        listing(names)
                    )
                })
        })
        .collect()
}

/// Names for an error message: all of a few, the first ones of many.
pub fn listing(names: &[impl AsRef<str>]) -> String {
    const SHOWN: usize = 20;
    let shown: Vec<&str> = names.iter().take(SHOWN).map(AsRef::as_ref).collect();
    match names.len() > SHOWN {
        true => format!("{}, … ({} in all)", shown.join(", "), names.len()),
        false => shown.join(", "),
    }
}
