//! The Qwen2 / Qwen3 decoder layers' training pass on the fast engine's kernels (the BERT pass's
//! sibling, [`super::train`]): pre-norm RMSNorm blocks, grouped-query attention, optional q/k/v bias
//! (Qwen2) and per-head q/k RMSNorm (Qwen3), rotary embeddings, bidirectional or causal attention,
//! SwiGLU MLP. Forward and backward are written by hand on the packed tokens (no padding), attention
//! per sequence at its exact length; it enters candle's autograd through [`super::train::run_stack`].
//!
//! LoRA adapters ride on any of the seven projections (`y += scale · (x Aᵀ) Bᵀ`); the frozen base
//! weights are read in place and get no gradient (nor their GEMM). candle's graph
//! ([`crate::models::qwen`]) stays the reference and runs what this pass does not: attention or
//! adapter dropout, f64.

use super::kernels::{self, multiversion};
use super::linear::matmul_acc;
use super::train::{
    block_rows, col_sums, proj_backward, proj_forward, run_stack, runs, softmax_backward_rows,
    split_mut, trained_slots, Layers, Lora, Proj, Rope, Seq,
};
use crate::error::{Error, Result};
use candle_core::Tensor;
use gemm::Parallelism;
use rayon::prelude::*;

/// The shapes and options of a Qwen layer stack.
#[derive(Clone, Copy, Debug)]
pub struct QwenDims {
    pub hidden: usize,
    /// Query heads and key/value heads (grouped-query attention: `q_heads % kv_heads == 0`).
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub eps: f32,
    pub rope_theta: f64,
    pub causal: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm over each query and key head before the rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// A LoRA adapter `(rank, scale)` on each projection, in the order of [`PROJECTIONS`].
    pub lora: [Option<(usize, f32)>; 7],
}

/// The projections, in the order of [`QwenDims::lora`] and of the adapters' parameters.
pub const PROJECTIONS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

impl QwenDims {
    /// The number of parameters of one layer in [`encoder`]'s order.
    pub fn params_per_layer(&self) -> usize {
        9 + if self.qkv_bias { 3 } else { 0 }
            + if self.qk_norm { 2 } else { 0 }
            + 2 * self.lora.iter().flatten().count()
    }
    fn q_width(&self) -> usize {
        self.q_heads * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Width of a packed `[q | k | v]` row.
    fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
}

/// One layer's weights, read in place, PyTorch layout (`[out, in]`).
struct W<'a> {
    in_norm: &'a [f32],
    /// q, k, v, o, gate, up, down.
    proj: [Proj<'a>; 7],
    bias: Option<[&'a [f32]; 3]>,
    qk_norm: Option<[&'a [f32]; 2]>,
    post_norm: &'a [f32],
}

/// Slots of the layer's parameter list (the order of [`encoder`]); `None`: absent.
#[derive(Clone, Copy)]
struct Slots {
    in_norm: usize,
    proj: [usize; 7],
    bias: Option<usize>,
    qk_norm: Option<usize>,
    post_norm: usize,
    lora: [Option<usize>; 7],
    len: usize,
}

impl Slots {
    fn of(d: &QwenDims) -> Slots {
        let mut n = 0;
        let mut take = |k: usize| {
            n += k;
            n - k
        };
        let in_norm = take(1);
        let (q, k, v) = (take(1), take(1), take(1));
        let bias = d.qkv_bias.then(|| take(3));
        let o = take(1);
        let qk_norm = d.qk_norm.then(|| take(2));
        let post_norm = take(1);
        let (gate, up, down) = (take(1), take(1), take(1));
        let lora = d.lora.map(|l| l.map(|_| take(2)));
        Slots {
            in_norm,
            proj: [q, k, v, o, gate, up, down],
            bias,
            qk_norm,
            post_norm,
            lora,
            len: n,
        }
    }
}

/// The layer's weights from its parameter list; `trained[i]`: slot `i` is a variable.
fn weights<'a>(d: &QwenDims, s: &Slots, trained: &[bool], bf16: bool, w: &[&'a [f32]]) -> W<'a> {
    let proj = std::array::from_fn(|i| Proj {
        w: w[s.proj[i]],
        train_w: trained[s.proj[i]],
        bf16,
        lora: s.lora[i].map(|at| {
            let (rank, scale) = d.lora[i].expect("slot of an adapter");
            Lora {
                a: w[at],
                b: w[at + 1],
                rank,
                scale,
            }
        }),
    });
    W {
        in_norm: w[s.in_norm],
        proj,
        bias: s.bias.map(|b| [w[b], w[b + 1], w[b + 2]]),
        qk_norm: s.qk_norm.map(|n| [w[n], w[n + 1]]),
        post_norm: w[s.post_norm],
    }
}

