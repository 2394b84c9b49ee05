//! PostgreSQL with pgvector: the same rows as the embedded store, in tables the user's database
//! already runs, searched through SQL.
//!
//! Tables (prefix `T`, `sembed_chunks` by default): `T` (one row per chunk with its `embedding`:
//! `vector(d)` up to 2,000 dimensions, `halfvec(d)` above, e.g. the fused 2560-d vector), `T_files`
//! (path → content hash) and `T_meta` (the model and chunker settings). An HNSW index with cosine
//! operators is built after the first run and kept up to date by PostgreSQL. Rows are written with
//! binary `COPY`, one transaction per batch of files.
//!
//! Several `sembed index --shard I/N` processes, on one machine or many, can fill one table: each
//! owns the files whose path hashes to its shard, and reads and removes only those.

use super::{top_k, FileUpdate, Filter, Hash, Hit, Meta, Method, Row, Shard, Store, StoredFile};
use crate::error::{Error, Result};
use pgvector::{HalfVector, Vector};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::{Client, NoTls};
use std::collections::{HashMap, HashSet};

/// Above this many dimensions pgvector's `vector` has no index; `halfvec` indexes up to 4,000.
pub const MAX_VECTOR_DIMS: usize = 2000;

/// Below this many rows searches compare every row (the planner is told not to use the index).
pub const DEFAULT_ANN_THRESHOLD: usize = super::sqlite::DEFAULT_ANN_THRESHOLD;

pub struct PgStore {
    client: Client,
    table: String,
    ann_threshold: usize,
    /// The settings, once read (every search needs the dimension).
    meta: Option<Meta>,
    exact: bool,
}

