//! The fast CPU inference engine: one inference-only transformer ([`transformer`]) for every
//! architecture sembed runs — BERT family, Qwen2, Qwen3, jina-embeddings-v3 — on host buffers, with
//! f32, 16-bit (bf16 / f16, f32 accumulation) or int8 weights.
//!
//! The candle models in [`crate::models`] stay the reference and the training path (they are
//! differentiable); this engine computes the same function for inference, checked against the same
//! golden outputs. [`crate::backend`] puts both behind one interface and picks this one where it can.

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod bf16;
pub mod cpu;
pub mod kernels;
pub mod linear;
pub mod load;
pub mod quant;
pub mod train;
pub mod train_qwen;
pub mod transformer;

pub use transformer::release_scratch;

use crate::error::{Error, Result};

/// How the fast engine holds its weights (the arithmetic accumulates in f32 in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    /// bfloat16 weights, widened to f32 block by block inside the projections.
    Bf16,
    /// IEEE half weights, likewise.
    F16,
    /// Int8 weights (per output channel) with int8 activations quantised per token at run time.
    Int8,
}

impl Precision {
    /// The weight precision for a compute dtype on the fast engine (`None`: not one it runs).
    pub fn for_dtype(dtype: candle_core::DType) -> Option<Self> {
        match dtype {
            candle_core::DType::F32 => Some(Precision::F32),
            candle_core::DType::BF16 => Some(Precision::Bf16),
            candle_core::DType::F16 => Some(Precision::F16),
            _ => None,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "none" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            "int8" | "i8" => Ok(Precision::Int8),
            other => Err(Error::InvalidInput(format!(
                "quantization `{other}`: expected `none` or `int8`"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
            Precision::Int8 => "int8",
        })
    }
}

/// Which engine runs a model's forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// The fastest engine that can run the model, dtype and device: the fast engine on the CPU,
    /// candle otherwise (see [`crate::backend::choose`]).
    #[default]
    Auto,
    /// Always the candle reference implementation.
    Candle,
    /// The fast engine; an error where it cannot run the model. `Fast(Int8)` quantises the
    /// projections; any other precision follows the compute dtype (f32, bf16 or f16 weights).
    Fast(Precision),
}

impl std::str::FromStr for Engine {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Engine::Auto),
            "candle" | "reference" => Ok(Engine::Candle),
            "fast" => Ok(Engine::Fast(Precision::F32)),
            other => Err(Error::InvalidInput(format!(
                "engine `{other}`: expected `auto`, `fast` or `candle`"
            ))),
        }
    }
}
