//! The one interface between token ids and engines. Every engine embeds a flattened, variable-length
//! [`TokenBatch`] (token ids, cumulative sequence lengths, positions, each sequence's task adapter,
//! which sequences to pool and which to return token by token) and owns the pooling, so nothing
//! above it — [`crate::embed::Embedder`], the fusion, the server, the bench — branches on the
//! architecture or the engine.
//!
//! Two engines implement it: [`FastBackend`] (the CPU engine of [`crate::fast`], every architecture,
//! f32 / 16-bit / int8 weights) and [`CandleBackend`] (the candle models: the reference and the
//! training path). [`choose`] asks each, fastest first, whether it can run a model on a dtype and
//! device, and says why it took the one it took.

use crate::config::{Architecture, Pooling};
use crate::error::{Error, Result};
use crate::fast::{self, transformer::Seq, transformer::Transformer, Engine, Precision};
use crate::models::{Batch, Encoder};
use crate::pool::pool_packed;
use candle_core::{DType, Device};
use std::sync::Arc;

/// A flattened batch of token sequences.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenBatch {
    /// Token ids of every sequence, one after the other.
    pub ids: Vec<u32>,
    /// `cu_seqlens[i]..cu_seqlens[i + 1]` are sequence `i`'s tokens (`len + 1` entries, first 0).
    pub cu_seqlens: Vec<usize>,
    /// Position of each token, counted from its sequence's first token.
    pub positions: Vec<u32>,
    /// Task adapter of each sequence (Jina), None for the base weights.
    pub tasks: Vec<Option<usize>>,
    /// Sequences whose pooled vector is wanted, in the order the output lists them.
    pub pooled: Vec<usize>,
    /// Sequences whose last hidden state (every token) is wanted.
    pub raw: Vec<usize>,
}

impl TokenBatch {
    /// Sequences with their tasks, every one pooled.
    pub fn new(rows: &[&[u32]], tasks: &[Option<usize>]) -> Result<Self> {
        if rows.len() != tasks.len() {
            return Err(Error::InvalidInput(format!(
                "{} sequences with {} tasks",
                rows.len(),
                tasks.len()
            )));
        }
        let mut b = TokenBatch {
            cu_seqlens: vec![0],
            tasks: tasks.to_vec(),
            pooled: (0..rows.len()).collect(),
            ..Default::default()
        };
        for r in rows {
            if r.is_empty() {
                return Err(Error::InvalidInput("empty token sequence".into()));
            }
            b.ids.extend_from_slice(r);
            b.positions.extend(0..r.len() as u32);
            b.cu_seqlens.push(b.ids.len());
        }
        Ok(b)
    }

    /// Ask for the token states of these sequences instead of (or besides) their pooled vectors.
    pub fn with_outputs(mut self, pooled: Vec<usize>, raw: Vec<usize>) -> Self {
        self.pooled = pooled;
        self.raw = raw;
        self
    }

    pub fn len(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn seq(&self, i: usize) -> &[u32] {
        &self.ids[self.cu_seqlens[i]..self.cu_seqlens[i + 1]]
    }

    fn seqs(&self) -> Vec<Seq> {
        (0..self.len())
            .map(|i| Seq {
                start: self.cu_seqlens[i],
                len: self.cu_seqlens[i + 1] - self.cu_seqlens[i],
                task: self.tasks[i],
            })
            .collect()
    }

    fn check(&self) -> Result<()> {
        let n = self.len();
        let ok = self.cu_seqlens.first() == Some(&0)
            && self.cu_seqlens.windows(2).all(|w| w[0] < w[1])
            && self.cu_seqlens.last() == Some(&self.ids.len())
            && self.positions.len() == self.ids.len()
            && self.tasks.len() == n
            && self.pooled.iter().chain(&self.raw).all(|&i| i < n);
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidInput(
                "malformed token batch (sequence bounds, positions, tasks or outputs)".into(),
            ))
        }
    }
}

/// What an engine returns for a [`TokenBatch`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    /// One pooled (unnormalised) vector per entry of `batch.pooled`.
    pub pooled: Vec<Vec<f32>>,
    /// One `[len, hidden]` row-major block per entry of `batch.raw`.
    pub raw: Vec<Vec<f32>>,
}

/// An inference engine.
pub trait Backend: Send + Sync {
    /// `fast-f32`, `fast-bf16`, `fast-f16`, `fast-int8`, `candle`.
    fn name(&self) -> String;
    fn hidden_size(&self) -> usize;
    fn embed(&self, batch: &TokenBatch) -> Result<Output>;
    /// Bytes the weights take in memory, where the engine knows.
    fn weight_bytes(&self) -> Option<usize> {
        None
    }
    /// Give back scratch memory kept between calls (after a burst, when idle).
    fn release_memory(&self) {}
}

/// Pooled vectors and token blocks out of packed hidden states `[tokens, hidden]`.
fn outputs(hidden: &[f32], batch: &TokenBatch, h: usize, pooling: Pooling) -> Output {
    let mut out = Output::default();
    for &i in &batch.pooled {
        let (a, b) = (batch.cu_seqlens[i], batch.cu_seqlens[i + 1]);
        out.pooled
            .extend(pool_packed(&hidden[a * h..b * h], &[b - a], h, pooling));
    }
    for &i in &batch.raw {
        let (a, b) = (batch.cu_seqlens[i], batch.cu_seqlens[i + 1]);
        out.raw.push(hidden[a * h..b * h].to_vec());
    }
    out
}

