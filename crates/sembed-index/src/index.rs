//! Indexing a tree: walk it, cut changed files into chunks, embed the chunks no stored vector has,
//! and write each batch of files in one transaction.
//!
//! A file whose content hash is the stored one is not read further. A changed file is cut again; its
//! chunks whose text hash already has a vector (anywhere in the index: moved code, a renamed file,
//! duplicated code) reuse it, and only new texts are embedded. Counts are of rows: `unchanged` (the
//! same chunk text at the same path), `added` (of which `embedded` needed a new vector) and `removed`.
//! Files are committed in batches, so an interrupted run keeps what it finished and the next run
//! continues from there.

use crate::chunk::{chunk_file, lang_name, Budget};
use crate::error::{Error, Result};
use crate::store::{hash_text, FileUpdate, Hash, Meta, Row, Shard, Store};
use crate::walk::{unindexable, walk, FileEntry};
use sembed::embed::{Embed, EmbedOptions, InputRole};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Version of the chunking rules: a change re-cuts every file (vectors are still reused by text).
/// 2: Python definitions under `if`/`try`/`with` are definitions. 3: tokens counted whole (a count
/// stopped at the model's maximum, so nothing was split at the default budget); definitions are
/// split only with an explicit `chunk_tokens`. 4: an Elixir function's consecutive clauses are one
/// chunk. 5: a module's header is a chunk even when it is only its first line.
const CHUNKER_VERSION: u32 = 5;

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    pub roots: Vec<PathBuf>,
    /// Stored paths are relative to this folder.
    pub base: PathBuf,
    /// Tokens per chunk; default: the model's maximum, at most 512. Given, definitions longer than
    /// it are split into windows too; by default a definition is one chunk however long (the model
    /// reads its head, the lexical index all of it). On the development sets of
    /// [`crate::lexical::NAME_WEIGHT`] (MiniLM, 256 tokens), hybrid NDCG@10 0.6834 / 0.6324
    /// (Python / Elixir) whole, 0.6516 / 0.6189 split, and 0.6671 / 0.6345 split with a search
    /// keeping one hit per definition (offline).
    pub chunk_tokens: Option<usize>,
    pub window_lines: usize,
    pub overlap_lines: usize,
    pub max_file_bytes: u64,
    pub batch_size: usize,
    /// Drop an index of another model instead of refusing.
    pub replace: bool,
    pub shard: Option<Shard>,
    /// The model references to record (what `-m` said).
    pub model_refs: Vec<String>,
    /// Embed each chunk with a first line naming its path and symbol ([`embedded_text`]).
    pub header: bool,
    /// Only these files and the files under these folders (absolute paths, as the walk gives them
    /// under canonical roots) can have changed since the last run: a stored file not among them is
    /// not read again. A watcher's hint;
    /// new files and deleted ones are still found by the walk. `None`: read every file.
    pub changed: Option<HashSet<PathBuf>>,
}

/// What an index was made from and how, recorded in it (the `source` setting) so that a refresh, a
/// watcher, `sembed index --watch`, `sembed serve --index … --watch` or `sembed mcp` index the same tree the same way.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Source {
    pub roots: Vec<PathBuf>,
    pub base: PathBuf,
    pub chunk_tokens: Option<usize>,
    pub window_lines: usize,
    pub overlap_lines: usize,
    pub max_file_bytes: u64,
    pub batch_size: usize,
    pub shard: Option<(usize, usize)>,
    pub model_refs: Vec<String>,
    pub header: bool,
}

impl Source {
    /// The options that index this source again.
    pub fn options(&self) -> IndexOptions {
        IndexOptions {
            roots: self.roots.clone(),
            base: self.base.clone(),
            chunk_tokens: self.chunk_tokens,
            window_lines: self.window_lines,
            overlap_lines: self.overlap_lines,
            max_file_bytes: self.max_file_bytes,
            batch_size: self.batch_size,
            replace: false,
            shard: self.shard.map(|(index, count)| Shard { index, count }),
            model_refs: self.model_refs.clone(),
            header: self.header,
            changed: None,
        }
    }

