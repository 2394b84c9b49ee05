//! GradCache (Gao et al. 2021; sentence-transformers' `CachedMultipleNegativesRankingLoss`): the
//! gradients of an in-batch loss over a large batch, with memory bounded by a mini-batch.

use super::optim::{accumulate, collect};
use crate::error::Result;
use crate::weights::NamedVars;
use candle_core::{Tensor, Var};

/// Embeds mini-batch `k` of column `c`: `(c, k, inputs)` → `[inputs, d]`.
pub type EmbedChunk<'a, T> = &'a dyn Fn(usize, usize, &[T]) -> Result<Tensor>;

/// The loss over `columns` (each a list of inputs embedded together, e.g. anchors, positives) and
/// the gradient of every variable in `vars`, in three passes:
///
/// 1. embed every column in mini-batches of `m` inputs and keep only the embeddings, detached (each
///    mini-batch's graph, its activations, is freed at once);
/// 2. the loss over the whole batch on those embeddings, and its gradient with respect to each one;
/// 3. re-run each mini-batch with the graph and back-propagate `Σ e · ∂L/∂e` from it, summing the
///    parameter gradients.
///
/// `embed(column, k, inputs)` must give the same result for the same `(column, k)` in passes 1 and
/// 3 (dropout: seed it from those); then the gradients are exactly those of the plain loss.
pub fn grad_cache<T>(
    columns: &[&[T]],
    m: usize,
    embed: EmbedChunk<'_, T>,
    loss: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    vars: &NamedVars,
) -> Result<(f64, Vec<Option<Tensor>>)> {
    let m = m.max(1);
    let mut reps = Vec::with_capacity(columns.len());
    for (c, inputs) in columns.iter().enumerate() {
        let mut parts = Vec::new();
        for (k, chunk) in inputs.chunks(m).enumerate() {
            parts.push(embed(c, k, chunk)?.detach());
        }
        reps.push(Var::from_tensor(&Tensor::cat(&parts, 0)?)?);
    }
    let embeddings: Vec<Tensor> = reps.iter().map(|v| v.as_tensor().clone()).collect();
    let l = loss(&embeddings)?;
    let rep_grads = l.backward()?;
    let value = super::loss::value(&l)?;
    drop(l);
    drop(embeddings);
    let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
    for (c, inputs) in columns.iter().enumerate() {
        let Some(g) = rep_grads.get(reps[c].as_tensor()) else {
            continue;
        };
        for (k, chunk) in inputs.chunks(m).enumerate() {
            let gk = g.narrow(0, k * m, chunk.len())?.detach();
            let surrogate = (embed(c, k, chunk)? * gk)?.sum_all()?;
            accumulate(&mut acc, collect(vars, &surrogate.backward()?))?;
        }
    }
    Ok((value, acc))
}