/// The fast CPU engine.
pub struct FastBackend {
    model: Transformer,
    pooling: Pooling,
}

impl FastBackend {
    pub fn new(model: Transformer, pooling: Pooling) -> Self {
        FastBackend { model, pooling }
    }
}

impl Backend for FastBackend {
    fn name(&self) -> String {
        format!("fast-{}", self.model.precision)
    }
    fn hidden_size(&self) -> usize {
        self.model.hidden_size()
    }
    fn embed(&self, batch: &TokenBatch) -> Result<Output> {
        batch.check()?;
        let hidden = self
            .model
            .forward(&batch.ids, &batch.positions, &batch.seqs())?;
        Ok(outputs(&hidden, batch, self.hidden_size(), self.pooling))
    }
    fn weight_bytes(&self) -> Option<usize> {
        Some(self.model.weight_bytes())
    }
    fn release_memory(&self) {
        fast::release_scratch();
    }
}

/// The candle models: the reference and the training path.
pub struct CandleBackend {
    model: Arc<dyn Encoder>,
    pooling: Pooling,
    padding_left: bool,
    device: Device,
}

impl CandleBackend {
    pub fn new(
        model: Arc<dyn Encoder>,
        pooling: Pooling,
        padding_left: bool,
        device: Device,
    ) -> Self {
        CandleBackend {
            model,
            pooling,
            padding_left,
            device,
        }
    }
}

impl Backend for CandleBackend {
    fn name(&self) -> String {
        "candle".into()
    }
    fn hidden_size(&self) -> usize {
        self.model.hidden_size()
    }
    fn embed(&self, batch: &TokenBatch) -> Result<Output> {
        batch.check()?;
        let h = self.hidden_size();
        // A candle batch carries one adapter: run each task's sequences as their own padded batch
        // (positions count from each row's first real token, as the TokenBatch's do).
        let mut hidden = vec![0f32; batch.ids.len() * h];
        let mut tasks: Vec<Option<usize>> = batch.tasks.clone();
        tasks.sort();
        tasks.dedup();
        for task in tasks {
            let members: Vec<usize> = (0..batch.len())
                .filter(|&i| batch.tasks[i] == task)
                .collect();
            let rows: Vec<&[u32]> = members.iter().map(|&i| batch.seq(i)).collect();
            let b = Batch::new(&rows, self.padding_left, task, &self.device)?;
            let packed = crate::nn::inference(|| self.model.forward(&b))?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut at = 0;
            for &i in &members {
                let n = batch.cu_seqlens[i + 1] - batch.cu_seqlens[i];
                hidden[batch.cu_seqlens[i] * h..batch.cu_seqlens[i + 1] * h]
                    .copy_from_slice(&packed[at * h..(at + n) * h]);
                at += n;
            }
        }
        Ok(outputs(&hidden, batch, h, self.pooling))
    }
}

/// The engine [`choose`] picked and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// `Some(precision)` for the fast engine, None for candle.
    pub fast: Option<Precision>,
    pub reason: String,
}

/// Pick the engine for a model, dtype and device: the fast engine where it can run them (it is the
/// faster one on the CPU), candle otherwise; `Engine::Fast` insists and errors with the reason.
/// `peft` marks a PEFT adapter folder (attached LoRA), which only candle runs.
pub fn choose(
    arch: &Architecture,
    dtype: DType,
    device: &Device,
    engine: Engine,
    peft: bool,
) -> Result<Choice> {
    let fast_ok = || -> std::result::Result<Precision, String> {
        if !device.is_cpu() {
            return Err("it runs on the CPU only".into());
        }
        if peft {
            return Err("it does not attach PEFT LoRA adapters (merge them first)".into());
        }
        fast::load::supports(arch)?;
        match engine {
            Engine::Fast(Precision::Int8) => Ok(Precision::Int8),
            _ => Precision::for_dtype(dtype)
                .ok_or_else(|| format!("it holds f32, bf16 or f16 weights, not {dtype:?}")),
        }
    };
    match engine {
        Engine::Candle => Ok(Choice {
            fast: None,
            reason: "candle: asked for (--engine candle)".into(),
        }),
        Engine::Fast(_) => match fast_ok() {
            Ok(p) => Ok(Choice {
                fast: Some(p),
                reason: format!("fast-{p}: asked for"),
            }),
            Err(why) => Err(Error::Unsupported(format!(
                "the fast engine cannot run this model: {why}"
            ))),
        },
        Engine::Auto => Ok(match fast_ok() {
            Ok(p) => Choice {
                fast: Some(p),
                reason: format!(
                    "fast-{p}: the fastest engine that runs {} with {p} weights on the CPU",
                    arch.name()
                ),
            },
            Err(why) => Choice {
                fast: None,
                reason: format!("candle: the fast engine cannot run this model: {why}"),
            },
        }),
    }
}
