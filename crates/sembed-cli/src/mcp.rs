//! `sembed mcp`: the code index as a Model Context Protocol server over stdio, for AI coding agents.
//!
//! The protocol is rmcp's (the maintained Rust SDK): the 2026-07-28 revision (stateless: every request
//! carries its own protocol version and client info) and the earlier ones with their `initialize`
//! handshake. Tools: `search` (hybrid, dense or lexical; k, language, path glob), `lookup_symbol`,
//! `index_status` and `refresh_index`. stdout carries protocol messages only: every log line goes to
//! stderr. The index is brought up to date in the background at start (and kept so with `--watch`),
//! so the first requests are answered at once, from what is indexed so far.

use anyhow::{bail, Context, Result};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ErrorData, JsonObject};
use rmcp::schemars;
use rmcp::{tool, tool_handler, tool_router, ServerHandler, ServiceExt};
use sembed::embed::Embed;
use sembed_index::index::{IndexOptions, Source};
use sembed_index::search::Mode;
use sembed_index::store::{self, Filter, Store};
use sembed_index::watch::{Debounce, Indexer};
use serde::Deserialize;
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

#[derive(clap::Args)]
pub struct McpArgs {
    /// Folders to index and search. Default: what the index was made from, or the current folder.
    pub paths: Vec<PathBuf>,
    /// The index: a SQLite file, or postgres://…[#TABLE]. Default: FIRST_PATH/.sembed/index.sqlite,
    /// or the nearest .sembed/index.sqlite in the current folder or above it.
    #[arg(long)]
    pub db: Option<String>,
    /// Model for a new index (default: all-MiniLM-L6-v2; an existing index uses its own).
    #[arg(long = "model", short = 'm')]
    pub models: Vec<String>,
    /// Keep the index current as files change, in the background.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: run once no file changed for this long.
    #[arg(long, default_value_t = 500)]
    pub debounce_ms: u64,
    /// Do not bring the index up to date at start (`refresh_index` still does).
    #[arg(long)]
    pub no_refresh: bool,
    #[arg(long, default_value_t = store::sqlite::DEFAULT_ANN_THRESHOLD)]
    pub ann_threshold: usize,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: crate::ComputeDtype,
    #[command(flatten)]
    pub engine: crate::EngineArgs,
}

/// Most hits a search or a lookup returns.
const MAX_K: u32 = 100;

#[derive(Debug, Clone, Copy, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
enum ModeArg {
    /// Vectors and BM25, their scores fused (the default).
    Hybrid,
    /// Vectors only.
    Dense,
    /// BM25 over split identifiers, paths and words only.
    Lexical,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SearchParams {
    /// What to look for, in words or code ("where are retries scheduled", "parse_header").
    query: String,
    /// Hits to return (1 to 100, default 10).
    k: Option<u32>,
    /// Only chunks of this language: rust, python, elixir, javascript, typescript, go, java, text.
    language: Option<String>,
    /// Only paths matching this glob (`*` any characters, `/` included; `?` one), e.g. `lib/*.ex`.
    path: Option<String>,
    /// How to rank (default hybrid).
    mode: Option<ModeArg>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SymbolParams {
    /// A definition's name, whole (`MyApp.Repo.get`, `Store::open`) or its last parts (`get`,
    /// `Repo.get`).
    name: String,
    /// Most definitions to return (1 to 100, default 20).
    limit: Option<u32>,
    /// Only definitions in this language.
    language: Option<String>,
    /// Only paths matching this glob.
    path: Option<String>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoParams {}

struct Inner {
    target: String,
    store: Mutex<Box<dyn Store>>,
    model: Arc<dyn Embed>,
    indexer: Arc<Indexer>,
}

#[derive(Clone)]
pub struct SembedMcp {
    inner: Arc<Inner>,
}

/// A tool's input schema, from its parameters' type.
fn schema<T: schemars::JsonSchema + 'static>() -> Arc<JsonObject> {
    rmcp::handler::server::common::schema_for_input::<T>().expect("an object schema")
}

/// A tool's arguments, or a JSON-RPC "invalid params" error saying what is wrong with them. (rmcp's
/// own `Parameters<T>` answers a wrong argument with a tool result flagged `isError`; arguments that
/// do not fit the tool's schema are a malformed request here, like an unknown tool.)
fn args<T: serde::de::DeserializeOwned>(a: JsonObject) -> Result<T, ErrorData> {
    serde_json::from_value(serde_json::Value::Object(a))
        .map_err(|e| invalid(format!("invalid arguments: {e}")))
}

fn invalid(message: impl Into<String>) -> ErrorData {
    ErrorData::invalid_params(message.into(), None)
}

fn filter(language: Option<String>, path: Option<String>) -> Result<Filter, ErrorData> {
    Filter::new(language, path).map_err(invalid)
}

fn count(k: Option<u32>, default: u32, what: &str) -> Result<usize, ErrorData> {
    let k = k.unwrap_or(default);
    if k == 0 || k > MAX_K {
        return Err(invalid(format!("{what} must be 1 to {MAX_K}, not {k}")));
    }
    Ok(k as usize)
}

/// A failure of the tool itself (not of the request): the caller sees the message.
fn failed(e: impl std::fmt::Display) -> CallToolResult {
    CallToolResult::structured_error(json!({ "error": e.to_string() }))
}

impl SembedMcp {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> T + Send + 'static,
    ) -> Result<T, ErrorData> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| ErrorData::internal_error(format!("the tool failed: {e}"), None))
    }
}

