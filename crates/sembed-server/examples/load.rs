//! Load benchmark (not a test): offline batch throughput of a model vs the same model behind the
//! HTTP server under concurrent clients, measured in the same run on loopback.
//!
//!     cargo run --release -p sembed-server --example load -- [MODEL_DIR] [CLIENTS] [REQUESTS_PER_CLIENT]
//!
//! MODEL_DIR defaults to the default model (all-MiniLM-L6-v2). Texts are chunks of real Rust code
//! (this repository's sources). Prints texts/s for both, the ratio, and request latency p50/p99.

use sembed::embed::{Embed, EmbedOptions, Embedder};
use sembed_server::{ServedModel, ServerConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn code_chunks(limit: usize) -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut chunks = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for (i, c) in lines.chunks(12).enumerate() {
            if chunks.len() >= limit {
                return chunks;
            }
            // Varied lengths: 4 to 12 lines.
            let take = 4 + (i * 5) % 9;
            chunks.push(c[..take.min(c.len())].join("\n"));
        }
    }
    chunks
}

/// The allocator setup of the `sembed` binary (see crates/sembed-cli/src/main.rs), so that the numbers
/// are the ones users get.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../../sembed-cli/src/mimalloc_options.rs"]
mod mimalloc_options;

fn main() {
    mimalloc_options::tune();
    let args: Vec<String> = std::env::args().collect();
    let dir = match args.get(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => sembed::hub::default_model_dir().expect("default model"),
    };
    let clients: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(16);
    let per_client: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    let model =
        Arc::new(Embedder::load(&dir, sembed::DType::F32, &sembed::device::cpu()).expect("model"));
    let texts = code_chunks(clients * per_client * 4);
    println!(
        "model {} · {} code chunks · {} clients × {} requests of 4 texts",
        dir.display(),
        texts.len(),
        clients,
        per_client
    );

    let t = Instant::now();
    let offline = model.embed(&texts, &EmbedOptions::default()).unwrap();
    let offline_tps = texts.len() as f64 / t.elapsed().as_secs_f64();
    // The same texts in request-sized groups of 64, as the server sees them.
    let t = Instant::now();
    for chunk in texts.chunks(64) {
        model.embed(chunk, &EmbedOptions::default()).unwrap();
    }
    println!(
        "offline in groups of 64: {:8.1} texts/s",
        texts.len() as f64 / t.elapsed().as_secs_f64()
    );
    assert_eq!(offline.len(), texts.len());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (router, state) = sembed_server::build(
            vec![ServedModel {
                name: "m".into(),
                model: model.clone(),
            }],
            ServerConfig::default(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/embed", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(sembed_server::serve(listener, router, state, async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let texts = Arc::new(texts);
        let t = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (client, url, texts) = (client.clone(), url.clone(), texts.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for r in 0..per_client {
                    let start = (c * per_client + r) * 4;
                    let batch = &texts[start..start + 4];
                    let t = Instant::now();
                    let resp = client
                        .post(&url)
                        .json(&serde_json::json!({"inputs": batch, "truncate": true}))
                        .send()
                        .await
                        .unwrap();
                    assert!(resp.status().is_success(), "{}", resp.status());
                    let _: Vec<Vec<f32>> = resp.json().await.unwrap();
                    lat.push(t.elapsed().as_secs_f64());
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let served_tps = (clients * per_client * 4) as f64 / t.elapsed().as_secs_f64();
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize] * 1000.0;
        println!("offline batch : {offline_tps:8.1} texts/s");
        println!(
            "served (HTTP) : {served_tps:8.1} texts/s   ratio served/offline = {:.2}",
            served_tps / offline_tps
        );
        println!(
            "latency       : p50 {:.1} ms   p99 {:.1} ms",
            pct(0.5),
            pct(0.99)
        );
        let metrics = client
            .get(url.replace("/embed", "/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for l in metrics.lines().filter(|l| {
            l.starts_with("sembed_batch_size_sum")
                || l.starts_with("sembed_batch_size_count")
                || l.starts_with("sembed_stage_seconds_sum")
        }) {
            println!("  {l}");
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    });
}
