//! Projections of the fast path: `y = x · W` with `W` stored `[in, out]` (transposed once at load),
//! in f32 through the `gemm` crate, or in int8 (see [`super::quant`]).

use super::quant::QuantLinear;
use gemm::Parallelism;

pub enum Linear {
    F32 {
        /// `[k, n]` row-major.
        w: Vec<f32>,
        k: usize,
        n: usize,
    },
    Int8(QuantLinear),
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
            Linear::Int8(q) => q.forward(x, m, y, par),
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
            false,
            lhs.as_ptr(),
            lcs,
            lrs,
            rhs.as_ptr(),
            rcs,
            rrs,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}
