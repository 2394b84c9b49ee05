//! Code search for sembed: cut a repository into chunks by syntax ([`chunk`]), find what changed
//! ([`walk`], content hashes), embed only that, and keep the vectors in a store ([`store`]): SQLite with
//! an HNSW graph beside it by default, PostgreSQL/pgvector at scale. [`index`] runs the pipeline and
//! [`search`] answers queries.

pub mod chunk;
pub mod error;
pub mod index;
pub mod mine;
pub mod search;
pub mod store;
pub mod walk;

pub use error::{Error, Result};
