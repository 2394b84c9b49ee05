//! Row kernels of the fast CPU path: exp, GELU, SiLU/SwiGLU, softmax (causal too), LayerNorm with
//! fused bias and residual, RMSNorm, rotary embeddings.
//!
//! Written by hand (not candle ops) because the point is fusion: one pass over a row does bias +
//! residual + normalisation, or bias + activation, with no intermediate tensor and no allocation.
//! The loops are plain Rust shaped so that LLVM vectorises them (fixed-width lane accumulators, no
//! libm calls); on x86-64 each public kernel runs a copy compiled for AVX2+FMA when the CPU has it.

/// Run `$body` (an expression using the arguments) through an AVX2+FMA-compiled copy when available.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident : $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn inner($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? { inner($($a),*) }
                if $crate::fast::kernels::has_avx2() {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            inner($($a),*)
        }
    };
}
pub(crate) use multiversion;

/// Whether the row kernels run their AVX2+FMA copies: the CPU has them and `SEMBED_CPU_KERNELS` does
/// not force `portable` ([`super::cpu`]).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2() -> bool {
    super::cpu::active() != super::cpu::Kernels::Portable
}

const LANES: usize = 16;

/// e^x for f32, accurate to ~2 ulp over the whole range (Cephes `expf`: range reduction by ln 2 and a
/// degree-6 polynomial). Inputs below -87.3 give ~1e-38 rather than 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r2 + r + 1.0;
    // 2^n from the bits: adding 1.5·2^23 puts the integer n in the low mantissa bits (exact for
    // |n| < 2^22). Unlike `n as i32` this vectorises, and a NaN input stays NaN through `p`.
    let n_int = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    p * f32::from_bits(n_int.wrapping_add(127) << 23)
}

/// erf for f32: the rational approximation Eigen and XLA use (odd degree-13 numerator, even degree-8
/// denominator on [-4, 4], ±1 beyond), a few ulp from the true value.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.9546e-3;
    p = p * x2 + -1.609_603_3e-2;
    let p = p * x;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    p / q
}

/// The activations the fast path knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    GeluErf,
    GeluTanh,
    Relu,
    /// SiLU without a gate (`x · sigmoid(x)`); the gated SwiGLU MLP uses [`silu_mul_compact`].
    Silu,
}

multiversion! {
    /// `x[r][c] = act(x[r][c] + bias[c])` over a row-major matrix whose rows are `bias.len()` long.
    pub fn bias_act(x: &mut [f32], bias: &[f32], act: Act) {
        let n = bias.len();
        for row in x.chunks_exact_mut(n) {
            match act {
                Act::GeluErf => {
                    for (v, b) in row.iter_mut().zip(bias) {
                        let y = *v + b;
                        *v = 0.5 * y * (1.0 + erf(y * std::f32::consts::FRAC_1_SQRT_2));
                    }
                }
                Act::GeluTanh => {
                    for (v, b) in row.iter_mut().zip(bias) {
                        let y = *v + b;
                        // tanh(u) = 1 - 2 / (e^{2u} + 1)
                        let u = 0.797_884_6 * (y + 0.044_715 * y * y * y);
                        let t = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
                        *v = 0.5 * y * (1.0 + t);
                    }
                }
                Act::Relu => {
                    for (v, b) in row.iter_mut().zip(bias) {
                        *v = (*v + b).max(0.0);
                    }
                }
                Act::Silu => {
                    for (v, b) in row.iter_mut().zip(bias) {
                        let y = *v + b;
                        *v = y / (1.0 + exp(-y));
                    }
                }
            }
        }
    }
}

multiversion! {
    /// `y += a · x`.
    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y += a * *x;
        }
    }
}

multiversion! {
    /// `x[r][c] += bias[c]`.
    pub fn add_bias(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mut s: f32 = chunks.remainder().iter().sum();
    for a in acc {
        s += a;
    }
    s
}

#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for a in acc {
        m = m.max(a);
    }
    m
}

