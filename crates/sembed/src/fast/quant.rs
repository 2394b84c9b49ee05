//! Int8 projections: weights quantised once per output column (symmetric, i8), activations quantised
//! per row at run time (asymmetric, u8: "dynamic quantisation", as PyTorch's `quantize_dynamic` and
//! ONNX Runtime's `MatMulInteger` do it, but per row rather than per tensor, which keeps outlier
//! tokens from flattening the others).
//!
//! `y[m, n] = sx_m · sw_n · (Σ_k qx[m, k] · qw[k, n] − zx_m · Σ_k qw[k, n])`
//!
//! Two formats, chosen by the kernel set in force ([`super::cpu::active`]) when a model loads:
//! - **8-bit** (AVX-512 VNNI and portable): activation codes `q ∈ [0, 254]`, weights `[−127, 127]`.
//! - **7-bit** (AVX2): activation codes `q ∈ [0, 127]`, weights `[−63, 63]`. AVX2 has no u8×i8 dot
//!   product into i32; `vpmaddubsw` multiplies u8 by i8 and adds pairs into i16 *with saturation*.
//!   With 7-bit codes a pair is at most `2 · 127 · 63 = 16002`, so two pairs still fit in i16
//!   (32004 < 32767): the kernel adds two `vpmaddubsw` results (8 products) with `vpaddw`, then
//!   widens with one `vpmaddwd` by ones. Exact, and 3 multiply-port instructions per 64 products
//!   instead of 4 (the multiply ports bound AVX2 int8 throughput). The cost is one bit on each
//!   side; `sembed bench` reports its closeness to f32 per kernel set.
//!
//! Every kernel computes the same integers for the same quantised inputs, and one epilogue turns
//! them into floats, so all kernels agree bit for bit on a given [`QuantLinear`] (tested).
//!
//! **Outlier features** (LLM.int8()-style decomposition, per token): a row whose largest |x| exceeds
//! [`OUTLIER_RATIO`] × its RMS has its few largest entries (at most [`MAX_OUTLIERS`]) taken out
//! before quantisation, so they no longer stretch the row's int8 range, and added back exactly in
//! f32 against the dequantised weight rows. Decided per row, so a text's vector never depends on
//! its batch-mates. On by default for the decoder architectures (Qwen2/Qwen3), off for the encoders
//! (it costs ~10% of int8 speed on MiniLM and did not change its retrieval quality);
//! `SEMBED_INT8_OUTLIERS=on|off` overrides ([`outliers_enabled`]).
//!
//! No crate offers an int8 GEMM with this layout that we could depend on without pulling in a whole
//! inference runtime, hence the hand-written kernels.

use super::cpu::Kernels;
use gemm::Parallelism;

