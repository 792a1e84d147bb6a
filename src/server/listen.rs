//! Connections of the image server: the accept loop, a cap on connections at once (below the
//! open-files limit), and a timeout for a connection that sends no request head.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::http::{router, Server};
use crate::sys::rlimit;

/// Descriptors kept free for files other than connections (store, builds, logs).
const RESERVED_FILES: u64 = 256;

/// Serves until the process ends: at most `max_connections` connections at once (fewer if
/// the open-files limit, raised to its hard limit first, is lower); a connection that sends no
/// complete request head within `idle_timeout` (also between keep-alive requests) is closed.
pub async fn serve(listener: tokio::net::TcpListener, server: Arc<Server>) -> Result<()> {
    let files = rlimit::raise_nofile().unwrap_or_else(|e| {
        tracing::warn!("{e:#}");
        1024
    });
    let slots = connection_slots(server.tuning.max_connections, files);
    let slots = Arc::new(Semaphore::new(slots));
    let idle = server.tuning.idle_timeout;
    let app = router(server);
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .context("connection slots")?;
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, app.clone(), idle, permit));
            }
            Err(e) => {
                // Out of files or similar: let connections finish instead of spinning.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// How many connections may be open at once: `max`, fewer if the open-files limit is lower.
fn connection_slots(max: usize, files: u64) -> usize {
    let by_files = files.saturating_sub(RESERVED_FILES) as usize;
    max.min(by_files).max(1)
}

/// One HTTP/1.1 connection, holding its connection slot until it ends.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    idle: Duration,
    _slot: OwnedSemaphorePermit,
) {
    let service = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(idle)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!("connection ended: {e}");
    }
}

/// Binds and serves (the `serve` verb).
pub fn run(addr: SocketAddr, server: Server) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!("listening on http://{addr}");
        serve(listener, Arc::new(server)).await
    })
}

/// Serves on a free port of 127.0.0.1 from a thread of its own (a two-worker runtime, so a
/// handler that blocks the runtime shows), for tests and benchmarks; returns the address.
pub fn spawn_local(server: Arc<Server>) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        let served = rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            serve(listener, server).await
        });
        if let Err(e) = served {
            tracing::error!("serving on {addr}: {e:#}");
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_below_the_open_files_limit() {
        assert_eq!(connection_slots(10_000, 1024), 768);
        assert_eq!(connection_slots(10_000, 1 << 20), 10_000);
        assert_eq!(connection_slots(10_000, 10), 1);
    }
}
