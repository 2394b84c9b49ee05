//! `sembed train`, `eval` and `mine` through the binary: gradient dumps against the golden upstream
//! gradients, exact resume, Jina single-adapter training, and a short real fine-tuning run of
//! all-MiniLM-L6-v2 on pairs mined from the Python standard library.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sembed(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sembed"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn load_all(path: &Path) -> std::collections::BTreeMap<String, Vec<f64>> {
    let f = sembed::weights::SafetensorsFile::open(path).unwrap();
    f.header()
        .tensors
        .iter()
        .map(|t| {
            let v = f
                .load(&t.name, sembed::DType::F64, &sembed::device::cpu())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            (t.name.clone(), v)
        })
        .collect()
}

#[test]
fn dump_gradients_match_upstream() {
    let dir = tempfile::tempdir().unwrap();
    for (model, extra) in [
        ("bert-tiny", vec![]),
        ("qwen2-bidir-tiny", vec![]),
        // Not in ../shared/golden: made by tools/reference/qwen3_grads.py from transformers'
        // Qwen3Model (causal, q/k RMSNorm, the query prompt on the anchors).
        ("qwen3-causal-tiny", vec![]),
        ("jina-v3-tiny", vec!["--task", "retrieval.passage"]),
    ] {
        // The cached (GradCache) MNRL must give the same gradients as upstream's plain MNRL (the
        // golden batch of 3 runs in mini-batches of 2 + 1); so must checkpointed layers.
        let triplet = [
            "--loss",
            "triplet",
            "--distance",
            "cosine",
            "--margin",
            "0.5",
        ];
        for (run, loss, flags) in [
            ("triplet", "triplet", triplet.to_vec()),
            ("mnrl", "mnrl", vec!["--loss", "mnrl"]),
            (
                "mnrl-cached",
                "mnrl",
                vec!["--loss", "mnrl", "--cache-mini-batch", "2"],
            ),
            (
                "triplet-checkpointed",
                "triplet",
                [&triplet[..], &["--checkpoint-activations"]].concat(),
            ),
        ] {
            let out = dir.path().join(format!("{model}-{run}.safetensors"));
            let m = root().join("tests/fixtures").join(model);
            let data = root()
                .join("tests/fixtures/grads")
                .join(model)
                .join("triplets.jsonl");
            let mut args = vec![
                "train",
                "-m",
                p(&m),
                "--data",
                p(&data),
                "--batch-size",
                "8",
                "--dropout",
                "0",
                "--dump-gradients",
                p(&out),
            ];
            args.extend(&flags);
            args.extend(&extra);
            let printed: Value = serde_json::from_str(ok(sembed(&args)).trim()).unwrap();
            let reference = root()
                .join("tests/fixtures/grads")
                .join(model)
                .join(format!("{loss}_loss.safetensors"));
            let ours = load_all(&out);
            let want = load_all(&reference);
            assert_eq!(
                ours.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{model}: same tensor names"
            );
            let global = want.values().flatten().fold(0.0f64, |m, x| m.max(x.abs()));
            for (name, w) in &want {
                let g = &ours[name];
                assert_eq!(g.len(), w.len(), "{model} {run} {name}: size");
                let diff = g
                    .iter()
                    .zip(w)
                    .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
                let scale = w
                    .iter()
                    .fold(0.0f64, |m, x| m.max(x.abs()))
                    .max(1e-3 * global);
                assert!(
                    diff / scale <= 1e-3,
                    "{model} {run} {name}: {}",
                    diff / scale
                );
            }
            let ref_loss: f64 = sembed::weights::SafetensorsFile::open(&reference)
                .unwrap()
                .header()
                .metadata["loss"]
                .parse()
                .unwrap();
            let loss_value = printed["loss"].as_f64().unwrap();
            assert!(
                ((loss_value - ref_loss) / ref_loss).abs() <= 1e-5,
                "{model} {run}: {loss_value} vs {ref_loss}"
            );
            let meta: f64 = sembed::weights::SafetensorsFile::open(&out)
                .unwrap()
                .header()
                .metadata["loss"]
                .parse()
                .unwrap();
            // (serde_json's float parsing may be one ulp off the exact value.)
            assert!((meta - loss_value).abs() <= 1e-15, "{meta} vs {loss_value}");
        }
    }
}

