//! `sembed adapt` as a user runs it: pairs mined from a repository and an `--also` folder, a held-out
//! split by file that never trains, the model kept only when it scores better (then the index is
//! rebuilt with it and search uses it), and clear refusals.

mod common;

use common::{ok, sembed_in, tiny};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;

const WORDS: [&str; 16] = [
    "apple", "river", "cloud", "engine", "garden", "pencil", "rocket", "violin", "castle",
    "forest", "marble", "candle", "harbor", "jacket", "ladder", "meadow",
];

/// `files` Python files of documented functions. The code names the words its documentation names
/// with a `z` appended and its number in letters, so that no term is shared: BM25 cannot pair a doc
/// with its code (the words are other terms), the tiny base model pairs them poorly, and fine-tuning
/// learns to (the words' pieces are shared).
fn python_repo(dir: &Path, files: usize, per_file: usize, salt: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let spell = |w: &str| format!("{w}z");
    let letters = |mut n: usize| {
        let mut s = String::new();
        loop {
            s.push((b'a' + (n % 26) as u8) as char);
            n /= 26;
            if n == 0 {
                break s;
            }
        }
    };
    for f in 0..files {
        let mut src = String::new();
        for i in 0..per_file {
            let n = salt + f * per_file + i;
            let (a, b) = (WORDS[n % 16], WORDS[(n / 16 + n * 7 + 3) % 16]);
            let (ra, rb, ln) = (spell(a), spell(b), letters(n));
            src.push_str(&format!(
                "def {ra}_{rb}_q{ln}(x):\n    \"\"\"Return the {a} weight of the {b} number {n}.\"\"\"\n    return x.{ra} * 3 + x.{rb}\n\n\n"
            ));
        }
        std::fs::write(dir.join(format!("m{f}.py")), src).unwrap();
    }
}

fn report(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap()
}

