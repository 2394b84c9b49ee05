//! The training loop: seeded no-duplicate batches, forward through the real model, loss, backward,
//! gradient accumulation and clipping, AdamW with warmup and decay, evaluation before training and
//! after every epoch, a checkpoint per epoch and at the end, resumable state, and Ctrl-C handling.

use super::checkpoint::{save_model, tensor_bytes, write_safetensors};
use super::data::{epoch_batches, Example};
use super::eval::{evaluate, RetrievalMetrics};
use super::loss::{matryoshka, mnrl_loss, triplet_loss, value, Distance};
use super::optim::{accumulate, clip_grad_norm, collect, AdamW, AdamWConfig, Decay, Schedule};
use crate::config::Architecture;
use crate::embed::{EmbedOptions, Embedder, InputRole};
use crate::error::{Error, Result};
use crate::weights::{Dtype, NamedVars, SafetensorsFile};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum LossKind {
    Triplet { cosine: bool, margin: f64 },
    Mnrl { scale: f64 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub loss: LossKind,
    /// Matryoshka dimensions (equal weights); empty = off.
    pub matryoshka_dims: Vec<usize>,
    pub batch_size: usize,
    pub epochs: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub cosine_decay: bool,
    pub weight_decay: f64,
    /// Global-norm clipping threshold; 0 = off.
    pub max_grad_norm: f64,
    pub grad_accum: usize,
    pub seed: u64,
    /// Jina: the task adapter to fine-tune (only its slices change).
    pub task: Option<String>,
    pub max_length: Option<usize>,
    /// Stop after this many optimiser steps in this run (a resumable checkpoint is saved).
    pub max_steps: Option<u64>,
    /// Train LoRA adapters (rank, alpha, target modules) instead of all weights.
    pub lora: Option<LoraConfig>,
    /// Dropout probability for every dropout of the model; None keeps the model config's
    /// (`hidden_dropout_prob`, `attention_probs_dropout_prob`, ...). `Some(0.0)` switches it off.
    pub dropout: Option<f64>,
    /// GradCache (sentence-transformers' Cached* losses): embed each batch in mini-batches of this
    /// many texts without keeping the graph, take the loss and its gradient with respect to the
    /// embeddings over the whole batch, then re-run each mini-batch with the graph and push those
    /// gradients through. Same gradients as the plain loss; memory bounded by the mini-batch.
    #[serde(default)]
    pub cache_mini_batch: Option<usize>,
    /// Activation checkpointing: each transformer layer keeps only its input in the forward pass
    /// and is recomputed, with the same dropout masks, when the backward pass reaches it. Same
    /// gradients; activation memory of one layer instead of all.
    #[serde(default)]
    pub checkpoint_activations: bool,
    /// The arithmetic of the projections: f32, or bf16 mixed precision (bf16 products summed in
    /// f32; master weights, gradients, optimiser state, norms and softmax in f32).
    #[serde(default)]
    pub precision: TrainPrecision,
}

/// How training computes its projections ([`TrainConfig::precision`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainPrecision {
    #[default]
    F32,
    /// bf16 mixed precision on the fast training pass ([`crate::fast::train::with_mixed_bf16`]):
    /// bf16 instructions where the CPU has them (AMX, AVX-512 BF16), the same products through
    /// the f32 GEMM elsewhere.
    Bf16,
}

impl std::fmt::Display for TrainPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrainPrecision::F32 => "f32",
            TrainPrecision::Bf16 => "bf16",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter input.
    pub dropout: f64,
    /// Empty: PEFT's default for the architecture (query/value projections).
    pub targets: Vec<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            loss: LossKind::Mnrl { scale: 20.0 },
            matryoshka_dims: Vec::new(),
            batch_size: 16,
            epochs: 1,
            lr: 2e-5,
            warmup_ratio: 0.1,
            cosine_decay: false,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            grad_accum: 1,
            seed: 42,
            task: None,
            max_length: None,
            max_steps: None,
            lora: None,
            dropout: None,
            cache_mini_batch: None,
            checkpoint_activations: false,
            precision: Default::default(),
        }
    }
}