multiversion! {
    /// Row-wise softmax of `x * scale` in place (rows `n` long).
    pub fn softmax_rows(x: &mut [f32], n: usize, scale: f32) {
        for row in x.chunks_exact_mut(n) {
            let m = max(row) * scale;
            for v in row.iter_mut() {
                *v = exp(*v * scale - m);
            }
            let inv = 1.0 / sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// `x = LayerNorm(x + y + bias) * gamma + beta`, row by row (rows `gamma.len()` long): the
    /// post-LN residual step of BERT with the projection's bias folded in.
    pub fn residual_layer_norm(
        x: &mut [f32],
        y: &[f32],
        bias: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let n = gamma.len();
        for (xr, yr) in x.chunks_exact_mut(n).zip(y.chunks_exact(n)) {
            for ((v, a), b) in xr.iter_mut().zip(yr).zip(bias) {
                *v += a + b;
            }
            normalize_row(xr, gamma, beta, eps);
        }
    }
}

multiversion! {
    /// `x = LayerNorm(x) * gamma + beta`, row by row.
    pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        for xr in x.chunks_exact_mut(gamma.len()) {
            normalize_row(xr, gamma, beta, eps);
        }
    }
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
#[inline(always)]
pub(crate) fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i] * c[i];
        }
    }
    let mut ss: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for a in acc {
        ss += a;
    }
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

multiversion! {
    /// `dst = RMSNorm(src) * gamma`, row by row (rows `gamma.len()` long): `x / sqrt(mean(x²) + eps)`.
    pub fn rms_norm(src: &[f32], dst: &mut [f32], gamma: &[f32], eps: f32) {
        let n = gamma.len();
        for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
            let inv = inv_rms(s, eps);
            for ((o, v), g) in d.iter_mut().zip(s).zip(gamma) {
                *o = v * inv * g;
            }
        }
    }
}

multiversion! {
    /// RMSNorm in place over every `gamma.len()`-long piece of `x` (Qwen3's per-head q/k norm).
    pub fn rms_norm_inplace(x: &mut [f32], gamma: &[f32], eps: f32) {
        let n = gamma.len();
        for d in x.chunks_exact_mut(n) {
            let inv = inv_rms(d, eps);
            for (o, g) in d.iter_mut().zip(gamma) {
                *o = *o * inv * g;
            }
        }
    }
}

multiversion! {
    /// `x[r][c] += y[r][c] (+ bias[c])`: the pre-norm residual step.
    pub fn add_residual(x: &mut [f32], y: &[f32], bias: Option<&[f32]>) {
        match bias {
            Some(b) => {
                for (xr, yr) in x.chunks_exact_mut(b.len()).zip(y.chunks_exact(b.len())) {
                    for ((v, a), c) in xr.iter_mut().zip(yr).zip(b) {
                        *v += a + c;
                    }
                }
            }
            None => {
                for (v, a) in x.iter_mut().zip(y) {
                    *v += a;
                }
            }
        }
    }
}

multiversion! {
    /// SwiGLU on rows laid out `[gate (i) | up (i)]` (`rows` of them, `2i` long): `silu(gate) · up`,
    /// written compactly to the first `rows · i` values of `x` (row `r` lands at `r·i`, which never
    /// overtakes a row not yet read).
    pub fn silu_mul_compact(x: &mut [f32], rows: usize, i: usize) {
        for r in 0..rows {
            let (head, src) = x.split_at_mut(2 * r * i);
            let (g, u) = src[..2 * i].split_at_mut(i);
            if r == 0 {
                for (gv, uv) in g.iter_mut().zip(u.iter()) {
                    *gv = *gv / (1.0 + exp(-*gv)) * uv;
                }
            } else {
                let dst = &mut head[r * i..(r + 1) * i];
                for ((d, gv), uv) in dst.iter_mut().zip(g.iter()).zip(u.iter()) {
                    *d = gv / (1.0 + exp(-gv)) * uv;
                }
            }
        }
    }
}

