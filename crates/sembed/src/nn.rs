//! Building blocks shared by every architecture, written only with candle ops that record gradients
//! (matmul, broadcast arithmetic, exp, sum, sqrt, gelu_erf, silu, index_select). candle-nn's fused
//! `softmax_last_dim`, `layer_norm`, `rms_norm` and `rope` kernels are deliberately not used: they
//! record no gradient, and the training path runs through exactly these functions.
//!
//! Norms and softmax compute in f32 when the compute dtype is narrower (as upstream does), and in f64
//! for f64 models (so that a float64 run is a float64 reference).

use crate::error::Result;
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor, D};

/// Additive mask value for disallowed attention positions. Finite on purpose: a row whose keys are all
/// masked (a pad query under causal attention) must stay finite, or NaN would leak through `0 * NaN`.
pub const MASK_VALUE: f32 = -1e9;

/// Dropout for training. A forward pass runs inside [`with_dropout`] to enable it; outside (inference,
/// gradient checks) every dropout is the identity. Masks come from a seeded generator, so a training
/// step is reproducible (resume gives the same result).
pub struct DropoutCtx {
    /// Replaces every configured probability (`--dropout P`); None keeps the model's own.
    pub p_override: Option<f64>,
    rng: std::sync::Mutex<crate::rng::SplitMix64>,
}

impl DropoutCtx {
    pub fn new(p_override: Option<f64>, seed: u64) -> Self {
        DropoutCtx {
            p_override,
            rng: std::sync::Mutex::new(crate::rng::SplitMix64(seed)),
        }
    }
}

thread_local! {
    static DROPOUT: std::cell::RefCell<Option<std::sync::Arc<DropoutCtx>>> = const { std::cell::RefCell::new(None) };
}

/// Run `f` with dropout enabled by `ctx` on this thread.
pub fn with_dropout<T>(ctx: std::sync::Arc<DropoutCtx>, f: impl FnOnce() -> T) -> T {
    let previous = DROPOUT.with(|d| d.replace(Some(ctx)));
    let out = f();
    DROPOUT.with(|d| *d.borrow_mut() = previous);
    out
}

/// The probability [`dropout`] would use for a configured `p` on this thread: None when dropout is
/// off (no generator), else the override or `p`.
pub(crate) fn dropout_probability(p: f64) -> Option<f64> {
    DROPOUT.with(|d| d.borrow().as_ref().map(|ctx| ctx.p_override.unwrap_or(p)))
}

/// The dropout generator's state on this thread (None when dropout is off): the fast training pass
/// computes candle's masks from it.
pub(crate) fn dropout_state() -> Option<u64> {
    DROPOUT.with(|d| {
        d.borrow()
            .as_ref()
            .map(|ctx| ctx.rng.lock().expect("not poisoned").0)
    })
}

/// Advance this thread's dropout generator by `draws` values, as if [`dropout`] had drawn them.
pub(crate) fn advance_dropout(draws: u64) {
    DROPOUT.with(|d| {
        if let Some(ctx) = d.borrow().as_ref() {
            let mut rng = ctx.rng.lock().expect("not poisoned");
            rng.0 = rng.0.wrapping_add(draws.wrapping_mul(crate::rng::GAMMA));
        }
    })
}

/// Inverted dropout with the configured probability `p` (or the override); identity when dropout is
/// not enabled or the probability is 0. Differentiable: the mask is a constant.
pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
    let Some(ctx) = DROPOUT.with(|d| d.borrow().clone()) else {
        return Ok(x.clone());
    };
    let p = ctx.p_override.unwrap_or(p);
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return Ok(x.zeros_like()?);
    }
    let keep = 1.0 / (1.0 - p);
    let n = x.elem_count();
    let mask: Vec<f32> = {
        let mut rng = ctx.rng.lock().expect("not poisoned");
        (0..n)
            .map(|_| if rng.next_f64() < p { 0.0 } else { keep as f32 })
            .collect()
    };
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

// ---------------------------------------------------------------------------------------------
// Activation checkpointing

/// Gradients of the parameters inside checkpointed layers, by tensor id, summed over every
/// recomputation of a [`with_checkpointing`] run.
pub type CheckpointGrads = std::collections::HashMap<candle_core::TensorId, Tensor>;

