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
    let texts: Vec<String> = all
        .iter()
        .map(|(r, _)| {
            sembed_index::index::embedded_text(&r.path, r.symbol.as_deref(), &r.text, true)
        })
        .collect();
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

    // Add a file with two functions, one a copy of an indexed function in a file of the same name
    // (what is embedded is the file's name, the symbol and the text): two rows added, one vector
    // embedded, the other reused.
    std::fs::create_dir_all(dir.join("vendor")).unwrap();
    std::fs::write(
        dir.join("vendor/mod0.py"),
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

    // Move a file to another folder: rows move to the new path, every vector is reused.
    std::fs::create_dir_all(dir.join("moved")).unwrap();
    std::fs::rename(dir.join("pkg/mod2.py"), dir.join("moved/mod2.py")).unwrap();
    let mv = index(&dir, &db, &m);
    assert_eq!(
        (
            mv.unchanged,
            mv.added,
            mv.embedded,
            mv.removed,
            mv.files_removed
        ),
        (total - 5, 5, 0, 5, 1)
    );
    // Rename it: its name is part of what is embedded, so its chunks are embedded again.
    std::fs::rename(dir.join("moved/mod2.py"), dir.join("moved/renamed.py")).unwrap();
    let ren = index(&dir, &db, &m);
    assert_eq!(
        (
            ren.unchanged,
            ren.added,
            ren.embedded,
            ren.removed,
            ren.files_removed
        ),
        (total - 5, 5, 5, 5, 1)
    );
    let stored = rows(&db, &m);
    assert_eq!(stored.len(), total);
    assert!(stored.iter().any(|r| r.0 == "moved/renamed.py"));
    assert!(!stored
        .iter()
        .any(|r| r.0 == "pkg/mod2.py" || r.0 == "moved/mod2.py"));

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
                lexical_weight: None,
                name_weight: None,
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
    // The row and term counts BM25 reads are kept by every write: equal to counting the table.
    let counts = || {
        let mut c = postgres::Client::connect(&pg_url().unwrap(), postgres::NoTls).unwrap();
        let kept: String = c
            .query_one(
                "SELECT value FROM sembed_test_parity_meta WHERE key = 'lexical_stats'",
                &[],
            )
            .unwrap()
            .get(0);
        let r = c
            .query_one(
                "SELECT count(*), coalesce(sum(n_terms), 0)::bigint FROM sembed_test_parity",
                &[],
            )
            .unwrap();
        (
            kept,
            format!("{} {}", r.get::<_, i64>(0), r.get::<_, i64>(1)),
        )
    };
    let (kept, counted) = counts();
    assert_eq!(kept, counted);
    pgs.remove(&["pkg/mod2.py".to_string()]).unwrap();
    lite.remove(&["pkg/mod2.py".to_string()]).unwrap();
    let (kept, counted) = counts();
    assert_eq!(kept, counted);
    assert!(counted.starts_with(&format!("{} ", lite.rows().unwrap().len())));

    // Symbol lookup: the same definitions, whole names and last parts, exact names first; LIKE's
    // wildcards in a name are plain characters; the source each index records.
    let py = Filter {
        lang: Some("python".into()),
        path: None,
    };
    for (name, filter, want) in [
        ("get", Filter::default(), vec!["Cache::get"]),
        ("Cache::get", Filter::default(), vec!["Cache::get"]),
        ("grow", Filter::default(), vec!["Box.grow"]),
        ("f1_2", py.clone(), vec!["f1_2"]),
        ("f1%2", Filter::default(), vec![]),
        ("f_", Filter::default(), vec![]),
        ("et", Filter::default(), vec![]),
    ] {
        let a = lite.symbols(name, 10, &filter).unwrap();
        let b = pgs.symbols(name, 10, &filter).unwrap();
        assert_eq!(a, b, "{name}");
        let got: Vec<&str> = a.iter().filter_map(|r| r.symbol.as_deref()).collect();
        assert!(
            want.iter().all(|w| got.contains(w))
                && got
                    .iter()
                    .all(|g| want.contains(g) || g.ends_with(&format!(".{name}"))),
            "{name}: {got:?}"
        );
    }
    let src = sembed_index::index::Source::of(&mut lite).unwrap().unwrap();
    assert_eq!(src, opts.source().unwrap());
    assert_eq!(
        sembed_index::index::Source::of(&mut pgs).unwrap(),
        Some(src)
    );

    for (q, f) in [
        ("a cache of strings", Filter::default()),
        ("return x * 3", Filter::default()),
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
        use sembed_index::search::Mode;
        for mode in [Mode::Dense, Mode::Lexical, Mode::Hybrid] {
            let x = sembed_index::search::search(&mut lite, &m, q, 5, &f, mode).unwrap();
            let y = sembed_index::search::search(&mut pgs, &m, q, 5, &f, mode).unwrap();
            let key = |r: &sembed_index::search::Results| {
                r.hits
                    .iter()
                    .map(|h| (h.row.path.clone(), h.row.start_line))
                    .collect::<Vec<_>>()
            };
            assert_eq!(key(&x), key(&y), "{q} {mode:?}");
            if mode != Mode::Lexical {
                assert_eq!(x.hits.len(), 5, "{q} {mode:?}");
            } else if q != "anything" {
                assert!(!x.hits.is_empty(), "{q} {mode:?}");
            }
            for (h, g) in x.hits.iter().zip(&y.hits) {
                assert!((h.score - g.score).abs() < 1e-6, "{q} {mode:?}");
                assert_eq!(h.bm25.is_some(), g.bm25.is_some());
            }
        }
    }
    // The lexical ranking is BM25 over the rows in PostgreSQL too.
    for q in ["module function", "return x * 3"] {
        let terms = sembed_index::lexical::query_terms(q);
        let want = bm25_by_hand(&mut pgs, &terms);
        let got = pgs.lexical(&terms, 6, &Filter::default()).unwrap();
        assert_eq!(got.len(), 6);
        for (h, w) in got.iter().zip(&want) {
            assert_eq!((&h.row.path, h.row.start_byte), (&w.1, w.2), "{q}");
            assert!((h.score as f64 - w.0).abs() <= 1e-5 * w.0.max(1.0), "{q}");
        }
    }
    // A table from before the lexical columns gains them on first use, from its stored rows.
    let before = lexical_hits(&mut pgs, "module function", 10);
    {
        let mut c = postgres::Client::connect(&pg_url().unwrap(), postgres::NoTls).unwrap();
        c.batch_execute(
            "ALTER TABLE sembed_test_parity DROP COLUMN tsv, DROP COLUMN n_terms;
             DELETE FROM sembed_test_parity_meta WHERE key = 'lexical';",
        )
        .unwrap();
    }
    let mut again = store::pg::PgStore::connect(&pg_url().unwrap(), "sembed_test_parity").unwrap();
    assert_eq!(lexical_hits(&mut again, "module function", 10), before);
    let (kept, counted) = counts();
    assert_eq!(kept, counted);
    // A table from before the kept counts (at the same term rules) gains them alone.
    {
        let mut c = postgres::Client::connect(&pg_url().unwrap(), postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "UPDATE sembed_test_parity_meta SET value = '{}' WHERE key = 'lexical';
             DELETE FROM sembed_test_parity_meta WHERE key = 'lexical_stats';",
            sembed_index::lexical::VERSION
        ))
        .unwrap();
    }
    assert_eq!(lexical_hits(&mut again, "module function", 10), before);
    let (kept, counted) = counts();
    assert_eq!(kept, counted);
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

