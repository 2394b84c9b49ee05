//! `sembed embed` and `sembed inspect` through the real binary, on the tiny golden models.

mod common;

use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn sembed(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sembed"))
        .args(args)
        .env("SEMBED_MODEL", fixtures().join("bert-tiny"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(input) = stdin {
        pipe.write_all(input).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn ok_lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn err_text(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty(), "no partial output on error");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn golden(model: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("cases").join(format!("{model}.json"))).unwrap(),
    )
    .unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn embeds_arguments_in_order_matching_golden() {
    let g = golden("bert-tiny");
    let cases = g["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let mut args = vec!["embed", "--batch-size", "3"];
    args.extend(&texts);
    let rows = ok_lines(&sembed(&args, None));
    assert_eq!(rows.len(), texts.len());
    for (i, (row, case)) in rows.iter().zip(cases).enumerate() {
        assert_eq!(row["index"], i);
        assert!(
            max_abs(
                &floats(&row["embedding"]),
                &floats(&case["embedding_normalized"])
            ) <= 1e-5
        );
    }
}

#[test]
fn jsonl_and_plain_lines_from_stdin_and_files() {
    let rows = ok_lines(&sembed(
        &["embed", "-i", "-"],
        Some(b"{\"text\":\"a\",\"id\":7}\n{\"text\":\"\"}\n"),
    ));
    assert_eq!(rows.len(), 2);
    let lines = ok_lines(&sembed(&["embed", "-i", "-", "--lines"], Some(b"a\n\n")));
    assert_eq!(lines.len(), 2, "the empty line is a text");
    assert_eq!(rows[0]["embedding"], lines[0]["embedding"]);
    assert_eq!(rows[1]["embedding"], lines[1]["embedding"]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"text\":\"a\"}\n").unwrap();
    let out_path = dir.path().join("out.jsonl");
    let out = sembed(
        &[
            "embed",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out_path.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success());
    let written: Value =
        serde_json::from_str(std::fs::read_to_string(&out_path).unwrap().trim()).unwrap();
    // Alone rather than in a padded batch of two: equal up to float rounding.
    assert!(
        max_abs(
            &floats(&written["embedding"]),
            &floats(&rows[0]["embedding"])
        ) <= 1e-6
    );
}

#[test]
fn malformed_input_names_the_line() {
    let e = err_text(&sembed(
        &["embed", "-i", "-"],
        Some(b"{\"text\":\"a\"}\nnot json\n"),
    ));
    assert!(e.contains("stdin:2"), "{e}");
    let e = err_text(&sembed(
        &["embed", "-i", "-", "--lines"],
        Some(b"ok\n\xc3\x28\n"),
    ));
    assert!(e.contains("stdin:2: not valid UTF-8"), "{e}");
    let e = err_text(&sembed(&["embed"], None));
    assert!(e.contains("no texts"), "{e}");
    let e = err_text(&sembed(&["embed", "-i", "-"], Some(b"")));
    assert!(e.contains("no texts"), "{e}");
}

#[test]
fn npy_output() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.npy");
    let out = sembed(
        &[
            "embed",
            "--format",
            "npy",
            "-o",
            p.to_str().unwrap(),
            "a",
            "b",
            "c",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert!(std::str::from_utf8(&bytes[10..10 + hl])
        .unwrap()
        .contains("(3, 32)"));
    assert_eq!(bytes.len(), 10 + hl + 3 * 32 * 4);
}

#[test]
fn options_reach_the_model() {
    // --no-truncate on a long text: an error naming the input.
    let long = "word ".repeat(200);
    let e = err_text(&sembed(&["embed", "--no-truncate", "short", &long], None));
    assert!(e.contains("input 1"), "{e}");
    // --no-normalize gives the raw pooled vector.
    let g = golden("bert-tiny");
    let case = &g["cases"][0];
    let rows = ok_lines(&sembed(
        &["embed", "--no-normalize", case["text"].as_str().unwrap()],
        None,
    ));
    assert!(max_abs(&floats(&rows[0]["embedding"]), &floats(&case["embedding"])) <= 2e-5);
    // --dimensions on a non-Matryoshka model is refused.
    let e = err_text(&sembed(&["embed", "--dimensions", "8", "x"], None));
    assert!(e.contains("Matryoshka"), "{e}");
    // bf16 compute runs and stays close to f32.
    let f = ok_lines(&sembed(&["embed", case["text"].as_str().unwrap()], None));
    let b = ok_lines(&sembed(
        &["embed", "--dtype", "bf16", case["text"].as_str().unwrap()],
        None,
    ));
    let cos: f32 = floats(&f[0]["embedding"])
        .iter()
        .zip(floats(&b[0]["embedding"]))
        .map(|(x, y)| x * y)
        .sum();
    assert!(cos > 0.99, "bf16 vs f32 cosine {cos}");
}

#[test]
fn jina_task_dimensions_and_input_type() {
    let jina = fixtures().join("jina-v3-tiny");
    let g = golden("jina-v3-tiny");
    let case = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["task"] == "retrieval.query" && c["truncate_dim"] == 16)
        .unwrap();
    let text = case["text"].as_str().unwrap();
    let m = jina.to_str().unwrap();
    let rows = ok_lines(&sembed(
        &[
            "embed",
            "-m",
            m,
            "--task",
            "retrieval.query",
            "--dimensions",
            "16",
            text,
        ],
        None,
    ));
    assert!(
        max_abs(
            &floats(&rows[0]["embedding"]),
            &floats(&case["embedding_normalized"])
        ) <= 1e-5
    );
    let rows2 = ok_lines(&sembed(
        &[
            "embed",
            "-m",
            m,
            "--input-type",
            "query",
            "--dimensions",
            "16",
            text,
        ],
        None,
    ));
    assert_eq!(rows[0]["embedding"], rows2[0]["embedding"]);
    let e = err_text(&sembed(&["embed", "-m", m, "--task", "bogus", "x"], None));
    assert!(e.contains("unknown task `bogus`"), "{e}");
}

#[test]
fn fusion_from_flags_and_toml_agree() {
    let q = fixtures().join("qwen2-bidir-tiny");
    let j = fixtures().join("jina-v3-tiny");
    let qa = format!("qodo={}", q.display());
    let ja = format!("jina={}", j.display());
    let flags = ok_lines(&sembed(
        &[
            "embed",
            "-m",
            &qa,
            "-m",
            &ja,
            "--input-type",
            "document",
            "a",
            "fn x() {}",
        ],
        None,
    ));
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("fusion.toml");
    std::fs::write(
        &toml,
        format!(
            "[[model]]\nname = \"qodo\"\nref = \"{}\"\n[[model]]\nname = \"jina\"\nref = \"{}\"\n",
            q.display(),
            j.display()
        ),
    )
    .unwrap();
    let file = ok_lines(&sembed(
        &[
            "embed",
            "-m",
            toml.to_str().unwrap(),
            "--input-type",
            "document",
            "a",
            "fn x() {}",
        ],
        None,
    ));
    assert_eq!(flags, file);
    let v = floats(&flags[0]["embedding"]);
    assert_eq!(v.len(), 80);
    assert!((v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
    let e = err_text(&sembed(&["embed", "-m", &qa, "-m", "nonsense", "x"], None));
    assert!(e.contains("NAME=REF"), "{e}");
}

#[test]
fn missing_model_is_a_clear_error() {
    let e = err_text(&sembed(&["embed", "-m", "/no/such/model", "x"], None));
    assert!(e.contains("no such model folder"), "{e}");
}

#[test]
fn inspect_prints_the_header() {
    let out = sembed(
        &[
            "inspect",
            fixtures()
                .join("bert-tiny/model.safetensors")
                .to_str()
                .unwrap(),
        ],
        None,
    );
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("embeddings.word_embeddings.weight") && text.contains("[30522, 32]"));
    assert!(
        text.contains("parameters: 999072") && text.contains("tensors: 39"),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"xx").unwrap();
    let e = err_text(&sembed(&["inspect", bad.to_str().unwrap()], None));
    assert!(
        e.contains("bad.safetensors") && e.contains("shorter than"),
        "{e}"
    );
}

#[test]
fn hf_reference_offline_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sembed"))
        .args(["embed", "-m", "hf:Qodo/Qodo-Embed-1-1.5B", "x"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    let e = err_text(&out);
    assert!(
        e.contains("hf:Qodo/Qodo-Embed-1-1.5B")
            && e.contains("config.json")
            && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
}

/// The progress bar: on a terminal (a pseudo-terminal from `script`) `embed` draws one on stderr with
/// its rate and ETA; with stderr piped, or with `--quiet`, nothing; the vectors on stdout are the
/// same either way.
#[test]
fn progress_bar_only_on_a_terminal_and_never_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("texts.txt");
    let texts: Vec<String> = (0..3000)
        .map(|i| format!("fn f{i}(x: u32) -> u32 {{ x + {i} }}"))
        .collect();
    std::fs::write(&input, texts.join("\n")).unwrap();
    let model = fixtures().join("bert-tiny");
    let args = |out: &str, quiet: bool| {
        let mut a = vec![
            "embed".to_string(),
            "-m".into(),
            model.display().to_string(),
            "-i".into(),
            input.display().to_string(),
            "--lines".into(),
            "-o".into(),
            dir.path().join(out).display().to_string(),
        ];
        if quiet {
            a.push("--quiet".into());
        }
        a
    };
    // Piped stderr: silent.
    let piped: Vec<String> = args("piped.jsonl", false);
    let refs: Vec<&str> = piped.iter().map(String::as_str).collect();
    let out = sembed(&refs, None);
    assert!(out.status.success(), "{}", err_text(&out));
    assert!(
        out.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A terminal: `script` runs the command on a pseudo-terminal and copies what it printed.
    if Command::new("script").arg("--version").output().is_err() {
        common::missing("`script` (util-linux) is not installed");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_sembed");
    let run_on_tty = |a: Vec<String>| {
        let line = std::iter::once(bin.to_string())
            .chain(a)
            .map(|x| format!("'{x}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let o = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let shown = run_on_tty(args("tty.jsonl", false));
    assert!(
        shown.contains("texts") && shown.contains("eta"),
        "no bar on a terminal: {shown:?}"
    );
    let quiet = run_on_tty(args("quiet.jsonl", true));
    assert!(!quiet.contains("eta"), "--quiet drew a bar: {quiet:?}");
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    assert_eq!(read("tty.jsonl"), read("piped.jsonl"));
    assert_eq!(read("quiet.jsonl"), read("piped.jsonl"));
}