/// What a layer's backward reads.
pub struct Saved {
    /// Each projection's `scale · x Aᵀ` (empty without an adapter).
    xa: [Vec<f32>; 7],
    x: Vec<f32>,
    rstd1: Vec<f32>,
    hs1: Vec<f32>,
    /// `[q | k | v]` as projected (before the q/k norm; empty without it).
    raw: Vec<f32>,
    /// `1/rms` of each query and key head of each token (`[T, q_heads + kv_heads]`; q/k norm only).
    rstd_qk: Vec<f32>,
    /// `[q | k | v]` as attention reads them (normed, rotated).
    qkv: Vec<f32>,
    /// Softmax probabilities, `[q_heads, len, len]` per sequence, sequence after sequence.
    probs: Vec<f32>,
    ctx: Vec<f32>,
    x2: Vec<f32>,
    rstd2: Vec<f32>,
    hs2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    m: Vec<f32>,
}

multiversion! {
    /// RMSNorm backward of one row `y = x · r · γ` (`r = 1/rms(x)`): adds `∂L/∂x` to `dx` and
    /// `∂L/∂γ` to `dg`.
    fn rms_backward_row(dy: &[f32], x: &[f32], r: f32, g: &[f32], dx: &mut [f32], dg: &mut [f32]) {
        let n = dy.len();
        let mut dot = 0f32;
        for i in 0..n {
            let xn = x[i] * r;
            let d = dy[i] * g[i];
            dot += d * xn;
            dg[i] += dy[i] * xn;
        }
        let mean = dot / n as f32;
        for i in 0..n {
            dx[i] += r * (dy[i] * g[i] - x[i] * r * mean);
        }
    }
}

multiversion! {
    /// SwiGLU backward in place: `m = silu(gate) · up`; `dm` becomes `∂L/∂gate`, `dup` gets `∂L/∂up`.
    fn swiglu_backward(dm: &mut [f32], gate: &[f32], up: &[f32], dup: &mut [f32]) {
        for i in 0..dm.len() {
            let g = gate[i];
            let s = 1.0 / (1.0 + kernels::exp(-g));
            dup[i] = dm[i] * g * s;
            dm[i] *= up[i] * s * (1.0 + g * (1.0 - s));
        }
    }
}

multiversion! {
    /// `m = silu(gate) · up`.
    fn swiglu(gate: &[f32], up: &[f32], m: &mut [f32]) {
        for i in 0..m.len() {
            let g = gate[i];
            m[i] = g / (1.0 + kernels::exp(-g)) * up[i];
        }
    }
}

/// `x · r · γ` row by row (rows of `γ.len()`): `(r per row, y)`.
fn rms_rows(x: &[f32], g: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = g.len();
    let t = x.len() / h;
    let mut r = vec![0f32; t];
    let mut y = vec![0f32; t * h];
    let rows = block_rows(t, h);
    x.par_chunks(rows * h)
        .zip(y.par_chunks_mut(rows * h))
        .zip(r.par_chunks_mut(rows))
        .for_each(|((xc, yc), rc)| {
            for (i, rv) in rc.iter_mut().enumerate() {
                *rv = kernels::inv_rms(&xc[i * h..(i + 1) * h], eps);
            }
            kernels::rms_norm(xc, yc, g, eps);
        });
    (r, y)
}

