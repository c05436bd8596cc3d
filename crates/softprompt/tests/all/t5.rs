//! T5 against transformers (encoder states, decoder logits, loss; with and without a prompt), its
//! relative-position attention and its whole backward against finite differences in f64, and its
//! cached decoding against the full decoder pass; rank classification (label words scored at the
//! decoder's first position) against PEFT's logits and finite differences.

use crate::gradients::{check, randn, weighted_sum};
use crate::{fixtures, max_abs, max_abs_diff};
use candle_core::{DType, Device, Tensor, D};
use softprompt::adapter::{Adapter, TaskType};
use softprompt::backbone::t5::T5;
use softprompt::backbone::{Backbone, BackboneInput};
use softprompt::batch::{Batch, Batching, Padding};
use softprompt::data::Example;
use softprompt::files::load_tensors;
use softprompt::generate::{Continuation, SamplingConfig};
use softprompt::inference::{ensemble_all, LoadedAdapter};
use softprompt::kernels::{
    biased_attention_backward, biased_attention_forward, causal_mask, position_bias,
};
use softprompt::model::Model;
use softprompt::prompt::{extend_front, Placement, SoftPrompt};
use softprompt::prompted::{generation_score, CausalLm, Classifier, PromptedModel, Trainee};
use softprompt::task::classify::log_softmax;
use softprompt::task::verbalizer;
use softprompt::tokenize::{encode_all, Encoded};
use std::path::Path;

const DEV: Device = Device::Cpu;

fn load(name: &str, dtype: DType) -> T5 {
    T5::load(&fixtures().join(name), dtype, &DEV).unwrap()
}

