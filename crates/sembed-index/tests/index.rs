//! Indexing end to end with a real (tiny) model: incremental counts, interruption and resumption,
//! damaged and foreign index files, a model mismatch, the HNSW graph, and PostgreSQL against the
//! embedded store.

use sembed::embed::{Embed, Embedder};
use sembed_index::index::{run, IndexOptions, Progress, Report};
use sembed_index::store::sqlite::SqliteStore;
use sembed_index::store::{self, Filter, Method, Store};
use sembed_index::Error;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model(name: &str) -> Embedder {
    Embedder::load(
        &fixtures().join(name),
        sembed::DType::F32,
        &sembed::device::cpu(),
    )
    .unwrap()
    .with_name(name)
}

/// A small repository: the code fixtures plus a few generated modules.
fn repo(dir: &Path) {
    for f in std::fs::read_dir(fixtures().join("code")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir_all(dir.join("pkg")).unwrap();
    for m in 0..4 {
        let mut src = String::new();
        for i in 0..5 {
            src.push_str(&format!(
                "def f{m}_{i}(x):\n    \"\"\"Function {i} of module {m}.\"\"\"\n    return x * {i} + {m}\n\n\n"
            ));
        }
        std::fs::write(dir.join(format!("pkg/mod{m}.py")), src).unwrap();
    }
    // Ignored, binary and lock files are not indexed.
    std::fs::write(dir.join(".gitignore"), "build/\n").unwrap();
    std::fs::create_dir_all(dir.join("build")).unwrap();
    std::fs::write(dir.join("build/gen.py"), "def generated():\n    return 1\n").unwrap();
    std::fs::write(dir.join("logo.png"), [0x89, b'P', b'N', b'G', 0, 0, 1, 2]).unwrap();
    std::fs::write(dir.join("Cargo.lock"), "# lock\n").unwrap();
}

fn index(dir: &Path, db: &Path, m: &dyn Embed) -> Report {
    index_with(dir, db, m, |_| {}, &mut ())
}

fn index_with(
    dir: &Path,
    db: &Path,
    m: &dyn Embed,
    tweak: impl FnOnce(&mut IndexOptions),
    progress: &mut dyn Progress,
) -> Report {
    let mut store = SqliteStore::open(db, 20_000).unwrap();
    let mut opts = IndexOptions::new(vec![dir.to_path_buf()], dir.to_path_buf());
    opts.batch_size = 4;
    tweak(&mut opts);
    run(
        &mut store,
        &db.display().to_string(),
        m,
        &opts,
        progress,
        &AtomicBool::new(false),
    )
    .unwrap()
}

/// (path, lines, symbol, hash) of every stored row, and whether each vector is the model's vector of
/// the row's text.
fn rows(db: &Path, m: &dyn Embed) -> Vec<(String, usize, usize, Option<String>, String)> {
    let mut store = SqliteStore::open(db, 20_000).unwrap();
    let all = store.rows().unwrap();
    let opts = sembed::EmbedOptions {
        role: Some(sembed::InputRole::Document),
        ..Default::default()
    };
    let texts: Vec<String> = all.iter().map(|(r, _)| r.text.clone()).collect();
    let want = m.embed(&texts, &opts).unwrap();
    for ((r, v), w) in all.iter().zip(&want) {
        let diff = v
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-5,
            "{}:{}: stored vector differs by {diff}",
            r.path,
            r.start_line
        );
    }
    all.into_iter()
        .map(|(r, _)| {
            (
                r.path,
                r.start_line,
                r.end_line,
                r.symbol,
                store::hex(&r.hash),
            )
        })
        .collect()
}

