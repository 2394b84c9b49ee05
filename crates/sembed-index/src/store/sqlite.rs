//! The embedded store: one SQLite file holds every row and vector (WAL journal: each write is a
//! transaction, so a crash or Ctrl-C leaves the last committed state), and an HNSW graph (usearch) in a
//! file beside it answers searches once there are enough vectors.
//!
//! The graph is a cache of the vectors table, never the truth: every vector added or dropped is
//! written to a change log in the same transaction, and after a run the log is applied to the graph,
//! which is saved under a temporary name and renamed into place before the log is cleared. A graph
//! that is missing, unreadable or of another revision is rebuilt from the table; until then searches
//! compare every vector.

use super::{
    dot, top_k, FileUpdate, Filter, Hash, Hit, Meta, Method, Row, Shard, Store, StoredFile,
};
use crate::error::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

const FORMAT: &str = "sembed-index 1";

/// Below this many vectors searches compare every vector; from it on the HNSW graph answers.
pub const DEFAULT_ANN_THRESHOLD: usize = 20_000;

/// Candidates the graph keeps while searching (HNSW's ef); PostgreSQL's `hnsw.ef_search` is set alike.
pub const EF_SEARCH: usize = 128;

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    ann_path: PathBuf,
    ann_threshold: usize,
    cache: Option<Loaded>,
    exact: bool,
    /// The settings, read at open, by `init` and again by every `meta` call and search (every
    /// search and commit needs the dimension).
    meta: Option<Meta>,
    /// Lexical search from memory ([`Store::answer_many`]), and the index it keeps.
    keep_lexical: bool,
    lexical_memory: Option<LexicalMemory>,
    /// Most rows kept in memory ([`MAX_MEMORY_ROWS`]).
    memory_rows: i64,
}

/// The rows' terms in memory, as of one revision of the index; `None` when it has more rows than
/// [`MAX_MEMORY_ROWS`] (FTS5 answers then).
struct LexicalMemory {
    revision: i64,
    index: Option<crate::lexical::MemoryIndex<Place>>,
}

/// Most rows whose terms a store keeps in memory ([`Store::answer_many`]): about 0.8 KB and 20 µs to
/// build each (19 MB and 0.47 s at 24,527 chunks), so 200 MB and 5 s here. A larger index is
/// searched by FTS5.
pub const MAX_MEMORY_ROWS: i64 = 250_000;

/// What a lexical search needs of a row to filter it and break ties (path, language, bytes), and
/// the hash of its text: with them, what tells a changed row under a reused id.
struct Place {
    path: String,
    lang: String,
    start: i64,
    end: i64,
    hash: Vec<u8>,
}