fn u32s(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// The encoder's input with `prompt` in front (as PEFT does), and its mask.
fn prompted(t5: &T5, ids: &Tensor, mask: &Tensor, prompt: Option<&Tensor>) -> (Tensor, Tensor) {
    let word = t5.embed_tokens(ids).unwrap();
    match prompt {
        Some(p) => (
            SoftPrompt::from_tensor(p)
                .unwrap()
                .prepend(&word, None)
                .unwrap(),
            extend_front(mask, p.dim(0).unwrap(), 1).unwrap(),
        ),
        None => (word, mask.clone()),
    }
}

/// The decoder's last hidden state [B, T, D] for the encoder's input `embeds` under `mask` and
/// the decoder's input `decoder`, keeping nothing.
fn decoded(t5: &T5, embeds: &Tensor, mask: &Tensor, decoder: &Tensor) -> Tensor {
    t5.forward(&BackboneInput {
        embeds,
        attention_mask: mask,
        token_type_ids: &mask.zeros_like().unwrap(),
        reads: None,
        prefix: None,
        decoder: Some(decoder),
    })
    .unwrap()
}

/// Mean cross-entropy of `labels` [B, T] (i64, −100 ignored) under logits [B, T, V].
fn loss(logits: &Tensor, labels: &Tensor) -> f64 {
    let logits = logits
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec3::<f64>()
        .unwrap();
    let labels = labels
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    let (mut sum, mut n) = (0.0, 0);
    for (row, labels) in logits.iter().zip(&labels) {
        for (l, &label) in row.iter().zip(labels).filter(|(_, &y)| y >= 0) {
            let max = l.iter().cloned().fold(f64::MIN, f64::max);
            let log_z = max + l.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            sum += log_z - l[label as usize];
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn t5_matches_transformers_with_and_without_a_prompt() {
    for name in ["tiny-t5", "tiny-t5-gated"] {
        let t5 = load(name, DType::F32);
        let (f, _) = load_tensors(
            &fixtures().join(format!("{}_parity.safetensors", name.replace('-', "_"))),
            &DEV,
        )
        .unwrap();
        let (ids, mask) = (u32s(&f["ids"]), u32s(&f["mask"]));
        let decoder = t5.embed_tokens(&u32s(&f["decoder_ids"])).unwrap();
        for (case, prompt) in [("plain", None), ("prompted", Some(&f["prompt"]))] {
            let (embeds, mask) = prompted(&t5, &ids, &mask, prompt);
            let encoded = t5.encode(&embeds, &mask).unwrap();
            let reference = &f[&format!("encoder_{case}")];
            let d = max_abs_diff(&encoded, reference);
            assert!(
                d < 1e-4 * max_abs(reference).max(1.0),
                "{name} {case}: encoder states differ by {d:e}"
            );
            let hidden = decoded(&t5, &embeds, &mask, &decoder);
            let logits = hidden
                .broadcast_matmul(&t5.lm_head().dense().unwrap().t().unwrap())
                .unwrap();
            let reference = &f[&format!("logits_{case}")];
            let d = max_abs_diff(&logits, reference);
            assert!(
                d < 1e-4 * max_abs(reference).max(1.0),
                "{name} {case}: logits differ by {d:e}"
            );
            let ours = loss(&logits, &f["labels"]);
            let theirs = f[&format!("loss_{case}")].to_vec1::<f32>().unwrap()[0] as f64;
            assert!(
                (ours - theirs).abs() < 1e-4,
                "{name} {case}: loss {ours} against {theirs}"
            );
        }
    }
}

#[test]
fn relative_attention_backward_matches_finite_differences() {
    let (b, h, q, s, k) = (2, 3, 4, 5, 3);
    let table = randn(&[8, h], 1);
    let bias = position_bias(&table, 0, q, s, true, 12).unwrap();
    // a padding key in the second row, and a causal variant
    let padding = Tensor::from_vec(
        vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1e30],
        (b, 1, 1, s),
        &DEV,
    )
    .unwrap();
    let causal = causal_mask(q, s, 1, &bias).unwrap();
    for (what, bias) in [
        ("bidirectional", bias.broadcast_add(&padding).unwrap()),
        ("causal", bias.broadcast_add(&causal).unwrap()),
    ] {
        let (qx, kx, vx) = (
            randn(&[b, h, q, k], 2),
            randn(&[b, h, s, k], 3),
            randn(&[b, h, s, k], 4),
        );
        let r = randn(&[b, h, q, k], 5);
        let (_, saved) = biased_attention_forward(&qx, &kx, &vx, &bias).unwrap();
        let (dq, dk, dv) = biased_attention_backward(&r, &saved).unwrap();
        let out = |q: &Tensor, k: &Tensor, v: &Tensor| {
            weighted_sum(&biased_attention_forward(q, k, v, &bias).unwrap().0, &r)
        };
        check(&qx, &dq, |x| out(x, &kx, &vx), &format!("{what} dq"));
        check(&kx, &dk, |x| out(&qx, x, &vx), &format!("{what} dk"));
        check(&vx, &dv, |x| out(&qx, &kx, x), &format!("{what} dv"));
    }
}

#[test]
fn t5_backward_to_the_encoder_input_matches_finite_differences() {
    for name in ["tiny-t5", "tiny-t5-gated"] {
        let t5 = load(name, DType::F64);
        let ids = Tensor::new(&[[5u32, 9, 20, 1, 0], [30, 31, 12, 40, 1]], &DEV).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 1, 1]], &DEV).unwrap();
        let prompt = randn(&[2, 16], 7);
        let (embeds, mask) = prompted(&t5, &ids, &mask, Some(&prompt));
        let decoder = t5
            .embed_tokens(&Tensor::new(&[[0u32, 14, 20], [0, 26, 1]], &DEV).unwrap())
            .unwrap();
        let types = mask.zeros_like().unwrap();
        let input = |embeds: &Tensor| -> (Tensor, Option<_>) {
            let input = BackboneInput {
                embeds,
                attention_mask: &mask,
                token_type_ids: &types,
                reads: None,
                prefix: None,
                decoder: Some(&decoder),
            };
            t5.run(&input, true).unwrap()
        };
        let (hidden, activations) = input(&embeds);
        let r = randn(hidden.dims(), 8);
        let grads = t5.backward(&r, activations.unwrap(), None).unwrap();
        check(
            &embeds,
            &grads.embeds,
            |x| weighted_sum(&input(x).0, &r),
            &format!("{name} d_embeds"),
        );
        // a padding column of the encoder gets nothing
        let padded = grads.embeds.get(0).unwrap().get(6).unwrap();
        assert_eq!(
            max_abs(&padded),
            0.0,
            "{name}: a padding position got a gradient"
        );
    }
}

