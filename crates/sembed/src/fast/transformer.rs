//! One inference-only transformer for every architecture sembed runs (BERT family, Qwen2, Qwen3,
//! jina-embeddings-v3), on host buffers. The architectures differ only in a few switches — where the
//! norm sits (post-LN or pre-RMSNorm), how positions enter (a table or rotary), causal or
//! bidirectional attention, grouped-query heads, q/k norms, a gated MLP, task LoRA adapters — so one
//! forward pass with those switches replaces four copies of the same loop. The loaders in
//! [`super::load`] read each checkpoint layout into this shape.
//!
//! What makes it fast on a CPU:
//! - projections, norms and the MLP run on the real tokens only (packed, no padding);
//! - Q, K and V are one projection (gate and up too, for SwiGLU);
//! - attention runs per sequence at its exact length, with no mask grid (causal rows stop at the
//!   diagonal);
//! - bias + activation, bias + residual + LayerNorm, SiLU · up are each one fused pass;
//! - the MLP runs in token chunks so its wide intermediate stays cache-sized;
//! - a batch's sequences are shared out between threads, each running whole sequences with
//!   single-threaded GEMMs; a lone sequence splits its GEMMs and attention heads instead;
//! - scratch is kept per thread between calls and can be given back ([`release_scratch`]).

use super::bf16::PackedBf16;
use super::kernels::{self, Act};
use super::linear::{matmul, matmul_acc, Linear};
use super::Precision;
use crate::error::{Error, Result};
use gemm::Parallelism;
use half::{bf16, f16};
use std::cell::RefCell;

/// A normalisation layer.
pub enum Norm {
    Layer { w: Vec<f32>, b: Vec<f32> },
    Rms { w: Vec<f32> },
}

/// Task LoRA adapters of one projection: `y += x · A_tᵀ · B_tᵀ` for the row's task `t`
/// (B pre-multiplied by the scaling `alpha / rank`).
pub struct Lora {
    /// `[tasks, rank, in]`
    pub a: Vec<f32>,
    /// `[tasks, out, rank]`, scaled.
    pub b: Vec<f32>,
    pub rank: usize,
}

/// A projection: weights, optional bias, optional task adapters.
pub struct Proj {
    pub lin: Linear,
    pub bias: Option<Vec<f32>>,
    pub lora: Option<Lora>,
    pub inp: usize,
    pub out: usize,
}

/// An embedding table in the weights' precision.
pub enum Table {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Table {
    fn row_into(&self, id: usize, dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let h = dst.len();
        match self {
            Table::F32(t) => dst.copy_from_slice(&t[id * h..(id + 1) * h]),
            Table::Bf16(t) => t[id * h..(id + 1) * h].convert_to_f32_slice(dst),
            Table::F16(t) => t[id * h..(id + 1) * h].convert_to_f32_slice(dst),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Table::F32(t) => t.len() * 4,
            Table::Bf16(t) => t.len() * 2,
            Table::F16(t) => t.len() * 2,
        }
    }
}

/// Token embeddings: `word[id] (+ position[p]) (+ token type 0)`, with Jina's task adapters.
pub struct Embeddings {
    pub word: Table,
    pub vocab: usize,
    /// Absolute position table `[max_positions, hidden]` (BERT); None with rotary positions.
    pub position: Option<Vec<f32>>,
    /// Row 0 of the token-type table (BERT, XLM-R).
    pub type0: Option<Vec<f32>>,
    /// Jina: `(A [tasks, vocab, rank], B [tasks, rank, hidden] scaled)` of the word table.
    pub word_lora: Option<(Vec<f32>, Vec<f32>, usize)>,
    /// Jina: the adapter's change to token type 0 per task, `[tasks, hidden]`.
    pub type0_lora: Option<Vec<f32>>,
    /// LayerNorm after the sum (post-LN models).
    pub norm: Option<Norm>,
}

pub struct Layer {
    /// Fused `[q | k | v]` projection: `(nq + 2·nkv)·head_dim` outputs.
    pub qkv: Proj,
    /// Qwen3: RMSNorm weights over each query / key head.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub o: Proj,
    /// Post-LN: after attention; pre-norm: before attention.
    pub norm1: Norm,
    /// `[gate | up]` fused for a gated MLP, else the first MLP projection.
    pub up: Proj,
    pub down: Proj,
    /// Post-LN: after the MLP; pre-norm: before the MLP.
    pub norm2: Norm,
}

/// The switches that make one architecture out of the shared forward pass.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `bert`, `qwen2`, `qwen3`, `jina-v3`.
    pub arch: &'static str,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    /// Pre-RMSNorm blocks with a final norm (Qwen) rather than post-LN blocks (BERT, Jina).
    pub pre_norm: bool,
    /// Rotary base; None for an absolute position table.
    pub rope_theta: Option<f64>,
    pub causal: bool,
    /// SwiGLU MLP (`silu(gate) · up`); otherwise `act(up)`.
    pub gated: bool,
    pub act: Act,
    pub eps: f32,
    pub max_positions: usize,
    /// Number of task adapters (Jina), 0 otherwise.
    pub tasks: usize,
}

