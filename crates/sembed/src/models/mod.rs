//! One file per architecture behind one narrow interface: token ids + mask → hidden states.
//! Pooling, batching, fusion and serving never branch on the architecture.

pub mod bert;
pub mod jina;
pub mod qwen;

use crate::error::Result;
use candle_core::Tensor;

/// A padded batch as the models see it.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, S]` u32 token ids.
    pub input_ids: Tensor,
    /// `[B, S]` u32, 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[B, S]` u32 position of each token, counted from the row's first real token.
    pub positions: Tensor,
    /// Jina task adapter for every row of the batch (None = base weights).
    pub adapter: Option<usize>,
}

/// A transformer encoder: batch → last hidden states `[B, S, hidden]`.
pub trait Encoder: Send + Sync {
    fn forward(&self, batch: &Batch) -> Result<Tensor>;
    fn hidden_size(&self) -> usize;
}
