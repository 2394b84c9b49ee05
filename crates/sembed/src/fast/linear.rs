//! Projections of the fast path: `y = x · W`, in f32 through the `gemm` crate with `W` stored
//! `[in, out]` (transposed once at load; the PyTorch copy is dropped); in bf16 arithmetic on CPUs
//! with bf16 dot products (AMX, AVX-512 BF16: see [`super::bf16`]); with 16-bit weights widened to
//! f32 elsewhere (bf16 or f16, kept in the checkpoint's `[out, in]` layout and widened a block of
//! output features at a time, so the weights are held once, in 16 bits, and the arithmetic
//! accumulates in f32); or in int8 (see [`super::quant`]).

use super::bf16::PackedBf16;
use super::quant::QuantLinear;
use gemm::Parallelism;
use half::{bf16, f16};
use std::cell::RefCell;

pub enum Linear {
    F32 {
        /// `[k, n]` row-major.
        w: Vec<f32>,
        k: usize,
        n: usize,
    },
    Half(HalfWeights),
    /// bf16 weights packed for the bf16 dot-product kernels (AMX, AVX-512 BF16): bf16 arithmetic
    /// with f32 accumulation.
    Bf16(PackedBf16),
    Int8(QuantLinear),
}

/// 16-bit weights `[n, k]` (PyTorch layout).
pub enum HalfWeights {
    Bf16 { w: Vec<bf16>, k: usize, n: usize },
    F16 { w: Vec<f16>, k: usize, n: usize },
}

/// Widened weights per block: about 1 MiB of f32, so a block stays in L2 while the GEMM uses it.
const HALF_BLOCK_VALUES: usize = 1 << 18;

thread_local! {
    /// Per-thread buffer for widened 16-bit weight blocks.
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Drop this thread's widened-weight buffer.
pub fn release_thread_scratch() {
    WIDE.with(|w| drop(std::mem::take(&mut *w.borrow_mut())));
}

impl HalfWeights {
    fn dims(&self) -> (usize, usize) {
        match self {
            HalfWeights::Bf16 { k, n, .. } | HalfWeights::F16 { k, n, .. } => (*k, *n),
        }
    }

    /// Widen output features `o0..o1` (rows of the `[n, k]` weight) into `dst`.
    fn widen(&self, o0: usize, o1: usize, dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            HalfWeights::Bf16 { w, k, .. } => w[o0 * k..o1 * k].convert_to_f32_slice(dst),
            HalfWeights::F16 { w, k, .. } => w[o0 * k..o1 * k].convert_to_f32_slice(dst),
        }
    }

    fn forward(&self, x: &[f32], m: usize, y: &mut [f32], par: Parallelism) {
        let (k, n) = self.dims();
        let nb = (HALF_BLOCK_VALUES / k.max(1)).clamp(16, n.max(16)) / 16 * 16;
        let mut buf = WIDE.with(|b| std::mem::take(&mut *b.borrow_mut()));
        if buf.len() < nb * k {
            buf.resize(nb * k, 0.0);
        }
        let mut o0 = 0;
        while o0 < n {
            let o1 = (o0 + nb).min(n);
            let wb = &mut buf[..(o1 - o0) * k];
            self.widen(o0, o1, wb);
            // y[:, o0..o1] = x · wbᵀ (wb is [o1 - o0, k]: read it column-major as [k, o1 - o0]).
            matmul(
                m,
                o1 - o0,
                k,
                x,
                (k as isize, 1),
                wb,
                (1, k as isize),
                &mut y[o0..],
                (n as isize, 1),
                par,
            );
            o0 = o1;
        }
        WIDE.with(|b| *b.borrow_mut() = buf);
    }
}

impl Linear {
    /// From a PyTorch-layout weight `[out, in]`.
    pub fn f32_from_torch(w: &[f32], out: usize, inp: usize) -> Self {
        let mut t = vec![0f32; w.len()];
        for o in 0..out {
            for i in 0..inp {
                t[i * out + o] = w[o * inp + i];
            }
        }
        Linear::F32 {
            w: t,
            k: inp,
            n: out,
        }
    }

