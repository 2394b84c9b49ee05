//! The fast CPU inference path: an inference-only engine for the BERT family on host buffers.
//!
//! The candle models in [`crate::models`] stay the reference (and the training path: they are
//! differentiable); this path computes the same function for inference in f32 — checked against the
//! same golden outputs — or, on request, with int8 projections. `Embedder` picks it for BERT models
//! on the CPU in f32 unless told otherwise (`Engine`).

pub mod bert;
pub mod kernels;
pub mod linear;
pub mod quant;

use crate::error::{Error, Result};

/// Numeric precision of the projections on the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    /// Int8 weights (per output channel) with int8 activations quantised per token at run time.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "none" => Ok(Precision::F32),
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
            Precision::Int8 => "int8",
        })
    }
}

/// Which engine runs a model's forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// The fast path where the model supports it (BERT family, CPU, f32 weights), candle otherwise.
    #[default]
    Auto,
    /// Always the candle reference implementation.
    Candle,
    /// The fast path with the given precision; an error for models it does not support.
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