/// Where a run stands; saved with every checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub epoch: usize,
    /// Index of the next batch of `epoch` to train on.
    pub next_batch: usize,
    pub step: u64,
    pub total_steps: u64,
    pub losses: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub mean_loss: f64,
    pub metrics: Option<RetrievalMetrics>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Report {
    pub before: Option<RetrievalMetrics>,
    pub epochs: Vec<EpochReport>,
    pub interrupted: bool,
    pub memory: Option<MemoryReport>,
    /// The projections' arithmetic and the kernels that ran it ([`precision_description`]).
    #[serde(default)]
    pub precision: Option<String>,
}

/// How `precision` computes on this CPU, e.g. `bf16 mixed precision on amx`, or for a CPU without
/// bf16 instructions `bf16 mixed precision, emulated on avx2 (same products, f32 GEMM speed)`.
pub fn precision_description(precision: TrainPrecision) -> String {
    let kernels = crate::fast::cpu::active();
    match precision {
        TrainPrecision::F32 => "f32".into(),
        TrainPrecision::Bf16 if kernels.has_bf16() => {
            format!("bf16 mixed precision on {kernels}")
        }
        TrainPrecision::Bf16 => format!(
            "bf16 mixed precision, emulated on {kernels} (no bf16 instructions: the same \
             products through the f32 GEMM, slower than f32)"
        ),
    }
}

/// Memory of a run: measured peak resident memory, and the textbook components.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryReport {
    pub parameters: usize,
    pub trainable_parameters: usize,
    pub weights_bytes: usize,
    pub gradients_bytes: usize,
    pub optimizer_bytes: usize,
    pub peak_rss_bytes: Option<usize>,
    /// Peak RSS minus the three components above: activations, workspace and the rest.
    pub activations_and_rest_bytes: Option<usize>,
}

/// Where the time and memory of one optimiser step went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepProfile {
    pub loss: f64,
    /// The loss: every forward pass of the batch.
    pub forward_s: f64,
    pub backward_s: f64,
    /// Global gradient norm and clipping.
    pub clip_s: f64,
    pub adamw_s: f64,
    /// Bytes of the gradients the backward pass produced (measured on the tensors).
    pub gradients_bytes: usize,
    /// Bytes of the AdamW moments after the step (measured on the tensors).
    pub optimizer_bytes: usize,
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub struct Trainer {
    /// The base model folder (weights not trained are copied from here).
    src: PathBuf,
    /// LoRA: the adapter spec (the variables are the adapters, by PEFT name).
    lora: Option<crate::lora::LoraSpec>,
    /// Parameters of the whole model (trained or not), for the memory report.
    base_parameters: usize,
    pub embedder: Embedder,
    vars: NamedVars,
    /// Positions in `vars` of the optimised variables.
    trained: Vec<usize>,
    /// Jina adapter whose slices alone may change.
    adapter: Option<usize>,
    opt: AdamW,
    pub config: TrainConfig,
    pub state: TrainerState,
    dtype: DType,
}

impl Trainer {
    /// Load `model_dir` for training. If it holds `trainer_state.json` and `optimizer.safetensors`
    /// (a checkpoint) and `resume` is set, the run continues where it stopped.
    pub fn new(model_dir: &Path, config: TrainConfig, dtype: DType, resume: bool) -> Result<Self> {
        Self::open(model_dir, config, dtype, resume, false)
    }

    /// [`Trainer::new`] for [`Trainer::dump_gradients`] with the gradient of every weight: training
    /// one Jina task adapter otherwise makes only the adapters variables, and its pass computes no
    /// gradient for the frozen base weights.
    pub fn for_every_gradient(model_dir: &Path, config: TrainConfig, dtype: DType) -> Result<Self> {
        Self::open(model_dir, config, dtype, false, true)
    }

