//! The published configs of Qodo-Embed-1-1.5B and jina-embeddings-v3 (read from ../shared/real-configs,
//! never copied into the repository) build the right model description, and a model of that shape
//! builds against a shape-only weight source: every tensor name and shape it asks for, and the
//! parameter count checked against a formula written independently from the published sizes.

use sembed::config::{Architecture, ModelFolder};
use sembed::weights::Weights;
use sembed::DType;
use std::path::PathBuf;

/// ../shared/real-configs: CI always has it, so its absence fails the test (never a silent skip).
fn real_configs() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/real-configs");
    assert!(
        p.is_dir(),
        "{} is absent: the published configs live beside the repository (../shared), as in CI",
        p.display()
    );
    Some(p)
}

fn requested(arch: &Architecture) -> Vec<(String, Vec<usize>)> {
    let w = Weights::zeros(DType::F32, &sembed::device::cpu());
    sembed::embed::build_model(arch, &w).unwrap();
    w.requested()
}

fn count(r: &[(String, Vec<usize>)]) -> usize {
    r.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

#[test]
fn qodo_embed_1_config() {
    let Some(root) = real_configs() else { return };
    let arch = Architecture::from_file(&root.join("qodo-embed-1-1.5b/config.json")).unwrap();
    let Architecture::Qwen(c) = &arch else {
        panic!("{arch:?}")
    };
    assert_eq!(c.version, 2);
    assert!(!c.causal, "is_causal: false means bidirectional");
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (1536, 28, 12, 2)
    );
    assert_eq!(
        (c.head_dim, c.intermediate_size, c.vocab_size),
        (128, 8960, 151646)
    );
    assert!(c.attention_bias && !c.qk_norm);
    assert_eq!(c.rope_theta, 1_000_000.0);
    let r = requested(&arch);
    let find = |n: &str| r.iter().find(|(name, _)| name == n).map(|(_, s)| s.clone());
    assert_eq!(
        find("layers.27.self_attn.k_proj.weight"),
        Some(vec![256, 1536])
    );
    assert_eq!(find("layers.0.self_attn.q_proj.bias"), Some(vec![1536]));
    assert_eq!(
        find("layers.0.mlp.down_proj.weight"),
        Some(vec![1536, 8960])
    );
    assert_eq!(find("embed_tokens.weight"), Some(vec![151646, 1536]));
    // Independent formula: embeddings + 28 × (q, k, v with biases; o; gate/up/down; 2 norms) + final norm.
    let (h, kv, i, l, v) = (1536usize, 256usize, 8960usize, 28usize, 151646usize);
    let per_layer = (h * h + h) + 2 * (kv * h + kv) + h * h + 3 * h * i + 2 * h;
    assert_eq!(count(&r), v * h + l * per_layer + h);
    // Qwen2-1.5B's model card: 1.31B non-embedding parameters.
    let non_embedding = count(&r) - v * h;
    assert!(
        (1.30e9..1.32e9).contains(&(non_embedding as f64)),
        "{non_embedding}"
    );
}

#[test]
fn jina_embeddings_v3_config() {
    let Some(root) = real_configs() else { return };
    let dir = root.join("jina-embeddings-v3");
    let arch = Architecture::from_file(&dir.join("config.json")).unwrap();
    let Architecture::Jina(c) = &arch else {
        panic!("{arch:?}")
    };
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size
        ),
        (1024, 24, 16, 4096)
    );
    assert_eq!(
        (c.vocab_size, c.type_vocab_size, c.lora_rank),
        (250002, 1, 4)
    );
    assert_eq!(c.lora_scaling(), 0.25);
    assert_eq!(c.rotary_emb_base, 20000.0);
    assert_eq!(
        c.lora_adaptations,
        [
            "retrieval.query",
            "retrieval.passage",
            "separation",
            "classification",
            "text-matching"
        ]
    );
    assert_eq!(c.matryoshka_dimensions, [32, 64, 128, 256, 512, 768, 1024]);
    assert_eq!(
        c.task_instructions["retrieval.query"],
        "Represent the query for retrieving evidence documents: "
    );
    let r = requested(&arch);
    let find = |n: &str| r.iter().find(|(name, _)| name == n).map(|(_, s)| s.clone());
    assert_eq!(
        find("roberta.encoder.layers.23.mixer.Wqkv.parametrizations.weight.0.lora_B"),
        Some(vec![5, 3072, 4])
    );
    assert_eq!(
        find("roberta.embeddings.word_embeddings.parametrizations.weight.0.lora_A"),
        Some(vec![5, 250002, 4])
    );
    // Independent formula: base weights + 5 rank-4 adapters on every Linear and Embedding (the pooler,
    // unused for embeddings, is not loaded).
    let (h, i, l, v, t, rk) = (1024usize, 4096usize, 24usize, 250002usize, 5usize, 4usize);
    let lin = |inp: usize, out: usize| out * inp + out + t * rk * inp + t * out * rk;
    let emb = |rows: usize| rows * h + t * rows * rk + t * rk * h;
    let per_layer = lin(h, 3 * h) + lin(h, h) + lin(h, i) + lin(i, h) + 4 * h;
    assert_eq!(count(&r), emb(v) + emb(1) + 2 * h + l * per_layer);
    // Published size: about 570M parameters.
    assert!(
        (5.6e8..5.8e8).contains(&(count(&r) as f64)),
        "{}",
        count(&r)
    );

    // The sentence-transformers files: custom_st.Transformer, a 2_Normalize folder without files,
    // mean pooling, the task prompts.
    let folder = ModelFolder::read(&dir).unwrap();
    assert_eq!(folder.sentence.pooling, sembed::config::Pooling::Mean);
    assert!(folder.sentence.normalize);
    assert_eq!(folder.sentence.prompts.len(), 5);
    assert_eq!(folder.max_seq_length(), 8194);
}
