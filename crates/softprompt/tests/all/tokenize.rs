//! Text → tokens: an input too long for the model is cut inside its text, never in the template
//! around it, whose tail is what the model answers after.

use crate::fixtures;
use softprompt::task::causal_lm::encode_pair;
use softprompt::template::Template;
use softprompt::tokenize::TextEncoder;

const TEMPLATE: &str = "the story {text} so it was";

fn template() -> Template {
    Template::parse(TEMPLATE).unwrap()
}

fn encoder(max_tokens: usize) -> TextEncoder {
    TextEncoder::from_file(&fixtures().join("tiny-bert/tokenizer.json"), max_tokens).unwrap()
}

#[test]
fn a_long_input_is_cut_inside_the_text_not_the_template() {
    let encoder = encoder(14);
    let long = "a good movie and a fun story but the acting was weak and the plot was dull";
    let (cut, truncated) = encoder
        .encode_fitted(Some(&template()), long, None, 14)
        .unwrap();
    assert!(truncated);
    let text = encoder.decode(&cut.ids).unwrap();
    // [CLS] the story a good movie … so it was [SEP]: the head, as much text as fits, the tail
    assert_eq!(cut.ids.len(), 14, "{text}");
    assert!(text.starts_with("the story a good movie"), "{text}");
    assert!(text.ends_with("so it was"), "{text}");
    assert_eq!(
        cut.ids.last(),
        encoder.encode("", None).unwrap().ids.last(),
        "[SEP] stays"
    );

    let (short, truncated) = encoder
        .encode_fitted(Some(&template()), "fun", None, 14)
        .unwrap();
    assert!(!truncated);
    assert_eq!(
        encoder.decode(&short.ids).unwrap(),
        "the story fun so it was"
    );
}

/// `--task causal-lm`: the target stays whole after the template's tail, the text gives way.
#[test]
fn a_long_pair_keeps_its_target_and_the_template_tail() {
    let encoder = encoder(16);
    let long = "a good movie and a fun story but the acting was weak and the plot was dull";
    let pair = encode_pair(&encoder, Some(&template()), long, "not good", None).unwrap();
    assert_eq!(pair.ids.len(), 16);
    assert_eq!(pair.target_len, 2);
    let text = encoder.decode(&pair.ids).unwrap();
    assert!(text.starts_with("the story a good"), "{text}");
    assert!(text.ends_with("so it was not good"), "{text}");
}

/// A megabyte of text is cut in its head, with the answer the whole text gets, and a text of
/// mostly whitespace (whose head holds no tokens) is still cut at its real tokens.
#[test]
fn a_huge_input_is_cut_as_the_whole_text_would_be() {
    let encoder = encoder(14);
    let sentence = "a good movie and a fun story but the acting was weak ";
    let huge = sentence.repeat(20_000);
    // within the 14 × 64 bytes that are tokenized whole, so this one takes the exact path
    let exact = &huge[..14 * 64 - 1];
    let fitted = |text: &str| {
        encoder
            .encode_fitted(Some(&template()), text, None, 14)
            .unwrap()
    };
    assert_eq!(fitted(&huge), fitted(exact));
    assert!(fitted(&huge).1);

    let spaced = format!(
        "{}a good movie and a fun story but the acting was weak",
        " ".repeat(100_000)
    );
    let (cut, truncated) = fitted(&spaced);
    assert!(truncated);
    let text = encoder.decode(&cut.ids).unwrap();
    assert!(text.starts_with("the story a good movie"), "{text}");
}

/// Generation's input is whole or refused: never cut, and a megabyte is refused from its head.
#[test]
fn a_generation_input_is_encoded_whole_or_refused() {
    let encoder = encoder(14);
    let fits = encoder
        .encode_within(Some(&template()), "fun", 14)
        .unwrap()
        .expect("fits");
    assert_eq!(
        encoder.decode(&fits.ids).unwrap(),
        "the story fun so it was"
    );
    let long = "a good movie and a fun story but the acting was weak";
    assert_eq!(
        encoder.encode_within(Some(&template()), long, 14).unwrap(),
        None
    );
    let huge = long.repeat(20_000);
    assert_eq!(encoder.encode_within(None, &huge, 14).unwrap(), None);
}
