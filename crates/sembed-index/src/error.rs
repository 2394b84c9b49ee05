//! Errors of indexing and searching: each says what and where.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("index {path}: {message}")]
    Sqlite { path: String, message: String },
    #[error("PostgreSQL index `{table}`: {message}")]
    Postgres { table: String, message: String },
    /// The index holds vectors of another model (or another chunker/dimension).
    #[error("{0}")]
    Mismatch(String),
    /// Not an index, or an index damaged beyond use.
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Embed(#[from] sembed::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
