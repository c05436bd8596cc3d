//! Finite-difference checks in f64 of every backward: each kernel pair, the whole BERT backward,
//! and the prompt gradient through backbone, pooling, head and loss.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use softprompt::backbone::any::AnyBackbone;
use softprompt::backbone::bert::{Bert, BertConfig};
use softprompt::backbone::gpt2::Gpt2;
use softprompt::backbone::llama::Llama;
use softprompt::backbone::{Backbone, BackboneInput};
use softprompt::batch::{Batch, Padding};
use softprompt::kernels::{
    attention_at_forward, attention_backward, attention_forward, gelu_erf_backward,
    gelu_erf_forward, gelu_tanh_backward, gelu_tanh_forward, mask_bias, with_composed,
    AttentionShape, GatedMlp, GeluSaved, LayerNorm, Linear, Positions, RmsNorm, Rope,
};
use softprompt::prompt::{Placement, SoftPrompt};
use softprompt::prompt_encoder::{EncoderKind, Method, PromptEncoder, TrainablePrompt};
use softprompt::prompted::{
    prompted_forward, CausalLm, Classifier, Head, Prompted, PromptedModel, Trainee,
};
use softprompt::task::classify::{log_softmax, ClassificationHead, Pool};
use softprompt::task::verbalizer;
use softprompt::tokenize::Encoded;

const DEV: Device = Device::Cpu;

