//! bf16 projections on bf16 dot-product hardware: Intel AMX tiles (`tdpbf16ps`) and AVX-512 BF16
//! (`vdpbf16ps`), f32 accumulation. Weights are packed once, at load, in the layout both kernels
//! read ("VNNI" pairs): panels of [`NB`] output columns, each panel `[kp / 2][NB][2]` bf16 — for
//! every pair of input features, the pair of each column side by side. An AMX B tile (16 pairs ×
//! 16 columns × 2) is then a 64-byte-wide window of a panel, loaded with a 256-byte stride; an
//! AVX-512 register holds one pair of 16 columns. Activations are rounded to bf16 (nearest even, as
//! PyTorch's autocast does) once per call, into rows padded to a multiple of 32 features.
//!
//! No crate offers AMX kernels on stable Rust (the intrinsics are unstable), so the tile
//! instructions are written with `asm!`; the AVX-512 BF16 intrinsics are stable.
//!
//! Both kernels compute `Σ bf16(x)·bf16(w)` with f32 sums; they differ from each other only in the
//! order of the f32 additions (and AMX flushes denormal products), so they are tested against an f64
//! formula on the same bf16 inputs, not bit for bit.

use super::cpu::{self, Kernels};
use gemm::Parallelism;
use half::bf16;
use std::cell::RefCell;

/// Output columns per packed panel (four AMX tiles or four AVX-512 registers wide).
pub const NB: usize = 64;
/// Input features per AMX tile step (a tile row is 64 bytes = 32 bf16).
const KB: usize = 32;
/// Rows per AMX block (two row tiles).
const MB: usize = 32;

/// bf16 weights packed for the bf16 kernels (see the module doc).
pub struct PackedBf16 {
    pub k: usize,
    pub n: usize,
    /// `k` rounded up to [`KB`].
    kp: usize,
    /// `[n.div_ceil(NB)][kp / 2][NB][2]` bf16 bits, zero beyond `k` and `n`.
    w: Vec<u16>,
}

