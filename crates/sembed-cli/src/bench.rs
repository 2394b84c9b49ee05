//! `sembed bench`: where the time and memory go, by stage, batch size and length, for inference,
//! quantised inference and training, with the peers (sentence-transformers, ONNX Runtime) run on the
//! same texts in the same run. Writes report.json, report.md and SVG charts; prints the Markdown.
//!
//! Nothing here is a pass/fail test: numbers on shared machines drift, so every comparison is a ratio
//! between runs made here, now, on the same texts.

mod mission;
mod report;

use crate::alloc;
use crate::EngineArgs;
use anyhow::{bail, Context, Result};
use sembed::embed::{Embed, EmbedOptions, Stages};
use sembed::fast::{Engine, Precision};
use sembed::train::data::Example;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model as for `embed`: a folder, hf:ORG/NAME, several (a fusion) or a fusion .toml. Default:
    /// all-MiniLM-L6-v2.
    #[arg(long = "model", short = 'm')]
    models: Vec<String>,
    /// Directories whose .rs and .py files are cut into code texts of 4 to 12 lines (repeatable;
    /// default: the current directory).
    #[arg(long)]
    corpus: Vec<PathBuf>,
    /// Take the texts from this file instead (JSONL with a "text" field).
    #[arg(long)]
    texts_file: Option<String>,
    /// Texts to embed.
    #[arg(long, default_value_t = 320)]
    count: usize,
    #[arg(long, default_value_t = 256)]
    max_length: usize,
    /// Batch size of the headline measurement (and of the peers).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Batch sizes of the throughput table.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32, 64])]
    batch_sizes: Vec<usize>,
    /// Single-text requests timed for the latency percentiles.
    #[arg(long, default_value_t = 50)]
    latency_runs: usize,
    /// Timed repetitions of each throughput measurement; the best counts (for the peers too).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Source tree to mine (docstring → function) pairs from, for the f32 against int8 retrieval
    /// check (default: the corpus directories).
    #[arg(long)]
    eval_src: Vec<PathBuf>,
    /// At most this many mined pairs are evaluated.
    #[arg(long, default_value_t = 1000)]
    eval_pairs: usize,
    /// A Python with bench/requirements.txt installed: runs bench/peer_inference.py
    /// (sentence-transformers, a plain PyTorch loop, ONNX Runtime, OpenVINO, CTranslate2) on the same
    /// texts, and bench/peer_shapes.py (PyTorch at the mission's widths).
    #[arg(long)]
    peers: Option<PathBuf>,
    /// The published model configs (config.json of Qodo-Embed-1-1.5B and jina-embeddings-v3) for
    /// the large-model estimate; built-in copies of their sizes otherwise.
    #[arg(long)]
    real_configs: Option<PathBuf>,
    /// Two model folders to fuse for the fusion shape check (default: the test fixtures
    /// qwen2-bidir-tiny and jina-v3-tiny widened to the real Qodo and Jina widths, when present).
    #[arg(long, num_args = 2)]
    fusion_check: Vec<PathBuf>,
    /// Layers of the mission-shape models (Qwen3-Embedding-0.6B, Qodo-Embed-1-1.5B and
    /// jina-embeddings-v3 widths, random weights) compared with PyTorch under --peers.
    #[arg(long, default_value_t = 2)]
    mission_layers: usize,
    /// Code texts embedded by the mission-shape models.
    #[arg(long, default_value_t = 64)]
    mission_texts: usize,
    #[arg(long)]
    no_mission: bool,
    #[arg(long)]
    no_training: bool,
    #[arg(long)]
    no_scaling: bool,
    #[arg(long)]
    no_quantized: bool,
    /// Tiny sizes everywhere: checks that every section runs (CI); the numbers mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Where report.json, report.md and the charts go.
    #[arg(long, short = 'o', default_value = "bench/results")]
    out: PathBuf,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    pub model: String,
    pub engine: String,
    pub dimension: usize,
    pub max_length: usize,
    pub corpus: Corpus,
    pub load_s: f64,
    pub weights: WeightsMemory,
    /// The headline: all texts at the configured batch size, best of `repeat`.
    pub headline: Throughput,
    pub by_batch: Vec<Throughput>,
    pub latency: Latency,
    /// Throughput and peak activation memory by batch size and length.
    pub shapes: Vec<Shape>,
    pub quantized: Option<Quantized>,
    /// The same measures with bf16 weights (bf16 arithmetic where the CPU has bf16 dot products).
    pub bf16: Option<Quantized>,
    pub training: Option<Training>,
    pub gradients: Option<Vec<sembed::train::gradcheck::GradCost>>,
    pub fusion_check: Option<FusionCheck>,
    pub estimates: Option<Estimates>,
    pub peers: Option<Peers>,
    pub mission: Option<mission::Mission>,
    pub smoke: bool,
}

#[derive(Serialize)]
pub struct Machine {
    pub cpu: String,
    pub threads: usize,
    pub os: String,
    pub sembed: String,
    /// The CPU's vector features (`sembed inspect` names them the same way).
    pub cpu_features: String,
    /// The kernel set in force (SEMBED_CPU_KERNELS or detected) and its int8 format.
    pub int8_kernel: String,
    pub bf16_kernel: String,
}

