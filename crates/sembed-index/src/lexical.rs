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

/// The lexical ranking's weight in hybrid search ([`fuse_scores`]) unless the index's model carries
/// the one `sembed adapt` chose ([`crate::store::Meta::lexical_weight`]). On the docs-removed measure
/// (bench/heldout_search.py, development sets CPython's logging/concurrent/urllib/http and Elixir's
/// mix/ex_unit/iex/logger/eex, never the reported sets), all-MiniLM-L6-v2, NDCG@10 by weight:
/// Python 0.6222 / 0.6315 / 0.6307 / 0.6276 / 0.6146 and Elixir 0.5547 / 0.5677 / 0.5701 / 0.5668 /
/// 0.5501 at 0.25 / 0.33 / 0.43 / 0.5 / 1.
pub const LEXICAL_WEIGHT: f64 = 0.4;

/// The weight of a chunk's name match ([`name_matches`]) in hybrid search ([`fuse_scores`]): a
/// chunk whose symbol's words are all in the query, and which no other candidate is named with,
/// gains this much over the fused dense and lexical scores. People name a function for what it does
/// and ask for what it does, and BM25 dilutes the two or three words of a name among the whole
/// body's terms.
///
/// On the development sets of [`LEXICAL_WEIGHT`] and a third, 300 `transformers` docstrings among
/// 24,527 chunks (the standard library and 230 model folders), all-MiniLM-L6-v2, NDCG@10 through
/// the server (bench/name_match.py) at weight 0 / 0.15 / 0.25 / 0.35: Python 0.6311 / 0.6611 /
/// 0.6755 / 0.6721, Elixir 0.5698 / 0.5963 / 0.6164 / 0.6273, `transformers` 0.4023 / 0.4203 /
/// 0.4135 / 0.3989. 0.25 gains on all three. Measured offline on the first two sets, and dropped:
/// the share of the query's words found in the name rather than of the name's found in the query
/// (0.6538 / 0.5836 at its best weight); the share of the name's letters covered by query words
/// (for `isclosed`, `readinto`: +0.008 at 0.35, noise); the cosine of the query and the name's
/// words embedded (+0.005 / +0.001 on top, and it needs a second vector per chunk). Models from
/// `sembed adapt` search without it (see `adapt`).
pub const NAME_WEIGHT: f64 = 0.25;

/// How a search ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Cosine similarity of the query's vector.
    Dense,
    /// BM25 over the terms.
    Lexical,
    /// Both, their scores fused ([`fuse_scores`]).
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
    for run in runs(text) {
        run_terms(run, out);
    }
}

/// The runs of letters, digits and `_` of a text.
fn runs(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|r| !r.is_empty())
}

/// The words of one run: its `_`-separated pieces, each cut at case and letter/digit changes
/// ([`parts`]).
fn run_words(run: &str) -> impl Iterator<Item = &str> {
    run.split('_').filter(|p| !p.is_empty()).flat_map(parts)
}

/// The terms of one run ([`terms`]).
fn run_terms(run: &str, out: &mut Vec<String>) {
    let pieces: Vec<&str> = run_words(run).collect();
    if pieces.len() > 1 {
        let whole: String = run.chars().filter(|c| *c != '_').collect();
        let whole = whole.to_lowercase();
        if (2..=MAX_TERM_CHARS).contains(&whole.chars().count()) {
            out.push(whole);
        }
    }
    out.extend(pieces.into_iter().filter_map(term));
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

/// The terms of a symbol's own name, distinct: the last identifier of its path (`Logger.getLevel`
/// → get, level; `Enum.map/2` → map; `__init__` → init), in parts, without the joined whole.
pub fn name_terms(symbol: &str) -> Vec<String> {
    let last = symbol
        .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
        .find(|r| r.chars().any(char::is_alphabetic))
        .unwrap_or("");
    let mut seen = HashSet::new();
    run_words(last)
        .filter_map(term)
        .filter(|t| seen.insert(t.clone()))
        .collect()
}

/// What the name match ([`name_matches`]) reads of a query: its terms ([`query_terms`]) and its
/// words, lower-cased parts of its identifiers and words as [`terms`] splits them, not stemmed (stop
/// words and single letters dropped).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NameQuery {
    pub terms: Vec<String>,
    pub words: Vec<String>,
}

