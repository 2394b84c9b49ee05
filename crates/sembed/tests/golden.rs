//! Golden parity: every tiny model and case against the upstream PyTorch outputs in
//! tests/fixtures (copied from shared/golden; tolerances from its README).

use sembed::embed::{Embed, EmbedOptions, Embedder, Fusion, InputRole};
use sembed::fast::{Engine, Precision};
use sembed::DType;
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load(model: &str) -> Embedder {
    load_on(model, Engine::Auto)
}

fn load_on(model: &str, engine: Engine) -> Embedder {
    Embedder::load_with(
        &fixtures().join(model),
        DType::F32,
        &sembed::device::cpu(),
        engine,
    )
    .unwrap()
}

fn cases(model: &str) -> Value {
    let text =
        std::fs::read_to_string(fixtures().join("cases").join(format!("{model}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn opts_for(case: &Value) -> EmbedOptions {
    let task = case["task"]
        .as_str()
        .or(case["prompt_name"].as_str())
        .map(str::to_string);
    EmbedOptions {
        task,
        dimensions: case["truncate_dim"].as_u64().map(|d| d as usize),
        batch_size: 64,
        ..Default::default()
    }
}

/// Every single-text case: token ids exact, pooled ≤ 2e-5, normalised ≤ 1e-5, hidden states ≤ 2e-5.
fn check_cases(model: &str) {
    check_cases_on(model, Engine::Auto)
}

fn check_cases_on(model: &str, engine: Engine) {
    let e = load_on(model, engine);
    let golden = cases(model);
    let mut checked = 0;
    for case in golden["cases"].as_array().unwrap() {
        let name = format!(
            "{model}/{}[{:?}/{:?}]",
            case["name"], case["task"], case["prompt_name"]
        );
        let text = case["text"].as_str().unwrap().to_string();
        let opts = opts_for(case);
        let ids = e.tokenize(std::slice::from_ref(&text), &opts).unwrap();
        let want_ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids[0], want_ids, "{name}: token ids");
        let raw = e
            .embed(
                std::slice::from_ref(&text),
                &EmbedOptions {
                    normalize: false,
                    ..opts.clone()
                },
            )
            .unwrap();
        let d = max_abs(&raw[0], &floats(&case["embedding"]));
        assert!(d <= 2e-5, "{name}: pooled embedding differs by {d}");
        let unit = e.embed(std::slice::from_ref(&text), &opts).unwrap();
        let d = max_abs(&unit[0], &floats(&case["embedding_normalized"]));
        assert!(d <= 1e-5, "{name}: normalised embedding differs by {d}");
        if let Some(h) = case.get("last_hidden_state") {
            let ours = e.last_hidden_state(&text, &opts).unwrap();
            let want = h.as_array().unwrap();
            assert_eq!(ours.len(), want.len(), "{name}: hidden state rows");
            for (row, w) in ours.iter().zip(want) {
                let d = max_abs(row, &floats(w));
                assert!(d <= 2e-5, "{name}: hidden state differs by {d}");
            }
        }
        checked += 1;
    }
    assert!(checked >= 8, "{model}: only {checked} cases");
}

/// The padded batches of the case file, embedded as one batch, on both padding sides.
fn check_batched(model: &str) {
    check_batched_on(model, Engine::Auto)
}

fn check_batched_on(model: &str, engine: Engine) {
    let mut e = load_on(model, engine);
    let golden = cases(model);
    for left in [false, true] {
        e.set_padding_left(left);
        for b in golden["batched"].as_array().unwrap() {
            let texts: Vec<String> = b["texts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect();
            let opts = opts_for(b);
            let got = e.embed(&texts, &opts).unwrap();
            assert_eq!(got.len(), texts.len());
            assert_eq!(
                got.len(),
                b["embedding_normalized"].as_array().unwrap().len()
            );
            for (i, (g, w)) in got
                .iter()
                .zip(b["embedding_normalized"].as_array().unwrap())
                .enumerate()
            {
                let d = max_abs(g, &floats(w));
                assert!(
                    d <= 1e-5,
                    "{model} batch (left={left}, {:?}) row {i}: differs by {d}",
                    b["task"]
                );
            }
        }
    }
}

const MODELS: [&str; 4] = [
    "bert-tiny",
    "qwen2-bidir-tiny",
    "qwen3-causal-tiny",
    "jina-v3-tiny",
];

#[test]
fn bert_tiny_cases() {
    assert_eq!(load("bert-tiny").engine_name(), "fast-f32");
    check_cases("bert-tiny");
}
#[test]
fn bert_tiny_batched() {
    check_batched("bert-tiny");
}
#[test]
fn qwen2_bidir_cases() {
    assert_eq!(load("qwen2-bidir-tiny").engine_name(), "fast-f32");
    check_cases("qwen2-bidir-tiny");
}
#[test]
fn qwen2_bidir_batched_left_and_right() {
    check_batched("qwen2-bidir-tiny");
}
#[test]
fn qwen3_causal_cases() {
    assert_eq!(load("qwen3-causal-tiny").engine_name(), "fast-f32");
    check_cases("qwen3-causal-tiny");
}
#[test]
fn qwen3_causal_batched_left_and_right() {
    check_batched("qwen3-causal-tiny");
}
#[test]
fn jina_v3_cases() {
    assert_eq!(load("jina-v3-tiny").engine_name(), "fast-f32");
    check_cases("jina-v3-tiny");
}
#[test]
fn jina_v3_batched() {
    check_batched("jina-v3-tiny");
}

/// The candle models (the reference and the training path) stay golden too, every architecture.
#[test]
fn every_model_on_the_candle_engine() {
    for model in MODELS {
        assert_eq!(load_on(model, Engine::Candle).engine_name(), "candle");
        check_cases_on(model, Engine::Candle);
        check_batched_on(model, Engine::Candle);
    }
}

/// Worst cosine between a model's vectors and the golden ones over every single-text case.
fn worst_cosine_to_golden(e: &Embedder, model: &str) -> f64 {
    let golden = cases(model);
    let mut worst = 1f64;
    for case in golden["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap().to_string();
        let got = e
            .embed(std::slice::from_ref(&text), &opts_for(case))
            .unwrap()
            .remove(0);
        let want = floats(&case["embedding_normalized"]);
        assert_eq!(got.len(), want.len());
        let cos: f64 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        worst = worst.min(cos);
    }
    worst
}

/// Int8 and 16-bit weights stay close to the upstream vectors on every architecture (their error is
/// rounding, not a bug: a wrong kernel or layout gives cosines far below these bounds).
#[test]
fn reduced_precision_is_close_to_golden_on_every_model() {
    for model in MODELS {
        let dir = fixtures().join(model);
        let cpu = sembed::device::cpu();
        for (dtype, engine, name, bound) in [
            (DType::F32, Engine::Fast(Precision::Int8), "fast-int8", 0.99),
            (DType::BF16, Engine::Auto, "fast-bf16", 0.9995),
            (DType::F16, Engine::Auto, "fast-f16", 0.99999),
        ] {
            let e = Embedder::load_with(&dir, dtype, &cpu, engine).unwrap();
            assert_eq!(e.engine_name(), name);
            let worst = worst_cosine_to_golden(&e, model);
            println!("{model} {name}: worst cosine to golden {worst:.6}");
            assert!(worst > bound, "{model} {name}: worst cosine {worst}");
        }
    }
}

/// `auto` takes the fast engine where it can and falls back to candle, saying why, where it cannot;
/// `fast` insists and refuses with the reason.
#[test]
fn auto_falls_back_to_candle_for_what_the_fast_engine_cannot_run() {
    let cpu = sembed::device::cpu();
    for model in MODELS {
        let e = load(model);
        assert!(
            e.engine_reason().starts_with("fast-f32: "),
            "{}",
            e.engine_reason()
        );
        // f64 is a training dtype the fast engine does not hold.
        let e = Embedder::load(&fixtures().join(model), DType::F64, &cpu).unwrap();
        assert_eq!(e.engine_name(), "candle");
        assert!(e.engine_reason().contains("F64"), "{}", e.engine_reason());
        let err = Embedder::load_with(
            &fixtures().join(model),
            DType::F64,
            &cpu,
            Engine::Fast(Precision::F32),
        )
        .err()
        .expect("refused");
        assert!(err.to_string().contains("fast engine cannot run"), "{err}");
    }
}

/// A BERT with SiLU (no golden file: upstream checkpoints use GELU) runs on the fast engine and equals
/// the candle reference.
#[test]
fn bert_with_silu_runs_on_both_engines_alike() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("bert-tiny");
    copy_dir(&src, dir.path());
    let cfg_path = dir.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["hidden_act"] = "silu".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let cpu = sembed::device::cpu();
    let fast = Embedder::load_with(dir.path(), DType::F32, &cpu, Engine::Auto).unwrap();
    let candle = Embedder::load_with(dir.path(), DType::F32, &cpu, Engine::Candle).unwrap();
    assert_eq!(fast.engine_name(), "fast-f32");
    let texts: Vec<String> = [
        "fn main() {}",
        "a longer sentence about silu activations",
        "x",
    ]
    .map(String::from)
    .to_vec();
    let a = fast.embed(&texts, &EmbedOptions::default()).unwrap();
    let b = candle.embed(&texts, &EmbedOptions::default()).unwrap();
    assert_eq!((a.len(), b.len()), (texts.len(), texts.len()));
    for (x, y) in a.iter().zip(&b) {
        let d = max_abs(x, y);
        assert!(d <= 1e-5, "silu BERT: engines differ by {d}");
    }
    // And the activation changed the function (the test would pass vacuously otherwise).
    let gelu = load("bert-tiny")
        .embed(&texts, &EmbedOptions::default())
        .unwrap();
    assert!(max_abs(&a[1], &gelu[1]) > 1e-3);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dst = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dst);
        } else {
            std::fs::copy(entry.path(), dst).unwrap();
        }
    }
}

