//! The frozen linear probe: its vectors are the texts' pooled hidden states, and the head it keeps
//! scores through eval's path as it scored in training.

use crate::fixtures;
use candle_core::{DType, Device, Tensor};
use softprompt::backbone::{Backbone, BackboneInput};
use softprompt::batch::{Batching, Padding};
use softprompt::data::Example;
use softprompt::inference::Members;
use softprompt::model::Model;
use softprompt::probe::{pooled_features, train_probe, ProbeConfig};
use softprompt::task::classify::Pool;
use std::path::Path;

fn model() -> Model {
    Model::load(&fixtures().join("tiny-bert"), DType::F32, &Device::Cpu).unwrap()
}

fn example(text: &str, label: &str, line: usize) -> Example {
    Example {
        text: text.into(),
        text_pair: None,
        label: Some(label.into()),
        task: None,
        line,
    }
}

const BATCHING: Batching = Batching {
    size: 2,
    padding: Padding::Right,
    device: Device::Cpu,
};

#[test]
fn pooled_features_are_the_mean_of_each_texts_own_last_hidden_state() {
    let model = model();
    let texts = [
        "a good movie",
        "the plot was dull and boring and too long",
        "bad",
    ];
    let examples: Vec<Example> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| example(t, "x", i + 1))
        .collect();
    // batches of two texts of different lengths: the padding must not reach the mean
    let features = pooled_features(&model, &examples, Path::new("t"), Pool::Mean, &BATCHING)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let encoder = model.encoder(0, None).unwrap();
    for (text, got) in texts.iter().zip(&features) {
        let encoded = encoder.encode(text, None).unwrap();
        let ids = Tensor::new(encoded.ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let n = encoded.ids.len();
        let ones = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
        let types = Tensor::new(encoded.type_ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let hidden = model
            .backbone
            .forward(&BackboneInput {
                embeds: &model.backbone.embed_tokens(&ids).unwrap(),
                attention_mask: &ones,
                token_type_ids: &types,
                reads: None,
                prefix: None,
                decoder: None,
            })
            .unwrap();
        let want = hidden
            .mean(1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{text}: {g} vs {w}");
        }
    }
}

#[test]
fn a_probe_learns_a_separable_task_and_eval_scores_it_as_training_did() {
    let model = model();
    let rows = |n: usize, offset: usize| -> Vec<Example> {
        (0..n)
            .map(|i| match i % 2 {
                0 => example(&"good great ".repeat(1 + (i + offset) % 3), "pos", i + 1),
                _ => example(
                    &"bad awful poor ".repeat(1 + (i + offset) % 2),
                    "neg",
                    i + 1,
                ),
            })
            .collect()
    };
    let (train, dev) = (rows(24, 0), rows(8, 1));
    let config = ProbeConfig {
        lr: 0.1,
        epochs: 30,
        ..ProbeConfig::default()
    };
    let probe = train_probe(
        &model,
        (&train, Path::new("train")),
        Some((&dev, Path::new("dev"))),
        &config,
        &BATCHING,
    )
    .unwrap();
    assert_eq!(probe.best_dev, Some(1.0));
    assert_eq!(probe.steps, 30 * 24usize.div_ceil(32));
    assert_eq!(probe.adapter.labels, ["neg", "pos"]);
    let members = Members::new(&model, vec![probe.adapter]).unwrap();
    let report = members
        .report(&model.backbone, &dev, Path::new("dev"), &BATCHING)
        .unwrap();
    assert_eq!(report.accuracy, 1.0);
}

#[test]
fn a_probe_needs_two_labels_and_a_sane_config() {
    let model = model();
    let train = vec![example("good", "pos", 1), example("great", "pos", 2)];
    let err = train_probe(
        &model,
        (&train, Path::new("one.tsv")),
        None,
        &ProbeConfig::default(),
        &BATCHING,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("one.tsv") && err.contains("two different labels"),
        "{err}"
    );
    let bad = ProbeConfig {
        epochs: 0,
        ..ProbeConfig::default()
    };
    assert!(bad.validate().is_err());
}
