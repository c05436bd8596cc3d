//! Prefix tuning: keys and values in front of every layer's attention. Their gradient through
//! every layer matches finite differences; a decoder reads a prefix in a rows pass exactly as it
//! reads it from its cache in generation; adapters PEFT wrote give PEFT's (transformers') logits.

use crate::generation::tiny_decoders;
use crate::gradients::{check, on_both_paths, randn, tiny_bert, weighted_sum};
use crate::{fixtures, max_abs_diff};
use candle_core::{DType, Device, Tensor};
use softprompt::adapter::{Adapter, AdapterHead, PeftType};
use softprompt::backbone::any::AnyBackbone;
use softprompt::backbone::t5::T5;
use softprompt::backbone::{Backbone, BackboneInput, KvCache, Prefix};
use softprompt::batch::Padding;
use softprompt::files::load_tensors;
use softprompt::inference::{classify_rows, LoadedAdapter};
use softprompt::model::Model;
use softprompt::prompt::Placement;
use softprompt::prompt_encoder::Method;
use softprompt::task::classify::{ClassificationHead, Pool};
use softprompt::tokenize::Encoded;

const DEV: Device = Device::Cpu;

/// Finite differences of Σ hidden ⊙ R with respect to the prefix's keys and values (every
/// layer's) and to the input embeddings, for two rows: row 0 reads two of its three prefix
/// positions and has padding, row 1 reads all three (a mixed batch's rows differ). An
/// encoder-decoder's `decoder` input [2, T, 16] is what reads the prefix, and hidden is its.
fn check_prefix<B: Backbone>(
    backbone: &B,
    layers: usize,
    kv_width: usize,
    decoder: Option<&Tensor>,
    what: &str,
) {
    let embeds = randn(&[2, 5, 16], 1);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 1, 1]], &DEV).unwrap();
    let types = mask.zeros_like().unwrap();
    let prefix_mask = Tensor::new(&[[1u32, 1, 0], [1, 1, 1]], &DEV).unwrap();
    let kv = randn(&[2, 3, layers * 2 * kv_width], 5);
    let r = randn(decoder.map_or(&[2, 5, 16], |d| d.dims()), 2);
    let hidden = |embeds: &Tensor, kv: &Tensor| {
        let prefix = Prefix {
            kv: kv.clone(),
            mask: prefix_mask.clone(),
        };
        let input = BackboneInput {
            embeds,
            attention_mask: &mask,
            token_type_ids: &types,
            reads: None,
            prefix: Some(&prefix),
            decoder,
        };
        weighted_sum(&backbone.forward(&input).unwrap(), &r)
    };
    let prefix = Prefix {
        kv: kv.clone(),
        mask: prefix_mask.clone(),
    };
    let input = BackboneInput {
        embeds: &embeds,
        attention_mask: &mask,
        token_type_ids: &types,
        reads: None,
        prefix: Some(&prefix),
        decoder,
    };
    let (_, acts) = backbone.forward_train(&input).unwrap();
    let grads = backbone.backward(&r, acts, None).unwrap();
    let d_prefix = grads.prefix.expect("a prefix's gradient");
    check(
        &kv,
        &d_prefix,
        |x| hidden(&embeds, x),
        &format!("{what} prefix"),
    );
    check(
        &embeds,
        &grads.embeds,
        |x| hidden(x, &kv),
        &format!("{what} embeds"),
    );
    // the masked-out prefix position gets no gradient
    let unread = d_prefix.narrow(0, 0, 1).unwrap().narrow(1, 2, 1).unwrap();
    assert_eq!(
        crate::max_abs(&unread),
        0.0,
        "{what}: an unread prefix position moved"
    );
}

#[test]
fn prefix_gradients_match_finite_differences_through_every_layer() {
    on_both_paths(|path| {
        check_prefix(
            &tiny_bert(DType::F64),
            2,
            16,
            None,
            &format!("bert ({path})"),
        );
        for (name, backbone) in tiny_decoders() {
            let shape = backbone.shape();
            let what = format!("{name} ({path})");
            check_prefix(&backbone, shape.layers, shape.kv_width(), None, &what);
        }
    });
}

