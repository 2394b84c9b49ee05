//! sembed: code and text embeddings with real transformer models.
//!
//! Data flows one way: files ([`weights`], [`config`], [`tokenize`]) → model ([`models`], built from
//! the blocks in [`nn`]) → pooled vectors ([`pool`]) → [`embed::Embedder`] / [`embed::Fusion`] → caller.
//! [`hub`] turns a model reference into a local folder.

pub mod backend;
pub mod config;
pub mod embed;
pub mod error;
pub mod fast;
pub mod fusion_config;
pub mod hub;
pub mod lora;
pub mod models;
pub mod nn;
pub mod pool;
pub mod rng;
pub mod tokenize;
pub mod train;
pub mod weights;

pub use backend::{Backend, TokenBatch};
pub use embed::{Embed, EmbedOptions, Embedder, Encoded, Fusion, InputRole, Stages};
pub use error::{Error, Result};

pub use candle_core::DType;

/// Devices.
pub mod device {
    /// The CPU device.
    pub fn cpu() -> candle_core::Device {
        candle_core::Device::Cpu
    }
}