#[derive(Serialize)]
pub struct Corpus {
    pub source: String,
    pub texts: usize,
    pub tokens: usize,
    pub mean_tokens: f64,
    pub max_tokens: usize,
}

#[derive(Serialize)]
pub struct WeightsMemory {
    /// Heap allocated by loading the model (measured).
    pub heap_bytes: usize,
}

#[derive(Serialize, Clone)]
pub struct Throughput {
    pub batch: usize,
    pub seconds: f64,
    pub texts_per_s: f64,
    pub tokens_per_s: f64,
    pub stages: StageSeconds,
}

#[derive(Serialize, Clone, Copy)]
pub struct StageSeconds {
    pub tokenize: f64,
    pub forward: f64,
    pub pool: f64,
    pub normalize: f64,
    pub fusion: f64,
}

impl From<Stages> for StageSeconds {
    fn from(s: Stages) -> Self {
        StageSeconds {
            tokenize: s.tokenize.as_secs_f64(),
            forward: s.forward.as_secs_f64(),
            pool: s.pool.as_secs_f64(),
            normalize: s.normalize.as_secs_f64(),
            fusion: s.fusion.as_secs_f64(),
        }
    }
}

#[derive(Serialize)]
pub struct Latency {
    pub runs: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_tokens: f64,
}

#[derive(Serialize, Clone)]
pub struct Shape {
    pub batch: usize,
    pub length: usize,
    pub tokens_per_s: f64,
    pub texts_per_s: f64,
    /// Heap high-water mark of one call above what was live before it (measured).
    pub peak_activation_bytes: usize,
}

#[derive(Serialize)]
pub struct Quantized {
    /// `int8` or `bf16`.
    pub precision: String,
    pub engine: String,
    pub weights_heap_bytes: usize,
    pub headline: Throughput,
    pub speedup_vs_f32: f64,
    pub cosine_min: f64,
    pub cosine_mean: f64,
    /// Largest |difference| of any value between these and the f32 unit vectors.
    pub max_abs_diff_vs_f32: f64,
    pub retrieval: Option<Retrieval>,
}

#[derive(Serialize)]
pub struct Retrieval {
    pub source: String,
    pub pairs: usize,
    pub ndcg_at_10_f32: f64,
    /// At the reduced precision (int8 or bf16).
    pub ndcg_at_10_reduced: f64,
    pub mrr_at_10_f32: f64,
    pub mrr_at_10_reduced: f64,
}

#[derive(Serialize)]
pub struct Training {
    /// What ran the step: the fast training pass or candle's autodiff graph.
    pub engine: String,
    pub batch: usize,
    pub max_length: usize,
    pub parameters: usize,
    pub trainable_parameters: usize,
    pub profile: sembed::train::trainer::StepProfile,
    pub gradients_formula_bytes: usize,
    pub optimizer_formula_bytes: usize,
    /// Heap high-water mark of the step above the loaded trainer: activations kept for the backward
    /// pass, gradients and temporaries (measured).
    pub step_peak_above_model_bytes: usize,
    /// The same step on candle's graph, in the same run, when the fast training pass ran the step
    /// above: the peer it replaces.
    pub candle: Option<CandleStep>,
    /// The same step in bf16 mixed precision (`sembed train --precision bf16`), in the same run,
    /// when the fast training pass ran the step above.
    pub bf16: Option<Bf16Step>,
}

#[derive(Serialize)]
pub struct Bf16Step {
    /// How it computed on this CPU, e.g. `bf16 mixed precision on amx`.
    pub precision: String,
    pub profile: sembed::train::trainer::StepProfile,
}

#[derive(Serialize)]
pub struct CandleStep {
    pub profile: sembed::train::trainer::StepProfile,
    pub step_peak_above_model_bytes: usize,
}

#[derive(Serialize)]
pub struct FusionCheck {
    pub models: Vec<String>,
    pub dimension: usize,
    pub parts: Vec<usize>,
    pub max_norm_error: f64,
    pub shapes: Vec<Shape>,
}

#[derive(Serialize)]
pub struct Estimates {
    /// Measured f32 GEMM rate of the candle path (which runs Qwen2 and Jina) on each model's MLP shape.
    pub models: Vec<Estimate>,
    pub note: &'static str,
}

#[derive(Serialize)]
pub struct Estimate {
    pub name: String,
    pub parameters: u64,
    pub gemm_gflops: f64,
    pub weights_f32_bytes: u64,
    pub weights_bf16_bytes: u64,
    pub by_length: Vec<EstimateAt>,
}

#[derive(Serialize)]
pub struct EstimateAt {
    pub length: usize,
    pub gflop_per_text: f64,
    pub seconds_per_text: f64,
    /// Largest transient buffers of one layer at batch 32 (MLP and attention scores), f32.
    pub activation_bytes_batch32: u64,
}

#[derive(Serialize)]
pub struct Peers {
    pub python: String,
    /// sembed's texts/s used for the ratios: best of its runs before and after the peers.
    pub sembed_texts_per_s: f64,
    pub sembed_int8_texts_per_s: Option<f64>,
    pub sembed_bf16_texts_per_s: Option<f64>,
    pub results: Vec<Peer>,
}