pub fn randn(shape: &[usize], seed: u64) -> Tensor {
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
pub fn on_both_paths(test: impl Fn(&str)) {
    test("fused");
    with_composed(|| test("composed"));
}

/// Compares `analytic` (∂L/∂x) with central differences of `loss` at every element of x.
/// L(x) = Σ f(x) ⊙ R for a fixed random R makes every output element matter.
pub fn check(x: &Tensor, analytic: &Tensor, loss: impl Fn(&Tensor) -> f64, what: &str) {
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

pub fn weighted_sum(y: &Tensor, r: &Tensor) -> f64 {
    (y * r)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn linear_backward_matches_finite_differences() {
    // [3, 7] narrows, so it is stored column by column (`Linear::new`)
    let shapes = [(5, 4), (3, 7)];
    on_both_paths(|path| {
        for ((out_dim, inner), bias) in shapes.into_iter().flat_map(|s| [(s, true), (s, false)]) {
            let bias = bias.then(|| randn(&[out_dim], 2));
            let lin = Linear::new(randn(&[out_dim, inner], 1), bias);
            let x = randn(&[3, inner], 3);
            let r = randn(&[3, out_dim], 4);
            check(
                &x,
                &lin.backward(&r).unwrap(),
                |x| weighted_sum(&lin.forward(x).unwrap(), &r),
                &format!("linear ({path})"),
            );
        }
    });
}

/// The fused CPU products (straight into gemm, the bias first; a few rows, a decode step's, read
/// W once) equal candle's matmul and add, whole 16-lane pieces of a row or not, in groups of four
/// rows or not; and the next-token head's few rows too (`Weight::apply`). An inner dimension
/// above 70 narrows, so that matrix is stored column by column, and gemm reads it so.
#[test]
fn fused_linear_matches_composed() {
    let cases = [
        (41, 33),
        (16, 64),
        (5, 33),
        (1, 70),
        (3, 16),
        (41, 96),
        (5, 96),
        (1, 96),
    ];
    for ((rows, inner), bias) in cases.into_iter().flat_map(|c| [(c, true), (c, false)]) {
        let bias = bias.then(|| randn(&[70], 2));
        let lin = Linear::new(randn(&[70, inner], 1), bias);
        let softprompt::kernels::Weight::Dense(w) = &lin.weight else {
            panic!("a dense linear")
        };
        assert_eq!(
            w.is_contiguous(),
            inner <= 70,
            "[70, {inner}] stored row by row"
        );
        let x = randn(&[rows, inner], 3);
        let dy = randn(&[rows, 70], 4);
        let head = softprompt::kernels::Weight::Dense(randn(&[70, inner], 1));
        let applied = crate::max_abs_diff(
            &head.apply(&x).unwrap(),
            &x.matmul(&randn(&[70, inner], 1).t().unwrap()).unwrap(),
        );
        assert!(applied < 1e-12, "head, {rows} rows: {applied:e}");
        let forward = crate::max_abs_diff(
            &lin.forward(&x).unwrap(),
            &with_composed(|| lin.forward(&x).unwrap()),
        );
        let backward = crate::max_abs_diff(
            &lin.backward(&dy).unwrap(),
            &with_composed(|| lin.backward(&dy).unwrap()),
        );
        assert!(
            forward < 1e-12 && backward < 1e-12,
            "{forward:e}, {backward:e}"
        );
    }
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

type Forward = fn(&Tensor) -> candle_core::Result<(Tensor, GeluSaved)>;
type Backward = fn(&Tensor, &GeluSaved) -> candle_core::Result<Tensor>;

/// Both GELUs (BERT's erf, GPT-2's tanh), fused and composed: the backward matches finite
/// differences, and the fused forward equals the composed one.
#[test]
fn gelu_backward_matches_finite_differences() {
    let gelus: [(&str, Forward, Backward); 2] = [
        ("erf", gelu_erf_forward, gelu_erf_backward),
        ("tanh", gelu_tanh_forward, gelu_tanh_backward),
    ];
    for (name, forward, backward) in gelus {
        on_both_paths(|path| {
            let x = (randn(&[4, 5], 1) * 3.0).unwrap();
            let r = randn(&[4, 5], 2);
            check(
                &x,
                &backward(&r, &forward(&x).unwrap().1).unwrap(),
                |x| weighted_sum(&forward(x).unwrap().0, &r),
                &format!("gelu {name} ({path})"),
            );
        });
        let x = (randn(&[4, 5], 3) * 3.0).unwrap();
        let composed = with_composed(|| forward(&x).unwrap().0);
        let diff = crate::max_abs_diff(&forward(&x).unwrap().0, &composed);
        assert!(diff < 1e-12, "gelu {name}: fused vs composed {diff}");
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    // bidirectional with padding (BERT), causal, and grouped-query (4 query heads on 2 key/value heads)
    let cases = [(2, 2, false), (2, 2, true), (4, 2, true)];
    on_both_paths(|path| {
        for (heads, kv_heads, causal) in cases {
            let shape = AttentionShape {
                batch: 2,
                seq: 4,
                heads,
                kv_heads,
                causal,
            };
            let k = 3;
            let qkv = randn(&[2 * 4, (heads + 2 * kv_heads) * k], 1);
            let mask = Tensor::new(&[[1u32, 1, 1, 0], [1, 1, 1, 1]], &DEV).unwrap();
            let bias = mask_bias(&mask, DType::F64).unwrap();
            let r = randn(&[2 * 4, heads * k], 4);
            let (_, saved) = attention_forward(&qkv, &bias, shape, None).unwrap();
            let d_qkv = attention_backward(&r, &saved, shape, None).unwrap().0;
            let out =
                |x: &Tensor| weighted_sum(&attention_forward(x, &bias, shape, None).unwrap().0, &r);
            check(
                &qkv,
                &d_qkv,
                out,
                &format!("attention {heads}/{kv_heads} causal {causal} ({path})"),
            );
        }
    });
}

/// Attention at a few queries a row (what the last layer computes under a pooled head: one, or
/// the positions after the prompt) is those rows of full attention, forward and backward, and its
/// backward matches finite differences.
#[test]
fn attention_at_the_read_rows_is_full_attention_there() {
    // row 0 reads position 2, row 1 its last; then two a row
    let reads: [&[u32]; 2] = [&[2, 5 + 4], &[1, 3, 5 + 3, 5 + 4]];
    for ((heads, kv_heads, causal), at) in [(2, 2, false), (4, 2, true)]
        .into_iter()
        .flat_map(|case| reads.map(|at| (case, at)))
    {
        let (batch, seq, k) = (2, 5, 3);
        let shape = AttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            causal,
        };
        let qkv = randn(&[batch * seq, (heads + 2 * kv_heads) * k], 11);
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 1, 1]], &DEV).unwrap();
        let bias = mask_bias(&mask, DType::F64).unwrap();
        let at = Tensor::new(at, &DEV).unwrap();
        let what = format!(
            "{heads}/{kv_heads} causal {causal}, {} reads",
            at.dim(0).unwrap()
        );
        let (full, full_saved) = attention_forward(&qkv, &bias, shape, None).unwrap();
        let (read, saved) = attention_at_forward(&qkv, &bias, shape, None, &at).unwrap();
        let diff = crate::max_abs_diff(&full.index_select(&at, 0).unwrap(), &read);
        assert!(diff < 1e-12, "{what}: forward {diff:e}");

        let r = randn(&[at.dim(0).unwrap(), heads * k], 12);
        let r_everywhere = Tensor::zeros((batch * seq, heads * k), DType::F64, &DEV)
            .unwrap()
            .index_add(&at, &r, 0)
            .unwrap();
        let d_full = attention_backward(&r_everywhere, &full_saved, shape, None)
            .unwrap()
            .0;
        let d_read = attention_backward(&r, &saved, shape, None).unwrap().0;
        let diff = crate::max_abs_diff(&d_full, &d_read);
        assert!(diff < 1e-12, "{what}: backward {diff:e}");
        let out = |x: &Tensor| {
            weighted_sum(
                &attention_at_forward(x, &bias, shape, None, &at).unwrap().0,
                &r,
            )
        };
        check(
            &qkv,
            &d_read,
            out,
            &format!("attention at the read rows {what}"),
        );
    }
}

/// BERT's last layer computing only the rows the head reads gives the loss and gradients of
/// computing every row, for every pool.
#[test]
fn computing_only_the_rows_the_head_reads_changes_no_loss_or_gradient() {
    let data = texts(&[&[2, 5, 20, 9, 3], &[2, 30, 3], &[2, 40, 41, 42, 43, 3]]);
    let labels = [0u32, 1, 1];
    for batch in both_paddings(&data, Some(&labels), &[0, 1, 2]) {
        for pool in [Pool::First, Pool::Pooler, Pool::Cls, Pool::Mean, Pool::Last] {
            let model = tiny_classifier(pool, shallow(&randn(&[3, 16], 7)));
            let (loss, grads) = model.loss_and_grads(&batch).unwrap();

            // every row, by hand
            let p =
                Prompted::new(&model.backbone, &model.prompt.current().unwrap(), &batch).unwrap();
            assert!(model.head.reads(&p.attention_mask, 3).unwrap().is_some());
            let (hidden, activations) = model.backbone.forward_train(&p.input()).unwrap();
            let head = model
                .head
                .loss(&hidden, &p.attention_mask, &batch, 3)
                .unwrap();
            let d_embeds = model
                .backbone
                .backward(&head.d_hidden, activations, None)
                .unwrap();
            // the trainer hands the prompt's gradient over in f32: its rounding, no more
            let prompt_gradient = model
                .prompt
                .current()
                .unwrap()
                .gradient(&d_embeds, None)
                .unwrap();
            let rounding = 1e-7
                * crate::max_abs_diff(&prompt_gradient, &prompt_gradient.zeros_like().unwrap());
            let mut every_row = vec![(prompt_gradient, rounding)];
            every_row.extend(head.param_grads.into_iter().map(|g| (g, 1e-12)));

            assert!(
                (loss - head.loss).abs() < 1e-12,
                "pool {pool}: loss {loss} vs {}",
                head.loss
            );
            for (i, (read, (all, tolerance))) in grads.iter().zip(&every_row).enumerate() {
                let diff = crate::max_abs_diff(read, all);
                assert!(
                    diff < *tolerance,
                    "pool {pool}: gradient {i} differs by {diff:e}"
                );
            }
        }
    }
}

/// The fused and composed attention give the same output, causal and grouped-query included.
#[test]
fn fused_attention_matches_composed() {
    for (heads, kv_heads, causal) in [(4, 4, false), (4, 2, true), (6, 1, true)] {
        let shape = AttentionShape {
            batch: 3,
            seq: 7,
            heads,
            kv_heads,
            causal,
        };
        let qkv = randn(&[3 * 7, (heads + 2 * kv_heads) * 5], 3);
        let mask = Tensor::new(
            &[[1u32, 1, 1, 1, 1, 0, 0], [1; 7], [1, 1, 0, 0, 0, 0, 0]],
            &DEV,
        )
        .unwrap();
        let bias = mask_bias(&mask, DType::F64).unwrap();
        let (fused, _) = attention_forward(&qkv, &bias, shape, None).unwrap();
        let (composed, _) = with_composed(|| attention_forward(&qkv, &bias, shape, None).unwrap());
        let diff = crate::max_abs_diff(&fused, &composed);
        assert!(diff < 1e-12, "{heads}/{kv_heads} causal {causal}: {diff:e}");
    }
}

/// Fused and composed attention's forward and backward on [batch, seq] rows of `heads` query
/// heads of `head_dim` (row 1 padded after 97 positions), in `dtype`: the largest differences.
fn fused_and_composed_attention(
    (batch, seq): (usize, usize),
    (heads, kv_heads, head_dim): (usize, usize, usize),
    causal: bool,
    dtype: DType,
) -> (f64, f64) {
    let shape = AttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        causal,
    };
    let qkv = randn(&[batch * seq, (heads + 2 * kv_heads) * head_dim], 5)
        .to_dtype(dtype)
        .unwrap();
    let mask: Vec<u32> = [seq, 97]
        .iter()
        .cycle()
        .take(batch)
        .flat_map(|&n| (0..seq).map(move |j| u32::from(j < n)))
        .collect();
    let mask = Tensor::from_vec(mask, (batch, seq), &DEV).unwrap();
    let bias = mask_bias(&mask, dtype).unwrap();
    let dcontext = randn(&[batch * seq, heads * head_dim], 6)
        .to_dtype(dtype)
        .unwrap();
    let run = || {
        let (context, saved) = attention_forward(&qkv, &bias, shape, None).unwrap();
        (
            context,
            attention_backward(&dcontext, &saved, shape, None)
                .unwrap()
                .0,
        )
    };
    let (fused, composed) = (run(), with_composed(run));
    (
        crate::max_abs_diff(&fused.0, &composed.0),
        crate::max_abs_diff(&fused.1, &composed.1),
    )
}