/// BM25 of every row for `terms`, computed here from the stored rows with the formula written out
/// (not the crate's): k1 1.2, b 0.75, idf ln((N − n + 0.5)/(n + 0.5)) floored at 1e-6. Best first,
/// ties by path and position; rows matching no term are left out.
fn bm25_by_hand(store: &mut dyn Store, terms: &[String]) -> Vec<(f64, String, usize, usize)> {
    let rows = store.rows().unwrap();
    let docs: Vec<Vec<String>> = rows
        .iter()
        .map(|(r, _)| sembed_index::lexical::of_row(r))
        .collect();
    let n = docs.len() as f64;
    let avgdl = docs.iter().map(|d| d.len()).sum::<usize>() as f64 / n;
    let mut out = Vec::new();
    for ((r, _), d) in rows.iter().zip(&docs) {
        let mut score = 0.0;
        let mut any = false;
        for t in terms {
            let tf = d.iter().filter(|x| *x == t).count() as f64;
            let df = docs.iter().filter(|x| x.contains(t)).count() as f64;
            let mut idf = ((n - df + 0.5) / (df + 0.5)).ln();
            if idf <= 0.0 {
                idf = 1e-6;
            }
            any |= tf > 0.0;
            score += idf * ((tf * 2.2) / (tf + 1.2 * (0.25 + 0.75 * d.len() as f64 / avgdl)));
        }
        if any {
            out.push((score, r.path.clone(), r.start_byte, r.end_byte));
        }
    }
    out.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| (&a.1, a.2, a.3).cmp(&(&b.1, b.2, b.3)))
    });
    out
}