thread_local! {
    /// Per-thread bf16 activations, reused between calls.
    static ABUF: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Drop this thread's bf16 activation buffer.
pub fn release_thread_scratch() {
    ABUF.with(|b| drop(std::mem::take(&mut *b.borrow_mut())));
}

impl PackedBf16 {
    /// Pack `n` output columns of `k` inputs, where `get(i, o)` is the bf16 weight of input `i`
    /// for output `o`.
    pub fn pack(k: usize, n: usize, get: impl Fn(usize, usize) -> bf16) -> Self {
        let mut p = PackedBf16::empty();
        p.repack(k, n, get);
        p
    }

    /// No weights (a buffer for [`Self::repack`]).
    pub const fn empty() -> Self {
        PackedBf16 {
            k: 0,
            n: 0,
            kp: 0,
            w: Vec::new(),
        }
    }

    /// [`Self::pack`] into this buffer, reusing its memory (attention packs K and V per head).
    pub fn repack(&mut self, k: usize, n: usize, get: impl Fn(usize, usize) -> bf16) {
        let kp = k.div_ceil(KB) * KB;
        let panels = n.div_ceil(NB);
        self.w.clear();
        self.w.resize(panels * kp * NB, 0);
        let w = &mut self.w;
        for o in 0..n {
            let base = (o / NB) * kp * NB + (o % NB) * 2;
            for i in 0..k {
                w[base + (i / 2) * NB * 2 + (i % 2)] = get(i, o).to_bits();
            }
        }
        (self.k, self.n, self.kp) = (k, n, kp);
    }

    /// From PyTorch-layout bf16 rows `[out, in]`.
    pub fn from_torch_bf16(w: &[bf16], out: usize, inp: usize) -> Self {
        Self::pack(inp, out, |i, o| w[o * inp + i])
    }

    /// From PyTorch-layout f32 rows `[out, in]`, rounded to nearest even.
    pub fn from_torch(w: &[f32], out: usize, inp: usize) -> Self {
        Self::pack(inp, out, |i, o| bf16::from_f32(w[o * inp + i]))
    }

    /// Bytes of the packed weights.
    pub fn weight_bytes(&self) -> usize {
        self.w.len() * 2
    }

    /// The bf16 weight of input `i` for output `o`.
    pub fn get(&self, i: usize, o: usize) -> bf16 {
        bf16::from_bits(self.w[(o / NB) * self.kp * NB + (i / 2) * NB * 2 + (o % NB) * 2 + i % 2])
    }

    /// `y[m, n] = bf16(x[m, k]) · W` with the kernels in force (which must have bf16 dot
    /// products; y is overwritten).
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32], par: Parallelism) {
        self.forward_with(cpu::active(), x, m, y, par)
    }

    /// [`Self::forward`] with the given kernel set: `amx`, `avx512-bf16`, or any other set for the
    /// plain-loop reference (same products and f32 sums, for tests).
    pub fn forward_with(
        &self,
        kernels: Kernels,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        par: Parallelism,
    ) {
        assert_eq!(x.len(), m * self.k, "bf16 projection input");
        assert_eq!(y.len(), m * self.n, "bf16 projection output");
        self.forward_strided(kernels, x, self.k, m, y, self.n, par)
    }

    /// [`Self::forward_with`] on rows `x[r * xs..r * xs + k]` into rows `y[r * ys..r * ys + n]`
    /// (the rest of `y` is left alone).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_strided(
        &self,
        kernels: Kernels,
        x: &[f32],
        xs: usize,
        m: usize,
        y: &mut [f32],
        ys: usize,
        par: Parallelism,
    ) {
        if m == 0 || self.n == 0 {
            return;
        }
        assert!(
            xs >= self.k && x.len() >= (m - 1) * xs + self.k,
            "bf16 input rows"
        );
        assert!(
            ys >= self.n && y.len() >= (m - 1) * ys + self.n,
            "bf16 output rows"
        );
        assert!(
            kernels.supported(),
            "{kernels} kernels on a CPU without them"
        );
        let rows_p = if kernels == Kernels::Amx {
            m.div_ceil(MB) * MB
        } else {
            m
        };
        let mut a = ABUF.with(|b| std::mem::take(&mut *b.borrow_mut()));
        to_bf16_rows(x, xs, m, self.k, self.kp, rows_p, &mut a);
        let threads = match par {
            Parallelism::None => 1,
            Parallelism::Rayon(t) => t.max(1),
        };
        // Column panels shared out between threads: each reads its own weights.
        let blocks = self.n.div_ceil(NB);
        let per = blocks.div_ceil(threads.min(blocks).max(1));
        let (out, y_len) = (SendPtr(y.as_mut_ptr()), y.len());
        let run = |b0: usize, b1: usize| {
            let (c0, c1) = (b0 * NB, (b1 * NB).min(self.n));
            // SAFETY: each call writes only columns c0..c1 of y (disjoint between threads), and
            // y outlives the scope; the CPU has the kernel's features (asserted above).
            unsafe {
                let y = std::slice::from_raw_parts_mut(out.get(), y_len);
                match kernels {
                    #[cfg(target_arch = "x86_64")]
                    Kernels::Amx => self.amx(&a, m, c0, c1, y, ys),
                    #[cfg(target_arch = "x86_64")]
                    Kernels::Avx512Bf16 => self.avx512(&a, m, c0, c1, y, ys),
                    _ => self.reference(&a, m, c0, c1, y, ys),
                }
            }
        };
        if threads > 1 && blocks > 1 {
            rayon::scope(|s| {
                for b0 in (0..blocks).step_by(per) {
                    let run = &run;
                    s.spawn(move |_| run(b0, (b0 + per).min(blocks)));
                }
            });
        } else {
            run(0, blocks);
        }
        ABUF.with(|b| *b.borrow_mut() = a);
    }

    /// Plain loops over the packed weights: bf16 products summed in f32 in input order.
    fn reference(&self, a: &[u16], m: usize, c0: usize, c1: usize, y: &mut [f32], ys: usize) {
        for r in 0..m {
            for o in c0..c1 {
                let mut acc = 0f32;
                for i in 0..self.k {
                    let xv = bf16::from_bits(a[r * self.kp + i]).to_f32();
                    acc += xv * self.get(i, o).to_f32();
                }
                y[r * ys + o] = acc;
            }
        }
    }

    /// AVX-512 BF16: `R` rows × 64 columns per micro-kernel, one `vdpbf16ps` per row and 16
    /// columns per pair of inputs.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn avx512(&self, a: &[u16], m: usize, c0: usize, c1: usize, y: &mut [f32], ys: usize) {
        // Rows in blocks that keep their activations in L2 while a panel streams past them.
        const ROW_BLOCK: usize = 96;
        const MR: usize = 6;
        debug_assert_eq!(c0 % NB, 0);
        for r0 in (0..m).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(m);
            for panel in c0 / NB..c1.div_ceil(NB) {
                let mut r = r0;
                while r < r1 {
                    let rows = (r1 - r).min(MR);
                    // SAFETY: rows r..r+rows exist in a and y; the panel exists.
                    unsafe {
                        match rows {
                            6 => self.micro512::<6>(a, r, panel, y, ys),
                            5 => self.micro512::<5>(a, r, panel, y, ys),
                            4 => self.micro512::<4>(a, r, panel, y, ys),
                            3 => self.micro512::<3>(a, r, panel, y, ys),
                            2 => self.micro512::<2>(a, r, panel, y, ys),
                            _ => self.micro512::<1>(a, r, panel, y, ys),
                        }
                    }
                    r += rows;
                }
            }
        }
    }

    /// `R` rows × the 64 columns of one panel over all of k (columns past n are not stored).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn micro512<const R: usize>(
        &self,
        a: &[u16],
        r0: usize,
        panel: usize,
        y: &mut [f32],
        ys: usize,
    ) {
        use std::arch::x86_64::*;
        let kp = self.kp;
        let wp0 = self.w.as_ptr().add(panel * kp * NB);
        let xs = a.as_ptr().add(r0 * kp);
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for p in 0..kp / 2 {
            let wp = wp0.add(p * NB * 2);
            // Bit casts of 32 bf16 each (`__m512i` and `__m512bh` are both 64 bytes).
            let load = |o: usize| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wp.add(o) as *const _))
            };
            let w = [load(0), load(32), load(64), load(96)];
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_epi32(std::ptr::read_unaligned(
                    xs.add(r * kp + p * 2) as *const i32
                ));
                let xb = std::mem::transmute::<__m512i, __m512bh>(xv);
                acc[0] = _mm512_dpbf16_ps(acc[0], xb, w[0]);
                acc[1] = _mm512_dpbf16_ps(acc[1], xb, w[1]);
                acc[2] = _mm512_dpbf16_ps(acc[2], xb, w[2]);
                acc[3] = _mm512_dpbf16_ps(acc[3], xb, w[3]);
            }
        }
        let c = panel * NB;
        let cols = (self.n - c).min(NB);
        for (r, acc) in acc.iter().enumerate() {
            let dst = y.as_mut_ptr().add((r0 + r) * ys + c);
            for (v, av) in acc.iter().enumerate() {
                let lanes = cols.saturating_sub(v * 16).min(16);
                if lanes == 0 {
                    break;
                }
                let mask: __mmask16 = ((1u32 << lanes) - 1) as u16;
                _mm512_mask_storeu_ps(dst.add(v * 16), mask, *av);
            }
        }
    }

    /// AMX: blocks of 32 rows × 32 columns in four accumulator tiles (tmm0-3), two A tiles
    /// (tmm4-5, 16 rows × 32 inputs) and two B tiles (tmm6-7, 16 input pairs × 16 columns) per
    /// step of 32 inputs. `a` has its rows padded to a multiple of 32.
    #[cfg(target_arch = "x86_64")]
    unsafe fn amx(&self, a: &[u16], m: usize, c0: usize, c1: usize, y: &mut [f32], ys: usize) {
        use super::amx::{self, TileConfig};
        let kp = self.kp;
        let mp = m.div_ceil(MB) * MB;
        debug_assert!(a.len() >= mp * kp);
        let cfg = TileConfig::new([(16, 64); 8]);
        let mut edge = [0f32; MB * 32];
        // Column super-blocks whose packed weights stay in L2 while every row block passes.
        let super_cols = ((1usize << 20) / (kp * 2)).max(32) / 32 * 32;
        // SAFETY: the caller checked the CPU has AMX and the process holds the tile permission
        // (`Kernels::Amx.supported()`); every tile load reads inside `a` (rows < mp, inputs < kp)
        // or the packed panel (32 columns of a panel, pairs < kp / 2); stores go to y inside its
        // bounds or to `edge`.
        unsafe {
            cfg.load();
            let a_stride = kp * 2;
            let b_stride = NB * 2 * 2;
            for s0 in (c0..c1).step_by(super_cols) {
                let s1 = (s0 + super_cols).min(c1);
                for r0 in (0..mp).step_by(MB) {
                    for c in (s0..s1).step_by(32) {
                        amx::zero_acc();
                        let bp = self.w.as_ptr().add((c / NB) * kp * NB + (c % NB) * 2);
                        let ap = a.as_ptr().add(r0 * kp);
                        for kb in 0..kp / KB {
                            let a0 = ap.add(kb * KB);
                            let b0 = bp.add(kb * (KB / 2) * NB * 2);
                            amx::step_bf16(
                                a0 as *const u8,
                                a0.add(16 * kp) as *const u8,
                                a_stride,
                                b0 as *const u8,
                                b0.add(32) as *const u8,
                                b_stride,
                            );
                        }
                        let full = r0 + MB <= m && c + 32 <= self.n;
                        let (dst, ds) = if full {
                            (y.as_mut_ptr().add(r0 * ys + c), ys * 4)
                        } else {
                            (edge.as_mut_ptr(), 32 * 4)
                        };
                        amx::store_acc(dst as *mut u8, ds);
                        if !full {
                            let cols = (self.n - c).min(32);
                            for r in 0..(m - r0).min(MB) {
                                let at = (r0 + r) * ys + c;
                                y[at..at + cols].copy_from_slice(&edge[r * 32..r * 32 + cols]);
                            }
                        }
                    }
                }
            }
            amx::release();
        }
    }
}