/// The fused attention runs query block by query block and its backward recomputes the
/// probabilities block by block; at 150 positions (two full blocks of 64 and a part), with padding,
/// causal and grouped-query, forward and backward equal the composed kernels that keep [B, H, S, S].
/// Head sizes 4 (the tiny models') and 64 (BERT-base's, GPT-2's).
#[test]
fn blocked_attention_matches_composed_over_several_blocks() {
    for head_dim in [4, 64] {
        for (heads, kv_heads, causal) in [(2, 2, false), (4, 2, true)] {
            let (forward, backward) = fused_and_composed_attention(
                (2, 150),
                (heads, kv_heads, head_dim),
                causal,
                DType::F64,
            );
            assert!(
                forward < 1e-12 && backward < 1e-12,
                "{heads}/{kv_heads} of {head_dim}, causal {causal}: forward {forward:e}, backward {backward:e}"
            );
        }
    }
}

/// On BERT-base's shapes (12 heads of 64, the bench's 148 positions) in f32, forward and backward
/// within 1e-4 of the composed kernels.
#[test]
fn fused_attention_matches_composed_on_bert_base_shapes_in_f32() {
    let (forward, backward) =
        fused_and_composed_attention((2, 148), (12, 12, 64), false, DType::F32);
    assert!(
        forward < 1e-4 && backward < 1e-4,
        "forward {forward:e}, backward {backward:e}"
    );
}

