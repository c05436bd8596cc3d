//! Reading data files: formats, columns, and errors that name the file, line and field.

use softprompt::data::{label_ids, label_set, read_examples, Columns, Labels};
use std::path::{Path, PathBuf};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn error(path: &Path, columns: &Columns) -> String {
    format!(
        "{:#}",
        read_examples(path, columns, Labels::Required).expect_err("must fail")
    )
}

#[test]
fn reads_tsv_csv_and_jsonl_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cols = Columns::default();
    let tsv = write(
        dir,
        "a.tsv",
        "text\tlabel\n\"quoted\" start\tpos\nplain\tneg\n",
    );
    let csv = write(
        dir,
        "a.csv",
        "label,text\npos,\"\"\"quoted\"\" start\"\nneg,plain\n",
    );
    let jsonl = write(dir, "a.jsonl", "{\"text\": \"\\\"quoted\\\" start\", \"label\": \"pos\"}\n\n{\"text\": \"plain\", \"label\": \"neg\"}\n");
    let texts = |p: &PathBuf| {
        read_examples(p, &cols, Labels::Required)
            .unwrap()
            .into_iter()
            .map(|e| (e.text, e.label.unwrap()))
            .collect::<Vec<_>>()
    };
    let expected = vec![
        ("\"quoted\" start".to_string(), "pos".to_string()),
        ("plain".into(), "neg".into()),
    ];
    assert_eq!(texts(&tsv), expected);
    assert_eq!(texts(&csv), expected);
    assert_eq!(texts(&jsonl), expected);
}

#[test]
fn numeric_json_labels_and_text_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cols = Columns {
        text: "premise".into(),
        text_pair: Some("hypothesis".into()),
        label: "y".into(),
        task: None,
    };
    let path = write(
        dir,
        "pairs.jsonl",
        "{\"premise\": \"a\", \"hypothesis\": \"b\", \"y\": 2}\n",
    );
    let ex = read_examples(&path, &cols, Labels::Required).unwrap();
    assert_eq!(ex[0].text_pair.as_deref(), Some("b"));
    assert_eq!(ex[0].label.as_deref(), Some("2"));
}

#[test]
fn malformed_rows_name_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cols = Columns::default();
    let short = write(dir, "short.tsv", "text\tlabel\ngood\tpos\nno label here\n");
    let msg = error(&short, &cols);
    assert!(
        msg.contains("short.tsv line 3") && msg.contains("field 'label' is missing"),
        "{msg}"
    );

    let empty = write(dir, "empty.tsv", "text\tlabel\ngood\tpos\n   \tneg\n");
    let msg = error(&empty, &cols);
    assert!(
        msg.contains("empty.tsv line 3") && msg.contains("field 'text' is empty"),
        "{msg}"
    );

    let bad_json = write(
        dir,
        "bad.jsonl",
        "{\"text\": \"ok\", \"label\": \"a\"}\n{\"text\": \"ok\"\n",
    );
    let msg = error(&bad_json, &cols);
    assert!(
        msg.contains("bad.jsonl line 2") && msg.contains("not valid JSON"),
        "{msg}"
    );

    let no_label = write(dir, "nolabel.jsonl", "{\"text\": \"ok\"}\n");
    let msg = error(&no_label, &cols);
    assert!(
        msg.contains("nolabel.jsonl line 1") && msg.contains("field 'label' is missing"),
        "{msg}"
    );

    let no_column = write(dir, "nocol.csv", "sentence,label\nhi,a\n");
    let msg = error(&no_column, &cols);
    assert!(
        msg.contains("nocol.csv line 1") && msg.contains("no column 'text'"),
        "{msg}"
    );

    let missing = dir.join("absent.tsv");
    let msg = error(&missing, &cols);
    assert!(
        msg.contains("cannot read data file") && msg.contains("absent.tsv"),
        "{msg}"
    );

    let unknown = write(dir, "data.txt", "x");
    assert!(error(&unknown, &cols).contains("use a .tsv, .csv or .jsonl file"));
}