impl PgStore {
    pub fn connect(url: &str, table: &str) -> Result<Self> {
        let valid = !table.is_empty()
            && table.len() <= 40
            && table.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && table
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(Error::Invalid(format!(
                "table `{table}`: lowercase letters, digits and `_`, at most 40, not starting with a digit"
            )));
        }
        let client = Client::connect(url, NoTls).map_err(|e| Error::Postgres {
            table: table.to_string(),
            message: format!("connecting to {}: {e}", redact(url)),
        })?;
        Ok(PgStore {
            client,
            table: table.to_string(),
            ann_threshold: DEFAULT_ANN_THRESHOLD,
            meta: None,
            exact: false,
        })
    }

    pub fn with_ann_threshold(mut self, n: usize) -> Self {
        self.ann_threshold = n;
        self
    }

    fn err(&self) -> impl Fn(postgres::Error) -> Error + '_ {
        self_err(&self.table)
    }

    fn halfvec(dim: usize) -> bool {
        dim > MAX_VECTOR_DIMS
    }

    fn dim(&mut self) -> Result<usize> {
        Ok(self.meta()?.map_or(0, |m| m.dimension))
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

fn to_hash(v: Vec<u8>, table: &str) -> Result<Hash> {
    v.try_into().map_err(|_| {
        Error::Corrupt(format!(
            "PostgreSQL index `{table}`: a hash is not 32 bytes"
        ))
    })
}

fn read_row(r: &postgres::Row, table: &str) -> Result<Row> {
    Ok(Row {
        path: r.get(0),
        lang: r.get(1),
        kind: r.get(2),
        symbol: r.get(3),
        start_line: r.get::<_, i32>(4) as usize,
        end_line: r.get::<_, i32>(5) as usize,
        start_byte: r.get::<_, i64>(6) as usize,
        end_byte: r.get::<_, i64>(7) as usize,
        part: r.get::<_, i32>(8) as usize,
        parts: r.get::<_, i32>(9) as usize,
        hash: to_hash(r.get(10), table)?,
        text: r.get(11),
    })
}

const ROW_COLUMNS: &str =
    "path, lang, kind, symbol, start_line, end_line, start_byte, end_byte, part, parts, hash, text";

/// A row's lexical terms as a `tsvector` (each term a lexeme with its positions), in PostgreSQL's
/// binary format, so the terms go in exactly as [`crate::lexical`] made them (a text `tsvector` would
/// go through the server's parser and dictionaries).
#[derive(Debug)]
struct TsVector(Vec<(String, Vec<u16>)>);

impl TsVector {
    fn of(terms: &[String]) -> TsVector {
        let mut at: HashMap<&str, Vec<u16>> = HashMap::new();
        for (i, t) in terms.iter().enumerate() {
            // Positions from 1; row_terms keeps them under 16,384 and at most 256 per term.
            at.entry(t).or_default().push(i as u16 + 1);
        }
        let mut v: Vec<(String, Vec<u16>)> =
            at.into_iter().map(|(t, p)| (t.to_string(), p)).collect();
        // PostgreSQL's lexeme order: bytes, then length.
        v.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        TsVector(v)
    }
}

impl ToSql for TsVector {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        use bytes::BufMut;
        out.put_i32(self.0.len() as i32);
        for (lexeme, positions) in &self.0 {
            out.put_slice(lexeme.as_bytes());
            out.put_u8(0);
            out.put_u16(positions.len() as u16);
            for p in positions {
                out.put_u16(*p);
            }
        }
        Ok(postgres::types::IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        ty.name() == "tsvector"
    }
    postgres::types::to_sql_checked!();
}

/// A vector as a statement parameter of the embedding column's type (`halfvec` or `vector`).
fn param(v: &[f32], half: bool) -> Box<dyn ToSql + Sync> {
    if half {
        Box::new(HalfVector::from_f32_slice(v))
    } else {
        Box::new(Vector::from(v.to_vec()))
    }
}

/// A stored embedding as f32 values.
fn embedding(r: &postgres::Row, i: usize, half: bool) -> Vec<f32> {
    if half {
        r.get::<_, HalfVector>(i)
            .as_slice()
            .iter()
            .map(|x| x.to_f32())
            .collect()
    } else {
        r.get::<_, Vector>(i).to_vec()
    }
}

impl Store for PgStore {
    fn meta(&mut self) -> Result<Option<Meta>> {
        if let Some(m) = &self.meta {
            return Ok(Some(m.clone()));
        }
        let t = self.table.clone();
        let exists: bool = self
            .client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&format!("{t}_meta")],
            )
            .map_err(self.err())?
            .get(0);
        if !exists {
            return Ok(None);
        }
        let row = self
            .client
            .query_opt(
                &format!("SELECT value FROM {t}_meta WHERE key = 'settings'"),
                &[],
            )
            .map_err(self.err())?;
        match row {
            None => Ok(None),
            Some(r) => serde_json::from_str(r.get::<_, &str>(0))
                .map(Some)
                .map_err(|e| {
                    Error::Corrupt(format!("PostgreSQL index `{t}`: settings record: {e}"))
                }),
        }
    }

    fn init(&mut self, meta: &Meta, replace: bool) -> Result<()> {
        self.meta = None;
        let t = self.table.clone();
        let vtype = if Self::halfvec(meta.dimension) {
            format!("halfvec({})", meta.dimension)
        } else {
            format!("vector({})", meta.dimension)
        };
        let json = serde_json::to_string(meta).expect("serialisable");
        let err = self_err(&t);
        let mut tx = self.client.transaction().map_err(&err)?;
        // One creator at a time (several shards may start together).
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&t])
            .map_err(&err)?;
        tx.batch_execute(&format!(
            "CREATE EXTENSION IF NOT EXISTS vector;
             CREATE TABLE IF NOT EXISTS {t}_meta (key text PRIMARY KEY, value text NOT NULL);
             CREATE TABLE IF NOT EXISTS {t}_files (path text PRIMARY KEY, hash bytea NOT NULL);
             CREATE TABLE IF NOT EXISTS {t} (
                 id bigserial PRIMARY KEY,
                 path text NOT NULL, lang text NOT NULL, kind text NOT NULL, symbol text,
                 start_line integer NOT NULL, end_line integer NOT NULL,
                 start_byte bigint NOT NULL, end_byte bigint NOT NULL,
                 part integer NOT NULL, parts integer NOT NULL,
                 hash bytea NOT NULL, text text NOT NULL,
                 embedding {vtype} NOT NULL);
             CREATE INDEX IF NOT EXISTS {t}_path ON {t} (path);
             CREATE INDEX IF NOT EXISTS {t}_hash ON {t} (hash);"
        ))
        .map_err(&err)?;
        ensure_lexical(&mut tx, &t)?;
        let current: Option<String> = tx
            .query_opt(
                &format!("SELECT value FROM {t}_meta WHERE key = 'settings'"),
                &[],
            )
            .map_err(&err)?
            .map(|r| r.get(0));
        if replace {
            tx.batch_execute(&format!(
                "DROP TABLE {t}; DROP TABLE {t}_files; DELETE FROM {t}_meta;"
            ))
            .map_err(&err)?;
            tx.commit().map_err(&err)?;
            return self.init(meta, false);
        }
        match current {
            Some(c) if c != json => {
                let stored: Option<Meta> = serde_json::from_str(&c).ok();
                if stored.as_ref().map(|m| (&m.model, m.dimension))
                    != Some((&meta.model, meta.dimension))
                {
                    return Err(Error::Mismatch(format!(
                        "PostgreSQL index `{t}` holds vectors of {}; refusing to add vectors of {} (use --replace to start again)",
                        stored.map_or("an unknown model".into(), |m| format!("{} ({}-d)", m.model, m.dimension)),
                        meta.model
                    )));
                }
                tx.execute(
                    &format!("UPDATE {t}_meta SET value = $1 WHERE key = 'settings'"),
                    &[&json],
                )
                .map_err(&err)?;
            }
            Some(_) => {}
            None => {
                tx.execute(
                    &format!("INSERT INTO {t}_meta VALUES ('settings', $1)"),
                    &[&json],
                )
                .map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)?;
        Ok(())
    }

    fn files(&mut self, shard: Option<Shard>) -> Result<HashMap<String, StoredFile>> {
        let t = self.table.clone();
        let mut out = HashMap::new();
        for r in self
            .client
            .query(&format!("SELECT path, hash FROM {t}_files"), &[])
            .map_err(self.err())?
        {
            let path: String = r.get(0);
            if shard.is_none_or(|s| s.holds(&path)) {
                out.insert(
                    path,
                    StoredFile {
                        file_hash: to_hash(r.get(1), &t)?,
                        chunks: Vec::new(),
                    },
                );
            }
        }
        for r in self
            .client
            .query(
                &format!("SELECT path, hash FROM {t} ORDER BY path, start_byte, id"),
                &[],
            )
            .map_err(self.err())?
        {
            let path: String = r.get(0);
            if let Some(f) = out.get_mut(&path) {
                f.chunks.push(to_hash(r.get(1), &t)?);
            }
        }
        Ok(out)
    }

    fn known(&mut self, hashes: &[Hash]) -> Result<HashSet<Hash>> {
        let t = self.table.clone();
        let mut out = HashSet::new();
        for batch in hashes.chunks(10_000) {
            let list: Vec<&[u8]> = batch.iter().map(|h| &h[..]).collect();
            for r in self
                .client
                .query(
                    &format!("SELECT DISTINCT hash FROM {t} WHERE hash = ANY($1)"),
                    &[&list],
                )
                .map_err(self.err())?
            {
                out.insert(to_hash(r.get(0), &t)?);
            }
        }
        Ok(out)
    }

    fn commit(&mut self, files: &[FileUpdate], vectors: &[(Hash, Vec<f32>)]) -> Result<()> {
        let dim = self.dim()?;
        let half = Self::halfvec(dim);
        let t = self.table.clone();
        let err = self_err(&t);
        let mut tx = self.client.transaction().map_err(&err)?;
        // A table from before the lexical columns gains them before its rows are written.
        ensure_lexical(&mut tx, &t)?;
        // Vectors of reused chunks, read before the old rows (which may hold them) go.
        let mut have: HashMap<Hash, Vec<f32>> = vectors.iter().cloned().collect();
        let missing: Vec<&[u8]> = files
            .iter()
            .flat_map(|f| &f.rows)
            .filter(|r| !have.contains_key(&r.hash))
            .map(|r| &r.hash[..])
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            for r in tx
                .query(
                    &format!(
                        "SELECT DISTINCT ON (hash) hash, embedding FROM {t} WHERE hash = ANY($1)"
                    ),
                    &[&missing],
                )
                .map_err(&err)?
            {
                have.insert(to_hash(r.get(0), &t)?, embedding(&r, 1, half));
            }
        }
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        let (mut d_rows, mut d_terms) = delete_rows(&mut tx, &t, &paths)?;
        for f in files {
            tx.execute(
                &format!(
                    "INSERT INTO {t}_files VALUES ($1, $2) ON CONFLICT (path) DO UPDATE SET hash = $2"
                ),
                &[&f.path, &&f.file_hash[..]],
            )
            .map_err(&err)?;
        }
        let (vtype, tstype) = {
            let st = tx
                .prepare(&format!("SELECT embedding, tsv FROM {t} LIMIT 0"))
                .map_err(&err)?;
            (
                st.columns()[0].type_().clone(),
                st.columns()[1].type_().clone(),
            )
        };
        let types = [
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::INT4,
            Type::INT4,
            Type::INT8,
            Type::INT8,
            Type::INT4,
            Type::INT4,
            Type::BYTEA,
            Type::TEXT,
            vtype,
            tstype,
            Type::INT4,
        ];
        let sink = tx
            .copy_in(&format!(
                "COPY {t} ({ROW_COLUMNS}, embedding, tsv, n_terms) FROM STDIN (FORMAT binary)"
            ))
            .map_err(&err)?;
        let mut writer = BinaryCopyInWriter::new(sink, &types);
        for f in files {
            for r in &f.rows {
                let v = have.get(&r.hash).ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}:{}: no vector for chunk {} (another process removed it meanwhile; run again)",
                        r.path,
                        r.start_line,
                        super::hex(&r.hash)
                    ))
                })?;
                if v.len() != dim {
                    return Err(Error::Invalid(format!(
                        "a vector of {} values for an index of dimension {dim}",
                        v.len()
                    )));
                }
                let (sl, el, sb, eb, p, n) = (
                    r.start_line as i32,
                    r.end_line as i32,
                    r.start_byte as i64,
                    r.end_byte as i64,
                    r.part as i32,
                    r.parts as i32,
                );
                let hash = &r.hash[..];
                let emb = param(v, half);
                let terms = crate::lexical::of_row(r);
                let n_terms = terms.len() as i32;
                let tsv = TsVector::of(&terms);
                (d_rows, d_terms) = (d_rows + 1, d_terms + n_terms as i64);
                writer
                    .write(&[
                        &r.path,
                        &r.lang,
                        &r.kind,
                        &r.symbol,
                        &sl,
                        &el,
                        &sb,
                        &eb,
                        &p,
                        &n,
                        &hash,
                        &r.text,
                        emb.as_ref(),
                        &tsv,
                        &n_terms,
                    ])
                    .map_err(&err)?;
            }
        }
        writer.finish().map_err(&err)?;
        add_to_stats(&mut tx, &t, d_rows, d_terms)?;
        tx.commit().map_err(&err)?;
        Ok(())
    }

    fn remove(&mut self, paths: &[String]) -> Result<()> {
        if paths.is_empty() {
            return Ok(());
        }
        let t = self.table.clone();
        let mut tx = self.client.transaction().map_err(self_err(&t))?;
        ensure_lexical(&mut tx, &t)?;
        let (d_rows, d_terms) = delete_rows(&mut tx, &t, paths)?;
        add_to_stats(&mut tx, &t, d_rows, d_terms)?;
        tx.execute(
            &format!("DELETE FROM {t}_files WHERE path = ANY($1)"),
            &[&paths],
        )
        .map_err(self_err(&t))?;
        tx.commit().map_err(self_err(&t))?;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let dim = self.dim()?;
        if dim == 0 {
            return Ok(());
        }
        let ops = if Self::halfvec(dim) {
            "halfvec_cosine_ops"
        } else {
            "vector_cosine_ops"
        };
        let t = self.table.clone();
        // One index builder at a time (shards finish together), and ANALYZE in a transaction of its
        // own: holding the index's ShareLock while waiting for ANALYZE's lock deadlocks two finishers.
        let mut tx = self.client.transaction().map_err(self_err(&t))?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&t])
            .map_err(self_err(&t))?;
        tx.batch_execute(&format!(
            // The embedded store's graph parameters (M 16, 128 candidates while building).
            "CREATE INDEX IF NOT EXISTS {t}_hnsw ON {t} USING hnsw (embedding {ops}) \
             WITH (m = 16, ef_construction = 128)"
        ))
        .map_err(self_err(&t))?;
        tx.commit().map_err(self_err(&t))?;
        self.client
            .batch_execute(&format!("ANALYZE {t}"))
            .map_err(self.err())
    }

    fn set_exact(&mut self, exact: bool) {
        self.exact = exact;
    }

    fn count(&mut self) -> Result<usize> {
        let t = self.table.clone();
        if self.meta()?.is_none() {
            return Ok(0);
        }
        let n: i64 = self
            .client
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .map_err(self.err())?
            .get(0);
        Ok(n as usize)
    }

    fn search(&mut self, query: &[f32], k: usize, filter: &Filter) -> Result<(Vec<Hit>, Method)> {
        let dim = self.dim()?;
        if dim == 0 || k == 0 {
            return Ok((Vec::new(), Method::Exact));
        }
        if query.len() != dim {
            return Err(Error::Invalid(format!(
                "a query of {} values for an index of dimension {dim}",
                query.len()
            )));
        }
        let half = Self::halfvec(dim);
        let t = self.table.clone();
        // The planner's row estimate (exact after the ANALYZE of `finish`), not a count(*) scan per
        // query; a table never analysed counts.
        let estimate: f32 = self
            .client
            .query_one(
                "SELECT reltuples FROM pg_class WHERE oid = $1::text::regclass",
                &[&t],
            )
            .map_err(self.err())?
            .get(0);
        let rows = if estimate < 0.0 {
            self.count()?
        } else {
            estimate as usize
        };
        let exact = self.exact || rows < self.ann_threshold;
        let mut tx = self.client.transaction().map_err(self_err(&t))?;
        // Exact below the threshold (as the embedded store); above it the HNSW index, scanning on
        // until the filters are met (pgvector 0.8 iterative scans).
        if exact {
            tx.batch_execute("SET LOCAL enable_indexscan = off")
                .map_err(self_err(&t))?;
        } else {
            // The same search width as the embedded store's graph.
            tx.batch_execute(&format!(
                "SET LOCAL hnsw.ef_search = {}; SET LOCAL hnsw.iterative_scan = relaxed_order;",
                (2 * k).clamp(super::sqlite::EF_SEARCH, 1000)
            ))
            .map_err(self_err(&t))?;
        }
        let lang = filter.lang.clone();
        let like = filter.path.as_deref().map(crate::walk::glob_to_like);
        let q = param(query, half);
        let q = q.as_ref();
        let rows = tx
            .query(
                &format!(
                    "SELECT {ROW_COLUMNS}, embedding FROM {t}
                     WHERE ($2::text IS NULL OR lang = $2) AND ($3::text IS NULL OR path LIKE $3)
                     ORDER BY embedding <=> $1 LIMIT $4"
                ),
                &[q, &lang, &like, &(k as i64)],
            )
            .map_err(self_err(&t))?;
        tx.commit().map_err(self_err(&t))?;
        // Scores as the embedded store computes them (f32 dot products of unit vectors), and the same
        // order for ties.
        let mut scored = Vec::new();
        let mut by_index = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let v = embedding(r, 12, half);
            scored.push((super::dot(query, &v), i));
            by_index.push(read_row(r, &t)?);
        }
        let best = top_k(scored.into_iter(), k);
        let hits = best
            .into_iter()
            .map(|(score, i)| Hit::dense(score, by_index[i].clone()))
            .collect();
        Ok((hits, if exact { Method::Exact } else { Method::Ann }))
    }

    fn lexical(&mut self, terms: &[String], k: usize, filter: &Filter) -> Result<Vec<Hit>> {
        if terms.is_empty() || k == 0 || self.meta()?.is_none() {
            return Ok(Vec::new());
        }
        let t = self.table.clone();
        let err = self_err(&t);
        let mut tx = self.client.transaction().map_err(&err)?;
        // An index from before the lexical columns gets them (from the stored texts) on first use.
        ensure_lexical(&mut tx, &t)?;
        // The rows and their terms, kept by every write (no count over the table per search).
        let (n_rows, n_tokens) = read_stats(&mut tx, &t, false)?;
        // Terms are letters and digits only, quoted as lexemes of a tsquery.
        let tsquery = terms
            .iter()
            .map(|x| format!("'{x}'"))
            .collect::<Vec<_>>()
            .join(" | ");
        // Every row holding a term (as FTS5 reads every match): its term counts, length and place.
        let found = tx
            .query(
                &format!(
                    "SELECT c.id, c.path, c.lang, c.start_byte, c.n_terms, u.lexeme,
                            cardinality(u.positions)::int, c.end_byte
                     FROM {t} c CROSS JOIN LATERAL unnest(c.tsv) u
                     WHERE c.tsv @@ $1::text::tsquery AND u.lexeme = ANY($2)"
                ),
                &[&tsquery, &terms],
            )
            .map_err(&err)?;
        let slot: HashMap<&str, usize> = terms
            .iter()
            .enumerate()
            .map(|(i, x)| (x.as_str(), i))
            .collect();
        struct Cand {
            path: String,
            lang: String,
            start: i64,
            end: i64,
            len: i32,
            tf: Vec<f64>,
        }
        let mut cands: HashMap<i64, Cand> = HashMap::new();
        let mut df = vec![0f64; terms.len()];
        for r in &found {
            let lexeme: &str = r.get(5);
            let Some(&i) = slot.get(lexeme) else { continue };
            let c = cands.entry(r.get(0)).or_insert_with(|| Cand {
                path: r.get(1),
                lang: r.get(2),
                start: r.get(3),
                end: r.get(7),
                len: r.get(4),
                tf: vec![0.0; terms.len()],
            });
            c.tf[i] = r.get::<_, i32>(6) as f64;
            df[i] += 1.0;
        }
        let (n, avgdl) = (n_rows as f64, n_tokens as f64 / (n_rows as f64).max(1.0));
        let mut scored: Vec<(f64, &Cand, i64)> = cands
            .iter()
            .filter(|(_, c)| filter.accepts(&c.path, &c.lang))
            .map(|(id, c)| {
                (
                    crate::lexical::bm25(&c.tf, &df, c.len as f64, n, avgdl),
                    c,
                    *id,
                )
            })
            .collect();
        scored.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then_with(|| (&a.1.path, a.1.start, a.1.end).cmp(&(&b.1.path, b.1.start, b.1.end)))
        });
        scored.truncate(k);
        let ids: Vec<i64> = scored.iter().map(|s| s.2).collect();
        let rows = tx
            .query(
                &format!("SELECT {ROW_COLUMNS}, id FROM {t} WHERE id = ANY($1)"),
                &[&ids],
            )
            .map_err(&err)?;
        tx.commit().map_err(&err)?;
        let mut by_id: HashMap<i64, Row> = HashMap::new();
        for r in &rows {
            by_id.insert(r.get(12), read_row(r, &t)?);
        }
        Ok(scored
            .into_iter()
            .filter_map(|(s, _, id)| by_id.remove(&id).map(|row| Hit::lexical(s as f32, row)))
            .collect())
    }

    fn symbols(&mut self, name: &str, limit: usize, filter: &Filter) -> Result<Vec<Row>> {
        if name.is_empty() || limit == 0 || self.meta()?.is_none() {
            return Ok(Vec::new());
        }
        let t = self.table.clone();
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {ROW_COLUMNS} FROM {t} WHERE symbol = $1 OR symbol LIKE $2 ESCAPE '\\'"
                ),
                &[&name, &super::like_suffix(name)],
            )
            .map_err(self.err())?;
        let rows = rows
            .iter()
            .map(|r| read_row(r, &t))
            .collect::<Result<Vec<Row>>>()?;
        Ok(super::rank_symbols(rows, name, limit, filter))
    }

    fn setting(&mut self, key: &str) -> Result<Option<String>> {
        if self.meta()?.is_none() {
            return Ok(None);
        }
        let t = self.table.clone();
        Ok(self
            .client
            .query_opt(
                &format!("SELECT value FROM {t}_meta WHERE key = $1"),
                &[&format!("user.{key}")],
            )
            .map_err(self.err())?
            .map(|r| r.get(0)))
    }

    fn set_setting(&mut self, key: &str, value: &str) -> Result<()> {
        let t = self.table.clone();
        self.client
            .execute(
                &format!(
                    "INSERT INTO {t}_meta VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2"
                ),
                &[&format!("user.{key}"), &value],
            )
            .map_err(self.err())?;
        Ok(())
    }

    fn rows(&mut self) -> Result<Vec<(Row, Vec<f32>)>> {
        let dim = self.dim()?;
        let half = Self::halfvec(dim);
        let t = self.table.clone();
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {ROW_COLUMNS}, embedding FROM {t} ORDER BY path, start_byte, end_byte, id"
                ),
                &[],
            )
            .map_err(self.err())?;
        rows.iter()
            .map(|r| Ok((read_row(r, &t)?, embedding(r, 12, half))))
            .collect()
    }
}

