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
    /// Serve embeddings over HTTP (OpenAI /v1/embeddings and TEI /embed) with dynamic batching.
    Serve(ServeArgs),
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

#[derive(clap::Args)]
struct ServeArgs {
    /// A model to serve, as [NAME=]REF: REF is a folder, hf:ORG/NAME, or a fusion .toml. Repeat to
    /// serve several; the first is the default. Default: all-MiniLM-L6-v2.
    #[arg(long = "model", short = 'm')]
    models: Vec<String>,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Token budget of one forward batch.
    #[arg(long, default_value_t = 16384)]
    max_batch_tokens: usize,
    /// Texts that may wait per model before requests get 429.
    #[arg(long, default_value_t = 4096)]
    max_queue: usize,
    /// Inputs per request.
    #[arg(long, default_value_t = 512)]
    max_client_batch_size: usize,
    /// Request body limit in bytes.
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "SEMBED_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Cut over-long inputs instead of refusing them.
    #[arg(long)]
    auto_truncate: bool,
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
        Command::Serve(args) => serve(args),
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
    let dtype = args.dtype.dtype();
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

impl ComputeDtype {
    fn dtype(self) -> sembed::DType {
        match self {
            ComputeDtype::F32 => sembed::DType::F32,
            ComputeDtype::F16 => sembed::DType::F16,
            ComputeDtype::Bf16 => sembed::DType::BF16,
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let device = sembed::device::cpu();
    let specs = if args.models.is_empty() {
        vec![String::new()]
    } else {
        args.models.clone()
    };
    let mut models = Vec::new();
    for spec in &specs {
        // NAME=REF, unless the whole thing is an existing path or an hf: reference.
        let (name, reference) = match spec.split_once('=') {
            Some((n, r)) if !n.is_empty() && !n.contains('/') && !n.starts_with("hf:") => {
                (n.to_string(), r.to_string())
            }
            _ => {
                let name = if spec.is_empty() {
                    sembed::hub::DEFAULT_MODEL_NAME.to_string()
                } else {
                    spec.trim_end_matches('/')
                        .rsplit('/')
                        .next()
                        .unwrap_or(spec)
                        .trim_end_matches(".toml")
                        .to_string()
                };
                (name, spec.clone())
            }
        };
        let refs = if reference.is_empty() {
            vec![]
        } else {
            vec![reference.clone()]
        };
        let model =
            sembed::fusion_config::load(&refs, args.dtype.dtype(), &device).with_context(|| {
                format!(
                    "loading model `{name}` ({})",
                    if reference.is_empty() {
                        "default"
                    } else {
                        &reference
                    }
                )
            })?;
        models.push(sembed_server::ServedModel {
            name,
            model: model.into(),
        });
    }
    let config = sembed_server::ServerConfig {
        max_batch_tokens: args.max_batch_tokens,
        max_queue_texts: args.max_queue,
        max_client_batch_size: args.max_client_batch_size,
        max_body_bytes: args.max_body_bytes,
        api_key: args.api_key.clone(),
        auto_truncate: args.auto_truncate,
    };
    let (router, state) = sembed_server::build(models, config).context("starting the server")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!("sembed: listening on http://{}", listener.local_addr()?);
        sembed_server::serve(listener, router, state, shutdown_signal()).await?;
        eprintln!("sembed: stopped");
        Ok(())
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: finishing in-flight requests");
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