/// What searches keep between calls, valid for one revision of the index.
struct Loaded {
    revision: i64,
    /// Exact search: every vector, row-major, with its id.
    ids: Vec<i64>,
    matrix: Vec<f32>,
    ann: Option<usearch::Index>,
    /// Per stored file: its path, language and the vectors of its rows; read on the first filtered
    /// search, so a filter is matched once per file, not once per row.
    by_file: Option<Vec<(String, String, Vec<i64>)>>,
}

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::Sqlite {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl SqliteStore {
    /// Open (or create) the index at `path`; the HNSW graph lives at `path` with extension `.hnsw`.
    pub fn open(path: &Path, ann_threshold: usize) -> Result<Self> {
        let existed = path.is_file()
            && std::fs::metadata(path)
                .map(|m| m.len() > 0)
                .unwrap_or(false);
        if !existed {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| Error::Io {
                    path: dir.display().to_string(),
                    source: e,
                })?;
            }
        }
        let err = sql_err(path);
        let conn = Connection::open(path).map_err(&err)?;
        let not_index = |why: String| {
            Error::Corrupt(format!(
                "{}: not a sembed index ({why}); give another --db, or delete it to start again",
                path.display()
            ))
        };
        if existed {
            let format: Option<String> = conn
                .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(|e| not_index(e.to_string()))?;
            match format.as_deref() {
                Some(FORMAT) => {}
                Some(other) => return Err(not_index(format!("its format is `{other}`"))),
                None => return Err(not_index("no format record".into())),
            }
            // A damaged file can still answer one query: check the whole structure.
            let check: String = conn
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(|e| not_index(e.to_string()))?;
            if check != "ok" {
                return Err(Error::Corrupt(format!(
                    "{}: the index is damaged ({check}); delete it and index again",
                    path.display()
                )));
            }
        }
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .map_err(|e| not_index(e.to_string()))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(&err)?;
        if !existed {
            conn.execute_batch(&format!(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 INSERT OR IGNORE INTO meta VALUES ('format', '{FORMAT}'), ('revision', '0');
                 CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, hash BLOB NOT NULL);
                 CREATE TABLE IF NOT EXISTS vectors (
                     id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, vector BLOB NOT NULL);
                 CREATE TABLE IF NOT EXISTS chunks (
                     id INTEGER PRIMARY KEY,
                     path TEXT NOT NULL REFERENCES files(path) ON DELETE CASCADE,
                     lang TEXT NOT NULL, kind TEXT NOT NULL, symbol TEXT,
                     start_line INTEGER NOT NULL, end_line INTEGER NOT NULL,
                     start_byte INTEGER NOT NULL, end_byte INTEGER NOT NULL,
                     part INTEGER NOT NULL, parts INTEGER NOT NULL,
                     hash BLOB NOT NULL, text TEXT NOT NULL,
                     vector_id INTEGER NOT NULL REFERENCES vectors(id));
                 CREATE INDEX IF NOT EXISTS chunks_path ON chunks(path);
                 CREATE INDEX IF NOT EXISTS chunks_vector ON chunks(vector_id);
                 CREATE TABLE IF NOT EXISTS ann_log (vector_id INTEGER PRIMARY KEY, added INTEGER NOT NULL);
                 COMMIT;"
            ))
            .map_err(&err)?;
        }
        let mut store = SqliteStore {
            conn,
            ann_path: path.with_extension("hnsw"),
            path: path.to_path_buf(),
            ann_threshold,
            cache: None,
            exact: false,
            keep_lexical: false,
            lexical_memory: None,
            memory_rows: MAX_MEMORY_ROWS,
            meta: None,
        };
        store.meta = store.read_meta()?;
        store.ensure_lexical()?;
        Ok(store)
    }

    /// The lexical index (FTS5 over the terms of [`crate::lexical`]), created, or made again from the
    /// stored rows when the term rules changed (an index from before it gets one without embedding
    /// anything).
    fn ensure_lexical(&mut self) -> Result<()> {
        let want = crate::lexical::VERSION.to_string();
        let exists: bool = self
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'lexical'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(self.err())?
            > 0;
        if exists && self.meta_value("lexical")?.as_deref() == Some(want.as_str()) {
            return Ok(());
        }
        let path = self.path.clone();
        let err = sql_err(&path);
        // Another process opening the same index may be at this point too: take the write lock
        // first, then look again.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&err)?;
        let exists = tx
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'lexical'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(&err)?
            > 0;
        let current: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'lexical'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(&err)?;
        if exists && current.as_deref() == Some(want.as_str()) {
            return Ok(());
        }
        if exists {
            tx.execute("DROP TABLE lexical", []).map_err(&err)?;
        }
        tx.execute(LEXICAL_TABLE, []).map_err(&err)?;
        {
            let mut read = tx
                .prepare("SELECT id, path, symbol, text FROM chunks")
                .map_err(&err)?;
            let mut add = tx
                .prepare("INSERT INTO lexical (rowid, terms) VALUES (?1, ?2)")
                .map_err(&err)?;
            let mut rows = read.query([]).map_err(&err)?;
            while let Some(r) = rows.next().map_err(&err)? {
                let id: i64 = r.get(0).map_err(&err)?;
                let p: String = r.get(1).map_err(&err)?;
                let sym: Option<String> = r.get(2).map_err(&err)?;
                let text: String = r.get(3).map_err(&err)?;
                let terms = crate::lexical::row_terms(&p, sym.as_deref(), &text);
                add.execute(params![id, terms.join(" ")]).map_err(&err)?;
            }
        }
        tx.execute("INSERT OR REPLACE INTO meta VALUES ('lexical', ?1)", [want])
            .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(())
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        sql_err(&self.path)
    }

    /// Keep at most `rows` rows' terms in memory ([`MAX_MEMORY_ROWS`] unless set).
    pub fn set_memory_rows(&mut self, rows: usize) {
        self.memory_rows = rows.try_into().unwrap_or(i64::MAX);
        self.lexical_memory = None;
    }

    /// How many rows' terms lexical search holds in memory: `None` when it asks FTS5 (a store not
    /// told to [`Store::answer_many`], or more rows than it may keep).
    pub fn lexical_memory_rows(&self) -> Option<usize> {
        let index = self.lexical_memory.as_ref()?.index.as_ref()?;
        self.keep_lexical.then(|| index.len())
    }

    /// Bring the lexical index in memory to the index's revision: rows gone or changed are removed
    /// and new ones added (a row is its id, path, bytes and text hash: SQLite may give a new row
    /// the id of a deleted one). Built anew when as many rows are dead as live.
    fn refresh_lexical(&mut self) -> Result<()> {
        let revision = self.revision()?;
        if self
            .lexical_memory
            .as_ref()
            .is_some_and(|m| m.revision == revision)
        {
            return Ok(());
        }
        let err = sql_err(&self.path);
        // One snapshot: the revision and the rows it names.
        let tx = self.conn.unchecked_transaction().map_err(&err)?;
        let revision: i64 = tx
            .query_row(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'revision'",
                [],
                |r| r.get(0),
            )
            .map_err(&err)?;
        let rows: i64 = tx
            .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
            .map_err(&err)?;
        if rows > self.memory_rows {
            drop(tx);
            self.lexical_memory = Some(LexicalMemory {
                revision,
                index: None,
            });
            return Ok(());
        }
        let mut index = match self.lexical_memory.take().and_then(|m| m.index) {
            Some(index) if index.dead() <= index.len() => index,
            _ => crate::lexical::MemoryIndex::default(),
        };
        type Columns = (String, String, i64, i64, Vec<u8>, Option<String>, String);
        let read = |r: &rusqlite::Row| -> rusqlite::Result<Columns> {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        };
        let add = |index: &mut crate::lexical::MemoryIndex<Place>, id: i64, c: Columns| {
            let (path, lang, start, end, hash, symbol, text) = c;
            index.add(
                id,
                &path,
                symbol.as_deref(),
                &text,
                Place {
                    path: path.clone(),
                    lang,
                    start,
                    end,
                    hash,
                },
            );
        };
        const COLUMNS: &str = "path, lang, start_byte, end_byte, hash, symbol, text";
        if index.is_empty() {
            let mut stmt = tx
                .prepare(&format!("SELECT {COLUMNS}, id FROM chunks"))
                .map_err(&err)?;
            let mut rows = stmt.query([]).map_err(&err)?;
            while let Some(r) = rows.next().map_err(&err)? {
                let id: i64 = r.get(7).map_err(&err)?;
                add(&mut index, id, read(r).map_err(&err)?);
            }
        } else {
            let mut current: HashMap<i64, (String, i64, i64, Vec<u8>)> = HashMap::new();
            {
                let mut stmt = tx
                    .prepare("SELECT id, path, start_byte, end_byte, hash FROM chunks")
                    .map_err(&err)?;
                let mut rows = stmt.query([]).map_err(&err)?;
                while let Some(r) = rows.next().map_err(&err)? {
                    current.insert(
                        r.get(0).map_err(&err)?,
                        (
                            r.get(1).map_err(&err)?,
                            r.get(2).map_err(&err)?,
                            r.get(3).map_err(&err)?,
                            r.get(4).map_err(&err)?,
                        ),
                    );
                }
            }
            let stale: Vec<i64> = index
                .keys()
                .filter(|k| {
                    let p = index.get(*k).expect("held");
                    current.get(k).is_none_or(|(path, start, end, hash)| {
                        (path, *start, *end, hash) != (&p.path, p.start, p.end, &p.hash)
                    })
                })
                .collect();
            for k in stale {
                index.remove(k);
            }
            let mut one = tx
                .prepare(&format!("SELECT {COLUMNS} FROM chunks WHERE id = ?1"))
                .map_err(&err)?;
            let new: Vec<i64> = current
                .into_keys()
                .filter(|k| !index.contains(*k))
                .collect();
            for id in new {
                let c = one.query_row([id], read).map_err(&err)?;
                add(&mut index, id, c);
            }
        }
        drop(tx);
        self.lexical_memory = Some(LexicalMemory {
            revision,
            index: Some(index),
        });
        Ok(())
    }

    /// [`Store::lexical`] from the rows' terms in memory ([`Store::answer_many`]): the same BM25,
    /// filter and order as FTS5's search below.
    fn lexical_from_memory(
        &self,
        index: &crate::lexical::MemoryIndex<Place>,
        terms: &[String],
        k: usize,
        filter: &Filter,
    ) -> Result<Vec<Hit>> {
        let mut scored: Vec<(f64, i64, &Place)> = index
            .scores(terms)
            .into_iter()
            .filter(|(_, _, p)| filter.accepts(&p.path, &p.lang))
            .collect();
        let order = |a: &(f64, i64, &Place), b: &(f64, i64, &Place)| {
            b.0.total_cmp(&a.0)
                .then_with(|| (&a.2.path, a.2.start, a.2.end).cmp(&(&b.2.path, b.2.start, b.2.end)))
        };
        if scored.len() > k {
            scored.select_nth_unstable_by(k - 1, order);
            scored.truncate(k);
        }
        scored.sort_by(order);
        let picked: Vec<(f64, i64)> = scored.into_iter().map(|(s, id, _)| (s, id)).collect();
        let mut get = self
            .conn
            .prepare_cached(&format!("SELECT {ROW_COLUMNS} FROM chunks WHERE id = ?1"))
            .map_err(self.err())?;
        let mut hits = Vec::with_capacity(picked.len());
        for (score, id) in picked {
            // A row removed since the refresh (another process indexing) is skipped.
            if let Some(row) = get
                .query_row([id], read_row)
                .optional()
                .map_err(self.err())?
            {
                hits.push(Hit::lexical(score as f32, row));
            }
        }
        Ok(hits)
    }

    fn meta_value(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(self.err())
    }

    fn revision(&self) -> Result<i64> {
        Ok(self
            .meta_value("revision")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    fn vector_count(&self) -> Result<usize> {
        self.conn
            .query_row("SELECT count(*) FROM vectors", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(self.err())
    }

    fn dimension(&self) -> Result<usize> {
        Ok(self.meta.as_ref().map_or(0, |m| m.dimension))
    }

    fn read_meta(&self) -> Result<Option<Meta>> {
        match self.meta_value("settings")? {
            None => Ok(None),
            Some(json) => serde_json::from_str(&json).map(Some).map_err(|e| {
                Error::Corrupt(format!("{}: settings record: {e}", self.path.display()))
            }),
        }
    }

    fn new_ann(&self, dim: usize) -> Result<usearch::Index> {
        let opts = usearch::IndexOptions {
            dimensions: dim,
            metric: usearch::MetricKind::IP,
            quantization: usearch::ScalarKind::F32,
            connectivity: 16,
            expansion_add: 128,
            expansion_search: EF_SEARCH,
            multi: false,
        };
        usearch::Index::new(&opts).map_err(|e| self.ann_err(e.to_string()))
    }

    fn ann_err(&self, message: String) -> Error {
        Error::Sqlite {
            path: self.ann_path.display().to_string(),
            message: format!("HNSW graph: {message}"),
        }
    }

    /// Every vector with its id.
    fn all_vectors(&self) -> Result<(Vec<i64>, Vec<f32>)> {
        let dim = self.dimension()?;
        let mut stmt = self
            .conn
            .prepare("SELECT id, vector FROM vectors ORDER BY id")
            .map_err(self.err())?;
        let mut ids = Vec::new();
        let mut matrix = Vec::new();
        let mut rows = stmt.query([]).map_err(self.err())?;
        while let Some(r) = rows.next().map_err(self.err())? {
            ids.push(r.get::<_, i64>(0).map_err(self.err())?);
            let blob = r.get_ref(1).map_err(self.err())?.as_blob().map_err(|e| {
                Error::Corrupt(format!("{}: vector blob: {e}", self.path.display()))
            })?;
            decode_into(blob, dim, &mut matrix).map_err(|m| {
                Error::Corrupt(format!(
                    "{}: vector {}: {m}",
                    self.path.display(),
                    ids.len()
                ))
            })?;
        }
        Ok((ids, matrix))
    }

    /// Load what searches need at the current revision.
    fn load(&mut self) -> Result<&Loaded> {
        let revision = self.revision()?;
        if self.cache.as_ref().is_some_and(|c| c.revision == revision) {
            return Ok(self.cache.as_ref().expect("checked"));
        }
        let ann_revision: Option<i64> = self
            .meta_value("ann_revision")?
            .and_then(|v| v.parse().ok());
        let dim = self.dimension()?;
        let mut ann = None;
        if self.exact {
            // Asked to compare every vector.
        } else if ann_revision == Some(revision) && self.ann_path.is_file() {
            let index = self.new_ann(dim)?;
            match index.view(&self.ann_path.to_string_lossy()) {
                Ok(()) if index.dimensions() == dim => ann = Some(index),
                _ => tracing::warn!(
                    "{}: the HNSW graph does not load; comparing every vector until the next `sembed index`",
                    self.ann_path.display()
                ),
            }
        } else if self.vector_count()? >= self.ann_threshold {
            tracing::warn!(
                "{}: the HNSW graph is out of date; comparing every vector until the next `sembed index`",
                self.ann_path.display()
            );
        }
        let (ids, matrix) = if ann.is_some() {
            (Vec::new(), Vec::new())
        } else {
            self.all_vectors()?
        };
        self.cache = Some(Loaded {
            revision,
            ids,
            matrix,
            ann,
            by_file: None,
        });
        Ok(self.cache.as_ref().expect("just set"))
    }

    /// Rows of these vectors, best vector first, at most `k` (and those passing `filter`).
    fn rows_of_vectors(
        &self,
        scored: &[(f32, i64)],
        k: usize,
        filter: &Filter,
    ) -> Result<Vec<Hit>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM chunks WHERE vector_id = ?1 ORDER BY path, start_byte, end_byte, id"
            ))
            .map_err(self.err())?;
        let mut hits = Vec::new();
        for &(score, id) in scored {
            let rows = stmt
                .query_map([id], read_row)
                .map_err(self.err())?
                .collect::<rusqlite::Result<Vec<Row>>>()
                .map_err(self.err())?;
            for row in rows {
                if filter.accepts(&row.path, &row.lang) {
                    hits.push(Hit::dense(score, row));
                    if hits.len() == k {
                        return Ok(hits);
                    }
                }
            }
        }
        Ok(hits)
    }

    /// Read which vectors each file's rows use (once per revision).
    fn load_files(&mut self) -> Result<()> {
        if self.cache.as_ref().is_some_and(|c| c.by_file.is_some()) {
            return Ok(());
        }
        let mut files: Vec<(String, String, Vec<i64>)> = Vec::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT path, lang, vector_id FROM chunks ORDER BY path, lang")
                .map_err(self.err())?;
            let mut rows = stmt.query([]).map_err(self.err())?;
            while let Some(r) = rows.next().map_err(self.err())? {
                let path = r.get_ref(0).map_err(self.err())?.as_str().unwrap_or("");
                let lang = r.get_ref(1).map_err(self.err())?.as_str().unwrap_or("");
                let id: i64 = r.get(2).map_err(self.err())?;
                match files.last_mut() {
                    Some((p, l, ids)) if p == path && l == lang => ids.push(id),
                    _ => files.push((path.to_string(), lang.to_string(), vec![id])),
                }
            }
        }
        if let Some(c) = self.cache.as_mut() {
            c.by_file = Some(files);
        }
        Ok(())
    }

    /// Search among the rows passing a filter: the vectors of the matching files are found first
    /// (no vector read); the graph then searches among them only, or, when they are few, each is
    /// compared.
    fn search_filtered(
        &self,
        query: &[f32],
        k: usize,
        filter: &Filter,
    ) -> Result<(Vec<Hit>, Method)> {
        let dim = self.dimension()?;
        let cache = self.cache.as_ref().expect("loaded");
        let by_file = cache.by_file.as_ref().expect("loaded with the files");
        let ids: HashSet<i64> = by_file
            .iter()
            .filter(|(p, l, _)| filter.accepts(p, l))
            .flat_map(|(_, _, ids)| ids.iter().copied())
            .collect();
        if ids.is_empty() {
            return Ok((Vec::new(), Method::Exact));
        }
        if let Some(ann) = cache
            .ann
            .as_ref()
            .filter(|_| ids.len() > self.ann_threshold)
        {
            let m = ann
                .filtered_search(query, (k * 2).min(ids.len()), |key| {
                    ids.contains(&(key as i64))
                })
                .map_err(|e| self.ann_err(e.to_string()))?;
            let scored: Vec<(f32, i64)> = m
                .keys
                .iter()
                .zip(&m.distances)
                .map(|(&key, &d)| (1.0 - d, key as i64))
                .collect();
            let hits = self.rows_of_vectors(&scored, k, filter)?;
            if hits.len() == k.min(ids.len()) {
                return Ok((hits, Method::Ann));
            }
        }
        // Compare each: from the graph's copy, the loaded matrix, or the table.
        let mut v = vec![0f32; dim];
        let mut sorted: Vec<i64> = ids.into_iter().collect();
        sorted.sort_unstable();
        let mut scored = Vec::with_capacity(sorted.len());
        let mut get = self
            .conn
            .prepare_cached("SELECT vector FROM vectors WHERE id = ?1")
            .map_err(self.err())?;
        for id in sorted {
            let s = if let Some(ann) = &cache.ann {
                ann.get(id as u64, &mut v)
                    .map_err(|e| self.ann_err(e.to_string()))?;
                dot(query, &v)
            } else if let Ok(i) = cache.ids.binary_search(&id) {
                dot(query, &cache.matrix[i * dim..(i + 1) * dim])
            } else {
                let blob: Vec<u8> = get.query_row([id], |r| r.get(0)).map_err(self.err())?;
                v.clear();
                decode_into(&blob, dim, &mut v)
                    .map_err(|m| Error::Corrupt(format!("{}: {m}", self.path.display())))?;
                dot(query, &v)
            };
            scored.push((s, id));
        }
        // Every one of these vectors has at least one row passing the filter.
        let best = top_k(scored.into_iter(), k);
        Ok((self.rows_of_vectors(&best, k, filter)?, Method::Exact))
    }

    fn bump_revision(tx: &rusqlite::Transaction) -> rusqlite::Result<()> {
        tx.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'",
            [],
        )?;
        Ok(())
    }

    /// Delete a path's rows, noting their vectors (the candidates for [`Self::drop_orphans`]).
    fn delete_rows(
        tx: &rusqlite::Transaction,
        path: &str,
        candidates: &mut Vec<i64>,
    ) -> rusqlite::Result<()> {
        let mut stmt =
            tx.prepare_cached("SELECT DISTINCT vector_id FROM chunks WHERE path = ?1")?;
        for id in stmt.query_map([path], |r| r.get(0))? {
            candidates.push(id?);
        }
        tx.prepare_cached(
            "DELETE FROM lexical WHERE rowid IN (SELECT id FROM chunks WHERE path = ?1)",
        )?
        .execute([path])?;
        tx.prepare_cached("DELETE FROM chunks WHERE path = ?1")?
            .execute([path])?;
        Ok(())
    }

    /// Drop those of `candidates` no row uses any more (logging them for the graph). Only the vectors
    /// of deleted rows can have become unused, so the rest of the table is not scanned.
    fn drop_orphans(tx: &rusqlite::Transaction, candidates: &mut Vec<i64>) -> rusqlite::Result<()> {
        candidates.sort_unstable();
        candidates.dedup();
        let mut used = tx.prepare_cached("SELECT 1 FROM chunks WHERE vector_id = ?1")?;
        let mut del = tx.prepare_cached("DELETE FROM vectors WHERE id = ?1")?;
        let mut log = tx.prepare_cached("INSERT OR REPLACE INTO ann_log VALUES (?1, 0)")?;
        for &id in candidates.iter() {
            if !used.exists([id])? {
                del.execute([id])?;
                log.execute([id])?;
            }
        }
        Ok(())
    }

    /// Write the graph for the current vectors (applying the change log to the saved graph, or
    /// building it again), then record its revision.
    fn update_ann(&mut self) -> Result<()> {
        let dim = self.dimension()?;
        let n = self.vector_count()?;
        let revision = self.revision()?;
        if n < self.ann_threshold || dim == 0 {
            // Exact search: no graph. Forget it and the log.
            let _ = std::fs::remove_file(&self.ann_path);
            self.conn
                .execute_batch("BEGIN; DELETE FROM ann_log; DELETE FROM meta WHERE key = 'ann_revision'; COMMIT;")
                .map_err(self.err())?;
            return Ok(());
        }
        let ann_revision: Option<i64> = self
            .meta_value("ann_revision")?
            .and_then(|v| v.parse().ok());
        if ann_revision == Some(revision) && self.ann_path.is_file() {
            return Ok(());
        }
        let index = self.new_ann(dim)?;
        let mut loaded = ann_revision.is_some()
            && self.ann_path.is_file()
            && index.load(&self.ann_path.to_string_lossy()).is_ok()
            && index.dimensions() == dim;
        if loaded {
            // Apply the log: the graph then holds exactly the vectors table.
            let log: Vec<(i64, bool)> = {
                let mut stmt = self
                    .conn
                    .prepare("SELECT vector_id, added FROM ann_log ORDER BY vector_id")
                    .map_err(self.err())?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)))
                    .map_err(self.err())?;
                rows.collect::<rusqlite::Result<_>>().map_err(self.err())?
            };
            let mut vec = Vec::with_capacity(dim);
            let added: Vec<i64> = log.iter().filter(|l| l.1).map(|l| l.0).collect();
            index
                .reserve(index.size() + added.len())
                .map_err(|e| self.ann_err(e.to_string()))?;
            for (id, add) in log {
                if index.contains(id as u64) {
                    index
                        .remove(id as u64)
                        .map_err(|e| self.ann_err(e.to_string()))?;
                }
                if add {
                    let blob: Option<Vec<u8>> = self
                        .conn
                        .query_row("SELECT vector FROM vectors WHERE id = ?1", [id], |r| {
                            r.get(0)
                        })
                        .optional()
                        .map_err(self.err())?;
                    if let Some(blob) = blob {
                        vec.clear();
                        decode_into(&blob, dim, &mut vec)
                            .map_err(|m| Error::Corrupt(format!("{}: {m}", self.path.display())))?;
                        index
                            .add(id as u64, &vec)
                            .map_err(|e| self.ann_err(e.to_string()))?;
                    }
                }
            }
            loaded = index.size() == n;
        }
        let index = if loaded {
            index
        } else {
            let (ids, matrix) = self.all_vectors()?;
            build_ann(self.new_ann(dim)?, &ids, &matrix, dim).map_err(|e| self.ann_err(e))?
        };
        let tmp = self.ann_path.with_extension("hnsw.tmp");
        index
            .save(&tmp.to_string_lossy())
            .map_err(|e| self.ann_err(e.to_string()))?;
        std::fs::rename(&tmp, &self.ann_path).map_err(|e| Error::Io {
            path: self.ann_path.display().to_string(),
            source: e,
        })?;
        let tx = self.conn.transaction().map_err(sql_err(&self.path))?;
        tx.execute("DELETE FROM ann_log", [])
            .map_err(sql_err(&self.path))?;
        tx.execute(
            "INSERT OR REPLACE INTO meta VALUES ('ann_revision', ?1)",
            [revision.to_string()],
        )
        .map_err(sql_err(&self.path))?;
        tx.commit().map_err(sql_err(&self.path))?;
        self.cache = None;
        Ok(())
    }
}

