//! The server's steps, with online keys: rollout documents, built artifacts, and the snapshot
//! and timestamp that publish every role's newest verified version.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tough::schema::decoded::Decoded;
use tough::schema::{Hashes, KeyHolder, Metafile, Signed, Snapshot, Targets, Timestamp};
use tough::TargetName;

use super::keys::role_keys;
use super::{
    current_targets, expiry, metadata_dir, newest_roles, nz, read, role_file, root, sign_and_write,
    target, update_role, ONLINE_DAYS, SPEC_VERSION, TIMESTAMP_DAYS,
};
use crate::core::hashing::sha256_hex;
use crate::core::manifest::Blob;
use crate::core::tuf::{self, RolloutDoc};
use crate::core::tuf::{ARTIFACTS_ROLE, ROLLOUT_ROLE};
use crate::sys::fsutil;

/// Writes a data target under its plain and its consistent-snapshot name; its blob.
pub(super) fn write_target(repo: &Path, name: &str, data: &[u8]) -> Result<Blob> {
    let sha256 = sha256_hex(data);
    let dir = repo;
    let plain = dir.join(name);
    let (parent, base) = name.rsplit_once('/').unwrap_or(("", name));
    fsutil::atomic_write(
        &dir.join(parent).join(format!("{sha256}.{base}")),
        data,
        0o644,
    )?;
    fsutil::atomic_write(&plain, data, 0o644)?;
    Ok(Blob {
        size: data.len() as u64,
        sha256,
    })
}

/// Writes each channel's rollout document of `docs` and lists them in one new version of the
/// online rollout role. Publishing them is `refresh`'s part (`refresh_if_needed` sees the new
/// version), so a caller changing several things refreshes once.
pub fn set_rollouts(repo: &Path, keys: &Path, docs: &[(&str, RolloutDoc)]) -> Result<()> {
    let mut listed = Vec::new();
    for (channel, doc) in docs {
        let name = tuf::rollout_target(channel);
        let blob = write_target(repo, &name, &serde_json::to_vec(doc)?)?;
        listed.push((TargetName::new(name)?, target(&blob)?));
    }
    update_role(repo, keys, ROLLOUT_ROLE, ONLINE_DAYS, |role| {
        role.targets.extend(listed);
        Ok(())
    })?;
    Ok(())
}

/// Signs the online delegated roles (rollout, artifacts) again, unchanged, when they expire
/// within `min_left` seconds: nothing else re-signs a role whose content stays the same, and
/// an expired role stops every box. Whether it did; the caller refreshes.
pub fn renew_online_roles(repo: &Path, keys: &Path, min_left: i64) -> Result<bool> {
    let mut renewed = false;
    for role in [ROLLOUT_ROLE, ARTIFACTS_ROLE] {
        let left = current_targets(repo, role)?.signed.expires.as_second()
            - jiff::Timestamp::now().as_second();
        if left < min_left {
            update_role(repo, keys, role, ONLINE_DAYS, |_| Ok(()))?;
            renewed = true;
        }
    }
    Ok(renewed)
}

/// Lists built artifacts (an artifact and its descriptor) in one new version of the online
/// artifacts role; the caller refreshes.
pub fn add_artifacts(repo: &Path, keys: &Path, artifacts: &[(String, Blob)]) -> Result<()> {
    let listed = (artifacts.iter())
        .map(|(name, blob)| Ok((TargetName::new(tuf::artifact_target(name))?, target(blob)?)))
        .collect::<Result<Vec<_>>>()?;
    update_role(repo, keys, ARTIFACTS_ROLE, ONLINE_DAYS, |role| {
        role.targets.extend(listed);
        Ok(())
    })?;
    Ok(())
}

/// A new snapshot of the newest version of every role that verifies (targets against root,
/// delegated roles against targets' delegations; a role file that does not verify is left
/// out and its last good version kept), then a new timestamp naming it. The server runs this
/// on every change and well before the timestamp expires.
pub fn refresh(repo: &Path, keys: &Path) -> Result<()> {
    refresh_unless_fresh(repo, keys, None).map(|_| ())
}

/// `refresh`, but only if a role has a newer verified version than the current snapshot
/// publishes, the timestamp expires within `min_left` seconds (never with `None`), or root no
/// longer names the keys that signed the snapshot or timestamp (a rotation); whether it
/// refreshed. A role file that never verifies thus costs nothing after its first refusal.
pub fn refresh_if_needed(repo: &Path, keys: &Path, min_left: i64) -> Result<bool> {
    refresh_unless_fresh(repo, keys, Some(min_left))
}