#[test]
fn incremental_counts_are_exact() {
    let m = model("bert-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir);
    let db = tmp.path().join("index.sqlite");

    let first = index(&dir, &db, &m);
    assert_eq!(first.files, 12, "{first:?}");
    assert_eq!(first.skipped.get("binary"), Some(&1));
    assert_eq!(first.skipped.get("lock file"), Some(&1));
    assert_eq!(first.unchanged, 0);
    assert_eq!(first.added, first.chunks);
    assert_eq!(first.embedded, first.chunks, "every text is distinct");
    let total = first.chunks;
    let stored = rows(&db, &m);
    assert_eq!(stored.len(), total);
    assert!(
        !stored.iter().any(|r| r.0.starts_with("build/")),
        "gitignored"
    );

    // Nothing changed: nothing embedded.
    let again = index(&dir, &db, &m);
    assert_eq!(
        (
            again.unchanged,
            again.added,
            again.embedded,
            again.removed,
            again.files_changed
        ),
        (total, 0, 0, 0, 0)
    );

    // Edit one function: its chunk is replaced, the file's other chunks stay.
    let p = dir.join("pkg/mod1.py");
    let src = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, src.replace("return x * 3 + 1", "return x * 3 + 100")).unwrap();
    let edit = index(&dir, &db, &m);
    assert_eq!(
        (
            edit.unchanged,
            edit.added,
            edit.embedded,
            edit.removed,
            edit.files_changed
        ),
        (total - 1, 1, 1, 1, 1)
    );

    // Add a file with two functions, one a copy of an indexed function: two rows added, one vector
    // embedded, the other reused.
    std::fs::write(
        dir.join("pkg/new.py"),
        "def fresh(y):\n    \"\"\"Brand new.\"\"\"\n    return -y\n\n\ndef f0_0(x):\n    \"\"\"Function 0 of module 0.\"\"\"\n    return x * 0 + 0\n",
    )
    .unwrap();
    let add = index(&dir, &db, &m);
    assert_eq!(
        (add.unchanged, add.added, add.embedded, add.removed),
        (total, 2, 1, 0)
    );
    let total = total + 2;

    // Delete a file: its rows go, nothing is embedded.
    std::fs::remove_file(dir.join("pkg/mod3.py")).unwrap();
    let del = index(&dir, &db, &m);
    assert_eq!(
        (
            del.unchanged,
            del.added,
            del.embedded,
            del.removed,
            del.files_removed
        ),
        (total - 5, 0, 0, 5, 1)
    );
    let total = total - 5;

    // Rename a file: rows move to the new path, every vector is reused.
    std::fs::rename(dir.join("pkg/mod2.py"), dir.join("pkg/renamed.py")).unwrap();
    let ren = index(&dir, &db, &m);
    assert_eq!(
        (
            ren.unchanged,
            ren.added,
            ren.embedded,
            ren.removed,
            ren.files_removed
        ),
        (total - 5, 5, 0, 5, 1)
    );
    let stored = rows(&db, &m);
    assert_eq!(stored.len(), total);
    assert!(stored.iter().any(|r| r.0 == "pkg/renamed.py"));
    assert!(!stored.iter().any(|r| r.0 == "pkg/mod2.py"));

    // The result equals a fresh index of the same tree.
    let fresh_db = tmp.path().join("fresh.sqlite");
    index(&dir, &fresh_db, &m);
    assert_eq!(rows(&fresh_db, &m), stored);
}

/// Stops the run (as Ctrl-C does) after `after` embedded texts.
struct StopAfter<'a> {
    after: usize,
    seen: usize,
    stop: &'a AtomicBool,
}