#[derive(Serialize)]
pub struct Peer {
    pub name: String,
    pub texts_per_s: f64,
    pub max_abs_diff_vs_sembed: f64,
    /// sembed f32 throughput / this peer's.
    pub ratio: f64,
    /// sembed int8 throughput / this peer's.
    pub int8_ratio: Option<f64>,
    /// sembed bf16 throughput / this peer's.
    pub bf16_ratio: Option<f64>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

pub fn run(args: BenchArgs) -> Result<()> {
    let mut args = args;
    if args.smoke {
        args.count = args.count.min(24);
        args.batch_sizes = vec![1, 8];
        args.batch_size = args.batch_size.min(8);
        args.latency_runs = args.latency_runs.min(5);
        args.repeat = 1;
        args.eval_pairs = args.eval_pairs.min(40);
        args.max_length = args.max_length.min(64);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let engine = args.engine.engine()?;
    let corpus_dirs = if args.corpus.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        args.corpus.clone()
    };
    let (texts, source) = match &args.texts_file {
        Some(f) => (crate::input::read_texts(f, false)?, f.clone()),
        None => (code_texts(&corpus_dirs)?, dirs_label(&corpus_dirs)),
    };
    let texts: Vec<String> = texts.into_iter().take(args.count).collect();
    if texts.is_empty() {
        bail!("no texts to benchmark on: no .rs or .py files under {source}");
    }
    eprintln!("sembed bench: {} texts from {source}", texts.len());

    let device = sembed::device::cpu();
    let before = alloc::live();
    let t = Instant::now();
    let model = sembed::fusion_config::load(&args.models, sembed::DType::F32, &device, engine)
        .context("loading the model")?;
    let load_s = secs(t.elapsed());
    let weights_heap = alloc::live().saturating_sub(before);
    let max_length = args.max_length.min(model.max_length());
    let opts = EmbedOptions {
        max_length: Some(max_length),
        batch_size: args.batch_size,
        ..Default::default()
    };
    let lens = model.count_tokens(&texts, &opts)?;
    let tokens: usize = lens.iter().sum();
    let corpus = Corpus {
        source,
        texts: texts.len(),
        tokens,
        mean_tokens: tokens as f64 / texts.len() as f64,
        max_tokens: lens.iter().copied().max().unwrap_or(0),
    };
    eprintln!(
        "sembed bench: {} ({}), headline",
        model.name(),
        model.engine()
    );
    let (headline, vectors) = throughput(model.as_ref(), &texts, &opts, tokens, args.repeat)?;

    let mut by_batch = Vec::new();
    for &b in &args.batch_sizes {
        eprintln!("sembed bench: batch {b}");
        let o = EmbedOptions {
            batch_size: b,
            ..opts.clone()
        };
        by_batch.push(throughput(model.as_ref(), &texts, &o, tokens, args.repeat)?.0);
    }

    let latency = latency(model.as_ref(), &texts, &lens, &opts, args.latency_runs)?;

    let shapes = if args.no_scaling {
        Vec::new()
    } else {
        eprintln!("sembed bench: batch × length grid");
        shape_grid(
            model.as_ref(),
            &texts,
            &[1, 8, 32],
            &lengths(max_length),
            args.smoke,
        )?
    };

    let single_dir = single_model_dir(&args.models)?;
    let fast_bert = model.engine() == "fast-f32";
    // int8, then bf16: the same measures against the f32 run above.
    let eval_dirs = if args.eval_src.is_empty() {
        corpus_dirs.clone()
    } else {
        args.eval_src.clone()
    };
    let reduced = |precision: Precision, kernel: String| -> Result<Option<Quantized>> {
        if args.no_quantized || !fast_bert {
            return Ok(None);
        }
        eprintln!("sembed bench: {precision} ({kernel})");
        let (m, o) = (model.as_ref(), &opts);
        reduced_precision(
            &args, m, &texts, o, tokens, &vectors, &headline, &eval_dirs, precision,
        )
        .map(Some)
    };
    let quantized = reduced(Precision::Int8, sembed::fast::quant::int8_description())?;
    let bf16 = reduced(Precision::Bf16, sembed::fast::cpu::bf16_description())?;

    let training = match (&single_dir, args.no_training) {
        (Some(dir), false) => {
            eprintln!("sembed bench: training step");
            Some(training(dir, &texts, args.smoke)?)
        }
        _ => None,
    };
    let gradients = if args.no_training {
        None
    } else {
        eprintln!("sembed bench: autodiff against finite differences");
        let (widths, seq): (&[usize], usize) = if args.smoke {
            (&[16, 32], 8)
        } else {
            (&[32, 64, 128, 256], 32)
        };
        Some(sembed::train::gradcheck::cost_curve(widths, 2, 4, seq)?)
    };

    let fusion_check = if args.no_scaling {
        None
    } else {
        fusion_check(&args)?
    };
    let estimates = if args.no_scaling {
        None
    } else {
        eprintln!("sembed bench: large-model estimate");
        Some(estimates(args.real_configs.as_deref(), args.smoke)?)
    };

    let peers = match (&args.peers, &single_dir) {
        (Some(py), Some(dir)) => {
            eprintln!("sembed bench: peers");
            Some(peers(
                py,
                dir,
                &args,
                model.as_ref(),
                &texts,
                &opts,
                tokens,
                &vectors,
                &headline,
                quantized.as_ref(),
                bf16.as_ref(),
            )?)
        }
        (Some(_), None) => bail!("--peers compares one model folder, not a fusion"),
        _ => None,
    };

    // The mission's shapes against PyTorch (with --peers); in smoke runs, the tiny fixtures alone.
    let mission = if args.no_mission || (args.peers.is_none() && !args.smoke) {
        None
    } else {
        eprintln!("sembed bench: the mission's models at real widths");
        let n = if args.smoke { 4 } else { args.mission_texts };
        let shape_texts: Vec<String> = texts.iter().take(n).cloned().collect();
        Some(mission::run(
            args.peers.as_deref(),
            &mission::real_configs_dir(args.real_configs.as_deref()),
            &shape_texts,
            args.mission_layers,
            args.repeat,
            &args.out,
        )?)
    };

    let report = Report {
        machine: machine(),
        model: model.name().to_string(),
        engine: model.engine(),
        dimension: model.dimension(),
        max_length,
        corpus,
        load_s,
        weights: WeightsMemory {
            heap_bytes: weights_heap,
        },
        headline,
        by_batch,
        latency,
        shapes,
        quantized,
        bf16,
        training,
        gradients,
        fusion_check,
        estimates,
        peers,
        mission,
        smoke: args.smoke,
    };
    report::write(&report, &args.out)?;
    Ok(())
}

fn dirs_label(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Code texts from `.rs` and `.py` files: each file cut every 12 lines into chunks of 4 to 12 lines
/// (lengths vary with the position), files in sorted order, directories in the given order.
pub fn code_texts(dirs: &[PathBuf]) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for dir in dirs {
        let mut files = Vec::new();
        walk(dir, &mut files).with_context(|| format!("reading {}", dir.display()))?;
        files.sort();
        for f in files {
            let Ok(text) = std::fs::read_to_string(&f) else {
                continue; // not UTF-8: not a source file we can use
            };
            let lines: Vec<&str> = text.lines().collect();
            for i in (0..lines.len()).step_by(12) {
                let end = (i + 4 + (i / 12 * 5) % 9).min(lines.len());
                let chunk = lines[i..end].join("\n");
                let chunk = chunk.trim();
                if !chunk.is_empty() {
                    texts.push(chunk.to_string());
                }
            }
        }
    }
    Ok(texts)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "__pycache__" {
                walk(&path, out)?;
            }
        } else if name.ends_with(".rs") || name.ends_with(".py") {
            out.push(path);
        }
    }
    Ok(())
}

