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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// A search result: the row and its cosine similarity to the query.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Hit {
    pub score: f32,
    #[serde(flatten)]
    pub row: Row,
}

/// How a search was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every vector compared.
    Exact,
    /// The HNSW graph.
    Ann,
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
    /// The `k` rows most similar to `query` (a unit vector).
    fn search(&mut self, query: &[f32], k: usize, filter: &Filter) -> Result<(Vec<Hit>, Method)>;
    /// Every row, ordered by path and position (for comparing indexes).
    fn rows(&mut self) -> Result<Vec<(Row, Vec<f32>)>>;
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