impl Progress for StopAfter<'_> {
    fn embedded(&mut self, n: usize) {
        self.seen += n;
        if self.seen >= self.after {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

#[test]
fn interrupted_then_resumed_equals_uninterrupted() {
    let m = model("bert-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir);
    let whole = tmp.path().join("whole.sqlite");
    let total = index(&dir, &whole, &m).chunks;

    let db = tmp.path().join("resumed.sqlite");
    let stop = AtomicBool::new(false);
    let mut store = SqliteStore::open(&db, 20_000).unwrap();
    let mut opts = IndexOptions::new(vec![dir.clone()], dir.clone());
    opts.batch_size = 4;
    let mut progress = StopAfter {
        after: 20,
        seen: 0,
        stop: &stop,
    };
    let cut = run(&mut store, "resumed", &m, &opts, &mut progress, &stop).unwrap();
    assert!(cut.interrupted);
    drop(store);
    let kept = rows(&db, &m).len();
    assert!(kept > 0 && kept < total, "{kept} of {total} rows kept");

    let rest = index(&dir, &db, &m);
    assert!(!rest.interrupted);
    assert_eq!(rest.unchanged, kept, "the kept rows are not embedded again");
    assert_eq!(rest.embedded, total - kept);
    assert_eq!(rows(&db, &m), rows(&whole, &m));
}

#[test]
fn another_model_is_refused_unless_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir);
    let db = tmp.path().join("index.sqlite");
    index(&dir, &db, &model("bert-tiny"));

    let other = model("qwen2-bidir-tiny");
    let mut store = SqliteStore::open(&db, 20_000).unwrap();
    let opts = IndexOptions::new(vec![dir.clone()], dir.clone());
    let err = run(
        &mut store,
        "the-index",
        &other,
        &opts,
        &mut (),
        &AtomicBool::new(false),
    )
    .expect_err("refused");
    let msg = err.to_string();
    assert!(matches!(err, Error::Mismatch(_)), "{msg}");
    assert!(
        msg.contains("the-index") && msg.contains("bert-tiny") && msg.contains("qwen2-bidir-tiny"),
        "{msg}"
    );
    assert!(msg.contains("--replace"), "{msg}");
    // Nothing was lost.
    assert_eq!(
        rows(&db, &model("bert-tiny")).len(),
        index(&dir, &db, &model("bert-tiny")).chunks
    );

    let replaced = index_with(&dir, &db, &other, |o| o.replace = true, &mut ());
    assert_eq!(replaced.unchanged, 0);
    assert_eq!(replaced.embedded, replaced.chunks);
    rows(&db, &other);
}

#[test]
fn damaged_and_foreign_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let open_err = |p: &Path| match SqliteStore::open(p, 20_000) {
        Ok(_) => panic!("{} opened", p.display()),
        Err(e) => e.to_string(),
    };
    // Not SQLite at all.
    let junk = tmp.path().join("junk.sqlite");
    std::fs::write(&junk, b"this is not a database, just some text that is long enough to look like a header....................").unwrap();
    let msg = open_err(&junk);
    assert!(
        msg.contains("junk.sqlite") && msg.contains("not a sembed index"),
        "{msg}"
    );

    // A SQLite database of something else.
    let foreign = tmp.path().join("foreign.sqlite");
    {
        let c = rusqlite_conn(&foreign);
        c.execute_batch("CREATE TABLE people (name TEXT); INSERT INTO people VALUES ('x');")
            .unwrap();
    }
    let msg = open_err(&foreign);
    assert!(
        msg.contains("foreign.sqlite") && msg.contains("not a sembed index"),
        "{msg}"
    );

    // A real index, truncated.
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir);
    let db = tmp.path().join("index.sqlite");
    index(&dir, &db, &model("bert-tiny"));
    // Fold the WAL into the main file, then cut it.
    drop(rusqlite_conn(&db));
    let bytes = std::fs::read(&db).unwrap();
    let cut = tmp.path().join("cut.sqlite");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let msg = open_err(&cut);
    assert!(msg.contains("cut.sqlite"), "{msg}");
    assert!(
        msg.contains("damaged") || msg.contains("not a sembed index"),
        "{msg}"
    );
}

fn rusqlite_conn(p: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(p).unwrap();
    let _ = c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
    c
}

/// Unit vectors, seeded.
fn random_unit(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = sembed::rng::SplitMix64(seed);
    (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..d)
                .map(|_| {
                    // Box–Muller: Gaussian coordinates give uniformly spread directions.
                    let (a, b) = (rng.next_f64().max(1e-12), rng.next_f64());
                    ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
                })
                .collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect()
        })
        .collect()
}

