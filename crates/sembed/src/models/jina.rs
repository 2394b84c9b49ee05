//! jina-embeddings-v3: XLM-RoBERTa with rotary positions (no position table), post-LN, and five task
//! LoRA adapters on every Linear and Embedding. The adapter is applied as a low-rank side path,
//! `x W^T + ((x A_t^T) B_t^T)·s`, which equals the upstream merged weight `W + (B_t A_t)·s` without
//! materialising it per task.

use super::{Batch, Encoder};
use crate::config::JinaConfig;
use crate::error::{Error, Result};
use crate::models::bert::Activation;
use crate::nn::{self, LayerNorm, Linear};
use crate::weights::Weights;
use candle_core::Tensor;

/// Jina masks padded keys with this value (not -inf); kept for parity.
const JINA_MASK: f32 = -10000.0;

#[derive(Clone)]
struct LoraLinear {
    base: Linear,
    /// `[tasks, rank, in]`
    a: Tensor,
    /// `[tasks, out, rank]`
    b: Tensor,
    scale: f64,
}

impl LoraLinear {
    fn load(w: &Weights, in_dim: usize, out_dim: usize, cfg: &JinaConfig) -> Result<Self> {
        let p = w.pp("parametrizations.weight");
        let (t, r) = (cfg.lora_adaptations.len(), cfg.lora_rank);
        Ok(LoraLinear {
            base: Linear {
                weight: p.get(&[out_dim, in_dim], "original")?,
                bias: Some(w.get(&[out_dim], "bias")?),
                // Jina carries its own task adapters; PEFT LoRA is not attached here.
                lora: None,
                lora_dropout: 0.0,
                frozen: false,
            },
            a: p.get(&[t, r, in_dim], "0.lora_A")?,
            b: p.get(&[t, out_dim, r], "0.lora_B")?,
            scale: cfg.lora_scaling(),
        })
    }

    fn forward(&self, x: &Tensor, task: Option<usize>) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match task {
            None => Ok(y),
            Some(t) => {
                let a = self.a.get(t)?;
                let b = self.b.get(t)?;
                let side = nn::matmul_t(&nn::matmul_t(x, &a)?, &b)?;
                Ok((y + (side * self.scale)?)?)
            }
        }
    }
}

struct LoraEmbedding {
    table: Tensor,
    /// `[tasks, vocab, rank]`
    a: Tensor,
    /// `[tasks, rank, dim]`
    b: Tensor,
    scale: f64,
}

impl LoraEmbedding {
    fn load(w: &Weights, rows: usize, dim: usize, cfg: &JinaConfig) -> Result<Self> {
        let p = w.pp("parametrizations.weight");
        let (t, r) = (cfg.lora_adaptations.len(), cfg.lora_rank);
        Ok(LoraEmbedding {
            table: p.get(&[rows, dim], "original")?,
            a: p.get(&[t, rows, r], "0.lora_A")?,
            b: p.get(&[t, r, dim], "0.lora_B")?,
            scale: cfg.lora_scaling(),
        })
    }

    fn forward(&self, ids: &Tensor, task: Option<usize>) -> Result<Tensor> {
        let e = nn::embedding(&self.table, ids)?;
        match task {
            None => Ok(e),
            Some(t) => {
                let a = nn::embedding(&self.a.get(t)?, ids)?; // [B, S, r]
                let side = a.broadcast_matmul(&self.b.get(t)?)?;
                Ok((e + (side * self.scale)?)?)
            }
        }
    }
}

#[derive(Clone)]
struct Layer {
    wqkv: LoraLinear,
    out_proj: LoraLinear,
    norm1: LayerNorm,
    fc1: LoraLinear,
    fc2: LoraLinear,
    norm2: LayerNorm,
}

pub struct Jina {
    word: LoraEmbedding,
    token_type: LoraEmbedding,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    cfg: JinaConfig,
    act: Activation,
}

impl Jina {
    pub fn load(cfg: &JinaConfig, w: &Weights) -> Result<Self> {
        let w = w.with_detected_prefix(
            &["roberta", ""],
            "embeddings.word_embeddings.parametrizations.weight.original",
        );
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = w.pp(format!("encoder.layers.{i}"));
            layers.push(Layer {
                wqkv: LoraLinear::load(&l.pp("mixer.Wqkv"), h, 3 * h, cfg)?,
                out_proj: LoraLinear::load(&l.pp("mixer.out_proj"), h, h, cfg)?,
                norm1: LayerNorm::load(&l.pp("norm1"), h, eps)?,
                fc1: LoraLinear::load(&l.pp("mlp.fc1"), h, cfg.intermediate_size, cfg)?,
                fc2: LoraLinear::load(&l.pp("mlp.fc2"), cfg.intermediate_size, h, cfg)?,
                norm2: LayerNorm::load(&l.pp("norm2"), h, eps)?,
            });
        }
        Ok(Jina {
            word: LoraEmbedding::load(&w.pp("embeddings.word_embeddings"), cfg.vocab_size, h, cfg)?,
            token_type: LoraEmbedding::load(
                &w.pp("embeddings.token_type_embeddings"),
                cfg.type_vocab_size,
                h,
                cfg,
            )?,
            emb_ln: LayerNorm::load(&w.pp("emb_ln"), h, eps)?,
            layers,
            cfg: cfg.clone(),
            act: Activation::parse(&cfg.hidden_act)?,
        })
    }
}

