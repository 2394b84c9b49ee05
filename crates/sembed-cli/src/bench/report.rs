//! The bench report as JSON, Markdown (also printed) and SVG charts (written by hand: a few
//! rectangles and polylines do not justify a plotting dependency).

use super::{Report, Shape};
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;

pub fn write(r: &Report, out: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(r)?;
    let md = markdown(r);
    let files = [
        ("report.json", json),
        ("report.md", md.clone()),
        ("throughput.svg", bars_svg(r)),
        (
            "scaling.svg",
            scaling_svg(&r.shapes, "tokens/s by length and batch size"),
        ),
    ];
    for (name, body) in files {
        let p = out.join(name);
        std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{md}");
    eprintln!(
        "sembed bench: wrote report.json, report.md, throughput.svg, scaling.svg to {}",
        out.display()
    );
    Ok(())
}

fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn ms(s: f64) -> String {
    format!("{:.0}", s * 1e3)
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# sembed bench: {} ({})\n", r.model, r.engine);
    if r.smoke {
        let _ = writeln!(w, "**Smoke run: tiny sizes, the numbers mean nothing.**\n");
    }
    let _ = writeln!(
        w,
        "{} ({}) · {} threads · {} · sembed {} · int8 kernel: {} · bf16 kernel: {}  \n{} code texts from {} ({} tokens, mean {:.0}, max {}), max length {}, dimension {}; model load {:.2} s, {:.1} MiB of heap.\n",
        r.machine.cpu,
        r.machine.cpu_features,
        r.machine.threads,
        r.machine.os,
        r.machine.sembed,
        r.machine.int8_kernel,
        r.machine.bf16_kernel,
        r.corpus.texts,
        r.corpus.source,
        r.corpus.tokens,
        r.corpus.mean_tokens,
        r.corpus.max_tokens,
        r.max_length,
        r.dimension,
        r.load_s,
        mib(r.weights.heap_bytes),
    );
    if let Some(m) = &r.mission {
        let _ = writeln!(
            w,
            "## The mission's models at real widths (random weights, {} layers, {} code texts, max length 256, batch 32)\n",
            m.shapes.first().map_or(0, |s| s.layers),
            m.shapes.first().map_or(0, |s| s.texts),
        );
        let _ = writeln!(
            w,
            "| shape | sembed f32 texts/s | PyTorch f32 texts/s | sembed / PyTorch | sembed bf16 texts/s | GFLOP/s (f32) | of GEMM peak | fast vs candle | bf16 vs f32 | PyTorch vs sembed | weights f32 / bf16 |"
        );
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for s in &m.shapes {
            let (tps, ratio, diff) = match &s.torch {
                Some(t) => (
                    format!("{:.2}", t.texts_per_s),
                    format!("**{:.2}×**", t.ratio_f32),
                    format!("{:.1e}", t.max_abs_diff_vs_sembed),
                ),
                None => (String::new(), String::new(), String::new()),
            };
            let _ = writeln!(
                w,
                "| {} | {:.2} | {tps} | {ratio} | {:.2} | {:.0} | {:.0}% | {:.1e} | {:.1e} | {diff} | {:.0} / {:.0} MiB |",
                s.name,
                s.sembed_f32_texts_per_s,
                s.sembed_bf16_texts_per_s,
                s.gflops_f32,
                100.0 * s.gflops_f32 / s.gemm_peak_gflops,
                s.max_abs_diff_vs_candle,
                s.max_abs_diff_bf16_vs_f32,
                mib(s.weight_bytes_f32),
                mib(s.weight_bytes_bf16),
            );
        }
        let _ = writeln!(
            w,
            "\nint8 ({} kernels) and memory. Peak RSS: `sembed embed` over the same texts, one process per precision; PyTorch f32 from its own run.\n",
            r.machine.int8_kernel
        );
        let _ = writeln!(
            w,
            "| shape | sembed int8 texts/s | int8 / PyTorch f32 | int8 / sembed f32 | cosine int8 vs f32 (min / mean) | weights f32 / bf16 / int8 | peak RSS f32 / bf16 / int8 | PyTorch f32 peak RSS |"
        );
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|");
        let rss = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.0}"));
        for s in &m.shapes {
            let (ratio, torch_rss) = match &s.torch {
                Some(t) => (
                    format!("**{:.2}×**", s.sembed_int8_texts_per_s / t.texts_per_s),
                    format!("{:.0} MiB", t.peak_rss_mb),
                ),
                None => (String::new(), String::new()),
            };
            let _ = writeln!(
                w,
                "| {} | {:.2} | {ratio} | {:.2}× | {:.4} / {:.4} | {:.0} / {:.0} / {:.0} MiB | {} / {} / {} MiB | {torch_rss} |",
                s.name,
                s.sembed_int8_texts_per_s,
                s.sembed_int8_texts_per_s / s.sembed_f32_texts_per_s,
                s.int8_cosine_min,
                s.int8_cosine_mean,
                mib(s.weight_bytes_f32),
                mib(s.weight_bytes_bf16),
                mib(s.weight_bytes_int8),
                rss(s.peak_rss_mb_f32),
                rss(s.peak_rss_mb_bf16),
                rss(s.peak_rss_mb_int8),
            );
        }
        if m.shapes.iter().any(|s| s.torch_bf16_autocast.is_some()) {
            let _ = writeln!(
                w,
                "\nbf16 ({}) and int8 against PyTorch at its own best precision here (`torch.autocast(\"cpu\", bfloat16)`):\n",
                r.machine.bf16_kernel
            );
            let _ = writeln!(
                w,
                "| shape | PyTorch bf16 autocast texts/s | sembed bf16 / PyTorch bf16 | sembed int8 / PyTorch bf16 | max abs diff vs sembed f32 |"
            );
            let _ = writeln!(w, "|---|---:|---:|---:|---:|");
            for s in &m.shapes {
                if let Some(t) = &s.torch_bf16_autocast {
                    let _ = writeln!(
                        w,
                        "| {} | {:.2} | **{:.2}×** | **{:.2}×** | {:.1e} |",
                        s.name, t.texts_per_s, t.ratio_bf16, t.ratio_int8, t.max_abs_diff_vs_sembed
                    );
                }
            }
        }
        if let Some(f) = &m.fusion {
            let torch = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.2}"));
            let _ = writeln!(
                w,
                "\nQodo ⊕ Jina fusion ({}-d): f32 {:.2} texts/s, bf16 {:.2} texts/s, weights {:.0} / {:.0} MiB; \
                 PyTorch (both models one after the other) {} texts/s. Extrapolated per layer to the full \
                 28 + 24 layers: sembed f32 {:.3}, bf16 {:.3}, PyTorch f32 {} texts/s.\n",
                f.dimension,
                f.f32_texts_per_s,
                f.bf16_texts_per_s,
                mib(f.weight_bytes_f32),
                mib(f.weight_bytes_bf16),
                torch(f.torch_texts_per_s),
                f.full_depth_f32_texts_per_s,
                f.full_depth_bf16_texts_per_s,
                torch(f.torch_full_depth_texts_per_s.map(|x| (x * 1000.0).round() / 1000.0)),
            );
        }
    }
    if let Some(p) = &r.peers {
        let _ = writeln!(
            w,
            "## Against the peers (same texts, same run, batch {}, best of the repeats)\n",
            r.headline.batch
        );
        let _ = writeln!(
            w,
            "| engine | texts/s | sembed f32 / peer | sembed int8 / peer | sembed bf16 / peer | max abs diff vs sembed f32 |"
        );
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            w,
            "| sembed {} | {:.1} | 1.00 | | | |",
            r.engine, p.sembed_texts_per_s
        );
        if let Some(q) = p.sembed_bf16_texts_per_s {
            let diff = r
                .bf16
                .as_ref()
                .map_or(String::new(), |x| format!("{:.1e}", x.max_abs_diff_vs_f32));
            let _ = writeln!(
                w,
                "| sembed fast-bf16 ({}) | {q:.1} | | | | {diff} |",
                r.machine.bf16_kernel
            );
        }
        if let Some(q) = p.sembed_int8_texts_per_s {
            let diff = r
                .quantized
                .as_ref()
                .map_or(String::new(), |x| format!("{:.1e}", x.max_abs_diff_vs_f32));
            let _ = writeln!(w, "| sembed fast-int8 | {q:.1} | | | | {diff} |");
        }
        for peer in &p.results {
            let _ = writeln!(
                w,
                "| {} | {:.1} | **{:.2}×** | {} | {} | {:.1e} |",
                peer.name,
                peer.texts_per_s,
                peer.ratio,
                peer.int8_ratio
                    .map_or(String::new(), |x| format!("{x:.2}×")),
                peer.bf16_ratio
                    .map_or(String::new(), |x| format!("{x:.2}×")),
                peer.max_abs_diff_vs_sembed
            );
        }
        let _ = writeln!(w);
    }
    let h = &r.headline;
    let _ = writeln!(w, "## Stages (all texts, batch {})\n", h.batch);
    let _ = writeln!(
        w,
        "| texts/s | tokens/s | total ms | tokenize | forward | pool | normalize | fusion |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    let st = &h.stages;
    let _ = writeln!(
        w,
        "| {:.1} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
        h.texts_per_s,
        h.tokens_per_s,
        ms(h.seconds),
        ms(st.tokenize),
        ms(st.forward),
        ms(st.pool),
        ms(st.normalize),
        ms(st.fusion)
    );
    let _ = writeln!(w, "## Throughput by batch size\n");
    let _ = writeln!(w, "| batch | texts/s | tokens/s |");
    let _ = writeln!(w, "|---:|---:|---:|");
    for t in &r.by_batch {
        let _ = writeln!(
            w,
            "| {} | {:.1} | {:.0} |",
            t.batch, t.texts_per_s, t.tokens_per_s
        );
    }
    let l = &r.latency;
    let _ = writeln!(
        w,
        "\nSingle-text latency over {} requests (mean {:.0} tokens): p50 {:.1} ms, p99 {:.1} ms.\n",
        l.runs, l.mean_tokens, l.p50_ms, l.p99_ms
    );
    if !r.shapes.is_empty() {
        let _ = writeln!(
            w,
            "## Scaling: batch × length (tokens/s; heap peak of one call above what was live)\n"
        );
        shape_table(w, &r.shapes);
    }
    for q in r.quantized.iter().chain(&r.bf16) {
        let p = &q.precision;
        let title = if p == "int8" { "Int8" } else { p.as_str() };
        let _ = writeln!(w, "## {title} ({})\n", q.engine);
        let _ = writeln!(
            w,
            "{:.1} texts/s ({:.2}× f32), weights {:.1} MiB of heap; cosine to the f32 vectors: min {:.4}, mean {:.4}; largest value difference {:.1e}.",
            q.headline.texts_per_s, q.speedup_vs_f32, mib(q.weights_heap_bytes), q.cosine_min, q.cosine_mean, q.max_abs_diff_vs_f32
        );
        if let Some(e) = &q.retrieval {
            let _ = writeln!(
                w,
                "Code search on {} mined (docstring → function) pairs from {}: NDCG@10 f32 {:.4}, {p} {:.4} (Δ {:+.4}); MRR@10 f32 {:.4}, {p} {:.4}.",
                e.pairs,
                e.source,
                e.ndcg_at_10_f32,
                e.ndcg_at_10_reduced,
                e.ndcg_at_10_reduced - e.ndcg_at_10_f32,
                e.mrr_at_10_f32,
                e.mrr_at_10_reduced
            );
        }
        let _ = writeln!(w);
    }
    if let Some(t) = &r.training {
        let p = &t.profile;
        let _ = writeln!(
            w,
            "## Training step (MNRL, batch {} pairs, max length {}, f32, {})\n",
            t.batch, t.max_length, t.engine
        );
        let _ = writeln!(
            w,
            "| engine | forward ms | backward ms | clip ms | AdamW ms | gradients MiB (formula) | AdamW state MiB (formula) | step peak above model MiB |"
        );
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            w,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.1} |",
            t.engine,
            ms(p.forward_s),
            ms(p.backward_s),
            p.clip_s * 1e3,
            p.adamw_s * 1e3,
            mib(p.gradients_bytes),
            mib(t.gradients_formula_bytes),
            mib(p.optimizer_bytes),
            mib(t.optimizer_formula_bytes),
            mib(t.step_peak_above_model_bytes)
        );
        if let Some(c) = &t.candle {
            let q = &c.profile;
            let _ = writeln!(
                w,
                "| candle graph, same run | {} | {} | {:.1} | {:.1} | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.1} |",
                ms(q.forward_s),
                ms(q.backward_s),
                q.clip_s * 1e3,
                q.adamw_s * 1e3,
                mib(q.gradients_bytes),
                mib(t.gradients_formula_bytes),
                mib(q.optimizer_bytes),
                mib(t.optimizer_formula_bytes),
                mib(c.step_peak_above_model_bytes)
            );
            let total = |x: &sembed::train::trainer::StepProfile| {
                x.forward_s + x.backward_s + x.clip_s + x.adamw_s
            };
            let _ = writeln!(
                w,
                "\nThe fast training pass takes the step {:.2}× as fast as candle's graph.",
                total(q) / total(p).max(1e-12)
            );
        }
        if let Some(b) = &t.bf16 {
            let q = &b.profile;
            let total = |x: &sembed::train::trainer::StepProfile| {
                x.forward_s + x.backward_s + x.clip_s + x.adamw_s
            };
            let _ = writeln!(
                w,
                "\n`--precision bf16` ({}), same run: forward {} ms, backward {} ms, clip {:.1} ms, AdamW {:.1} ms: {:.2}× the f32 step's speed.",
                b.precision,
                ms(q.forward_s),
                ms(q.backward_s),
                q.clip_s * 1e3,
                q.adamw_s * 1e3,
                total(p) / total(q).max(1e-12)
            );
        }
        let _ = writeln!(
            w,
            "\n{} parameters, {} trained; formulas: gradients 4 bytes per parameter, AdamW 8 bytes per trained parameter.\n",
            t.parameters, t.trainable_parameters
        );
    }
    if let Some(g) = &r.gradients {
        if let Some(c) = g.first() {
            let _ = writeln!(
                w,
                "## Gradients: autodiff against finite differences (random BERT, {} layers, {} × {} tokens)\n",
                c.layers, c.batch, c.seq
            );
        }
        let _ = writeln!(
            w,
            "| hidden | parameters | forward ms | autodiff ms | FD per entry ms | FD full gradient (estimate) | FD / autodiff |"
        );
        let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|---:|");
        for c in g {
            let _ = writeln!(
                w,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.0} s | {:.0}× |",
                c.hidden,
                c.parameters,
                c.forward_s * 1e3,
                c.autodiff_s * 1e3,
                c.fd_per_entry_s * 1e3,
                c.fd_full_estimate_s,
                c.fd_full_estimate_s / c.autodiff_s
            );
        }
        let _ = writeln!(w);
    }
    if let Some(f) = &r.fusion_check {
        let _ = writeln!(w, "## Fusion shape check\n");
        let _ = writeln!(
            w,
            "{} → {} dimensions (parts {:?}), largest |norm − 1| {:.1e}.\n",
            f.models.join(" + "),
            f.dimension,
            f.parts,
            f.max_norm_error
        );
        shape_table(w, &f.shapes);
    }
    if let Some(e) = &r.estimates {
        let _ = writeln!(w, "## The real models, estimated\n");
        let _ = writeln!(
            w,
            "| model | parameters | weights f32 / bf16 GiB | GEMM GFLOP/s here | length | GFLOP per text | s per text | batch-32 layer transients GiB |"
        );
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|");
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        for m in &e.models {
            for at in &m.by_length {
                let _ = writeln!(
                    w,
                    "| {} | {:.2} B | {:.1} / {:.1} | {:.0} | {} | {:.0} | {:.2} | {:.2} |",
                    m.name,
                    m.parameters as f64 / 1e9,
                    gib(m.weights_f32_bytes),
                    gib(m.weights_bf16_bytes),
                    m.gemm_gflops,
                    at.length,
                    at.gflop_per_text,
                    at.seconds_per_text,
                    gib(at.activation_bytes_batch32)
                );
            }
        }
        let _ = writeln!(
            w,
            "\nThe fused 2560-d pipeline runs both: its time per text is the sum of the two rows. {}.\n",
            e.note
        );
    }
    s
}

