//! Writing the TUF repository (layout: `core::tuf`) with tough's metadata types: the release
//! manager's offline steps (create it, sign a release on a channel, rotate root) and the
//! server's online ones (rollout documents, built artifacts, snapshot and timestamp).
//!
//! A repository directory is served at `/v1/`: `metadata/` and the data targets (`rollout/`,
//! `artifacts/`), each target under its plain and its consistent-snapshot name
//! `dir/<sha256>.<name>`. Roles are versioned files (`N.stable.json`); `refresh` publishes
//! the newest verified version of every role in a new snapshot, then a new timestamp: every
//! file is written atomically and durably, the timestamp last, so a box fetching at any
//! instant sees the old repository or the new one.
//!
//! Keys are PKCS#8 ed25519 files named `<role>.<n>.pk8` in a keys directory: `root.1.pk8` ...,
//! `targets.1.pk8`, one per channel, and the online ones (`snapshot`, `timestamp`, `rollout`,
//! `artifacts`) that the server holds. Each step reads only the keys of the roles it signs.

mod keys;
mod offline;
mod online;

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tough::editor::signed::SignedRole;
use tough::key_source::KeySource;
use tough::schema::decoded::Decoded;
use tough::schema::{
    DelegatedTargets, Delegations, Hashes, KeyHolder, Root, Signed, Target, Targets,
};

use keys::role_keys;

use crate::core::manifest::Blob;
use crate::core::tuf::{ARTIFACTS_ROLE, ROLLOUT_ROLE};
use crate::sys::fsutil;

pub use offline::{init, release, rotate_delegation, rotate_root};
pub use online::{add_artifacts, refresh, refresh_if_needed, renew_online_roles, set_rollouts};

pub(super) const SPEC_VERSION: &str = "1.0.0";
pub(super) const DAY: i64 = 86400;
/// How long each role's metadata is valid: offline roles long, online ones short (the server
/// refreshes them; a server that stops refreshing freezes no box for longer than this).
pub(super) const ROOT_DAYS: i64 = 365;
pub(super) const OFFLINE_DAYS: i64 = 365;
pub(super) const ONLINE_DAYS: i64 = 7;
pub(super) const TIMESTAMP_DAYS: i64 = 1;

/// The roles whose keys the server holds.
pub const ONLINE_ROLES: [&str; 4] = ["snapshot", "timestamp", ROLLOUT_ROLE, ARTIFACTS_ROLE];

/// How `init` sets up root.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub root_keys: usize,
    pub root_threshold: u64,
}

pub(super) fn metadata_dir(repo: &Path) -> PathBuf {
    repo.join("metadata")
}

/// `days` from now, in whole seconds: the specification's `YYYY-MM-DDTHH:MM:SSZ` has no
/// fraction, and python-tuf refuses metadata with one (tough writes one when it is there).
pub(super) fn expiry(days: i64) -> Result<jiff::Timestamp> {
    Ok(jiff::Timestamp::from_second(
        jiff::Timestamp::now().as_second() + days * DAY,
    )?)
}

pub(super) fn nz(n: u64) -> Result<NonZeroU64> {
    NonZeroU64::new(n).context("a version or threshold of 0")
}

pub(super) fn block<T>(f: impl std::future::Future<Output = T>) -> Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

pub(super) fn read<T: DeserializeOwned>(path: &Path) -> Result<Signed<T>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Signs `role` with the `keys` its holder names for it, and writes it as `name`.
pub(super) fn sign_and_write<T: tough::schema::Role + Serialize>(
    repo: &Path,
    name: &str,
    role: T,
    holder: &KeyHolder,
    keys: &[Box<dyn KeySource>],
) -> Result<SignedRole<T>> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let signed = block(SignedRole::new(role, holder, keys, &rng))?
        .map_err(|e| anyhow::anyhow!("signing {name}: {e}"))?;
    fsutil::atomic_write(&metadata_dir(repo).join(name), signed.buffer(), 0o644)?;
    Ok(signed)
}

pub(super) fn root(repo: &Path) -> Result<Signed<Root>> {
    read(&metadata_dir(repo).join("root.json"))
}

/// The newest version of each role file (`N.<role>.json`) in the metadata directory.
pub(super) fn newest_roles(repo: &Path) -> Result<HashMap<String, u64>> {
    let dir = metadata_dir(repo);
    let mut newest: HashMap<String, u64> = HashMap::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        let Some((n, rest)) = name.split_once('.') else {
            continue;
        };
        let (Ok(n), Some(role)) = (n.parse::<u64>(), rest.strip_suffix(".json")) else {
            continue;
        };
        if matches!(role, "root" | "snapshot" | "timestamp") {
            continue;
        }
        let v = newest.entry(role.to_owned()).or_default();
        *v = (*v).max(n);
    }
    Ok(newest)
}

pub(super) fn role_file(repo: &Path, role: &str, version: u64) -> PathBuf {
    metadata_dir(repo).join(format!("{version}.{role}.json"))
}

/// The newest signed version of a targets role.
pub(super) fn current_targets(repo: &Path, role: &str) -> Result<Signed<Targets>> {
    let v = *newest_roles(repo)?
        .get(role)
        .with_context(|| format!("the repository has no {role} role"))?;
    read(&role_file(repo, role, v))
}

pub(super) fn top_delegations(repo: &Path) -> Result<Delegations> {
    current_targets(repo, "targets")?
        .signed
        .delegations
        .context("the targets role delegates nothing")
}

/// Adds (or replaces) `target` in delegated role `role`, signs the next version with `role`'s
/// key from `keys`, and writes it. Publishing it is `refresh`'s (the server's) part.
pub(super) fn update_role(
    repo: &Path,
    keys: &Path,
    role: &str,
    days: i64,
    edit: impl FnOnce(&mut Targets) -> Result<()>,
) -> Result<u64> {
    let delegations = top_delegations(repo)?;
    let mut t = current_targets(repo, role)?.signed;
    edit(&mut t)?;
    let version = t.version.get() + 1;
    t.version = nz(version)?;
    t.expires = expiry(days)?;
    let t = DelegatedTargets {
        name: role.to_owned(),
        targets: t,
    };
    let holder = KeyHolder::Delegations(delegations);
    let name = format!("{version}.{role}.json");
    sign_and_write(repo, &name, t, &holder, &role_keys(keys, role)?)?;
    Ok(version)
}

pub(super) fn target(blob: &Blob) -> Result<Target> {
    Ok(Target {
        length: blob.size,
        hashes: Hashes {
            sha256: Decoded::from(hex::decode(&blob.sha256)?),
            _extra: HashMap::new(),
        },
        custom: HashMap::new(),
        _extra: HashMap::new(),
    })
}