thread_local! {
    static CHECKPOINT: std::cell::RefCell<Option<CheckpointGrads>> = const { std::cell::RefCell::new(None) };
}

/// Run `f` (a training forward pass and its backward) with activation checkpointing: each layer that
/// goes through [`checkpoint`] keeps only its input; its activations are recomputed, one layer at a
/// time, in the backward pass. Returns `f`'s result and the gradients of the parameters inside the
/// checkpointed layers, which the outer backward does not see: add them to its gradients.
pub fn with_checkpointing<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, CheckpointGrads)> {
    let previous = CHECKPOINT.with(|c| c.replace(Some(CheckpointGrads::new())));
    let out = f();
    let grads = CHECKPOINT.with(|c| c.replace(previous)).expect("set above");
    Ok((out?, grads))
}

static RECOMPUTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many checkpointed layers this process has recomputed in backward passes (reports, tests).
pub fn recomputed_layers() -> usize {
    RECOMPUTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Count one recomputed layer (the fast training pass recomputes its own).
pub(crate) fn count_recomputed_layer() {
    RECOMPUTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Whether layers are checkpointed on this thread (inside [`with_checkpointing`]).
pub fn checkpointing() -> bool {
    CHECKPOINT.with(|c| c.borrow().is_some())
}

/// A layer as a function of its input, owning what else it reads (weights, mask, rotary tables).
pub type LayerFn = std::sync::Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `layer(x)`; inside [`with_checkpointing`], without keeping the layer's activations: they are
/// recomputed from `x` when the backward pass reaches the layer, with the same dropout masks.
pub fn checkpoint(x: &Tensor, layer: LayerFn) -> Result<Tensor> {
    if !checkpointing() {
        return layer(x);
    }
    // The backward pass only reaches an op whose input records gradients. With frozen embeddings
    // (LoRA) the first layer's input does not: tie it to a zero variable.
    let x = if x.track_op() {
        x.clone()
    } else {
        let zero = candle_core::Var::zeros((), x.dtype(), x.device())?;
        x.broadcast_add(zero.as_tensor())?
    };
    let dropout = DROPOUT.with(|d| d.borrow().clone()).map(|ctx| {
        let state = ctx.rng.lock().expect("not poisoned").0;
        (ctx.p_override, state)
    });
    Ok(x.apply_op1(Checkpoint { layer, dropout })?)
}

struct Checkpoint {
    layer: LayerFn,
    /// The dropout override and generator state when the layer first ran, to replay its masks.
    dropout: Option<(Option<f64>, u64)>,
}

impl Checkpoint {
    /// The layer again, with the masks it drew the first time.
    fn replay(&self, x: &Tensor) -> Result<Tensor> {
        let ctx = self.dropout.map(|(p, state)| {
            std::sync::Arc::new(DropoutCtx {
                p_override: p,
                rng: std::sync::Mutex::new(crate::rng::SplitMix64(state)),
            })
        });
        let previous = DROPOUT.with(|d| d.replace(ctx));
        let out = (self.layer)(x);
        DROPOUT.with(|d| *d.borrow_mut() = previous);
        out
    }
}

fn candle_err(e: crate::error::Error) -> candle_core::Error {
    match e {
        crate::error::Error::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

impl candle_core::CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    /// The layer on the input; its graph (the activations) is dropped with the result's.
    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        cpu_apply("checkpoint", storage, layout, &|x| {
            (self.layer)(x).map_err(candle_err)
        })
    }

    /// Recompute the layer with its graph from the saved input, back-propagate the output's
    /// gradient through it: the input's gradient goes on; the parameters' go to the store.
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        RECOMPUTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let x = candle_core::Var::from_tensor(&arg.detach())?;
        let y = self.replay(x.as_tensor()).map_err(candle_err)?;
        // The trainable tensors this layer reads. The backward pass also leaves gradients for the
        // constants it met (frozen weights, tables, masks); keeping those would hold memory per layer.
        let params: Vec<candle_core::TensorId> = y
            .sorted_nodes()
            .into_iter()
            .filter(|t| t.is_variable() && t.id() != x.as_tensor().id())
            .map(|t| t.id())
            .collect();
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        // Detached: the gradient would otherwise carry the recomputed layer's whole backward graph
        // into the outer pass, and every layer's would stay alive until it ends.
        let gx = grads.get(x.as_tensor()).map(Tensor::detach);
        CHECKPOINT.with(|c| -> candle_core::Result<()> {
            if let Some(store) = c.borrow_mut().as_mut() {
                for id in params {
                    let Some(g) = grads.get_id(id) else { continue };
                    let g = g.detach();
                    match store.remove(&id) {
                        Some(prev) => store.insert(id, (prev + g)?.detach()),
                        None => store.insert(id, g),
                    };
                }
            }
            Ok(())
        })?;
        Ok(gx)
    }
}

thread_local! {
    static FAST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` as inference: norms and softmax use candle-nn's fused kernels (no gradient), which are
/// several times faster than the op-by-op versions. Training never runs inside this.
pub fn inference<T>(f: impl FnOnce() -> T) -> T {
    let previous = FAST.with(|c| c.replace(true));
    let out = f();
    FAST.with(|c| c.set(previous));
    out
}

/// Whether the fused kernels may be used for `x` (inference, and not f64, which they do not cover).
fn fast(x: &Tensor) -> bool {
    FAST.with(|c| c.get()) && x.dtype() != DType::F64
}

/// The dtype norms and softmax compute in: f32, or f64 for f64 tensors.
fn wide(x: &Tensor) -> Result<Tensor> {
    Ok(match x.dtype() {
        DType::F64 => x.clone(),
        _ => x.to_dtype(DType::F32)?,
    })
}

/// `y = x W^T + b`.
/// With a LoRA adapter `(A [r, in], B [out, r], scale)`: `+ (x Aᵀ) Bᵀ · scale`. A `frozen` weight
/// (LoRA training) multiplies through [`FrozenMatmul`], whose backward gives the input gradient only.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<(Tensor, Tensor, f64)>,
    /// Dropout on the adapter's input (PEFT `lora_dropout`).
    pub lora_dropout: f64,
    pub frozen: bool,
}

/// `x · Wᵀ` for a weight that is not trained. candle's matmul backward computes (and keeps until the
/// end of the backward pass) a gradient for both operands, even a constant one: for a frozen 1.5B
/// model that is 6 GB of weight gradients nobody reads, plus a third more compute. This op's backward
/// returns only `∂L/∂x = ∂L/∂y · W`.
#[derive(Clone)]
pub struct FrozenMatmul {
    weight: Tensor,
}

/// A custom op's CPU forward as tensor code: `f` on the (contiguous) input, its result as storage.
fn cpu_apply(
    op: &str,
    storage: &candle_core::CpuStorage,
    layout: &candle_core::Layout,
    f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    use candle_core::CpuStorage as S;
    fn run<T: candle_core::WithDType>(
        op: &str,
        s: &[T],
        layout: &candle_core::Layout,
        f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<(Vec<T>, candle_core::Shape)> {
        let Some((a, b)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg(format!(
                "{op}: non-contiguous input"
            )));
        };
        let y = f(&Tensor::from_slice(&s[a..b], layout.shape(), &Device::Cpu)?)?;
        let shape = y.shape().clone();
        Ok((y.flatten_all()?.to_vec1::<T>()?, shape))
    }
    Ok(match storage {
        S::F32(s) => {
            let (v, sh) = run(op, s, layout, f)?;
            (S::F32(v), sh)
        }
        S::F64(s) => {
            let (v, sh) = run(op, s, layout, f)?;
            (S::F64(v), sh)
        }
        S::F16(s) => {
            let (v, sh) = run(op, s, layout, f)?;
            (S::F16(v), sh)
        }
        S::BF16(s) => {
            let (v, sh) = run(op, s, layout, f)?;
            (S::BF16(v), sh)
        }
        _ => return Err(candle_core::Error::Msg(format!("{op}: unsupported dtype"))),
    })
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        cpu_apply("frozen-matmul", storage, layout, &|x| {
            x.matmul(&self.weight.t()?)
        })
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
}

impl Linear {
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: w.get(&[out_dim, in_dim], "weight")?,
            bias: if bias {
                Some(w.get(&[out_dim], "bias")?)
            } else {
                None
            },
            lora: w.lora_adapter(in_dim, out_dim)?,
            lora_dropout: w.lora_dropout(),
            frozen: w.frozen(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = if self.frozen {
            let dims = x.dims().to_vec();
            let rows: usize = dims[..dims.len() - 1].iter().product();
            let flat = x.reshape((rows, dims[dims.len() - 1]))?.contiguous()?;
            let y = flat.apply_op1(FrozenMatmul {
                weight: self.weight.clone(),
            })?;
            let mut out = dims;
            *out.last_mut().expect("rank ≥ 1") = self.weight.dim(0)?;
            y.reshape(out)?
        } else {
            matmul_t(x, &self.weight)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some((a, b, scale)) = &self.lora {
            let xd = dropout(x, self.lora_dropout)?;
            y = (y + (matmul_t(&matmul_t(&xd, a)?, b)? * *scale)?)?;
        }
        Ok(y)
    }
}

/// `x [.., in] · w[out, in]^T → [.., out]`, flattening the leading dimensions into one GEMM.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().expect("rank ≥ 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("rank ≥ 1") = w.dim(0)?;
    Ok(y.reshape(out)?)
}

/// Layer normalisation over the last dimension (biased variance, as torch).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get(&[dim], "weight")?,
            bias: w.get(&[dim], "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fast(x) {
            return Ok(candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            )?);
        }
        let dtype = x.dtype();
        let x = wide(x)?;
        let w = x.dtype();
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = normed
            .broadcast_mul(&self.weight.to_dtype(w)?)?
            .broadcast_add(&self.bias.to_dtype(w)?)?;
        Ok(y.to_dtype(dtype)?)
    }
}

/// RMS normalisation over the last dimension (Qwen: computed in f32, weight applied after the cast back).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(&[dim], "weight")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fast(x) {
            return Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &self.weight,
                self.eps as f32,
            )?);
        }
        let dtype = x.dtype();
        let xf = wide(x)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf
            .broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// Softmax over the last dimension, in f32 (f64 for f64 input).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fast(x) {
        return Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?);
    }
    let dtype = x.dtype();
    let x = wide(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?.to_dtype(dtype)?)
}

/// Look up rows of `table [vocab, dim]` for `ids [..]` → `[.., dim]`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    let flat = ids.flatten_all()?;
    let rows = table.index_select(&flat, 0)?;
    dims.push(table.dim(1)?);
    Ok(rows.reshape(dims)?)
}

/// Rotary position tables for positions `[B, S]` (u32): `(cos, sin)`, each `[B, 1, S, head_dim]`,
/// non-interleaved layout (the two halves repeat the same frequencies), inv_freq = θ^(-2i/d) in f32.
pub fn rope_tables(
    positions: &Tensor,
    head_dim: usize,
    theta: f64,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let device = positions.device();
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, 1, half), device)?;
    let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // [B, S, 1]
    let freqs = pos.broadcast_mul(&inv_freq)?; // [B, S, half]
    let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?; // [B, 1, S, d]
    Ok((emb.cos()?.to_dtype(dtype)?, emb.sin()?.to_dtype(dtype)?))
}

/// Apply rotary embeddings to `x [B, H, S, d]`: `x·cos + rotate_half(x)·sin`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// Additive attention bias `[B, 1, 1|S, S]` from a key mask `[B, S]` (1 = real token), plus a causal
/// part when asked. Values are 0 or [`MASK_VALUE`] (Jina passes its own -10000).
pub fn attention_bias(mask: &Tensor, causal: bool, mask_value: f32) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let keys = mask
        .to_dtype(DType::F32)?
        .affine(-(mask_value as f64), mask_value as f64)?; // 0 or mask_value
    let keys = keys.reshape((b, 1, 1, s))?;
    if !causal {
        return Ok(keys);
    }
    let causal: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { mask_value } else { 0.0 }))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, s, s), mask.device())?;
    Ok(keys.broadcast_add(&causal)?)
}

/// Scaled dot-product attention. `q [B, H, S, d]`, `k`, `v` `[B, H, S, d]`, `bias` broadcastable to
/// `[B, H, S, S]` (f32). Returns `[B, S, H·d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    dropout_p: f64,
) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = wide(&scores)?;
    let scores = scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?;
    let probs = dropout(&softmax_last_dim(&scores)?, dropout_p)?.to_dtype(v.dtype())?;
    let out = probs.matmul(&v.contiguous()?)?; // [B, H, S, d]
    Ok(out.transpose(1, 2)?.reshape((b, s, h * d))?)
}

/// Repeat each of `n_kv` heads `rep` times: `[B, n_kv, S, d] → [B, n_kv·rep, S, d]`, so that query head
/// `h` meets kv head `h / rep` (grouped-query attention).
pub fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, n, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, n, rep, s, d))?
        .contiguous()?
        .reshape((b, n * rep, s, d))?)
}

