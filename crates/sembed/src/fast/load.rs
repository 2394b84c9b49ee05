//! Checkpoint layouts → the shared [`Transformer`]: BERT family, Qwen2 / Qwen3, jina-embeddings-v3.
//! Tensor names, prefixes and shapes are the same ones the candle models in [`crate::models`] read,
//! so both engines accept exactly the same folders.

use super::bf16::PackedBf16;
use super::kernels::Act;
use super::linear::{HalfWeights, Linear};
use super::quant::QuantLinear;
use super::transformer::{Embeddings, Layer, Lora, Norm, Proj, Spec, Table, Transformer};
use super::Precision;
use crate::config::{Architecture, BertConfig, JinaConfig, QwenConfig};
use crate::error::{Error, Result};
use crate::weights::Weights;
use candle_core::DType;

/// Whether the fast engine can run this architecture: `Err(reason)` when it cannot.
pub fn supports(arch: &Architecture) -> std::result::Result<(), String> {
    let (act, hidden, heads, kv) = match arch {
        Architecture::Bert(c) => (
            Some(c.hidden_act.as_str()),
            c.hidden_size,
            c.num_attention_heads,
            c.num_attention_heads,
        ),
        Architecture::Jina(c) => (
            Some(c.hidden_act.as_str()),
            c.hidden_size,
            c.num_attention_heads,
            c.num_attention_heads,
        ),
        Architecture::Qwen(c) => (
            None,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
        ),
    };
    if let Some(a) = act {
        activation(a)?;
    }
    if heads == 0 || kv == 0 || heads % kv != 0 {
        return Err(format!(
            "{heads} query heads do not group over {kv} key/value heads"
        ));
    }
    if let Architecture::Qwen(c) = arch {
        if c.head_dim % 2 != 0 {
            return Err(format!(
                "odd head dimension {} with rotary positions",
                c.head_dim
            ));
        }
    } else if hidden % heads != 0
        || (matches!(arch, Architecture::Jina(_)) && (hidden / heads) % 2 != 0)
    {
        return Err(format!(
            "hidden size {hidden} does not split into {heads} heads"
        ));
    }
    Ok(())
}

fn activation(name: &str) -> std::result::Result<Act, String> {
    Ok(match name {
        "gelu" => Act::GeluErf,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
        "relu" => Act::Relu,
        "silu" | "swish" => Act::Silu,
        other => return Err(format!("activation `{other}`")),
    })
}

/// Load the model `arch` describes from `w` (read in f32; converted here to `precision`).
pub fn load(arch: &Architecture, w: &Weights, precision: Precision) -> Result<Transformer> {
    supports(arch).map_err(|r| Error::Unsupported(format!("fast engine: {r}")))?;
    super::cpu::check()?;
    // Outlier-feature decomposition for int8: on for the decoders, whose trained checkpoints grow
    // massive-activation channels; off for the encoders, where it costs ~10% of int8 speed and
    // measured retrieval quality did not change (see quant.rs). SEMBED_INT8_OUTLIERS overrides.
    let outliers = super::quant::outliers_enabled(matches!(arch, Architecture::Qwen(_)));
    let l = Loader {
        precision,
        outliers,
    };
    match arch {
        Architecture::Bert(c) => l.bert(c, w),
        Architecture::Qwen(c) => l.qwen(c, w),
        Architecture::Jina(c) => l.jina(c, w),
    }
}

struct Loader {
    precision: Precision,
    outliers: bool,
}

