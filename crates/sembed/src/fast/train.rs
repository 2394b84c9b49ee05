//! The BERT encoder's training pass on the fast engine's kernels: forward and backward written by
//! hand on host buffers, the tokens packed (no padding), attention per sequence at its exact length,
//! bias + dropout + residual + LayerNorm fused into one pass per row, GEMMs through the `gemm` crate
//! on every thread.
//!
//! candle's op-by-op graph stays the reference (and runs every other architecture, f64, LoRA): this
//! pass computes the same function with the same dropout masks. candle's dropout draws element `i` of
//! a call from `SplitMix64` as the `i`-th value after the generator's state at the call; this pass
//! reserves the same number of draws per call, in the same order (attention probabilities on the
//! padded `[B, heads, S, S]` grid, attention output, MLP output, layer after layer), and computes
//! each element's value from its index, so the masks are the ones the candle layers would draw.
//!
//! Into candle's autograd it enters as one custom op, `y = encoder(x, sink)`: its backward runs the
//! hand-written backward pass and returns the gradient of `x`; `sink` is the sum of one scalar
//! [`ParamSink`] per parameter, whose backward hands candle that parameter's gradient. candle
//! back-propagates an op before its inputs, so the encoder's backward has run by then.

use super::kernels::{self, multiversion};
use super::linear::matmul_acc;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------------------------------
// Switch

thread_local! {
    static CANDLE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with training on candle's op-by-op graph even where this pass could run (tests compare
/// the two; `SEMBED_TRAIN_KERNELS=candle` does the same for a whole process).
pub fn with_candle_kernels<T>(f: impl FnOnce() -> T) -> T {
    let previous = CANDLE_ONLY.with(|c| c.replace(true));
    let out = f();
    CANDLE_ONLY.with(|c| c.set(previous));
    out
}

/// Whether training may use this pass on this thread.
pub fn enabled() -> bool {
    !CANDLE_ONLY.with(|c| c.get())
        && std::env::var("SEMBED_TRAIN_KERNELS").map_or(true, |v| v != "candle")
}

thread_local! {
    static LAYER_PASSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static MIXED_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with bf16 mixed precision (`on`) or in f32: the passes started on this thread inside
/// `f` compute every projection (weights and LoRA adapters alike, forward and both backward
/// products) as bf16 × bf16 products summed in f32 ([`super::bf16::matmul_acc`]), as PyTorch's
/// CPU autocast does for linear layers. Everything else stays f32: the master weights, their
/// gradients and the optimiser state, norms, softmax, activations, the attention products and the
/// loss. A pass records the setting when its forward runs, so its backward follows it too.
pub fn with_mixed_bf16<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let previous = MIXED_BF16.with(|c| c.replace(on));
    let out = f();
    MIXED_BF16.with(|c| c.set(previous));
    out
}

/// Whether passes started on this thread now run in bf16 mixed precision ([`with_mixed_bf16`]).
pub fn mixed_bf16() -> bool {
    MIXED_BF16.with(|c| c.get())
}

/// How many layer forward passes this pass has run on this thread (tests check it was taken).
pub fn layer_passes() -> usize {
    LAYER_PASSES.with(|c| c.get())
}

// ---------------------------------------------------------------------------------------------
// Shapes, weights, dropout

/// The activations this pass differentiates (of the fast engine's [`Act`]; [`supports_act`]).
pub use super::kernels::Act;

/// Whether this pass has the derivative of `act`: exact GELU and ReLU.
pub fn supports_act(act: Act) -> bool {
    matches!(act, Act::GeluErf | Act::Relu)
}

#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub inter: usize,
    pub eps: f32,
    pub act: Act,
}

/// One sequence of the packed batch and where it sits on candle's padded grid.
#[derive(Clone, Copy, Debug)]
pub struct Seq {
    /// First packed row.
    pub start: usize,
    pub len: usize,
    /// Row of the padded grid.
    pub row: usize,
    /// Grid column of the first real token (the left padding).
    pub col0: usize,
}

impl Seq {
    /// The sequences of a padded batch's mask rows (1: a real token), packed row after row.
    pub fn of_mask(rows: &[Vec<u32>]) -> Vec<Seq> {
        let mut seqs = Vec::with_capacity(rows.len());
        let mut start = 0;
        for (row, m) in rows.iter().enumerate() {
            let len = m.iter().filter(|&&v| v != 0).count();
            let col0 = m.iter().position(|&v| v != 0).unwrap_or(0);
            seqs.push(Seq {
                start,
                len,
                row,
                col0,
            });
            start += len;
        }
        seqs
    }
}

/// One layer's weights, read in place from candle's storage, in PyTorch's layout (`[out, in]`).
pub(super) struct LayerWeights<'a> {
    /// The Q, K, V projections as (first column in the `[T, 3H]` rows, width, projection): three
    /// of width H (BERT), or one of width 3H (Jina's fused `Wqkv`).
    pub(super) qkv: Vec<(usize, usize, Proj<'a>)>,
    /// Their biases, stacked (`[3H]`, a copy).
    pub(super) bqkv: Vec<f32>,
    pub(super) o: Proj<'a>,
    pub(super) bo: &'a [f32],
    pub(super) ln1_g: &'a [f32],
    pub(super) ln1_b: &'a [f32],
    pub(super) w1: Proj<'a>,
    pub(super) b1: &'a [f32],
    pub(super) w2: Proj<'a>,
    pub(super) b2: &'a [f32],
    pub(super) ln2_g: &'a [f32],
    pub(super) ln2_b: &'a [f32],
}

/// Gradients of one layer; a projection's are `[dW, dA, dB]` (empty where not trained or absent).
pub(super) struct LayerGrads {
    qkv: Vec<[Vec<f32>; 3]>,
    bqkv: Vec<f32>,
    o: [Vec<f32>; 3],
    bo: Vec<f32>,
    ln1_g: Vec<f32>,
    ln1_b: Vec<f32>,
    w1: [Vec<f32>; 3],
    b1: Vec<f32>,
    w2: [Vec<f32>; 3],
    b2: Vec<f32>,
    ln2_g: Vec<f32>,
    ln2_b: Vec<f32>,
}

/// Rotary tables for positions `0..len` of every sequence: cos, sin and −sin (the backward's
/// rotation), `[positions, head_dim / 2]` each, computed as the reference does.
pub(super) struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    neg_sin: Vec<f32>,
    half: usize,
}

impl Rope {
    pub(super) fn new(theta: f64, head_dim: usize, longest: usize) -> Rope {
        let half = head_dim / 2;
        let mut cos = vec![0f32; 2 * longest * half];
        super::transformer::rope_tables(theta, head_dim, longest, &mut cos);
        let sin = cos.split_off(longest * half);
        let neg_sin = sin.iter().map(|v| -v).collect();
        Rope {
            cos,
            sin,
            neg_sin,
            half,
        }
    }

    /// Rotate the first `cols` values (whole heads) of each `width`-wide row by the row's position
    /// in its sequence, or back (`back`: the transpose, the rotation's backward).
    pub(super) fn apply(
        &self,
        rows: &mut [f32],
        seqs: &[Seq],
        width: usize,
        cols: usize,
        back: bool,
    ) {
        let sin = if back { &self.neg_sin } else { &self.sin };
        let half = self.half;
        let parts = split_mut(rows, seqs.iter().map(|q| q.len * width));
        seqs.par_iter().zip(parts).for_each(|(_, rows)| {
            for (i, row) in rows.chunks_exact_mut(width).enumerate() {
                let tab = i * half..(i + 1) * half;
                kernels::rope(&mut row[..cols], &self.cos[tab.clone()], &sin[tab]);
            }
        });
    }
}

