//! Keeping the TUF repository (`server::tuf_repo`) in step with the server, with the online
//! keys only: each channel's rollout document from releases.json and the wave rollouts (the
//! automatic pause included), each built artifact and its descriptor, online roles and a
//! timestamp that never get near their expiry. Runs at start, every `serve
//! --repo-sync-seconds` and after each build, one at a time. Its routes serve the metadata
//! and the rollout documents.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result};
use axum::http::{header, HeaderValue, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use tower_http::services::ServeDir;

use crate::core::hashing::sha256_file;
use crate::core::manifest::{Blob, CHANNELS};
use crate::core::tuf;
use crate::fleet::control;
use crate::fleet::store::Db;
use crate::server::artifacts::Store;
use crate::server::tuf_repo;

/// A timestamp with less than this left is signed again (it lives a day).
const REFRESH_BEFORE: i64 = 12 * 3600;
/// An online role (rollout, artifacts; they live 7 days) with less than this left is signed
/// again even if nothing changed.
const RENEW_BEFORE: i64 = 3 * 86400;

/// The repository the server publishes, and its online keys.
pub struct Repo {
    pub dir: PathBuf,
    pub keys: PathBuf,
    /// One writer at a time (builds finish on other threads).
    lock: Mutex<()>,
}

impl Repo {
    pub fn new(dir: PathBuf, keys: PathBuf) -> Repo {
        Repo {
            dir,
            keys,
            lock: Mutex::new(()),
        }
    }

    /// Publishes each channel's rollout document where it changed, renews the online roles
    /// that expire within `RENEW_BEFORE`, then a new snapshot and timestamp if a role has a
    /// newer verified version (a release the release manager signed offline and copied in),
    /// the timestamp expires within `REFRESH_BEFORE` or a rotation made it stale.
    pub fn sync(&self, store: &Store, fleet: Option<&Mutex<Db>>, now: u64) -> Result<()> {
        let _one = self
            .lock
            .lock()
            .map_err(|_| anyhow::anyhow!("repo lock poisoned"))?;
        let releases = store.releases()?;
        let mut changed = Vec::new();
        for channel in CHANNELS {
            let on_channel: Vec<_> = (releases.iter())
                .filter(|r| r.channel == channel)
                .map(|r| r.release.clone())
                .collect();
            let doc = match fleet {
                Some(db) => {
                    let db = db
                        .lock()
                        .map_err(|_| anyhow::anyhow!("fleet lock poisoned"))?;
                    control::rollout_doc(Some(&db), &on_channel, now)?
                }
                None => control::rollout_doc(None, &on_channel, now)?,
            };
            let path = self.dir.join(tuf::rollout_target(channel));
            if std::fs::read(&path).ok() != Some(serde_json::to_vec(&doc)?) {
                changed.push((channel, doc));
            }
        }
        if !changed.is_empty() {
            tuf_repo::set_rollouts(&self.dir, &self.keys, &changed)
                .context("publishing the rollout documents")?;
        }
        tuf_repo::renew_online_roles(&self.dir, &self.keys, RENEW_BEFORE)?;
        // One new snapshot and timestamp for all of the above (new role versions), if any.
        tuf_repo::refresh_if_needed(&self.dir, &self.keys, REFRESH_BEFORE)?;
        Ok(())
    }

    /// Lists a freshly built artifact and its descriptor in the online artifacts role.
    pub fn artifact_built(&self, store: &Store, artifact: &str) -> Result<()> {
        let _one = self
            .lock
            .lock()
            .map_err(|_| anyhow::anyhow!("repo lock poisoned"))?;
        let mut listed = Vec::new();
        for (name, path) in [
            (artifact.to_owned(), store.artifact_path(artifact)),
            (
                format!("{artifact}.descriptor"),
                store.descriptor_path(artifact),
            ),
        ] {
            let blob = Blob {
                size: std::fs::metadata(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .len(),
                sha256: sha256_file(&path)?,
            };
            listed.push((name, blob));
        }
        tuf_repo::add_artifacts(&self.dir, &self.keys, &listed)?;
        tuf_repo::refresh(&self.dir, &self.keys)
    }
}

/// `/v1/metadata/` and `/v1/rollout/` from the repository directory. Versioned metadata and
/// targets under their digest never change (cached for a year); `timestamp.json`, `root.json`
/// and the plain rollout documents are revalidated on every use.
pub fn router(repo: &Repo) -> Router {
    Router::new()
        .nest_service("/v1/metadata", ServeDir::new(repo.dir.join("metadata")))
        .nest_service("/v1/rollout", ServeDir::new(repo.dir.join("rollout")))
        .layer(middleware::from_fn(cache_control))
}

async fn cache_control(req: Request<axum::body::Body>, next: Next) -> Response {
    let file = req.uri().path().rsplit('/').next().unwrap_or("").to_owned();
    let mut resp = next.run(req).await;
    let versioned = (file.split_once('.'))
        .is_some_and(|(head, _)| !head.is_empty() && head.bytes().all(|b| b.is_ascii_hexdigit()));
    let value = if versioned && resp.status().is_success() {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static(value));
    resp
}