    /// What `store` records as its source, if it does.
    pub fn of(store: &mut dyn Store) -> Result<Option<Source>> {
        match store.setting("source")? {
            None => Ok(None),
            Some(json) => serde_json::from_str(&json)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("the index's source record: {e}"))),
        }
    }
}

impl IndexOptions {
    pub fn new(roots: Vec<PathBuf>, base: PathBuf) -> Self {
        IndexOptions {
            roots,
            base,
            chunk_tokens: None,
            window_lines: 40,
            overlap_lines: 5,
            max_file_bytes: crate::walk::DEFAULT_MAX_FILE_BYTES,
            batch_size: 32,
            replace: false,
            shard: None,
            model_refs: Vec::new(),
            header: true,
            changed: None,
        }
    }

    /// The source these options index, with absolute roots and base.
    pub fn source(&self) -> Result<Source> {
        let abs = |p: &PathBuf| {
            p.canonicalize().map_err(|e| Error::Io {
                path: p.display().to_string(),
                source: e,
            })
        };
        Ok(Source {
            roots: self.roots.iter().map(abs).collect::<Result<_>>()?,
            base: abs(&self.base)?,
            chunk_tokens: self.chunk_tokens,
            window_lines: self.window_lines,
            overlap_lines: self.overlap_lines,
            max_file_bytes: self.max_file_bytes,
            batch_size: self.batch_size,
            shard: self.shard.map(|s| (s.index, s.count)),
            model_refs: self.model_refs.clone(),
            header: self.header,
        })
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub files: usize,
    pub files_changed: usize,
    pub files_removed: usize,
    pub chunks: usize,
    pub unchanged: usize,
    pub added: usize,
    pub embedded: usize,
    pub removed: usize,
    /// Chunks cut into several pieces to fit the token budget.
    pub split: usize,
    pub skipped: BTreeMap<String, usize>,
    /// Stopped early (Ctrl-C): what is written is kept; run again to continue.
    pub interrupted: bool,
}

/// Progress callbacks: the number of chunks to embed once known, then each embedded batch.
pub trait Progress {
    fn start(&mut self, _to_embed: usize) {}
    fn embedded(&mut self, _n: usize) {}
}

impl Progress for () {}

/// The model's identity as an index records it: its name without the folder it was loaded from (the
/// same model referred to as `./m`, `/abs/m` or `m/` is the same), the engine and precision that made
/// the vectors, and their dimension.
pub fn model_identity(model: &dyn Embed) -> String {
    let name = model.name().trim_end_matches('/');
    let name = name.rsplit('/').next().unwrap_or(name);
    format!("{name} [{}] {}-d", model.engine(), model.dimension())
}

/// The engine part of a [`model_identity`] (`fast-int8`, `fast-bf16`, `candle`, `+`-joined for a
/// fusion): what the vectors were made with, whatever the model's name says.
pub fn identity_engine(identity: &str) -> &str {
    identity
        .rsplit_once(" [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map_or("", |(engine, _)| engine)
}

/// The settings an index of `model` is created with.
pub fn meta_for(model: &dyn Embed, opts: &IndexOptions) -> Meta {
    let tokens = chunk_tokens(model, opts);
    let (lexical_weight, name_weight) = model_weights(&opts.model_refs);
    Meta {
        model: model_identity(model),
        model_refs: opts.model_refs.clone(),
        dimension: model.dimension(),
        chunker: format!(
            "v{CHUNKER_VERSION} tokens={tokens} window={} overlap={}{}{}",
            opts.window_lines,
            opts.overlap_lines,
            if opts.header { " header" } else { "" },
            if opts.chunk_tokens.is_some() {
                " split"
            } else {
                ""
            }
        ),
        lexical_weight,
        name_weight,
    }
}

/// The file in a model folder made by `sembed adapt` that says how it was fitted and how its
/// rankings fuse.
pub const ADAPT_FILE: &str = "adapt.json";

/// The hybrid ranking's weights a model carries: `lexical_weight` and `name_weight` in the
/// `adapt.json` of a single model folder (`sembed adapt` writes them); `None` for other models (the
/// defaults; how a missing one is read: [`crate::store::Meta::weights`]).
pub fn model_weights(model_refs: &[String]) -> (Option<f64>, Option<f64>) {
    let [one] = model_refs else {
        return (None, None);
    };
    let Ok(text) = std::fs::read_to_string(Path::new(one).join(ADAPT_FILE)) else {
        return (None, None);
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return (None, None);
    };
    let weight = |key: &str| v[key].as_f64().filter(|w| w.is_finite() && *w >= 0.0);
    (weight("lexical_weight"), weight("name_weight"))
}

/// Most tokens in one chunk: `--chunk-tokens` (default 512), never above the model's maximum.
pub fn chunk_tokens(model: &dyn Embed, opts: &IndexOptions) -> usize {
    opts.chunk_tokens
        .unwrap_or(512)
        .min(model.max_length())
        .max(16)
}

/// Local folders as absolute paths, so the index records a reference that loads from anywhere
/// (`NAME=REF` parts of a fusion keep their name; `hf:` references stay as given).
pub fn absolute_refs(models: &[String]) -> Vec<String> {
    models
        .iter()
        .map(|m| {
            let (name, r) = match m.split_once('=') {
                Some((n, r)) if !n.is_empty() && !n.contains('/') && !n.starts_with("hf:") => {
                    (Some(n), r)
                }
                _ => (None, m.as_str()),
            };
            let r = match Path::new(r).canonicalize() {
                Ok(p) if !r.starts_with("hf:") => p.display().to_string(),
                _ => r.to_string(),
            };
            match name {
                Some(n) => format!("{n}={r}"),
                None => r,
            }
        })
        .collect()
}

/// Check an index's settings against a model: the same model, or an error that says which.
pub fn check_model(stored: &Meta, model: &dyn Embed, target: &str) -> Result<()> {
    let id = model_identity(model);
    if stored.model != id || stored.dimension != model.dimension() {
        return Err(Error::Mismatch(format!(
            "{target} holds vectors of {} ({}-d); this run uses {id}. Use the same model (-m), or \
             --replace to drop the index and start again",
            stored.model, stored.dimension
        )));
    }
    Ok(())
}

/// Index `opts.roots` into `store` with `model`.
pub fn run(
    store: &mut dyn Store,
    target: &str,
    model: &dyn Embed,
    opts: &IndexOptions,
    progress: &mut dyn Progress,
    stop: &AtomicBool,
) -> Result<Report> {
    let meta = meta_for(model, opts);
    match store.meta()? {
        Some(stored) if !opts.replace => {
            check_model(&stored, model, target)?;
            if stored != meta {
                store.init(&meta, false)?;
            }
        }
        _ => store.init(&meta, opts.replace)?,
    }
    let source = serde_json::to_string(&opts.source()?).expect("serialisable");
    if store.setting("source")?.as_deref() != Some(source.as_str()) {
        store.set_setting("source", &source)?;
    }
    let max_tokens = chunk_tokens(model, opts);

    let doc_opts = EmbedOptions {
        role: Some(InputRole::Document),
        batch_size: opts.batch_size,
        ..EmbedOptions::default()
    };
    // Counted whole: with truncation on, a text of any length counts as at most the model's
    // maximum, and a definition longer than the model reads was never split. Over the maximum,
    // counting is an error: more than any budget.
    let count_opts = EmbedOptions {
        truncate: false,
        ..doc_opts.clone()
    };
    let count = |text: &str| -> usize {
        model
            .count_tokens(&[text.to_string()], &count_opts)
            .map(|c| c[0])
            .unwrap_or(usize::MAX)
    };
    let budget = Budget {
        max_tokens,
        count: &count,
        window_lines: opts.window_lines,
        overlap_lines: opts.overlap_lines,
        split_definitions: opts.chunk_tokens.is_some(),
    };

    let found = walk(&opts.roots, &opts.base, opts.max_file_bytes).map_err(|e| Error::Io {
        path: opts.base.display().to_string(),
        source: e,
    })?;
    let mut report = Report {
        skipped: found
            .skipped
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        ..Report::default()
    };
    let files: Vec<FileEntry> = found
        .files
        .into_iter()
        .filter(|f| opts.shard.is_none_or(|s| s.holds(&f.rel)))
        .collect();
    let stored = store.files(opts.shard)?;

    // Cut every changed file.
    let mut seen: HashSet<String> = HashSet::new();
    let mut updates: Vec<FileUpdate> = Vec::new();
    for f in &files {
        if let (Some(changed), Some(old)) = (&opts.changed, stored.get(&f.rel)) {
            // A hint names files or folders (a folder moved or swapped as a whole).
            if !f.abs.ancestors().any(|a| changed.contains(a)) {
                seen.insert(f.rel.clone());
                report.files += 1;
                report.chunks += old.chunks.len();
                report.unchanged += old.chunks.len();
                continue;
            }
        }
        let bytes = match std::fs::read(&f.abs) {
            Ok(b) => b,
            Err(_) => {
                *report.skipped.entry("unreadable".into()).or_default() += 1;
                continue;
            }
        };
        if let Some(why) = unindexable(&bytes) {
            *report.skipped.entry(why.into()).or_default() += 1;
            continue;
        }
        seen.insert(f.rel.clone());
        report.files += 1;
        let file_hash = file_hash(&bytes, &meta.chunker);
        let old = stored.get(&f.rel);
        if old.is_some_and(|o| o.file_hash == file_hash) {
            let n = old.map_or(0, |o| o.chunks.len());
            report.chunks += n;
            report.unchanged += n;
            continue;
        }
        let src = std::str::from_utf8(&bytes).expect("checked UTF-8");
        let lang = lang_name(&f.rel);
        let rows: Vec<Row> = chunk_file(&f.rel, src, &budget)
            .into_iter()
            .map(|c| Row {
                path: f.rel.clone(),
                lang: lang.to_string(),
                kind: c.kind.to_string(),
                hash: hash_text(&embedded_text(
                    &f.rel,
                    c.symbol.as_deref(),
                    &c.text,
                    opts.header,
                )),
                symbol: c.symbol,
                start_line: c.start_line,
                end_line: c.end_line,
                start_byte: c.start_byte,
                end_byte: c.end_byte,
                part: c.part,
                parts: c.parts,
                text: c.text,
            })
            .collect();
        // Row counts against the stored chunks of this path (as multisets of texts).
        let mut before: HashMap<Hash, usize> = HashMap::new();
        for h in old.map_or(&[][..], |o| &o.chunks[..]) {
            *before.entry(*h).or_default() += 1;
        }
        for r in &rows {
            match before.get_mut(&r.hash) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    report.unchanged += 1;
                }
                _ => report.added += 1,
            }
        }
        report.removed += before.values().sum::<usize>();
        report.split += rows.iter().filter(|r| r.part == 1 && r.parts > 1).count();
        report.chunks += rows.len();
        report.files_changed += 1;
        updates.push(FileUpdate {
            path: f.rel.clone(),
            file_hash,
            rows,
        });
    }
    let gone: Vec<String> = stored
        .iter()
        .filter(|(p, _)| !seen.contains(*p))
        .map(|(p, _)| p.clone())
        .collect();
    for p in &gone {
        report.removed += stored[p].chunks.len();
    }
    report.files_removed = gone.len();

