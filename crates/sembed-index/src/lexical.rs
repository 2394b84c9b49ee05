//! The lexical side of search: the terms a chunk is found by, BM25 over them, and the fusion of the
//! lexical and dense rankings.
//!
//! Terms are made here, in Rust, for both stores, so SQLite's FTS5 and PostgreSQL see the same terms
//! and score them with the same BM25 (FTS5's `bm25()`: k1 1.2, b 0.75, idf `ln((N − n + 0.5)/(n + 0.5))`
//! floored at 1e-6). Identifiers are split the way people write queries: `decode16` → `decode16 decode
//! 16`, `HTTPClient` and `http_client` → `httpclient http client`; words are lower-cased, English
//! stop words dropped and the rest stemmed (Snowball English: `decodes`, `decoding` → `decod`). A
//! chunk's terms are those of its path, its symbol and its text.

use crate::store::{Hit, Row};
use rust_stemmers::{Algorithm, Stemmer};
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

/// Version of the term rules: an index whose lexical terms were made by another version rebuilds
/// them (from the stored texts; nothing is embedded again).
pub const VERSION: u32 = 3;

/// BM25 constants (FTS5's).
pub const K1: f64 = 1.2;
pub const B: f64 = 0.75;

/// RRF's constant. Cormack et al. (2009) and most hybrid search tools use 60; on the docs-removed
/// measure (bench/heldout_search.py, tuned on CPython's logging/concurrent/urllib/http and Elixir's
/// mix/ex_unit/iex/logger/eex, never on the reported sets) 10 ranked better: NDCG@10 +0.013 and
/// +0.006 over 60, with both rankings 50 deep; weighting the lexical ranking 0.5–1.25 changed < 0.004.
pub const RRF_K: f64 = 10.0;

/// How a search ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Cosine similarity of the query's vector.
    Dense,
    /// BM25 over the terms.
    Lexical,
    /// Both, fused by reciprocal rank.
    #[default]
    Hybrid,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dense" => Ok(Mode::Dense),
            "lexical" => Ok(Mode::Lexical),
            "hybrid" => Ok(Mode::Hybrid),
            _ => Err(format!(
                "mode `{s}`: one of dense, lexical, hybrid (the default)"
            )),
        }
    }
}

/// English words too common to tell chunks apart (those of a question, mostly).
const STOP: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "been", "by", "can", "do", "does", "for", "from",
    "given", "has", "have", "how", "if", "in", "into", "is", "it", "its", "of", "on", "or", "that",
    "the", "their", "then", "there", "these", "this", "to", "was", "were", "what", "when", "where",
    "which", "who", "will", "with",
];

fn stemmer() -> &'static Stemmer {
    static S: OnceLock<Stemmer> = OnceLock::new();
    S.get_or_init(|| Stemmer::create(Algorithm::English))
}

fn stop_words() -> &'static HashSet<&'static str> {
    static S: OnceLock<HashSet<&'static str>> = OnceLock::new();
    S.get_or_init(|| STOP.iter().copied().collect())
}

/// The parts of one identifier-like run of letters and digits: case changes (`HTTPClient` → HTTP,
/// Client; `parseURL` → parse, URL) and letter/digit boundaries (`decode16` → decode, 16).
fn parts(word: &str) -> Vec<&str> {
    let chars: Vec<(usize, char)> = word.char_indices().collect();
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..chars.len() {
        let (b, c) = chars[i];
        let p = chars[i - 1].1;
        let next_lower = chars.get(i + 1).is_some_and(|(_, n)| n.is_lowercase());
        let cut = (p.is_lowercase() && c.is_uppercase())
            || (p.is_uppercase() && c.is_uppercase() && next_lower)
            || (p.is_alphabetic() != c.is_alphabetic());
        if cut {
            out.push(&word[start..b]);
            start = b;
        }
    }
    out.push(&word[start..]);
    out
}

/// Longer runs (encoded data, hashes) are no words anyone searches for.
const MAX_TERM_CHARS: usize = 64;

