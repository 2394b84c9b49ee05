//! Safetensors reading and validation, every dtype, sharded checkpoints.
//!
//! The header is parsed and validated here rather than through `safetensors::SafeTensors` so that each
//! fault is its own typed error naming the file and the tensor (the crate reports most of them as one
//! generic variant without the tensor name). Data stays memory-mapped; a tensor is converted to the
//! compute dtype only when the model asks for it, with its shape checked against what the model expects.

use crate::error::{Result, WeightsError};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Element types the safetensors format defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E4M3" => Dtype::F8E4M3,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's header entry; offsets are relative to the start of the data section.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed and validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Tensors in data order.
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// Byte offset of the data section in the file.
    pub data_start: usize,
}

/// Parse and validate a safetensors header from the bytes of a whole file. Never panics.
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<Header, WeightsError> {
    let path_buf = || path.to_path_buf();
    let file_len = bytes.len() as u64;
    if bytes.len() < 8 {
        return Err(WeightsError::FileTooShort {
            path: path_buf(),
            len: file_len,
        });
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > file_len - 8 {
        return Err(WeightsError::HeaderBeyondFile {
            path: path_buf(),
            header_len,
            file_len,
        });
    }
    let data_start = 8 + header_len as usize;
    let text =
        std::str::from_utf8(&bytes[8..data_start]).map_err(|e| WeightsError::HeaderNotUtf8 {
            path: path_buf(),
            valid_up_to: e.valid_up_to(),
        })?;
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| WeightsError::HeaderNotJson {
            path: path_buf(),
            message: e.to_string(),
        })?;
    let object = json
        .as_object()
        .ok_or_else(|| WeightsError::HeaderNotJson {
            path: path_buf(),
            message: "the header is JSON but not an object".into(),
        })?;
    let data_len = (bytes.len() - data_start) as u64;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(object.len());
    for (name, entry) in object {
        let bad = |message: &str| WeightsError::BadEntry {
            path: path_buf(),
            tensor: name.clone(),
            message: message.to_string(),
        };
        if name == "__metadata__" {
            let map = entry
                .as_object()
                .ok_or_else(|| bad("__metadata__ must be an object of strings"))?;
            for (k, v) in map {
                let v = v
                    .as_str()
                    .ok_or_else(|| bad("__metadata__ values must be strings"))?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let entry = entry
            .as_object()
            .ok_or_else(|| bad("entry is not an object"))?;
        let dtype_str = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("missing string field `dtype`"))?;
        let dtype = Dtype::parse(dtype_str).ok_or_else(|| WeightsError::UnknownDtype {
            path: path_buf(),
            tensor: name.clone(),
            dtype: dtype_str.to_string(),
        })?;
        let shape = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing array field `shape`"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("`shape` must hold non-negative integers"))?;
        let offsets = entry
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing array field `data_offsets`"))?;
        let (start, end) = match offsets.as_slice() {
            [a, b] => match (a.as_u64(), b.as_u64()) {
                (Some(a), Some(b)) => (a, b),
                _ => return Err(bad("`data_offsets` must be two non-negative integers")),
            },
            _ => return Err(bad("`data_offsets` must be two non-negative integers")),
        };
        if start > end || end > data_len {
            return Err(WeightsError::OffsetsOutOfRange {
                path: path_buf(),
                tensor: name.clone(),
                start,
                end,
                data_len,
            });
        }
        let expected = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64));
        if expected != Some(end - start) {
            return Err(WeightsError::SizeMismatch {
                path: path_buf(),
                tensor: name.clone(),
                shape,
                dtype: dtype.name().to_string(),
                actual: end - start,
                expected: expected.unwrap_or(u64::MAX),
            });
        }
        tensors.push(TensorInfo {
            name: name.clone(),
            dtype,
            shape,
            start: start as usize,
            end: end as usize,
        });
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    for pair in tensors.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        // Zero-sized tensors occupy no bytes and cannot overlap anything.
        if a.end > b.start && a.start != a.end && b.start != b.end {
            return Err(WeightsError::Overlap {
                path: path_buf(),
                first: a.name.clone(),
                second: b.name.clone(),
                start: b.start as u64,
                end: a.end.min(b.end) as u64,
            });
        }
    }
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