fn lexical_hits(store: &mut dyn Store, query: &str, k: usize) -> Vec<(f32, String, usize)> {
    store
        .lexical(
            &sembed_index::lexical::query_terms(query),
            k,
            &Filter::default(),
        )
        .unwrap()
        .into_iter()
        .map(|h| (h.score, h.row.path, h.row.start_line))
        .collect()
}

/// The lexical ranking is BM25 over the terms, as written out by hand, with the rows filtered.
#[test]
fn lexical_search_is_bm25() {
    let m = model("bert-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir);
    // Letters Rust counts as alphanumeric and FTS5's unicode61 tokenizer does not (circled letters,
    // category So): the stored terms must read back whole.
    std::fs::write(
        dir.join("pkg/circled.py"),
        "def \u{24D2}ircle_\u{24DD}ame(x):\n    return x + 1\n",
    )
    .unwrap();
    let db = tmp.path().join("index.sqlite");
    index(&dir, &db, &m);
    both_ways(&db, lexical_search_is_bm25_on);
}

/// `check` on a store that asks FTS5, then on one that keeps the terms in memory (a server's).
fn both_ways(db: &Path, check: fn(&mut SqliteStore)) {
    for memory in [false, true] {
        let mut store = SqliteStore::open(db, 20_000).unwrap();
        if memory {
            store.answer_many();
        }
        check(&mut store);
    }
}

fn lexical_search_is_bm25_on(store: &mut SqliteStore) {
    for q in [
        "function of module 3",
        "return x",
        "cache strings",
        "f2_4",
        "Grow the box",
        "\u{24D2}ircle \u{24DD}ame",
    ] {
        let terms = sembed_index::lexical::query_terms(q);
        let want = bm25_by_hand(store, &terms);
        // The in-memory ranker (`sembed adapt`'s held-out pairs) ranks the same rows the same way.
        let rows = store.rows().unwrap();
        let mut held = sembed_index::lexical::MemoryIndex::default();
        for (i, (r, _)) in rows.iter().enumerate() {
            held.add(i as i64, &r.path, r.symbol.as_deref(), &r.text, ());
        }
        let mem = held.rank(&terms, 8);
        assert_eq!(mem.len(), want.len().min(8), "{q}");
        for ((i, score), w) in mem.iter().zip(&want) {
            assert!((score - w.0).abs() <= 1e-9 * w.0.abs().max(1.0), "{q}");
            // Equal scores may come in either order; the same score means the same rank.
            let r = &rows[*i as usize].0;
            assert!(
                (&r.path, r.start_byte) == (&w.1, w.2)
                    || want
                        .iter()
                        .any(|x| x.0 == *score && (&x.1, x.2) == (&r.path, r.start_byte)),
                "{q}"
            );
        }
        let got = store.lexical(&terms, 8, &Filter::default()).unwrap();
        assert_eq!(got.len(), want.len().min(8), "{q}");
        assert!(!got.is_empty(), "{q}");
        for (h, w) in got.iter().zip(&want) {
            assert_eq!((&h.row.path, h.row.start_byte), (&w.1, w.2), "{q}");
            assert!(
                (h.score as f64 - w.0).abs() <= 1e-5 * w.0.abs().max(1.0),
                "{q}: {} vs {}",
                h.score,
                w.0
            );
            assert_eq!(h.bm25, Some(h.score));
        }
    }
    // An identifier as written in code, or as words.
    let hits = lexical_hits(store, "f2_4", 1);
    assert_eq!(hits[0].1, "pkg/mod2.py");
    // Filters apply before the cut.
    let f = Filter {
        lang: None,
        path: Some("pkg/mod1*".into()),
    };
    let got = store
        .lexical(&sembed_index::lexical::query_terms("return x"), 50, &f)
        .unwrap();
    assert_eq!(got.len(), 5);
    assert!(got.iter().all(|h| h.row.path == "pkg/mod1.py"));
    // Stop words only: nothing to match.
    assert!(lexical_hits(store, "the of and", 5).is_empty());
}

/// A lexical search for k hits is the first k of a longer one, however deep the store has to read
/// for them: here 60 chunks tie on the query's term and the filter keeps the last 5 of them.
#[test]
fn a_short_lexical_list_is_the_start_of_a_long_one() {
    let m = model("bert-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir_all(&dir).unwrap();
    for f in 0..12 {
        let src: String = (0..5)
            .map(|i| format!("def g{f}_{i}(x):\n    return x\n\n\n"))
            .collect();
        std::fs::write(dir.join(format!("a{f:02}.py")), src).unwrap();
    }
    let db = tmp.path().join("index.sqlite");
    index(&dir, &db, &m);
    both_ways(&db, a_short_lexical_list_is_the_start_of_a_long_one_on);
}

fn a_short_lexical_list_is_the_start_of_a_long_one_on(store: &mut SqliteStore) {
    let terms = sembed_index::lexical::query_terms("return x");
    let everything = store.lexical(&terms, 100, &Filter::default()).unwrap();
    assert_eq!(everything.len(), 60);
    let key = |h: &store::Hit| (h.score, h.row.path.clone(), h.row.start_byte);
    for path in [None, Some("a11*"), Some("a00.py")] {
        let f = Filter {
            lang: None,
            path: path.map(str::to_string),
        };
        let all = store.lexical(&terms, 100, &f).unwrap();
        for k in [1, 2, 5, 20] {
            let short = store.lexical(&terms, k, &f).unwrap();
            let want: Vec<_> = all.iter().take(k).map(key).collect();
            assert_eq!(
                short.iter().map(key).collect::<Vec<_>>(),
                want,
                "{path:?} k {k}"
            );
        }
    }
}

/// The lexical index follows edits, renames and deletes in the same transactions as the vectors,
/// and an index made before it gains it from its stored rows, embedding nothing.
#[test]
fn lexical_index_follows_the_tree() {
    let m = model("bert-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir);
    std::fs::write(
        dir.join("zoo.py"),
        "def feed_zebra_quickly(n):\n    return n + 1\n",
    )
    .unwrap();
    let db = tmp.path().join("index.sqlite");
    index(&dir, &db, &m);
    let fts_rows = |db: &Path| -> (i64, i64) {
        let c = rusqlite_conn(db);
        let lex: i64 = c
            .query_row("SELECT count(*) FROM lexical", [], |r| r.get(0))
            .unwrap();
        let chunks: i64 = c
            .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
            .unwrap();
        (lex, chunks)
    };
    let (lex, chunks) = fts_rows(&db);
    assert_eq!(lex, chunks);
    // A server's store, open through every change below: its terms in memory follow each revision.
    let mut kept = SqliteStore::open(&db, 20_000).unwrap();
    kept.answer_many();
    same_as_fts(&mut kept, &db);
    let top = |q: &str| {
        let mut s = SqliteStore::open(&db, 20_000).unwrap();
        lexical_hits(&mut s, q, 3)
    };
    assert_eq!(top("zebra")[0].1, "zoo.py");
    assert_eq!(top("feedZebraQuickly")[0].1, "zoo.py");

    // Edit: the old name is gone, the new one found.
    std::fs::write(
        dir.join("zoo.py"),
        "def groom_yak_gently(n):\n    return n + 2\n",
    )
    .unwrap();
    index(&dir, &db, &m);
    assert!(top("zebra").is_empty());
    assert_eq!(top("yak groom")[0].1, "zoo.py");
    same_as_fts(&mut kept, &db);
    // Rename: found under the new path only.
    std::fs::create_dir_all(dir.join("farm")).unwrap();
    std::fs::rename(dir.join("zoo.py"), dir.join("farm/zoo.py")).unwrap();
    let r = index(&dir, &db, &m);
    assert_eq!(r.embedded, 0, "a moved file keeps its vectors: {r:?}");
    let hits = top("yak");
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].1, "farm/zoo.py");
    // Path terms: the folder's name finds it.
    assert_eq!(top("farm")[0].1, "farm/zoo.py");
    same_as_fts(&mut kept, &db);
    // Delete.
    std::fs::remove_file(dir.join("farm/zoo.py")).unwrap();
    index(&dir, &db, &m);
    assert!(top("yak").is_empty());
    let (lex, chunks) = fts_rows(&db);
    assert_eq!(lex, chunks);
    same_as_fts(&mut kept, &db);
    // A new file whose rows may take the deleted rows' ids.
    std::fs::write(dir.join("zz.py"), "def shear_sheep(n):\n    return n - 3\n").unwrap();
    index(&dir, &db, &m);
    same_as_fts(&mut kept, &db);
    assert_eq!(lexical_hits(&mut kept, "sheep", 3)[0].1, "zz.py");
    assert!(lexical_hits(&mut kept, "yak", 3).is_empty());
    std::fs::remove_file(dir.join("zz.py")).unwrap();
    index(&dir, &db, &m);
    same_as_fts(&mut kept, &db);

    // An index from before the lexical index: it is made from the stored rows on open.
    let before = {
        let mut s = SqliteStore::open(&db, 20_000).unwrap();
        lexical_hits(&mut s, "function module", 10)
    };
    {
        let c = rusqlite_conn(&db);
        c.execute_batch("DROP TABLE lexical; DELETE FROM meta WHERE key = 'lexical';")
            .unwrap();
    }
    let after = {
        let mut s = SqliteStore::open(&db, 20_000).unwrap();
        lexical_hits(&mut s, "function module", 10)
    };
    assert_eq!(before, after);
    assert_eq!(before.len(), 10);
    let r = index(&dir, &db, &m);
    assert_eq!((r.embedded, r.added, r.removed), (0, 0, 0), "{r:?}");
}

/// [`repo`] in a scratch folder, indexed with `m`: the folder (kept while it lives), the tree and
/// the index.
fn indexed_repo(m: &dyn Embed) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir);
    let db = tmp.path().join("index.sqlite");
    index(&dir, &db, m);
    (tmp, dir, db)
}