use crate::rng::{mix, GAMMA};

/// One dropout call: the generator state it starts from, its probability, and the scale of kept
/// values. `p == 0` drops nothing (and drew nothing).
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    state: u64,
    /// `p · 2^53`: element `i` is dropped when its 53-bit draw is below this (as `next_f64() < p`).
    threshold: f64,
    keep: f32,
    on: bool,
}

impl Stream {
    pub fn off() -> Self {
        Stream {
            state: 0,
            threshold: 0.0,
            keep: 1.0,
            on: false,
        }
    }

    fn new(state: u64, p: f64) -> Self {
        Stream {
            state,
            threshold: p * (1u64 << 53) as f64,
            keep: (1.0 / (1.0 - p)) as f32,
            on: p > 0.0,
        }
    }

    /// The mask value of element `i`: 0 or `1 / (1 - p)`.
    #[inline(always)]
    fn mask(&self, i: u64) -> f32 {
        let z = mix(self
            .state
            .wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA)));
        if ((z >> 11) as f64) < self.threshold {
            0.0
        } else {
            self.keep
        }
    }
}

/// A layer's three dropout calls, in candle's order.
#[derive(Clone, Copy, Debug)]
pub struct LayerDropout {
    pub attention: Stream,
    pub attn_out: Stream,
    pub mlp_out: Stream,
}

/// Reserve the draws of every layer's dropout calls from the generator state `state`, in the order
/// candle's layers make them. Returns the streams and the number of draws taken.
#[allow(clippy::too_many_arguments)]
pub fn reserve_dropout(
    state: u64,
    layers: usize,
    p_attention: f64,
    p_hidden: f64,
    grid: (usize, usize),
    heads: usize,
    tokens: usize,
    hidden: usize,
) -> (Vec<LayerDropout>, u64) {
    let mut used = 0u64;
    let mut take = |p: f64, n: usize| {
        if p <= 0.0 {
            return Stream::off();
        }
        let s = Stream::new(state.wrapping_add(used.wrapping_mul(GAMMA)), p);
        used += n as u64;
        s
    };
    let (b, s) = grid;
    let out = (0..layers)
        .map(|_| LayerDropout {
            attention: take(p_attention, b * heads * s * s),
            attn_out: take(p_hidden, tokens * hidden),
            mlp_out: take(p_hidden, tokens * hidden),
        })
        .collect();
    (out, used)
}

/// Everything a layer's pass reads besides its input and weights.
pub(super) struct Ctx<'a> {
    pub(super) dims: Dims,
    pub(super) seqs: &'a [Seq],
    pub(super) tokens: usize,
    /// Columns of candle's padded grid (attention dropout indexes it).
    pub(super) grid_cols: usize,
    /// Rotary positions on Q and K (Jina), none for BERT's learned position table.
    pub(super) rope: Option<&'a Rope>,
}

/// What the backward pass of a layer reads.
pub struct Saved {
    /// Each projection's `scale · x Aᵀ` (Q/K/V entries, then O, up, down; empty without adapter).
    xa: Vec<Vec<f32>>,
    x: Vec<f32>,
    qkv: Vec<f32>,
    /// Softmax probabilities (before dropout), `[heads, len, len]` per sequence, sequence after sequence.
    probs: Vec<f32>,
    ctx: Vec<f32>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    h1: Vec<f32>,
    u: Vec<f32>,
    g: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
}

// ---------------------------------------------------------------------------------------------
// GEMM and row helpers

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

fn par_for(m: usize, n: usize, k: usize) -> Parallelism {
    if m * n * k >= 1 << 18 && threads() > 1 {
        Parallelism::Rayon(threads())
    } else {
        Parallelism::None
    }
}

/// A GEMM with [`matmul_acc`]'s arguments.
type Gemm = fn(
    usize,
    usize,
    usize,
    &[f32],
    (isize, isize),
    &[f32],
    (isize, isize),
    &mut [f32],
    (isize, isize),
    bool,
    Parallelism,
);

/// The GEMM of a projection: f32, or bf16 products summed in f32 when `bf16` (mixed precision).
fn proj_gemm(bf16: bool) -> Gemm {
    if bf16 {
        super::bf16::matmul_acc
    } else {
        matmul_acc
    }
}

/// `y[t, out] = x[t, in] · w[out, in]ᵀ`, rows of `y` `stride` apart (a column block of a wider
/// matrix when `stride > out`); in bf16 mixed precision when `bf16`.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    bf16: bool,
    x: &[f32],
    w: &[f32],
    t: usize,
    inp: usize,
    out: usize,
    y: &mut [f32],
    stride: usize,
) {
    proj_gemm(bf16)(
        t,
        out,
        inp,
        x,
        (inp as isize, 1),
        w,
        (1, inp as isize),
        y,
        (stride as isize, 1),
        false,
        par_for(t, out, inp),
    );
}

/// `dx[t, in] (+)= dy[t, out] · w[out, in]`, rows of `dy` `stride` apart.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_dx(
    bf16: bool,
    dy: &[f32],
    stride: usize,
    w: &[f32],
    t: usize,
    inp: usize,
    out: usize,
    dx: &mut [f32],
    acc: bool,
) {
    proj_gemm(bf16)(
        t,
        inp,
        out,
        dy,
        (stride as isize, 1),
        w,
        (inp as isize, 1),
        dx,
        (inp as isize, 1),
        acc,
        par_for(t, inp, out),
    );
}

/// `dw[out, in] = dy[t, out]ᵀ · x[t, in]`, rows of `dy` `stride` apart.
pub(super) fn linear_dw(
    bf16: bool,
    dy: &[f32],
    stride: usize,
    x: &[f32],
    t: usize,
    inp: usize,
    out: usize,
) -> Vec<f32> {
    let mut dw = vec![0f32; out * inp];
    proj_gemm(bf16)(
        out,
        inp,
        t,
        dy,
        (1, stride as isize),
        x,
        (inp as isize, 1),
        &mut dw,
        (inp as isize, 1),
        false,
        par_for(out, inp, t),
    );
    dw
}

/// A LoRA adapter read in place: `A [rank, in]`, `B [out, rank]`.
#[derive(Clone, Copy)]
pub(super) struct Lora<'a> {
    pub(super) a: &'a [f32],
    pub(super) b: &'a [f32],
    pub(super) rank: usize,
    pub(super) scale: f32,
}

/// A projection `y = x Wᵀ (+ scale · (x Aᵀ) Bᵀ)`, its weight trained or frozen.
#[derive(Clone, Copy)]
pub(super) struct Proj<'a> {
    pub(super) w: &'a [f32],
    pub(super) train_w: bool,
    pub(super) lora: Option<Lora<'a>>,
    /// bf16 mixed precision ([`with_mixed_bf16`]).
    pub(super) bf16: bool,
}

