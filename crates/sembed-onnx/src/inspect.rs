//! `sembed inspect model.onnx`: what an ONNX file holds, checked.
//!
//! The protobuf is decoded with prost into tract's generated ONNX types; nothing here parses bytes by
//! hand. Initializers stored in external data files are checked by offset and length against the
//! file on disk; a missing file, a short file or an offset past its end is an error naming the file.

use crate::error::{OnnxError, Result};
use crate::proto::{
    tensor_proto::{DataLocation, DataType},
    tensor_shape_proto::dimension::Value as DimValue,
    type_proto::Value as TypeValue,
    GraphProto, ModelProto, TensorProto, ValueInfoProto,
};
use prost::Message;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// One axis of an input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// A named dynamic axis (`batch`, `sequence`…).
    Named(String),
    /// Dynamic and unnamed.
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Named(s) => write!(f, "{s}"),
            Dim::Unknown => write!(f, "?"),
        }
    }
}

/// A graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub name: String,
    pub dtype: String,
    /// None when the shape is not given at all.
    pub shape: Option<Vec<Dim>>,
}

/// Where an initializer's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Inline,
    External {
        file: String,
        offset: u64,
        length: u64,
    },
}

/// One initializer (weight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initializer {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
    pub elements: u64,
    pub bytes: u64,
    pub location: Location,
}

/// What `inspect` found.
#[derive(Debug, Clone)]
pub struct Summary {
    pub path: PathBuf,
    pub ir_version: i64,
    pub producer: String,
    /// `(domain, version)`, the default domain written as `ai.onnx`.
    pub opsets: Vec<(String, i64)>,
    pub inputs: Vec<Value>,
    pub outputs: Vec<Value>,
    pub initializers: Vec<Initializer>,
    /// Operators of the main graph and of every subgraph and function, `domain::Op` outside the
    /// default domain.
    pub operators: BTreeMap<String, usize>,
    pub metadata: Vec<(String, String)>,
}

impl Summary {
    /// Elements over all initializers.
    pub fn parameters(&self) -> u64 {
        self.initializers.iter().map(|i| i.elements).sum()
    }
    /// Bytes over all initializers.
    pub fn weight_bytes(&self) -> u64 {
        self.initializers.iter().map(|i| i.bytes).sum()
    }
    /// The external data files the initializers live in.
    pub fn external_files(&self) -> Vec<String> {
        let mut files: Vec<String> = self
            .initializers
            .iter()
            .filter_map(|i| match &i.location {
                Location::External { file, .. } => Some(file.clone()),
                Location::Inline => None,
            })
            .collect();
        files.sort();
        files.dedup();
        files
    }
    /// Number of nodes over the whole model.
    pub fn node_count(&self) -> usize {
        self.operators.values().sum()
    }
}

/// Read and check `path` (external data is looked up beside it).
pub fn inspect(path: &Path) -> Result<Summary> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    inspect_bytes(&bytes, path)
}

/// Check model bytes read from `path` (the folder of `path` holds any external data).
pub fn inspect_bytes(bytes: &[u8], path: &Path) -> Result<Summary> {
    let model = decode(bytes, path)?;
    summarize(&model, path)
}