/// A chunk as the tools return it: where it is, what it is, its text.
fn row_json(r: &store::Row) -> serde_json::Value {
    json!({
        "path": r.path,
        "start_line": r.start_line,
        "end_line": r.end_line,
        "lang": r.lang,
        "kind": r.kind,
        "symbol": r.symbol,
        "text": r.text,
    })
}

fn hit_json(h: &store::Hit) -> serde_json::Value {
    let r = &h.row;
    let mut v = row_json(r);
    v["score"] = json!(h.score);
    if let Some(c) = h.cosine {
        v["cosine"] = json!(c);
    }
    if let Some(b) = h.bm25 {
        v["bm25"] = json!(b);
    }
    if r.parts > 1 {
        v["part"] = json!(r.part);
        v["parts"] = json!(r.parts);
    }
    v
}

#[tool_router]
impl SembedMcp {
    #[tool(
        description = "Search the code index: ranked chunks (functions, classes, modules, windows of text) with path, lines, symbol and text. Ask in words or code.",
        annotations(read_only_hint = true),
        input_schema = schema::<SearchParams>()
    )]
    async fn search(
        &self,
        Parameters(a): Parameters<JsonObject>,
    ) -> Result<CallToolResult, ErrorData> {
        let p: SearchParams = args(a)?;
        if p.query.trim().is_empty() {
            return Err(invalid("query is empty"));
        }
        let k = count(p.k, 10, "k")?;
        let filter = filter(p.language, p.path)?;
        let mode = match p.mode.unwrap_or(ModeArg::Hybrid) {
            ModeArg::Hybrid => Mode::Hybrid,
            ModeArg::Dense => Mode::Dense,
            ModeArg::Lexical => Mode::Lexical,
        };
        let query = p.query;
        self.blocking(move |ix| {
            let status = ix.indexer.status();
            let mut store = ix.store.lock().unwrap_or_else(|e| e.into_inner());
            match sembed_index::search::search(
                store.as_mut(),
                ix.model.as_ref(),
                &query,
                k,
                &filter,
                mode,
            ) {
                Ok(r) => CallToolResult::structured(json!({
                    "query": r.query,
                    "mode": r.mode,
                    "lexical_weight": r.lexical_weight,
                    "name_weight": r.name_weight,
                    "method": r.method,
                    "hits": r.hits.iter().map(hit_json).collect::<Vec<_>>(),
                    "indexing": status.running,
                    "stale_seconds": status.stale_seconds(),
                })),
                Err(e) => failed(e),
            }
        })
        .await
    }

    #[tool(
        description = "Find where a symbol is defined: the chunks whose definition has this name (whole, or its last parts after . or ::), exact names first.",
        annotations(read_only_hint = true),
        input_schema = schema::<SymbolParams>()
    )]
    async fn lookup_symbol(
        &self,
        Parameters(a): Parameters<JsonObject>,
    ) -> Result<CallToolResult, ErrorData> {
        let p: SymbolParams = args(a)?;
        let name = p.name.trim().to_string();
        if name.is_empty() {
            return Err(invalid("name is empty"));
        }
        let limit = count(p.limit, 20, "limit")?;
        let filter = filter(p.language, p.path)?;
        self.blocking(move |ix| {
            let mut store = ix.store.lock().unwrap_or_else(|e| e.into_inner());
            match store.symbols(&name, limit, &filter) {
                Ok(rows) => CallToolResult::structured(json!({
                    "name": name,
                    "definitions": rows.iter().map(|r| {
                        let mut v = row_json(r);
                        v["part"] = json!(r.part);
                        v["parts"] = json!(r.parts);
                        v
                    }).collect::<Vec<_>>(),
                })),
                Err(e) => failed(e),
            }
        })
        .await
    }

    #[tool(
        description = "Report the code index: where it is, its model, chunks and files, what it indexes, whether it is being updated or watched, and how stale it is (seconds since the oldest change it does not hold yet).",
        annotations(read_only_hint = true),
        input_schema = schema::<NoParams>()
    )]
    async fn index_status(
        &self,
        Parameters(a): Parameters<JsonObject>,
    ) -> Result<CallToolResult, ErrorData> {
        let NoParams {} = args(a)?;
        self.blocking(move |ix| {
            let mut store = ix.store.lock().unwrap_or_else(|e| e.into_inner());
            let info = (|| -> sembed_index::Result<serde_json::Value> {
                let meta = store.meta()?;
                Ok(json!({
                    "target": ix.target,
                    "model": meta.as_ref().map(|m| m.model.clone()),
                    "dimension": meta.as_ref().map(|m| m.dimension),
                    "chunks": store.count()?,
                    "files": store.files(None)?.len(),
                    "roots": ix.indexer.options().roots,
                    "status": ix.indexer.status().to_json(),
                }))
            })();
            match info {
                Ok(v) => CallToolResult::structured(v),
                Err(e) => failed(e),
            }
        })
        .await
    }

    #[tool(
        description = "Bring the code index up to date now (incremental: only changed files are read and only new chunks embedded); returns what changed. Waits for an update under way to finish first.",
        input_schema = schema::<NoParams>()
    )]
    async fn refresh_index(
        &self,
        Parameters(a): Parameters<JsonObject>,
    ) -> Result<CallToolResult, ErrorData> {
        let NoParams {} = args(a)?;
        self.blocking(move |ix| {
            let t = std::time::Instant::now();
            match ix.indexer.run_once(None) {
                Ok(r) => {
                    let mut v = serde_json::to_value(&r).unwrap_or_default();
                    v["seconds"] = json!(t.elapsed().as_secs_f64());
                    CallToolResult::structured(v)
                }
                Err(e) => failed(e),
            }
        })
        .await
    }
}