impl NameQuery {
    pub fn new(query: &str) -> Self {
        let mut seen = HashSet::new();
        let words = runs(query)
            .flat_map(run_words)
            .map(str::to_lowercase)
            .filter(|w| w.chars().count() > 1 && !stop_words().contains(w.as_str()))
            .filter(|w| seen.insert(w.clone()))
            .collect();
        NameQuery {
            terms: query_terms(query),
            words,
        }
    }

    /// Whether a name's term is in the query: one of its terms, or, for a term of at least
    /// [`ABBREVIATION_CHARS`] letters, the start of one of its words (`init` of initialize, `repr`
    /// of representation, `addr` of address, `conn` of connection: code abbreviates, questions
    /// do not).
    pub fn has(&self, name_term: &str) -> bool {
        self.terms.iter().any(|t| t == name_term)
            || (name_term.chars().count() >= ABBREVIATION_CHARS
                && name_term.chars().all(char::is_alphabetic)
                && self.words.iter().any(|w| w.starts_with(name_term)))
    }
}

/// The fewest letters of a name's term read as an abbreviation of a longer query word
/// ([`NameQuery::has`]). On the development sets of [`NAME_WEIGHT`] (Python, Elixir, `transformers`),
/// NDCG@10 0.6755 / 0.6163 / 0.4105 with whole terms only; with prefixes of 3, 4 or 5 letters
/// 0.686 / 0.6325 / 0.4147, 0.6847 / 0.6262 / 0.4121 and 0.6748 / 0.62 / 0.4121 (offline).
pub const ABBREVIATION_CHARS: usize = 3;

/// How much of each candidate's name is in a query, between 0 and 1: the share of the name's terms
/// ([`name_terms`]) in the query ([`NameQuery::has`]), times how rare among the candidates' names
/// the rarest of those found is: `ln(1 + n / n_t) / ln(1 + n)` for a term in `n_t` of the `n`
/// candidates' names (1 when no other candidate's name has it). 0 for a candidate without a name.
///
/// A word most candidates are named with (`forward` among a model library's classes, `handle_call`
/// in an Elixir application) tells them apart little. At weight 0.25 on the sets of [`NAME_WEIGHT`]
/// (Python, Elixir, `transformers`), NDCG@10 0.6755 / 0.6164 / 0.4135 with the rarity, 0.6703 /
/// 0.6162 / 0.394 with the share alone, which lost to no name match at all (0.4023) on
/// `transformers`, where every model has its `forward` (both with whole terms only).
pub fn name_matches(query: &NameQuery, names: &[&[String]]) -> Vec<f64> {
    let n = names.len() as f64;
    let mut df: HashMap<&str, usize> = HashMap::new();
    for name in names {
        for t in *name {
            *df.entry(t.as_str()).or_default() += 1;
        }
    }
    let rarity = |t: &String| (1.0 + n / df[t.as_str()] as f64).ln() / (1.0 + n).ln();
    names
        .iter()
        .map(|name| {
            let found: Vec<&String> = name.iter().filter(|t| query.has(t)).collect();
            if found.is_empty() {
                return 0.0;
            }
            let rarest = found.iter().map(|t| rarity(t)).fold(0.0, f64::max);
            found.len() as f64 / name.len() as f64 * rarest
        })
        .collect()
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

/// Score fusion of a dense and a lexical ranking of keys, each with its score (cosine, BM25): each
/// ranking's scores are divided by its best (when positive), a key missing from a ranking takes
/// that ranking's lowest, and a key scores `dense + lexical_weight · lexical + name_weight ·
/// name_match(key)` ([`NAME_WEIGHT`], [`name_matches`]). Best first, ties by the dense ranking's
/// order, then the lexical one's.
///
/// Chosen over reciprocal rank fusion by measurement: on the development sets of
/// [`LEXICAL_WEIGHT`], RRF (k 10, both rankings 50 deep, as before) gave NDCG@10 0.6174 (Python) and
/// 0.5594 (Elixir), at its best weight 0.6191 and 0.5632; this fusion 0.6307 and 0.5701, and with a
/// model fitted by `sembed adapt` 0.6719 against RRF's best 0.6634 (Elixir). A rank throws away how
/// far ahead the first hit is; the scores keep it. Normalising by the best score rather than by the
/// range or a z-score measured the same or better (range: 0.6250 / 0.5634 at their best weight).
pub fn fuse_scores<K: std::hash::Hash + Eq + Clone>(
    dense: &[(K, f64)],
    lexical: &[(K, f64)],
    lexical_weight: f64,
    name_weight: f64,
    name_match: impl Fn(&K) -> f64,
) -> Vec<(K, f64)> {
    // Scores over the best one, and the lowest of them (what a missing key gets).
    fn scaled<K>(r: &[(K, f64)]) -> (f64, f64) {
        let best = r.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
        let scale = if best > 0.0 { best } else { 1.0 };
        let low = r.iter().map(|x| x.1 / scale).fold(f64::INFINITY, f64::min);
        (scale, if low.is_finite() { low } else { 0.0 })
    }
    let ((ds, dlow), (ls, llow)) = (scaled(dense), scaled(lexical));
    // Per key: (its dense part, its lexical part, where it first appears).
    let mut by: HashMap<K, (Option<f64>, Option<f64>, usize)> = HashMap::new();
    for (rank, (k, s)) in dense.iter().enumerate() {
        by.entry(k.clone()).or_insert((None, None, rank)).0 = Some(s / ds);
    }
    for (rank, (k, s)) in lexical.iter().enumerate() {
        let e = by
            .entry(k.clone())
            .or_insert((None, None, dense.len() + rank));
        e.1 = Some(s / ls);
    }
    let mut all: Vec<(K, f64, usize)> = by
        .into_iter()
        .map(|(k, (d, l, at))| {
            let s = d.unwrap_or(dlow)
                + lexical_weight * l.unwrap_or(llow)
                + name_weight * name_match(&k);
            (k, s, at)
        })
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
    all.into_iter().map(|(k, s, _)| (k, s)).collect()
}

/// The weights of hybrid search's parts besides the cosine ([`fuse_scores`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    pub lexical: f64,
    pub name: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            lexical: LEXICAL_WEIGHT,
            name: NAME_WEIGHT,
        }
    }
}

