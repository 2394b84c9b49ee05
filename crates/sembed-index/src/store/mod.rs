//! Where chunks and their vectors live: [`sqlite::SqliteStore`] (the embedded default) or
//! [`pg::PgStore`] (PostgreSQL with pgvector). Both hold the same rows and answer the same searches.

pub mod pg;
pub mod sqlite;

use crate::error::Result;
use std::collections::{HashMap, HashSet};

/// SHA-256 of a chunk's text: the key under which its vector is stored and reused.
pub type Hash = [u8; 32];

pub fn hash_text(text: &str) -> Hash {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).into()
}

pub fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// What an index holds vectors of. Fixed when the index is created; every later run and every
/// search must use the same.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// The model's identity: name, dimension and precision (vectors of another model, or of the same
    /// model in another precision, are not comparable).
    pub model: String,
    /// The model references it was loaded from (what `-m` said; empty: the default model), so a search
    /// can load it again.
    pub model_refs: Vec<String>,
    pub dimension: usize,
    /// The chunker's settings: files indexed under other settings are cut again.
    pub chunker: String,
    /// The lexical ranking's weight in hybrid search ([`crate::lexical::LEXICAL_WEIGHT`] when absent):
    /// the one a model fitted by
    /// `sembed adapt` chose on its held-out pairs ([`crate::index::model_lexical_weight`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexical_weight: Option<f64>,
    /// The name match's weight in hybrid search ([`crate::lexical::NAME_WEIGHT`] when absent): the
    /// one `sembed adapt` chose with the lexical weight ([`crate::index::model_weights`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_weight: Option<f64>,
}

impl Meta {
    /// The weights hybrid search fuses with. A model adapted before the name match existed carries
    /// a lexical weight and no name weight: its name weight is 0, as its lexical weight was chosen
    /// without one (on the reported sets the name match cost those models 0.03 NDCG@10).
    pub fn weights(&self) -> crate::lexical::Weights {
        let default = crate::lexical::Weights::default();
        crate::lexical::Weights {
            lexical: self.lexical_weight.unwrap_or(default.lexical),
            name: self
                .name_weight
                .or(self.lexical_weight.map(|_| 0.0))
                .unwrap_or(default.name),
        }
    }
}

/// One stored chunk, without its vector.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    pub path: String,
    pub lang: String,
    pub kind: String,
    pub symbol: Option<String>,
    pub start_line: usize,
    pub end_line: usize,
    pub start_byte: usize,
    pub end_byte: usize,
    pub part: usize,
    pub parts: usize,
    #[serde(serialize_with = "ser_hash")]
    pub hash: Hash,
    pub text: String,
}

fn ser_hash<S: serde::Serializer>(h: &Hash, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex(h))
}

/// A file's new content: its hash and every chunk (the old rows of the path are replaced).
#[derive(Debug, Clone)]
pub struct FileUpdate {
    pub path: String,
    pub file_hash: Hash,
    pub rows: Vec<Row>,
}

/// What a stored file was indexed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    pub file_hash: Hash,
    /// Chunk hashes of its rows.
    pub chunks: Vec<Hash>,
}

/// Search restrictions.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub lang: Option<String>,
    /// `*` any characters (`/` too), `?` one.
    pub path: Option<String>,
}

impl Filter {
    /// A filter from a user's language and path glob. A language no chunk can have is an error
    /// naming the ones there are (it would find nothing, silently); case is ignored.
    pub fn new(lang: Option<String>, path: Option<String>) -> std::result::Result<Filter, String> {
        let lang = lang.map(|l| l.to_lowercase());
        if let Some(l) = &lang {
            if !crate::chunk::LANGUAGES.contains(&l.as_str()) {
                return Err(format!(
                    "language `{l}`: one of {}",
                    crate::chunk::LANGUAGES.join(", ")
                ));
            }
        }
        Ok(Filter { lang, path })
    }
    pub fn is_empty(&self) -> bool {
        self.lang.is_none() && self.path.is_none()
    }
    pub fn accepts(&self, path: &str, lang: &str) -> bool {
        self.lang.as_deref().is_none_or(|l| l == lang)
            && self
                .path
                .as_deref()
                .is_none_or(|p| crate::walk::glob_match(p, path))
    }
}