/// The lexical columns (`tsv`: the terms of [`crate::lexical`] as a `tsvector` with a GIN index;
/// `n_terms`: how many), added to a table from before them and made again from the stored texts when
/// the term rules changed. In the caller's transaction; one table migrates at a time.
fn ensure_lexical(tx: &mut postgres::Transaction, t: &str) -> Result<()> {
    let err = self_err(t);
    // The term rules' version, and that the table's row and term counts are kept in `T_meta`
    // (`lexical_stats`, see [`add_to_stats`]); a table at the version without the counts only
    // gains them.
    let terms_version = crate::lexical::VERSION.to_string();
    let want = format!("{terms_version} stats");
    let current = |tx: &mut postgres::Transaction| -> Result<Option<String>> {
        Ok(tx
            .query_opt(
                &format!("SELECT value FROM {t}_meta WHERE key = 'lexical'"),
                &[],
            )
            .map_err(self_err(t))?
            .map(|r| r.get(0)))
    };
    if current(tx)?.as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1 || '_lexical'))",
        &[&t],
    )
    .map_err(&err)?;
    let now = current(tx)?;
    if now.as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    if now.as_deref() != Some(terms_version.as_str()) {
        make_terms(tx, t)?;
    }
    let stats = tx
        .query_one(
            &format!("SELECT count(*), coalesce(sum(n_terms), 0)::bigint FROM {t}"),
            &[],
        )
        .map_err(&err)?;
    let (rows, terms): (i64, i64) = (stats.get(0), stats.get(1));
    tx.execute(
        &format!(
            "INSERT INTO {t}_meta VALUES ('lexical_stats', $1) ON CONFLICT (key) DO UPDATE SET value = $1"
        ),
        &[&format!("{rows} {terms}")],
    )
    .map_err(&err)?;
    tx.execute(
        &format!(
            "INSERT INTO {t}_meta VALUES ('lexical', $1) ON CONFLICT (key) DO UPDATE SET value = $1"
        ),
        &[&want],
    )
    .map_err(&err)?;
    Ok(())
}