/// Embed all texts `repeat` times (after one warm-up batch); the fastest run counts.
fn throughput(
    model: &dyn Embed,
    texts: &[String],
    opts: &EmbedOptions,
    tokens: usize,
    repeat: usize,
) -> Result<(Throughput, Vec<Vec<f32>>)> {
    model.embed(&texts[..opts.batch_size.min(texts.len())], opts)?;
    let mut best: Option<(Duration, Stages, Vec<Vec<f32>>)> = None;
    for _ in 0..repeat.max(1) {
        let mut stages = Stages::default();
        let t = Instant::now();
        let v = model.embed_staged(texts, opts, &mut stages)?;
        let dt = t.elapsed();
        if best.as_ref().is_none_or(|(b, _, _)| dt < *b) {
            best = Some((dt, stages, v));
        }
    }
    let (dt, stages, v) = best.expect("at least one run");
    Ok((
        Throughput {
            batch: opts.batch_size,
            seconds: secs(dt),
            texts_per_s: texts.len() as f64 / secs(dt),
            tokens_per_s: tokens as f64 / secs(dt),
            stages: stages.into(),
        },
        v,
    ))
}

fn latency(
    model: &dyn Embed,
    texts: &[String],
    lens: &[usize],
    opts: &EmbedOptions,
    runs: usize,
) -> Result<Latency> {
    let runs = runs.max(1);
    let mut ms = Vec::with_capacity(runs);
    let mut toks = 0;
    model.embed(&texts[..1], opts)?;
    for i in 0..runs {
        // Spread over the corpus: short and long texts alike.
        let k = i * texts.len() / runs;
        let t = Instant::now();
        model.embed(std::slice::from_ref(&texts[k]), opts)?;
        ms.push(secs(t.elapsed()) * 1e3);
        toks += lens[k];
    }
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    Ok(Latency {
        runs,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        mean_tokens: toks as f64 / runs as f64,
    })
}

fn lengths(max: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
        .into_iter()
        .filter(|&l| l < max)
        .collect();
    v.push(max);
    v
}

/// `n` different texts of `chars` characters: the corpus joined, rotated and cut.
fn long_texts(texts: &[String], n: usize, chars: usize) -> Vec<String> {
    let joined = texts.join("\n");
    let all: Vec<char> = joined.chars().collect();
    (0..n)
        .map(|i| {
            let off = i * all.len() / n.max(1);
            all[off..].iter().chain(&all[..off]).take(chars).collect()
        })
        .collect()
}

