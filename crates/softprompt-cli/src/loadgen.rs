//! `softprompt loadgen`: a bounded load generator for `softprompt serve`. A fixed number of
//! concurrent clients send classify requests for adapters picked at random, for a fixed time or
//! request count, optionally paced to a fixed rate, and report throughput and latency percentiles.

use crate::output::emit;
use anyhow::{bail, Context};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use softprompt::data::{read_examples, Columns, Labels};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct LoadgenArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Adapters to spread the requests over, at random (repeatable).
    #[arg(long = "adapter", required = true)]
    adapters: Vec<String>,
    /// Texts to send, from the `text` column of a TSV, CSV or JSONL file.
    #[arg(long)]
    data: PathBuf,
    /// Clients, each with one request in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Stop after this many requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Requests per second over all clients (default: as fast as answered).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 1)]
    inputs_per_request: usize,
    #[arg(long, env = "SOFTPROMPT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let texts = read_examples(&args.data, &Columns::default(), Labels::Optional)?
        .into_iter()
        .map(|e| e.text)
        .collect();
    // a day at most: a longer load is a typo, and far larger ones do not fit a Duration
    if !(args.duration > 0.0 && args.duration <= 86_400.0) {
        bail!("--duration must be a number of seconds above 0 and at most 86400 (a day)");
    }
    if args.rate.is_some_and(|r| !(1e-3..=1e6).contains(&r)) {
        bail!("--rate must be between 0.001 and 1000000 requests per second");
    }
    let config = LoadConfig {
        url: args.url,
        adapters: args.adapters,
        texts,
        inputs_per_request: args.inputs_per_request,
        concurrency: args.concurrency,
        duration: Duration::from_secs_f64(args.duration),
        max_requests: args.requests,
        rate: args.rate,
        api_key: args.api_key,
        seed: args.seed,
    };
    let report = tokio::runtime::Runtime::new()?.block_on(drive(&config))?;
    let text = format!(
            "{} requests ({} ok) in {:.1} s: {:.1} inputs/s; latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; errors {:?}\n",
            report.requests,
            report.ok,
            report.seconds,
            report.inputs_per_second,
            report.p50_ms,
            report.p90_ms,
            report.p99_ms,
            report.max_ms,
            report.errors
        );
    emit(args.json, &report, text)?;
    if report.requests > 0 && report.ok == 0 {
        bail!("every one of the {} requests failed", report.requests);
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// the server's base URL, e.g. http://127.0.0.1:8080
    pub url: String,
    /// each request names one of these, picked uniformly at random
    pub adapters: Vec<String>,
    /// each input is one of these, picked uniformly at random
    pub texts: Vec<String>,
    pub inputs_per_request: usize,
    /// clients, each with at most one request in flight
    pub concurrency: usize,
    pub duration: Duration,
    /// stop after this many requests even if time is left
    pub max_requests: Option<usize>,
    /// requests per second over all clients; `None`: as fast as the server answers
    pub rate: Option<f64>,
    pub api_key: Option<String>,
    pub seed: u64,
}

impl LoadConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.adapters.is_empty() || self.texts.is_empty() {
            bail!("the load needs at least one adapter and one text");
        }
        if self.concurrency == 0 || self.inputs_per_request == 0 {
            bail!("concurrency and inputs per request must be at least 1");
        }
        if self.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            bail!("the rate must be a positive number of requests per second");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub requests: usize,
    pub ok: usize,
    /// failed requests by HTTP status ("transport" when there was no answer)
    pub errors: BTreeMap<String, usize>,
    pub seconds: f64,
    /// answered inputs per second
    pub inputs_per_second: f64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Runs the load and reports. Latency is from sending a request to reading its whole answer.
pub async fn drive(config: &LoadConfig) -> anyhow::Result<LoadReport> {
    config.validate()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.concurrency)
        .build()
        .context("cannot build the HTTP client")?;
    let endpoint = format!("{}/v1/classify", config.url.trim_end_matches('/'));
    let issued = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let start = Instant::now();
    let mut clients = Vec::with_capacity(config.concurrency);
    for c in 0..config.concurrency {
        let (client, endpoint, config) = (client.clone(), endpoint.clone(), config.clone());
        let (issued, latencies, errors) = (issued.clone(), latencies.clone(), errors.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(config.seed.wrapping_add(c as u64));
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if config.max_requests.is_some_and(|m| n >= m) {
                    break;
                }
                if let Some(rate) = config.rate {
                    // request n leaves at n / rate, whichever client is free to send it
                    let due = start + Duration::from_secs_f64(n as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                if start.elapsed() >= config.duration {
                    break;
                }
                let adapter = &config.adapters[rng.random_range(0..config.adapters.len())];
                let inputs: Vec<&String> = (0..config.inputs_per_request)
                    .map(|_| &config.texts[rng.random_range(0..config.texts.len())])
                    .collect();
                let mut request = client
                    .post(&endpoint)
                    .json(&serde_json::json!({"adapter": adapter, "inputs": inputs}));
                if let Some(key) = &config.api_key {
                    request = request.bearer_auth(key);
                }
                let sent = Instant::now();
                let outcome = match request.send().await {
                    Ok(response) => {
                        let status = response.status();
                        match response.bytes().await {
                            Ok(_) if status.is_success() => Ok(()),
                            Ok(_) => Err(status.as_u16().to_string()),
                            Err(_) => Err("transport".to_string()),
                        }
                    }
                    Err(_) => Err("transport".to_string()),
                };
                match outcome {
                    Ok(()) => latencies
                        .lock()
                        .expect("no panics while held")
                        .push(sent.elapsed().as_secs_f64() * 1e3),
                    Err(kind) => {
                        *errors
                            .lock()
                            .expect("no panics while held")
                            .entry(kind)
                            .or_default() += 1;
                        // a failing server is not hammered: each client pauses before its next try
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    for client in clients {
        client.await.context("a load client panicked")?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut latencies = std::mem::take(&mut *latencies.lock().expect("clients are done"));
    latencies.sort_by(f64::total_cmp);
    let errors = std::mem::take(&mut *errors.lock().expect("clients are done"));
    let ok = latencies.len();
    let failed: usize = errors.values().sum();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies[rank.clamp(1, latencies.len()) - 1]
    };
    Ok(LoadReport {
        requests: ok + failed,
        ok,
        seconds,
        inputs_per_second: (ok * config.inputs_per_request) as f64 / seconds,
        requests_per_second: ok as f64 / seconds,
        p50_ms: percentile(50.0),
        p90_ms: percentile(90.0),
        p99_ms: percentile(99.0),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        errors,
    })
}
