//! The `sembed` command line.

mod input;
mod output;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sembed::embed::{Embed, EmbedOptions, InputRole};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sembed",
    version,
    about = "Code and text embeddings with real transformer models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed texts (arguments, a file, or stdin) into unit vectors.
    Embed(EmbedArgs),
    /// Print the header of a safetensors file: names, dtypes, shapes, parameter count, bytes.
    Inspect {
        /// A .safetensors file.
        file: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Jsonl,
    Npy,
}

#[derive(Clone, Copy, ValueEnum)]
enum ComputeDtype {
    F32,
    F16,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
enum Role {
    Query,
    Document,
}

#[derive(clap::Args)]
struct EmbedArgs {
    /// Texts to embed (or use --input).
    texts: Vec<String>,
    /// Model: a folder, hf:ORG/NAME[@REV], a fusion .toml, or repeated NAME=REF for a fusion.
    /// Default: all-MiniLM-L6-v2 (or the folder in $SEMBED_MODEL).
    #[arg(long = "model", short = 'm')]
    models: Vec<String>,
    /// Read texts from FILE ("-" for stdin): JSONL lines {"text": ...}, or plain lines with --lines.
    #[arg(long, short = 'i')]
    input: Option<String>,
    /// The input holds one text per line instead of JSONL.
    #[arg(long)]
    lines: bool,
    /// Write to FILE instead of stdout.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "jsonl")]
    format: Format,
    /// Query or document: picks the model's prompt (and Jina's retrieval adapter).
    #[arg(long, value_enum)]
    input_type: Option<Role>,
    /// Jina task adapter (retrieval.query, retrieval.passage, separation, classification,
    /// text-matching) or a prompt name of the model.
    #[arg(long)]
    task: Option<String>,
    /// Matryoshka dimension (models that support it).
    #[arg(long)]
    dimensions: Option<usize>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Maximum tokens per text (default: the model's).
    #[arg(long)]
    max_length: Option<usize>,
    /// Cut texts longer than the maximum (the default).
    #[arg(long, overrides_with = "no_truncate")]
    truncate: bool,
    /// Fail on texts longer than the maximum instead of cutting them.
    #[arg(long)]
    no_truncate: bool,
    /// Output raw pooled vectors instead of unit vectors.
    #[arg(long)]
    no_normalize: bool,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ComputeDtype,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEMBED_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,hf_hub=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => embed(args),
        Command::Inspect { file } => inspect(&file),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn embed(args: EmbedArgs) -> Result<()> {
    let texts = match (&args.input, args.texts.is_empty()) {
        (Some(_), false) => bail!("give texts as arguments or with --input, not both"),
        (None, true) => {
            bail!("no texts: pass them as arguments, or use --input FILE (\"-\" for stdin)")
        }
        (Some(path), true) => input::read_texts(path, args.lines)?,
        (None, false) => args.texts.clone(),
    };
    if texts.is_empty() {
        bail!("the input holds no texts");
    }
    let dtype = match args.dtype {
        ComputeDtype::F32 => candle_core_dtype::F32,
        ComputeDtype::F16 => candle_core_dtype::F16,
        ComputeDtype::Bf16 => candle_core_dtype::BF16,
    };
    let device = sembed::device::cpu();
    let model =
        sembed::fusion_config::load(&args.models, dtype, &device).context("loading the model")?;
    let opts = EmbedOptions {
        role: args.input_type.map(|r| match r {
            Role::Query => InputRole::Query,
            Role::Document => InputRole::Document,
        }),
        task: args.task.clone(),
        dimensions: args.dimensions,
        normalize: !args.no_normalize,
        truncate: !args.no_truncate,
        truncate_left: None,
        max_length: args.max_length,
        batch_size: args.batch_size,
    };
    let vectors = embed_with_progress(model.as_ref(), &texts, &opts, args.input.is_some())?;
    output::write(
        &vectors,
        args.output.as_deref(),
        matches!(args.format, Format::Npy),
    )
}

/// Embed in chunks so a progress bar can move; each chunk is still batched by length.
fn embed_with_progress(
    model: &dyn Embed,
    texts: &[String],
    opts: &EmbedOptions,
    show: bool,
) -> Result<Vec<Vec<f32>>> {
    let chunk = (opts.batch_size.max(1) * 8).max(256);
    let bar = if show && texts.len() > chunk {
        let b = indicatif::ProgressBar::new(texts.len() as u64);
        b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        if let Ok(s) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} texts {per_sec} eta {eta}",
        ) {
            b.set_style(s);
        }
        Some(b)
    } else {
        None
    };
    let mut out = Vec::with_capacity(texts.len());
    for (n, part) in texts.chunks(chunk).enumerate() {
        let v = model.embed(part, opts).with_context(|| {
            format!("embedding texts {}..{}", n * chunk, n * chunk + part.len())
        })?;
        out.extend(v);
        if let Some(b) = &bar {
            b.inc(part.len() as u64);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(out)
}

fn inspect(file: &std::path::Path) -> Result<()> {
    let st = sembed::weights::SafetensorsFile::open(file)?;
    let header = st.header();
    let mut params: u64 = 0;
    let mut bytes: u64 = 0;
    let mut by_dtype = std::collections::BTreeMap::<String, u64>::new();
    let width = header
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4);
    println!("{:width$}  {:6}  shape", "name", "dtype");
    let mut sorted: Vec<_> = header.tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for t in sorted {
        println!("{:width$}  {:6}  {:?}", t.name, t.dtype.name(), t.shape);
        params += t.numel() as u64;
        bytes += (t.end - t.start) as u64;
        *by_dtype.entry(t.dtype.name().to_string()).or_default() += t.numel() as u64;
    }
    println!();
    for (k, v) in &header.metadata {
        println!("metadata {k} = {v}");
    }
    println!("tensors: {}", header.tensors.len());
    println!("parameters: {params}");
    for (d, n) in by_dtype {
        println!("  {d}: {n}");
    }
    println!("data bytes: {bytes}");
    println!("header bytes: {}", header.data_start - 8);
    Ok(())
}

mod candle_core_dtype {
    pub use sembed::DType::*;
}