fn refresh_unless_fresh(repo: &Path, keys: &Path, min_left: Option<i64>) -> Result<bool> {
    let root = root(repo)?.signed;
    let newest = newest_roles(repo)?;
    let previous: Option<Signed<Snapshot>> = read_timestamp(repo).ok().and_then(|ts| {
        let v = ts.signed.meta.get("snapshot.json")?.version.get();
        read(&metadata_dir(repo).join(format!("{v}.snapshot.json"))).ok()
    });
    let mut meta = HashMap::new();
    let top = verified_version(
        repo,
        "targets",
        newest.get("targets").copied(),
        |t| {
            root.verify_role(&t.clone().delegated_targets("targets").targets().1)
                .map_err(anyhow::Error::from)
        },
        previous.as_ref(),
    )?;
    meta.insert("targets.json".to_owned(), metafile(top.0)?);
    let delegations = top.1.signed.delegations.clone().unwrap_or_default();
    for role in &delegations.roles {
        let v = verified_version(
            repo,
            &role.name,
            newest.get(&role.name).copied(),
            |t| {
                delegations
                    .verify_role(t, &role.name)
                    .map_err(anyhow::Error::from)
            },
            previous.as_ref(),
        )?;
        meta.insert(format!("{}.json", role.name), metafile(v.0)?);
    }
    if let (Some(min_left), Some(prev), Ok(ts)) = (min_left, &previous, read_timestamp(repo)) {
        let left = ts.signed.expires.as_second() - jiff::Timestamp::now().as_second();
        let same = prev.signed.meta.len() == meta.len()
            && (meta.iter())
                .all(|(k, m)| prev.signed.meta.get(k).map(|p| p.version) == Some(m.version));
        // Signed by keys the current root still names (a rotation makes them stale).
        let valid = root.verify_role(&ts).is_ok() && root.verify_role(prev).is_ok();
        if same && valid && left >= min_left {
            return Ok(false);
        }
    }
    let version = previous.as_ref().map_or(1, |s| s.signed.version.get() + 1);
    let mut snapshot = Snapshot::new(SPEC_VERSION.into(), nz(version)?, expiry(ONLINE_DAYS)?);
    snapshot.meta = meta;
    let holder = KeyHolder::Root(root.clone());
    let signed = sign_and_write(
        repo,
        &format!("{version}.snapshot.json"),
        snapshot,
        &holder,
        &role_keys(keys, "snapshot")?,
    )?;
    let ts_version = read_timestamp(repo).map_or(1, |t| t.signed.version.get() + 1);
    let mut ts = Timestamp::new(
        SPEC_VERSION.into(),
        nz(ts_version)?,
        expiry(TIMESTAMP_DAYS)?,
    );
    ts.meta.insert(
        "snapshot.json".into(),
        Metafile {
            length: Some(*signed.length()),
            hashes: Some(Hashes {
                sha256: Decoded::from(signed.sha256().to_vec()),
                _extra: HashMap::new(),
            }),
            version: nz(version)?,
            _extra: HashMap::new(),
        },
    );
    sign_and_write(
        repo,
        "timestamp.json",
        ts,
        &holder,
        &role_keys(keys, "timestamp")?,
    )?;
    Ok(true)
}

pub(super) fn read_timestamp(repo: &Path) -> Result<Signed<Timestamp>> {
    read(&metadata_dir(repo).join("timestamp.json"))
}

pub(super) fn metafile(version: u64) -> Result<Metafile> {
    Ok(Metafile {
        length: None,
        hashes: None,
        version: nz(version)?,
        _extra: HashMap::new(),
    })
}

/// The newest version of `role` whose file verifies, walking down from `newest` to the
/// version the previous snapshot published (never below it: that would be a rollback).
pub(super) fn verified_version(
    repo: &Path,
    role: &str,
    newest: Option<u64>,
    verify: impl Fn(&Signed<Targets>) -> Result<()>,
    previous: Option<&Signed<Snapshot>>,
) -> Result<(u64, Signed<Targets>)> {
    let floor = previous
        .and_then(|s| s.signed.meta.get(&format!("{role}.json")))
        .map_or(1, |m| m.version.get());
    let newest = newest.with_context(|| format!("the repository has no {role} role"))?;
    let mut errors = Vec::new();
    for v in (floor..=newest).rev() {
        match read::<Targets>(&role_file(repo, role, v)).and_then(|t| verify(&t).map(|_| t)) {
            Ok(t) if t.signed.version.get() == v => return Ok((v, t)),
            Ok(_) => errors.push(format!("{v}.{role}.json: its version is not {v}")),
            Err(e) => errors.push(format!("{v}.{role}.json: {e:#}")),
        }
    }
    bail!("no version of {role} verifies: {}", errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::tuf_repo::{init, InitOptions, DAY};
    use tough::schema::RoleType;

    #[test]
    fn online_roles_are_renewed_before_they_expire_and_only_then() {
        let d = tempfile::tempdir().unwrap();
        let (repo, keys) = (d.path().join("repo"), d.path().join("keys"));
        let o = InitOptions {
            root_keys: 1,
            root_threshold: 1,
        };
        init(&repo, &keys, &o).unwrap();
        let version = |role| current_targets(&repo, role).unwrap().signed.version.get();
        assert!(
            !renew_online_roles(&repo, &keys, DAY).unwrap(),
            "7 days left"
        );
        assert_eq!((version(ROLLOUT_ROLE), version(ARTIFACTS_ROLE)), (1, 1));
        assert!(renew_online_roles(&repo, &keys, 8 * DAY).unwrap());
        assert_eq!((version(ROLLOUT_ROLE), version(ARTIFACTS_ROLE)), (2, 2));
        assert!(
            refresh_if_needed(&repo, &keys, 0).unwrap(),
            "the new versions are published"
        );
        assert!(
            !refresh_if_needed(&repo, &keys, 0).unwrap(),
            "nothing new, timestamp fresh"
        );
        // The timestamp key rotates: what the old key signed is stale at once.
        crate::server::tuf_repo::rotate_root(&repo, &keys, &[RoleType::Timestamp], 1, 0).unwrap();
        assert!(
            refresh_if_needed(&repo, &keys, 0).unwrap(),
            "signed by a revoked key"
        );
        assert!(!refresh_if_needed(&repo, &keys, 0).unwrap());
    }
}
