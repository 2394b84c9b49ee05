//! A small builder for ONNX graphs (opset 17): nodes with generated value names, initializers kept
//! as typed host data until the model is written, and the writer (inline or external data).

use crate::error::{OnnxError, Result};
use crate::proto::{
    attribute_proto::AttributeType,
    tensor_proto::{DataLocation, DataType},
    tensor_shape_proto::{dimension::Value as DimValue, Dimension},
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use prost::Message;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// The opset the exported graphs use: LayerNormalization is standard from 17 on, and every ONNX
/// Runtime of the last years runs it.
pub const OPSET: i64 = 17;
/// IR version 8 goes with opset 17.
pub const IR_VERSION: i64 = 8;
/// Initializers this large or larger go to the external data file when there is one (the `onnx`
/// package's default threshold).
const EXTERNAL_MIN_BYTES: usize = 1024;
/// Offsets in the external data file are aligned to this (lets runtimes map tensors in place).
const EXTERNAL_ALIGN: u64 = 4096;
/// Protobuf messages cannot exceed 2 GiB; past this many bytes of weights, external data is needed.
pub const INLINE_LIMIT: u64 = 1 << 31;

/// Host data of an initializer.
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I8(Vec<i8>),
    U8(Vec<u8>),
}

impl Data {
    fn dtype(&self) -> DataType {
        match self {
            Data::F32(_) => DataType::Float,
            Data::I64(_) => DataType::Int64,
            Data::I8(_) => DataType::Int8,
            Data::U8(_) => DataType::Uint8,
        }
    }
    fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::I8(v) => v.len(),
            Data::U8(v) => v.len(),
        }
    }
    fn byte_len(&self) -> usize {
        match self {
            Data::F32(v) => v.len() * 4,
            Data::I64(v) => v.len() * 8,
            Data::I8(v) => v.len(),
            Data::U8(v) => v.len(),
        }
    }
    /// Little-endian bytes, as ONNX `raw_data` and external data store them.
    fn bytes(&self) -> Vec<u8> {
        match self {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I8(v) => v.iter().map(|&x| x as u8).collect(),
            Data::U8(v) => v.clone(),
        }
    }
}

/// An axis of a graph input or output.
#[derive(Clone, Copy)]
pub enum Axis {
    Fixed(usize),
    Dynamic(&'static str),
}

/// Attribute constructors.
pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}
pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    inits: Vec<(String, Vec<usize>, Data)>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    next: usize,
    /// Small constants by value, so each is stored once.
    consts: HashMap<String, String>,
}

