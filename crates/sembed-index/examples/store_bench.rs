//! Search latency and recall of a store at scale, on random unit vectors (the store's part of a code
//! search; the model's part is measured by `sembed bench`).
//!
//! `cargo run --release -p sembed-index --example store_bench -- --n 100000 --dim 384 \
//!     [--store sqlite|pg] [--pg postgres://…] [--queries 300] [--k 10] [--dir DIR] \
//!     [--data uniform|clustered]`
//!
//! `uniform` vectors are spread evenly over the sphere: no structure at all, the hardest case for any
//! graph index (a point's nearest neighbours are barely nearer than the rest). `clustered` vectors lie
//! around 2,000 random centres (cosine ≈ 0.2 to their centre's other points), closer to how embeddings
//! of real text gather by topic.
//!
//! Fills the store with N rows (1,000 per file, one transaction each), builds its search structure
//! (the HNSW graph: usearch beside SQLite, pgvector's index in PostgreSQL), then times Q searches of
//! random unit queries and checks their recall@k against exact search done here in memory.
//! Prints one JSON object. `--reuse` keeps a SQLite file of an earlier run with the same arguments
//! (the same seeded vectors) instead of filling and building again.

use sembed_index::store::{self, Filter, Store};
use std::time::Instant;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn unit(rng: &mut sembed::rng::SplitMix64, d: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..d)
        .map(|_| {
            let (a, b) = (rng.next_f64().max(1e-12), rng.next_f64());
            ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
        })
        .collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// A point near one of `centres` (or anywhere, without centres).
fn point(rng: &mut sembed::rng::SplitMix64, d: usize, centres: &[Vec<f32>]) -> Vec<f32> {
    let e = unit(rng, d);
    if centres.is_empty() {
        return e;
    }
    let c = &centres[(rng.next_u64() % centres.len() as u64) as usize];
    let v: Vec<f32> = c.iter().zip(&e).map(|(a, b)| a + 2.0 * b).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let n: usize = arg("--n", "100000").parse().unwrap();
    let d: usize = arg("--dim", "384").parse().unwrap();
    let q: usize = arg("--queries", "300").parse().unwrap();
    let k: usize = arg("--k", "10").parse().unwrap();
    let kind = arg("--store", "sqlite");
    let dir = arg("--dir", &std::env::temp_dir().display().to_string());
    let threshold = sembed_index::store::sqlite::DEFAULT_ANN_THRESHOLD;
    let reuse = std::env::args().any(|a| a == "--reuse");
    let data = arg("--data", "clustered");
    let mut st: Box<dyn Store> = match kind.as_str() {
        "sqlite" => {
            let p = std::path::Path::new(&dir).join(format!("store-bench-{n}-{d}-{data}.sqlite"));
            if !reuse {
                for ext in ["sqlite", "sqlite-wal", "sqlite-shm", "hnsw"] {
                    let _ = std::fs::remove_file(p.with_extension(ext));
                }
            }
            Box::new(store::sqlite::SqliteStore::open(&p, threshold).unwrap())
        }
        "pg" => {
            let url = arg("--pg", "postgres://sembed@127.0.0.1:54329/sembed");
            let table = format!("sembed_bench_{n}_{d}");
            let mut s = store::pg::PgStore::connect(&url, &table).unwrap();
            if let Some(m) = s.meta().unwrap() {
                s.init(&m, true).unwrap();
            }
            Box::new(s)
        }
        other => panic!("--store {other}: sqlite or pg"),
    };
    let mut rng = sembed::rng::SplitMix64(42);
    let reusing = reuse && kind == "sqlite" && st.count().unwrap() == n;
    let centres: Vec<Vec<f32>> = match data.as_str() {
        "uniform" => Vec::new(),
        "clustered" => (0..2000).map(|_| unit(&mut rng, d)).collect(),
        other => panic!("--data {other}: uniform or clustered"),
    };
    if !reusing {
        st.init(
            &store::Meta {
                model: format!("random {d}-d"),
                model_refs: vec![],
                dimension: d,
                chunker: "bench".into(),
                lexical_weight: None,
                name_weight: None,
            },
            false,
        )
        .unwrap();
    }
    let mut all: Vec<Vec<f32>> = Vec::with_capacity(n);
    let t = Instant::now();
    let per_file = 1000;
    for f in 0..n.div_ceil(per_file) {
        let path = format!("src/m{}/file{f}.rs", f % 50);
        let mut rows = Vec::new();
        let mut vecs = Vec::new();
        for i in 0..per_file.min(n - f * per_file) {
            let text = format!("fn f{f}_{i}() {{}}");
            let hash = store::hash_text(&text);
            let v = point(&mut rng, d, &centres);
            rows.push(store::Row {
                path: path.clone(),
                lang: "rust".into(),
                kind: "function".into(),
                symbol: Some(format!("f{f}_{i}")),
                start_line: i + 1,
                end_line: i + 1,
                start_byte: i * 16,
                end_byte: i * 16 + 15,
                part: 1,
                parts: 1,
                hash,
                text,
            });
            all.push(v.clone());
            vecs.push((hash, v));
        }
        if !reusing {
            st.commit(
                &[store::FileUpdate {
                    path,
                    file_hash: store::hash_text(&format!("{f}")),
                    rows,
                }],
                &vecs,
            )
            .unwrap();
        }
    }
    let fill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    st.finish().unwrap();
    let build_s = t.elapsed().as_secs_f64();

    let queries: Vec<Vec<f32>> = (0..q).map(|_| point(&mut rng, d, &centres)).collect();
    // Warm the caches (the graph's pages, PostgreSQL's buffers) with a few searches.
    for v in queries.iter().take(10) {
        st.search(v, k, &Filter::default()).unwrap();
    }
    let mut times = Vec::new();
    let mut found = 0usize;
    let mut method = None;
    for v in &queries {
        let t = Instant::now();
        let (hits, m) = st.search(v, k, &Filter::default()).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        method = Some(m);
        let exact = store::top_k(
            all.iter().enumerate().map(|(i, x)| (store::dot(v, x), i)),
            k,
        );
        let want: std::collections::HashSet<String> = exact
            .iter()
            .map(|(_, i)| format!("fn f{}_{}() {{}}", i / per_file, i % per_file))
            .collect();
        found += hits.iter().filter(|h| want.contains(&h.row.text)).count();
    }
    // A filtered search (one folder of 50): the graph, then every row when it finds too few.
    let filter = Filter {
        lang: None,
        path: Some("src/m7/*".into()),
    };
    let mut ftimes = Vec::new();
    for v in queries.iter().take(50) {
        let t = Instant::now();
        st.search(v, k, &filter).unwrap();
        ftimes.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    ftimes.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "store": kind, "data": data, "reused": reusing, "n": n, "dim": d, "k": k, "queries": q,
            "method": method,
            "fill_rows_per_s": n as f64 / fill_s,
            "build_s": build_s,
            "p50_ms": percentile(&times, 0.5),
            "p99_ms": percentile(&times, 0.99),
            "recall_at_k": found as f64 / (k * q) as f64,
            "filtered_p50_ms": percentile(&ftimes, 0.5),
            "filtered_p99_ms": percentile(&ftimes, 0.99),
        })
    );
}
