//! `inspect` on exported models: what it reports, checked against the checkpoint the graph came from;
//! clear errors for damaged models and external data; and no panic on any input (fuzzed).

use proptest::prelude::*;
use prost::Message;
use sembed_onnx::inspect::{Dim, Location};
use sembed_onnx::{export, inspect, inspect_bytes, ExportOptions, OnnxError};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn exported(name: &str, external: bool) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let r = export(
        &fixture(name),
        dir.path(),
        &ExportOptions {
            external_data: Some(external),
            ..Default::default()
        },
    )
    .unwrap();
    (dir, r.model)
}

#[test]
fn describes_an_exported_bert() {
    let (_dir, model) = exported("bert-tiny", false);
    let s = inspect(&model).unwrap();
    assert_eq!(s.ir_version, 8);
    assert_eq!(s.opsets, [("ai.onnx".to_string(), 17)]);
    let names: Vec<&str> = s.inputs.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["input_ids", "attention_mask"]);
    let dynamic = vec![Dim::Named("batch".into()), Dim::Named("sequence".into())];
    for v in &s.inputs {
        assert_eq!(v.dtype, "int64");
        assert_eq!(v.shape.as_ref().unwrap(), &dynamic);
    }
    assert_eq!(s.outputs[0].name, "last_hidden_state");
    assert_eq!(
        s.outputs[0].shape.as_ref().unwrap(),
        &[
            Dim::Named("batch".into()),
            Dim::Named("sequence".into()),
            Dim::Fixed(32)
        ]
    );
    assert_eq!(s.outputs[1].name, "sentence_embedding");
    // 2 layers: q, k, v, attention output, intermediate, output, plus the two attention products.
    assert_eq!(s.operators["MatMul"], 16);
    assert_eq!(s.operators["Softmax"], 2);
    assert_eq!(s.operators["LayerNormalization"], 5);
    // Every weight taken from the checkpoint has its size there (token types: row 0 only).
    let st =
        sembed::weights::SafetensorsFile::open(fixture("bert-tiny/model.safetensors")).unwrap();
    let mut from_checkpoint = 0;
    for i in &s.initializers {
        if let Some(t) = st.info(&i.name) {
            let want = if i.name.contains("token_type") {
                t.shape[1]
            } else {
                t.numel()
            };
            assert_eq!(i.elements as usize, want, "{}", i.name);
            assert_eq!(i.dtype, "float");
            assert_eq!(i.bytes, 4 * i.elements, "{}", i.name);
            assert_eq!(i.location, Location::Inline);
            from_checkpoint += 1;
        }
    }
    // Everything but the pooler (which sentence embeddings do not use).
    let used = st
        .header()
        .tensors
        .iter()
        .filter(|t| !t.name.contains("pooler"))
        .count();
    assert_eq!(from_checkpoint, used);
    let q = s
        .initializers
        .iter()
        .find(|i| i.name == "encoder.layer.0.attention.self.query.weight")
        .unwrap();
    assert_eq!(q.shape, [32, 32]);
    let text = s.to_string();
    assert!(text.contains("input_ids int64 [batch, sequence]"), "{text}");
    assert!(text.contains("MatMul 16"), "{text}");
}

#[test]
fn external_data_is_found_by_offset() {
    let (dir, model) = exported("qwen3-causal-tiny", true);
    let s = inspect(&model).unwrap();
    let data_len = std::fs::metadata(dir.path().join("onnx/model.onnx_data"))
        .unwrap()
        .len();
    let mut external = 0;
    for i in &s.initializers {
        match &i.location {
            Location::External {
                file,
                offset,
                length,
            } => {
                assert_eq!(file, "model.onnx_data");
                assert_eq!(offset % 4096, 0, "aligned");
                assert!(offset + length <= data_len);
                assert_eq!(*length, i.bytes);
                external += 1;
            }
            Location::Inline => assert!(i.bytes < 1024, "{} inline", i.name),
        }
    }
    assert!(external > 10);
    assert_eq!(s.parameters(), inspect_inline_params("qwen3-causal-tiny"));
}

