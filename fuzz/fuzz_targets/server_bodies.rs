//! Request bodies from anyone, through the server's real router (body reading, validation,
//! tokenizing, the batcher, a short decode): every answer is JSON, and none is a 5xx. The first
//! byte picks the route; the rest is the body. The server is the tiny decoder with a generation
//! adapter ("writer") and a verbalizer ("critic"), so every route has something to do.
#![no_main]
use axum::body::Body;
use axum::http::Request;
use candle_core::{DType, Device, Tensor};
use libfuzzer_sys::fuzz_target;
use softprompt::adapter::{Adapter, AdapterHead, TaskType};
use softprompt::model::Model;
use softprompt_server::{AppState, ServerConfig};
use std::sync::OnceLock;
use std::time::Duration;
use tower::ServiceExt;

const ROUTES: [(&str, &str); 4] = [
    ("POST", "/v1/classify"),
    ("POST", "/v1/generate"),
    ("POST", "/v1/adapters"),
    ("DELETE", "/v1/adapters/writer"),
];

struct Server {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = softprompt_fuzz::scratch_dir().join("server");
        let fixtures = softprompt_fuzz::fixtures();
        let model_dir = dir.join("model");
        std::fs::create_dir_all(&model_dir).unwrap();
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(fixtures.join("tiny-gpt2").join(file), model_dir.join(file)).unwrap();
        }
        std::fs::copy(
            fixtures.join("tiny-bert/tokenizer.json"),
            model_dir.join("tokenizer.json"),
        )
        .unwrap();
        let adapters = dir.join("adapters");
        let mut writer =
            Adapter::load(&fixtures.join("peft-tiny-adapter"), 16, &Device::Cpu).unwrap();
        writer.config.task_type = Some(TaskType::CausalLm);
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
        critic.save(&adapters.join("critic")).unwrap();
        let model = Model::load(&model_dir, DType::F32, &Device::Cpu).unwrap();
        let config = ServerConfig {
            adapter_dirs: vec![adapters],
            max_wait: Duration::ZERO,
            max_new_tokens: 8,
            ..ServerConfig::default()
        };
        let state = AppState::new(model, config).unwrap();
        Server {
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
            router: softprompt_server::router(state),
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&choice, body)) = input.split_first() else {
        return;
    };
    let (method, path) = ROUTES[choice as usize % ROUTES.len()];
    let server = server();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .unwrap();
    let (status, bytes) = server.runtime.block_on(async {
        let response = server.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let streamed = response
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, (!streamed).then_some(bytes))
    });
    assert!(!status.is_server_error(), "{status} for {method} {path}");
    if let Some(bytes) = bytes {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {bytes:?}"));
    }
    // a DELETE that worked is undone, so the next input finds the writer again
    if method == "DELETE" && status.is_success() {
        let reload = Request::post("/v1/adapters")
            .body(Body::from(r#"{"name": "writer"}"#))
            .unwrap();
        let response = server
            .runtime
            .block_on(server.router.clone().oneshot(reload))
            .unwrap();
        assert!(response.status().is_success());
    }
});
