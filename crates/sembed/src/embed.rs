//! Texts → unit vectors. [`Embedder`] wraps one model: prompts and input roles, tokenisation,
//! length-sorted batching (order restored), pooling, Matryoshka truncation and normalisation.
//! [`Fusion`] joins several embedders into one vector (the Qodo ⊕ Jina pipeline).

use crate::backend::{choose, Backend, CandleBackend, FastBackend, TokenBatch};
use crate::config::{Architecture, ModelFolder, Pooling};
use crate::error::{Error, Result};
use crate::fast::Engine;
use crate::models::{bert::Bert, jina::Jina, qwen::Qwen, Batch, Encoder};
use crate::pool::{normalize_rows, pool};
use crate::tokenize::TextTokenizer;
use crate::weights::{WeightStore, Weights};
use candle_core::{DType, Device, Tensor};
use std::path::Path;
use std::sync::Arc;

/// What an input is, for models that embed queries and documents differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRole {
    Query,
    Document,
}

impl std::str::FromStr for InputRole {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "query" => Ok(InputRole::Query),
            "document" | "passage" => Ok(InputRole::Document),
            other => Err(Error::InvalidInput(format!(
                "input type `{other}`: expected `query` or `document`"
            ))),
        }
    }
}

/// Options of one embedding call.
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    pub role: Option<InputRole>,
    /// A Jina task (`retrieval.query`, `text-matching`, ...) or a sentence-transformers prompt name.
    pub task: Option<String>,
    /// Matryoshka dimension: keep the first `d` values, then normalise.
    pub dimensions: Option<usize>,
    pub normalize: bool,
    pub truncate: bool,
    /// Cut long texts at the start instead of the end.
    pub truncate_left: Option<bool>,
    pub max_length: Option<usize>,
    pub batch_size: usize,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        EmbedOptions {
            role: None,
            task: None,
            dimensions: None,
            normalize: true,
            truncate: true,
            truncate_left: None,
            max_length: None,
            batch_size: 32,
        }
    }
}

/// Where the time of an embedding call went (accumulated over calls).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Stages {
    /// Prompt prefixing and tokenisation.
    pub tokenize: std::time::Duration,
    /// Batch layout and the transformer forward passes.
    pub forward: std::time::Duration,
    /// Pooling hidden states into one vector per text.
    pub pool: std::time::Duration,
    /// Matryoshka truncation and L2 normalisation.
    pub normalize: std::time::Duration,
    /// Joining the parts of a fusion.
    pub fusion: std::time::Duration,
}

/// Anything that turns texts into vectors: one model or a fusion of several.
pub trait Embed: Send + Sync {
    fn embed(&self, texts: &[String], opts: &EmbedOptions) -> Result<Vec<Vec<f32>>> {
        self.embed_staged(texts, opts, &mut Stages::default())
    }
    /// [`Embed::embed`], adding the time of each stage to `stages`.
    fn embed_staged(
        &self,
        texts: &[String],
        opts: &EmbedOptions,
        stages: &mut Stages,
    ) -> Result<Vec<Vec<f32>>> {
        let t = std::time::Instant::now();
        let encoded = self.encode(texts, opts)?;
        stages.tokenize += t.elapsed();
        self.embed_encoded(&encoded, opts, stages)
    }
    /// Validate `opts` for these texts and tokenise them (prompts and task adapters resolved), without
    /// running the model. Errors are the ones `embed` would give.
    fn encode(&self, texts: &[String], opts: &EmbedOptions) -> Result<Encoded>;
    /// Embed texts [`Embed::encode`] tokenised; `opts` gives the post-processing (Matryoshka
    /// dimensions, normalisation) and the batch size.
    fn embed_encoded(
        &self,
        encoded: &Encoded,
        opts: &EmbedOptions,
        stages: &mut Stages,
    ) -> Result<Vec<Vec<f32>>>;
    /// Output dimension with default options.
    fn dimension(&self) -> usize;
    /// The engine(s) running the model(s): `candle`, `fast-f32`, `fast-bf16`, `fast-int8`…;
    /// `+`-joined for a fusion.
    fn engine(&self) -> String;
    /// Why each engine was chosen, one line per model.
    fn engine_reasons(&self) -> Vec<String>;
    /// Give back the scratch memory the engines keep between calls.
    fn release_memory(&self) {}
    /// Models behind this (the parts of its [`Encoded`]).
    fn models(&self) -> usize {
        1
    }
    fn name(&self) -> &str;
    /// Whether `task` means something here (a Jina adapter or a prompt name).
    fn knows_task(&self, task: &str) -> bool;
    /// Validate `opts` for these texts and count each text's tokens (for a fusion: its largest part),
    /// without running the model. Errors are the ones `embed` would give.
    fn count_tokens(&self, texts: &[String], opts: &EmbedOptions) -> Result<Vec<usize>> {
        Ok(self.encode(texts, opts)?.token_counts())
    }
    /// The longest input accepted, in tokens.
    fn max_length(&self) -> usize;
    /// Task and prompt names this accepts.
    fn task_names(&self) -> Vec<String>;
    /// Token ids, token strings and whether each is special, for one model; a fusion has no single
    /// tokenisation and says so.
    fn tokens(&self, texts: &[String], opts: &EmbedOptions) -> Result<Vec<Vec<Token>>> {
        let _ = (texts, opts);
        Err(Error::Unsupported(format!(
            "{}: tokenize a single model, not a fusion",
            self.name()
        )))
    }
}

