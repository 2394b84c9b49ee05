//! Pooling hidden states `[B, S, H]` into one vector per row, respecting the attention mask.

use crate::config::Pooling;
use crate::error::Result;
use candle_core::{DType, Tensor, D};

/// `mask` is `[B, S]` with 1 for real tokens; every row has at least one.
pub fn pool(
    hidden: &Tensor,
    mask: &Tensor,
    mask_rows: &[Vec<u32>],
    pooling: Pooling,
) -> Result<Tensor> {
    let (b, s, h) = hidden.dims3()?;
    let maskf = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?; // [B, S, 1]
    Ok(match pooling {
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Mean | Pooling::MeanSqrtLen => {
            let sum = hidden.broadcast_mul(&maskf)?.sum(1)?;
            let count = maskf.sum(1)?;
            let denom = if pooling == Pooling::Mean {
                count
            } else {
                count
                    .to_dtype(DType::F32)?
                    .sqrt()?
                    .to_dtype(hidden.dtype())?
            };
            sum.broadcast_div(&denom)?
        }
        Pooling::Max => {
            let penalty = maskf.affine(1e9, -1e9)?; // 0 for tokens, -1e9 for padding
            hidden.broadcast_add(&penalty)?.max(1)?
        }
        Pooling::LastToken => {
            let idx: Vec<u32> = mask_rows
                .iter()
                .enumerate()
                .map(|(row, m)| {
                    let last = m.iter().rposition(|&x| x != 0).unwrap_or(0);
                    (row * s + last) as u32
                })
                .collect();
            let idx = Tensor::from_vec(idx, b, hidden.device())?;
            hidden.reshape((b * s, h))?.index_select(&idx, 0)?
        }
    })
}

/// Pool packed hidden states `[Σ lens, h]` (real tokens only, row after row) into one vector per row.
pub fn pool_packed(hidden: &[f32], lens: &[usize], h: usize, pooling: Pooling) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &n in lens {
        let rows = &hidden[start * h..(start + n) * h];
        start += n;
        let v = match pooling {
            Pooling::Cls => rows[..h].to_vec(),
            Pooling::LastToken => rows[(n - 1) * h..].to_vec(),
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let mut acc = vec![0f64; h];
                for r in rows.chunks_exact(h) {
                    for (a, x) in acc.iter_mut().zip(r) {
                        *a += *x as f64;
                    }
                }
                let denom = if pooling == Pooling::Mean {
                    n as f64
                } else {
                    (n as f64).sqrt()
                };
                acc.into_iter().map(|a| (a / denom) as f32).collect()
            }
            Pooling::Max => {
                let mut acc = vec![f32::NEG_INFINITY; h];
                for r in rows.chunks_exact(h) {
                    for (a, x) in acc.iter_mut().zip(r) {
                        *a = a.max(*x);
                    }
                }
                acc
            }
        };
        out.push(v);
    }
    out
}

/// L2-normalise each row of a `[n][d]` matrix in place (zero rows stay zero).
pub fn normalize_rows(rows: &mut [Vec<f32>]) {
    for r in rows {
        let norm = r
            .iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            for x in r.iter_mut() {
                *x = (*x as f64 / norm) as f32;
            }
        }
    }
}