/// A prompt's keys and values computed alone (`prompt_pass`: where `--prefix-projection false`
/// starts its prefix) are those its rows have in front of an input, [P; X]: at every layer of a
/// decoder, whose prompt never reads X, and at BERT's first layer, before any row has read another.
#[test]
fn a_prompt_alone_has_the_keys_and_values_its_rows_have_in_front_of_an_input() {
    let (prompt, input) = (randn(&[3, 16], 11), randn(&[4, 16], 12));
    let both = Tensor::cat(&[&prompt, &input], 0).unwrap();
    let mut backbones = tiny_decoders();
    backbones.push(("bert", AnyBackbone::Bert(tiny_bert(DType::F64))));
    for (name, backbone) in backbones {
        let shape = backbone.shape();
        let (alone, _) = backbone.prompt_pass(&prompt).unwrap();
        assert_eq!(alone.dims(), [3, shape.prefix_width()], "{name}");
        let (_, acts) = backbone.run_row(&both, true).unwrap();
        let in_front = backbone.keys_values(&acts.unwrap()).unwrap();
        let in_front = in_front.squeeze(0).unwrap().narrow(0, 0, 3).unwrap();
        let columns = match name {
            "bert" => 2 * shape.kv_width(),
            _ => shape.prefix_width(),
        };
        let part = |t: &Tensor| t.narrow(1, 0, columns).unwrap();
        let diff = max_abs_diff(&part(&alone), &part(&in_front));
        assert!(diff < 1e-12, "{name}: {diff:e}");
        if name == "bert" {
            // the second layer's differ: there the prompt's rows have read the input
            let rest = |t: &Tensor| t.narrow(1, columns, columns).unwrap();
            assert!(
                max_abs_diff(&rest(&alone), &rest(&in_front)) > 1e-3,
                "{name}"
            );
        }
    }
}

/// T5's prefix is read by its decoder's self-attention, each block its layer of the prefix
/// (PEFT's doubling: both blocks of the tiny T5 read layer 0), and its gradient comes back from
/// the decoder's positions, which count on from the prefix's under the relative position bias.
#[test]
fn t5_prefix_gradient_matches_finite_differences() {
    let t5 = T5::load(&fixtures().join("tiny-t5"), DType::F64, &DEV).unwrap();
    let decoder = randn(&[2, 4, 16], 3);
    let layers = t5.config.num_layers;
    let kv_width = t5.config.num_heads * t5.config.d_kv;
    check_prefix(&t5, layers, kv_width, Some(&decoder), "t5");

    // PEFT sizes a T5 prefix by the encoder's layers: a decoder of another depth is refused
    let gated = T5::load(&fixtures().join("tiny-t5-gated"), DType::F64, &DEV).unwrap();
    let prefix = Prefix {
        kv: randn(&[1, 2, layers * 2 * kv_width], 6),
        mask: Tensor::ones((1, 2), DType::U32, &DEV).unwrap(),
    };
    let mask = Tensor::ones((1, 5), DType::U32, &DEV).unwrap();
    let input = BackboneInput {
        embeds: &randn(&[1, 5, 16], 7),
        attention_mask: &mask,
        token_type_ids: &mask.zeros_like().unwrap(),
        reads: None,
        prefix: Some(&prefix),
        decoder: Some(&randn(&[1, 2, 16], 8)),
    };
    let error = gated
        .forward(&input)
        .expect_err("a prefix for 2 layers on 3")
        .to_string();
    assert!(
        error.contains("as many decoder layers as encoder layers (3 and 2 here)"),
        "{error}"
    );
}

/// A decoder's rows pass with a prefix computes what generation computes from the same prefix as
/// its cache: the same layout, and the input's positions counted on from the prefix's.
#[test]
fn a_decoder_reads_a_prefix_as_its_cache() {
    for (name, backbone) in tiny_decoders() {
        let shape = backbone.shape();
        let kv = randn(&[3, shape.prefix_width()], 7);
        let embeds = randn(&[4, 16], 8);
        let mask = Tensor::ones((1, 4), DType::U32, &DEV).unwrap();
        let prefix = Prefix {
            kv: kv.unsqueeze(0).unwrap(),
            mask: Tensor::ones((1, 3), DType::U32, &DEV).unwrap(),
        };
        let rows = backbone
            .forward(&BackboneInput {
                embeds: &embeds.unsqueeze(0).unwrap(),
                attention_mask: &mask,
                token_type_ids: &mask.zeros_like().unwrap(),
                reads: None,
                prefix: Some(&prefix),
                decoder: None,
            })
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mut cache = KvCache::from_prefix(&kv, shape.layers, shape.kv_heads).unwrap();
        assert_eq!(cache.len(), 3);
        let cached = backbone
            .decoder()
            .unwrap()
            .extend(&embeds, &mut cache)
            .unwrap();
        let diff = max_abs_diff(&rows, &cached);
        assert!(diff < 1e-10, "{name}: rows pass vs cache {diff:e}");
    }
}

