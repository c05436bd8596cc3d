//! Where an input goes in the text a model reads: "Review: {text}\nSentiment:". A template is
//! checked once, when it is made (`Template::parse`), so every template in a training config, an
//! adapter on disk, a server or a command line has its `{text}`.

use crate::{bail, Result};
use serde::{Deserialize, Serialize};

/// Where the input goes in a template.
pub const TEXT_SLOT: &str = "{text}";

/// A text with one or more `{text}` slots. On disk (checkpoints, `softprompt.json`) it is the
/// plain string, and a string without `{text}` is refused when it is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Template(String);

impl Template {
    pub fn parse(text: &str) -> Result<Self> {
        if !text.contains(TEXT_SLOT) {
            bail!("the template {text:?} has no {TEXT_SLOT} to put the input in");
        }
        Ok(Self(text.to_string()))
    }

    /// The input written into the template.
    pub fn render(&self, input: &str) -> String {
        self.0.replace(TEXT_SLOT, input)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Template {
    type Error = crate::Error;

    fn try_from(text: String) -> Result<Self> {
        Self::parse(&text)
    }
}

impl From<Template> for String {
    fn from(template: Template) -> String {
        template.0
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The input written into a template; without one, the input as it is.
pub fn render(template: Option<&Template>, input: &str) -> String {
    match template {
        Some(t) => t.render(input),
        None => input.to_string(),
    }
}

/// `word` as a model would write it right after `before`: with a leading space, unless one side
/// already has whitespace there.
pub fn continuation(before: &str, word: &str) -> String {
    if before.is_empty()
        || before.ends_with(char::is_whitespace)
        || word.starts_with(char::is_whitespace)
    {
        word.to_string()
    } else {
        format!(" {word}")
    }
}