/// `y[t, out] = x[t, in] · Wᵀ (+ scale · (x Aᵀ) Bᵀ)`, rows of `y` `stride` apart. Returns
/// `scale · x Aᵀ` (`[t, rank]`, what the adapter's backward reads; empty without one).
pub(super) fn proj_forward(
    x: &[f32],
    p: &Proj,
    (t, inp, out): (usize, usize, usize),
    y: &mut [f32],
    stride: usize,
) -> Vec<f32> {
    linear(p.bf16, x, p.w, t, inp, out, y, stride);
    let Some(l) = p.lora else {
        return Vec::new();
    };
    let r = l.rank;
    let mut xa = vec![0f32; t * r];
    linear(p.bf16, x, l.a, t, inp, r, &mut xa, r);
    for v in &mut xa {
        *v *= l.scale;
    }
    proj_gemm(p.bf16)(
        t,
        out,
        r,
        &xa,
        (r as isize, 1),
        l.b,
        (1, r as isize),
        y,
        (stride as isize, 1),
        true,
        par_for(t, out, r),
    );
    xa
}

/// The gradients of a projection: `(dW, dA, dB)` (empty where not trained or absent), adding
/// `∂L/∂x` to `dx` (overwriting it unless `acc`). `dy` rows are `stride` apart.
#[allow(clippy::too_many_arguments)]
pub(super) fn proj_backward(
    dy: &[f32],
    stride: usize,
    x: &[f32],
    xa: &[f32],
    p: &Proj,
    (t, inp, out): (usize, usize, usize),
    dx: &mut [f32],
    acc: bool,
) -> [Vec<f32>; 3] {
    let dw = if p.train_w {
        linear_dw(p.bf16, dy, stride, x, t, inp, out)
    } else {
        Vec::new()
    };
    linear_dx(p.bf16, dy, stride, p.w, t, inp, out, dx, acc);
    let Some(l) = p.lora else {
        return [dw, Vec::new(), Vec::new()];
    };
    let r = l.rank;
    // B's gradient: dyᵀ · (scale · x Aᵀ); the adapter's input gradient: scale · dy · B.
    let db = linear_dw(p.bf16, dy, stride, xa, t, r, out);
    let mut dxa = vec![0f32; t * r];
    linear_dx(p.bf16, dy, stride, l.b, t, r, out, &mut dxa, false);
    for v in &mut dxa {
        *v *= l.scale;
    }
    let da = linear_dw(p.bf16, &dxa, r, x, t, inp, r);
    linear_dx(p.bf16, &dxa, r, l.a, t, inp, r, dx, true);
    [dw, da, db]
}

/// Rows per parallel block of a `[t, width]` pass: a few blocks per thread.
pub(super) fn block_rows(t: usize, width: usize) -> usize {
    let per = t.div_ceil(threads() * 4).max(1);
    per.max((4096 / width.max(1)).max(1))
}

/// Column sums of `x[t, n]`.
pub(super) fn col_sums(x: &[f32], n: usize) -> Vec<f32> {
    let t = x.len() / n;
    let rows = block_rows(t, n);
    x.par_chunks(rows * n)
        .map(|c| {
            let mut s = vec![0f32; n];
            for r in c.chunks_exact(n) {
                kernels::axpy(&mut s, 1.0, r);
            }
            s
        })
        .reduce(
            || vec![0f32; n],
            |mut a, b| {
                kernels::axpy(&mut a, 1.0, &b);
                a
            },
        )
}

multiversion! {
    /// One row of `LayerNorm(z)` with `z = (a + bias)·mask + res` written back into `a`, and
    /// `p = (bias, γ, β)`: writes `x̂` and `y` into `out` and returns `1/σ`.
    fn residual_ln_row(a: &mut [f32], mask: &[f32], res: &[f32], p: (&[f32], &[f32], &[f32]),
                       eps: f32, out: (&mut [f32], &mut [f32])) -> f32 {
        let (bias, g, b) = p;
        let (xhat, y) = out;
        let n = a.len();
        let mut mean = 0f32;
        for i in 0..n {
            let z = (a[i] + bias[i]) * mask[i] + res[i];
            a[i] = z;
            mean += z;
        }
        mean /= n as f32;
        let mut var = 0f32;
        for z in a.iter() {
            let c = *z - mean;
            var += c * c;
        }
        var /= n as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for i in 0..n {
            let h = (a[i] - mean) * rstd;
            xhat[i] = h;
            y[i] = h * g[i] + b[i];
        }
        rstd
    }
}

multiversion! {
    /// LayerNorm backward for one row: `dz` from `dy`, `x̂`, `1/σ`, `γ`; adds to `dg`, `db`.
    fn ln_backward_row(dy: &[f32], xhat: &[f32], rstd: f32, g: &[f32], dz: &mut [f32],
                       dg: &mut [f32], db: &mut [f32]) {
        let n = dy.len();
        let mut m1 = 0f32;
        let mut m2 = 0f32;
        for i in 0..n {
            let d = dy[i] * g[i];
            m1 += d;
            m2 += d * xhat[i];
            dg[i] += dy[i] * xhat[i];
            db[i] += dy[i];
        }
        m1 /= n as f32;
        m2 /= n as f32;
        for i in 0..n {
            dz[i] = rstd * (dy[i] * g[i] - m1 - xhat[i] * m2);
        }
    }
}

multiversion! {
    /// `dg *= act'(u)` elementwise.
    fn act_backward(dg: &mut [f32], u: &[f32], relu: bool) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for (d, &x) in dg.iter_mut().zip(u) {
            let slope = if relu {
                if x > 0.0 { 1.0 } else { 0.0 }
            } else {
                0.5 * (1.0 + kernels::erf(x * std::f32::consts::FRAC_1_SQRT_2))
                    + x * INV_SQRT_2PI * kernels::exp(-0.5 * x * x)
            };
            *d *= slope;
        }
    }
}

multiversion! {
    /// Softmax backward in place: `dp ← scale · p ⊙ (dp − Σ_j dp ⊙ p)` per row of `n`.
    pub(super) fn softmax_backward_rows(dp: &mut [f32], p: &[f32], n: usize, scale: f32) {
        for (dr, pr) in dp.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
            let mut dot = 0f32;
            for i in 0..n {
                dot += dr[i] * pr[i];
            }
            for i in 0..n {
                dr[i] = scale * pr[i] * (dr[i] - dot);
            }
        }
    }
}

/// Split `buf` into consecutive pieces of the given lengths.
pub(super) fn split_mut(mut buf: &mut [f32], lens: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for n in lens {
        let (a, b) = std::mem::take(&mut buf).split_at_mut(n);
        out.push(a);
        buf = b;
    }
    out
}

/// The hidden-state dropout mask of rows `r0..r0 + rows` (`[rows, h]`).
fn hidden_mask(s: &Stream, r0: usize, rows: usize, h: usize, out: &mut Vec<f32>) {
    out.clear();
    if !s.on {
        out.resize(rows * h, 1.0);
        return;
    }
    let base = (r0 * h) as u64;
    out.extend((0..(rows * h) as u64).map(|i| s.mask(base + i)));
}