/// Throughput and peak activation memory for batches of `b` texts cut at exactly `len` tokens.
fn shape_grid(
    model: &dyn Embed,
    texts: &[String],
    batches: &[usize],
    lengths: &[usize],
    smoke: bool,
) -> Result<Vec<Shape>> {
    let mut out = Vec::new();
    for &b in batches {
        for &len in lengths {
            let opts = EmbedOptions {
                max_length: Some(len),
                batch_size: b,
                ..Default::default()
            };
            // Texts just long enough (the tokenizer reads a text whole before cutting it, so
            // needlessly long ones would time the tokenizer, not the model).
            let mut chars = len * 6;
            let (batch, tokens) = loop {
                let batch = long_texts(texts, b, chars);
                let tokens: usize = model.count_tokens(&batch, &opts)?.iter().sum();
                let total: usize = texts.iter().map(|t| t.chars().count()).sum();
                if tokens >= b * len || chars >= total {
                    break (batch, tokens);
                }
                chars *= 2;
            };
            if tokens < b * len {
                // The corpus is too short for this length: say so by skipping, never pad.
                continue;
            }
            model.embed(&batch, &opts)?;
            let reps = if smoke {
                1
            } else if b * len <= 2048 {
                5
            } else {
                2
            };
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t = Instant::now();
                model.embed(&batch, &opts)?;
                best = best.min(secs(t.elapsed()));
            }
            sembed::fast::release_scratch();
            let base = alloc::live();
            alloc::reset_peak();
            model.embed(&batch, &opts)?;
            let peak = alloc::peak().saturating_sub(base);
            out.push(Shape {
                batch: b,
                length: len,
                tokens_per_s: tokens as f64 / best,
                texts_per_s: b as f64 / best,
                peak_activation_bytes: peak,
            });
        }
    }
    Ok(out)
}

/// The folder of a single-model benchmark (None for a fusion).
fn single_model_dir(models: &[String]) -> Result<Option<PathBuf>> {
    match models {
        [] => Ok(Some(sembed::hub::resolve("")?)),
        [m] if !m.ends_with(".toml") => Ok(Some(sembed::hub::resolve(m)?)),
        _ => Ok(None),
    }
}

#[allow(clippy::too_many_arguments)]
fn reduced_precision(
    args: &BenchArgs,
    f32_model: &dyn Embed,
    texts: &[String],
    opts: &EmbedOptions,
    tokens: usize,
    f32_vectors: &[Vec<f32>],
    f32_headline: &Throughput,
    eval_dirs: &[PathBuf],
    precision: Precision,
) -> Result<Quantized> {
    let before = alloc::live();
    let (dtype, engine) = match precision {
        Precision::Int8 => (sembed::DType::F32, Engine::Fast(Precision::Int8)),
        p => (sembed::DType::BF16, Engine::Fast(p)),
    };
    let q = sembed::fusion_config::load(&args.models, dtype, &sembed::device::cpu(), engine)?;
    let weights_heap_bytes = alloc::live().saturating_sub(before);
    let (headline, vectors) = throughput(q.as_ref(), texts, opts, tokens, args.repeat)?;
    let cos: Vec<f64> = f32_vectors
        .iter()
        .zip(&vectors)
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (*x as f64) * (*y as f64))
                .sum()
        })
        .collect();
    let mut pairs: Vec<Example> = Vec::new();
    for d in eval_dirs {
        pairs.extend(
            sembed_index::mine::mine_dir(d)?
                .into_iter()
                .map(|m| m.example),
        );
    }
    // A fixed, spread-out sample when there are more pairs than asked for.
    if pairs.len() > args.eval_pairs {
        let step = pairs.len() as f64 / args.eval_pairs as f64;
        pairs = (0..args.eval_pairs)
            .map(|i| pairs[(i as f64 * step) as usize].clone())
            .collect();
    }
    let retrieval = if pairs.len() >= 10 {
        let a = sembed::train::eval::evaluate(f32_model, &pairs, None, opts.batch_size)?;
        let b = sembed::train::eval::evaluate(q.as_ref(), &pairs, None, opts.batch_size)?;
        Some(Retrieval {
            source: dirs_label(eval_dirs),
            pairs: pairs.len(),
            ndcg_at_10_f32: a.ndcg_at_10,
            ndcg_at_10_reduced: b.ndcg_at_10,
            mrr_at_10_f32: a.mrr_at_10,
            mrr_at_10_reduced: b.mrr_at_10,
        })
    } else {
        None
    };
    Ok(Quantized {
        precision: precision.to_string(),
        engine: q.engine(),
        weights_heap_bytes,
        speedup_vs_f32: headline.texts_per_s / f32_headline.texts_per_s,
        headline,
        cosine_min: cos.iter().copied().fold(f64::INFINITY, f64::min),
        cosine_mean: cos.iter().sum::<f64>() / cos.len() as f64,
        max_abs_diff_vs_f32: f32_vectors
            .iter()
            .zip(&vectors)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64))
            .fold(0.0, f64::max),
        retrieval,
    })
}