/// One memory-mapped, validated safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    header: Header,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, WeightsError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| WeightsError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(WeightsError::FileTooShort { path, len });
        }
        // SAFETY: the map is read-only; like every mmap-based loader, we rely on the file not being
        // truncated by another process while it is in use.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = parse_header(&mmap, &path)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafetensorsFile {
            path,
            mmap,
            header,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[self.header.data_start + info.start..self.header.data_start + info.end]
    }

    /// Load a tensor converted to `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let info = self.info(name).ok_or_else(|| WeightsError::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            hint: String::new(),
        })?;
        let bytes = self.bytes(info);
        let shape = info.shape.as_slice();
        let direct = match info.dtype {
            Dtype::F32 => Some(DType::F32),
            Dtype::F16 => Some(DType::F16),
            Dtype::BF16 => Some(DType::BF16),
            Dtype::F64 => Some(DType::F64),
            Dtype::I64 => Some(DType::I64),
            Dtype::I32 => Some(DType::I32),
            Dtype::I16 => Some(DType::I16),
            Dtype::U32 => Some(DType::U32),
            Dtype::U8 => Some(DType::U8),
            _ => None,
        };
        let tensor = match direct {
            // `from_raw_buffer` copies, so unaligned offsets inside the map are fine.
            Some(src) => Tensor::from_raw_buffer(bytes, src, shape, &Device::Cpu)?,
            None => {
                let values: Vec<f64> = match info.dtype {
                    Dtype::Bool => bytes.iter().map(|&b| (b != 0) as u8 as f64).collect(),
                    Dtype::I8 => bytes.iter().map(|&b| b as i8 as f64).collect(),
                    Dtype::U16 => bytes
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]) as f64)
                        .collect(),
                    Dtype::U64 => bytes
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as f64)
                        .collect(),
                    _ => {
                        return Err(WeightsError::UnsupportedConversion {
                            path: self.path.clone(),
                            tensor: name.to_string(),
                            dtype: info.dtype.name().to_string(),
                        }
                        .into())
                    }
                };
                Tensor::from_vec(values, shape, &Device::Cpu)?
            }
        };
        self.release(info);
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    /// Give the mapped pages of a tensor that has been copied out back to the kernel, so that a
    /// model loads tensor by tensor: the mapped file and the converted weights are never all
    /// resident at once (a bf16 or int8 load of an f32 file would otherwise peak at file + copy).
    /// The map is read-only and file-backed, so a later read of these bytes faults them in again
    /// with the same contents.
    fn release(&self, info: &TensorInfo) {
        #[cfg(unix)]
        {
            let (start, end) = (
                self.header.data_start + info.start,
                self.header.data_start + info.end,
            );
            if end > start {
                // SAFETY: MADV_DONTNEED on a read-only file mapping only drops resident pages;
                // nothing is lost (they are re-read from the file on the next access), so
                // outstanding borrows of the map stay valid.
                let _ = unsafe {
                    self.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = info;
    }
}

/// All weights of a model: one file or a sharded set.
#[derive(Debug)]
pub struct WeightStore {
    /// What error messages call this checkpoint (the file, or the index of a sharded set).
    origin: PathBuf,
    files: Vec<SafetensorsFile>,
    by_name: HashMap<String, usize>,
}

impl WeightStore {
    /// Open the weights of a Hugging Face model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Self::from_index(&index);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::from_files(single.clone(), vec![single]);
        }
        Err(WeightsError::NoWeights {
            dir: dir.to_path_buf(),
        }
        .into())
    }

    /// Open a sharded checkpoint through its `model.safetensors.index.json`.
    pub fn from_index(index: &Path) -> Result<Self> {
        let bad = |message: String| WeightsError::BadIndex {
            path: index.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(index).map_err(|source| WeightsError::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("missing object `weight_map`".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("`weight_map.{tensor}` is not a file name")))?;
            if file.contains('/') || file.contains('\\') || file.contains("..") {
                return Err(bad(format!("shard name `{file}` must be a plain file name")).into());
            }
            if !shards.iter().any(|s| s == file) {
                shards.push(file.to_string());
            }
        }
        let paths = shards.iter().map(|s| dir.join(s)).collect();
        let store = Self::from_files(index.to_path_buf(), paths)?;
        for (tensor, file) in map {
            let file = file.as_str().unwrap_or_default();
            match store.by_name.get(tensor) {
                Some(&i) if store.files[i].path.file_name() == Some(file.as_ref()) => {}
                Some(&i) => {
                    return Err(bad(format!(
                        "`{tensor}` is mapped to {file} but found in {}",
                        store.files[i].path.display()
                    ))
                    .into())
                }
                None => {
                    return Err(bad(format!(
                        "`{tensor}` is mapped to {file}, which does not contain it"
                    ))
                    .into())
                }
            }
        }
        Ok(store)
    }

    pub fn from_files(origin: PathBuf, paths: Vec<PathBuf>) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut by_name = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = SafetensorsFile::open(path)?;
            for t in &file.header.tensors {
                if by_name.insert(t.name.clone(), i).is_some() {
                    return Err(WeightsError::BadIndex {
                        path: origin.clone(),
                        message: format!("tensor `{}` appears in more than one shard", t.name),
                    }
                    .into());
                }
            }
            files.push(file);
        }
        Ok(WeightStore {
            origin,
            files,
            by_name,
        })
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(|s| s.as_str())
    }
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name
            .get(name)
            .and_then(|&i| self.files[i].info(name))
    }

    /// The stored bytes of a tensor, as in the file.
    pub fn raw_bytes(&self, name: &str) -> Option<&[u8]> {
        let &i = self.by_name.get(name)?;
        let f = &self.files[i];
        f.info(name).map(|info| f.bytes(info))
    }

    /// Load `name`, checking its shape, converted to `dtype`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some(&i) = self.by_name.get(name) else {
            let suffix = name.rsplit('.').take(2).collect::<Vec<_>>();
            let similar = self
                .by_name
                .keys()
                .filter(|k| {
                    suffix.len() == 2 && k.ends_with(&format!("{}.{}", suffix[1], suffix[0]))
                })
                .take(3)
                .cloned()
                .collect::<Vec<_>>();
            let hint = if similar.is_empty() {
                String::new()
            } else {
                format!(" (similar names present: {})", similar.join(", "))
            };
            return Err(WeightsError::MissingTensor {
                path: self.origin.clone(),
                tensor: name.to_string(),
                hint,
            }
            .into());
        };
        let file = &self.files[i];
        let info = file.info(name).expect("indexed");
        if info.shape != shape {
            return Err(WeightsError::WrongShape {
                path: file.path.clone(),
                tensor: name.to_string(),
                actual: info.shape.clone(),
                expected: shape.to_vec(),
            }
            .into());
        }
        file.load(name, dtype, device)
    }
}