#[test]
fn unlabelled_rows_are_fine_for_prediction() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = write(dir, "texts.tsv", "text\nhello\n");
    let ex = read_examples(&path, &Columns::default(), Labels::Optional).unwrap();
    assert_eq!(ex[0].label, None);
}

#[test]
fn a_label_never_seen_in_training_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cols = Columns::default();
    let train = read_examples(
        &write(dir, "train.tsv", "text\tlabel\na\tpos\nb\tneg\n"),
        &cols,
        Labels::Required,
    )
    .unwrap();
    let labels = label_set(&train);
    assert_eq!(labels, ["neg", "pos"]);
    let dev_path = write(dir, "dev.tsv", "text\tlabel\nc\tpos\nd\tneutral\n");
    let dev = read_examples(&dev_path, &cols, Labels::Required).unwrap();
    let msg = format!("{:#}", label_ids(&dev, &labels, &dev_path).unwrap_err());
    assert!(
        msg.contains("dev.tsv line 3")
            && msg.contains("label 'neutral' was never seen in training"),
        "{msg}"
    );
}

/// Hostile-input regressions (issue 13, item 7 and 10): each of these was accepted or misreported.
#[test]
fn a_row_with_more_fields_than_the_header_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(
        tmp.path(),
        "a.tsv",
        "text\tlabel\ngood\tpos\na stray\ttab\tneg\n",
    );
    let err = error(&path, &Columns::default());
    assert!(
        err.contains("line 3") && err.contains("3 fields and the header 2"),
        "{err}"
    );
    // a trailing tab (an export's empty last field) is no stray field
    let path = write(tmp.path(), "b.tsv", "text\tlabel\ngood\tpos\t\n");
    read_examples(&path, &Columns::default(), Labels::Required).unwrap();
}

#[test]
fn labels_are_trimmed() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(
        tmp.path(),
        "a.tsv",
        "text\tlabel\ngood\tpositive \nbad\tpositive\n",
    );
    let examples = read_examples(&path, &Columns::default(), Labels::Required).unwrap();
    assert_eq!(label_set(&examples), ["positive"]);
    // the column itself stays as written: a causal LM's target keeps its spaces
    assert_eq!(examples[0].label.as_deref(), Some("positive "));
    assert_eq!(
        label_ids(&examples, &label_set(&examples), &path).unwrap(),
        [0, 0]
    );
}

#[test]
fn a_byte_order_mark_is_read_past_in_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "a.jsonl",
            "\u{feff}{\"text\": \"good\", \"label\": \"pos\"}\n",
        ),
        ("a.tsv", "\u{feff}text\tlabel\ngood\tpos\n"),
        ("a.csv", "\u{feff}text,label\ngood,pos\n"),
    ] {
        let path = write(tmp.path(), name, text);
        let examples = read_examples(&path, &Columns::default(), Labels::Required).unwrap();
        assert_eq!(examples[0].text, "good", "{name}");
    }
}

#[test]
fn an_unclosed_csv_quote_is_named_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(
        tmp.path(),
        "a.csv",
        "text,label\ngood,pos\n\"never closed,neg\nbad,neg\n",
    );
    let err = error(&path, &Columns::default());
    assert!(
        err.contains("line 3") && err.contains("never closed"),
        "{err}"
    );
    // a quote inside an unquoted field is a character like any other, also before a last row
    // whose quoted text spans lines
    let path = write(
        tmp.path(),
        "b.csv",
        "text,label\na 5\" screen,pos\n\"two\nlines\",neg\n",
    );
    read_examples(&path, &Columns::default(), Labels::Required).unwrap();
}

#[test]
fn an_error_lists_a_few_labels_not_a_thousand() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "a.tsv", "text\tlabel\ngood\tunknown\n");
    let examples = read_examples(&path, &Columns::default(), Labels::Required).unwrap();
    let labels: Vec<String> = (0..1000).map(|i| format!("label{i}")).collect();
    let err = format!("{:#}", label_ids(&examples, &labels, &path).unwrap_err());
    assert!(err.contains("(1000 in all)") && err.len() < 400, "{err}");
}