/// `v` rounded to the nearest bf16 (ties to even), as an f32: what `bf16::from_f32(v).to_f32()`
/// gives, written without branches so that the loops over whole matrices vectorise (NaN stays NaN).
#[inline]
pub fn round_bf16(v: f32) -> f32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    f32::from_bits(if nan {
        (b | 0x0040_0000) & 0xffff_0000
    } else {
        rounded
    })
}

/// `dst[m, n] (+)= bf16(lhs[m, k]) · bf16(rhs[k, n])` with f32 sums, each operand given with its
/// (row stride, column stride), adding to `dst` when `accumulate` is set: the GEMM of bf16 mixed
/// precision training (PyTorch's CPU autocast rounds both operands of a linear layer to bf16 the
/// same way). With the kernels in force; see [`matmul_acc_with`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_acc(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    ls: (isize, isize),
    rhs: &[f32],
    rs: (isize, isize),
    dst: &mut [f32],
    ds: (isize, isize),
    accumulate: bool,
    par: Parallelism,
) {
    matmul_acc_with(
        cpu::active(),
        m,
        n,
        k,
        lhs,
        ls,
        rhs,
        rs,
        dst,
        ds,
        accumulate,
        par,
    )
}

/// [`matmul_acc`] on a given kernel set. Sets with bf16 dot products (`amx`, `avx512-bf16`) pack
/// `rhs` as the projections' weights are packed and run their kernel; every other set rounds both
/// operands to bf16 values held in f32 and runs the f32 GEMM, which computes the same products
/// exactly (a bf16 × bf16 product fits an f32) and sums them in f32 in another order: the same
/// arithmetic, without the speed, on CPUs that have no bf16 instructions.
#[allow(clippy::too_many_arguments)]
pub fn matmul_acc_with(
    kernels: Kernels,
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
    let us = |s: isize| usize::try_from(s).expect("bf16 GEMM: negative stride");
    let (lrs, lcs, rrs, rcs, drs, dcs) = (us(lrs), us(lcs), us(rrs), us(rcs), us(drs), us(dcs));
    let last = |rs: usize, cs: usize, r: usize, c: usize| {
        r.saturating_sub(1) * rs + c.saturating_sub(1) * cs
    };
    assert!(k == 0 || last(lrs, lcs, m, k) < lhs.len(), "bf16 GEMM lhs");
    assert!(k == 0 || last(rrs, rcs, k, n) < rhs.len(), "bf16 GEMM rhs");
    assert!(last(drs, dcs, m, n) < dst.len(), "bf16 GEMM dst");
    if !kernels.has_bf16() {
        // Both operands rounded, row-major, then the f32 GEMM.
        let a = gather(lhs, (lrs, lcs), m, k, round_bf16);
        let b = gather(rhs, (rrs, rcs), k, n, round_bf16);
        let (ki, ni) = (k as isize, n as isize);
        super::linear::matmul_acc(
            m,
            n,
            k,
            &a,
            (ki, 1),
            &b,
            (ni, 1),
            dst,
            (drs as isize, dcs as isize),
            accumulate,
            par,
        );
        return;
    }
    packed(
        kernels,
        m,
        n,
        k,
        lhs,
        (lrs, lcs),
        rhs,
        (rrs, rcs),
        dst,
        (drs, dcs),
        accumulate,
        par,
    )
}

