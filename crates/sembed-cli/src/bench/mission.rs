//! The mission's models at their real widths, side by side with PyTorch: random-weight models at
//! the published widths of Qwen3-Embedding-0.6B, Qodo-Embed-1-1.5B and jina-embeddings-v3 (a few
//! layers deep: every layer costs the same), built by bench/peer_shapes.py so that both engines load
//! the same safetensors file, run on the same code texts. For each: sembed f32 and bf16 texts/s,
//! PyTorch f32 texts/s (transformers; Jina through a port checked against the golden outputs), the
//! largest differences (fast engine against candle, bf16 against f32, PyTorch against sembed), the
//! weights' bytes and the fraction of the GEMM peak reached; int8 texts/s with the cosine of its
//! vectors to f32; the peak RSS of `sembed embed` in f32, bf16 and int8 (each in a child process);
//! then the Qodo ⊕ Jina fusion, measured at this depth and extrapolated per layer to the full
//! 28 + 24 layers.

use super::throughput;
use anyhow::{bail, Context, Result};
use sembed::embed::{Embed, EmbedOptions};
use sembed::fast::{Engine, Precision};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Serialize, Clone)]
pub struct MissionShape {
    pub name: String,
    pub layers: usize,
    pub full_layers: usize,
    pub texts: usize,
    pub tokens: usize,
    pub sembed_f32_texts_per_s: f64,
    pub sembed_bf16_texts_per_s: f64,
    pub sembed_int8_texts_per_s: f64,
    pub weight_bytes_f32: usize,
    pub weight_bytes_bf16: usize,
    pub weight_bytes_int8: usize,
    /// Cosine between the int8 and the f32 vector of each text: smallest and mean.
    pub int8_cosine_min: f64,
    pub int8_cosine_mean: f64,
    /// Peak RSS of `sembed embed` over the same texts, one child process per precision (MiB).
    pub peak_rss_mb_f32: Option<f64>,
    pub peak_rss_mb_bf16: Option<f64>,
    pub peak_rss_mb_int8: Option<f64>,
    /// Fast engine against the candle reference, f32, on the first texts.
    pub max_abs_diff_vs_candle: f64,
    pub max_abs_diff_bf16_vs_f32: f64,
    /// Achieved GFLOP/s of sembed f32, and the engine's f32 GEMM rate measured here (its peak).
    pub gflops_f32: f64,
    pub gemm_peak_gflops: f64,
    pub torch: Option<TorchRun>,
    pub torch_bf16_autocast: Option<TorchBf16Run>,
}

#[derive(Serialize, Clone)]
pub struct TorchRun {
    pub texts_per_s: f64,
    pub max_abs_diff_vs_sembed: f64,
    pub peak_rss_mb: f64,
    pub version: String,
    /// sembed f32 texts/s over this run's texts/s.
    pub ratio_f32: f64,
}

/// PyTorch under `torch.autocast("cpu", bfloat16)` at one shape.
#[derive(Serialize, Clone)]
pub struct TorchBf16Run {
    pub texts_per_s: f64,
    pub max_abs_diff_vs_sembed: f64,
    /// sembed bf16 texts/s over PyTorch bf16 autocast texts/s.
    pub ratio_bf16: f64,
    /// sembed int8 texts/s over PyTorch bf16 autocast texts/s.
    pub ratio_int8: f64,
}

#[derive(Serialize, Clone)]
pub struct MissionFusion {
    pub dimension: usize,
    pub f32_texts_per_s: f64,
    pub bf16_texts_per_s: f64,
    pub weight_bytes_f32: usize,
    pub weight_bytes_bf16: usize,
    /// Extrapolated to the full depth: per-text time of each part × full layers / measured layers.
    pub full_depth_f32_texts_per_s: f64,
    pub full_depth_bf16_texts_per_s: f64,
    /// PyTorch: the two models run one after the other (no fused runtime exists), from their runs.
    pub torch_texts_per_s: Option<f64>,
    pub torch_full_depth_texts_per_s: Option<f64>,
}

#[derive(Serialize, Clone)]
pub struct Mission {
    pub shapes: Vec<MissionShape>,
    pub fusion: Option<MissionFusion>,
}