/// Decode the protobuf; any failure is an error naming the file.
pub fn decode(bytes: &[u8], path: &Path) -> Result<ModelProto> {
    ModelProto::decode(bytes).map_err(|e| OnnxError::Decode {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn summarize(model: &ModelProto, path: &Path) -> Result<Summary> {
    if model.ir_version <= 0 {
        return Err(OnnxError::invalid(
            path,
            format!(
                "ir_version {} is not a valid ONNX IR version; the file is not an ONNX model",
                model.ir_version
            ),
        ));
    }
    let graph = model.graph.as_ref().ok_or_else(|| {
        OnnxError::invalid(
            path,
            "the model has no graph; the file is not an ONNX model",
        )
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut initializers = Vec::with_capacity(graph.initializer.len());
    let mut data_files: BTreeMap<String, u64> = BTreeMap::new();
    for t in &graph.initializer {
        initializers.push(initializer(t, path, dir, &mut data_files)?);
    }
    let mut operators = BTreeMap::new();
    count_ops(graph, &mut operators, 0, path)?;
    for f in &model.functions {
        for n in &f.node {
            *operators.entry(op_name(&n.domain, &n.op_type)).or_insert(0) += 1;
        }
    }
    Ok(Summary {
        path: path.to_path_buf(),
        ir_version: model.ir_version,
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
        opsets: model
            .opset_import
            .iter()
            .map(|o| {
                let d = if o.domain.is_empty() {
                    "ai.onnx".to_string()
                } else {
                    o.domain.clone()
                };
                (d, o.version)
            })
            .collect(),
        inputs: graph
            .input
            .iter()
            // Inputs that are also initializers are overridable weights, not model inputs.
            .filter(|i| !graph.initializer.iter().any(|t| t.name == i.name))
            .map(value)
            .collect(),
        outputs: graph.output.iter().map(value).collect(),
        initializers,
        operators,
        metadata: model
            .metadata_props
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect(),
    })
}

fn op_name(domain: &str, op: &str) -> String {
    if domain.is_empty() || domain == "ai.onnx" {
        op.to_string()
    } else {
        format!("{domain}::{op}")
    }
}

fn count_ops(
    g: &GraphProto,
    ops: &mut BTreeMap<String, usize>,
    depth: usize,
    path: &Path,
) -> Result<()> {
    if depth > 64 {
        return Err(OnnxError::invalid(
            path,
            "subgraphs nested more than 64 deep",
        ));
    }
    for n in &g.node {
        *ops.entry(op_name(&n.domain, &n.op_type)).or_insert(0) += 1;
        for a in &n.attribute {
            if let Some(sub) = &a.g {
                count_ops(sub, ops, depth + 1, path)?;
            }
            for sub in &a.graphs {
                count_ops(sub, ops, depth + 1, path)?;
            }
        }
    }
    Ok(())
}

fn value(v: &ValueInfoProto) -> Value {
    let (dtype, shape) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(TypeValue::TensorType(t)) => (
            dtype_name(t.elem_type),
            t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(DimValue::DimValue(n)) => Dim::Fixed(*n),
                        Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::Named(p.clone()),
                        _ => Dim::Unknown,
                    })
                    .collect()
            }),
        ),
        None => ("?".to_string(), None),
    };
    Value {
        name: v.name.clone(),
        dtype,
        shape,
    }
}

/// The ONNX name of a `TensorProto.DataType` value.
pub fn dtype_name(code: i32) -> String {
    match DataType::try_from(code) {
        Ok(DataType::Undefined) | Err(_) => format!("dtype#{code}"),
        Ok(d) => d.as_str_name().to_ascii_lowercase(),
    }
}

/// Bits per element, None for strings and unknown types.
fn dtype_bits(code: i32) -> Option<u64> {
    use DataType::*;
    Some(match DataType::try_from(code).ok()? {
        Float | Int32 | Uint32 => 32,
        Uint8 | Int8 | Bool | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz => 8,
        Uint16 | Int16 | Float16 | Bfloat16 => 16,
        Int64 | Uint64 | Double | Complex64 => 64,
        Complex128 => 128,
        Uint4 | Int4 => 4,
        _ => return None,
    })
}

fn initializer(
    t: &TensorProto,
    model_path: &Path,
    dir: &Path,
    data_files: &mut BTreeMap<String, u64>,
) -> Result<Initializer> {
    let bad = |m: String| OnnxError::invalid(model_path, format!("initializer `{}`: {m}", t.name));
    let mut elements: u64 = 1;
    for &d in &t.dims {
        if d < 0 {
            return Err(bad(format!("negative dimension in shape {:?}", t.dims)));
        }
        elements = elements
            .checked_mul(d as u64)
            .ok_or_else(|| bad(format!("shape {:?} overflows", t.dims)))?;
    }
    let bits = dtype_bits(t.data_type);
    let expected = bits.and_then(|b| elements.checked_mul(b).map(|x| x.div_ceil(8)));
    let external = t.data_location == Some(DataLocation::External as i32);
    if !external {
        let bytes = inline_bytes(t);
        if let (Some(exp), Some(have)) = (expected, bytes) {
            if have != exp {
                return Err(bad(format!(
                    "{have} bytes of data, but shape {:?} of {} needs {exp}",
                    t.dims,
                    dtype_name(t.data_type)
                )));
            }
        }
        return Ok(Initializer {
            name: t.name.clone(),
            dtype: dtype_name(t.data_type),
            shape: t.dims.clone(),
            elements,
            bytes: bytes.or(expected).unwrap_or(0),
            location: Location::Inline,
        });
    }
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in &t.external_data {
        let num = |v: &str| {
            v.parse::<u64>().map_err(|_| {
                bad(format!(
                    "external data `{}` is `{v}`, not a byte count",
                    kv.key
                ))
            })
        };
        match kv.key.as_str() {
            "location" => location = Some(kv.value.clone()),
            "offset" => offset = num(&kv.value)?,
            "length" => length = Some(num(&kv.value)?),
            _ => {}
        }
    }
    let file = location.ok_or_else(|| bad("external data without a `location`".into()))?;
    // ONNX Runtime refuses external data outside the model's folder; so do we.
    let rel = Path::new(&file);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(bad(format!(
            "external data location `{file}` must be a relative path inside the model's folder"
        )));
    }
    let data_path = dir.join(rel);
    let ext_err = |m: String| OnnxError::ExternalData {
        path: data_path.clone(),
        tensor: t.name.clone(),
        message: m,
    };
    let size = match data_files.get(&file) {
        Some(s) => *s,
        None => {
            let meta = std::fs::metadata(&data_path).map_err(|e| {
                ext_err(if e.kind() == std::io::ErrorKind::NotFound {
                    "the file does not exist".to_string()
                } else {
                    format!("cannot read it: {e}")
                })
            })?;
            if !meta.is_file() {
                return Err(ext_err("not a regular file".into()));
            }
            data_files.insert(file.clone(), meta.len());
            meta.len()
        }
    };
    if offset > size {
        return Err(ext_err(format!(
            "offset {offset} is past the end of the file ({size} bytes): the file is short or the offset is wrong"
        )));
    }
    let length = length.unwrap_or(size - offset);
    let end = offset
        .checked_add(length)
        .ok_or_else(|| ext_err(format!("offset {offset} + length {length} overflows")))?;
    if end > size {
        return Err(ext_err(format!(
            "bytes {offset}..{end} run past the end of the file ({size} bytes): the file is short"
        )));
    }
    if let Some(exp) = expected {
        if length != exp {
            return Err(ext_err(format!(
                "{length} bytes, but shape {:?} of {} needs {exp}",
                t.dims,
                dtype_name(t.data_type)
            )));
        }
    }
    Ok(Initializer {
        name: t.name.clone(),
        dtype: dtype_name(t.data_type),
        shape: t.dims.clone(),
        elements,
        bytes: length,
        location: Location::External {
            file,
            offset,
            length,
        },
    })
}