#[test]
fn rms_norm_backward_matches_finite_differences() {
    let norm = RmsNorm {
        weight: (randn(&[6], 1) + 1.0).unwrap(),
        eps: 1e-6,
    };
    let x = randn(&[2, 3, 6], 3);
    let r = randn(&[2, 3, 6], 4);
    check(
        &x,
        &norm.backward(&r, &norm.forward(&x).unwrap().1).unwrap(),
        |x| weighted_sum(&norm.forward(x).unwrap().0, &r),
        "rms norm",
    );
}

/// The SiLU-gated MLP, fused and composed, keeping its projections or recomputing them: the backward matches finite differences, and the fused
/// forward equals the composed one.
#[test]
fn gated_mlp_backward_matches_finite_differences() {
    let lin = |out: usize, inp: usize, seed: u64| Linear::new(randn(&[out, inp], seed), None);
    let mut mlp = GatedMlp {
        gate: lin(7, 4, 1),
        up: lin(7, 4, 2),
        down: lin(4, 7, 3),
        recompute: false,
    };
    let x = (randn(&[3, 4], 4) * 2.0).unwrap();
    let r = randn(&[3, 4], 5);
    for recompute in [false, true] {
        mlp.recompute = recompute;
        on_both_paths(|path| {
            let (_, saved) = mlp.forward(&x).unwrap();
            check(
                &x,
                &mlp.backward(&r, &saved).unwrap(),
                |x| weighted_sum(&mlp.forward(x).unwrap().0, &r),
                &format!("gated mlp ({path}, recompute {recompute})"),
            );
        });
    }
    let composed = with_composed(|| mlp.forward(&x).unwrap().0);
    let diff = crate::max_abs_diff(&mlp.forward(&x).unwrap().0, &composed);
    assert!(diff < 1e-12, "gated mlp: fused vs composed {diff}");
}

#[test]
fn rope_backward_matches_finite_differences() {
    let rope = Rope::new(6, 16, 10_000.0, DType::F64, &DEV).unwrap();
    let x = randn(&[2, 3, 5, 6], 1);
    let r = randn(&[2, 3, 5, 6], 2);
    for offset in [0, 4] {
        let at = Positions::From(offset);
        let dx = rope.backward(&r, at).unwrap();
        check(
            &x,
            &dx,
            |x| weighted_sum(&rope.forward(x, at).unwrap(), &r),
            &format!("rope, offset {offset}"),
        );
    }
    // per-row positions, as a left-padded batch has them
    let ids = Tensor::new(&[[0u32, 0, 1, 2, 3], [0, 1, 2, 3, 4]], &DEV).unwrap();
    let at = Positions::Ids(&ids);
    let dx = rope.backward(&r, at).unwrap();
    check(
        &x,
        &dx,
        |x| weighted_sum(&rope.forward(x, at).unwrap(), &r),
        "rope, position ids",
    );
    // row 1 of the ids is 0..5: the same as no ids
    let by_ids = rope.forward(&x, at).unwrap().narrow(0, 1, 1).unwrap();
    let by_offset = rope
        .forward(&x.narrow(0, 1, 1).unwrap(), Positions::From(0))
        .unwrap();
    assert!(crate::max_abs_diff(&by_ids, &by_offset) < 1e-12);
}