thread_local! {
    /// Per-thread quantised activations (codes, then the AVX2 kernel's `|q − 127|` and `q − 127`)
    /// and their (scale, zero point), reused between calls.
    static QSCRATCH: std::cell::RefCell<(Vec<u8>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// A row entry is an outlier when its |x| exceeds this many times the row's RMS (Gaussian rows
/// never reach 6σ at these widths; LLM.int8() uses an absolute 6 on unit-scale hidden states).
pub const OUTLIER_RATIO: f32 = 6.0;
/// At most this many outliers per row are taken out (the largest).
pub const MAX_OUTLIERS: usize = 8;

/// Whether int8 projections decompose outlier features: `default` (the loader's choice per
/// architecture) unless `SEMBED_INT8_OUTLIERS=on|off` says otherwise.
pub fn outliers_enabled(default: bool) -> bool {
    match std::env::var("SEMBED_INT8_OUTLIERS").as_deref() {
        Ok("on" | "1" | "true") => true,
        Ok("off" | "0" | "false") => false,
        _ => default,
    }
}

/// An outlier entry: `(row, column, x)`.
type Outlier = (u32, u32, f32);

thread_local! {
    /// Per-thread copy of the rows with their outliers zeroed, and the outliers.
    static OUTLIERS: std::cell::RefCell<(Vec<f32>, Vec<Outlier>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The quantisation ranges of one format (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// Largest activation code (codes are `0..=act_max`).
    pub act_max: u8,
    /// Largest weight magnitude (weights are `−w_max..=w_max`).
    pub w_max: i8,
}

impl Format {
    pub const BITS8: Format = Format {
        act_max: 254,
        w_max: 127,
    };
    pub const BITS7: Format = Format {
        act_max: 127,
        w_max: 63,
    };

    /// The format a kernel set runs.
    pub fn for_kernels(k: Kernels) -> Format {
        match k {
            Kernels::Avx2 => Format::BITS7,
            Kernels::Amx | Kernels::Avx512Bf16 | Kernels::Avx512 | Kernels::Portable => {
                Format::BITS8
            }
        }
    }

    /// Whether `k` computes exactly on this format (AVX2 only on 7-bit codes).
    fn runs_on(self, k: Kernels) -> bool {
        k != Kernels::Avx2 || self == Format::BITS7
    }

    pub fn name(self) -> &'static str {
        if self == Format::BITS7 {
            "7-bit"
        } else {
            "8-bit"
        }
    }
}

/// The int8 kernel in force and its code width, e.g. `amx (tdpbusd), 8-bit codes`.
pub fn int8_description() -> String {
    let k = super::cpu::active();
    let how = match k {
        Kernels::Amx => "amx (tdpbusd tiles)",
        Kernels::Avx512Bf16 => "avx512-bf16 set: avx512-vnni (vpdpbusd)",
        Kernels::Avx512 => "avx512-vnni (vpdpbusd)",
        Kernels::Avx2 => "avx2 (vpmaddubsw)",
        Kernels::Portable => "portable",
    };
    format!("{how}, {} codes", Format::for_kernels(k).name())
}

/// Drop this thread's quantised-activation buffers.
pub fn release_thread_scratch() {
    QSCRATCH.with(|s| drop(std::mem::take(&mut *s.borrow_mut())));
}

/// Columns per packed panel (4 AVX-512 registers of 16 i32 lanes).
const NB: usize = 64;
/// Inputs per AMX tile step (a tile row of 64 codes); `kp` is a multiple of it for every kernel.
const KQ: usize = 64;
/// Rows per AMX block (two row tiles).
const MQ: usize = 32;
/// Rows per micro-kernel call (VNNI).
const MR: usize = 6;
/// Rows per micro-kernel call (AVX2: 4 rows × 16 columns keep 8 accumulators in 16 registers).
const MR2: usize = 4;

pub struct QuantLinear {
    pub k: usize,
    pub n: usize,
    /// `k` rounded up to a multiple of 64 (one AMX tile row of codes).
    kp: usize,
    /// `[n / NB][kp / 4][NB][4]` i8 weights (zero beyond `k` and `n`): the VNNI panels, whose
    /// 16-column windows are also the AMX B tiles.
    packed: Vec<i8>,
    /// Per output column: scale and `Σ_k qw[k, n]`, both padded to a multiple of NB.
    scale: Vec<f32>,
    colsum: Vec<f32>,
    format: Format,
    /// Decompose outlier features (see the module doc).
    outliers: bool,
}

impl QuantLinear {
    /// Quantise a PyTorch-layout weight `[out, in]` in the format of the kernel set in force.
    pub fn from_torch(w: &[f32], out: usize, inp: usize) -> Self {
        Self::with_format(w, out, inp, Format::for_kernels(super::cpu::active()))
    }

    /// The format the weights were quantised in.
    pub fn format(&self) -> Format {
        self.format
    }

    pub fn with_format(w: &[f32], out: usize, inp: usize, format: Format) -> Self {
        let wmax = format.w_max as f32;
        let (k, n) = (inp, out);
        let kp = k.div_ceil(KQ) * KQ;
        let np = n.div_ceil(NB) * NB;
        let mut scale = vec![0f32; np];
        let mut colsum = vec![0f32; np];
        let mut packed = vec![0i8; np * kp];
        for o in 0..n {
            let row = &w[o * inp..(o + 1) * inp];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if amax > 0.0 { amax / wmax } else { 1.0 };
            scale[o] = s;
            let (blk, c) = (o / NB, o % NB);
            let mut sum = 0i32;
            for (i, v) in row.iter().enumerate() {
                let q = (v / s).round().clamp(-wmax, wmax) as i8;
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
            format,
            outliers: false,
        }
    }

    /// Turn the outlier-feature decomposition on or off.
    pub fn with_outliers(mut self, on: bool) -> Self {
        self.outliers = on;
        self
    }

    /// Bytes of the packed weights and their per-column scales and sums.
    pub fn weight_bytes(&self) -> usize {
        self.packed.len() + 4 * (self.scale.len() + self.colsum.len())
    }

    /// `y[m, n] = x[m, k] · W` (approximately; y is overwritten).
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32], par: Parallelism) {
        self.forward_with_kernels(super::cpu::active(), x, m, y, par)
    }

    /// [`Self::forward`] with the given kernel set, which the CPU must run and which must compute
    /// on these weights' format (for tests and benches).
    pub fn forward_with_kernels(
        &self,
        kernels: Kernels,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        par: Parallelism,
    ) {
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
                    s.spawn(move |_| self.forward_rows(kernels, xc, yc));
                }
            });
        } else {
            self.forward_rows(kernels, x, y);
        }
    }

    fn forward_rows(&self, kernels: Kernels, x: &[f32], y: &mut [f32]) {
        let ratio = if self.outliers {
            OUTLIER_RATIO
        } else {
            f32::INFINITY
        };
        self.forward_rows_with(kernels, ratio, x, y)
    }

    /// [`Self::forward`] on one thread with the given kernels (which the CPU must support) and
    /// outlier ratio (infinite: no decomposition).
    fn forward_rows_with(&self, kernels: Kernels, ratio: f32, x: &[f32], y: &mut [f32]) {
        if !ratio.is_finite() {
            return self.int8_rows(kernels, x, y);
        }
        let (mut kept, mut outliers) = OUTLIERS.with(|s| std::mem::take(&mut *s.borrow_mut()));
        outliers.clear();
        find_outliers(x, self.k, ratio, &mut outliers);
        let src = if outliers.is_empty() {
            x
        } else {
            kept.clear();
            kept.extend_from_slice(x);
            for &(r, c, _) in &outliers {
                kept[r as usize * self.k + c as usize] = 0.0;
            }
            &kept[..]
        };
        self.int8_rows(kernels, src, y);
        if !outliers.is_empty() {
            self.add_outliers(&mut outliers, y);
        }
        OUTLIERS.with(|s| *s.borrow_mut() = (kept, outliers));
    }

    /// `y[r, :] += x · W[c, :]` for each outlier `(r, c, x)`, with the dequantised weight row `c`:
    /// the outliers are grouped by column (real models' outliers sit on a few channels), each
    /// column's row dequantised once, then one vectorised axpy per outlier.
    fn add_outliers(&self, outliers: &mut [Outlier], y: &mut [f32]) {
        outliers.sort_unstable_by_key(|o| (o.1, o.0));
        let mut wrow = vec![0f32; self.n];
        let mut i = 0;
        while i < outliers.len() {
            let c = outliers[i].1 as usize;
            let (q4, qi) = (c / 4, c % 4);
            for (o, w) in wrow.iter_mut().enumerate() {
                let q = self.packed[(o / NB) * self.kp * NB + q4 * NB * 4 + (o % NB) * 4 + qi];
                *w = q as f32 * self.scale[o];
            }
            while i < outliers.len() && outliers[i].1 as usize == c {
                let (r, v) = (outliers[i].0 as usize, outliers[i].2);
                super::kernels::axpy(&mut y[r * self.n..(r + 1) * self.n], v, &wrow);
                i += 1;
            }
        }
    }

    /// The int8 product of `x` (no outliers taken out).
    fn int8_rows(&self, kernels: Kernels, x: &[f32], y: &mut [f32]) {
        assert!(
            kernels.supported(),
            "{kernels} kernels on a CPU without them"
        );
        assert!(
            self.format.runs_on(kernels),
            "{kernels} kernels on {} weights",
            self.format.name()
        );
        let m = x.len() / self.k;
        let (mut qx_buf, mut sz) = QSCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        // Only ever grown: every byte used is written by `quantize_rows` first (AMX also reads
        // the rows up to the next multiple of 32, whose results it discards).
        let rows_p = m.div_ceil(MQ) * MQ;
        if qx_buf.len() < rows_p * self.kp {
            qx_buf.resize(rows_p * self.kp, 0);
        }
        if sz.len() < 2 * m {
            sz.resize(2 * m, 0.0);
        }
        let (qx, _) = qx_buf.split_at_mut(m * self.kp);
        let (sx, zx) = sz[..2 * m].split_at_mut(m);
        quantize_rows(
            kernels,
            x,
            self.k,
            self.kp,
            self.format.act_max as f32,
            qx,
            sx,
            zx,
        );
        match kernels {
            // SAFETY (both): the CPU has the features the kernel is compiled for and the weights
            // are in a format it computes exactly (asserted above); buffers are sized above.
            #[cfg(target_arch = "x86_64")]
            Kernels::Amx => unsafe { self.gemm_amx(&qx_buf[..rows_p * self.kp], sx, zx, m, y) },
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 | Kernels::Avx512Bf16 => unsafe { self.gemm_vnni(qx, sx, zx, m, y) },
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => unsafe { self.gemm_avx2(qx, sx, zx, m, y) },
            _ => self.gemm_portable(qx, sx, zx, m, y),
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

    /// AMX (`tdpbusd`): blocks of 32 rows × 32 columns in four i32 accumulator tiles (tmm0-3), two
    /// A tiles of codes (tmm4-5, 16 rows × 64 inputs) and two B tiles (tmm6-7, 16 input quads × 16
    /// columns, read in place from the VNNI panels with their 256-byte row stride) per step of 64
    /// inputs; then the VNNI kernel's epilogue, op for op. `qx` has rows up to a multiple of 32.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn gemm_amx(&self, qx: &[u8], sx: &[f32], zx: &[f32], m: usize, y: &mut [f32]) {
        use super::amx;
        use std::arch::x86_64::*;
        let kp = self.kp;
        let mp = m.div_ceil(MQ) * MQ;
        debug_assert!(qx.len() >= mp * kp);
        let cfg = amx::TileConfig::new([(16, 64); 8]);
        let mut acc = [0i32; MQ * 32];
        // Column super-blocks whose panels stay in L2 while every row block passes.
        let super_cols = ((1usize << 20) / kp).max(NB) / NB * NB;
        // SAFETY: the caller checked the CPU has AMX and the process holds the tile permission;
        // tile loads read inside qx (rows < mp, inputs < kp) and the packed panels (32 columns of
        // a panel, quads < kp / 4); stores go to `acc`.
        unsafe {
            cfg.load();
            let (a_stride, b_stride) = (kp, NB * 4);
            for s0 in (0..self.n).step_by(super_cols) {
                let s1 = (s0 + super_cols).min(self.n);
                for r0 in (0..mp).step_by(MQ) {
                    for c in (s0..s1).step_by(32) {
                        amx::zero_acc();
                        let bp = self.packed.as_ptr().add((c / NB) * kp * NB + (c % NB) * 4);
                        let ap = qx.as_ptr().add(r0 * kp);
                        for kb in 0..kp / KQ {
                            let a0 = ap.add(kb * KQ);
                            let b0 = bp.add(kb * (KQ / 4) * NB * 4);
                            amx::step_u8i8(
                                a0,
                                a0.add(16 * kp),
                                a_stride,
                                b0 as *const u8,
                                b0.add(64) as *const u8,
                                b_stride,
                            );
                        }
                        amx::store_acc(acc.as_mut_ptr() as *mut u8, 32 * 4);
                        // The epilogue of `micro`, on the rows and columns that exist.
                        let cols = (self.n - c).min(32);
                        for r in 0..(m - r0.min(m)).min(MQ) {
                            let row = r0 + r;
                            let s = _mm512_set1_ps(sx[row]);
                            let z = _mm512_set1_ps(zx[row]);
                            let dst = y.as_mut_ptr().add(row * self.n + c);
                            for v in 0..2 {
                                let lanes = cols.saturating_sub(v * 16).min(16);
                                if lanes == 0 {
                                    break;
                                }
                                let cc = c + v * 16;
                                let ws =
                                    _mm512_mul_ps(s, _mm512_loadu_ps(self.scale.as_ptr().add(cc)));
                                let cs = _mm512_loadu_ps(self.colsum.as_ptr().add(cc));
                                let accf = _mm512_cvtepi32_ps(_mm512_loadu_si512(
                                    acc.as_ptr().add(r * 32 + v * 16) as *const _,
                                ));
                                let out =
                                    _mm512_mul_ps(_mm512_sub_ps(accf, _mm512_mul_ps(z, cs)), ws);
                                let mask: __mmask16 = ((1u32 << lanes) - 1) as u16;
                                _mm512_mask_storeu_ps(dst.add(v * 16), mask, out);
                            }
                        }
                    }
                }
            }
            amx::release();
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemm_avx2(&self, qx: &[u8], sx: &[f32], zx: &[f32], m: usize, y: &mut [f32]) {
        // As the VNNI kernel, with 16-column strips of each 64-column panel.
        const ROW_BLOCK: usize = 96;
        for r0 in (0..m).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(m);
            for blk in 0..self.n.div_ceil(NB) {
                for strip in 0..NB / 16 {
                    if blk * NB + strip * 16 >= self.n {
                        break;
                    }
                    let mut r = r0;
                    while r < r1 {
                        let rows = (r1 - r).min(MR2);
                        // SAFETY: rows r..r+rows exist in qx/y; the panel blk exists.
                        unsafe {
                            match rows {
                                4 => self.micro_avx2::<4>(qx, sx, zx, r, blk, strip, y),
                                3 => self.micro_avx2::<3>(qx, sx, zx, r, blk, strip, y),
                                2 => self.micro_avx2::<2>(qx, sx, zx, r, blk, strip, y),
                                _ => self.micro_avx2::<1>(qx, sx, zx, r, blk, strip, y),
                            }
                        }
                        r += rows;
                    }
                }
            }
        }
    }

    /// `R` rows × 16 columns (strip `strip` of panel `blk`) on 7-bit codes: per pair of k-quads,
    /// two `vpmaddubsw` added in i16 (≤ 32004, exact), one `vpmaddwd` by ones into i32; then the
    /// float epilogue of the VNNI kernel, op for op.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro_avx2<const R: usize>(
        &self,
        qx: &[u8],
        sx: &[f32],
        zx: &[f32],
        r0: usize,
        blk: usize,
        strip: usize,
        y: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let kp = self.kp;
        let k4s = kp / 4;
        let panel = self.packed.as_ptr().add(blk * kp * NB + strip * 64);
        let xs = qx.as_ptr().add(r0 * kp);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        let bcast = |r: usize, k4: usize| {
            _mm256_set1_epi32(std::ptr::read_unaligned(
                xs.add(r * kp + k4 * 4) as *const i32
            ))
        };
        let mut k4 = 0;
        while k4 + 2 <= k4s {
            let wa = panel.add(k4 * NB * 4);
            let wb = wa.add(NB * 4);
            let (wa0, wa1) = (
                _mm256_loadu_si256(wa as *const __m256i),
                _mm256_loadu_si256(wa.add(32) as *const __m256i),
            );
            let (wb0, wb1) = (
                _mm256_loadu_si256(wb as *const __m256i),
                _mm256_loadu_si256(wb.add(32) as *const __m256i),
            );
            for (r, a) in acc.iter_mut().enumerate() {
                let (xa, xb) = (bcast(r, k4), bcast(r, k4 + 1));
                let p0 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(xa, wa0), _mm256_maddubs_epi16(xb, wb0));
                let p1 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(xa, wa1), _mm256_maddubs_epi16(xb, wb1));
                a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(p0, ones));
                a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(p1, ones));
            }
            k4 += 2;
        }
        if k4 < k4s {
            let wa = panel.add(k4 * NB * 4);
            let wa0 = _mm256_loadu_si256(wa as *const __m256i);
            let wa1 = _mm256_loadu_si256(wa.add(32) as *const __m256i);
            for (r, a) in acc.iter_mut().enumerate() {
                let xa = bcast(r, k4);
                a[0] =
                    _mm256_add_epi32(a[0], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, wa0), ones));
                a[1] =
                    _mm256_add_epi32(a[1], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, wa1), ones));
            }
        }
        let c0 = blk * NB + strip * 16;
        let cols = (self.n - c0).min(16);
        for (r, a) in acc.iter().enumerate() {
            let row = r0 + r;
            let s = _mm256_set1_ps(sx[row]);
            let z = _mm256_set1_ps(zx[row]);
            let dst = y.as_mut_ptr().add(row * self.n + c0);
            for (v, av) in a.iter().enumerate() {
                let lanes = cols.saturating_sub(v * 8).min(8);
                if lanes == 0 {
                    break;
                }
                let c = c0 + v * 8;
                let ws = _mm256_mul_ps(s, _mm256_loadu_ps(self.scale.as_ptr().add(c)));
                let cs = _mm256_loadu_ps(self.colsum.as_ptr().add(c));
                let out = _mm256_mul_ps(
                    _mm256_sub_ps(_mm256_cvtepi32_ps(*av), _mm256_mul_ps(z, cs)),
                    ws,
                );
                if lanes == 8 {
                    _mm256_storeu_ps(dst.add(v * 8), out);
                } else {
                    let mut tmp = [0f32; 8];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), out);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst.add(v * 8), lanes);
                }
            }
        }
    }
}

