//! Hugging Face `config.json` and the sentence-transformers files around it: which architecture and
//! sizes, which pooling, whether to normalise, the maximum length, and the prompts.

use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QwenConfig {
    /// 2 or 3.
    pub version: u8,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// False when the config says `is_causal: false` (Qodo-Embed-1).
    pub causal: bool,
    /// q/k/v projection biases (Qwen2: yes; Qwen3: `attention_bias`, default no).
    pub attention_bias: bool,
    /// Per-head RMSNorm on queries and keys (Qwen3).
    pub qk_norm: bool,
    pub attention_dropout: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JinaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub rotary_emb_base: f64,
    pub type_vocab_size: usize,
    pub lora_adaptations: Vec<String>,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub task_instructions: BTreeMap<String, String>,
    pub matryoshka_dimensions: Vec<usize>,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
}

impl JinaConfig {
    pub fn lora_scaling(&self) -> f64 {
        self.lora_alpha / self.lora_rank as f64
    }
}

/// The model description built from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum Architecture {
    Bert(BertConfig),
    Qwen(QwenConfig),
    Jina(JinaConfig),
}

impl Architecture {
    pub fn hidden_size(&self) -> usize {
        match self {
            Architecture::Bert(c) => c.hidden_size,
            Architecture::Qwen(c) => c.hidden_size,
            Architecture::Jina(c) => c.hidden_size,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Bert(_) => "bert",
            Architecture::Qwen(c) if c.version == 3 => "qwen3",
            Architecture::Qwen(_) => "qwen2",
            Architecture::Jina(_) => "jina-v3",
        }
    }
    pub fn default_pooling(&self) -> Pooling {
        match self {
            Architecture::Bert(_) | Architecture::Jina(_) => Pooling::Mean,
            Architecture::Qwen(_) => Pooling::LastToken,
        }
    }