/// The lexical columns of every row made (again) from its stored path, symbol and text.
fn make_terms(tx: &mut postgres::Transaction, t: &str) -> Result<()> {
    let err = self_err(t);
    tx.batch_execute(&format!(
        "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS tsv tsvector,
                        ADD COLUMN IF NOT EXISTS n_terms integer;
         CREATE INDEX IF NOT EXISTS {t}_tsv ON {t} USING gin (tsv);"
    ))
    .map_err(&err)?;
    let rows = tx
        .query(&format!("SELECT id, path, symbol, text FROM {t}"), &[])
        .map_err(&err)?;
    let update = tx
        .prepare(&format!(
            "UPDATE {t} SET tsv = $2, n_terms = $3 WHERE id = $1"
        ))
        .map_err(&err)?;
    for r in &rows {
        let terms = crate::lexical::row_terms(r.get(1), r.get(2), r.get(3));
        let id: i64 = r.get(0);
        tx.execute(
            &update,
            &[&id, &TsVector::of(&terms), &(terms.len() as i32)],
        )
        .map_err(&err)?;
    }
    Ok(())
}

/// Delete the rows of `paths`; how many rows, and how many terms they held, as negative counts.
fn delete_rows<P: postgres::types::ToSql + Sync>(
    tx: &mut postgres::Transaction,
    t: &str,
    paths: &[P],
) -> Result<(i64, i64)> {
    let gone = tx
        .query_one(
            &format!(
                "WITH d AS (DELETE FROM {t} WHERE path = ANY($1) RETURNING n_terms)
                 SELECT count(*), coalesce(sum(n_terms), 0)::bigint FROM d"
            ),
            &[&paths],
        )
        .map_err(self_err(t))?;
    Ok((-gone.get::<_, i64>(0), -gone.get::<_, i64>(1)))
}