/// A search result: the row, the score it was ranked by (the cosine similarity to the query in dense
/// search, BM25 in lexical search, the fused score in hybrid search), and the cosine and BM25
/// where the row was in that ranking.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Hit {
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bm25: Option<f32>,
    #[serde(flatten)]
    pub row: Row,
}

impl Hit {
    /// A hit of dense search.
    pub fn dense(cosine: f32, row: Row) -> Hit {
        Hit {
            score: cosine,
            cosine: Some(cosine),
            bm25: None,
            row,
        }
    }
    /// A hit of lexical search.
    pub fn lexical(bm25: f32, row: Row) -> Hit {
        Hit {
            score: bm25,
            cosine: None,
            bm25: Some(bm25),
            row,
        }
    }
}

/// How a search was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every vector compared.
    Exact,
    /// The HNSW graph.
    Ann,
    /// No vector compared: a lexical search.
    Lexical,
}

/// The operations indexing and searching need; each write is one transaction.
pub trait Store: Send {
    /// The index's settings, if it has been created.
    fn meta(&mut self) -> Result<Option<Meta>>;
    /// Create the index for `meta`, or with `replace`, drop everything in it and start again.
    fn init(&mut self, meta: &Meta, replace: bool) -> Result<()>;
    /// Every stored file (of this shard, for a sharded PostgreSQL index).
    fn files(&mut self, shard: Option<Shard>) -> Result<HashMap<String, StoredFile>>;
    /// Which of these chunk hashes have a vector stored.
    fn known(&mut self, hashes: &[Hash]) -> Result<HashSet<Hash>>;
    /// Replace the rows of some files and add vectors, in one transaction.
    fn commit(&mut self, files: &[FileUpdate], vectors: &[(Hash, Vec<f32>)]) -> Result<()>;
    /// Remove files and every row of them; vectors no row uses any more are dropped.
    fn remove(&mut self, paths: &[String]) -> Result<()>;
    /// After a run: bring search structures up to date (the HNSW graph).
    fn finish(&mut self) -> Result<()>;
    /// Stored rows.
    fn count(&mut self) -> Result<usize>;
    /// Compare every vector from now on, whatever the size (to measure the graph's recall).
    fn set_exact(&mut self, exact: bool);
    /// This store will answer many searches (a server): it may keep what they need in memory. The
    /// embedded store then ranks lexical searches from its rows' terms in memory
    /// ([`crate::lexical::MemoryIndex`], the same BM25 as FTS5's, kept current with the index's
    /// revisions) instead of asking FTS5.
    fn answer_many(&mut self) {}
    /// The `k` rows most similar to `query` (a unit vector).
    fn search(&mut self, query: &[f32], k: usize, filter: &Filter) -> Result<(Vec<Hit>, Method)>;
    /// The `k` rows best matching these terms by BM25 (see [`crate::lexical`]), best first (ties: by
    /// path and position).
    fn lexical(&mut self, terms: &[String], k: usize, filter: &Filter) -> Result<Vec<Hit>>;
    /// Every row, ordered by path and position (for comparing indexes).
    fn rows(&mut self) -> Result<Vec<(Row, Vec<f32>)>>;
    /// The rows of definitions named `name` ([`symbol_rank`]), at most `limit`, exact names first,
    /// then shorter symbols, then by path and position.
    fn symbols(&mut self, name: &str, limit: usize, filter: &Filter) -> Result<Vec<Row>>;
    /// A value the index keeps beside its settings (`sembed index` records what it indexed under
    /// `source`), if set.
    fn setting(&mut self, key: &str) -> Result<Option<String>>;
    /// Keep a value under `key` (after [`Store::init`]).
    fn set_setting(&mut self, key: &str, value: &str) -> Result<()>;
}

/// Whether a stored symbol is a definition named `name`: the whole symbol (`Store::open`,
/// `MyApp.Repo.get`), or its last parts after a `.` or `::` (`open`, `Repo.get`). 0 for the whole
/// symbol, 1 for its last parts, `None` otherwise.
pub fn symbol_rank(symbol: &str, name: &str) -> Option<u8> {
    if name.is_empty() {
        return None;
    }
    if symbol == name {
        return Some(0);
    }
    let head = symbol.strip_suffix(name)?;
    (head.ends_with('.') || head.ends_with("::")).then_some(1)
}

/// A `LIKE` pattern for symbols that end with `name` (`\` escapes), to narrow the rows
/// [`symbol_rank`] then checks.
pub fn like_suffix(name: &str) -> String {
    let mut p = String::from("%");
    for c in name.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p
}