    fn open(
        model_dir: &Path,
        config: TrainConfig,
        dtype: DType,
        resume: bool,
        every_gradient: bool,
    ) -> Result<Self> {
        let cpu = crate::device::cpu();
        let (src, embedder, vars, lora) = match &config.lora {
            None => {
                // One Jina task's adapter learns; the base weights stay as they are, so they are
                // constants: no weight gradient is computed or kept for them.
                let adapter_only = config.task.is_some()
                    && !every_gradient
                    && matches!(
                        crate::config::Architecture::from_file(&model_dir.join("config.json"))?,
                        Architecture::Jina(_)
                    );
                let keep: Option<fn(&str) -> bool> =
                    adapter_only.then_some(|name: &str| name.contains(".lora_"));
                let (e, vars) = Embedder::load_trainable_only(model_dir, dtype, &cpu, keep)?;
                (model_dir.to_path_buf(), e, vars, None)
            }
            Some(lc) => {
                let (attach, base) = if resume {
                    crate::lora::LoraAttach::from_peft(model_dir, true)?
                } else {
                    let arch =
                        crate::config::Architecture::from_file(&model_dir.join("config.json"))?;
                    if matches!(arch, Architecture::Jina(_)) {
                        return Err(Error::Unsupported("--lora on jina-embeddings-v3: it has its own task adapters; use --task".into()));
                    }
                    let targets = if lc.targets.is_empty() {
                        crate::lora::LoraSpec::default_targets(&arch)
                    } else {
                        lc.targets.clone()
                    };
                    let spec = crate::lora::LoraSpec {
                        rank: lc.rank,
                        alpha: lc.alpha,
                        dropout: lc.dropout,
                        targets,
                    };
                    (
                        crate::lora::LoraAttach::new(spec, config.seed),
                        model_dir.to_path_buf(),
                    )
                };
                let spec = attach.spec.clone();
                let attach = std::sync::Arc::new(attach);
                let weights = crate::weights::Weights::new(
                    crate::weights::WeightStore::from_dir(&base)?,
                    dtype,
                    &cpu,
                )
                .with_lora(attach.clone());
                let e = Embedder::from_weights(&base, &weights)?;
                let vars = attach.variables();
                if vars.is_empty() {
                    return Err(Error::InvalidInput(format!(
                        "LoRA targets {:?} match no Linear layer of the model",
                        spec.targets
                    )));
                }
                (base, e, vars, Some(spec))
            }
        };
        let store = crate::weights::WeightStore::from_dir(&src)?;
        let base_parameters: usize = store
            .names()
            .map(|n| store.info(n).map_or(0, |i| i.numel()))
            .sum();
        let mut adapter = None;
        let trained: Vec<usize> = match (&embedder.folder().arch, &config.task) {
            (_, _) if lora.is_some() => (0..vars.len()).collect(),
            (Architecture::Jina(c), Some(t)) => {
                adapter = Some(c.lora_adaptations.iter().position(|a| a == t).ok_or_else(
                    || {
                        Error::InvalidInput(format!(
                            "unknown task `{t}`; available: {}",
                            c.lora_adaptations.join(", ")
                        ))
                    },
                )?);
                (0..vars.len())
                    .filter(|&i| vars[i].0.contains(".lora_"))
                    .collect()
            }
            (_, Some(t)) if !crate::embed::Embed::knows_task(&embedder, t) => {
                return Err(Error::InvalidInput(format!(
                    "--task `{t}` means nothing for this model"
                )))
            }
            _ => (0..vars.len()).collect(),
        };
        let params: NamedVars = trained.iter().map(|&i| vars[i].clone()).collect();
        let mut opt = AdamW::new(
            params,
            AdamWConfig {
                lr: config.lr,
                weight_decay: config.weight_decay,
                ..Default::default()
            },
        )?;
        let mut state = TrainerState::default();
        let state_path = model_dir.join("trainer_state.json");
        if resume {
            let text =
                std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
            state = serde_json::from_str(&text)
                .map_err(|e| Error::config(&state_path, e.to_string()))?;
            let optim = SafetensorsFile::open(model_dir.join("optimizer.safetensors"))?;
            for ((name, _), st) in opt.params.iter().zip(opt.state.iter_mut()) {
                st.m = optim.load(&format!("m.{name}"), DType::F32, &crate::device::cpu())?;
                st.v = optim.load(&format!("v.{name}"), DType::F32, &crate::device::cpu())?;
            }
            opt.step = state.step;
        }
        Ok(Trainer {
            src,
            lora,
            base_parameters,
            embedder,
            vars,
            trained,
            adapter,
            opt,
            config,
            state,
            dtype,
        })
    }

    fn options(&self, role: InputRole) -> EmbedOptions {
        EmbedOptions {
            role: if self.config.task.is_some() {
                None
            } else {
                Some(role)
            },
            task: self.config.task.clone(),
            max_length: self.config.max_length,
            ..Default::default()
        }
    }

