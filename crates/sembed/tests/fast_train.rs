//! The fast training pass (`sembed::fast::train`, hand-written forward and backward of BERT layers)
//! against candle's op-by-op graph, the reference: the same loss and the same gradient for every
//! parameter, with dropout off and on (the pass computes candle's masks), both losses, GradCache and
//! checkpointing, on the tiny BERT and on the real all-MiniLM-L6-v2. (The CLI test
//! `dump_gradients_match_upstream` checks the pass against upstream PyTorch's gradients too.)

mod common;

use common::{fixture, named_gradients, worst_difference, Named};
use sembed::fast::train::{layer_passes, with_candle_kernels};
use sembed::train::data::Example;
use sembed::train::trainer::{LoraConfig, LossKind, TrainConfig, Trainer};
use sembed::DType;
use std::path::Path;

/// Texts of uneven lengths (3 to ~60 tokens), so that the padded grid and the packed rows differ.
fn examples() -> Vec<Example> {
    (0..10)
        .map(|i| Example {
            anchor: format!("how to compute value {i} of the series").repeat(1 + i % 3),
            positive: format!("def f{i}(x):\n    return x * {i} + {}", i % 5)
                .repeat(1 + (i * 7) % 4),
            negatives: vec![format!("SELECT {i} FROM t WHERE k = {}", i * 7)],
        })
        .collect()
}

fn gradients(model: &Path, config: &TrainConfig, candle: bool) -> (f64, Named) {
    let t = Trainer::new(model, config.clone(), DType::F32, false).unwrap();
    let before = layer_passes();
    let out = if candle {
        with_candle_kernels(|| named_gradients(&t, &examples()))
    } else {
        named_gradients(&t, &examples())
    };
    if !candle {
        assert!(
            layer_passes() > before,
            "the fast training pass did not run"
        );
    }
    out
}

/// Relative loss difference and the worst per-tensor `max|a − b| / max|b|` (floored at 1e-3 of the
/// largest gradient anywhere) between the fast pass and candle's graph. The worst is usually a
/// key bias, whose true gradient is 0 (softmax ignores a per-row constant): rounding noise at the
/// floor. A wrong mask or derivative moves the loss and gradients by percents.
fn compare(model: &Path, config: TrainConfig) -> (f64, f64) {
    let (fl, fast) = gradients(model, &config, false);
    let (cl, reference) = gradients(model, &config, true);
    let (worst, at) = worst_difference(&fast, &reference);
    eprintln!(
        "{}: loss {fl} vs {cl}, worst gradient difference {worst:.2e} ({at})",
        model.display()
    );
    ((fl - cl).abs() / cl.abs(), worst)
}

fn config(loss: LossKind, dropout: Option<f64>) -> TrainConfig {
    TrainConfig {
        loss,
        batch_size: 10,
        dropout,
        ..Default::default()
    }
}

const MNRL: LossKind = LossKind::Mnrl { scale: 20.0 };
const TRIPLET: LossKind = LossKind::Triplet {
    cosine: false,
    margin: 5.0,
};

#[test]
fn fast_pass_equals_candle_on_tiny_bert() {
    let model = fixture("bert-tiny");
    for loss in [MNRL, TRIPLET] {
        // Dropout off, the model's own 0.1, and a heavy 0.5 (masks must match element for element).
        for dropout in [Some(0.0), None, Some(0.5)] {
            let (dl, dg) = compare(&model, config(loss, dropout));
            assert!(
                dl < 1e-5,
                "{loss:?} dropout {dropout:?}: loss differs by {dl:e}"
            );
            assert!(
                dg < 5e-4,
                "{loss:?} dropout {dropout:?}: gradient differs by {dg:e}"
            );
        }
    }
}

#[test]
fn fast_pass_with_grad_cache_and_checkpointing_equals_candle() {
    let model = fixture("bert-tiny");
    for (cache, ckpt) in [(Some(3), false), (None, true), (Some(4), true)] {
        let c = TrainConfig {
            cache_mini_batch: cache,
            checkpoint_activations: ckpt,
            ..config(MNRL, None)
        };
        let (dl, dg) = compare(&model, c);
        assert!(
            dl < 1e-5,
            "cache {cache:?} ckpt {ckpt}: loss differs by {dl:e}"
        );
        assert!(
            dg < 5e-4,
            "cache {cache:?} ckpt {ckpt}: gradient differs by {dg:e}"
        );
    }
}

#[test]
fn fast_pass_equals_candle_on_real_minilm() {
    let model = sembed::hub::default_model_dir().expect("default model (downloaded on first use)");
    let (dl, dg) = compare(
        &model,
        TrainConfig {
            max_length: Some(128),
            ..config(MNRL, None)
        },
    );
    assert!(dl < 1e-5, "loss differs by {dl:e}");
    assert!(dg < 1e-3, "gradient differs by {dg:e}");
}

