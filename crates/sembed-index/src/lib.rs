//! Code search for sembed: cut a repository into chunks by syntax ([`chunk`]), find what changed
//! ([`walk`], content hashes), embed only that, and keep the vectors in a store ([`store`]): SQLite with
//! an HNSW graph beside it by default, PostgreSQL/pgvector at scale. [`index`] runs the pipeline and
//! [`search`] answers queries; [`watch`] keeps an index current.

pub mod chunk;
pub mod error;
pub mod index;
pub mod lexical;
pub mod mine;
pub mod search;
pub mod store;
pub mod walk;
pub mod watch;

pub use error::{Error, Result};