    // Which texts need a vector.
    let mut all: Vec<Hash> = updates
        .iter()
        .flat_map(|u| u.rows.iter().map(|r| r.hash))
        .collect();
    all.sort_unstable();
    all.dedup();
    let known = store.known(&all)?;
    let to_embed = all.len() - known.len();
    progress.start(to_embed);

    // Batches of whole files, about 4 model batches of new texts each.
    let per_commit = (opts.batch_size * 4).max(16);
    let mut done_hashes: HashSet<Hash> = known;
    let mut i = 0;
    while i < updates.len() {
        if stop.load(Ordering::Relaxed) {
            report.interrupted = true;
            break;
        }
        let mut j = i;
        let mut texts: Vec<(Hash, String)> = Vec::new();
        let mut pending: HashSet<Hash> = HashSet::new();
        while j < updates.len() && (texts.len() < per_commit || j == i) {
            for r in &updates[j].rows {
                if !done_hashes.contains(&r.hash) && pending.insert(r.hash) {
                    texts.push((
                        r.hash,
                        embedded_text(&r.path, r.symbol.as_deref(), &r.text, opts.header),
                    ));
                }
            }
            j += 1;
        }
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in texts.chunks(opts.batch_size.max(1)) {
            if stop.load(Ordering::Relaxed) {
                report.interrupted = true;
                break;
            }
            let strings: Vec<String> = batch.iter().map(|(_, t)| t.clone()).collect();
            let vecs = model.embed(&strings, &doc_opts)?;
            for ((h, _), v) in batch.iter().zip(vecs) {
                vectors.push((*h, v));
            }
            progress.embedded(batch.len());
        }
        if report.interrupted {
            break;
        }
        store.commit(&updates[i..j], &vectors)?;
        report.embedded += vectors.len();
        done_hashes.extend(vectors.into_iter().map(|(h, _)| h));
        i = j;
    }
    if !report.interrupted {
        store.remove(&gone)?;
    }
    store.finish()?;
    Ok(report)
}

