//! The server side: the image server (HTTP handlers, the artifact store, builds on demand from
//! stream sources) and the release manager's verbs (publish, release, repo).

pub mod artifacts;
pub mod build;
pub mod builds;
pub mod dashboard;
pub mod fleetlock;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod publish;
pub mod repo_sync;
pub mod reports;
pub mod respond;
pub mod source;
pub mod tuf_repo;
pub mod verbs;

pub use artifacts::Store;
pub use http::{router, Server, Tuning};
pub use listen::{run, serve, spawn_local};
pub use source::StreamSource;