/// [`matmul_acc_with`] through packed weights and a [`PackedBf16`] kernel: `amx`, `avx512-bf16`,
/// or, for tests on any CPU, the plain-loop reference of the other sets.
#[allow(clippy::too_many_arguments)]
fn packed(
    kernels: Kernels,
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lrs, lcs): (usize, usize),
    rhs: &[f32],
    (rrs, rcs): (usize, usize),
    dst: &mut [f32],
    (drs, dcs): (usize, usize),
    accumulate: bool,
    par: Parallelism,
) {
    // rhs packed as the projections' weights are. Packing walks each output column's inputs in
    // order: read in place where they are consecutive (a projection's weights, PyTorch layout),
    // from a copy gathered in tiles where they are not.
    let w = if rrs == 1 {
        PackedBf16::pack(k, n, |i, o| bf16::from_f32(rhs[i + o * rcs]))
    } else {
        PackedBf16::from_torch(&gather(rhs, (rcs, rrs), n, k, |v| v), n, k)
    };
    // The kernels read rows of k consecutive inputs.
    let copied: Vec<f32>;
    let (x, xs) = if lcs == 1 && (m == 1 || lrs >= k) {
        (lhs, if m == 1 { k } else { lrs })
    } else {
        copied = gather(lhs, (lrs, lcs), m, k, |v| v);
        (&copied[..], k)
    };
    if !accumulate && dcs == 1 && (m == 1 || drs >= n) {
        let ys = if m == 1 { n } else { drs };
        w.forward_strided(kernels, x, xs, m, dst, ys, par);
        return;
    }
    let mut y = vec![0f32; m * n];
    w.forward_strided(kernels, x, xs, m, &mut y, n, par);
    for r in 0..m {
        for o in 0..n {
            let d = &mut dst[r * drs + o * dcs];
            *d = if accumulate {
                *d + y[r * n + o]
            } else {
                y[r * n + o]
            };
        }
    }
}

