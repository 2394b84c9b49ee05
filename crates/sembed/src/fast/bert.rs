//! BERT on the fast path: packed real tokens only, Q/K/V fused into one projection, attention per
//! sequence with no padding and no mask, bias + activation and bias + residual + LayerNorm fused, all
//! scratch reused between calls. Sequences of a batch are shared out between threads (each thread
//! runs whole sequences with single-threaded GEMMs), which on few cores beats splitting every GEMM.

use super::kernels::{self, Act};
use super::linear::{matmul, Linear};
use super::quant::QuantLinear;
use super::Precision;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::weights::Weights;
use candle_core::DType;
use gemm::Parallelism;
use std::cell::RefCell;

struct Layer {
    qkv: Linear,
    qkv_b: Vec<f32>,
    out: Linear,
    out_b: Vec<f32>,
    ln1: (Vec<f32>, Vec<f32>),
    up: Linear,
    up_b: Vec<f32>,
    down: Linear,
    down_b: Vec<f32>,
    ln2: (Vec<f32>, Vec<f32>),
}

pub struct FastBert {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type0: Vec<f32>,
    emb_ln: (Vec<f32>, Vec<f32>),
    eps: f32,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    inter: usize,
    max_positions: usize,
    act: Act,
    precision: Precision,
}

fn host(w: &Weights, shape: &[usize], name: &str) -> Result<Vec<f32>> {
    Ok(w.get(shape, name)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Tokens per MLP chunk (the `[chunk, intermediate]` buffer: 3 MiB for MiniLM).
const MLP_CHUNK: usize = 512;

thread_local! {
    /// Per-thread scratch, grown as needed and kept between calls (fresh pages cost more than the
    /// arithmetic on them).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl FastBert {
    pub fn load(cfg: &BertConfig, w: &Weights, precision: Precision) -> Result<Self> {
        let act = match cfg.hidden_act.as_str() {
            "gelu" => Act::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            "relu" => Act::Relu,
            other => {
                return Err(Error::Unsupported(format!(
                    "fast path: activation `{other}`"
                )))
            }
        };
        let w = w.with_detected_prefix(&["", "bert"], "embeddings.word_embeddings.weight");
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        if h % cfg.num_attention_heads != 0 {
            return Err(Error::Unsupported(format!(
                "hidden size {h} not divisible by {} heads",
                cfg.num_attention_heads
            )));
        }
        let linear = |wt: &[f32], out: usize, inp: usize| match precision {
            Precision::F32 => Linear::f32_from_torch(wt, out, inp),
            Precision::Int8 => Linear::Int8(QuantLinear::from_torch(wt, out, inp)),
        };
        let ln = |p: &Weights| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((host(p, &[h], "weight")?, host(p, &[h], "bias")?))
        };
        let e = w.pp("embeddings");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for n in 0..cfg.num_hidden_layers {
            let l = w.pp(format!("encoder.layer.{n}"));
            let a = l.pp("attention.self");
            let mut qkv_w = Vec::with_capacity(3 * h * h);
            let mut qkv_b = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                qkv_w.extend(host(&a.pp(part), &[h, h], "weight")?);
                qkv_b.extend(host(&a.pp(part), &[h], "bias")?);
            }
            layers.push(Layer {
                qkv: linear(&qkv_w, 3 * h, h),
                qkv_b,
                out: linear(
                    &host(&l.pp("attention.output.dense"), &[h, h], "weight")?,
                    h,
                    h,
                ),
                out_b: host(&l.pp("attention.output.dense"), &[h], "bias")?,
                ln1: ln(&l.pp("attention.output.LayerNorm"))?,
                up: linear(&host(&l.pp("intermediate.dense"), &[i, h], "weight")?, i, h),
                up_b: host(&l.pp("intermediate.dense"), &[i], "bias")?,
                down: linear(&host(&l.pp("output.dense"), &[h, i], "weight")?, h, i),
                down_b: host(&l.pp("output.dense"), &[h], "bias")?,
                ln2: ln(&l.pp("output.LayerNorm"))?,
            });
        }
        let token_type = host(
            &e,
            &[cfg.type_vocab_size, h],
            "token_type_embeddings.weight",
        )?;
        Ok(FastBert {
            word: host(&e, &[cfg.vocab_size, h], "word_embeddings.weight")?,
            position: host(
                &e,
                &[cfg.max_position_embeddings, h],
                "position_embeddings.weight",
            )?,
            token_type0: token_type[..h].to_vec(),
            emb_ln: ln(&e.pp("LayerNorm"))?,
            eps: cfg.layer_norm_eps as f32,
            layers,
            heads: cfg.num_attention_heads,
            hidden: h,
            inter: i,
            max_positions: cfg.max_position_embeddings,
            act,
            precision,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Last hidden states of the real tokens of `rows`, packed row after row: `[Σ len, hidden]`.
    pub fn forward(&self, rows: &[&[u32]]) -> Result<Vec<f32>> {
        for r in rows {
            if r.is_empty() {
                return Err(Error::InvalidInput("empty token sequence".into()));
            }
            if r.len() > self.max_positions {
                return Err(Error::InvalidInput(format!(
                    "sequence of {} tokens exceeds the model's {} positions",
                    r.len(),
                    self.max_positions
                )));
            }
            if let Some(&bad) = r
                .iter()
                .find(|&&id| id as usize * self.hidden >= self.word.len())
            {
                return Err(Error::InvalidInput(format!(
                    "token id {bad} outside the vocabulary"
                )));
            }
        }
        let h = self.hidden;
        let total: usize = rows.iter().map(|r| r.len()).sum();
        let mut out = vec![0f32; total * h];
        let threads = rayon::current_num_threads().max(1);
        let groups = split_by_cost(rows, threads, h, self.inter);
        if groups.len() <= 1 {
            let par = if threads > 1 {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            };
            self.forward_group(rows, &mut out, par);
            return Ok(out);
        }
        // Contiguous groups of rows → contiguous slices of the output.
        let mut slices = Vec::with_capacity(groups.len());
        let mut rest = out.as_mut_slice();
        let mut start = 0;
        for &end in &groups {
            let t: usize = rows[start..end].iter().map(|r| r.len()).sum();
            let (head, tail) = rest.split_at_mut(t * h);
            slices.push((&rows[start..end], head));
            rest = tail;
            start = end;
        }
        rayon::scope(|s| {
            for (g, dst) in slices {
                s.spawn(move |_| self.forward_group(g, dst, Parallelism::None));
            }
        });
        Ok(out)
    }

    fn forward_group(&self, rows: &[&[u32]], x: &mut [f32], par: Parallelism) {
        let (h, i, heads) = (self.hidden, self.inter, self.heads);
        let d = h / heads;
        let t: usize = rows.iter().map(|r| r.len()).sum();
        let smax = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let wide_len = (t * h).max(t.min(MLP_CHUNK) * i);
        let need = t * 3 * h + t * h + wide_len + smax * smax;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        {
            let (qkv, rest) = scratch.split_at_mut(t * 3 * h);
            let (ctx, rest) = rest.split_at_mut(t * h);
            let (wide, rest) = rest.split_at_mut(wide_len);
            let scores = &mut rest[..smax * smax];

            // Embeddings: word + position + token type 0, then LayerNorm.
            let mut row = 0;
            for r in rows {
                for (p, &id) in r.iter().enumerate() {
                    let dst = &mut x[row * h..(row + 1) * h];
                    let wv = &self.word[id as usize * h..(id as usize + 1) * h];
                    let pv = &self.position[p * h..(p + 1) * h];
                    for c in 0..h {
                        dst[c] = wv[c] + pv[c] + self.token_type0[c];
                    }
                    row += 1;
                }
            }
            kernels::layer_norm(x, &self.emb_ln.0, &self.emb_ln.1, self.eps);

            let scale = 1.0 / (d as f32).sqrt();
            for l in &self.layers {
                l.qkv.forward(x, t, qkv, par);
                kernels::add_bias(qkv, &l.qkv_b);
                let mut off = 0;
                for r in rows {
                    let n = r.len();
                    let qkv_rows = &qkv[off * 3 * h..(off + n) * 3 * h];
                    if matches!(par, Parallelism::None) {
                        for hd in 0..heads {
                            let c = &mut ctx[off * h + hd * d..];
                            attend(qkv_rows, n, h, hd * d, d, scale, scores, c, h);
                        }
                    } else {
                        // One sequence on several threads: heads in parallel (its attention GEMMs
                        // are too small to split), each into its own block, then interleaved.
                        use rayon::prelude::*;
                        let blocks: Vec<Vec<f32>> = (0..heads)
                            .into_par_iter()
                            .map(|hd| {
                                let mut s = vec![0f32; n * n];
                                let mut out = vec![0f32; n * d];
                                attend(qkv_rows, n, h, hd * d, d, scale, &mut s, &mut out, d);
                                out
                            })
                            .collect();
                        for (hd, b) in blocks.iter().enumerate() {
                            for (i, row) in b.chunks_exact(d).enumerate() {
                                let at = (off + i) * h + hd * d;
                                ctx[at..at + d].copy_from_slice(row);
                            }
                        }
                    }
                    off += n;
                }
                let y = &mut wide[..t * h];
                l.out.forward(ctx, t, y, par);
                kernels::residual_layer_norm(x, y, &l.out_b, &l.ln1.0, &l.ln1.1, self.eps);
                // The MLP in chunks of tokens: the wide intermediate stays cache-sized.
                for c0 in (0..t).step_by(MLP_CHUNK) {
                    let c1 = (c0 + MLP_CHUNK).min(t);
                    let up = &mut wide[..(c1 - c0) * i];
                    l.up.forward(&x[c0 * h..c1 * h], c1 - c0, up, par);
                    kernels::bias_act(up, &l.up_b, self.act);
                    l.down.forward(up, c1 - c0, &mut ctx[c0 * h..c1 * h], par);
                }
                kernels::residual_layer_norm(x, ctx, &l.down_b, &l.ln2.0, &l.ln2.1, self.eps);
            }
        }
        SCRATCH.with(|s| *s.borrow_mut() = scratch);
    }
}

/// One attention head of one sequence of `n` tokens: `softmax(Q Kᵀ · scale) V` with Q, K, V the
/// columns `col..col + d` of the three `h`-wide blocks of `qkv` (`[n, 3h]`); the result goes to
/// `out` rows of stride `out_stride`. `scores` is scratch of at least `n²`.
#[allow(clippy::too_many_arguments)]
fn attend(
    qkv: &[f32],
    n: usize,
    h: usize,
    col: usize,
    d: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
    out_stride: usize,
) {
    let stride = 3 * h as isize;
    let s = &mut scores[..n * n];
    let (q, k, v) = (&qkv[col..], &qkv[h + col..], &qkv[2 * h + col..]);
    matmul(
        n,
        n,
        d,
        q,
        (stride, 1),
        k,
        (1, stride),
        s,
        (n as isize, 1),
        Parallelism::None,
    );
    kernels::softmax_rows(s, n, scale);
    matmul(
        n,
        d,
        n,
        s,
        (n as isize, 1),
        v,
        (stride, 1),
        out,
        (out_stride as isize, 1),
        Parallelism::None,
    );
}

/// Free the scratch every thread keeps between calls (memory measurements start from nothing).
pub fn release_scratch() {
    rayon::broadcast(|_| SCRATCH.with(|s| drop(std::mem::take(&mut *s.borrow_mut()))));
    SCRATCH.with(|s| drop(std::mem::take(&mut *s.borrow_mut())));
}

/// Split rows (in order) into at most `parts` contiguous groups of similar cost; returns the end index
/// of each group.
fn split_by_cost(rows: &[&[u32]], parts: usize, h: usize, inter: usize) -> Vec<usize> {
    let cost = |n: usize| (n * (4 * h + 2 * inter) * h + 2 * n * n * h) as f64;
    let costs: Vec<f64> = rows.iter().map(|r| cost(r.len())).collect();
    let total: f64 = costs.iter().sum();
    let parts = parts.min(rows.len()).max(1);
    let mut ends = Vec::with_capacity(parts);
    let mut acc = 0.0;
    for (idx, c) in costs.iter().enumerate() {
        let before = acc;
        acc += c;
        let target = total * (ends.len() + 1) as f64 / parts as f64;
        // Close the group at whichever side of this row lands nearer the target.
        if acc >= target && ends.len() + 1 < parts {
            if target - before < acc - target && idx > ends.last().copied().unwrap_or(0) {
                ends.push(idx);
            } else {
                ends.push(idx + 1);
            }
        }
    }
    ends.push(rows.len());
    ends.dedup();
    ends.retain(|&e| e > 0);
    ends
}

#[cfg(test)]
mod tests {
    use super::split_by_cost;

    #[test]
    fn groups_cover_all_rows_in_order() {
        let lens = [256usize, 200, 120, 100, 90, 40, 30, 3];
        let rows: Vec<Vec<u32>> = lens.iter().map(|&n| vec![0; n]).collect();
        let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
        for parts in 1..=10 {
            let ends = split_by_cost(&refs, parts, 384, 1536);
            assert_eq!(*ends.last().unwrap(), lens.len());
            assert!(ends.windows(2).all(|w| w[0] < w[1]), "{ends:?}");
            assert!(ends.len() <= parts.min(lens.len()));
        }
        assert_eq!(split_by_cost(&refs, 2, 384, 1536).len(), 2);
    }
}
