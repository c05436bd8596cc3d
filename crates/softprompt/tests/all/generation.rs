//! Generation: the cached forward equals the full forward, cached greedy decoding equals decoding
//! that rereads everything each step, sampling obeys its limits, and SmolLM2 says " Paris".

use crate::gradients::randn;
use crate::{assets, fixtures, max_abs_diff};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use softprompt::backbone::any::AnyBackbone;
use softprompt::backbone::gpt2::Gpt2;
use softprompt::backbone::llama::Llama;
use softprompt::backbone::{Backbone, KvCache};
use softprompt::generate::{
    generate, prefix_cache, sample, step, FinishReason, Generation, PromptCache, SamplingConfig,
    Sequence, Writer,
};
use softprompt::model::Model;
use softprompt::prompt::Placement;

pub fn tiny_decoders() -> Vec<(&'static str, AnyBackbone)> {
    let dev = Device::Cpu;
    vec![
        (
            "gpt2",
            AnyBackbone::Gpt2(Gpt2::load(&fixtures().join("tiny-gpt2"), DType::F64, &dev).unwrap()),
        ),
        (
            "llama",
            AnyBackbone::Llama(
                Llama::load(&fixtures().join("tiny-llama"), DType::F64, &dev).unwrap(),
            ),
        ),
    ]
}

/// embeds [S, D] → the full forward's hidden [S, D] (one row, no padding)
fn full_forward(backbone: &AnyBackbone, embeds: &Tensor) -> Tensor {
    backbone
        .run_row(embeds, false)
        .unwrap()
        .0
        .squeeze(0)
        .unwrap()
}

#[test]
fn the_cached_forward_equals_the_full_forward() {
    for (name, backbone) in tiny_decoders() {
        let embeds = randn(&[9, 16], 3);
        let full = full_forward(&backbone, &embeds);
        // a prefix of 4 (the prompt), then 3 at once (the input), then one at a time
        let decoder = backbone.decoder().unwrap();
        let mut cache = KvCache::default();
        let mut pieces = Vec::new();
        for (start, len) in [(0, 4), (4, 3), (7, 1), (8, 1)] {
            pieces.push(
                decoder
                    .extend(&embeds.narrow(0, start, len).unwrap(), &mut cache)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), 9);
        let cached = Tensor::cat(&pieces, 0).unwrap();
        let diff = max_abs_diff(&cached, &full);
        assert!(diff < 1e-10, "{name}: cached forward differs by {diff:e}");
    }
}

/// One new position for each of several texts, each on its own cache of its own length, in one
/// pass: each row's hidden state is what `extend` gives it alone.
#[test]
fn extending_many_caches_at_once_equals_each_alone() {
    for (name, backbone) in tiny_decoders() {
        let decoder = backbone.decoder().unwrap();
        let mut caches: Vec<KvCache> = [2usize, 5, 1]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut cache = KvCache::default();
                decoder
                    .extend(&randn(&[n, 16], 10 + i as u64), &mut cache)
                    .unwrap();
                cache
            })
            .collect();
        let next = randn(&[3, 16], 20);
        let alone: Vec<Tensor> = caches
            .iter()
            .enumerate()
            .map(|(b, cache)| {
                let mut cache = cache.clone();
                decoder
                    .extend(&next.narrow(0, b, 1).unwrap(), &mut cache)
                    .unwrap()
            })
            .collect();
        let together = decoder.extend_each(&next, &mut caches).unwrap();
        let diff = max_abs_diff(&together, &Tensor::cat(&alone, 0).unwrap());
        assert!(diff < 1e-10, "{name}: rows differ from alone by {diff:e}");
        assert_eq!(
            caches.iter().map(KvCache::len).collect::<Vec<_>>(),
            [3, 6, 2]
        );
    }
}

