//! `sembed export MODEL --onnx OUT_DIR`: a sembed model as one ONNX graph.
//!
//! The graph computes what sembed's engines compute, operator for operator: the same embeddings,
//! positions counted from each row's first real token (so left and right padding agree), the same
//! attention mask values, the model's own pooling and normalisation. Inputs are `input_ids` and
//! `attention_mask` (int64, `[batch, sequence]`); outputs are `last_hidden_state`
//! (`[batch, sequence, hidden]`, what sentence-transformers' ONNX backend pools) and
//! `sentence_embedding` (`[batch, hidden]`, pooled as the model says and L2-normalised).
//!
//! LoRA adapters (a PEFT folder from `sembed train --lora`) are merged into the weights. Jina v3's task
//! adapters are merged for `--task T`; without it every task stays selectable by a scalar int64
//! `task_id` input (the adapter's index in `lora_adaptations`), as in Jina's own ONNX release.
//!
//! `--quantize int8` quantizes every Linear's weight per output channel (symmetric, 255 levels) and its
//! input per call (`DynamicQuantizeLinear`, uint8), multiplying with `MatMulInteger`: ONNX Runtime's
//! dynamic quantization, in standard operators. The weights are stored as uint8 with zero point 128
//! (the same 8-bit values): ONNX Runtime multiplies uint8 × int8 on CPUs without VNNI with
//! `vpmaddubsw`, whose int16 pair sums saturate (cosine to f32 fell to 0.967 on an AVX2-only EPYC),
//! while uint8 × uint8 is widened first and exact everywhere. The token embedding table is stored in
//! int8 per row too.

use crate::error::{OnnxError, Result};
use crate::graph::{attr_float, attr_int, attr_ints, Axis, Data, Graph};
use crate::proto::tensor_proto::DataType;
use candle_core::{DType, Device, Tensor};
use sembed::config::{Architecture, BertConfig, JinaConfig, ModelFolder, Pooling, QwenConfig};
use sembed::models::bert::Activation;
use sembed::weights::{WeightStore, Weights};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The value Jina masks padded keys with (sembed's and upstream's).
const JINA_MASK: f32 = -10000.0;

#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Jina v3: merge this task's adapter (otherwise a `task_id` input selects it).
    pub task: Option<String>,
    /// Quantize the Linear layers to int8 (dynamic quantization).
    pub quantize_int8: bool,
    /// Weights in `model.onnx_data` beside the graph: `Some(true)` always, `Some(false)` never, `None`
    /// when they would not fit in one protobuf (2 GiB).
    pub external_data: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct ExportReport {
    pub model: PathBuf,
    pub external_data: Option<PathBuf>,
    pub architecture: &'static str,
    pub parameters: u64,
    pub weight_bytes: u64,
    pub nodes: usize,
    /// Jina exported with every task: the `task_id` input and the task names in order.
    pub tasks: Vec<String>,
    pub lora_merged: bool,
}

/// Export the model folder (or PEFT adapter folder) `model` into `out` in sentence-transformers' layout.
pub fn export(model: &Path, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    let device = Device::Cpu;
    let peft = model.join("adapter_config.json").is_file() && !model.join("config.json").is_file();
    let (base, weights) = if peft {
        let (attach, base) = sembed::lora::LoraAttach::from_peft(model, false)?;
        let w = Weights::new(WeightStore::from_dir(&base)?, DType::F32, &device)
            .with_lora(std::sync::Arc::new(attach));
        (base, w)
    } else {
        let w = Weights::new(WeightStore::from_dir(model)?, DType::F32, &device);
        (model.to_path_buf(), w)
    };
    let folder = ModelFolder::read(&base)?;
    let mut task_index = None;
    if let Some(t) = &opts.task {
        match &folder.arch {
            Architecture::Jina(c) => {
                task_index = Some(c.lora_adaptations.iter().position(|a| a == t).ok_or_else(
                    || {
                        OnnxError::Unsupported(format!(
                            "unknown task `{t}`; {} has {}",
                            base.display(),
                            c.lora_adaptations.join(", ")
                        ))
                    },
                )?);
            }
            _ => {
                return Err(OnnxError::Unsupported(format!(
                    "--task applies to jina-embeddings-v3 only; {} is {}",
                    base.display(),
                    folder.arch.name()
                )))
            }
        }
    }
    let mut b = Builder {
        g: Graph::new(),
        quant: opts.quantize_int8,
        task: None,
        lora_merged: peft,
    };
    let ids = b.g.input(
        "input_ids",
        DataType::Int64,
        &[Axis::Dynamic("batch"), Axis::Dynamic("sequence")],
    );
    let mask = b.g.input(
        "attention_mask",
        DataType::Int64,
        &[Axis::Dynamic("batch"), Axis::Dynamic("sequence")],
    );
    let mut tasks = Vec::new();
    if let Architecture::Jina(c) = &folder.arch {
        if task_index.is_none() {
            b.task = Some(b.g.input("task_id", DataType::Int64, &[]));
            tasks = c.lora_adaptations.clone();
        }
    }
    let hidden = folder.arch.hidden_size();
    let x = match &folder.arch {
        Architecture::Bert(c) => b.bert(c, &weights, &ids, &mask)?,
        Architecture::Qwen(c) => b.qwen(c, &weights, &ids, &mask)?,
        Architecture::Jina(c) => b.jina(c, &weights, &ids, &mask, task_index)?,
    };
    let dyn3 = [
        Axis::Dynamic("batch"),
        Axis::Dynamic("sequence"),
        Axis::Fixed(hidden),
    ];
    b.g.output(&x, "last_hidden_state", DataType::Float, &dyn3);
    // Normalised always, as sembed's vectors are by default (and TEI's); sentence-transformers, which
    // pools `last_hidden_state` itself, normalises when the model's modules say so.
    let pooled = b.pool(&x, &mask, folder.sentence.pooling);
    let pooled = b.normalize(&pooled);
    b.g.output(
        &pooled,
        "sentence_embedding",
        DataType::Float,
        &[Axis::Dynamic("batch"), Axis::Fixed(hidden)],
    );

    let onnx_dir = out.join("onnx");
    std::fs::create_dir_all(&onnx_dir).map_err(|source| OnnxError::Write {
        path: onnx_dir.clone(),
        source,
    })?;
    let (parameters, weight_bytes) = b.g.weight_size();
    let nodes = b.g.node_count();
    let external = opts
        .external_data
        .unwrap_or(weight_bytes >= crate::graph::INLINE_LIMIT - (64 << 20));
    let model_path = onnx_dir.join("model.onnx");
    let data_name = "model.onnx_data";
    let data_path = onnx_dir.join(data_name);
    if !external && data_path.exists() {
        std::fs::remove_file(&data_path).map_err(|source| OnnxError::Write {
            path: data_path.clone(),
            source,
        })?;
    }
    let mut metadata = vec![
        ("sembed.source".to_string(), model.display().to_string()),
        (
            "sembed.architecture".to_string(),
            folder.arch.name().to_string(),
        ),
        (
            "sembed.pooling".to_string(),
            format!("{:?}", folder.sentence.pooling),
        ),
        (
            "sembed.precision".to_string(),
            if opts.quantize_int8 { "int8" } else { "f32" }.to_string(),
        ),
    ];
    if let Some(t) = &opts.task {
        metadata.push(("sembed.task".into(), t.clone()));
    }
    if !tasks.is_empty() {
        metadata.push(("sembed.tasks".into(), tasks.join(",")));
    }
    b.g.save(&model_path, external.then_some(data_name), &metadata)?;
    write_sentence_files(&base, out, &folder, opts.task.as_deref())?;
    Ok(ExportReport {
        model: model_path,
        external_data: external.then_some(data_path),
        architecture: folder.arch.name(),
        parameters,
        weight_bytes,
        nodes,
        tasks,
        lora_merged: b.lora_merged,
    })
}

