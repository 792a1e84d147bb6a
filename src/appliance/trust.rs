//! What the box trusts: the TUF repository of its server, verified with `tough` from the root
//! the image ships (`trust.root`) or the newer one the box already followed. The metadata it
//! last accepted lives on the host partition (`var/lib/upgradectl/tuf/`), so rollback and freeze
//! protection survive image switches. Release, rollout and artifact names: `core::tuf`.
//!
//! `tough` writes its datastore in place, without fsync. The box gives it a copy to work in and
//! moves the files tough reads back (timestamp, snapshot, root, the latest known time) into the
//! persistent directory one atomic write each, only after a load that verified everything: a
//! kill or power cut at any instant leaves the old or the new trusted state, never a torn one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use tough::{
    Repository, RepositoryLoader, TargetName, Transport, TransportError, TransportErrorKind,
    TransportStream,
};
use url::Url;

use crate::appliance::config::Config;
use crate::appliance::paths::{under, Layout};
use crate::appliance::prepare::fetch;
use crate::core::hashing;
use crate::core::manifest::{Blob, Manifest, Release};
use crate::core::tuf::{self, RolloutDoc};
use crate::error::{refused, Error};
use crate::sys::fsutil;

/// The datastore files tough reads back on the next load; nothing else of it is kept.
const KEPT: [&str; 4] = [
    "root.json",
    "timestamp.json",
    "snapshot.json",
    "latest_known_time.json",
];

/// Largest root, timestamp and snapshot documents accepted, and most root versions walked in
/// one load (endless data, endless rotations).
const LIMITS: tough::Limits = tough::Limits {
    max_root_size: 512 << 10,
    max_targets_size: 16 << 20,
    max_timestamp_size: 64 << 10,
    max_snapshot_size: 4 << 20,
    max_root_updates: 256,
};

/// The repository's metadata as the box verified it just now.
pub struct Trusted {
    rt: tokio::runtime::Runtime,
    repo: Repository,
    transport: HttpTransport,
    targets_url: Url,
    /// tough's datastore for this load: target reads write the time they sampled into it.
    _work: tempfile::TempDir,
}

/// Where the repository of `server` publishes metadata and targets.
pub fn urls(server: &str) -> Result<(Url, Url)> {
    let base = server.trim_end_matches('/');
    let parse = |s: String| Url::parse(&s).map_err(|e| refused(format!("server {s:?}: {e}")));
    Ok((
        parse(format!("{base}/v1/metadata/"))?,
        parse(format!("{base}/v1/"))?,
    ))
}