/// Texts behind different prompts (none, 3 vectors, a prefix), of different lengths and sampling
/// options, decoded together, two of them joining after three tokens: each writes what it
/// writes alone (tokens, text, why it ended).
#[test]
fn a_batch_of_sequences_writes_what_each_writes_alone() {
    let encoder = softprompt::tokenize::TextEncoder::from_file(
        &fixtures().join("tiny-bert/tokenizer.json"),
        64,
    )
    .unwrap();
    for (name, backbone) in tiny_decoders() {
        let shape = backbone.shape();
        let prefixes = [
            prefix_cache(&backbone, &randn(&[0, 16], 1), Placement::Embeddings).unwrap(),
            prefix_cache(&backbone, &randn(&[3, 16], 5), Placement::Embeddings).unwrap(),
            prefix_cache(
                &backbone,
                &randn(&[2, shape.prefix_width()], 6),
                Placement::Prefix,
            )
            .unwrap(),
        ];
        let greedy = SamplingConfig {
            max_new_tokens: 9,
            ..Default::default()
        };
        let sampled = SamplingConfig {
            temperature: 0.8,
            top_k: Some(5),
            seed: 3,
            ..greedy.clone()
        };
        let short = SamplingConfig {
            max_new_tokens: 2,
            ..greedy.clone()
        };
        let texts: [(&PromptCache, &[u32], &SamplingConfig); 5] = [
            (&prefixes[0], &[5, 20, 9], &greedy),
            (&prefixes[1], &[7], &sampled),
            (&prefixes[2], &[30, 31, 32, 33], &greedy),
            (&prefixes[1], &[12, 40], &short),
            (&prefixes[2], &[9, 9], &sampled),
        ];
        let alone: Vec<Generation> = texts
            .iter()
            .map(|(prefix, ids, config)| {
                generate(&backbone, &encoder, prefix, ids, &[], config, &mut |_| true).unwrap()
            })
            .collect();
        let start = |(prefix, ids, config): &(&PromptCache, &[u32], &SamplingConfig)| {
            let writer = Writer::text(&encoder, config, Box::new(|_| true));
            Sequence::start(&backbone, prefix, ids, &[], config, writer).unwrap()
        };
        let mut sequences: Vec<Sequence> = texts[..3].iter().map(start).collect();
        for _ in 0..3 {
            step(&backbone, &mut sequences).unwrap();
        }
        sequences.extend(texts[3..].iter().map(start));
        while !sequences.iter_mut().all(|s| s.done()) {
            step(&backbone, &mut sequences).unwrap();
        }
        for (i, (sequence, alone)) in sequences.into_iter().zip(&alone).enumerate() {
            assert_eq!(
                &sequence.into_generation().unwrap(),
                alone,
                "{name}: text {i}"
            );
        }
        assert_eq!(alone[3].tokens.len(), 2);
    }
}

fn greedy_without_cache(
    backbone: &AnyBackbone,
    prompt: &Tensor,
    ids: &[u32],
    n: usize,
) -> Vec<u32> {
    softprompt::bench::generation::greedy_without_cache(backbone, prompt, ids, n).unwrap()
}