/// Bytes of an inline tensor's data as stored (raw or typed fields), None for strings.
fn inline_bytes(t: &TensorProto) -> Option<u64> {
    if !t.raw_data.is_empty() {
        return Some(t.raw_data.len() as u64);
    }
    let bits = dtype_bits(t.data_type)?;
    use DataType::*;
    let n = match DataType::try_from(t.data_type).ok()? {
        Float => t.float_data.len() as u64,
        Complex64 => t.float_data.len() as u64 / 2,
        Double => t.double_data.len() as u64,
        Complex128 => t.double_data.len() as u64 / 2,
        Int64 => t.int64_data.len() as u64,
        Uint32 | Uint64 => t.uint64_data.len() as u64,
        Uint4 | Int4 => (t.int32_data.len() as u64) * 2,
        _ => t.int32_data.len() as u64,
    };
    Some((n * bits).div_ceil(8))
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.path.display())?;
        writeln!(
            f,
            "  ir_version {}, producer {}",
            self.ir_version,
            if self.producer.is_empty() {
                "(none)"
            } else {
                &self.producer
            }
        )?;
        let opsets: Vec<String> = self
            .opsets
            .iter()
            .map(|(d, v)| format!("{d} {v}"))
            .collect();
        writeln!(f, "  opset: {}", opsets.join(", "))?;
        let shape = |s: &Option<Vec<Dim>>| match s {
            None => "(no shape)".to_string(),
            Some(d) => format!(
                "[{}]",
                d.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        writeln!(f, "inputs:")?;
        for v in &self.inputs {
            writeln!(f, "  {} {} {}", v.name, v.dtype, shape(&v.shape))?;
        }
        writeln!(f, "outputs:")?;
        for v in &self.outputs {
            writeln!(f, "  {} {} {}", v.name, v.dtype, shape(&v.shape))?;
        }
        let files = self.external_files();
        writeln!(
            f,
            "initializers: {} tensors, {} parameters, {} bytes{}",
            self.initializers.len(),
            self.parameters(),
            self.weight_bytes(),
            if files.is_empty() {
                String::new()
            } else {
                format!(" (external data: {})", files.join(", "))
            }
        )?;
        for i in &self.initializers {
            let loc = match &i.location {
                Location::Inline => String::new(),
                Location::External { file, offset, .. } => format!("  @ {file}+{offset}"),
            };
            writeln!(
                f,
                "  {} {} {:?} {} bytes{}",
                i.name, i.dtype, i.shape, i.bytes, loc
            )?;
        }
        writeln!(f, "operators: {} nodes", self.node_count())?;
        let mut ops: Vec<(&String, &usize)> = self.operators.iter().collect();
        ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (op, n) in ops {
            writeln!(f, "  {op} {n}")?;
        }
        if !self.metadata.is_empty() {
            writeln!(f, "metadata:")?;
            for (k, v) in &self.metadata {
                writeln!(f, "  {k}: {v}")?;
            }
        }
        Ok(())
    }
}
