//! Projection throughput of every kernel set this CPU runs, on the mission's shapes, in one run:
//! f32 (`gemm` crate), bf16 on the bf16 kernels (AMX, AVX-512 BF16) and widened to f32, int8 on
//! each int8 kernel.
//!
//!     cargo run --release -p sembed --example gemm_kernels [m]
//!
//! Prints GFLOP/s (2·m·k·n per product; converting or quantising the activations included) with all
//! threads. A bench, not a test: compare the columns of one run, not runs with each other.
use gemm::Parallelism;
use sembed::fast::bf16::PackedBf16;
use sembed::fast::cpu::{self, Kernels};
use sembed::fast::linear::Linear;
use sembed::fast::quant::QuantLinear;
use std::time::Instant;

fn main() {
    let m: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("m"))
        .unwrap_or(512);
    println!(
        "cpu {} · {} threads",
        cpu::describe_cpu(),
        rayon::current_num_threads()
    );
    let sets: Vec<Kernels> = Kernels::ALL.into_iter().filter(|k| k.supported()).collect();
    let bf16_sets: Vec<Kernels> = sets.iter().copied().filter(|k| k.has_bf16()).collect();
    let int8_sets: Vec<Kernels> = sets
        .iter()
        .copied()
        .filter(|k| matches!(k, Kernels::Amx | Kernels::Avx512 | Kernels::Avx2))
        .collect();
    let mut head = "| m × k × n | f32 | bf16 widened".to_string();
    for k in &bf16_sets {
        head += &format!(" | bf16 {k}");
    }
    for k in &int8_sets {
        head += &format!(" | int8 {k}");
    }
    println!("{head} |");
    // MiniLM (384/1536), Qwen3-0.6B (1024/3072), jina-v3 (1024/4096), Qodo-1.5B (1536/8960).
    for (k, n) in [
        (384, 1152),
        (384, 1536),
        (1536, 384),
        (1024, 4096),
        (1024, 6144),
        (3072, 1024),
        (1536, 2048),
        (1536, 17920),
        (8960, 1536),
    ] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 997) as f32 / 498.0 - 1.0)
            .collect();
        let mut y = vec![0f32; m * n];
        let par = Parallelism::Rayon(rayon::current_num_threads());
        let ops = 2.0 * (m * k * n) as f64 / 1e9;
        let mut time = |f: &mut dyn FnMut(&mut [f32])| {
            f(&mut y);
            let best = (0..3)
                .map(|_| {
                    let t = Instant::now();
                    f(&mut y);
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min);
            ops / best
        };
        let mut row = format!("| {m} × {k} × {n}");
        let f = Linear::f32_from_torch(&w, n, k);
        row += &format!(" | {:.0}", time(&mut |y| f.forward(&x, m, y, par)));
        drop(f);
        let h = Linear::Half(sembed::fast::linear::HalfWeights::Bf16 {
            w: w.iter().map(|&v| half::bf16::from_f32(v)).collect(),
            k,
            n,
        });
        row += &format!(" | {:.0}", time(&mut |y| h.forward(&x, m, y, par)));
        drop(h);
        let p = PackedBf16::from_torch(&w, n, k);
        for &ks in &bf16_sets {
            row += &format!(" | {:.0}", time(&mut |y| p.forward_with(ks, &x, m, y, par)));
        }
        drop(p);
        let q = QuantLinear::with_format(&w, n, k, sembed::fast::quant::Format::BITS7);
        let q8 = QuantLinear::with_format(&w, n, k, sembed::fast::quant::Format::BITS8);
        for &ks in &int8_sets {
            let ql = if ks == Kernels::Avx2 { &q } else { &q8 };
            row += &format!(
                " | {:.0}",
                time(&mut |y| ql.forward_with_kernels(ks, &x, m, y, par))
            );
        }
        println!("{row} |");
    }
}
