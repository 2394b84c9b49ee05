//! LoRA adapters on Linear layers, PEFT-compatible: `y = x Wᵀ + b + (x Aᵀ) Bᵀ · (α / r)` with
//! `A [r, in]` (Kaiming-uniform init, as PEFT) and `B [out, r]` (zeros), saved as
//! `adapter_config.json` + `adapter_model.safetensors` under `base_model.model.<module>.lora_A.weight`.

use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::weights::{NamedVars, SafetensorsFile};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter input during training.
    pub dropout: f64,
    /// Module names (last path component) that get adapters, e.g. `query`, `value`, `q_proj`.
    pub targets: Vec<String>,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
    /// PEFT's defaults per architecture: the attention query and value projections.
    pub fn default_targets(arch: &crate::config::Architecture) -> Vec<String> {
        match arch {
            crate::config::Architecture::Bert(_) => vec!["query".into(), "value".into()],
            _ => vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

/// Adapters being created (training) or loaded (inference) while a model is built.
pub struct LoraAttach {
    pub spec: LoraSpec,
    saved: Option<SafetensorsFile>,
    rng: Mutex<SplitMix64>,
    trainable: bool,
    created: Mutex<NamedVars>,
}

pub const PEFT_PREFIX: &str = "base_model.model.";

impl LoraAttach {
    /// Fresh adapters (trainable), initialised from `seed`.
    pub fn new(spec: LoraSpec, seed: u64) -> Self {
        LoraAttach {
            spec,
            saved: None,
            rng: Mutex::new(SplitMix64(seed)),
            trainable: true,
            created: Mutex::new(Vec::new()),
        }
    }

    /// Adapters saved in a PEFT folder; returns them and the base model path from the config.
    pub fn from_peft(dir: &Path, trainable: bool) -> Result<(Self, PathBuf)> {
        let cfg_path = dir.join("adapter_config.json");
        let v = crate::config::read_json(&cfg_path)?;
        if v.get("peft_type").and_then(Value::as_str) != Some("LORA") {
            return Err(Error::config(&cfg_path, "only peft_type LORA is supported"));
        }
        let rank = v
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::config(&cfg_path, "missing `r`"))? as usize;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::config(&cfg_path, "missing `lora_alpha`"))?;
        let targets: Vec<String> = match v.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => return Err(Error::config(&cfg_path, "missing `target_modules`")),
        };
        let base = v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(&cfg_path, "missing `base_model_name_or_path`"))?;
        let base = if Path::new(base).is_relative() && dir.join(base).is_dir() {
            dir.join(base)
        } else {
            PathBuf::from(base)
        };
        let saved = SafetensorsFile::open(dir.join("adapter_model.safetensors"))?;
        Ok((
            LoraAttach {
                spec: LoraSpec {
                    rank,
                    alpha,
                    dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
                    targets,
                },
                saved: Some(saved),
                rng: Mutex::new(SplitMix64(0)),
                trainable,
                created: Mutex::new(Vec::new()),
            },
            base,
        ))
    }

    /// The trainable adapter tensors created so far, by PEFT name.
    pub fn variables(&self) -> NamedVars {
        self.created.lock().expect("not poisoned").clone()
    }
}

/// Write a PEFT adapter folder.
pub fn save_peft(out: &Path, spec: &LoraSpec, base: &Path, vars: &NamedVars) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base.canonicalize().unwrap_or_else(|_| base.to_path_buf()),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": spec.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
    });
    let p = out.join("adapter_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&config).expect("json"))
        .map_err(|e| Error::io(&p, e))?;
    let mut tensors = Vec::new();
    for (name, v) in vars {
        let t = v.as_tensor();
        tensors.push((
            name.clone(),
            crate::weights::Dtype::F32,
            t.dims().to_vec(),
            crate::weights::tensor_bytes(t, crate::weights::Dtype::F32)?,
        ));
    }
    crate::weights::write_safetensors(
        &out.join("adapter_model.safetensors"),
        &tensors,
        Default::default(),
    )
}

/// Merged weights `W + B·A·scale` for every adapted module, by checkpoint name (`<module>.weight`).
pub fn merged_weights(
    base: &crate::weights::WeightStore,
    spec: &LoraSpec,
    vars: &NamedVars,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, a) in vars {
        let Some(module) = name
            .strip_prefix(PEFT_PREFIX)
            .and_then(|n| n.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let b_name = format!("{PEFT_PREFIX}{module}.lora_B.weight");
        let b = vars
            .iter()
            .find(|(n, _)| *n == b_name)
            .map(|(_, v)| v)
            .ok_or_else(|| Error::InvalidInput(format!("{module}: lora_B missing")))?;
        let w_name = format!("{module}.weight");
        let info = base
            .info(&w_name)
            .ok_or_else(|| Error::InvalidInput(format!("base has no {w_name}")))?;
        let w = base.get(&w_name, &info.shape.clone(), DType::F32, &Device::Cpu)?;
        let delta = (b
            .as_tensor()
            .to_dtype(DType::F32)?
            .matmul(&a.as_tensor().to_dtype(DType::F32)?)?
            * spec.scale())?;
        out.push((w_name, (w + delta)?));
    }
    Ok(out)
}

impl crate::weights::Adapters for LoraAttach {
    fn dropout(&self) -> f64 {
        self.spec.dropout
    }
    fn freezes_base(&self) -> bool {
        self.trainable
    }
    /// The adapter of the Linear at `module` (checkpoint path), if targeted: `(A, B, scale)`.
    fn adapter(
        &self,
        module: &str,
        in_dim: usize,
        out_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<(Tensor, Tensor, f64)>> {
        let last = module.rsplit('.').next().unwrap_or(module);
        if !self
            .spec
            .targets
            .iter()
            .any(|t| t == last || module.ends_with(&format!(".{t}")))
        {
            return Ok(None);
        }
        let r = self.spec.rank;
        let (a_name, b_name) = (
            format!("{PEFT_PREFIX}{module}.lora_A.weight"),
            format!("{PEFT_PREFIX}{module}.lora_B.weight"),
        );
        let (a, b) = match &self.saved {
            Some(f) => {
                let a = f.load(&a_name, dtype, device)?;
                let b = f.load(&b_name, dtype, device)?;
                if a.dims() != [r, in_dim] || b.dims() != [out_dim, r] {
                    return Err(Error::InvalidInput(format!(
                        "{module}: adapter shapes {:?}/{:?} do not fit rank {r}",
                        a.dims(),
                        b.dims()
                    )));
                }
                (a, b)
            }
            None => {
                // PEFT: kaiming_uniform_(A, a=√5) → U(−1/√in, 1/√in); B = 0.
                let bound = 1.0 / (in_dim as f64).sqrt();
                let mut rng = self.rng.lock().expect("not poisoned");
                let vals: Vec<f64> = (0..r * in_dim)
                    .map(|_| (rng.next_f64() * 2.0 - 1.0) * bound)
                    .collect();
                let a = Tensor::from_vec(vals, (r, in_dim), device)?.to_dtype(dtype)?;
                (a, Tensor::zeros((out_dim, r), dtype, device)?)
            }
        };
        if !self.trainable {
            return Ok(Some((a, b, self.spec.scale())));
        }
        let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        let out = (
            va.as_tensor().clone(),
            vb.as_tensor().clone(),
            self.spec.scale(),
        );
        let mut created = self.created.lock().expect("not poisoned");
        created.push((a_name, va));
        created.push((b_name, vb));
        Ok(Some(out))
    }
}