pub struct Transformer {
    pub spec: Spec,
    pub emb: Embeddings,
    pub layers: Vec<Layer>,
    /// Pre-norm models end with a norm.
    pub final_norm: Option<Norm>,
    pub precision: Precision,
}

/// One sequence of a packed batch: its rows, its position offset in `positions`, and its task.
#[derive(Debug, Clone, Copy)]
pub struct Seq {
    pub start: usize,
    pub len: usize,
    pub task: Option<usize>,
}

/// Values in the MLP's `[chunk, intermediate]` buffer (64 MiB of f32): bounds its memory, and keeps
/// chunks tall enough that each GEMM amortises the packing of its weights.
const MLP_CHUNK_VALUES: usize = 1 << 24;
/// Rows per LoRA side-path step.
const MLP_CHUNK: usize = 256;

/// Tokens per MLP chunk for an intermediate width (64..=1024 rows).
fn mlp_chunk(up_w: usize) -> usize {
    (MLP_CHUNK_VALUES / up_w.max(1)).clamp(64, 1024) / 64 * 64
}

thread_local! {
    /// Per-thread packed Kᵀ and V of one attention head, for the bf16 attention products.
    static ATTN_BF16: RefCell<(PackedBf16, PackedBf16)> =
        const { RefCell::new((PackedBf16::empty(), PackedBf16::empty())) };
}