/// RoPE rotates each (c, c + K/2) channel pair by position·θ^(−2c/K), as transformers does.
#[test]
fn rope_rotates_pairs_by_position() {
    let rope = Rope::new(4, 8, 100.0, DType::F64, &DEV).unwrap();
    let x = Tensor::new(&[1.0f64, 0.0, 0.0, 0.0], &DEV)
        .unwrap()
        .reshape((1, 1, 1, 4))
        .unwrap();
    let y = rope
        .forward(&x, Positions::From(3))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    // channel 0 pairs with channel 2; frequency 1 at c = 0, angle 3
    assert!(
        (y[0] - 3f64.cos()).abs() < 1e-12 && (y[2] - 3f64.sin()).abs() < 1e-12,
        "{y:?}"
    );
    assert!(y[1].abs() < 1e-12 && y[3].abs() < 1e-12);
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
                .forward(&BackboneInput {
                    embeds: e,
                    attention_mask: &mask,
                    token_type_ids: &types,
                    reads: None,
                    prefix: None,
                    decoder: None,
                })
                .unwrap();
            weighted_sum(&hidden, &r)
        };
        let (_, acts) = bert
            .forward_train(&BackboneInput {
                embeds: &embeds,
                attention_mask: &mask,
                token_type_ids: &types,
                reads: None,
                prefix: None,
                decoder: None,
            })
            .unwrap();
        let d_embeds = bert.backward(&r, acts, None).unwrap().embeds;
        check(&embeds, &d_embeds, input, &format!("bert ({path})"));
    });
}

#[test]
fn decoder_backwards_match_finite_differences() {
    on_both_paths(|path| {
        let gpt2 = Gpt2::load(&crate::fixtures().join("tiny-gpt2"), DType::F64, &DEV).unwrap();
        check_backbone(&gpt2, &format!("gpt2 ({path})"));
        let llama = Llama::load(&crate::fixtures().join("tiny-llama"), DType::F64, &DEV).unwrap();
        check_backbone(&llama, &format!("llama ({path})"));
    });
}

/// Finite differences of Σ hidden ⊙ R with respect to the input embeddings of a 16-wide backbone.
fn check_backbone<B: Backbone>(backbone: &B, what: &str) {
    let embeds = randn(&[2, 5, 16], 1);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 1, 1]], &DEV).unwrap();
    let types = mask.zeros_like().unwrap();
    let r = randn(&[2, 5, 16], 2);
    let input = BackboneInput {
        embeds: &embeds,
        attention_mask: &mask,
        token_type_ids: &types,
        reads: None,
        prefix: None,
        decoder: None,
    };
    let (_, acts) = backbone.forward_train(&input).unwrap();
    let d_embeds = backbone.backward(&r, acts, None).unwrap().embeds;
    let loss = |e: &Tensor| {
        let hidden = backbone.forward(&BackboneInput {
            embeds: e,
            attention_mask: &mask,
            token_type_ids: &types,
            reads: None,
            prefix: None,
            decoder: None,
        });
        weighted_sum(&hidden.unwrap(), &r)
    };
    check(&embeds, &d_embeds, loss, what);
}

/// The gradient the trainer applies to the prompt, for every pooling: finite differences of the
/// mean cross-entropy with respect to each prompt element.
#[test]
fn prompt_gradient_matches_finite_differences_for_every_pool() {
    let data = vec![
        Encoded {
            ids: vec![2, 5, 20, 9, 3],
            type_ids: vec![0; 5],
            target_len: 0,
            decoder_ids: Vec::new(),
        },
        Encoded {
            ids: vec![2, 30, 3],
            type_ids: vec![0; 3],
            target_len: 0,
            decoder_ids: Vec::new(),
        },
        Encoded {
            ids: vec![2, 40, 41, 42, 43, 3],
            type_ids: vec![0, 0, 0, 1, 1, 1],
            target_len: 0,
            decoder_ids: Vec::new(),
        },
    ];
    let labels = [0u32, 1, 1];
    let [batch, left] = both_paddings(&data, Some(&labels), &[0, 1, 2]);
    let prompt = randn(&[3, 16], 7);
    for pool in [Pool::First, Pool::Pooler, Pool::Cls, Pool::Mean, Pool::Last] {
        let make = |p: &Tensor| tiny_classifier(pool, shallow(p));
        let right = make(&prompt).loss_and_grads(&batch).unwrap();
        let loss = |p: &Tensor| make(p).loss_and_grads(&batch).unwrap().0;
        check(
            &prompt,
            &right.1[0].to_dtype(DType::F64).unwrap(),
            loss,
            &format!("prompt gradient, pool {pool}"),
        );
        let left = make(&prompt).loss_and_grads(&left).unwrap();
        assert_padding_free(&format!("pool {pool}"), &right, &left);
    }
}