super::kernels::multiversion! {
    /// The outliers of each row (see the module doc), appended as `(row, col, x)`: entries above
    /// `ratio` × the row's RMS, the largest [`MAX_OUTLIERS`] of them. The same on every kernel set
    /// (one function, fixed summation order).
    fn find_outliers(x: &[f32], k: usize, ratio: f32, out: &mut Vec<Outlier>) {
        for (r, row) in x.chunks_exact(k).enumerate() {
            let (absmax, sumsq) = absmax_sumsq(row);
            let limit = ratio * (sumsq / k as f32).sqrt();
            if absmax <= limit {
                continue;
            }
            let start = out.len();
            // 16 at a time: a chunk's max |x| (vectorised) first, the chunk's entries only when above.
            for (i, chunk) in row.chunks(16).enumerate() {
                if chunk_absmax(chunk) > limit {
                    for (j, &v) in chunk.iter().enumerate() {
                        if v.abs() > limit {
                            out.push((r as u32, (i * 16 + j) as u32, v));
                        }
                    }
                }
            }
            let found = &mut out[start..];
            if found.len() > MAX_OUTLIERS {
                // Largest first; ties by column, so the choice is deterministic.
                found.sort_unstable_by(|a, b| b.2.abs().total_cmp(&a.2.abs()).then(a.1.cmp(&b.1)));
                out.truncate(start + MAX_OUTLIERS);
            }
        }
    }
}

