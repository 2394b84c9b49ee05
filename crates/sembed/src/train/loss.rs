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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t<const N: usize>(rows: &[[f32; 4]; N]) -> Tensor {
        Tensor::new(rows, &Device::Cpu).unwrap()
    }

    /// Triplet and MNRL against values computed by hand (numpy-style, independent of the code).
    #[test]
    fn losses_match_hand_computation() {
        let a = t(&[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]);
        let p = t(&[[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]);
        let n = t(&[[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]);
        // cos(a0,p0)=1/√2, cos(a0,n0)=0; cos(a1,p1)=1, cos(a1,n1)=0.
        let s = std::f64::consts::FRAC_1_SQRT_2;
        // Margin 1.5 so that both hinges are active (with 0.5 both would be 0 and any loss that
        // returned 0 would pass): d(a,p) − d(a,n) + margin, cosine distance d = 1 − cos.
        let want = (((1.0 - s) - 1.0 + 1.5f64).max(0.0) + (0.0 - 1.0 + 1.5f64).max(0.0)) / 2.0;
        assert!(want > 0.5);
        let got = value(&triplet_loss(&a, &p, &n, Distance::Cosine, 1.5).unwrap()).unwrap();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // MNRL row 0: scores 20·[s, 1/√2·0(p1·a0=0), 0, 1]: candidates p0, p1, n0, n1.
        let rows = [[20.0 * s, 0.0, 0.0, 20.0], [20.0 * s, 20.0, 0.0, 0.0]];
        let want: f64 = rows
            .iter()
            .enumerate()
            .map(|(i, r)| r.iter().map(|x| x.exp()).sum::<f64>().ln() - r[i])
            .sum::<f64>()
            / 2.0;
        let got = value(&mnrl_loss(&a, &p, std::slice::from_ref(&n), 20.0).unwrap()).unwrap();
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }

    /// The Matryoshka wrapper is the weighted sum of the inner loss on truncated embeddings.
    #[test]
    fn matryoshka_is_the_weighted_sum_over_truncations() {
        let a = t(&[[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 1.0, 0.0]]);
        let p = t(&[[0.9, 2.1, 0.0, 1.0], [0.1, 0.0, 1.0, 0.5]]);
        let inner = |e: &[Tensor]| mnrl_loss(&e[0], &e[1], &[], 20.0);
        let got = value(&matryoshka(&[a.clone(), p.clone()], &[2, 4], &[1.0, 0.5], inner).unwrap())
            .unwrap();
        let l2 = value(
            &mnrl_loss(
                &a.narrow(1, 0, 2).unwrap(),
                &p.narrow(1, 0, 2).unwrap(),
                &[],
                20.0,
            )
            .unwrap(),
        )
        .unwrap();
        let l4 = value(&mnrl_loss(&a, &p, &[], 20.0).unwrap()).unwrap();
        assert!((got - (l2 + 0.5 * l4)).abs() < 1e-6);
        assert!(matryoshka(&[a, p], &[5], &[1.0], inner).is_err());
    }
}
