//! Errors of the library. Every variant says what went wrong and where (file, tensor, field, input).

use std::path::PathBuf;

/// Faults found while reading or validating safetensors weights. Each names the file (and tensor).
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file is {len} bytes, shorter than the 8-byte safetensors header length")]
    FileTooShort { path: PathBuf, len: u64 },
    #[error("{path}: header length {header_len} goes beyond the end of the file ({file_len} bytes); the file is truncated or not safetensors")]
    HeaderBeyondFile {
        path: PathBuf,
        header_len: u64,
        file_len: u64,
    },
    #[error("{path}: safetensors header is not valid UTF-8 (byte {valid_up_to})")]
    HeaderNotUtf8 { path: PathBuf, valid_up_to: usize },
    #[error("{path}: safetensors header is not valid JSON: {message}")]
    HeaderNotJson { path: PathBuf, message: String },
    #[error("{path}: tensor `{tensor}`: malformed header entry: {message}")]
    BadEntry {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{path}: tensor `{tensor}` has unknown dtype `{dtype}`")]
    UnknownDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: tensor `{tensor}`: data offsets [{start}, {end}) are out of range (data section is {data_len} bytes)")]
    OffsetsOutOfRange {
        path: PathBuf,
        tensor: String,
        start: u64,
        end: u64,
        data_len: u64,
    },
    #[error("{path}: tensors `{first}` and `{second}` overlap in the data section (bytes {start}..{end})")]
    Overlap {
        path: PathBuf,
        first: String,
        second: String,
        start: u64,
        end: u64,
    },
    #[error("{path}: tensor `{tensor}`: {actual} bytes of data, but shape {shape:?} of {dtype} needs {expected}")]
    SizeMismatch {
        path: PathBuf,
        tensor: String,
        shape: Vec<usize>,
        dtype: String,
        actual: u64,
        expected: u64,
    },
    #[error(
        "{path}: the model needs tensor `{tensor}`, which the checkpoint does not contain{hint}"
    )]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        hint: String,
    },
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, the model expects {expected:?}")]
    WrongShape {
        path: PathBuf,
        tensor: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(
        "{path}: tensor `{tensor}` has dtype {dtype}, which cannot be converted to a compute dtype"
    )]
    UnsupportedConversion {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: sharded checkpoint index: {message}")]
    BadIndex { path: PathBuf, message: String },
    #[error("{dir}: no weights found (looked for model.safetensors and model.safetensors.index.json); pytorch_model.bin is not supported, convert it to safetensors first")]
    NoWeights { dir: PathBuf },
}

/// The library's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: unknown or unsupported architecture: {message}")]
    UnknownArchitecture { path: PathBuf, message: String },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("model `{reference}`: {message}")]
    Hub { reference: String, message: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A bug caught at a boundary (a panic inside a model, turned into an error by the server).
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