    /// `y[m, n] = x[m, k] · W` (y is overwritten).
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32], par: Parallelism) {
        match self {
            Linear::F32 { w, k, n } => {
                debug_assert_eq!(x.len(), m * k);
                debug_assert_eq!(y.len(), m * n);
                matmul(
                    m,
                    *n,
                    *k,
                    x,
                    (*k as isize, 1),
                    w,
                    (*n as isize, 1),
                    y,
                    (*n as isize, 1),
                    par,
                );
            }
            Linear::Half(h) => h.forward(x, m, y, par),
            Linear::Bf16(p) => p.forward(x, m, y, par),
            Linear::Int8(q) => q.forward(x, m, y, par),
        }
    }

    /// Bytes the weights take in memory.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Linear::F32 { w, .. } => w.len() * 4,
            Linear::Half(HalfWeights::Bf16 { w, .. }) => w.len() * 2,
            Linear::Half(HalfWeights::F16 { w, .. }) => w.len() * 2,
            Linear::Bf16(p) => p.weight_bytes(),
            Linear::Int8(q) => q.weight_bytes(),
        }
    }
}

/// `dst[m, n] = lhs[m, k] · rhs[k, n]` with (row stride, column stride) for each operand.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lrs, lcs): (isize, isize),
    rhs: &[f32],
    (rrs, rcs): (isize, isize),
    dst: &mut [f32],
    (drs, dcs): (isize, isize),
    par: Parallelism,
) {
    matmul_acc(
        m,
        n,
        k,
        lhs,
        (lrs, lcs),
        rhs,
        (rrs, rcs),
        dst,
        (drs, dcs),
        false,
        par,
    )
}

/// [`matmul`], adding to `dst` instead of overwriting it when `accumulate` is set.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn matmul_acc(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lrs, lcs): (isize, isize),
    rhs: &[f32],
    (rrs, rcs): (isize, isize),
    dst: &mut [f32],
    (drs, dcs): (isize, isize),
    accumulate: bool,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let span = |rs: isize, cs: isize, r: usize, c: usize| {
        (r.saturating_sub(1)) as isize * rs + (c.saturating_sub(1)) as isize * cs
    };
    assert!(span(lrs, lcs, m, k) < lhs.len() as isize || k == 0);
    assert!(span(rrs, rcs, k, n) < rhs.len() as isize || k == 0);
    assert!(span(drs, dcs, m, n) < dst.len() as isize);
    // SAFETY: every element addressed by the strides lies inside its slice (checked above: strides
    // are non-negative and the last element is in bounds); dst does not alias the inputs (&mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dcs,
            drs,
            accumulate,
            lhs.as_ptr(),
            lcs,
            lrs,
            rhs.as_ptr(),
            rcs,
            rrs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// GFLOP/s of this engine's f32 GEMM on `[m, k] · [k, n]` with every thread (best of 3): the peak the
/// bench compares whole models against.
pub fn peak_gflops(m: usize, k: usize, n: usize) -> f64 {
    let x = vec![0.5f32; m * k];
    let w = vec![0.25f32; k * n];
    let mut y = vec![0f32; m * n];
    let threads = rayon::current_num_threads().max(1);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        // Each thread its own rows with single-threaded GEMMs, as the engine runs a batch.
        let rows = m.div_ceil(threads);
        rayon::scope(|s| {
            for (xc, yc) in x.chunks(rows * k).zip(y.chunks_mut(rows * n)) {
                let w = &w;
                s.spawn(move |_| {
                    let r = xc.len() / k;
                    matmul(
                        r,
                        n,
                        k,
                        xc,
                        (k as isize, 1),
                        w,
                        (n as isize, 1),
                        yc,
                        (n as isize, 1),
                        Parallelism::None,
                    )
                });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * k * n) as f64 / best / 1e9
}
