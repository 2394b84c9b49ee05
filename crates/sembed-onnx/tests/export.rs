//! Exported graphs checked by a runtime nobody here wrote: ONNX Runtime (Python, CPU; the interpreter
//! comes from $SEMBED_TEST_PYTHON, with tools/onnx/requirements.txt installed, as .ci/run does) runs
//! them on padded batches, and its vectors must equal sembed's own.

use sembed::train::data::Example;
use sembed::train::trainer::{LoraConfig, LossKind, TrainConfig, Trainer};
use sembed::{DType, Embed, EmbedOptions, Embedder};
use sembed_onnx::{export, ExportOptions};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The interpreter with ONNX Runtime; fails under SEMBED_REQUIRE_ALL when missing (CI never passes
/// a check that did not run), says SKIPPED otherwise.
fn python() -> Option<PathBuf> {
    match std::env::var_os("SEMBED_TEST_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            assert!(
                std::env::var_os("SEMBED_REQUIRE_ALL").is_none(),
                "SEMBED_TEST_PYTHON is not set (SEMBED_REQUIRE_ALL is set: nothing may be skipped)"
            );
            println!("SKIPPED: set SEMBED_TEST_PYTHON to a Python with onnxruntime (tools/onnx/requirements.txt)");
            None
        }
    }
}

/// Texts of different lengths, so that every batch has padding.
const TEXTS: &[&str] = &[
    "fn main() { println!(\"hello\"); }",
    "how do I sort a list of numbers in place without allocating a second list?",
    "x",
    "def parse(path):\n    with open(path) as f:\n        return json.load(f)",
];

struct OrtOut {
    sentence: Vec<Vec<f32>>,
    tokens: Vec<Vec<Vec<f32>>>,
    inputs: Vec<String>,
}

