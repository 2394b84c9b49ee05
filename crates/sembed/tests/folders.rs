//! Model folders: sentence-transformers files in their old and new forms, and every broken-folder
//! fault as a clear error (never a panic, never a vector).

use sembed::config::{parse_pooling, Architecture, ModelFolder, Pooling, SentenceConfig};
use sembed::embed::Embedder;
use sembed::error::{Error, WeightsError};
use sembed::DType;
use std::path::{Path, PathBuf};

fn fixture(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(model)
}

/// A copy of a fixture model folder that a test may break.
fn copy_model(model: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture(model), dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn load_err(dir: &Path) -> String {
    match Embedder::load(dir, DType::F32, &sembed::device::cpu()) {
        Ok(_) => panic!("loaded a broken folder"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn pooling_configs_old_and_new() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(
        &p,
        r#"{"word_embedding_dimension": 8, "pooling_mode": "lasttoken", "include_prompt": false}"#,
    )
    .unwrap();
    assert_eq!(parse_pooling(&p).unwrap(), (Pooling::LastToken, false));
    std::fs::write(&p, r#"{"pooling_mode_cls_token": true}"#).unwrap();
    assert_eq!(parse_pooling(&p).unwrap(), (Pooling::Cls, true));
    std::fs::write(
        &p,
        r#"{"pooling_mode_max_tokens": true, "pooling_mode_mean_tokens": false}"#,
    )
    .unwrap();
    assert_eq!(parse_pooling(&p).unwrap().0, Pooling::Max);
    std::fs::write(
        &p,
        r#"{"pooling_mode_max_tokens": true, "pooling_mode_mean_tokens": true}"#,
    )
    .unwrap();
    assert!(parse_pooling(&p)
        .unwrap_err()
        .to_string()
        .contains("several pooling modes"));
    std::fs::write(&p, r#"{"pooling_mode": "weird"}"#).unwrap();
    let e = parse_pooling(&p).unwrap_err().to_string();
    assert!(e.contains("weird") && e.contains("config.json"), "{e}");
}

#[test]
fn modules_json_new_package_paths_and_missing_folders() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("modules.json"),
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.base.modules.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.sentence_transformer.modules.Pooling"},
            {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.base.modules.Normalize"}]"#,
    )
    .unwrap();
    std::fs::create_dir(d.join("1_Pooling")).unwrap();
    std::fs::write(
        d.join("1_Pooling/config.json"),
        r#"{"pooling_mode": "cls"}"#,
    )
    .unwrap();
    // Trailing commas in config_sentence_transformers.json are tolerated.
    std::fs::write(
        d.join("config_sentence_transformers.json"),
        "{\"prompts\": {\"query\": \"q: , }\", \"document\": \"d: \",}, \"default_prompt_name\": \"query\",}",
    )
    .unwrap();
    std::fs::write(
        d.join("sentence_bert_config.json"),
        r#"{"max_seq_length": 77, "do_lower_case": true}"#,
    )
    .unwrap();
    let arch = Architecture::from_file(&fixture("bert-tiny").join("config.json")).unwrap();
    let s = SentenceConfig::from_dir(d, &arch).unwrap();
    assert_eq!(s.pooling, Pooling::Cls);
    assert!(
        s.normalize,
        "Normalize listed (folder missing) still means normalise"
    );
    assert_eq!(s.prompts["query"], "q: , }");
    assert_eq!(s.default_prompt_name.as_deref(), Some("query"));
    assert_eq!((s.max_seq_length, s.do_lower_case), (Some(77), true));

    // Pooling folder missing entirely: the architecture's default.
    std::fs::remove_dir_all(d.join("1_Pooling")).unwrap();
    assert_eq!(
        SentenceConfig::from_dir(d, &arch).unwrap().pooling,
        Pooling::Mean
    );

    // Unknown module types are refused, not ignored.
    std::fs::write(
        d.join("modules.json"),
        r#"[{"path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#,
    )
    .unwrap();
    let e = SentenceConfig::from_dir(d, &arch).unwrap_err().to_string();
    assert!(e.contains("Dense") && e.contains("modules.json"), "{e}");
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let dir = copy_model("bert-tiny");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn unknown_architecture_is_a_clear_error() {
    let dir = copy_model("bert-tiny");
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt2", "architectures": ["GPT2Model"]}"#,
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("unknown or unsupported architecture")
            && e.contains("gpt2")
            && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn missing_config_field_names_the_field() {
    let dir = copy_model("qwen2-bidir-tiny");
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        text.replace("\"hidden_size\"", "\"hidden_sizes\""),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("missing field `hidden_size`"), "{e}");
}

/// A checkpoint lacking a tensor the model needs, or holding one of the wrong shape, is refused with
/// the tensor's name (the file is rewritten with the upstream safetensors crate).
#[test]
fn missing_or_misshapen_tensor_in_a_model_folder() {
    for (drop, reshape) in [(true, false), (false, true)] {
        let dir = copy_model("bert-tiny");
        let path = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let target = "encoder.layer.1.attention.self.key.weight";
        let mut kept = Vec::new();
        let mut owned = Vec::new();
        for (name, view) in st.tensors() {
            if name == target && drop {
                continue;
            }
            let shape = if name == target && reshape {
                vec![16, 64]
            } else {
                view.shape().to_vec()
            };
            owned.push((name.clone(), view.dtype(), shape, view.data().to_vec()));
        }
        for (name, dtype, shape, data) in &owned {
            kept.push((
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            ));
        }
        let out = safetensors::tensor::serialize(kept, None).unwrap();
        drop_and_write(&path, &out);
        let e = Embedder::load(dir.path(), DType::F32, &sembed::device::cpu())
            .err()
            .expect("must fail");
        match (&e, drop) {
            (Error::Weights(WeightsError::MissingTensor { tensor, .. }), true) => {
                assert_eq!(tensor, target)
            }
            (Error::Weights(WeightsError::WrongShape { tensor, .. }), false) => {
                assert_eq!(tensor, target)
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(e.to_string().contains(target));
    }
}

fn drop_and_write(path: &Path, bytes: &[u8]) {
    std::fs::remove_file(path).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn max_seq_length_prefers_sentence_transformers_setting() {
    let bert = ModelFolder::read(&fixture("bert-tiny")).unwrap();
    assert_eq!(bert.max_seq_length(), 64);
    let jina = ModelFolder::read(&fixture("jina-v3-tiny")).unwrap();
    assert_eq!(
        jina.max_seq_length(),
        96,
        "from tokenizer_config.json model_max_length"
    );
    let q3 = ModelFolder::read(&fixture("qwen3-causal-tiny")).unwrap();
    assert!(q3.tokenizer.padding_side_left);
    let Architecture::Qwen(c) = &q3.arch else {
        panic!()
    };
    assert!(c.causal && c.qk_norm && !c.attention_bias);
    let q2 = ModelFolder::read(&fixture("qwen2-bidir-tiny")).unwrap();
    let Architecture::Qwen(c) = &q2.arch else {
        panic!()
    };
    assert!(!c.causal && c.attention_bias && c.num_key_value_heads == 2);
}

/// No config value makes a model panic: every size, head count, activation and epsilon the models use
/// is checked at load, with an error naming config.json and the field.
#[test]
fn bad_config_values_are_errors_naming_the_field() {
    use serde_json::{json, Value};
    let cases: &[(&str, &str, Value)] = &[
        ("jina-v3-tiny", "num_attention_heads", json!(0)),
        ("jina-v3-tiny", "num_attention_heads", json!(3)),
        ("jina-v3-tiny", "hidden_act", json!("tanh")),
        ("jina-v3-tiny", "lora_rank", json!(0)),
        ("jina-v3-tiny", "matryoshka_dimensions", json!([8, 4096])),
        ("jina-v3-tiny", "layer_norm_eps", json!(-1.0)),
        ("bert-tiny", "num_attention_heads", json!(0)),
        ("bert-tiny", "intermediate_size", json!(0)),
        ("bert-tiny", "hidden_act", json!("mish")),
        ("bert-tiny", "num_hidden_layers", json!(0)),
        ("qwen2-bidir-tiny", "num_key_value_heads", json!(0)),
        ("qwen2-bidir-tiny", "num_key_value_heads", json!(4)),
        ("qwen2-bidir-tiny", "head_dim", json!(7)),
        ("qwen3-causal-tiny", "num_attention_heads", json!(0)),
        ("qwen3-causal-tiny", "rms_norm_eps", json!(0.0)),
        ("qwen3-causal-tiny", "vocab_size", json!(0)),
    ];
    for (model, field, value) in cases {
        let dir = copy_model(model);
        let path = dir.path().join("config.json");
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg[*field] = value.clone();
        std::fs::write(&path, cfg.to_string()).unwrap();
        let e = std::panic::catch_unwind(|| load_err(dir.path()))
            .unwrap_or_else(|_| panic!("{model} {field}={value}: panicked"));
        assert!(
            e.contains("config.json") && e.contains(&format!("`{field}`")),
            "{model} {field}={value}: {e}"
        );
    }
}