/// One word as a term: lower-cased, stemmed; `None` for a stop word, a single letter or a run longer
/// than [`MAX_TERM_CHARS`].
fn term(word: &str) -> Option<String> {
    if word.chars().count() > MAX_TERM_CHARS {
        return None;
    }
    let w = word.to_lowercase();
    if stop_words().contains(w.as_str()) {
        return None;
    }
    let mut n = w.chars();
    let (first, second) = (n.next()?, n.next());
    if second.is_none() && !first.is_numeric() {
        return None;
    }
    if w.chars().all(char::is_numeric) {
        return Some(w);
    }
    Some(stemmer().stem(&w).into_owned())
}

/// The terms of a text, in order (a term once per occurrence). Each run of letters, digits and `_`
/// gives its parts, and, when it has several, the whole run too (`decode16` → decode16, decode, 16).
pub fn terms(text: &str, out: &mut Vec<String>) {
    for run in text.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
        if run.is_empty() {
            continue;
        }
        let pieces: Vec<&str> = run
            .split('_')
            .filter(|p| !p.is_empty())
            .flat_map(parts)
            .collect();
        if pieces.len() > 1 {
            let whole: String = run.chars().filter(|c| *c != '_').collect();
            let whole = whole.to_lowercase();
            if (2..=MAX_TERM_CHARS).contains(&whole.chars().count()) {
                out.push(whole);
            }
        }
        out.extend(pieces.into_iter().filter_map(term));
    }
}

/// Most occurrences of one term counted in a row, and most terms in a row (PostgreSQL's `tsvector`
/// keeps at most 256 positions of a lexeme, numbered up to 16,383; both stores count the same).
pub const MAX_TF: usize = 256;
pub const MAX_ROW_TERMS: usize = 16_383;

/// The terms a chunk is found by: those of its path, its symbol and its text.
pub fn row_terms(path: &str, symbol: Option<&str>, text: &str) -> Vec<String> {
    let mut all = Vec::new();
    terms(path, &mut all);
    if let Some(s) = symbol {
        terms(s, &mut all);
        terms(s, &mut all);
    }
    terms(text, &mut all);
    let mut seen: HashMap<String, usize> = HashMap::new();
    all.retain(|t| {
        let n = seen.entry(t.clone()).or_default();
        *n += 1;
        *n <= MAX_TF
    });
    all.truncate(MAX_ROW_TERMS);
    all
}

/// [`row_terms`] of a row.
pub fn of_row(r: &Row) -> Vec<String> {
    row_terms(&r.path, r.symbol.as_deref(), &r.text)
}

/// The distinct terms of a query, in first-seen order (a repeated word counts once, in both stores).
pub fn query_terms(query: &str) -> Vec<String> {
    let mut all = Vec::new();
    terms(query, &mut all);
    let mut seen = HashSet::new();
    all.into_iter().filter(|t| seen.insert(t.clone())).collect()
}

/// FTS5's idf of a term found in `n_hit` of `n_rows` rows.
pub fn idf(n_rows: f64, n_hit: f64) -> f64 {
    let idf = ((n_rows - n_hit + 0.5) / (n_hit + 0.5)).ln();
    if idf <= 0.0 {
        1e-6
    } else {
        idf
    }
}

/// One term's BM25 contribution: `tf` occurrences in a row of `len` terms (mean `avgdl`).
/// Written as FTS5 writes it, so both stores compute the same bits.
pub fn bm25_term(idf: f64, tf: f64, len: f64, avgdl: f64) -> f64 {
    idf * ((tf * (K1 + 1.0)) / (tf + K1 * (1.0 - B + B * len / avgdl)))
}

/// BM25 of one row: `tf[i]` occurrences of query term `i` (found in `df[i]` of `n_rows` rows), summed
/// in query order as FTS5 sums.
pub fn bm25(tf: &[f64], df: &[f64], len: f64, n_rows: f64, avgdl: f64) -> f64 {
    let mut score = 0.0;
    for (t, d) in tf.iter().zip(df) {
        score += bm25_term(idf(n_rows, *d), *t, len, avgdl);
    }
    score
}