thread_local! {
    /// Per-thread scratch, grown as needed and kept between calls (fresh pages cost more than the
    /// arithmetic on them); [`release_scratch`] gives it back.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Free the scratch every thread keeps between calls, and ask the allocator to hand freed memory
/// back to the kernel. `mi_collect` reaches only the calling thread's heap, hence the call on every
/// worker; it is a no-op for memory that another global allocator manages. (mimalloc decommits what
/// was scheduled for purging, so a binary must not disable purging altogether: `purge_delay` ≥ 0.)
pub fn release_scratch() {
    let free = || {
        SCRATCH.with(|s| drop(std::mem::take(&mut *s.borrow_mut())));
        ATTN_BF16.with(|s| *s.borrow_mut() = (PackedBf16::empty(), PackedBf16::empty()));
        super::linear::release_thread_scratch();
        super::quant::release_thread_scratch();
        super::bf16::release_thread_scratch();
        // SAFETY: a plain call into mimalloc, valid on any thread at any time.
        unsafe { libmimalloc_sys::mi_collect(true) };
    };
    rayon::broadcast(|_| free());
    free();
}

impl Transformer {
    pub fn hidden_size(&self) -> usize {
        self.spec.hidden
    }

    /// Bytes of every weight as held in memory.
    pub fn weight_bytes(&self) -> usize {
        let proj = |p: &Proj| {
            p.lin.weight_bytes()
                + 4 * p.bias.as_ref().map_or(0, Vec::len)
                + 4 * p.lora.as_ref().map_or(0, |l| l.a.len() + l.b.len())
        };
        let norm = |n: &Norm| match n {
            Norm::Layer { w, b } => 4 * (w.len() + b.len()),
            Norm::Rms { w } => 4 * w.len(),
        };
        let e = &self.emb;
        let mut total = e.word.bytes()
            + 4 * e.position.as_ref().map_or(0, Vec::len)
            + 4 * e.type0.as_ref().map_or(0, Vec::len)
            + 4 * e
                .word_lora
                .as_ref()
                .map_or(0, |(a, b, _)| a.len() + b.len())
            + 4 * e.type0_lora.as_ref().map_or(0, Vec::len)
            + e.norm.as_ref().map_or(0, norm)
            + self.final_norm.as_ref().map_or(0, norm);
        for l in &self.layers {
            total += proj(&l.qkv) + proj(&l.o) + proj(&l.up) + proj(&l.down);
            total += norm(&l.norm1) + norm(&l.norm2);
            total +=
                4 * (l.q_norm.as_ref().map_or(0, Vec::len) + l.k_norm.as_ref().map_or(0, Vec::len));
        }
        total
    }

    /// Check a packed batch against the model: lengths, positions, vocabulary, tasks.
    fn validate(&self, ids: &[u32], positions: &[u32], seqs: &[Seq]) -> Result<()> {
        if positions.len() != ids.len() {
            return Err(Error::InvalidInput(format!(
                "{} positions for {} tokens",
                positions.len(),
                ids.len()
            )));
        }
        let mut end = 0;
        for s in seqs {
            if s.len == 0 {
                return Err(Error::InvalidInput("empty token sequence".into()));
            }
            if s.start != end {
                return Err(Error::InvalidInput(
                    "sequences must tile the packed batch in order".into(),
                ));
            }
            end = s.start + s.len;
            if let Some(t) = s.task {
                if t >= self.spec.tasks {
                    return Err(Error::InvalidInput(format!(
                        "task adapter {t} out of range: the model has {}",
                        self.spec.tasks
                    )));
                }
            }
        }
        if end != ids.len() {
            return Err(Error::InvalidInput(format!(
                "sequences cover {end} of {} tokens",
                ids.len()
            )));
        }
        if let Some(&p) = positions
            .iter()
            .find(|&&p| p as usize >= self.spec.max_positions)
        {
            return Err(Error::InvalidInput(format!(
                "position {p} exceeds the model's {} positions",
                self.spec.max_positions
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.emb.vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} outside the vocabulary of {}",
                self.emb.vocab
            )));
        }
        Ok(())
    }

    /// Last hidden states of every token of a packed batch, `[tokens, hidden]`.
    pub fn forward(&self, ids: &[u32], positions: &[u32], seqs: &[Seq]) -> Result<Vec<f32>> {
        self.validate(ids, positions, seqs)?;
        let h = self.spec.hidden;
        let mut out = vec![0f32; ids.len() * h];
        let threads = rayon::current_num_threads().max(1);
        let groups = split_by_cost(seqs, threads, &self.spec);
        if groups.len() <= 1 {
            let par = if threads > 1 {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            };
            self.forward_group(ids, positions, seqs, &mut out, par);
            return Ok(out);
        }
        // Contiguous groups of sequences → contiguous slices of the output.
        let mut work = Vec::with_capacity(groups.len());
        let mut rest = out.as_mut_slice();
        let mut first = 0;
        for &end in &groups {
            let group = &seqs[first..end];
            let (t0, t1) = (
                group[0].start,
                group[group.len() - 1].start + group[group.len() - 1].len,
            );
            let (head, tail) = rest.split_at_mut((t1 - t0) * h);
            work.push((group, t0, t1, head));
            rest = tail;
            first = end;
        }
        rayon::scope(|s| {
            for (group, t0, t1, dst) in work {
                s.spawn(move |_| {
                    let local: Vec<Seq> = group
                        .iter()
                        .map(|q| Seq {
                            start: q.start - t0,
                            ..*q
                        })
                        .collect();
                    self.forward_group(
                        &ids[t0..t1],
                        &positions[t0..t1],
                        &local,
                        dst,
                        Parallelism::None,
                    )
                });
            }
        });
        Ok(out)
    }

    fn embed_tokens(&self, ids: &[u32], positions: &[u32], seqs: &[Seq], x: &mut [f32]) {
        let h = self.spec.hidden;
        let e = &self.emb;
        for s in seqs {
            for r in s.start..s.start + s.len {
                let dst = &mut x[r * h..(r + 1) * h];
                let id = ids[r] as usize;
                e.word.row_into(id, dst);
                if let Some(table) = &e.position {
                    let p = positions[r] as usize;
                    for (d, v) in dst.iter_mut().zip(&table[p * h..(p + 1) * h]) {
                        *d += v;
                    }
                }
                if let Some(t0) = &e.type0 {
                    for (d, v) in dst.iter_mut().zip(t0) {
                        *d += v;
                    }
                }
                if let Some(task) = s.task {
                    if let Some((a, b, rank)) = &e.word_lora {
                        let ar = &a[(task * e.vocab + id) * rank..(task * e.vocab + id + 1) * rank];
                        let bt = &b[task * rank * h..(task + 1) * rank * h];
                        for (j, &av) in ar.iter().enumerate() {
                            for (d, bv) in dst.iter_mut().zip(&bt[j * h..(j + 1) * h]) {
                                *d += av * bv;
                            }
                        }
                    }
                    if let Some(t) = &e.type0_lora {
                        for (d, v) in dst.iter_mut().zip(&t[task * h..(task + 1) * h]) {
                            *d += v;
                        }
                    }
                }
            }
        }
        if let Some(Norm::Layer { w, b }) = &e.norm {
            kernels::layer_norm(x, w, b, self.spec.eps);
        }
    }

    fn forward_group(
        &self,
        ids: &[u32],
        positions: &[u32],
        seqs: &[Seq],
        x: &mut [f32],
        par: Parallelism,
    ) {
        let sp = &self.spec;
        let (h, hd) = (sp.hidden, sp.head_dim);
        let (nq, nkv) = (sp.heads, sp.kv_heads);
        let qw = (nq + 2 * nkv) * hd;
        let ctx_w = (nq * hd).max(h);
        let up_w = if sp.gated { 2 * sp.inter } else { sp.inter };
        let t = ids.len();
        let smax = seqs.iter().map(|s| s.len).max().unwrap_or(0);
        let step = mlp_chunk(up_w);
        let chunk = t.min(step);
        let half = hd / 2;
        let pmax = positions.iter().map(|&p| p as usize + 1).max().unwrap_or(0);
        let rope_len = if sp.rope_theta.is_some() {
            2 * pmax * half
        } else {
            0
        };
        let hs_len = if sp.pre_norm { t * h } else { 0 };
        let wide_len = (t * h).max(chunk * up_w);
        let need = hs_len + t * qw + t * ctx_w + wide_len + smax * smax + rope_len;
        let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        {
            let (hs, rest) = scratch.split_at_mut(hs_len);
            let (qkv, rest) = rest.split_at_mut(t * qw);
            let (ctx, rest) = rest.split_at_mut(t * ctx_w);
            let (wide, rest) = rest.split_at_mut(wide_len);
            let (scores, rest) = rest.split_at_mut(smax * smax);
            let rope = &mut rest[..rope_len];
            if let Some(theta) = sp.rope_theta {
                rope_tables(theta, hd, pmax, rope);
            }
            let (cos, sin) = rope.split_at(rope_len / 2);

            self.embed_tokens(ids, positions, seqs, x);
            let scale = 1.0 / (hd as f32).sqrt();
            for l in &self.layers {
                // Attention input: the residual stream itself (post-LN) or its norm (pre-norm).
                let src: &[f32] = if sp.pre_norm {
                    apply_norm(&l.norm1, x, hs, sp.eps);
                    hs
                } else {
                    x
                };
                l.qkv.forward(src, 0, t, seqs, qkv, par);
                if let Some(b) = &l.qkv.bias {
                    kernels::add_bias(qkv, b);
                }
                for r in 0..t {
                    let row = &mut qkv[r * qw..(r + 1) * qw];
                    let (q, kv) = row.split_at_mut(nq * hd);
                    let k = &mut kv[..nkv * hd];
                    if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                        kernels::rms_norm_inplace(q, qn, sp.eps);
                        kernels::rms_norm_inplace(k, kn, sp.eps);
                    }
                    if sp.rope_theta.is_some() {
                        let p = positions[r] as usize;
                        let (c, s) = (
                            &cos[p * half..(p + 1) * half],
                            &sin[p * half..(p + 1) * half],
                        );
                        kernels::rope(q, c, s);
                        kernels::rope(k, c, s);
                    }
                }
                for s in seqs {
                    self.attention(s, qkv, ctx, nq * hd, scores, scale, par);
                }
                let y = &mut wide[..t * h];
                l.o.forward(ctx, 0, t, seqs, y, par);
                if sp.pre_norm {
                    kernels::add_residual(x, y, l.o.bias.as_deref());
                } else {
                    residual_norm(&l.norm1, x, y, l.o.bias.as_deref(), sp.eps);
                }
                // The MLP in chunks of tokens: the wide intermediate stays cache-sized.
                for c0 in (0..t).step_by(step) {
                    let c1 = (c0 + step).min(t);
                    let rows = c1 - c0;
                    let up = &mut wide[..rows * up_w];
                    if sp.pre_norm {
                        let hsc = &mut hs[c0 * h..c1 * h];
                        apply_norm(&l.norm2, &x[c0 * h..c1 * h], hsc, sp.eps);
                        l.up.forward(hsc, c0, rows, seqs, up, par);
                    } else {
                        l.up.forward(&x[c0 * h..c1 * h], c0, rows, seqs, up, par);
                    }
                    if sp.gated {
                        kernels::silu_mul_compact(up, rows, sp.inter);
                    } else {
                        let zeros;
                        let bias = match &l.up.bias {
                            Some(b) => b.as_slice(),
                            None => {
                                zeros = vec![0f32; sp.inter];
                                &zeros
                            }
                        };
                        kernels::bias_act(up, bias, sp.act);
                    }
                    let down = &mut ctx[c0 * h..c1 * h];
                    l.down
                        .forward(&wide[..rows * sp.inter], c0, rows, seqs, down, par);
                    if sp.pre_norm {
                        kernels::add_residual(
                            &mut x[c0 * h..c1 * h],
                            &ctx[c0 * h..c1 * h],
                            l.down.bias.as_deref(),
                        );
                    }
                }
                if !sp.pre_norm {
                    residual_norm(&l.norm2, x, &ctx[..t * h], l.down.bias.as_deref(), sp.eps);
                }
            }
            if let Some(n) = &self.final_norm {
                let tmp = &mut wide[..t * h];
                apply_norm(n, x, tmp, sp.eps);
                x.copy_from_slice(tmp);
            }
        }
        SCRATCH.with(|s| *s.borrow_mut() = scratch);
    }

    /// Attention of one sequence, every query head, into `ctx` rows of stride `ctx_w` (= heads · d).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        s: &Seq,
        qkv: &[f32],
        ctx: &mut [f32],
        ctx_w: usize,
        scores: &mut [f32],
        scale: f32,
        par: Parallelism,
    ) {
        let sp = &self.spec;
        let (hd, nq, nkv) = (sp.head_dim, sp.heads, sp.kv_heads);
        let qw = (nq + 2 * nkv) * hd;
        let n = s.len;
        let rows = &qkv[s.start * qw..(s.start + n) * qw];
        let head = |hq: usize| {
            let g = hq / (nq / nkv);
            (hq * hd, (nq + g) * hd, (nq + nkv + g) * hd)
        };
        // bf16 models on bf16 hardware run the attention products in bf16 too (see
        // `bf16_attention`).
        let bf16 = self.precision == Precision::Bf16
            && super::cpu::active().has_bf16()
            && bf16_attention(hd);
        if matches!(par, Parallelism::None) {
            for hq in 0..nq {
                let out = &mut ctx[s.start * ctx_w + hq * hd..];
                attend(
                    rows,
                    n,
                    qw,
                    head(hq),
                    hd,
                    scale,
                    sp.causal,
                    scores,
                    out,
                    ctx_w,
                    bf16,
                );
            }
        } else {
            // One sequence on several threads: heads in parallel (its attention GEMMs are too small
            // to split), each into its own block, then interleaved.
            use rayon::prelude::*;
            let blocks: Vec<Vec<f32>> = (0..nq)
                .into_par_iter()
                .map(|hq| {
                    let mut sc = vec![0f32; n * n];
                    let mut out = vec![0f32; n * hd];
                    attend(
                        rows,
                        n,
                        qw,
                        head(hq),
                        hd,
                        scale,
                        sp.causal,
                        &mut sc,
                        &mut out,
                        hd,
                        bf16,
                    );
                    out
                })
                .collect();
            for (hq, b) in blocks.iter().enumerate() {
                for (i, row) in b.chunks_exact(hd).enumerate() {
                    let at = (s.start + i) * ctx_w + hq * hd;
                    ctx[at..at + hd].copy_from_slice(row);
                }
            }
        }
    }
}

