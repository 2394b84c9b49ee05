//! `sembed index` and `sembed search`: code search over a repository.

use crate::progress;
use anyhow::{bail, Context, Result};
use sembed_index::index::{self, IndexOptions, Progress};
use sembed_index::store::{self, Filter, Shard};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct IndexArgs {
    /// Folders (or files) to index. Default: the current folder.
    pub paths: Vec<PathBuf>,
    /// Where the index goes: a SQLite file (default: FIRST_PATH/.sembed/index.sqlite), or
    /// postgres://USER@HOST:PORT/DB[#TABLE] for PostgreSQL with pgvector.
    #[arg(long)]
    pub db: Option<String>,
    /// Model: a folder, hf:ORG/NAME, a fusion .toml, or NAME=REF parts. Default: all-MiniLM-L6-v2.
    #[arg(long = "model", short = 'm')]
    pub models: Vec<String>,
    /// Most tokens per chunk (default: the model's maximum, at most 512); longer code outside
    /// definitions and longer text are split into overlapping windows. By default a definition is
    /// one chunk however long (the model reads its head, the lexical index all of it); given, this
    /// splits longer definitions too.
    #[arg(long)]
    pub chunk_tokens: Option<usize>,
    /// Lines per window of text that has no grammar (Markdown, config...).
    #[arg(long, default_value_t = 40)]
    pub window_lines: usize,
    /// Files larger than this are skipped.
    #[arg(long, default_value_t = sembed_index::walk::DEFAULT_MAX_FILE_BYTES)]
    pub max_file_bytes: u64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Drop an index made with another model (or another precision) and start again, instead of
    /// refusing.
    #[arg(long)]
    pub replace: bool,
    /// Index only shard I of N (files by path hash), e.g. 0/4: several processes, on several machines,
    /// fill one PostgreSQL index.
    #[arg(long)]
    pub shard: Option<Shard>,
    /// Stored paths are relative to this folder (default: the first path).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Vectors from which the embedded store searches with its HNSW graph (below: exact).
    #[arg(long, default_value_t = store::sqlite::DEFAULT_ANN_THRESHOLD)]
    pub ann_threshold: usize,
    /// Embed each chunk after a first line naming its path and symbol (contextual chunks: finds
    /// code without documentation much better; `false` embeds the bare code).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub chunk_header: bool,
    /// After indexing, keep the index current as files change (debounced: a branch switch is one
    /// run) until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: run once no file changed for this long (and at the latest 10 s after the first
    /// unindexed change).
    #[arg(long, default_value_t = 500)]
    pub debounce_ms: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: crate::ComputeDtype,
    #[command(flatten)]
    pub engine: crate::EngineArgs,
}

impl IndexArgs {
    /// The settings `sembed index` runs with when given no flags (clap's own defaults, not a copy).
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            args: IndexArgs,
        }
        <Only as clap::Parser>::parse_from(["sembed-index"]).args
    }
}

#[derive(clap::Args)]
pub struct SearchArgs {
    /// What to look for, in words or code.
    pub query: String,
    /// The index: a SQLite file, or postgres://…[#TABLE]. Default: the nearest .sembed/index.sqlite
    /// in the current folder or above it.
    #[arg(long)]
    pub db: Option<String>,
    /// Model (default: the one the index was made with).
    #[arg(long = "model", short = 'm')]
    pub models: Vec<String>,
    /// Hits to show.
    #[arg(short = 'k', long, default_value_t = 10)]
    pub k: usize,
    /// Only chunks of this language (rust, python, elixir, javascript, typescript, go, java, text).
    #[arg(long)]
    pub lang: Option<String>,
    /// Only paths matching this pattern (`*` any characters, `/` included; `?` one).
    #[arg(long)]
    pub path: Option<String>,
    /// One JSON object with every hit, for scripts.
    #[arg(long)]
    pub json: bool,
    /// Lines of each hit to show.
    #[arg(long, default_value_t = 6)]
    pub lines: usize,
    #[arg(long, default_value_t = store::sqlite::DEFAULT_ANN_THRESHOLD)]
    pub ann_threshold: usize,
    /// Compare every vector even where the HNSW graph would answer (to check its recall).
    #[arg(long)]
    pub exact: bool,
    /// How to rank: hybrid (the vectors' and BM25's scores fused), dense (cosine
    /// only) or lexical (BM25 over split identifiers, paths and words only).
    #[arg(long, default_value = "hybrid")]
    pub mode: sembed_index::search::Mode,
}

struct Bar(Option<indicatif::ProgressBar>, bool);

