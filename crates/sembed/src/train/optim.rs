//! AdamW (decoupled weight decay, torch.optim.AdamW semantics), learning-rate schedules, and
//! global-norm gradient clipping.

use crate::error::Result;
use candle_core::{DType, Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW defaults, except lr (sentence-transformers' 2e-5).
    fn default() -> Self {
        AdamWConfig {
            lr: 2e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One parameter's optimiser state.
pub struct ParamState {
    pub m: Tensor,
    pub v: Tensor,
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub params: Vec<(String, Var)>,
    pub state: Vec<ParamState>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let state = params
            .iter()
            .map(|(_, v)| {
                Ok(ParamState {
                    m: v.as_tensor().zeros_like()?.to_dtype(DType::F32)?,
                    v: v.as_tensor().zeros_like()?.to_dtype(DType::F32)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            config,
            params,
            state,
            step: 0,
        })
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `params[i]` (None: no gradient).
    ///
    /// torch.optim.AdamW: `p ← p·(1 − lr·λ)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
    /// `p ← p − lr·(m/(1−β1ᵗ)) / (sqrt(v/(1−β2ᵗ)) + ε)`.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (((_, var), st), g) in self.params.iter().zip(self.state.iter_mut()).zip(grads) {
            let p = var.as_tensor();
            let Some(g) = g else {
                // torch skips parameters without a gradient entirely (no decay, no moment update).
                continue;
            };
            let dtype = p.dtype();
            let g = g.to_dtype(DType::F32)?;
            let pf = p.to_dtype(DType::F32)?;
            st.m = ((&st.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            st.v = ((&st.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&st.v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&st.m / bc1)? / denom)?;
            let decayed = (pf * (1.0 - lr * c.weight_decay))?;
            let next = (decayed - (update * lr)?)?;
            var.set(&next.to_dtype(dtype)?)?;
        }
        Ok(())
    }
}

/// Learning-rate schedule: linear warmup from 0, then linear or cosine decay to 0 (the
/// transformers `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup` shapes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    /// Learning rate for the update with 0-based index `step`.
    pub fn lr(&self, step: u64) -> f64 {
        let s = step as f64;
        if step < self.warmup_steps {
            return self.base_lr * s / self.warmup_steps.max(1) as f64;
        }
        let span = (self.total_steps.saturating_sub(self.warmup_steps)).max(1) as f64;
        let progress = ((s - self.warmup_steps as f64) / span).clamp(0.0, 1.0);
        match self.decay {
            Decay::Constant => self.base_lr,
            Decay::Linear => self.base_lr * (1.0 - progress),
            Decay::Cosine => self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// Gradients of `params` from one backward pass, aligned with `params`.
pub fn collect(
    params: &[(String, Var)],
    grads: &candle_core::backprop::GradStore,
) -> Vec<Option<Tensor>> {
    params
        .iter()
        .map(|(_, v)| grads.get(v.as_tensor()).cloned())
        .collect()
}

/// `acc += g` entry by entry (gradient accumulation).
pub fn accumulate(acc: &mut [Option<Tensor>], g: Vec<Option<Tensor>>) -> Result<()> {
    for (a, g) in acc.iter_mut().zip(g) {
        *a = match (a.take(), g) {
            (Some(a), Some(g)) => Some((a + g)?),
            (a, g) => a.or(g),
        };
    }
    Ok(())
}

/// Global L2 norm of the gradients.
pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.iter().flatten() {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scale all gradients so their global norm is at most `max_norm` (torch `clip_grad_norm_`:
/// factor `max_norm / (norm + 1e-6)` when below 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * factor)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// AdamW against the textbook recurrence computed by hand in f64 for three steps.
    #[test]
    fn adamw_matches_the_formula() {
        let dev = Device::Cpu;
        let p0 = [0.5f64, -1.0, 2.0];
        let var = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap()).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vec![("p".into(), var.clone())], cfg).unwrap();
        let (mut p, mut m, mut v) = (p0.to_vec(), [0.0f64; 3], [0.0f64; 3]);
        for t in 1..=3 {
            // loss = Σ (p_i^2) * (i+1) → g_i = 2 (i+1) p_i
            let w = Tensor::new(&[1.0f32, 2.0, 3.0], &dev).unwrap();
            let loss = (var.as_tensor().sqr().unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = collect(&opt.params, &loss.backward().unwrap());
            let lr = 0.1 / t as f64;
            opt.step(&grads, lr).unwrap();
            for i in 0..3 {
                let g = 2.0 * (i as f64 + 1.0) * p[i];
                p[i] *= 1.0 - lr * cfg.weight_decay;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.99 * v[i] + 0.01 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.99f64.powi(t));
                p[i] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..3 {
            assert!(
                (got[i] as f64 - p[i]).abs() < 1e-6,
                "{i}: {} vs {}",
                got[i],
                p[i]
            );
        }
    }

    #[test]
    fn schedules_follow_the_transformers_shapes() {
        let s = Schedule {
            base_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            decay: Decay::Linear,
        };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr(110), 0.0);
        let c = Schedule {
            decay: Decay::Cosine,
            ..s
        };
        assert!((c.lr(60) - 0.5).abs() < 1e-12);
        assert!((c.lr(35) - 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos())).abs() < 1e-12);
        let k = Schedule {
            decay: Decay::Constant,
            ..s
        };
        assert_eq!(k.lr(100), 1.0);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[3.0f32], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[4.0f32], &dev).unwrap()).unwrap();
        // loss = a·3 + b·4 → grads (3, 4), norm 5.
        let loss = ((a.as_tensor() * 3.0).unwrap() + (b.as_tensor() * 4.0).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let mut grads = collect(&params, &loss.backward().unwrap());
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let ga = grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        let gb = grads[1].as_ref().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((ga - 3.0 / (5.0 + 1e-6)).abs() < 1e-6 && (gb - 4.0 / (5.0 + 1e-6)).abs() < 1e-6);
        assert!((grad_norm(&grads).unwrap() - 1.0).abs() < 1e-5);
        // Below the threshold nothing changes.
        let n = clip_grad_norm(&mut grads, 10.0).unwrap();
        assert!((n - 1.0).abs() < 1e-5);
        let ga2 = grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        let gb2 = grads[1].as_ref().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        assert_eq!((ga2, gb2), (ga, gb), "no rescale below the threshold");
        // Accumulation adds entry by entry.
        let mut acc = vec![None, Some(Tensor::new(&[1.0f32], &dev).unwrap())];
        accumulate(
            &mut acc,
            vec![
                Some(Tensor::new(&[2.0f32], &dev).unwrap()),
                Some(Tensor::new(&[3.0f32], &dev).unwrap()),
            ],
        )
        .unwrap();
        assert_eq!(
            acc[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![2.0]
        );
        assert_eq!(
            acc[1].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![4.0]
        );
    }
}