/// Classification rows of these token ids (one segment, no target).
fn texts(rows: &[&[u32]]) -> Vec<Encoded> {
    rows.iter()
        .map(|ids| Encoded {
            ids: ids.to_vec(),
            type_ids: vec![0; ids.len()],
            target_len: 0,
            decoder_ids: Vec::new(),
        })
        .collect()
}

fn shallow(prompt: &Tensor) -> TrainablePrompt {
    SoftPrompt::from_tensor(prompt).unwrap().into()
}

/// The gradients of every encoder weight (P-tuning's MLP and LSTM, the residual MLP and its
/// LayerNorm, the prefix's projection through every layer's keys and values) and of the table
/// under them: ∂L/∂P from the backbone's backward, then the encoder's tape, against finite
/// differences of the classifier's mean cross-entropy. A prefix without its projection is its
/// table: the backbone's ∂L/∂prefix is its gradient.
#[test]
fn encoded_prompt_gradients_match_finite_differences() {
    let data = texts(&[&[2, 5, 20, 9, 3], &[2, 30, 3]]);
    let batch = Batch::new(&data, Some(&[1, 0]), &[0, 1], Padding::Right, &DEV).unwrap();
    let cases = [
        (Method::PTuning, EncoderKind::Mlp, 5),
        (Method::PTuning, EncoderKind::Lstm, 3),
        (Method::Residual, EncoderKind::Mlp, 4),
        (Method::Prefix, EncoderKind::Mlp, 5),
    ];
    for (method, kind, hidden) in cases {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let table = randn(&[3, 16], 7);
        // a prefix: the tiny BERT's 2 layers' keys and values, 2·2·16 a position
        let width = if method == Method::Prefix { 64 } else { 16 };
        let encoder = PromptEncoder::init(method, kind, hidden, width, &table, &mut rng).unwrap();
        let model = tiny_classifier(Pool::Mean, TrainablePrompt::Encoded(encoder));
        check_every_param(&model, &batch, &format!("{method} {kind}"));
    }
    let prefix = SoftPrompt::placed(&randn(&[3, 64], 7), Placement::Prefix).unwrap();
    let model = tiny_classifier(Pool::Mean, prefix.into());
    assert_eq!(model.prompt.method(), Method::Prefix);
    check_every_param(&model, &batch, "prefix without its projection");
}

/// A multitask prompt (PEFT's MULTITASK_PROMPT_TUNING): each row reads the shared table scaled
/// by its own task's factors, so the loss is each row's loss alone with its task's prompt, and
/// the gradients of the table and of every task's factors match finite differences (a task no
/// row has gets none).
#[test]
fn multitask_gradients_match_finite_differences_and_rows_read_their_task() {
    let data = texts(&[&[2, 5, 20, 9, 3], &[2, 30, 3], &[2, 40, 41, 3]]);
    let (labels, tasks) = ([1u32, 0, 1], [2u32, 0, 2]);
    let batch = Batch::new(&data, Some(&labels), &[0, 1, 2], Padding::Right, &DEV)
        .unwrap()
        .with_tasks(Some(&tasks))
        .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let names = vec!["a".to_string(), "b".into(), "c".into()];
    let encoder = PromptEncoder::multitask(
        &randn(&[3, 16], 7),
        names,
        2,
        Placement::Embeddings,
        &mut rng,
    )
    .unwrap();
    let model = tiny_classifier(Pool::Mean, TrainablePrompt::Encoded(encoder));
    let (loss, grads) = model.loss_and_grads(&batch).unwrap();
    let prompt = model.prompt.current().unwrap();
    let alone: f64 = (0..3)
        .map(|r| {
            let own = prompt.task(tasks[r] as usize).unwrap();
            let one = Batch::new(&data, Some(&labels), &[r], Padding::Right, &DEV).unwrap();
            let model = tiny_classifier(Pool::Mean, own.into());
            model.loss_and_grads(&one).unwrap().0 / 3.0
        })
        .sum();
    assert!(
        (loss - alone).abs() < 1e-10,
        "{loss} batched, {alone} row by row"
    );
    let unused = grads[1].get(1).unwrap();
    assert_eq!(
        crate::max_abs_diff(&unused, &unused.zeros_like().unwrap()),
        0.0
    );
    check_every_param(&model, &batch, "multitask");
}

/// Every trainable tensor's gradient against finite differences of the loss on `batch`.
fn check_every_param(model: &PromptedModel<Bert, Classifier>, batch: &Batch, what: &str) {
    let (_, grads) = model.loss_and_grads(batch).unwrap();
    let names = model.param_names();
    assert_eq!(names.len(), grads.len());
    for ((name, var), grad) in names.iter().zip(model.params()).zip(&grads) {
        let saved = var.as_tensor().copy().unwrap();
        let loss = |x: &Tensor| {
            var.set(x).unwrap();
            let loss = model.loss_and_grads(batch).unwrap().0;
            var.set(&saved).unwrap();
            loss
        };
        check(
            &saved,
            &grad.to_dtype(DType::F64).unwrap(),
            loss,
            &format!("{what}: {name}"),
        );
    }
}

