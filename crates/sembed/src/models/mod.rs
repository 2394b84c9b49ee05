//! One file per architecture behind one narrow interface: token ids + mask → hidden states.
//! Pooling, batching, fusion and serving never branch on the architecture.

pub mod bert;
pub mod jina;
pub mod qwen;

use crate::error::Result;
use crate::nn::Packing;
use candle_core::{Device, Tensor};

/// A batch as the models see it. Projections, norms and MLPs run on the packed real tokens only
/// (`[T, H]`, no padding); attention runs on the padded `[B, S]` grid built from `packing`.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, S]` u32, 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[B, S]` u32 position of each token, counted from the row's first real token.
    pub positions: Tensor,
    /// `[T]` u32 ids of the real tokens, row after row.
    pub packed_ids: Tensor,
    /// `[T]` u32 positions of the real tokens.
    pub packed_positions: Tensor,
    pub packing: Packing,
    /// The mask as host rows (for pooling).
    pub mask_rows: Vec<Vec<u32>>,
    /// Jina task adapter for every row of the batch (None = base weights).
    pub adapter: Option<usize>,
}

impl Batch {
    /// Lay out token rows, padded on the left or the right (positions always count from each row's
    /// first real token, so the side does not change the result).
    pub fn new(
        rows: &[&[u32]],
        left: bool,
        adapter: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let b = rows.len();
        let s = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut mask_rows = Vec::with_capacity(b);
        let mut packed_ids = Vec::new();
        let mut packed_positions = Vec::new();
        for r in rows {
            let pad = s - r.len();
            let mut m = Vec::with_capacity(s);
            if left {
                m.extend(std::iter::repeat_n(0u32, pad));
            }
            m.extend(std::iter::repeat_n(1u32, r.len()));
            if !left {
                m.extend(std::iter::repeat_n(0u32, pad));
            }
            mask_rows.push(m);
            packed_ids.extend_from_slice(r);
            packed_positions.extend(0..r.len() as u32);
        }
        let t = packed_ids.len();
        Ok(Batch {
            attention_mask: Tensor::from_vec(mask_rows.concat(), (b, s), device)?,
            positions: crate::nn::positions_from_mask(&mask_rows, device)?,
            packed_ids: Tensor::from_vec(packed_ids, t, device)?,
            packed_positions: Tensor::from_vec(packed_positions, t, device)?,
            packing: Packing::new(&mask_rows, device)?,
            mask_rows,
            adapter,
        })
    }
}

/// A transformer encoder: batch → last hidden states of the real tokens, packed `[T, hidden]`
/// (`batch.packing.pad` gives `[B, S, hidden]`).
pub trait Encoder: Send + Sync {
    fn forward(&self, batch: &Batch) -> Result<Tensor>;
    fn hidden_size(&self) -> usize;
}

/// The PEFT LoRA adapters `(rank, scale)` on a layer's projections, as the fast training pass takes
/// them ([`crate::fast::train`]): read off the first layer.
pub(crate) fn lora_spec<const N: usize>(
    first: [&crate::nn::Linear; N],
) -> Result<[Option<(usize, f32)>; N]> {
    let mut out = [None; N];
    for (slot, lin) in out.iter_mut().zip(first) {
        if let Some((a, _, scale)) = &lin.lora {
            *slot = Some((a.dim(0)?, *scale as f32));
        }
    }
    Ok(out)
}

/// The A and B tensors of a layer's adapters in `spec`'s order, or None where the layer differs from
/// `spec` or an adapter's dropout is in effect (the fast training pass does not draw those masks).
pub(crate) fn lora_params<const N: usize>(
    layer: [&crate::nn::Linear; N],
    spec: &[Option<(usize, f32)>; N],
) -> Result<Option<Vec<Tensor>>> {
    let mut out = Vec::new();
    for (lin, want) in layer.into_iter().zip(spec) {
        match (&lin.lora, want) {
            (Some((a, b, scale)), Some((rank, s)))
                if a.dim(0)? == *rank
                    && *scale as f32 == *s
                    && crate::nn::dropout_probability(lin.lora_dropout).unwrap_or(0.0) <= 0.0 =>
            {
                out.extend([a.clone(), b.clone()]);
            }
            (None, None) => {}
            _ => return Ok(None),
        }
    }
    Ok(Some(out))
}