#[tool_handler(
    name = "sembed",
    instructions = "Semantic and lexical code search over this repository's index. Use `search` for questions in words or code, `lookup_symbol` for where a name is defined, `index_status` to see how current the index is, `refresh_index` after large edits."
)]
impl ServerHandler for SembedMcp {}

pub fn run(args: McpArgs) -> Result<()> {
    // Where the index is and what it indexes.
    let target = match (&args.db, args.paths.first()) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => sembed_index::index::default_target(p).display().to_string(),
        (None, None) => match sembed_index::index::find_default(std::path::Path::new(".")) {
            Some(t) => t.display().to_string(),
            None => sembed_index::index::default_target(std::path::Path::new("."))
                .display()
                .to_string(),
        },
    };
    for p in &args.paths {
        if !p.exists() {
            bail!("{}: no such file or folder", p.display());
        }
    }
    if !target.contains("://") {
        crate::code::prepare_default_folder(std::path::Path::new(&target))?;
    }
    let mut store = store::open(&target, args.ann_threshold)?;
    let meta = store.meta()?;
    let recorded = Source::of(store.as_mut())?;
    let mut opts = match (args.paths.is_empty(), recorded.as_ref()) {
        (false, _) | (true, None) => {
            let paths = if args.paths.is_empty() {
                // An index in FOLDER/.sembed/ indexes FOLDER.
                let t = std::path::Path::new(&target);
                match t.parent().and_then(|d| d.parent()) {
                    Some(d) if t.parent().is_some_and(|p| p.ends_with(".sembed")) => {
                        vec![if d.as_os_str().is_empty() {
                            PathBuf::from(".")
                        } else {
                            d.to_path_buf()
                        }]
                    }
                    _ => bail!(
                        "{target} records no folders it indexes; give them: sembed mcp FOLDER… --db {target}"
                    ),
                }
            } else {
                args.paths.clone()
            };
            let base = crate::code::base_of(&paths, None);
            // Other folders than the recorded ones keep the index's chunking settings (a change of
            // them would cut and embed every file again).
            let mut o = match recorded.as_ref() {
                Some(src) => IndexOptions {
                    roots: paths,
                    base,
                    ..src.options()
                },
                None => IndexOptions::new(paths, base),
            };
            o.model_refs = match &meta {
                // An existing index goes on with the model it was made with.
                Some(m) if args.models.is_empty() => m.model_refs.clone(),
                _ => sembed_index::index::absolute_refs(&args.models),
            };
            o
        }
        (true, Some(source)) => source.options(),
    };
    // One server keeps the whole index current, whichever shard of it a run recorded last.
    opts.shard = None;
    let model: Arc<dyn Embed> = match &meta {
        Some(m) if args.models.is_empty() => Arc::from(
            sembed_index::search::load_model_of(m, &[], &target)
                .context("loading the index's model")?,
        ),
        _ => Arc::from(
            sembed::fusion_config::load(
                &opts.model_refs,
                args.dtype.dtype(),
                &sembed::device::cpu(),
                args.engine.engine()?,
            )
            .context("loading the model")?,
        ),
    };
    if let Some(m) = &meta {
        sembed_index::index::check_model(m, model.as_ref(), &target)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let indexer = Arc::new(Indexer::new(
        target.clone(),
        store::open(&target, args.ann_threshold)?,
        model.clone(),
        opts,
        stop.clone(),
    ));
    // A server answers many searches: the store may keep what they need in memory.
    store.answer_many();
    let server = SembedMcp {
        inner: Arc::new(Inner {
            target: target.clone(),
            store: Mutex::new(store),
            model,
            indexer: indexer.clone(),
        }),
    };
    eprintln!("sembed mcp: serving {target} over stdio");
    if !args.no_refresh || args.watch {
        let (refresh, watch) = (!args.no_refresh, args.watch);
        let debounce = Debounce {
            quiet: std::time::Duration::from_millis(args.debounce_ms),
            ..Default::default()
        };
        std::thread::spawn(move || {
            if refresh {
                let t = std::time::Instant::now();
                match indexer.run_once(None) {
                    Ok(r) => eprintln!(
                        "sembed mcp: index up to date ({} files, {} chunks; {} embedded) in {:.1} s",
                        r.files,
                        r.chunks,
                        r.embedded,
                        t.elapsed().as_secs_f64()
                    ),
                    Err(e) => eprintln!("sembed mcp: updating the index failed: {e}"),
                }
            }
            if watch {
                crate::code::watch_logged(&indexer, debounce, "mcp");
            }
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let service = match server.serve(rmcp::transport::stdio()).await {
            Ok(service) => service,
            // The client left before a session began (it sent nothing, or only pings, discovery
            // or messages that were answered with errors): an end like any other, not a failure.
            Err(rmcp::service::ServerInitializeError::ConnectionClosed(_)) => {
                return anyhow::Ok(());
            }
            Err(e) => return Err(e).context("starting the MCP session"),
        };
        service.waiting().await.context("the MCP session")?;
        anyhow::Ok(())
    })?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}
