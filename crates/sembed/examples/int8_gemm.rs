//! Int8 projection throughput against the f32 GEMM on the same shapes, with the kernel set in force
//! (`SEMBED_CPU_KERNELS=avx512|avx2|portable`):
//!
//!     SEMBED_CPU_KERNELS=avx2 cargo run --release -p sembed --example int8_gemm
//!
//! Prints GOP/s (2·m·k·n per product, quantisation of the activations included) and the ratio.
use gemm::Parallelism;
use sembed::fast::{cpu, linear, quant::QuantLinear};
use std::time::Instant;

fn main() {
    let kernels = cpu::check().expect("SEMBED_CPU_KERNELS");
    println!(
        "cpu {} · kernels {kernels}",
        sembed::fast::cpu::describe_cpu()
    );
    println!("| m × k × n | f32 GFLOP/s | int8 GOP/s | int8 / f32 |");
    println!("|---|---:|---:|---:|");
    // MiniLM's projections (hidden 384, MLP 1536) and a Qwen2-1.5B MLP shape, 3000 tokens.
    for (m, k, n) in [
        (3072, 384, 384),
        (3072, 384, 1536),
        (3072, 1536, 384),
        (1024, 1536, 8960),
    ] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 997) as f32 / 498.0 - 1.0)
            .collect();
        let q = QuantLinear::from_torch(&w, n, k);
        let mut y = vec![0f32; m * n];
        let threads = rayon::current_num_threads();
        let time = |f: &mut dyn FnMut()| {
            f();
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min)
        };
        let int8 = time(&mut || q.forward(&x, m, &mut y, Parallelism::Rayon(threads)));
        let f32_peak = linear::peak_gflops(m, k, n);
        let ops = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "| {m} × {k} × {n} | {f32_peak:.1} | {:.1} | {:.2}× |",
            ops / int8,
            ops / int8 / f32_peak
        );
    }
}