/// [`fuse_scores`] of two rankings of hits for a query ([`NameQuery`]), cut to `k`. The hits keep
/// their cosine and BM25.
pub fn fuse(
    dense: &[Hit],
    lexical: &[Hit],
    k: usize,
    weights: Weights,
    query: &NameQuery,
) -> Vec<Hit> {
    let mut hits: HashMap<_, Hit> = HashMap::new();
    for h in dense.iter().chain(lexical) {
        let e = hits.entry(key(&h.row)).or_insert_with(|| h.clone());
        if e.bm25.is_none() {
            e.bm25 = h.bm25;
        }
    }
    type Key<'a> = (&'a str, usize, usize, usize, &'a [u8; 32]);
    fn scored(hs: &[Hit], by: fn(&Hit) -> Option<f32>) -> Vec<(Key<'_>, f64)> {
        hs.iter()
            .map(|h| (key(&h.row), by(h).unwrap_or(h.score) as f64))
            .collect()
    }
    let (d, l) = (scored(dense, |h| h.cosine), scored(lexical, |h| h.bm25));
    let keys: Vec<Key<'_>> = hits.keys().copied().collect();
    let names: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let symbol = hits[k].row.symbol.as_deref();
            symbol.map(name_terms).unwrap_or_default()
        })
        .collect();
    let refs: Vec<&[String]> = names.iter().map(Vec::as_slice).collect();
    let matches: HashMap<Key<'_>, f64> = keys.into_iter().zip(name_matches(query, &refs)).collect();
    fuse_scores(&d, &l, weights.lexical, weights.name, |k| matches[k])
        .into_iter()
        .take(k)
        .map(|(key, s)| {
            let mut h = hits[&key].clone();
            h.score = s as f32;
            h
        })
        .collect()
}

