//! Which CPU kernels the fast engine runs: the best this CPU has, detected once from CPUID and XCR0
//! (never from the CPU's model name), or the set forced with
//! `SEMBED_CPU_KERNELS=amx|avx512-bf16|avx512|avx2|portable` so that every path can be tested and
//! timed on any machine that has it. Each set includes the ones below it.
//!
//! | set | bf16 projections | int8 projections | row kernels (norms, softmax, activations) |
//! |---|---|---|---|
//! | `amx` | AMX tiles (`tdpbf16ps`) | AMX tiles (`tdpbusd`) | AVX2 + FMA |
//! | `avx512-bf16` | AVX-512 BF16 (`vdpbf16ps`) | AVX-512 VNNI (`vpdpbusd`) | AVX2 + FMA |
//! | `avx512` | widened to f32, `gemm` crate | AVX-512 VNNI (`vpdpbusd`) | AVX2 + FMA |
//! | `avx2` | widened to f32, `gemm` crate | AVX2 (`vpmaddubsw` + `vpmaddwd`, exact) | AVX2 + FMA |
//! | `portable` | widened to f32, `gemm` crate | plain Rust loops | plain Rust loops |
//!
//! The f32 GEMMs (and the widened 16-bit ones) come from the `gemm` crate, which picks its own
//! kernels (AVX-512 where the CPU has it, else AVX2+FMA); this setting does not reach them.
//!
//! AMX needs more than the CPUID bits: the OS must enable the tile state in XCR0, and Linux hands
//! the (8 KiB) tile data state to a process only after `arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`; before that the first tile instruction is SIGILL. [`amx_status`] asks once
//! per process and keeps the answer, with the reason where AMX cannot run.

use crate::error::{Error, Result};
use std::sync::OnceLock;

/// The environment variable that forces a kernel set.
pub const ENV: &str = "SEMBED_CPU_KERNELS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Intel AMX (tiles: BF16 and INT8) on top of everything in `Avx512Bf16`.
    Amx,
    /// AVX-512 BF16 (`vdpbf16ps`) on top of `Avx512`.
    Avx512Bf16,
    /// AVX-512 F/BW + VNNI for int8 (and AVX2 + FMA for the row kernels).
    Avx512,
    /// AVX2 + FMA.
    Avx2,
    /// No vector extension beyond the baseline.
    Portable,
}

/// What CPUID and XCR0 say about the instruction sets the kernels use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    pub avx2_fma: bool,
    pub f16c: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vnni: bool,
    pub avx512bf16: bool,
    pub amx_tile: bool,
    pub amx_bf16: bool,
    pub amx_int8: bool,
    /// XCR0 bits 17 and 18: the OS enabled the tile configuration and tile data state.
    pub xcr0_tiles: bool,
}

/// CPUID leaf 7 / XCR0, read once.
pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(read_features)
}

#[cfg(target_arch = "x86_64")]
fn read_features() -> Features {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: CPUID exists on every x86-64 CPU; leaves above the maximum are not read.
    let max = __cpuid(0).eax;
    let (l7_edx, l7s1_eax) = if max >= 7 {
        (__cpuid_count(7, 0).edx, __cpuid_count(7, 1).eax)
    } else {
        (0, 0)
    };
    let l1 = __cpuid(1);
    let osxsave = l1.ecx & (1 << 27) != 0;
    // SAFETY: XGETBV is available where CPUID says OSXSAVE.
    let xcr0 = if osxsave { unsafe { xgetbv0() } } else { 0 };
    let bit = |r: u32, b: u32| r & (1 << b) != 0;
    Features {
        // std's detection checks XCR0 for the AVX and AVX-512 register state too.
        avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        f16c: is_x86_feature_detected!("f16c"),
        avx512f: is_x86_feature_detected!("avx512f"),
        avx512bw: is_x86_feature_detected!("avx512bw"),
        avx512vnni: is_x86_feature_detected!("avx512vnni"),
        avx512bf16: is_x86_feature_detected!("avx512bf16") && bit(l7s1_eax, 5),
        amx_bf16: bit(l7_edx, 22),
        amx_tile: bit(l7_edx, 24),
        amx_int8: bit(l7_edx, 25),
        xcr0_tiles: xcr0 & (0b11 << 17) == 0b11 << 17,
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn xgetbv0() -> u64 {
    let (eax, edx): (u32, u32);
    // SAFETY (caller): OSXSAVE is set, so XGETBV with ecx = 0 is defined.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") eax, out("edx") edx,
            options(nomem, nostack, preserves_flags));
    }
    ((edx as u64) << 32) | eax as u64
}

