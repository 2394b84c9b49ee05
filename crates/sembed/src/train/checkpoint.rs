//! Saving models in the Hugging Face / sentence-transformers layout (loadable by `sembed embed` and by
//! `SentenceTransformer(path)`), and the optimiser/trainer state that makes a run resumable.

use crate::error::{Error, Result};
use crate::weights::{Dtype, WeightStore};
use candle_core::{DType, Tensor, Var};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Bytes of `t` in the safetensors dtype `dtype` (F32, F16, BF16 or F64), little-endian.
pub fn tensor_bytes(t: &Tensor, dtype: Dtype) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match dtype {
        Dtype::F32 => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        Dtype::F64 => flat
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        Dtype::F16 => flat
            .to_dtype(DType::F16)?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        Dtype::BF16 => flat
            .to_dtype(DType::BF16)?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => return Err(Error::Unsupported(format!("writing tensors as {other}"))),
    })
}

fn st_dtype(d: Dtype) -> StDtype {
    match d {
        Dtype::Bool => StDtype::BOOL,
        Dtype::U8 => StDtype::U8,
        Dtype::I8 => StDtype::I8,
        Dtype::F8E5M2 => StDtype::F8_E5M2,
        Dtype::F8E4M3 => StDtype::F8_E4M3,
        Dtype::I16 => StDtype::I16,
        Dtype::U16 => StDtype::U16,
        Dtype::F16 => StDtype::F16,
        Dtype::BF16 => StDtype::BF16,
        Dtype::I32 => StDtype::I32,
        Dtype::U32 => StDtype::U32,
        Dtype::F32 => StDtype::F32,
        Dtype::F64 => StDtype::F64,
        Dtype::I64 => StDtype::I64,
        Dtype::U64 => StDtype::U64,
    }
}

/// Write named tensors (already as bytes) to one safetensors file.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(st_dtype(*d), s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::InvalidInput(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let tmp = path.with_extension("safetensors.partial");
    safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn copy_dir_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        let path = entry.path();
        if path.is_dir() {
            if name_s.starts_with('.') || name_s.starts_with("checkpoint") {
                continue;
            }
            copy_dir_files(&path, &to.join(&name))?;
        } else if !(name_s.ends_with(".safetensors")
            || name_s == "model.safetensors.index.json"
            || name_s.starts_with('.')
            || name_s == "optimizer.safetensors"
            || name_s == "trainer_state.json"
            || name_s.ends_with(".bin"))
        {
            std::fs::copy(&path, to.join(&name)).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Save a model folder: every non-weight file of `src` (configs, tokenizer, sentence-transformers
/// modules) and `model.safetensors` holding every tensor of the source checkpoint, in its original
/// dtype, with the values of `vars` where a variable of that name exists.
pub fn save_model(src: &Path, out: &Path, vars: &[(String, Var)]) -> Result<()> {
    copy_dir_files(src, out)?;
    let store = WeightStore::from_dir(src)?;
    let by_name: HashMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let mut names: Vec<&str> = store.names().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let info = store.info(name).expect("listed");
        let bytes = match by_name.get(name) {
            Some(v) => tensor_bytes(v.as_tensor(), info.dtype)?,
            None => store.raw_bytes(name).expect("listed").to_vec(),
        };
        tensors.push((name.to_string(), info.dtype, info.shape.clone(), bytes));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&out.join("model.safetensors"), &tensors, meta)
}