/// Order and cut the candidate rows of a symbol lookup (see [`Store::symbols`]).
pub fn rank_symbols(rows: Vec<Row>, name: &str, limit: usize, filter: &Filter) -> Vec<Row> {
    let mut ranked: Vec<(u8, Row)> = rows
        .into_iter()
        .filter(|r| filter.accepts(&r.path, &r.lang))
        .filter_map(|r| Some((symbol_rank(r.symbol.as_deref()?, name)?, r)))
        .collect();
    ranked.sort_by(|(a, x), (b, y)| {
        let len = |r: &Row| r.symbol.as_ref().map_or(0, |s| s.len());
        a.cmp(b).then(len(x).cmp(&len(y))).then_with(|| {
            (&x.path, x.start_byte, x.end_byte).cmp(&(&y.path, y.start_byte, y.end_byte))
        })
    });
    ranked.truncate(limit);
    ranked.into_iter().map(|(_, r)| r).collect()
}

/// Part `index` of `count`: the files whose path hashes to it (several `sembed index` processes can
/// fill one PostgreSQL index, each with its own shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn holds(&self, path: &str) -> bool {
        let h = hash_text(path);
        (u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % self.count as u64)
            == self.index as u64
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("shard `{s}`: expected I/N, e.g. 0/4"))?;
        let index: usize = i
            .parse()
            .map_err(|_| format!("shard `{s}`: I is not a number"))?;
        let count: usize = n
            .parse()
            .map_err(|_| format!("shard `{s}`: N is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("shard `{s}`: I must be in 0..N"));
        }
        Ok(Shard { index, count })
    }
}

/// Open the store a target names: `postgres://…` / `postgresql://…` (with `#TABLE` for a table name
/// other than `sembed_chunks`), or a SQLite file.
pub fn open(target: &str, ann_threshold: usize) -> Result<Box<dyn Store>> {
    if target.starts_with("postgres://") || target.starts_with("postgresql://") {
        let (url, table) = match target.rsplit_once('#') {
            Some((u, t)) => (u, t),
            None => (target, "sembed_chunks"),
        };
        Ok(Box::new(
            pg::PgStore::connect(url, table)?.with_ann_threshold(ann_threshold),
        ))
    } else {
        Ok(Box::new(sqlite::SqliteStore::open(
            std::path::Path::new(target),
            ann_threshold,
        )?))
    }
}

/// Open an index that exists (never create a SQLite file where a search or a server looks).
pub fn open_existing(target: &str, ann_threshold: usize) -> Result<Box<dyn Store>> {
    if !target.contains("://") && !std::path::Path::new(target).is_file() {
        return Err(crate::Error::Invalid(format!(
            "{target}: no such index; run `sembed index` first"
        )));
    }
    open(target, ann_threshold)
}

/// The top `k` of `(score, item)` pairs, best first (ties: the lower item first, so every store orders
/// them alike).
pub fn top_k<T: Ord + Copy>(scored: impl Iterator<Item = (f32, T)>, k: usize) -> Vec<(f32, T)> {
    let mut v: Vec<(f32, T)> = scored.collect();
    let by = |a: &(f32, T), b: &(f32, T)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if v.len() > k {
        v.select_nth_unstable_by(k, by);
        v.truncate(k);
    }
    v.sort_by(by);
    v
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight lanes of partial sums so the compiler vectorises it.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored settings as JSON, the way both stores keep them.
    fn meta(json: &str) -> Meta {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_fusion_weights_an_index_searches_with() {
        let base = r#"{"model": "m", "model_refs": [], "dimension": 4, "chunker": "c""#;
        let w = |extra: &str| meta(&format!("{base}{extra}}}")).weights();
        // The default model: the defaults.
        assert_eq!(w(""), crate::lexical::Weights::default());
        // A model adapted now: both weights it chose.
        let both = w(r#", "lexical_weight": 0.6, "name_weight": 0.25"#);
        assert_eq!((both.lexical, both.name), (0.6, 0.25));
        let none = w(r#", "lexical_weight": 1.0, "name_weight": 0.0"#);
        assert_eq!((none.lexical, none.name), (1.0, 0.0));
        // A model adapted before the name match: no name match.
        let old = w(r#", "lexical_weight": 0.25"#);
        assert_eq!((old.lexical, old.name), (0.25, 0.0));
    }
}
