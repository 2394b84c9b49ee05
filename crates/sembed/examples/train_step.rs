//! One training step of a model (forward, backward, clipping, AdamW) on 16 triplets, timed; the peer
//! script bench/train_step_st.py does the same with sentence-transformers. Run both with
//! bench/train_step.sh. Also prints autodiff vs finite-difference gradient cost on the tiny models.
//!
//!     cargo run --release -p sembed --example train_step -- TRIPLETS.jsonl [MODEL_DIR] [mnrl|triplet] [STEPS] [TASK]
//!
//! With TASK (a Jina task), one task adapter trains; `SEMBED_EVERY_GRADIENT=1` differentiates every
//! weight as well (what `--dump-gradients` does, and what a task run did before its base weights were
//! made constants), to time the difference.

use sembed::train::data::read_examples;
use sembed::train::trainer::{LossKind, TrainConfig, TrainPrecision, Trainer};
use std::time::Instant;

/// The allocator setup of the `sembed` binary (see crates/sembed-cli/src/main.rs), so that the numbers
/// are the ones users get.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../../sembed-cli/src/mimalloc_options.rs"]
mod mimalloc_options;

fn main() -> sembed::Result<()> {
    mimalloc_options::tune();
    mimalloc_options::tune_training();
    let args: Vec<String> = std::env::args().collect();
    let data = std::path::PathBuf::from(args.get(1).expect("pairs or triplets jsonl"));
    let dir = match args.get(2) {
        Some(d) => std::path::PathBuf::from(d),
        None => sembed::hub::default_model_dir()?,
    };
    // `mnrl` (the default: in-batch negatives, batch 32) or `triplet` (16 triplets, euclidean).
    let mode = args.get(3).map(String::as_str).unwrap_or("mnrl");
    let steps: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3);
    let examples = read_examples(&data)?;
    let (loss, batch_size) = match mode {
        "triplet" => (
            LossKind::Triplet {
                cosine: false,
                margin: 5.0,
            },
            16,
        ),
        _ => (LossKind::Mnrl { scale: 20.0 }, 32),
    };
    // SEMBED_PRECISION=bf16: bf16 mixed precision (`sembed train --precision bf16`).
    let precision = match std::env::var("SEMBED_PRECISION").as_deref() {
        Ok("bf16") => TrainPrecision::Bf16,
        Ok("f32") | Err(_) => TrainPrecision::F32,
        Ok(other) => panic!("SEMBED_PRECISION={other}: expected f32 or bf16"),
    };
    let config = TrainConfig {
        loss,
        max_length: Some(128),
        batch_size,
        task: args.get(5).cloned(),
        precision,
        ..Default::default()
    };
    let mut trainer = if std::env::var_os("SEMBED_EVERY_GRADIENT").is_some() {
        Trainer::for_every_gradient(&dir, config, sembed::DType::F32)?
    } else {
        Trainer::new(&dir, config, sembed::DType::F32, false)?
    };
    // Batch i is examples [i·B, (i+1)·B): the warm-up step runs batch 0, the timed ones 1..=steps.
    let batch = |i: usize| -> Vec<_> {
        examples
            .iter()
            .skip(i * batch_size)
            .take(batch_size)
            .collect()
    };
    trainer.step(&batch(0), 2e-5)?; // warm-up
    let (mut fwd, mut bwd, mut opt) = (0.0, 0.0, 0.0);
    let t = Instant::now();
    for i in 1..=steps {
        let p = trainer.profile_step(&batch(i), 2e-5)?;
        fwd += p.forward_s;
        bwd += p.backward_s;
        opt += p.clip_s + p.adamw_s;
    }
    let n = steps as f64;
    let per_step = t.elapsed().as_secs_f64() / n;
    println!(
        "{{\"engine\": \"sembed\", \"mode\": \"{mode}\", \"precision\": \"{}\", \"batch\": {batch_size}, \"steps\": {steps}, \"seconds_per_step\": {per_step:.4}, \"forward_s\": {:.4}, \"backward_s\": {:.4}, \"optimizer_s\": {:.4}}}",
        sembed::train::trainer::precision_description(precision),
        fwd / n,
        bwd / n,
        opt / n
    );
    if std::env::var_os("SEMBED_STEP_ONLY").is_some() {
        return Ok(());
    }

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