/// RMSNorm backward over rows of `γ.len()`: adds `∂L/∂x` to `dx`, returns `∂L/∂γ`.
fn rms_backward(dy: &[f32], x: &[f32], r: &[f32], g: &[f32], dx: &mut [f32]) -> Vec<f32> {
    let h = g.len();
    let t = r.len();
    let rows = block_rows(t, h);
    dx.par_chunks_mut(rows * h)
        .enumerate()
        .map(|(blk, dc)| {
            let mut dg = vec![0f32; h];
            for i in 0..dc.len() / h {
                let row = blk * rows + i;
                let sl = row * h..(row + 1) * h;
                rms_backward_row(
                    &dy[sl.clone()],
                    &x[sl.clone()],
                    r[row],
                    g,
                    &mut dc[i * h..(i + 1) * h],
                    &mut dg,
                );
            }
            dg
        })
        .reduce(
            || vec![0f32; h],
            |mut a, b| {
                kernels::axpy(&mut a, 1.0, &b);
                a
            },
        )
}

/// Qwen's layers for [`run_stack`].
struct QwenLayers {
    d: QwenDims,
    slots: Slots,
    /// Per slot of a layer's parameter list: a variable (every layer alike).
    trained: Vec<bool>,
    seqs: Vec<Seq>,
    tokens: usize,
    rope: Rope,
    /// bf16 mixed precision, as [`super::train::mixed_bf16`] was when the forward pass ran.
    bf16: bool,
}

impl QwenLayers {
    /// Offsets of each sequence's probabilities in [`Saved::probs`].
    fn prob_offsets(&self) -> (Vec<usize>, usize) {
        let mut out = Vec::with_capacity(self.seqs.len());
        let mut o = 0;
        for q in &self.seqs {
            out.push(o);
            o += self.d.q_heads * q.len * q.len;
        }
        (out, o)
    }
}

/// Attention of one sequence: `qkv [len, q | k | v]` → `ctx [len, q_heads · head_dim]`,
/// probabilities into `probs`.
fn attention_forward(d: &QwenDims, l: usize, qkv: &[f32], probs: &mut [f32], ctx: &mut [f32]) {
    if l == 0 {
        return;
    }
    let (hd, qw, kw, wd) = (d.head_dim, d.q_width(), d.kv_width(), d.qkv_width());
    let rep = d.q_heads / d.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    for head in 0..d.q_heads {
        let g = head / rep;
        let p = &mut probs[head * l * l..(head + 1) * l * l];
        matmul_acc(
            l,
            l,
            hd,
            &qkv[head * hd..],
            (wd as isize, 1),
            &qkv[qw + g * hd..],
            (1, wd as isize),
            p,
            (l as isize, 1),
            false,
            Parallelism::None,
        );
        if d.causal {
            kernels::softmax_rows_causal(p, l, scale);
        } else {
            kernels::softmax_rows(p, l, scale);
        }
        matmul_acc(
            l,
            hd,
            l,
            p,
            (l as isize, 1),
            &qkv[qw + kw + g * hd..],
            (wd as isize, 1),
            &mut ctx[head * hd..],
            (qw as isize, 1),
            false,
            Parallelism::None,
        );
    }
}