/// Rows of synthetic files with the given vectors, written through the store API.
fn fill(store: &mut dyn Store, vectors: &[Vec<f32>], model: &str) {
    let d = vectors[0].len();
    store
        .init(
            &store::Meta {
                model: model.into(),
                model_refs: vec![],
                dimension: d,
                chunker: "test".into(),
            },
            false,
        )
        .unwrap();
    for (f, chunk) in vectors.chunks(100).enumerate() {
        let path = format!(
            "{}/file{f}.{}",
            if f % 2 == 0 { "src" } else { "lib" },
            if f % 3 == 0 { "py" } else { "rs" }
        );
        let mut rows = Vec::new();
        let mut vecs = Vec::new();
        for (i, v) in chunk.iter().enumerate() {
            let text = format!("chunk {i} of file {f}");
            let hash = store::hash_text(&text);
            rows.push(store::Row {
                path: path.clone(),
                lang: if f % 3 == 0 { "python" } else { "rust" }.into(),
                kind: "function".into(),
                symbol: Some(format!("f{i}")),
                start_line: i * 3 + 1,
                end_line: i * 3 + 2,
                start_byte: i * 40,
                end_byte: i * 40 + 39,
                part: 1,
                parts: 1,
                hash,
                text,
            });
            vecs.push((hash, v.clone()));
        }
        store
            .commit(
                &[store::FileUpdate {
                    path,
                    file_hash: store::hash_text(&format!("file {f}")),
                    rows,
                }],
                &vecs,
            )
            .unwrap();
    }
    store.finish().unwrap();
}

/// Above the threshold the HNSW graph answers; its recall@10 against exact search is high, and a
/// stored vector finds itself.
#[test]
fn hnsw_graph_answers_above_the_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let vectors = random_unit(3000, 64, 7);
    let ann_db = tmp.path().join("ann.sqlite");
    let exact_db = tmp.path().join("exact.sqlite");
    let mut ann = SqliteStore::open(&ann_db, 1000).unwrap();
    let mut exact = SqliteStore::open(&exact_db, 1_000_000).unwrap();
    fill(&mut ann, &vectors, "random");
    fill(&mut exact, &vectors, "random");
    assert!(ann_db.with_extension("hnsw").is_file());
    assert!(!exact_db.with_extension("hnsw").is_file());
    let queries = random_unit(50, 64, 99);
    let mut found = 0;
    for q in &queries {
        let (a, ma) = ann.search(q, 10, &Filter::default()).unwrap();
        let (e, me) = exact.search(q, 10, &Filter::default()).unwrap();
        assert_eq!((ma, me), (Method::Ann, Method::Exact));
        let want: std::collections::HashSet<_> = e.iter().map(|h| h.row.hash).collect();
        found += a.iter().filter(|h| want.contains(&h.row.hash)).count();
    }
    let recall = found as f64 / (10.0 * queries.len() as f64);
    assert!(recall >= 0.95, "recall@10 {recall}");
    let (hits, _) = ann.search(&vectors[1234], 1, &Filter::default()).unwrap();
    assert_eq!(hits[0].row.text, "chunk 34 of file 12");
    assert!((hits[0].score - 1.0).abs() < 1e-5);

    // Filters: only matching rows, from the graph or, when it finds too few, from every row.
    let f = Filter {
        lang: Some("python".into()),
        path: Some("src/*".into()),
    };
    let (a, _) = ann.search(&queries[0], 10, &f).unwrap();
    let (e, _) = exact.search(&queries[0], 10, &f).unwrap();
    assert_eq!(a.len(), 10);
    assert!(a
        .iter()
        .all(|h| h.row.lang == "python" && h.row.path.starts_with("src/")));
    assert_eq!(
        a.iter().map(|h| h.row.hash).collect::<Vec<_>>(),
        e.iter().map(|h| h.row.hash).collect::<Vec<_>>()
    );

    // Removing a file updates the graph from the change log; a stale graph is rebuilt.
    ann.remove(&["lib/file1.rs".to_string()]).unwrap();
    ann.finish().unwrap();
    let (hits, m) = ann.search(&vectors[150], 5, &Filter::default()).unwrap();
    assert_eq!(m, Method::Ann);
    assert!(hits.iter().all(|h| h.row.path != "lib/file1.rs"));
    std::fs::write(ann_db.with_extension("hnsw"), b"garbage").unwrap();
    drop(ann);
    let mut reopened = SqliteStore::open(&ann_db, 1000).unwrap();
    reopened.remove(&["src/file2.rs".to_string()]).unwrap();
    reopened.finish().unwrap();
    let (hits, m) = reopened.search(&vectors[0], 1, &Filter::default()).unwrap();
    assert_eq!(
        (m, hits[0].row.text.as_str()),
        (Method::Ann, "chunk 0 of file 0")
    );
}