fn synthetic_pairs(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("pairs.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| serde_json::json!({"anchor": format!("how to compute value {i} of the series"), "positive": format!("def f{i}(x):\n    return x * {i} + {}", i % 5), "negative": format!("SELECT {i} FROM t")}).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// A run stopped after 3 steps and resumed from its checkpoint ends with the same weights as an
/// uninterrupted run (optimiser state and data order included).
#[test]
fn resumed_run_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pairs(dir.path(), 24);
    let model = root().join("tests/fixtures/bert-tiny");
    let common = [
        "--data",
        p(&data),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--grad-accum",
        "2",
        "--loss",
        "triplet",
    ];
    let full = dir.path().join("full");
    let mut args = vec!["train", "-m", p(&model), "-o", p(&full)];
    args.extend(common);
    ok(sembed(&args));
    let part = dir.path().join("part");
    let mut args = vec!["train", "-m", p(&model), "-o", p(&part), "--max-steps", "3"];
    args.extend(common);
    let report: Value = serde_json::from_str(ok(sembed(&args)).trim()).unwrap();
    assert_eq!(report["interrupted"], true);
    let ckpt = part.join("checkpoints/interrupted");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 3);
    let mut args = vec!["train", "--resume", p(&ckpt), "-o", p(&part)];
    args.extend(common);
    ok(sembed(&args));
    let a = load_all(&full.join("model.safetensors"));
    let b = load_all(&part.join("model.safetensors"));
    let orig = load_all(&model.join("model.safetensors"));
    let mut changed = 0;
    for (name, va) in &a {
        assert_eq!(
            va, &b[name],
            "{name} differs between resumed and uninterrupted runs"
        );
        if va != &orig[name] {
            changed += 1;
        }
    }
    assert!(changed > 30, "training changed {changed} tensors");
    // Per-epoch checkpoints exist and are model folders.
    assert!(full.join("checkpoints/epoch-1/model.safetensors").is_file());
    assert!(full
        .join("checkpoints/epoch-2/optimizer.safetensors")
        .is_file());
}

/// `--precision bf16` trains (every step's loss close to the same f32 run's, different weights at the
/// end), says how it computed in metrics.json, and refuses f64 master weights.
#[test]
fn bf16_mixed_precision_trains_and_reports_its_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pairs(dir.path(), 24);
    let model = root().join("tests/fixtures/bert-tiny");
    let run = |precision: &str| {
        let out = dir.path().join(precision);
        ok(sembed(&[
            "train",
            "-m",
            p(&model),
            "-o",
            p(&out),
            "--data",
            p(&data),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--dropout",
            "0",
            "--precision",
            precision,
        ]));
        let read = |f: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap()
        };
        let state = read(&out.join("checkpoints/epoch-2/trainer_state.json"));
        let losses: Vec<f64> = state["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let report = read(&out.join("metrics.json"));
        let weights = load_all(&out.join("model.safetensors"));
        (
            losses,
            report["precision"].as_str().unwrap().to_string(),
            weights,
        )
    };
    let (l32, p32, w32) = run("f32");
    let (l16, p16, w16) = run("bf16");
    assert_eq!(p32, "f32");
    assert!(p16.starts_with("bf16 mixed precision"), "{p16}");
    assert_eq!(l32.len(), 6);
    assert_eq!(l16.len(), 6);
    for (a, b) in l32.iter().zip(&l16) {
        assert!(
            (a - b).abs() < 0.02 * a.abs().max(1.0),
            "losses {l32:?} vs {l16:?}"
        );
    }
    assert!(l16[5] < l16[0], "bf16 did not learn: {l16:?}");
    assert!(
        w32.iter().any(|(name, v)| v != &w16[name]),
        "bf16 gave the f32 weights bit for bit"
    );
    let out = sembed(&[
        "train",
        "-m",
        p(&model),
        "-o",
        p(&dir.path().join("x")),
        "--data",
        p(&data),
        "--precision",
        "bf16",
        "--dtype",
        "f64",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dtype f64"));
}

/// Fine-tuning one Jina task adapter leaves the base weights and the other adapters as they were.
#[test]
fn jina_trains_only_the_chosen_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pairs(dir.path(), 12);
    let model = root().join("tests/fixtures/jina-v3-tiny");
    let out = dir.path().join("out");
    ok(sembed(&[
        "train",
        "-m",
        p(&model),
        "-o",
        p(&out),
        "--data",
        p(&data),
        "--task",
        "text-matching",
        "--lr",
        "1e-2",
        "--batch-size",
        "4",
    ]));
    let before = load_all(&model.join("model.safetensors"));
    let after = load_all(&out.join("model.safetensors"));
    let tasks = 5;
    let active = 4; // text-matching
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    assert!(
        after.keys().any(|n| n.contains(".lora_")),
        "no adapter tensors"
    );
    for (name, a) in &after {
        let b = &before[name];
        if name.contains(".lora_") {
            let per = a.len() / tasks;
            for t in 0..tasks {
                let same = a[t * per..(t + 1) * per] == b[t * per..(t + 1) * per];
                if t == active {
                    // The pooler does not take part in the sentence embedding.
                    assert!(
                        !same || name.contains("pooler"),
                        "{name}: active slice unchanged"
                    );
                } else {
                    assert!(same, "{name}: slice of task {t} changed");
                }
            }
        } else {
            assert_eq!(a, b, "{name}: base weight changed");
        }
    }
}