/// A store keeps its rows' terms in memory only when told it answers many searches, and only up to
/// its limit: past it, FTS5 answers, with the same results.
#[test]
fn terms_are_kept_in_memory_up_to_a_limit() {
    let m = model("bert-tiny");
    let (_tmp, _dir, db) = indexed_repo(&m);
    let rows = SqliteStore::open(&db, 20_000).unwrap().count().unwrap();
    let terms = sembed_index::lexical::query_terms("function of module 3");
    let mut fts = SqliteStore::open(&db, 20_000).unwrap();
    let want = fts.lexical(&terms, 10, &Filter::default()).unwrap();
    assert_eq!(fts.lexical_memory_rows(), None);
    for (limit, held) in [(rows, Some(rows)), (rows - 1, None)] {
        let mut s = SqliteStore::open(&db, 20_000).unwrap();
        s.set_memory_rows(limit);
        s.answer_many();
        assert_eq!(s.lexical_memory_rows(), held, "limit {limit}");
        let got = s.lexical(&terms, 10, &Filter::default()).unwrap();
        let key = |h: &store::Hit| (h.score, h.row.clone());
        assert_eq!(
            got.iter().map(key).collect::<Vec<_>>(),
            want.iter().map(key).collect::<Vec<_>>()
        );
    }
}