    /// The texts a batch embeds, by column (anchors as queries; positives and negatives as
    /// documents), as the loss reads them.
    fn columns(&self, examples: &[&Example]) -> Result<Vec<(Vec<String>, EmbedOptions)>> {
        let col =
            |f: &dyn Fn(&Example) -> String| examples.iter().map(|e| f(e)).collect::<Vec<_>>();
        let q = self.options(InputRole::Query);
        let d = self.options(InputRole::Document);
        let mut cols = vec![
            (col(&|e| e.anchor.clone()), q),
            (col(&|e| e.positive.clone()), d.clone()),
        ];
        match self.config.loss {
            LossKind::Triplet { .. } => {
                if let Some(e) = examples.iter().find(|e| e.negatives.is_empty()) {
                    return Err(Error::InvalidInput(format!(
                        "triplet loss needs a negative for every example (anchor `{}` has none)",
                        e.anchor
                    )));
                }
                cols.push((col(&|e| e.negatives[0].clone()), d));
            }
            LossKind::Mnrl { .. } => {
                let negs: Vec<String> = examples
                    .iter()
                    .flat_map(|e| e.negatives.iter().cloned())
                    .collect();
                if !negs.is_empty() {
                    cols.push((negs, d));
                }
            }
        }
        Ok(cols)
    }

    /// The configured loss over embeddings by column (see [`Trainer::columns`]).
    fn loss_on(&self, embeddings: &[Tensor]) -> Result<Tensor> {
        let loss_of = |e: &[Tensor]| -> Result<Tensor> {
            match self.config.loss {
                LossKind::Triplet { cosine, margin } => {
                    let dist = if cosine {
                        Distance::Cosine
                    } else {
                        Distance::Euclidean
                    };
                    triplet_loss(&e[0], &e[1], &e[2], dist, margin)
                }
                LossKind::Mnrl { scale } => mnrl_loss(&e[0], &e[1], &e[2..], scale),
            }
        };
        if self.config.matryoshka_dims.is_empty() {
            loss_of(embeddings)
        } else {
            let w = vec![1.0; self.config.matryoshka_dims.len()];
            matryoshka(embeddings, &self.config.matryoshka_dims, &w, loss_of)
        }
    }

    /// The loss of one batch of examples (a differentiable scalar).
    pub fn batch_loss(&self, examples: &[&Example]) -> Result<Tensor> {
        let embeddings = self
            .columns(examples)?
            .iter()
            .map(|(texts, opts)| self.embedder.embed_tensor(texts, opts))
            .collect::<Result<Vec<_>>>()?;
        self.loss_on(&embeddings)
    }

    /// The dropout seed of micro-batch `micro` of the current step.
    fn dropout_seed(&self, micro: usize) -> u64 {
        self.config.seed
            ^ (self.state.step + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (micro as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
    }

    /// The loss (times `scale`) of one batch and the gradient of every variable, in training mode:
    /// plainly, or through GradCache when `cache_mini_batch` is set, with checkpointed layers when
    /// `checkpoint_activations` is.
    pub fn loss_and_gradients(
        &self,
        examples: &[&Example],
        micro: usize,
        scale: f64,
    ) -> Result<(f64, Vec<Option<Tensor>>)> {
        self.in_precision(|| self.loss_and_gradients_inner(examples, micro, scale))
    }

    /// Run `f` (one step's forward pass, with or without its backward) in the configured
    /// precision. Mixed precision lives in the fast training pass: a step that did not run it
    /// (candle's graph runs f64, adapter dropout, …) would silently be f32, so that is an error.
    fn in_precision<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.config.precision == TrainPrecision::F32 {
            return f();
        }
        let before = crate::fast::train::layer_passes();
        let out = crate::fast::train::with_mixed_bf16(true, f)?;
        if crate::fast::train::layer_passes() == before {
            return Err(Error::InvalidInput(format!(
                "--precision {}: mixed precision runs on the fast training pass, which does not \
                 run this model and configuration (it runs f32 weights without adapter dropout \
                 on BERT, Jina v3, Qwen2 and Qwen3, and SEMBED_TRAIN_KERNELS must not be \
                 `candle`)",
                self.config.precision
            )));
        }
        Ok(out)
    }

    fn loss_and_gradients_inner(
        &self,
        examples: &[&Example],
        micro: usize,
        scale: f64,
    ) -> Result<(f64, Vec<Option<Tensor>>)> {
        if !self.config.checkpoint_activations {
            return self.loss_and_gradients_of(examples, micro, scale);
        }
        let ((loss, mut grads), inside) =
            crate::nn::with_checkpointing(|| self.loss_and_gradients_of(examples, micro, scale))?;
        // The parameters inside the checkpointed layers got their gradients in the recomputations.
        let inner: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|(_, v)| inside.get(&v.as_tensor().id()).cloned())
            .collect();
        accumulate(&mut grads, inner)?;
        Ok((loss, grads))
    }