/// `f(src[r * rs + c * cs])` for `r < rows`, `c < cols`, row-major: row by row from rows of
/// consecutive values, otherwise in 32 × 32 tiles (a transposed operand: both sides stay in cache).
fn gather(
    src: &[f32],
    (rs, cs): (usize, usize),
    rows: usize,
    cols: usize,
    f: impl Fn(f32) -> f32,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    if cs == 1 {
        for (r, row) in out.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
            for (d, &v) in row.iter_mut().zip(&src[r * rs..r * rs + cols]) {
                *d = f(v);
            }
        }
        return out;
    }
    const T: usize = 32;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for c in c0..(c0 + T).min(cols) {
                for r in r0..(r0 + T).min(rows) {
                    out[r * cols + c] = f(src[r * rs + c * cs]);
                }
            }
        }
    }
    out
}

/// A raw output pointer shared between threads that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used where the threads write disjoint elements (see `forward_with`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Rows `x[r * xs..r * xs + k]` (`r < m`) rounded to bf16 (nearest even) into `out[rows_p, kp]`,
/// zero beyond `k` and `m`.
pub fn to_bf16_rows(
    x: &[f32],
    xs: usize,
    m: usize,
    k: usize,
    kp: usize,
    rows_p: usize,
    out: &mut Vec<u16>,
) {
    out.clear();
    out.resize(rows_p * kp, 0);
    for r in 0..m {
        let row = &x[r * xs..r * xs + k];
        let dst = &mut out[r * kp..r * kp + k];
        #[cfg(target_arch = "x86_64")]
        if cpu::features().avx512bf16 {
            // SAFETY: the CPU has AVX-512 BF16 (checked just above).
            unsafe { round_avx512(row, dst) };
            continue;
        }
        for (d, &v) in dst.iter_mut().zip(row) {
            *d = bf16::from_f32(v).to_bits();
        }
    }
}

