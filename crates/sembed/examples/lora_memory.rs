//! LoRA training memory of a 1.5B model (measurement, not a test): a randomly initialised model of
//! the real Qodo-Embed-1 shape (its published config.json), LoRA rank 8 on q_proj/v_proj, a few MNRL
//! steps on `pairs` anchor/positive sequences of `len` tokens, peak resident memory against the formula.
//!
//!     cargo run --release -p sembed --example lora_memory -- ../shared/real-configs/qodo-embed-1-1.5b/config.json [PAIRS] [LEN] [STEPS] [CACHE]
//!
//! With CACHE, each step runs GradCache (`sembed train --cache-mini-batch CACHE`): the sequences are
//! embedded CACHE at a time, and activations are held for CACHE sequences only. With
//! `SEMBED_CHECKPOINT=1`, layers are checkpointed too (`--checkpoint-activations`): each keeps its
//! input, and one layer's activations at a time are recomputed in the backward pass.

use candle_core::{DType, Tensor};
use sembed::config::{Architecture, Pooling};
use sembed::lora::{LoraAttach, LoraSpec};
use sembed::models::Batch;
use sembed::train::loss::mnrl_loss;
use sembed::train::optim::{collect, AdamW, AdamWConfig};
use sembed::weights::Weights;
use std::sync::Arc;
use std::time::Instant;

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// The allocator setup of the `sembed` binary (see crates/sembed-cli/src/main.rs), so that the numbers
/// are the ones users get.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../../sembed-cli/src/mimalloc_options.rs"]
mod mimalloc_options;

fn main() -> sembed::Result<()> {
    mimalloc_options::tune();
    mimalloc_options::tune_training();
    if let Some(ms) = std::env::var("SEMBED_PURGE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        // SAFETY: a plain setter of mimalloc's global options (15 = purge_delay, ms).
        unsafe { libmimalloc_sys::mi_option_set(15, ms) };
    }
    let args: Vec<String> = std::env::args().collect();
    let config = std::path::PathBuf::from(args.get(1).expect("path to config.json"));
    let pairs: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let len: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(256);
    let steps: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3);
    let cache: Option<usize> = args.get(5).and_then(|s| s.parse().ok());
    let checkpoint = std::env::var("SEMBED_CHECKPOINT").is_ok_and(|v| v == "1");
    let arch = Architecture::from_file(&config)?;
    let Architecture::Qwen(cfg) = &arch else {
        panic!("expects a Qwen2 config")
    };
    let cpu = sembed::device::cpu();
    let spec = LoraSpec {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    let attach = Arc::new(LoraAttach::new(spec, 7));
    let t = Instant::now();
    let weights = Weights::random(1, DType::F32, &cpu).with_lora(attach.clone());
    let model = sembed::embed::build_model(&arch, &weights)?;
    let vars = attach.variables();
    let base_params: usize = {
        let w = Weights::zeros(DType::F32, &cpu);
        sembed::embed::build_model(&arch, &w)?;
        w.requested()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    };
    let lora_params: usize = vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    println!(
        "peak RSS after build {:.2} GiB",
        gib(sembed::train::trainer::peak_rss_bytes().unwrap_or(0))
    );
    println!("built {} layers × {} hidden in {:.1}s: {base_params} base parameters, {lora_params} LoRA parameters", cfg.num_hidden_layers, cfg.hidden_size, t.elapsed().as_secs_f64());
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: 1e-4,
            ..Default::default()
        },
    )?;
    let mut rng = sembed::train::data::SplitMix64(3);
    let mut ids = |n: usize| -> Vec<Vec<u32>> {
        (0..n)
            .map(|_| {
                (0..len)
                    .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
                    .collect()
            })
            .collect()
    };
    for step in 0..steps {
        let t = Instant::now();
        let embed = |rows: &[Vec<u32>]| -> sembed::Result<Tensor> {
            let r: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
            let batch = Batch::new(&r, false, None, &cpu)?;
            let hidden = batch.packing.pad(&model.forward(&batch)?)?;
            sembed::pool::pool(
                &hidden,
                &batch.attention_mask,
                &batch.mask_rows,
                Pooling::LastToken,
            )
        };
        let (anchors, positives) = (ids(pairs), ids(pairs));
        let run = || -> sembed::Result<(f64, Vec<Option<Tensor>>)> {
            Ok(match cache {
                None => {
                    let a = embed(&anchors)?;
                    let p = embed(&positives)?;
                    let loss = mnrl_loss(&a, &p, &[], 20.0)?;
                    let grads = collect(&vars, &loss.backward()?);
                    (sembed::train::loss::value(&loss)?, grads)
                }
                Some(m) => sembed::train::cache::grad_cache(
                    &[anchors.as_slice(), positives.as_slice()],
                    m,
                    &|_, _, rows| embed(rows),
                    &|e| mnrl_loss(&e[0], &e[1], &[], 20.0),
                    &vars,
                )?,
            })
        };
        let (loss, grads) = if checkpoint {
            let ((loss, mut grads), inside) = sembed::nn::with_checkpointing(run)?;
            for (g, (_, v)) in grads.iter_mut().zip(&vars) {
                if let Some(extra) = inside.get(&v.as_tensor().id()) {
                    *g = Some(match g.take() {
                        Some(a) => (a + extra)?,
                        None => extra.clone(),
                    });
                }
            }
            (loss, grads)
        } else {
            run()?
        };
        opt.step(&grads, 1e-4)?;
        println!(
            "step {step}: loss {loss:.4}, {:.1}s, peak RSS {:.2} GiB",
            t.elapsed().as_secs_f64(),
            gib(sembed::train::trainer::peak_rss_bytes().unwrap_or(0))
        );
    }
    let peak = sembed::train::trainer::peak_rss_bytes().unwrap_or(0);
    let weights_b = base_params * 4;
    let lora_b = lora_params * 4;
    let opt_b = lora_params * 8;
    // Activations are held for one mini-batch with GradCache, for both columns without.
    let tokens = cache.map_or(2 * pairs, |m| m.min(pairs)) * len;
    if checkpoint {
        let inputs = tokens * cfg.num_hidden_layers * cfg.hidden_size * 4;
        println!("checkpointed: layer inputs {:.3} GiB ({tokens} tokens × {} layers × {} × 4 bytes); the rest is one layer's activations and workspace",
            gib(inputs), cfg.num_hidden_layers, cfg.hidden_size);
    }
    println!("formula: weights {:.2} GiB (f32) + LoRA {:.3} GiB + gradients {:.3} GiB + AdamW {:.3} GiB = {:.2} GiB before activations",
        gib(weights_b), gib(lora_b), gib(lora_b), gib(opt_b), gib(weights_b + 2 * lora_b + opt_b));
    println!("measured peak RSS {:.2} GiB → activations and workspace {:.2} GiB for {tokens} tokens ({:.1} KiB per token per layer)",
        gib(peak), gib(peak.saturating_sub(weights_b + 2 * lora_b + opt_b)),
        peak.saturating_sub(weights_b + 2 * lora_b + opt_b) as f64 / 1024.0 / tokens as f64 / cfg.num_hidden_layers as f64);
    Ok(())
}