/// Qwen2 (bidirectional, q/k/v bias, grouped-query attention) and Qwen3 (causal, per-head q/k
/// RMSNorm) through the fast pass: loss and every gradient as candle's graph gives them, both
/// losses, and with GradCache and activation checkpointing (layers recomputed in backward).
#[test]
fn fast_pass_equals_candle_on_tiny_qwen2_and_qwen3() {
    for name in ["qwen2-bidir-tiny", "qwen3-causal-tiny"] {
        let model = fixture(name);
        let cases = [
            (MNRL, None, false),
            (TRIPLET, None, false),
            (MNRL, Some(3), false),
            (MNRL, None, true),
            (MNRL, Some(4), true),
        ];
        for (loss, cache, ckpt) in cases {
            let c = TrainConfig {
                cache_mini_batch: cache,
                checkpoint_activations: ckpt,
                ..config(loss, None)
            };
            let (dl, dg) = compare(&model, c);
            assert!(
                dl < 1e-5,
                "{name} {loss:?} cache {cache:?} ckpt {ckpt}: loss differs by {dl:e}"
            );
            assert!(
                dg < 5e-4,
                "{name} {loss:?} cache {cache:?} ckpt {ckpt}: gradient differs by {dg:e}"
            );
        }
    }
}

/// A LoRA run of `model` after one optimizer step (on candle's graph, so that B is no longer zero
/// and A's gradient is not trivially 0): the fast pass's loss and every adapter gradient against
/// candle's graph on the same trainer.
fn compare_lora(model: &str, c: TrainConfig, what: &str) {
    let mut t = Trainer::new(&fixture(model), c, DType::F32, false).unwrap();
    let ex = examples();
    let refs: Vec<&Example> = ex.iter().collect();
    with_candle_kernels(|| t.step(&refs, 0.05)).unwrap();
    let before = layer_passes();
    let (fl, fast) = named_gradients(&t, &ex);
    assert!(
        layer_passes() > before,
        "the fast training pass did not run"
    );
    let (cl, reference) = with_candle_kernels(|| named_gradients(&t, &ex));
    let (worst, at) = worst_difference(&fast, &reference);
    let dl = (fl - cl).abs() / cl.abs();
    eprintln!("{model} LoRA {what}: loss {fl} vs {cl}, worst {worst:.2e} ({at})");
    assert!(dl < 1e-5, "{model} {what}: loss differs by {dl:e}");
    assert!(
        worst < 5e-4,
        "{model} {what}: gradient differs by {worst:e} ({at})"
    );
}

/// jina-embeddings-v3 through the fast pass (the BERT pass with rotary positions and the task
/// adapters on Wqkv, out_proj, fc1, fc2): the loss and every gradient, the stacked adapters' included
/// (zero outside the task's slice), with dropout off and on (candle's masks), GradCache and
/// checkpointing; and without a task (base weights only).
#[test]
fn fast_pass_equals_candle_on_tiny_jina() {
    let model = fixture("jina-v3-tiny");
    let cases = [
        (Some("retrieval.passage"), MNRL, Some(0.0), None, false),
        (Some("retrieval.query"), TRIPLET, None, None, false),
        (Some("retrieval.passage"), MNRL, Some(0.3), None, false),
        (Some("retrieval.passage"), MNRL, None, Some(3), true),
        (None, MNRL, Some(0.0), None, false),
    ];
    for (task, loss, dropout, cache, ckpt) in cases {
        let c = TrainConfig {
            task: task.map(str::to_string),
            cache_mini_batch: cache,
            checkpoint_activations: ckpt,
            ..config(loss, dropout)
        };
        let (dl, dg) = compare(&model, c);
        let what = format!("{task:?} {loss:?} dropout {dropout:?} cache {cache:?} ckpt {ckpt}");
        assert!(dl < 1e-5, "{what}: loss differs by {dl:e}");
        assert!(dg < 5e-4, "{what}: gradient differs by {dg:e}");
    }
}

/// Training one Jina task adapter: only the adapters are variables (the base weights are constants,
/// so the pass computes no weight gradient for them), and the adapters' gradients are the ones a run
/// differentiating every weight gives (`Trainer::for_every_gradient`, what `--dump-gradients` uses).
#[test]
fn jina_task_training_differentiates_only_the_adapters() {
    let model = fixture("jina-v3-tiny");
    let c = TrainConfig {
        task: Some("retrieval.passage".into()),
        ..config(MNRL, Some(0.0))
    };
    let adapters = Trainer::new(&model, c.clone(), DType::F32, false).unwrap();
    let every = Trainer::for_every_gradient(&model, c, DType::F32).unwrap();
    let names: Vec<&str> = adapters
        .variables()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.contains(".lora_")),
        "{names:?}"
    );
    assert!(every.variables().len() > names.len());
    let (la, ga) = named_gradients(&adapters, &examples());
    let (le, ge) = named_gradients(&every, &examples());
    assert!((la - le).abs() <= 1e-6 * le.abs(), "{la} vs {le}");
    let ge: Named = ge
        .into_iter()
        .filter(|(n, _)| n.contains(".lora_"))
        .collect();
    assert_eq!(ga.len(), ge.len());
    let (worst, at) = worst_difference(&ga, &ge);
    assert!(worst < 1e-5, "{worst:e} at {at}");
}

