//! Answering a query: embed it as a query (the model's query prompt, or Jina's retrieval.query
//! adapter) and ask the store for the nearest chunks, and (by default) for the chunks whose terms
//! match best by BM25, their scores fused ([`crate::lexical::fuse_scores`]).

use crate::error::{Error, Result};
use crate::index;
pub use crate::lexical::Mode;
use crate::store::{self, Filter, Hit, Method, Store};
use sembed::embed::{Embed, EmbedOptions, InputRole};
use std::path::Path;

/// Ranked hits and how they were found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Results {
    pub query: String,
    pub mode: Mode,
    /// Hybrid search: the lexical ranking's weight in the fusion (the index's, see
    /// [`crate::store::Meta::lexical_weight`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lexical_weight: Option<f64>,
    /// Hybrid search: the name match's weight ([`crate::store::Meta::name_weight`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_weight: Option<f64>,
    /// How the dense ranking was answered (`lexical` when there was none).
    pub method: Method,
    pub hits: Vec<Hit>,
}

/// The query's vector.
pub fn embed_query(model: &dyn Embed, query: &str) -> Result<Vec<f32>> {
    let opts = EmbedOptions {
        role: Some(InputRole::Query),
        ..EmbedOptions::default()
    };
    let mut v = model.embed(&[query.to_string()], &opts)?;
    Ok(v.pop().unwrap_or_default())
}

/// The `k` best chunks for `query` by `mode`, embedding it with `model` when the mode needs it.
pub fn search(
    store: &mut dyn Store,
    model: &dyn Embed,
    query: &str,
    k: usize,
    filter: &Filter,
    mode: Mode,
) -> Result<Results> {
    match mode {
        Mode::Lexical => ranked(store, query, None, k, filter, mode, None),
        Mode::Dense => ranked(
            store,
            query,
            Some(&embed_query(model, query)?),
            k,
            filter,
            mode,
            None,
        ),
        Mode::Hybrid => {
            // The lexical ranking needs no vector: it runs while the query is embedded.
            let (v, lexical) = std::thread::scope(|s| {
                let embedding = s.spawn(|| embed_query(model, query));
                let lexical = lexical_ranking(store, query, k, filter);
                let v = embedding
                    .join()
                    .expect("the query's embedding thread panicked");
                (v, lexical)
            });
            ranked(store, query, Some(&v?), k, filter, mode, Some(lexical?))
        }
    }
}

/// The lexical ranking a hybrid search of `k` hits fuses ([`crate::lexical::depth`] deep): what
/// can run while the query is being embedded, handed to [`ranked`].
pub fn lexical_ranking(
    store: &mut dyn Store,
    query: &str,
    k: usize,
    filter: &Filter,
) -> Result<Vec<Hit>> {
    let depth = crate::lexical::depth(k);
    store.lexical(&crate::lexical::query_terms(query), depth, filter)
}

/// The `k` best chunks for `query` by `mode`, given the query's vector (`None` only for lexical
/// search): dense and lexical rankings [`crate::lexical::depth`] deep, fused. A hybrid search's
/// lexical ranking may come already run (`lexical`: [`lexical_ranking`] of the same query, `k` and
/// filter); otherwise it runs here.
pub fn ranked(
    store: &mut dyn Store,
    query: &str,
    vector: Option<&[f32]>,
    k: usize,
    filter: &Filter,
    mode: Mode,
    lexical: Option<Vec<Hit>>,
) -> Result<Results> {
    let need_vector = || Error::Invalid("a dense or hybrid search needs the query's vector".into());
    let (mut lexical_weight, mut name_weight) = (None, None);
    let (hits, method) = match mode {
        Mode::Dense => store.search(vector.ok_or_else(need_vector)?, k, filter)?,
        Mode::Lexical => (
            store.lexical(&crate::lexical::query_terms(query), k, filter)?,
            Method::Lexical,
        ),
        Mode::Hybrid => {
            let depth = crate::lexical::depth(k);
            let (dense, method) = store.search(vector.ok_or_else(need_vector)?, depth, filter)?;
            let lexical = match lexical {
                Some(l) => l,
                None => lexical_ranking(store, query, k, filter)?,
            };
            let w = store.meta()?.map(|m| m.weights()).unwrap_or_default();
            lexical_weight = Some(w.lexical);
            name_weight = Some(w.name);
            let q = crate::lexical::NameQuery::new(query);
            (crate::lexical::fuse(&dense, &lexical, k, w, &q), method)
        }
    };
    Ok(Results {
        query: query.to_string(),
        mode,
        lexical_weight,
        name_weight,
        method,
        hits,
    })
}

/// The first `lines` lines of a hit's text, for a terminal.
pub fn snippet(text: &str, lines: usize) -> String {
    let mut out: Vec<&str> = text.lines().take(lines).collect();
    if text.lines().count() > lines {
        out.push("…");
    }
    out.join("\n")
}

/// An index's location, its store, and the model its vectors came from.
pub type Opened = (String, Box<dyn Store>, Box<dyn Embed>);

/// Open an index for searching (`db`, or the `.sembed/index.sqlite` of this folder or one above
/// it), and the model its vectors came from: `models`, or else the references the index recorded,
/// loaded in the precision its vectors were made in and checked against the index's identity.
pub fn open_for_search(
    db: Option<&str>,
    models: &[String],
    ann_threshold: usize,
) -> Result<Opened> {
    let target = match db {
        Some(t) => t.to_string(),
        None => index::find_default(Path::new("."))
            .ok_or_else(|| {
                Error::Invalid(
                    "no index here: no .sembed/index.sqlite in this folder or above it; run `sembed index` first, or give --db"
                        .into(),
                )
            })?
            .display()
            .to_string(),
    };
    let mut store = store::open_existing(&target, ann_threshold)?;
    let meta = store.meta()?.ok_or_else(|| {
        Error::Invalid(format!(
            "{target}: the index is empty; run `sembed index` first"
        ))
    })?;
    let model = load_model_of(&meta, models, &target)?;
    Ok((target, store, model))
}

/// The model an index's vectors came from: `models`, or else the references the index recorded,
/// loaded in the precision its vectors were made in and checked against the index's identity.
pub fn load_model_of(
    meta: &store::Meta,
    models: &[String],
    target: &str,
) -> Result<Box<dyn Embed>> {
    let refs = if models.is_empty() {
        meta.model_refs.clone()
    } else {
        index::absolute_refs(models)
    };
    // The precision the vectors were made in (from the engine, not the model's name).
    use sembed::fast::{Engine, Precision};
    let made_with = index::identity_engine(&meta.model);
    let engine = if made_with.contains("int8") {
        Engine::Fast(Precision::Int8)
    } else {
        Engine::Auto
    };
    let dtype = if made_with.contains("bf16") {
        sembed::DType::BF16
    } else if made_with.contains("-f16") {
        sembed::DType::F16
    } else {
        sembed::DType::F32
    };
    let model = sembed::fusion_config::load(&refs, dtype, &sembed::device::cpu(), engine)
        .map_err(|e| Error::Invalid(format!("loading the index's model: {e}")))?;
    index::check_model(meta, model.as_ref(), target)?;
    Ok(model)
}
