//! Prometheus metrics: requests by outcome, queue size, batch sizes and tokens, latency by stage,
//! model panics and worker restarts.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub queue_size: IntGaugeVec,
    pub batch_size: Histogram,
    pub batch_tokens: Histogram,
    pub stage_seconds: HistogramVec,
    /// Forward passes that panicked (their requests got a 500; the worker went on).
    pub model_panics: IntCounter,
    /// Model workers that died and were restarted.
    pub worker_restarts: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("sembed_requests_total", "Requests by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let queue_size = IntGaugeVec::new(
            Opts::new("sembed_queue_texts", "Texts waiting in the batching queue"),
            &["model"],
        )
        .expect("valid metric");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("sembed_batch_size", "Texts per forward batch").buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
            ]),
        )
        .expect("valid metric");
        let batch_tokens = Histogram::with_opts(
            HistogramOpts::new("sembed_batch_tokens", "Tokens per forward batch")
                .buckets(prometheus::exponential_buckets(16.0, 2.0, 12).expect("valid buckets")),
        )
        .expect("valid metric");
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "sembed_stage_seconds",
                "Latency by stage (tokenize, queue, inference, total)",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets")),
            &["stage"],
        )
        .expect("valid metric");
        let model_panics = IntCounter::new(
            "sembed_model_panics_total",
            "Forward passes that panicked (answered with 500; the worker went on)",
        )
        .expect("valid metric");
        let worker_restarts = IntCounter::new(
            "sembed_worker_restarts_total",
            "Model workers that died and were restarted",
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(model_panics.clone()),
            Box::new(worker_restarts.clone()),
            Box::new(queue_size.clone()),
            Box::new(batch_size.clone()),
            Box::new(batch_tokens.clone()),
            Box::new(stage_seconds.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Metrics {
            registry,
            requests,
            queue_size,
            batch_size,
            batch_tokens,
            stage_seconds,
            model_panics,
            worker_restarts,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