/// LoRA through the fast pass (frozen base read in place) on BERT (with the model's dropout),
/// Qwen2 and Qwen3: after one optimizer step, the loss and every adapter's gradient as candle's graph
/// gives them, on the default targets (query/value) and on every projection, plain and with
/// GradCache and checkpointing.
#[test]
fn fast_pass_lora_equals_candle() {
    let qwen_all = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let models: [(&str, &[&str]); 3] = [
        ("bert-tiny", &["query", "key", "value", "dense"]),
        ("qwen2-bidir-tiny", &qwen_all),
        ("qwen3-causal-tiny", &qwen_all),
    ];
    for (name, all) in models {
        let all: Vec<String> = all.iter().map(|t| t.to_string()).collect();
        for (targets, cache, ckpt) in [
            (vec![], None, false),
            (all.clone(), None, false),
            (all, Some(3), true),
        ] {
            let c = TrainConfig {
                lora: Some(LoraConfig {
                    rank: 4,
                    alpha: 8.0,
                    dropout: 0.0,
                    targets: targets.clone(),
                }),
                cache_mini_batch: cache,
                checkpoint_activations: ckpt,
                ..config(MNRL, None)
            };
            compare_lora(name, c, &format!("{targets:?} cache {cache:?} ckpt {ckpt}"));
        }
    }
}

/// Where the pass cannot draw candle's masks (LoRA input dropout; Qwen's attention dropout, here from
/// the `--dropout` override), it declines and candle's graph runs: the counter (per thread) stays.
#[test]
fn fast_pass_declines_what_it_cannot_reproduce() {
    let lora_dropout = TrainConfig {
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: vec![],
        }),
        ..config(MNRL, None)
    };
    for (model, c) in [
        ("bert-tiny", lora_dropout.clone()),
        ("qwen2-bidir-tiny", lora_dropout),
        ("qwen3-causal-tiny", config(MNRL, Some(0.1))),
    ] {
        let t = Trainer::new(&fixture(model), c, DType::F32, false).unwrap();
        let before = layer_passes();
        let (loss, _) = named_gradients(&t, &examples());
        assert!(loss.is_finite());
        assert_eq!(layer_passes(), before, "{model}: the fast pass ran");
    }
}

/// Qwen3 whose attention is wider than its hidden size (as Qwen3-Embedding-0.6B: 16 heads × 128 over
/// a hidden size of 1024): the tiny Qwen3 with `head_dim` 16 (6 × 16 = 96 over 48), random weights.
#[test]
fn fast_pass_equals_candle_on_qwen3_with_wide_heads() {
    use sembed::weights::{write_safetensors, Dtype, Weights};
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("qwen3-causal-tiny");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() && f.file_name() != "model.safetensors" {
            std::fs::copy(f.path(), tmp.path().join(f.file_name())).unwrap();
        }
    }
    let pooling = src.join("1_Pooling");
    std::fs::create_dir(tmp.path().join("1_Pooling")).unwrap();
    for f in std::fs::read_dir(&pooling).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), tmp.path().join("1_Pooling").join(f.file_name())).unwrap();
    }
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["head_dim"] = 16.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    // Every tensor the model asks for, random: norms near 1, the rest small.
    let arch = sembed::config::Architecture::from_file(&cfg_path).unwrap();
    let shapes = Weights::zeros(DType::F32, &sembed::device::cpu());
    sembed::embed::build_model(&arch, &shapes).unwrap();
    let mut state = 7u64;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let tensors: Vec<_> = shapes
        .requested()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let norm = name.contains("norm");
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    if norm {
                        1.0 + 0.2 * next()
                    } else {
                        0.2 * next()
                    }
                })
                .collect();
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, Dtype::F32, shape, bytes)
        })
        .collect();
    assert!(tensors
        .iter()
        .any(|(n, _, s, _)| n.ends_with("q_proj.weight") && s == &[96, 48]));
    write_safetensors(
        &tmp.path().join("model.safetensors"),
        &tensors,
        Default::default(),
    )
    .unwrap();
    for (cache, ckpt) in [(None, false), (Some(3), true)] {
        let c = TrainConfig {
            cache_mini_batch: cache,
            checkpoint_activations: ckpt,
            ..config(MNRL, None)
        };
        let (dl, dg) = compare(tmp.path(), c);
        assert!(
            dl < 1e-5,
            "cache {cache:?} ckpt {ckpt}: loss differs by {dl:e}"
        );
        assert!(
            dg < 5e-4,
            "cache {cache:?} ckpt {ckpt}: gradient differs by {dg:e}"
        );
    }
}

