//! Adapters written by PEFT itself (SEQ_CLS prompt tuning, P-tuning and multitask prompt tuning on
//! tiny-bert) give PEFT's logits; softprompt's P-tuning encoders compute PEFT's PromptEncoder.

use crate::{fixtures, max_abs_diff};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use softprompt::adapter::{Adapter, AdapterHead, PeftType};
use softprompt::backbone::Backbone;
use softprompt::batch::Padding;
use softprompt::files::load_tensors;
use softprompt::inference::{classify_rows, LoadedAdapter};
use softprompt::model::Model;
use softprompt::prompt_encoder::{EncoderKind, Method, PromptEncoder};
use softprompt::task::classify::Pool;
use std::path::Path;

#[test]
fn peft_written_adapter_gives_peft_logits() {
    let adapter = assert_peft_logits("peft-tiny-adapter", "peft_tiny_logits.safetensors");
    assert_eq!(adapter.method, Method::Prompt);
}

/// PEFT saves a P-tuning adapter as its encoder's output: softprompt reads it as that prompt.
#[test]
fn peft_written_p_tuning_adapter_gives_peft_logits() {
    let adapter = assert_peft_logits(
        "peft-tiny-p-tuning",
        "peft_tiny_p_tuning_logits.safetensors",
    );
    assert_eq!(adapter.method, Method::PTuning);
    assert_eq!(adapter.config.peft_type, PeftType::PTuning);
}

/// PEFT's MULTITASK_PROMPT_TUNING: the shared prompt and each task's factors, one batch mixing
/// every task's rows gives each PEFT's logits under its task id; a task must be named.
#[test]
fn peft_written_multitask_adapter_gives_peft_logits_for_every_task() {
    let adapter = assert_peft_logits(
        "peft-tiny-multitask",
        "peft_tiny_multitask_logits.safetensors",
    );
    assert_eq!(adapter.method, Method::Multitask);
    let tasks = adapter.tasks.as_ref().unwrap();
    assert_eq!(tasks.names, ["0", "1", "2"], "PEFT's task ids");
    let model = Model::load(&fixtures().join("tiny-bert"), DType::F32, &Device::Cpu).unwrap();
    let unnamed = LoadedAdapter::new(&model, &adapter).err().unwrap().chain();
    assert!(
        unnamed.contains("name one of its tasks (0, 1, 2)"),
        "{unnamed}"
    );
    let unknown = adapter.for_task(Some("3")).err().unwrap().chain();
    assert!(
        unknown.contains("no task \"3\" (its tasks: 0, 1, 2)"),
        "{unknown}"
    );
    let one = Adapter::load(&fixtures().join("peft-tiny-adapter"), 16, &Device::Cpu).unwrap();
    let named = one.for_task(Some("0")).err().unwrap().chain();
    assert!(named.contains("serves one task"), "{named}");
}

/// Loads the PEFT adapter `dir` (a SEQ_CLS adapter of tiny-bert) and checks its logits on the
/// fixture texts against PEFT's, stored in `logits` (a multitask adapter's: [task, text, class],
/// every task's rows in one batch).
fn assert_peft_logits(dir: &str, logits: &str) -> Adapter {
    let model = Model::load(&fixtures().join("tiny-bert"), DType::F32, &Device::Cpu).unwrap();
    let adapter = Adapter::load(
        &fixtures().join(dir),
        model.backbone.hidden_size(),
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        matches!(
            adapter.head,
            AdapterHead::Linear {
                pool: Pool::Pooler,
                ..
            }
        ),
        "a PEFT adapter reads BertForSequenceClassification's pooler"
    );
    assert_eq!(adapter.labels, ["LABEL_0", "LABEL_1"]);
    let (reference, meta) = load_tensors(&fixtures().join(logits), &Device::Cpu).unwrap();
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let encoder = model.encoder(adapter.prompt.dim(0).unwrap(), None).unwrap();
    let data: Vec<_> = texts
        .iter()
        .map(|t| encoder.encode(t, None).unwrap())
        .collect();
    let names = adapter.tasks.as_ref().map(|t| t.names.clone());
    let tasks: Vec<LoadedAdapter> = match &names {
        Some(names) => names
            .iter()
            .map(|t| LoadedAdapter::new(&model, &adapter.for_task(Some(t)).unwrap()).unwrap())
            .collect(),
        None => vec![LoadedAdapter::new(&model, &adapter).unwrap()],
    };
    let rows: Vec<_> = tasks
        .iter()
        .flat_map(|task| data.iter().map(move |e| (task, e)))
        .collect();
    let logits = classify_rows(&model.backbone, &rows, Padding::Right, &Device::Cpu).unwrap();
    let classes = logits[0].len();
    let ours = Tensor::from_vec(logits.concat(), (rows.len(), classes), &Device::Cpu).unwrap();
    let reference = reference["logits"].reshape((rows.len(), classes)).unwrap();
    let err = max_abs_diff(&ours, &reference);
    assert!(err < 1e-4, "{dir}: logits differ from PEFT's by {err:e}");
    adapter
}