/// max |x| of a chunk of at most 16.
#[inline(always)]
fn chunk_absmax(chunk: &[f32]) -> f32 {
    let mut m = [0f32; 16];
    for (m, v) in m.iter_mut().zip(chunk) {
        *m = v.abs();
    }
    m.iter().fold(0f32, |a, &b| if b > a { b } else { a })
}

super::kernels::multiversion! {
    /// `(max |x|, Σ x²)` of a row, with 8 fixed lanes (the same sums on every instruction set).
    fn absmax_sumsq(row: &[f32]) -> (f32, f32) {
        const L: usize = 8;
        let (mut m, mut s) = ([0f32; L], [0f32; L]);
        let mut chunks = row.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                let a = c[i].abs();
                m[i] = if a > m[i] { a } else { m[i] };
                s[i] += c[i] * c[i];
            }
        }
        let (mut mx, mut sum) = (0f32, 0f32);
        for i in 0..L {
            mx = if m[i] > mx { m[i] } else { mx };
            sum += s[i];
        }
        for &v in chunks.remainder() {
            let a = v.abs();
            mx = if a > mx { a } else { mx };
            sum += v * v;
        }
        (mx, sum)
    }
}

/// Per row: u8 codes with scale and zero point such that `x ≈ s · (q − z)`, `q ∈ [0, qmax]`; the
/// range always contains 0 so that exact zeros stay exact. Columns `k..kp` get the zero point.
/// The AVX2 copy (any kernel set but `portable`) gives the same codes bit for bit (tested).
#[allow(clippy::too_many_arguments)]
fn quantize_rows(
    kernels: Kernels,
    x: &[f32],
    k: usize,
    kp: usize,
    qmax: f32,
    qx: &mut [u8],
    sx: &mut [f32],
    zx: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if kernels != Kernels::Portable && Kernels::Avx2.supported() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { quantize_rows_avx2(x, k, kp, qmax, qx, sx, zx) };
    }
    let _ = kernels;
    quantize_rows_portable(x, k, kp, qmax, qx, sx, zx)
}