/// bf16 mixed precision (`TrainConfig::precision`): every projection's products in bf16, summed in
/// f32, everything else f32. Against the f32 pass on the same trainer state: the loss within 0.01
/// (a mean of log-softmaxes of cosines × 20, which bf16 moves by ~1e-3 each) and every gradient
/// within 5% of its tensor's largest value (bf16 keeps 8 bits of each operand: the products move by
/// ~2⁻⁹ each, a layer stack amplifies that; 2.6% measured at worst), and not equal to it (the bf16
/// GEMM ran). A transposed operand or a missed gradient term moves a tensor by its whole size.
/// Per architecture, full and LoRA, with GradCache and checkpointing, and on the real MiniLM.
#[test]
fn bf16_mixed_precision_gradients_are_the_f32_ones_within_bf16_rounding() {
    use sembed::train::trainer::TrainPrecision;
    let lora = |targets: &[&str]| {
        Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: targets.iter().map(|t| t.to_string()).collect(),
        })
    };
    let minilm = sembed::hub::default_model_dir().expect("default model");
    let cases: Vec<(std::path::PathBuf, TrainConfig, &str)> = vec![
        (fixture("bert-tiny"), config(MNRL, Some(0.0)), "full"),
        (
            fixture("bert-tiny"),
            TrainConfig {
                cache_mini_batch: Some(3),
                checkpoint_activations: true,
                ..config(TRIPLET, None)
            },
            "full, dropout, GradCache, checkpointing",
        ),
        (
            fixture("bert-tiny"),
            TrainConfig {
                lora: lora(&["query", "key", "value", "dense"]),
                ..config(MNRL, Some(0.0))
            },
            "LoRA",
        ),
        (fixture("qwen2-bidir-tiny"), config(MNRL, None), "full"),
        (
            fixture("qwen3-causal-tiny"),
            TrainConfig {
                lora: lora(&["q_proj", "v_proj", "gate_proj", "down_proj"]),
                cache_mini_batch: Some(4),
                checkpoint_activations: true,
                ..config(MNRL, None)
            },
            "LoRA, GradCache, checkpointing",
        ),
        (
            fixture("jina-v3-tiny"),
            TrainConfig {
                task: Some("retrieval.passage".into()),
                ..config(MNRL, Some(0.0))
            },
            "task adapter",
        ),
        (
            minilm,
            TrainConfig {
                max_length: Some(128),
                ..config(MNRL, Some(0.0))
            },
            "real MiniLM, full",
        ),
    ];
    for (model, c, what) in cases {
        let mut t = Trainer::new(&model, c.clone(), DType::F32, false).unwrap();
        let ex = examples();
        if c.lora.is_some() {
            // One step first, so that B ≠ 0 and A has a gradient.
            let refs: Vec<&Example> = ex.iter().collect();
            t.step(&refs, 0.05).unwrap();
        }
        let (l32, g32) = named_gradients(&t, &ex);
        t.set_precision(TrainPrecision::Bf16);
        let before = layer_passes();
        let (l16, g16) = named_gradients(&t, &ex);
        assert!(layer_passes() > before, "{what}: the fast pass did not run");
        let (worst, at) = worst_difference(&g16, &g32);
        let dl = (l16 - l32).abs();
        eprintln!(
            "{} {what}: bf16 loss {l16} vs f32 {l32} ({dl:.1e}), worst gradient {worst:.2e} ({at})",
            model.display()
        );
        assert!(dl < 1e-2, "{what}: loss moved by {dl:e}");
        assert!(worst < 5e-2, "{what}: gradient moved by {worst:e} at {at}");
        assert!(
            worst > 1e-5,
            "{what}: bf16 gave the f32 gradients ({worst:e})"
        );
    }
}

/// Where the fast pass does not run (here Qwen3's attention dropout, which it cannot draw as candle
/// does), bf16 mixed precision is an error naming the reason, not a silent f32 run.
#[test]
fn bf16_mixed_precision_refuses_a_run_without_the_fast_pass() {
    use sembed::train::trainer::TrainPrecision;
    let c = TrainConfig {
        precision: TrainPrecision::Bf16,
        ..config(MNRL, Some(0.1))
    };
    let t = Trainer::new(&fixture("qwen3-causal-tiny"), c, DType::F32, false).unwrap();
    let refs: Vec<Example> = examples();
    let refs: Vec<&Example> = refs.iter().collect();
    let err = t.gradients(&refs).unwrap_err().to_string();
    assert!(err.contains("fast training pass"), "{err}");
}
