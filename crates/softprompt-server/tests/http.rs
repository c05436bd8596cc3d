//! The server over real HTTP on a loopback port: endpoints, error codes, and requests for different
//! adapters batched together answering exactly what each gets alone.

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use softprompt::adapter::{Adapter, AdapterHead};
use softprompt::batch::Padding;
use softprompt::inference::{classify_rows, LoadedAdapter};
use softprompt::model::Model;
use softprompt::task::classify::Pool;
use softprompt_server::{AppState, Overlong, ServerConfig};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Three adapters for the tiny model: PEFT's own ("peft"), one with 3 vectors, 3 labels, mean
/// pooling ("three"), and PEFT's prefix-tuning adapter ("prefix": keys and values at every layer).
fn adapters_dir(dir: &Path) {
    let prefix =
        Adapter::load(&fixtures().join("peft-tiny-prefix-bert"), 16, &Device::Cpu).unwrap();
    prefix.save(&dir.join("prefix")).unwrap();
    let peft = Adapter::load(&fixtures().join("peft-tiny-adapter"), 16, &Device::Cpu).unwrap();
    peft.save(&dir.join("peft")).unwrap();
    let mut other = Adapter::load(&fixtures().join("peft-tiny-adapter"), 16, &Device::Cpu).unwrap();
    other.prompt = Tensor::randn(0f32, 1.0, (3, 16), &Device::Cpu).unwrap();
    other.head = AdapterHead::Linear {
        weight: Tensor::randn(0f32, 0.5, (3, 16), &Device::Cpu).unwrap(),
        bias: Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        pool: Pool::Mean,
    };
    other.labels = vec!["x".into(), "y".into(), "z".into()];
    other.config.num_virtual_tokens = 3;
    other.save(&dir.join("three")).unwrap();
    let multitask =
        Adapter::load(&fixtures().join("peft-tiny-multitask"), 16, &Device::Cpu).unwrap();
    multitask.save(&dir.join("multi")).unwrap();
    let p_tuning = Adapter::load(&fixtures().join("peft-tiny-p-tuning"), 16, &Device::Cpu).unwrap();
    p_tuning.save(&dir.join("ptuning")).unwrap();
}

/// Starts a server for the tiny BERT on 127.0.0.1:0 in its own runtime; returns its address.
fn start(config: ServerConfig) -> String {
    start_with(&fixtures().join("tiny-bert"), config)
}

fn start_with(model: &Path, config: ServerConfig) -> String {
    spawn_server(model, config, std::future::pending()).0
}

/// A server that stops when `shutdown` resolves; its thread ends when `serve` returns.
fn spawn_server(
    model: &Path,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    let model = Model::load(model, DType::F32, &Device::Cpu).unwrap();
    let state = AppState::new(model, config).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            softprompt_server::serve(listener, state, shutdown).await;
        });
        runtime.shutdown_timeout(Duration::from_millis(100));
    });
    (address, server)
}

fn config(adapters: &Path, max_wait: Duration) -> ServerConfig {
    ServerConfig {
        adapter_dirs: vec![adapters.to_path_buf()],
        max_wait,
        ..Default::default()
    }
}

/// A bare HTTP/1.1 exchange: (status, JSON body or the text as a JSON string).
fn http(address: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    http_with(address, method, path, body, "")
}

/// `http` with extra header lines, each ending in \r\n.
fn http_with(
    address: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &str,
) -> (u16, Value) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
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
    let address = start(config(tmp.path(), Duration::from_millis(1)));
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
    assert_eq!(names, ["multi", "peft", "prefix", "ptuning", "three"]);
    assert_eq!(list["adapters"][0]["tasks"], json!(["0", "1", "2"]));

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
            "no adapter named",
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
        (
            r#"{"adapter": "multi", "inputs": ["x"]}"#,
            422,
            r#"adapter "multi": a multitask prompt: name one of its tasks in "task" (0, 1, 2)"#,
        ),
        (
            r#"{"adapter": "multi", "task": "7", "inputs": ["x"]}"#,
            422,
            r#"no task "7" (its tasks: 0, 1, 2)"#,
        ),
        (
            r#"{"adapter": "peft", "task": "0", "inputs": ["x"]}"#,
            422,
            r#"it serves one task, and the request names the task "0""#,
        ),
    ];
    for (request, code, message) in cases {
        expect_error(&address, "/v1/classify", request, code, message);
    }
    let (status, metrics) = http(&address, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap();
    for line in [
        "softprompt_requests_total{endpoint=\"/v1/classify\",status=\"404\"} 1",
        "softprompt_requests_total{endpoint=\"/v1/classify\",status=\"200\"} 2",
        "softprompt_request_duration_seconds_bucket{endpoint=\"/v1/classify\",le=\"+Inf\"} 11",
        "softprompt_batch_rows_count 2",
        "softprompt_batch_rows_sum 3",
        "softprompt_queue_depth 0",
        "softprompt_adapters 5",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }

    // the OpenAPI file documents exactly the routes there are
    let (status, api) = http(&address, "GET", "/openapi.json", None);
    assert_eq!(status, 200);
    let documented: Vec<&str> = api["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        documented,
        [
            "/health",
            "/metrics",
            "/openapi.json",
            "/v1/adapters",
            "/v1/adapters/{name}",
            "/v1/classify",
            "/v1/generate"
        ]
    );
    for path in documented.iter().filter(|p| !p.contains('{')) {
        let method = api["paths"][path]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap();
        let (status, _) = http(&address, &method.to_uppercase(), path, Some("{}"));
        assert_ne!(status, 404, "{method} {path} is documented but not served");
    }
}