    /// Parse a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        Self::from_json(&v, path)
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let f = Fields { v, path };
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let rotary = v.get("position_embedding_type").and_then(Value::as_str) == Some("rotary");
        let is_jina = v.get("lora_adaptations").is_some()
            || (rotary
                && (archs.iter().any(|a| a.starts_with("XLMRoberta"))
                    || model_type == "xlm-roberta"));
        if is_jina {
            return Ok(Architecture::Jina(JinaConfig {
                vocab_size: f.usize("vocab_size")?,
                hidden_size: f.usize("hidden_size")?,
                num_hidden_layers: f.usize("num_hidden_layers")?,
                num_attention_heads: f.usize("num_attention_heads")?,
                intermediate_size: f.usize("intermediate_size")?,
                hidden_act: f.str_or("hidden_act", "gelu")?,
                layer_norm_eps: f.f64_or("layer_norm_eps", 1e-5)?,
                rotary_emb_base: f.f64_or("rotary_emb_base", 10000.0)?,
                type_vocab_size: f.usize_or("type_vocab_size", 1)?,
                lora_adaptations: f.get_or("lora_adaptations", Vec::new())?,
                lora_rank: f.usize_or("lora_rank", 4)?,
                lora_alpha: f.f64_or("lora_alpha", 1.0)?,
                task_instructions: f.get_or("task_instructions", BTreeMap::new())?,
                matryoshka_dimensions: f.get_or("matryoshka_dimensions", Vec::new())?,
                hidden_dropout_prob: f.f64_or("hidden_dropout_prob", 0.1)?,
                attention_probs_dropout_prob: f.f64_or("attention_probs_dropout_prob", 0.1)?,
            }))
            .and_then(|a| a.validate(path));
        }
        let is_qwen3 = model_type == "qwen3" || archs.iter().any(|a| a.starts_with("Qwen3"));
        let is_qwen2 = model_type == "qwen2" || archs.iter().any(|a| a.starts_with("Qwen2"));
        if is_qwen2 || is_qwen3 {
            let hidden = f.usize("hidden_size")?;
            let heads = f.usize("num_attention_heads")?;
            if let Some(scaling) = v.get("rope_scaling").filter(|s| !s.is_null()) {
                let kind = scaling
                    .get("rope_type")
                    .or_else(|| scaling.get("type"))
                    .and_then(Value::as_str);
                if kind != Some("default") {
                    return Err(Error::config(
                        path,
                        format!("rope_scaling {scaling} is not supported (only plain RoPE)"),
                    ));
                }
            }
            // transformers 5 moves `rope_theta` into `rope_parameters`.
            let rope_theta = match v.get("rope_theta") {
                Some(_) => f.f64("rope_theta")?,
                None => v
                    .get("rope_parameters")
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
                    .unwrap_or(10000.0),
            };
            return Ok(Architecture::Qwen(QwenConfig {
                version: if is_qwen3 { 3 } else { 2 },
                vocab_size: f.usize("vocab_size")?,
                hidden_size: hidden,
                intermediate_size: f.usize("intermediate_size")?,
                num_hidden_layers: f.usize("num_hidden_layers")?,
                num_attention_heads: heads,
                num_key_value_heads: f.usize_or("num_key_value_heads", heads)?,
                head_dim: f.usize_or("head_dim", hidden / heads.max(1))?,
                rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
                rope_theta,
                max_position_embeddings: f.usize_or("max_position_embeddings", 32768)?,
                causal: f.get_or("is_causal", true)?,
                attention_bias: if is_qwen3 {
                    f.get_or("attention_bias", false)?
                } else {
                    true
                },
                qk_norm: is_qwen3,
                attention_dropout: f.f64_or("attention_dropout", 0.0)?,
            }))
            .and_then(|a| a.validate(path));
        }
        if model_type == "bert" || archs.iter().any(|a| a.starts_with("Bert")) {
            if let Some(p) = v.get("position_embedding_type").and_then(Value::as_str) {
                if p != "absolute" {
                    return Err(Error::config(
                        path,
                        format!("BERT position_embedding_type `{p}` is not supported"),
                    ));
                }
            }
            return Ok(Architecture::Bert(BertConfig {
                vocab_size: f.usize("vocab_size")?,
                hidden_size: f.usize("hidden_size")?,
                num_hidden_layers: f.usize("num_hidden_layers")?,
                num_attention_heads: f.usize("num_attention_heads")?,
                intermediate_size: f.usize("intermediate_size")?,
                hidden_act: f.str_or("hidden_act", "gelu")?,
                max_position_embeddings: f.usize_or("max_position_embeddings", 512)?,
                type_vocab_size: f.usize_or("type_vocab_size", 2)?,
                layer_norm_eps: f.f64_or("layer_norm_eps", 1e-12)?,
                hidden_dropout_prob: f.f64_or("hidden_dropout_prob", 0.1)?,
                attention_probs_dropout_prob: f.f64_or("attention_probs_dropout_prob", 0.1)?,
            }))
            .and_then(|a| a.validate(path));
        }
        Err(Error::UnknownArchitecture {
            path: path.to_path_buf(),
            message: format!(
                "model_type `{model_type}`, architectures {archs:?}; supported: BERT, Qwen2, Qwen3, jina-embeddings-v3 (XLM-RoBERTa with rotary + LoRA)"
            ),
        })
    }

    /// Every size and name the models use, checked once here, so that no config file can make a
    /// model panic later (a division by a zero head count, a slice past a width): an error naming
    /// the file and the field instead.
    fn validate(self, path: &Path) -> Result<Self> {
        let bad =
            |field: &str, m: String| Err(Error::config(path, format!("field `{field}`: {m}")));
        let positive = |field: &str, v: usize| {
            if v == 0 {
                bad(field, "must be at least 1".into())
            } else {
                Ok(())
            }
        };
        let eps = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                bad(field, format!("{v} must be a positive number"))
            }
        };
        let act = |v: &str| {
            match v {
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "relu" | "silu" | "swish" => {
                Ok(())
            }
            other => bad(
                "hidden_act",
                format!("`{other}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish)"),
            ),
        }
        };
        let heads_divide = |hidden: usize, heads: usize| {
            if !hidden.is_multiple_of(heads) {
                bad(
                    "num_attention_heads",
                    format!("hidden_size {hidden} is not divisible by num_attention_heads {heads}"),
                )
            } else {
                Ok(())
            }
        };
        match &self {
            Architecture::Bert(c) => {
                for (f, v) in [
                    ("vocab_size", c.vocab_size),
                    ("hidden_size", c.hidden_size),
                    ("num_hidden_layers", c.num_hidden_layers),
                    ("num_attention_heads", c.num_attention_heads),
                    ("intermediate_size", c.intermediate_size),
                    ("max_position_embeddings", c.max_position_embeddings),
                    ("type_vocab_size", c.type_vocab_size),
                ] {
                    positive(f, v)?;
                }
                heads_divide(c.hidden_size, c.num_attention_heads)?;
                act(&c.hidden_act)?;
                eps("layer_norm_eps", c.layer_norm_eps)?;
            }
            Architecture::Qwen(c) => {
                for (f, v) in [
                    ("vocab_size", c.vocab_size),
                    ("hidden_size", c.hidden_size),
                    ("num_hidden_layers", c.num_hidden_layers),
                    ("num_attention_heads", c.num_attention_heads),
                    ("num_key_value_heads", c.num_key_value_heads),
                    ("head_dim", c.head_dim),
                    ("intermediate_size", c.intermediate_size),
                    ("max_position_embeddings", c.max_position_embeddings),
                ] {
                    positive(f, v)?;
                }
                if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
                    bad(
                        "num_key_value_heads",
                        format!(
                            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                            c.num_attention_heads, c.num_key_value_heads
                        ),
                    )?;
                }
                if !c.head_dim.is_multiple_of(2) {
                    bad("head_dim", format!("{} must be even (rotary)", c.head_dim))?;
                }
                eps("rms_norm_eps", c.rms_norm_eps)?;
                eps("rope_theta", c.rope_theta)?;
            }
            Architecture::Jina(c) => {
                for (f, v) in [
                    ("vocab_size", c.vocab_size),
                    ("hidden_size", c.hidden_size),
                    ("num_hidden_layers", c.num_hidden_layers),
                    ("num_attention_heads", c.num_attention_heads),
                    ("intermediate_size", c.intermediate_size),
                    ("type_vocab_size", c.type_vocab_size),
                ] {
                    positive(f, v)?;
                }
                heads_divide(c.hidden_size, c.num_attention_heads)?;
                if !(c.hidden_size / c.num_attention_heads).is_multiple_of(2) {
                    bad(
                        "num_attention_heads",
                        format!(
                            "the head width {} must be even (rotary)",
                            c.hidden_size / c.num_attention_heads
                        ),
                    )?;
                }
                act(&c.hidden_act)?;
                eps("layer_norm_eps", c.layer_norm_eps)?;
                eps("rotary_emb_base", c.rotary_emb_base)?;
                if !c.lora_adaptations.is_empty() {
                    positive("lora_rank", c.lora_rank)?;
                    if !c.lora_alpha.is_finite() {
                        bad("lora_alpha", format!("{} is not a number", c.lora_alpha))?;
                    }
                }
                if let Some(&d) = c
                    .matryoshka_dimensions
                    .iter()
                    .find(|&&d| d == 0 || d > c.hidden_size)
                {
                    bad(
                        "matryoshka_dimensions",
                        format!("{d} is not between 1 and hidden_size {}", c.hidden_size),
                    )?;
                }
            }
        }
        Ok(self)
    }
}