struct ShapeSpec {
    name: &'static str,
    config: &'static str,
    fixture: &'static str,
    arch: &'static str,
    task: Option<&'static str>,
}

const SHAPES: [ShapeSpec; 3] = [
    ShapeSpec {
        name: "Qwen3-Embedding-0.6B",
        config: "qwen3-embedding-0.6b",
        fixture: "qwen3-causal-tiny",
        arch: "qwen3",
        task: None,
    },
    ShapeSpec {
        name: "Qodo-Embed-1-1.5B",
        config: "qodo-embed-1-1.5b",
        fixture: "qwen2-bidir-tiny",
        arch: "qwen2",
        task: None,
    },
    ShapeSpec {
        name: "jina-embeddings-v3",
        config: "jina-embeddings-v3",
        fixture: "jina-v3-tiny",
        arch: "jina",
        task: Some("retrieval.passage"),
    },
];

/// Multiply-adds per token of one layer, from a config.json: projections, MLP, and attention at
/// sequence length `len`.
fn layer_flops(cfg: &serde_json::Value, len: usize) -> f64 {
    let g = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as f64;
    let (h, heads, inter) = (
        g("hidden_size"),
        g("num_attention_heads"),
        g("intermediate_size"),
    );
    let kv = if g("num_key_value_heads") > 0.0 {
        g("num_key_value_heads")
    } else {
        heads
    };
    let hd = if g("head_dim") > 0.0 {
        g("head_dim")
    } else {
        h / heads
    };
    let gated = cfg
        .get("model_type")
        .and_then(|v| v.as_str())
        .is_some_and(|t| t.starts_with("qwen"));
    let proj = h * (heads + 2.0 * kv) * hd + heads * hd * h;
    let mlp = if gated {
        3.0 * h * inter
    } else {
        2.0 * h * inter
    };
    2.0 * (proj + mlp) + 4.0 * len as f64 * heads * hd
}

fn python_json(python: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = std::process::Command::new(python)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} {}", python.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({})",
            python.display(),
            args.join(" "),
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last).with_context(|| format!("reading JSON from {}", args[0]))
}