fn pairs(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn adapt_keeps_a_better_model_and_reindexes_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let also = tmp.path().join("other");
    python_repo(&repo, 10, 8, 0);
    python_repo(&also, 10, 8, 500);
    // Vendored copies of the repository's code: those of held-out functions must not train.
    let copies: String = (0..10)
        .map(|f| std::fs::read_to_string(repo.join(format!("m{f}.py"))).unwrap())
        .collect();
    std::fs::write(also.join("copies.py"), copies).unwrap();
    let model = tiny();
    let o = sembed_in(
        &repo,
        &[
            "adapt",
            "-m",
            &model,
            "--also",
            also.to_str().unwrap(),
            "--min-heldout",
            "20",
            "--epochs",
            "4",
            "--lr",
            "5e-4",
            "--batch-size",
            "16",
            "-q",
        ],
    );
    let out = ok(&o);
    let r = report(&out);
    assert_eq!(r["heldout_from"], "repository", "{r}");
    assert_eq!(r["repository_pairs"], 80);
    assert_eq!(r["also_pairs"], 160);
    assert_eq!(r["dropped_overlapping"], r["heldout_pairs"], "{r}");
    let (base, adapted) = (
        r["base"]["hybrid"]["ndcg_at_10"].as_f64().unwrap(),
        r["adapted"]["hybrid"]["ndcg_at_10"].as_f64().unwrap(),
    );
    assert!(adapted > base, "the fine-tuned model should win here: {r}");
    // Each side's hybrid score is the best of the weights it tried.
    for side in ["base", "adapted"] {
        let tried = r[side]["hybrid_ndcg_at_10"].as_array().unwrap();
        assert_eq!(tried.len(), 5);
        let best = tried
            .iter()
            .map(|t| t[1].as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(best, r[side]["hybrid"]["ndcg_at_10"].as_f64().unwrap());
    }
    assert_eq!(r["kept"], true);

    // The split is by file, and nothing held out trains.
    let record = repo.join(".sembed/model.adapt");
    let train = pairs(&record.join("train.jsonl"));
    let held = pairs(&record.join("heldout.jsonl"));
    assert_eq!(train.len() as u64, r["train_pairs"].as_u64().unwrap());
    assert_eq!(held.len() as u64, r["heldout_pairs"].as_u64().unwrap());
    let files = |rows: &[Value]| -> HashSet<String> {
        rows.iter()
            .map(|p| p["file"].as_str().unwrap().to_string())
            .collect()
    };
    let (tf, hf) = (files(&train), files(&held));
    assert!(tf.is_disjoint(&hf), "{tf:?} {hf:?}");
    assert!(hf.iter().all(|f| f.contains("/repo/")), "{hf:?}");
    assert!(tf.iter().any(|f| f.contains("/other/")), "--also trains");
    let held_anchors: HashSet<&str> = held.iter().map(|p| p["anchor"].as_str().unwrap()).collect();
    assert!(train
        .iter()
        .all(|p| !held_anchors.contains(p["anchor"].as_str().unwrap())));
    // Positives carry the index's header line: the file's name and the symbol.
    let p = &train[0];
    let file = Path::new(p["file"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let first = p["positive"].as_str().unwrap().lines().next().unwrap();
    assert_eq!(first, format!("{file} {}", p["symbol"].as_str().unwrap()));
    assert!(
        p["negatives"].as_array().is_some_and(|n| n.len() == 1),
        "{p}"
    );

    // The kept model is in .sembed/model, the index was rebuilt with it, and search uses it.
    let kept = repo.join(".sembed/model");
    assert!(kept.join("config.json").is_file() && kept.join("adapt.json").is_file());
    assert!(!repo.join(".sembed/model.training").exists());
    let s = ok(&sembed_in(
        &repo,
        &["search", "Return the castle weight", "--json"],
    ));
    let v: Value = serde_json::from_str(s.trim()).unwrap();
    // The weight chosen on the held-out pairs travels with the model into the index's hybrid search.
    assert_eq!(v["lexical_weight"], r["lexical_weight"], "{v}");
    assert_eq!(r["lexical_weight"], r["adapted"]["lexical_weight"]);
    assert_eq!(v["name_weight"], r["name_weight"], "{v}");
    assert_eq!(r["name_weight"], r["adapted"]["name_weight"]);
    assert_eq!(r["name_weight"], 0.0, "an adapted model reads names itself");
    assert_eq!(
        r["base"]["name_weight"], 0.25,
        "the base searches with the default"
    );
    let o = sembed_in(&repo, &["search", "-m", &model, "Return the castle weight"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("model"),
        "the index is the adapted model's, not the base's: {e}"
    );
    assert!(!v["hits"].as_array().unwrap().is_empty());
}

#[test]
fn adapt_discards_a_model_that_is_not_better() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    python_repo(&repo, 10, 8, 0);
    let model = tiny();
    // A learning rate of zero trains nothing: the same scores, so the base stays.
    let o = sembed_in(
        &repo,
        &[
            "adapt",
            "-m",
            &model,
            "--min-heldout",
            "20",
            "--lr",
            "0",
            "--batch-size",
            "16",
            "-q",
        ],
    );
    let r = report(&ok(&o));
    assert_eq!(r["kept"], false, "{r}");
    assert_eq!(r["base"]["dense"], r["adapted"]["dense"]);
    assert_eq!(r["base"]["hybrid"], r["adapted"]["hybrid"]);
    assert_eq!(r["lexical_weight"], Value::Null);
    assert_eq!(r["name_weight"], Value::Null);
    assert!(!repo.join(".sembed/model").exists());
    assert!(!repo.join(".sembed/model.training").exists());
    assert!(repo.join(".sembed/model.adapt/report.json").is_file());
    assert!(!repo.join(".sembed/index.sqlite").exists(), "no re-index");
}

#[test]
fn adapt_refuses_what_would_leak_or_cannot_be_scored() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    python_repo(&repo, 4, 4, 0);
    python_repo(&repo.join("sub"), 2, 4, 100);
    let model = tiny();
    let err = |args: &[&str]| {
        let o = sembed_in(&repo, args);
        assert!(!o.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = err(&["adapt", "-m", &model, "--also", "sub"]);
    assert!(
        e.contains("--also") && e.contains("overlaps the repository"),
        "{e}"
    );
    let e = err(&["adapt", "-m", &model, "--also", ".."]);
    assert!(e.contains("overlaps the repository"), "{e}");
    // 24 pairs, none elsewhere: too few to hold out.
    let e = err(&["adapt", "-m", &model]);
    assert!(e.contains("--min-heldout 100"), "{e}");
    let e = err(&["adapt", "-m", &model, "--also", "/no/such/folder"]);
    assert!(e.contains("/no/such/folder: no such file or folder"), "{e}");
}

/// The lexical weight in a model folder's adapt.json is the one its index's hybrid search fuses
/// with: every hybrid score is its cosine over the best plus w times its BM25 over the best.
#[test]
fn a_models_lexical_weight_reaches_hybrid_search() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    python_repo(&repo, 3, 4, 0);
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in std::fs::read_dir(common::fixtures().join("bert-tiny")).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(model.join("adapt.json"), r#"{"lexical_weight": 0.25}"#).unwrap();
    ok(&sembed_in(
        &repo,
        &["index", "-m", model.to_str().unwrap(), "-q"],
    ));
    let search_for = |query: &str, mode: &str| -> Value {
        let s = ok(&sembed_in(
            &repo,
            &["search", query, "--json", "-k", "12", "--mode", mode],
        ));
        serde_json::from_str(s.trim()).unwrap()
    };
    let search = |mode: &str| search_for("castle weight number", mode);
    let (h, d, l) = (search("hybrid"), search("dense"), search("lexical"));
    assert_eq!(h["lexical_weight"], 0.25, "{h}");
    // Adapted before the name match: its weights were chosen without it.
    assert_eq!(h["name_weight"], 0.0, "{h}");
    assert_eq!(d["lexical_weight"], Value::Null);
    // A ranking's part: the hit's score over the ranking's best, or its lowest where it is absent.
    let part = |v: &Value, path: &Value, start: &Value| {
        let hits = v["hits"].as_array().unwrap();
        let scores: Vec<f64> = hits.iter().map(|x| x["score"].as_f64().unwrap()).collect();
        let best = scores.iter().copied().fold(f64::MIN, f64::max);
        let low = scores.iter().copied().fold(f64::MAX, f64::min);
        hits.iter()
            .find(|x| &x["path"] == path && &x["start_line"] == start)
            .map_or(low, |x| x["score"].as_f64().unwrap())
            / best
    };
    assert!(!l["hits"].as_array().unwrap().is_empty());
    for hit in h["hits"].as_array().unwrap() {
        let (p, s) = (&hit["path"], &hit["start_line"]);
        let want = part(&d, p, s) + 0.25 * part(&l, p, s);
        let got = hit["score"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-6, "{hit}: {got} vs {want}");
    }

    // A model that carries a name weight: each hit gains it times the share of its name's words in
    // the query (the names are `{word}z_{word}z_q{letters}`: here a third or two thirds of theirs).
    std::fs::write(
        model.join("adapt.json"),
        r#"{"lexical_weight": 0.25, "name_weight": 0.5}"#,
    )
    .unwrap();
    ok(&sembed_in(
        &repo,
        &["index", "-m", model.to_str().unwrap(), "-q"],
    ));
    let query = "castlez applez weight";
    let (h, d, l) = (
        search_for(query, "hybrid"),
        search_for(query, "dense"),
        search_for(query, "lexical"),
    );
    assert_eq!(h["name_weight"], 0.5, "{h}");
    let q = sembed_index::lexical::NameQuery::new(query);
    // The name match is relative to the candidates: here every chunk (12 functions, 12 hits).
    let hits = h["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 12, "{h}");
    let names: Vec<Vec<String>> = hits
        .iter()
        .map(|x| sembed_index::lexical::name_terms(x["symbol"].as_str().unwrap_or("")))
        .collect();
    let refs: Vec<&[String]> = names.iter().map(Vec::as_slice).collect();
    let matches = sembed_index::lexical::name_matches(&q, &refs);
    let mut named = 0;
    for (hit, m) in hits.iter().zip(matches) {
        let (p, s) = (&hit["path"], &hit["start_line"]);
        named += usize::from(m > 0.0);
        let want = part(&d, p, s) + 0.25 * part(&l, p, s) + 0.5 * m;
        let got = hit["score"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-6, "{hit}: {got} vs {want}");
    }
    assert!(named > 0, "some hit's name is in the query: {h}");
}
