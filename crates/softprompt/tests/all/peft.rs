//! An adapter written by PEFT itself (SEQ_CLS prompt tuning on tiny-bert) gives PEFT's logits.

use crate::{fixtures, max_abs_diff};
use candle_core::{DType, Device, Tensor};
use softprompt::adapter::{Adapter, AdapterHead};
use softprompt::backbone::Backbone;
use softprompt::batch::Padding;
use softprompt::files::load_tensors;
use softprompt::inference::{classify_rows, LoadedAdapter};
use softprompt::model::Model;
use softprompt::task::classify::Pool;

#[test]
fn peft_written_adapter_gives_peft_logits() {
    let model = Model::load(&fixtures().join("tiny-bert"), DType::F32, &Device::Cpu).unwrap();
    let adapter = Adapter::load(
        &fixtures().join("peft-tiny-adapter"),
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
    let (reference, meta) = load_tensors(
        &fixtures().join("peft_tiny_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let encoder = model.encoder(adapter.prompt.dim(0).unwrap(), None).unwrap();
    let data: Vec<_> = texts
        .iter()
        .map(|t| encoder.encode(t, None).unwrap())
        .collect();
    let task = LoadedAdapter::new(&model, &adapter).unwrap();
    let rows: Vec<_> = data.iter().map(|e| (&task, e)).collect();
    let logits = classify_rows(&model.backbone, &rows, Padding::Right, &Device::Cpu).unwrap();
    let classes = logits[0].len();
    let ours = Tensor::from_vec(logits.concat(), (texts.len(), classes), &Device::Cpu).unwrap();
    let err = max_abs_diff(&ours, &reference["logits"]);
    assert!(err < 1e-4, "logits differ from PEFT's by {err:e}");
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