/// Backward of [`attention_forward`]: `dctx` → `dqkv` (zeroed on entry; key and value heads shared
/// by several query heads sum their gradients).
fn attention_backward(
    d: &QwenDims,
    l: usize,
    qkv: &[f32],
    probs: &[f32],
    dctx: &[f32],
    dqkv: &mut [f32],
) {
    if l == 0 {
        return;
    }
    let (hd, qw, kw, wd) = (d.head_dim, d.q_width(), d.kv_width(), d.qkv_width());
    let rep = d.q_heads / d.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut dp = vec![0f32; l * l];
    for head in 0..d.q_heads {
        let g = head / rep;
        let p = &probs[head * l * l..(head + 1) * l * l];
        // dp = dctx · vᵀ
        matmul_acc(
            l,
            l,
            hd,
            &dctx[head * hd..],
            (qw as isize, 1),
            &qkv[qw + kw + g * hd..],
            (1, wd as isize),
            &mut dp,
            (l as isize, 1),
            false,
            Parallelism::None,
        );
        // dv += pᵀ · dctx
        matmul_acc(
            l,
            hd,
            l,
            p,
            (1, l as isize),
            &dctx[head * hd..],
            (qw as isize, 1),
            &mut dqkv[qw + kw + g * hd..],
            (wd as isize, 1),
            true,
            Parallelism::None,
        );
        // Masked (causal) entries have p = 0, so their score gradient is 0.
        softmax_backward_rows(&mut dp, p, l, scale);
        // dq = ds · k, dk += dsᵀ · q
        matmul_acc(
            l,
            hd,
            l,
            &dp,
            (l as isize, 1),
            &qkv[qw + g * hd..],
            (wd as isize, 1),
            &mut dqkv[head * hd..],
            (wd as isize, 1),
            false,
            Parallelism::None,
        );
        matmul_acc(
            l,
            hd,
            l,
            &dp,
            (1, l as isize),
            &qkv[head * hd..],
            (wd as isize, 1),
            &mut dqkv[qw + g * hd..],
            (wd as isize, 1),
            true,
            Parallelism::None,
        );
    }
}

impl Layers for QwenLayers {
    type Saved = Saved;
    const NAME: &'static str = "fast-train-qwen-decoder";