/// Split `[B, S, H·d]` into heads `[B, H, S, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    Ok(x.reshape((b, s, heads, hd / heads))?.transpose(1, 2)?)
}

/// Where the real tokens of a padded `[B, S]` batch sit, to move activations between the packed
/// layout `[T, D]` (real tokens only) and the padded grid `[B, S, D]`. Both moves are `index_select`,
/// which records gradients.
#[derive(Debug, Clone)]
pub struct Packing {
    pub b: usize,
    pub s: usize,
    pub tokens: usize,
    /// `[B·S]`: the packed row of each grid slot, or `T` (a zero row) for padding.
    to_padded: Tensor,
    /// `[T]`: the grid slot of each packed row.
    to_packed: Tensor,
}

impl Packing {
    pub fn new(mask: &[Vec<u32>], device: &Device) -> Result<Self> {
        let b = mask.len();
        let s = mask.first().map_or(0, |r| r.len());
        let tokens: usize = mask
            .iter()
            .map(|r| r.iter().filter(|&&m| m != 0).count())
            .sum();
        let mut to_padded = Vec::with_capacity(b * s);
        let mut to_packed = Vec::with_capacity(tokens);
        let mut next = 0u32;
        for (row, m) in mask.iter().enumerate() {
            for (col, &v) in m.iter().enumerate() {
                if v != 0 {
                    to_padded.push(next);
                    to_packed.push((row * s + col) as u32);
                    next += 1;
                } else {
                    to_padded.push(tokens as u32);
                }
            }
        }
        Ok(Packing {
            b,
            s,
            tokens,
            to_padded: Tensor::from_vec(to_padded, b * s, device)?,
            to_packed: Tensor::from_vec(to_packed, tokens, device)?,
        })
    }

