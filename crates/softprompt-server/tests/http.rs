//! The server over real HTTP on a loopback port: endpoints, error codes, and requests for different
//! adapters batched together answering exactly what each gets alone.

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use softprompt::adapter::Adapter;
use softprompt::model::Model;
use softprompt::multitask::{classify_rows, Task};
use softprompt::task::classify::Pool;
use softprompt_server::batcher::{Batcher, BatcherConfig};
use softprompt_server::{registry, router, AppState};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Two adapters for the tiny model: PEFT's own ("peft") and one with 3 vectors, 3 labels, mean pooling.
fn adapters_dir(dir: &Path) {
    let peft = Adapter::load(&fixtures().join("peft-tiny-adapter"), 16, &Device::Cpu).unwrap();
    peft.save(&dir.join("peft")).unwrap();
    let mut other = Adapter::load(&fixtures().join("peft-tiny-adapter"), 16, &Device::Cpu).unwrap();
    other.prompt = Tensor::randn(0f32, 1.0, (3, 16), &Device::Cpu).unwrap();
    other.head_weight = Tensor::randn(0f32, 0.5, (3, 16), &Device::Cpu).unwrap();
    other.head_bias = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    other.labels = vec!["x".into(), "y".into(), "z".into()];
    other.pool = Pool::Mean;
    other.config.num_virtual_tokens = 3;
    other.save(&dir.join("three")).unwrap();
}

/// Starts a server on 127.0.0.1:0 in its own runtime; returns its address.
fn start(adapters: &Path, max_wait: Duration) -> String {
    let model = Model::load(&fixtures().join("tiny-bert"), DType::F32, &Device::Cpu).unwrap();
    let registry = registry::load(&model, &[adapters]).unwrap();
    let longest = registry.values().map(|t| t.prompt_len()).max().unwrap();
    let encoder = Arc::new(model.encoder(longest, None).unwrap());
    let batcher = Arc::new(Batcher::start(
        model.backbone,
        BatcherConfig {
            max_wait,
            ..Default::default()
        },
    ));
    let state = AppState {
        registry: Arc::new(registry),
        encoder,
        batcher,
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, router(state)).await.unwrap();
        });
    });
    address
}

/// A bare HTTP/1.1 exchange: (status, JSON body or the text as a JSON string).
fn http(address: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let text = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    (
        status,
        serde_json::from_str(text).unwrap_or(Value::String(text.into())),
    )
}

#[test]
fn endpoints_and_error_codes() {
    let tmp = tempfile::tempdir().unwrap();
    adapters_dir(tmp.path());
    let address = start(tmp.path(), Duration::from_millis(1));
    assert_eq!(
        http(&address, "GET", "/health", None),
        (200, json!({"status": "ok"}))
    );
    let (status, list) = http(&address, "GET", "/v1/adapters", None);
    assert_eq!(status, 200);
    let names: Vec<&str> = list["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["peft", "three"]);

    let (status, body) = http(
        &address,
        "POST",
        "/v1/classify",
        Some(r#"{"adapter": "three", "inputs": ["a good movie"]}"#),
    );
    assert_eq!(status, 200, "{body}");
    let result = &body["results"][0];
    assert!(["x", "y", "z"].contains(&result["label"].as_str().unwrap()));
    let total: f64 = result["scores"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-5);

    let (status, body) = http(
        &address,
        "POST",
        "/v1/classify",
        Some(r#"{"adapters": ["peft", "peft"], "inputs": ["a good movie"]}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["members"].as_array().unwrap().len(), 2);

    let cases = [
        (
            r#"{"adapter": "nope", "inputs": ["x"]}"#,
            404,
            "unknown adapter",
        ),
        (r#"{"adapter": "peft", "inputs": []}"#, 422, "empty"),
        (
            r#"{"adapter": "peft", "inputs": ["  "]}"#,
            422,
            "input 0 is empty",
        ),
        (
            r#"{"adapter": "peft", "adapters": ["peft"], "inputs": ["x"]}"#,
            422,
            "either",
        ),
        (
            r#"{"adapters": ["peft", "three"], "inputs": ["x"]}"#,
            422,
            "disagree on the labels",
        ),
        (
            r#"{"adapter": "peft", "inputs": ["x"#,
            422,
            "malformed request",
        ),
    ];
    for (request, code, message) in cases {
        let (status, body) = http(&address, "POST", "/v1/classify", Some(request));
        assert_eq!(status, code, "{request}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(message),
            "{request}: {body}"
        );
    }
    let (status, metrics) = http(&address, "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(metrics
        .as_str()
        .unwrap()
        .contains("softprompt_batches_total"));
}

/// Concurrent requests for different adapters share batches (the server waits 200 ms for company),
/// and each gets what its input gives alone.
#[test]
fn a_mixed_batch_answers_each_request_as_alone() {
    let tmp = tempfile::tempdir().unwrap();
    adapters_dir(tmp.path());
    let address = start(tmp.path(), Duration::from_millis(200));
    let texts = [
        "a good movie",
        "the plot was dull and boring",
        "i love this great film",
        "bad",
    ];
    let requests: Vec<(String, &str)> = (0..8)
        .map(|i| (["peft", "three"][i % 2].to_string(), texts[i % 4]))
        .collect();
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .map(|(adapter, text)| {
                let address = &address;
                scope.spawn(move || {
                    let body = json!({"adapter": adapter, "inputs": [text]}).to_string();
                    http(address, "POST", "/v1/classify", Some(&body)).1
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (_, metrics) = http(&address, "GET", "/metrics", None);
    let line = metrics
        .as_str()
        .unwrap()
        .lines()
        .find(|l| l.starts_with("softprompt_batches_total"))
        .unwrap()
        .to_string();
    let batches: u64 = line.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        batches < 8,
        "8 concurrent requests took {batches} batches: nothing was batched"
    );

    let model = Model::load(&fixtures().join("tiny-bert"), DType::F32, &Device::Cpu).unwrap();
    let encoder = model.encoder(4, None).unwrap();
    for ((adapter, text), answer) in requests.iter().zip(&answers) {
        let task = Task::new(
            &model,
            &Adapter::load(&tmp.path().join(adapter), 16, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let alone = classify_rows(
            &model.backbone,
            &[(&task, &encoder.encode(text, None).unwrap())],
            &Device::Cpu,
        )
        .unwrap();
        let probs = softprompt::classifier::softmax(&alone[0]);
        let served = &answer["results"][0]["scores"];
        for (label, p) in task.labels.iter().zip(probs) {
            let got = served[label].as_f64().unwrap();
            assert!(
                (got - p as f64).abs() < 1e-5,
                "{adapter} {text:?} {label}: served {got}, alone {p}"
            );
        }
    }
}
