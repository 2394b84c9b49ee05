//! Saving models in the Hugging Face / sentence-transformers layout (loadable by `sembed embed` and by
//! `SentenceTransformer(path)`), and the optimiser/trainer state that makes a run resumable.

use crate::error::{Error, Result};
use crate::weights::WeightStore;
use candle_core::Var;
use std::collections::HashMap;
use std::path::Path;

pub use crate::weights::{tensor_bytes, write_safetensors};

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