/// BM25 over rows held in memory, scored as the stores score them ([`bm25_term`] summed in query
/// order, FTS5's formula): for a store that answers many searches, and for a set too small to index
/// (`sembed adapt`'s held-out pairs). FTS5 scores every row that
/// matches any term, phrase by phrase through its auxiliary-function interface: a median 17 ms for
/// the long queries of 24,527 chunks (300 `transformers` docstrings), most of hybrid search's time.
/// Here each query term's postings are added into one array of scores.
///
/// Rows are added and removed one by one as the store changes (a removed row's postings stay until
/// the store builds a new index, see [`MemoryIndex::dead`]). A row's terms are made once per
/// distinct run of letters and digits (identifiers and keywords repeat), which builds the index of
/// those 24,527 chunks several times faster than [`row_terms`] row by row (2.4 s).
pub struct MemoryIndex<P> {
    /// Term → its id.
    ids: HashMap<String, u32>,
    /// Per term id: (slot, occurrences) of every row added with it, removed ones included.
    postings: Vec<Vec<(u32, u32)>>,
    /// Per term id: the rows holding it, removed ones not.
    df: Vec<u32>,
    slots: Vec<Slot<P>>,
    by_key: HashMap<i64, u32>,
    alive: usize,
    /// The live rows' lengths, summed.
    total: u64,
    /// Run → the ids of its terms ([`terms`] of it).
    runs: HashMap<String, Vec<u32>>,
}

struct Slot<P> {
    key: i64,
    len: u32,
    /// Its distinct term ids.
    terms: Vec<u32>,
    /// `None` once removed.
    payload: Option<P>,
}

/// Distinct runs remembered at most: past it the memory of runs starts again (a long-running
/// server indexing generated files).
const MAX_RUNS: usize = 1 << 20;

impl<P> Default for MemoryIndex<P> {
    fn default() -> Self {
        MemoryIndex {
            ids: HashMap::new(),
            postings: Vec::new(),
            df: Vec::new(),
            slots: Vec::new(),
            by_key: HashMap::new(),
            alive: 0,
            total: 0,
            runs: HashMap::new(),
        }
    }
}

impl<P> MemoryIndex<P> {
    /// Rows held.
    pub fn len(&self) -> usize {
        self.alive
    }

    pub fn is_empty(&self) -> bool {
        self.alive == 0
    }

    /// Rows removed whose postings are still held.
    pub fn dead(&self) -> usize {
        self.slots.len() - self.alive
    }

    pub fn contains(&self, key: i64) -> bool {
        self.by_key.contains_key(&key)
    }