/// One batch that mixes Jina tasks equals each text embedded with its own task, and the golden
/// vectors of those tasks.
#[test]
fn jina_batch_mixing_tasks_matches_golden() {
    for engine in [Engine::Auto, Engine::Candle] {
        let e = load_on("jina-v3-tiny", engine);
        let golden = cases("jina-v3-tiny");
        let mut ids = Vec::new();
        let mut tasks = Vec::new();
        let mut want = Vec::new();
        for case in golden["cases"].as_array().unwrap() {
            if case["truncate_dim"].as_u64().is_some() {
                continue;
            }
            let opts = opts_for(case);
            let text = case["text"].as_str().unwrap().to_string();
            let row = e
                .tokenize(std::slice::from_ref(&text), &opts)
                .unwrap()
                .remove(0);
            let task = opts
                .task
                .as_ref()
                .map(|t| e.tasks().iter().position(|x| x == t).unwrap());
            ids.push(row);
            tasks.push(task);
            want.push(floats(&case["embedding_normalized"]));
        }
        let distinct: std::collections::BTreeSet<_> = tasks.iter().collect();
        assert!(
            distinct.len() >= 4,
            "only {} tasks in the cases",
            distinct.len()
        );
        let got = e
            .embed_ids(
                &ids,
                &tasks,
                &EmbedOptions {
                    batch_size: 64,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            let d = max_abs(g, w);
            assert!(d <= 1e-5, "{engine:?}: mixed-task batch differs by {d}");
        }
    }
}

/// A padded batch equals each text alone (our own implementation, every model, both sides).
#[test]
fn padded_batch_equals_single_texts() {
    for model in [
        "bert-tiny",
        "qwen2-bidir-tiny",
        "qwen3-causal-tiny",
        "jina-v3-tiny",
    ] {
        let mut e = load(model);
        let texts: Vec<String> = cases(model)["cases"]
            .as_array()
            .unwrap()
            .iter()
            .take(8)
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect();
        let opts = EmbedOptions::default();
        let single: Vec<Vec<f32>> = texts
            .iter()
            .map(|t| e.embed(std::slice::from_ref(t), &opts).unwrap().remove(0))
            .collect();
        for left in [false, true] {
            e.set_padding_left(left);
            let batch = e.embed(&texts, &opts).unwrap();
            assert_eq!(batch.len(), single.len());
            for (i, (b, s)) in batch.iter().zip(&single).enumerate() {
                let d = max_abs(b, s);
                assert!(
                    d <= 1e-5,
                    "{model} left={left} row {i}: batch vs single {d}"
                );
            }
        }
    }
}

/// Query/document roles map to Qwen3's prompts and Jina's retrieval adapters.
#[test]
fn input_roles_map_to_prompts_and_adapters() {
    let q3 = load("qwen3-causal-tiny");
    let golden = cases("qwen3-causal-tiny");
    let case = golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt_name"] == "query")
        .unwrap();
    let text = case["text"].as_str().unwrap().to_string();
    let got = q3
        .embed(
            &[text],
            &EmbedOptions {
                role: Some(InputRole::Query),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(max_abs(&got[0], &floats(&case["embedding_normalized"])) <= 1e-5);

    let jina = load("jina-v3-tiny");
    let golden = cases("jina-v3-tiny");
    for (role, task) in [
        (InputRole::Query, "retrieval.query"),
        (InputRole::Document, "retrieval.passage"),
    ] {
        let case = golden["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["task"] == task && c["truncate_dim"].is_null())
            .unwrap();
        let text = case["text"].as_str().unwrap().to_string();
        let got = jina
            .embed(
                &[text],
                &EmbedOptions {
                    role: Some(role),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(
            max_abs(&got[0], &floats(&case["embedding_normalized"])) <= 1e-5,
            "{task}"
        );
    }
}

#[test]
fn dimensions_only_for_matryoshka_models_and_unknown_tasks_fail() {
    let bert = load("bert-tiny");
    let e = bert
        .embed(
            &["x".into()],
            &EmbedOptions {
                dimensions: Some(8),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a Matryoshka model"), "{e}");
    let jina = load("jina-v3-tiny");
    let e = jina
        .embed(
            &["x".into()],
            &EmbedOptions {
                task: Some("nope".into()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown task `nope`") && e.contains("retrieval.query"),
        "{e}"
    );
    let e = jina
        .embed(
            &["x".into()],
            &EmbedOptions {
                dimensions: Some(33),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
    let v = jina
        .embed(
            &["x".into()],
            &EmbedOptions {
                dimensions: Some(8),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(v[0].len(), 8);
    let norm: f32 = v[0].iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-5);
}

/// The fused pipeline on tiny Qwen2 + tiny Jina equals the DESIGN.md formula applied to the two
/// reference vectors: concat(q/|q|, j/|j|) / √2.
#[test]
fn fusion_matches_design_formula_on_reference_vectors() {
    let parts: Vec<(Box<dyn Embed>, f64)> = vec![
        (Box::new(load("qwen2-bidir-tiny")), 1.0),
        (Box::new(load("jina-v3-tiny")), 1.0),
    ];
    let fusion = Fusion::new("qodo+jina", parts).unwrap();
    assert_eq!(fusion.dimension(), 48 + 32);
    let qwen = cases("qwen2-bidir-tiny");
    let jina = cases("jina-v3-tiny");
    for (role, task) in [
        (InputRole::Document, "retrieval.passage"),
        (InputRole::Query, "retrieval.query"),
    ] {
        let mut texts = Vec::new();
        let mut want = Vec::new();
        for qc in qwen["cases"].as_array().unwrap() {
            let jc = jina["cases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| {
                    c["name"] == qc["name"] && c["task"] == task && c["truncate_dim"].is_null()
                })
                .unwrap();
            let s = std::f32::consts::FRAC_1_SQRT_2;
            let mut v: Vec<f32> = floats(&qc["embedding_normalized"])
                .iter()
                .map(|x| x * s)
                .collect();
            v.extend(floats(&jc["embedding_normalized"]).iter().map(|x| x * s));
            texts.push(qc["text"].as_str().unwrap().to_string());
            want.push(v);
        }
        let got = fusion
            .embed(
                &texts,
                &EmbedOptions {
                    role: Some(role),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = max_abs(g, w);
            assert!(d <= 1e-5, "fusion {task} row {i}: {d}");
            let n: f32 = g.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-5, "fused norm {n}");
        }
    }
    let e = fusion
        .embed(
            &["x".into()],
            &EmbedOptions {
                dimensions: Some(16),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("fusion"), "{e}");
}

#[test]
fn empty_inputs_and_empty_strings() {
    let e = load("bert-tiny");
    let err = e
        .embed(&[], &EmbedOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no texts"), "{err}");
    // The empty string is a defined input: [CLS] [SEP], matching the golden `empty` case.
    let golden = cases("bert-tiny");
    let case = golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "empty")
        .unwrap();
    let v = e.embed(&[String::new()], &EmbedOptions::default()).unwrap();
    assert!(max_abs(&v[0], &floats(&case["embedding_normalized"])) <= 1e-5);
}

#[test]
fn no_truncate_rejects_long_inputs_and_max_length_is_honoured() {
    let e = load("bert-tiny");
    let long = "word ".repeat(500);
    let err = e
        .embed(
            &["short".into(), long.clone()],
            &EmbedOptions {
                truncate: false,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input 1") && err.contains("truncation is off"),
        "{err}"
    );
    let ids = e
        .tokenize(
            std::slice::from_ref(&long),
            &EmbedOptions {
                max_length: Some(10),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(ids[0].len(), 10);
    assert_eq!(*ids[0].last().unwrap(), 102, "[SEP] survives truncation");
    let left = e
        .tokenize(
            &[format!("alpha {long}")],
            &EmbedOptions {
                max_length: Some(10),
                truncate_left: Some(true),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(left[0][0], 101, "[CLS] survives left truncation");
    assert!(!left[0].contains(
        &e.tokenize(&["alpha".into()], &EmbedOptions::default())
            .unwrap()[0][1]
    ));
    let err = e
        .embed(
            &["x".into()],
            &EmbedOptions {
                max_length: Some(1000),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceeds the model's maximum of 64"), "{err}");
}