/// `SEMBED_TEST_PG`: a PostgreSQL with pgvector (`.ci/run` starts one).
fn pg_url() -> Option<String> {
    match std::env::var("SEMBED_TEST_PG") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var_os("SEMBED_REQUIRE_ALL").is_none(),
                "SEMBED_TEST_PG is not set (SEMBED_REQUIRE_ALL is set: nothing may be skipped)"
            );
            println!("SKIPPED: SEMBED_TEST_PG is not set");
            None
        }
    }
}

fn pg(table: &str, threshold: usize) -> store::pg::PgStore {
    let url = pg_url().unwrap();
    let mut s = store::pg::PgStore::connect(&url, table)
        .unwrap()
        .with_ann_threshold(threshold);
    // A clean table per test.
    if let Some(meta) = s.meta().unwrap() {
        s.init(&meta, true).unwrap();
    }
    s
}

/// The same tree indexed into PostgreSQL and into SQLite: the same rows, vectors and counts, and the
/// same top hits for the same queries, unfiltered and filtered.
#[test]
fn postgres_matches_the_embedded_store() {
    if pg_url().is_none() {
        return;
    }
    let m = model("bert-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir);
    let db = tmp.path().join("index.sqlite");
    let mut lite = SqliteStore::open(&db, 20_000).unwrap();
    let mut pgs = pg("sembed_test_parity", 20_000);
    let opts = IndexOptions::new(vec![dir.clone()], dir.clone());
    let stop = AtomicBool::new(false);
    let a = run(&mut lite, "lite", &m, &opts, &mut (), &stop).unwrap();
    let b = run(&mut pgs, "pg", &m, &opts, &mut (), &stop).unwrap();
    assert_eq!(a, b);
    let (ra, rb) = (lite.rows().unwrap(), pgs.rows().unwrap());
    assert_eq!(ra.len(), rb.len());
    for ((x, vx), (y, vy)) in ra.iter().zip(&rb) {
        assert_eq!(x, y);
        assert_eq!(vx, vy, "{}:{}", x.path, x.start_line);
    }
    // Incremental semantics are the store's too.
    std::fs::remove_file(dir.join("pkg/mod3.py")).unwrap();
    let p = dir.join("pkg/mod1.py");
    let src = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, src.replace("return x * 3 + 1", "return x * 3 + 100")).unwrap();
    let a = run(&mut lite, "lite", &m, &opts, &mut (), &stop).unwrap();
    let b = run(&mut pgs, "pg", &m, &opts, &mut (), &stop).unwrap();
    assert_eq!(a, b);
    assert_eq!((b.embedded, b.removed, b.files_removed), (1, 6, 1));

    for (q, f) in [
        ("a cache of strings", Filter::default()),
        ("grow the box", Filter::default()),
        (
            "module function",
            Filter {
                lang: Some("python".into()),
                path: None,
            },
        ),
        (
            "anything",
            Filter {
                lang: None,
                path: Some("pkg/*".into()),
            },
        ),
    ] {
        let x = sembed_index::search::search(&mut lite, &m, q, 5, &f).unwrap();
        let y = sembed_index::search::search(&mut pgs, &m, q, 5, &f).unwrap();
        let key = |r: &sembed_index::search::Results| {
            r.hits
                .iter()
                .map(|h| (h.row.path.clone(), h.row.start_line))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&x), key(&y), "{q}");
        assert_eq!(x.hits.len(), 5, "{q}");
        for (h, g) in x.hits.iter().zip(&y.hits) {
            assert!((h.score - g.score).abs() < 1e-6);
        }
    }
    // A model mismatch is refused by PostgreSQL too.
    let other = model("qwen2-bidir-tiny");
    let err = run(&mut pgs, "pg", &other, &opts, &mut (), &stop).expect_err("refused");
    assert!(matches!(err, Error::Mismatch(_)), "{err}");
}

