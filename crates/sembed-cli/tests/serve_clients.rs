//! `sembed serve` as a process, called by real clients: the official `openai` Python package
//! (installed by .ci/run; the interpreter comes from $SEMBED_TEST_PYTHON) and plain curl for the
//! TEI route. Both must return the vectors the offline Embedder computes.

mod common;

use sembed::embed::{Embed, EmbedOptions, Embedder};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Served {
    child: Child,
    base: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve() -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sembed"))
        .args(["serve", "--port", "0", "-m"])
        .arg(format!(
            "bert={}",
            root().join("tests/fixtures/bert-tiny").display()
        ))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("server printed its address").unwrap();
        if let Some(addr) = line.strip_prefix("sembed: listening on ") {
            break addr.to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Served { child, base }
}

fn texts() -> Vec<String> {
    vec![
        "fn main() {}".into(),
        "def add(a, b): return a + b".into(),
        "héllo wörld".into(),
    ]
}

fn offline() -> Vec<Vec<f32>> {
    let e = Embedder::load(
        &root().join("tests/fixtures/bert-tiny"),
        sembed::DType::F32,
        &sembed::device::cpu(),
    )
    .unwrap();
    e.embed(&texts(), &EmbedOptions::default()).unwrap()
}

fn check(got: &Value, want: &[Vec<f32>]) {
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let g: Vec<f32> = g
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(g.len(), w.len());
        let d = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d <= 1e-6, "served vs offline: {d}");
    }
}

#[test]
fn openai_python_client_gets_the_offline_vectors() {
    let Some(python) = std::env::var_os("SEMBED_TEST_PYTHON") else {
        common::missing(
            "set SEMBED_TEST_PYTHON to a Python with the `openai` package (.ci/run does)",
        );
        return;
    };
    let s = serve();
    let mut child = Command::new(python)
        .arg(root().join("tools/clients/openai_embed.py"))
        .arg(format!("{}/v1", s.base))
        .arg("bert")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&texts()).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    check(&v["vectors"], &offline());
    assert!(v["prompt_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn curl_tei_request_gets_the_offline_vectors() {
    if Command::new("curl").arg("--version").output().is_err() {
        common::missing("curl is not installed");
        return;
    }
    let s = serve();
    let body = serde_json::json!({"inputs": texts()}).to_string();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--fail-with-body",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
        ])
        .arg(format!("{}/embed", s.base))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    check(&v, &offline());
}