/// PEFT's PREFIX_TUNING adapters for the tiny BERT (written through PEFT's projection MLP: the
/// file holds its output) and the tiny GPT-2 and grouped-query Llama give the reference logits.
#[test]
fn peft_written_prefix_adapters_give_peft_logits() {
    let (reference, meta) = load_tensors(
        &fixtures().join("peft_tiny_prefix_logits.safetensors"),
        &DEV,
    )
    .unwrap();

    let model = Model::load(&fixtures().join("tiny-bert"), DType::F32, &DEV).unwrap();
    let adapter = Adapter::load(&fixtures().join("peft-tiny-prefix-bert"), 16, &DEV).unwrap();
    assert_eq!(adapter.config.peft_type, PeftType::PrefixTuning);
    assert_eq!(adapter.method, Method::Prefix);
    assert!(matches!(
        adapter.head,
        AdapterHead::Linear {
            pool: Pool::Pooler,
            ..
        }
    ));
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let encoder = model.encoder(3, None).unwrap();
    let data: Vec<_> = texts
        .iter()
        .map(|t| encoder.encode(t, None).unwrap())
        .collect();
    let loaded = LoadedAdapter::new(&model, &adapter).unwrap();
    for padding in [Padding::Right, Padding::Left] {
        let rows: Vec<_> = data.iter().map(|e| (&loaded, e)).collect();
        let logits = classify_rows(&model.backbone, &rows, padding, &DEV).unwrap();
        let ours = Tensor::from_vec(logits.concat(), (texts.len(), 2), &DEV).unwrap();
        let err = max_abs_diff(&ours, &reference["bert.logits"]);
        assert!(err < 1e-4, "bert ({padding:?}): logits differ by {err:e}");
    }

    let (ids, mask) = (&reference["ids"], &reference["mask"]);
    let (ids, mask) = (
        ids.to_dtype(DType::U32).unwrap(),
        mask.to_dtype(DType::U32).unwrap(),
    );
    for (name, backbone) in tiny_decoders() {
        let dir = fixtures().join(format!("peft-tiny-prefix-{name}"));
        let adapter = Adapter::load(&dir, 16, &DEV).unwrap();
        adapter.fits(&backbone).unwrap();
        let prefix = adapter.prompt.to_dtype(DType::F64).unwrap();
        let logits = decoder_logits(&backbone, &prefix, &ids, &mask);
        // PEFT's logits at padding positions are not compared: nothing reads them
        let real = mask.to_dtype(DType::F64).unwrap().unsqueeze(2).unwrap();
        let masked = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .broadcast_mul(&real)
                .unwrap()
        };
        let err = max_abs_diff(
            &masked(&logits),
            &masked(&reference[&format!("{name}.logits")]),
        );
        assert!(err < 1e-4, "{name}: logits differ by {err:e}");
    }
}

/// Next-token logits [B, S, V] of ids and mask [B, S] behind a prefix [P, L·2·Hkv·K].
fn decoder_logits(backbone: &AnyBackbone, prefix: &Tensor, ids: &Tensor, mask: &Tensor) -> Tensor {
    let (b, s) = ids.dims2().unwrap();
    let p = prefix.dim(0).unwrap();
    let prefix = Prefix {
        kv: prefix.unsqueeze(0).unwrap().repeat((b, 1, 1)).unwrap(),
        mask: Tensor::ones((b, p), DType::U32, &DEV).unwrap(),
    };
    let hidden = backbone
        .forward(&BackboneInput {
            embeds: &backbone.embed_tokens(ids).unwrap(),
            attention_mask: mask,
            token_type_ids: &mask.zeros_like().unwrap(),
            reads: None,
            prefix: Some(&prefix),
            decoder: None,
        })
        .unwrap();
    let d = hidden.dim(2).unwrap();
    let head = backbone.decoder().unwrap();
    head.lm_head()
        .apply(&hidden.reshape((b * s, d)).unwrap())
        .unwrap()
        .reshape((b, s, ()))
        .unwrap()
}