/// The tiny BERT in f64 with `prompt` in front and a two-label head (fixed weights) on `pool`.
fn tiny_classifier(pool: Pool, prompt: TrainablePrompt) -> PromptedModel<Bert, Classifier> {
    let bert = tiny_bert(DType::F64);
    let pooler = bert.pooler.clone();
    let head = ClassificationHead::from_tensors(&randn(&[2, 16], 8), &randn(&[2], 9), pool, pooler)
        .unwrap();
    PromptedModel {
        backbone: bert,
        prompt,
        head: Classifier {
            head,
            labels: vec!["a".into(), "b".into()],
            label_words: None,
        },
        template: None,
    }
}

/// A batch of `rows` padded on each side: [right, left].
fn both_paddings(data: &[Encoded], labels: Option<&[u32]>, rows: &[usize]) -> [Batch; 2] {
    [Padding::Right, Padding::Left].map(|p| Batch::new(data, labels, rows, p, &DEV).unwrap())
}

/// Left padding gives what right padding gives: the same loss and gradients.
fn assert_padding_free(what: &str, right: &(f64, Vec<Tensor>), left: &(f64, Vec<Tensor>)) {
    assert!(
        (right.0 - left.0).abs() < 1e-10,
        "{what}: loss {} right-padded, {} left-padded",
        right.0,
        left.0
    );
    for (r, l) in right.1.iter().zip(&left.1) {
        let diff = crate::max_abs_diff(r, l);
        assert!(
            diff < 1e-10,
            "{what}: gradients differ by {diff:e} between paddings"
        );
    }
}

type Load = fn() -> AnyBackbone;

