//! The NIF behind the Elixir package in `bindings/elixir` (module `Sembed.Native`): models and code
//! indexes as BEAM resources, freed when the BEAM collects their last reference; every load,
//! forward pass and search on a dirty CPU scheduler; every panic caught here and answered as
//! `{:error, "panic: …"}`. Options arrive validated by the Elixir side (`Sembed`); errors go back
//! as `{:error, message}` strings, which `Sembed` wraps in `%Sembed.Error{}`.
//!
//! Opening an index for search is `sembed_index::search::open_for_search`, the same function the
//! CLI's `search` and `serve --index` call.
//!
//! One small rule is restated rather than called: the CLI's `EngineArgs::engine` (its `--engine`
//! and `--quantize` clap enums → `sembed::fast::Engine`) is a match on clap types; [`dtype_engine`]
//! is the same match on the strings the Elixir side sends, using the library's `Engine` parser.

use rustler::{Atom, Binary, Env, NewBinary, NifMap, ResourceArc};
use sembed::embed::{Embed, EmbedOptions, InputRole};
use sembed::fast::{Engine, Precision};
use sembed::DType;
use sembed_index::store::{Filter, Store};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, PoisonError};

/// The `sembed` binary's allocator: it hands freed model memory back to the kernel (and the fast
/// engine's `release_scratch` asks it to), so a BEAM that loads and drops models does not grow.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod atoms {
    rustler::atoms! { ok }
}

/// A loaded model: one embedder or a fusion.
pub struct Model {
    /// `AssertUnwindSafe`: a NIF's return value must be `RefUnwindSafe`, which `dyn Embed` does not
    /// promise; embedding takes `&self`, so a caught panic leaves nothing half-changed.
    inner: AssertUnwindSafe<Box<dyn Embed>>,
    /// What it was loaded in: `f32`, `bf16`, `f16` or `int8`.
    precision: String,
    /// Token limit of every call that does not give its own (`max_length:` of `Sembed.load/2`).
    max_length: Option<usize>,
}

impl Model {
    fn new(inner: Box<dyn Embed>, precision: String, max_length: Option<usize>) -> Self {
        Model {
            inner: AssertUnwindSafe(inner),
            precision,
            max_length,
        }
    }

    fn embedder(&self) -> &dyn Embed {
        &**self.inner
    }
}

#[rustler::resource_impl]
impl rustler::Resource for Model {}

/// An opened code index (`sembed index`'s SQLite file or PostgreSQL table) and the model that
/// embeds its queries. The store is not `Sync`: searches of one index take turns.
pub struct Index {
    target: String,
    store: Mutex<Box<dyn Store>>,
    model: ResourceArc<Model>,
}

#[rustler::resource_impl]
impl rustler::Resource for Index {}

/// What every NIF answers: `{:ok, value}` or `{:error, message}`.
type Out<T> = Result<T, String>;

/// Run `f`, turning a panic into `Err("panic: …")`.
fn guarded<T>(f: impl FnOnce() -> Out<T>) -> Out<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Err(format!("panic: {what}"))
    })
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Compute dtype and engine of a precision (`f32`, `bf16`, `f16`, `int8`) and an engine (`auto`,
/// `fast`, `candle`), as the CLI's `--dtype`, `--quantize` and `--engine` give them.
fn dtype_engine(precision: &str, engine: &str) -> Out<(DType, Engine)> {
    let engine: Engine = engine.parse().map_err(text)?;
    Ok(match precision {
        "f32" => (DType::F32, engine),
        "bf16" => (DType::BF16, engine),
        "f16" => (DType::F16, engine),
        "int8" if engine == Engine::Candle => {
            return Err("precision int8 runs on the fast engine, not with engine candle".into())
        }
        "int8" => (DType::F32, Engine::Fast(Precision::Int8)),
        other => {
            return Err(format!(
                "precision `{other}`: expected f32, bf16, f16 or int8"
            ))
        }
    })
}

/// The precision an engine name (`fast-int8`, `fast-f32+fast-bf16`, `candle`) shows.
fn precision_of(engine: &str) -> String {
    ["int8", "bf16", "f16"]
        .into_iter()
        .find(|p| engine.contains(&format!("-{p}")))
        .unwrap_or("f32")
        .to_string()
}

/// A vector as a little-endian f32 binary (`Nx.from_binary(v, :f32)` reads it).
fn f32_binary<'a>(env: Env<'a>, v: &[f32]) -> Binary<'a> {
    let mut b = NewBinary::new(env, v.len() * 4);
    for (out, x) in b.as_mut_slice().chunks_exact_mut(4).zip(v) {
        out.copy_from_slice(&x.to_le_bytes());
    }
    b.into()
}