enum Source {
    Store(WeightStore),
    /// Shape-only source: every tensor asked for is a zero tensor of the asked shape (stride 0, so no
    /// memory), and the request is recorded. Builds a model of any size to check names and shapes.
    Zeros(std::sync::Mutex<Vec<(String, Vec<usize>)>>),
    /// Random initialisation (norm weights 1, biases 0, others uniform with std 0.02, as HF's
    /// `initializer_range`), for memory and speed measurements of models whose weights are not here.
    Random(std::sync::Mutex<crate::rng::SplitMix64>),
}

/// A view of the weights under a name prefix, in a compute dtype on a device: what models load from.
#[derive(Clone)]
pub struct Weights {
    source: std::sync::Arc<Source>,
    prefix: String,
    dtype: DType,
    device: Device,
    /// When set, every loaded tensor becomes a trainable `Var`, recorded under its checkpoint name
    /// (only those whose name `var_filter` accepts, when it is set).
    vars: Option<VarLog>,
    var_filter: Option<fn(&str) -> bool>,
    /// Adapters (LoRA) to attach to targeted Linear layers.
    lora: Option<std::sync::Arc<dyn Adapters>>,
}

/// Low-rank adapters attached to the Linear layers a model loads. Defined here, implemented by
/// [`crate::lora::LoraAttach`], so that the weights layer does not depend on what sits above it.
pub trait Adapters: Send + Sync {
    /// Dropout on the adapters' input during training.
    fn dropout(&self) -> f64;
    /// Whether the base weights stay frozen (only the adapters learn).
    fn freezes_base(&self) -> bool;
    /// The adapter of the Linear at `prefix`, if it is targeted: `(A, B, scale)`.
    fn adapter(
        &self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<(Tensor, Tensor, f64)>>;
}

/// Trainable variables by checkpoint name, shared by every view of one source.
pub type NamedVars = Vec<(String, candle_core::Var)>;
type VarLog = std::sync::Arc<std::sync::Mutex<NamedVars>>;

impl Weights {
    pub fn new(store: WeightStore, dtype: DType, device: &Device) -> Self {
        Weights {
            source: std::sync::Arc::new(Source::Store(store)),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            vars: None,
            var_filter: None,
            lora: None,
        }
    }