/// Typed access to config fields with errors naming the file and the field.
struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        let raw = self
            .v
            .get(key)
            .ok_or_else(|| Error::config(self.path, format!("missing field `{key}`")))?;
        serde_json::from_value(raw.clone())
            .map_err(|e| Error::config(self.path, format!("field `{key}`: {e}")))
    }
    fn get_or<T: serde::de::DeserializeOwned>(&self, key: &str, default: T) -> Result<T> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.get(key),
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.get(key)
    }
    fn usize_or(&self, key: &str, d: usize) -> Result<usize> {
        self.get_or(key, d)
    }
    fn f64(&self, key: &str) -> Result<f64> {
        self.get(key)
    }
    fn f64_or(&self, key: &str, d: f64) -> Result<f64> {
        self.get_or(key, d)
    }
    fn str_or(&self, key: &str, d: &str) -> Result<String> {
        self.get_or(key, d.to_string())
    }
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not valid JSON: {e}")))
}

/// Remove commas that directly precede `}` or `]` outside strings. Some published
/// `config_sentence_transformers.json` files carry one; Python's json refuses it too, but the
/// sentence-transformers loaders people use tolerate it, so we do (serde_json has no such mode).
pub fn strip_trailing_commas(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let (mut in_str, mut escaped) = (false, false);
    for (i, &c) in chars.iter().enumerate() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        if c == '"' {
            in_str = true;
        } else if c == ',' {
            let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            if matches!(next, Some('}') | Some(']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Pooling strategies (sentence-transformers names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Cls,
    Mean,
    Max,
    MeanSqrtLen,
    LastToken,
}

#[derive(Debug, Deserialize, Default)]
struct PoolingFile {
    pooling_mode: Option<String>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    include_prompt: Option<bool>,
}

/// Parse a `1_Pooling/config.json`: the legacy booleans or the newer `pooling_mode` string.
pub fn parse_pooling(path: &Path) -> Result<(Pooling, bool)> {
    let v = read_json(path)?;
    let p: PoolingFile =
        serde_json::from_value(v).map_err(|e| Error::config(path, e.to_string()))?;
    let include_prompt = p.include_prompt.unwrap_or(true);
    if let Some(mode) = &p.pooling_mode {
        let pooling = match mode.as_str() {
            "cls" => Pooling::Cls,
            "mean" => Pooling::Mean,
            "max" => Pooling::Max,
            "mean_sqrt_len_tokens" => Pooling::MeanSqrtLen,
            "lasttoken" => Pooling::LastToken,
            other => {
                return Err(Error::config(
                    path,
                    format!("pooling_mode `{other}` is not supported"),
                ))
            }
        };
        return Ok((pooling, include_prompt));
    }
    if p.pooling_mode_weightedmean_tokens {
        return Err(Error::config(
            path,
            "weighted-mean pooling is not supported",
        ));
    }
    let flags = [
        (p.pooling_mode_cls_token, Pooling::Cls),
        (p.pooling_mode_mean_tokens, Pooling::Mean),
        (p.pooling_mode_max_tokens, Pooling::Max),
        (p.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
        (p.pooling_mode_lasttoken, Pooling::LastToken),
    ];
    let on: Vec<Pooling> = flags.iter().filter(|f| f.0).map(|f| f.1).collect();
    match on.as_slice() {
        [one] => Ok((*one, include_prompt)),
        [] => Err(Error::config(path, "no pooling mode is switched on")),
        _ => Err(Error::config(
            path,
            format!("several pooling modes at once ({on:?}) are not supported"),
        )),
    }
}

/// Everything sentence-transformers would read around the transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceConfig {
    pub pooling: Pooling,
    pub include_prompt: bool,
    pub normalize: bool,
    pub max_seq_length: Option<usize>,
    pub do_lower_case: bool,
    pub prompts: BTreeMap<String, String>,
    pub default_prompt_name: Option<String>,
}

impl SentenceConfig {
    /// Read the sentence-transformers files of `dir`; absent files give the architecture's defaults
    /// (its pooling, normalised output, no prompts).
    pub fn from_dir(dir: &Path, arch: &Architecture) -> Result<Self> {
        let mut cfg = SentenceConfig {
            pooling: arch.default_pooling(),
            include_prompt: true,
            normalize: true,
            max_seq_length: None,
            do_lower_case: false,
            prompts: BTreeMap::new(),
            default_prompt_name: None,
        };
        let modules_path = dir.join("modules.json");
        if modules_path.is_file() {
            let modules: Vec<Value> =
                serde_json::from_value(read_json(&modules_path)?).map_err(|e| {
                    Error::config(&modules_path, format!("expected a list of modules: {e}"))
                })?;
            cfg.normalize = false;
            for m in modules {
                let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
                let sub = m.get("path").and_then(Value::as_str).unwrap_or("");
                // Match by class name: `sentence_transformers.models.Pooling`,
                // `sentence_transformers.base.modules.Pooling`, `custom_st.Transformer`, ...
                let class = ty.rsplit('.').next().unwrap_or(ty);
                match class {
                    "Transformer" => {}
                    "Pooling" => {
                        let p = dir.join(sub).join("config.json");
                        if p.is_file() {
                            (cfg.pooling, cfg.include_prompt) = parse_pooling(&p)?;
                        }
                    }
                    "Normalize" => cfg.normalize = true,
                    other => {
                        return Err(Error::config(
                            &modules_path,
                            format!("module `{other}` ({ty}) is not supported"),
                        ))
                    }
                }
            }
        }
        let sbert = dir.join("sentence_bert_config.json");
        if sbert.is_file() {
            let v = read_json(&sbert)?;
            let f = Fields {
                v: &v,
                path: &sbert,
            };
            cfg.max_seq_length = f.get_or("max_seq_length", None)?;
            cfg.do_lower_case = f.get_or("do_lower_case", false)?;
        }
        let st = dir.join("config_sentence_transformers.json");
        if st.is_file() {
            let text = std::fs::read_to_string(&st).map_err(|e| Error::io(&st, e))?;
            let v: Value = serde_json::from_str(&strip_trailing_commas(&text))
                .map_err(|e| Error::config(&st, format!("not valid JSON: {e}")))?;
            let f = Fields { v: &v, path: &st };
            cfg.prompts = f.get_or("prompts", BTreeMap::new())?;
            cfg.default_prompt_name = f.get_or("default_prompt_name", None)?;
            if let Some(name) = &cfg.default_prompt_name {
                if !cfg.prompts.contains_key(name) {
                    return Err(Error::config(
                        &st,
                        format!("default_prompt_name `{name}` is not among the prompts"),
                    ));
                }
            }
        }
        Ok(cfg)
    }
}

/// Tokenizer settings from `tokenizer_config.json` that matter for embedding.
#[derive(Debug, Clone, Default)]
pub struct TokenizerSettings {
    pub model_max_length: Option<usize>,
    pub padding_side_left: bool,
    pub truncation_side_left: bool,
}

impl TokenizerSettings {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let v = read_json(&path)?;
        // Tokenizers without a limit store a huge sentinel (1e30); treat those as "none".
        let model_max_length = v
            .get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|&m| m > 0.0 && m < 1e9)
            .map(|m| m as usize);
        Ok(TokenizerSettings {
            model_max_length,
            padding_side_left: v.get("padding_side").and_then(Value::as_str) == Some("left"),
            truncation_side_left: v.get("truncation_side").and_then(Value::as_str) == Some("left"),
        })
    }
}

/// A whole model folder, described.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    pub dir: PathBuf,
    pub arch: Architecture,
    pub sentence: SentenceConfig,
    pub tokenizer: TokenizerSettings,
}

impl ModelFolder {
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::config(dir, "model folder does not exist"));
        }
        let arch = Architecture::from_file(&dir.join("config.json"))?;
        let sentence = SentenceConfig::from_dir(dir, &arch)?;
        let tokenizer = TokenizerSettings::from_dir(dir)?;
        Ok(ModelFolder {
            dir: dir.to_path_buf(),
            arch,
            sentence,
            tokenizer,
        })
    }

    /// The maximum sequence length: sentence-transformers' `max_seq_length`, else the tokenizer's
    /// `model_max_length`, else the position table (BERT) or 8192.
    pub fn max_seq_length(&self) -> usize {
        let limit = match &self.arch {
            Architecture::Bert(c) => Some(c.max_position_embeddings),
            _ => None,
        };
        let m = self
            .sentence
            .max_seq_length
            .or(self.tokenizer.model_max_length)
            .or(limit)
            .unwrap_or(8192);
        limit.map_or(m, |l| m.min(l))
    }
}