impl Proj {
    /// `y = x · W (+ task adapters)` for `rows` rows starting at packed row `row0` (bias not added:
    /// the callers fuse it into the next pass). `x` is `[rows, inp]`, `y` is `[rows, out]`.
    fn forward(
        &self,
        x: &[f32],
        row0: usize,
        rows: usize,
        seqs: &[Seq],
        y: &mut [f32],
        par: Parallelism,
    ) {
        let (k, n) = (self.inp, self.out);
        self.lin
            .forward(&x[..rows * k], rows, &mut y[..rows * n], par);
        let Some(l) = &self.lora else { return };
        let r = l.rank;
        let mut tmp = vec![0f32; rows.clamp(1, MLP_CHUNK) * r];
        for s in seqs {
            let Some(task) = s.task else { continue };
            // The part of this sequence inside rows row0..row0 + rows.
            let a0 = s.start.max(row0);
            let a1 = (s.start + s.len).min(row0 + rows);
            let mut i = a0;
            while i < a1 {
                let j = (i + tmp.len() / r).min(a1);
                let m = j - i;
                let xs = &x[(i - row0) * k..(j - row0) * k];
                let at = &l.a[task * r * k..(task + 1) * r * k];
                let bt = &l.b[task * n * r..(task + 1) * n * r];
                // tmp[m, r] = xs · Aᵀ   (A is [r, k]: read as [k, r] with strides (1, k))
                matmul(
                    m,
                    r,
                    k,
                    xs,
                    (k as isize, 1),
                    at,
                    (1, k as isize),
                    &mut tmp[..m * r],
                    (r as isize, 1),
                    Parallelism::None,
                );
                // y[m, n] += tmp · Bᵀ   (B is [n, r]: read as [r, n] with strides (1, r))
                matmul_acc(
                    m,
                    n,
                    r,
                    &tmp[..m * r],
                    (r as isize, 1),
                    bt,
                    (1, r as isize),
                    &mut y[(i - row0) * n..(j - row0) * n],
                    (n as isize, 1),
                    true,
                    Parallelism::None,
                );
                i = j;
            }
        }
    }
}

