//! Which CPU kernels the fast engine runs: the best this CPU has, detected once, or the set forced
//! with `SEMBED_CPU_KERNELS=avx512|avx2|portable` so that every path can be tested and timed on any
//! machine that has it.
//!
//! | set | int8 projections | row kernels (norms, softmax, activations) |
//! |---|---|---|
//! | `avx512` | AVX-512 VNNI (`vpdpbusd`) | AVX2 + FMA |
//! | `avx2` | AVX2 (`vpmaddubsw` + `vpmaddwd`, exact) | AVX2 + FMA |
//! | `portable` | plain Rust loops | plain Rust loops |
//!
//! The f32 and 16-bit GEMMs come from the `gemm` crate, which picks its own kernels (AVX-512 where
//! the CPU has it, else AVX2+FMA); this setting does not reach them.

use crate::error::{Error, Result};
use std::sync::OnceLock;

/// The environment variable that forces a kernel set.
pub const ENV: &str = "SEMBED_CPU_KERNELS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// AVX-512 F/BW + VNNI for int8 (and AVX2 + FMA for the row kernels).
    Avx512,
    /// AVX2 + FMA.
    Avx2,
    /// No vector extension beyond the baseline.
    Portable,
}

impl Kernels {
    pub const ALL: [Kernels; 3] = [Kernels::Avx512, Kernels::Avx2, Kernels::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Avx512 => "avx512-vnni",
            Kernels::Avx2 => "avx2",
            Kernels::Portable => "portable",
        }
    }

    /// Whether this CPU can run the set.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            match self {
                Kernels::Avx512 => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                }
                Kernels::Avx2 => avx2,
                Kernels::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernels::Portable
        }
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
            "avx512" | "avx512-vnni" | "avx512vnni" => Kernels::Avx512,
            "avx2" => Kernels::Avx2,
            "portable" => Kernels::Portable,
            other => {
                return Err(Error::InvalidInput(format!(
                    "{ENV}={other}: expected avx512, avx2 or portable"
                )))
            }
        };
        if !k.supported() {
            return Err(Error::InvalidInput(format!(
                "{ENV}={value}: this CPU cannot run the {} kernels (it has: {})",
                k.name(),
                super::kernels::describe_cpu()
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

/// The set every kernel dispatches on, read once per process. An invalid `SEMBED_CPU_KERNELS` is
/// refused where a fast model is loaded ([`check`]); if a kernel runs before that, it gets the
/// detected set, which is always safe.
pub fn active() -> Kernels {
    static ACTIVE: OnceLock<Kernels> = OnceLock::new();
    *ACTIVE.get_or_init(|| Kernels::from_env().unwrap_or_else(|_| Kernels::detect()))
}

/// The int8 kernel in force and its code width, e.g. `avx2, 7-bit codes`.
pub fn int8_description() -> String {
    let k = active();
    format!("{k}, {} codes", super::quant::Format::for_kernels(k).name())
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
            e.contains("SEMBED_CPU_KERNELS=sse9") && e.contains("avx2"),
            "{e}"
        );
        if !Kernels::Avx512.supported() {
            let e = Kernels::parse("avx512").unwrap_err().to_string();
            assert!(e.contains("cannot run the avx512-vnni kernels"), "{e}");
        }
        let best = Kernels::detect();
        assert_eq!(Kernels::parse(best.name()).unwrap(), best);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert_ne!(best, Kernels::Portable);
        }
    }
}