/// A row's range (with 0) from its lane minima and maxima and the entries past the last full chunk.
#[inline(always)]
fn row_range(lanes_lo: &[f32], lanes_hi: &[f32], rest: &[f32]) -> (f32, f32) {
    let mut lo = lanes_lo.iter().fold(0f32, |a, &b| a.min(b));
    let mut hi = lanes_hi.iter().fold(0f32, |a, &b| a.max(b));
    for &v in rest {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    (lo, hi)
}

/// The scale and zero point of a row whose range (with 0) is `[lo, hi]`.
#[inline(always)]
fn row_scale(lo: f32, hi: f32, qmax: f32) -> (f32, f32) {
    let s = if hi > lo { (hi - lo) / qmax } else { 1.0 };
    (s, (-lo / s).round_ties_even().clamp(0.0, qmax))
}

/// One code: `round_ties_even(v / s + z)` clamped to `[0, qmax]`, NaN → 0, by selects.
#[inline(always)]
fn code(v: f32, inv: f32, z: f32, qmax: f32) -> u8 {
    let y = (v * inv + z).round_ties_even();
    let y = if y >= 0.0 {
        if y <= qmax {
            y
        } else {
            qmax
        }
    } else {
        0.0
    };
    // SAFETY: y is finite and within [0, qmax] ⊂ [0, 255].
    unsafe { y.to_int_unchecked::<i32>() as u8 }
}

/// `quantize_rows` with AVX2 intrinsics: LLVM turns the portable loops' lane arrays into shuffles
/// rather than `vminps`/`vmaxps`, and scalarises the narrowing to u8. Same arithmetic, op for op
/// (mul then add, no FMA; ties-to-even rounding; NaN → 0), so the same codes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_rows_avx2(
    x: &[f32],
    k: usize,
    kp: usize,
    qmax: f32,
    qx: &mut [u8],
    sx: &mut [f32],
    zx: &mut [f32],
) {
    use std::arch::x86_64::*;
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (r, row) in x.chunks_exact(k).enumerate() {
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            // (v < lo) ? v : lo, and likewise for hi: a NaN never replaces the running value.
            lo = _mm256_min_ps(v, lo);
            hi = _mm256_max_ps(v, hi);
        }
        let (mut l8, mut h8) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(l8.as_mut_ptr(), lo);
        _mm256_storeu_ps(h8.as_mut_ptr(), hi);
        let (lo, hi) = row_range(&l8, &h8, chunks.remainder());
        let (s, z) = row_scale(lo, hi, qmax);
        let inv = 1.0 / s;
        let q = &mut qx[r * kp..(r + 1) * kp];
        let (vinv, vz, vmax, zero) = (
            _mm256_set1_ps(inv),
            _mm256_set1_ps(z),
            _mm256_set1_ps(qmax),
            _mm256_setzero_ps(),
        );
        let conv = |p: *const f32| {
            let y = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(p), vinv), vz);
            let y = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
            // max(y, 0) returns 0 for NaN (the second operand), then min with qmax.
            _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(y, zero), vmax))
        };
        let mut i = 0;
        while i + 32 <= k {
            let p = row.as_ptr().add(i);
            let ab = _mm256_packus_epi32(conv(p), conv(p.add(8)));
            let cd = _mm256_packus_epi32(conv(p.add(16)), conv(p.add(24)));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
            _mm256_storeu_si256(q.as_mut_ptr().add(i) as *mut __m256i, bytes);
            i += 32;
        }
        for (d, &v) in q[i..k].iter_mut().zip(&row[i..]) {
            *d = code(v, inv, z, qmax);
        }
        q[k..].fill(z as u8);
        sx[r] = s;
        zx[r] = z;
    }
}