pub use crate::tokenize::Token;

/// Token ids of texts, ready for a model: one part per model (one for an [`Embedder`], one per
/// member of a [`Fusion`]), each with the task adapter of every sequence. Produced once by
/// [`Embed::encode`] (which also validates the options) and consumed by [`Embed::embed_encoded`],
/// so a server counts tokens and embeds from a single tokenisation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    pub parts: Vec<EncodedPart>,
}

/// The token ids of every text for one model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedPart {
    pub ids: Vec<Vec<u32>>,
    pub tasks: Vec<Option<usize>>,
}

impl Encoded {
    /// Number of texts.
    pub fn len(&self) -> usize {
        self.parts.first().map_or(0, |p| p.ids.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens of each text (for a fusion: its largest part).
    pub fn token_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.len()];
        for p in &self.parts {
            for (c, ids) in counts.iter_mut().zip(&p.ids) {
                *c = (*c).max(ids.len());
            }
        }
        counts
    }

    /// Append another encoding of the same model(s) (the server joins requests into one batch).
    pub fn append(&mut self, other: Encoded) -> Result<()> {
        if self.parts.is_empty() {
            *self = other;
            return Ok(());
        }
        if other.parts.len() != self.parts.len() {
            return Err(Error::InvalidInput(
                "encodings of different models cannot be joined".into(),
            ));
        }
        for (a, b) in self.parts.iter_mut().zip(other.parts) {
            a.ids.extend(b.ids);
            a.tasks.extend(b.tasks);
        }
        Ok(())
    }
}

/// One model, ready to embed.
pub struct Embedder {
    name: String,
    folder: ModelFolder,
    backend: Box<dyn Backend>,
    /// The candle model, when candle runs this embedder: the differentiable path training uses.
    encoder: Option<Arc<dyn Encoder>>,
    /// Why the engine running this model was chosen.
    engine_reason: String,
    tokenizer: TextTokenizer,
    device: Device,
}

/// How a call's options resolve for a given model.
struct Resolved {
    prefix: String,
    adapter: Option<usize>,
}

