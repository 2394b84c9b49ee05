//! `sembed tune`: a small, bounded search over training settings (learning rate, batch size, epochs,
//! loss) on a slice of the data, each trial trained from the same base model and scored on held-out
//! pairs; writes the table and the best settings.

use anyhow::{bail, Context, Result};
use sembed::train::data::Example;
use sembed::train::eval::RetrievalMetrics;
use sembed::train::trainer::{LossKind, TrainConfig, Trainer};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

#[derive(clap::Args)]
pub struct TuneArgs {
    /// Base model (folder, hf:ORG/NAME; default all-MiniLM-L6-v2).
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// Training pairs (JSONL), as for `sembed train`.
    #[arg(long)]
    data: PathBuf,
    /// Held-out pairs every trial is scored on (NDCG@10).
    #[arg(long)]
    eval: PathBuf,
    /// Where tune.json and tune.md go.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Training pairs per trial (a seeded sample of --data).
    #[arg(long, default_value_t = 256)]
    slice: usize,
    /// Held-out pairs per trial (a seeded sample of --eval).
    #[arg(long, default_value_t = 200)]
    eval_slice: usize,
    /// Learning rates to try.
    #[arg(long, value_delimiter = ',', default_value = "1e-5,2e-5,5e-5")]
    lr: Vec<f64>,
    /// Batch sizes to try.
    #[arg(long, value_delimiter = ',', default_value = "16,32")]
    batch_size: Vec<usize>,
    /// Epochs to try.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    epochs: Vec<usize>,
    /// Losses to try: mnrl, triplet (triplet needs negatives in the data).
    #[arg(long, value_delimiter = ',', default_value = "mnrl")]
    loss: Vec<String>,
    /// At most this many trials (the grid is cut in order: lr fastest, then batch size, epochs, loss).
    #[arg(long, default_value_t = 12)]
    max_trials: usize,
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(serde::Serialize, Clone)]
struct Trial {
    lr: f64,
    batch_size: usize,
    epochs: usize,
    loss: String,
    steps: u64,
    seconds: f64,
    metrics: RetrievalMetrics,
}

/// A seeded sample of `n` (all when there are fewer).
fn sample(mut v: Vec<Example>, n: usize, seed: u64) -> Vec<Example> {
    sembed::rng::SplitMix64(seed).shuffle(&mut v);
    v.truncate(n);
    v
}

fn loss_kind(name: &str) -> Result<LossKind> {
    Ok(match name {
        "mnrl" => LossKind::Mnrl { scale: 20.0 },
        // sentence-transformers' TripletLoss defaults: euclidean distance, margin 5.
        "triplet" => LossKind::Triplet {
            cosine: false,
            margin: 5.0,
        },
        other => bail!("--loss {other}: mnrl or triplet"),
    })
}

pub fn run(args: TuneArgs) -> Result<()> {
    let dir =
        sembed::hub::resolve(args.model.as_deref().unwrap_or("")).context("resolving the model")?;
    let data = sample(
        sembed::train::data::read_examples(&args.data)?,
        args.slice,
        args.seed,
    );
    let eval = sample(
        sembed::train::data::read_examples(&args.eval)?,
        args.eval_slice,
        args.seed ^ 1,
    );
    if data.is_empty() || eval.is_empty() {
        bail!("no pairs to tune on: --data and --eval must hold pairs");
    }
    let mut grid = Vec::new();
    for loss in &args.loss {
        loss_kind(loss)?;
        for &epochs in &args.epochs {
            for &batch_size in &args.batch_size {
                for &lr in &args.lr {
                    grid.push((lr, batch_size, epochs, loss.clone()));
                }
            }
        }
    }
    if grid.len() > args.max_trials {
        eprintln!(
            "sembed: {} settings, trying the first {} (--max-trials)",
            grid.len(),
            args.max_trials
        );
        grid.truncate(args.max_trials);
    }
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let mut base: Option<RetrievalMetrics> = None;
    let mut trials: Vec<Trial> = Vec::new();
    for (i, (lr, batch_size, epochs, loss)) in grid.into_iter().enumerate() {
        let config = TrainConfig {
            loss: loss_kind(&loss)?,
            batch_size,
            epochs,
            lr,
            max_length: args.max_length,
            seed: args.seed,
            ..TrainConfig::default()
        };
        let t = std::time::Instant::now();
        let mut trainer = Trainer::new(&dir, config, sembed::DType::F32, false)
            .with_context(|| format!("loading {}", dir.display()))?;
        let trial_dir = args.output.join(format!("trial-{i}"));
        let report = trainer.train(
            &data,
            Some(&eval),
            &trial_dir,
            &AtomicBool::new(false),
            false,
        )?;
        let seconds = t.elapsed().as_secs_f64();
        // The trial's model is not kept: the table is the result.
        let _ = std::fs::remove_dir_all(&trial_dir);
        if base.is_none() {
            base = report.before.clone();
        }
        let metrics = report
            .epochs
            .last()
            .and_then(|e| e.metrics.clone())
            .context("the trial reported no held-out metrics")?;
        let steps = (data.len().div_ceil(batch_size) * epochs) as u64;
        eprintln!(
            "sembed: trial {}: lr {lr:e}, batch {batch_size}, {epochs} epoch(s), {loss}: NDCG@10 {:.4} ({seconds:.0} s)",
            i + 1,
            metrics.ndcg_at_10
        );
        trials.push(Trial {
            lr,
            batch_size,
            epochs,
            loss,
            steps,
            seconds,
            metrics,
        });
    }
    let best = trials
        .iter()
        .max_by(|a, b| a.metrics.ndcg_at_10.total_cmp(&b.metrics.ndcg_at_10))
        .cloned()
        .expect("at least one trial");
    let command = format!(
        "sembed train --data {} --loss {} --lr {:e} --batch-size {} --epochs {}{}",
        args.data.display(),
        best.loss,
        best.lr,
        best.batch_size,
        best.epochs,
        args.max_length
            .map_or(String::new(), |m| format!(" --max-length {m}"))
    );
    let json = serde_json::json!({
        "model": dir,
        "train_pairs": data.len(),
        "eval_pairs": eval.len(),
        "base": base,
        "trials": trials,
        "best": best,
        "command": command,
    });
    std::fs::write(
        args.output.join("tune.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let mut md = format!(
        "Tuning on {} training pairs, scored on {} held-out pairs (NDCG@10 of the base model: {}).\n\n\
         | lr | batch | epochs | loss | steps | NDCG@10 | MRR@10 | Recall@1 | seconds |\n\
         |---:|---:|---:|---|---:|---:|---:|---:|---:|\n",
        data.len(),
        eval.len(),
        base.as_ref()
            .map_or("n/a".to_string(), |b| format!("{:.4}", b.ndcg_at_10))
    );
    for t in &trials {
        md.push_str(&format!(
            "| {:e} | {} | {} | {} | {} | {:.4} | {:.4} | {:.4} | {:.0} |\n",
            t.lr,
            t.batch_size,
            t.epochs,
            t.loss,
            t.steps,
            t.metrics.ndcg_at_10,
            t.metrics.mrr_at_10,
            t.metrics.recall_at_1,
            t.seconds
        ));
    }
    md.push_str(&format!("\nBest: `{command}`\n"));
    std::fs::write(args.output.join("tune.md"), &md)?;
    print!("{md}");
    Ok(())
}