/// A store keeping its terms in memory ranks lexical searches exactly as FTS5 does on the same
/// index: the same rows, order and scores, with and without a filter.
fn same_as_fts(kept: &mut SqliteStore, db: &Path) {
    same_as_fts_for(
        kept,
        db,
        &[
            "function of module 3",
            "return x",
            "zebra yak groom farm",
            "n",
            "cache strings f2_4",
        ],
        "pkg/mod1*",
    );
}

fn same_as_fts_for(kept: &mut SqliteStore, db: &Path, queries: &[&str], glob: &str) {
    let mut fts = SqliteStore::open(db, 20_000).unwrap();
    let filters = [
        Filter::default(),
        Filter {
            lang: None,
            path: Some(glob.into()),
        },
    ];
    for q in queries {
        let terms = sembed_index::lexical::query_terms(q);
        for f in &filters {
            let ranked = |s: &mut SqliteStore| -> Vec<(f32, store::Row)> {
                let hits = s.lexical(&terms, 20, f).unwrap();
                hits.into_iter().map(|h| (h.score, h.row)).collect()
            };
            assert_eq!(ranked(kept), ranked(&mut fts), "{q} {f:?}");
        }
    }
}

/// Many rounds of edits, deletes and new files under one open store: its terms in memory (rows
/// removed, rows added under reused ids, the index built anew once the dead outnumber the live)
/// rank every query as FTS5 does on the same index.
#[test]
fn terms_in_memory_follow_many_edits() {
    let m = model("bert-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    let words = [
        "parse", "header", "cache", "retry", "socket", "decode", "buffer", "token", "queue", "lock",
    ];
    let mut seed = 12345u64;
    let mut next = |n: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize % n
    };
    let write = |name: &str, next: &mut dyn FnMut(usize) -> usize| {
        let src: String = (0..1 + next(4))
            .map(|i| {
                let (a, b) = (words[next(10)], words[next(10)]);
                let body: Vec<&str> = (0..1 + next(6)).map(|_| words[next(10)]).collect();
                format!("def {a}_{b}_{i}(x):\n    return {}\n\n\n", body.join(" + "))
            })
            .collect();
        std::fs::write(dir.join(name), src).unwrap();
    };
    for f in 0..6 {
        write(&format!("f{f}.py"), &mut next);
    }
    let db = tmp.path().join("index.sqlite");
    index(&dir, &db, &m);
    let mut kept = SqliteStore::open(&db, 20_000).unwrap();
    kept.answer_many();
    let queries = [
        "parse the header",
        "retry socket",
        "decode buffer token",
        "queue lock cache",
        "x",
    ];
    for round in 0..10 {
        for _ in 0..3 {
            write(&format!("f{}.py", next(6)), &mut next);
        }
        let gone = dir.join(format!("f{}.py", next(6)));
        if gone.exists() {
            std::fs::remove_file(&gone).unwrap();
        }
        write(&format!("n{round}.py"), &mut next);
        index(&dir, &db, &m);
        same_as_fts_for(&mut kept, &db, &queries, "f*");
        let rows = SqliteStore::open(&db, 20_000).unwrap().count().unwrap();
        assert_eq!(kept.lexical_memory_rows(), Some(rows), "round {round}");
    }
}