impl Embedder {
    /// Load a model folder in the given compute dtype (the fastest engine that runs it).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(dir, dtype, device, Engine::Auto)
    }

    /// Load a model folder in the given compute dtype, on the given engine. On the fast engine the
    /// dtype is the weights' precision (bf16 / f16 weights, f32 arithmetic); on candle it is the
    /// compute dtype.
    pub fn load_with(dir: &Path, dtype: DType, device: &Device, engine: Engine) -> Result<Self> {
        if dir.join("adapter_config.json").is_file() && !dir.join("config.json").is_file() {
            // A PEFT LoRA adapter folder: the base model it names, with the adapters attached.
            let (attach, base) = crate::lora::LoraAttach::from_peft(dir, false)?;
            let folder = ModelFolder::read(&base)?;
            let choice = choose(&folder.arch, dtype, device, engine, true)?;
            let weights = Weights::new(WeightStore::from_dir(&base)?, dtype, device)
                .with_lora(std::sync::Arc::new(attach));
            let mut e =
                Self::from_parts(&base, folder, &weights)?.with_name(dir.display().to_string());
            e.engine_reason = choice.reason;
            return Ok(e);
        }
        let folder = ModelFolder::read(dir)?;
        let choice = choose(&folder.arch, dtype, device, engine, false)?;
        match choice.fast {
            Some(p) => {
                // The fast engine reads every tensor in f32 and converts it to its own precision.
                let weights = Weights::new(WeightStore::from_dir(dir)?, DType::F32, device);
                let model = crate::fast::load::load(&folder.arch, &weights, p)?;
                let backend = FastBackend::new(model, folder.sentence.pooling);
                let mut e = Self::from_backend(dir, folder, Box::new(backend), None)?;
                e.engine_reason = choice.reason;
                Ok(e)
            }
            None => {
                let weights = Weights::new(WeightStore::from_dir(dir)?, dtype, device);
                let mut e = Self::from_parts(dir, folder, &weights)?;
                e.engine_reason = choice.reason;
                Ok(e)
            }
        }
    }

    /// Load with every weight a trainable variable: the embedder and its variables by checkpoint name.
    pub fn load_trainable(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, Vec<(String, candle_core::Var)>)> {
        Self::load_trainable_only(dir, dtype, device, None)
    }

    /// [`Self::load_trainable`] where only the tensors whose checkpoint name `keep` accepts are
    /// variables (`None`: all); the rest are constants, never differentiated.
    pub fn load_trainable_only(
        dir: &Path,
        dtype: DType,
        device: &Device,
        keep: Option<fn(&str) -> bool>,
    ) -> Result<(Self, Vec<(String, candle_core::Var)>)> {
        let mut weights = Weights::trainable(WeightStore::from_dir(dir)?, dtype, device);
        if let Some(keep) = keep {
            weights = weights.only_variables(keep);
        }
        let e = Self::from_weights(dir, &weights)?;
        Ok((e, weights.variables()))
    }

    /// Build the candle model from the folder's config and tokenizer with weights from `weights`.
    pub fn from_weights(dir: &Path, weights: &Weights) -> Result<Self> {
        Self::from_parts(dir, ModelFolder::read(dir)?, weights)
    }

    /// A candle embedder from a folder already read.
    fn from_parts(dir: &Path, folder: ModelFolder, weights: &Weights) -> Result<Self> {
        let encoder: Arc<dyn Encoder> = Arc::from(build_model(&folder.arch, weights)?);
        let backend = CandleBackend::new(
            encoder.clone(),
            folder.sentence.pooling,
            folder.tokenizer.padding_side_left,
            weights.device().clone(),
        );
        let mut e = Self::from_backend(dir, folder, Box::new(backend), Some(encoder))?;
        e.device = weights.device().clone();
        e.engine_reason = "candle: built from given weights".into();
        Ok(e)
    }

    fn from_backend(
        dir: &Path,
        folder: ModelFolder,
        backend: Box<dyn Backend>,
        encoder: Option<Arc<dyn Encoder>>,
    ) -> Result<Self> {
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Embedder {
            name,
            folder,
            backend,
            encoder,
            engine_reason: String::new(),
            tokenizer,
            device: Device::Cpu,
        })
    }

    /// Which engine and precision run this model (`candle`, `fast-f32`, `fast-bf16`, `fast-int8`…).
    pub fn engine_name(&self) -> String {
        self.backend.name()
    }

    /// Why that engine runs it.
    pub fn engine_reason(&self) -> &str {
        &self.engine_reason
    }

    /// The engine behind this embedder.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sentence embeddings of `texts` as one differentiable tensor `[n, d]` (one batch, no sorting):
    /// pooled, Matryoshka-truncated and normalised as `opts` say. The training forward pass; it
    /// needs the candle engine.
    pub fn embed_tensor(&self, texts: &[String], opts: &EmbedOptions) -> Result<Tensor> {
        if texts.is_empty() {
            return Err(Error::InvalidInput("no texts to embed".into()));
        }
        self.check_dimensions(opts)?;
        let r = self.resolve(opts)?;
        let ids = self.tokenize_resolved(texts, opts, &r)?;
        let rows: Vec<&Vec<u32>> = ids.iter().collect();
        let (hidden, mask, mask_rows) = self.forward_hidden(&rows, r.adapter)?;
        let mut pooled = pool(&hidden, &mask, &mask_rows, self.folder.sentence.pooling)?;
        if let Some(d) = opts.dimensions {
            pooled = pooled.narrow(1, 0, d)?;
        }
        if opts.normalize {
            let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?;
            pooled = pooled.broadcast_div(&norm)?;
        }
        Ok(pooled)
    }

    /// Pad batches on the left (true) or right (false), overriding `tokenizer_config.json`.
    pub fn set_padding_left(&mut self, left: bool) {
        self.folder.tokenizer.padding_side_left = left;
    }

    /// The last hidden state `[tokens][hidden]` of one text, as the pooling sees it.
    pub fn last_hidden_state(&self, text: &str, opts: &EmbedOptions) -> Result<Vec<Vec<f32>>> {
        let r = self.resolve(opts)?;
        let ids = self.tokenize_resolved(&[text.to_string()], opts, &r)?;
        let batch = TokenBatch::new(&[&ids[0]], &[r.adapter])?.with_outputs(vec![], vec![0]);
        let out = self.backend.embed(&batch)?;
        let h = self.backend.hidden_size();
        Ok(out.raw[0].chunks_exact(h).map(<[f32]>::to_vec).collect())
    }

    pub fn folder(&self) -> &ModelFolder {
        &self.folder
    }

    fn model_max_length(&self) -> usize {
        self.folder.max_seq_length()
    }

    /// Jina task names, in adapter order (empty for other models).
    pub fn tasks(&self) -> &[String] {
        match &self.folder.arch {
            Architecture::Jina(c) => &c.lora_adaptations,
            _ => &[],
        }
    }

    fn resolve(&self, opts: &EmbedOptions) -> Result<Resolved> {
        let sentence = &self.folder.sentence;
        if let Architecture::Jina(cfg) = &self.folder.arch {
            let task = match (&opts.task, opts.role) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(InputRole::Query)) => Some("retrieval.query".to_string()),
                (None, Some(InputRole::Document)) => Some("retrieval.passage".to_string()),
                (None, None) => None,
            };
            return match task {
                None => Ok(Resolved {
                    prefix: String::new(),
                    adapter: None,
                }),
                Some(t) => {
                    let idx = cfg
                        .lora_adaptations
                        .iter()
                        .position(|a| *a == t)
                        .ok_or_else(|| {
                            Error::InvalidInput(format!(
                                "unknown task `{t}` for {}; available: {}",
                                self.name,
                                cfg.lora_adaptations.join(", ")
                            ))
                        })?;
                    Ok(Resolved {
                        prefix: cfg.task_instructions.get(&t).cloned().unwrap_or_default(),
                        adapter: Some(idx),
                    })
                }
            };
        }
        let prompt_name = match (&opts.task, opts.role) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(InputRole::Query)) => ["query"]
                .iter()
                .find(|k| sentence.prompts.contains_key(**k))
                .map(|s| s.to_string()),
            (None, Some(InputRole::Document)) => ["document", "passage"]
                .iter()
                .find(|k| sentence.prompts.contains_key(**k))
                .map(|s| s.to_string()),
            (None, None) => sentence.default_prompt_name.clone(),
        };
        let prefix = match prompt_name {
            None => String::new(),
            Some(p) => sentence.prompts.get(&p).cloned().ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown prompt name `{p}` for {}; available: {}",
                    self.name,
                    sentence
                        .prompts
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?,
        };
        if !prefix.is_empty() && !sentence.include_prompt && sentence.pooling != Pooling::LastToken
        {
            return Err(Error::Unsupported(format!(
                "{}: pooling that excludes the prompt (include_prompt: false)",
                self.name
            )));
        }
        Ok(Resolved {
            prefix,
            adapter: None,
        })
    }

    /// Token ids per text, exactly as the model will see them.
    pub fn tokenize(&self, texts: &[String], opts: &EmbedOptions) -> Result<Vec<Vec<u32>>> {
        let r = self.resolve(opts)?;
        self.tokenize_resolved(texts, opts, &r)
    }

    fn tokenize_resolved(
        &self,
        texts: &[String],
        opts: &EmbedOptions,
        r: &Resolved,
    ) -> Result<Vec<Vec<u32>>> {
        let lower = self.folder.sentence.do_lower_case;
        let inputs: Vec<String> = texts
            .iter()
            .map(|t| {
                let t = if lower { t.to_lowercase() } else { t.clone() };
                format!("{}{}", r.prefix, t)
            })
            .collect();
        let model_max = self.model_max_length();
        let max_length = opts.max_length.unwrap_or(model_max);
        if max_length > model_max {
            return Err(Error::InvalidInput(format!(
                "max length {max_length} exceeds the model's maximum of {model_max}"
            )));
        }
        let left = opts
            .truncate_left
            .unwrap_or(self.folder.tokenizer.truncation_side_left);
        self.tokenizer
            .encode(&inputs, max_length, left, opts.truncate)
    }

    fn check_dimensions(&self, opts: &EmbedOptions) -> Result<()> {
        let Some(d) = opts.dimensions else {
            return Ok(());
        };
        let full = self.backend.hidden_size();
        match &self.folder.arch {
            Architecture::Jina(c) if !c.matryoshka_dimensions.is_empty() => {
                if d == 0 || d > full {
                    return Err(Error::InvalidInput(format!(
                        "dimensions {d} out of range 1..={full} for {}",
                        self.name
                    )));
                }
                Ok(())
            }
            _ => Err(Error::InvalidInput(format!(
                "{} is not a Matryoshka model: `dimensions` cannot be set",
                self.name
            ))),
        }
    }

    /// Embed already-tokenised rows (one forward pass per batch of similar lengths), each with its
    /// task adapter.
    pub fn embed_ids(
        &self,
        ids: &[Vec<u32>],
        tasks: &[Option<usize>],
        opts: &EmbedOptions,
    ) -> Result<Vec<Vec<f32>>> {
        self.embed_ids_staged(ids, tasks, opts, &mut Stages::default())
    }

    /// [`Embedder::embed_ids`], adding the time of each stage to `stages`.
    pub fn embed_ids_staged(
        &self,
        ids: &[Vec<u32>],
        tasks: &[Option<usize>],
        opts: &EmbedOptions,
        stages: &mut Stages,
    ) -> Result<Vec<Vec<f32>>> {
        self.check_dimensions(opts)?;
        if ids.len() != tasks.len() {
            return Err(Error::InvalidInput(format!(
                "{} token rows with {} tasks",
                ids.len(),
                tasks.len()
            )));
        }
        let batch_size = opts.batch_size.max(1);
        let mut order: Vec<usize> = (0..ids.len()).collect();
        // Longest first: batches hold similar lengths (even share-out between threads, little
        // padding on candle); output order is restored.
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(batch_size) {
            let t = std::time::Instant::now();
            let rows: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            let row_tasks: Vec<Option<usize>> = chunk.iter().map(|&i| tasks[i]).collect();
            let batch = TokenBatch::new(&rows, &row_tasks)?;
            let vectors = self.backend.embed(&batch)?.pooled;
            stages.forward += t.elapsed();
            for (&i, v) in chunk.iter().zip(vectors) {
                out[i] = v;
            }
        }
        let t = std::time::Instant::now();
        if let Some(d) = opts.dimensions {
            for v in &mut out {
                v.truncate(d);
            }
        }
        if opts.normalize {
            normalize_rows(&mut out);
        }
        stages.normalize += t.elapsed();
        Ok(out)
    }

    /// Lay `rows` out as one padded batch and run the candle model: (padded hidden states
    /// `[B, S, H]`, mask tensor, mask rows).
    fn forward_hidden(
        &self,
        rows: &[&Vec<u32>],
        adapter: Option<usize>,
    ) -> Result<(Tensor, Tensor, Vec<Vec<u32>>)> {
        let model = self.encoder.as_ref().ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: differentiable embeddings need the candle engine (it runs on {})",
                self.name,
                self.engine_name()
            ))
        })?;
        let rows: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
        let batch = Batch::new(
            &rows,
            self.folder.tokenizer.padding_side_left,
            adapter,
            &self.device,
        )?;
        let hidden = batch.packing.pad(&model.forward(&batch)?)?;
        Ok((hidden, batch.attention_mask, batch.mask_rows))
    }
}

