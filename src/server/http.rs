//! The image server's HTTP side: signed manifests per channel, immutable artifacts (full streams and
//! diffs) with Range support, diffs built on demand once, and a size-capped artifact cache.
//!
//! Routes:
//! - `GET /v1/channels/{channel}/manifest`: a freshly signed manifest (cacheable 30 s);
//! - `GET /v1/artifacts/{name}` (`full-V.xz`, `A-to-B.xz`): the artifact, immutable;
//! - `GET /v1/artifacts/{name}.descriptor`: its signed descriptor, immutable;
//!   either answers `503` + `Retry-After` (never cached) while the artifact is being built.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ed25519_dalek::SigningKey;
use tower::ServiceExt;

use super::artifacts::Store;
use super::build;
use super::source::StreamSource;
use crate::core::manifest::{self, Manifest};
use crate::core::sign;
use crate::core::version::Version;
use crate::sys::clock::now;

/// How long a signed manifest stays valid.
const MANIFEST_LIFETIME: u64 = 24 * 3600;
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// What a build in progress or failed looks like to the next asker.
#[derive(Debug, Clone)]
enum Build {
    Running,
    Failed(String),
}

/// What an operator tunes on the image server (the `serve` flags).
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Seconds a box is told to wait while an artifact is built.
    pub retry_after: u64,
    /// Largest total size of built artifacts before the least recently used are evicted.
    pub cache_cap: u64,
    /// Diffs are built only from the `diff_window` newest releases of the target's channel
    /// before the target; older bases are told to take the full stream.
    pub diff_window: usize,
    /// How many builds run at once (each xz encoder gets its share of the cores).
    pub max_builds: usize,
    /// How long a failed build is not retried; doubles on each failure up to `max_backoff`.
    pub build_backoff: Duration,
    /// The longest a failed build waits before it is tried again.
    pub max_backoff: Duration,
    /// A connection that sends no complete request head for this long is closed.
    pub idle_timeout: Duration,
    /// Most connections served at once (also bounded by the open-files limit).
    pub max_connections: usize,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            retry_after: 5,
            cache_cap: u64::MAX,
            diff_window: 3,
            max_builds: 1,
            build_backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(15),
            max_connections: 10_000,
        }
    }
}

/// The image server's state: the store, the signing key, the stream source and the builds.
pub struct Server {
    pub store: Store,
    pub key: SigningKey,
    pub source: Arc<dyn StreamSource>,
    pub tuning: Tuning,
    builds: Mutex<HashMap<String, Build>>,
}

impl Server {
    /// A server over `store` signing with `key`, building from `source`.
    pub fn new(
        store: Store,
        key: SigningKey,
        source: Arc<dyn StreamSource>,
        tuning: Tuning,
    ) -> Server {
        Server {
            store,
            key,
            source,
            tuning,
            builds: Mutex::new(HashMap::new()),
        }
    }

    /// How many builds were started (tests assert "once").
    pub fn builds_started(&self) -> usize {
        self.store.builds_started()
    }

    /// How many builds are running or waiting for a slot now.
    pub fn builds_in_progress(&self) -> usize {
        let builds = self.builds.lock().expect("builds lock");
        builds
            .values()
            .filter(|b| matches!(b, Build::Running))
            .count()
    }
}

/// The routes, over `server`.
pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/v1/channels/:channel/manifest", get(get_manifest))
        .route("/v1/artifacts/:name", get(get_artifact))
        .with_state(server)
}

/// Serves until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, server: Arc<Server>) -> Result<()> {
    axum::serve(listener, router(server))
        .await
        .context("serving")
}

/// Binds and serves (the `serve` verb).
pub fn run(addr: SocketAddr, server: Server) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!("serving on {addr}");
        eprintln!("upgradectl serve: listening on http://{addr}");
        serve(listener, Arc::new(server)).await
    })
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], msg + "\n").into_response()
}

async fn get_manifest(State(s): State<Arc<Server>>, UrlPath(channel): UrlPath<String>) -> Response {
    if !manifest::CHANNELS.contains(&channel.as_str()) {
        return error(StatusCode::NOT_FOUND, format!("no channel {channel:?}"));
    }
    let releases = match s.store.releases() {
        Ok(r) => r,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    let now = now();
    let m = Manifest {
        channel: channel.clone(),
        issued: now,
        expires: now + MANIFEST_LIFETIME,
        releases: releases
            .into_iter()
            .filter(|r| r.channel == channel)
            .map(|r| r.release)
            .collect(),
    };
    match sign::seal(&m, &s.key) {
        Ok(env) => (
            [(header::CACHE_CONTROL, "public, max-age=30")],
            axum::Json(env),
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn get_artifact(
    State(s): State<Arc<Server>>,
    UrlPath(name): UrlPath<String>,
    req: Request,
) -> Response {
    let (artifact, descriptor) = match name.strip_suffix(".descriptor") {
        Some(a) => (a.to_owned(), true),
        None => (name.clone(), false),
    };
    let Some((from, to)) = manifest::parse_artifact_name(&artifact) else {
        return error(StatusCode::NOT_FOUND, format!("no artifact {name:?}"));
    };
    let path: PathBuf = if descriptor {
        s.store.descriptor_path(&artifact)
    } else {
        s.store.artifact_path(&artifact)
    };
    if s.store.is_built(&artifact) {
        s.store.touch(&artifact);
        let mut resp = match tower_http::services::ServeFile::new(&path)
            .oneshot(req)
            .await
        {
            Ok(r) => r.map(Body::new),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        if resp.status().is_success() {
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
        }
        return resp;
    }
    // Not built: check it can be built, then build it once in the background.
    match s.store.can_build(from.as_ref(), &to, s.source.as_ref()) {
        Ok(true) => {}
        Ok(false) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("{artifact}: unknown versions"),
            )
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
    let previous = {
        let mut builds = s.builds.lock().expect("builds lock");
        let previous = builds.get(&artifact).cloned();
        if !matches!(previous, Some(Build::Running)) {
            builds.insert(artifact.clone(), Build::Running);
        }
        previous
    };
    if !matches!(previous, Some(Build::Running)) {
        spawn_build(s.clone(), artifact.clone(), from, to);
    }
    if let Some(Build::Failed(msg)) = previous {
        tracing::warn!("{artifact}: previous build failed ({msg}); retrying");
    }
    let mut resp = error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{artifact} is being built; come back later"),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(s.tuning.retry_after));
    resp
}

fn spawn_build(s: Arc<Server>, artifact: String, from: Option<Version>, to: Version) {
    tokio::task::spawn_blocking(move || {
        let result = build::build(&s.store, s.source.as_ref(), &s.key, from.as_ref(), &to)
            .and_then(|_| s.store.evict(s.tuning.cache_cap, &artifact));
        let mut builds = s.builds.lock().expect("builds lock");
        match result {
            Ok(()) => {
                builds.remove(&artifact);
            }
            Err(e) => {
                tracing::error!("building {artifact}: {e:#}");
                builds.insert(artifact, Build::Failed(format!("{e:#}")));
            }
        }
    });
}
