//! BERT (all-MiniLM-L6-v2 and the like): absolute positions, post-LN, GELU.

use super::{Batch, Encoder};
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::nn::{self, LayerNorm, Linear};
use crate::weights::Weights;
use candle_core::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    /// The fast engine's name of this activation.
    pub(crate) fn kernel(self) -> crate::fast::kernels::Act {
        use crate::fast::kernels::Act;
        match self {
            Activation::GeluErf => Act::GeluErf,
            Activation::Relu => Act::Relu,
            Activation::GeluTanh => Act::GeluTanh,
            Activation::Silu => Act::Silu,
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            other => return Err(Error::Unsupported(format!("activation `{other}`"))),
        })
    }
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::GeluErf => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
            Activation::Silu => x.silu()?,
        })
    }
}

#[derive(Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

pub struct Bert {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    act: Activation,
    hidden_dropout: f64,
    attention_dropout: f64,
}

impl Bert {
    pub fn load(cfg: &BertConfig, w: &Weights) -> Result<Self> {
        let w = w.with_detected_prefix(&["", "bert"], "embeddings.word_embeddings.weight");
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let e = w.pp("embeddings");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = w.pp(format!("encoder.layer.{i}"));
            layers.push(Layer {
                query: Linear::load(&l.pp("attention.self.query"), h, h, true)?,
                key: Linear::load(&l.pp("attention.self.key"), h, h, true)?,
                value: Linear::load(&l.pp("attention.self.value"), h, h, true)?,
                attn_out: Linear::load(&l.pp("attention.output.dense"), h, h, true)?,
                attn_norm: LayerNorm::load(&l.pp("attention.output.LayerNorm"), h, eps)?,
                intermediate: Linear::load(
                    &l.pp("intermediate.dense"),
                    h,
                    cfg.intermediate_size,
                    true,
                )?,
                output: Linear::load(&l.pp("output.dense"), cfg.intermediate_size, h, true)?,
                out_norm: LayerNorm::load(&l.pp("output.LayerNorm"), h, eps)?,
            });
        }
        Ok(Bert {
            word: e.get(&[cfg.vocab_size, h], "word_embeddings.weight")?,
            position: e.get(
                &[cfg.max_position_embeddings, h],
                "position_embeddings.weight",
            )?,
            token_type: e.get(&[cfg.type_vocab_size, h], "token_type_embeddings.weight")?,
            emb_norm: LayerNorm::load(&e.pp("LayerNorm"), h, eps)?,
            layers,
            heads: cfg.num_attention_heads,
            hidden: h,
            act: Activation::parse(&cfg.hidden_act)?,
            hidden_dropout: cfg.hidden_dropout_prob,
            attention_dropout: cfg.attention_probs_dropout_prob,
        })
    }
}

/// What every layer of one batch reads besides its input.
#[derive(Clone)]
struct LayerCtx {
    packing: nn::Packing,
    bias: Tensor,
    heads: usize,
    act: Activation,
    hidden_dropout: f64,
    attention_dropout: f64,
}

fn layer(l: &Layer, x: &Tensor, c: &LayerCtx) -> Result<Tensor> {
    let (q, k, v) = (l.query.forward(x)?, l.key.forward(x)?, l.value.forward(x)?);
    let a = nn::attention_packed(
        &q,
        &k,
        &v,
        &c.packing,
        c.heads,
        c.heads,
        &c.bias,
        None,
        c.attention_dropout,
    )?;
    let a = nn::dropout(&l.attn_out.forward(&a)?, c.hidden_dropout)?;
    let x = l.attn_norm.forward(&(a + x)?)?;
    let m = l
        .output
        .forward(&c.act.apply(&l.intermediate.forward(&x)?)?)?;
    let m = nn::dropout(&m, c.hidden_dropout)?;
    l.out_norm.forward(&(m + &x)?)
}