fn host(w: &Weights, shape: &[usize], name: &str) -> Result<Vec<f32>> {
    Ok(w.get(shape, name)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

impl Loader {
    /// A projection from PyTorch-layout weight rows (`[out, in]`), in the loader's precision.
    fn linear(&self, wt: Vec<f32>, out: usize, inp: usize) -> Result<Linear> {
        Ok(match self.precision {
            Precision::F32 => Linear::f32_from_torch(&wt, out, inp),
            Precision::Int8 => {
                Linear::Int8(QuantLinear::from_torch(&wt, out, inp).with_outliers(self.outliers))
            }
            // bf16 arithmetic where the CPU has bf16 dot products (weights rounded to nearest
            // even, as `Tensor::to_dtype` and PyTorch's `.to(bfloat16)` do)...
            Precision::Bf16 if super::cpu::active().has_bf16() => {
                Linear::Bf16(PackedBf16::from_torch(&wt, out, inp))
            }
            // ...else bf16 weights widened to f32 inside the projection.
            Precision::Bf16 => Linear::Half(HalfWeights::Bf16 {
                w: wt.iter().map(|&v| half::bf16::from_f32(v)).collect(),
                k: inp,
                n: out,
            }),
            Precision::F16 => Linear::Half(HalfWeights::F16 {
                w: wt.iter().map(|&v| half::f16::from_f32(v)).collect(),
                k: inp,
                n: out,
            }),
        })
    }

    fn table(&self, w: &Weights, shape: &[usize], name: &str) -> Result<Table> {
        let t = w.get(shape, name)?.flatten_all()?;
        Ok(match self.precision {
            Precision::Bf16 => Table::Bf16(t.to_dtype(DType::BF16)?.to_vec1()?),
            Precision::F16 => Table::F16(t.to_dtype(DType::F16)?.to_vec1()?),
            Precision::F32 | Precision::Int8 => Table::F32(t.to_dtype(DType::F32)?.to_vec1()?),
        })
    }

    /// A projection from several `[out_i, in]` weights stacked along the outputs (fused q/k/v,
    /// gate/up), with their biases when `bias`.
    fn stacked(&self, parts: &[(&Weights, usize)], inp: usize, bias: bool) -> Result<Proj> {
        let out: usize = parts.iter().map(|(_, o)| o).sum();
        let mut wt = Vec::with_capacity(out * inp);
        let mut b = Vec::with_capacity(out);
        for (p, o) in parts {
            wt.extend(host(p, &[*o, inp], "weight")?);
            if bias {
                b.extend(host(p, &[*o], "bias")?);
            }
        }
        Ok(Proj {
            lin: self.linear(wt, out, inp)?,
            bias: bias.then_some(b),
            lora: None,
            inp,
            out,
        })
    }

    fn layer_norm(&self, w: &Weights, h: usize) -> Result<Norm> {
        Ok(Norm::Layer {
            w: host(w, &[h], "weight")?,
            b: host(w, &[h], "bias")?,
        })
    }

    fn rms_norm(&self, w: &Weights, h: usize) -> Result<Norm> {
        Ok(Norm::Rms {
            w: host(w, &[h], "weight")?,
        })
    }

    fn bert(&self, cfg: &BertConfig, w: &Weights) -> Result<Transformer> {
        let w = w.with_detected_prefix(&["", "bert"], "embeddings.word_embeddings.weight");
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let e = w.pp("embeddings");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for n in 0..cfg.num_hidden_layers {
            let l = w.pp(format!("encoder.layer.{n}"));
            let a = l.pp("attention.self");
            let (q, k, v) = (a.pp("query"), a.pp("key"), a.pp("value"));
            layers.push(Layer {
                qkv: self.stacked(&[(&q, h), (&k, h), (&v, h)], h, true)?,
                q_norm: None,
                k_norm: None,
                o: self.stacked(&[(&l.pp("attention.output.dense"), h)], h, true)?,
                norm1: self.layer_norm(&l.pp("attention.output.LayerNorm"), h)?,
                up: self.stacked(&[(&l.pp("intermediate.dense"), i)], h, true)?,
                down: self.stacked(&[(&l.pp("output.dense"), h)], i, true)?,
                norm2: self.layer_norm(&l.pp("output.LayerNorm"), h)?,
            });
        }
        let token_type = host(
            &e,
            &[cfg.type_vocab_size, h],
            "token_type_embeddings.weight",
        )?;
        Ok(Transformer {
            spec: Spec {
                arch: "bert",
                hidden: h,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_attention_heads,
                head_dim: h / cfg.num_attention_heads,
                inter: i,
                pre_norm: false,
                rope_theta: None,
                causal: false,
                gated: false,
                act: activation(&cfg.hidden_act).map_err(Error::Unsupported)?,
                eps: cfg.layer_norm_eps as f32,
                max_positions: cfg.max_position_embeddings,
                tasks: 0,
            },
            emb: Embeddings {
                word: self.table(&e, &[cfg.vocab_size, h], "word_embeddings.weight")?,
                vocab: cfg.vocab_size,
                position: Some(host(
                    &e,
                    &[cfg.max_position_embeddings, h],
                    "position_embeddings.weight",
                )?),
                type0: Some(token_type[..h].to_vec()),
                word_lora: None,
                type0_lora: None,
                norm: Some(self.layer_norm(&e.pp("LayerNorm"), h)?),
            },
            layers,
            final_norm: None,
            precision: self.precision,
        })
    }

    fn qwen(&self, cfg: &QwenConfig, w: &Weights) -> Result<Transformer> {
        let w = w.with_detected_prefix(&["", "model"], "embed_tokens.weight");
        let (h, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for n in 0..cfg.num_hidden_layers {
            let l = w.pp(format!("layers.{n}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            let (q, k, v) = (a.pp("q_proj"), a.pp("k_proj"), a.pp("v_proj"));
            let norm = |name: &str| -> Result<Option<Vec<f32>>> {
                Ok(if cfg.qk_norm {
                    Some(host(&a.pp(name), &[hd], "weight")?)
                } else {
                    None
                })
            };
            layers.push(Layer {
                qkv: self.stacked(
                    &[(&q, nq * hd), (&k, nkv * hd), (&v, nkv * hd)],
                    h,
                    cfg.attention_bias,
                )?,
                q_norm: norm("q_norm")?,
                k_norm: norm("k_norm")?,
                o: self.stacked(&[(&a.pp("o_proj"), h)], nq * hd, false)?,
                norm1: self.rms_norm(&l.pp("input_layernorm"), h)?,
                up: self.stacked(&[(&m.pp("gate_proj"), i), (&m.pp("up_proj"), i)], h, false)?,
                down: self.stacked(&[(&m.pp("down_proj"), h)], i, false)?,
                norm2: self.rms_norm(&l.pp("post_attention_layernorm"), h)?,
            });
        }
        Ok(Transformer {
            spec: Spec {
                arch: if cfg.version == 3 { "qwen3" } else { "qwen2" },
                hidden: h,
                heads: nq,
                kv_heads: nkv,
                head_dim: hd,
                inter: i,
                pre_norm: true,
                rope_theta: Some(cfg.rope_theta),
                causal: cfg.causal,
                gated: true,
                act: Act::Silu,
                eps: cfg.rms_norm_eps as f32,
                max_positions: cfg.max_position_embeddings,
                tasks: 0,
            },
            emb: Embeddings {
                word: self.table(&w, &[cfg.vocab_size, h], "embed_tokens.weight")?,
                vocab: cfg.vocab_size,
                position: None,
                type0: None,
                word_lora: None,
                type0_lora: None,
                norm: None,
            },
            layers,
            final_norm: Some(self.rms_norm(&w.pp("norm"), h)?),
            precision: self.precision,
        })
    }

    /// A Jina projection: `parametrizations.weight.original` plus the task adapters.
    fn jina_proj(&self, w: &Weights, inp: usize, out: usize, cfg: &JinaConfig) -> Result<Proj> {
        let p = w.pp("parametrizations.weight");
        let (t, r) = (cfg.lora_adaptations.len(), cfg.lora_rank);
        let scale = cfg.lora_scaling() as f32;
        let mut b = host(&p, &[t, out, r], "0.lora_B")?;
        b.iter_mut().for_each(|v| *v *= scale);
        Ok(Proj {
            lin: self.linear(host(&p, &[out, inp], "original")?, out, inp)?,
            bias: Some(host(w, &[out], "bias")?),
            lora: Some(Lora {
                a: host(&p, &[t, r, inp], "0.lora_A")?,
                b,
                rank: r,
            }),
            inp,
            out,
        })
    }

    fn jina(&self, cfg: &JinaConfig, w: &Weights) -> Result<Transformer> {
        let w = w.with_detected_prefix(
            &["roberta", ""],
            "embeddings.word_embeddings.parametrizations.weight.original",
        );
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (t, r) = (cfg.lora_adaptations.len(), cfg.lora_rank);
        let scale = cfg.lora_scaling() as f32;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for n in 0..cfg.num_hidden_layers {
            let l = w.pp(format!("encoder.layers.{n}"));
            layers.push(Layer {
                qkv: self.jina_proj(&l.pp("mixer.Wqkv"), h, 3 * h, cfg)?,
                q_norm: None,
                k_norm: None,
                o: self.jina_proj(&l.pp("mixer.out_proj"), h, h, cfg)?,
                norm1: self.layer_norm(&l.pp("norm1"), h)?,
                up: self.jina_proj(&l.pp("mlp.fc1"), h, i, cfg)?,
                down: self.jina_proj(&l.pp("mlp.fc2"), i, h, cfg)?,
                norm2: self.layer_norm(&l.pp("norm2"), h)?,
            });
        }
        let we = w.pp("embeddings.word_embeddings.parametrizations.weight");
        let te = w.pp("embeddings.token_type_embeddings.parametrizations.weight");
        let mut word_b = host(&we, &[t, r, h], "0.lora_B")?;
        word_b.iter_mut().for_each(|v| *v *= scale);
        // Token type 0 with each task's adapter: A_t[0] · B_t · scale, precomputed per task.
        let tv = cfg.type_vocab_size;
        let type_a = host(&te, &[t, tv, r], "0.lora_A")?;
        let type_b = host(&te, &[t, r, h], "0.lora_B")?;
        let mut type0_lora = vec![0f32; t * h];
        for task in 0..t {
            for j in 0..r {
                let a = type_a[task * tv * r + j] * scale;
                for c in 0..h {
                    type0_lora[task * h + c] += a * type_b[(task * r + j) * h + c];
                }
            }
        }
        let type_table = host(&te, &[tv, h], "original")?;
        Ok(Transformer {
            spec: Spec {
                arch: "jina-v3",
                hidden: h,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_attention_heads,
                head_dim: h / cfg.num_attention_heads,
                inter: i,
                pre_norm: false,
                rope_theta: Some(cfg.rotary_emb_base),
                causal: false,
                gated: false,
                act: activation(&cfg.hidden_act).map_err(Error::Unsupported)?,
                eps: cfg.layer_norm_eps as f32,
                max_positions: usize::MAX,
                tasks: t,
            },
            emb: Embeddings {
                word: self.table(&we, &[cfg.vocab_size, h], "original")?,
                vocab: cfg.vocab_size,
                position: None,
                type0: Some(type_table[..h].to_vec()),
                word_lora: Some((host(&we, &[t, cfg.vocab_size, r], "0.lora_A")?, word_b, r)),
                type0_lora: Some(type0_lora),
                norm: Some(self.layer_norm(&w.pp("emb_ln"), h)?),
            },
            layers,
            final_norm: None,
            precision: self.precision,
        })
    }
}