/// One pass over rows of a prompt adapter and of two prefix adapters of different lengths gives
/// each row the logits it gets in a batch of its own (the server's mixed batches), with either
/// padding.
#[test]
fn a_batch_mixing_prompt_and_prefix_adapters_gives_each_row_its_own_answer() {
    let model = Model::load(&fixtures().join("tiny-bert"), DType::F32, &DEV).unwrap();
    let load = |dir: &str| Adapter::load(&fixtures().join(dir), 16, &DEV).unwrap();
    let prompt = LoadedAdapter::new(&model, &load("peft-tiny-adapter")).unwrap();
    let prefix = LoadedAdapter::new(&model, &load("peft-tiny-prefix-bert")).unwrap();
    let shorter = LoadedAdapter {
        prompt: prefix.prompt.narrow(0, 1, 2).unwrap(),
        placement: prefix.placement,
        head: prefix.head.clone(),
        labels: prefix.labels.clone(),
        template: None,
    };
    let encoder = model.encoder(4, None).unwrap();
    let texts = [
        "a good movie",
        "the plot was dull and boring",
        "i love this great film",
    ];
    let data: Vec<_> = texts
        .iter()
        .map(|t| encoder.encode(t, None).unwrap())
        .collect();
    let rows = [
        (&prefix, &data[0]),
        (&prompt, &data[1]),
        (&shorter, &data[2]),
        (&prompt, &data[0]),
        (&shorter, &data[1]),
        (&prefix, &data[2]),
    ];
    for padding in [Padding::Right, Padding::Left] {
        let mixed = classify_rows(&model.backbone, &rows, padding, &DEV).unwrap();
        for (row, logits) in rows.iter().zip(&mixed) {
            let alone = classify_rows(&model.backbone, &[*row], padding, &DEV).unwrap();
            let diff = logits
                .iter()
                .zip(&alone[0])
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff < 1e-5, "{padding:?}: mixed vs alone {diff:e}");
        }
    }
}

/// On a decoder, an adapter's prompt read once into keys and values (`read_once`) gives every row
/// of a mixed batch, with either padding, the logits of the prompt in front of the row; a head
/// that pools the first vector keeps the prompt in the rows.
#[test]
fn a_decoder_reads_an_adapters_prompt_once() {
    let ids: [&[u32]; 3] = [&[5, 9, 20, 33], &[7, 8], &[11, 12, 13, 14, 15]];
    let data: Vec<Encoded> = ids
        .iter()
        .map(|ids| Encoded {
            ids: ids.to_vec(),
            type_ids: vec![0; ids.len()],
            target_len: 0,
            decoder_ids: Vec::new(),
        })
        .collect();
    for (name, backbone) in tiny_decoders() {
        let adapter = |m: usize, seed: u64, pool: Pool| LoadedAdapter {
            prompt: randn(&[m, 16], seed),
            placement: Placement::Embeddings,
            head: ClassificationHead::from_tensors(
                &randn(&[2, 16], seed + 1),
                &randn(&[2], seed + 2),
                pool,
                None,
            )
            .unwrap(),
            labels: vec!["a".into(), "b".into()],
            template: None,
        };
        let pair = || [adapter(3, 1, Pool::Last), adapter(2, 4, Pool::Mean)];
        let every_row = pair();
        let once = pair().map(|a| a.read_once(&backbone).unwrap());
        assert!(
            once.iter().all(|a| a.placement == Placement::Prefix),
            "{name}"
        );
        let first = adapter(3, 7, Pool::First).read_once(&backbone).unwrap();
        assert_eq!(
            first.placement,
            Placement::Embeddings,
            "{name}: the first vector is read"
        );
        for padding in [Padding::Right, Padding::Left] {
            let rows = |set: &[LoadedAdapter]| -> Vec<Vec<f32>> {
                let rows: Vec<_> = (0..6).map(|i| (&set[i % 2], &data[i % 3])).collect();
                classify_rows(&backbone, &rows, padding, &DEV).unwrap()
            };
            for (a, b) in rows(&every_row).iter().zip(rows(&once).iter()) {
                let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff < 1e-6,
                    "{name} {padding:?}: every row vs once {diff:e}"
                );
            }
        }
    }
}

/// A prefix adapter for another model is refused with both shapes named: the tiny GPT-2's prefix
/// (2 layers of 16-wide keys and values) on the tiny Llama (2 key/value heads of 4).
#[test]
fn a_prefix_for_another_model_names_both_shapes() {
    let adapter = Adapter::load(&fixtures().join("peft-tiny-prefix-gpt2"), 16, &DEV).unwrap();
    let (_, llama) = tiny_decoders().pop().unwrap();
    let err = adapter.fits(&llama).unwrap_err().to_string();
    for part in [
        "64 values a position (num_layers 2 × 2 × token_dim 16)",
        "the model needs 32 (2 layers × 2 × 2 key/value heads × 4)",
    ] {
        assert!(err.contains(part), "{err}");
    }
}
