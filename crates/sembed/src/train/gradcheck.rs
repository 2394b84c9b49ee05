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

/// The cost of gradients for one model size: autodiff against finite differences.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GradCost {
    pub hidden: usize,
    pub layers: usize,
    pub batch: usize,
    pub seq: usize,
    pub parameters: usize,
    /// One loss evaluation (forward only).
    pub forward_s: f64,
    /// Loss and the full gradient by reverse-mode autodiff.
    pub autodiff_s: f64,
    /// One entry by central differences (two loss evaluations), measured on a few entries.
    pub fd_per_entry_s: f64,
    /// `parameters × fd_per_entry_s`: the full gradient by finite differences (extrapolated).
    pub fd_full_estimate_s: f64,
}

/// Gradient cost of randomly initialised BERT encoders of the given widths (`layers` layers,
/// 4×width MLP, width/16 heads, 1000-word vocabulary), on `batch` sequences of `seq` tokens, with the
/// sum of squared mean-pooled outputs as the loss.
pub fn cost_curve(
    widths: &[usize],
    layers: usize,
    batch: usize,
    seq: usize,
) -> Result<Vec<GradCost>> {
    use crate::config::{Architecture, BertConfig};
    use crate::models::Batch;
    use std::time::Instant;
    let cpu = crate::device::cpu();
    let mut out = Vec::new();
    for &hidden in widths {
        let cfg = BertConfig {
            vocab_size: 1000,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: (hidden / 16).max(1),
            intermediate_size: 4 * hidden,
            hidden_act: "gelu".into(),
            max_position_embeddings: seq.max(8),
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
        };
        let weights = crate::weights::Weights::random_trainable(hidden as u64, DType::F32, &cpu);
        let model = crate::embed::build_model(&Architecture::Bert(cfg), &weights)?;
        let vars = weights.variables();
        let parameters = vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
        let rows: Vec<Vec<u32>> = (0..batch)
            .map(|b| {
                (0..seq)
                    .map(|i| ((b * 131 + i * 17) % 1000) as u32)
                    .collect()
            })
            .collect();
        let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
        let input = Batch::new(&refs, false, None, &cpu)?;
        let loss = || -> Result<Tensor> {
            let h = model.forward(&input)?; // [T, H], rows of equal length
            Ok(h.reshape((batch, seq, hidden))?.mean(1)?.sqr()?.sum_all()?)
        };
        loss()?; // warm up
        let reps = 3;
        let t = Instant::now();
        for _ in 0..reps {
            super::loss::value(&loss()?)?;
        }
        let forward_s = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            loss()?.backward()?;
        }
        let autodiff_s = t.elapsed().as_secs_f64() / reps as f64;
        // Central differences on a few entries of the first matrix: set, evaluate, restore.
        let (_, var) = &vars[0];
        let original = var.as_tensor().copy()?;
        let flat: Vec<f32> = original.flatten_all()?.to_vec1()?;
        let entries = 3;
        let t = Instant::now();
        for e in 0..entries {
            for delta in [1e-3f32, -1e-3] {
                let mut v = flat.clone();
                v[e * 7] += delta;
                var.set(&Tensor::from_vec(v, original.shape(), &cpu)?)?;
                super::loss::value(&loss()?)?;
            }
        }
        let fd_per_entry_s = t.elapsed().as_secs_f64() / entries as f64;
        var.set(&original)?;
        out.push(GradCost {
            hidden,
            layers,
            batch,
            seq,
            parameters,
            forward_s,
            autodiff_s,
            fd_per_entry_s,
            fd_full_estimate_s: fd_per_entry_s * parameters as f64,
        });
    }
    Ok(out)
}
