use std::path::PathBuf;

/// What can go wrong reading or writing ONNX; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid ONNX model: protobuf decoding failed ({message}); the file is truncated, damaged or not ONNX")]
    Decode { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: external data of initializer `{tensor}`: {message}")]
    ExternalData {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Sembed(#[from] sembed::Error),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = OnnxError> = std::result::Result<T, E>;

impl OnnxError {
    pub(crate) fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        OnnxError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}