/// Add every vector to a fresh graph, on every core.
fn build_ann(
    index: usearch::Index,
    ids: &[i64],
    matrix: &[f32],
    dim: usize,
) -> std::result::Result<usearch::Index, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    index
        .reserve_capacity_and_threads(ids.len(), threads)
        .map_err(|e| e.to_string())?;
    let per = ids.len().div_ceil(threads).max(1);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for (t, keys) in ids.chunks(per).enumerate() {
            let index = &index;
            let failed = &failed;
            s.spawn(move || {
                for (i, &id) in keys.iter().enumerate() {
                    let row = t * per + i;
                    if let Err(e) = index.add(id as u64, &matrix[row * dim..(row + 1) * dim]) {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        return;
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(index),
    }
}

/// The lexical index: contentless (the terms are made again from `chunks` whenever needed), rows
/// deletable. The terms [`crate::lexical`] writes are letters and digits (Rust's, Unicode's idea of
/// them) separated by spaces: FTS5's `ascii` tokenizer, which splits on ASCII punctuation and space
/// only, reads back exactly those terms, as PostgreSQL's `tsvector` holds them (`unicode61` would
/// split some of them where its categories differ from Rust's, e.g. circled letters).
const LEXICAL_TABLE: &str = "CREATE VIRTUAL TABLE lexical USING fts5(terms, content='', \
     contentless_delete=1, tokenize='ascii')";

const ROW_COLUMNS: &str = "chunks.path, chunks.lang, chunks.kind, chunks.symbol, chunks.start_line,
    chunks.end_line, chunks.start_byte, chunks.end_byte, chunks.part, chunks.parts, chunks.hash, chunks.text";

fn read_row(r: &rusqlite::Row) -> rusqlite::Result<Row> {
    let hash: Vec<u8> = r.get(10)?;
    Ok(Row {
        path: r.get(0)?,
        lang: r.get(1)?,
        kind: r.get(2)?,
        symbol: r.get(3)?,
        start_line: r.get::<_, i64>(4)? as usize,
        end_line: r.get::<_, i64>(5)? as usize,
        start_byte: r.get::<_, i64>(6)? as usize,
        end_byte: r.get::<_, i64>(7)? as usize,
        part: r.get::<_, i64>(8)? as usize,
        parts: r.get::<_, i64>(9)? as usize,
        hash: hash.try_into().map_err(|_| {
            rusqlite::Error::FromSqlConversionFailure(
                10,
                rusqlite::types::Type::Blob,
                "a chunk hash is not 32 bytes".into(),
            )
        })?,
        text: r.get(11)?,
    })
}

fn encode(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn decode_into(blob: &[u8], dim: usize, out: &mut Vec<f32>) -> std::result::Result<(), String> {
    if blob.len() != dim * 4 {
        return Err(format!(
            "a vector of {} bytes where {dim} f32 values ({} bytes) belong",
            blob.len(),
            dim * 4
        ));
    }
    out.extend(
        blob.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
    );
    Ok(())
}

fn hash_blob(r: &rusqlite::Row, i: usize) -> rusqlite::Result<Hash> {
    let v: Vec<u8> = r.get(i)?;
    v.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Blob,
            "a hash is not 32 bytes".into(),
        )
    })
}

impl Store for SqliteStore {
    fn meta(&mut self) -> Result<Option<Meta>> {
        // Read again: another connection (an indexer beside a searcher, another process) may
        // have created or replaced the index since this one opened.
        self.meta = self.read_meta()?;
        Ok(self.meta.clone())
    }

    fn init(&mut self, meta: &Meta, replace: bool) -> Result<()> {
        let json = serde_json::to_string(meta).expect("serialisable");
        let path = self.path.clone();
        let err = sql_err(&path);
        let tx = self.conn.transaction().map_err(&err)?;
        if replace {
            tx.execute_batch(
                "INSERT INTO lexical (lexical) VALUES ('delete-all');
                 DELETE FROM chunks; DELETE FROM files; DELETE FROM vectors; DELETE FROM ann_log;
                 DELETE FROM meta WHERE key = 'ann_revision';",
            )
            .map_err(&err)?;
            Self::bump_revision(&tx).map_err(&err)?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta VALUES ('settings', ?1)",
            [json],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        if replace {
            let _ = std::fs::remove_file(&self.ann_path);
        }
        self.meta = Some(meta.clone());
        self.cache = None;
        Ok(())
    }

    fn files(&mut self, shard: Option<Shard>) -> Result<HashMap<String, StoredFile>> {
        let mut out: HashMap<String, StoredFile> = HashMap::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT path, hash FROM files")
                .map_err(self.err())?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, hash_blob(r, 1)?)))
                .map_err(self.err())?;
            for r in rows {
                let (path, file_hash) = r.map_err(self.err())?;
                if shard.is_none_or(|s| s.holds(&path)) {
                    out.insert(
                        path,
                        StoredFile {
                            file_hash,
                            chunks: Vec::new(),
                        },
                    );
                }
            }
        }
        let mut stmt = self
            .conn
            .prepare("SELECT path, hash FROM chunks ORDER BY path, start_byte, id")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, hash_blob(r, 1)?)))
            .map_err(self.err())?;
        for r in rows {
            let (path, hash) = r.map_err(self.err())?;
            if let Some(f) = out.get_mut(&path) {
                f.chunks.push(hash);
            }
        }
        Ok(out)
    }

    fn known(&mut self, hashes: &[Hash]) -> Result<HashSet<Hash>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM vectors WHERE hash = ?1")
            .map_err(self.err())?;
        let mut out = HashSet::new();
        for h in hashes {
            if stmt.exists([&h[..]]).map_err(self.err())? {
                out.insert(*h);
            }
        }
        Ok(out)
    }

    fn commit(&mut self, files: &[FileUpdate], vectors: &[(Hash, Vec<f32>)]) -> Result<()> {
        let dim = self.dimension()?;
        let path = self.path.clone();
        let err = sql_err(&path);
        let tx = self.conn.transaction().map_err(&err)?;
        let mut candidates = Vec::new();
        {
            let mut add_vec = tx
                .prepare_cached("INSERT OR IGNORE INTO vectors (hash, vector) VALUES (?1, ?2)")
                .map_err(&err)?;
            let mut log = tx
                .prepare_cached("INSERT OR REPLACE INTO ann_log VALUES (?1, 1)")
                .map_err(&err)?;
            for (h, v) in vectors {
                if v.len() != dim {
                    return Err(Error::Invalid(format!(
                        "a vector of {} values for an index of dimension {dim}",
                        v.len()
                    )));
                }
                if add_vec.execute(params![&h[..], encode(v)]).map_err(&err)? > 0 {
                    log.execute([tx.last_insert_rowid()]).map_err(&err)?;
                }
            }
            let mut file = tx
                .prepare_cached("INSERT OR REPLACE INTO files VALUES (?1, ?2)")
                .map_err(&err)?;
            let mut vec_id = tx
                .prepare_cached("SELECT id FROM vectors WHERE hash = ?1")
                .map_err(&err)?;
            let mut add_row = tx
                .prepare_cached(
                    "INSERT INTO chunks (path, lang, kind, symbol, start_line, end_line, start_byte,
                     end_byte, part, parts, hash, text, vector_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )
                .map_err(&err)?;
            let mut add_terms = tx
                .prepare_cached("INSERT INTO lexical (rowid, terms) VALUES (?1, ?2)")
                .map_err(&err)?;
            for f in files {
                Self::delete_rows(&tx, &f.path, &mut candidates).map_err(&err)?;
                file.execute(params![&f.path, &f.file_hash[..]])
                    .map_err(&err)?;
                for r in &f.rows {
                    let id: i64 = vec_id
                        .query_row([&r.hash[..]], |x| x.get(0))
                        .optional()
                        .map_err(&err)?
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "{}:{}: no vector for chunk {}",
                                r.path,
                                r.start_line,
                                super::hex(&r.hash)
                            ))
                        })?;
                    add_row
                        .execute(params![
                            &r.path,
                            &r.lang,
                            &r.kind,
                            &r.symbol,
                            r.start_line as i64,
                            r.end_line as i64,
                            r.start_byte as i64,
                            r.end_byte as i64,
                            r.part as i64,
                            r.parts as i64,
                            &r.hash[..],
                            &r.text,
                            id
                        ])
                        .map_err(&err)?;
                    add_terms
                        .execute(params![
                            tx.last_insert_rowid(),
                            crate::lexical::of_row(r).join(" ")
                        ])
                        .map_err(&err)?;
                }
            }
        }
        Self::drop_orphans(&tx, &mut candidates).map_err(&err)?;
        Self::bump_revision(&tx).map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(())
    }

    fn remove(&mut self, paths: &[String]) -> Result<()> {
        if paths.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let err = sql_err(&path);
        let tx = self.conn.transaction().map_err(&err)?;
        let mut candidates = Vec::new();
        {
            let mut del_file = tx
                .prepare_cached("DELETE FROM files WHERE path = ?1")
                .map_err(&err)?;
            for p in paths {
                Self::delete_rows(&tx, p, &mut candidates).map_err(&err)?;
                del_file.execute([p]).map_err(&err)?;
            }
        }
        Self::drop_orphans(&tx, &mut candidates).map_err(&err)?;
        Self::bump_revision(&tx).map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.update_ann()
    }

    fn set_exact(&mut self, exact: bool) {
        if self.exact != exact {
            self.exact = exact;
            self.cache = None;
        }
    }

    fn answer_many(&mut self) {
        self.keep_lexical = true;
        // Built now rather than at the first search (0.47 s at 24,527 chunks). A failure here is
        // the first search's error again, where it is reported.
        if let Err(e) = self.refresh_lexical() {
            tracing::warn!("{}: {e}", self.path.display());
        }
    }

    fn count(&mut self) -> Result<usize> {
        self.conn
            .query_row("SELECT count(*) FROM chunks", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(self.err())
    }

    fn search(&mut self, query: &[f32], k: usize, filter: &Filter) -> Result<(Vec<Hit>, Method)> {
        self.meta()?;
        let dim = self.dimension()?;
        if dim == 0 {
            return Ok((Vec::new(), Method::Exact));
        }
        if query.len() != dim {
            return Err(Error::Invalid(format!(
                "a query of {} values for an index of dimension {dim}",
                query.len()
            )));
        }
        if k == 0 {
            return Ok((Vec::new(), Method::Exact));
        }
        self.load()?;
        if !filter.is_empty() {
            self.load_files()?;
            return self.search_filtered(query, k, filter);
        }
        let cache = self.cache.as_ref().expect("loaded");
        if let Some(ann) = &cache.ann {
            // A vector may stand for several rows: ask for more than k.
            let m = ann
                .search(query, (k * 2).min(ann.size()))
                .map_err(|e| self.ann_err(e.to_string()))?;
            let scored: Vec<(f32, i64)> = m
                .keys
                .iter()
                .zip(&m.distances)
                .map(|(&key, &d)| (1.0 - d, key as i64))
                .collect();
            // Each vector has at least one row: 2k vectors give k rows whenever the index holds k.
            return Ok((self.rows_of_vectors(&scored, k, filter)?, Method::Ann));
        }
        let scored = top_k(
            cache
                .ids
                .iter()
                .enumerate()
                .map(|(i, &id)| (dot(query, &cache.matrix[i * dim..(i + 1) * dim]), id)),
            k,
        );
        Ok((self.rows_of_vectors(&scored, k, filter)?, Method::Exact))
    }

    fn lexical(&mut self, terms: &[String], k: usize, filter: &Filter) -> Result<Vec<Hit>> {
        if terms.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        if self.keep_lexical {
            self.refresh_lexical()?;
            if let Some(index) = self.lexical_memory.as_ref().and_then(|m| m.index.as_ref()) {
                return self.lexical_from_memory(index, terms, k, filter);
            }
        }
        // Terms are letters and digits only: quoted, each is one FTS5 phrase.
        let query = terms
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(" OR ");
        // The best matches by score first, sorted and cut by SQLite, without reading their chunks: a
        // query of many words matches most rows, and reading each match's path to filter and break
        // ties cost more than FTS5's BM25 (300 long queries at 12k chunks: lexical p50 17.0 ms
        // reading every match, 9.6 ms scoring all of them first, 8.8 ms with this cut). Then the
        // chunks of the best ones, in score order, until k pass the filter and none left ties the
        // k-th; when the cut runs out first, again with a deeper cut.
        let mut limit = (2 * k).max(k + 16);
        let mut scored = loop {
            let mut matches: Vec<(f64, i64)> = Vec::new();
            {
                let mut stmt = self
                    .conn
                    .prepare_cached(
                        "SELECT rowid, bm25(lexical) AS s FROM lexical WHERE lexical MATCH ?1
                         ORDER BY s LIMIT ?2",
                    )
                    .map_err(self.err())?;
                let mut rows = stmt
                    .query(params![&query, limit as i64])
                    .map_err(self.err())?;
                while let Some(r) = rows.next().map_err(self.err())? {
                    let score: f64 = r.get(1).map_err(self.err())?;
                    matches.push((-score, r.get(0).map_err(self.err())?));
                }
            }
            let all = matches.len() < limit;
            let mut scored: Vec<(f64, String, i64, i64, i64)> = Vec::new();
            let mut settled = false;
            let mut place = self
                .conn
                .prepare_cached("SELECT path, lang, start_byte, end_byte FROM chunks WHERE id = ?1")
                .map_err(self.err())?;
            for (score, id) in matches {
                if scored.len() >= k && scored[k - 1].0 != score {
                    settled = true;
                    break;
                }
                // A match without its chunk is skipped, as the join of the chunks did before.
                let Some((path, lang, start, end)) = place
                    .query_row([id], |r| {
                        Ok::<(String, String, i64, i64), _>((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                        ))
                    })
                    .optional()
                    .map_err(self.err())?
                else {
                    continue;
                };
                if filter.accepts(&path, &lang) {
                    scored.push((score, path, start, end, id));
                }
            }
            if settled || all {
                break scored;
            }
            limit *= 4;
        };
        scored.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then_with(|| (&a.1, a.2, a.3).cmp(&(&b.1, b.2, b.3)))
        });
        scored.truncate(k);
        let mut get = self
            .conn
            .prepare_cached(&format!("SELECT {ROW_COLUMNS} FROM chunks WHERE id = ?1"))
            .map_err(self.err())?;
        scored
            .into_iter()
            .map(|(score, _, _, _, id)| {
                let row = get.query_row([id], read_row).map_err(self.err())?;
                Ok(Hit::lexical(score as f32, row))
            })
            .collect()
    }

    fn symbols(&mut self, name: &str, limit: usize, filter: &Filter) -> Result<Vec<Row>> {
        if name.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM chunks WHERE symbol = ?1 OR symbol LIKE ?2 ESCAPE '\\'"
            ))
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![name, super::like_suffix(name)], read_row)
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<Row>>>()
            .map_err(self.err())?;
        Ok(super::rank_symbols(rows, name, limit, filter))
    }

    fn setting(&mut self, key: &str) -> Result<Option<String>> {
        self.meta_value(&format!("user.{key}"))
    }

    fn set_setting(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta VALUES (?1, ?2)",
                params![format!("user.{key}"), value],
            )
            .map_err(self.err())?;
        Ok(())
    }

    fn rows(&mut self) -> Result<Vec<(Row, Vec<f32>)>> {
        let dim = self.dimension()?;
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {ROW_COLUMNS}, v.vector FROM chunks JOIN vectors v ON v.id = chunks.vector_id
                 ORDER BY chunks.path, chunks.start_byte, chunks.end_byte, chunks.id"
            ))
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                let row = read_row(r)?;
                let blob: Vec<u8> = r.get(12)?;
                Ok((row, blob))
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for r in rows {
            let (row, blob) = r.map_err(self.err())?;
            let mut v = Vec::with_capacity(dim);
            decode_into(&blob, dim, &mut v)
                .map_err(|m| Error::Corrupt(format!("{}: {m}", self.path.display())))?;
            out.push((row, v));
        }
        Ok(out)
    }
}
