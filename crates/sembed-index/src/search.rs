//! Answering a query: embed it as a query (the model's query prompt, or Jina's retrieval.query
//! adapter) and ask the store for the nearest chunks.

use crate::error::Result;
use crate::store::{Filter, Hit, Method, Store};
use sembed::embed::{Embed, EmbedOptions, InputRole};

/// Ranked hits and how they were found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Results {
    pub query: String,
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

/// The `k` chunks nearest to `query`.
pub fn search(
    store: &mut dyn Store,
    model: &dyn Embed,
    query: &str,
    k: usize,
    filter: &Filter,
) -> Result<Results> {
    let q = embed_query(model, query)?;
    let (hits, method) = store.search(&q, k, filter)?;
    Ok(Results {
        query: query.to_string(),
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