    fn forward(&self, _layer: usize, w: &[&[f32]], x: Vec<f32>) -> (Vec<f32>, Saved) {
        let d = &self.d;
        let w = weights(d, &self.slots, &self.trained, self.bf16, w);
        let (t, h, hd, inter) = (self.tokens, d.hidden, d.head_dim, d.inter);
        let (qw, kw, wd) = (d.q_width(), d.kv_width(), d.qkv_width());
        let mut xa: [Vec<f32>; 7] = Default::default();

        // hs1 = RMSNorm(x); [q | k | v] = hs1 · W{q,k,v}ᵀ (+ b)
        let (rstd1, hs1) = rms_rows(&x, w.in_norm, d.eps);
        let mut qkv = vec![0f32; t * wd];
        xa[0] = proj_forward(&hs1, &w.proj[0], (t, h, qw), &mut qkv, wd);
        xa[1] = proj_forward(&hs1, &w.proj[1], (t, h, kw), &mut qkv[qw..], wd);
        xa[2] = proj_forward(&hs1, &w.proj[2], (t, h, kw), &mut qkv[qw + kw..], wd);
        if let Some(b) = w.bias {
            let b = b.concat();
            let rows = block_rows(t, wd);
            qkv.par_chunks_mut(rows * wd)
                .for_each(|c| kernels::add_bias(c, &b));
        }
        // Per-head q/k RMSNorm (Qwen3), then the rotation.
        let (raw, rstd_qk) = match w.qk_norm {
            Some([gq, gk]) => {
                let raw = qkv.clone();
                let heads = d.q_heads + d.kv_heads;
                let mut r = vec![0f32; t * heads];
                qkv.par_chunks_mut(wd)
                    .zip(r.par_chunks_mut(heads))
                    .for_each(|(row, rr)| {
                        for (i, piece) in row[..qw + kw].chunks_exact_mut(hd).enumerate() {
                            rr[i] = kernels::inv_rms(piece, d.eps);
                        }
                        kernels::rms_norm_inplace(&mut row[..qw], gq, d.eps);
                        kernels::rms_norm_inplace(&mut row[qw..qw + kw], gk, d.eps);
                    });
                (raw, r)
            }
            None => (Vec::new(), Vec::new()),
        };
        self.rope.apply(&mut qkv, &self.seqs, wd, qw + kw, false);

        let (_, n_probs) = self.prob_offsets();
        let mut probs = vec![0f32; n_probs];
        let mut ctx = vec![0f32; t * qw];
        {
            let ctx_parts = split_mut(&mut ctx, self.seqs.iter().map(|q| q.len * qw));
            let prob_parts = split_mut(
                &mut probs,
                self.seqs.iter().map(|q| d.q_heads * q.len * q.len),
            );
            self.seqs
                .par_iter()
                .zip(ctx_parts)
                .zip(prob_parts)
                .for_each(|((q, cx), pr)| {
                    let rows = &qkv[q.start * wd..(q.start + q.len) * wd];
                    attention_forward(d, q.len, rows, pr, cx);
                });
        }

        // x2 = x + ctx · Woᵀ; hs2 = RMSNorm(x2)
        let mut x2 = vec![0f32; t * h];
        xa[3] = proj_forward(&ctx, &w.proj[3], (t, qw, h), &mut x2, h);
        kernels::add_residual(&mut x2, &x, None);
        let (rstd2, hs2) = rms_rows(&x2, w.post_norm, d.eps);

        // m = silu(hs2 · Wgᵀ) ⊙ (hs2 · Wuᵀ); out = x2 + m · Wdᵀ
        let mut gate = vec![0f32; t * inter];
        let mut up = vec![0f32; t * inter];
        xa[4] = proj_forward(&hs2, &w.proj[4], (t, h, inter), &mut gate, inter);
        xa[5] = proj_forward(&hs2, &w.proj[5], (t, h, inter), &mut up, inter);
        let mut m = vec![0f32; t * inter];
        let rows = block_rows(t, inter) * inter;
        m.par_chunks_mut(rows)
            .zip(gate.par_chunks(rows).zip(up.par_chunks(rows)))
            .for_each(|(mc, (gc, uc))| swiglu(gc, uc, mc));
        let mut out = vec![0f32; t * h];
        xa[6] = proj_forward(&m, &w.proj[6], (t, inter, h), &mut out, h);
        kernels::add_residual(&mut out, &x2, None);
        let saved = Saved {
            xa,
            x,
            rstd1,
            hs1,
            raw,
            rstd_qk,
            qkv,
            probs,
            ctx,
            x2,
            rstd2,
            hs2,
            gate,
            up,
            m,
        };
        (out, saved)
    }

