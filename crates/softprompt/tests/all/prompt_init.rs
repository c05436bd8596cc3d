//! Prompt initialisation strategies.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use softprompt::kernels::Weight;
use softprompt::prompt::{InitSource, PromptInit, SoftPrompt};

fn table() -> Tensor {
    // Row i is filled with the value i: a row read from the table shows which token it came from.
    let values: Vec<f32> = (0..10)
        .flat_map(|i| std::iter::repeat_n(i as f32, 4))
        .collect();
    Tensor::from_vec(values, (10, 4), &Device::Cpu).unwrap()
}

fn init(kind: PromptInit, length: usize, text: &[u32], labels: &[Vec<u32>]) -> Vec<Vec<f32>> {
    init_seeded(kind, length, text, labels, 0)
}

fn init_seeded(
    kind: PromptInit,
    length: usize,
    text: &[u32],
    labels: &[Vec<u32>],
    seed: u64,
) -> Vec<Vec<f32>> {
    let t = Weight::Dense(table());
    let source = InitSource {
        word_embeddings: &t,
        vocab_ids: &[7, 8, 9],
        text_ids: text,
        label_ids: labels,
    };
    let prompt =
        SoftPrompt::init(kind, length, &source, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
    prompt.embeddings.as_tensor().to_vec2::<f32>().unwrap()
}

#[test]
fn text_init_repeats_the_text_to_length() {
    let rows = init(PromptInit::Text, 5, &[1, 2], &[]);
    let firsts: Vec<f32> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(firsts, [1.0, 2.0, 1.0, 2.0, 1.0]);
}

#[test]
fn label_init_averages_each_label_then_draws_vocabulary() {
    let rows = init(PromptInit::Labels, 4, &[], &[vec![1, 3], vec![4]]);
    assert_eq!(rows[0][0], 2.0, "mean of tokens 1 and 3");
    assert_eq!(rows[1][0], 4.0);
    assert!(
        rows[2..].iter().all(|r| [7.0, 8.0, 9.0].contains(&r[0])),
        "{rows:?}"
    );
}

#[test]
fn random_inits_have_their_documented_spread() {
    let uniform = init(PromptInit::Uniform, 200, &[], &[]).concat();
    assert!(uniform.iter().all(|v| (-0.5..0.5).contains(v)));
    let normal = init(PromptInit::Normal, 200, &[], &[]).concat();
    let var = normal.iter().map(|v| v * v).sum::<f32>() / normal.len() as f32;
    assert!((var - 1.0).abs() < 0.15, "variance {var}");
    let vocab = init(PromptInit::Vocab, 20, &[], &[]);
    assert!(vocab.iter().all(|r| [7.0, 8.0, 9.0].contains(&r[0])));
}

#[test]
fn same_seed_same_prompt() {
    for kind in [PromptInit::Uniform, PromptInit::Normal, PromptInit::Vocab] {
        assert_eq!(
            init_seeded(kind, 6, &[], &[], 1),
            init_seeded(kind, 6, &[], &[], 1),
            "{kind}"
        );
        // and the seed is what decides it
        assert_ne!(
            init_seeded(kind, 6, &[], &[], 1),
            init_seeded(kind, 6, &[], &[], 2),
            "{kind}"
        );
    }
}

#[test]
fn a_prompt_made_of_token_embeddings_reads_back_as_those_tokens() {
    let values: Vec<f32> = (0..6 * 3).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
    let t = Tensor::from_vec(values, (6, 3), &Device::Cpu).unwrap();
    let prompt = t
        .index_select(&Tensor::new(&[4u32, 1], &Device::Cpu).unwrap(), 0)
        .unwrap();
    let nearest = softprompt::prompt::nearest_tokens(&prompt, &t, 2).unwrap();
    assert_eq!(nearest[0][0].0, 4);
    assert_eq!(nearest[1][0].0, 1);
    assert!((nearest[0][0].1 - 1.0).abs() < 1e-6 && nearest[0][1].1 < nearest[0][0].1);
}
