//! ONNX both ways.
//!
//! - [`inspect`] reads an ONNX model (protobuf, with external data validated by offset) and describes
//!   it: opset, inputs and outputs with their dynamic axes, every initializer, operator counts.
//! - [`export`] writes a sembed model (BERT, Qwen2, Qwen3, Jina v3; LoRA adapters merged) as an ONNX
//!   graph in sentence-transformers' layout, for ONNX Runtime and `SentenceTransformer(dir,
//!   backend="onnx")`.
//!
//! The protobuf types are the ones tract generates from the official `onnx.proto` ([`proto`]).

pub mod error;
pub mod export;
pub mod graph;
pub mod inspect;

pub use error::OnnxError;
pub use export::{export, ExportOptions, ExportReport};
pub use inspect::{inspect, inspect_bytes, Summary};

/// The ONNX protobuf messages (`ModelProto`, `GraphProto`, `TensorProto`, …).
pub use tract_onnx::pb as proto;
