//! `sembed index` and `sembed search` as a user runs them: two commands in a repository, JSON for
//! scripts, Ctrl-C and a rerun that continues, clear errors, and `serve --index` answering the same.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

mod common;

use common::{fixtures, ok, sembed_in, tiny};

fn repo(dir: &Path, modules: usize, functions: usize) {
    for f in std::fs::read_dir(fixtures().join("code")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir_all(dir.join("pkg")).unwrap();
    for m in 0..modules {
        let mut src = String::new();
        for i in 0..functions {
            src.push_str(&format!(
                "def f{m}_{i}(x):\n    \"\"\"Function {i} of module {m}.\"\"\"\n    return x * {i} + {m}\n\n\n"
            ));
        }
        std::fs::write(dir.join(format!("pkg/mod{m}.py")), src).unwrap();
    }
}

/// The README's two commands, run inside the repository: the index lands in .sembed/, and search
/// finds it from a subfolder.
#[test]
fn index_then_search_in_two_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    repo(dir, 2, 3);
    let model = tiny();
    let o = sembed_in(dir, &["index", "-m", &model, "--json"]);
    let report: serde_json::Value = serde_json::from_str(ok(&o).trim()).unwrap();
    assert!(dir.join(".sembed/index.sqlite").is_file());
    // The index folder ignores itself for git.
    assert_eq!(
        std::fs::read_to_string(dir.join(".sembed/.gitignore"))
            .unwrap()
            .lines()
            .last(),
        Some("*")
    );
    let chunks = report["chunks"].as_u64().unwrap();
    assert_eq!(report["embedded"].as_u64(), Some(chunks));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains(&format!("{chunks} chunks")), "{stderr}");

    // Human output: rank, score, path:start-end, kind and symbol, then the snippet.
    let out = ok(&sembed_in(
        &dir.join("pkg"),
        &["search", "a cache of strings", "-k", "3"],
    ));
    let first = out.lines().next().unwrap();
    assert!(first.trim_start().starts_with("1. "), "{out}");
    let re_loc = first.split_whitespace().nth(2).unwrap();
    let (path, lines) = re_loc.split_once(':').unwrap();
    let (a, b) = lines.split_once('-').unwrap();
    assert!(dir.join(path).is_file(), "{out}");
    assert!(a.parse::<usize>().unwrap() <= b.parse::<usize>().unwrap());
    assert_eq!(
        out.lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric) && l.contains(". "))
            .count(),
        3,
        "{out}"
    );

    // JSON: hits with every stored field, best first; the snippet is the stored text.
    let json = ok(&sembed_in(
        dir,
        &[
            "search",
            "Function 2 of module 1",
            "--json",
            "-k",
            "5",
            "--lang",
            "python",
            "--path",
            "pkg/*",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let hits = v["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 5);
    assert_eq!(v["method"], "exact");
    let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    for h in hits {
        assert_eq!(h["lang"], "python");
        assert!(h["path"].as_str().unwrap().starts_with("pkg/"));
        let text = std::fs::read_to_string(dir.join(h["path"].as_str().unwrap())).unwrap();
        let (s, e) = (
            h["start_byte"].as_u64().unwrap() as usize,
            h["end_byte"].as_u64().unwrap() as usize,
        );
        assert_eq!(&text[s..e], h["text"].as_str().unwrap());
        assert_eq!(h["hash"].as_str().unwrap().len(), 64);
    }
}

#[test]
fn search_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    // No index anywhere up the tree.
    let o = sembed_in(tmp.path(), &["search", "x"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("no index here") && e.contains("sembed index"),
        "{e}"
    );
    // A --db that is not there is not created.
    let missing = tmp.path().join("nope.sqlite");
    let o = sembed_in(
        tmp.path(),
        &["search", "x", "--db", missing.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such index"));
    assert!(!missing.exists());
    // A file that is not an index.
    let junk = tmp.path().join("junk.sqlite");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let o = sembed_in(tmp.path(), &["search", "x", "--db", junk.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("junk.sqlite") && e.contains("not a sembed index"),
        "{e}"
    );
    // Another model into the same index: refused, the index untouched.
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir, 1, 2);
    ok(&sembed_in(&dir, &["index", "-m", &tiny(), "-q"]));
    let qwen = fixtures().join("qwen2-bidir-tiny").display().to_string();
    let o = sembed_in(&dir, &["index", "-m", &qwen, "-q"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("bert-tiny") && e.contains("--replace"),
        "{e}"
    );
    ok(&sembed_in(&dir, &["search", "x"]));
}

/// Ctrl-C keeps what is written and exits 130; the same command then continues where it stopped and
/// the index equals one made without interruption.
#[cfg(unix)]
#[test]
fn ctrl_c_keeps_progress_and_a_rerun_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir, 700, 12);
    let model = tiny();
    let db = tmp.path().join("cut.sqlite");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sembed"))
        .args([
            "index",
            "-m",
            &model,
            "--batch-size",
            "8",
            "-q",
            "--json",
            "--db",
        ])
        .arg(&db)
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first committed batch, then interrupt.
    let wal = db.with_extension("sqlite-wal");
    let t = std::time::Instant::now();
    while std::fs::metadata(&wal).map_or(0, |m| m.len()) < 200_000 {
        assert!(t.elapsed().as_secs() < 120, "no batch committed");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the interrupt"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let cut: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(cut["interrupted"], true);

    let o = sembed_in(
        &dir,
        &[
            "index",
            "-m",
            &model,
            "-q",
            "--json",
            "--db",
            db.to_str().unwrap(),
        ],
    );
    let rest: serde_json::Value = serde_json::from_str(ok(&o).trim()).unwrap();
    let total = rest["chunks"].as_u64().unwrap();
    assert!(rest["unchanged"].as_u64().unwrap() > 0, "{rest}");
    assert!(rest["embedded"].as_u64().unwrap() < total, "{rest}");
    assert_eq!(rest["interrupted"], false);

    let whole = tmp.path().join("whole.sqlite");
    ok(&sembed_in(
        &dir,
        &["index", "-m", &model, "-q", "--db", whole.to_str().unwrap()],
    ));
    for q in [
        "Function 7 of module 300",
        "grow the box",
        "a cache of strings",
    ] {
        let a = ok(&sembed_in(
            &dir,
            &["search", q, "--json", "--db", db.to_str().unwrap()],
        ));
        let b = ok(&sembed_in(
            &dir,
            &["search", q, "--json", "--db", whole.to_str().unwrap()],
        ));
        let hits =
            |s: &str| serde_json::from_str::<serde_json::Value>(s.trim()).unwrap()["hits"].clone();
        assert_eq!(hits(&a), hits(&b), "{q}");
    }
}

fn post(port: u16, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status: u16 = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp.split_once("\r\n\r\n").unwrap().1;
    // Chunked or not, the JSON object is between the first '{' and the last '}'.
    let json = &body[body.find('{').unwrap()..=body.rfind('}').unwrap()];
    (status, serde_json::from_str(json).unwrap())
}

/// `sembed serve --index DB EXTRA…` on a free loopback port, once it accepts connections.
fn serve_index(db: &Path, extra: &[&str]) -> (std::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Command::new(env!("CARGO_BIN_EXE_sembed"))
        .args([
            "serve",
            "--index",
            db.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed().as_secs() < 60, "server did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (server, port)
}

/// `serve --index` answers `POST /search` with the hits `sembed search --json` prints.
#[test]
fn server_search_equals_cli_search() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir, 3, 4);
    let model = tiny();
    ok(&sembed_in(&dir, &["index", "-m", &model, "-q"]));
    let (mut server, port) = serve_index(&dir.join(".sembed/index.sqlite"), &[]);
    let cli = ok(&sembed_in(
        &dir,
        &[
            "search",
            "grow the box",
            "--json",
            "-k",
            "4",
            "--lang",
            "python",
        ],
    ));
    let cli: serde_json::Value = serde_json::from_str(cli.trim()).unwrap();
    let (status, served) = post(
        port,
        "/search",
        r#"{"query": "grow the box", "k": 4, "lang": "python"}"#,
    );
    let (bad, err) = post(port, "/search", r#"{"query": "x", "k": 0}"#);
    // Every mode, each as the CLI ranks it.
    let mut modes = Vec::new();
    for mode in ["dense", "lexical", "hybrid"] {
        let cli = ok(&sembed_in(
            &dir,
            &[
                "search",
                "function of module",
                "--json",
                "-k",
                "3",
                "--mode",
                mode,
            ],
        ));
        let cli: serde_json::Value = serde_json::from_str(cli.trim()).unwrap();
        let body = format!(r#"{{"query": "function of module", "k": 3, "mode": "{mode}"}}"#);
        modes.push((mode, cli, post(port, "/search", &body)));
    }
    let (bad_mode, mode_err) = post(port, "/search", r#"{"query": "x", "mode": "fuzzy"}"#);
    // A language no chunk can have is an error naming those there are (not an empty answer), in
    // every way of asking; its case does not matter.
    let (bad_lang, lang_err) = post(port, "/search", r#"{"query": "x", "lang": "pyhton"}"#);
    let (upper, upper_hits) = post(port, "/search", r#"{"query": "x", "lang": "Python"}"#);
    let cli_lang = sembed_in(&dir, &["search", "x", "--lang", "pyhton"]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(status, 200, "{served}");
    assert_eq!(served["hits"], cli["hits"]);
    assert_eq!(served["mode"], "hybrid");
    assert_eq!(served["hits"].as_array().unwrap().len(), 4);
    assert_eq!(bad, 422, "{err}");
    assert!(err["error"].as_str().unwrap().contains("`k`"), "{err}");
    for (mode, cli, (status, served)) in modes {
        assert_eq!(status, 200, "{served}");
        assert_eq!(served["mode"], mode);
        assert_eq!(cli["mode"], mode);
        assert_eq!(served["hits"], cli["hits"], "{mode}");
        assert_eq!(served["hits"].as_array().unwrap().len(), 3, "{mode}");
        let hit = &served["hits"][0];
        match mode {
            "dense" => assert!(hit["bm25"].is_null() && hit["cosine"] == hit["score"]),
            "lexical" => {
                assert_eq!(served["method"], "lexical");
                assert!(hit["cosine"].is_null() && hit["bm25"] == hit["score"]);
            }
            // Hybrid: each ranking's score over its best, the lexical one weighted 0.4, and the
            // name match (at most 1) 0.25.
            _ => {
                let s = hit["score"].as_f64().unwrap();
                assert!(s > 0.0 && s <= 1.65 + 1e-6, "{s}");
                assert_eq!(served["lexical_weight"], 0.4);
                assert_eq!(served["name_weight"], 0.25);
            }
        }
    }
    assert_eq!(bad_mode, 422, "{mode_err}");
    assert_eq!(bad_lang, 422, "{lang_err}");
    assert!(
        lang_err["error"]
            .as_str()
            .unwrap()
            .contains("`pyhton`: one of rust, python, elixir"),
        "{lang_err}"
    );
    assert_eq!(upper, 200, "{upper_hits}");
    assert!(!upper_hits["hits"].as_array().unwrap().is_empty());
    assert!(!cli_lang.status.success());
    let stderr = String::from_utf8_lossy(&cli_lang.stderr);
    assert!(stderr.contains("`pyhton`: one of rust, python"), "{stderr}");
    assert!(
        mode_err["error"]
            .as_str()
            .unwrap()
            .contains("dense, lexical, hybrid"),
        "{mode_err}"
    );
}

/// `sembed mine` over every language, with hard negatives from a base model: each training pair gets
/// them, never its own positive, always another pair's code.
#[test]
fn mine_every_language_with_hard_negatives() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("mine");
    let out = tmp.path().join("pairs.jsonl");
    let o = sembed_in(
        tmp.path(),
        &[
            "mine",
            src.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--hard-negatives",
            "2",
            // No false-negative rule: a tiny random model's scores mean nothing.
            "--margin=-10",
            "-m",
            &tiny(),
        ],
    );
    ok(&o);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 12);
    let exts: std::collections::BTreeSet<String> = rows
        .iter()
        .map(|r| {
            r["file"]
                .as_str()
                .unwrap()
                .rsplit('.')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        exts.into_iter().collect::<Vec<_>>(),
        ["ex", "go", "java", "js", "py", "rs", "ts"]
    );
    let positives: Vec<&str> = rows
        .iter()
        .map(|r| r["positive"].as_str().unwrap())
        .collect();
    for r in &rows {
        let negs = r["negatives"].as_array().unwrap();
        assert_eq!(negs.len(), 2, "{r}");
        for n in negs {
            let n = n.as_str().unwrap();
            assert_ne!(n, r["positive"].as_str().unwrap());
            assert!(positives.contains(&n));
        }
    }
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("24 hard negatives for 12 pairs"), "{e}");
}

/// `sembed tune` end to end on a tiny model: every setting of the grid trained and scored, the best
/// picked by held-out NDCG@10, the table and the command written, no trial model left behind.
#[test]
fn tune_tries_each_setting_and_picks_the_best() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = |from: usize, n: usize| -> String {
        (from..from + n)
            .map(|i| {
                serde_json::json!({
                    "anchor": format!("Multiply the value by {i} and add {}.", i % 7),
                    "positive": format!("def scale_{i}(x):\n    return x * {i} + {}", i % 7),
                })
                .to_string()
                    + "\n"
            })
            .collect()
    };
    let data = tmp.path().join("train.jsonl");
    let held = tmp.path().join("held.jsonl");
    std::fs::write(&data, pairs(0, 40)).unwrap();
    std::fs::write(&held, pairs(100, 20)).unwrap();
    let out = tmp.path().join("tune");
    let o = sembed_in(
        tmp.path(),
        &[
            "tune",
            "-m",
            &tiny(),
            "--data",
            data.to_str().unwrap(),
            "--eval",
            held.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--lr",
            "1e-4,3e-3",
            "--batch-size",
            "8,16",
            "--max-trials",
            "3",
        ],
    );
    let table = ok(&o);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tune.json")).unwrap()).unwrap();
    let trials = v["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 3, "bounded by --max-trials");
    let settings: Vec<(f64, u64)> = trials
        .iter()
        .map(|t| (t["lr"].as_f64().unwrap(), t["batch_size"].as_u64().unwrap()))
        .collect();
    assert_eq!(settings, vec![(1e-4, 8), (3e-3, 8), (1e-4, 16)]);
    assert_eq!(trials[0]["steps"], 5);
    let best = trials
        .iter()
        .map(|t| t["metrics"]["ndcg_at_10"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert_eq!(v["best"]["metrics"]["ndcg_at_10"].as_f64().unwrap(), best);
    assert!(v["base"]["ndcg_at_10"].is_number());
    assert!(v["command"]
        .as_str()
        .unwrap()
        .starts_with("sembed train --data"));
    // The trained models differ from the base and from each other: training happened.
    let scores: std::collections::HashSet<String> = trials
        .iter()
        .map(|t| format!("{:.6}", t["metrics"]["mrr_at_10"].as_f64().unwrap()))
        .collect();
    assert!(scores.len() > 1, "{table}");
    assert_eq!(
        table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| lr"))
            .count(),
        3,
        "{table}"
    );
    assert!(std::fs::read_to_string(out.join("tune.md"))
        .unwrap()
        .contains("Best: `sembed train"));
    assert!(!out.join("trial-0").exists());
}

/// `serve --index … --watch` keeps the index it serves current: a function added to a file is found
/// by `POST /search` once the watcher has run, without a restart.
#[test]
fn served_index_follows_an_edit_with_watch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    std::fs::create_dir(&dir).unwrap();
    repo(&dir, 2, 2);
    let model = tiny();
    ok(&sembed_in(&dir, &["index", "-m", &model, "-q"]));
    let (mut server, port) = serve_index(
        &dir.join(".sembed/index.sqlite"),
        &["--watch", "--debounce-ms", "200"],
    );
    let query = r#"{"query": "xylophone", "k": 1, "mode": "lexical"}"#;
    let (status, before) = post(port, "/search", query);
    assert_eq!(status, 200, "{before}");
    assert!(before["hits"].as_array().unwrap().is_empty(), "{before}");
    let file = std::fs::read_dir(dir.join("pkg"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "py"))
        .unwrap();
    let mut src = std::fs::read_to_string(&file).unwrap();
    src.push_str("\n\ndef xylophone_fold(q):\n    return hash(q)\n");
    std::fs::write(&file, src).unwrap();
    let t = std::time::Instant::now();
    let found = loop {
        let (_, r) = post(port, "/search", query);
        let hits = r["hits"].as_array().unwrap().clone();
        if !hits.is_empty() || t.elapsed().as_secs() > 60 {
            break hits;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(found.len(), 1, "the edit was never indexed");
    assert_eq!(found[0]["symbol"], "xylophone_fold", "{found:?}");
}