#[test]
fn t5_cached_decoding_equals_the_full_decoder_pass() {
    let t5 = load("tiny-t5-gated", DType::F64);
    let embeds = t5
        .embed_tokens(&Tensor::new(&[[5u32, 9, 20, 33, 1]], &DEV).unwrap())
        .unwrap();
    let mask = Tensor::ones((1, 5), DType::U32, &DEV).unwrap();
    let decoder = t5
        .embed_tokens(&Tensor::new(&[[0u32, 14, 20, 26]], &DEV).unwrap())
        .unwrap();
    let full = decoded(&t5, &embeds, &mask, &decoder).squeeze(0).unwrap();
    let mut state = t5.start_decoding(&embeds, None).unwrap();
    let rows = decoder.squeeze(0).unwrap();
    // two positions at once, then one at a time
    let mut parts = vec![t5
        .extend(&rows.narrow(0, 0, 2).unwrap(), &mut state)
        .unwrap()];
    for i in 2..4 {
        parts.push(
            t5.extend(&rows.narrow(0, i, 1).unwrap(), &mut state)
                .unwrap(),
        );
    }
    let cached = Tensor::cat(&parts, 0).unwrap();
    assert_eq!(state.len(), 4);
    let d = max_abs_diff(&cached, &full);
    assert!(
        d < 1e-10,
        "cached decoding differs from the full pass by {d:e}"
    );
    assert!(max_abs(&full.sum(D::Minus1).unwrap()) > 0.0);
}