/// softprompt's P-tuning encoders compute what PEFT's PromptEncoder computes from the same
/// weights (MLP, and the two-layer bidirectional LSTM with its MLP head), in f64.
#[test]
fn p_tuning_encoders_match_peft() {
    let (tensors, _) = load_tensors(
        &fixtures().join("p_tuning_encoders.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (kind, hidden) in [(EncoderKind::Mlp, 8), (EncoderKind::Lstm, 5)] {
        let table = &tensors[&format!("{kind}.embedding.weight")];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let width = table.dim(1).unwrap();
        let encoder =
            PromptEncoder::init(Method::PTuning, kind, hidden, width, table, &mut rng).unwrap();
        let params = encoder.named_params();
        assert_eq!(
            params.len() + 1,
            tensors
                .keys()
                .filter(|k| k.starts_with(&format!("{kind}.")))
                .count()
        );
        for (name, var) in params {
            let key = format!("{kind}.{}", name.strip_prefix("prompt_encoder.").unwrap());
            let peft = tensors
                .get(&key)
                .unwrap_or_else(|| panic!("PEFT has no {key}"));
            assert_eq!(peft.dims(), var.dims(), "{key}");
            var.set(peft).unwrap();
        }
        let err = max_abs_diff(
            &encoder.forward().unwrap(),
            &tensors[&format!("{kind}.output")],
        );
        assert!(
            err < 1e-10,
            "{kind}: the encoder's output differs from PEFT's by {err:e}"
        );
    }
}

#[test]
fn adapter_for_another_model_is_refused_with_the_mismatch_named() {
    let err = Adapter::load(&fixtures().join("peft-tiny-adapter"), 384, &Device::Cpu)
        .err()
        .expect("must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("token_dim 16") && msg.contains("hidden size is 384"),
        "{msg}"
    );
}

/// A `softprompt.json` whose template has no `{text}` would encode every input the same: it is
/// refused when the adapter is read, naming the template.
#[test]
fn an_adapter_whose_template_lacks_the_text_slot_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut adapter = Adapter::load(
        &crate::fixtures().join("peft-tiny-adapter"),
        16,
        &Device::Cpu,
    )
    .unwrap();
    adapter.template = Some(softprompt::template::Template::parse("{text} it was").unwrap());
    adapter.save(tmp.path()).unwrap();
    Adapter::load(tmp.path(), 16, &Device::Cpu).unwrap();
    let extra = tmp.path().join("softprompt.json");
    let text = std::fs::read_to_string(&extra).unwrap();
    std::fs::write(&extra, text.replace("{text} it was", "it was")).unwrap();
    let err = Adapter::load(tmp.path(), 16, &Device::Cpu)
        .err()
        .expect("a template without {text} must not load");
    let message = format!("{err:#}");
    assert!(
        message.contains("softprompt.json") && message.contains("has no {text}"),
        "{message}"
    );
}

/// Adapters from other people (issue 13, items 2, 5 and 8): each of these loaded before.
#[test]
fn broken_adapters_are_refused_with_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let good = Adapter::load(&fixtures().join("peft-tiny-adapter"), 16, &Device::Cpu).unwrap();
    let refused = |name: &str, edit: &dyn Fn(&Path), expected: &str| {
        let dir = tmp.path().join(name);
        good.save(&dir).unwrap();
        edit(&dir);
        let err = Adapter::load(&dir, 16, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{name}: must not load"));
        let message = format!("{err:#}");
        assert!(message.contains(expected), "{name}: {message}");
    };
    let edit_json = |file: &'static str, from: &'static str, to: &'static str| {
        move |dir: &Path| {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains(from), "{text}");
            std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        }
    };
    let labels = |names: &'static str| {
        move |dir: &Path| {
            let path = dir.join("softprompt.json");
            let mut extra: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            extra["labels"] = serde_json::from_str(names).unwrap();
            std::fs::write(&path, extra.to_string()).unwrap();
        }
    };
    refused(
        "no-labels",
        &labels("[]"),
        "label names for a classifier of 2",
    );
    refused("same-label", &labels(r#"["a", "a"]"#), "appears twice");
    refused("empty-label", &labels(r#"["a", " "]"#), "empty name");
    refused(
        "wrapping",
        &edit_json(
            "adapter_config.json",
            "\"num_transformer_submodules\": 1",
            "\"num_transformer_submodules\": 4611686018427387904",
        ),
        "is no prompt length",
    );
    refused(
        "no-prompt",
        &edit_json(
            "adapter_config.json",
            "\"num_virtual_tokens\": 4",
            "\"num_virtual_tokens\": 0",
        ),
        "is no prompt length",
    );
    let nan = Adapter {
        prompt: (good.prompt.clone() * f64::NAN).unwrap(),
        ..Adapter::load(&fixtures().join("peft-tiny-adapter"), 16, &Device::Cpu).unwrap()
    };
    let err = nan.save(&tmp.path().join("nan")).unwrap_err();
    assert!(format!("{err:#}").contains("NaN"), "{err:#}");
    assert!(!tmp.path().join("nan").exists(), "nothing is written");
    refused(
        "nan-on-disk",
        &|dir: &Path| {
            let path = dir.join("adapter_model.safetensors");
            let (mut tensors, _) = load_tensors(&path, &Device::Cpu).unwrap();
            let prompt = tensors.remove("prompt_embeddings").unwrap();
            tensors.insert(
                "prompt_embeddings".into(),
                (prompt * f64::INFINITY).unwrap(),
            );
            let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
            softprompt::files::save_tensors(&path, &named, None).unwrap();
        },
        "NaN or infinite",
    );
}