/// Run the comparison. `python` (with bench/requirements.txt) builds the models and runs
/// PyTorch; without it (smoke runs) the tiny fixtures stand in, with no peer.
pub fn run(
    python: Option<&Path>,
    real_configs: &Path,
    texts: &[String],
    layers: usize,
    repeat: usize,
    out: &Path,
) -> Result<Mission> {
    let cpu = sembed::device::cpu();
    let texts_path = out.join("mission-texts.json");
    std::fs::write(&texts_path, serde_json::to_string(texts)?)?;
    // The same texts as JSONL, for the `sembed embed` children that measure peak RSS.
    let jsonl = out.join("mission-texts.jsonl");
    let lines: Vec<String> = texts
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n") + "\n")?;
    let mut shapes = Vec::new();
    let mut parts: Vec<(sembed::Embedder, sembed::Embedder, usize, usize)> = Vec::new();
    for spec in &SHAPES {
        let fixture = Path::new("tests/fixtures").join(spec.fixture);
        let (dir, full_layers) = match python {
            Some(py) => {
                let config = real_configs.join(spec.config).join("config.json");
                let full: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(&config)
                        .with_context(|| format!("reading {}", config.display()))?,
                )?;
                let dir = out.join("shapes").join(spec.config);
                eprintln!(
                    "sembed bench: building {} widths, {layers} layers",
                    spec.name
                );
                let status = std::process::Command::new(py)
                    .args(["bench/peer_shapes.py", "make", "--config"])
                    .arg(&config)
                    .arg("--fixture")
                    .arg(&fixture)
                    .args(["--layers", &layers.to_string(), "--seed", "1", "--out"])
                    .arg(&dir)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .context("running bench/peer_shapes.py make")?;
                if !status.success() {
                    bail!("bench/peer_shapes.py make failed for {}", spec.name);
                }
                (
                    dir,
                    full["num_hidden_layers"].as_u64().unwrap_or(0) as usize,
                )
            }
            None => (fixture, layers),
        };
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let measured_layers = cfg["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
        eprintln!("sembed bench: {} f32", spec.name);
        let e32 = sembed::Embedder::load(&dir, sembed::DType::F32, &cpu)?;
        let opts = EmbedOptions {
            task: spec.task.map(str::to_string),
            max_length: Some(256.min(e32.max_length())),
            batch_size: 32,
            ..Default::default()
        };
        let lens = e32.count_tokens(texts, &opts)?;
        let tokens: usize = lens.iter().sum();
        let (t32, v32) = throughput(&e32, texts, &opts, tokens, repeat)?;
        eprintln!("sembed bench: {} bf16", spec.name);
        let e16 = sembed::Embedder::load(&dir, sembed::DType::BF16, &cpu)?;
        let (t16, v16) = throughput(&e16, texts, &opts, tokens, repeat)?;
        eprintln!(
            "sembed bench: {} int8 ({} kernels)",
            spec.name,
            sembed::fast::cpu::active()
        );
        let e8 = sembed::Embedder::load_with(
            &dir,
            sembed::DType::F32,
            &cpu,
            Engine::Fast(Precision::Int8),
        )?;
        let (t8, v8) = throughput(&e8, texts, &opts, tokens, repeat)?;
        let weight_bytes_int8 = e8.backend().weight_bytes().unwrap_or(0);
        drop(e8);
        let (int8_cosine_min, int8_cosine_mean) = cosines(&v8, &v32);
        let max_len = opts.max_length.unwrap_or(256).to_string();
        let rss = |extra: &[&str]| {
            let mut args = vec!["--max-length", max_len.as_str()];
            args.extend_from_slice(extra);
            child_peak_rss_mb(&dir, &jsonl, spec.task, &args)
        };
        let peak_rss_mb_f32 = rss(&[])?;
        let peak_rss_mb_bf16 = rss(&["--dtype", "bf16"])?;
        let peak_rss_mb_int8 = rss(&["--quantize", "int8"])?;
        let reference =
            sembed::Embedder::load_with(&dir, sembed::DType::F32, &cpu, Engine::Candle)?;
        let n_ref = texts.len().min(8);
        let vr = reference.embed(&texts[..n_ref], &opts)?;
        drop(reference);
        let flops: f64 = lens
            .iter()
            .map(|&l| l as f64 * layer_flops(&cfg, l))
            .sum::<f64>()
            * measured_layers as f64;
        let h = cfg["hidden_size"].as_u64().unwrap_or(1) as usize;
        let inter = cfg["intermediate_size"].as_u64().unwrap_or(1) as usize;
        let peak = sembed::fast::linear::peak_gflops(1024, h, 2 * inter);
        let mut torch_bf16 = None;
        let torch = match python {
            Some(py) => {
                eprintln!("sembed bench: {} PyTorch", spec.name);
                let ours = out.join(format!("mission-ours-{}.json", spec.config));
                std::fs::write(&ours, serde_json::to_string(&v32)?)?;
                let threads = rayon::current_num_threads().to_string();
                let mut args = vec![
                    "bench/peer_shapes.py".to_string(),
                    "run".into(),
                    "--model".into(),
                    dir.display().to_string(),
                    "--arch".into(),
                    spec.arch.into(),
                    "--texts".into(),
                    texts_path.display().to_string(),
                    "--max-len".into(),
                    "256".into(),
                    "--batch".into(),
                    "32".into(),
                    "--repeat".into(),
                    repeat.to_string(),
                    "--threads".into(),
                    threads,
                    "--ours".into(),
                    ours.display().to_string(),
                ];
                if let Some(t) = spec.task {
                    args.extend(["--task".into(), t.into()]);
                }
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                let r = python_json(py, &refs)?;
                eprintln!("sembed bench: {} PyTorch bf16 autocast", spec.name);
                let mut refs_bf16 = refs.clone();
                refs_bf16.push("--autocast");
                let rb = python_json(py, &refs_bf16)?;
                let bf16_tps = rb["texts_per_s"]
                    .as_f64()
                    .context("PyTorch bf16 texts_per_s")?;
                torch_bf16 = Some(TorchBf16Run {
                    texts_per_s: bf16_tps,
                    max_abs_diff_vs_sembed: rb["max_abs_diff_vs_sembed"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    ratio_bf16: t16.texts_per_s / bf16_tps,
                    ratio_int8: t8.texts_per_s / bf16_tps,
                });
                let tps = r["texts_per_s"].as_f64().context("PyTorch texts_per_s")?;
                // sembed again after PyTorch (the machine may have drifted): the best counts.
                let (again, _) = throughput(&e32, texts, &opts, tokens, repeat)?;
                let ours_tps = t32.texts_per_s.max(again.texts_per_s);
                Some((
                    TorchRun {
                        texts_per_s: tps,
                        max_abs_diff_vs_sembed: r["max_abs_diff_vs_sembed"]
                            .as_f64()
                            .unwrap_or(f64::NAN),
                        peak_rss_mb: r["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
                        version: r["version"].as_str().unwrap_or("").to_string(),
                        ratio_f32: ours_tps / tps,
                    },
                    ours_tps,
                ))
            }
            None => None,
        };
        let f32_tps = torch.as_ref().map_or(t32.texts_per_s, |(_, o)| *o);
        let shape = MissionShape {
            name: spec.name.into(),
            layers: measured_layers,
            full_layers,
            texts: texts.len(),
            tokens,
            sembed_f32_texts_per_s: f32_tps,
            sembed_bf16_texts_per_s: t16.texts_per_s,
            sembed_int8_texts_per_s: t8.texts_per_s,
            weight_bytes_f32: e32.backend().weight_bytes().unwrap_or(0),
            weight_bytes_bf16: e16.backend().weight_bytes().unwrap_or(0),
            weight_bytes_int8,
            int8_cosine_min,
            int8_cosine_mean,
            peak_rss_mb_f32,
            peak_rss_mb_bf16,
            peak_rss_mb_int8,
            max_abs_diff_vs_candle: max_abs(&v32[..n_ref], &vr),
            max_abs_diff_bf16_vs_f32: max_abs(&v16, &v32),
            gflops_f32: flops / (texts.len() as f64 / f32_tps) / 1e9,
            gemm_peak_gflops: peak,
            torch: torch.map(|(t, _)| t),
            torch_bf16_autocast: torch_bf16,
        };
        eprintln!(
            "sembed bench: {}: sembed f32 {:.2} texts/s{}",
            spec.name,
            shape.sembed_f32_texts_per_s,
            shape.torch.as_ref().map_or(String::new(), |t| format!(
                ", PyTorch {:.2} ({:.2}×)",
                t.texts_per_s, t.ratio_f32
            ))
        );
        if spec.arch != "qwen3" {
            parts.push((e32, e16, measured_layers, full_layers));
        }
        shapes.push(shape);
    }
    let fusion = fusion(&mut parts, &shapes, texts, repeat)?;
    Ok(Mission { shapes, fusion })
}

/// Smallest and mean cosine between corresponding vectors.
fn cosines(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, f64) {
    let cos: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
            let norm = |v: &[f32]| v.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            dot / (norm(x) * norm(y)).max(f64::MIN_POSITIVE)
        })
        .collect();
    (
        cos.iter().copied().fold(f64::INFINITY, f64::min),
        cos.iter().sum::<f64>() / cos.len().max(1) as f64,
    )
}