super::kernels::multiversion! {
    /// The portable `quantize_rows`, written with lane arrays so that it vectorises somewhat.
    fn quantize_rows_portable(
        x: &[f32],
        k: usize,
        kp: usize,
        qmax: f32,
        qx: &mut [u8],
        sx: &mut [f32],
        zx: &mut [f32],
    ) {
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
            let (lo, hi) = row_range(&lo, &hi, chunks.remainder());
            let (s, z) = row_scale(lo, hi, qmax);
            let inv = 1.0 / s;
            let q = &mut qx[r * kp..(r + 1) * kp];
            for (d, &v) in q.iter_mut().zip(row) {
                *d = code(v, inv, z, qmax);
            }
            q[k..].fill(z as u8);
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

    /// Every kernel this CPU runs that computes on `format`, on the same inputs, gives bit-identical
    /// outputs (same integers, same epilogue), close to the f32 product; threads do not change the
    /// result.
    fn check_kernels(
        format: Format,
        (m, k, n): (usize, usize, usize),
        x: &[f32],
        w: &[f32],
        tol: f32,
    ) {
        let q = QuantLinear::with_format(w, n, k, format);
        let mut reference = vec![0f32; m * n];
        q.forward_rows_with(Kernels::Portable, f32::INFINITY, x, &mut reference);
        let mut ran = vec![];
        // Every other kernel set against the portable reference.
        for kernels in Kernels::ALL
            .into_iter()
            .filter(|k| *k != Kernels::Portable && k.supported() && format.runs_on(*k))
        {
            let mut y = vec![f32::NAN; m * n];
            q.forward_rows_with(kernels, f32::INFINITY, x, &mut y);
            for (i, (a, b)) in y.iter().zip(&reference).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{kernels} differs from portable at {i}: {a} vs {b}"
                );
            }
            ran.push(kernels.name());
        }
        if format == Format::for_kernels(crate::fast::cpu::active()) {
            let mut y2 = vec![0f32; m * n];
            q.forward(x, m, &mut y2, Parallelism::Rayon(2));
            assert_eq!(y2, reference, "threaded result differs");
        }
        for r in 0..m {
            for o in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * w[o * k + i]).sum();
                let got = reference[r * n + o];
                assert!((got - exact).abs() < tol, "{r},{o}: {got} vs {exact}");
            }
        }
        if Kernels::Avx2.supported() && format == Format::BITS7 {
            assert!(!ran.is_empty(), "no vector kernel compared");
        }
        eprintln!(
            "{} kernels compared ({m}×{k}×{n}): {}",
            format.name(),
            ran.join(", ")
        );
    }

    #[test]
    fn int8_matmul_is_close_to_f32_and_kernels_agree() {
        // Odd sizes: k not a multiple of 4 or 8, n not a multiple of 16 or 64, m not a multiple of
        // 4 or 6. Error bound: ~k · (|x| step/2 · |w| + |x| · |w| step/2), twice as large in 7 bits.
        let (m, k, n) = (23, 70, 130);
        let (x, w) = (data(m * k, 1), data(n * k, 2));
        check_kernels(Format::BITS8, (m, k, n), &x, &w, 0.15);
        check_kernels(Format::BITS7, (m, k, n), &x, &w, 0.3);
        // k a multiple of 8 (the AVX2 kernel's pairs of k-quads with no single quad left over).
        let (m, k, n) = (7, 64, 20);
        check_kernels(
            Format::BITS7,
            (m, k, n),
            &data(m * k, 3),
            &data(n * k, 4),
            0.3,
        );
    }

    #[test]
    fn int8_kernels_agree_where_i16_sums_are_largest() {
        // Activations at the ends of their range next to each other and weights at ±max (every
        // row's max |w| is 1): the AVX2 kernel's i16 sums of 4 products reach 4 · 127 · 63 = 32004
        // and would overflow with 8-bit codes. Wide k, so accumulators grow large too.
        let (m, k, n) = (9, 1024, 40);
        let x: Vec<f32> = (0..m * k)
            .map(|i| match i % 8 {
                0..=5 => 3.0,
                6 => -1.0,
                _ => 2.5,
            })
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| if (i / 8 + i / k) % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        for format in [Format::BITS8, Format::BITS7] {
            check_kernels(format, (m, k, n), &x, &w, 0.02 * k as f32);
        }
    }

    #[test]
    fn activation_codes_stay_within_their_levels_and_quantizers_agree() {
        // Rows of 77 (two 32-blocks, an 8-block and a scalar tail), with ties (x.5 after scaling),
        // a NaN, infinities excluded (the engine never feeds them), and an all-zero row.
        let (m, k, kp) = (6, 77, 80);
        let mut x = data(m * k, 7);
        x[5] = f32::NAN;
        x[k + 3] = 0.5;
        x[2 * k..3 * k].fill(0.0);
        for format in [Format::BITS8, Format::BITS7] {
            let qmax = format.act_max;
            let mut runs = vec![];
            for kernels in Kernels::ALL.into_iter().filter(|k| k.supported()) {
                let mut qx = vec![0u8; m * kp];
                let (mut sx, mut zx) = (vec![0f32; m], vec![0f32; m]);
                quantize_rows(kernels, &x, k, kp, qmax as f32, &mut qx, &mut sx, &mut zx);
                assert!(qx.iter().all(|&q| q <= qmax));
                assert!(qx.contains(&qmax) && qx.contains(&0));
                assert_eq!(qx[5], 0, "NaN → 0");
                runs.push((kernels, qx, sx, zx));
            }
            for (kernels, qx, sx, zx) in &runs[1..] {
                assert_eq!(qx, &runs[0].1, "{kernels} codes differ from {}", runs[0].0);
                assert_eq!((sx, zx), (&runs[0].2, &runs[0].3));
            }
        }
    }

    #[test]
    fn outlier_features_are_taken_out_exactly_and_per_row() {
        // Rows like hidden states with outlier features: a few channels 100× the rest in some rows
        // (and 12 in one row, more than MAX_OUTLIERS).
        let (m, k, n) = (12, 1024, 70);
        let mut x = data(m * k, 11);
        for r in (0..m).step_by(3) {
            x[r * k + 5] = 100.0;
            x[r * k + 77] = -60.0;
        }
        for c in 0..12 {
            x[7 * k + 80 * c + 1] = 50.0 + c as f32;
        }
        let w = data(n * k, 12);
        let exact: Vec<f32> = (0..m * n)
            .map(|i| {
                (0..k)
                    .map(|j| x[(i / n) * k + j] * w[(i % n) * k + j])
                    .sum()
            })
            .collect();
        // Row 7 keeps 4 of its 12 outliers (only MAX_OUTLIERS are taken out), which still stretch
        // its range: left out of the error bound.
        let err = |y: &[f32]| {
            (0..m * n)
                .filter(|i| i / n != 7)
                .map(|i| (y[i] - exact[i]).abs())
                .fold(0f32, f32::max)
        };
        for format in [Format::BITS8, Format::BITS7] {
            let q = QuantLinear::with_format(&w, n, k, format);
            let mut plain = vec![0f32; m * n];
            q.forward_rows_with(Kernels::Portable, f32::INFINITY, &x, &mut plain);
            let mut with = vec![0f32; m * n];
            q.forward_rows_with(Kernels::Portable, OUTLIER_RATIO, &x, &mut with);
            let (e_plain, e_with) = (err(&plain), err(&with));
            eprintln!(
                "{}: max error {e_plain:.3} without, {e_with:.3} with outlier decomposition",
                format.name()
            );
            assert!(e_with * 5.0 < e_plain, "{e_with} vs {e_plain}");
            // Every kernel set, the same bits.
            for kernels in Kernels::ALL
                .into_iter()
                .filter(|k| *k != Kernels::Portable && k.supported() && format.runs_on(*k))
            {
                let mut y = vec![0f32; m * n];
                q.forward_rows_with(kernels, OUTLIER_RATIO, &x, &mut y);
                assert_eq!(y, with, "{kernels}");
            }
            // Per row: a row alone gives the same result as in the batch.
            for r in [0, 1, 7] {
                let mut alone = vec![0f32; n];
                q.forward_rows_with(
                    Kernels::Portable,
                    OUTLIER_RATIO,
                    &x[r * k..(r + 1) * k],
                    &mut alone,
                );
                assert_eq!(alone[..], with[r * n..(r + 1) * n], "row {r}");
            }
        }
        let mut found = vec![];
        find_outliers(&x, k, OUTLIER_RATIO, &mut found);
        let in_row = |r: u32| found.iter().filter(|o| o.0 == r).count();
        assert_eq!(
            (in_row(0), in_row(1), in_row(3), in_row(7)),
            (2, 0, 2, MAX_OUTLIERS)
        );
        assert!(
            found.iter().filter(|o| o.0 == 7).all(|o| o.2 >= 54.0),
            "the largest are kept"
        );
    }
}
