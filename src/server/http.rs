//! The image server's HTTP side: immutable artifacts (full streams and diffs) with Range
//! support, diffs built on demand once, a size-capped artifact cache, and the TUF repository
//! that tells boxes what to fetch (`server::repo_sync`).
//!
//! Routes:
//! - `GET /v1/metadata/...`, `GET /v1/rollout/...`: the TUF repository's metadata and rollout
//!   documents (`server::repo_sync`); artifacts are its targets too, at `<sha256>.<name>`;
//! - `POST /v1/reports`: a box's signed report (`server::reports`), with the fleet database;
//! - `POST /v1/pre-reboot`, `POST /v1/steady-state`: the FleetLock reboot slots
//!   (`server::fleetlock`), with the fleet database;
//! - `GET /metrics`: Prometheus metrics (`server::metrics`);
//! - `GET /fleet` (and `/`, redirected): the operator's dashboard (`server::dashboard`), with
//!   the fleet database;
//! - `GET /v1/artifacts/{name}` (`full-V`, `A-to-B`): the artifact, immutable;
//! - `GET /v1/artifacts/{name}.descriptor`: its descriptor, immutable (the box trusts the copy
//!   the repository lists, not this answer);
//!   either answers `503` + `Retry-After` (never cached) while the artifact is being built or
//!   while a failed build backs off, and `404` for a diff nobody should build.
//!
//! Each artifact is built at most once at a time and never rebuilt while complete; builds wait
//! for one of `Tuning::max_builds` slots; blocking work (releases.json, the source) runs off
//! the async runtime. Connections are capped and closed when idle (`serve`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Router};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::artifacts::{Buildable, Store};
use super::build;
use super::builds::{next, next_backoff, Build, Next};
use super::dashboard;
use super::fleetlock;
use super::metrics::{self, Counters, Snapshot};
use super::repo_sync::{self, Repo};
use super::reports;
use super::respond::{blocking, error, internal, with_db};
use super::source::StreamSource;
use crate::core::manifest;
use crate::core::version::Version;
use crate::fleet::store::Db;
use crate::fleet::view;
use crate::sys::clock::now;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

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
    /// Reboot slots per group and their lease (FleetLock, with the fleet database).
    pub reboot_slots: crate::fleet::semaphore::Slots,
    /// zstd level of `zstd-ref` diffs (build time and memory: docs/protocol.md).
    pub zstd_ref_level: i32,
    /// Most bytes of stream per `zstd-ref` frame: what a box's decoder allocates, in memory or
    /// on disk.
    pub zstd_ref_frame: u64,
}

/// The default level of `zstd-ref` diffs: see the build figures in docs/protocol.md.
pub const DEFAULT_ZSTD_REF_LEVEL: i32 = 15;

/// The default frame of `zstd-ref` diffs, 1 GiB: a stream up to that length is one frame,
/// whose matches inside the stream are all kept (bench/diff-size's delta-friendly kernel update:
/// 41.9 MB as one frame, 50.5 MB in 64 MiB frames). A box decodes a frame longer than its
/// decoder memory on disk (`sys::refcodec::OnDisk`), so the frame bounds the disk it takes,
/// not its memory (docs/protocol.md).
pub const DEFAULT_ZSTD_REF_FRAME: u64 = 1 << 30;

impl Tuning {
    /// How this server compresses a diff against its base.
    pub fn zstd_ref(&self) -> build::ZstdRef {
        build::ZstdRef {
            level: self.zstd_ref_level,
            frame_len: self.zstd_ref_frame,
        }
    }
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
            reboot_slots: Default::default(),
            zstd_ref_level: DEFAULT_ZSTD_REF_LEVEL,
            zstd_ref_frame: DEFAULT_ZSTD_REF_FRAME,
        }
    }
}

/// The image server's state: the store, the stream source, the builds and the repository.
pub struct Server {
    /// Releases and built artifacts.
    pub store: Store,
    /// Where builds get send streams.
    pub source: Arc<dyn StreamSource>,
    /// The operator's settings.
    pub tuning: Tuning,
    builds: Mutex<HashMap<String, Build>>,
    build_slots: Arc<Semaphore>,
    /// The fleet database: reports and wave rollouts (none: no reports, manual rollouts).
    fleet: Option<Arc<Mutex<Db>>>,
    /// Responses and bytes served, for `/metrics`.
    counters: Arc<Counters>,
    /// The TUF repository (none only in tests of the artifact routes: boxes learn nothing
    /// without it).
    repo: Option<Arc<Repo>>,
}