/// Load what `refs` name, as `sembed embed -m` does: `[]` the default model, one folder,
/// `hf:ORG/NAME` or fusion `.toml`, or several `NAME=REF` parts of a fusion.
#[rustler::nif(schedule = "DirtyCpu")]
fn load(
    refs: Vec<String>,
    precision: String,
    engine: String,
    max_length: Option<usize>,
) -> Out<ResourceArc<Model>> {
    guarded(move || {
        let (dtype, engine) = dtype_engine(&precision, &engine)?;
        let model = sembed::fusion_config::load(&refs, dtype, &sembed::device::cpu(), engine)
            .map_err(text)?;
        if let Some(n) = max_length {
            let most = model.max_length();
            if n == 0 || n > most {
                return Err(format!(
                    "max_length {n} out of range 1..={most} for {}",
                    model.name()
                ));
            }
        }
        Ok(ResourceArc::new(Model::new(model, precision, max_length)))
    })
}

/// `Sembed.embed/3`'s options, every key present (`nil` where not given).
#[derive(NifMap)]
struct EmbedOpts {
    input_type: Option<String>,
    task: Option<String>,
    dimensions: Option<usize>,
    normalize: bool,
    truncate: bool,
    max_length: Option<usize>,
    batch_size: usize,
}

/// One vector per text, in input order.
#[rustler::nif(schedule = "DirtyCpu")]
fn embed<'a>(
    env: Env<'a>,
    model: ResourceArc<Model>,
    texts: Vec<Binary<'a>>,
    opts: EmbedOpts,
) -> Out<Vec<Binary<'a>>> {
    let vectors = guarded(|| {
        let texts = texts
            .iter()
            .enumerate()
            .map(|(i, b)| {
                std::str::from_utf8(b.as_slice())
                    .map(str::to_owned)
                    .map_err(|e| format!("text {i} is not valid UTF-8: {e}"))
            })
            .collect::<Out<Vec<String>>>()?;
        let role = opts
            .input_type
            .as_deref()
            .map(str::parse::<InputRole>)
            .transpose()
            .map_err(text)?;
        let options = EmbedOptions {
            role,
            task: opts.task.clone(),
            dimensions: opts.dimensions,
            normalize: opts.normalize,
            truncate: opts.truncate,
            truncate_left: None,
            max_length: opts.max_length.or(model.max_length),
            batch_size: opts.batch_size.max(1),
        };
        model.embedder().embed(&texts, &options).map_err(text)
    })?;
    Ok(vectors.iter().map(|v| f32_binary(env, v)).collect())
}

#[derive(NifMap)]
struct Info {
    name: String,
    dimension: usize,
    max_length: usize,
    engine: String,
    engine_reasons: Vec<String>,
    precision: String,
    kernels: String,
    tasks: Vec<String>,
    models: usize,
}

/// What a model is (cheap: nothing runs).
#[rustler::nif]
fn info(model: ResourceArc<Model>) -> Out<Info> {
    guarded(|| {
        let m = model.embedder();
        Ok(Info {
            name: m.name().to_string(),
            dimension: m.dimension(),
            max_length: model.max_length.unwrap_or_else(|| m.max_length()),
            engine: m.engine(),
            engine_reasons: m.engine_reasons(),
            precision: model.precision.clone(),
            kernels: sembed::fast::cpu::active().name().to_string(),
            tasks: m.task_names(),
            models: m.models(),
        })
    })
}

/// Give back the scratch memory the engines keep between calls.
#[rustler::nif(schedule = "DirtyCpu")]
fn release_memory(model: ResourceArc<Model>) -> Out<Atom> {
    guarded(|| {
        model.embedder().release_memory();
        Ok(atoms::ok())
    })
}

/// Open an index built by `sembed index`: with `model`, that model (checked against the index's
/// recorded identity); else `refs` (empty: the references the index recorded), loaded in the
/// precision its vectors were made in. Answers the index and the model embedding its queries. `many`:
/// it will answer many searches (the embedded store then keeps its rows' terms in memory).
#[rustler::nif(schedule = "DirtyCpu")]
fn open_index(
    target: String,
    model: Option<ResourceArc<Model>>,
    refs: Vec<String>,
    ann_threshold: Option<usize>,
    many: bool,
) -> Out<(ResourceArc<Index>, ResourceArc<Model>)> {
    guarded(move || {
        let ann = ann_threshold.unwrap_or(sembed_index::store::sqlite::DEFAULT_ANN_THRESHOLD);
        let (mut store, model) = match model {
            Some(m) => {
                let mut store = sembed_index::store::open_existing(&target, ann).map_err(text)?;
                let meta = store.meta().map_err(text)?.ok_or_else(|| {
                    format!("{target}: the index is empty; run `sembed index` first")
                })?;
                sembed_index::index::check_model(&meta, m.embedder(), &target).map_err(text)?;
                (store, m)
            }
            None => {
                let (_, store, embed) =
                    sembed_index::search::open_for_search(Some(&target), &refs, ann)
                        .map_err(text)?;
                let precision = precision_of(&embed.engine());
                (store, ResourceArc::new(Model::new(embed, precision, None)))
            }
        };
        if many {
            store.answer_many();
        }
        let index = Index {
            target,
            store: Mutex::new(store),
            model: model.clone(),
        };
        Ok((ResourceArc::new(index), model))
    })
}