impl Progress for Bar {
    fn start(&mut self, to_embed: usize) {
        self.0 = progress::bar(to_embed as u64, "chunks", self.1 || to_embed == 0);
    }
    fn embedded(&mut self, n: usize) {
        if let Some(b) = &self.0 {
            b.inc(n as u64);
        }
    }
}

/// The folder stored paths are relative to: `base`, or the first path (its folder, for a file).
pub fn base_of(paths: &[PathBuf], base: Option<&Path>) -> PathBuf {
    match base {
        Some(b) => b.to_path_buf(),
        None if paths[0].is_dir() => paths[0].clone(),
        None => paths[0]
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    }
}

/// Make the `.sembed` folder an index in `FOLDER/.sembed/` goes in. Like .pytest_cache, the folder
/// ignores itself, so the index never shows up in git.
pub fn prepare_default_folder(target: &Path) -> Result<()> {
    if let Some(dir) = target.parent().filter(|d| d.ends_with(".sembed")) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ignore = dir.join(".gitignore");
        if !ignore.exists() {
            std::fs::write(&ignore, "# Created by sembed index.\n*\n")
                .with_context(|| format!("writing {}", ignore.display()))?;
        }
    }
    Ok(())
}

pub fn index(args: IndexArgs) -> Result<()> {
    let paths = if args.paths.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        args.paths.clone()
    };
    for p in &paths {
        if !p.exists() {
            bail!("{}: no such file or folder", p.display());
        }
    }
    let base = base_of(&paths, args.base.as_deref());
    let target = match &args.db {
        Some(t) => t.clone(),
        None => {
            let target = index::default_target(&base);
            prepare_default_folder(&target)?;
            target.display().to_string()
        }
    };
    let refs = index::absolute_refs(&args.models);
    let model = sembed::fusion_config::load(
        &refs,
        args.dtype.dtype(),
        &sembed::device::cpu(),
        args.engine.engine()?,
    )
    .context("loading the model")?;
    let model: Arc<dyn sembed::embed::Embed> = Arc::from(model);
    let mut store = store::open(&target, args.ann_threshold)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let flag = stop.clone();
        let watching = args.watch;
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                // A second Ctrl-C: leave now; the last committed batch is what stays.
                std::process::exit(130);
            }
            if watching {
                eprintln!("\nsembed: stopping the watch (what is written is kept)");
            } else {
                eprintln!(
                    "\nsembed: interrupt received, keeping what is written (Ctrl-C again to leave now)"
                );
            }
        })
        .context("installing the Ctrl-C handler")?;
    }
    let mut opts = IndexOptions::new(paths, base);
    opts.chunk_tokens = args.chunk_tokens;
    opts.window_lines = args.window_lines;
    opts.max_file_bytes = args.max_file_bytes;
    opts.batch_size = args.batch_size;
    opts.replace = args.replace;
    opts.shard = args.shard;
    opts.model_refs = refs;
    opts.header = args.chunk_header;
    let mut bar = Bar(None, args.quiet);
    let t = std::time::Instant::now();
    let report = index::run(
        store.as_mut(),
        &target,
        model.as_ref(),
        &opts,
        &mut bar,
        &stop,
    )?;
    if let Some(b) = &bar.0 {
        b.finish_and_clear();
    }
    let secs = t.elapsed().as_secs_f64();
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["seconds"] = serde_json::json!(secs);
        v["target"] = serde_json::json!(target);
        println!("{v}");
    }
    eprintln!("{}", summary(&report, secs, model.as_ref(), &opts, &target));
    let skipped: Vec<String> = report
        .skipped
        .iter()
        .map(|(why, n)| format!("{n} {why}"))
        .collect();
    if !skipped.is_empty() {
        eprintln!("sembed: skipped {}", skipped.join(", "));
    }
    if report.interrupted {
        eprintln!(
            "sembed: interrupted; what was written is kept, run the same command again to continue"
        );
        std::process::exit(130);
    }
    if args.watch {
        let opts = opts.clone();
        let indexer = sembed_index::watch::Indexer::new(
            target.clone(),
            store,
            model.clone(),
            opts.clone(),
            stop.clone(),
        );
        let debounce = sembed_index::watch::Debounce {
            quiet: std::time::Duration::from_millis(args.debounce_ms),
            ..Default::default()
        };
        eprintln!(
            "sembed: watching {} for changes (Ctrl-C to stop)",
            opts.roots
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        indexer.watch(debounce, &mut |r, secs| match r {
            Ok(rep) => {
                let status = indexer.status();
                if args.json {
                    let mut v = serde_json::to_value(rep).unwrap_or_default();
                    v["seconds"] = serde_json::json!(secs);
                    v["target"] = serde_json::json!(target);
                    println!("{v}");
                }
                eprintln!(
                    "{}; {}",
                    summary(rep, secs, model.as_ref(), &opts, &target),
                    if status.pending > 0 {
                        format!(
                            "{} more changes waiting, the oldest {:.1} s ago",
                            status.pending,
                            status.stale_seconds()
                        )
                    } else {
                        "index current".to_string()
                    }
                );
            }
            Err(e) => {
                eprintln!("sembed: indexing the changes failed: {e}; retrying on the next change")
            }
        })?;
    }
    Ok(())
}

