//! Finite-difference checks in f64 of every backward: each kernel pair, the whole BERT backward,
//! and the prompt gradient through backbone, pooling, head and loss.

use candle_core::{DType, Device, Tensor};
use softprompt::backbone::bert::{Bert, BertConfig};
use softprompt::backbone::{Backbone, EncoderInput};
use softprompt::batch::Batch;
use softprompt::classifier::PromptClassifier;
use softprompt::kernels::{
    attention_backward, attention_forward, gelu_erf_backward, gelu_erf_forward, mask_bias,
    with_composed, AttentionShape, LayerNorm, Linear,
};
use softprompt::prompt::SoftPrompt;
use softprompt::task::classify::{ClassificationHead, Pool};
use softprompt::tokenize::Encoded;

const DEV: Device = Device::Cpu;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A fixed pseudo-random fill (candle's randn is not seedable on CPU).
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f64> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &DEV).unwrap()
}

/// Runs `test` on the fused CPU kernels and again on the composed candle-op kernels.
fn on_both_paths(test: impl Fn(&str)) {
    test("fused");
    with_composed(|| test("composed"));
}

/// Compares `analytic` (∂L/∂x) with central differences of `loss` at every element of x.
/// L(x) = Σ f(x) ⊙ R for a fixed random R makes every output element matter.
fn check(x: &Tensor, analytic: &Tensor, loss: impl Fn(&Tensor) -> f64, what: &str) {
    let eps = 1e-6;
    let flat = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let grad = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(flat.len(), grad.len(), "{what}: gradient shape");
    let scale = grad.iter().fold(0f64, |m, g| m.max(g.abs())).max(1e-3);
    let mut worst = 0f64;
    for i in 0..flat.len() {
        let at = |delta: f64| {
            let mut v = flat.clone();
            v[i] += delta;
            loss(&Tensor::from_vec(v, x.dims(), &DEV).unwrap())
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        worst = worst.max((numeric - grad[i]).abs() / scale);
    }
    assert!(
        worst < 1e-6,
        "{what}: finite differences disagree, worst relative error {worst:e}"
    );
    assert!(
        grad.iter().any(|g| g.abs() > 1e-8),
        "{what}: the gradient is all zero"
    );
}

fn weighted_sum(y: &Tensor, r: &Tensor) -> f64 {
    (y * r)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn linear_backward_matches_finite_differences() {
    let lin = Linear::new(randn(&[5, 4], 1), Some(randn(&[5], 2)));
    let x = randn(&[3, 4], 3);
    let r = randn(&[3, 5], 4);
    check(
        &x,
        &lin.backward(&r).unwrap(),
        |x| weighted_sum(&lin.forward(x).unwrap(), &r),
        "linear",
    );
}

#[test]
fn layer_norm_backward_matches_finite_differences() {
    on_both_paths(|path| {
        let ln = LayerNorm {
            weight: (randn(&[6], 1) + 1.0).unwrap(),
            bias: randn(&[6], 2),
            eps: 1e-12,
        };
        let x = randn(&[2, 3, 6], 3);
        let r = randn(&[2, 3, 6], 4);
        let (_, saved) = ln.forward(&x).unwrap();
        check(
            &x,
            &ln.backward(&r, &saved).unwrap(),
            |x| weighted_sum(&ln.forward(x).unwrap().0, &r),
            &format!("layer norm ({path})"),
        );
    });
}

#[test]
fn gelu_backward_matches_finite_differences() {
    on_both_paths(|path| {
        let x = (randn(&[4, 5], 1) * 3.0).unwrap();
        let r = randn(&[4, 5], 2);
        check(
            &x,
            &gelu_erf_backward(&r, &x).unwrap(),
            |x| weighted_sum(&gelu_erf_forward(x).unwrap(), &r),
            &format!("gelu ({path})"),
        );
    });
}

#[test]
fn attention_backward_matches_finite_differences() {
    on_both_paths(|path| {
        let shape = AttentionShape {
            batch: 2,
            seq: 4,
            heads: 2,
        };
        let qkv = randn(&[2 * 4, 3 * 6], 1); // T = B·S rows; 3D with D = 2 heads × 3
        let mask = Tensor::new(&[[1u32, 1, 1, 0], [1, 1, 1, 1]], &DEV).unwrap();
        let bias = mask_bias(&mask, DType::F64).unwrap();
        let r = randn(&[2 * 4, 6], 4);
        let (_, probs) = attention_forward(&qkv, &bias, shape).unwrap();
        let d_qkv = attention_backward(&r, &qkv, &probs, shape).unwrap();
        let out = |x: &Tensor| weighted_sum(&attention_forward(x, &bias, shape).unwrap().0, &r);
        check(&qkv, &d_qkv, out, &format!("attention ({path})"));
    });
}

pub fn tiny_bert(dtype: DType) -> Bert {
    Bert::load(&crate::fixtures().join("tiny-bert"), dtype, &DEV).unwrap()
}

#[test]
fn bert_backward_matches_finite_differences() {
    on_both_paths(|path| {
        let bert = tiny_bert(DType::F64);
        let embeds = randn(&[2, 5, 16], 1);
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 1, 1]], &DEV).unwrap();
        let types = Tensor::new(&[[0u32, 0, 0, 1, 1], [0, 0, 0, 0, 0]], &DEV).unwrap();
        let r = randn(&[2, 5, 16], 2);
        let input = |e: &'_ Tensor| -> f64 {
            let hidden = bert
                .forward(&EncoderInput {
                    embeds: e,
                    attention_mask: &mask,
                    token_type_ids: &types,
                })
                .unwrap();
            weighted_sum(&hidden, &r)
        };
        let (_, acts) = bert
            .forward_train(&EncoderInput {
                embeds: &embeds,
                attention_mask: &mask,
                token_type_ids: &types,
            })
            .unwrap();
        let d_embeds = bert.backward(&r, acts).unwrap();
        check(&embeds, &d_embeds, input, &format!("bert ({path})"));
    });
}

