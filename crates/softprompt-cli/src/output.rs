//! What a subcommand prints: one JSON line with `--json`, else text for a person.

use serde::Serialize;
use std::fmt::Display;

/// A text on one line: its line breaks and tabs written as \n, \r and \t (the way a
/// command line's free-text flags read them back).
pub fn one_line(text: &str) -> String {
    text.replace('\n', "\\n")
        .replace('\r', "\\r")
        .replace('\t', "\\t")
}

/// Prints `value` as one JSON line when `json`, else `text` (which ends its own lines).
pub fn emit(json: bool, value: &impl Serialize, text: impl Display) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        print!("{text}");
    }
    Ok(())
}