/// Dropout is on by default in training (the model config's probabilities): two dumps with the
/// default differ from the dropout-free one, and `--dropout 0` dumps are identical run to run.
#[test]
fn dropout_is_on_by_default_and_switchable_off() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/bert-tiny");
    let data = root().join("tests/fixtures/grads/bert-tiny/triplets.jsonl");
    let dump = |name: &str, extra: &[&str]| -> f64 {
        let out = dir.path().join(name);
        let mut args = vec![
            "train",
            "-m",
            p(&model),
            "--data",
            p(&data),
            "--dump-gradients",
            p(&out),
        ];
        args.extend(extra);
        let v: Value = serde_json::from_str(ok(sembed(&args)).trim()).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let off1 = dump("a", &["--dropout", "0"]);
    let off2 = dump("b", &["--dropout", "0"]);
    assert_eq!(off1, off2);
    assert_eq!(
        load_all(&dir.path().join("a")),
        load_all(&dir.path().join("b"))
    );
    let on = dump("c", &[]);
    assert_ne!(
        on, off1,
        "dropout (hidden 0.1 in the config) changes the loss"
    );
    assert_eq!(on, dump("d", &[]), "masks are seeded");
    let heavy = dump("e", &["--dropout", "0.5"]);
    assert_ne!(heavy, on);
}