    fn loss_and_gradients_of(
        &self,
        examples: &[&Example],
        micro: usize,
        scale: f64,
    ) -> Result<(f64, Vec<Option<Tensor>>)> {
        match self.config.cache_mini_batch {
            Some(m) => self.cached_loss_and_gradients(examples, micro, scale, m.max(1)),
            None => {
                let loss = (self.training_loss(examples, micro)? * scale)?;
                let grads = collect(&self.vars, &loss.backward()?);
                Ok((value(&loss)?, grads))
            }
        }
    }

    /// GradCache over the batch's columns (see [`super::cache::grad_cache`]); each mini-batch draws
    /// its dropout masks from its own seeded generator, the same in both passes.
    fn cached_loss_and_gradients(
        &self,
        examples: &[&Example],
        micro: usize,
        scale: f64,
        m: usize,
    ) -> Result<(f64, Vec<Option<Tensor>>)> {
        let columns = self.columns(examples)?;
        let seed = self.dropout_seed(micro);
        let texts: Vec<&[String]> = columns.iter().map(|(t, _)| t.as_slice()).collect();
        let embed = |col: usize, k: usize, chunk: &[String]| {
            let s = seed
                ^ (((col as u64 + 1) << 32) | (k as u64 + 1)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
            let ctx = std::sync::Arc::new(crate::nn::DropoutCtx::new(self.config.dropout, s));
            crate::nn::with_dropout(ctx, || self.embedder.embed_tensor(chunk, &columns[col].1))
        };
        let loss = |e: &[Tensor]| Ok((self.loss_on(e)? * scale)?);
        super::cache::grad_cache(&texts, m, &embed, &loss, &self.vars)
    }

    /// [`Trainer::batch_loss`] with the model's dropout on, its masks drawn from a generator seeded
    /// by (seed, step, micro-batch): the same step gives the same masks, so resuming reproduces a run.
    pub fn training_loss(&self, examples: &[&Example], micro: usize) -> Result<Tensor> {
        let seed = self.dropout_seed(micro);
        let ctx = std::sync::Arc::new(crate::nn::DropoutCtx::new(self.config.dropout, seed));
        crate::nn::with_dropout(ctx, || self.batch_loss(examples))
    }

    /// Loss and the gradient of every variable for one batch (dropout as in training), without
    /// updating anything.
    pub fn gradients(&self, examples: &[&Example]) -> Result<(f64, Vec<Option<Tensor>>)> {
        self.loss_and_gradients(examples, 0, 1.0)
    }

    /// Write the loss and gradients of the first batch of epoch 0 to `path` (safetensors keyed by the
    /// checkpoint's tensor names; tensors without a gradient are zeros; loss in the metadata).
    pub fn dump_gradients(&self, examples: &[Example], path: &Path) -> Result<f64> {
        let batches = epoch_batches(examples, self.config.batch_size, self.config.seed, 0);
        let first: Vec<&Example> = batches[0].iter().map(|&i| &examples[i]).collect();
        let (loss, grads) = self.gradients(&first)?;
        let dtype = if self.dtype == DType::F64 {
            Dtype::F64
        } else {
            Dtype::F32
        };
        let mut tensors = Vec::new();
        let mut have = std::collections::HashSet::new();
        for ((name, var), g) in self.vars.iter().zip(&grads) {
            let g = match g {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like()?,
            };
            tensors.push((
                name.clone(),
                dtype,
                g.dims().to_vec(),
                tensor_bytes(&g, dtype)?,
            ));
            have.insert(name.clone());
        }
        // Checkpoint tensors the model does not use (a pooler) have zero gradient.
        let store = crate::weights::WeightStore::from_dir(&self.src)?;
        let mut rest: Vec<&str> = store.names().filter(|n| !have.contains(*n)).collect();
        rest.sort();
        for name in rest {
            let info = store.info(name).expect("listed");
            let zeros = Tensor::zeros(info.shape.as_slice(), DType::F32, &crate::device::cpu())?;
            tensors.push((
                name.to_string(),
                dtype,
                info.shape.clone(),
                tensor_bytes(&zeros, dtype)?,
            ));
        }
        let mut meta = HashMap::new();
        meta.insert("loss".to_string(), format!("{loss}"));
        write_safetensors(path, &tensors, meta)?;
        Ok(loss)
    }

    /// Apply one optimiser step from accumulated gradients.
    fn update(&mut self, grads: Vec<Option<Tensor>>, lr: f64) -> Result<()> {
        // Clip over the trained parameters only (torch clips what the optimiser holds).
        let mut trained_grads: Vec<Option<Tensor>> =
            self.trained.iter().map(|&i| grads[i].clone()).collect();
        if self.config.max_grad_norm > 0.0 {
            clip_grad_norm(&mut trained_grads, self.config.max_grad_norm)?;
        }
        let before: Vec<Tensor> = match self.adapter {
            Some(_) => self
                .opt
                .params
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
            None => Vec::new(),
        };
        self.opt.step(&trained_grads, lr)?;
        if let Some(t) = self.adapter {
            // Only the active task's slice of each stacked LoRA tensor may change.
            for ((_, var), old) in self.opt.params.iter().zip(before) {
                let new = var.as_tensor();
                let n = new.dim(0)?;
                let mut parts = Vec::with_capacity(3);
                if t > 0 {
                    parts.push(old.narrow(0, 0, t)?);
                }
                parts.push(new.narrow(0, t, 1)?);
                if t + 1 < n {
                    parts.push(old.narrow(0, t + 1, n - t - 1)?);
                }
                var.set(&Tensor::cat(&parts, 0)?.detach())?;
            }
        }
        Ok(())
    }

    /// One optimiser step on one batch (loss, backward, clipping, AdamW at `lr`); returns the loss.
    pub fn step(&mut self, examples: &[&Example], lr: f64) -> Result<f64> {
        let (loss, grads) = self.loss_and_gradients(examples, 0, 1.0)?;
        self.update(grads, lr)?;
        self.state.step += 1;
        Ok(loss)
    }

    /// Compute the steps from now on in `precision` (the master weights and the optimiser state
    /// stay f32 either way, so a run can switch between steps).
    pub fn set_precision(&mut self, precision: TrainPrecision) {
        self.config.precision = precision;
    }

    /// One optimiser step like [`Trainer::step`], timing each part and measuring the bytes of the
    /// gradients and of the optimiser state it holds afterwards.
    pub fn profile_step(&mut self, examples: &[&Example], lr: f64) -> Result<StepProfile> {
        use std::time::Instant;
        let t0 = Instant::now();
        let loss = self.in_precision(|| self.training_loss(examples, 0))?;
        let loss_value = value(&loss)?;
        let t1 = Instant::now();
        let grads = collect(&self.vars, &loss.backward()?);
        let t2 = Instant::now();
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let gradients_bytes = grads.iter().flatten().map(size).sum();
        let mut trained: Vec<Option<Tensor>> =
            self.trained.iter().map(|&i| grads[i].clone()).collect();
        drop(grads);
        let t3 = Instant::now();
        clip_grad_norm(&mut trained, self.config.max_grad_norm.max(1e-12))?;
        let t4 = Instant::now();
        self.opt.step(&trained, lr)?;
        let t5 = Instant::now();
        self.state.step += 1;
        let optimizer_bytes = self
            .opt
            .state
            .iter()
            .map(|st| size(&st.m) + size(&st.v))
            .sum();
        Ok(StepProfile {
            loss: loss_value,
            forward_s: (t1 - t0).as_secs_f64(),
            backward_s: (t2 - t1).as_secs_f64(),
            clip_s: (t4 - t3).as_secs_f64(),
            adamw_s: (t5 - t4).as_secs_f64(),
            gradients_bytes,
            optimizer_bytes,
        })
    }

    /// Save a model checkpoint with optimiser and trainer state (LoRA: the adapter folder).
    pub fn save_checkpoint(&self, out: &Path) -> Result<()> {
        match &self.lora {
            None => save_model(&self.src, out, &self.vars)?,
            Some(spec) => crate::lora::save_peft(out, spec, &self.src, &self.vars)?,
        }
        let mut tensors = Vec::new();
        for ((name, _), st) in self.opt.params.iter().zip(&self.opt.state) {
            tensors.push((
                format!("m.{name}"),
                Dtype::F32,
                st.m.dims().to_vec(),
                tensor_bytes(&st.m, Dtype::F32)?,
            ));
            tensors.push((
                format!("v.{name}"),
                Dtype::F32,
                st.v.dims().to_vec(),
                tensor_bytes(&st.v, Dtype::F32)?,
            ));
        }
        write_safetensors(&out.join("optimizer.safetensors"), &tensors, HashMap::new())?;
        let state = serde_json::to_string_pretty(&self.state).expect("serialisable");
        std::fs::write(out.join("trainer_state.json"), state).map_err(|e| Error::io(out, e))?;
        let config = serde_json::to_string_pretty(&self.config).expect("serialisable");
        std::fs::write(out.join("training_config.json"), config).map_err(|e| Error::io(out, e))
    }

    /// Save the trained model (no optimiser state). LoRA: the PEFT adapter in `out/adapter`, and the
    /// adapters merged into the base weights as a complete model folder in `out`.
    pub fn save_model(&self, out: &Path) -> Result<()> {
        match &self.lora {
            None => save_model(&self.src, out, &self.vars),
            Some(spec) => {
                crate::lora::save_peft(&out.join("adapter"), spec, &self.src, &self.vars)?;
                let store = crate::weights::WeightStore::from_dir(&self.src)?;
                let merged: NamedVars = crate::lora::merged_weights(&store, spec, &self.vars)?
                    .into_iter()
                    .map(|(n, t)| Ok((n, candle_core::Var::from_tensor(&t)?)))
                    .collect::<Result<_>>()?;
                save_model(&self.src, out, &merged)
            }
        }
    }

    fn evaluate(&self, eval: Option<&[Example]>) -> Result<Option<RetrievalMetrics>> {
        match eval {
            None => Ok(None),
            Some(e) => Ok(Some(evaluate(
                &self.embedder,
                e,
                self.config.task.as_deref(),
                32,
            )?)),
        }
    }

    pub fn memory(&self) -> MemoryReport {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let var_bytes: usize = self.vars.iter().map(|(_, v)| size(v.as_tensor())).sum();
        let var_params: usize = self
            .vars
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum();
        let elem = self.dtype.size_in_bytes();
        let (params, weights) = match self.lora {
            None => (var_params, var_bytes),
            Some(_) => (
                self.base_parameters + var_params,
                self.base_parameters * elem + var_bytes,
            ),
        };
        let trainable: usize = self
            .opt
            .params
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum();
        // Gradients exist for every variable in the backward pass (candle differentiates all Vars;
        // with LoRA only the adapters are variables); AdamW keeps two f32 moments per trained
        // parameter.
        let gradients = var_bytes;
        let optimizer = trainable * 8;
        let peak = peak_rss_bytes();
        MemoryReport {
            parameters: params,
            trainable_parameters: trainable,
            weights_bytes: weights,
            gradients_bytes: gradients,
            optimizer_bytes: optimizer,
            peak_rss_bytes: peak,
            activations_and_rest_bytes: peak
                .map(|p| p.saturating_sub(weights + gradients + optimizer)),
        }
    }

    /// Train. Evaluates on `eval` before training and after every epoch, writes
    /// `out/checkpoints/epoch-N` per epoch, the final model to `out`, and `out/metrics.json`. When
    /// `interrupt` becomes true, or `max_steps` is reached, saves `out/checkpoints/interrupted` and
    /// returns with `interrupted` set.
    pub fn train(
        &mut self,
        examples: &[Example],
        eval: Option<&[Example]>,
        out: &Path,
        interrupt: &AtomicBool,
        progress: bool,
    ) -> Result<Report> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let accum = self.config.grad_accum.max(1);
        let per_epoch: Vec<usize> = (0..self.config.epochs)
            .map(|e| {
                epoch_batches(examples, self.config.batch_size, self.config.seed, e)
                    .len()
                    .div_ceil(accum)
            })
            .collect();
        let total: u64 = per_epoch.iter().map(|&n| n as u64).sum();
        self.state.total_steps = total;
        let schedule = Schedule {
            base_lr: self.config.lr,
            warmup_steps: (self.config.warmup_ratio * total as f64).ceil() as u64,
            total_steps: total,
            decay: if self.config.cosine_decay {
                Decay::Cosine
            } else {
                Decay::Linear
            },
        };
        let metrics_path = out.join("metrics.json");
        // A resumed run continues the report of the run it resumes.
        let mut report: Report = std::fs::read_to_string(&metrics_path)
            .ok()
            .filter(|_| self.state.step > 0)
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        report.interrupted = false;
        report.precision = Some(precision_description(self.config.precision));
        if self.state.step == 0 && self.state.epoch == 0 && self.state.next_batch == 0 {
            report.before = self.evaluate(eval)?;
        }
        let bar = if progress {
            let b = indicatif::ProgressBar::new(total);
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            if let Ok(s) = indicatif::ProgressStyle::with_template(
                "{bar:30} step {pos}/{len} {msg} [{elapsed} eta {eta}]",
            ) {
                b.set_style(s);
            }
            b.set_position(self.state.step);
            Some(b)
        } else {
            None
        };
        let start_step = self.state.step;
        let started = std::time::Instant::now();
        let mut texts_seen = 0usize;
        while self.state.epoch < self.config.epochs {
            let epoch = self.state.epoch;
            let batches = epoch_batches(examples, self.config.batch_size, self.config.seed, epoch);
            let mut epoch_losses = Vec::new();
            while self.state.next_batch < batches.len() {
                if interrupt.load(Ordering::SeqCst)
                    || self
                        .config
                        .max_steps
                        .is_some_and(|m| self.state.step - start_step >= m)
                {
                    let dir = out.join("checkpoints").join("interrupted");
                    self.save_checkpoint(&dir)?;
                    report.interrupted = true;
                    report.memory = Some(self.memory());
                    write_json(&metrics_path, &report)?;
                    if let Some(b) = &bar {
                        b.abandon_with_message(format!(
                            "interrupted: resumable checkpoint in {}",
                            dir.display()
                        ));
                    }
                    return Ok(report);
                }
                let group_end = (self.state.next_batch + accum).min(batches.len());
                let mut acc: Vec<Option<Tensor>> = vec![None; self.vars.len()];
                let mut group_loss = 0.0;
                for (micro, b) in batches[self.state.next_batch..group_end].iter().enumerate() {
                    let ex: Vec<&Example> = b.iter().map(|&i| &examples[i]).collect();
                    texts_seen += ex.len();
                    let scale = 1.0 / (group_end - self.state.next_batch) as f64;
                    let (loss, grads) = self.loss_and_gradients(&ex, micro, scale)?;
                    group_loss += loss;
                    accumulate(&mut acc, grads)?;
                }
                let lr = schedule.lr(self.state.step);
                self.update(acc, lr)?;
                self.state.step += 1;
                self.state.next_batch = group_end;
                self.state.losses.push(group_loss);
                epoch_losses.push(group_loss);
                if let Some(b) = &bar {
                    let rate = texts_seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
                    b.set_message(format!(
                        "loss {group_loss:.4} lr {lr:.2e} {rate:.1} examples/s"
                    ));
                    b.inc(1);
                }
            }
            let metrics = self.evaluate(eval)?;
            let mean_loss = epoch_losses.iter().sum::<f64>() / epoch_losses.len().max(1) as f64;
            report.epochs.push(EpochReport {
                epoch,
                mean_loss,
                metrics,
            });
            self.state.epoch += 1;
            self.state.next_batch = 0;
            self.save_checkpoint(&out.join("checkpoints").join(format!("epoch-{}", epoch + 1)))?;
            write_json(&metrics_path, &report)?;
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        self.save_model(out)?;
        report.memory = Some(self.memory());
        write_json(&metrics_path, &report)?;
        Ok(report)
    }

    /// The trained variables by checkpoint name (for tests and reports).
    pub fn variables(&self) -> &NamedVars {
        &self.vars
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("serialisable");
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}