fn shape_table(w: &mut String, shapes: &[Shape]) {
    let mut batches: Vec<usize> = shapes.iter().map(|s| s.batch).collect();
    batches.dedup();
    let mut lens: Vec<usize> = shapes.iter().map(|s| s.length).collect();
    lens.sort();
    lens.dedup();
    let _ = write!(w, "| length |");
    for b in &batches {
        let _ = write!(w, " batch {b} tokens/s | batch {b} MiB |");
    }
    let _ = writeln!(w);
    let _ = write!(w, "|---:|");
    for _ in &batches {
        let _ = write!(w, "---:|---:|");
    }
    let _ = writeln!(w);
    for l in lens {
        let _ = write!(w, "| {l} |");
        for b in &batches {
            match shapes.iter().find(|s| s.batch == *b && s.length == l) {
                Some(s) => {
                    let _ = write!(
                        w,
                        " {:.0} | {:.1} |",
                        s.tokens_per_s,
                        mib(s.peak_activation_bytes)
                    );
                }
                None => {
                    let _ = write!(w, " | |");
                }
            }
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w);
}

const W: f64 = 640.0;
const FONT: &str = "font-family=\"sans-serif\" font-size=\"12\"";

/// Horizontal bars of texts/s: sembed f32, sembed int8 and the peers.
fn bars_svg(r: &Report) -> String {
    let mut bars = vec![(format!("sembed {}", r.engine), r.headline.texts_per_s)];
    for q in r.quantized.iter().chain(&r.bf16) {
        bars.push((format!("sembed {}", q.engine), q.headline.texts_per_s));
    }
    if let Some(p) = &r.peers {
        bars[0].1 = p.sembed_texts_per_s;
        for peer in &p.results {
            bars.push((peer.name.clone(), peer.texts_per_s));
        }
    }
    let max = bars.iter().map(|b| b.1).fold(1e-9, f64::max);
    let row = 28.0;
    let left = 190.0;
    let height = 40.0 + row * bars.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" {FONT}>\n<text x=\"10\" y=\"18\" font-weight=\"bold\">texts/s, {} code texts, batch {} (higher is better)</text>\n",
        r.corpus.texts, r.headline.batch
    );
    for (i, (name, v)) in bars.iter().enumerate() {
        let y = 30.0 + row * i as f64;
        let len = (W - left - 70.0) * v / max;
        let color = if name.starts_with("sembed") {
            "#2b6cb0"
        } else {
            "#a0aec0"
        };
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{:.0}\">{}</text><rect x=\"{left}\" y=\"{y:.0}\" width=\"{len:.1}\" height=\"{:.0}\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.0}\">{v:.1}</text>",
            y + 15.0,
            xml(name),
            row - 8.0,
            left + len + 5.0,
            y + 15.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// tokens/s against length (log scale), one line per batch size.
fn scaling_svg(shapes: &[Shape], title: &str) -> String {
    let (h, left, bottom, top) = (360.0, 70.0, 40.0, 30.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" {FONT}>\n<text x=\"10\" y=\"18\" font-weight=\"bold\">{}</text>\n",
        xml(title)
    );
    if shapes.is_empty() {
        s.push_str("<text x=\"10\" y=\"50\">not measured</text></svg>\n");
        return s;
    }
    let lmin = shapes.iter().map(|x| x.length).min().unwrap_or(1) as f64;
    let lmax = shapes.iter().map(|x| x.length).max().unwrap_or(2) as f64;
    let ymax = shapes.iter().map(|x| x.tokens_per_s).fold(1e-9, f64::max) * 1.1;
    let x_of = |l: f64| {
        let span = (lmax.log2() - lmin.log2()).max(1e-9);
        left + (W - left - 20.0) * (l.log2() - lmin.log2()) / span
    };
    let y_of = |v: f64| h - bottom - (h - bottom - top) * v / ymax;
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{:.0}\" x2=\"{:.0}\" y2=\"{:.0}\" stroke=\"black\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{:.0}\" stroke=\"black\"/>",
        h - bottom,
        W - 20.0,
        h - bottom,
        h - bottom
    );
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        let _ = writeln!(s, "<text x=\"5\" y=\"{:.0}\">{v:.0}</text>", y_of(v) + 4.0);
    }
    let mut lens: Vec<usize> = shapes.iter().map(|x| x.length).collect();
    lens.sort();
    lens.dedup();
    for l in lens {
        let _ = writeln!(
            s,
            "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\">{l}</text>",
            x_of(l as f64),
            h - bottom + 16.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\">tokens per text</text>",
        (W + left) / 2.0,
        h - 6.0
    );
    let colors = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1"];
    let mut batches: Vec<usize> = shapes.iter().map(|x| x.batch).collect();
    batches.dedup();
    for (i, b) in batches.iter().enumerate() {
        let pts: Vec<String> = shapes
            .iter()
            .filter(|x| x.batch == *b)
            .map(|x| format!("{:.1},{:.1}", x_of(x.length as f64), y_of(x.tokens_per_s)))
            .collect();
        let c = colors[i % colors.len()];
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/><text x=\"{:.0}\" y=\"{:.0}\" fill=\"{c}\">batch {b}</text>",
            pts.join(" "),
            W - 90.0,
            top + 16.0 * (i as f64 + 1.0)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