/// `vcvtneps2bf16`: round to nearest even (denormals flush to zero, NaN stays NaN).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len();
    let mut i = 0;
    while i < n {
        let lanes = (n - i).min(16);
        let mask: __mmask16 = ((1u32 << lanes) - 1) as u16;
        let v = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
        let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, mask, b);
        i += 16;
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

    /// Every bf16 kernel this CPU runs against an f64 sum of the same bf16 products: within the
    /// f32 rounding of a k-term sum (relative to Σ|x·w|).
    fn check(m: usize, k: usize, n: usize, seed: u64) -> Vec<&'static str> {
        let (x, w) = (data(m * k, seed), data(n * k, seed + 1));
        let p = PackedBf16::from_torch(&w, n, k);
        let rb = |v: f32| bf16::from_f32(v).to_f64();
        let mut exact = vec![0f64; m * n];
        let mut mag = vec![0f64; m * n];
        for r in 0..m {
            for o in 0..n {
                for i in 0..k {
                    let t = rb(x[r * k + i]) * rb(w[o * k + i]);
                    exact[r * n + o] += t;
                    mag[r * n + o] += t.abs();
                }
            }
        }
        let mut ran = vec![];
        for kernels in Kernels::ALL {
            if !kernels.supported() || !(kernels.has_bf16() || kernels == Kernels::Portable) {
                continue;
            }
            for par in [Parallelism::None, Parallelism::Rayon(3)] {
                let mut y = vec![f32::NAN; m * n];
                p.forward_with(kernels, &x, m, &mut y, par);
                for i in 0..m * n {
                    let err = (y[i] as f64 - exact[i]).abs();
                    assert!(
                        err <= 1e-6 * mag[i] * (k as f64).sqrt() + 1e-30,
                        "{kernels} {m}×{k}×{n} at {i}: {} vs {} (Σ|xw| {})",
                        y[i],
                        exact[i],
                        mag[i]
                    );
                }
            }
            ran.push(kernels.name());
        }
        ran
    }

    #[test]
    fn bf16_kernels_match_an_f64_formula() {
        // Odd sizes: m not a multiple of 6, 16 or 32; k not a multiple of 2 or 32; n not a
        // multiple of 16, 32 or 64; and a size with whole tiles everywhere.
        let mut ran = vec![];
        for (m, k, n) in [
            (1, 1, 1),
            (23, 70, 130),
            (33, 97, 31),
            (64, 128, 128),
            (5, 384, 1536),
        ] {
            ran = check(m, k, n, (m * k + n) as u64);
        }
        for k in [Kernels::Amx, Kernels::Avx512Bf16] {
            match k.unsupported_reason() {
                None => assert!(ran.contains(&k.name()), "{k} not run"),
                Some(why) => eprintln!("bf16 kernel {k} NOT TESTED on this CPU: {why}"),
            }
        }
        eprintln!("bf16 kernels compared with f64: {}", ran.join(", "));
    }

    #[test]
    fn strided_rows_match_packed_rows() {
        // Attention's use: rows inside wider rows, outputs into wider rows (left alone elsewhere).
        let (m, k, n, xs, ys) = (37, 40, 45, 101, 77);
        let x = data(m * xs, 5);
        let p = PackedBf16::from_torch(&data(n * k, 6), n, k);
        let packed: Vec<f32> = (0..m)
            .flat_map(|r| x[r * xs..r * xs + k].to_vec())
            .collect();
        for kernels in Kernels::ALL
            .into_iter()
            .filter(|k| k.supported() && k.has_bf16())
        {
            let mut want = vec![0f32; m * n];
            p.forward_with(kernels, &packed, m, &mut want, Parallelism::None);
            let mut y = vec![7f32; (m - 1) * ys + n];
            p.forward_strided(kernels, &x, xs, m, &mut y, ys, Parallelism::Rayon(2));
            for r in 0..m {
                assert_eq!(
                    y[r * ys..r * ys + n],
                    want[r * n..(r + 1) * n],
                    "{kernels} row {r}"
                );
                if r + 1 < m {
                    assert!(y[r * ys + n..(r + 1) * ys].iter().all(|&v| v == 7.0));
                }
            }
        }
    }

    #[test]
    fn rounding_is_nearest_even_like_half() {
        let x: Vec<f32> = data(1000, 9)
            .into_iter()
            .chain([
                0.0,
                -0.0,
                1.0 + 1.0 / 256.0,
                1.0 + 3.0 / 256.0,
                3.4e38,
                -1e-3,
            ])
            .collect();
        let mut out = vec![];
        to_bf16_rows(&x, x.len(), 1, x.len(), x.len() + 7, 2, &mut out);
        for (i, v) in x.iter().enumerate() {
            assert_eq!(out[i], bf16::from_f32(*v).to_bits(), "{v}");
        }
        assert!(out[x.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn round_bf16_is_halfs_rounding() {
        let x: Vec<f32> = data(2000, 11)
            .into_iter()
            .map(|v| v * 1e3)
            .chain([
                0.0,
                -0.0,
                1.0 + 1.0 / 256.0,
                1.0 + 3.0 / 256.0,
                1.0 + 1.0 / 512.0,
                3.4e38,
                -3.4e38,
                f32::INFINITY,
                f32::NEG_INFINITY,
                1e-40,
                -1e-42,
                f32::MIN_POSITIVE,
            ])
            .collect();
        for v in x {
            assert_eq!(
                round_bf16(v).to_bits(),
                bf16::from_f32(v).to_f32().to_bits(),
                "{v:e}"
            );
        }
        assert!(round_bf16(f32::NAN).is_nan());
        assert!(round_bf16(f32::from_bits(0x7f80_0001)).is_nan());
    }

    /// The training GEMM on every kernel set this CPU runs (bf16 instructions, or the rounded f32
    /// GEMM on the others) against an f64 sum of the same bf16 products, with every operand
    /// transposed or not, outputs into wider rows or transposed, overwritten or accumulated. Also
    /// the bf16 sets' path (packing, gathering, output handling) on the plain-loop reference
    /// kernel, so that it is tested on every CPU.
    #[test]
    fn mixed_precision_matmul_matches_an_f64_formula() {
        let rb = |v: f32| bf16::from_f32(v).to_f64();
        let mut ran = vec![];
        let runs = Kernels::ALL
            .into_iter()
            .filter(|k| k.supported())
            .map(|k| (k, false))
            .chain([(Kernels::Portable, true)]);
        for (kernels, via_packed) in runs {
            let label = if via_packed {
                "packed, reference kernel"
            } else {
                kernels.name()
            };
            for (m, k, n) in [(1, 1, 1), (7, 70, 130), (33, 97, 31), (40, 64, 9)] {
                for layout in 0..16 {
                    let (lt, rt, dt, acc) = (
                        layout & 1 != 0,
                        layout & 2 != 0,
                        layout & 4 != 0,
                        layout & 8 != 0,
                    );
                    let seed = (layout * 1000 + m * k + n) as u64;
                    let (a, b) = (data(m * k, seed), data(k * n, seed + 1));
                    let at = |r: usize, i: usize| if lt { a[i * m + r] } else { a[r * k + i] };
                    let bt = |i: usize, o: usize| if rt { b[o * k + i] } else { b[i * n + o] };
                    let ls = if lt { (1, m as isize) } else { (k as isize, 1) };
                    let rs = if rt { (1, k as isize) } else { (n as isize, 1) };
                    // A transposed output, or rows 3 wider than n.
                    let (ds, dlen) = if dt {
                        ((1, m as isize), m * n)
                    } else {
                        (((n + 3) as isize, 1), m * (n + 3))
                    };
                    let d0 = data(dlen, seed + 2);
                    let idx = |r: usize, o: usize| if dt { o * m + r } else { r * (n + 3) + o };
                    let par = if layout % 3 == 0 {
                        Parallelism::Rayon(2)
                    } else {
                        Parallelism::None
                    };
                    let mut d = d0.clone();
                    if via_packed {
                        let us = |(r, c): (isize, isize)| (r as usize, c as usize);
                        packed(
                            kernels,
                            m,
                            n,
                            k,
                            &a,
                            us(ls),
                            &b,
                            us(rs),
                            &mut d,
                            us(ds),
                            acc,
                            par,
                        );
                    } else {
                        matmul_acc_with(kernels, m, n, k, &a, ls, &b, rs, &mut d, ds, acc, par);
                    }
                    for r in 0..m {
                        for o in 0..n {
                            let (mut want, mut mag) = (0f64, 0f64);
                            for i in 0..k {
                                let t = rb(at(r, i)) * rb(bt(i, o));
                                want += t;
                                mag += t.abs();
                            }
                            if acc {
                                want += d0[idx(r, o)] as f64;
                                mag += d0[idx(r, o)].abs() as f64;
                            }
                            let got = d[idx(r, o)] as f64;
                            assert!(
                                (got - want).abs() <= 1e-6 * mag * (k as f64).sqrt() + 1e-30,
                                "{label} {m}×{k}×{n} layout {layout} at ({r}, {o}): {got} vs {want}"
                            );
                        }
                    }
                    if !dt {
                        // The columns beyond n are left alone.
                        for r in 0..m {
                            for o in n..n + 3 {
                                assert_eq!(d[idx(r, o)], d0[idx(r, o)], "{label} padding");
                            }
                        }
                    }
                }
            }
            ran.push(label);
        }
        for k in [Kernels::Amx, Kernels::Avx512Bf16] {
            if let Some(why) = k.unsupported_reason() {
                eprintln!("mixed-precision GEMM on {k} NOT TESTED on this CPU: {why}");
            }
        }
        eprintln!("mixed-precision GEMM compared with f64: {}", ran.join(", "));
    }

    #[test]
    fn packing_round_trips() {
        let (k, n) = (37, 70);
        let w = data(n * k, 3);
        let p = PackedBf16::from_torch(&w, n, k);
        for o in 0..n {
            for i in 0..k {
                assert_eq!(p.get(i, o), bf16::from_f32(w[o * k + i]));
            }
        }
        assert_eq!(p.weight_bytes(), 2 * NB * 2 * 64);
    }
}