/// `dst = norm(src)` row by row.
fn apply_norm(n: &Norm, src: &[f32], dst: &mut [f32], eps: f32) {
    match n {
        Norm::Rms { w } => kernels::rms_norm(src, dst, w, eps),
        Norm::Layer { w, b } => {
            dst.copy_from_slice(src);
            kernels::layer_norm(dst, w, b, eps);
        }
    }
}

/// Post-LN residual: `x = norm(x + y + bias)`.
fn residual_norm(n: &Norm, x: &mut [f32], y: &[f32], bias: Option<&[f32]>, eps: f32) {
    match n {
        Norm::Layer { w, b } => {
            let zeros;
            let bias = match bias {
                Some(b) => b,
                None => {
                    zeros = vec![0f32; w.len()];
                    &zeros
                }
            };
            kernels::residual_layer_norm(x, y, bias, w, b, eps)
        }
        Norm::Rms { w } => {
            kernels::add_residual(x, y, bias);
            kernels::rms_norm_inplace(x, w, eps);
        }
    }
}

/// `cos` then `sin` tables `[positions, head_dim / 2]`, computed as the reference does (f32 inverse
/// frequencies `1 / θ^(2i/d)`, f32 products, f32 cos/sin).
pub(crate) fn rope_tables(theta: f64, hd: usize, positions: usize, out: &mut [f32]) {
    let half = hd / 2;
    let (cos, sin) = out.split_at_mut(positions * half);
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / hd as f32))
        .collect();
    for p in 0..positions {
        for (i, f) in inv.iter().enumerate() {
            let a = p as f32 * f;
            cos[p * half + i] = a.cos();
            sin[p * half + i] = a.sin();
        }
    }
}