#[cfg(not(target_arch = "x86_64"))]
fn read_features() -> Features {
    Features::default()
}

/// Whether this process may use AMX tiles: `Ok` once the kernel granted the tile data state, or
/// the reason it cannot (missing CPUID bits, no XCR0 support, permission refused). Asked once.
pub fn amx_status() -> std::result::Result<(), &'static str> {
    static S: OnceLock<std::result::Result<(), &'static str>> = OnceLock::new();
    *S.get_or_init(|| {
        let f = features();
        if !(f.amx_tile && f.amx_bf16 && f.amx_int8) {
            return Err("the CPU has no AMX-TILE/BF16/INT8 (CPUID leaf 7)");
        }
        if !f.xcr0_tiles {
            return Err("the OS does not enable the AMX tile state (XCR0 bits 17-18)");
        }
        request_tile_permission()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> std::result::Result<(), &'static str> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only changes this process's permitted XSAVE
    // features; it reads and writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err("Linux refused the AMX tile data state (arch_prctl ARCH_REQ_XCOMP_PERM failed)")
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_permission() -> std::result::Result<(), &'static str> {
    Err("AMX is only used on Linux (arch_prctl ARCH_REQ_XCOMP_PERM)")
}

impl Kernels {
    pub const ALL: [Kernels; 5] = [
        Kernels::Amx,
        Kernels::Avx512Bf16,
        Kernels::Avx512,
        Kernels::Avx2,
        Kernels::Portable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Amx => "amx",
            Kernels::Avx512Bf16 => "avx512-bf16",
            Kernels::Avx512 => "avx512-vnni",
            Kernels::Avx2 => "avx2",
            Kernels::Portable => "portable",
        }
    }

    /// Whether this CPU (and OS) can run the set.
    pub fn supported(self) -> bool {
        self.unsupported_reason().is_none()
    }

    /// Why this CPU cannot run the set (`None`: it can).
    pub fn unsupported_reason(self) -> Option<&'static str> {
        let f = features();
        let avx512 = f.avx2_fma && f.avx512f && f.avx512bw && f.avx512vnni;
        match self {
            Kernels::Portable => None,
            Kernels::Avx2 => (!f.avx2_fma).then_some("no AVX2 + FMA"),
            Kernels::Avx512 => (!avx512).then_some("no AVX-512 F/BW/VNNI"),
            Kernels::Avx512Bf16 => {
                if !avx512 {
                    Some("no AVX-512 F/BW/VNNI")
                } else if !f.avx512bf16 {
                    Some("no AVX-512 BF16")
                } else {
                    None
                }
            }
            Kernels::Amx => Kernels::Avx512Bf16
                .unsupported_reason()
                .or_else(|| amx_status().err()),
        }
    }

    /// Whether the set has bf16 dot products (the bf16 projections then compute in bf16).
    pub fn has_bf16(self) -> bool {
        matches!(self, Kernels::Amx | Kernels::Avx512Bf16)
    }

    /// The best set this CPU runs.
    pub fn detect() -> Kernels {
        Kernels::ALL
            .into_iter()
            .find(|k| k.supported())
            .unwrap_or(Kernels::Portable)
    }

    /// Parse a `SEMBED_CPU_KERNELS` value and check that this CPU runs it.
    pub fn parse(value: &str) -> Result<Kernels> {
        let k = match value.trim().to_ascii_lowercase().as_str() {
            "amx" => Kernels::Amx,
            "avx512-bf16" | "avx512bf16" => Kernels::Avx512Bf16,
            "avx512" | "avx512-vnni" | "avx512vnni" => Kernels::Avx512,
            "avx2" => Kernels::Avx2,
            "portable" => Kernels::Portable,
            other => {
                return Err(Error::InvalidInput(format!(
                    "{ENV}={other}: expected amx, avx512-bf16, avx512, avx2 or portable"
                )))
            }
        };
        if let Some(why) = k.unsupported_reason() {
            return Err(Error::InvalidInput(format!(
                "{ENV}={value}: this CPU cannot run the {} kernels: {why} (it has: {})",
                k.name(),
                describe_cpu()
            )));
        }
        Ok(k)
    }

    /// The set in force: `SEMBED_CPU_KERNELS` if set (and valid), the detected set otherwise.
    pub fn from_env() -> Result<Kernels> {
        match std::env::var(ENV) {
            Ok(v) if !v.trim().is_empty() => Kernels::parse(&v),
            _ => Ok(Kernels::detect()),
        }
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The CPU's features the fast engine uses, as `sembed inspect`, `/info` and the bench name them;
/// where the CPU has AMX but it cannot be used, the reason follows.
pub fn describe_cpu() -> String {
    let f = features();
    let mut v = Vec::new();
    for (on, name) in [
        (f.avx512f, "avx512f"),
        (f.avx512bw, "avx512bw"),
        (f.avx512vnni, "avx512vnni"),
        (f.avx512bf16, "avx512bf16"),
        (f.amx_tile, "amx-tile"),
        (f.amx_bf16, "amx-bf16"),
        (f.amx_int8, "amx-int8"),
        (f.avx2_fma, "avx2+fma"),
        (f.f16c, "f16c"),
    ] {
        if on {
            v.push(name);
        }
    }
    if v.is_empty() {
        return "portable".into();
    }
    let mut s = v.join(", ");
    if f.amx_tile {
        if let Err(why) = amx_status() {
            s.push_str(&format!(" (AMX not usable: {why})"));
        }
    }
    s
}

/// The set every kernel dispatches on, read once per process. An invalid `SEMBED_CPU_KERNELS` is
/// refused where a fast model is loaded ([`check`]); if a kernel runs before that, it gets the
/// detected set, which is always safe.
pub fn active() -> Kernels {
    static ACTIVE: OnceLock<Kernels> = OnceLock::new();
    *ACTIVE.get_or_init(|| Kernels::from_env().unwrap_or_else(|_| Kernels::detect()))
}

/// The kernel that runs bf16 projections under the set in force, e.g. `amx (tdpbf16ps)`.
pub fn bf16_description() -> String {
    match active() {
        Kernels::Amx => "amx (tdpbf16ps tiles, f32 accumulation)".into(),
        Kernels::Avx512Bf16 => "avx512-bf16 (vdpbf16ps, f32 accumulation)".into(),
        k => format!("{k}: bf16 weights widened to f32 (gemm crate); no bf16 dot product"),
    }
}

/// Refuse an invalid or unsupported `SEMBED_CPU_KERNELS` with a clear error.
pub fn check() -> Result<Kernels> {
    Kernels::from_env()?;
    Ok(active())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_and_refusals() {
        assert_eq!(Kernels::parse("portable").unwrap(), Kernels::Portable);
        assert_eq!(
            Kernels::parse(" AVX2 ").ok(),
            Kernels::Avx2.supported().then_some(Kernels::Avx2)
        );
        let e = Kernels::parse("sse9").unwrap_err().to_string();
        assert!(
            e.contains("SEMBED_CPU_KERNELS=sse9") && e.contains("amx"),
            "{e}"
        );
        for k in Kernels::ALL {
            match k.unsupported_reason() {
                Some(why) => {
                    let e = Kernels::parse(k.name()).unwrap_err().to_string();
                    assert!(
                        e.contains(&format!("cannot run the {k} kernels: {why}")),
                        "{e}"
                    );
                    eprintln!("{k}: not on this CPU ({why})");
                }
                None => assert_eq!(Kernels::parse(k.name()).unwrap(), k),
            }
        }
        let best = Kernels::detect();
        assert_eq!(Kernels::parse(best.name()).unwrap(), best);
        // Each set includes the ones below it.
        let sup: Vec<bool> = Kernels::ALL.iter().map(|k| k.supported()).collect();
        assert!(sup.windows(2).all(|w| !w[0] || w[1]), "{sup:?}");
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert_ne!(best, Kernels::Portable);
        }
    }

    #[test]
    fn cpuid_agrees_with_proc_cpuinfo() {
        // An independent reading of the same bits, where Linux offers one.
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            eprintln!("no /proc/cpuinfo: CPUID not cross-checked");
            return;
        };
        let flags: std::collections::HashSet<&str> = info
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let f = features();
        assert_eq!(f.amx_tile, flags.contains("amx_tile"));
        assert_eq!(f.amx_bf16, flags.contains("amx_bf16"));
        assert_eq!(f.amx_int8, flags.contains("amx_int8"));
        assert_eq!(f.avx512bf16, flags.contains("avx512_bf16"));
        assert_eq!(f.avx512vnni, flags.contains("avx512_vnni"));
    }
}