/// Files copied as they are, when the model has them: the tokenizer and the model's own config.
const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "config_sentence_transformers.json",
];

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v).expect("json") + "\n").map_err(|source| {
        OnnxError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// sentence-transformers' layout around `onnx/model.onnx`: tokenizer, config, modules, pooling.
fn write_sentence_files(
    base: &Path,
    out: &Path,
    folder: &ModelFolder,
    task: Option<&str>,
) -> Result<()> {
    for name in COPIED {
        let src = base.join(name);
        if src.is_file() {
            let dst = out.join(name);
            std::fs::copy(&src, &dst).map_err(|source| OnnxError::Write { path: dst, source })?;
        }
    }
    let cfg_path = base.join("config.json");
    let mut cfg = sembed::config::read_json(&cfg_path)?;
    if let (Architecture::Jina(jc), Some(obj)) = (&folder.arch, cfg.as_object_mut()) {
        // The graph needs none of Jina's remote code: describe it as the XLM-RoBERTa it is, so that
        // loaders do not ask to trust remote code.
        obj.remove("auto_map");
        obj.insert("model_type".into(), json!("xlm-roberta"));
        obj.insert("architectures".into(), json!(["XLMRobertaModel"]));
        if let Some(t) = task {
            let mut st = json!({ "prompts": {}, "default_prompt_name": null });
            if let Some(instr) = jc.task_instructions.get(t) {
                st["prompts"] = json!({ t: instr });
                st["default_prompt_name"] = json!(t);
            }
            write_json(&out.join("config_sentence_transformers.json"), &st)?;
        }
    }
    write_json(&out.join("config.json"), &cfg)?;
    let mut modules = vec![
        json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if folder.sentence.normalize {
        modules.push(json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
        let d = out.join("2_Normalize");
        std::fs::create_dir_all(&d).map_err(|source| OnnxError::Write { path: d, source })?;
    }
    write_json(&out.join("modules.json"), &Value::Array(modules))?;
    let pooling = folder.sentence.pooling;
    let pool_dir = out.join("1_Pooling");
    std::fs::create_dir_all(&pool_dir).map_err(|source| OnnxError::Write {
        path: pool_dir.clone(),
        source,
    })?;
    write_json(
        &pool_dir.join("config.json"),
        &json!({
            "word_embedding_dimension": folder.arch.hidden_size(),
            "pooling_mode_cls_token": pooling == Pooling::Cls,
            "pooling_mode_mean_tokens": pooling == Pooling::Mean,
            "pooling_mode_max_tokens": pooling == Pooling::Max,
            "pooling_mode_mean_sqrt_len_tokens": pooling == Pooling::MeanSqrtLen,
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": pooling == Pooling::LastToken,
            "include_prompt": folder.sentence.include_prompt,
        }),
    )?;
    write_json(
        &out.join("sentence_bert_config.json"),
        &json!({
            "max_seq_length": folder.max_seq_length(),
            "do_lower_case": folder.sentence.do_lower_case,
        }),
    )?;
    Ok(())
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

struct Builder {
    g: Graph,
    quant: bool,
    /// The `task_id` input (Jina exported with every task).
    task: Option<String>,
    lora_merged: bool,
}

/// A Jina task adapter pair of one Linear: `A [tasks, r, in]`, `B [tasks, out, r]`, scale.
struct TaskLora {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl Builder {
    fn op(&mut self, op: &str, inputs: &[&str]) -> String {
        self.g.op(op, inputs, vec![])
    }

    /// `x · Wᵀ + b` for the Linear at `w` (`weight [out, in]`, optional `bias [out]`), with any PEFT
    /// LoRA adapter merged, and a Jina task adapter merged (`merge`) or selected by `task_id` (`side`).
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &mut self,
        x: &str,
        w: &Weights,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        weight_name: &str,
        jina: Option<(&TaskLora, Option<usize>)>,
    ) -> Result<String> {
        let mut weight = w.get(&[out_dim, in_dim], weight_name)?;
        if let Some((a, bm, s)) = w.lora_adapter(in_dim, out_dim)? {
            weight = (weight + (bm.matmul(&a)? * s)?)?;
            self.lora_merged = true;
        }
        let mut side = None;
        if let Some((l, t)) = jina {
            match t {
                Some(t) => {
                    let delta = (l.b.get(t)?.matmul(&l.a.get(t)?)? * l.scale)?;
                    weight = (weight + delta)?;
                }
                None => side = Some(l),
            }
        }
        let name = w.pp(weight_name).prefix_name();
        // Stored transposed, `[in, out]`, so that the graph multiplies `x [.., in]` by it directly.
        let wt = host(&weight.t()?.contiguous()?)?;
        let mut y = if self.quant {
            self.int8_matmul(x, &name, &wt, in_dim, out_dim)
        } else {
            let wn = self.g.init(&name, &[in_dim, out_dim], Data::F32(wt));
            self.op("MatMul", &[x, &wn])
        };
        if let Some(l) = side {
            let task = self.task.clone().expect("task_id input");
            let r = l.a.dim(1)?;
            let tasks = l.a.dim(0)?;
            // A as [tasks, in, r], B as [tasks, r, out]: gather the task's pair, two small matmuls.
            let at = host(&l.a.transpose(1, 2)?.contiguous()?)?;
            let bt = host(&l.b.transpose(1, 2)?.contiguous()?)?;
            let an = self.g.init(
                &format!("{name}.lora_A"),
                &[tasks, in_dim, r],
                Data::F32(at),
            );
            let bn = self.g.init(
                &format!("{name}.lora_B"),
                &[tasks, r, out_dim],
                Data::F32(bt),
            );
            let ag = self
                .g
                .op("Gather", &[&an, &task], vec![attr_int("axis", 0)]);
            let bg = self
                .g
                .op("Gather", &[&bn, &task], vec![attr_int("axis", 0)]);
            let xa = self.op("MatMul", &[x, &ag]);
            let xab = self.op("MatMul", &[&xa, &bg]);
            let s = self.g.scalar(l.scale as f32);
            let xab = self.op("Mul", &[&xab, &s]);
            y = self.op("Add", &[&y, &xab]);
        }
        if bias {
            let bv = host(&w.get(&[out_dim], "bias")?)?;
            let bname = w.pp("bias").prefix_name();
            let bn = self.g.init(&bname, &[out_dim], Data::F32(bv));
            y = self.op("Add", &[&y, &bn]);
        }
        Ok(y)
    }

    /// `x [.., in] · W [in, out]` in int8: weights per output channel, symmetric (stored as uint8
    /// with zero point 128, see the module's note); the input per call, asymmetric uint8
    /// (`DynamicQuantizeLinear`); `MatMulInteger`, then both scales.
    fn int8_matmul(
        &mut self,
        x: &str,
        name: &str,
        wt: &[f32],
        in_dim: usize,
        out_dim: usize,
    ) -> String {
        let mut scale = vec![0f32; out_dim];
        for row in wt.chunks_exact(out_dim) {
            for (s, v) in scale.iter_mut().zip(row) {
                *s = s.max(v.abs());
            }
        }
        for s in scale.iter_mut() {
            *s = if *s > 0.0 { *s / 127.0 } else { 1.0 };
        }
        let q: Vec<u8> = wt
            .chunks_exact(out_dim)
            .flat_map(|row| {
                row.iter()
                    .zip(&scale)
                    .map(|(v, s)| ((v / s).round().clamp(-127.0, 127.0) as i32 + 128) as u8)
            })
            .collect();
        let qn = self.g.init(
            &format!("{name}_quantized"),
            &[in_dim, out_dim],
            Data::U8(q),
        );
        let zp = self
            .g
            .init(&format!("{name}_zero_point"), &[], Data::U8(vec![128]));
        let sn = self
            .g
            .init(&format!("{name}_scale"), &[out_dim], Data::F32(scale));
        let xq = self.g.op_n("DynamicQuantizeLinear", &[x], 3, vec![]);
        let acc = self.op("MatMulInteger", &[&xq[0], &qn, &xq[2], &zp]);
        let accf = self.g.op(
            "Cast",
            &[&acc],
            vec![attr_int("to", DataType::Float as i64)],
        );
        let y = self.op("Mul", &[&accf, &xq[1]]);
        self.op("Mul", &[&y, &sn])
    }

    /// Rows of `table [rows, dim]` for `ids`. In int8, the table is stored per row (symmetric, one
    /// scale each) and the gathered rows are scaled back: the file shrinks by the largest tensor of
    /// most models (the vocabulary).
    fn embedding(
        &mut self,
        name: &str,
        table: Vec<f32>,
        rows: usize,
        dim: usize,
        ids: &str,
    ) -> String {
        if !self.quant {
            let n = self.g.init(name, &[rows, dim], Data::F32(table));
            return self.g.op("Gather", &[&n, ids], vec![attr_int("axis", 0)]);
        }
        let mut scale = Vec::with_capacity(rows);
        let mut q = Vec::with_capacity(rows * dim);
        for row in table.chunks_exact(dim) {
            let m = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let s = if m > 0.0 { m / 127.0 } else { 1.0 };
            q.extend(
                row.iter()
                    .map(|v| (v / s).round().clamp(-127.0, 127.0) as i8),
            );
            scale.push(s);
        }
        drop(table);
        let qn = self
            .g
            .init(&format!("{name}_quantized"), &[rows, dim], Data::I8(q));
        let sn = self
            .g
            .init(&format!("{name}_scale"), &[rows], Data::F32(scale));
        let g = self.g.op("Gather", &[&qn, ids], vec![attr_int("axis", 0)]);
        let g = self
            .g
            .op("Cast", &[&g], vec![attr_int("to", DataType::Float as i64)]);
        let s = self.g.op("Gather", &[&sn, ids], vec![attr_int("axis", 0)]);
        let a = self.g.ints(&[-1]);
        let s = self.op("Unsqueeze", &[&s, &a]);
        self.op("Mul", &[&g, &s])
    }

    fn layer_norm(&mut self, x: &str, w: &Weights, dim: usize, eps: f64) -> Result<String> {
        let gamma = host(&w.get(&[dim], "weight")?)?;
        let beta = host(&w.get(&[dim], "bias")?)?;
        let gn = self
            .g
            .init(&w.pp("weight").prefix_name(), &[dim], Data::F32(gamma));
        let bn = self
            .g
            .init(&w.pp("bias").prefix_name(), &[dim], Data::F32(beta));
        Ok(self.g.op(
            "LayerNormalization",
            &[x, &gn, &bn],
            vec![attr_int("axis", -1), attr_float("epsilon", eps as f32)],
        ))
    }

    /// `x / sqrt(mean(x²) + eps) · w` over the last axis.
    fn rms_norm(&mut self, x: &str, w: &Weights, dim: usize, eps: f64) -> Result<String> {
        let weight = host(&w.get(&[dim], "weight")?)?;
        let wn = self
            .g
            .init(&w.pp("weight").prefix_name(), &[dim], Data::F32(weight));
        let sq = self.op("Mul", &[x, x]);
        let ms = self.g.op(
            "ReduceMean",
            &[&sq],
            vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
        );
        let e = self.g.scalar(eps as f32);
        let ms = self.op("Add", &[&ms, &e]);
        let r = self.op("Sqrt", &[&ms]);
        let y = self.op("Div", &[x, &r]);
        Ok(self.op("Mul", &[&y, &wn]))
    }

    fn activation(&mut self, x: &str, act: Activation) -> String {
        match act {
            Activation::GeluErf => {
                let c = self.g.scalar(std::f32::consts::FRAC_1_SQRT_2);
                let t = self.op("Mul", &[x, &c]);
                let t = self.op("Erf", &[&t]);
                let one = self.g.scalar(1.0);
                let t = self.op("Add", &[&t, &one]);
                let half = self.g.scalar(0.5);
                let hx = self.op("Mul", &[x, &half]);
                self.op("Mul", &[&hx, &t])
            }
            Activation::GeluTanh => {
                // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
                let x3 = self.op("Mul", &[x, x]);
                let x3 = self.op("Mul", &[&x3, x]);
                let c = self.g.scalar(0.044715);
                let t = self.op("Mul", &[&x3, &c]);
                let t = self.op("Add", &[x, &t]);
                let k = self.g.scalar((2.0 / std::f64::consts::PI).sqrt() as f32);
                let t = self.op("Mul", &[&t, &k]);
                let t = self.op("Tanh", &[&t]);
                let one = self.g.scalar(1.0);
                let t = self.op("Add", &[&t, &one]);
                let half = self.g.scalar(0.5);
                let hx = self.op("Mul", &[x, &half]);
                self.op("Mul", &[&hx, &t])
            }
            Activation::Relu => self.op("Relu", &[x]),
            Activation::Silu => {
                let s = self.op("Sigmoid", &[x]);
                self.op("Mul", &[x, &s])
            }
        }
    }

    /// Positions `[B, S]` (int64) counted from each row's first real token: `max(cumsum(mask) - 1, 0)`.
    fn positions(&mut self, mask: &str) -> String {
        let axis = self.g.int(1);
        let c = self.op("CumSum", &[mask, &axis]);
        let one = self.g.int(1);
        let p = self.op("Sub", &[&c, &one]);
        let zero = self.g.int(0);
        self.op("Max", &[&p, &zero])
    }

    /// The mask as float `[B, S]`.
    fn mask_f(&mut self, mask: &str) -> String {
        self.g.op(
            "Cast",
            &[mask],
            vec![attr_int("to", DataType::Float as i64)],
        )
    }

    /// Additive attention bias: `(1 - mask)·value` as `[B, 1, 1, S]`, plus the causal part `[S, S]`.
    fn attention_bias(&mut self, ids: &str, mask: &str, causal: bool, value: f32) -> String {
        let m = self.mask_f(mask);
        let one = self.g.scalar(1.0);
        let inv = self.op("Sub", &[&one, &m]);
        let v = self.g.scalar(value);
        let keys = self.op("Mul", &[&inv, &v]);
        let axes = self.g.ints(&[1, 2]);
        let keys = self.op("Unsqueeze", &[&keys, &axes]);
        if !causal {
            return keys;
        }
        let r = self.range(ids);
        let a0 = self.g.ints(&[0]);
        let a1 = self.g.ints(&[1]);
        let cols = self.op("Unsqueeze", &[&r, &a0]); // [1, S]: key j
        let rows = self.op("Unsqueeze", &[&r, &a1]); // [S, 1]: query i
        let future = self.op("Greater", &[&cols, &rows]); // j > i
        let zero = self.g.scalar(0.0);
        let c = self.op("Where", &[&future, &v, &zero]);
        self.op("Add", &[&keys, &c])
    }

    /// `0..S` (int64) for the sequence axis of `ids`.
    fn range(&mut self, ids: &str) -> String {
        let shape = self.op("Shape", &[ids]);
        let i1 = self.g.int(1);
        let s = self
            .g
            .op("Gather", &[&shape, &i1], vec![attr_int("axis", 0)]);
        let zero = self.g.int(0);
        let one = self.g.int(1);
        self.op("Range", &[&zero, &s, &one])
    }

    /// cos and sin tables `[B, 1, S, d]` for rotary positions (sembed's `rope_tables`).
    fn rope_tables(&mut self, mask: &str, head_dim: usize, theta: f64) -> (String, String) {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let inv = self.g.init("rope_inv_freq", &[half], Data::F32(inv_freq));
        let pos = self.positions(mask);
        let pos = self.g.op(
            "Cast",
            &[&pos],
            vec![attr_int("to", DataType::Float as i64)],
        );
        let a2 = self.g.ints(&[2]);
        let pos = self.op("Unsqueeze", &[&pos, &a2]); // [B, S, 1]
        let freqs = self.op("Mul", &[&pos, &inv]); // [B, S, half]
        let emb = self
            .g
            .op("Concat", &[&freqs, &freqs], vec![attr_int("axis", -1)]);
        let a1 = self.g.ints(&[1]);
        let emb = self.op("Unsqueeze", &[&emb, &a1]); // [B, 1, S, d]
        let cos = self.op("Cos", &[&emb]);
        let sin = self.op("Sin", &[&emb]);
        (cos, sin)
    }

    /// `x·cos + rotate_half(x)·sin` on `x [B, H, S, d]`.
    fn rope(&mut self, x: &str, cos: &str, sin: &str, head_dim: usize) -> String {
        let half = (head_dim / 2) as i64;
        let split = self.g.ints(&[half, half]);
        let parts = self
            .g
            .op_n("Split", &[x, &split], 2, vec![attr_int("axis", -1)]);
        let neg = self.op("Neg", &[&parts[1]]);
        let rot = self
            .g
            .op("Concat", &[&neg, &parts[0]], vec![attr_int("axis", -1)]);
        let a = self.op("Mul", &[x, cos]);
        let b = self.op("Mul", &[&rot, sin]);
        self.op("Add", &[&a, &b])
    }

    /// Scaled dot-product attention over `q [B, S, nq·d]`, `k`/`v [B, S, nkv·d]`, grouped-query when
    /// `nkv < nq` (query head h reads key/value head h / (nq / nkv), as `repeat_kv`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        q: &str,
        k: &str,
        v: &str,
        nq: usize,
        nkv: usize,
        d: usize,
        bias: &str,
        rope: Option<(&str, &str)>,
        qk_norm: Option<(&Weights, &Weights, f64)>,
    ) -> Result<String> {
        let (nq_, nkv_, d_) = (nq as i64, nkv as i64, d as i64);
        let sq = self.g.ints(&[0, 0, nq_, d_]);
        let skv = self.g.ints(&[0, 0, nkv_, d_]);
        let mut q4 = self.op("Reshape", &[q, &sq]);
        let mut k4 = self.op("Reshape", &[k, &skv]);
        let v4 = self.op("Reshape", &[v, &skv]);
        if let Some((qn, kn, eps)) = qk_norm {
            q4 = self.rms_norm(&q4, qn, d, eps)?;
            k4 = self.rms_norm(&k4, kn, d, eps)?;
        }
        let perm = attr_ints("perm", &[0, 2, 1, 3]);
        let mut qt = self.g.op("Transpose", &[&q4], vec![perm.clone()]);
        let mut kt = self.g.op("Transpose", &[&k4], vec![perm.clone()]);
        let vt = self.g.op("Transpose", &[&v4], vec![perm.clone()]);
        if let Some((cos, sin)) = rope {
            qt = self.rope(&qt, cos, sin, d);
            kt = self.rope(&kt, cos, sin, d);
        }
        let grouped = nq != nkv;
        if grouped {
            // [B, nq, S, d] → [B, nkv, rep·S, d]: each key/value head meets its query heads at once.
            let s = self.g.ints(&[0, nkv_, -1, d_]);
            qt = self.op("Reshape", &[&qt, &s]);
        }
        let ktt = self
            .g
            .op("Transpose", &[&kt], vec![attr_ints("perm", &[0, 1, 3, 2])]);
        let scores = self.op("MatMul", &[&qt, &ktt]);
        let scale = self.g.scalar((1.0 / (d as f64).sqrt()) as f32);
        let mut scores = self.op("Mul", &[&scores, &scale]);
        if grouped {
            let s = self.g.ints(&[0, nq_, -1, 0]);
            scores = self.op("Reshape", &[&scores, &s]);
        }
        let scores = self.op("Add", &[&scores, bias]);
        let mut probs = self.g.op("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        if grouped {
            let s = self.g.ints(&[0, nkv_, -1, 0]);
            probs = self.op("Reshape", &[&probs, &s]);
        }
        let mut ctx = self.op("MatMul", &[&probs, &vt]);
        if grouped {
            let s = self.g.ints(&[0, nq_, -1, d_]);
            ctx = self.op("Reshape", &[&ctx, &s]);
        }
        let ctx = self.g.op("Transpose", &[&ctx], vec![perm]);
        let s = self.g.ints(&[0, 0, nq_ * d_]);
        Ok(self.op("Reshape", &[&ctx, &s]))
    }

    fn bert(&mut self, c: &BertConfig, w: &Weights, ids: &str, mask: &str) -> Result<String> {
        let w = w.with_detected_prefix(&["", "bert"], "embeddings.word_embeddings.weight");
        let h = c.hidden_size;
        let e = w.pp("embeddings");
        let word = host(&e.get(&[c.vocab_size, h], "word_embeddings.weight")?)?;
        let pos = host(&e.get(
            &[c.max_position_embeddings, h],
            "position_embeddings.weight",
        )?)?;
        let tt = e.get(&[c.type_vocab_size, h], "token_type_embeddings.weight")?;
        // token_type_ids are all 0 for single sentences (as sembed): row 0 is a constant.
        let tt0 = host(&tt.narrow(0, 0, 1)?)?;
        let pn = self.g.init(
            &e.pp("position_embeddings.weight").prefix_name(),
            &[c.max_position_embeddings, h],
            Data::F32(pos),
        );
        let tn = self.g.init(
            &e.pp("token_type_embeddings.weight").prefix_name(),
            &[h],
            Data::F32(tt0),
        );
        let x = self.embedding(
            &e.pp("word_embeddings.weight").prefix_name(),
            word,
            c.vocab_size,
            h,
            ids,
        );
        let p = self.positions(mask);
        let pe = self.g.op("Gather", &[&pn, &p], vec![attr_int("axis", 0)]);
        let x = self.op("Add", &[&x, &pe]);
        let x = self.op("Add", &[&x, &tn]);
        let mut x = self.layer_norm(&x, &e.pp("LayerNorm"), h, c.layer_norm_eps)?;
        let bias = self.attention_bias(ids, mask, false, sembed::nn::MASK_VALUE);
        let act = Activation::parse(&c.hidden_act)?;
        let heads = c.num_attention_heads;
        for i in 0..c.num_hidden_layers {
            let l = w.pp(format!("encoder.layer.{i}"));
            let q = self.linear(
                &x,
                &l.pp("attention.self.query"),
                h,
                h,
                true,
                "weight",
                None,
            )?;
            let k = self.linear(&x, &l.pp("attention.self.key"), h, h, true, "weight", None)?;
            let v = self.linear(
                &x,
                &l.pp("attention.self.value"),
                h,
                h,
                true,
                "weight",
                None,
            )?;
            let a = self.attention(&q, &k, &v, heads, heads, h / heads, &bias, None, None)?;
            let a = self.linear(
                &a,
                &l.pp("attention.output.dense"),
                h,
                h,
                true,
                "weight",
                None,
            )?;
            let r = self.op("Add", &[&a, &x]);
            x = self.layer_norm(&r, &l.pp("attention.output.LayerNorm"), h, c.layer_norm_eps)?;
            let m = self.linear(
                &x,
                &l.pp("intermediate.dense"),
                h,
                c.intermediate_size,
                true,
                "weight",
                None,
            )?;
            let m = self.activation(&m, act);
            let m = self.linear(
                &m,
                &l.pp("output.dense"),
                c.intermediate_size,
                h,
                true,
                "weight",
                None,
            )?;
            let r = self.op("Add", &[&m, &x]);
            x = self.layer_norm(&r, &l.pp("output.LayerNorm"), h, c.layer_norm_eps)?;
        }
        Ok(x)
    }

    fn qwen(&mut self, c: &QwenConfig, w: &Weights, ids: &str, mask: &str) -> Result<String> {
        let w = w.with_detected_prefix(&["", "model"], "embed_tokens.weight");
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let eps = c.rms_norm_eps;
        let emb = host(&w.get(&[c.vocab_size, h], "embed_tokens.weight")?)?;
        let mut x = self.embedding(
            &w.pp("embed_tokens.weight").prefix_name(),
            emb,
            c.vocab_size,
            h,
            ids,
        );
        let (cos, sin) = self.rope_tables(mask, d, c.rope_theta);
        let bias = self.attention_bias(ids, mask, c.causal, sembed::nn::MASK_VALUE);
        for i in 0..c.num_hidden_layers {
            let l = w.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            let hs = self.rms_norm(&x, &l.pp("input_layernorm"), h, eps)?;
            let ab = c.attention_bias;
            let q = self.linear(&hs, &a.pp("q_proj"), h, nq * d, ab, "weight", None)?;
            let k = self.linear(&hs, &a.pp("k_proj"), h, nkv * d, ab, "weight", None)?;
            let v = self.linear(&hs, &a.pp("v_proj"), h, nkv * d, ab, "weight", None)?;
            let (qn, kn) = (a.pp("q_norm"), a.pp("k_norm"));
            let att = self.attention(
                &q,
                &k,
                &v,
                nq,
                nkv,
                d,
                &bias,
                Some((&cos, &sin)),
                c.qk_norm.then_some((&qn, &kn, eps)),
            )?;
            let o = self.linear(&att, &a.pp("o_proj"), nq * d, h, false, "weight", None)?;
            x = self.op("Add", &[&x, &o]);
            let hs = self.rms_norm(&x, &l.pp("post_attention_layernorm"), h, eps)?;
            let im = c.intermediate_size;
            let gate = self.linear(&hs, &m.pp("gate_proj"), h, im, false, "weight", None)?;
            let gate = self.activation(&gate, Activation::Silu);
            let up = self.linear(&hs, &m.pp("up_proj"), h, im, false, "weight", None)?;
            let gu = self.op("Mul", &[&gate, &up]);
            let down = self.linear(&gu, &m.pp("down_proj"), im, h, false, "weight", None)?;
            x = self.op("Add", &[&x, &down]);
        }
        self.rms_norm(&x, &w.pp("norm"), h, eps)
    }

    fn task_lora(w: &Weights, in_dim: usize, out_dim: usize, c: &JinaConfig) -> Result<TaskLora> {
        let p = w.pp("parametrizations.weight");
        let (t, r) = (c.lora_adaptations.len(), c.lora_rank);
        Ok(TaskLora {
            a: p.get(&[t, r, in_dim], "0.lora_A")?,
            b: p.get(&[t, out_dim, r], "0.lora_B")?,
            scale: c.lora_scaling(),
        })
    }

    /// A Jina Linear: `parametrizations.weight.original` with its task adapters.
    fn jina_linear(
        &mut self,
        x: &str,
        w: &Weights,
        in_dim: usize,
        out_dim: usize,
        c: &JinaConfig,
        task: Option<usize>,
    ) -> Result<String> {
        let l = Self::task_lora(w, in_dim, out_dim, c)?;
        self.linear(
            x,
            w,
            in_dim,
            out_dim,
            true,
            "parametrizations.weight.original",
            Some((&l, task)),
        )
    }

    fn jina(
        &mut self,
        c: &JinaConfig,
        w: &Weights,
        ids: &str,
        mask: &str,
        task: Option<usize>,
    ) -> Result<String> {
        let w = w.with_detected_prefix(
            &["roberta", ""],
            "embeddings.word_embeddings.parametrizations.weight.original",
        );
        let h = c.hidden_size;
        let heads = c.num_attention_heads;
        let eps = c.layer_norm_eps;
        let (nt, r) = (c.lora_adaptations.len(), c.lora_rank);
        let scale = c.lora_scaling();
        // Word embeddings: table + A_t[id]·B_t·s.
        let we = w.pp("embeddings.word_embeddings.parametrizations.weight");
        let table = we.get(&[c.vocab_size, h], "original")?;
        let a = we.get(&[nt, c.vocab_size, r], "0.lora_A")?;
        let b = we.get(&[nt, r, h], "0.lora_B")?;
        let name = we.pp("original").prefix_name();
        let mut x = match task {
            Some(t) => {
                let merged = (&table + (a.get(t)?.matmul(&b.get(t)?)? * scale)?)?;
                self.embedding(&name, host(&merged)?, c.vocab_size, h, ids)
            }
            None => {
                let task_id = self.task.clone().expect("task_id input");
                let base = self.embedding(&name, host(&table)?, c.vocab_size, h, ids);
                let an = self.g.init(
                    &format!("{name}.lora_A"),
                    &[nt, c.vocab_size, r],
                    Data::F32(host(&a)?),
                );
                let bn = self
                    .g
                    .init(&format!("{name}.lora_B"), &[nt, r, h], Data::F32(host(&b)?));
                let at = self
                    .g
                    .op("Gather", &[&an, &task_id], vec![attr_int("axis", 0)]);
                let bt = self
                    .g
                    .op("Gather", &[&bn, &task_id], vec![attr_int("axis", 0)]);
                let ar = self.g.op("Gather", &[&at, ids], vec![attr_int("axis", 0)]);
                let side = self.op("MatMul", &[&ar, &bt]);
                let s = self.g.scalar(scale as f32);
                let side = self.op("Mul", &[&side, &s]);
                self.op("Add", &[&base, &side])
            }
        };
        // Token type 0 for every token: its row, with the adapter, per task.
        let te = w.pp("embeddings.token_type_embeddings.parametrizations.weight");
        let tt = te.get(&[c.type_vocab_size, h], "original")?;
        let ta = te.get(&[nt, c.type_vocab_size, r], "0.lora_A")?;
        let tb = te.get(&[nt, r, h], "0.lora_B")?;
        let row = |t: usize| -> Result<Tensor> {
            let side = ta.get(t)?.narrow(0, 0, 1)?.matmul(&tb.get(t)?)?;
            Ok((tt.narrow(0, 0, 1)? + (side * scale)?)?)
        };
        let tname = te.pp("original").prefix_name();
        let tt_row = match task {
            Some(t) => self.g.init(&tname, &[h], Data::F32(host(&row(t)?)?)),
            None => {
                let mut rows = Vec::with_capacity(nt * h);
                for t in 0..nt {
                    rows.extend(host(&row(t)?)?);
                }
                let n = self.g.init(&tname, &[nt, h], Data::F32(rows));
                let task_id = self.task.clone().expect("task_id input");
                self.g
                    .op("Gather", &[&n, &task_id], vec![attr_int("axis", 0)])
            }
        };
        x = self.op("Add", &[&x, &tt_row]);
        x = self.layer_norm(&x, &w.pp("emb_ln"), h, eps)?;
        let d = h / heads;
        let (cos, sin) = self.rope_tables(mask, d, c.rotary_emb_base);
        let bias = self.attention_bias(ids, mask, false, JINA_MASK);
        let act = Activation::parse(&c.hidden_act)?;
        for i in 0..c.num_hidden_layers {
            let l = w.pp(format!("encoder.layers.{i}"));
            let qkv = self.jina_linear(&x, &l.pp("mixer.Wqkv"), h, 3 * h, c, task)?;
            let split = self.g.ints(&[h as i64, h as i64, h as i64]);
            let p = self
                .g
                .op_n("Split", &[&qkv, &split], 3, vec![attr_int("axis", -1)]);
            let a = self.attention(
                &p[0],
                &p[1],
                &p[2],
                heads,
                heads,
                d,
                &bias,
                Some((&cos, &sin)),
                None,
            )?;
            let a = self.jina_linear(&a, &l.pp("mixer.out_proj"), h, h, c, task)?;
            let r1 = self.op("Add", &[&x, &a]);
            x = self.layer_norm(&r1, &l.pp("norm1"), h, eps)?;
            let m = self.jina_linear(&x, &l.pp("mlp.fc1"), h, c.intermediate_size, c, task)?;
            let m = self.activation(&m, act);
            let m = self.jina_linear(&m, &l.pp("mlp.fc2"), c.intermediate_size, h, c, task)?;
            let r2 = self.op("Add", &[&x, &m]);
            x = self.layer_norm(&r2, &l.pp("norm2"), h, eps)?;
        }
        Ok(x)
    }

    /// Pool `x [B, S, H]` over the real tokens of `mask`, as sentence-transformers (and sembed) do.
    fn pool(&mut self, x: &str, mask: &str, pooling: Pooling) -> String {
        let m = self.mask_f(mask);
        let a2 = self.g.ints(&[2]);
        let a1 = self.g.ints(&[1]);
        let m3 = self.op("Unsqueeze", &[&m, &a2]); // [B, S, 1]
        match pooling {
            Pooling::Cls => {
                // The first real token of each row (position 0 when padded on the right, as
                // sentence-transformers takes it; sembed takes the first real token on either side).
                let r = self.range(mask);
                let rf = self
                    .g
                    .op("Cast", &[&r], vec![attr_int("to", DataType::Float as i64)]);
                let one = self.g.scalar(1.0);
                let pad = self.op("Sub", &[&one, &m]);
                let big = self.g.scalar(1e9);
                let pad = self.op("Mul", &[&pad, &big]);
                let idx = self.op("Mul", &[&m, &rf]);
                let idx = self.op("Add", &[&idx, &pad]);
                let first = self.g.op(
                    "ReduceMin",
                    &[&idx],
                    vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)],
                ); // [B, 1]
                self.one_hot_sum(x, &rf, &first)
            }
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let xm = self.op("Mul", &[x, &m3]);
                let sum = self
                    .g
                    .op("ReduceSum", &[&xm, &a1], vec![attr_int("keepdims", 0)]);
                let cnt = self
                    .g
                    .op("ReduceSum", &[&m, &a1], vec![attr_int("keepdims", 1)]);
                let tiny = self.g.scalar(1e-9);
                let mut cnt = self.op("Max", &[&cnt, &tiny]);
                if pooling == Pooling::MeanSqrtLen {
                    cnt = self.op("Sqrt", &[&cnt]);
                }
                self.op("Div", &[&sum, &cnt])
            }
            Pooling::Max => {
                let one = self.g.scalar(1.0);
                let off = self.op("Sub", &[&m3, &one]);
                let big = self.g.scalar(1e9);
                let pen = self.op("Mul", &[&off, &big]); // 0 for tokens, -1e9 for padding
                let xp = self.op("Add", &[x, &pen]);
                self.g.op(
                    "ReduceMax",
                    &[&xp],
                    vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)],
                )
            }
            Pooling::LastToken => {
                // The last real token of each row, left or right padding alike: one-hot of
                // max(mask · position) over the sequence.
                let r = self.range(mask);
                let rf = self
                    .g
                    .op("Cast", &[&r], vec![attr_int("to", DataType::Float as i64)]);
                let idx = self.op("Mul", &[&m, &rf]);
                let last = self.g.op(
                    "ReduceMax",
                    &[&idx],
                    vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)],
                ); // [B, 1]
                self.one_hot_sum(x, &rf, &last)
            }
        }
    }

    /// `x [B, S, H]` at sequence position `pos [B, 1]` (float) of each row, as a one-hot sum over
    /// `positions [S]` (exact: one term is the row, the others are zeros).
    fn one_hot_sum(&mut self, x: &str, positions: &str, pos: &str) -> String {
        let hot = self.op("Equal", &[positions, pos]); // [B, S]
        let hot = self.g.op(
            "Cast",
            &[&hot],
            vec![attr_int("to", DataType::Float as i64)],
        );
        let a2 = self.g.ints(&[2]);
        let a1 = self.g.ints(&[1]);
        let hot = self.op("Unsqueeze", &[&hot, &a2]);
        let xh = self.op("Mul", &[x, &hot]);
        self.g
            .op("ReduceSum", &[&xh, &a1], vec![attr_int("keepdims", 0)])
    }

    /// `x / max(‖x‖₂, 1e-12)` per row (`torch.nn.functional.normalize`).
    fn normalize(&mut self, x: &str) -> String {
        let n = self.g.op(
            "ReduceL2",
            &[x],
            vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
        );
        let eps = self.g.scalar(1e-12);
        let n = self.op("Max", &[&n, &eps]);
        self.op("Div", &[x, &n])
    }
}