/// Hybrid ranking fuses the scores of the dense and lexical rankings, each 50 deep: cosine over the
/// best cosine plus 0.4 × BM25 over the best BM25, a hit missing from one ranking at its lowest,
/// plus 0.25 × its name match among the candidates.
#[test]
fn hybrid_is_the_fusion_of_both_rankings() {
    let m = model("bert-tiny");
    let (_tmp, _dir, db) = indexed_repo(&m);
    let mut store = SqliteStore::open(&db, 20_000).unwrap();
    use sembed_index::lexical::{name_terms, NameQuery};
    use sembed_index::search::{search, Mode};
    let f = Filter::default();
    for q in ["function 2 of module 1", "grow the box", "cache"] {
        let dense = search(&mut store, &m, q, 50, &f, Mode::Dense).unwrap();
        let lex = search(&mut store, &m, q, 50, &f, Mode::Lexical).unwrap();
        let hyb = search(&mut store, &m, q, 5, &f, Mode::Hybrid).unwrap();
        assert_eq!(hyb.mode, Mode::Hybrid);
        let key = |h: &store::Hit| (h.row.path.clone(), h.row.start_byte, h.row.end_byte);
        let mut want: Vec<(f64, usize, (String, usize, usize))> = Vec::new();
        let mut all: Vec<_> = dense.hits.iter().map(key).collect();
        let mut names: Vec<Vec<String>> = dense
            .hits
            .iter()
            .map(|h| name_terms(h.row.symbol.as_deref().unwrap_or("")))
            .collect();
        for h in &lex.hits {
            if !all.contains(&key(h)) {
                all.push(key(h));
                names.push(name_terms(h.row.symbol.as_deref().unwrap_or("")));
            }
        }
        let refs: Vec<&[String]> = names.iter().map(Vec::as_slice).collect();
        let matches = sembed_index::lexical::name_matches(&NameQuery::new(q), &refs);
        assert!(matches.iter().any(|&x| x > 0.0), "{q}: some name matches");
        let part = |hits: &[store::Hit], k: &(String, usize, usize)| {
            let best = hits.iter().map(|h| h.score as f64).fold(f64::MIN, f64::max);
            let low = hits.iter().map(|h| h.score as f64).fold(f64::MAX, f64::min);
            let s = hits
                .iter()
                .find(|h| &key(h) == k)
                .map_or(low, |h| h.score as f64);
            if hits.is_empty() {
                0.0
            } else {
                s / best
            }
        };
        for (order, k) in all.iter().enumerate() {
            want.push((
                part(&dense.hits, k) + 0.4 * part(&lex.hits, k) + 0.25 * matches[order],
                order,
                k.clone(),
            ));
        }
        want.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let got: Vec<_> = hyb.hits.iter().map(key).collect();
        let want_keys: Vec<_> = want.iter().take(5).map(|w| w.2.clone()).collect();
        assert_eq!(got, want_keys, "{q}");
        for (h, w) in hyb.hits.iter().zip(&want) {
            assert!((h.score as f64 - w.0).abs() < 1e-6, "{q}");
            // Each hit keeps the scores of the rankings it was in.
            let d = dense.hits.iter().find(|x| key(x) == key(h));
            assert_eq!(h.cosine, d.map(|x| x.score), "{q}");
            let l = lex.hits.iter().find(|x| key(x) == key(h));
            assert_eq!(h.bm25, l.map(|x| x.score), "{q}");
        }
    }
}

