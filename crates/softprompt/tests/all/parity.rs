//! The backbone against transformers: last hidden states and pooler outputs, with and without a
//! soft prompt, from fixtures written by scripts/make_fixtures.py.

use crate::{assets, fixtures, max_abs, max_abs_diff};
use candle_core::{DType, Device, Tensor};
use softprompt::backbone::bert::Bert;
use softprompt::backbone::gpt2::Gpt2;
use softprompt::backbone::llama::Llama;
use softprompt::backbone::{Backbone, BackboneInput, Decoder};
use softprompt::files::load_tensors;
use softprompt::prompt::{extend_front, SoftPrompt};
use softprompt::tokenize::TextEncoder;
use std::collections::HashMap;

fn fixture(name: &str) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    load_tensors(&fixtures().join(name), &Device::Cpu).unwrap()
}

fn u32s(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// Runs the backbone on ids, with the prompt in front when given, as PEFT does.
fn hidden<B: Backbone>(
    backbone: &B,
    ids: &Tensor,
    types: &Tensor,
    mask: &Tensor,
    prompt: Option<&Tensor>,
) -> Tensor {
    let word = backbone.embed_tokens(ids).unwrap();
    let (embeds, mask, types) = match prompt {
        Some(p) => {
            let m = p.dim(0).unwrap();
            let prompt = SoftPrompt::from_tensor(p).unwrap();
            (
                prompt.prepend(&word, None).unwrap(),
                extend_front(mask, m, 1).unwrap(),
                extend_front(types, m, 0).unwrap(),
            )
        }
        None => (word, mask.clone(), types.clone()),
    };
    backbone
        .forward(&BackboneInput {
            embeds: &embeds,
            attention_mask: &mask,
            token_type_ids: &types,
            reads: None,
            prefix: None,
            decoder: None,
        })
        .unwrap()
}

/// Relative to the largest magnitude in the reference.
fn relative(ours: &Tensor, reference: &Tensor) -> f64 {
    max_abs_diff(ours, reference) / max_abs(reference)
}

#[test]
fn tiny_bert_matches_transformers_with_and_without_prompt() {
    let (f, _) = fixture("tiny_bert_parity.safetensors");
    let bert = Bert::load(&fixtures().join("tiny-bert"), DType::F32, &Device::Cpu).unwrap();
    let (ids, types, mask) = (u32s(&f["ids"]), u32s(&f["type_ids"]), u32s(&f["mask"]));
    let pooler = bert.pooler.clone().expect("tiny-bert has a pooler");
    for (prompt, hidden_key, pooled_key) in [
        (None, "hidden_plain", "pooled_plain"),
        (Some(&f["prompt"]), "hidden_prompted", "pooled_prompted"),
    ] {
        let h = hidden(&bert, &ids, &types, &mask, prompt);
        let err = relative(&h, &f[hidden_key]);
        assert!(err < 1e-5, "{hidden_key}: relative error {err:e}");
        let pooled = pooler
            .forward(&h.narrow(1, 0, 1).unwrap().squeeze(1).unwrap())
            .unwrap()
            .tanh()
            .unwrap();
        let err = relative(&pooled, &f[pooled_key]);
        assert!(err < 1e-5, "{pooled_key}: relative error {err:e}");
    }
}

/// The default model, all-MiniLM-L6-v2 (from `make assets`): tokenizer ids and hidden states.
#[test]
fn minilm_matches_transformers_with_and_without_prompt() {
    let dir = assets().join("models/all-MiniLM-L6-v2");
    assert!(
        dir.is_dir(),
        "{} is missing: run `make assets` (make test does)",
        dir.display()
    );
    let (f, meta) = fixture("minilm_parity.safetensors");
    let sentences: Vec<String> = serde_json::from_str(&meta["sentences"]).unwrap();
    let encoder = TextEncoder::from_file(&dir.join("tokenizer.json"), 512).unwrap();
    let ids = f["ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    let mask = f["mask"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    for ((sentence, row), mask) in sentences.iter().zip(&ids).zip(&mask) {
        let real = mask.iter().filter(|&&m| m == 1).count();
        let expected: Vec<u32> = row[..real].iter().map(|&i| i as u32).collect();
        assert_eq!(
            encoder.encode(sentence, None).unwrap().ids,
            expected,
            "token ids of {sentence:?}"
        );
    }
    let bert = Bert::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let (ids, mask) = (u32s(&f["ids"]), u32s(&f["mask"]));
    let types = ids.zeros_like().unwrap();
    for (prompt, key) in [
        (None, "hidden_plain"),
        (Some(&f["prompt"]), "hidden_prompted"),
    ] {
        let err = relative(&hidden(&bert, &ids, &types, &mask, prompt), &f[key]);
        assert!(err < 1e-4, "{key}: relative error {err:e}");
    }
}

/// The fused CPU kernels against the composed candle-op kernels on the real model in f32: hidden
/// states and the gradient to the embeddings, a batch with padding, a 20-vector prompt.
#[test]
fn fused_kernels_match_the_composed_reference_on_minilm() {
    let dir = assets().join("models/all-MiniLM-L6-v2");
    assert!(
        dir.is_dir(),
        "{} is missing: run `make assets` (make test does)",
        dir.display()
    );
    let bert = Bert::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let (b, s, d) = (3, 20 + 24, 384);
    let embeds = (Tensor::randn(0f32, 1.0, (b, s, d), &Device::Cpu).unwrap() * 0.05).unwrap();
    let lengths = [s, s - 10, 22];
    let mask: Vec<u32> = lengths
        .iter()
        .flat_map(|&n| (0..s).map(move |i| (i < n) as u32))
        .collect();
    let mask = Tensor::from_vec(mask, (b, s), &Device::Cpu).unwrap();
    let types = mask.zeros_like().unwrap();
    let upstream = Tensor::randn(0f32, 1.0, (b, s, d), &Device::Cpu).unwrap();
    let run = || {
        let input = BackboneInput {
            embeds: &embeds,
            attention_mask: &mask,
            token_type_ids: &types,
            reads: None,
            prefix: None,
            decoder: None,
        };
        let (hidden, acts) = bert.forward_train(&input).unwrap();
        (hidden, bert.backward(&upstream, acts, None).unwrap().embeds)
    };
    let (hidden, d_embeds) = run();
    let (hidden_ref, d_embeds_ref) = softprompt::kernels::with_composed(run);
    let err = relative(&hidden, &hidden_ref);
    assert!(err < 1e-4, "hidden states: relative error {err:e}");
    let err = relative(&d_embeds, &d_embeds_ref);
    assert!(err < 1e-4, "embedding gradient: relative error {err:e}");
}

/// GPT-2 against transformers on a tiny random checkpoint (causal attention, tanh GELU, Conv1D
/// weights, final LayerNorm), with and without a prompt.
#[test]
fn tiny_gpt2_matches_transformers_with_and_without_prompt() {
    let gpt2 = Gpt2::load(&fixtures().join("tiny-gpt2"), DType::F32, &Device::Cpu).unwrap();
    decoder_parity(&gpt2, "tiny_gpt2_parity.safetensors");
}

/// A decoder's last hidden states against the fixture's, at the real (unpadded) positions: neither
/// side promises anything at padding.
fn decoder_parity<B: Backbone>(decoder: &B, fixture_name: &str) {
    let (f, _) = fixture(fixture_name);
    let (ids, mask) = (u32s(&f["ids"]), u32s(&f["mask"]));
    let types = ids.zeros_like().unwrap();
    let n = ids.dim(1).unwrap();
    let real = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    for (prompt, key) in [
        (None, "hidden_plain"),
        (Some(&f["prompt"]), "hidden_prompted"),
    ] {
        let ours = hidden(decoder, &ids, &types, &mask, prompt);
        let m = ours.dim(1).unwrap() - n;
        let keep = |t: &Tensor| t.narrow(1, m, n).unwrap().broadcast_mul(&real).unwrap();
        let err = relative(&keep(&ours), &keep(&f[key]));
        assert!(err < 1e-5, "{fixture_name} {key}: relative error {err:e}");
    }
}

/// Llama against transformers on a tiny random checkpoint (RMSNorm, RoPE, grouped-query attention
/// with 4 query heads on 2 key/value heads, q/k/v biases, SiLU-gated MLP), with and without a prompt.
#[test]
fn tiny_llama_matches_transformers_with_and_without_prompt() {
    let llama = Llama::load(&fixtures().join("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    decoder_parity(&llama, "tiny_llama_parity.safetensors");
}

/// The real SmolLM2-135M-Instruct from its Q4_1 GGUF (from `make assets`): the weights dequantized,
/// q/k un-permuted, the tokenizer rebuilt from the metadata. Token ids and next-token logits match
/// transformers reading the same file, and greedy decoding continues "The capital of France is"
/// with " Paris". With the matrices kept quantized (`--keep-quantized`) the logits are the same.
#[test]
fn smollm2_gguf_matches_transformers_and_says_paris() {
    let path = assets().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run `make assets` (make test does)",
        path.display()
    );
    let (f, meta) = fixture("smollm2_logits.safetensors");
    let mut dequantized: Option<Tensor> = None;
    for keep_quantized in [false, true] {
        let softprompt::backbone::gguf::GgufLlama {
            llama, tokenizer, ..
        } = softprompt::backbone::gguf::load_llama(&path, DType::F32, &Device::Cpu, keep_quantized)
            .unwrap();
        let ids = tokenizer
            .encode(meta["prompt"].as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        let expected: Vec<u32> = f["ids"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        assert_eq!(ids, expected, "token ids");
        let n = ids.len();
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = hidden(
            &llama,
            &ids,
            &ids.zeros_like().unwrap(),
            &ids.ones_like().unwrap(),
            None,
        );
        let last = h.narrow(1, n - 1, 1).unwrap().squeeze(1).unwrap();
        let head = llama.lm_head().dense().unwrap();
        let logits = last.matmul(&head.t().unwrap()).unwrap().squeeze(0).unwrap();
        let err = relative(&logits, &f["logits"]);
        assert!(err < 1e-4, "next-token logits: relative error {err:e}");
        // generation's output layer: with keep_quantized, the Q8_0 head read block by block
        let generated = llama.next_token_logits(&last).unwrap().squeeze(0).unwrap();
        let err = relative(&generated, &logits);
        assert!(err < 1e-5, "generation's logits vs the LM head's: {err:e}");
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(tokenizer.decode(&[next], false).unwrap(), " Paris");
        match &dequantized {
            None => dequantized = Some(logits),
            Some(d) => {
                // the same weights, summed in another order (a few rows read the blocks directly)
                let err = relative(&logits, d);
                assert!(err < 1e-5, "kept quantized vs dequantized at load: {err:e}");
            }
        }
    }
}

/// Quantized matrices are reordered by row and stacked without dequantizing, exactly as their
/// dense copies are.
#[test]
fn quantized_weights_select_rows_and_stack_like_dense_ones() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use softprompt::kernels::Weight;
    use std::sync::Arc;
    let dense = |rows: usize, seed: f32| {
        let v: Vec<f32> = (0..rows * 64)
            .map(|i| ((i as f32 + seed) * 0.37).sin())
            .collect();
        Tensor::from_vec(v, (rows, 64), &Device::Cpu).unwrap()
    };
    for kind in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let quantized = |t: &Tensor| Weight::Quantized {
            blocks: Arc::new(QTensor::quantize(t, kind).unwrap()),
            dtype: DType::F32,
        };
        let (a, b) = (quantized(&dense(6, 0.0)), quantized(&dense(4, 1.0)));
        let (da, db) = (
            Weight::Dense(a.dense().unwrap()),
            Weight::Dense(b.dense().unwrap()),
        );
        let order = [5, 0, 3, 1, 4, 2];
        let pairs = [
            (
                a.select_rows(&order).unwrap(),
                da.select_rows(&order).unwrap(),
            ),
            (
                Weight::cat(&[&a, &b]).unwrap(),
                Weight::cat(&[&da, &db]).unwrap(),
            ),
        ];
        for (q, d) in pairs {
            assert!(
                matches!(q, Weight::Quantized { .. }),
                "{kind:?} stays quantized"
            );
            let (q, d) = (q.dense().unwrap(), d.dense().unwrap());
            assert_eq!(q.dims(), d.dims());
            let diff = (q - d).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{kind:?}");
        }
    }
}

/// A GGUF tensor whose declared shape wraps around usize (the fuzzer's find: it passed candle's
/// size check and then panicked asking for exabytes) is refused by name.
#[test]
fn a_gguf_tensor_larger_than_its_file_is_refused() {
    let path = crate::fixtures().join("hostile/gguf-wrapping-tensor-shape.gguf");
    let err = softprompt::model::Model::load(&path, DType::F32, &Device::Cpu)
        .err()
        .expect("a tensor of that shape must not load");
    let message = format!("{err:#}");
    assert!(
        message.contains("more than the file's 639 bytes hold"),
        "{message}"
    );
}

/// A GGUF file of an architecture this loader does not read is refused by name, never half-read.
#[test]
fn a_gguf_of_another_architecture_is_refused() {
    use candle_core::quantized::gguf_file::{write, Value};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("other.gguf");
    let arch = Value::String("falcon".into());
    let mut file = std::fs::File::create(&path).unwrap();
    write(&mut file, &[("general.architecture", &arch)], &[]).unwrap();
    drop(file);
    let err = softprompt::model::Model::load(&path, DType::F32, &Device::Cpu)
        .err()
        .expect("a falcon GGUF must not load");
    let message = format!("{err:#}");
    assert!(
        message.contains("GGUF architecture \"falcon\" is not supported"),
        "{message}"
    );
}
