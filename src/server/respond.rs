//! How every handler of the image server answers a failure, and runs blocking work.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::fleet::store::Db;

/// A plain-text answer that no cache keeps.
pub fn error(status: StatusCode, msg: String) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], msg + "\n").into_response()
}

/// A 500: the details go to the log, the client gets a short fixed message.
pub fn internal(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::error!("{what}: {e:#}");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal server error".into(),
    )
}

/// Runs blocking `f` (file reads, `zfs list`, the fleet database) off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("blocking task")?
}

/// Runs `f` on the fleet database off the async runtime, holding its lock.
pub async fn with_db<T: Send + 'static>(
    db: Arc<Mutex<Db>>,
    f: impl FnOnce(&Db) -> Result<T> + Send + 'static,
) -> Result<T> {
    blocking(move || {
        let db = db
            .lock()
            .map_err(|_| anyhow::anyhow!("fleet database lock poisoned"))?;
        f(&db)
    })
    .await
}