/// The watcher: an edit, a delete and a rename are indexed like a rerun would index them, and a
/// burst of a thousand changed files (a branch switch) is one run.
#[test]
fn watch_follows_the_tree_and_a_branch_switch_is_one_run() {
    use sembed_index::watch::{Debounce, Indexer};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    repo(&dir);
    let db = dir.join(".sembed/index.sqlite");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let m: Arc<dyn Embed> = Arc::new(model("bert-tiny"));
    let stop = Arc::new(AtomicBool::new(false));
    let mut opts = IndexOptions::new(vec![dir.clone()], dir.clone());
    opts.batch_size = 8;
    let indexer = Arc::new(Indexer::new(
        db.display().to_string(),
        Box::new(SqliteStore::open(&db, 20_000).unwrap()),
        m.clone(),
        opts,
        stop.clone(),
    ));
    let first = indexer.run_once(None).unwrap();
    assert_eq!(first.embedded, first.chunks);
    let runs = Arc::new(std::sync::Mutex::new(Vec::<Report>::new()));
    let watcher = {
        let (indexer, runs) = (indexer.clone(), runs.clone());
        std::thread::spawn(move || {
            let debounce = Debounce {
                quiet: Duration::from_millis(700),
                max_delay: Duration::from_secs(30),
            };
            indexer
                .watch(debounce, &mut |r, _| {
                    runs.lock().unwrap().push(r.as_ref().unwrap().clone())
                })
                .unwrap();
        })
    };
    let wait = |n: usize| {
        let t = Instant::now();
        while runs.lock().unwrap().len() < n {
            assert!(t.elapsed() < Duration::from_secs(60), "run {n} never came");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        runs.lock().unwrap()[n - 1].clone()
    };
    while !indexer.status().watching {
        std::thread::sleep(Duration::from_millis(20));
    }
    // What a plain rerun over the same tree stores, to compare with.
    let expect = |tag: &str| {
        let fresh = tempfile::tempdir().unwrap();
        let other = fresh.path().join("x.sqlite");
        index(&dir, &other, m.as_ref());
        assert_eq!(rows(&db, m.as_ref()), rows(&other, m.as_ref()), "{tag}");
    };

    // An edit: one file read again, its new function embedded.
    let mod1 = dir.join("pkg/mod1.py");
    let mut src = std::fs::read_to_string(&mod1).unwrap();
    src.push_str("def watched_edit(y):\n    return y * y\n");
    std::fs::write(&mod1, src).unwrap();
    let r = wait(1);
    assert_eq!(
        (r.files_changed, r.added, r.embedded, r.removed),
        (1, 1, 1, 0),
        "{r:?}"
    );
    assert_eq!(indexer.status().pending, 0);
    expect("after an edit");

    // A delete and a rename.
    std::fs::remove_file(dir.join("pkg/mod2.py")).unwrap();
    std::fs::rename(dir.join("pkg/mod3.py"), dir.join("pkg/renamed.py")).unwrap();
    let r = wait(2);
    assert_eq!((r.files_changed, r.files_removed), (1, 2), "{r:?}");
    expect("after a delete and a rename");

    // A branch switch: a thousand files written in one burst, in new folders too.
    for b in 0..10 {
        let sub = dir.join(format!("branch/b{b}"));
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..100 {
            std::fs::write(
                sub.join(format!("m{i}.py")),
                format!("def g{b}_{i}(x):\n    return x + {i}\n"),
            )
            .unwrap();
        }
    }
    let r = wait(3);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        runs.lock().unwrap().len(),
        3,
        "the burst took more than one run"
    );
    assert_eq!(r.files_changed, 1000, "{r:?}");
    expect("after a branch switch");
    // Writes under hidden folders (.git, the index's own .sembed) are no changes.
    std::fs::create_dir_all(dir.join(".git")).unwrap();
    std::fs::write(dir.join(".git/HEAD"), "ref: refs/heads/other\n").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(runs.lock().unwrap().len(), 3);
    assert_eq!(indexer.status().stale_seconds(), 0.0);

    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    assert!(!indexer.status().watching);
}

