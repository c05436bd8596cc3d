//! Many tasks in one batch: a row gets what it would get alone; prompt ensembles.

use crate::fixtures;
use candle_core::{DType, Device, Tensor};
use softprompt::adapter::{Adapter, AdapterHead};
use softprompt::batch::Padding;
use softprompt::inference::{classify_rows, ensemble, LoadedAdapter};
use softprompt::model::Model;
use softprompt::task::classify::Pool;

fn model() -> Model {
    Model::load(&fixtures().join("tiny-bert"), DType::F32, &Device::Cpu).unwrap()
}

/// An adapter of `m` prompt vectors and `classes` labels with the given pooling, random values.
fn adapter(m: usize, classes: usize, pool: Pool) -> Adapter {
    let dev = Device::Cpu;
    let mut base = Adapter::load(&fixtures().join("peft-tiny-adapter"), 16, &dev).unwrap();
    base.prompt = Tensor::randn(0f32, 1.0, (m, 16), &dev).unwrap();
    base.head = AdapterHead::Linear {
        weight: Tensor::randn(0f32, 0.5, (classes, 16), &dev).unwrap(),
        bias: Tensor::randn(0f32, 0.5, classes, &dev).unwrap(),
        pool,
    };
    base.labels = (0..classes).map(|i| format!("c{i}")).collect();
    base.config.num_virtual_tokens = m;
    base
}

#[test]
fn a_mixed_batch_gives_each_row_what_it_gets_alone() {
    let model = model();
    let peft = Adapter::load(&fixtures().join("peft-tiny-adapter"), 16, &Device::Cpu).unwrap();
    let tasks = [
        LoadedAdapter::new(&model, &peft).unwrap(),
        LoadedAdapter::new(&model, &adapter(3, 3, Pool::Mean)).unwrap(),
        LoadedAdapter::new(&model, &adapter(6, 2, Pool::Cls)).unwrap(),
        LoadedAdapter::new(&model, &adapter(1, 4, Pool::First)).unwrap(),
    ];
    let encoder = model.encoder(6, None).unwrap();
    let texts = [
        "a good movie",
        "the plot was dull and boring and too long",
        "i love this great film",
        "bad",
    ];
    let encoded: Vec<_> = texts
        .iter()
        .map(|t| encoder.encode(t, None).unwrap())
        .collect();
    let rows: Vec<_> = (0..8)
        .map(|i| (&tasks[i % 4], &encoded[(i * 3) % 4]))
        .collect();
    for padding in [Padding::Right, Padding::Left] {
        let mixed = classify_rows(&model.backbone, &rows, padding, &Device::Cpu).unwrap();
        for (i, row) in rows.iter().enumerate() {
            let alone = classify_rows(&model.backbone, &[*row], Padding::Right, &Device::Cpu)
                .unwrap()
                .remove(0);
            assert_eq!(mixed[i].len(), row.0.labels.len());
            let diff = mixed[i]
                .iter()
                .zip(&alone)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-5,
                "row {i}, {padding} padding: mixed and alone differ by {diff:e}"
            );
        }
    }
}

#[test]
fn an_ensemble_votes_and_averages() {
    let model = model();
    let a = LoadedAdapter::new(&model, &adapter(2, 2, Pool::Mean)).unwrap();
    let b = LoadedAdapter::new(&model, &adapter(2, 2, Pool::Mean)).unwrap();
    let c = LoadedAdapter::new(&model, &adapter(2, 2, Pool::Mean)).unwrap();
    // two members say c1 weakly, one says c0 strongly: the vote is c1, the mean favours c0
    let logits = vec![vec![0.0, 0.1], vec![0.0, 0.1], vec![5.0, 0.0]];
    let answer = ensemble(&[&a, &b, &c], &logits).unwrap();
    assert_eq!(answer.label, "c1");
    assert_eq!(answer.members, ["c1", "c1", "c0"]);
    assert!(answer.scores[0] > answer.scores[1]);
    assert!((answer.scores.iter().sum::<f32>() - 1.0).abs() < 1e-6);

    let three = LoadedAdapter::new(&model, &adapter(2, 3, Pool::Mean)).unwrap();
    let err = ensemble(&[&a, &three], &logits[..2]).unwrap_err();
    assert!(format!("{err}").contains("disagree on the labels"));
}