/// Keep an index current until the watcher stops, one line on stderr per run, each `sembed WHO: `
/// (the background watchers of `sembed serve --index --watch` and `sembed mcp --watch`).
pub fn watch_logged(
    indexer: &sembed_index::watch::Indexer,
    debounce: sembed_index::watch::Debounce,
    who: &str,
) {
    let r = indexer.watch(debounce, &mut |r, secs| match r {
        Ok(r) => eprintln!(
            "sembed {who}: {} files changed, {} removed: {} chunks added ({} embedded), {} removed in {secs:.1} s",
            r.files_changed, r.files_removed, r.added, r.embedded, r.removed
        ),
        Err(e) => eprintln!("sembed {who}: indexing the changes failed: {e}"),
    });
    if let Err(e) = r {
        eprintln!("sembed {who}: watching stopped: {e}");
    }
}

/// The one-line report of a run.
fn summary(
    report: &sembed_index::index::Report,
    secs: f64,
    model: &dyn sembed::embed::Embed,
    opts: &IndexOptions,
    target: &str,
) -> String {
    format!(
        "sembed: {} files ({} changed, {} removed), {} chunks: {} unchanged, {} added ({} embedded, {} reused), {} removed{}; {:.1} s, {:.1} chunks/s embedded → {target}",
        report.files,
        report.files_changed,
        report.files_removed,
        report.chunks,
        report.unchanged,
        report.added,
        report.embedded,
        report.added.saturating_sub(report.embedded),
        report.removed,
        if report.split > 0 {
            format!(
                ", {} chunks split into windows to fit {} tokens",
                report.split,
                sembed_index::index::chunk_tokens(model, opts)
            )
        } else {
            String::new()
        },
        secs,
        report.embedded as f64 / secs.max(1e-9),
    )
}

pub fn search(args: SearchArgs) -> Result<()> {
    let (_, mut store, model) = sembed_index::search::open_for_search(
        args.db.as_deref(),
        &args.models,
        args.ann_threshold,
    )?;
    store.set_exact(args.exact);
    let filter = Filter::new(args.lang.clone(), args.path.clone()).map_err(anyhow::Error::msg)?;
    let t = std::time::Instant::now();
    let results = sembed_index::search::search(
        store.as_mut(),
        model.as_ref(),
        &args.query,
        args.k,
        &filter,
        args.mode,
    )?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if args.json {
        let mut v = serde_json::to_value(&results)?;
        v["ms"] = serde_json::json!(ms);
        println!("{v}");
        return Ok(());
    }
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for (i, h) in results.hits.iter().enumerate() {
        let r = &h.row;
        let part = if r.parts > 1 {
            format!(" (part {}/{})", r.part, r.parts)
        } else {
            String::new()
        };
        writeln!(
            out,
            "{:>2}. {}  {}:{}-{}  {} {}{part}",
            i + 1,
            match results.mode {
                sembed_index::search::Mode::Hybrid => format!("{:.4}", h.score),
                _ => format!("{:.3}", h.score),
            },
            r.path,
            r.start_line,
            r.end_line,
            r.kind,
            r.symbol.as_deref().unwrap_or(""),
        )?;
        for line in sembed_index::search::snippet(&r.text, args.lines).lines() {
            writeln!(out, "      {line}")?;
        }
    }
    if results.hits.is_empty() {
        writeln!(out, "no hits")?;
    }
    eprintln!(
        "sembed: {} hits in {ms:.0} ms ({})",
        results.hits.len(),
        match (results.mode, results.method) {
            (_, store::Method::Lexical) => "BM25",
            (sembed_index::search::Mode::Hybrid, store::Method::Exact) => "exact vectors + BM25",
            (sembed_index::search::Mode::Hybrid, store::Method::Ann) => "HNSW + BM25",
            (_, store::Method::Exact) => "exact",
            (_, store::Method::Ann) => "HNSW",
        }
    );
    Ok(())
}