    /// Attach LoRA adapters to the Linear layers the spec targets.
    pub fn with_lora(mut self, lora: std::sync::Arc<dyn Adapters>) -> Self {
        self.lora = Some(lora);
        self
    }

    /// The LoRA dropout probability (0 without LoRA).
    pub fn lora_dropout(&self) -> f64 {
        self.lora.as_ref().map_or(0.0, |l| l.dropout())
    }

    /// Whether loaded weights are constants in a training run (LoRA training: only adapters learn).
    pub fn frozen(&self) -> bool {
        self.lora.as_ref().is_some_and(|l| l.freezes_base())
    }

    /// The LoRA adapter for the Linear at this prefix, if any: `(A, B, scale)`.
    pub fn lora_adapter(
        &self,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Option<(Tensor, Tensor, f64)>> {
        match &self.lora {
            None => Ok(None),
            Some(l) => l.adapter(&self.prefix, in_dim, out_dim, self.dtype, &self.device),
        }
    }

    /// Like [`Weights::new`], but every tensor a model loads is a trainable variable; see
    /// [`Weights::variables`].
    pub fn trainable(store: WeightStore, dtype: DType, device: &Device) -> Self {
        Weights {
            vars: Some(Default::default()),
            ..Self::new(store, dtype, device)
        }
    }

    /// Of the tensors loaded, only those whose checkpoint name `keep` accepts become variables; the
    /// others are constants (no gradient is computed for them).
    pub fn only_variables(self, keep: fn(&str) -> bool) -> Self {
        Weights {
            var_filter: Some(keep),
            ..self
        }
    }

    /// The variables created so far, with their checkpoint names, in load order.
    pub fn variables(&self) -> NamedVars {
        self.vars
            .as_ref()
            .map(|v| v.lock().expect("not poisoned").clone())
            .unwrap_or_default()
    }

    /// A shape-only source (see [`Weights::requested`]).
    pub fn zeros(dtype: DType, device: &Device) -> Self {
        Weights {
            source: std::sync::Arc::new(Source::Zeros(Default::default())),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            vars: None,
            var_filter: None,
            lora: None,
        }
    }

    /// A randomly initialised source (see `Source::Random`); every tensor asked for exists.
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        Weights {
            source: std::sync::Arc::new(Source::Random(std::sync::Mutex::new(
                crate::rng::SplitMix64(seed),
            ))),
            ..Self::zeros(dtype, device)
        }
    }

    /// [`Weights::random`] with every tensor a trainable variable (see [`Weights::variables`]).
    pub fn random_trainable(seed: u64, dtype: DType, device: &Device) -> Self {
        Weights {
            vars: Some(Default::default()),
            ..Self::random(seed, dtype, device)
        }
    }