    /// `[T, D]` → `[B, S, D]`, zeros at padding.
    pub fn pad(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(1)?;
        let zero = Tensor::zeros((1, d), x.dtype(), x.device())?;
        let extended = Tensor::cat(&[x, &zero], 0)?;
        Ok(extended
            .index_select(&self.to_padded, 0)?
            .reshape((self.b, self.s, d))?)
    }

    /// `[B, S, D]` → `[T, D]`.
    pub fn unpad(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(2)?;
        Ok(x.reshape((self.b * self.s, d))?
            .index_select(&self.to_packed, 0)?)
    }
}

/// Multi-head attention on packed projections `q [T, nq·d]`, `k`, `v` `[T, nkv·d]`: padded to the
/// grid, optional rotary tables `[B, 1, S, d]`, grouped-query heads repeated, back to `[T, nq·d]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    packing: &Packing,
    nq: usize,
    nkv: usize,
    bias: &Tensor,
    rope: Option<(&Tensor, &Tensor)>,
    dropout_p: f64,
) -> Result<Tensor> {
    let mut q = split_heads(&packing.pad(q)?, nq)?;
    let mut k = split_heads(&packing.pad(k)?, nkv)?;
    let v = split_heads(&packing.pad(v)?, nkv)?;
    if let Some((cos, sin)) = rope {
        q = apply_rope(&q, cos, sin)?;
        k = apply_rope(&k, cos, sin)?;
    }
    let k = repeat_kv(&k, nq / nkv)?;
    let v = repeat_kv(&v, nq / nkv)?;
    packing.unpad(&attention(&q, &k, &v, bias, dropout_p)?)
}

/// Positions per row counted from the row's first real token: `max(0, cumsum(mask) - 1)`, `[B, S]` u32.
/// Equals 0…S-1 under right padding; under left padding it makes the result independent of the pads.
pub fn positions_from_mask(mask: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let b = mask.len();
    let s = mask.first().map_or(0, |r| r.len());
    let mut out = Vec::with_capacity(b * s);
    for row in mask {
        let mut seen = 0u32;
        for &m in row {
            seen += m;
            out.push(seen.saturating_sub(1));
        }
    }
    Ok(Tensor::from_vec(out, (b, s), device)?)
}
