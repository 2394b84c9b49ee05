//! Training losses on sentence embeddings `[B, d]`, written with differentiable tensor ops and the
//! sentence-transformers definitions and defaults.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor, D};

/// Rows scaled to unit L2 norm.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?)?)
}

/// Cosine similarity matrix `[Ba, Bb]`.
pub fn cos_sim(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(normalize(a)?.matmul(&normalize(b)?.t()?)?)
}

/// Row-wise cosine similarity `[B]`.
fn cos_rows(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((normalize(a)? * normalize(b)?)?.sum(1)?)
}

/// Distance used by [`triplet_loss`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distance {
    /// `1 - cos(x, y)`.
    Cosine,
    /// `‖x - y + 1e-6‖₂` (torch `pairwise_distance`, sentence-transformers' default metric).
    Euclidean,
}

impl std::str::FromStr for Distance {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(Distance::Cosine),
            "euclidean" => Ok(Distance::Euclidean),
            other => Err(Error::InvalidInput(format!(
                "distance `{other}`: expected cosine or euclidean"
            ))),
        }
    }
}

impl Distance {
    /// sentence-transformers' default margin for the metric (TripletLoss: 5 for Euclidean); 0.5 is
    /// its customary value for cosine.
    pub fn default_margin(self) -> f64 {
        match self {
            Distance::Cosine => 0.5,
            Distance::Euclidean => 5.0,
        }
    }

    fn rows(self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        match self {
            Distance::Cosine => Ok(cos_rows(x, y)?.affine(-1.0, 1.0)?),
            Distance::Euclidean => Ok(((x - y)? + 1e-6)?.sqr()?.sum(1)?.sqrt()?),
        }
    }
}

/// TripletLoss: `mean_i relu(d(a_i, p_i) - d(a_i, n_i) + margin)`.
pub fn triplet_loss(
    a: &Tensor,
    p: &Tensor,
    n: &Tensor,
    distance: Distance,
    margin: f64,
) -> Result<Tensor> {
    let terms = ((distance.rows(a, p)? - distance.rows(a, n)?)? + margin)?.relu()?;
    Ok(terms.mean_all()?)
}

/// MultipleNegativesRankingLoss: cross-entropy of `scale · cos(a_i, [p_1..p_B, n_1..n_B, ...])` with
/// target `i` (in-batch negatives plus every hard-negative column), mean over the batch.
pub fn mnrl_loss(a: &Tensor, p: &Tensor, negatives: &[Tensor], scale: f64) -> Result<Tensor> {
    let mut cands = vec![p.clone()];
    cands.extend(negatives.iter().cloned());
    let cands = Tensor::cat(&cands, 0)?;
    let scores = (cos_sim(a, &cands)? * scale)?;
    let b = a.dim(0)?;
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let lse = (scores
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?
        .squeeze(1)?;
    let target_idx = Tensor::arange(0u32, b as u32, scores.device())?;
    let target = scores.gather(&target_idx.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok((lse - target)?.mean_all()?)
}

/// Matryoshka wrapper: `Σ_k w_k · loss(first d_k dimensions)` (sentence-transformers' MatryoshkaLoss
/// with the given dimensions and weights).
pub fn matryoshka<F>(
    embeddings: &[Tensor],
    dims: &[usize],
    weights: &[f64],
    loss: F,
) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    if dims.is_empty() || dims.len() != weights.len() {
        return Err(Error::InvalidInput(
            "matryoshka: one weight per dimension".into(),
        ));
    }
    let full = embeddings[0].dim(1)?;
    let mut total: Option<Tensor> = None;
    for (&d, &w) in dims.iter().zip(weights) {
        if d == 0 || d > full {
            return Err(Error::InvalidInput(format!(
                "matryoshka dimension {d} out of range 1..={full}"
            )));
        }
        let cut: Vec<Tensor> = embeddings
            .iter()
            .map(|e| e.narrow(1, 0, d))
            .collect::<candle_core::Result<_>>()?;
        let l = (loss(&cut)? * w)?;
        total = Some(match total {
            None => l,
            Some(t) => (t + l)?,
        });
    }
    Ok(total.expect("non-empty"))
}

/// A scalar loss as f64.
pub fn value(loss: &Tensor) -> Result<f64> {
    Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}