/// With the model's own tokenizer: code outside definitions longer than the model reads is cut into
/// pieces that each fit (counted whole, not stopped at the model's maximum), a long definition stays
/// one chunk, and an explicit `chunk_tokens` splits definitions too.
#[test]
fn long_code_is_cut_to_the_model_and_definitions_stay_whole() {
    let m = model("bert-tiny");
    let max = m.max_length();
    assert!(max < 100, "{max}: the texts below are several times longer");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    let body: String = (0..60)
        .map(|i| format!("    total_{i} = accumulate(values, {i})\n"))
        .collect();
    let top: String = (0..60)
        .map(|i| format!("LIMIT_{i} = configure(options, {i})\n"))
        .collect();
    std::fs::write(
        dir.join("m.py"),
        format!("def summarise(values):\n{body}    return values\n\n{top}"),
    )
    .unwrap();
    let whole = |text: &str| {
        let opts = sembed::EmbedOptions {
            role: Some(sembed::InputRole::Document),
            truncate: false,
            ..Default::default()
        };
        m.count_tokens(&[text.to_string()], &opts).ok()
    };
    for (split, tweak) in [(false, None), (true, Some(max / 2))] {
        let db = tmp.path().join(format!("index-{split}.sqlite"));
        let report = index_with(&dir, &db, &m, |o| o.chunk_tokens = tweak, &mut ());
        let mut store = SqliteStore::open(&db, 20_000).unwrap();
        let all: Vec<store::Row> = store.rows().unwrap().into_iter().map(|r| r.0).collect();
        let def: Vec<&store::Row> = all
            .iter()
            .filter(|r| r.symbol.as_deref() == Some("summarise"))
            .collect();
        let code: Vec<&store::Row> = all.iter().filter(|r| r.kind == "code").collect();
        let budget = tweak.unwrap_or(max);
        assert!(code.len() > 3, "{split}: {} code pieces", code.len());
        for r in code
            .iter()
            .chain(if split { def.iter() } else { [].iter() })
        {
            let n = whole(&r.text);
            assert!(
                n.as_ref().is_some_and(|n| n[0] <= budget),
                "{split}: lines {}-{}: {n:?} tokens",
                r.start_line,
                r.end_line
            );
        }
        if split {
            assert!(def.len() > 3, "{} pieces", def.len());
            assert_eq!(report.split, 2);
        } else {
            assert_eq!(def.len(), 1);
            assert_eq!((def[0].start_line, def[0].end_line), (1, 62));
            assert_eq!(whole(&def[0].text), None, "longer than the model reads");
            assert_eq!(report.split, 1);
        }
    }
}