#[test]
fn malformed_training_data_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"anchor\":\"a\",\"positive\":\"b\"}\n{\"anchor\":\"a\",\"positive\":7}\n",
    )
    .unwrap();
    let model = root().join("tests/fixtures/bert-tiny");
    let out = sembed(&[
        "train",
        "-m",
        p(&model),
        "--data",
        p(&data),
        "-o",
        p(&dir.path().join("o")),
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("bad.jsonl:2: field `positive` is not a string"),
        "{e}"
    );
    // Triplet loss needs negatives.
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(&data, "{\"anchor\":\"a\",\"positive\":\"b\"}\n").unwrap();
    let out = sembed(&[
        "train",
        "-m",
        p(&model),
        "--data",
        p(&data),
        "--loss",
        "triplet",
        "-o",
        p(&dir.path().join("o")),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a negative"));
    let out = sembed(&[
        "train",
        "-m",
        p(&model),
        "--data",
        p(&data),
        "--dropout",
        "1.5",
        "-o",
        p(&dir.path().join("o")),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("a probability in [0, 1)"));
}

/// all-MiniLM-L6-v2 fine-tuned on (docstring → function) pairs mined from the Python standard
/// library: the training loss falls and NDCG@10 on a held-out split of other files rises; the result
/// loads in `sembed embed`.
#[test]
fn minilm_learns_from_mined_python_pairs() {
    let stdlib = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output();
    let Some(stdlib) = stdlib
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8(o.stdout).unwrap().trim()))
    else {
        common::missing("no python3 standard library to mine");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for sub in ["json", "email", "http", "urllib", "logging"] {
        copy_tree(&stdlib.join(sub), &src.join(sub));
    }
    let train = dir.path().join("train.jsonl");
    let held = dir.path().join("held.jsonl");
    ok(sembed(&[
        "mine",
        p(&src),
        "--out",
        p(&train),
        "--heldout",
        p(&held),
        "--heldout-fraction",
        "0.3",
    ]));
    let take = |path: &Path, n: usize, name: &str| {
        let lines: Vec<String> = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .take(n)
            .map(String::from)
            .collect();
        assert_eq!(lines.len(), n, "enough mined pairs");
        let out = dir.path().join(name);
        std::fs::write(&out, lines.join("\n") + "\n").unwrap();
        out
    };
    // No file in both splits.
    let files = |path: &Path| -> std::collections::HashSet<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["file"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert!(files(&train).is_disjoint(&files(&held)));
    let train = take(&train, 96, "t.jsonl");
    let held = take(&held, 64, "h.jsonl");
    let out = dir.path().join("model");
    let printed = ok(sembed(&[
        "train",
        "--data",
        p(&train),
        "--eval",
        p(&held),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "5e-5",
        "--max-length",
        "128",
        "-o",
        p(&out),
    ]));
    let report: Value = serde_json::from_str(printed.trim()).unwrap();
    let before = report["before"]["ndcg_at_10"].as_f64().unwrap();
    let after = report["epochs"][1]["metrics"]["ndcg_at_10"]
        .as_f64()
        .unwrap();
    let (l1, l2) = (
        report["epochs"][0]["mean_loss"].as_f64().unwrap(),
        report["epochs"][1]["mean_loss"].as_f64().unwrap(),
    );
    println!(
        "MiniLM on mined stdlib pairs: NDCG@10 {before:.4} → {after:.4}, loss {l1:.4} → {l2:.4}"
    );
    assert!(l2 < l1, "training loss fell: {l1} → {l2}");
    assert!(after > before, "held-out NDCG@10 rose: {before} → {after}");
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(saved["epochs"].as_array().unwrap().len(), 2);
    // The trained model embeds; `sembed eval` on it reproduces the final metrics.
    ok(sembed(&["embed", "-m", p(&out), "fn main() {}"]));
    let eval: Value =
        serde_json::from_str(ok(sembed(&["eval", "-m", p(&out), "--data", p(&held)])).trim())
            .unwrap();
    assert!((eval["ndcg_at_10"].as_f64().unwrap() - after).abs() < 1e-6);
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let path = e.path();
        if path.is_dir() {
            copy_tree(&path, &to.join(e.file_name()));
        } else {
            std::fs::copy(&path, to.join(e.file_name())).unwrap();
        }
    }
}

/// LoRA: adapters saved PEFT-style load back (alone, over their base) and equal the merged export;
/// only targeted weights change in the merge; a stopped and resumed LoRA run ends where an
/// uninterrupted one does.
#[test]
fn lora_adapters_save_load_merge_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pairs(dir.path(), 16);
    let model = root().join("tests/fixtures/bert-tiny");
    let common = [
        "--data",
        p(&data),
        "--lora",
        "--lora-rank",
        "4",
        "--lr",
        "1e-2",
        "--batch-size",
        "4",
        "--epochs",
        "2",
    ];
    let out = dir.path().join("full");
    let mut args = vec!["train", "-m", p(&model), "-o", p(&out)];
    args.extend(common);
    let report: Value = serde_json::from_str(ok(sembed(&args)).trim()).unwrap();
    assert_eq!(
        report["memory"]["trainable_parameters"],
        2 * 2 * (4 * 32 + 32 * 4),
        "query+value in 2 layers"
    );
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    let adapter = load_all(&out.join("adapter/adapter_model.safetensors"));
    assert!(
        adapter.contains_key("base_model.model.encoder.layer.1.attention.self.value.lora_B.weight")
    );
    let embed = |m: &Path| -> Vec<f64> {
        common::embedding(&ok(sembed(&["embed", "-m", p(m), "def f(x): return x"])))
    };
    let (a, merged, base) = (embed(&out.join("adapter")), embed(&out), embed(&model));
    assert_eq!((a.len(), merged.len()), (base.len(), base.len()));
    let d = |x: &[f64], y: &[f64]| {
        x.iter()
            .zip(y)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
    };
    assert!(
        d(&a, &merged) <= 1e-6,
        "adapter vs merged: {}",
        d(&a, &merged)
    );
    assert!(d(&a, &base) > 1e-3, "training changed the embedding");
    let before = load_all(&model.join("model.safetensors"));
    let after = load_all(&out.join("model.safetensors"));
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    assert!(after
        .keys()
        .any(|n| n.ends_with("attention.self.query.weight")));
    for (name, v) in &after {
        let targeted = name.ends_with("attention.self.query.weight")
            || name.ends_with("attention.self.value.weight");
        assert_eq!(v != &before[name], targeted, "{name}");
    }
    // Stop after 2 steps, resume from the adapter checkpoint.
    let part = dir.path().join("part");
    let mut args = vec!["train", "-m", p(&model), "-o", p(&part), "--max-steps", "2"];
    args.extend(common);
    ok(sembed(&args));
    let ckpt = part.join("checkpoints/interrupted");
    let mut args = vec!["train", "--resume", p(&ckpt), "-o", p(&part)];
    args.extend(common);
    ok(sembed(&args));
    assert_eq!(
        load_all(&part.join("adapter/adapter_model.safetensors")),
        adapter
    );
}

/// Ctrl-C (SIGINT) during training saves a resumable checkpoint and exits cleanly.
#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_resumable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pairs(dir.path(), 24);
    let model = root().join("tests/fixtures/bert-tiny");
    let out = dir.path().join("out");
    let child = Command::new(env!("CARGO_BIN_EXE_sembed"))
        .args([
            "train",
            "-m",
            p(&model),
            "--data",
            p(&data),
            "-o",
            p(&out),
            "--epochs",
            "100000",
            "--batch-size",
            "4",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training has visibly started (the first epoch checkpoint), bounded in time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !out.join("checkpoints/epoch-1/trainer_state.json").is_file() {
        assert!(
            std::time::Instant::now() < deadline,
            "training did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_str(String::from_utf8(output.stdout).unwrap().trim()).unwrap();
    assert_eq!(report["interrupted"], true);
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoints/interrupted/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert!(state["step"].as_u64().unwrap() >= 6);
    assert!(out
        .join("checkpoints/interrupted/optimizer.safetensors")
        .is_file());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--resume"));
}