/// What every layer of one batch reads besides its input.
#[derive(Clone)]
struct LayerCtx {
    packing: nn::Packing,
    bias: Tensor,
    cos: Tensor,
    sin: Tensor,
    task: Option<usize>,
    heads: usize,
    hidden: usize,
    act: Activation,
    hidden_dropout: f64,
    attention_dropout: f64,
}

fn layer(l: &Layer, x: &Tensor, c: &LayerCtx) -> Result<Tensor> {
    let (t, h, task) = (c.packing.tokens, c.hidden, c.task);
    // Wqkv output splits as (3, heads, head_dim).
    let qkv = l.wqkv.forward(x, task)?.reshape((t, 3, h))?;
    let q = qkv.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
    let k = qkv.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?;
    let v = qkv.narrow(1, 2, 1)?.squeeze(1)?.contiguous()?;
    let a = nn::attention_packed(
        &q,
        &k,
        &v,
        &c.packing,
        c.heads,
        c.heads,
        &c.bias,
        Some((&c.cos, &c.sin)),
        c.attention_dropout,
    )?;
    let a = nn::dropout(&l.out_proj.forward(&a, task)?, c.hidden_dropout)?;
    let x = l.norm1.forward(&(x + a)?)?;
    let m = l
        .fc2
        .forward(&c.act.apply(&l.fc1.forward(&x, task)?)?, task)?;
    let m = nn::dropout(&m, c.hidden_dropout)?;
    l.norm2.forward(&(x + m)?)
}

impl Jina {
    /// The layers through the fast engine's training pass ([`crate::fast::train`], the BERT pass with
    /// rotary positions and the task adapters) when it can run them: a training run (some layer
    /// parameter a variable) on f32 CPU weights, a GELU or ReLU MLP. None: run candle's layers.
    fn fast_training(&self, x: &Tensor, batch: &Batch, c: &LayerCtx) -> Result<Option<Tensor>> {
        use crate::fast::train;
        let act = self.act.kernel();
        let Some(first) = self.layers.first() else {
            return Ok(None);
        };
        let eps = first.norm1.eps;
        if !train::supports_act(act)
            || self
                .layers
                .iter()
                .any(|l| l.norm1.eps != eps || l.norm2.eps != eps)
        {
            return Ok(None);
        }
        let mut params = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let mut p = Vec::with_capacity(20);
            for lin in [&l.wqkv, &l.out_proj] {
                let Some(b) = &lin.base.bias else {
                    return Ok(None);
                };
                p.extend([lin.base.weight.clone(), b.clone()]);
            }
            p.extend([l.norm1.weight.clone(), l.norm1.bias.clone()]);
            for lin in [&l.fc1, &l.fc2] {
                let Some(b) = &lin.base.bias else {
                    return Ok(None);
                };
                p.extend([lin.base.weight.clone(), b.clone()]);
            }
            p.extend([l.norm2.weight.clone(), l.norm2.bias.clone()]);
            if c.task.is_some() {
                for lin in [&l.wqkv, &l.out_proj, &l.fc1, &l.fc2] {
                    p.extend([lin.a.clone(), lin.b.clone()]);
                }
            }
            params.push(p);
        }
        let dims = train::Dims {
            hidden: c.hidden,
            heads: c.heads,
            inter: self.cfg.intermediate_size,
            eps: eps as f32,
            act,
        };
        let kind = train::Kind::Jina {
            task: c.task,
            tasks: self.cfg.lora_adaptations.len(),
            rank: self.cfg.lora_rank,
            scale: first.wqkv.scale as f32,
            rope_theta: self.cfg.rotary_emb_base,
        };
        train::encoder(
            x,
            params,
            kind,
            dims,
            &batch.mask_rows,
            c.attention_dropout,
            c.hidden_dropout,
        )
    }
}

impl Encoder for Jina {
    fn forward(&self, batch: &Batch) -> Result<Tensor> {
        let task = batch.adapter;
        if let Some(t) = task {
            if t >= self.cfg.lora_adaptations.len() {
                return Err(Error::InvalidInput(format!(
                    "adapter index {t} out of range"
                )));
            }
        }
        let heads = self.cfg.num_attention_heads;
        let h = self.cfg.hidden_size;
        let hd = h / heads;
        let words = self.word.forward(&batch.packed_ids, task)?;
        let tt = self
            .token_type
            .forward(&batch.packed_ids.zeros_like()?, task)?;
        let mut x = nn::dropout(
            &self.emb_ln.forward(&(words + tt)?)?,
            self.cfg.hidden_dropout_prob,
        )?;
        let (cos, sin) =
            nn::rope_tables(&batch.positions, hd, self.cfg.rotary_emb_base, x.dtype())?;
        let c = LayerCtx {
            packing: batch.packing.clone(),
            bias: nn::attention_bias(&batch.attention_mask, false, JINA_MASK)?,
            cos,
            sin,
            task,
            heads,
            hidden: h,
            act: self.act,
            hidden_dropout: self.cfg.hidden_dropout_prob,
            attention_dropout: self.cfg.attention_probs_dropout_prob,
        };
        if let Some(y) = self.fast_training(&x, batch, &c)? {
            return Ok(y);
        }
        for l in &self.layers {
            x = if nn::checkpointing() {
                let (l, c) = (l.clone(), c.clone());
                nn::checkpoint(&x, std::sync::Arc::new(move |x| layer(&l, x, &c)))?
            } else {
                layer(l, &x, &c)?
            };
        }
        Ok(x)
    }
    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }
}