multiversion! {
    /// Rotary embedding (GPT-NeoX / `rotate_half` layout) in place on `heads` consecutive heads of
    /// `cos.len() * 2` values each: `x·cos + rotate_half(x)·sin` with the half-width tables of one
    /// position.
    pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        for head in x.chunks_exact_mut(2 * half) {
            let (a, b) = head.split_at_mut(half);
            for (((x1, x2), c), s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                let (u, v) = (*x1, *x2);
                *x1 = u * c - v * s;
                *x2 = v * c + u * s;
            }
        }
    }
}

multiversion! {
    /// Causal row-wise softmax of `x * scale` in place over an `n × n` score matrix: row `i` keeps
    /// columns `0..=i`, the rest become 0.
    pub fn softmax_rows_causal(x: &mut [f32], n: usize, scale: f32) {
        for (i, row) in x.chunks_exact_mut(n).enumerate() {
            let (live, dead) = row.split_at_mut(i + 1);
            let m = max(live) * scale;
            for v in live.iter_mut() {
                *v = exp(*v * scale - m);
            }
            let inv = 1.0 / sum(live);
            for v in live.iter_mut() {
                *v *= inv;
            }
            dead.fill(0.0);
        }
    }
}

#[inline(always)]
fn normalize_row(xr: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = xr.len() as f32;
    let mean = sum(xr) / n;
    let mut acc = [0f32; LANES];
    let mut chunks = xr.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    let mut var: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for a in acc {
        var += a;
    }
    let inv = 1.0 / (var / n + eps).sqrt();
    for ((v, g), b) in xr.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inv * g + b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::cpu::erf::erf_f64;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        // Broken inputs stay visible.
        assert!(exp(f32::NAN).is_nan());
        assert!(erf(f32::NAN).is_nan());
        let mut row = [1.0, f32::NAN, 2.0];
        softmax_rows(&mut row, 3, 1.0);
        assert!(row.iter().all(|v| v.is_nan()), "{row:?}");
    }

    #[test]
    fn erf_matches_reference() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let got = erf(x) as f64;
            worst = worst.max((got - erf_f64(x as f64)).abs());
            x += 0.001;
        }
        assert!(worst < 5e-7, "worst absolute error {worst}");
    }

    #[test]
    fn gelu_softmax_and_layer_norm_match_plain_formulas() {
        let xs: Vec<f32> = (0..70).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let bias: Vec<f32> = (0..35).map(|i| i as f32 * 0.01).collect();
        let mut g = xs.clone();
        bias_act(&mut g, &bias, Act::GeluErf);
        for (i, v) in g.iter().enumerate() {
            let y = (xs[i] + bias[i % 35]) as f64;
            let want = 0.5 * y * (1.0 + erf_f64(y / 2f64.sqrt()));
            assert!((*v as f64 - want).abs() < 2e-6, "{v} vs {want}");
        }
        let mut s = xs.clone();
        softmax_rows(&mut s, 35, 0.5);
        for r in 0..2 {
            let row = &xs[r * 35..(r + 1) * 35];
            let z: f64 = row.iter().map(|v| (*v as f64 * 0.5).exp()).sum();
            for c in 0..35 {
                let want = (row[c] as f64 * 0.5).exp() / z;
                assert!((s[r * 35 + c] as f64 - want).abs() < 1e-6);
            }
        }
        let gamma: Vec<f32> = (0..35).map(|i| 1.0 + i as f32 * 0.1).collect();
        let mut l = xs.clone();
        let zeros = vec![0f32; 70];
        residual_layer_norm(&mut l, &zeros, &bias, &gamma, &bias, 1e-12);
        for r in 0..2 {
            let row: Vec<f64> = (0..35).map(|c| (xs[r * 35 + c] + bias[c]) as f64).collect();
            let mean = row.iter().sum::<f64>() / 35.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 35.0;
            for c in 0..35 {
                let want =
                    (row[c] - mean) / (var + 1e-12).sqrt() * gamma[c] as f64 + bias[c] as f64;
                assert!((l[r * 35 + c] as f64 - want).abs() < 1e-5);
            }
        }
    }
}