/// Add to the table's row and term counts (BM25's N and average length), in the writer's
/// transaction: the row lock makes concurrent writers (shards) add one after another.
fn add_to_stats(tx: &mut postgres::Transaction, t: &str, rows: i64, terms: i64) -> Result<()> {
    if rows == 0 && terms == 0 {
        return Ok(());
    }
    let (r, n) = read_stats(tx, t, true)?;
    tx.execute(
        &format!("UPDATE {t}_meta SET value = $1 WHERE key = 'lexical_stats'"),
        &[&format!("{} {}", r + rows, n + terms)],
    )
    .map_err(self_err(t))?;
    Ok(())
}

fn parse_stats(t: &str, value: Option<String>) -> Result<(i64, i64)> {
    let bad = || Error::Invalid(format!("PostgreSQL index `{t}`: unreadable lexical counts"));
    let v = value.ok_or_else(bad)?;
    let mut it = v.split(' ').map(str::parse::<i64>);
    match (it.next(), it.next()) {
        (Some(Ok(r)), Some(Ok(n))) => Ok((r, n)),
        _ => Err(bad()),
    }
}

/// The table's row and term counts ([`add_to_stats`]), its row locked until the transaction ends
/// when `lock` (a writer's read-modify-write).
fn read_stats(tx: &mut postgres::Transaction, t: &str, lock: bool) -> Result<(i64, i64)> {
    let lock = if lock { " FOR UPDATE" } else { "" };
    let v = tx
        .query_opt(
            &format!("SELECT value FROM {t}_meta WHERE key = 'lexical_stats'{lock}"),
            &[],
        )
        .map_err(self_err(t))?
        .map(|r| r.get(0));
    parse_stats(t, v)
}

/// A PostgreSQL error as the index reports it: the table, and the server's SQLSTATE and message.
fn self_err(table: &str) -> impl Fn(postgres::Error) -> Error + '_ {
    move |e| Error::Postgres {
        table: table.to_string(),
        message: match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        },
    }
}