#[test]
fn cached_greedy_decoding_equals_decoding_without_a_cache() {
    let encoder = softprompt::tokenize::TextEncoder::from_file(
        &fixtures().join("tiny-bert/tokenizer.json"),
        64,
    )
    .unwrap();
    for (name, backbone) in tiny_decoders() {
        // a fixed prompt: the stop-string check below needs words in what it writes
        let prompt = randn(&[3, 16], 5);
        let prefix = prefix_cache(&backbone, &prompt, Placement::Embeddings).unwrap();
        assert_eq!(prefix.len(), 3);
        let input = [5u32, 20, 9];
        let config = SamplingConfig {
            max_new_tokens: 12,
            ..Default::default()
        };
        let mut streamed = String::new();
        let generated = generate(
            &backbone,
            &encoder,
            &prefix,
            &input,
            &[],
            &config,
            &mut |t| {
                streamed.push_str(t);
                true
            },
        )
        .unwrap();
        assert_eq!(
            generated.tokens,
            greedy_without_cache(&backbone, &prompt, &input, 12),
            "{name}"
        );
        assert_eq!(generated.finish, FinishReason::Length);
        assert_eq!(
            streamed, generated.text,
            "{name}: the stream adds up to the text"
        );

        // the end-of-sequence token ends it, and is not part of the answer
        let eos = generated.tokens[4];
        let first = generated.tokens.iter().position(|&t| t == eos).unwrap();
        let ended = generate(
            &backbone,
            &encoder,
            &prefix,
            &input,
            &[eos],
            &config,
            &mut |_| true,
        )
        .unwrap();
        assert_eq!(ended.finish, FinishReason::Eos);
        assert_eq!(ended.tokens, generated.tokens[..first]);

        // a stop string cuts the text before it, and nothing after it was streamed
        let stop = generated
            .text
            .split_whitespace()
            .last()
            .unwrap_or_else(|| panic!("{name} wrote no words: {:?}", generated.text))
            .to_string();
        let mut streamed = String::new();
        let stopped = generate(
            &backbone,
            &encoder,
            &prefix,
            &input,
            &[],
            &SamplingConfig {
                stop: vec![stop.clone()],
                ..config.clone()
            },
            &mut |t| {
                streamed.push_str(t);
                true
            },
        )
        .unwrap();
        assert_eq!(stopped.finish, FinishReason::Stop, "{name}: stop {stop:?}");
        assert!(!stopped.text.contains(&stop));
        assert_eq!(streamed, stopped.text);
    }
}

#[test]
fn sampling_keeps_to_top_k_and_top_p() {
    let logits = [0.0f32, 3.0, 2.9, -1.0, 2.8];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let pick = |config: SamplingConfig, rng: &mut rand_chacha::ChaCha8Rng| -> Vec<u32> {
        (0..300).map(|_| sample(&logits, &config, rng)).collect()
    };
    let greedy = pick(SamplingConfig::default(), &mut rng);
    assert!(greedy.iter().all(|&t| t == 1));
    let hot = SamplingConfig {
        temperature: 1.0,
        ..Default::default()
    };
    let all = pick(hot.clone(), &mut rng);
    for t in [0, 1, 2, 4] {
        assert!(all.contains(&t), "token {t} never drawn at temperature 1");
    }
    let top2 = pick(
        SamplingConfig {
            top_k: Some(2),
            ..hot.clone()
        },
        &mut rng,
    );
    assert!(top2.iter().all(|t| [1, 2].contains(t)) && top2.contains(&2));
    let nucleus = pick(
        SamplingConfig {
            top_p: Some(0.5),
            ..hot
        },
        &mut rng,
    );
    assert!(nucleus.iter().all(|t| [1, 2].contains(t)), "{nucleus:?}");
}

/// The real SmolLM2 (Q4_1 GGUF), through the cached path: greedy " Paris", and the same tokens as
/// rereading everything for each token.
#[test]
fn smollm2_continues_with_paris() {
    let path = assets().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run `make assets`",
        path.display()
    );
    let model = Model::load(&path, DType::F32, &Device::Cpu).unwrap();
    let encoder = model.encoder(0, None).unwrap();
    let ids = encoder
        .encode("The capital of France is", None)
        .unwrap()
        .ids;
    let config = SamplingConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let generated = generate(
        &model.backbone,
        &encoder,
        &PromptCache::Decoder(KvCache::default()),
        &ids,
        &model.eos_token_ids,
        &config,
        &mut |_| true,
    )
    .unwrap();
    assert!(generated.text.starts_with(" Paris"), "{:?}", generated.text);
    let empty = Tensor::zeros((0, 576), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        generated.tokens,
        greedy_without_cache(&model.backbone, &empty, &ids, generated.tokens.len())
    );
}