impl Server {
    /// A server over `store`, building from `source`.
    pub fn new(store: Store, source: Arc<dyn StreamSource>, tuning: Tuning) -> Server {
        Server {
            store,
            source,
            build_slots: Arc::new(Semaphore::new(tuning.max_builds.max(1))),
            tuning,
            builds: Mutex::new(HashMap::new()),
            fleet: None,
            counters: Arc::default(),
            repo: None,
        }
    }

    /// This server publishing the TUF repository `repo` (its routes; built artifacts listed).
    pub fn with_repo(mut self, repo: Arc<Repo>) -> Server {
        self.repo = Some(repo);
        self
    }

    /// This server with the fleet database: it takes reports and steers wave rollouts.
    pub fn with_fleet(mut self, db: Db) -> Server {
        self.fleet = Some(Arc::new(Mutex::new(db)));
        self
    }

    /// How many builds were started (tests assert "once").
    pub fn builds_started(&self) -> usize {
        self.store.builds_started()
    }

    /// How many builds are running or waiting for a slot now.
    pub fn builds_in_progress(&self) -> usize {
        let builds = self.builds.lock().expect("builds lock");
        let running = |b: &&Build| matches!(b, Build::Running { .. });
        builds.values().filter(running).count()
    }

    /// What a request for the unbuilt `artifact` leads to now, without claiming it.
    fn peek(&self, artifact: &str) -> Next {
        let builds = self.builds.lock().expect("builds lock");
        next(
            builds.get(artifact),
            self.tuning.retry_after,
            Instant::now(),
        )
    }

    /// Claims `artifact`'s build if nobody runs it, it is not built and no failure backs off.
    /// The check and the claim hold one lock, and a build leaves the map only once published,
    /// so no request can slip a second build in between.
    fn claim(&self, artifact: &str) -> Next {
        let mut builds = self.builds.lock().expect("builds lock");
        if self.store.is_built(artifact) {
            return Next::Wait(self.tuning.retry_after);
        }
        let next = next(
            builds.get(artifact),
            self.tuning.retry_after,
            Instant::now(),
        );
        if let Next::Start { backoff } = next {
            builds.insert(artifact.to_owned(), Build::Running { backoff });
        }
        next
    }

    /// Records how `artifact`'s build ended: gone from the map, or failed and backing off.
    fn finish(&self, artifact: &str, result: Result<()>, backoff: Option<Duration>) {
        let mut builds = self.builds.lock().expect("builds lock");
        match result {
            Ok(()) => {
                builds.remove(artifact);
            }
            Err(e) => {
                let backoff =
                    next_backoff(backoff, self.tuning.build_backoff, self.tuning.max_backoff);
                tracing::error!(
                    "building {artifact}: {e:#}; not retried for {}s",
                    backoff.as_secs()
                );
                let retry_at = Instant::now() + backoff;
                builds.insert(artifact.to_owned(), Build::Failed { retry_at, backoff });
            }
        }
    }
}

/// The routes, over `server`.
pub fn router(server: Arc<Server>) -> Router {
    let (fleet, counters) = (server.fleet.clone(), server.counters.clone());
    let slots = server.tuning.reboot_slots.clone();
    let repo = server.repo.clone();
    let routes = Router::new()
        .route("/v1/artifacts/:name", get(get_artifact))
        .route("/metrics", get(get_metrics))
        .with_state(server);
    let routes = match fleet {
        Some(db) => routes
            .merge(reports::router(db.clone()))
            .merge(dashboard::router(db.clone()))
            .merge(fleetlock::router(db, slots)),
        None => routes,
    };
    let routes = match repo {
        Some(repo) => routes.merge(repo_sync::router(&repo)),
        None => routes,
    };
    routes.layer(middleware::from_fn_with_state(counters, metrics::count))
}

async fn get_metrics(State(s): State<Arc<Server>>) -> Response {
    let (responses, bytes) = s.counters.read();
    let mut snap = Snapshot {
        responses,
        bytes,
        builds_started: s.builds_started() as u64,
        builds_in_progress: s.builds_in_progress() as u64,
        ..Snapshot::default()
    };
    if let Some(db) = s.fleet.clone() {
        let fleet = with_db(db, |db| {
            Ok((db.report_totals()?, view::rollouts(db)?, db.reboot_slots()?))
        });
        match fleet.await {
            Ok((reports, rollouts, slots)) => {
                (snap.reports, snap.rollouts) = (Some(reports), rollouts);
                snap.reboot_slots = Some(metrics::held_slots(&slots, now()));
            }
            Err(e) => return internal("reading the fleet database for metrics", e),
        }
    }
    let ct = "text/plain; version=0.0.4";
    (
        [
            (header::CONTENT_TYPE, ct),
            (header::CACHE_CONTROL, "no-store"),
        ],
        metrics::render(&snap),
    )
        .into_response()
}

