//! The real server on a loopback port: every route, every bad input, auth, batching under concurrent
//! load, overload and recovery, client disconnects, graceful shutdown. Served vectors are compared
//! with the offline `Embedder` for the same texts and options.

use sembed::embed::{Embed, EmbedOptions, Embedder, Fusion, InputRole};
use sembed_server::{AppState, ServedModel, ServerConfig};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn fixture(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(model)
}

fn embedder(model: &str) -> Embedder {
    Embedder::load(&fixture(model), sembed::DType::F32, &sembed::device::cpu()).unwrap()
}

fn fusion() -> Fusion {
    Fusion::new(
        "code",
        vec![
            (
                Box::new(embedder("qwen2-bidir-tiny")) as Box<dyn Embed>,
                1.0,
            ),
            (Box::new(embedder("jina-v3-tiny")), 1.0),
        ],
    )
    .unwrap()
}

struct Server {
    url: String,
    state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(config: ServerConfig) -> Server {
    let models = vec![
        ServedModel {
            name: "bert".into(),
            model: Arc::new(embedder("bert-tiny")),
        },
        ServedModel {
            name: "jina".into(),
            model: Arc::new(embedder("jina-v3-tiny")),
        },
        ServedModel {
            name: "code".into(),
            model: Arc::new(fusion()),
        },
    ];
    let (router, state) = sembed_server::build(models, config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(sembed_server::serve(
        listener,
        router,
        state.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    Server {
        url,
        state,
        stop: Some(tx),
        done,
    }
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.done)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = client().post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn get_json(url: &str) -> Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn offline(model: &dyn Embed, texts: &[&str], opts: EmbedOptions) -> Vec<Vec<f32>> {
    let texts: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
    model.embed(&texts, &opts).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_like_the_offline_embedder() {
    let s = start(ServerConfig::default()).await;
    let bert = embedder("bert-tiny");
    let jina = embedder("jina-v3-tiny");
    let texts = [
        "fn main() {}",
        "def add(a, b): return a + b",
        "binary search",
    ];

    let health = client()
        .get(format!("{}/health", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // OpenAI, float and base64.
    let (st, v) = post(
        &format!("{}/v1/embeddings", s.url),
        json!({"input": texts, "model": "bert"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "bert");
    let want = offline(&bert, &texts, EmbedOptions::default());
    assert_eq!(v["data"].as_array().unwrap().len(), texts.len(), "{v}");
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["object"], "embedding");
        assert!(max_abs(&floats(&d["embedding"]), &want[i]) <= 1e-6);
    }
    // Usage: the tokens /tokenize lists (another code path: the tokenizer's own token strings).
    let (st, tk) = post(
        &format!("{}/tokenize", s.url),
        json!({"inputs": texts, "model": "bert"}),
    )
    .await;
    assert_eq!(st, 200, "{tk}");
    let tokens: usize = tk
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_array().unwrap().len())
        .sum();
    assert!(tokens > texts.len() * 2);
    assert_eq!(v["usage"]["prompt_tokens"], tokens);
    assert_eq!(v["usage"]["total_tokens"], tokens);
    let (_, b) = post(
        &format!("{}/v1/embeddings", s.url),
        json!({"input": texts[0], "model": "bert", "encoding_format": "base64"}),
    )
    .await;
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(
        max_abs(
            &decoded,
            &offline(&bert, &texts[..1], EmbedOptions::default())[0]
        ) <= 1e-6
    );

    // OpenAI with input_type and dimensions on the Matryoshka model.
    let (st, v) = post(
        &format!("{}/v1/embeddings", s.url),
        json!({"input": texts, "model": "jina", "input_type": "query", "dimensions": 16}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let want = offline(
        &jina,
        &texts,
        EmbedOptions {
            role: Some(InputRole::Query),
            dimensions: Some(16),
            ..Default::default()
        },
    );
    assert_eq!(v["data"].as_array().unwrap().len(), texts.len(), "{v}");
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        assert!(max_abs(&floats(&d["embedding"]), &want[i]) <= 1e-6);
    }

    // TEI with every option.
    let (st, v) = post(
        &format!("{}/embed", s.url),
        json!({"inputs": texts, "model": "jina", "prompt_name": "retrieval.passage", "normalize": false, "dimensions": 8, "truncate": true, "truncation_direction": "Left"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let want = offline(
        &jina,
        &texts,
        EmbedOptions {
            task: Some("retrieval.passage".into()),
            normalize: false,
            dimensions: Some(8),
            truncate_left: Some(true),
            ..Default::default()
        },
    );
    assert_eq!(v.as_array().unwrap().len(), want.len(), "{v}");
    for (i, row) in v.as_array().unwrap().iter().enumerate() {
        assert!(max_abs(&floats(row), &want[i]) <= 1e-6);
    }

    // The fusion by name.
    let (st, v) = post(
        &format!("{}/v1/embeddings", s.url),
        json!({"input": texts, "model": "code", "input_type": "document"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let want = offline(
        &fusion(),
        &texts,
        EmbedOptions {
            role: Some(InputRole::Document),
            ..Default::default()
        },
    );
    assert_eq!(v["data"].as_array().unwrap().len(), texts.len(), "{v}");
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(d["embedding"].as_array().unwrap().len(), 80);
        assert!(max_abs(&floats(&d["embedding"]), &want[i]) <= 1e-6);
    }

    // Tokenize, info, metrics.
    let (st, v) = post(
        &format!("{}/tokenize", s.url),
        json!({"inputs": ["fn main"], "model": "bert"}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        v[0][0],
        json!({"id": 101, "text": "[CLS]", "special": true})
    );
    let info: Value = get_json(&format!("{}/info", s.url)).await;
    assert_eq!(info["models"].as_array().unwrap().len(), 3);
    // The OpenAPI document lists every route.
    let doc: Value = get_json(&format!("{}/openapi.json", s.url)).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/{id}",
        "/embed",
        "/tokenize",
        "/health",
        "/info",
        "/metrics",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from /openapi.json"
        );
    }
    let req = &doc["components"]["schemas"]["OpenAiEmbeddingsRequest"]["properties"];
    assert!(req["input"].is_object());
    // `model` lists the served models (and null: the default).
    assert_eq!(req["model"]["enum"], json!(["bert", "jina", "code", null]));
    // OpenAI's model list names the same models, each also readable alone.
    let list: Value = get_json(&format!("{}/v1/models", s.url)).await;
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let names: Vec<&str> = info["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(ids, names);
    let one: Value = get_json(&format!("{}/v1/models/{}", s.url, ids[1])).await;
    assert_eq!(
        (one["id"].as_str(), one["object"].as_str()),
        (Some(ids[1]), Some("model"))
    );
    assert!(one["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(info["models"][2]["dimension"], 80);
    assert_eq!(info["models"][0]["engine"], "fast-f32");
    assert_eq!(info["models"][2]["engine"], "fast-f32+fast-f32");
    let reasons = info["models"][2]["engine_reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0]
        .as_str()
        .unwrap()
        .contains("fast-f32: the fastest engine"));
    // The CPU kernels in force, named as SEMBED_CPU_KERNELS names them (detected here: the test
    // process may have it set, and then that one).
    let kernels = sembed::fast::cpu::check().unwrap();
    assert_eq!(info["cpu"]["kernels"], kernels.name());
    assert!(info["cpu"]["int8_kernel"]
        .as_str()
        .unwrap()
        .starts_with(kernels.name()));
    assert!(info["cpu"]["bf16_kernel"]
        .as_str()
        .unwrap()
        .starts_with(kernels.name()));
    let metrics = client()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for m in [
        "sembed_requests_total{outcome=\"ok\"}",
        "sembed_batch_size_count",
        "sembed_batch_tokens_sum",
        "sembed_stage_seconds_bucket{stage=\"inference\"",
        "sembed_stage_seconds_count{stage=\"tokenize\"}",
        "sembed_queue_texts{model=\"bert\"}",
    ] {
        assert!(metrics.contains(m), "{m} missing from\n{metrics}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_4xx_with_json_errors_and_nothing_else_breaks() {
    let s = start(ServerConfig {
        max_client_batch_size: 4,
        max_body_bytes: 4096,
        ..Default::default()
    })
    .await;
    let oa = format!("{}/v1/embeddings", s.url);
    let tei = format!("{}/embed", s.url);
    let long = "word ".repeat(300);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            &oa,
            serde_json::to_vec(&json!({"input": "x".repeat(5000)})).unwrap(),
            413,
            "too large",
        ),
        (
            &oa,
            serde_json::to_vec(&json!({"input": ["a", "b", "c", "d", "e"]})).unwrap(),
            400,
            "limit of 4",
        ),
        (
            &tei,
            serde_json::to_vec(&json!({"inputs": ["a", "b", "c", "d", "e"]})).unwrap(),
            422,
            "limit of 4",
        ),
        (
            &oa,
            serde_json::to_vec(&json!({"input": []})).unwrap(),
            400,
            "empty list",
        ),
        (
            &tei,
            serde_json::to_vec(&json!({"inputs": ["ok", ""]})).unwrap(),
            422,
            "input 1 is an empty string",
        ),
        (
            &tei,
            serde_json::to_vec(&json!({"inputs": [long.clone()], "truncate": false})).unwrap(),
            422,
            "truncation is off",
        ),
        (
            &oa,
            serde_json::to_vec(&json!({"input": [long.clone()]})).unwrap(),
            400,
            "truncation is off",
        ),
        (
            &oa,
            serde_json::to_vec(&json!({"input": 5})).unwrap(),
            400,
            "`input` must be",
        ),
        (
            &oa,
            serde_json::to_vec(&json!({"input": [1, 2]})).unwrap(),
            400,
            "token-id inputs",
        ),
        (
            &tei,
            serde_json::to_vec(&json!({"inputs": "x", "dimensions": "8"})).unwrap(),
            422,
            "`dimensions` must be",
        ),
        (
            &oa,
            serde_json::to_vec(&json!(["not", "an", "object"])).unwrap(),
            400,
            "JSON object",
        ),
        (
            &oa,
            b"{\"input\": \"unterminated".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            &tei,
            b"{\"inputs\": \"\xff\xfe\"}".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            &oa,
            serde_json::to_vec(&json!({"input": "x", "model": "gpt-9"})).unwrap(),
            404,
            "unknown model `gpt-9`",
        ),
        (
            &tei,
            serde_json::to_vec(&json!({"inputs": "x", "model": "jina", "prompt_name": "poem"}))
                .unwrap(),
            422,
            "unknown prompt name `poem`",
        ),
        (
            &tei,
            serde_json::to_vec(&json!({"inputs": "x", "dimensions": 8})).unwrap(),
            422,
            "not a Matryoshka model",
        ),
        (
            &oa,
            serde_json::to_vec(&json!({"input": "x", "encoding_format": "hex"})).unwrap(),
            400,
            "encoding_format",
        ),
        (
            &oa,
            serde_json::to_vec(&json!({"input": "x", "input_type": "poem"})).unwrap(),
            400,
            "input type `poem`",
        ),
        (
            &tei,
            serde_json::to_vec(&json!({"inputs": "x", "model": "code", "dimensions": 8})).unwrap(),
            422,
            "fusion",
        ),
    ];
    for (url, body, status, needle) in cases {
        let r = client()
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{url} {needle}");
        let v: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{needle}: body is not JSON: {e}"));
        let msg = if url.ends_with("/v1/embeddings") {
            // OpenAI's error object, and its status rule: every invalid request is 400 (413 for
            // size, 404 for an unknown model), never 422.
            assert_eq!(v["error"]["type"], "invalid_request_error", "{needle}: {v}");
            assert!(v["error"]["code"].is_string() && v["error"].get("param").is_some());
            assert_ne!(status, 422, "{needle}");
            v["error"]["message"].clone()
        } else {
            v["error"].clone()
        };
        assert!(msg.as_str().unwrap().contains(needle), "{needle}: {v}");
    }
    let r = client()
        .post(format!("{}/nope", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("/nope"),
        "TEI body: {v}"
    );
    // Under /v1/ every error has OpenAI's body: unknown route, wrong method, unknown model.
    for (method, path, status) in [
        (reqwest::Method::POST, "/v1/nope", 404),
        (reqwest::Method::GET, "/v1/embeddings", 405),
        (reqwest::Method::GET, "/v1/models/no-such-model", 404),
    ] {
        let r = client()
            .request(method.clone(), format!("{}{path}", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{method} {path}: {v}");
    }
    // Still healthy and serving.
    assert_eq!(
        client()
            .get(format!("{}/health", s.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (st, _) = post(&oa, json!({"input": "fine"})).await;
    assert_eq!(st, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_everything_but_health() {
    let s = start(ServerConfig {
        api_key: Some("s3cret".into()),
        ..Default::default()
    })
    .await;
    let c = client();
    assert_eq!(
        c.get(format!("{}/health", s.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for path in ["/info", "/metrics"] {
        assert_eq!(
            c.get(format!("{}{path}", s.url))
                .send()
                .await
                .unwrap()
                .status(),
            401
        );
    }
    let r = c
        .post(format!("{}/v1/embeddings", s.url))
        .json(&json!({"input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("API key"));
    let r = c
        .post(format!("{}/embed", s.url))
        .bearer_auth("wrong")
        .json(&json!({"inputs": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{}/embed", s.url))
        .bearer_auth("s3cret")
        .json(&json!({"inputs": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}

/// 64 clients × 20 requests of mixed sizes and models, bounded in time: every response correct and
/// in order, none lost, no 5xx; the batcher must actually have grouped requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_correct_vectors() {
    let s = start(ServerConfig::default()).await;
    let bert = Arc::new(embedder("bert-tiny"));
    let corpus: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "fn f{i}(x: u32) -> u32 {{ x * {i} + {} }} // {}",
                i * 7,
                "pad ".repeat(i % 13)
            )
        })
        .collect();
    let want = Arc::new(bert.embed(&corpus, &EmbedOptions::default()).unwrap());
    let corpus = Arc::new(corpus);
    let url = format!("{}/v1/embeddings", s.url);
    let c = client();
    let work = async {
        let mut tasks = Vec::new();
        for client_id in 0..64usize {
            let (c, url, corpus, want) = (c.clone(), url.clone(), corpus.clone(), want.clone());
            tasks.push(tokio::spawn(async move {
                for r in 0..20usize {
                    let n = 1 + (client_id + r) % 5;
                    let idx: Vec<usize> = (0..n)
                        .map(|k| (client_id * 7 + r * 3 + k) % corpus.len())
                        .collect();
                    let input: Vec<&String> = idx.iter().map(|&i| &corpus[i]).collect();
                    let resp = c
                        .post(&url)
                        .json(&json!({"input": input, "model": "bert"}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 200, "client {client_id} request {r}");
                    let v: Value = resp.json().await.unwrap();
                    let data = v["data"].as_array().unwrap();
                    assert_eq!(data.len(), n);
                    for (k, d) in data.iter().enumerate() {
                        assert_eq!(d["index"], k);
                        let got = floats(&d["embedding"]);
                        let diff = max_abs(&got, &want[idx[k]]);
                        assert!(
                            diff <= 1e-5,
                            "client {client_id} request {r} item {k}: {diff}"
                        );
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(240), work)
        .await
        .expect("load test finished in time");
    let metrics = client()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = metric(&metrics, "sembed_batch_size_count");
    let sum = metric(&metrics, "sembed_batch_size_sum");
    assert!(
        sum / count > 1.0,
        "requests were batched together: {sum} texts in {count} batches"
    );
    assert_eq!(
        metric(&metrics, "sembed_requests_total{outcome=\"ok\"}"),
        64.0 * 20.0
    );
    s.stop().await;
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("{name} not in metrics"))
}

/// With the workers paused the queue fills and further requests get 429 at once; after resuming,
/// every admitted request completes and new ones succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gives_429_then_recovers() {
    let s = start(ServerConfig {
        max_queue_texts: 8,
        ..Default::default()
    })
    .await;
    s.state.set_paused(true);
    let url = format!("{}/embed", s.url);
    let mut admitted = Vec::new();
    let mut refused = 0;
    let mut queued = 0.0;
    for i in 0..20 {
        let c = client();
        let url = url.clone();
        let h = tokio::spawn(async move {
            c.post(&url)
                .json(&json!({"inputs": ["a", "b"], "model": "bert"}))
                .send()
                .await
                .unwrap()
        });
        // Wait until the request is either answered (refused) or visibly queued: no timing guesses.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "request {i} neither queued nor refused"
            );
            if h.is_finished() {
                let r = h.await.unwrap();
                assert_eq!(r.status(), 429, "request {i}");
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error_type"], "overloaded");
                refused += 1;
                break;
            }
            let m = client()
                .get(format!("{}/metrics", s.url))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let now = metric(&m, "sembed_queue_texts{model=\"bert\"}");
            if now > queued {
                queued = now;
                admitted.push(h);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(admitted.len(), 4, "8 texts of queue = 4 requests of 2");
    assert_eq!(refused, 16);
    s.state.set_paused(false);
    for h in admitted {
        assert_eq!(h.await.unwrap().status(), 200);
    }
    let (st, _) = post(&url, json!({"inputs": ["again"]})).await;
    assert_eq!(st, 200);
    s.stop().await;
}

/// A client that gives up while queued costs no forward pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_clients_are_dropped_from_the_queue() {
    let s = start(ServerConfig::default()).await;
    s.state.set_paused(true);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let r = impatient
        .post(format!("{}/embed", s.url))
        .json(&json!({"inputs": ["bye"]}))
        .send()
        .await;
    assert!(r.is_err(), "timed out client side");
    // Give the server a moment to see the closed connection and drop the handler.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.state.set_paused(false);
    let (st, _) = post(&format!("{}/embed", s.url), json!({"inputs": ["hello"]})).await;
    assert_eq!(st, 200);
    let metrics = client()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&metrics, "sembed_requests_total{outcome=\"cancelled\"}"),
        1.0
    );
    // Warm-up is not counted; only the second request reached the model.
    assert_eq!(metric(&metrics, "sembed_batch_size_count"), 1.0);
    s.stop().await;
}

/// Shutdown waits for in-flight requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let s = start(ServerConfig::default()).await;
    s.state.set_paused(true);
    let c = client();
    let url = format!("{}/embed", s.url);
    let pending = tokio::spawn(async move {
        c.post(&url)
            .json(&json!({"inputs": ["last words"]}))
            .send()
            .await
            .unwrap()
            .status()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let state = s.state.clone();
    let stopping = tokio::spawn(s.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!stopping.is_finished(), "waits for the request");
    state.set_paused(false);
    assert_eq!(pending.await.unwrap(), 200);
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .unwrap()
        .unwrap();
}

/// A model that panics on demand: in its next forward pass, or when asked to give back memory (which
/// the worker does outside any forward pass, after idling: a panic there kills the worker).
struct Flaky {
    inner: Embedder,
    panic_in_forward: std::sync::atomic::AtomicBool,
    panic_in_release: std::sync::atomic::AtomicBool,
}

impl Embed for Flaky {
    fn encode(
        &self,
        texts: &[String],
        opts: &EmbedOptions,
    ) -> sembed::Result<sembed::embed::Encoded> {
        self.inner.encode(texts, opts)
    }
    fn embed_encoded(
        &self,
        encoded: &sembed::embed::Encoded,
        opts: &EmbedOptions,
        stages: &mut sembed::embed::Stages,
    ) -> sembed::Result<Vec<Vec<f32>>> {
        if self
            .panic_in_forward
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("injected panic in a forward pass");
        }
        self.inner.embed_encoded(encoded, opts, stages)
    }
    fn release_memory(&self) {
        if self
            .panic_in_release
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("injected panic in the worker loop");
        }
        self.inner.release_memory()
    }
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }
    fn engine(&self) -> String {
        self.inner.engine()
    }
    fn engine_reasons(&self) -> Vec<String> {
        self.inner.engine_reasons()
    }
    fn name(&self) -> &str {
        "flaky"
    }
    fn knows_task(&self, task: &str) -> bool {
        self.inner.knows_task(task)
    }
    fn max_length(&self) -> usize {
        self.inner.max_length()
    }
    fn task_names(&self) -> Vec<String> {
        self.inner.task_names()
    }
}

/// A panic in a forward pass answers that request with a 500 JSON error and the worker goes on; a
/// worker that dies anyway is restarted, and /health says 503 until it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_model_is_contained_and_a_dead_worker_restarted() {
    let flaky = Arc::new(Flaky {
        inner: embedder("bert-tiny"),
        panic_in_forward: false.into(),
        panic_in_release: false.into(),
    });
    let models = vec![ServedModel {
        name: "flaky".into(),
        model: flaky.clone(),
    }];
    let (router, state) = sembed_server::build(models, ServerConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(sembed_server::serve(listener, router, state, async move {
        let _ = rx.await;
    }));
    let health = || async {
        client()
            .get(format!("{url}/health"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let embed_url = format!("{url}/embed");
    let embed = || post(&embed_url, json!({"inputs": ["fn main() {}"]}));

    flaky
        .panic_in_forward
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (st, v) = embed().await;
    assert_eq!(st, 500, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("injected panic"),
        "{v}"
    );
    let (st, v) = embed().await;
    assert_eq!(st, 200, "the worker goes on: {v}");
    assert_eq!(health().await, 200);

    // The worker gives memory back after idling (5 s): a panic there kills it.
    flaky
        .panic_in_release
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut saw_down, mut back) = (false, false);
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(15) {
        match health().await {
            503 => saw_down = true,
            200 if saw_down => {
                back = true;
                break;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_down && back, "down {saw_down}, back {back}");
    let (st, v) = embed().await;
    assert_eq!(st, 200, "the restarted worker serves: {v}");
    let metrics = client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric(&metrics, "sembed_model_panics_total"), 1.0);
    assert_eq!(metric(&metrics, "sembed_worker_restarts_total"), 1.0);
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(30), done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