/// The gradient the trainer applies to the prompt, for every pooling: finite differences of the
/// mean cross-entropy with respect to each prompt element.
#[test]
fn prompt_gradient_matches_finite_differences_for_every_pool() {
    let data = vec![
        Encoded {
            ids: vec![2, 5, 20, 9, 3],
            type_ids: vec![0; 5],
        },
        Encoded {
            ids: vec![2, 30, 3],
            type_ids: vec![0; 3],
        },
        Encoded {
            ids: vec![2, 40, 41, 42, 43, 3],
            type_ids: vec![0, 0, 0, 1, 1, 1],
        },
    ];
    let labels = [0u32, 1, 1];
    let batch = Batch::new(&data, Some(&labels), &[0, 1, 2], &DEV).unwrap();
    let prompt = randn(&[3, 16], 7);
    for pool in [Pool::First, Pool::Pooler, Pool::Cls, Pool::Mean] {
        let make = |p: &Tensor| {
            let bert = tiny_bert(DType::F64);
            let pooler = bert.pooler.clone();
            let head = ClassificationHead::from_tensors(
                &randn(&[2, 16], 8),
                &randn(&[2], 9),
                pool,
                pooler,
            )
            .unwrap();
            PromptClassifier {
                backbone: bert,
                prompt: SoftPrompt::from_tensor(p).unwrap(),
                head,
                labels: vec!["a".into(), "b".into()],
            }
        };
        let (_, grads) = make(&prompt).loss_and_grads(&batch).unwrap();
        let loss = |p: &Tensor| make(p).loss_and_grads(&batch).unwrap().0;
        check(
            &prompt,
            &grads[0].to_dtype(DType::F64).unwrap(),
            loss,
            &format!("prompt gradient, pool {pool}"),
        );
    }
}

#[test]
fn bert_config_rejects_unsupported_models() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::fixtures().join("tiny-bert/config.json")).unwrap(),
    )
    .unwrap();
    cfg["hidden_act"] = "relu".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = BertConfig::from_file(&dir.join("config.json")).unwrap_err();
    assert!(
        format!("{err:#}").contains("hidden_act \"relu\" is not supported"),
        "{err:#}"
    );
}