/// The same model exported inline has the same parameters.
fn inspect_inline_params(name: &str) -> u64 {
    let (_d, m) = exported(name, false);
    inspect(&m).unwrap().parameters()
}

fn external_error(dir: &Path, model: &Path) -> String {
    match inspect(model) {
        Err(e @ OnnxError::ExternalData { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&dir.join("onnx/model.onnx_data").display().to_string()),
                "{msg}"
            );
            msg
        }
        other => panic!("expected an external-data error, got {other:?}"),
    }
}

/// Rewrite `key` of the first externally stored initializer of the model `bytes` into `model`.
fn set_external(model: &Path, bytes: &[u8], key: &str, value: &str) {
    let mut m = sembed_onnx::inspect::decode(bytes, model).unwrap();
    let t = m
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| !t.external_data.is_empty())
        .unwrap();
    for kv in t.external_data.iter_mut() {
        if kv.key == key {
            kv.value = value.into();
        }
    }
    std::fs::write(model, m.encode_to_vec()).unwrap();
}

#[test]
fn damaged_external_data_is_a_clear_error() {
    // Missing file.
    let (dir, model) = exported("qwen3-causal-tiny", true);
    let data = dir.path().join("onnx/model.onnx_data");
    std::fs::remove_file(&data).unwrap();
    assert!(external_error(dir.path(), &model).contains("does not exist"));
    // Short file.
    let (dir, model) = exported("qwen3-causal-tiny", true);
    let data = dir.path().join("onnx/model.onnx_data");
    let len = std::fs::metadata(&data).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    assert!(external_error(dir.path(), &model).contains("short"));
    // An offset past the end of the file.
    let (dir, model) = exported("qwen3-causal-tiny", true);
    let bytes = std::fs::read(&model).unwrap();
    set_external(&model, &bytes, "offset", "999999999");
    assert!(external_error(dir.path(), &model).contains("past the end"));
    // A location outside the model's folder.
    set_external(&model, &bytes, "location", "../../etc/passwd");
    let e = inspect(&model).unwrap_err().to_string();
    assert!(e.contains("inside the model's folder"), "{e}");
}

#[test]
fn damaged_models_are_clear_errors() {
    let (dir, model) = exported("bert-tiny", false);
    let bytes = std::fs::read(&model).unwrap();
    // Truncated anywhere: an error naming the file, never a panic and never a model.
    for cut in [1, 10, 1000, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.path().join("cut.onnx");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = inspect(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
    }
    // Not ONNX at all.
    let p = dir.path().join("text.onnx");
    std::fs::write(&p, "this is not a model\n").unwrap();
    let e = inspect(&p).unwrap_err().to_string();
    assert!(e.contains("text.onnx"), "{e}");
    // A safetensors file renamed.
    let p = dir.path().join("weights.onnx");
    std::fs::copy(fixture("bert-tiny/model.safetensors"), &p).unwrap();
    assert!(inspect(&p).is_err());
    // Missing file.
    let e = inspect(&dir.path().join("absent.onnx"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("absent.onnx") && e.contains("cannot read"),
        "{e}"
    );
}

fn small_model() -> &'static (tempfile::TempDir, Vec<u8>, PathBuf) {
    static M: std::sync::OnceLock<(tempfile::TempDir, Vec<u8>, PathBuf)> =
        std::sync::OnceLock::new();
    M.get_or_init(|| {
        let (dir, model) = exported("qwen3-causal-tiny", true);
        let bytes = std::fs::read(&model).unwrap();
        (dir, bytes, model)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// A real model (with external data) with bytes overwritten and possibly cut: inspect returns a
    /// summary or an error, never panics.
    #[test]
    fn mutated_models_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (_dir, bytes, path) = small_model();
        let mut b = bytes.clone();
        for (i, v) in edits {
            let at = i.index(b.len());
            b[at] = v;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len() + 1));
        }
        let _ = inspect_bytes(&b, path);
    }

    /// Arbitrary bytes never panic either.
    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = inspect_bytes(&b, Path::new("fuzz.onnx"));
    }
}
