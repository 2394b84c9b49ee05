//! The `sembed` command line.

/// mimalloc instead of the system allocator: inference allocates and frees large activation buffers
/// on every layer, and glibc returns them to the kernel, so each one pays page faults and zeroing
/// again (a third of the CPU time went to the kernel). Counted, for `sembed bench`.
#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

mod adapt;
mod alloc;
mod bench;
mod code;
mod input;
mod mcp;
mod mimalloc_options;
mod output;
mod progress;
mod tune;

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
    /// Fine-tune a model on pairs or triplets (JSONL) with real backpropagation.
    Train(Box<TrainArgs>),
    /// Try training settings (learning rate, batch size, epochs, loss) on a slice of the data, each
    /// scored on held-out pairs; writes the table and the best settings (tune.json, tune.md).
    Tune(Box<tune::TuneArgs>),
    /// Retrieval metrics of a model on pairs (JSONL): each anchor a query, the positives the corpus.
    Eval(EvalArgs),
    /// Mine (documentation → code) pairs into training data: Rust, Python, Elixir, JavaScript,
    /// TypeScript, Go and Java, cut by the same parser as `sembed index` (.gitignore respected).
    Mine(Box<MineArgs>),
    /// Fit a model to a repository: mine its (documentation → code) pairs (and --also folders'),
    /// fine-tune on all but a held-out share of the files, keep the new model only if it ranks the
    /// held-out pairs better than the base, and re-index the repository with it.
    Adapt(Box<adapt::AdaptArgs>),
    /// Measure: stages, throughput by batch size and length, latency, memory, int8, training and
    /// gradient cost, and the peers on the same texts; writes JSON, Markdown and SVG.
    Bench(Box<bench::BenchArgs>),
    /// Index a repository for code search: chunks by syntax, only what changed is embedded, stored
    /// in .sembed/index.sqlite (SQLite + HNSW) or PostgreSQL/pgvector (--db postgres://…).
    Index(Box<code::IndexArgs>),
    /// Search an index: ranked chunks with score, path:lines, symbol and a snippet.
    Search(Box<code::SearchArgs>),
    /// Serve the code index to AI coding agents over MCP (stdio): search, symbol lookup, index
    /// status and refresh; indexes in the background at start, and keeps it current with --watch.
    Mcp(Box<mcp::McpArgs>),
    /// Print the header of a safetensors file (names, dtypes, shapes, parameter count, bytes),
    /// describe an ONNX model (opset, inputs and outputs with their dynamic axes, every initializer
    /// and where its bytes are, operator counts; external data checked), or describe a model folder:
    /// architecture, widths, pooling, tasks, and which engine runs it (and why) for each precision.
    Inspect {
        /// A .safetensors file, an .onnx file or a model folder.
        file: PathBuf,
    },
    /// Export a model (folder, hf:ORG/NAME, or a PEFT LoRA folder from `sembed train --lora`) as an
    /// ONNX graph in sentence-transformers' layout: OUT/onnx/model.onnx beside the tokenizer and the
    /// sentence-transformers files, for ONNX Runtime and SentenceTransformer(OUT, backend="onnx").
    Export(ExportArgs),
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The model. Default: all-MiniLM-L6-v2 (or the folder in $SEMBED_MODEL).
    model: Option<String>,
    /// The output folder.
    #[arg(long)]
    onnx: PathBuf,
    /// jina-embeddings-v3: merge this task's adapter (retrieval.query, retrieval.passage,
    /// separation, classification, text-matching). Without it, a scalar int64 `task_id` input selects
    /// the adapter at run time.
    #[arg(long)]
    task: Option<String>,
    /// Quantize the Linear layers: int8 weights per output channel, inputs quantized per call
    /// (ONNX Runtime's dynamic quantization, in standard operators).
    #[arg(long, value_enum)]
    quantize: Option<QuantizeTo>,
    /// Weights in onnx/model.onnx_data beside the graph (always used past 2 GiB of weights).
    #[arg(long)]
    external_data: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantizeTo {
    Int8,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Jsonl,
    Npy,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ComputeDtype {
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
    /// No progress bar (it is shown on stderr only when stderr is a terminal).
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ComputeDtype,
    #[command(flatten)]
    engine: EngineArgs,
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
    /// Answer `POST /search` from this code index (a SQLite file or postgres://…[#TABLE]); its model
    /// is served too (or must be among the --model ones).
    #[arg(long)]
    index: Option<String>,
    /// With --index: keep the index current as the files it was made from change, in the background
    /// (as `sembed index --watch`; the folders and settings the index records).
    #[arg(long, requires = "index")]
    watch: bool,
    /// With --watch: run once no file changed for this long.
    #[arg(long, default_value_t = 500)]
    debounce_ms: u64,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ComputeDtype,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Which engine runs the models, and in what precision.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct EngineArgs {
    /// `auto`: the fast CPU engine (BERT, Qwen2, Qwen3, Jina v3 in f32/bf16/f16), candle where it
    /// cannot run the model (f64 weights, a PEFT adapter folder, a GPU); `candle`: always the
    /// reference implementation; `fast`: the fast engine or an error saying why not.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineArg,
    /// `int8`: int8 weights and per-token int8 activations on the fast engine (every architecture, CPU).
    #[arg(long, value_enum, default_value = "none")]
    quantize: QuantizeArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    Auto,
    Fast,
    Candle,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum QuantizeArg {
    None,
    Int8,
}

impl EngineArgs {
    fn engine(self) -> Result<sembed::fast::Engine> {
        use sembed::fast::{Engine, Precision};
        Ok(match (self.engine, self.quantize) {
            (EngineArg::Candle, QuantizeArg::Int8) => {
                bail!("--quantize int8 runs on the fast engine, not with --engine candle")
            }
            (_, QuantizeArg::Int8) => Engine::Fast(Precision::Int8),
            (EngineArg::Auto, QuantizeArg::None) => Engine::Auto,
            (EngineArg::Fast, QuantizeArg::None) => Engine::Fast(Precision::F32),
            (EngineArg::Candle, QuantizeArg::None) => Engine::Candle,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LossArg {
    Triplet,
    Mnrl,
}

#[derive(Clone, Copy, ValueEnum)]
enum DistanceArg {
    Cosine,
    Euclidean,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleArg {
    Linear,
    Cosine,
}

#[derive(Clone, Copy, ValueEnum)]
enum TrainDtype {
    F32,
    F64,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    F32,
    Bf16,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Model to fine-tune (folder, hf:ORG/NAME; default all-MiniLM-L6-v2), or a checkpoint with --resume.
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// Training data: JSONL {"anchor","positive"[,"negative"][,"negatives"]}.
    #[arg(long)]
    data: PathBuf,
    /// Held-out pairs for evaluation before training and after every epoch.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Where checkpoints, the final model and metrics.json go.
    #[arg(long, short = 'o', required_unless_present = "dump_gradients")]
    output: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "mnrl")]
    loss: LossArg,
    /// Triplet distance (sentence-transformers' default: euclidean).
    #[arg(long, value_enum, default_value = "euclidean")]
    distance: DistanceArg,
    /// Triplet margin (default: 5 for euclidean, 0.5 for cosine).
    #[arg(long)]
    margin: Option<f64>,
    /// MNRL similarity scale.
    #[arg(long, default_value_t = 20.0)]
    scale: f64,
    /// Also train truncated embeddings (Matryoshka), e.g. 64,128,256.
    #[arg(long, value_delimiter = ',')]
    matryoshka_dims: Vec<usize>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 2e-5)]
    lr: f64,
    #[arg(long, default_value_t = 0.1)]
    warmup_ratio: f64,
    #[arg(long, value_enum, default_value = "linear")]
    schedule: ScheduleArg,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Global gradient-norm clipping (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Jina: fine-tune this task adapter only (the others stay as they were).
    #[arg(long)]
    task: Option<String>,
    #[arg(long)]
    max_length: Option<usize>,
    /// Train LoRA adapters instead of all weights (saved PEFT-style in OUTPUT/adapter, and merged
    /// into a complete model in OUTPUT).
    #[arg(long)]
    lora: bool,
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Modules to adapt, e.g. query,value or q_proj,k_proj,v_proj,o_proj (default: query/value).
    #[arg(long, value_delimiter = ',')]
    lora_targets: Vec<String>,
    /// Dropout on the LoRA adapter input (PEFT lora_dropout).
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Dropout probability for every dropout of the model (default: the model config's, as in
    /// sentence-transformers training); 0 switches dropout off, e.g. for deterministic gradient dumps.
    #[arg(long)]
    dropout: Option<f64>,
    /// GradCache (as sentence-transformers' Cached losses): embed each batch in mini-batches of N
    /// texts without keeping their graph, then back-propagate the loss's gradient one mini-batch at a
    /// time. Same gradients; memory grows with N, not with --batch-size.
    #[arg(long, value_name = "N")]
    cache_mini_batch: Option<usize>,
    /// Activation checkpointing: each layer keeps only its input and is recomputed in the backward
    /// pass (same gradients, about one forward pass more of time, far less activation memory).
    #[arg(long)]
    checkpoint_activations: bool,
    /// Stop after this many optimiser steps (saving a resumable checkpoint).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Continue the run saved in this checkpoint folder (…/checkpoints/epoch-N or …/interrupted).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Compute the loss and gradients of the first batch, write them here (safetensors), change nothing.
    #[arg(long)]
    dump_gradients: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: TrainDtype,
    /// Arithmetic of the projections: f32, or bf16 mixed precision (bf16 products summed in f32;
    /// master weights, gradients, optimiser state, norms and softmax stay f32), as PyTorch's bf16
    /// autocast. Fast on CPUs with AMX or AVX-512 BF16; elsewhere the same arithmetic, slower.
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
}

#[derive(clap::Args)]
struct MineArgs {
    /// Source tree to read.
    src: PathBuf,
    /// Training pairs (JSONL).
    #[arg(long)]
    out: PathBuf,
    /// Held-out pairs from other files (JSONL).
    #[arg(long)]
    heldout: Option<PathBuf>,
    /// Fraction of files held out.
    #[arg(long, default_value_t = 0.1)]
    heldout_fraction: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// No progress bar (it is shown on stderr only when stderr is a terminal).
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Add N hard negatives to each training pair: the other functions a base model (-m) ranks
    /// nearest to its documentation, near-duplicates of the positive and likely false negatives left
    /// out. Mined within the training pairs only.
    #[arg(long, default_value_t = 0)]
    hard_negatives: usize,
    /// The base model for --hard-negatives (default: all-MiniLM-L6-v2).
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// A candidate scoring above the positive's score × (1 − MARGIN) is taken for another right answer
    /// and skipped (sentence-transformers' relative_margin).
    #[arg(long, default_value_t = 0.05)]
    margin: f32,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Write each positive the way `sembed index` embeds its chunk: after a first line with the
    /// file's name and the definition's symbol (what `sembed adapt` trains on).
    #[arg(long)]
    chunk_header: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// No progress bar (it is shown on stderr only when stderr is a terminal).
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Pairs JSONL {"anchor","positive"} (negatives optional: triplet accuracy).
    #[arg(long)]
    data: PathBuf,
    /// Embed both sides with this Jina task / prompt instead of the query/document roles.
    #[arg(long)]
    task: Option<String>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

fn main() {
    mimalloc_options::tune();
    // Logs go to stderr; SEMBED_LOG sets the filter (e.g. `info`), SEMBED_LOG_FORMAT=json makes them
    // one JSON object per line for log collectors.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEMBED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,hf_hub=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("SEMBED_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Train(_) | Command::Tune(_) | Command::Adapt(_)
    ) {
        mimalloc_options::tune_training();
    }
    let result = match cli.command {
        Command::Embed(args) => embed(args),
        Command::Serve(args) => serve(args),
        Command::Train(args) => train(*args),
        Command::Eval(args) => eval(args),
        Command::Tune(args) => tune::run(*args),
        Command::Mine(args) => mine(*args),
        Command::Adapt(args) => adapt::run(*args),
        Command::Bench(args) => bench::run(*args),
        Command::Index(args) => code::index(*args),
        Command::Search(args) => code::search(*args),
        Command::Mcp(args) => mcp::run(*args),
        Command::Inspect { file } => inspect(&file),
        Command::Export(args) => export(args),
    };
    if let Err(e) = result {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, `: `-joined, leaving out a cause whose text the message already holds
/// (the library's errors quote their I/O source; `{:#}` would print it twice).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
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
    let model = sembed::fusion_config::load(&args.models, dtype, &device, args.engine.engine()?)
        .context("loading the model")?;
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
    let vectors = embed_with_progress(model.as_ref(), &texts, &opts, args.quiet)?;
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

/// `serve --index T --watch`: a thread that keeps `target` current (the folders and chunking it
/// records, every shard) with the served `model`, through its own connection to the index; searches
/// see each committed run.
fn watch_in_background(
    target: &str,
    model: std::sync::Arc<dyn sembed::embed::Embed>,
    debounce_ms: u64,
) -> Result<()> {
    let mut store = sembed_index::store::open_existing(
        target,
        sembed_index::store::sqlite::DEFAULT_ANN_THRESHOLD,
    )?;
    let source = sembed_index::index::Source::of(store.as_mut())?.with_context(|| {
        format!("{target} records no folders it indexes: index them again with `sembed index`")
    })?;
    let mut opts = source.options();
    opts.shard = None;
    let indexer = sembed_index::watch::Indexer::new(
        target.to_string(),
        store,
        model,
        opts,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let debounce = sembed_index::watch::Debounce {
        quiet: std::time::Duration::from_millis(debounce_ms),
        ..Default::default()
    };
    eprintln!("sembed serve: watching the folders of {target} for changes");
    std::thread::spawn(move || code::watch_logged(&indexer, debounce, "serve"));
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    let device = sembed::device::cpu();
    let engine = args.engine.engine()?;
    let mut models = Vec::new();
    let mut index = None;
    if let Some(target) = &args.index {
        if args.models.is_empty() {
            // Serve the index's model.
            let (target, store, model) = sembed_index::search::open_for_search(
                Some(target),
                &[],
                sembed_index::store::sqlite::DEFAULT_ANN_THRESHOLD,
            )?;
            let name = model
                .name()
                .rsplit('/')
                .next()
                .unwrap_or("index")
                .to_string();
            index = Some(sembed_server::ServedIndex {
                store,
                model: name.clone(),
                target,
            });
            models.push(sembed_server::ServedModel {
                name,
                model: model.into(),
            });
        } else {
            // One of the --model ones must have made it (matched below, once they are loaded).
            let mut store = sembed_index::store::open_existing(
                target,
                sembed_index::store::sqlite::DEFAULT_ANN_THRESHOLD,
            )?;
            let meta = store.meta()?.with_context(|| {
                format!("{target}: the index is empty; run `sembed index` first")
            })?;
            index = Some(sembed_server::ServedIndex {
                store,
                model: meta.model,
                target: target.clone(),
            });
        }
    }
    let specs = if args.models.is_empty() {
        if index.is_some() {
            vec![]
        } else {
            vec![String::new()]
        }
    } else {
        args.models.clone()
    };
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
        let model = sembed::fusion_config::load(&refs, args.dtype.dtype(), &device, engine)
            .with_context(|| {
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
    if let Some(ix) = index.as_mut() {
        if !args.models.is_empty() {
            // The served model whose vectors the index holds (by identity).
            let found = models
                .iter()
                .find(|m| sembed_index::index::model_identity(m.model.as_ref()) == ix.model)
                .with_context(|| {
                    format!(
                        "--index {}: its vectors are of {}, which none of the --model ones is",
                        ix.target, ix.model
                    )
                })?;
            ix.model = found.name.clone();
        }
    }
    if let (true, Some(ix)) = (args.watch, index.as_ref()) {
        let model = models
            .iter()
            .find(|m| m.name == ix.model)
            .context("the index's model is served")?
            .model
            .clone();
        watch_in_background(&ix.target, model, args.debounce_ms)?;
    }
    let (router, state) =
        sembed_server::build_with_index(models, config, index).context("starting the server")?;
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

fn train(args: TrainArgs) -> Result<()> {
    use sembed::train::trainer::{LossKind, TrainConfig, Trainer};
    for (flag, p) in [
        ("--dropout", args.dropout.unwrap_or(0.0)),
        ("--lora-dropout", args.lora_dropout),
    ] {
        if !(0.0..1.0).contains(&p) {
            bail!("{flag} {p}: a probability in [0, 1) is needed");
        }
    }
    let dir = match (&args.resume, &args.model) {
        (Some(r), _) => r.clone(),
        (None, m) => {
            sembed::hub::resolve(m.as_deref().unwrap_or("")).context("resolving the model")?
        }
    };
    let cosine = matches!(args.distance, DistanceArg::Cosine);
    let config = TrainConfig {
        loss: match args.loss {
            LossArg::Triplet => LossKind::Triplet {
                cosine,
                margin: args.margin.unwrap_or(if cosine { 0.5 } else { 5.0 }),
            },
            LossArg::Mnrl => LossKind::Mnrl { scale: args.scale },
        },
        matryoshka_dims: args.matryoshka_dims.clone(),
        batch_size: args.batch_size,
        epochs: args.epochs,
        lr: args.lr,
        warmup_ratio: args.warmup_ratio,
        cosine_decay: matches!(args.schedule, ScheduleArg::Cosine),
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        grad_accum: args.grad_accum,
        seed: args.seed,
        task: args.task.clone(),
        max_length: args.max_length,
        max_steps: args.max_steps,
        dropout: args.dropout,
        cache_mini_batch: args.cache_mini_batch,
        checkpoint_activations: args.checkpoint_activations,
        lora: args.lora.then(|| sembed::train::trainer::LoraConfig {
            rank: args.lora_rank,
            alpha: args.lora_alpha,
            dropout: args.lora_dropout,
            targets: args.lora_targets.clone(),
        }),
        precision: match args.precision {
            PrecisionArg::F32 => sembed::train::trainer::TrainPrecision::F32,
            PrecisionArg::Bf16 => sembed::train::trainer::TrainPrecision::Bf16,
        },
    };
    if matches!(
        (args.precision, args.dtype),
        (PrecisionArg::Bf16, TrainDtype::F64)
    ) {
        bail!("--precision bf16 keeps f32 master weights: it does not combine with --dtype f64");
    }
    let dtype = match args.dtype {
        TrainDtype::F32 => sembed::DType::F32,
        TrainDtype::F64 => sembed::DType::F64,
    };
    let examples = sembed::train::data::read_examples(&args.data)?;
    if let Some(path) = &args.dump_gradients {
        let trainer = Trainer::for_every_gradient(&dir, config, dtype)
            .with_context(|| format!("loading {}", dir.display()))?;
        let loss = trainer.dump_gradients(&examples, path)?;
        println!("{}", serde_json::json!({"loss": loss, "gradients": path}));
        return Ok(());
    }
    let mut trainer = Trainer::new(&dir, config, dtype, args.resume.is_some())
        .with_context(|| format!("loading {}", dir.display()))?;
    let eval = args
        .eval
        .as_deref()
        .map(sembed::train::data::read_examples)
        .transpose()?;
    let out = args.output.clone().expect("required by clap");
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let flag = interrupt.clone();
        ctrlc::set_handler(move || {
            eprintln!(
                "\nsembed: interrupt received, saving a resumable checkpoint after this step"
            );
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .context("installing the Ctrl-C handler")?;
    }
    let report = trainer.train(&examples, eval.as_deref(), &out, &interrupt, true)?;
    println!("{}", serde_json::to_string(&report)?);
    if report.interrupted {
        eprintln!(
            "sembed: stopped early; resume with --resume {}",
            out.join("checkpoints/interrupted").display()
        );
    }
    Ok(())
}

fn mine(args: MineArgs) -> Result<()> {
    let (src, out, heldout, fraction, seed, quiet) = (
        args.src.as_path(),
        args.out.as_path(),
        args.heldout.as_deref(),
        args.heldout_fraction,
        args.seed,
        args.quiet,
    );
    let mined = mine_shown(&[src.to_path_buf()], "files", quiet)?;
    if mined.is_empty() {
        bail!(
            "{}: no documented functions found (Rust, Python, Elixir, JavaScript, TypeScript, Go, Java)",
            src.display()
        );
    }
    let (train, held) = match heldout {
        Some(_) => sembed::train::mine::split_by_file(mined, fraction, seed),
        None => (mined, Vec::new()),
    };
    let header = args.chunk_header;
    let as_indexed = |rows: Vec<sembed::train::mine::Mined>| -> Vec<_> {
        rows.into_iter()
            .map(|m| sembed_index::mine::as_indexed(m, header))
            .collect()
    };
    let (mut train, held) = (as_indexed(train), as_indexed(held));
    if args.hard_negatives > 0 {
        let model = load_f32(args.model.as_deref(), args.engine)
            .context("loading the model for hard negatives")?;
        let shown = progress::Progressed {
            inner: model.as_ref(),
            bar: progress::bar(0, "texts", quiet || train.len() < 256),
        };
        let opts = sembed::train::mine::HardNegatives {
            count: args.hard_negatives,
            relative_margin: args.margin,
            batch_size: args.batch_size,
            ..Default::default()
        };
        let r = sembed::train::mine::add_hard_negatives(&shown, &mut train, &opts)?;
        eprintln!(
            "sembed: {} hard negatives for {} pairs ({} with fewer than {}); skipped {} likely false negatives, {} near-duplicates",
            r.negatives, r.pairs, r.short, args.hard_negatives, r.skipped_false_negatives, r.skipped_duplicates
        );
    }
    write_pairs(out, &train)?;
    if let Some(h) = heldout {
        write_pairs(h, &held)?;
    }
    let files = |rows: &[sembed::train::mine::Mined]| {
        rows.iter()
            .map(|m| &m.file)
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    eprintln!(
        "sembed: {} training pairs from {} files, {} held-out pairs from {} other files",
        train.len(),
        files(&train),
        held.len(),
        files(&held)
    );
    Ok(())
}

/// `mine_tree` of `roots`, with a progress bar of `what` past 200 files.
pub(crate) fn mine_shown(
    roots: &[PathBuf],
    what: &str,
    quiet: bool,
) -> Result<Vec<sembed::train::mine::Mined>> {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mined = sembed_index::mine::mine_tree(roots, &mut |done, total| {
        if done == 0 && total > 200 {
            bar = progress::bar(total as u64, what, quiet);
        }
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(mined)
}

/// Mined pairs as JSONL: anchor, positive, file, symbol, and negatives where there are any.
pub(crate) fn write_pairs(
    path: &std::path::Path,
    rows: &[sembed::train::mine::Mined],
) -> Result<()> {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    for m in rows {
        let mut line = serde_json::json!({"anchor": m.example.anchor, "positive": m.example.positive, "file": m.file, "symbol": m.symbol});
        if !m.example.negatives.is_empty() {
            line["negatives"] = serde_json::json!(m.example.negatives);
        }
        writeln!(f, "{line}")?;
    }
    f.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// One `-m` reference (default: the default model) in f32 on the chosen engine.
pub(crate) fn load_f32(model: Option<&str>, engine: EngineArgs) -> Result<Box<dyn Embed>> {
    let refs: Vec<String> = model.map(str::to_string).into_iter().collect();
    Ok(sembed::fusion_config::load(
        &refs,
        sembed::DType::F32,
        &sembed::device::cpu(),
        engine.engine()?,
    )?)
}

fn eval(args: EvalArgs) -> Result<()> {
    let model = load_f32(args.model.as_deref(), args.engine).context("loading the model")?;
    let examples = sembed::train::data::read_examples(&args.data)?;
    let shown = progress::Progressed {
        inner: model.as_ref(),
        bar: progress::bar(0, "texts", args.quiet || examples.len() < 256),
    };
    let metrics =
        sembed::train::eval::evaluate(&shown, &examples, args.task.as_deref(), args.batch_size)?;
    println!("{}", serde_json::to_string(&metrics)?);
    Ok(())
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

/// Embed with a progress bar (stderr, a terminal, more than a moment's work, not `--quiet`).
fn embed_with_progress(
    model: &dyn Embed,
    texts: &[String],
    opts: &EmbedOptions,
    quiet: bool,
) -> Result<Vec<Vec<f32>>> {
    let shown = progress::Progressed {
        inner: model,
        bar: progress::bar(0, "texts", quiet || texts.len() <= 256),
    };
    Ok(shown.embed(texts, opts)?)
}

fn inspect(file: &std::path::Path) -> Result<()> {
    if file.is_dir() {
        return inspect_folder(file);
    }
    if file.extension().is_some_and(|e| e == "onnx") {
        let summary = sembed_onnx::inspect(file)?;
        use std::io::Write;
        // A closed pipe (`| head`) ends the listing quietly.
        return match write!(std::io::stdout().lock(), "{summary}") {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => Ok(r?),
        };
    }
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

fn export(args: ExportArgs) -> Result<()> {
    let model =
        sembed::hub::resolve(args.model.as_deref().unwrap_or("")).context("resolving the model")?;
    let opts = sembed_onnx::ExportOptions {
        task: args.task,
        quantize_int8: args.quantize.is_some(),
        external_data: args.external_data.then_some(true),
    };
    let started = std::time::Instant::now();
    let r = sembed_onnx::export(&model, &args.onnx, &opts)
        .with_context(|| format!("exporting {} to ONNX", model.display()))?;
    eprintln!(
        "exported {} ({}{}{}) in {:.1} s: {} nodes, {} parameters, {} bytes of weights",
        model.display(),
        r.architecture,
        if opts.quantize_int8 { ", int8" } else { "" },
        if r.lora_merged { ", LoRA merged" } else { "" },
        started.elapsed().as_secs_f64(),
        r.nodes,
        r.parameters,
        r.weight_bytes
    );
    if !r.tasks.is_empty() {
        eprintln!(
            "task_id input (scalar int64) selects the adapter: {}",
            r.tasks
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{i}={t}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("{}", r.model.display());
    if let Some(d) = &r.external_data {
        println!("{}", d.display());
    }
    Ok(())
}

/// A model folder: what it is and which engine runs it for each precision (nothing is loaded).
fn inspect_folder(dir: &std::path::Path) -> Result<()> {
    use sembed::config::{Architecture, ModelFolder};
    use sembed::fast::{Engine, Precision};
    let folder = ModelFolder::read(dir)?;
    let (layers, heads, kv, inter) = match &folder.arch {
        Architecture::Bert(c) => (
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_attention_heads,
            c.intermediate_size,
        ),
        Architecture::Qwen(c) => (
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
        ),
        Architecture::Jina(c) => (
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_attention_heads,
            c.intermediate_size,
        ),
    };
    println!("model folder   {}", dir.display());
    println!("architecture   {}", folder.arch.name());
    println!(
        "widths         hidden {}, {layers} layers, {heads} heads ({kv} key/value), intermediate {inter}",
        folder.arch.hidden_size()
    );
    println!("pooling        {:?}", folder.sentence.pooling);
    println!("max length     {}", folder.max_seq_length());
    if let Architecture::Jina(c) = &folder.arch {
        println!("tasks          {}", c.lora_adaptations.join(", "));
    }
    if !folder.sentence.prompts.is_empty() {
        let names: Vec<&str> = folder.sentence.prompts.keys().map(String::as_str).collect();
        println!("prompts        {}", names.join(", "));
    }
    let kernels = match sembed::fast::cpu::check() {
        Ok(k) => format!(
            "kernels in force: {k}; bf16: {}; int8: {}",
            sembed::fast::cpu::bf16_description(),
            sembed::fast::quant::int8_description()
        ),
        Err(e) => format!("{e}"),
    };
    println!(
        "cpu            {} ({kernels}; {} forces amx, avx512-bf16, avx512, avx2 or portable)",
        sembed::fast::cpu::describe_cpu(),
        sembed::fast::cpu::ENV,
    );
    println!("engines");
    let cpu = sembed::device::cpu();
    let peft = dir.join("adapter_config.json").is_file();
    for (label, dtype, engine) in [
        ("f32", sembed::DType::F32, Engine::Auto),
        ("bf16", sembed::DType::BF16, Engine::Auto),
        ("f16", sembed::DType::F16, Engine::Auto),
        ("int8", sembed::DType::F32, Engine::Fast(Precision::Int8)),
    ] {
        let line = match sembed::backend::choose(&folder.arch, dtype, &cpu, engine, peft) {
            Ok(c) => c.reason,
            Err(e) => e.to_string(),
        };
        println!("  {label:5}  {line}");
    }
    Ok(())
}
