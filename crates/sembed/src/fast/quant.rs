//! Int8 projections: weights quantised once per output column (symmetric, i8), activations quantised
//! per row at run time (asymmetric, u8: "dynamic quantisation", as PyTorch's `quantize_dynamic` and
//! ONNX Runtime's `MatMulInteger` do it, but per row rather than per tensor, which keeps outlier
//! tokens from flattening the others).
//!
//! `y[m, n] = sx_m · sw_n · (Σ_k qx[m, k] · qw[k, n] − zx_m · Σ_k qw[k, n])`
//!
//! The integer dot products run on AVX-512 VNNI (`vpdpbusd`: 64 u8×i8 products per instruction)
//! when the CPU has it; elsewhere a portable loop gives the same integers, slowly. No crate offers
//! an int8 GEMM with this layout that we could depend on without pulling in a whole inference
//! runtime, hence the hand-written kernel.

use gemm::Parallelism;

thread_local! {
    /// Per-thread quantised activations and their (scale, zero point), reused between calls.
    static QSCRATCH: std::cell::RefCell<(Vec<u8>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Drop this thread's quantised-activation buffers.
pub fn release_thread_scratch() {
    QSCRATCH.with(|s| drop(std::mem::take(&mut *s.borrow_mut())));
}

/// Columns per packed panel (4 AVX-512 registers of 16 i32 lanes).
const NB: usize = 64;
/// Rows per micro-kernel call.
const MR: usize = 6;

pub struct QuantLinear {
    pub k: usize,
    pub n: usize,
    /// `k` rounded up to a multiple of 4.
    kp: usize,
    /// `[n / NB][kp / 4][NB][4]` i8 weights (zero beyond `k` and `n`).
    packed: Vec<i8>,
    /// Per output column: scale and `Σ_k qw[k, n]`, both padded to a multiple of NB.
    scale: Vec<f32>,
    colsum: Vec<f32>,
}

impl QuantLinear {
    /// Quantise a PyTorch-layout weight `[out, in]`.
    pub fn from_torch(w: &[f32], out: usize, inp: usize) -> Self {
        let (k, n) = (inp, out);
        let kp = k.div_ceil(4) * 4;
        let np = n.div_ceil(NB) * NB;
        let mut scale = vec![0f32; np];
        let mut colsum = vec![0f32; np];
        let mut packed = vec![0i8; np * kp];
        for o in 0..n {
            let row = &w[o * inp..(o + 1) * inp];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            scale[o] = s;
            let (blk, c) = (o / NB, o % NB);
            let mut sum = 0i32;
            for (i, v) in row.iter().enumerate() {
                let q = (v / s).round().clamp(-127.0, 127.0) as i8;
                sum += q as i32;
                packed[blk * kp * NB + (i / 4) * NB * 4 + c * 4 + i % 4] = q;
            }
            colsum[o] = sum as f32;
        }
        QuantLinear {
            k,
            n,
            kp,
            packed,
            scale,
            colsum,
        }
    }

    /// Bytes of the packed weights and their per-column scales and sums.
    pub fn weight_bytes(&self) -> usize {
        self.packed.len() + 4 * (self.scale.len() + self.colsum.len())
    }

    /// `y[m, n] = x[m, k] · W` (approximately; y is overwritten).
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32], par: Parallelism) {
        debug_assert_eq!(x.len(), m * self.k);
        debug_assert_eq!(y.len(), m * self.n);
        let threads = match par {
            Parallelism::None => 1,
            Parallelism::Rayon(t) => t.max(1),
        };
        if threads > 1 && m >= 2 * MR {
            let rows = m.div_ceil(threads).div_ceil(MR) * MR;
            rayon::scope(|s| {
                for (xc, yc) in x.chunks(rows * self.k).zip(y.chunks_mut(rows * self.n)) {
                    s.spawn(move |_| self.forward_rows(xc, yc));
                }
            });
        } else {
            self.forward_rows(x, y);
        }
    }

    fn forward_rows(&self, x: &[f32], y: &mut [f32]) {
        let m = x.len() / self.k;
        let (mut qx_buf, mut sz) = QSCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        // Only ever grown: every byte used is written by `quantize_rows` first.
        if qx_buf.len() < m * self.kp {
            qx_buf.resize(m * self.kp, 0);
        }
        if sz.len() < 2 * m {
            sz.resize(2 * m, 0.0);
        }
        let qx = &mut qx_buf[..m * self.kp];
        let (sx, zx) = sz[..2 * m].split_at_mut(m);
        quantize_rows(x, self.k, self.kp, qx, sx, zx);
        #[cfg(target_arch = "x86_64")]
        let done = if has_vnni() {
            // SAFETY: the CPU has the features the kernel is compiled for; buffers are sized above.
            unsafe { self.gemm_vnni(qx, sx, zx, m, y) };
            true
        } else {
            false
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = false;
        if !done {
            self.gemm_portable(qx, sx, zx, m, y);
        }
        QSCRATCH.with(|s| *s.borrow_mut() = (qx_buf, sz));
    }

    fn gemm_portable(&self, qx: &[u8], sx: &[f32], zx: &[f32], m: usize, y: &mut [f32]) {
        let k4s = self.kp / 4;
        for r in 0..m {
            let xr = &qx[r * self.kp..(r + 1) * self.kp];
            for o in 0..self.n {
                let panel = &self.packed[(o / NB) * self.kp * NB..];
                let c = o % NB;
                let mut acc = 0i32;
                for k4 in 0..k4s {
                    for kk in 0..4 {
                        acc += xr[k4 * 4 + kk] as i32 * panel[k4 * NB * 4 + c * 4 + kk] as i32;
                    }
                }
                y[r * self.n + o] = (acc as f32 - zx[r] * self.colsum[o]) * (sx[r] * self.scale[o]);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn gemm_vnni(&self, qx: &[u8], sx: &[f32], zx: &[f32], m: usize, y: &mut [f32]) {
        // Rows in blocks that keep their quantised activations in L2; the panel of one column block
        // (kp × 64 bytes) stays in L1/L2 while the block's rows stream past it.
        const ROW_BLOCK: usize = 96;
        for r0 in (0..m).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(m);
            for blk in 0..self.n.div_ceil(NB) {
                let mut r = r0;
                while r < r1 {
                    let rows = (r1 - r).min(MR);
                    // SAFETY: rows r..r+rows exist in qx/y; the panel blk exists.
                    unsafe {
                        match rows {
                            6 => self.micro::<6>(qx, sx, zx, r, blk, y),
                            5 => self.micro::<5>(qx, sx, zx, r, blk, y),
                            4 => self.micro::<4>(qx, sx, zx, r, blk, y),
                            3 => self.micro::<3>(qx, sx, zx, r, blk, y),
                            2 => self.micro::<2>(qx, sx, zx, r, blk, y),
                            _ => self.micro::<1>(qx, sx, zx, r, blk, y),
                        }
                    }
                    r += rows;
                }
            }
        }
    }

    /// `R` rows × 64 columns: integer dot products over all of k, then the float epilogue.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn micro<const R: usize>(
        &self,
        qx: &[u8],
        sx: &[f32],
        zx: &[f32],
        r0: usize,
        blk: usize,
        y: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let kp = self.kp;
        let panel = self.packed.as_ptr().add(blk * kp * NB);
        let xs = qx.as_ptr().add(r0 * kp);
        let mut acc = [[_mm512_setzero_si512(); 4]; R];
        for k4 in 0..kp / 4 {
            let wp = panel.add(k4 * NB * 4);
            let w0 = _mm512_loadu_si512(wp as *const _);
            let w1 = _mm512_loadu_si512(wp.add(64) as *const _);
            let w2 = _mm512_loadu_si512(wp.add(128) as *const _);
            let w3 = _mm512_loadu_si512(wp.add(192) as *const _);
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_epi32(std::ptr::read_unaligned(
                    xs.add(r * kp + k4 * 4) as *const i32
                ));
                a[0] = _mm512_dpbusd_epi32(a[0], xv, w0);
                a[1] = _mm512_dpbusd_epi32(a[1], xv, w1);
                a[2] = _mm512_dpbusd_epi32(a[2], xv, w2);
                a[3] = _mm512_dpbusd_epi32(a[3], xv, w3);
            }
        }
        let c0 = blk * NB;
        let cols = (self.n - c0).min(NB);
        for (r, a) in acc.iter().enumerate() {
            let row = r0 + r;
            let s = _mm512_set1_ps(sx[row]);
            let z = _mm512_set1_ps(zx[row]);
            let dst = &mut y[row * self.n + c0..row * self.n + c0 + cols];
            for (v, av) in a.iter().enumerate() {
                let ws = _mm512_mul_ps(s, _mm512_loadu_ps(self.scale.as_ptr().add(c0 + v * 16)));
                let cs = _mm512_loadu_ps(self.colsum.as_ptr().add(c0 + v * 16));
                let accf = _mm512_cvtepi32_ps(*av);
                let out = _mm512_mul_ps(_mm512_sub_ps(accf, _mm512_mul_ps(z, cs)), ws);
                // Store the lanes that exist (all 16 but in the last block of an odd width).
                let lanes = cols.saturating_sub(v * 16).min(16);
                if lanes == 0 {
                    break;
                }
                let mask: __mmask16 = ((1u32 << lanes) - 1) as u16;
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(v * 16), mask, out);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// Whether int8 projections run on the fast integer kernel on this CPU.
pub fn int8_accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

super::kernels::multiversion! {
    /// Per row: u8 codes with scale and zero point such that `x ≈ s · (q − z)`; the range always
    /// contains 0 so that exact zeros stay exact. Columns `k..kp` get the zero point. (Written with
    /// lane arrays and ties-to-even rounding so that it vectorises: `f32::round` does not.)
    fn quantize_rows(x: &[f32], k: usize, kp: usize, qx: &mut [u8], sx: &mut [f32], zx: &mut [f32]) {
        const L: usize = 16;
        for (r, row) in x.chunks_exact(k).enumerate() {
            let (mut lo, mut hi) = ([0f32; L], [0f32; L]);
            let mut chunks = row.chunks_exact(L);
            for c in &mut chunks {
                for i in 0..L {
                    lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
                    hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
                }
            }
            let (mut lo, mut hi) = (
                lo.iter().fold(0f32, |a, &b| a.min(b)),
                hi.iter().fold(0f32, |a, &b| a.max(b)),
            );
            for &v in chunks.remainder() {
                lo = lo.min(v);
                hi = hi.max(v);
            }
            let s = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
            let z = (-lo / s).round_ties_even().clamp(0.0, 255.0);
            let inv = 1.0 / s;
            let q = &mut qx[r * kp..(r + 1) * kp];
            for (d, &v) in q.iter_mut().zip(row) {
                let y = (v * inv + z).round_ties_even();
                // Clamp to [0, 255] by selects (NaN → 0), which vectorise where `clamp` does not.
                let y = if y >= 0.0 {
                    if y <= 255.0 {
                        y
                    } else {
                        255.0
                    }
                } else {
                    0.0
                };
                // SAFETY: y is finite and within [0, 255].
                *d = unsafe { y.to_int_unchecked::<i32>() } as u8;
            }
            for d in &mut q[k..] {
                *d = z as u8;
            }
            sx[r] = s;
            zx[r] = z;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn int8_matmul_is_close_to_f32_and_kernels_agree() {
        // Odd sizes: k not a multiple of 4, n not a multiple of 64, m not a multiple of 6.
        let (m, k, n) = (23, 70, 130);
        let x = data(m * k, 1);
        let w = data(n * k, 2);
        let q = QuantLinear::from_torch(&w, n, k);
        let mut y = vec![0f32; m * n];
        q.forward(&x, m, &mut y, Parallelism::None);
        let mut y2 = vec![0f32; m * n];
        q.forward(&x, m, &mut y2, Parallelism::Rayon(2));
        let mut qx = vec![0u8; m * q.kp];
        let (mut sx, mut zx) = (vec![0f32; m], vec![0f32; m]);
        quantize_rows(&x, k, q.kp, &mut qx, &mut sx, &mut zx);
        let mut yp = vec![0f32; m * n];
        q.gemm_portable(&qx, &sx, &zx, m, &mut yp);
        for r in 0..m {
            for o in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * w[o * k + i]).sum();
                let got = y[r * n + o];
                // Quantisation error bound: ~k · (|x| step/2 · |w| + |x| · |w| step/2).
                assert!((got - exact).abs() < 0.15, "{r},{o}: {got} vs {exact}");
                assert!((got - yp[r * n + o]).abs() < 1e-4, "kernels disagree");
                assert_eq!(got, y2[r * n + o], "threaded result differs");
            }
        }
    }
}
