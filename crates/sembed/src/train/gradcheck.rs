//! Central finite differences against autodiff, for tests: a check of the gradient code, never a
//! substitute for it.

use crate::error::Result;
use candle_core::{DType, Tensor, Var};

/// One checked entry.
#[derive(Debug, Clone)]
pub struct Check {
    pub tensor: String,
    pub index: usize,
    pub autodiff: f64,
    pub finite_difference: f64,
}

impl Check {
    /// `|ad − fd| / max(|ad|, |fd|, floor)`.
    pub fn relative_error(&self, floor: f64) -> f64 {
        (self.autodiff - self.finite_difference).abs()
            / self
                .autodiff
                .abs()
                .max(self.finite_difference.abs())
                .max(floor)
    }
}

/// For every variable, check the entry with the largest autodiff gradient and `extra` more entries
/// picked by a fixed stride, with step `h`: `(L(θ+h) − L(θ−h)) / 2h`.
pub fn check<F>(vars: &[(String, Var)], loss: F, extra: usize, h: f64) -> Result<Vec<Check>>
where
    F: Fn() -> Result<Tensor>,
{
    let grads = loss()?.backward()?;
    let mut out = Vec::new();
    for (k, (name, var)) in vars.iter().enumerate() {
        let original = var.as_tensor().copy()?;
        let n = original.elem_count();
        let g: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => g.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?,
            None => vec![0.0; n],
        };
        let argmax = (0..n)
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap_or(0);
        let mut picks = vec![argmax];
        for j in 0..extra {
            let i = (argmax + 1 + (j + 1) * (7919 + k * 104_729)) % n.max(1);
            if !picks.contains(&i) {
                picks.push(i);
            }
        }
        let flat: Vec<f64> = original.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        for i in picks {
            let eval = |delta: f64| -> Result<f64> {
                let mut v = flat.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, original.shape(), original.device())?
                    .to_dtype(original.dtype())?;
                var.set(&t)?;
                super::loss::value(&loss()?)
            };
            let plus = eval(h)?;
            let minus = eval(-h)?;
            var.set(&original)?;
            out.push(Check {
                tensor: name.clone(),
                index: i,
                autodiff: g[i],
                finite_difference: (plus - minus) / (2.0 * h),
            });
        }
    }
    Ok(out)
}
