//! The data readers (TSV, CSV, JSON lines) on any bytes: an error or examples, never a panic.
//! The first byte picks the format and whether a text-pair column is asked for.
#![no_main]
use libfuzzer_sys::fuzz_target;
use softprompt::data::{label_ids, label_set, read_examples, Columns, Labels};

fuzz_target!(|input: &[u8]| {
    let Some((&choice, content)) = input.split_first() else {
        return;
    };
    let extension = ["tsv", "csv", "jsonl"][choice as usize % 3];
    let path = softprompt_fuzz::scratch_file(&format!("rows.{extension}"), content);
    let columns = Columns {
        text_pair: (choice & 4 != 0).then(|| "pair".to_string()),
        ..Columns::default()
    };
    if let Ok(examples) = read_examples(&path, &columns, Labels::Required) {
        let labels = label_set(&examples);
        let _ = label_ids(&examples, &labels, &path);
    }
    let _ = read_examples(&path, &columns, Labels::Optional);
});