    /// The keys of the rows held.
    pub fn keys(&self) -> impl Iterator<Item = i64> + '_ {
        self.by_key.keys().copied()
    }

    /// The payload of the row of `key`.
    pub fn get(&self, key: i64) -> Option<&P> {
        let slot = *self.by_key.get(&key)?;
        self.slots[slot as usize].payload.as_ref()
    }

    fn term_id(&mut self, t: String) -> u32 {
        if let Some(&id) = self.ids.get(&t) {
            return id;
        }
        let id = self.postings.len() as u32;
        self.ids.insert(t, id);
        self.postings.push(Vec::new());
        self.df.push(0);
        id
    }

    /// The term ids of a text, in order ([`terms`]).
    fn text_terms(&mut self, text: &str, out: &mut Vec<u32>) {
        for run in runs(text) {
            if let Some(ids) = self.runs.get(run) {
                out.extend_from_slice(ids);
                continue;
            }
            let mut ts = Vec::new();
            run_terms(run, &mut ts);
            let ids: Vec<u32> = ts.into_iter().map(|t| self.term_id(t)).collect();
            out.extend_from_slice(&ids);
            if self.runs.len() >= MAX_RUNS {
                self.runs.clear();
            }
            self.runs.insert(run.to_string(), ids);
        }
    }

    /// Add a row under `key` (replacing the row of that key): its terms are [`row_terms`]'s.
    pub fn add(&mut self, key: i64, path: &str, symbol: Option<&str>, text: &str, payload: P) {
        self.remove(key);
        // As row_terms: path, symbol twice, text; at most MAX_TF of a term, MAX_ROW_TERMS in all.
        let mut all = Vec::new();
        self.text_terms(path, &mut all);
        if let Some(s) = symbol {
            self.text_terms(s, &mut all);
            self.text_terms(s, &mut all);
        }
        self.text_terms(text, &mut all);
        let mut seen: HashMap<u32, usize> = HashMap::new();
        all.retain(|t| {
            let n = seen.entry(*t).or_default();
            *n += 1;
            *n <= MAX_TF
        });
        all.truncate(MAX_ROW_TERMS);
        let len = all.len() as u32;
        all.sort_unstable();
        let slot = self.slots.len() as u32;
        let mut distinct = Vec::new();
        for group in all.chunk_by(|a, b| a == b) {
            let t = group[0];
            self.postings[t as usize].push((slot, group.len() as u32));
            self.df[t as usize] += 1;
            distinct.push(t);
        }
        self.slots.push(Slot {
            key,
            len,
            terms: distinct,
            payload: Some(payload),
        });
        self.by_key.insert(key, slot);
        self.alive += 1;
        self.total += len as u64;
    }

    /// Remove the row of `key`; false if none.
    pub fn remove(&mut self, key: i64) -> bool {
        let Some(slot) = self.by_key.remove(&key) else {
            return false;
        };
        let s = &mut self.slots[slot as usize];
        s.payload = None;
        for t in std::mem::take(&mut s.terms) {
            self.df[t as usize] -= 1;
        }
        self.alive -= 1;
        self.total -= s.len as u64;
        true
    }

    /// The rows holding any of `terms` ([`query_terms`]), best first (ties by key), at most `depth`,
    /// with their scores.
    pub fn rank(&self, terms: &[String], depth: usize) -> Vec<(i64, f64)> {
        let mut out: Vec<(i64, f64)> = self
            .scores(terms)
            .into_iter()
            .map(|(s, key, _)| (key, s))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(depth);
        out
    }

    /// Every row holding any of `terms`, with its key, BM25 ([`bm25_term`] over the terms in their
    /// order, FTS5's summation) and payload, in no order.
    pub fn scores(&self, terms: &[String]) -> Vec<(f64, i64, &P)> {
        if self.alive == 0 {
            return Vec::new();
        }
        let n = self.alive as f64;
        let avgdl = self.total as f64 / n;
        let mut acc = vec![0.0f64; self.slots.len()];
        let mut touched: Vec<u32> = Vec::new();
        for t in terms {
            let Some(&id) = self.ids.get(t) else { continue };
            let df = self.df[id as usize];
            if df == 0 {
                continue;
            }
            let idf = idf(n, df as f64);
            for &(slot, tf) in &self.postings[id as usize] {
                let s = &self.slots[slot as usize];
                if s.payload.is_none() {
                    continue;
                }
                // Every term adds more than 0 (idf ≥ 1e-6, tf ≥ 1): 0 means not yet seen.
                if acc[slot as usize] == 0.0 {
                    touched.push(slot);
                }
                acc[slot as usize] += bm25_term(idf, tf as f64, s.len as f64, avgdl);
            }
        }
        touched
            .into_iter()
            .map(|slot| {
                let s = &self.slots[slot as usize];
                (acc[slot as usize], s.key, s.payload.as_ref().expect("live"))
            })
            .collect()
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

    /// Score fusion, by hand: dense scores over 0.8, lexical over 6, a missing key at the lowest.
    #[test]
    fn fuse_scores_adds_the_scaled_scores() {
        let dense = [("a", 0.8), ("b", 0.7), ("c", 0.4)];
        let lexical = [("c", 6.0), ("d", 3.0)];
        let got = fuse_scores(&dense, &lexical, 0.5, 0.0, |_| 0.0);
        let want = [
            ("a", 1.0 + 0.5 * 0.5), // not in the lexical ranking: its lowest, 3 / 6
            ("b", 0.875 + 0.5 * 0.5),
            ("c", 0.5 + 0.5 * 1.0),
            ("d", 0.5 + 0.5 * 0.5), // not in the dense ranking: its lowest, 0.4 / 0.8
        ];
        let order: Vec<&str> = got.iter().map(|x| x.0).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
        for (k, w) in want {
            let s = got.iter().find(|x| x.0 == k).unwrap().1;
            assert!((s - w).abs() < 1e-12, "{k}: {s} vs {w}");
        }
        // Equal scores: the dense ranking's order breaks the tie.
        let got: Vec<&str> = fuse_scores(
            &[("x", 1.0), ("y", 1.0)],
            &[("y", 2.0), ("x", 2.0)],
            1.0,
            0.0,
            |_| 0.0,
        )
        .into_iter()
        .map(|x| x.0)
        .collect();
        assert_eq!(got, ["x", "y"]);
        // Weight 0: the dense order, then the lexical-only keys in their order.
        let got: Vec<&str> = fuse_scores(&dense, &lexical, 0.0, 0.0, |_| 0.0)
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got, ["a", "b", "c", "d"]);
        // One ranking empty: the other's order.
        let got: Vec<&str> = fuse_scores(&[], &lexical, 0.4, 0.0, |_| 0.0)
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got, ["c", "d"]);
        let got: Vec<&str> = fuse_scores(&dense, &[], 0.4, 0.0, |_| 0.0)
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got, ["a", "b", "c"]);
    }

    #[test]
    fn a_name_is_the_parts_of_its_last_identifier() {
        assert_eq!(
            name_terms("Logger.getEffectiveLevel"),
            ["get", "effect", "level"]
        );
        assert_eq!(name_terms("Enum.map/2"), ["map"]);
        assert_eq!(name_terms("Manager.__init__"), ["init"]);
        assert_eq!(name_terms("_str2time"), ["str", "2", "time"]);
        assert_eq!(name_terms("Mix.Tasks.Xref.filter_fn"), ["filter", "fn"]);
        assert_eq!(name_terms("a::b::get_get"), ["get"]);
        assert!(name_terms("").is_empty());
    }

    /// The share of a name's words in the query, times the rarity among the candidates' names of
    /// the rarest word found, by hand.
    #[test]
    fn a_name_match_is_its_share_times_its_rarity() {
        let q = NameQuery::new("Return the effective level of this logger");
        let names: Vec<Vec<String>> = [
            "Logger.getEffectiveLevel",
            "Logger.level",
            "Handler.set_level",
            "Filter.filter",
            "",
        ]
        .iter()
        .map(|s| name_terms(s))
        .collect();
        let refs: Vec<&[String]> = names.iter().map(Vec::as_slice).collect();
        let got = name_matches(&q, &refs);
        // 5 candidates; `level` is in 3 names, `effect` in 1.
        let rarity = |n_t: f64| (1.0f64 + 5.0 / n_t).ln() / 6.0f64.ln();
        let want = [
            2.0 / 3.0 * rarity(1.0),
            rarity(3.0),
            0.5 * rarity(3.0),
            0.0,
            0.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        assert_eq!(rarity(1.0), 1.0);
        // A word every candidate is named with counts little.
        let forward: Vec<Vec<String>> = (0..50).map(|_| name_terms("Model.forward")).collect();
        let refs: Vec<&[String]> = forward.iter().map(Vec::as_slice).collect();
        let m = name_matches(&NameQuery::new("The forward pass"), &refs);
        assert!(m
            .iter()
            .all(|&x| (x - 51.0f64.ln().recip() * 2.0f64.ln()).abs() < 1e-12));
    }

    /// A name's term of three letters or more counts when a query word starts with it (code
    /// abbreviates); a shorter one, a number, or a query word that only starts the name's term do
    /// not. Stemming does not hide the words: `initialize` stems to `initi`.
    #[test]
    fn abbreviated_names_match_the_words_they_shorten() {
        let q = NameQuery::new("Initialize the connection with an address_family and 1000 tries");
        assert_eq!(
            q.words,
            [
                "initialize",
                "connection",
                "address",
                "family",
                "1000",
                "tries"
            ]
        );
        assert!(q.terms.contains(&"initi".to_string()), "{:?}", q.terms);
        for (name, want) in [
            ("Client.__init__", 1.0),
            ("conn_addr", 1.0),
            ("init_fam", 1.0),
            ("conn_pool", 0.5),
            ("x_100", 0.0),       // digits are no abbreviation
            ("familiarity", 0.0), // a query word that starts the name's term is not one
            ("con", 1.0),
            ("co", 0.0),
        ] {
            let terms = name_terms(name);
            let got = name_matches(&q, &[terms.as_slice()]);
            assert_eq!(got, [want], "{name}: {terms:?}");
        }
    }

    /// The name match adds its weight times itself: it lifts a chunk named for the query over one
    /// a little ahead on the other two scores.
    #[test]
    fn fuse_scores_adds_the_name_match() {
        let dense = [("a", 0.8), ("b", 0.76)];
        let lexical = [("a", 4.0), ("b", 4.0)];
        let name = |k: &&str| if *k == "b" { 1.0 } else { 0.0 };
        let got = fuse_scores(&dense, &lexical, 0.5, NAME_WEIGHT, name);
        assert_eq!(got[0].0, "b");
        assert!((got[0].1 - (0.95 + 0.5 + NAME_WEIGHT)).abs() < 1e-12);
        assert!((got[1].1 - (1.0 + 0.5)).abs() < 1e-12);
        // Through hits: the symbol's words in the query are what counts.
        let hit = |sym: &str, cos: f32| {
            let row = Row {
                path: format!("{sym}.py"),
                lang: "python".into(),
                kind: "function".into(),
                symbol: Some(sym.to_string()),
                start_line: 1,
                end_line: 2,
                start_byte: 0,
                end_byte: 10,
                part: 0,
                parts: 1,
                hash: [0; 32],
                text: String::new(),
            };
            Hit::dense(cos, row)
        };
        let dense = [hit("Queue.put", 0.8), hit("Queue.get_item", 0.78)];
        let q = NameQuery::new("Get an item from the queue, waiting until one is there");
        let got = fuse(&dense, &[], 2, Weights::default(), &q);
        assert_eq!(got[0].row.symbol.as_deref(), Some("Queue.get_item"));
        let no_name = Weights {
            name: 0.0,
            ..Weights::default()
        };
        let got = fuse(&dense, &[], 2, no_name, &q);
        assert_eq!(got[0].row.symbol.as_deref(), Some("Queue.put"));
        let got = fuse(
            &dense,
            &[],
            2,
            Weights::default(),
            &NameQuery::new("put it in"),
        );
        assert_eq!(got[0].row.symbol.as_deref(), Some("Queue.put"));
    }

    /// The memory index scores its live rows exactly as BM25 over their [`row_terms`] does, after
    /// rows are added, removed and replaced.
    #[test]
    fn a_memory_index_scores_as_bm25_over_its_rows() {
        let rows: Vec<(String, Option<String>, String)> = (0..40)
            .map(|i| {
                let words = [
                    "parse",
                    "http",
                    "header",
                    "cache",
                    "decode16",
                    "RetryPolicy",
                ];
                let body: Vec<&str> = (0..(3 + i % 7)).map(|j| words[(i * j + j) % 6]).collect();
                (
                    format!("pkg/m{}.py", i % 5),
                    (i % 3 != 0).then(|| format!("Mod.fn_{}_{}", words[i % 6], i)),
                    format!("def f(x):\n    return {}\n", body.join(" + ")),
                )
            })
            .collect();
        let mut mem: MemoryIndex<usize> = MemoryIndex::default();
        for (i, (p, sym, text)) in rows.iter().enumerate() {
            mem.add(i as i64, p, sym.as_deref(), text, i);
        }
        // Remove some, replace one with other text.
        for k in [3, 17, 29] {
            assert!(mem.remove(k));
        }
        assert!(!mem.remove(3));
        mem.add(5, "pkg/new.py", None, "def cache_header(): return 1", 5);
        let mut live: Vec<(i64, Vec<String>)> = Vec::new();
        for (i, (p, sym, text)) in rows.iter().enumerate() {
            let k = i as i64;
            if [3, 17, 29].contains(&k) {
                continue;
            }
            live.push(if k == 5 {
                (
                    k,
                    row_terms("pkg/new.py", None, "def cache_header(): return 1"),
                )
            } else {
                (k, row_terms(p, sym.as_deref(), text))
            });
        }
        assert_eq!((mem.len(), mem.dead()), (live.len(), 4));
        // The reference: BM25 ([`bm25`], the formula) over the live rows' own row_terms.
        let n = live.len() as f64;
        let avgdl = live.iter().map(|x| x.1.len()).sum::<usize>() as f64 / n;
        for q in [
            "parse the http header",
            "decode 16",
            "retry policy cache",
            "fn",
            "nothing",
        ] {
            let terms = query_terms(q);
            let count = |d: &[String], t: &String| d.iter().filter(|x| *x == t).count() as f64;
            let df: Vec<f64> = terms
                .iter()
                .map(|t| live.iter().filter(|x| x.1.contains(t)).count() as f64)
                .collect();
            let mut want: Vec<(i64, f64)> = live
                .iter()
                .filter(|(_, d)| terms.iter().any(|t| d.contains(t)))
                .map(|(k, d)| {
                    let tf: Vec<f64> = terms.iter().map(|t| count(d, t)).collect();
                    (*k, bm25(&tf, &df, d.len() as f64, n, avgdl))
                })
                .collect();
            let mut got: Vec<(i64, f64)> = mem
                .scores(&terms)
                .into_iter()
                .map(|(s, k, _)| (k, s))
                .collect();
            want.sort_by_key(|x| x.0);
            got.sort_by_key(|x| x.0);
            assert_eq!(got, want, "{q}");
        }
        assert!(mem.scores(&query_terms("nothing")).is_empty());
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