    fn backward(
        &self,
        _layer: usize,
        w: &[&[f32]],
        s: Saved,
        dout: &[f32],
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let d = &self.d;
        let sl = &self.slots;
        let w = weights(d, sl, &self.trained, self.bf16, w);
        let (t, h, hd, inter) = (self.tokens, d.hidden, d.head_dim, d.inter);
        let (qw, kw, wd) = (d.q_width(), d.kv_width(), d.qkv_width());
        // Gradients by slot; a slot not trained keeps an empty vector.
        let mut grads: Vec<Vec<f32>> = vec![Vec::new(); sl.len];
        let trained = |slot: usize| self.trained[slot];
        let put = |grads: &mut Vec<Vec<f32>>, i: usize, [dw, da, db]: [Vec<f32>; 3]| {
            grads[sl.proj[i]] = dw;
            if let Some(at) = sl.lora[i] {
                grads[at] = da;
                grads[at + 1] = db;
            }
        };

        // out = x2 + m · Wdᵀ
        let mut dx2 = dout.to_vec();
        let mut dgate = vec![0f32; t * inter];
        let g = proj_backward(
            dout,
            h,
            &s.m,
            &s.xa[6],
            &w.proj[6],
            (t, inter, h),
            &mut dgate,
            false,
        );
        put(&mut grads, 6, g);
        drop(s.m);
        let mut dup = vec![0f32; t * inter];
        let rows = block_rows(t, inter) * inter;
        dgate
            .par_chunks_mut(rows)
            .zip(dup.par_chunks_mut(rows))
            .zip(s.gate.par_chunks(rows).zip(s.up.par_chunks(rows)))
            .for_each(|((dg, du), (gc, uc))| swiglu_backward(dg, gc, uc, du));
        drop((s.gate, s.up));
        let mut dhs2 = vec![0f32; t * h];
        let g = proj_backward(
            &dgate,
            inter,
            &s.hs2,
            &s.xa[4],
            &w.proj[4],
            (t, h, inter),
            &mut dhs2,
            false,
        );
        put(&mut grads, 4, g);
        let g = proj_backward(
            &dup,
            inter,
            &s.hs2,
            &s.xa[5],
            &w.proj[5],
            (t, h, inter),
            &mut dhs2,
            true,
        );
        put(&mut grads, 5, g);
        drop((s.hs2, dgate, dup));
        let g_post = rms_backward(&dhs2, &s.x2, &s.rstd2, w.post_norm, &mut dx2);
        if trained(sl.post_norm) {
            grads[sl.post_norm] = g_post;
        }
        drop(dhs2);

        // x2 = x + ctx · Woᵀ
        let mut dctx = vec![0f32; t * qw];
        let g = proj_backward(
            &dx2,
            h,
            &s.ctx,
            &s.xa[3],
            &w.proj[3],
            (t, qw, h),
            &mut dctx,
            false,
        );
        put(&mut grads, 3, g);
        drop(s.ctx);

        let mut dqkv = vec![0f32; t * wd];
        {
            let (offsets, _) = self.prob_offsets();
            let parts = split_mut(&mut dqkv, self.seqs.iter().map(|q| q.len * wd));
            self.seqs
                .par_iter()
                .zip(parts)
                .zip(offsets)
                .for_each(|((q, dq), off)| {
                    let n = d.q_heads * q.len * q.len;
                    attention_backward(
                        d,
                        q.len,
                        &s.qkv[q.start * wd..(q.start + q.len) * wd],
                        &s.probs[off..off + n],
                        &dctx[q.start * qw..(q.start + q.len) * qw],
                        dq,
                    );
                });
        }
        drop((s.qkv, s.probs, dctx));
        self.rope.apply(&mut dqkv, &self.seqs, wd, qw + kw, true);
        let g_qk = w.qk_norm.map(|[gq, gk]| {
            let heads = d.q_heads + d.kv_heads;
            let mut draw = dqkv.clone();
            let rows = block_rows(t, wd);
            let (dgq, dgk) = draw
                .par_chunks_mut(rows * wd)
                .enumerate()
                .map(|(blk, dc)| {
                    let mut dgq = vec![0f32; hd];
                    let mut dgk = vec![0f32; hd];
                    for (i, drow) in dc.chunks_exact_mut(wd).enumerate() {
                        let row = blk * rows + i;
                        drow[..qw + kw].fill(0.0);
                        for head in 0..heads {
                            let (g, dg) = if head < d.q_heads {
                                (gq, &mut dgq)
                            } else {
                                (gk, &mut dgk)
                            };
                            let cols = head * hd..(head + 1) * hd;
                            let at = row * wd;
                            rms_backward_row(
                                &dqkv[at + cols.start..at + cols.end],
                                &s.raw[at + cols.start..at + cols.end],
                                s.rstd_qk[row * heads + head],
                                g,
                                &mut drow[cols],
                                dg,
                            );
                        }
                    }
                    (dgq, dgk)
                })
                .reduce(
                    || (vec![0f32; hd], vec![0f32; hd]),
                    |(mut a, mut b), (c, e)| {
                        kernels::axpy(&mut a, 1.0, &c);
                        kernels::axpy(&mut b, 1.0, &e);
                        (a, b)
                    },
                );
            dqkv = draw;
            (dgq, dgk)
        });
        drop((s.raw, s.rstd_qk));

        // [q | k | v] = hs1 · W{q,k,v}ᵀ (+ b)
        if let Some(b) = sl.bias.filter(|&b| trained(b)) {
            let sums = col_sums(&dqkv, wd);
            grads[b] = sums[..qw].to_vec();
            grads[b + 1] = sums[qw..qw + kw].to_vec();
            grads[b + 2] = sums[qw + kw..].to_vec();
        }
        let mut dhs1 = vec![0f32; t * h];
        for (i, off, out) in [(0, 0, qw), (1, qw, kw), (2, qw + kw, kw)] {
            let g = proj_backward(
                &dqkv[off..],
                wd,
                &s.hs1,
                &s.xa[i],
                &w.proj[i],
                (t, h, out),
                &mut dhs1,
                i > 0,
            );
            put(&mut grads, i, g);
        }
        drop((dqkv, s.hs1));
        let mut dx = dx2;
        let g_in = rms_backward(&dhs1, &s.x, &s.rstd1, w.in_norm, &mut dx);
        if trained(sl.in_norm) {
            grads[sl.in_norm] = g_in;
        }
        if let (Some(n), Some((gq, gk))) = (sl.qk_norm, g_qk) {
            if trained(n) {
                grads[n] = gq;
            }
            if trained(n + 1) {
                grads[n + 1] = gk;
            }
        }
        (dx, grads)
    }
}