/// Peak RSS (MiB) of `sembed embed` over `jsonl` with `extra` flags, in a child process of this
/// binary: its VmHWM, read from /proc every 10 ms until it exits (the last reading counts; the peak
/// is reached during the forward passes, long before the exit). Not `wait4`'s `ru_maxrss`: on Linux
/// that keeps the high-water mark of the forked copy of this process, so it reads as this process's
/// size. `None` without /proc.
fn child_peak_rss_mb(
    dir: &Path,
    jsonl: &Path,
    task: Option<&str>,
    extra: &[&str],
) -> Result<Option<f64>> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("embed")
        .arg("-m")
        .arg(dir)
        .arg("-i")
        .arg(jsonl)
        .args(["--batch-size", "32", "-o", "/dev/null"])
        .args(extra)
        .stdout(std::process::Stdio::null());
    if let Some(t) = task {
        cmd.args(["--task", t]);
    }
    let mut child = cmd.spawn().context("starting sembed embed")?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib: Option<u64> = None;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak_kib = Some(peak_kib.unwrap_or(0).max(kib));
            }
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    if !status.success() {
        bail!("sembed embed {} failed ({status})", extra.join(" "));
    }
    Ok(peak_kib.map(|k| k as f64 / 1024.0))
}

fn max_abs(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs() as f64))
        .fold(0.0, f64::max)
}

