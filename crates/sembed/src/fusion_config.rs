//! Turning `--model` arguments (or a fusion TOML file) into something that embeds.
//!
//! ```toml
//! name = "code"            # optional
//! [[model]]
//! name = "qodo"
//! ref = "hf:Qodo/Qodo-Embed-1-1.5B"
//! [[model]]
//! name = "jina"
//! ref = "hf:jinaai/jina-embeddings-v3"
//! weight = 1.0             # optional, default 1
//! quantize = "int8"        # optional, per model: "int8" or "none" (BERT family on the CPU)
//! ```

use crate::embed::{Embed, Embedder, Fusion};
use crate::error::{Error, Result};
use crate::fast::Engine;
use crate::hub;
use candle_core::{DType, Device};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusionFile {
    pub name: Option<String>,
    #[serde(rename = "model")]
    pub models: Vec<PartSpec>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PartSpec {
    pub name: String,
    #[serde(rename = "ref")]
    pub reference: String,
    pub weight: Option<f64>,
    /// `int8` or `none`: this part's precision, whatever the command line says.
    pub quantize: Option<String>,
}

impl PartSpec {
    /// The engine of this part: its own `quantize` setting, or the command's engine.
    pub fn engine(&self, default: Engine) -> Result<Engine> {
        use crate::fast::Precision;
        Ok(match self.quantize.as_deref() {
            None => default,
            Some(q) => match q.parse::<Precision>()? {
                Precision::Int8 => Engine::Fast(Precision::Int8),
                Precision::F32 if default == Engine::Fast(Precision::Int8) => Engine::Auto,
                Precision::F32 => default,
                p @ (Precision::Bf16 | Precision::F16) => {
                    return Err(Error::InvalidInput(format!(
                        "quantize = \"{p}\": expected `int8` or `none` (16-bit weights follow --dtype)"
                    )))
                }
            },
        })
    }
}

impl FusionFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut f: FusionFile =
            toml::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
        // Relative folder references are relative to the TOML file.
        let base = path.parent().unwrap_or(Path::new("."));
        for m in &mut f.models {
            if let Ok(hub::ModelRef::Path(p)) = hub::ModelRef::parse(&m.reference) {
                if p.is_relative() {
                    m.reference = base.join(p).to_string_lossy().into_owned();
                }
            }
        }
        Ok(f)
    }
}

/// What a list of `--model` values means: nothing → the default model; one reference → that model;
/// one `.toml` file → the fusion it describes; `name=ref` pairs → a fusion of those.
pub fn parse_model_args(args: &[String]) -> Result<Option<FusionFile>> {
    match args {
        [] => Ok(None),
        [one] if !one.contains('=') => {
            let p = PathBuf::from(one);
            if p.extension().is_some_and(|e| e == "toml") && p.is_file() {
                Ok(Some(FusionFile::read(&p)?))
            } else {
                Ok(None)
            }
        }
        many => {
            let mut models = Vec::new();
            for a in many {
                let (name, reference) = a.split_once('=').ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "--model `{a}`: several models form a fusion and each needs NAME=REF"
                    ))
                })?;
                if name.is_empty() || models.iter().any(|m: &PartSpec| m.name == name) {
                    return Err(Error::InvalidInput(format!(
                        "--model `{a}`: names must be non-empty and distinct"
                    )));
                }
                models.push(PartSpec {
                    name: name.to_string(),
                    reference: reference.to_string(),
                    weight: None,
                    quantize: None,
                });
            }
            Ok(Some(FusionFile { name: None, models }))
        }
    }
}

/// Load whatever `--model` arguments describe.
/// `engine` applies to every model (models the fast engine cannot run error under `Engine::Fast`).
pub fn load(
    args: &[String],
    dtype: DType,
    device: &Device,
    engine: Engine,
) -> Result<Box<dyn Embed>> {
    if let Some(fusion) = parse_model_args(args)? {
        return Ok(Box::new(load_fusion(&fusion, dtype, device, engine)?));
    }
    let reference = args.first().map(String::as_str).unwrap_or("");
    let dir = hub::resolve(reference)?;
    let e = Embedder::load_with(&dir, dtype, device, engine)?;
    Ok(Box::new(match args.first() {
        Some(r) => e.with_name(r.clone()),
        None => e.with_name(hub::DEFAULT_MODEL_NAME),
    }))
}

pub fn load_fusion(
    f: &FusionFile,
    dtype: DType,
    device: &Device,
    engine: Engine,
) -> Result<Fusion> {
    let mut parts: Vec<(Box<dyn Embed>, f64)> = Vec::new();
    for m in &f.models {
        let dir = hub::resolve(&m.reference)?;
        let e =
            Embedder::load_with(&dir, dtype, device, m.engine(engine)?)?.with_name(m.name.clone());
        parts.push((Box::new(e), m.weight.unwrap_or(1.0)));
    }
    let name = f.name.clone().unwrap_or_else(|| {
        f.models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join("+")
    });
    Fusion::new(name, parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    #[test]
    fn quantize_is_chosen_per_model_in_a_fusion_file() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[[model]]\nname = \"a\"\nref = \"{0}/bert-tiny\"\nquantize = \"int8\"\n\
             [[model]]\nname = \"b\"\nref = \"{0}/bert-tiny\"\n\
             [[model]]\nname = \"c\"\nref = \"{0}/qwen2-bidir-tiny\"\nquantize = \"none\"\n",
            fixtures().display()
        );
        let path = dir.path().join("f.toml");
        std::fs::write(&path, toml).unwrap();
        let arg = [path.display().to_string()];
        let cpu = crate::device::cpu();
        let m = load(&arg, DType::F32, &cpu, Engine::Auto).unwrap();
        assert_eq!(m.engine(), "fast-int8+fast-f32+fast-f32");
        // The command's int8 applies where a part says nothing; "none" keeps a part unquantised.
        let err = load(
            &arg,
            DType::F32,
            &cpu,
            Engine::Fast(crate::fast::Precision::Int8),
        );
        assert!(err.is_ok(), "{:?}", err.err());
        let m = err.unwrap();
        assert_eq!(m.engine(), "fast-int8+fast-int8+fast-f32");
        std::fs::write(
            &path,
            format!(
                "[[model]]\nname = \"a\"\nref = \"{}/bert-tiny\"\nquantize = \"int4\"\n",
                fixtures().display()
            ),
        )
        .unwrap();
        let err = load(&arg, DType::F32, &cpu, Engine::Auto).err().unwrap();
        assert!(err.to_string().contains("int4"), "{err}");
    }
}