/// Decoding texts together: three states of different encoder inputs (one behind a prefix) and
/// different decoded lengths step one position each in one pass, and each row gets what `extend`
/// gives it alone.
#[test]
fn t5_rows_decoded_together_get_what_each_gets_alone() {
    let t5 = load("tiny-t5", DType::F64);
    let prefix = randn(&[2, 2 * 2 * 12], 4);
    let inputs: [(&[u32], Option<&Tensor>, &[u32]); 3] = [
        (&[5, 9, 20, 33, 1], None, &[0, 14]),
        (&[30, 31, 1], Some(&prefix), &[0]),
        (&[7, 1], None, &[0, 26, 20]),
    ];
    let mut together = Vec::new();
    let mut alone = Vec::new();
    for (ids, prefix, decoded) in inputs {
        let embeds = t5
            .embed_tokens(&Tensor::new(ids, &DEV).unwrap().unsqueeze(0).unwrap())
            .unwrap();
        let mut state = t5.start_decoding(&embeds, prefix).unwrap();
        let rows = t5
            .embed_tokens(&Tensor::new(decoded, &DEV).unwrap().unsqueeze(0).unwrap())
            .unwrap();
        t5.extend(&rows.squeeze(0).unwrap(), &mut state).unwrap();
        together.push(state);
        let embeds = t5
            .embed_tokens(&Tensor::new(ids, &DEV).unwrap().unsqueeze(0).unwrap())
            .unwrap();
        let mut state = t5.start_decoding(&embeds, prefix).unwrap();
        t5.extend(&rows.squeeze(0).unwrap(), &mut state).unwrap();
        alone.push(state);
    }
    let next = t5
        .embed_tokens(&Tensor::new(&[[41u32, 48, 32]], &DEV).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    for _ in 0..2 {
        let mut states: Vec<_> = together.iter_mut().collect();
        let batched = t5.extend_each(&next, &mut states).unwrap();
        for (b, state) in alone.iter_mut().enumerate() {
            let own = t5.extend(&next.narrow(0, b, 1).unwrap(), state).unwrap();
            let d = max_abs_diff(&batched.narrow(0, b, 1).unwrap(), &own);
            assert!(d < 1e-10, "row {b} decoded together differs by {d:e}");
            assert_eq!(together[b].len(), state.len());
        }
    }
    assert_eq!(together[1].len(), 2 + 1 + 2, "the prefix's positions count");
}

/// The fixture script's (input, target) pairs, as data rows.
fn t5_pairs() -> Vec<Example> {
    let pairs = [
        ("a good movie", "great"),
        ("the plot was dull and boring", "bad film"),
        ("i love this", "good"),
    ];
    pairs
        .iter()
        .enumerate()
        .map(|(i, (text, target))| Example {
            text: text.to_string(),
            text_pair: None,
            label: Some(target.to_string()),
            task: None,
            line: i + 2,
        })
        .collect()
}

/// PEFT writes a SEQ_2_SEQ_LM prompt of [2M, D] and reads only its first M rows: softprompt
/// reads those, and gets PEFT's loss and PEFT's greedy tokens.
#[test]
fn peft_written_seq2seq_adapter_gives_peft_loss_and_tokens() {
    let adapter = Adapter::load(&fixtures().join("peft-tiny-t5"), 16, &DEV).unwrap();
    assert_eq!(
        adapter.prompt.dims(),
        [4, 16],
        "the encoder's half of PEFT's [8, 16]"
    );
    assert_eq!(adapter.config.num_transformer_submodules, 1);
    gives_peft_loss_and_tokens(&adapter, "peft_tiny_t5.safetensors", "");
}

/// PEFT's SEQ_2_SEQ_LM multitask prompt (two submodules, its default) is [2M, D] and each task's
/// factors; PEFT's forward puts the first M rows of a task's prompt in front of the encoder's
/// input and the other M in front of the decoder's. softprompt reads it so, and gets each task's
/// PEFT loss and greedy tokens (by PEFT's forward: its `generate` leaves the decoder's rows out).
#[test]
fn peft_written_seq2seq_multitask_prompt_gives_each_task_peft_loss_and_tokens() {
    let adapter = Adapter::load(&fixtures().join("peft-tiny-t5-multitask"), 16, &DEV).unwrap();
    assert_eq!(adapter.placement(), Placement::EncoderDecoder);
    assert_eq!(adapter.prompt.dims(), [6, 16]);
    for task in ["0", "1"] {
        let own = adapter.for_task(Some(task)).unwrap();
        let fixture = "peft_tiny_t5_multitask.safetensors";
        gives_peft_loss_and_tokens(&own, fixture, &format!("_{task}"));
    }
}

/// PEFT's SEQ_2_SEQ_LM prefix: keys and values in front of every decoder block's self-attention,
/// read through PEFT's doubling (both blocks of the tiny T5 read its layer 0, none its layer 1),
/// the encoder and cross-attention untouched. softprompt gets PEFT's loss and greedy tokens.
#[test]
fn peft_written_seq2seq_prefix_gives_peft_loss_and_tokens() {
    let adapter = Adapter::load(&fixtures().join("peft-tiny-t5-prefix"), 16, &DEV).unwrap();
    assert_eq!(adapter.placement(), Placement::Prefix);
    assert_eq!(adapter.prompt.dims(), [3, 2 * 2 * 12]);
    gives_peft_loss_and_tokens(&adapter, "peft_tiny_t5_prefix.safetensors", "");
}

/// The adapter's token loss on T5_PAIRS and greedy tokens on the tiny T5 against PEFT's in
/// `fixture` (its `loss` and `generated`, each name followed by `suffix`).
fn gives_peft_loss_and_tokens(adapter: &Adapter, fixture: &str, suffix: &str) {
    let model = Model::load(&fixtures().join("tiny-t5"), DType::F32, &DEV).unwrap();
    assert_eq!(adapter.config.task_type, Some(TaskType::Seq2SeqLm));
    let (f, _) = load_tensors(&fixtures().join(fixture), &DEV).unwrap();
    let batching = Batching {
        size: 8,
        padding: Padding::Right,
        device: DEV.clone(),
    };
    let score =
        generation_score(&model, adapter, &t5_pairs(), Path::new("pairs"), &batching).unwrap();
    let theirs = f[&format!("loss{suffix}")].to_vec1::<f32>().unwrap()[0] as f64;
    assert!(
        (score.token_loss - theirs).abs() < 1e-4,
        "token loss {} against PEFT's {theirs}",
        score.token_loss
    );

    let config = SamplingConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let placement = adapter.placement();
    let continuation = Continuation::new(&model, &adapter.prompt, placement, None).unwrap();
    let texts: Vec<String> = t5_pairs().into_iter().map(|e| e.text).collect();
    let written = continuation.write_all(&model, &texts, &config).unwrap();
    let expected = f[&format!("generated{suffix}")]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    for (generation, peft) in written.iter().zip(&expected) {
        // PEFT's rows start with the decoder start token, and stop at EOS or the limit
        let peft: Vec<u32> = peft[1..]
            .iter()
            .take_while(|&&t| t > 1)
            .map(|&t| t as u32)
            .collect();
        assert_eq!(
            generation.tokens, peft,
            "greedy tokens for {:?}",
            generation.text
        );
    }
}

/// Two (input, target) rows of different lengths, for the seq2seq tests.
fn seq2seq_rows() -> Vec<Encoded> {
    vec![
        Encoded {
            ids: vec![5, 20, 9, 1],
            type_ids: vec![0; 4],
            decoder_ids: vec![0, 14, 20, 1],
            ..Default::default()
        },
        Encoded {
            ids: vec![30, 31, 1],
            type_ids: vec![0; 3],
            decoder_ids: vec![0, 26, 1],
            ..Default::default()
        },
    ]
}

/// By hand, each row alone: `prompts[row]` (encoder rows, decoder rows) in front of its input
/// and its decoder's, its logits at every decoder position, −log p of each next target token.
fn seq2seq_nll(
    t5: &T5,
    lm_head: &Tensor,
    data: &[Encoded],
    prompts: &[(Tensor, Option<Tensor>)],
) -> Vec<f64> {
    let mut nll = Vec::new();
    for (e, (encoder_rows, decoder_rows)) in data.iter().zip(prompts) {
        let row = |ids: &[u32]| Tensor::new(ids, &DEV).unwrap().unsqueeze(0).unwrap();
        let mask = Tensor::ones((1, e.ids.len()), DType::U32, &DEV).unwrap();
        let (embeds, mask) = prompted(t5, &row(&e.ids), &mask, Some(encoder_rows));
        let mut decoder = t5.embed_tokens(&row(&e.decoder_ids)).unwrap();
        let front = decoder_rows.as_ref().map_or(0, |d| d.dim(0).unwrap());
        if let Some(rows) = decoder_rows {
            decoder = Tensor::cat(&[&rows.unsqueeze(0).unwrap(), &decoder], 1).unwrap();
        }
        let hidden = decoded(t5, &embeds, &mask, &decoder);
        let logits = hidden
            .squeeze(0)
            .unwrap()
            .matmul(&lm_head.t().unwrap())
            .unwrap();
        let log_probs = log_softmax(&logits).unwrap().to_vec2::<f64>().unwrap();
        for i in 1..e.decoder_ids.len() {
            nll.push(-log_probs[front + i - 1][e.decoder_ids[i] as usize]);
        }
    }
    nll
}

/// `--task seq2seq` end to end in f64: the prompt in front of the encoder's input, the loss the
/// mean cross-entropy of the decoder's target tokens (checked by hand, row by row), and the
/// prompt gradient through decoder, cross-attention and encoder against finite differences.
#[test]
fn seq2seq_loss_and_prompt_gradient_match_finite_differences() {
    let data = seq2seq_rows();
    let batch = Batch::new(&data, None, &[0, 1], Padding::Right, &DEV).unwrap();
    let prompt = randn(&[3, 16], 11);
    for name in ["tiny-t5", "tiny-t5-gated"] {
        let make = |p: &Tensor| {
            let backbone = load(name, DType::F64);
            let head = CausalLm {
                lm_head: backbone.lm_head().dense().unwrap(),
            };
            PromptedModel {
                backbone,
                prompt: SoftPrompt::from_tensor(p).unwrap().into(),
                head,
                template: None,
            }
        };
        let model = make(&prompt);
        let (loss, grads) = model.loss_and_grads(&batch).unwrap();
        let prompts = vec![(prompt.clone(), None); data.len()];
        let nll = seq2seq_nll(&model.backbone, &model.head.lm_head, &data, &prompts);
        let loss_of = |p: &Tensor| make(p).loss_and_grads(&batch).unwrap().0;
        mean_loss_and_gradient(
            &format!("{name}: seq2seq"),
            (loss, &grads[0]),
            &nll,
            &prompt,
            loss_of,
        );
    }
}

/// A multitask prompt on T5 as PEFT's SEQ_2_SEQ_LM trains it, in f64: each task's [2M, D], the
/// first M in front of the encoder's input and the other M in front of the decoder's, two rows of
/// two tasks in one batch. The loss is checked by hand and the gradient of every task's rows,
/// encoder's and decoder's, against finite differences.
#[test]
fn seq2seq_encoder_decoder_prompt_gradient_matches_finite_differences() {
    let data = seq2seq_rows();
    let batch = Batch::new(&data, None, &[0, 1], Padding::Right, &DEV)
        .unwrap()
        .with_tasks(Some(&[1, 0]))
        .unwrap();
    let prompts = randn(&[2, 4, 16], 12);
    let make = |p: &Tensor| {
        let backbone = load("tiny-t5", DType::F64);
        let head = CausalLm {
            lm_head: backbone.lm_head().dense().unwrap(),
        };
        PromptedModel {
            backbone,
            prompt: SoftPrompt::placed(p, Placement::EncoderDecoder)
                .unwrap()
                .into(),
            head,
            template: None,
        }
    };
    let model = make(&prompts);
    let (loss, grads) = model.loss_and_grads(&batch).unwrap();
    let halves = |t: usize| {
        let own = prompts.get(t).unwrap();
        (
            own.narrow(0, 0, 2).unwrap(),
            Some(own.narrow(0, 2, 2).unwrap()),
        )
    };
    let nll = seq2seq_nll(
        &model.backbone,
        &model.head.lm_head,
        &data,
        &[halves(1), halves(0)],
    );
    let loss_of = |p: &Tensor| make(p).loss_and_grads(&batch).unwrap().0;
    mean_loss_and_gradient(
        "encoder-decoder prompt",
        (loss, &grads[0]),
        &nll,
        &prompts,
        loss_of,
    );
}

/// Rank classification on T5, the paper's way of classifying with a text-to-text model: each
/// label's word is scored by the decoder's logit of its first token at the first position, read
/// after the start token alone (after a multitask prompt's decoder rows and the start token).
/// softprompt's label scores for PEFT's adapters are PEFT's logits there, rows of different
/// lengths in one padded batch, the prompt adapter's rows beside each task's of the multitask
/// adapter; a decoder's template does not move the words (T5 writes them first thing).
#[test]
fn t5_verbalizer_scores_label_words_as_peft_first_decoder_logits() {
    let model = Model::load(&fixtures().join("tiny-t5"), DType::F32, &DEV).unwrap();
    let labels: Vec<String> = ["praise", "pan", "shrug"].map(String::from).to_vec();
    let words: Vec<String> = ["great", "bad", "good"].map(String::from).to_vec();
    let loaded = |adapter: &Adapter| LoadedAdapter {
        prompt: adapter.prompt.clone(),
        placement: adapter.placement(),
        head: model
            .verbalizer_head("Review: {text}", &labels, &words)
            .unwrap(),
        labels: labels.clone(),
        template: None,
    };
    let prompt = Adapter::load(&fixtures().join("peft-tiny-t5"), 16, &DEV).unwrap();
    let multitask = Adapter::load(&fixtures().join("peft-tiny-t5-multitask"), 16, &DEV).unwrap();
    let members = [
        (loaded(&prompt), "peft_tiny_t5.safetensors", "first_logits"),
        (
            loaded(&multitask.for_task(Some("0")).unwrap()),
            "peft_tiny_t5_multitask.safetensors",
            "first_logits_0",
        ),
        (
            loaded(&multitask.for_task(Some("1")).unwrap()),
            "peft_tiny_t5_multitask.safetensors",
            "first_logits_1",
        ),
    ];
    assert_eq!(members[1].0.placement, Placement::EncoderDecoder);
    let encoder = model.encoder(4, None).unwrap();
    let data = encode_all(&encoder, &t5_pairs(), None, Path::new("pairs")).unwrap();
    let adapters: Vec<&LoadedAdapter> = members.iter().map(|(a, ..)| a).collect();
    let answers = ensemble_all(&model.backbone, &adapters, &data, 8, Padding::Right, &DEV).unwrap();
    let tokens: Vec<usize> = words
        .iter()
        .map(|w| encoder.plain_ids(w).unwrap()[0] as usize)
        .collect();
    for (member, (_, fixture, key)) in members.iter().enumerate() {
        let (f, _) = load_tensors(&fixtures().join(fixture), &DEV).unwrap();
        let peft = f[*key].to_vec2::<f32>().unwrap();
        assert_eq!(answers.len(), peft.len());
        for (row, (answer, theirs)) in answers.iter().zip(&peft).enumerate() {
            for (c, &t) in tokens.iter().enumerate() {
                let ours = answer.logits[member][c];
                assert!(
                    (ours - theirs[t]).abs() < 1e-4,
                    "{key}, row {row}, label word {:?}: {ours} against PEFT's {}",
                    words[c],
                    theirs[t]
                );
            }
        }
    }
}

/// `--task verbalizer` on T5 in f64: the loss is the cross-entropy of the labels over their
/// words' first-position decoder logits (checked by hand, row by row), and the prompt gradient
/// comes back through the decoder's one position, cross-attention and the encoder.
#[test]
fn t5_verbalizer_loss_and_prompt_gradient_match_finite_differences() {
    let data = vec![
        Encoded {
            ids: vec![5, 20, 9, 1],
            type_ids: vec![0; 4],
            ..Default::default()
        },
        Encoded {
            ids: vec![30, 31, 1],
            type_ids: vec![0; 3],
            ..Default::default()
        },
    ];
    let (gold, tokens) = ([1u32, 0], [14u32, 20]);
    let batch = Batch::new(&data, Some(&gold), &[0, 1], Padding::Right, &DEV).unwrap();
    let prompt = randn(&[3, 16], 12);
    for name in ["tiny-t5", "tiny-t5-gated"] {
        let make = |p: &Tensor| {
            let backbone = load(name, DType::F64);
            let head = verbalizer::head(backbone.lm_head(), &tokens).unwrap();
            PromptedModel {
                backbone,
                prompt: SoftPrompt::from_tensor(p).unwrap().into(),
                head: Classifier {
                    head,
                    labels: vec!["no".into(), "yes".into()],
                    label_words: Some(vec!["great".into(), "bad".into()]),
                },
                template: None,
            }
        };
        let model = make(&prompt);
        let (loss, grads) = model.loss_and_grads(&batch).unwrap();
        assert_eq!(grads.len(), 1, "the verbalizer trains the prompt alone");

        let lm_head = model.backbone.lm_head().dense().unwrap();
        let mut nll = Vec::new();
        for (e, &g) in data.iter().zip(&gold) {
            let ids = Tensor::new(e.ids.as_slice(), &DEV)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let mask = Tensor::ones((1, e.ids.len()), DType::U32, &DEV).unwrap();
            let (embeds, mask) = prompted(&model.backbone, &ids, &mask, Some(&prompt));
            let start = model.backbone.start_rows(1).unwrap().unwrap();
            let hidden = decoded(&model.backbone, &embeds, &mask, &start)
                .reshape((1, 16))
                .unwrap();
            let logits = hidden
                .matmul(&lm_head.t().unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap();
            let scores: Vec<f64> = tokens
                .iter()
                .map(|&t| logits.get(t as usize).unwrap().to_scalar::<f64>().unwrap())
                .collect();
            let log_z = scores.iter().map(|s| s.exp()).sum::<f64>().ln();
            nll.push(log_z - scores[g as usize]);
        }
        let loss_of = |p: &Tensor| make(p).loss_and_grads(&batch).unwrap().0;
        mean_loss_and_gradient(
            &format!("{name}: verbalizer"),
            (loss, &grads[0]),
            &nll,
            &prompt,
            loss_of,
        );
    }
}

/// `loss` is the mean of `nll` (the terms worked out by hand) and `gradient` the finite
/// differences of `loss_of` at `prompt`.
fn mean_loss_and_gradient(
    what: &str,
    (loss, gradient): (f64, &Tensor),
    nll: &[f64],
    prompt: &Tensor,
    loss_of: impl Fn(&Tensor) -> f64,
) {
    let expected = nll.iter().sum::<f64>() / nll.len() as f64;
    assert!(
        (loss - expected).abs() < 1e-9,
        "{what}: loss {loss} against {expected} by hand"
    );
    let analytic = gradient.to_dtype(DType::F64).unwrap();
    check(
        prompt,
        &analytic,
        loss_of,
        &format!("{what} prompt gradient"),
    );
}
