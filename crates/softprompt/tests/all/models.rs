//! Model files from other people (issue 13, item 8): configs that make no sense, and a tokenizer
//! that does not belong to the weights, are refused at load with what does not fit.

use candle_core::{DType, Device};
use softprompt::model::Model;
use std::path::Path;

/// The fixture `name` copied with its config.json edited by `edit`; loading it must fail with `expected`.
fn refused(name: &str, edit: impl Fn(&mut serde_json::Value), expected: &str) {
    refused_with(name, "config.json", edit, expected)
}

/// `refused` with `file` (config.json or tokenizer.json) edited.
fn refused_with(name: &str, file: &str, edit: impl Fn(&mut serde_json::Value), expected: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let from = crate::fixtures().join(name);
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    if !tmp.path().join("tokenizer.json").exists() {
        let bert = crate::fixtures().join("tiny-bert/tokenizer.json");
        std::fs::copy(bert, tmp.path().join("tokenizer.json")).unwrap();
    }
    let config = tmp.path().join(file);
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&config, value.to_string()).unwrap();
    let err = Model::load(Path::new(tmp.path()), DType::F32, &Device::Cpu)
        .err()
        .unwrap_or_else(|| panic!("{name}: must not load"));
    let message = format!("{err:#}");
    assert!(message.contains(expected), "{name}: {message}");
}

#[test]
fn configs_that_make_no_sense_are_refused() {
    refused(
        "tiny-llama",
        |c| c["num_attention_heads"] = 0.into(),
        "do not split",
    );
    refused(
        "tiny-llama",
        |c| c["num_key_value_heads"] = 0.into(),
        "do not split",
    );
    refused(
        "tiny-llama",
        |c| c["num_hidden_layers"] = 0.into(),
        "nothing to run",
    );
    refused(
        "tiny-bert",
        |c| c["num_hidden_layers"] = 0.into(),
        "layers would be ignored",
    );
    refused(
        "tiny-gpt2",
        |c| c["n_layer"] = 0.into(),
        "layers would be ignored",
    );
}

#[test]
fn a_tokenizer_with_more_ids_than_the_embeddings_is_refused() {
    // the tiny GPT-2 embeds 64 tokens; a token with id 70 would fail only when it appears
    refused_with(
        "tiny-gpt2",
        "tokenizer.json",
        |t| t["model"]["vocab"]["extra"] = 70.into(),
        "ids up to 70 and the model embeds 64 tokens",
    );
}
