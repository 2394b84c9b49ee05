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

#[test]
fn bert_tiny_cases() {
    assert_eq!(load("bert-tiny").engine_name(), "fast-f32");
    check_cases("bert-tiny");
}
#[test]
fn bert_tiny_batched() {
    check_batched("bert-tiny");
}
/// The candle implementation of BERT (the training path) stays golden too.
#[test]
fn bert_tiny_cases_and_batches_on_the_candle_engine() {
    assert_eq!(load_on("bert-tiny", Engine::Candle).engine_name(), "candle");
    check_cases_on("bert-tiny", Engine::Candle);
    check_batched_on("bert-tiny", Engine::Candle);
}

/// Int8 stays close to the upstream vectors (its error is quantisation, not a bug: a wrong kernel
/// gives cosines far below this).
#[test]
fn bert_tiny_int8_is_close_to_golden() {
    let e = load_on("bert-tiny", Engine::Fast(Precision::Int8));
    assert_eq!(e.engine_name(), "fast-int8");
    let golden = cases("bert-tiny");
    let mut worst = 1f64;
    for case in golden["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap().to_string();
        let got = e
            .embed(std::slice::from_ref(&text), &opts_for(case))
            .unwrap()
            .remove(0);
        let want = floats(&case["embedding_normalized"]);
        let cos: f64 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        worst = worst.min(cos);
    }
    println!("bert-tiny int8: worst cosine to golden {worst:.5}");
    assert!(worst > 0.99, "int8 worst cosine {worst}");
}

#[test]
fn fast_engine_refuses_what_it_cannot_run() {
    for model in ["qwen2-bidir-tiny", "jina-v3-tiny"] {
        for p in [Precision::F32, Precision::Int8] {
            let err = Embedder::load_with(
                &fixtures().join(model),
                DType::F32,
                &sembed::device::cpu(),
                Engine::Fast(p),
            )
            .err()
            .expect("refused");
            assert!(err.to_string().contains("fast engine"), "{err}");
        }
        assert_eq!(load(model).engine_name(), "candle");
    }
    // f16 compute is not the fast path's: auto falls back to candle.
    let e = Embedder::load(
        &fixtures().join("bert-tiny"),
        DType::F16,
        &sembed::device::cpu(),
    )
    .unwrap();
    assert_eq!(e.engine_name(), "candle");
}
#[test]
fn qwen2_bidir_cases() {
    check_cases("qwen2-bidir-tiny");
}
#[test]
fn qwen2_bidir_batched_left_and_right() {
    check_batched("qwen2-bidir-tiny");
}
#[test]
fn qwen3_causal_cases() {
    check_cases("qwen3-causal-tiny");
}
#[test]
fn qwen3_causal_batched_left_and_right() {
    check_batched("qwen3-causal-tiny");
}
#[test]
fn jina_v3_cases() {
    check_cases("jina-v3-tiny");
}
#[test]
fn jina_v3_batched() {
    check_batched("jina-v3-tiny");
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