/// The attention dropout mask of sequence `q`, head `head`: `[len, len]`.
fn attention_mask(s: &Stream, q: &Seq, head: usize, heads: usize, cols: usize, out: &mut [f32]) {
    let l = q.len;
    if l == 0 {
        return;
    }
    for i in 0..l {
        let base = (((q.row * heads + head) * cols + q.col0 + i) * cols + q.col0) as u64;
        for j in 0..l {
            out[i * l + j] = s.mask(base + j as u64);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Attention of one sequence: `qkv [len, 3H]` → `ctx [len, H]`, probabilities into `probs`.
fn attention_forward(
    c: &Ctx,
    q: &Seq,
    st: &Stream,
    qkv: &[f32],
    probs: &mut [f32],
    ctx: &mut [f32],
) {
    let (h, nh) = (c.dims.hidden, c.dims.heads);
    let d = h / nh;
    let l = q.len;
    if l == 0 {
        return;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let mut dropped = if st.on { vec![0f32; l * l] } else { Vec::new() };
    for head in 0..nh {
        let p = &mut probs[head * l * l..(head + 1) * l * l];
        matmul_acc(
            l,
            l,
            d,
            &qkv[head * d..],
            ((3 * h) as isize, 1),
            &qkv[h + head * d..],
            (1, (3 * h) as isize),
            p,
            (l as isize, 1),
            false,
            Parallelism::None,
        );
        kernels::softmax_rows(p, l, scale);
        let r: &[f32] = if st.on {
            attention_mask(st, q, head, nh, c.grid_cols, &mut dropped);
            for (m, &pv) in dropped.iter_mut().zip(p.iter()) {
                *m *= pv;
            }
            &dropped
        } else {
            p
        };
        matmul_acc(
            l,
            d,
            l,
            r,
            (l as isize, 1),
            &qkv[2 * h + head * d..],
            ((3 * h) as isize, 1),
            &mut ctx[head * d..],
            (h as isize, 1),
            false,
            Parallelism::None,
        );
    }
}

/// Backward of [`attention_forward`]: `dctx [len, H]` → `dqkv [len, 3H]`.
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    c: &Ctx,
    q: &Seq,
    st: &Stream,
    qkv: &[f32],
    probs: &[f32],
    dctx: &[f32],
    dqkv: &mut [f32],
) {
    let (h, nh) = (c.dims.hidden, c.dims.heads);
    let d = h / nh;
    let l = q.len;
    if l == 0 {
        return;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let mut mask = if st.on { vec![0f32; l * l] } else { Vec::new() };
    let mut r = if st.on { vec![0f32; l * l] } else { Vec::new() };
    let mut dp = vec![0f32; l * l];
    for head in 0..nh {
        let p = &probs[head * l * l..(head + 1) * l * l];
        // d(dropped probabilities) = dctx · vᵀ
        matmul_acc(
            l,
            l,
            d,
            &dctx[head * d..],
            (h as isize, 1),
            &qkv[2 * h + head * d..],
            (1, (3 * h) as isize),
            &mut dp,
            (l as isize, 1),
            false,
            Parallelism::None,
        );
        let rr: &[f32] = if st.on {
            attention_mask(st, q, head, nh, c.grid_cols, &mut mask);
            for ((rv, &m), &pv) in r.iter_mut().zip(&mask).zip(p) {
                *rv = m * pv;
            }
            for (g, &m) in dp.iter_mut().zip(&mask) {
                *g *= m;
            }
            &r
        } else {
            p
        };
        // dv = rᵀ · dctx
        matmul_acc(
            l,
            d,
            l,
            rr,
            (1, l as isize),
            &dctx[head * d..],
            (h as isize, 1),
            &mut dqkv[2 * h + head * d..],
            ((3 * h) as isize, 1),
            false,
            Parallelism::None,
        );
        softmax_backward_rows(&mut dp, p, l, scale);
        // dq = ds · k, dk = dsᵀ · q
        matmul_acc(
            l,
            d,
            l,
            &dp,
            (l as isize, 1),
            &qkv[h + head * d..],
            ((3 * h) as isize, 1),
            &mut dqkv[head * d..],
            ((3 * h) as isize, 1),
            false,
            Parallelism::None,
        );
        matmul_acc(
            l,
            d,
            l,
            &dp,
            (1, l as isize),
            &qkv[head * d..],
            ((3 * h) as isize, 1),
            &mut dqkv[h + head * d..],
            ((3 * h) as isize, 1),
            false,
            Parallelism::None,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Layer

/// Post-LN BERT layer forward on packed rows `x [T, H]`: returns the output and what backward reads.
pub(super) fn layer_forward(
    w: &LayerWeights,
    x: Vec<f32>,
    c: &Ctx,
    dr: &LayerDropout,
) -> (Vec<f32>, Saved) {
    let Dims {
        hidden: h,
        heads: nh,
        inter,
        eps,
        act,
    } = c.dims;
    let t = c.tokens;
    let mut qkv = vec![0f32; t * 3 * h];
    let mut xa: Vec<Vec<f32>> = w
        .qkv
        .iter()
        .map(|(col, width, p)| proj_forward(&x, p, (t, h, *width), &mut qkv[*col..], 3 * h))
        .collect();
    kernels::add_bias(&mut qkv, &w.bqkv);
    if let Some(rope) = c.rope {
        rope.apply(&mut qkv, c.seqs, 3 * h, 2 * h, false);
    }

    let mut probs = vec![0f32; c.seqs.iter().map(|q| nh * q.len * q.len).sum()];
    let mut ctx = vec![0f32; t * h];
    {
        let ctx_parts = split_mut(&mut ctx, c.seqs.iter().map(|q| q.len * h));
        let prob_parts = split_mut(&mut probs, c.seqs.iter().map(|q| nh * q.len * q.len));
        c.seqs
            .par_iter()
            .zip(ctx_parts)
            .zip(prob_parts)
            .for_each(|((q, cx), pr)| {
                let rows = &qkv[q.start * 3 * h..(q.start + q.len) * 3 * h];
                attention_forward(c, q, &dr.attention, rows, pr, cx);
            });
    }

    // a = ctx · Woᵀ; h1 = LN(dropout(a + bo) + x)
    let mut a = vec![0f32; t * h];
    xa.push(proj_forward(&ctx, &w.o, (t, h, h), &mut a, h));
    let (xhat1, rstd1, h1) = residual_ln(&mut a, w.bo, &x, w.ln1_g, w.ln1_b, &dr.attn_out, h, eps);
    drop(a);

    // u = h1 · W1ᵀ + b1 (kept for the derivative); g = act(u)
    let mut u = vec![0f32; t * inter];
    xa.push(proj_forward(&h1, &w.w1, (t, h, inter), &mut u, inter));
    let mut g = u.clone();
    let rows = block_rows(t, inter);
    u.par_chunks_mut(rows * inter)
        .zip(g.par_chunks_mut(rows * inter))
        .for_each(|(uc, gc)| {
            kernels::add_bias(uc, w.b1);
            kernels::bias_act(gc, w.b1, act);
        });

    // out = LN(dropout(g · W2ᵀ + b2) + h1)
    let mut m = vec![0f32; t * h];
    xa.push(proj_forward(&g, &w.w2, (t, inter, h), &mut m, h));
    let (xhat2, rstd2, out) = residual_ln(&mut m, w.b2, &h1, w.ln2_g, w.ln2_b, &dr.mlp_out, h, eps);
    let saved = Saved {
        xa,
        x,
        qkv,
        probs,
        ctx,
        xhat1,
        rstd1,
        h1,
        u,
        g,
        xhat2,
        rstd2,
    };
    (out, saved)
}

/// `LayerNorm(dropout(a + bias) + res)` over rows of `h`: `(x̂, 1/σ, y)`; `a` is overwritten.
#[allow(clippy::too_many_arguments)]
fn residual_ln(
    a: &mut [f32],
    bias: &[f32],
    res: &[f32],
    g: &[f32],
    b: &[f32],
    st: &Stream,
    h: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let t = a.len() / h;
    let mut xhat = vec![0f32; t * h];
    let mut rstd = vec![0f32; t];
    let mut y = vec![0f32; t * h];
    let rows = block_rows(t, h);
    a.par_chunks_mut(rows * h)
        .zip(xhat.par_chunks_mut(rows * h))
        .zip(y.par_chunks_mut(rows * h))
        .zip(rstd.par_chunks_mut(rows))
        .enumerate()
        .for_each(|(blk, (((ac, xc), yc), rc))| {
            let r0 = blk * rows;
            let n = rc.len();
            let mut mask = Vec::new();
            hidden_mask(st, r0, n, h, &mut mask);
            for i in 0..n {
                let sl = i * h..(i + 1) * h;
                rc[i] = residual_ln_row(
                    &mut ac[sl.clone()],
                    &mask[sl.clone()],
                    &res[(r0 + i) * h..(r0 + i + 1) * h],
                    (bias, g, b),
                    eps,
                    (&mut xc[sl.clone()], &mut yc[sl]),
                );
            }
        });
    (xhat, rstd, y)
}

/// LayerNorm backward over rows, then through the dropout: returns `(dz, d(before dropout), dγ, dβ)`
/// where `dz` is the gradient of the LayerNorm input (the residual's) and the second the gradient of
/// the dropped branch (`dz ⊙ mask`).
fn ln_dropout_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    g: &[f32],
    st: &Stream,
    h: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let t = rstd.len();
    let mut dz = vec![0f32; t * h];
    let mut dbranch = vec![0f32; t * h];
    let rows = block_rows(t, h);
    let (dg, db) = dz
        .par_chunks_mut(rows * h)
        .zip(dbranch.par_chunks_mut(rows * h))
        .enumerate()
        .map(|(blk, (zc, bc))| {
            let r0 = blk * rows;
            let n = zc.len() / h;
            let mut dg = vec![0f32; h];
            let mut db = vec![0f32; h];
            for i in 0..n {
                let r = r0 + i;
                ln_backward_row(
                    &dy[r * h..(r + 1) * h],
                    &xhat[r * h..(r + 1) * h],
                    rstd[r],
                    g,
                    &mut zc[i * h..(i + 1) * h],
                    &mut dg,
                    &mut db,
                );
            }
            let mut mask = Vec::new();
            hidden_mask(st, r0, n, h, &mut mask);
            for ((o, &z), &m) in bc.iter_mut().zip(zc.iter()).zip(&mask) {
                *o = z * m;
            }
            (dg, db)
        })
        .reduce(
            || (vec![0f32; h], vec![0f32; h]),
            |(mut ag, mut ab), (bg, bb)| {
                kernels::axpy(&mut ag, 1.0, &bg);
                kernels::axpy(&mut ab, 1.0, &bb);
                (ag, ab)
            },
        );
    (dz, dbranch, dg, db)
}

/// Backward of [`layer_forward`]: the gradient of the layer's input and of its weights.
pub(super) fn layer_backward(
    w: &LayerWeights,
    s: Saved,
    dout: &[f32],
    c: &Ctx,
    dr: &LayerDropout,
) -> (Vec<f32>, LayerGrads) {
    let Dims {
        hidden: h,
        heads: nh,
        inter,
        act,
        ..
    } = c.dims;
    let t = c.tokens;
    // out = LN2(dropout(m) + h1)
    let (mut dh1, dm, ln2_g, ln2_b) =
        ln_dropout_backward(dout, &s.xhat2, &s.rstd2, w.ln2_g, &dr.mlp_out, h);
    let b2 = col_sums(&dm, h);
    let nq = w.qkv.len();
    let mut dg = vec![0f32; t * inter];
    let w2 = proj_backward(
        &dm,
        h,
        &s.g,
        &s.xa[nq + 2],
        &w.w2,
        (t, inter, h),
        &mut dg,
        false,
    );
    drop(s.g);
    drop(dm);
    let rows = block_rows(t, inter);
    dg.par_chunks_mut(rows * inter)
        .zip(s.u.par_chunks(rows * inter))
        .for_each(|(d, u)| act_backward(d, u, act == Act::Relu));
    drop(s.u);
    let b1 = col_sums(&dg, inter);
    let w1 = proj_backward(
        &dg,
        inter,
        &s.h1,
        &s.xa[nq + 1],
        &w.w1,
        (t, h, inter),
        &mut dh1,
        true,
    );
    drop(dg);

    // h1 = LN1(dropout(a) + x)
    let (mut dx, da, ln1_g, ln1_b) =
        ln_dropout_backward(&dh1, &s.xhat1, &s.rstd1, w.ln1_g, &dr.attn_out, h);
    drop(dh1);
    let bo = col_sums(&da, h);
    let mut dctx = vec![0f32; t * h];
    let wo = proj_backward(&da, h, &s.ctx, &s.xa[nq], &w.o, (t, h, h), &mut dctx, false);
    drop(da);

    let mut dqkv = vec![0f32; t * 3 * h];
    {
        let parts = split_mut(&mut dqkv, c.seqs.iter().map(|q| q.len * 3 * h));
        let mut offsets = Vec::with_capacity(c.seqs.len());
        let mut o = 0;
        for q in c.seqs {
            offsets.push(o);
            o += nh * q.len * q.len;
        }
        c.seqs
            .par_iter()
            .zip(parts)
            .zip(offsets)
            .for_each(|((q, dq), off)| {
                let rows = q.start * 3 * h..(q.start + q.len) * 3 * h;
                attention_backward(
                    c,
                    q,
                    &dr.attention,
                    &s.qkv[rows],
                    &s.probs[off..off + nh * q.len * q.len],
                    &dctx[q.start * h..(q.start + q.len) * h],
                    dq,
                );
            });
    }
    if let Some(rope) = c.rope {
        rope.apply(&mut dqkv, c.seqs, 3 * h, 2 * h, true);
    }
    let bqkv = col_sums(&dqkv, 3 * h);
    let qkv = w
        .qkv
        .iter()
        .zip(&s.xa)
        .map(|((col, width, p), xa)| {
            proj_backward(
                &dqkv[*col..],
                3 * h,
                &s.x,
                xa,
                p,
                (t, h, *width),
                &mut dx,
                true,
            )
        })
        .collect();
    let grads = LayerGrads {
        qkv,
        bqkv,
        o: wo,
        bo,
        ln1_g,
        ln1_b,
        w1,
        b1,
        w2,
        b2,
        ln2_g,
        ln2_b,
    };
    (dx, grads)
}

// ---------------------------------------------------------------------------------------------
// candle glue

/// One BERT layer's parameters as candle variables, in the order of [`LayerWeights`] with Q, K, V
/// apart: q.w, q.b, k.w, k.b, v.w, v.b, o.w, o.b, ln1.γ, ln1.β, up.w, up.b, down.w, down.b, ln2.γ, ln2.β.
pub type LayerParams = [Tensor; 16];

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// A contiguous f32 CPU tensor's values, in place.
fn view<'a>(s: &'a candle_core::Storage, l: &candle_core::Layout) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| Error::InvalidInput("fast training pass: non-contiguous weight".into()))?;
    match s {
        candle_core::Storage::Cpu(c) => Ok(&c.as_slice::<f32>()?[a..b]),
        _ => Err(Error::InvalidInput(
            "fast training pass: a weight off the CPU".into(),
        )),
    }
}

/// Run `f` on the layers' weights read in place (under candle's read locks; the optimiser, which
/// writes them, runs only between steps). Reading them costs no copy of the model per call, which
/// matters with GradCache (a call per mini-batch and pass).
fn with_weights<R>(params: &[Vec<Tensor>], f: impl FnOnce(&[Vec<&[f32]>]) -> R) -> Result<R> {
    let guards: Vec<Vec<_>> = params
        .iter()
        .map(|p| p.iter().map(Tensor::storage_and_layout).collect())
        .collect();
    let mut weights = Vec::with_capacity(params.len());
    for g in &guards {
        let layer = g
            .iter()
            .map(|(s, l)| view(s, l))
            .collect::<Result<Vec<&[f32]>>>()?;
        weights.push(layer);
    }
    Ok(f(&weights))
}

/// Whether this pass runs a layer stack with these parameters (`params[layer]`): a training run
/// (some parameter a candle variable; inference runs the inference paths), every parameter f32,
/// contiguous, on the CPU, trained (variables) or frozen, and every layer trained alike.
pub(super) fn runs(params: &[Vec<Tensor>]) -> bool {
    let all = || params.iter().flatten();
    let trained = |p: &Vec<Tensor>| p.iter().map(Tensor::is_variable).collect::<Vec<_>>();
    enabled()
        && all().any(Tensor::is_variable)
        && all().all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous())
        && params
            .first()
            .is_some_and(|f| params.iter().all(|p| trained(p) == trained(f)))
}

type GradSlots = Arc<Mutex<Vec<Option<Tensor>>>>;

/// Scalar stand-in for a parameter in the encoder op's graph: its backward hands candle the
/// gradient the encoder's backward left in its slot.
struct ParamSink {
    slots: GradSlots,
    index: usize,
}

impl candle_core::CustomOp1 for ParamSink {
    fn name(&self) -> &'static str {
        "fast-train-param"
    }

    fn cpu_fwd(
        &self,
        _s: &candle_core::CpuStorage,
        _l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Ok((
            candle_core::CpuStorage::F32(vec![0.0]),
            candle_core::Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(self.slots.lock().expect("not poisoned")[self.index].take())
    }
}

/// Which slots of a layer's parameter list are trained (candle variables), checking that every layer
/// has `per_layer` parameters trained alike.
pub(super) fn trained_slots(params: &[Vec<Tensor>], per_layer: usize) -> Result<Vec<bool>> {
    let trained: Vec<bool> = params
        .first()
        .map(|p| p.iter().map(Tensor::is_variable).collect())
        .unwrap_or_default();
    if params.iter().any(|p| {
        p.len() != per_layer
            || p.iter()
                .map(Tensor::is_variable)
                .ne(trained.iter().copied())
    }) {
        return Err(Error::InvalidInput(
            "fast training pass: a layer's parameter list is not the expected one".into(),
        ));
    }
    Ok(trained)
}

/// A stack of layers this pass differentiates, one architecture's: the forward and backward of one
/// layer on packed rows `[T, H]`, its weights read in place in the order of the parameter list the
/// model hands [`run_stack`]. Everything else a layer reads (shapes, sequences, dropout masks,
/// rotary tables) is the implementor's.
pub(crate) trait Layers: Send + Sync + 'static {
    /// What one layer's backward reads.
    type Saved: Send + 'static;
    /// The op's name in candle's graph.
    const NAME: &'static str;
    fn forward(&self, layer: usize, w: &[&[f32]], x: Vec<f32>) -> (Vec<f32>, Self::Saved);
    /// The gradient of the layer's input and of each of its weights, in the parameter list's order
    /// (an empty vector for a weight that is not trained).
    fn backward(
        &self,
        layer: usize,
        w: &[&[f32]],
        saved: Self::Saved,
        dy: &[f32],
    ) -> (Vec<f32>, Vec<Vec<f32>>);
}

struct Encoder<L: Layers> {
    params: Vec<Vec<Tensor>>,
    shapes: Vec<Vec<usize>>,
    /// Per parameter (layer after layer): a variable, whose gradient candle gets.
    trained: Vec<bool>,
    layers: L,
    tokens: usize,
    hidden: usize,
    /// Per layer: everything backward reads, or (checkpointed) only the layer's input.
    saved: Mutex<Vec<Option<L::Saved>>>,
    inputs: Mutex<Vec<Option<Vec<f32>>>>,
    out: Mutex<Option<Vec<f32>>>,
    slots: GradSlots,
}

fn msg(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl<L: Layers> candle_core::CustomOp2 for Encoder<L> {
    fn name(&self) -> &'static str {
        L::NAME
    }

    fn cpu_fwd(
        &self,
        _s1: &candle_core::CpuStorage,
        _l1: &candle_core::Layout,
        _s2: &candle_core::CpuStorage,
        _l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let out = self
            .out
            .lock()
            .expect("not poisoned")
            .take()
            .ok_or_else(|| msg("encoder output taken twice"))?;
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((self.tokens, self.hidden)),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        sink: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = grad.flatten_all()?.to_vec1::<f32>()?;
        let n = self.params.len();
        let (d, grads) = with_weights(&self.params, |weights| {
            let mut d = d;
            let mut grads: Vec<Vec<Vec<f32>>> = Vec::with_capacity(n);
            for l in (0..n).rev() {
                let saved = match self.saved.lock().expect("not poisoned")[l].take() {
                    Some(s) => s,
                    None => {
                        // Checkpointed: recompute the layer from its input, with the same masks.
                        let x = self.inputs.lock().expect("not poisoned")[l]
                            .take()
                            .ok_or_else(|| msg("encoder backward ran twice"))?;
                        crate::nn::count_recomputed_layer();
                        self.layers.forward(l, &weights[l], x).1
                    }
                };
                let (dx, g) = self.layers.backward(l, &weights[l], saved, &d);
                if g.len() != weights[l].len() {
                    return Err(msg(format!(
                        "layer {l}: {} gradients for {} parameters",
                        g.len(),
                        weights[l].len()
                    )));
                }
                d = dx;
                grads.push(g);
            }
            grads.reverse();
            Ok::<_, candle_core::Error>((d, grads))
        })
        .map_err(msg)??;
        let mut slots = self.slots.lock().expect("not poisoned");
        for (k, v) in grads.into_iter().flatten().enumerate() {
            if !self.trained[k] {
                continue;
            }
            slots[k] = Some(Tensor::from_vec(
                v,
                self.shapes[k].as_slice(),
                &candle_core::Device::Cpu,
            )?);
        }
        let dx = Tensor::from_vec(d, (self.tokens, self.hidden), &candle_core::Device::Cpu)?;
        Ok((Some(dx), Some(sink.zeros_like()?)))
    }
}

/// A layer stack on packed rows `x [T, H]` (f32), differentiable in `x` and in every parameter
/// (`params[layer]`, in the order `layers` reads them; constants, e.g. a LoRA run's frozen base
/// weights, get no gradient): the forward runs now, the backward when
/// candle back-propagates through the returned tensor. Under activation checkpointing only each
/// layer's input is kept and the layer is recomputed in the backward pass.
pub(crate) fn run_stack<L: Layers>(
    x: &Tensor,
    params: Vec<Vec<Tensor>>,
    layers: L,
) -> Result<Tensor> {
    let (tokens, hidden) = x.dims2()?;
    let n = params.len();
    let checkpointed = crate::nn::checkpointing();
    let mut cur = host(&x.contiguous()?)?;
    let mut saved = Vec::with_capacity(n);
    let mut inputs = Vec::with_capacity(n);
    with_weights(&params, |weights| {
        for (l, w) in weights.iter().enumerate() {
            LAYER_PASSES.with(|c| c.set(c.get() + 1));
            // Checkpointed, only the input is kept: the activations are recomputed in backward.
            inputs.push(checkpointed.then(|| cur.clone()));
            let (out, s) = layers.forward(l, w, std::mem::take(&mut cur));
            saved.push((!checkpointed).then_some(s));
            cur = out;
        }
    })?;
    let shapes: Vec<Vec<usize>> = params.iter().flatten().map(|t| t.dims().to_vec()).collect();
    let trained: Vec<bool> = params.iter().flatten().map(Tensor::is_variable).collect();
    let enc = Encoder {
        trained,
        slots: Arc::new(Mutex::new(vec![None; shapes.len()])),
        shapes,
        params,
        layers,
        tokens,
        hidden,
        saved: Mutex::new(saved),
        inputs: Mutex::new(inputs),
        out: Mutex::new(Some(cur)),
    };
    let slots = enc.slots.clone();
    let mut sink: Option<Tensor> = None;
    for (index, p) in enc.params.iter().flatten().enumerate() {
        if !enc.trained[index] {
            continue;
        }
        let s = p.apply_op1(ParamSink {
            slots: slots.clone(),
            index,
        })?;
        sink = Some(match sink {
            None => s,
            Some(acc) => (acc + s)?,
        });
    }
    let sink = sink.ok_or_else(|| {
        Error::InvalidInput("fast training pass: no trained parameter in the layers".into())
    })?;
    Ok(x.apply_op2(&sink, enc)?)
}

/// Which parameter list a BERT-style layer stack reads, and its adapters.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// BERT: each layer's 16 parameters in [`LayerParams`] order, then `A` and `B` of each PEFT
    /// LoRA adapter `(rank, scale)` present on q, k, v, attention output, intermediate, output.
    Bert { lora: [Option<(usize, f32)>; 6] },
    /// jina-embeddings-v3: the fused `Wqkv` weight and bias, `out_proj` weight and bias, norm1 γ β,
    /// fc1 weight and bias, fc2 weight and bias, norm2 γ β; then, with a task, the stacked task
    /// adapters `A [tasks, rank, in]` and `B [tasks, out, rank]` of Wqkv, out_proj, fc1, fc2 (the
    /// task selects the slice, whose gradient is the only non-zero one). Rotary positions on Q, K.
    Jina {
        task: Option<usize>,
        tasks: usize,
        rank: usize,
        scale: f32,
        rope_theta: f64,
    },
}

impl Kind {
    /// The number of parameters of one layer.
    pub fn params_per_layer(&self) -> usize {
        match self {
            Kind::Bert { lora } => 16 + 2 * lora.iter().flatten().count(),
            Kind::Jina { task, .. } => 12 + if task.is_some() { 8 } else { 0 },
        }
    }
}

/// BERT's (and Jina's) layers for [`run_stack`].
struct BertLayers {
    dims: Dims,
    kind: Kind,
    seqs: Vec<Seq>,
    tokens: usize,
    grid_cols: usize,
    dropout: Vec<LayerDropout>,
    rope: Option<Rope>,
    /// Per slot of a layer's parameter list: a variable (every layer alike).
    trained: Vec<bool>,
    /// bf16 mixed precision, as [`mixed_bf16`] was when the forward pass ran.
    bf16: bool,
}

impl BertLayers {
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            dims: self.dims,
            seqs: &self.seqs,
            tokens: self.tokens,
            grid_cols: self.grid_cols,
            rope: self.rope.as_ref(),
        }
    }

    /// The weights of one layer from its parameter list.
    fn weights<'a>(&self, w: &[&'a [f32]]) -> LayerWeights<'a> {
        let (h, inter) = (self.dims.hidden, self.dims.inter);
        let tr = &self.trained;
        match self.kind {
            Kind::Bert { lora } => {
                let mut at = 16;
                let ad = lora.map(|l| {
                    l.map(|(rank, scale)| {
                        at += 2;
                        Lora {
                            a: w[at - 2],
                            b: w[at - 1],
                            rank,
                            scale,
                        }
                    })
                });
                let proj = |slot: usize, i: usize| Proj {
                    w: w[slot],
                    train_w: tr[slot],
                    lora: ad[i],
                    bf16: self.bf16,
                };
                LayerWeights {
                    qkv: vec![
                        (0, h, proj(0, 0)),
                        (h, h, proj(2, 1)),
                        (2 * h, h, proj(4, 2)),
                    ],
                    bqkv: [w[1], w[3], w[5]].concat(),
                    o: proj(6, 3),
                    bo: w[7],
                    ln1_g: w[8],
                    ln1_b: w[9],
                    w1: proj(10, 4),
                    b1: w[11],
                    w2: proj(12, 5),
                    b2: w[13],
                    ln2_g: w[14],
                    ln2_b: w[15],
                }
            }
            Kind::Jina {
                task, rank, scale, ..
            } => {
                let proj = |slot: usize, i: usize, inp: usize, out: usize| Proj {
                    w: w[slot],
                    train_w: tr[slot],
                    bf16: self.bf16,
                    lora: task.map(|t| Lora {
                        a: &w[12 + 2 * i][t * rank * inp..(t + 1) * rank * inp],
                        b: &w[13 + 2 * i][t * out * rank..(t + 1) * out * rank],
                        rank,
                        scale,
                    }),
                };
                LayerWeights {
                    qkv: vec![(0, 3 * h, proj(0, 0, h, 3 * h))],
                    bqkv: w[1].to_vec(),
                    o: proj(2, 1, h, h),
                    bo: w[3],
                    ln1_g: w[4],
                    ln1_b: w[5],
                    w1: proj(6, 2, h, inter),
                    b1: w[7],
                    w2: proj(8, 3, inter, h),
                    b2: w[9],
                    ln2_g: w[10],
                    ln2_b: w[11],
                }
            }
        }
    }

    /// A layer's gradients by slot of its parameter list.
    fn slots(&self, g: LayerGrads) -> Vec<Vec<f32>> {
        let (h, inter) = (self.dims.hidden, self.dims.inter);
        let mut out = vec![Vec::new(); self.kind.params_per_layer()];
        let mut qkv = g.qkv.into_iter();
        let mut next = || qkv.next().expect("the layer's Q/K/V projections");
        match self.kind {
            Kind::Bert { lora } => {
                out[1] = g.bqkv[..h].to_vec();
                out[3] = g.bqkv[h..2 * h].to_vec();
                out[5] = g.bqkv[2 * h..].to_vec();
                for (slot, v) in [(7, g.bo), (8, g.ln1_g), (9, g.ln1_b), (11, g.b1)] {
                    out[slot] = v;
                }
                for (slot, v) in [(13, g.b2), (14, g.ln2_g), (15, g.ln2_b)] {
                    out[slot] = v;
                }
                let projs = [next(), next(), next(), g.o, g.w1, g.w2];
                let mut at = 16;
                for (i, ([dw, da, db], slot)) in
                    projs.into_iter().zip([0, 2, 4, 6, 10, 12]).enumerate()
                {
                    out[slot] = dw;
                    if lora[i].is_some() {
                        out[at] = da;
                        out[at + 1] = db;
                        at += 2;
                    }
                }
            }
            Kind::Jina {
                task, tasks, rank, ..
            } => {
                let biases = [
                    (1, g.bqkv),
                    (3, g.bo),
                    (4, g.ln1_g),
                    (5, g.ln1_b),
                    (7, g.b1),
                ];
                for (slot, v) in biases {
                    out[slot] = v;
                }
                for (slot, v) in [(9, g.b2), (10, g.ln2_g), (11, g.ln2_b)] {
                    out[slot] = v;
                }
                let shapes = [(h, 3 * h), (h, h), (h, inter), (inter, h)];
                let projs = [next(), g.o, g.w1, g.w2];
                for (i, [dw, da, db]) in projs.into_iter().enumerate() {
                    out[[0, 2, 6, 8][i]] = dw;
                    if let Some(t) = task {
                        // The stacked adapters' gradient: zero but for this task's slice.
                        let (inp, o) = shapes[i];
                        let mut a = vec![0f32; tasks * rank * inp];
                        a[t * rank * inp..(t + 1) * rank * inp].copy_from_slice(&da);
                        let mut b = vec![0f32; tasks * o * rank];
                        b[t * o * rank..(t + 1) * o * rank].copy_from_slice(&db);
                        out[12 + 2 * i] = a;
                        out[13 + 2 * i] = b;
                    }
                }
            }
        }
        out
    }
}