/// One attention head of one sequence of `n` tokens: `softmax(Q Kᵀ · scale) V`, with Q, K and V
/// the `d` columns at offsets `(q, k, v)` of the `stride`-wide rows of `qkv`; the result goes to
/// `out` rows of stride `out_stride`. `scores` is scratch of at least `n²`. With `in_bf16` (the kernels
/// in force must have bf16 dot products) both products take bf16 operands with f32 sums, as the
/// projections do; the softmax stays in f32.
#[allow(clippy::too_many_arguments)]
fn attend(
    qkv: &[f32],
    n: usize,
    stride: usize,
    (qc, kc, vc): (usize, usize, usize),
    d: usize,
    scale: f32,
    causal: bool,
    scores: &mut [f32],
    out: &mut [f32],
    out_stride: usize,
    in_bf16: bool,
) {
    let st = stride as isize;
    let s = &mut scores[..n * n];
    if in_bf16 {
        let kernels = super::cpu::active();
        let par = Parallelism::None;
        return ATTN_BF16.with(|c| {
            let (kt, v) = &mut *c.borrow_mut();
            // Kᵀ as the B operand (input i of output j is K[j][i]), V likewise (V[i][j]).
            kt.repack(d, n, |i, j| bf16::from_f32(qkv[j * stride + kc + i]));
            kt.forward_strided(kernels, &qkv[qc..], stride, n, s, n, par);
            if causal {
                kernels::softmax_rows_causal(s, n, scale);
            } else {
                kernels::softmax_rows(s, n, scale);
            }
            v.repack(n, d, |i, j| bf16::from_f32(qkv[i * stride + vc + j]));
            v.forward_strided(kernels, s, n, n, out, out_stride, par);
        });
    }
    matmul(
        n,
        n,
        d,
        &qkv[qc..],
        (st, 1),
        &qkv[kc..],
        (1, st),
        s,
        (n as isize, 1),
        Parallelism::None,
    );
    if causal {
        kernels::softmax_rows_causal(s, n, scale);
    } else {
        kernels::softmax_rows(s, n, scale);
    }
    matmul(
        n,
        d,
        n,
        s,
        (n as isize, 1),
        &qkv[vc..],
        (st, 1),
        out,
        (out_stride as isize, 1),
        Parallelism::None,
    );
}