/// How many candidates each ranking gives the fusion for `k` hits.
pub fn depth(k: usize) -> usize {
    k.max(50)
}

/// A row's identity across the two rankings (one stored chunk).
fn key(r: &Row) -> (&str, usize, usize, usize, &[u8; 32]) {
    (&r.path, r.start_byte, r.end_byte, r.part, &r.hash)
}

/// Reciprocal rank fusion of two rankings of keys: each key scores Σ w/(RRF_K + rank) over the
/// rankings it is in, with weight 1 for the dense ranking and `lexical_weight` for the lexical one;
/// best first, ties by the dense ranking's order, then the lexical one's.
pub fn rrf<K: std::hash::Hash + Eq + Clone>(
    dense: &[K],
    lexical: &[K],
    lexical_weight: f64,
) -> Vec<(K, f64)> {
    let mut by: HashMap<K, (f64, usize)> = HashMap::new();
    for (rank, k) in dense.iter().enumerate() {
        let e = by.entry(k.clone()).or_insert((0.0, rank));
        e.0 += 1.0 / (RRF_K + rank as f64 + 1.0);
    }
    for (rank, k) in lexical.iter().enumerate() {
        let e = by.entry(k.clone()).or_insert((0.0, dense.len() + rank));
        e.0 += lexical_weight / (RRF_K + rank as f64 + 1.0);
    }
    let mut all: Vec<(K, (f64, usize))> = by.into_iter().collect();
    all.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0).then(a.1 .1.cmp(&b.1 .1)));
    all.into_iter().map(|(k, (s, _))| (k, s)).collect()
}

/// [`rrf`] of two rankings of hits, cut to `k`. The hits keep their cosine and BM25.
pub fn fuse(dense: &[Hit], lexical: &[Hit], k: usize, lexical_weight: f64) -> Vec<Hit> {
    let mut hits: HashMap<_, Hit> = HashMap::new();
    for h in dense.iter().chain(lexical) {
        let e = hits.entry(key(&h.row)).or_insert_with(|| h.clone());
        if e.bm25.is_none() {
            e.bm25 = h.bm25;
        }
    }
    fn keys(hs: &[Hit]) -> Vec<(&str, usize, usize, usize, &[u8; 32])> {
        hs.iter().map(|h| key(&h.row)).collect()
    }
    rrf(&keys(dense), &keys(lexical), lexical_weight)
        .into_iter()
        .take(k)
        .map(|(key, s)| {
            let mut h = hits[&key].clone();
            h.score = s as f32;
            h
        })
        .collect()
}

/// BM25 over documents held in memory, with the stores' terms and formula: the lexical ranking of a
/// set too small to index (`sembed adapt`'s held-out pairs).
pub struct Bm25 {
    docs: Vec<HashMap<String, usize>>,
    lens: Vec<f64>,
    df: HashMap<String, usize>,
    avgdl: f64,
}

impl Bm25 {
    /// Each document's terms ([`row_terms`]).
    pub fn new(docs: Vec<Vec<String>>) -> Self {
        let mut df: HashMap<String, usize> = HashMap::new();
        let lens: Vec<f64> = docs.iter().map(|d| d.len() as f64).collect();
        let docs: Vec<HashMap<String, usize>> = docs
            .into_iter()
            .map(|d| {
                let mut tf = HashMap::new();
                for t in d {
                    *tf.entry(t).or_default() += 1;
                }
                for t in tf.keys() {
                    *df.entry(t.clone()).or_default() += 1;
                }
                tf
            })
            .collect();
        let avgdl = lens.iter().sum::<f64>() / lens.len().max(1) as f64;
        Bm25 {
            docs,
            lens,
            df,
            avgdl,
        }
    }