#[derive(NifMap)]
struct IndexInfo {
    target: String,
    model: String,
    model_refs: Vec<String>,
    dimension: usize,
    chunker: String,
    rows: usize,
}

/// An index's recorded settings and its number of rows.
#[rustler::nif(schedule = "DirtyCpu")]
fn index_info(index: ResourceArc<Index>) -> Out<IndexInfo> {
    guarded(|| {
        let mut store = index.store.lock().unwrap_or_else(PoisonError::into_inner);
        let meta = store
            .meta()
            .map_err(text)?
            .ok_or_else(|| format!("{}: the index is empty", index.target))?;
        Ok(IndexInfo {
            target: index.target.clone(),
            model: meta.model,
            model_refs: meta.model_refs,
            dimension: meta.dimension,
            chunker: meta.chunker,
            rows: store.count().map_err(text)?,
        })
    })
}

/// One hit: the stored row (`sembed search --json`'s fields), the score it was ranked by, and its
/// cosine similarity and BM25 where it was in those rankings (`nil` where not).
#[derive(NifMap)]
struct HitOut {
    score: f32,
    cosine: Option<f32>,
    bm25: Option<f32>,
    path: String,
    lang: String,
    kind: String,
    symbol: Option<String>,
    start_line: usize,
    end_line: usize,
    start_byte: usize,
    end_byte: usize,
    part: usize,
    parts: usize,
    hash: String,
    text: String,
}

/// The `k` chunks nearest to `query` (embedded as a query), best first.
#[rustler::nif(schedule = "DirtyCpu")]
fn search(
    index: ResourceArc<Index>,
    query: String,
    k: usize,
    lang: Option<String>,
    path: Option<String>,
    exact: bool,
    mode: String,
) -> Out<Vec<HitOut>> {
    guarded(move || {
        let mode: sembed_index::search::Mode = mode.parse()?;
        let mut store = index.store.lock().unwrap_or_else(PoisonError::into_inner);
        store.set_exact(exact);
        let filter = Filter::new(lang, path)?;
        let results = sembed_index::search::search(
            &mut **store,
            index.model.embedder(),
            &query,
            k,
            &filter,
            mode,
        )
        .map_err(text)?;
        Ok(results
            .hits
            .into_iter()
            .map(|h| {
                let r = h.row;
                HitOut {
                    score: h.score,
                    cosine: h.cosine,
                    bm25: h.bm25,
                    hash: sembed_index::store::hex(&r.hash),
                    path: r.path,
                    lang: r.lang,
                    kind: r.kind,
                    symbol: r.symbol,
                    start_line: r.start_line,
                    end_line: r.end_line,
                    start_byte: r.start_byte,
                    end_byte: r.end_byte,
                    part: r.part,
                    parts: r.parts,
                    text: r.text,
                }
            })
            .collect())
    })
}

/// Panics on purpose, so a test can show the panic comes back as `{:error, "panic: …"}` and the
/// VM goes on.
#[rustler::nif(schedule = "DirtyCpu")]
fn panic_for_test() -> Out<Atom> {
    guarded(|| panic!("panic_for_test: a panic on purpose, caught at the NIF boundary"))
}

rustler::init!("Elixir.Sembed.Native");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precisions_and_engines_map_as_on_the_command_line() {
        assert_eq!(
            dtype_engine("f32", "auto").unwrap(),
            (DType::F32, Engine::Auto)
        );
        assert_eq!(
            dtype_engine("bf16", "fast").unwrap(),
            (DType::BF16, Engine::Fast(Precision::F32))
        );
        assert_eq!(
            dtype_engine("int8", "auto").unwrap(),
            (DType::F32, Engine::Fast(Precision::Int8))
        );
        assert!(dtype_engine("int8", "candle")
            .unwrap_err()
            .contains("candle"));
        assert!(dtype_engine("f64", "auto").unwrap_err().contains("f64"));
        assert!(dtype_engine("f32", "gpu").is_err());
    }

    #[test]
    fn precision_is_read_from_the_engine_name() {
        assert_eq!(precision_of("fast-int8"), "int8");
        assert_eq!(precision_of("fast-bf16"), "bf16");
        assert_eq!(precision_of("fast-f16"), "f16");
        assert_eq!(precision_of("fast-f32+fast-int8"), "int8");
        assert_eq!(precision_of("candle"), "f32");
    }

    #[test]
    fn a_panic_becomes_an_error() {
        let r: Out<()> = guarded(|| panic!("boom {}", 1));
        assert_eq!(r.unwrap_err(), "panic: boom 1");
        assert_eq!(guarded(|| Ok(3)).unwrap(), 3);
    }
}