/// The tiny GPT-2 and Llama fixtures, loaded in f64.
fn tiny_decoders() -> [(&'static str, Load); 2] {
    [
        ("gpt2", || {
            AnyBackbone::Gpt2(
                Gpt2::load(&crate::fixtures().join("tiny-gpt2"), DType::F64, &DEV).unwrap(),
            )
        }),
        ("llama", || {
            AnyBackbone::Llama(
                Llama::load(&crate::fixtures().join("tiny-llama"), DType::F64, &DEV).unwrap(),
            )
        }),
    ]
}

/// The verbalizer on both decoders: the prompt gradient through the frozen LM head's label rows,
/// read at each row's last real token of a right-padded batch; and a padded row scores as alone.
#[test]
fn verbalizer_prompt_gradient_matches_finite_differences() {
    let data = vec![
        Encoded {
            ids: vec![5, 20, 9, 3],
            type_ids: vec![0; 4],
            target_len: 0,
            decoder_ids: Vec::new(),
        },
        Encoded {
            ids: vec![30, 3],
            type_ids: vec![0; 2],
            target_len: 0,
            decoder_ids: Vec::new(),
        },
    ];
    let labels = [1u32, 0];
    let [batch, left] = both_paddings(&data, Some(&labels), &[0, 1]);
    let prompt = randn(&[3, 16], 7);
    for (name, load) in tiny_decoders() {
        let make = |p: &Tensor| {
            let backbone = load();
            let head = verbalizer::head(backbone.lm_head().unwrap(), &[11, 17]).unwrap();
            PromptedModel {
                backbone,
                prompt: SoftPrompt::from_tensor(p).unwrap().into(),
                head: Classifier {
                    head,
                    labels: vec!["a".into(), "b".into()],
                    label_words: Some(vec!["a".into(), "b".into()]),
                },
                template: None,
            }
        };
        let classifier = make(&prompt);
        assert_eq!(
            classifier.params().len(),
            1,
            "a verbalizer trains the prompt only"
        );
        let right = classifier.loss_and_grads(&batch).unwrap();
        let loss = |p: &Tensor| make(p).loss_and_grads(&batch).unwrap().0;
        check(
            &prompt,
            &right.1[0].to_dtype(DType::F64).unwrap(),
            loss,
            &format!("verbalizer prompt gradient, {name}"),
        );
        let left = classifier.loss_and_grads(&left).unwrap();
        assert_padding_free(&format!("verbalizer, {name}"), &right, &left);
        // the short row, padded on either side, against itself alone: same logits
        let single = classifier
            .predict_all(&data[1..], 1, Padding::Right, &DEV)
            .unwrap();
        for padding in [Padding::Right, Padding::Left] {
            let padded = classifier.predict_all(&data, 2, padding, &DEV).unwrap();
            for (a, b) in padded[1].iter().zip(&single[0]) {
                assert!(
                    (a - b).abs() < 1e-6,
                    "{name}: padded ({padding}) {:?} vs alone {:?}",
                    padded[1],
                    single[0]
                );
            }
        }
    }
}

/// A causal LM on both decoders, in a right-padded batch whose rows end in targets of different
/// lengths: the loss is the mean next-token cross-entropy over the target tokens alone (checked
/// against the full logits of each row run alone), and the prompt gradient matches finite differences
/// and the prompt in front of every row (the trainer computes a decoder's prompt once a batch).
/// Ten long rows make more targets than the LM head's logits are computed for at once.
#[test]
fn causal_lm_loss_scores_only_targets_and_its_gradient_matches_finite_differences() {
    let mut data = vec![
        Encoded {
            ids: vec![5, 20, 9, 3, 41, 42],
            type_ids: vec![0; 6],
            target_len: 2,
            decoder_ids: Vec::new(),
        },
        Encoded {
            ids: vec![30, 7, 8],
            type_ids: vec![0; 3],
            target_len: 3,
            decoder_ids: Vec::new(),
        },
    ];
    data.extend((0..10).map(|r| Encoded {
        ids: (0..28).map(|i| (r * 7 + i * 3) % 60).collect(),
        type_ids: vec![0; 28],
        target_len: 27,
        decoder_ids: Vec::new(),
    }));
    // every row (row 1's target starts its input, so its first token is predicted from the
    // prompt's last row: the prompt is then computed in every row), and all but row 1 (the prompt
    // computed once for the batch)
    let every: Vec<usize> = (0..data.len()).collect();
    let shared: Vec<usize> = every.iter().copied().filter(|&r| r != 1).collect();
    for rows in [every, shared] {
        causal_lm_check(&data, &rows);
    }
}

fn causal_lm_check(data: &[Encoded], rows: &[usize]) {
    let [batch, left] = both_paddings(data, None, rows);
    let prompt = randn(&[3, 16], 7);
    for (name, load) in tiny_decoders() {
        let make = |p: &Tensor| {
            let backbone = load();
            let head = CausalLm {
                lm_head: backbone.lm_head().unwrap().dense().unwrap(),
            };
            PromptedModel {
                backbone,
                prompt: SoftPrompt::from_tensor(p).unwrap().into(),
                head,
                template: None,
            }
        };
        let lm = make(&prompt);
        let right = lm.loss_and_grads(&batch).unwrap();
        assert_padding_free(
            &format!("causal-lm, {name}"),
            &right,
            &lm.loss_and_grads(&left).unwrap(),
        );
        let (loss, grads) = right;

        // By hand: each row alone, all its logits, then -log p of each target token from the position before.
        let mut nll = Vec::new();
        for e in rows.iter().map(|&r| &data[r]) {
            let row =
                Batch::new(std::slice::from_ref(e), None, &[0], Padding::Right, &DEV).unwrap();
            let hidden =
                prompted_forward(&lm.backbone, &lm.prompt.current().unwrap(), &row).unwrap();
            let logits = hidden
                .squeeze(0)
                .unwrap()
                .matmul(&lm.head.lm_head.t().unwrap())
                .unwrap();
            let log_probs = log_softmax(&logits).unwrap().to_vec2::<f64>().unwrap();
            let (m, n) = (3, e.ids.len());
            for i in n - e.target_len..n {
                nll.push(-log_probs[m + i - 1][e.ids[i] as usize]);
            }
        }
        let expected = nll.iter().sum::<f64>() / nll.len() as f64;
        assert!(
            (loss - expected).abs() < 1e-9,
            "{name}: loss {loss} vs by hand {expected}"
        );

        // The trainer computes a decoder's prompt once for the batch (`shares_prompt`); the prompt
        // in front of every row, through one backward, gives the same gradient.
        let current = lm.prompt.current().unwrap();
        let p = Prompted::new(&lm.backbone, &current, &batch).unwrap();
        let (hidden, activations) = lm.backbone.forward_train(&p.input()).unwrap();
        let head = lm.head.loss(&hidden, &p.attention_mask, &batch, 3).unwrap();
        let every_row = lm
            .backbone
            .backward(&head.d_hidden, activations, None)
            .unwrap();
        let every_row = current.gradient(&every_row, None).unwrap();
        let diff = crate::max_abs_diff(&every_row, &grads[0]);
        let scale = crate::max_abs(&every_row);
        assert!(
            (head.loss - loss).abs() < 1e-12 && diff < 1e-6 * scale,
            "{name}: shared prompt vs every row: loss {loss} vs {}, gradient {diff:e}",
            head.loss
        );

        let loss_of = |p: &Tensor| make(p).loss_and_grads(&batch).unwrap().0;
        check(
            &prompt,
            &grads[0].to_dtype(DType::F64).unwrap(),
            loss_of,
            &format!("causal-lm prompt gradient, {name}"),
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