fn value_info(name: &str, dtype: DataType, axes: &[Axis]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: dtype as i32,
                shape: Some(TensorShapeProto {
                    dim: axes
                        .iter()
                        .map(|a| Dimension {
                            value: Some(match a {
                                Axis::Fixed(n) => DimValue::DimValue(*n as i64),
                                Axis::Dynamic(s) => DimValue::DimParam(s.to_string()),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("{hint}_{}", self.next)
    }

    /// A node with one output; returns the output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.op_n(op, inputs, 1, attrs).remove(0)
    }

    /// A node with `n` outputs.
    pub fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        n: usize,
        attrs: Vec<AttributeProto>,
    ) -> Vec<String> {
        let name = self.fresh(op);
        let outputs: Vec<String> = (0..n).map(|i| format!("{name}_out{i}")).collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name,
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        outputs
    }

    /// A node writing a named value (graph outputs).
    pub fn op_named(&mut self, op: &str, inputs: &[&str], output: &str) {
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            name,
            op_type: op.into(),
            ..Default::default()
        });
    }

    /// An initializer under `name` (a weight's checkpoint name, made unique if needed).
    pub fn init(&mut self, name: &str, dims: &[usize], data: Data) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len(), "{name}");
        let name = if self.inits.iter().any(|(n, _, _)| n == name) {
            self.fresh(name)
        } else {
            name.to_string()
        };
        self.inits.push((name.clone(), dims.to_vec(), data));
        name
    }

    /// A 1-D int64 constant (shapes, axes), stored once per value.
    pub fn ints(&mut self, v: &[i64]) -> String {
        let key = format!("i64{v:?}");
        if let Some(n) = self.consts.get(&key) {
            return n.clone();
        }
        let name = self.fresh("const_i64");
        self.inits
            .push((name.clone(), vec![v.len()], Data::I64(v.to_vec())));
        self.consts.insert(key, name.clone());
        name
    }

    /// A scalar int64 constant.
    pub fn int(&mut self, v: i64) -> String {
        let key = format!("i64 {v}");
        if let Some(n) = self.consts.get(&key) {
            return n.clone();
        }
        let name = self.fresh("const_i64");
        self.inits.push((name.clone(), vec![], Data::I64(vec![v])));
        self.consts.insert(key, name.clone());
        name
    }

    /// A scalar f32 constant.
    pub fn scalar(&mut self, v: f32) -> String {
        let key = format!("f32 {:08x}", v.to_bits());
        if let Some(n) = self.consts.get(&key) {
            return n.clone();
        }
        let name = self.fresh("const_f32");
        self.inits.push((name.clone(), vec![], Data::F32(vec![v])));
        self.consts.insert(key, name.clone());
        name
    }

    pub fn input(&mut self, name: &str, dtype: DataType, axes: &[Axis]) -> String {
        self.inputs.push(value_info(name, dtype, axes));
        name.to_string()
    }

    /// Declare `value` a graph output named `name` (through an Identity node).
    pub fn output(&mut self, value: &str, name: &str, dtype: DataType, axes: &[Axis]) {
        self.op_named("Identity", &[value], name);
        self.outputs.push(value_info(name, dtype, axes));
    }

    /// Elements and bytes over all initializers.
    pub fn weight_size(&self) -> (u64, u64) {
        self.inits.iter().fold((0, 0), |(n, b), (_, _, d)| {
            (n + d.len() as u64, b + d.byte_len() as u64)
        })
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Write the model to `path`; with `external`, initializers of 1 KiB and more go to that file
    /// (a name in the same folder). Returns the bytes written to the model file.
    pub fn save(
        self,
        path: &Path,
        external: Option<&str>,
        metadata: &[(String, String)],
    ) -> Result<u64> {
        let (_, bytes) = self.weight_size();
        if external.is_none() && bytes >= INLINE_LIMIT - (64 << 20) {
            return Err(OnnxError::Unsupported(format!(
                "{bytes} bytes of weights do not fit in one protobuf (2 GiB); use external data"
            )));
        }
        let werr = |p: &Path, source| OnnxError::Write {
            path: p.to_path_buf(),
            source,
        };
        let mut data_file = match external {
            Some(name) => {
                let p = path.with_file_name(name);
                let f = std::fs::File::create(&p).map_err(|e| werr(&p, e))?;
                Some((p, std::io::BufWriter::new(f), 0u64))
            }
            None => None,
        };
        let mut initializer = Vec::with_capacity(self.inits.len());
        for (name, dims, data) in self.inits {
            let mut t = TensorProto {
                dims: dims.iter().map(|&d| d as i64).collect(),
                data_type: data.dtype() as i32,
                name,
                ..Default::default()
            };
            let raw = data.bytes();
            drop(data);
            match (&mut data_file, external) {
                (Some((p, w, pos)), Some(file)) if raw.len() >= EXTERNAL_MIN_BYTES => {
                    let pad = (EXTERNAL_ALIGN - *pos % EXTERNAL_ALIGN) % EXTERNAL_ALIGN;
                    w.write_all(&vec![0u8; pad as usize])
                        .map_err(|e| werr(p, e))?;
                    *pos += pad;
                    w.write_all(&raw).map_err(|e| werr(p, e))?;
                    t.data_location = Some(DataLocation::External as i32);
                    t.external_data = [
                        ("location", file.to_string()),
                        ("offset", pos.to_string()),
                        ("length", raw.len().to_string()),
                    ]
                    .into_iter()
                    .map(|(k, v)| StringStringEntryProto {
                        key: k.into(),
                        value: v,
                    })
                    .collect();
                    *pos += raw.len() as u64;
                }
                _ => t.raw_data = raw,
            }
            initializer.push(t);
        }
        if let Some((p, mut w, _)) = data_file {
            w.flush().map_err(|e| werr(&p, e))?;
        }
        let model = ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "sembed".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: "sembed".into(),
                initializer,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            ..Default::default()
        };
        let buf = model.encode_to_vec();
        std::fs::write(path, &buf).map_err(|e| werr(path, e))?;
        Ok(buf.len() as u64)
    }
}