impl Bert {
    /// The layers through the fast engine's training pass ([`crate::fast::train`]) when it can run
    /// them: a training run (some layer parameter a variable) on f32 CPU weights, trained in full or
    /// frozen with PEFT LoRA adapters (no adapter dropout in effect), a GELU or ReLU MLP. None: run
    /// candle's layers.
    fn fast_training(&self, x: &Tensor, batch: &Batch) -> Result<Option<Tensor>> {
        use crate::fast::train;
        let act = self.act.kernel();
        if !train::supports_act(act) {
            return Ok(None);
        }
        fn projections(l: &Layer) -> [&Linear; 6] {
            [
                &l.query,
                &l.key,
                &l.value,
                &l.attn_out,
                &l.intermediate,
                &l.output,
            ]
        }
        let Some(first) = self.layers.first() else {
            return Ok(None);
        };
        let lora = super::lora_spec(projections(first))?;
        // In `train::LayerParams` order: q, k, v, attention output (weight, bias each), LayerNorm,
        // intermediate, output, LayerNorm; then the adapters' A and B.
        let mut params = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let mut p = Vec::with_capacity(16);
            let Some(adapters) = super::lora_params(projections(l), &lora)? else {
                return Ok(None);
            };
            let lin = |p: &mut Vec<Tensor>, lin: &Linear| {
                let Some(b) = &lin.bias else { return false };
                p.extend([lin.weight.clone(), b.clone()]);
                true
            };
            let norm = |p: &mut Vec<Tensor>, n: &LayerNorm| {
                p.extend([n.weight.clone(), n.bias.clone()]);
            };
            let ok = [&l.query, &l.key, &l.value, &l.attn_out]
                .into_iter()
                .all(|x| lin(&mut p, x));
            norm(&mut p, &l.attn_norm);
            let ok = ok && lin(&mut p, &l.intermediate) && lin(&mut p, &l.output);
            norm(&mut p, &l.out_norm);
            if !ok {
                return Ok(None);
            }
            p.extend(adapters);
            params.push(p);
        }
        let eps = first.attn_norm.eps;
        if self
            .layers
            .iter()
            .any(|l| l.out_norm.eps != eps || l.attn_norm.eps != eps)
        {
            return Ok(None);
        }
        let dims = train::Dims {
            hidden: self.hidden,
            heads: self.heads,
            inter: first.intermediate.weight.dim(0)?,
            eps: eps as f32,
            act,
        };
        train::encoder(
            x,
            params,
            train::Kind::Bert { lora },
            dims,
            &batch.mask_rows,
            self.attention_dropout,
            self.hidden_dropout,
        )
    }
}

impl Encoder for Bert {
    fn forward(&self, batch: &Batch) -> Result<Tensor> {
        let s = batch.packing.s;
        if s > self.position.dim(0)? {
            return Err(Error::InvalidInput(format!(
                "sequence of {s} tokens exceeds the model's {} positions",
                self.position.dim(0)?
            )));
        }
        let words = nn::embedding(&self.word, &batch.packed_ids)?;
        let pos = nn::embedding(&self.position, &batch.packed_positions)?;
        // token_type_ids are all 0 for single sentences.
        let tt = self.token_type.narrow(0, 0, 1)?;
        let mut x = nn::dropout(
            &self.emb_norm.forward(&(words + pos)?.broadcast_add(&tt)?)?,
            self.hidden_dropout,
        )?;
        if let Some(y) = self.fast_training(&x, batch)? {
            return Ok(y);
        }
        let c = LayerCtx {
            packing: batch.packing.clone(),
            bias: nn::attention_bias(&batch.attention_mask, false, nn::MASK_VALUE)?,
            heads: self.heads,
            act: self.act,
            hidden_dropout: self.hidden_dropout,
            attention_dropout: self.attention_dropout,
        };
        for l in &self.layers {
            x = if nn::checkpointing() {
                let (l, c) = (l.clone(), c.clone());
                nn::checkpoint(&x, std::sync::Arc::new(move |x| layer(&l, x, &c)))?
            } else {
                layer(l, &x, &c)?
            };
        }
        debug_assert_eq!(x.dims(), &[batch.packing.tokens, self.hidden]);
        Ok(x)
    }
    fn hidden_size(&self) -> usize {
        self.hidden
    }
}