/// Run `model` in ONNX Runtime on `rows` padded on the given side.
fn ort(py: &Path, model: &Path, rows: &[Vec<u32>], left: bool, task_id: Option<usize>) -> OrtOut {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.json");
    let out = dir.path().join("out.json");
    std::fs::write(
        &inp,
        json!({"rows": rows, "padding": if left {"left"} else {"right"}, "pad_id": 0, "task_id": task_id})
            .to_string(),
    )
    .unwrap();
    let o = Command::new(py)
        .arg(root().join("tools/onnx/run_ort.py"))
        .args([model, &inp, &out])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "onnxruntime on {}: {}",
        model.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let f = |x: &Value| x.as_f64().unwrap() as f32;
    OrtOut {
        sentence: v["sentence_embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(f).collect())
            .collect(),
        tokens: v["token_embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_array().unwrap().iter().map(f).collect())
                    .collect()
            })
            .collect(),
        inputs: v["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect(),
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// What one comparison found: the largest difference of the sentence embeddings, of the token
/// embeddings relative to their largest magnitude, and the smallest cosine.
#[derive(Debug)]
struct Parity {
    sentence: f32,
    tokens: f32,
    min_cos: f64,
}

/// sembed's vectors for `TEXTS` (the model at `model`, options `opts`) against ONNX Runtime's on the
/// exported graph, padded on both sides.
fn compare(
    py: &Path,
    model: &Path,
    onnx: &Path,
    opts: &EmbedOptions,
    task_id: Option<usize>,
) -> Parity {
    let e = Embedder::load(model, DType::F32, &sembed::device::cpu()).unwrap();
    let texts: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
    let ids = e.tokenize(&texts, opts).unwrap();
    let want = e.embed(&texts, opts).unwrap();
    let mut p = Parity {
        sentence: 0.0,
        tokens: 0.0,
        min_cos: 1.0,
    };
    for left in [false, true] {
        let got = ort(py, onnx, &ids, left, task_id);
        assert_eq!(got.sentence.len(), texts.len());
        for (i, (g, w)) in got.sentence.iter().zip(&want).enumerate() {
            p.sentence = p.sentence.max(max_diff(g, w));
            p.min_cos = p.min_cos.min(cosine(g, w));
            let hidden = e.last_hidden_state(&texts[i], opts).unwrap();
            assert_eq!(got.tokens[i].len(), hidden.len(), "row {i}: real tokens");
            let scale = hidden
                .iter()
                .flatten()
                .fold(0.0f32, |m, x| m.max(x.abs()))
                .max(1e-6);
            for (gt, wt) in got.tokens[i].iter().zip(&hidden) {
                p.tokens = p.tokens.max(max_diff(gt, wt) / scale);
            }
        }
    }
    p
}

fn onnx_of(dir: &Path) -> PathBuf {
    dir.join("onnx/model.onnx")
}

/// Every architecture, f32: ONNX Runtime's sentence embeddings equal sembed's within 1e-5, token
/// embeddings within 1e-5 of their scale; left and right padding alike.
#[test]
fn every_architecture_matches_onnx_runtime() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for name in ["bert-tiny", "qwen2-bidir-tiny", "qwen3-causal-tiny"] {
        let out = tmp.path().join(name);
        let r = export(&fixture(name), &out, &ExportOptions::default()).unwrap();
        assert!(r.external_data.is_none());
        let p = compare(
            &py,
            &fixture(name),
            &onnx_of(&out),
            &EmbedOptions::default(),
            None,
        );
        println!("{name}: {p:?}");
        assert!(p.sentence <= 1e-5 && p.tokens <= 1e-5, "{name}: {p:?}");
    }
}

/// Jina v3: each task merged by `--task`, and every task selectable by `task_id` in one graph.
#[test]
fn jina_tasks_merged_or_selected_match_onnx_runtime() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("jina-v3-tiny");
    let tasks = [
        "retrieval.query",
        "retrieval.passage",
        "separation",
        "classification",
        "text-matching",
    ];
    let all = tmp.path().join("all");
    let r = export(&model, &all, &ExportOptions::default()).unwrap();
    assert_eq!(r.tasks, tasks);
    for (i, task) in tasks.iter().enumerate() {
        let opts = EmbedOptions {
            task: Some(task.to_string()),
            ..Default::default()
        };
        let p = compare(&py, &model, &onnx_of(&all), &opts, Some(i));
        println!("jina task_id={i} ({task}): {p:?}");
        assert!(p.sentence <= 1e-5 && p.tokens <= 1e-5, "{task}: {p:?}");
        if i % 2 == 0 {
            let one = tmp.path().join(task);
            let r = export(
                &model,
                &one,
                &ExportOptions {
                    task: Some(task.to_string()),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(r.tasks.is_empty());
            let p = compare(&py, &model, &onnx_of(&one), &opts, None);
            println!("jina --task {task}: {p:?}");
            assert!(p.sentence <= 1e-5 && p.tokens <= 1e-5, "{task}: {p:?}");
            // The task's instruction is sentence-transformers' default prompt.
            let st: Value = serde_json::from_str(
                &std::fs::read_to_string(one.join("config_sentence_transformers.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(st["default_prompt_name"], *task);
        }
    }
    // The task_id graph takes it as an input; a merged one does not.
    let e = Embedder::load(&model, DType::F32, &sembed::device::cpu()).unwrap();
    let ids = e
        .tokenize(&["a".to_string()], &EmbedOptions::default())
        .unwrap();
    let got = ort(&py, &onnx_of(&all), &ids, false, Some(0));
    assert_eq!(got.inputs, ["input_ids", "attention_mask", "task_id"]);
}

/// The real all-MiniLM-L6-v2: f32 within 1e-5; int8 (dynamic quantization) close to f32.
#[test]
fn real_minilm_matches_onnx_runtime_f32_and_int8() {
    let Some(py) = python() else { return };
    let model = sembed::hub::default_model_dir().expect("default model (downloaded on first use)");
    let tmp = tempfile::tempdir().unwrap();
    let f32_dir = tmp.path().join("f32");
    export(&model, &f32_dir, &ExportOptions::default()).unwrap();
    let p = compare(
        &py,
        &model,
        &onnx_of(&f32_dir),
        &EmbedOptions::default(),
        None,
    );
    println!("all-MiniLM-L6-v2 f32: {p:?}");
    assert!(p.sentence <= 1e-5 && p.tokens <= 1e-5, "{p:?}");
    let int8_dir = tmp.path().join("int8");
    let r = export(
        &model,
        &int8_dir,
        &ExportOptions {
            quantize_int8: true,
            ..Default::default()
        },
    )
    .unwrap();
    let f32_size = std::fs::metadata(onnx_of(&f32_dir)).unwrap().len();
    let int8_size = std::fs::metadata(&r.model).unwrap().len();
    println!("model.onnx: f32 {f32_size} bytes, int8 {int8_size} bytes");
    assert!(int8_size * 3 < f32_size);
    let p = compare(
        &py,
        &model,
        &onnx_of(&int8_dir),
        &EmbedOptions::default(),
        None,
    );
    println!("all-MiniLM-L6-v2 int8 vs sembed f32: {p:?}");
    // Activations are quantized per tensor (DynamicQuantizeLinear), as ONNX Runtime's own dynamic
    // quantization does; MiniLM's outlier features cost it most there (measured: cosine ≥ 0.98,
    // largest difference 2.8e-2; ONNX Runtime's quantize_dynamic of the same model: 1.0e-1).
    assert!(p.min_cos >= 0.975 && p.sentence <= 0.05, "{p:?}");
}

/// int8 graphs of the tiny models run in ONNX Runtime and stay close to f32.
#[test]
fn int8_exports_run_in_onnx_runtime() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for name in ["bert-tiny", "qwen2-bidir-tiny", "qwen3-causal-tiny"] {
        let out = tmp.path().join(name);
        export(
            &fixture(name),
            &out,
            &ExportOptions {
                quantize_int8: true,
                ..Default::default()
            },
        )
        .unwrap();
        let p = compare(
            &py,
            &fixture(name),
            &onnx_of(&out),
            &EmbedOptions::default(),
            None,
        );
        println!("{name} int8 vs sembed f32: {p:?}");
        assert!(p.min_cos >= 0.98, "{name}: {p:?}");
    }
}

/// Weights in `model.onnx_data`: inspect finds them there by offset and ONNX Runtime loads them.
#[test]
fn external_data_loads_in_onnx_runtime() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ext");
    let r = export(
        &fixture("qwen3-causal-tiny"),
        &out,
        &ExportOptions {
            external_data: Some(true),
            ..Default::default()
        },
    )
    .unwrap();
    let data = r.external_data.clone().unwrap();
    assert_eq!(data, out.join("onnx/model.onnx_data"));
    let s = sembed_onnx::inspect(&r.model).unwrap();
    assert_eq!(s.external_files(), ["model.onnx_data"]);
    assert!(std::fs::metadata(&r.model).unwrap().len() < 64 * 1024);
    let p = compare(
        &py,
        &fixture("qwen3-causal-tiny"),
        &r.model,
        &EmbedOptions::default(),
        None,
    );
    assert!(p.sentence <= 1e-5, "{p:?}");
}

fn pairs() -> Vec<Example> {
    (0..12)
        .map(|i| Example {
            anchor: format!("how to compute value {i} of the series"),
            positive: format!("def f{i}(x):\n    return x * {i} + {}", i % 5),
            negatives: vec![],
        })
        .collect()
}

/// Models fine-tuned by `sembed train` (all weights, and LoRA: the PEFT adapter folder with its
/// adapters merged by the exporter) export and match themselves in ONNX Runtime.
#[test]
fn trained_models_round_trip() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("bert-tiny");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let full = tmp.path().join("full");
    let config = TrainConfig {
        loss: LossKind::Mnrl { scale: 20.0 },
        batch_size: 4,
        lr: 1e-2,
        ..Default::default()
    };
    let mut t = Trainer::new(&base, config.clone(), DType::F32, false).unwrap();
    t.train(&pairs(), None, &full, &stop, false).unwrap();
    let lora = tmp.path().join("lora");
    let mut t = Trainer::new(
        &base,
        TrainConfig {
            lora: Some(LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                targets: vec![],
            }),
            ..config
        },
        DType::F32,
        false,
    )
    .unwrap();
    t.train(&pairs(), None, &lora, &stop, false).unwrap();
    let adapter = lora.join("adapter");
    assert!(adapter.join("adapter_config.json").is_file());
    let base_vec = Embedder::load(&base, DType::F32, &sembed::device::cpu())
        .unwrap()
        .embed(&["x".to_string()], &EmbedOptions::default())
        .unwrap();
    for (what, model) in [("full", &full), ("lora adapter", &adapter)] {
        let trained = Embedder::load(model, DType::F32, &sembed::device::cpu())
            .unwrap()
            .embed(&["x".to_string()], &EmbedOptions::default())
            .unwrap();
        assert!(
            max_diff(&trained[0], &base_vec[0]) > 1e-3,
            "{what}: training changed the model"
        );
        let out = tmp.path().join(format!("onnx-{}", what.replace(' ', "-")));
        let r = export(model, &out, &ExportOptions::default()).unwrap();
        assert_eq!(r.lora_merged, what != "full", "{what}");
        let p = compare(&py, model, &onnx_of(&out), &EmbedOptions::default(), None);
        println!("trained ({what}): {p:?}");
        assert!(p.sentence <= 1e-5 && p.tokens <= 1e-5, "{what}: {p:?}");
    }
}

/// The `onnx` package's checker (structure, operator schemas, full shape inference) accepts every
/// export; its own writer re-saves one with external data, and `inspect` reads the same locations,
/// offsets and lengths the `onnx` package reads back; ONNX Runtime runs the re-saved file unchanged.
#[test]
fn onnx_checker_accepts_exports_and_inspect_reads_its_external_data() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let int8 = ExportOptions {
        quantize_int8: true,
        ..Default::default()
    };
    let jina_task = ExportOptions {
        task: Some("text-matching".into()),
        ..Default::default()
    };
    for (name, opts) in [
        ("bert-tiny", ExportOptions::default()),
        ("bert-tiny", int8.clone()),
        ("qwen2-bidir-tiny", ExportOptions::default()),
        ("qwen3-causal-tiny", int8),
        ("jina-v3-tiny", ExportOptions::default()),
        ("jina-v3-tiny", jina_task),
    ] {
        let out = tmp.path().join(format!("{name}-{}", opts.quantize_int8));
        let r = export(&fixture(name), &out, &opts).unwrap();
        let resaved = out.join("onnx/resaved.onnx");
        let o = Command::new(&py)
            .arg(root().join("tools/onnx/onnx_check.py"))
            .args([&r.model, &resaved])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "onnx checker on {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let theirs: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(theirs["ir_version"], 8);
        let ours = sembed_onnx::inspect(&resaved).unwrap();
        let inits = theirs["initializers"].as_array().unwrap();
        assert_eq!(inits.len(), ours.initializers.len(), "{name}");
        let mut external = 0;
        for (t, i) in inits.iter().zip(&ours.initializers) {
            assert_eq!(t["name"], i.name.as_str());
            match &i.location {
                sembed_onnx::inspect::Location::External {
                    file,
                    offset,
                    length,
                } => {
                    assert_eq!(t["location"], file.as_str(), "{}", i.name);
                    assert_eq!(t["offset"], *offset, "{}", i.name);
                    assert_eq!(t["length"], *length, "{}", i.name);
                    external += 1;
                }
                sembed_onnx::inspect::Location::Inline => {
                    assert!(t["location"].is_null(), "{}", i.name)
                }
            }
        }
        assert!(external > 5, "{name}: {external} external tensors");
        assert_eq!(
            ours.parameters(),
            sembed_onnx::inspect(&r.model).unwrap().parameters()
        );
        if name == "qwen2-bidir-tiny" {
            let p = compare(
                &py,
                &fixture(name),
                &resaved,
                &EmbedOptions::default(),
                None,
            );
            assert!(p.sentence <= 1e-5, "{p:?}");
        }
    }
}

/// Every pooling sentence-transformers offers that sembed runs (CLS, max, mean over √length, and
/// no normalisation), on copies of the tiny BERT with its 1_Pooling and modules.json changed.
#[test]
fn every_pooling_matches_onnx_runtime() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (mode, normalize) in [
        ("cls", true),
        ("max", true),
        ("mean_sqrt_len_tokens", true),
        ("mean", false),
    ] {
        let model = tmp.path().join(format!("bert-{mode}-{normalize}"));
        std::fs::create_dir_all(model.join("1_Pooling")).unwrap();
        for f in std::fs::read_dir(fixture("bert-tiny")).unwrap() {
            let f = f.unwrap();
            if f.file_type().unwrap().is_file() {
                std::fs::copy(f.path(), model.join(f.file_name())).unwrap();
            }
        }
        std::fs::write(
            model.join("1_Pooling/config.json"),
            json!({"word_embedding_dimension": 32, "pooling_mode": mode}).to_string(),
        )
        .unwrap();
        let mut modules = json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
        ]);
        if normalize {
            modules.as_array_mut().unwrap().push(json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
        }
        std::fs::write(model.join("modules.json"), modules.to_string()).unwrap();
        let out = tmp.path().join(format!("onnx-{mode}-{normalize}"));
        export(&model, &out, &ExportOptions::default()).unwrap();
        let p = compare(&py, &model, &onnx_of(&out), &EmbedOptions::default(), None);
        println!("pooling {mode}, normalize {normalize}: {p:?}");
        assert!(p.sentence <= 1e-5 && p.tokens <= 1e-5, "{mode}: {p:?}");
        // The written pooling config says the same.
        let pool: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("1_Pooling/config.json")).unwrap(),
        )
        .unwrap();
        let key = format!(
            "pooling_mode_{}",
            if mode == "mean" {
                "mean_tokens"
            } else if mode == "cls" {
                "cls_token"
            } else if mode == "max" {
                "max_tokens"
            } else {
                mode
            }
        );
        assert_eq!(pool[&key], true, "{key}");
        assert_eq!(out.join("2_Normalize").is_dir(), normalize);
    }
}