impl Layers for BertLayers {
    type Saved = Saved;
    const NAME: &'static str = "fast-train-bert-encoder";

    fn forward(&self, layer: usize, w: &[&[f32]], x: Vec<f32>) -> (Vec<f32>, Saved) {
        layer_forward(&self.weights(w), x, &self.ctx(), &self.dropout[layer])
    }

    fn backward(
        &self,
        layer: usize,
        w: &[&[f32]],
        saved: Saved,
        dy: &[f32],
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let (dx, g) = layer_backward(
            &self.weights(w),
            saved,
            dy,
            &self.ctx(),
            &self.dropout[layer],
        );
        (dx, self.slots(g))
    }
}

/// The encoder's layers on packed rows `x [T, H]` (f32, after the embeddings), differentiable in
/// `x` and in every trained parameter (`params[layer]` in the order `kind` says), or None where
/// this pass does not run them ([`runs`], a dropout probability of 1): candle's layers do. `mask`
/// is the padded batch's key mask candle's layers see (its grid places the dropout masks);
/// `attention_dropout`, `hidden_dropout` are the model's probabilities (the training run's override
/// applies).
pub fn encoder(
    x: &Tensor,
    params: Vec<Vec<Tensor>>,
    kind: Kind,
    dims: Dims,
    mask: &[Vec<u32>],
    attention_dropout: f64,
    hidden_dropout: f64,
) -> Result<Option<Tensor>> {
    let p_attention = crate::nn::dropout_probability(attention_dropout).unwrap_or(0.0);
    let p_hidden = crate::nn::dropout_probability(hidden_dropout).unwrap_or(0.0);
    if !runs(&params) || p_attention >= 1.0 || p_hidden >= 1.0 {
        return Ok(None);
    }
    let seqs = Seq::of_mask(mask);
    let grid = (mask.len(), mask.first().map_or(0, Vec::len));
    let (tokens, h) = x.dims2()?;
    if h != dims.hidden || seqs.iter().map(|q| q.len).sum::<usize>() != tokens {
        return Err(Error::InvalidInput(format!(
            "fast training pass: {tokens} × {h} rows do not match the batch layout"
        )));
    }
    let trained = trained_slots(&params, kind.params_per_layer())?;
    let n = params.len();
    let dropout = match crate::nn::dropout_state() {
        Some(state) => {
            let (d, used) =
                reserve_dropout(state, n, p_attention, p_hidden, grid, dims.heads, tokens, h);
            crate::nn::advance_dropout(used);
            d
        }
        None => vec![
            LayerDropout {
                attention: Stream::off(),
                attn_out: Stream::off(),
                mlp_out: Stream::off(),
            };
            n
        ],
    };
    let rope = match kind {
        Kind::Jina { rope_theta, .. } => {
            let longest = seqs.iter().map(|q| q.len).max().unwrap_or(0);
            Some(Rope::new(rope_theta, h / dims.heads, longest))
        }
        Kind::Bert { .. } => None,
    };
    let layers = BertLayers {
        dims,
        kind,
        seqs,
        tokens,
        grid_cols: grid.1,
        dropout,
        rope,
        trained,
        bf16: mixed_bf16(),
    };
    Ok(Some(run_stack(x, params, layers)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn;
    use candle_core::Device;

    /// The masks this pass computes are the ones candle's `nn::dropout` draws, call after call,
    /// element for element, for sequences that sit anywhere on the padded grid (left padding too).
    #[test]
    fn masks_are_candles_draws() {
        let (b, nh, s, tokens, h) = (3, 2, 7, 5, 4);
        let ctx = Arc::new(nn::DropoutCtx::new(None, 42));
        let (grid, hidden, state, after) = nn::with_dropout(ctx, || {
            let state = nn::dropout_state().unwrap();
            let grid = Tensor::ones((b, nh, s, s), DType::F32, &Device::Cpu).unwrap();
            let grid = nn::dropout(&grid, 0.3).unwrap();
            let hid = Tensor::ones((tokens, h), DType::F32, &Device::Cpu).unwrap();
            let hid = nn::dropout(&hid, 0.2).unwrap();
            let after = nn::dropout_state().unwrap();
            (grid, hid, state, after)
        });
        let grid = grid.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let hidden = hidden.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(grid.contains(&0.0) && hidden.contains(&0.0));
        let (streams, used) = reserve_dropout(state, 1, 0.3, 0.2, (b, s), nh, tokens, h);
        assert_eq!(used, (b * nh * s * s + 2 * tokens * h) as u64);
        // The second hidden call (MLP output) starts where the first ended.
        assert_eq!(
            streams[0].mlp_out.state, after,
            "draws reserved are not the draws candle makes"
        );
        for row in 0..b {
            let q = Seq {
                start: 0,
                len: s - row,
                row,
                col0: row,
            };
            let mut out = vec![0f32; q.len * q.len];
            for head in 0..nh {
                attention_mask(&streams[0].attention, &q, head, nh, s, &mut out);
                for i in 0..q.len {
                    for j in 0..q.len {
                        let at = ((row * nh + head) * s + q.col0 + i) * s + q.col0 + j;
                        assert_eq!(
                            out[i * q.len + j],
                            grid[at],
                            "row {row} head {head} ({i}, {j})"
                        );
                    }
                }
            }
        }
        let mut mask = Vec::new();
        hidden_mask(&streams[0].attn_out, 1, tokens - 1, h, &mut mask);
        assert_eq!(mask, hidden[h..]);
    }
}
