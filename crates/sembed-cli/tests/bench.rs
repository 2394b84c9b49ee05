//! `sembed bench --smoke` runs every section end to end (on the tiny golden BERT, from the repository
//! root so that the fusion check finds its fixtures) and writes a coherent report. Not a timing test:
//! only shapes, counts and invariants are checked.

mod common;

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn smoke_bench_writes_every_section() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_sembed"))
        .current_dir(root())
        .args([
            "bench",
            "--smoke",
            "-m",
            "tests/fixtures/bert-tiny",
            "--corpus",
            "crates",
        ])
        .arg("-o")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let md = String::from_utf8(run.stdout).unwrap();
    for section in [
        "## Stages",
        "## Throughput by batch size",
        "## Scaling",
        "## Int8",
        "## bf16",
        "## Training step",
        "## Gradients",
        "## Fusion shape check",
        "## The real models, estimated",
    ] {
        assert!(md.contains(section), "missing {section} in:\n{md}");
    }
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(r["smoke"], true);
    assert_eq!(r["engine"], "fast-f32");
    assert_eq!(r["corpus"]["texts"], 24);
    let h = &r["headline"];
    assert!(h["texts_per_s"].as_f64().unwrap() > 0.0);
    // The stages add up to no more than the wall time of the call.
    let stages: f64 = ["tokenize", "forward", "pool", "normalize", "fusion"]
        .iter()
        .map(|k| h["stages"][k].as_f64().unwrap())
        .sum();
    assert!(stages <= h["seconds"].as_f64().unwrap() * 1.01 + 1e-3);
    assert!(r["latency"]["p50_ms"].as_f64().unwrap() > 0.0);
    // Activation memory grows with the batch at a fixed length.
    let shapes = r["shapes"].as_array().unwrap();
    let at = |b: u64, l: u64| {
        shapes
            .iter()
            .find(|s| s["batch"] == b && s["length"] == l)
            .map(|s| s["peak_activation_bytes"].as_u64().unwrap())
            .unwrap()
    };
    assert!(at(32, 64) > at(1, 64), "{shapes:?}");
    let q = &r["quantized"];
    assert_eq!(q["engine"], "fast-int8");
    assert!(q["cosine_min"].as_f64().unwrap() > 0.9);
    let b = &r["bf16"];
    assert_eq!(b["engine"], "fast-bf16");
    assert!(b["cosine_min"].as_f64().unwrap() > 0.99);
    assert!(r["machine"]["bf16_kernel"]
        .as_str()
        .unwrap()
        .starts_with(sembed::fast::cpu::active().name()));
    // Gradients and AdamW moments measured on the tensors equal the textbook bytes (full fine-tune).
    let t = &r["training"];
    assert!(t["profile"]["gradients_bytes"].as_u64().unwrap() > 0);
    assert!(t["profile"]["optimizer_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        t["profile"]["gradients_bytes"],
        t["gradients_formula_bytes"]
    );
    assert_eq!(
        t["profile"]["optimizer_bytes"],
        t["optimizer_formula_bytes"]
    );
    // MiniLM trained in full runs the fast training pass; candle's graph is timed beside it and
    // measures the same gradient and optimiser bytes.
    assert_eq!(t["engine"], "fast training pass");
    assert_eq!(
        t["candle"]["profile"]["gradients_bytes"],
        t["gradients_formula_bytes"]
    );
    // The same step in bf16 mixed precision, naming how this CPU computed it.
    assert!(
        t["bf16"]["precision"]
            .as_str()
            .unwrap()
            .starts_with("bf16 mixed precision"),
        "{t}"
    );
    assert!(t["bf16"]["profile"]["loss"].as_f64().unwrap().is_finite());
    // Both measured, at two sizes (the finite-difference total is an extrapolation: not compared).
    let g = r["gradients"].as_array().unwrap();
    assert_eq!(g.len(), 2, "{g:?}");
    for c in g {
        assert!(c["autodiff_s"].as_f64().unwrap() > 0.0);
        assert!(c["fd_per_entry_s"].as_f64().unwrap() > 0.0);
    }
    // The fusion shape check: dimensions add up and vectors are unit.
    let f = &r["fusion_check"];
    let parts: u64 = f["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .sum();
    assert_eq!(f["dimension"].as_u64().unwrap(), parts);
    assert!(f["max_norm_error"].as_f64().unwrap() < 1e-5);
    assert_eq!(r["estimates"]["models"].as_array().unwrap().len(), 2);
    for chart in ["throughput.svg", "scaling.svg", "report.md"] {
        let body = std::fs::read_to_string(out.path().join(chart)).unwrap();
        assert!(!body.is_empty());
    }
}

#[test]
fn quantize_needs_the_fast_engine() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sembed"))
            .current_dir(root())
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "embed",
        "-m",
        "tests/fixtures/bert-tiny",
        "--quantize",
        "int8",
        "--engine",
        "candle",
        "x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--quantize int8"));
    // Every architecture quantises on the fast engine.
    for model in [
        "bert-tiny",
        "qwen2-bidir-tiny",
        "qwen3-causal-tiny",
        "jina-v3-tiny",
    ] {
        let dir = format!("tests/fixtures/{model}");
        let out = run(&["embed", "-m", &dir, "--quantize", "int8", "x"]);
        assert!(
            out.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `SEMBED_CPU_KERNELS` forces each kernel set this CPU has; int8 vectors on every architecture stay
/// close to f32 with each of them (7-bit AVX2 codes included); a set the CPU lacks, or a bogus name,
/// is refused with the variable named.
#[test]
fn int8_runs_on_every_kernel_set_this_cpu_has() {
    let embed = |model: &str, kernels: Option<&str>, extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sembed"));
        cmd.current_dir(root())
            .args(["embed", "-m", &format!("tests/fixtures/{model}")])
            .args(extra)
            .args([
                "fn parse(input: &str) -> Result<Ast>",
                "def main():\n    run()",
            ]);
        match kernels {
            Some(k) => cmd.env("SEMBED_CPU_KERNELS", k),
            None => cmd.env_remove("SEMBED_CPU_KERNELS"),
        };
        cmd.output().unwrap()
    };
    let vectors = |out: &std::process::Output| -> Vec<Vec<f64>> {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(common::embedding)
            .collect()
    };
    let mut ran = 0;
    for kernels in sembed::fast::cpu::Kernels::ALL {
        if !kernels.supported() {
            let out = embed("bert-tiny", Some(kernels.name()), &["--quantize", "int8"]);
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("SEMBED_CPU_KERNELS") && err.contains("cannot run"),
                "{err}"
            );
            continue;
        }
        ran += 1;
        for model in [
            "bert-tiny",
            "qwen2-bidir-tiny",
            "qwen3-causal-tiny",
            "jina-v3-tiny",
        ] {
            let f32 = vectors(&embed(model, None, &[]));
            let int8 = vectors(&embed(model, Some(kernels.name()), &["--quantize", "int8"]));
            assert_eq!(f32.len(), 2);
            assert_eq!(int8.len(), 2);
            for (a, b) in f32.iter().zip(&int8) {
                let cos: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                assert!(cos > 0.98, "{model} {kernels}: cosine {cos}");
            }
            // bf16 through the same CLI: bf16 arithmetic on amx / avx512-bf16, widened elsewhere.
            let bf16 = vectors(&embed(model, Some(kernels.name()), &["--dtype", "bf16"]));
            assert_eq!(bf16.len(), 2);
            for (a, b) in f32.iter().zip(&bf16) {
                let cos: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                assert!(cos > 0.999, "{model} {kernels} bf16: cosine {cos}");
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        assert!(ran >= 2, "the AVX2 set too");
    }
    let out = embed("bert-tiny", Some("sse9"), &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SEMBED_CPU_KERNELS=sse9"));
}