/// Qodo ⊕ Jina at the measured depth, f32 and bf16, and per layer extrapolated to full depth.
fn fusion(
    parts: &mut Vec<(sembed::Embedder, sembed::Embedder, usize, usize)>,
    shapes: &[MissionShape],
    texts: &[String],
    repeat: usize,
) -> Result<Option<MissionFusion>> {
    if parts.len() != 2 {
        return Ok(None);
    }
    let (jina, qodo) = (
        parts.pop().expect("two parts"),
        parts.pop().expect("two parts"),
    );
    let depth = [(qodo.2, qodo.3), (jina.2, jina.3)];
    let bytes32 =
        qodo.0.backend().weight_bytes().unwrap_or(0) + jina.0.backend().weight_bytes().unwrap_or(0);
    let bytes16 =
        qodo.1.backend().weight_bytes().unwrap_or(0) + jina.1.backend().weight_bytes().unwrap_or(0);
    let f32 = sembed::Fusion::new(
        "qodo+jina f32",
        vec![
            (Box::new(qodo.0) as Box<dyn Embed>, 1.0),
            (Box::new(jina.0), 1.0),
        ],
    )?;
    let bf16 = sembed::Fusion::new(
        "qodo+jina bf16",
        vec![
            (Box::new(qodo.1) as Box<dyn Embed>, 1.0),
            (Box::new(jina.1), 1.0),
        ],
    )?;
    let opts = EmbedOptions {
        max_length: Some(256.min(f32.max_length())),
        batch_size: 32,
        ..Default::default()
    };
    let tokens: usize = f32.count_tokens(texts, &opts)?.iter().sum();
    eprintln!("sembed bench: fusion f32, bf16");
    let (t32, v) = throughput(&f32, texts, &opts, tokens, repeat)?;
    if v.first().map(Vec::len) != Some(f32.dimension()) {
        bail!("fused vectors of the wrong dimension");
    }
    let (t16, _) = throughput(&bf16, texts, &opts, tokens, repeat)?;
    // Per-text time at full depth: each part's per-text time scaled by full / measured layers.
    let full = |tps: [f64; 2]| -> f64 {
        let per_text: f64 = tps
            .iter()
            .zip(depth)
            .map(|(t, (m, f))| f as f64 / m.max(1) as f64 / t)
            .sum();
        1.0 / per_text
    };
    let (q, j) = (&shapes[1], &shapes[2]);
    let torch = q
        .torch
        .as_ref()
        .zip(j.torch.as_ref())
        .map(|(a, b)| [a.texts_per_s, b.texts_per_s]);
    Ok(Some(MissionFusion {
        dimension: f32.dimension(),
        f32_texts_per_s: t32.texts_per_s,
        bf16_texts_per_s: t16.texts_per_s,
        weight_bytes_f32: bytes32,
        weight_bytes_bf16: bytes16,
        full_depth_f32_texts_per_s: full([q.sembed_f32_texts_per_s, j.sembed_f32_texts_per_s]),
        full_depth_bf16_texts_per_s: full([q.sembed_bf16_texts_per_s, j.sembed_bf16_texts_per_s]),
        torch_texts_per_s: torch.map(|[a, b]| 1.0 / (1.0 / a + 1.0 / b)),
        torch_full_depth_texts_per_s: torch.map(full),
    }))
}

/// Where the published configs are: `--real-configs`, else ../shared/real-configs.
pub fn real_configs_dir(arg: Option<&Path>) -> PathBuf {
    arg.map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("../shared/real-configs"))
}
