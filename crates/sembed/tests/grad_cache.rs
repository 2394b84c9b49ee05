//! GradCache (`cache_mini_batch`) and activation checkpointing (`checkpoint_activations`): each gives
//! the plain loss's value and the gradient of every parameter, for every architecture, both losses,
//! uneven mini-batches, full and LoRA training, with dropout on for checkpointing (its masks are
//! replayed). (The CLI test `dump_gradients_match_upstream` also checks both against upstream PyTorch.)

mod common;

use common::{fixture, named_gradients, worst_difference, Named};
use sembed::train::data::Example;
use sembed::train::trainer::{LoraConfig, LossKind, TrainConfig, Trainer};
use sembed::DType;

fn examples() -> Vec<Example> {
    (0..10)
        .map(|i| Example {
            anchor: format!("how to compute value {i} of the series"),
            positive: format!("def f{i}(x):\n    return x * {i} + {}", i % 5),
            negatives: vec![format!("SELECT {i} FROM t WHERE k = {}", i * 7)],
        })
        .collect()
}

fn gradients(model: &str, config: TrainConfig, dtype: DType) -> (f64, Named) {
    let t = Trainer::new(&fixture(model), config, dtype, false).unwrap();
    named_gradients(&t, &examples())
}

/// Worst per-tensor `max|a − b| / max(max|b|, 1e-3 · global max)` and the loss difference.
fn compare(model: &str, config: TrainConfig, cache: usize, dtype: DType) -> (f64, f64) {
    let cached_config = TrainConfig {
        cache_mini_batch: Some(cache),
        ..config.clone()
    };
    compare_configs(model, config, cached_config, dtype)
}

/// [`compare`] for any two settings that must give the same gradients.
fn compare_configs(
    model: &str,
    config: TrainConfig,
    other: TrainConfig,
    dtype: DType,
) -> (f64, f64) {
    let (plain_loss, plain) = gradients(model, config, dtype);
    let (cached_loss, cached) = gradients(model, other, dtype);
    let (worst, _) = worst_difference(&cached, &plain);
    ((cached_loss - plain_loss).abs() / plain_loss.abs(), worst)
}

fn base(loss: LossKind) -> TrainConfig {
    TrainConfig {
        loss,
        batch_size: 10,
        dropout: Some(0.0),
        ..Default::default()
    }
}

/// Every architecture's tiny model, with the Jina task adapter it trains.
const ARCHITECTURES: [(&str, Option<&str>); 4] = [
    ("bert-tiny", None),
    ("qwen2-bidir-tiny", None),
    ("qwen3-causal-tiny", None),
    ("jina-v3-tiny", Some("retrieval.passage")),
];

const MNRL: LossKind = LossKind::Mnrl { scale: 20.0 };
const TRIPLET: LossKind = LossKind::Triplet {
    cosine: true,
    margin: 0.5,
};

#[test]
fn cached_equals_plain_on_every_architecture() {
    for (model, task) in ARCHITECTURES {
        for loss in [MNRL, TRIPLET] {
            let config = TrainConfig {
                task: task.map(str::to_string),
                ..base(loss)
            };
            // 10 texts per column in mini-batches of 4: 4 + 4 + 2.
            let (dl, dg) = compare(model, config, 4, DType::F32);
            println!("{model} {loss:?}: loss {dl:.1e}, gradients {dg:.1e}");
            assert!(dl <= 1e-5 && dg <= 1e-4, "{model} {loss:?}: {dl} {dg}");
        }
    }
}

/// In float64 the two agree to rounding: the cached gradients are the plain ones, not an approximation.
#[test]
fn cached_equals_plain_in_f64() {
    let (dl, dg) = compare("bert-tiny", base(MNRL), 3, DType::F64);
    println!("bert-tiny f64: loss {dl:.1e}, gradients {dg:.1e}");
    assert!(dl <= 1e-12 && dg <= 1e-9, "{dl} {dg}");
}

#[test]
fn cached_equals_plain_with_lora_and_matryoshka() {
    let lora = TrainConfig {
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![],
        }),
        ..base(MNRL)
    };
    let (dl, dg) = compare("bert-tiny", lora, 1, DType::F32);
    assert!(dl <= 1e-5 && dg <= 1e-4, "lora: {dl} {dg}");
    let mat = TrainConfig {
        matryoshka_dims: vec![16, 32],
        ..base(MNRL)
    };
    let (dl, dg) = compare("bert-tiny", mat, 7, DType::F32);
    assert!(dl <= 1e-5 && dg <= 1e-4, "matryoshka: {dl} {dg}");
}

/// Checkpointed layers give the plain gradients, dropout included: each layer's masks are drawn once
/// and replayed in its recomputation.
// One test function: it counts recomputations in a process-wide counter.
#[test]
fn checkpointed_equals_plain_with_dropout() {
    for (model, task) in ARCHITECTURES {
        let config = TrainConfig {
            task: task.map(str::to_string),
            dropout: Some(0.1),
            ..base(MNRL)
        };
        let checkpointed = TrainConfig {
            checkpoint_activations: true,
            ..config.clone()
        };
        let before = sembed::nn::recomputed_layers();
        let (dl, dg) = compare_configs(model, config.clone(), checkpointed.clone(), DType::F32);
        // 2 layers, each recomputed once per column (anchors, positives, negatives).
        assert_eq!(
            sembed::nn::recomputed_layers() - before,
            6,
            "{model}: layers recomputed"
        );
        println!("{model} checkpointed: loss {dl:.1e}, gradients {dg:.1e}");
        assert!(dl <= 1e-6 && dg <= 1e-5, "{model}: {dl} {dg}");
        // Both at once: GradCache over checkpointed layers (dropout off: GradCache draws its masks
        // per mini-batch, the plain loss per batch).
        let plain = TrainConfig {
            dropout: Some(0.0),
            ..config
        };
        let both = TrainConfig {
            dropout: Some(0.0),
            cache_mini_batch: Some(3),
            ..checkpointed
        };
        let (dl, dg) = compare_configs(model, plain, both, DType::F32);
        assert!(
            dl <= 1e-5 && dg <= 1e-4,
            "{model} cached + checkpointed: {dl} {dg}"
        );
    }
    // LoRA: the first layer's input comes from frozen embeddings.
    let lora = TrainConfig {
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![],
        }),
        dropout: Some(0.1),
        ..base(TRIPLET)
    };
    let (dl, dg) = compare_configs(
        "qwen2-bidir-tiny",
        lora.clone(),
        TrainConfig {
            checkpoint_activations: true,
            ..lora
        },
        DType::F64,
    );
    println!("qwen2 LoRA f64 checkpointed: loss {dl:.1e}, gradients {dg:.1e}");
    assert!(dl <= 1e-12 && dg <= 1e-9, "lora: {dl} {dg}");
}