fn training(dir: &Path, texts: &[String], smoke: bool) -> Result<Training> {
    use sembed::train::trainer::{TrainConfig, Trainer};
    let (batch, max_length) = if smoke { (4, 32) } else { (16, 128) };
    // Pairs of neighbouring code chunks: real text, the shape of an MNRL batch.
    let examples: Vec<Example> = texts
        .windows(2)
        .step_by(2)
        .take(batch)
        .map(|w| Example {
            anchor: w[0].clone(),
            positive: w[1].clone(),
            negatives: Vec::new(),
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let config = TrainConfig {
        batch_size: batch,
        max_length: Some(max_length),
        ..Default::default()
    };
    let mut trainer = Trainer::new(dir, config, sembed::DType::F32, false)?;
    let mem = trainer.memory();
    trainer.profile_step(&refs, 1e-5)?; // warm-up: first-touch costs
    let base = alloc::live();
    alloc::reset_peak();
    let passes = sembed::fast::train::layer_passes();
    let profile = trainer.profile_step(&refs, 1e-5)?;
    let peak = alloc::peak().saturating_sub(base);
    let fast = sembed::fast::train::layer_passes() > passes;
    let engine = if fast {
        "fast training pass"
    } else {
        "candle autodiff"
    };
    let candle = if fast {
        let base = alloc::live();
        alloc::reset_peak();
        let profile =
            sembed::fast::train::with_candle_kernels(|| trainer.profile_step(&refs, 1e-5))?;
        let step_peak_above_model_bytes = alloc::peak().saturating_sub(base);
        Some(CandleStep {
            profile,
            step_peak_above_model_bytes,
        })
    } else {
        None
    };
    let bf16 = if fast {
        use sembed::train::trainer::{precision_description, TrainPrecision};
        trainer.set_precision(TrainPrecision::Bf16);
        trainer.profile_step(&refs, 1e-5)?; // warm-up: the bf16 buffers' first touch
        let profile = trainer.profile_step(&refs, 1e-5)?;
        trainer.set_precision(TrainPrecision::F32);
        Some(Bf16Step {
            precision: precision_description(TrainPrecision::Bf16),
            profile,
        })
    } else {
        None
    };
    Ok(Training {
        engine: engine.into(),
        candle,
        bf16,
        batch: examples.len(),
        max_length,
        parameters: mem.parameters,
        trainable_parameters: mem.trainable_parameters,
        gradients_formula_bytes: mem.parameters * 4,
        optimizer_formula_bytes: mem.trainable_parameters * 8,
        step_peak_above_model_bytes: peak,
        profile,
    })
}

fn fusion_check(args: &BenchArgs) -> Result<Option<FusionCheck>> {
    let cpu = sembed::device::cpu();
    // Each part once: (label, embedder).
    let mut loaded: Vec<(String, sembed::Embedder)> = Vec::new();
    if args.fusion_check.is_empty() {
        // The tiny fixtures (their tokenizers and layouts) widened to the real models' widths, two
        // layers deep, random weights: the real 1536 + 1024 = 2560-d fused shape at a cost a laptop
        // can run.
        let f = Path::new("tests/fixtures");
        let tiny = [f.join("qwen2-bidir-tiny"), f.join("jina-v3-tiny")];
        if !tiny.iter().all(|p| p.is_dir()) {
            return Ok(None);
        }
        eprintln!("sembed bench: fusion shape check (real widths, 2 layers, random weights)");
        for (i, (dir, shape)) in tiny.iter().zip([QODO, JINA]).enumerate() {
            let shape = match &args.real_configs {
                Some(d) => {
                    read_shape(&shape, &d.join(real_config_dir(&shape)).join("config.json"))?
                }
                None => shape,
            };
            let widened = widen(dir, &shape)?;
            let weights = sembed::weights::Weights::random(i as u64 + 1, sembed::DType::F32, &cpu);
            let e = sembed::Embedder::from_weights(&widened, &weights)
                .with_context(|| format!("building {} at full width", shape.name))?
                .with_name(format!("{}-shape", shape.name));
            let _ = std::fs::remove_dir_all(&widened);
            loaded.push((
                format!("{} widths, 2 layers, random weights", shape.name),
                e,
            ));
        }
    } else {
        eprintln!("sembed bench: fusion shape check");
        for dir in &args.fusion_check {
            let e = sembed::Embedder::load_with(dir, sembed::DType::F32, &cpu, Engine::Auto)
                .with_context(|| format!("loading {}", dir.display()))?;
            loaded.push((dir.display().to_string(), e));
        }
    }
    let refs: Vec<String> = loaded.iter().map(|(r, _)| r.clone()).collect();
    let parts: Vec<usize> = loaded.iter().map(|(_, e)| e.dimension()).collect();
    let embedders: Vec<(Box<dyn Embed>, f64)> = loaded
        .into_iter()
        .map(|(_, e)| (Box::new(e) as Box<dyn Embed>, 1.0))
        .collect();
    let model = sembed::Fusion::new("fused-shape", embedders)?;
    let texts = code_texts(&[PathBuf::from("crates/sembed/src/fast")])?;
    let texts: Vec<String> = texts
        .into_iter()
        .take(if args.smoke { 8 } else { 32 })
        .collect();
    let v = model.embed(&texts, &EmbedOptions::default())?;
    let dim = model.dimension();
    let mut max_norm_error = 0f64;
    for row in &v {
        if row.len() != dim {
            bail!("fused vector of {} values, expected {dim}", row.len());
        }
        let n: f64 = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        max_norm_error = max_norm_error.max((n - 1.0).abs());
    }
    let max = model.max_length().min(if args.smoke { 32 } else { 512 });
    let batches: &[usize] = if args.smoke { &[1, 2] } else { &[1, 4] };
    let shapes = shape_grid(&model, &texts, batches, &lengths(max), args.smoke)?;
    Ok(Some(FusionCheck {
        models: refs,
        dimension: dim,
        parts,
        max_norm_error,
        shapes,
    }))
}

fn real_config_dir(shape: &RealShape) -> &'static str {
    if shape.gated {
        "qodo-embed-1-1.5b"
    } else {
        "jina-embeddings-v3"
    }
}

/// A copy of a tiny model folder (config, tokenizer, sentence-transformers files; no weights) with
/// the widths of `shape`, two layers, and a 512-token limit.
fn widen(dir: &Path, shape: &RealShape) -> Result<PathBuf> {
    let out = std::env::temp_dir().join(format!(
        "sembed-bench-{}-{}",
        std::process::id(),
        shape.name
    ));
    copy_folder(dir, &out)?;
    let path = out.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let c = cfg
        .as_object_mut()
        .context("config.json is not an object")?;
    c.insert("hidden_size".into(), shape.hidden.into());
    c.insert("intermediate_size".into(), shape.inter.into());
    c.insert("num_attention_heads".into(), shape.heads.into());
    c.insert("num_hidden_layers".into(), 2.into());
    if shape.gated {
        c.insert("num_key_value_heads".into(), shape.kv_heads.into());
    } else {
        c.insert(
            "matryoshka_dimensions".into(),
            serde_json::json!([32, 64, 128, 256, 512, 768, 1024]),
        );
    }
    std::fs::write(&path, serde_json::to_string_pretty(&cfg)?)?;
    std::fs::write(
        out.join("sentence_bert_config.json"),
        r#"{"max_seq_length": 512, "do_lower_case": false}"#,
    )?;
    Ok(out)
}

fn copy_folder(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "model.safetensors" {
            continue;
        }
        if entry.file_type()?.is_dir() {
            copy_folder(&entry.path(), &to.join(&name))?;
        } else {
            std::fs::copy(entry.path(), to.join(&name))?;
        }
    }
    Ok(())
}