/// Above 2,000 dimensions PostgreSQL stores `halfvec` (the fused 2560-d vector) with an HNSW index;
/// top hits equal the embedded store's exact search.
#[test]
fn postgres_halfvec_2560_with_hnsw() {
    if pg_url().is_none() {
        return;
    }
    let vectors = random_unit(1500, 2560, 11);
    let tmp = tempfile::tempdir().unwrap();
    let mut lite = SqliteStore::open(&tmp.path().join("x.sqlite"), 1_000_000).unwrap();
    let mut pgs = pg("sembed_test_half", 1000);
    fill(&mut lite, &vectors, "fused");
    fill(&mut pgs, &vectors, "fused");
    let url = pg_url().unwrap();
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let ty: String = c
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = 'sembed_test_half'::regclass AND attname = 'embedding'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(ty, "halfvec(2560)");
    let idx: String = c
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'sembed_test_half_hnsw'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        idx.contains("hnsw") && idx.contains("halfvec_cosine_ops"),
        "{idx}"
    );
    let mut same = 0;
    let queries: Vec<&Vec<f32>> = vectors.iter().step_by(97).collect();
    for q in &queries {
        let (a, _) = lite.search(q, 5, &Filter::default()).unwrap();
        let (b, m) = pgs.search(q, 5, &Filter::default()).unwrap();
        assert_eq!(m, Method::Ann);
        // A stored vector finds itself first in both (halfvec rounding keeps the score near 1).
        assert_eq!(a[0].row.hash, b[0].row.hash);
        assert!((b[0].score - 1.0).abs() < 1e-2, "{}", b[0].score);
        same += a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.row.hash == y.row.hash)
            .count();
    }
    assert!(same as f64 >= 0.9 * 5.0 * queries.len() as f64, "{same}");
}

/// Several processes, one shard each, fill one PostgreSQL index: together they equal one process.
#[test]
fn postgres_shards_fill_one_index() {
    if pg_url().is_none() {
        return;
    }
    let m = model("bert-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir);
    let mut whole = pg("sembed_test_whole", 20_000);
    let opts = IndexOptions::new(vec![dir.clone()], dir.clone());
    let stop = AtomicBool::new(false);
    run(&mut whole, "whole", &m, &opts, &mut (), &stop).unwrap();
    drop(pg("sembed_test_sharded", 20_000));
    let url = pg_url().unwrap();
    std::thread::scope(|s| {
        for i in 0..3 {
            let (url, dir, m) = (&url, &dir, &m);
            s.spawn(move || {
                let mut st = store::pg::PgStore::connect(url, "sembed_test_sharded").unwrap();
                let mut o = IndexOptions::new(vec![dir.clone()], dir.clone());
                o.shard = Some(store::Shard { index: i, count: 3 });
                run(&mut st, "shard", m, &o, &mut (), &AtomicBool::new(false)).unwrap()
            });
        }
    });
    let mut sharded = store::pg::PgStore::connect(&url, "sembed_test_sharded").unwrap();
    let (a, b) = (whole.rows().unwrap(), sharded.rows().unwrap());
    assert_eq!(a.len(), b.len());
    assert!(a.iter().zip(&b).all(|(x, y)| x.0 == y.0));
    // A rerun of one shard changes nothing and removes nothing of the others.
    let mut o = IndexOptions::new(vec![dir.clone()], dir.clone());
    o.shard = Some(store::Shard { index: 1, count: 3 });
    let r = run(&mut sharded, "shard", &m, &o, &mut (), &stop).unwrap();
    assert_eq!((r.added, r.removed), (0, 0));
    assert_eq!(sharded.count().unwrap(), a.len());
}