impl Trusted {
    /// Fetches and verifies the repository's metadata (TUF's whole client workflow: root
    /// rotations, timestamp, snapshot, targets and every delegation), starting from the root
    /// the box trusts, and persists what it accepted. Verification failures are refused input
    /// (exit 2); a server that cannot be reached is a plain failure.
    pub fn load(layout: &Layout, config: &Config, server: &str) -> Result<Trusted> {
        let (metadata, targets) = urls(server)?;
        let dir = tuf_dir(layout);
        let root = trusted_root(layout, config, &dir)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        remove_stale_work_dirs(&dir);
        let work = tempfile::Builder::new()
            .prefix(".load-")
            .tempdir_in(&dir)
            .context("creating the metadata work directory")?;
        for f in KEPT {
            match std::fs::copy(dir.join(f), work.path().join(f)) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {f} in {dir:?}")),
            }
        }
        let transport = HttpTransport::new()?;
        let targets_url = targets.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the metadata runtime")?;
        let repo = rt
            .block_on(
                RepositoryLoader::new(&root, metadata, targets.clone())
                    .transport(transport.clone())
                    .limits(LIMITS)
                    .datastore(work.path())
                    .load(),
            )
            .map_err(classify)?;
        for f in KEPT {
            if let Ok(bytes) = std::fs::read(work.path().join(f)) {
                fsutil::atomic_write(&dir.join(f), &bytes, 0o644)?;
            }
        }
        Ok(Trusted {
            rt,
            repo,
            transport,
            targets_url,
            _work: work,
        })
    }

    /// The releases of `channel` a box of `group` is offered, as the pure planner takes them:
    /// each release target the channel's (offline) role signed, with the percentage and pause
    /// the (online) rollout role says for this group.
    pub fn manifest(&self, channel: &str, group: Option<&str>, now: u64) -> Result<Manifest> {
        let rollout = match self.read(&tuf::rollout_target(channel), tuf::MAX_ROLLOUT_BYTES)? {
            Some(bytes) => RolloutDoc::parse(&bytes)?,
            None => RolloutDoc::default(),
        };
        let mut releases = Vec::new();
        for (name, target) in self.repo.all_targets() {
            let Some(version) = tuf::parse_release_target(channel, name.raw()) else {
                continue;
            };
            let (rollout, paused) = rollout.for_box(&version, group);
            releases.push(Release {
                image: blob(name.raw(), target)?,
                version,
                rollout,
                paused,
            });
        }
        releases.sort_by(|a, b| a.version.cmp(&b.version));
        let expires = self.repo.timestamp().signed.expires.as_second().max(0) as u64;
        let m = Manifest {
            channel: channel.to_owned(),
            issued: now.min(expires.saturating_sub(1)),
            expires,
            releases,
        };
        m.validate(now)?;
        Ok(m)
    }

    /// Size and sha256 of a built artifact (or its descriptor), if the online artifacts role
    /// lists it.
    pub fn artifact(&self, name: &str) -> Result<Option<Blob>> {
        let target = tuf::artifact_target(name);
        let Ok(t) = TargetName::new(target.as_str()) else {
            return Err(refused(format!("artifact name {name:?}")));
        };
        match self.repo.targets().signed.find_target(&t, false) {
            Ok(found) => blob(&target, found).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// A target's bytes, verified against its signed length and sha256, if the repository
    /// lists it and it is at most `max` bytes. Fetched at TUF's consistent-snapshot name
    /// (`dir/<sha256>.<name>`); tough's own `read_target` puts the digest before the directory,
    /// which no other implementation writes.
    pub fn read(&self, target: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let name = TargetName::new(target).map_err(|e| refused(format!("{target:?}: {e}")))?;
        let Ok(t) = self.repo.targets().signed.find_target(&name, false) else {
            return Ok(None);
        };
        let want = blob(target, t)?;
        if want.size > max {
            return Err(refused(format!(
                "{target}: {} bytes, at most {max} accepted",
                want.size
            )));
        }
        let path = if self.repo.root().signed.consistent_snapshot {
            match target.rsplit_once('/') {
                Some((dir, base)) => format!("{dir}/{}.{base}", want.sha256),
                None => format!("{}.{target}", want.sha256),
            }
        } else {
            target.to_owned()
        };
        let url = (self.targets_url.join(&path))
            .map_err(|e| refused(format!("target {target:?}: {e}")))?;
        let bytes = self.rt.block_on(async {
            let mut stream = self.transport.fetch(url.clone()).await?;
            let mut body = Vec::new();
            while let Some(chunk) = stream.next().await {
                body.extend_from_slice(&chunk?);
                if body.len() as u64 > want.size {
                    break;
                }
            }
            Ok::<_, TransportError>(body)
        });
        let bytes = bytes.map_err(|e| anyhow::anyhow!("fetching {target}: {}", error_chain(&e)))?;
        let got = hashing::sha256_hex(&bytes);
        if bytes.len() as u64 != want.size || got != want.sha256 {
            return Err(Error::SignatureInvalid(format!(
                "{target}: {} bytes with sha256 {got} served, {} bytes with sha256 {} signed",
                bytes.len(),
                want.size,
                want.sha256
            ))
            .into());
        }
        Ok(Some(bytes))
    }

    /// The root the box trusts now (after any rotation it followed), its version.
    pub fn root_version(&self) -> u64 {
        self.repo.root().signed.version.get()
    }
}

/// The directory holding the metadata the box last accepted.
pub fn tuf_dir(layout: &Layout) -> PathBuf {
    layout.state_dir().join("tuf")
}

/// Work directories a killed load left behind (an hour old: no load takes that long).
fn remove_stale_work_dirs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let stale = (e.metadata().and_then(|m| m.modified()).ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if stale && e.file_name().to_string_lossy().starts_with(".load-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The root to start from: the one the box followed last, else the one its image ships.
fn trusted_root(layout: &Layout, config: &Config, dir: &Path) -> Result<Vec<u8>> {
    let followed = dir.join("root.json");
    match std::fs::read(&followed) {
        Ok(bytes) => return Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", followed.display())),
    }
    let shipped = config
        .trust
        .root
        .as_ref()
        .ok_or_else(|| refused("no trusted root is configured (trust.root)"))?;
    let path = under(layout.root(), shipped);
    std::fs::read(&path).with_context(|| format!("reading the trusted root {}", path.display()))
}

fn blob(name: &str, t: &tough::schema::Target) -> Result<Blob> {
    let b = Blob {
        size: t.length,
        sha256: hex::encode(&*t.hashes.sha256),
    };
    b.validate(name)?;
    Ok(b)
}

/// A tough error as the box reports it: a server that says "come back later" (503 or 429,
/// Retry-After clamped as for artifacts) is that (exit 4); one out of reach or answering
/// another error is a failure (exit 1); anything it served that does not verify or exceeds a
/// limit is refused (exit 2), whatever the reason.
fn classify(e: tough::error::Error) -> anyhow::Error {
    let mut unreachable = false;
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = src {
        if let Some(HttpStatus(_, Some(secs))) = s.downcast_ref::<HttpStatus>() {
            return Error::ComeBackLater {
                what: "the repository's metadata".into(),
                retry_after: Duration::from_secs(*secs),
            }
            .into();
        }
        if s.is::<reqwest::Error>() || s.is::<HttpStatus>() {
            unreachable = true;
        }
        src = s.source();
    }
    let msg = error_chain(&e);
    if unreachable {
        anyhow::anyhow!("fetching the repository's metadata: {msg}")
    } else {
        Error::SignatureInvalid(format!("the repository's metadata: {msg}")).into()
    }
}

/// A server's answer that is neither a success nor "not found", with the seconds it asks the
/// box to come back after (503 and 429 only).
#[derive(Debug, thiserror::Error)]
#[error("HTTP {0}")]
struct HttpStatus(reqwest::StatusCode, Option<u64>);

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// tough's transport over our HTTP client: 404 and 410 are "not found" (how TUF learns there
/// is no newer root), every other non-success answer an error; bodies are streamed, so tough's
/// size limits stop an endless one.
#[derive(Debug, Clone)]
struct HttpTransport {
    client: reqwest::Client,
}

impl HttpTransport {
    fn new() -> Result<HttpTransport> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("upgradectl/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("creating the HTTP client")?;
        Ok(HttpTransport { client })
    }
}

#[tough::async_trait]
impl Transport for HttpTransport {
    async fn fetch(&self, url: Url) -> std::result::Result<TransportStream, TransportError> {
        let other = |e: reqwest::Error| {
            TransportError::new_with_cause(TransportErrorKind::Other, url.as_str(), e)
        };
        let resp = self.client.get(url.clone()).send().await.map_err(other)?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Err(TransportError::new(
                TransportErrorKind::FileNotFound,
                url.as_str(),
            ));
        }
        if !status.is_success() {
            let later = matches!(
                status,
                reqwest::StatusCode::SERVICE_UNAVAILABLE | reqwest::StatusCode::TOO_MANY_REQUESTS
            );
            let retry = later.then(|| {
                let header = resp.headers().get(reqwest::header::RETRY_AFTER);
                fetch::retry_after_secs(header.and_then(|h| h.to_str().ok()))
            });
            return Err(TransportError::new_with_cause(
                TransportErrorKind::Other,
                url.as_str(),
                HttpStatus(status, retry),
            ));
        }
        let shown = url.to_string();
        let stream = futures::stream::unfold(Some(resp), move |resp| {
            let shown = shown.clone();
            async move {
                let mut resp = resp?;
                match resp.chunk().await {
                    Ok(Some(bytes)) => Some((Ok(bytes), Some(resp))),
                    Ok(None) => None,
                    Err(e) => Some((
                        Err(TransportError::new_with_cause(
                            TransportErrorKind::Other,
                            shown,
                            e,
                        )),
                        None,
                    )),
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

/// The trusted root a box of `layout` would start from, as a version, for `status`.
pub fn followed_root_version(layout: &Layout) -> Option<u64> {
    let bytes = std::fs::read(tuf_dir(layout).join("root.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["signed"]["version"].as_u64()
}