/// What is embedded for a chunk: its text, after a first line with its file's name and its symbol
/// when `header` (contextual chunks: code whose documentation is gone is still found by the names
/// around it). The file's name, not its path: a folder moved or renamed keeps its vectors, and it
/// measured better than the whole path (bench/heldout_search.py, development sets: Python hybrid
/// NDCG@10 0.617 vs 0.613 with the symbol alone and 0.574→0.557 dense with the whole path; Elixir dense
/// 0.480 vs 0.466 with the path). The chunks are cut to the token budget without the header: a chunk at
/// the limit loses its last few tokens to it (keeping room for it split a third more definitions,
/// which cost more). A chunk's hash is the hash of this text, so its vector is reused exactly when
/// this text recurs.
pub fn embedded_text(path: &str, symbol: Option<&str>, text: &str, header: bool) -> String {
    if !header {
        return text.to_string();
    }
    let name = path.rsplit('/').next().unwrap_or(path);
    match symbol {
        Some(s) => format!("{name} {s}\n{text}"),
        None => format!("{name}\n{text}"),
    }
}

/// A file's identity for skipping: its bytes and the chunker settings it was cut with.
fn file_hash(bytes: &[u8], chunker: &str) -> Hash {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(chunker.as_bytes());
    h.update([0]);
    h.update(bytes);
    h.finalize().into()
}

/// The default index of a folder: `FOLDER/.sembed/index.sqlite`.
pub fn default_target(root: &Path) -> PathBuf {
    root.join(".sembed").join("index.sqlite")
}

/// The default index for searching from `dir`: the nearest `.sembed/index.sqlite` in it or above it.
pub fn find_default(dir: &Path) -> Option<PathBuf> {
    let dir = dir.canonicalize().ok()?;
    dir.ancestors().map(default_target).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    #[test]
    fn identity_engine_reads_the_brackets_not_the_name() {
        assert_eq!(
            super::identity_engine("my-bf16-model [fast-int8] 384-d"),
            "fast-int8"
        );
        assert_eq!(
            super::identity_engine("qodo+jina [fast-f32+fast-bf16] 2560-d"),
            "fast-f32+fast-bf16"
        );
        assert_eq!(super::identity_engine("no engine"), "");
    }
}