/// Published sizes: Qodo-Embed-1-1.5B (Qwen2) and jina-embeddings-v3 (XLM-RoBERTa), from their
/// config.json files; `--real-configs` reads those files instead.
struct RealShape {
    name: &'static str,
    hidden: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    inter: u64,
    vocab: u64,
    positions: u64,
    /// Qwen2: gated MLP (gate, up, down) and separate k/v heads; XLM-R: plain MLP.
    gated: bool,
}

const QODO: RealShape = RealShape {
    name: "Qodo-Embed-1-1.5B",
    hidden: 1536,
    layers: 28,
    heads: 12,
    kv_heads: 2,
    inter: 8960,
    vocab: 151_646,
    positions: 0,
    gated: true,
};
const JINA: RealShape = RealShape {
    name: "jina-embeddings-v3",
    hidden: 1024,
    layers: 24,
    heads: 16,
    kv_heads: 16,
    inter: 4096,
    vocab: 250_002,
    positions: 8194,
    gated: false,
};

fn read_shape(base: &RealShape, file: &Path) -> Result<RealShape> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let get = |k: &str, d: u64| v.get(k).and_then(|x| x.as_u64()).unwrap_or(d);
    Ok(RealShape {
        name: base.name,
        hidden: get("hidden_size", base.hidden),
        layers: get("num_hidden_layers", base.layers),
        heads: get("num_attention_heads", base.heads),
        kv_heads: get(
            "num_key_value_heads",
            get("num_attention_heads", base.heads),
        ),
        inter: get("intermediate_size", base.inter),
        vocab: get("vocab_size", base.vocab),
        positions: if base.gated {
            0
        } else {
            get("max_position_embeddings", base.positions)
        },
        gated: base.gated,
    })
}

impl RealShape {
    /// Weights multiplied per token in one layer (projections and MLP).
    fn layer_matmul_params(&self) -> u64 {
        let (h, i) = (self.hidden, self.inter);
        let kv = self.hidden / self.heads * self.kv_heads;
        let attn = h * h + 2 * h * kv + h * h;
        let mlp = if self.gated { 3 * h * i } else { 2 * h * i };
        attn + mlp
    }
    fn parameters(&self) -> u64 {
        let per_layer = self.layer_matmul_params() + 4 * self.hidden + self.inter;
        self.vocab * self.hidden + self.positions * self.hidden + self.layers * per_layer
    }
    /// FLOPs to embed one text of `len` tokens: 2 per multiplied weight per token, plus attention
    /// (QKᵀ and PV: 4·len·hidden per token per layer).
    fn flops(&self, len: u64) -> u64 {
        self.layers * len * (2 * self.layer_matmul_params() + 4 * len * self.hidden)
    }
}

