//! What `GET /metrics` reports, in Prometheus' text format: requests by endpoint and status, their
//! latency, the batches the queue formed (rows and time per batch), and the queue's depth.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    Opts, Registry,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub batch_rows: Histogram,
    pub batch_seconds: Histogram,
    /// jobs queued and not yet in a batch
    pub queue_depth: IntGauge,
    pub adapters: IntGauge,
    /// rows of each decoding step: its count is the steps, its sum the tokens decoded
    pub generation_step_rows: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        // 1 ms … ~65 s
        let seconds = exponential_buckets(0.001, 2.0, 17).expect("valid buckets");
        let requests = IntCounterVec::new(
            Opts::new("softprompt_requests_total", "HTTP requests answered"),
            &["endpoint", "status"],
        )
        .expect("valid metric");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "softprompt_request_duration_seconds",
                "Time from a request's arrival to its answer",
            )
            .buckets(seconds.clone()),
            &["endpoint"],
        )
        .expect("valid metric");
        let batch_rows = Histogram::with_opts(
            HistogramOpts::new(
                "softprompt_batch_rows",
                "Rows per batch the queue formed (run as backbone passes of similar lengths)",
            )
            .buckets(exponential_buckets(1.0, 2.0, 10).expect("valid buckets")),
        )
        .expect("valid metric");
        let batch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "softprompt_batch_duration_seconds",
                "Time to answer one batch",
            )
            .buckets(seconds),
        )
        .expect("valid metric");
        let queue_depth = IntGauge::new("softprompt_queue_depth", "Requests waiting for a batch")
            .expect("valid metric");
        let adapters =
            IntGauge::new("softprompt_adapters", "Adapters loaded").expect("valid metric");
        let generation_step_rows = Histogram::with_opts(
            HistogramOpts::new(
                "softprompt_generation_step_rows",
                "Texts decoded together in one step (one token each, one backbone pass)",
            )
            .buckets(exponential_buckets(1.0, 2.0, 10).expect("valid buckets")),
        )
        .expect("valid metric");
        for metric in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(batch_rows.clone()),
            Box::new(batch_seconds.clone()),
            Box::new(queue_depth.clone()),
            Box::new(adapters.clone()),
            Box::new(generation_step_rows.clone()),
        ] {
            registry.register(metric).expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            request_seconds,
            batch_rows,
            batch_seconds,
            queue_depth,
            adapters,
            generation_step_rows,
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("writing to memory does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