/// Concurrent requests for different adapters share batches (the server waits 200 ms for company),
/// and each gets what its input gives alone.
#[test]
fn a_mixed_batch_answers_each_request_as_alone() {
    let tmp = tempfile::tempdir().unwrap();
    adapters_dir(tmp.path());
    let mixed = start(config(tmp.path(), Duration::from_millis(200)));
    let unmixed = start(ServerConfig {
        mix_adapters: false,
        ..config(tmp.path(), Duration::from_millis(200))
    });
    let texts = [
        "a good movie",
        "the plot was dull and boring",
        "i love this great film",
        "bad",
    ];
    // two prompts, a P-tuning, a prefix and a multitask adapter's tasks 0 and 2, 12 requests in all
    let adapters = [
        ("peft", None),
        ("three", None),
        ("ptuning", None),
        ("prefix", None),
        ("multi", Some("0")),
        ("multi", Some("2")),
    ];
    let requests: Vec<(&str, Option<&str>, &str)> = (0..12)
        .map(|i| (adapters[i % 6].0, adapters[i % 6].1, texts[i % 4]))
        .collect();
    let (answers, batches) = send_concurrently(&mixed, &requests);
    assert!(
        batches < 12,
        "12 concurrent requests took {batches} batches: nothing was batched"
    );
    let (unmixed_answers, unmixed_batches) = send_concurrently(&unmixed, &requests);
    assert!(
        (5..12).contains(&unmixed_batches),
        "without mixing, 12 requests for 5 adapters took {unmixed_batches} batches"
    );

    let model = Model::load(&fixtures().join("tiny-bert"), DType::F32, &Device::Cpu).unwrap();
    let encoder = model.encoder(4, None).unwrap();
    // every answer of both servers, against its request run alone
    let pairs = requests
        .iter()
        .cycle()
        .zip(answers.iter().chain(&unmixed_answers));
    for ((adapter, task, text), answer) in pairs {
        let loaded = Adapter::load(&tmp.path().join(adapter), 16, &Device::Cpu).unwrap();
        let task = LoadedAdapter::new(&model, &loaded.for_task(*task).unwrap()).unwrap();
        let alone = classify_rows(
            &model.backbone,
            &[(&task, &encoder.encode(text, None).unwrap())],
            Padding::Right,
            &Device::Cpu,
        )
        .unwrap();
        let probs = softprompt::task::classify::softmax(&alone[0]);
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

/// Sends all requests at once, one thread each → (answers in order, batches they took).
fn send_concurrently(address: &str, requests: &[(&str, Option<&str>, &str)]) -> (Vec<Value>, u64) {
    let batches_before = batches(address);
    let answers = std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .map(|(adapter, task, text)| {
                scope.spawn(move || {
                    let mut body = json!({"adapter": adapter, "inputs": [text]});
                    if let Some(task) = task {
                        body["task"] = json!(task);
                    }
                    let body = body.to_string();
                    http(address, "POST", "/v1/classify", Some(&body)).1
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (answers, batches(address) - batches_before)
}

/// POSTs `request` and expects status `code` with a JSON error that contains `message`.
fn expect_error(address: &str, path: &str, request: &str, code: u16, message: &str) {
    let (status, body) = http(address, "POST", path, Some(request));
    assert_eq!(status, code, "{path} {request}: {body}");
    assert!(
        body["error"].as_str().unwrap().contains(message),
        "{path} {request}: {body}"
    );
}

/// Batches formed so far, from /metrics.
fn batches(address: &str) -> u64 {
    let (_, metrics) = http(address, "GET", "/metrics", None);
    metrics
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("softprompt_batch_rows_count "))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn adapters_load_and_unload_while_serving_and_never_from_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let (served, outside) = (tmp.path().join("served"), tmp.path().join("outside"));
    adapters_dir(&outside);
    std::fs::create_dir(&served).unwrap();
    copy_dir(&outside.join("peft"), &served.join("peft"));
    let address = start(config(&served, Duration::from_millis(1)));
    let classify = |adapter: &str| {
        let body = json!({"adapter": adapter, "inputs": ["a good movie"]}).to_string();
        http(&address, "POST", "/v1/classify", Some(&body)).0
    };
    assert_eq!(classify("three"), 404);

    copy_dir(&outside.join("three"), &served.join("three"));
    let (status, body) = http(
        &address,
        "POST",
        "/v1/adapters",
        Some(r#"{"name": "three"}"#),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["labels"], json!(["x", "y", "z"]));
    assert_eq!(classify("three"), 200);
    let cases = [
        (r#"{"name": "three"}"#, 409, "already loaded"),
        (r#"{"name": "absent"}"#, 404, "no adapter named"),
        (
            r#"{"name": "../outside/three"}"#,
            422,
            "not an adapter name",
        ),
        (r#"{"name": ".."}"#, 422, "not an adapter name"),
        (r#"{"name": "/etc"}"#, 422, "not an adapter name"),
        (r#"{"path": "x"}"#, 422, "malformed request"),
    ];
    for (request, code, message) in cases {
        expect_error(&address, "/v1/adapters", request, code, message);
    }
    // a directory that is not an adapter
    std::fs::create_dir(served.join("empty")).unwrap();
    let (status, body) = http(
        &address,
        "POST",
        "/v1/adapters",
        Some(r#"{"name": "empty"}"#),
    );
    assert_eq!(status, 422, "{body}");

    let (status, body) = http(&address, "DELETE", "/v1/adapters/three", None);
    assert_eq!((status, body), (200, json!({"unloaded": "three"})));
    assert_eq!(classify("three"), 404);
    assert_eq!(classify("peft"), 200);
    assert_eq!(http(&address, "DELETE", "/v1/adapters/three", None).0, 404);
    let (_, list) = http(&address, "GET", "/v1/adapters", None);
    assert_eq!(list["adapters"].as_array().unwrap().len(), 1);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn an_api_key_guards_everything_but_health() {
    let tmp = tempfile::tempdir().unwrap();
    adapters_dir(tmp.path());
    let address = start(ServerConfig {
        api_key: Some("s3cret".into()),
        ..config(tmp.path(), Duration::from_millis(1))
    });
    assert_eq!(http(&address, "GET", "/health", None).0, 200);
    for (method, path) in [
        ("GET", "/v1/adapters"),
        ("POST", "/v1/classify"),
        ("POST", "/v1/adapters"),
        ("DELETE", "/v1/adapters/peft"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ] {
        for header in [
            "",
            "Authorization: Bearer wrong\r\n",
            "Authorization: s3cret\r\n",
        ] {
            let (status, body) = http_with(&address, method, path, Some("{}"), header);
            assert_eq!(status, 401, "{method} {path} with {header:?}: {body}");
        }
    }
    let key = "Authorization: Bearer s3cret\r\n";
    assert_eq!(http_with(&address, "GET", "/v1/adapters", None, key).0, 200);
    let body = r#"{"adapter": "peft", "inputs": ["a good movie"]}"#;
    assert_eq!(
        http_with(&address, "POST", "/v1/classify", Some(body), key).0,
        200
    );
}

#[test]
fn limits_answer_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    adapters_dir(tmp.path());
    let address = start(ServerConfig {
        max_body_bytes: 300,
        max_inputs_per_request: 2,
        max_input_tokens: Some(6),
        overlong: Overlong::Reject,
        ..config(tmp.path(), Duration::from_millis(1))
    });
    let cases = [
        (
            json!({"adapter": "peft", "inputs": vec!["good"; 40]}),
            413,
            "the body is over 300 bytes",
        ),
        (
            json!({"adapter": "peft", "inputs": ["a", "b", "c"]}),
            422,
            "at most 2",
        ),
        (
            json!({"adapter": "peft", "inputs": ["good", "a good movie and a great plot"]}),
            422,
            "input 1 has more than 6 tokens",
        ),
    ];
    for (request, code, message) in cases {
        expect_error(
            &address,
            "/v1/classify",
            &request.to_string(),
            code,
            message,
        );
    }
    let (status, body) = http(
        &address,
        "POST",
        "/v1/classify",
        Some(r#"{"adapter": "peft", "inputs": ["good", "a good movie"]}"#),
    );
    assert_eq!(status, 200, "{body}");

    // truncation instead: the long input is answered as its first 6 tokens
    let truncating = start(ServerConfig {
        max_input_tokens: Some(6),
        ..config(tmp.path(), Duration::from_millis(1))
    });
    let long = r#"{"adapter": "three", "inputs": ["a good movie and a great plot"]}"#;
    let (status, body) = http(&truncating, "POST", "/v1/classify", Some(long));
    assert_eq!(status, 200, "{body}");

    // a batch that waits 400 ms: a 50 ms timeout gives 504, and with one slot a second request 429
    let slow = start(ServerConfig {
        request_timeout: Duration::from_millis(50),
        ..config(tmp.path(), Duration::from_millis(400))
    });
    let request = r#"{"adapter": "peft", "inputs": ["good"]}"#;
    let (status, body) = http(&slow, "POST", "/v1/classify", Some(request));
    assert_eq!(status, 504, "{body}");
    assert!(body["error"].as_str().unwrap().contains("within 50 ms"));
    let one_slot = start(ServerConfig {
        max_concurrent_requests: 1,
        ..config(tmp.path(), Duration::from_millis(400))
    });
    std::thread::scope(|scope| {
        let first = scope.spawn(|| http(&one_slot, "POST", "/v1/classify", Some(request)).0);
        std::thread::sleep(Duration::from_millis(100));
        let (status, body) = http(&one_slot, "POST", "/v1/classify", Some(request));
        assert_eq!(status, 429, "{body}");
        assert_eq!(first.join().unwrap(), 200);
    });
}

/// A tiny GPT-2 with the tiny BERT's tokenizer, and two adapters for it: "writer" (PEFT's
/// CAUSAL_LM, a prompt only: it generates) and "critic" (a verbalizer: it classifies and generates).
fn decoder_and_adapters(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("tiny-decoder");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-gpt2").join(f), model.join(f)).unwrap();
    }
    std::fs::copy(
        fixtures().join("tiny-bert/tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    let adapters = dir.join("adapters");
    let mut writer =
        Adapter::load(&fixtures().join("peft-tiny-adapter"), 16, &Device::Cpu).unwrap();
    writer.config.task_type = Some(softprompt::adapter::TaskType::CausalLm);
    writer.config.num_virtual_tokens = 3;
    writer.prompt = Tensor::randn(0f32, 1.0, (3, 16), &Device::Cpu).unwrap();
    writer.head = AdapterHead::Generation;
    writer.labels = Vec::new();
    writer.save(&adapters.join("writer")).unwrap();
    let mut critic = writer;
    critic.head = AdapterHead::Verbalizer {
        words: vec!["bad".into(), "good".into()],
    };
    critic.labels = vec!["negative".into(), "positive".into()];
    critic.template = Some(softprompt::template::Template::parse("{text} it was").unwrap());
    critic.save(&adapters.join("critic")).unwrap();
    (model, adapters)
}

/// Concurrent /v1/generate requests for three adapters (a prompt, PEFT's prefix, a prompt with a
/// template) and two sampling options decode together, a token for all of them a step, and each
/// writes what it writes alone.
#[test]
fn concurrent_generations_decode_together_each_as_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, adapters) = decoder_and_adapters(tmp.path());
    let prefixed =
        Adapter::load(&fixtures().join("peft-tiny-prefix-gpt2"), 16, &Device::Cpu).unwrap();
    prefixed.save(&adapters.join("prefixed")).unwrap();
    let address = start_with(&model_dir, config(&adapters, Duration::from_millis(300)));
    let requests: Vec<Value> = (0..8)
        .map(|i| {
            let adapter = ["writer", "prefixed", "critic"][i % 3];
            let input = [
                "a good movie",
                "the plot was dull",
                "i love this film",
                "bad",
            ][i % 4];
            let temperature = [0.0, 0.8][i % 2];
            json!({
                "adapter": adapter,
                "input": input,
                "max_new_tokens": 4 + i,
                "temperature": temperature,
                "seed": i,
            })
        })
        .collect();
    let steps_before = metric(&address, "softprompt_generation_step_rows_count");
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| {
                let address = &address;
                scope.spawn(move || http(address, "POST", "/v1/generate", Some(&r.to_string())))
            })
            .collect();
        let answers = handles.into_iter().map(|h| h.join().unwrap());
        answers
            .map(|(status, body)| {
                assert_eq!(status, 200, "{body}");
                body
            })
            .collect()
    });
    let steps = metric(&address, "softprompt_generation_step_rows_count") - steps_before;
    let tokens: u64 = answers
        .iter()
        .map(|a| a["tokens"].as_array().unwrap().len() as u64)
        .sum();
    assert!(
        steps < tokens,
        "{tokens} tokens in {steps} steps: nothing was decoded together"
    );

    let model = Model::load(&model_dir, DType::F32, &Device::Cpu).unwrap();
    for (request, answer) in requests.iter().zip(&answers) {
        let adapter = Adapter::load(
            &adapters.join(request["adapter"].as_str().unwrap()),
            16,
            &Device::Cpu,
        )
        .unwrap();
        let alone = softprompt::generate::Continuation::new(
            &model,
            &adapter.prompt,
            adapter.placement(),
            adapter.template.clone(),
        )
        .unwrap()
        .write(
            &model,
            request["input"].as_str().unwrap(),
            &softprompt::generate::SamplingConfig {
                max_new_tokens: request["max_new_tokens"].as_u64().unwrap() as usize,
                temperature: request["temperature"].as_f64().unwrap(),
                seed: request["seed"].as_u64().unwrap(),
                ..Default::default()
            },
            &mut |_| true,
        )
        .unwrap();
        assert_eq!(answer["tokens"], json!(alone.tokens), "{request}");
        assert_eq!(answer["text"], json!(alone.text), "{request}");
    }
}

/// A counter or histogram sum of /metrics.
fn metric(address: &str, name: &str) -> u64 {
    let (_, metrics) = http(address, "GET", "/metrics", None);
    metrics
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[test]
fn generation_over_http_plain_and_streamed() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, adapters) = decoder_and_adapters(tmp.path());
    let address = start_with(
        &model_dir,
        ServerConfig {
            max_new_tokens: 8,
            ..config(&adapters, Duration::from_millis(1))
        },
    );
    let (status, list) = http(&address, "GET", "/v1/adapters", None);
    assert_eq!(status, 200);
    assert_eq!(list["adapters"][0]["can"], json!(["classify", "generate"]));
    assert_eq!(list["adapters"][1]["can"], json!(["generate"]));

    // what the library writes from the same prompt, greedily
    let model = Model::load(&model_dir, DType::F32, &Device::Cpu).unwrap();
    let writer = Adapter::load(&adapters.join("writer"), 16, &Device::Cpu).unwrap();
    let placement = writer.placement();
    let prefix =
        softprompt::generate::prefix_cache(&model.backbone, &writer.prompt, placement).unwrap();
    let encoder = model.encoder(3, None).unwrap();
    let expected = softprompt::generate::generate(
        &model.backbone,
        &encoder,
        &prefix,
        &encoder.encode("a good movie", None).unwrap().ids,
        &model.eos_token_ids,
        &softprompt::generate::SamplingConfig {
            max_new_tokens: 6,
            ..Default::default()
        },
        &mut |_| true,
    )
    .unwrap();

    let request = r#"{"adapter": "writer", "input": "a good movie", "max_new_tokens": 6}"#;
    let (status, body) = http(&address, "POST", "/v1/generate", Some(request));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tokens"], json!(expected.tokens));
    assert_eq!(body["text"], json!(expected.text));

    // streamed: server-sent events whose pieces add up to the text, then a "done" event
    let streamed =
        r#"{"adapter": "writer", "input": "a good movie", "max_new_tokens": 6, "stream": true}"#;
    let (status, body) = http(&address, "POST", "/v1/generate", Some(streamed));
    assert_eq!(status, 200);
    let text = body.as_str().unwrap();
    let data: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(text.contains("event: done"), "{text}");
    let done = data.last().unwrap();
    assert_eq!(done["tokens"], json!(expected.tokens));
    let pieces: String = data[..data.len() - 1]
        .iter()
        .map(|d| d["text"].as_str().unwrap())
        .collect();
    assert_eq!(pieces, expected.text);

    let cases = [
        (
            "/v1/generate",
            r#"{"adapter": "nope", "input": "x"}"#,
            404,
            "no adapter named",
        ),
        (
            "/v1/generate",
            r#"{"adapter": "writer", "input": " "}"#,
            422,
            "empty",
        ),
        (
            "/v1/generate",
            r#"{"adapter": "writer", "input": "x", "max_new_tokens": 9}"#,
            422,
            "over this server's limit of 8",
        ),
        (
            "/v1/generate",
            r#"{"adapter": "writer", "input": "x", "temperature": -1}"#,
            422,
            "temperature",
        ),
        (
            "/v1/classify",
            r#"{"adapter": "writer", "inputs": ["x"]}"#,
            422,
            "has no labels: use /v1/generate",
        ),
    ];
    for (path, request, code, message) in cases {
        expect_error(&address, path, request, code, message);
    }
    // the verbalizer adapter classifies on the same server
    let (status, body) = http(
        &address,
        "POST",
        "/v1/classify",
        Some(r#"{"adapter": "critic", "inputs": ["a good movie"]}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert!(["negative", "positive"].contains(&body["results"][0]["label"].as_str().unwrap()));

    // an encoder model cannot generate
    let bert_adapters = tmp.path().join("bert-adapters");
    adapters_dir(&bert_adapters);
    let bert = start(config(&bert_adapters, Duration::from_millis(1)));
    let (status, body) = http(
        &bert,
        "POST",
        "/v1/generate",
        Some(r#"{"adapter": "peft", "input": "x"}"#),
    );
    assert_eq!(status, 422);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("the model is an encoder"),
        "{body}"
    );
}

/// Loading one adapter from many clients at once: one load wins (201), every other answer is
/// 409 "already loaded" (the name was taken while the others read the files), never 422.
#[test]
fn a_concurrent_double_load_is_a_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let (served, outside) = (tmp.path().join("served"), tmp.path().join("outside"));
    adapters_dir(&outside);
    std::fs::create_dir(&served).unwrap();
    copy_dir(&outside.join("peft"), &served.join("peft"));
    copy_dir(&outside.join("three"), &served.join("three"));
    let address = start(config(&served, Duration::from_millis(1)));
    assert_eq!(http(&address, "DELETE", "/v1/adapters/three", None).0, 200);
    for round in 0..10 {
        let statuses: Vec<(u16, Value)> = std::thread::scope(|scope| {
            let loads: Vec<_> = (0..6)
                .map(|_| {
                    scope.spawn(|| {
                        http(
                            &address,
                            "POST",
                            "/v1/adapters",
                            Some(r#"{"name": "three"}"#),
                        )
                    })
                })
                .collect();
            loads.into_iter().map(|l| l.join().unwrap()).collect()
        });
        let created = statuses.iter().filter(|(s, _)| *s == 201).count();
        assert_eq!(created, 1, "round {round}: {statuses:?}");
        for (status, body) in statuses.iter().filter(|(s, _)| *s != 201) {
            assert_eq!(*status, 409, "round {round}: {body}");
        }
        assert_eq!(http(&address, "DELETE", "/v1/adapters/three", None).0, 200);
    }
}

/// Every body type the API takes or gives has exactly the fields its schema in openapi.json
/// lists, and always carries the ones the schema requires.
#[test]
fn openapi_schemas_match_the_api_types() {
    use softprompt::generate::{FinishReason, Generation};
    use softprompt_server::api::*;
    let document: Value = serde_json::from_str(softprompt_server::routes::OPENAPI).unwrap();
    let schemas = &document["components"]["schemas"];
    let load_schema = &document["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]
        ["application/json"]["schema"];
    let keys = |v: Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let check = |name: &str, schema: &Value, full: Value, minimal: Value| {
        assert_eq!(
            keys(full),
            keys(schema["properties"].clone()),
            "{name}: the type's fields against openapi.json"
        );
        let present = keys(minimal);
        for required in schema["required"].as_array().into_iter().flatten() {
            let required = required.as_str().unwrap();
            assert!(
                present.iter().any(|p| p == required),
                "{name}: {required} is required by openapi.json but can be left out"
            );
        }
    };
    let to = |v: &dyn erased::Json| v.json();
    let error = ErrorBody { error: "x".into() };
    check("Error", &schemas["Error"], to(&error), to(&error));
    let full = AdapterInfo {
        name: "a".into(),
        labels: Some(vec!["x".into()]),
        num_virtual_tokens: 3,
        pool: Some("mean".into()),
        template: Some("{text}".into()),
        can: vec!["classify".into()],
        tasks: Some(vec!["t".into()]),
    };
    let minimal = AdapterInfo {
        labels: None,
        pool: None,
        template: None,
        tasks: None,
        ..full.clone()
    };
    check("Adapter", &schemas["Adapter"], to(&full), to(&minimal));
    let full = ClassifyRequest {
        adapter: Some("a".into()),
        adapters: Some(vec!["a".into()]),
        task: Some("t".into()),
        inputs: vec!["t".into()],
    };
    let minimal = ClassifyRequest {
        adapter: None,
        adapters: None,
        task: None,
        ..full.clone()
    };
    check(
        "ClassifyRequest",
        &schemas["ClassifyRequest"],
        to(&full),
        to(&minimal),
    );
    let full = ClassifyResult {
        label: "x".into(),
        scores: [("x".to_string(), 1.0)].into(),
        members: Some(vec![MemberLabel {
            adapter: "a".into(),
            label: "x".into(),
        }]),
    };
    let minimal = ClassifyResult {
        members: None,
        ..full.clone()
    };
    check(
        "ClassifyResult",
        &schemas["ClassifyResult"],
        to(&full),
        to(&minimal),
    );
    let member = &schemas["ClassifyResult"]["properties"]["members"]["items"];
    let label = MemberLabel {
        adapter: "a".into(),
        label: "x".into(),
    };
    check("ClassifyResult.members", member, to(&label), to(&label));
    let full = GenerateRequest {
        adapter: "a".into(),
        task: Some("t".into()),
        input: "t".into(),
        max_new_tokens: Some(4),
        temperature: 0.0,
        top_k: Some(1),
        top_p: Some(0.5),
        stop: vec![],
        seed: 0,
        stream: false,
    };
    let minimal = GenerateRequest {
        task: None,
        max_new_tokens: None,
        top_k: None,
        top_p: None,
        ..full.clone()
    };
    check(
        "GenerateRequest",
        &schemas["GenerateRequest"],
        to(&full),
        to(&minimal),
    );
    let generation = Generation {
        text: "t".into(),
        tokens: vec![1],
        finish: FinishReason::Length,
    };
    check(
        "Generation",
        &schemas["Generation"],
        to(&generation),
        to(&generation),
    );
    let load = LoadRequest { name: "a".into() };
    check("LoadRequest", load_schema, to(&load), to(&load));
    // the requests refuse what the schema does not list
    let extra = json!({"inputs": ["t"], "adapter": "a", "unknown": 1});
    assert!(serde_json::from_value::<ClassifyRequest>(extra).is_err());
}

/// `serde_json::to_value` behind a trait object, so that one closure takes every body type.
mod erased {
    pub trait Json {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

/// Hostile requests and adapters directories (issue 13, items 1, 3 and 9).
#[test]
fn hostile_requests_are_bounded_and_answered_in_json() {
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    std::fs::create_dir(&served).unwrap();
    adapters_dir(&served);
    // what sits beside adapters and is none: the server still starts
    std::fs::create_dir_all(served.join(".git/objects")).unwrap();
    std::fs::create_dir(served.join("lost+found")).unwrap();
    let outside = tmp.path().join("outside");
    adapters_dir(&outside);
    std::os::unix::fs::symlink(outside.join("three"), served.join("linked")).unwrap();
    let address = start(ServerConfig {
        max_concurrent_requests: 2,
        max_positions_per_request: 120,
        ..config(&served, Duration::from_millis(1))
    });
    let (_, list) = http(&address, "GET", "/v1/adapters", None);
    let names: Vec<&str> = list["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["multi", "peft", "prefix", "ptuning", "three"],
        "a link out of the directory is not served"
    );
    expect_error(
        &address,
        "/v1/adapters",
        r#"{"name": "linked"}"#,
        422,
        "outside the adapters directory",
    );

    // one small request must not cost a thousand backbone rows
    let many = vec!["peft"; 1000];
    let body = json!({"adapters": many, "inputs": vec!["a good movie"; 64]}).to_string();
    expect_error(
        &address,
        "/v1/classify",
        &body,
        422,
        "an ensemble may have at most 16",
    );
    let body = json!({"adapters": vec!["peft"; 8], "inputs": vec!["a good movie"; 64]}).to_string();
    expect_error(
        &address,
        "/v1/classify",
        &body,
        422,
        "a request may cost at most 256",
    );

    // nor may few bytes cost many positions: the budget counts tokens, not rows or bytes
    let body =
        json!({"adapters": ["peft", "peft"], "inputs": vec!["a good movie"; 16]}).to_string();
    expect_error(
        &address,
        "/v1/classify",
        &body,
        422,
        "a request may cost at most 120",
    );

    // slow uploads hold no request slot: with 2 slots, three half-sent bodies lock nobody out
    let slow: Vec<std::net::TcpStream> = (0..3)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(&address).unwrap();
            write!(
                stream,
                "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"ad"
            )
            .unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let body = json!({"adapter": "peft", "inputs": ["a good movie"]}).to_string();
    let (status, answer) = http(&address, "POST", "/v1/classify", Some(&body));
    assert_eq!(status, 200, "{answer}");
    drop(slow);

    // unknown paths and methods answer {"error": ...} like every other error
    let (status, answer) = http(&address, "GET", "/nowhere", None);
    assert_eq!(status, 404);
    assert!(answer["error"].is_string(), "{answer}");
    let (status, answer) = http(&address, "PUT", "/v1/classify", None);
    assert_eq!(status, 405);
    assert!(answer["error"].is_string(), "{answer}");

    // an adapter that does not load is named by its name, not by where the server keeps it
    std::fs::create_dir(served.join("broken")).unwrap();
    std::fs::write(served.join("broken/adapter_config.json"), "{").unwrap();
    let (status, answer) = http(
        &address,
        "POST",
        "/v1/adapters",
        Some(r#"{"name": "broken"}"#),
    );
    assert_eq!(status, 422, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains("broken") && !message.contains(&tmp.path().display().to_string()),
        "{message}"
    );
}

#[test]
fn absurd_server_limits_are_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    adapters_dir(tmp.path());
    for config in [
        config(tmp.path(), Duration::from_secs(3600)),
        ServerConfig {
            request_timeout: Duration::from_secs(1 << 40),
            ..config(tmp.path(), Duration::from_millis(1))
        },
        ServerConfig {
            read_timeout: Duration::ZERO,
            ..config(tmp.path(), Duration::from_millis(1))
        },
        ServerConfig {
            drain_timeout: Duration::from_secs(1 << 20),
            ..config(tmp.path(), Duration::from_millis(1))
        },
    ] {
        let err = config.validate().unwrap_err();
        assert!(format!("{err:#}").contains("at most"), "{err:#}");
    }
}

/// Reads what the server sends until it closes; `None` if it has not closed within `limit`.
fn read_until_closed(stream: &mut std::net::TcpStream, limit: Duration) -> Option<String> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(String::new()),
        Err(_) => None,
    }
}

#[test]
fn slow_clients_get_408_or_lose_their_connection_and_never_hold_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    adapters_dir(tmp.path());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (address, server) = spawn_server(
        &fixtures().join("tiny-bert"),
        ServerConfig {
            read_timeout: Duration::from_millis(400),
            drain_timeout: Duration::from_millis(400),
            max_concurrent_requests: 1,
            ..config(tmp.path(), Duration::from_millis(1))
        },
        async {
            let _ = stopped.await;
        },
    );
    let connect = |opening: &str| {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        stream.write_all(opening.as_bytes()).unwrap();
        stream
    };
    let slow_body = "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"ad";
    let half_header = "GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ";

    // a body that stops coming gets 408 (and never took the one slot meanwhile)
    let mut uploading = connect(slow_body);
    let body = json!({"adapter": "peft", "inputs": ["a good movie"]}).to_string();
    assert_eq!(http(&address, "POST", "/v1/classify", Some(&body)).0, 200);
    let answer = read_until_closed(&mut uploading, Duration::from_secs(5)).expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within 400 ms"), "{answer}");

    // a header that is never finished loses its connection
    let mut heading = connect(half_header);
    assert!(
        read_until_closed(&mut heading, Duration::from_secs(5)).is_some(),
        "a half-sent header kept its connection past the read timeout"
    );

    // shutdown ends within the drain timeout however many clients are stuck half-way
    let stuck: Vec<_> = (0..4)
        .map(|i| connect(if i % 2 == 0 { slow_body } else { half_header }))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let asked = std::time::Instant::now();
    stop.send(()).unwrap();
    server.join().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        asked.elapsed()
    );
    drop(stuck);
}

/// A T5 behind PEFT's SEQ_2_SEQ_LM adapters over HTTP: /v1/generate writes PEFT's greedy tokens
/// (the fixture script's), a prompt's and a multitask prompt's task's requests at once each as
/// alone; /v1/classify refuses the adapter, and with label words beside the same prompt ranks
/// them by PEFT's first decoder logits.
#[test]
fn a_t5_adapter_writes_peft_tokens_over_http() {
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    let peft = Adapter::load(&fixtures().join("peft-tiny-t5"), 16, &Device::Cpu).unwrap();
    peft.save(&adapters.join("t5")).unwrap();
    Adapter::load(&fixtures().join("peft-tiny-t5-multitask"), 16, &Device::Cpu)
        .unwrap()
        .save(&adapters.join("t5-multi"))
        .unwrap();
    let words = ["great", "bad"];
    let ranker = Adapter {
        head: AdapterHead::Verbalizer {
            words: words.map(String::from).to_vec(),
        },
        labels: vec!["up".into(), "down".into()],
        ..peft.clone()
    };
    ranker.save(&adapters.join("t5-ranker")).unwrap();
    let address = start_with(
        &fixtures().join("tiny-t5"),
        config(&adapters, Duration::from_millis(50)),
    );
    // PEFT's greedy tokens on the same inputs (tests/fixtures/peft_tiny_t5.safetensors), and
    // the multitask adapter's task 1's (peft_tiny_t5_multitask.safetensors' generated_1)
    let multi = |row: usize| -> Vec<i64> {
        let (f, _) = softprompt::files::load_tensors(
            &fixtures().join("peft_tiny_t5_multitask.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let tokens = f["generated_1"]
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2::<i64>()
            .unwrap();
        tokens[row][1..]
            .iter()
            .copied()
            .take_while(|&t| t > 1)
            .collect()
    };
    let expected = [
        ("t5", None, "a good movie", vec![14, 14, 34, 57, 14, 14]),
        ("t5", None, "i love this", vec![14, 14, 34, 57, 20, 18]),
        ("t5-multi", Some("1"), "a good movie", multi(0)),
        ("t5-multi", Some("1"), "i love this", multi(2)),
    ];
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = expected
            .iter()
            .map(|(adapter, task, input, _)| {
                let body =
                    json!({"adapter": adapter, "task": task, "input": input, "max_new_tokens": 6})
                        .to_string();
                let address = &address;
                scope.spawn(move || http(address, "POST", "/v1/generate", Some(&body)).1)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (answer, (adapter, _, input, tokens)) in answers.iter().zip(expected) {
        assert_eq!(
            answer["tokens"],
            json!(tokens),
            "{adapter}, {input}: {answer}"
        );
    }
    expect_error(
        &address,
        "/v1/classify",
        r#"{"adapter": "t5", "inputs": ["a good movie"]}"#,
        422,
        "use /v1/generate",
    );

    let (status, body) = http(
        &address,
        "POST",
        "/v1/classify",
        Some(r#"{"adapter": "t5-ranker", "inputs": ["a good movie"]}"#),
    );
    assert_eq!(status, 200, "{body}");
    let model = Model::load(&fixtures().join("tiny-t5"), DType::F32, &Device::Cpu).unwrap();
    let encoder = model.encoder(0, None).unwrap();
    let (f, _) =
        softprompt::files::load_tensors(&fixtures().join("peft_tiny_t5.safetensors"), &Device::Cpu)
            .unwrap();
    let first = f["first_logits"].to_vec2::<f32>().unwrap();
    let logits: Vec<f64> = words
        .iter()
        .map(|w| first[0][encoder.plain_ids(w).unwrap()[0] as usize] as f64)
        .collect();
    let up = 1.0 / (1.0 + (logits[1] - logits[0]).exp());
    let scores = &body["results"][0]["scores"];
    assert!(
        (scores["up"].as_f64().unwrap() - up).abs() < 1e-4,
        "{scores} against PEFT's {up}"
    );
}
