//! What a subcommand prints: one JSON line with `--json`, else text for a person.

use serde::Serialize;
use std::fmt::Display;

/// Prints `value` as one JSON line when `json`, else `text` (which ends its own lines).
pub fn emit(json: bool, value: &impl Serialize, text: impl Display) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        print!("{text}");
    }
    Ok(())
}