/// 503 + Retry-After: the artifact is being built, or its failed build backs off.
fn come_back_later(artifact: &str, secs: u64) -> Response {
    let mut resp = error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{artifact} is being built; come back later"),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    resp
}

async fn get_artifact(
    State(s): State<Arc<Server>>,
    UrlPath(name): UrlPath<String>,
    req: Request,
) -> Response {
    // The TUF repository lists artifacts as targets, fetched at their consistent-snapshot
    // name `<sha256>.<name>`: the same file (the box checks the digest).
    let name = match name.split_once('.') {
        Some((digest, rest)) if manifest::is_sha256_hex(digest) => rest.to_owned(),
        _ => name,
    };
    let (artifact, descriptor) = match name.strip_suffix(".descriptor") {
        Some(a) => (a.to_owned(), true),
        None => (name.clone(), false),
    };
    let Some((from, to)) = manifest::parse_artifact_name(&artifact) else {
        return error(StatusCode::NOT_FOUND, format!("no artifact {name:?}"));
    };
    if !s.store.is_built(&artifact) {
        return not_built(s, artifact, from, to).await;
    }
    let path: PathBuf = if descriptor {
        s.store.descriptor_path(&artifact)
    } else {
        s.store.artifact_path(&artifact)
    };
    s.store.touch(&artifact);
    let mut resp = match tower_http::services::ServeFile::new(&path)
        .oneshot(req)
        .await
    {
        Ok(r) => r.map(Body::new),
        Err(e) => return internal(&format!("serving {}", path.display()), e),
    };
    if resp.status().is_success() {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    }
    resp
}

/// An artifact that is not built: come back later (building it once, if it is worth it), or
/// 404 if it never will be.
async fn not_built(
    s: Arc<Server>,
    artifact: String,
    from: Option<Version>,
    to: Version,
) -> Response {
    if let Next::Wait(secs) = s.peek(&artifact) {
        return come_back_later(&artifact, secs);
    }
    let (s2, f2, t2) = (s.clone(), from.clone(), to.clone());
    let worth = blocking(move || {
        let window = s2.tuning.diff_window;
        s2.store
            .buildable(f2.as_ref(), &t2, window, s2.source.as_ref())
    });
    match worth.await {
        Ok(Buildable::Yes) => {}
        Ok(Buildable::Unknown) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("{artifact}: unknown versions"),
            )
        }
        Ok(Buildable::OutsideWindow) => {
            let msg = format!("{artifact}: base too old for a diff; take full-{to}");
            return error(StatusCode::NOT_FOUND, msg);
        }
        Ok(Buildable::NotSmaller) => {
            let msg = format!("{artifact}: no smaller than the full stream; take full-{to}");
            return error(StatusCode::NOT_FOUND, msg);
        }
        Err(e) => return internal(&format!("checking {artifact}"), e),
    }
    match s.claim(&artifact) {
        Next::Start { backoff } => spawn_build(s.clone(), artifact.clone(), from, to, backoff),
        Next::Wait(secs) => return come_back_later(&artifact, secs),
    }
    come_back_later(&artifact, s.tuning.retry_after)
}

/// Builds `artifact` in the background once a build slot is free, then evicts to the cap.
fn spawn_build(
    s: Arc<Server>,
    artifact: String,
    from: Option<Version>,
    to: Version,
    backoff: Option<Duration>,
) {
    tokio::spawn(async move {
        let _slot = s.build_slots.clone().acquire_owned().await;
        let s2 = s.clone();
        let result = blocking(move || {
            let zstd_ref = s2.tuning.zstd_ref();
            let built = build::build(&s2.store, s2.source.as_ref(), from.as_ref(), &to, zstd_ref)?;
            if let Some(name) = built {
                if let Err(e) = s2.store.evict(s2.tuning.cache_cap, &name) {
                    tracing::error!("evicting after {name}: {e:#}");
                }
                if let Some(repo) = &s2.repo {
                    // A box can still take the artifact by the manifest; it retries the listing.
                    if let Err(e) = repo.artifact_built(&s2.store, &name) {
                        tracing::error!("listing {name} in the TUF repository: {e:#}");
                    }
                }
            }
            Ok(())
        })
        .await;
        s.finish(&artifact, result, backoff);
    });
}