/// The decoder layers on packed rows `x [T, H]` (f32, after the embeddings), differentiable in `x`
/// and in every trained parameter. `params[layer]` lists, in this order: input RMSNorm γ, q, k, v
/// weights, (q, k, v biases), o weight, (q-norm γ, k-norm γ), post-attention RMSNorm γ, gate, up,
/// down weights, then `A`, `B` of each adapter of `dims.lora` in [`PROJECTIONS`] order. Which are
/// trained (candle variables) must be alike in every layer; None where this pass does not run them
/// ([`super::train::runs`]). `mask` is the padded batch's key mask (each row's tokens at positions
/// 0, 1, … for the rotation).
pub fn encoder(
    x: &Tensor,
    params: Vec<Vec<Tensor>>,
    dims: QwenDims,
    mask: &[Vec<u32>],
) -> Result<Option<Tensor>> {
    if !runs(&params) {
        return Ok(None);
    }
    let seqs = Seq::of_mask(mask);
    let (tokens, h) = x.dims2()?;
    if h != dims.hidden || seqs.iter().map(|q| q.len).sum::<usize>() != tokens {
        return Err(Error::InvalidInput(format!(
            "fast training pass: {tokens} × {h} rows do not match the batch layout"
        )));
    }
    if dims.kv_heads == 0
        || !dims.q_heads.is_multiple_of(dims.kv_heads)
        || !dims.head_dim.is_multiple_of(2)
    {
        return Err(Error::InvalidInput(format!(
            "fast training pass: {} query heads over {} key/value heads of {}",
            dims.q_heads, dims.kv_heads, dims.head_dim
        )));
    }
    let slots = Slots::of(&dims);
    debug_assert_eq!(slots.len, dims.params_per_layer());
    let trained = trained_slots(&params, slots.len)?;
    let longest = seqs.iter().map(|q| q.len).max().unwrap_or(0);
    let rope = Rope::new(dims.rope_theta, dims.head_dim, longest);
    let layers = QwenLayers {
        d: dims,
        slots,
        trained,
        seqs,
        tokens,
        rope,
        bf16: super::train::mixed_bf16(),
    };
    Ok(Some(run_stack(x, params, layers)?))
}