    /// The (name, shape) pairs a shape-only source was asked for, in order.
    pub fn requested(&self) -> Vec<(String, Vec<usize>)> {
        match &*self.source {
            Source::Zeros(r) => r.lock().expect("not poisoned").clone(),
            Source::Store(_) | Source::Random(_) => Vec::new(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The full checkpoint name this view stands at (`encoder.layer.0.attention`), for writers
    /// that name what they save after the checkpoint.
    pub fn prefix_name(&self) -> String {
        self.prefix.clone()
    }

    /// The same weights under `prefix.sub`.
    pub fn pp(&self, sub: impl std::fmt::Display) -> Self {
        Weights {
            prefix: self.full(&sub.to_string()),
            ..self.clone()
        }
    }

    /// Whether the checkpoint holds `name` (under this prefix). A shape-only source holds everything.
    pub fn contains(&self, name: &str) -> bool {
        match &*self.source {
            Source::Store(s) => s.contains(&self.full(name)),
            Source::Zeros(_) | Source::Random(_) => true,
        }
    }

    /// Load `name` (under this prefix), checking its shape, in the compute dtype.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full = self.full(name);
        let t = self.get_source(shape, &full)?;
        match &self.vars {
            Some(_) if self.var_filter.is_some_and(|keep| !keep(&full)) => Ok(t),
            None => Ok(t),
            Some(vars) => {
                let var = candle_core::Var::from_tensor(&t)?;
                let t = var.as_tensor().clone();
                vars.lock().expect("not poisoned").push((full, var));
                Ok(t)
            }
        }
    }

    fn get_source(&self, shape: &[usize], full: &str) -> Result<Tensor> {
        match &*self.source {
            Source::Store(s) => s.get(full, shape, self.dtype, &self.device),
            Source::Zeros(r) => {
                r.lock()
                    .expect("not poisoned")
                    .push((full.to_string(), shape.to_vec()));
                Ok(Tensor::zeros((), self.dtype, &self.device)?.broadcast_as(shape)?)
            }
            Source::Random(rng) => {
                let n: usize = shape.iter().product();
                let t = if full.ends_with("norm.weight")
                    || full.ends_with("LayerNorm.weight")
                    || full.contains("_ln.weight")
                {
                    Tensor::ones(shape, DType::F32, &self.device)?
                } else if full.ends_with(".bias") {
                    Tensor::zeros(shape, DType::F32, &self.device)?
                } else {
                    let mut rng = rng.lock().expect("not poisoned");
                    let a = 0.02 * 3f32.sqrt();
                    let v: Vec<f32> = (0..n)
                        .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * a)
                        .collect();
                    Tensor::from_vec(v, shape, &self.device)?
                };
                Ok(t.to_dtype(self.dtype)?)
            }
        }
    }

    /// Pick the first of `prefixes` under which `probe` exists (e.g. `model.` or none).
    pub fn with_detected_prefix(&self, prefixes: &[&str], probe: &str) -> Self {
        for p in prefixes {
            let w = if p.is_empty() {
                self.clone()
            } else {
                self.pp(p)
            };
            if w.contains(probe) {
                return w;
            }
        }
        self.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Writing (checkpoints, LoRA adapters)

/// Bytes of `t` in the safetensors dtype `dtype` (F32, F16, BF16 or F64), little-endian.
pub fn tensor_bytes(t: &Tensor, dtype: Dtype) -> crate::error::Result<Vec<u8>> {
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
        other => {
            return Err(crate::error::Error::Unsupported(format!(
                "writing tensors as {other}"
            )))
        }
    })
}

fn st_dtype(d: Dtype) -> safetensors::tensor::Dtype {
    match d {
        Dtype::Bool => safetensors::tensor::Dtype::BOOL,
        Dtype::U8 => safetensors::tensor::Dtype::U8,
        Dtype::I8 => safetensors::tensor::Dtype::I8,
        Dtype::F8E5M2 => safetensors::tensor::Dtype::F8_E5M2,
        Dtype::F8E4M3 => safetensors::tensor::Dtype::F8_E4M3,
        Dtype::I16 => safetensors::tensor::Dtype::I16,
        Dtype::U16 => safetensors::tensor::Dtype::U16,
        Dtype::F16 => safetensors::tensor::Dtype::F16,
        Dtype::BF16 => safetensors::tensor::Dtype::BF16,
        Dtype::I32 => safetensors::tensor::Dtype::I32,
        Dtype::U32 => safetensors::tensor::Dtype::U32,
        Dtype::F32 => safetensors::tensor::Dtype::F32,
        Dtype::F64 => safetensors::tensor::Dtype::F64,
        Dtype::I64 => safetensors::tensor::Dtype::I64,
        Dtype::U64 => safetensors::tensor::Dtype::U64,
    }
}

/// Write named tensors (already as bytes) to one safetensors file.
pub fn write_safetensors(
    path: &std::path::Path,
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    metadata: std::collections::HashMap<String, String>,
) -> crate::error::Result<()> {
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(st_dtype(*d), s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| crate::error::Error::InvalidInput(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let tmp = path.with_extension("safetensors.partial");
    safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| crate::error::Error::InvalidInput(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| crate::error::Error::io(path, e))
}