impl Embed for Embedder {
    fn encode(&self, texts: &[String], opts: &EmbedOptions) -> Result<Encoded> {
        if texts.is_empty() {
            return Err(Error::InvalidInput("no texts to embed".into()));
        }
        self.check_dimensions(opts)?;
        let r = self.resolve(opts)?;
        let ids = self.tokenize_resolved(texts, opts, &r)?;
        Ok(Encoded {
            parts: vec![EncodedPart {
                tasks: vec![r.adapter; ids.len()],
                ids,
            }],
        })
    }
    fn embed_encoded(
        &self,
        encoded: &Encoded,
        opts: &EmbedOptions,
        stages: &mut Stages,
    ) -> Result<Vec<Vec<f32>>> {
        let [part] = encoded.parts.as_slice() else {
            return Err(Error::InvalidInput(format!(
                "{}: an encoding of {} models given to one model",
                self.name,
                encoded.parts.len()
            )));
        };
        // Output is normalised unless the caller asks otherwise (as TEI), whether or not the folder
        // lists a Normalize module; `normalize: false` returns the raw pooled vectors.
        self.embed_ids_staged(&part.ids, &part.tasks, opts, stages)
    }
    fn dimension(&self) -> usize {
        self.backend.hidden_size()
    }
    fn engine(&self) -> String {
        self.engine_name()
    }
    fn engine_reasons(&self) -> Vec<String> {
        vec![format!("{}: {}", self.name, self.engine_reason)]
    }
    fn release_memory(&self) {
        self.backend.release_memory();
    }
    fn knows_task(&self, task: &str) -> bool {
        self.tasks().iter().any(|t| t == task) || self.folder.sentence.prompts.contains_key(task)
    }
    fn max_length(&self) -> usize {
        self.model_max_length()
    }
    fn task_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tasks().to_vec();
        for p in self.folder.sentence.prompts.keys() {
            if !names.contains(p) {
                names.push(p.clone());
            }
        }
        names
    }
    fn tokens(&self, texts: &[String], opts: &EmbedOptions) -> Result<Vec<Vec<Token>>> {
        Ok(self
            .tokenize(texts, opts)?
            .into_iter()
            .map(|ids| {
                ids.into_iter()
                    .map(|id| self.tokenizer.describe(id))
                    .collect()
            })
            .collect())
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// Build the encoder an architecture describes from `weights`.
pub fn build_model(arch: &Architecture, weights: &Weights) -> Result<Box<dyn Encoder>> {
    Ok(match arch {
        Architecture::Bert(c) => Box::new(Bert::load(c, weights)?),
        Architecture::Qwen(c) => Box::new(Qwen::load(c, weights)?),
        Architecture::Jina(c) => Box::new(Jina::load(c, weights)?),
    })
}

/// Several embedders joined into one vector: each part is L2-normalised, scaled by
/// `sqrt(w_i / Σw)`, and concatenated. The result has unit norm and its cosine is the weighted mean of
/// the parts' cosines (equal weights: concatenation times 1/√2 for two parts).
pub struct Fusion {
    name: String,
    parts: Vec<(Box<dyn Embed>, f64)>,
}

impl Fusion {
    pub fn new(name: impl Into<String>, parts: Vec<(Box<dyn Embed>, f64)>) -> Result<Self> {
        if parts.is_empty() {
            return Err(Error::InvalidInput(
                "a fusion needs at least one model".into(),
            ));
        }
        if parts.iter().any(|(_, w)| !(w.is_finite() && *w > 0.0)) {
            return Err(Error::InvalidInput(
                "fusion weights must be positive".into(),
            ));
        }
        Ok(Fusion {
            name: name.into(),
            parts,
        })
    }
}

impl Fusion {
    fn check(&self, opts: &EmbedOptions) -> Result<()> {
        if opts.dimensions.is_some() {
            return Err(Error::InvalidInput(format!(
                "{}: `dimensions` cannot be set on a fusion (its dimension is fixed at {})",
                self.name,
                self.dimension()
            )));
        }
        if let Some(t) = &opts.task {
            if !self.knows_task(t) {
                return Err(Error::InvalidInput(format!(
                    "no model of {} knows task `{t}`",
                    self.name
                )));
            }
        }
        Ok(())
    }

    /// Options for one part: always normalised; a task only goes to the parts that know it (the Jina
    /// half), the others follow the role.
    fn part_options(&self, part: &dyn Embed, opts: &EmbedOptions) -> EmbedOptions {
        let mut o = opts.clone();
        o.normalize = true;
        if o.task.as_deref().is_some_and(|t| !part.knows_task(t)) {
            o.task = None;
        }
        o
    }
}

impl Embed for Fusion {
    fn encode(&self, texts: &[String], opts: &EmbedOptions) -> Result<Encoded> {
        self.check(opts)?;
        let mut out = Encoded::default();
        for (part, _) in &self.parts {
            let e = part.encode(texts, &self.part_options(part.as_ref(), opts))?;
            out.parts.extend(e.parts);
        }
        Ok(out)
    }
    fn embed_encoded(
        &self,
        encoded: &Encoded,
        opts: &EmbedOptions,
        stages: &mut Stages,
    ) -> Result<Vec<Vec<f32>>> {
        self.check(opts)?;
        let total: f64 = self.parts.iter().map(|(_, w)| w).sum();
        let mut out = vec![Vec::with_capacity(self.dimension()); encoded.len()];
        let mut rest = encoded.parts.as_slice();
        for (part, weight) in &self.parts {
            // Each member's share of the encoding: one part per model it holds.
            let n = part.models();
            if rest.len() < n {
                return Err(Error::InvalidInput(format!(
                    "{}: the encoding holds fewer parts than the fusion has models",
                    self.name
                )));
            }
            let (mine, tail) = rest.split_at(n);
            rest = tail;
            let mine = Encoded {
                parts: mine.to_vec(),
            };
            let vectors =
                part.embed_encoded(&mine, &self.part_options(part.as_ref(), opts), stages)?;
            let t = std::time::Instant::now();
            let scale = (weight / total).sqrt() as f32;
            for (o, v) in out.iter_mut().zip(vectors) {
                o.extend(v.into_iter().map(|x| x * scale));
            }
            stages.fusion += t.elapsed();
        }
        // Parts are always normalised, so the fused vector has unit norm whatever `normalize` says.
        Ok(out)
    }
    fn models(&self) -> usize {
        self.parts.iter().map(|(p, _)| p.models()).sum()
    }
    fn engine_reasons(&self) -> Vec<String> {
        self.parts
            .iter()
            .flat_map(|(p, _)| p.engine_reasons())
            .collect()
    }
    fn release_memory(&self) {
        for (p, _) in &self.parts {
            p.release_memory();
        }
    }
    fn dimension(&self) -> usize {
        self.parts.iter().map(|(p, _)| p.dimension()).sum()
    }
    fn engine(&self) -> String {
        let names: Vec<String> = self.parts.iter().map(|(p, _)| p.engine()).collect();
        names.join("+")
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn knows_task(&self, task: &str) -> bool {
        self.parts.iter().any(|(p, _)| p.knows_task(task))
    }
    fn max_length(&self) -> usize {
        self.parts
            .iter()
            .map(|(p, _)| p.max_length())
            .min()
            .unwrap_or(0)
    }
    fn task_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (p, _) in &self.parts {
            for t in p.task_names() {
                if !names.contains(&t) {
                    names.push(t);
                }
            }
        }
        names
    }
}
