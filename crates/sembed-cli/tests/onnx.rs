//! `sembed export` and `sembed inspect model.onnx` through the binary (the numbers are checked against
//! ONNX Runtime in crates/sembed-onnx/tests/export.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn sembed(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sembed"))
        .args(args)
        .output()
        .unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn export_then_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert-int8");
    let o = sembed(&[
        "export",
        p(&fixture("bert-tiny")),
        "--onnx",
        p(&out),
        "--quantize",
        "int8",
        "--external-data",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8(o.stdout).unwrap();
    let model = out.join("onnx/model.onnx");
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        [p(&model), p(&out.join("onnx/model.onnx_data"))]
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("bert, int8"));
    // sentence-transformers' layout.
    for f in [
        "modules.json",
        "1_Pooling/config.json",
        "sentence_bert_config.json",
        "tokenizer.json",
        "config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let o = sembed(&["inspect", p(&model)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    for want in [
        "opset: ai.onnx 17",
        "input_ids int64 [batch, sequence]",
        "attention_mask int64 [batch, sequence]",
        "last_hidden_state float [batch, sequence, 32]",
        "sentence_embedding float [batch, 32]",
        "(external data: model.onnx_data)",
        "MatMulInteger 12",
        "DynamicQuantizeLinear 12",
        "encoder.layer.0.attention.self.query.weight_quantized uint8 [32, 32] 1024 bytes  @ model.onnx_data+",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
}

#[test]
fn clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let o = sembed(&[
        "export",
        p(&fixture("bert-tiny")),
        "--onnx",
        p(&out),
        "--task",
        "retrieval.query",
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--task applies to jina-embeddings-v3 only"),
        "{e}"
    );
    let o = sembed(&[
        "export",
        p(&fixture("jina-v3-tiny")),
        "--onnx",
        p(&out),
        "--task",
        "nope",
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("unknown task `nope`") && e.contains("text-matching"),
        "{e}"
    );
    let o = sembed(&["export", p(&dir.path().join("missing")), "--onnx", p(&out)]);
    assert!(!o.status.success());
    let bad = dir.path().join("bad.onnx");
    std::fs::write(&bad, b"\x08\x07garbage").unwrap();
    let o = sembed(&["inspect", p(&bad)]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bad.onnx"), "{e}");
}