    /// The documents holding any of `terms` ([`query_terms`]), best first (ties by position), at
    /// most `depth`, with their scores.
    pub fn rank(&self, terms: &[String], depth: usize) -> Vec<(usize, f64)> {
        let n = self.docs.len() as f64;
        let df: Vec<f64> = terms
            .iter()
            .map(|t| self.df.get(t).copied().unwrap_or(0) as f64)
            .collect();
        let mut out: Vec<(usize, f64)> = Vec::new();
        for (i, d) in self.docs.iter().enumerate() {
            let tf: Vec<f64> = terms
                .iter()
                .map(|t| d.get(t).copied().unwrap_or(0) as f64)
                .collect();
            if tf.iter().any(|&x| x > 0.0) {
                out.push((i, bm25(&tf, &df, self.lens[i], n, self.avgdl)));
            }
        }
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(depth);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Vec<String> {
        let mut v = Vec::new();
        terms(s, &mut v);
        v
    }

    #[test]
    fn identifiers_split_as_people_write_them() {
        assert_eq!(t("decode16"), ["decode16", "decod", "16"]);
        assert_eq!(t("HTTPClient"), ["httpclient", "http", "client"]);
        assert_eq!(t("http_client"), ["httpclient", "http", "client"]);
        assert_eq!(t("parseURL"), ["parseurl", "pars", "url"]);
        assert_eq!(t("get_and_update"), ["getandupdate", "get", "updat"]);
        // Questions: stop words go, words are stemmed like the code's.
        assert_eq!(
            t("Decodes the base 16 string"),
            ["decod", "base", "16", "string"]
        );
        // Paths and module names.
        assert_eq!(t("lib/map.ex"), ["lib", "map", "ex"]);
        assert_eq!(t("Enum.map/2"), ["enum", "map", "2"]);
        // Single letters say nothing; digits do.
        assert_eq!(t("x = 1"), ["1"]);
        assert_eq!(t("Ünïcode_naïve"), ["ünïcodenaïve", "ünïcode", "naïv"]);
    }

    #[test]
    fn query_terms_are_distinct() {
        assert_eq!(query_terms("map the map Map"), ["map"]);
    }

    /// Weighted RRF, by hand: K = RRF_K = 10.
    #[test]
    fn rrf_weights_the_lexical_ranking() {
        let (dense, lexical) = (["a", "b", "c"], ["c", "d"]);
        let got = rrf(&dense, &lexical, 0.5);
        let want: [(&str, f64); 4] = [
            ("a", 1.0 / 11.0),
            ("c", 1.0 / 13.0 + 0.5 / 11.0),
            ("b", 1.0 / 12.0),
            ("d", 0.5 / 12.0),
        ];
        // c: 0.0769 + 0.0455 = 0.1224 > a: 0.0909 > b: 0.0833 > d: 0.0417.
        let mut want = want.to_vec();
        want.sort_by(|x, y| y.1.total_cmp(&x.1));
        assert_eq!(got.len(), 4);
        for ((k, s), (wk, ws)) in got.iter().zip(&want) {
            assert_eq!(k, wk);
            assert!((s - ws).abs() < 1e-12);
        }
        // Weight 0: the dense order, then the lexical-only keys in their order.
        let got: Vec<&str> = rrf(&dense, &lexical, 0.0)
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got, ["a", "b", "c", "d"]);
        // Weight 1, equal scores: the dense ranking's order breaks the tie.
        let got: Vec<&str> = rrf(&["x", "y"], &["y", "x"], 1.0)
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got, ["x", "y"]);
    }

    #[test]
    fn bm25_matches_the_formula() {
        // One term, tf 2 in a row of 10 terms, mean length 20, in 3 of 100 rows.
        let idf_v = ((100.0f64 - 3.0 + 0.5) / 3.5).ln();
        assert!((idf(100.0, 3.0) - idf_v).abs() < 1e-12);
        let want = idf_v * 2.0 * 2.2 / (2.0 + 1.2 * (0.25 + 0.75 * 0.5));
        assert!((bm25_term(idf_v, 2.0, 10.0, 20.0) - want).abs() < 1e-12);
        // A term in most rows is worth (almost) nothing, never a negative score.
        assert_eq!(idf(10.0, 9.0), 1e-6);
    }
}
