//! One training step of a model (forward, backward, clipping, AdamW) on 16 triplets, timed; the peer
//! script bench/train_step_st.py does the same with sentence-transformers. Run both with
//! bench/train_step.sh. Also prints autodiff vs finite-difference gradient cost on the tiny models.
//!
//!     cargo run --release -p sembed --example train_step -- TRIPLETS.jsonl [MODEL_DIR]

use sembed::train::data::read_examples;
use sembed::train::trainer::{LossKind, TrainConfig, Trainer};
use std::time::Instant;

/// The allocator setup of the `sembed` binary (see crates/sembed-cli/src/main.rs), so that the numbers
/// are the ones users get.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../../sembed-cli/src/mimalloc_options.rs"]
mod mimalloc_options;

fn main() -> sembed::Result<()> {
    mimalloc_options::tune();
    let args: Vec<String> = std::env::args().collect();
    let data = std::path::PathBuf::from(args.get(1).expect("triplets jsonl"));
    let dir = match args.get(2) {
        Some(d) => std::path::PathBuf::from(d),
        None => sembed::hub::default_model_dir()?,
    };
    let examples = read_examples(&data)?;
    let batch: Vec<_> = examples.iter().take(16).collect();
    let config = TrainConfig {
        loss: LossKind::Triplet {
            cosine: false,
            margin: 5.0,
        },
        max_length: Some(128),
        batch_size: 16,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&dir, config, sembed::DType::F32, false)?;
    trainer.step(&batch, 2e-5)?; // warm-up
    let n = 3;
    let t = Instant::now();
    for _ in 0..n {
        trainer.step(&batch, 2e-5)?;
    }
    let per_step = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "{{\"engine\": \"sembed\", \"seconds_per_step\": {per_step:.4}, \"triplets\": {}}}",
        batch.len()
    );

    // Autodiff vs finite differences on the tiny models: one backward against 2 forwards per
    // parameter (timed on a sample of parameters, extrapolated to all).
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for model in ["jina-v3-tiny", "qwen2-bidir-tiny", "bert-tiny"] {
        let t = Trainer::new(
            &fixtures.join(model),
            TrainConfig {
                loss: LossKind::Mnrl { scale: 20.0 },
                ..Default::default()
            },
            sembed::DType::F64,
            false,
        )?;
        let tiny: Vec<_> = examples.iter().take(3).collect();
        let params: usize = t
            .variables()
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum();
        let start = Instant::now();
        let reps = 5;
        for _ in 0..reps {
            t.gradients(&tiny)?;
        }
        let autodiff = start.elapsed().as_secs_f64() / reps as f64;
        let start = Instant::now();
        for _ in 0..reps {
            sembed::train::loss::value(&t.batch_loss(&tiny)?)?;
        }
        let forward = start.elapsed().as_secs_f64() / reps as f64;
        let fd = 2.0 * forward * params as f64;
        println!(
            "{{\"model\": \"{model}\", \"parameters\": {params}, \"autodiff_seconds\": {autodiff:.5}, \"finite_difference_seconds\": {fd:.1}, \"ratio\": {:.0}}}",
            fd / autodiff
        );
    }
    Ok(())
}