fn estimates(real_configs: Option<&Path>, smoke: bool) -> Result<Estimates> {
    let mut models = Vec::new();
    for base in [QODO, JINA] {
        let shape = match real_configs {
            Some(dir) => read_shape(&base, &dir.join(real_config_dir(&base)).join("config.json"))?,
            None => base,
        };
        let gflops = gemm_rate(
            if smoke { 64 } else { 512 },
            shape.hidden as usize,
            shape.inter as usize,
        )?;
        let by_length = [128u64, 512, 2048]
            .into_iter()
            .map(|len| {
                let f = shape.flops(len) as f64;
                let b = 32u64;
                let mlp = b * len * (if shape.gated { 2 } else { 1 }) * shape.inter;
                let scores = b * shape.heads * len * len;
                EstimateAt {
                    length: len as usize,
                    gflop_per_text: f / 1e9,
                    seconds_per_text: f / (gflops * 1e9),
                    activation_bytes_batch32: 4 * (mlp + scores + 4 * b * len * shape.hidden),
                }
            })
            .collect();
        let p = shape.parameters();
        models.push(Estimate {
            name: shape.name.to_string(),
            parameters: p,
            gemm_gflops: gflops,
            weights_f32_bytes: 4 * p,
            weights_bf16_bytes: 2 * p,
            by_length,
        });
    }
    Ok(Estimates {
        models,
        note: "FLOPs from the published shapes at the f32 GEMM rate measured here on each model's \
               MLP projection: a lower bound on time (norms, softmax, copies and tokenisation come on top)",
    })
}

/// f32 GFLOP/s of candle's `x · Wᵀ` for x `[m, k]`, W `[n, k]` (how the candle models multiply).
fn gemm_rate(m: usize, k: usize, n: usize) -> Result<f64> {
    use candle_core::Tensor;
    let dev = sembed::device::cpu();
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
    x.matmul(&w.t()?)?;
    let reps = 3;
    let t = Instant::now();
    for _ in 0..reps {
        x.matmul(&w.t()?)?;
    }
    let dt = secs(t.elapsed()) / reps as f64;
    Ok(2.0 * (m * k * n) as f64 / dt / 1e9)
}

#[allow(clippy::too_many_arguments)]
fn peers(
    python: &Path,
    dir: &Path,
    args: &BenchArgs,
    model: &dyn Embed,
    texts: &[String],
    opts: &EmbedOptions,
    tokens: usize,
    vectors: &[Vec<f32>],
    headline: &Throughput,
    quantized: Option<&Quantized>,
    bf16: Option<&Quantized>,
) -> Result<Peers> {
    let texts_path = args.out.join("texts.json");
    std::fs::write(&texts_path, serde_json::to_string(texts)?)?;
    let ours_path = args.out.join("sembed-vectors.json");
    std::fs::write(&ours_path, serde_json::to_string(vectors)?)?;
    let script = Path::new("bench/peer_inference.py");
    if !script.is_file() {
        bail!("--peers runs bench/peer_inference.py: run `sembed bench` from the repository root");
    }
    let output = std::process::Command::new(python)
        .arg(script)
        .arg(dir)
        .arg(&texts_path)
        .arg(&ours_path)
        .arg(opts.max_length.unwrap_or(256).to_string())
        .arg(opts.batch_size.to_string())
        .arg(args.repeat.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed ({})",
            python.display(),
            script.display(),
            output.status
        );
    }
    // The JSON is the last line: exporters may print progress to stdout before it.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let results: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or(""),
    )
    .context("reading the peers' JSON from bench/peer_inference.py")?;
    // sembed again after the peers: the machine may have drifted; the best of both runs counts, as
    // the best of the peers' repeats does.
    let (again, _) = throughput(model, texts, opts, tokens, args.repeat)?;
    let ours = headline.texts_per_s.max(again.texts_per_s);
    let int8 = quantized.map(|q| q.headline.texts_per_s);
    let bf16 = bf16.map(|q| q.headline.texts_per_s);
    let mut out = Vec::new();
    if let Some(map) = results.as_object() {
        for (name, r) in map {
            let Some(tps) = r.get("texts_per_s").and_then(|v| v.as_f64()) else {
                eprintln!("sembed bench: peer {name} skipped: {r}");
                continue;
            };
            out.push(Peer {
                name: name.clone(),
                texts_per_s: tps,
                max_abs_diff_vs_sembed: r
                    .get("max_abs_diff_vs_sembed")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(f64::NAN),
                ratio: ours / tps,
                int8_ratio: int8.map(|q| q / tps),
                bf16_ratio: bf16.map(|q| q / tps),
            });
        }
    }
    Ok(Peers {
        python: python.display().to_string(),
        sembed_texts_per_s: ours,
        sembed_int8_texts_per_s: int8,
        sembed_bf16_texts_per_s: bf16,
        results: out,
    })
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    Machine {
        cpu,
        threads: rayon::current_num_threads(),
        os: std::env::consts::OS.to_string(),
        sembed: env!("CARGO_PKG_VERSION").to_string(),
        cpu_features: sembed::fast::cpu::describe_cpu(),
        int8_kernel: sembed::fast::quant::int8_description(),
        bf16_kernel: sembed::fast::cpu::bf16_description(),
    }
}
