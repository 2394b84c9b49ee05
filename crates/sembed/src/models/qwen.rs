//! Qwen2 (Qodo-Embed-1, gte-Qwen2) and Qwen3 (Qwen3-Embedding): pre-norm RMSNorm decoder blocks used
//! as an encoder. Bidirectional when the config says `is_causal: false`, causal otherwise; grouped-query
//! attention; Qwen3 adds an RMSNorm over each query/key head before RoPE.

use super::{Batch, Encoder};
use crate::config::QwenConfig;
use crate::error::Result;
use crate::nn::{self, Linear, RmsNorm};
use crate::weights::Weights;
use candle_core::Tensor;

#[derive(Clone)]
struct Layer {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Qwen {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    cfg: QwenConfig,
}

impl Qwen {
    pub fn load(cfg: &QwenConfig, w: &Weights) -> Result<Self> {
        let w = w.with_detected_prefix(&["", "model"], "embed_tokens.weight");
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let eps = cfg.rms_norm_eps;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = w.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            layers.push(Layer {
                input_norm: RmsNorm::load(&l.pp("input_layernorm"), h, eps)?,
                q: Linear::load(&a.pp("q_proj"), h, nq * hd, cfg.attention_bias)?,
                k: Linear::load(&a.pp("k_proj"), h, nkv * hd, cfg.attention_bias)?,
                v: Linear::load(&a.pp("v_proj"), h, nkv * hd, cfg.attention_bias)?,
                o: Linear::load(&a.pp("o_proj"), nq * hd, h, false)?,
                q_norm: if cfg.qk_norm {
                    Some(RmsNorm::load(&a.pp("q_norm"), hd, eps)?)
                } else {
                    None
                },
                k_norm: if cfg.qk_norm {
                    Some(RmsNorm::load(&a.pp("k_norm"), hd, eps)?)
                } else {
                    None
                },
                post_norm: RmsNorm::load(&l.pp("post_attention_layernorm"), h, eps)?,
                gate: Linear::load(&m.pp("gate_proj"), h, cfg.intermediate_size, false)?,
                up: Linear::load(&m.pp("up_proj"), h, cfg.intermediate_size, false)?,
                down: Linear::load(&m.pp("down_proj"), cfg.intermediate_size, h, false)?,
            });
        }
        Ok(Qwen {
            embed: w.get(&[cfg.vocab_size, h], "embed_tokens.weight")?,
            layers,
            norm: RmsNorm::load(&w.pp("norm"), h, eps)?,
            cfg: cfg.clone(),
        })
    }
}

/// What every layer of one batch reads besides its input.
#[derive(Clone)]
struct LayerCtx {
    cfg: QwenConfig,
    packing: nn::Packing,
    bias: Tensor,
    cos: Tensor,
    sin: Tensor,
}

fn layer(l: &Layer, x: &Tensor, c: &LayerCtx) -> Result<Tensor> {
    let cfg = &c.cfg;
    let (nq, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let t = c.packing.tokens;
    let hs = l.input_norm.forward(x)?;
    let mut q = l.q.forward(&hs)?;
    let mut k = l.k.forward(&hs)?;
    let v = l.v.forward(&hs)?;
    if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
        q = qn
            .forward(&q.reshape((t, nq, hd))?)?
            .reshape((t, nq * hd))?;
        k = kn
            .forward(&k.reshape((t, nkv, hd))?)?
            .reshape((t, nkv * hd))?;
    }
    let a = nn::attention_packed(
        &q,
        &k,
        &v,
        &c.packing,
        nq,
        nkv,
        &c.bias,
        Some((&c.cos, &c.sin)),
        cfg.attention_dropout,
    )?;
    let x = (x + l.o.forward(&a)?)?;
    let hs = l.post_norm.forward(&x)?;
    let m = (l.gate.forward(&hs)?.silu()? * l.up.forward(&hs)?)?;
    Ok((x + l.down.forward(&m)?)?)
}

impl Qwen {
    /// The layers through the fast engine's training pass ([`crate::fast::train_qwen`]) when it can
    /// run them: a training run (some layer parameter a variable) on f32 CPU weights, trained in
    /// full or frozen with LoRA adapters, no attention or adapter dropout in effect. None: run
    /// candle's layers.
    fn fast_training(&self, x: &Tensor, batch: &Batch) -> Result<Option<Tensor>> {
        use crate::fast::train_qwen;
        let cfg = &self.cfg;
        if nn::dropout_probability(cfg.attention_dropout).unwrap_or(0.0) > 0.0 {
            return Ok(None);
        }
        fn projections(l: &Layer) -> [&Linear; 7] {
            [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
        }
        let Some(first) = self.layers.first() else {
            return Ok(None);
        };
        let lora = super::lora_spec(projections(first))?;
        let dims = train_qwen::QwenDims {
            hidden: cfg.hidden_size,
            q_heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            inter: cfg.intermediate_size,
            eps: cfg.rms_norm_eps as f32,
            rope_theta: cfg.rope_theta,
            causal: cfg.causal,
            qkv_bias: cfg.attention_bias,
            qk_norm: cfg.qk_norm,
            lora,
        };
        let mut params = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let mut p = vec![l.input_norm.weight.clone()];
            let Some(adapters) = super::lora_params(projections(l), &dims.lora)? else {
                return Ok(None);
            };
            p.extend([l.q.weight.clone(), l.k.weight.clone(), l.v.weight.clone()]);
            for lin in [&l.q, &l.k, &l.v] {
                match (&lin.bias, dims.qkv_bias) {
                    (Some(b), true) => p.push(b.clone()),
                    (None, false) => {}
                    _ => return Ok(None),
                }
            }
            p.push(l.o.weight.clone());
            match (&l.q_norm, &l.k_norm) {
                (Some(q), Some(k)) => p.extend([q.weight.clone(), k.weight.clone()]),
                (None, None) => {}
                _ => return Ok(None),
            }
            p.extend([
                l.post_norm.weight.clone(),
                l.gate.weight.clone(),
                l.up.weight.clone(),
                l.down.weight.clone(),
            ]);
            p.extend(adapters);
            params.push(p);
        }
        train_qwen::encoder(x, params, dims, &batch.mask_rows)
    }
}

impl Encoder for Qwen {
    fn forward(&self, batch: &Batch) -> Result<Tensor> {
        let cfg = &self.cfg;
        let mut x = nn::embedding(&self.embed, &batch.packed_ids)?;
        if let Some(y) = self.fast_training(&x, batch)? {
            return self.norm.forward(&y);
        }
        let (cos, sin) =
            nn::rope_tables(&batch.positions, cfg.head_dim, cfg.rope_theta, x.dtype())?;
        let c = LayerCtx {
            cfg: cfg.clone(),
            packing: batch.packing.clone(),
            bias: nn::attention_bias(&batch.attention_mask, cfg.causal, nn::MASK_VALUE)?,
            cos,
            sin,
        };
        for l in &self.layers {
            x = if nn::checkpointing() {
                let (l, c) = (l.clone(), c.clone());
                nn::checkpoint(&x, std::sync::Arc::new(move |x| layer(&l, x, &c)))?
            } else {
                layer(l, &x, &c)?
            };
        }
        self.norm.forward(&x)
    }
    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }
}