/// Whether the attention products run in bf16 too (bf16 models on bf16 hardware):
/// `SEMBED_BF16_ATTENTION=on`; off by default, because packing Kᵀ and V per head and rounding the
/// scores cost more than the tiles save at these sequence lengths. Measured on AMX: MiniLM (32-wide
/// heads) 256.8 texts/s with bf16 attention against 303.2 without, in one `sembed bench --peers` run;
/// the Qwen3-0.6B shape (128-wide heads) 0.94 s against 0.88 s for 64 texts in a side check.
pub fn bf16_attention(_head_dim: usize) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        matches!(
            std::env::var("SEMBED_BF16_ATTENTION").as_deref(),
            Ok("on" | "1" | "true")
        )
    })
}

/// Split sequences (in order) into at most `parts` contiguous groups of similar cost; returns the
/// end index of each group.
fn split_by_cost(seqs: &[Seq], parts: usize, sp: &Spec) -> Vec<usize> {
    let per_token = (sp.heads + 2 * sp.kv_heads) * sp.head_dim * sp.hidden
        + sp.heads * sp.head_dim * sp.hidden
        + (if sp.gated { 3 } else { 2 }) * sp.inter * sp.hidden;
    let cost = |n: usize| (n * per_token + 2 * n * n * sp.heads * sp.head_dim) as f64;
    let costs: Vec<f64> = seqs.iter().map(|s| cost(s.len)).collect();
    let total: f64 = costs.iter().sum();
    let parts = parts.min(seqs.len()).max(1);
    let mut ends = Vec::with_capacity(parts);
    let mut acc = 0.0;
    for (idx, c) in costs.iter().enumerate() {
        let before = acc;
        acc += c;
        let target = total * (ends.len() + 1) as f64 / parts as f64;
        // Close the group at whichever side of this sequence lands nearer the target.
        if acc >= target && ends.len() + 1 < parts {
            if target - before < acc - target && idx > ends.last().copied().unwrap_or(0) {
                ends.push(idx);
            } else {
                ends.push(idx + 1);
            }
        }
    }
    ends.push(seqs.len());
    ends.dedup();
    ends.retain(|&e| e > 0);
    ends
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            arch: "test",
            hidden: 384,
            heads: 12,
            kv_heads: 12,
            head_dim: 32,
            inter: 1536,
            pre_norm: false,
            rope_theta: None,
            causal: false,
            gated: false,
            act: Act::GeluErf,
            eps: 1e-12,
            max_positions: 512,
            tasks: 0,
        }
    }

    #[test]
    fn groups_cover_all_sequences_in_order() {
        let lens = [256usize, 200, 120, 100, 90, 40, 30, 3];
        let mut start = 0;
        let seqs: Vec<Seq> = lens
            .iter()
            .map(|&len| {
                let s = Seq {
                    start,
                    len,
                    task: None,
                };
                start += len;
                s
            })
            .collect();
        for parts in 1..=10 {
            let ends = split_by_cost(&seqs, parts, &spec());
            assert_eq!(*ends.last().unwrap(), lens.len());
            assert!(ends.windows(2).all(|w| w[0] < w[1]), "{ends:?}");
            assert!(ends.len() <= parts.min(lens.len()));
        }
        assert_eq!(split_by_cost(&seqs, 2, &spec()).len(), 2);
    }

    #[test]
    fn rope_tables_match_f64_angles() {
        let (hd, n) = (64, 300);
        let mut t = vec![0f32; n * hd];
        rope_tables(10000.0, hd, n, &mut t);
        let (cos, sin) = t.split_at(n * hd / 2);
        for p in [0usize, 1, 17, 299] {
            for i in [0usize, 5, 31] {
                let a = p as f64 / 10000f64.powf(2.0 * i as f64 / hd as f64);
                assert!(
                    (cos[p * 32 + i] as f64 - a.cos()).abs() < 2e-4,
                    "cos {p} {i}"
                );
                assert!(
                    (sin[p * 32 + i] as f64 - a.sin()).abs() < 2e-4,
                    "sin {p} {i}"
                );
            }
        }
    }
}
