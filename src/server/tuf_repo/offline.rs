//! The release manager's steps, with offline keys: create the repository, sign a release on a
//! channel, rotate root's keys, rotate a delegated role's key.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tough::editor::signed::SignedRole;
use tough::schema::{
    DelegatedRole, DelegatedTargets, Delegations, KeyHolder, PathPattern, PathSet, RoleKeys,
    RoleType, Root, Targets,
};
use tough::TargetName;

use super::keys::{generate, key_files, public_keys, revoke, role_keys};
use super::online::refresh;
use super::{
    block, current_targets, expiry, metadata_dir, nz, root, sign_and_write, target, update_role,
    InitOptions, OFFLINE_DAYS, ONLINE_DAYS, ONLINE_ROLES, ROOT_DAYS, SPEC_VERSION,
};
use crate::core::manifest::{Blob, CHANNELS};
use crate::core::tuf;
use crate::core::tuf::{ARTIFACTS_ROLE, ROLLOUT_ROLE};
use crate::core::version::Version;
use crate::sys::fsutil;

/// Creates a repository in `repo` and every key in `keys` (which must not hold any yet):
/// root (`o.root_keys`, threshold `o.root_threshold`), targets, one role per channel, and the
/// online roles; an empty release list on every channel.
pub fn init(repo: &Path, keys: &Path, o: &InitOptions) -> Result<()> {
    if o.root_threshold == 0 || o.root_threshold as usize > o.root_keys {
        bail!(
            "a root threshold of {} of {} keys cannot be met",
            o.root_threshold,
            o.root_keys
        );
    }
    if metadata_dir(repo).join("root.json").exists() {
        bail!("{} already holds a repository", repo.display());
    }
    let mut root = Root {
        spec_version: SPEC_VERSION.into(),
        consistent_snapshot: true,
        version: nz(1)?,
        expires: expiry(ROOT_DAYS)?,
        keys: HashMap::new(),
        roles: HashMap::new(),
        _extra: HashMap::new(),
    };
    for (role, kind, count, threshold) in [
        ("root", RoleType::Root, o.root_keys, o.root_threshold),
        ("targets", RoleType::Targets, 1, 1),
        ("snapshot", RoleType::Snapshot, 1, 1),
        ("timestamp", RoleType::Timestamp, 1, 1),
    ] {
        let files = generate(keys, role, count)?;
        let mut ids = Vec::new();
        for (id, key) in public_keys(&files)? {
            root.keys.insert(id.clone(), key);
            ids.push(id);
        }
        root.roles.insert(
            kind,
            RoleKeys {
                keyids: ids,
                threshold: nz(threshold)?,
                _extra: HashMap::new(),
            },
        );
    }
    std::fs::create_dir_all(metadata_dir(repo))?;
    let holder = KeyHolder::Root(root.clone());
    let signed = sign_and_write(
        repo,
        "1.root.json",
        root,
        &holder,
        &role_keys(keys, "root")?,
    )?;
    fsutil::atomic_write(
        &metadata_dir(repo).join("root.json"),
        signed.buffer(),
        0o644,
    )?;

    let mut delegations = Delegations::new();
    let delegated = (CHANNELS.iter().map(|c| (*c, tuf::channel_paths(c))))
        .chain([ROLLOUT_ROLE, ARTIFACTS_ROLE].map(|r| (r, format!("{r}/*"))));
    for (name, pattern) in delegated {
        let files = generate(keys, name, 1)?;
        let mut ids = Vec::new();
        for (id, key) in public_keys(&files)? {
            delegations.keys.insert(id.clone(), key);
            ids.push(id);
        }
        delegations.roles.push(DelegatedRole {
            name: name.to_owned(),
            keyids: ids,
            threshold: nz(1)?,
            paths: PathSet::Paths(vec![PathPattern::new(pattern)?]),
            terminating: true,
            targets: None,
        });
    }
    let mut top = Targets::new(SPEC_VERSION.into(), nz(1)?, expiry(OFFLINE_DAYS)?);
    top.delegations = Some(delegations.clone());
    let holder = KeyHolder::Root(signed.signed().signed.clone());
    let top = DelegatedTargets {
        name: "targets".into(),
        targets: top,
    };
    sign_and_write(
        repo,
        "1.targets.json",
        top,
        &holder,
        &role_keys(keys, "targets")?,
    )?;
    let holder = KeyHolder::Delegations(delegations);
    for role in holder_roles(&holder) {
        let days = if ONLINE_ROLES.contains(&role.as_str()) {
            ONLINE_DAYS
        } else {
            OFFLINE_DAYS
        };
        let mut t = Targets::new(SPEC_VERSION.into(), nz(1)?, expiry(days)?);
        t.delegations = None;
        let t = DelegatedTargets {
            name: role.clone(),
            targets: t,
        };
        sign_and_write(
            repo,
            &format!("1.{role}.json"),
            t,
            &holder,
            &role_keys(keys, &role)?,
        )?;
    }
    refresh(repo, keys)
}

pub(super) fn holder_roles(h: &KeyHolder) -> Vec<String> {
    match h {
        KeyHolder::Delegations(d) => d.roles.iter().map(|r| r.name.clone()).collect(),
        KeyHolder::Root(_) => Vec::new(),
    }
}

/// Signs release `version` of `channel` (the exported image's size and sha256) with the
/// channel's offline key. The server publishes it at its next `refresh`.
pub fn release(
    repo: &Path,
    keys: &Path,
    channel: &str,
    version: &Version,
    image: &Blob,
) -> Result<u64> {
    if !tuf::is_channel(channel) {
        bail!("unknown channel {channel:?}");
    }
    image.validate(&format!("release {version}"))?;
    let name = TargetName::new(tuf::release_target(channel, version))?;
    let t = target(image)?;
    update_role(repo, keys, channel, OFFLINE_DAYS, |role| {
        role.targets.insert(name, t);
        Ok(())
    })
}

/// A new root version: new keys (`count` of them for root, one for any other role) for each
/// of `rotate`, root's threshold `threshold`, signed by the current root's keys in `keys` and
/// by the new root keys. A role's old key files are moved to `keys/revoked/`.
pub fn rotate_root(
    repo: &Path,
    keys: &Path,
    rotate: &[RoleType],
    count: usize,
    threshold: u64,
) -> Result<u64> {
    let old = root(repo)?.signed;
    let old_keys = role_keys(keys, "root")?;
    let mut new = old.clone();
    new.version = nz(old.version.get() + 1)?;
    new.expires = expiry(ROOT_DAYS)?;
    let mut replaced = Vec::new();
    for kind in rotate {
        let role = kind.to_string();
        replaced.extend(key_files(keys, &role)?);
        let files = generate(keys, &role, if *kind == RoleType::Root { count } else { 1 })?;
        let entry = new
            .roles
            .get_mut(kind)
            .context("a role missing from root")?;
        for id in std::mem::take(&mut entry.keyids) {
            new.keys.remove(&id);
        }
        for (id, key) in public_keys(&files)? {
            new.keys.insert(id.clone(), key);
            entry.keyids.push(id);
        }
    }
    if rotate.contains(&RoleType::Root) || threshold > 0 {
        let entry = new.roles.get_mut(&RoleType::Root).context("no root role")?;
        if threshold > 0 {
            entry.threshold = nz(threshold)?;
        }
    }
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let by_old = block(SignedRole::new(
        new.clone(),
        &KeyHolder::Root(old),
        &old_keys,
        &rng,
    ))?
    .map_err(|e| anyhow::anyhow!("signing the new root with the old root's keys: {e}"))?;
    let by_new = block(SignedRole::new(
        new.clone(),
        &KeyHolder::Root(new.clone()),
        &role_keys(keys, "root")?,
        &rng,
    ))?
    .map_err(|e| anyhow::anyhow!("signing the new root with its own keys: {e}"))?;
    let both = by_new
        .add_old_signatures(by_old.signed().signatures.clone())
        .map_err(|e| anyhow::anyhow!("combining root signatures: {e}"))?;
    revoke(keys, &replaced)?;
    let v = new.version.get();
    let dir = metadata_dir(repo);
    fsutil::atomic_write(&dir.join(format!("{v}.root.json")), both.buffer(), 0o644)?;
    fsutil::atomic_write(&dir.join("root.json"), both.buffer(), 0o644)?;
    if rotate.contains(&RoleType::Targets) {
        let t = current_targets(repo, "targets")?.signed;
        let version = t.version.get() + 1;
        let mut t = t;
        t.version = nz(version)?;
        t.expires = expiry(OFFLINE_DAYS)?;
        let t = DelegatedTargets {
            name: "targets".into(),
            targets: t,
        };
        let holder = KeyHolder::Root(new);
        sign_and_write(
            repo,
            &format!("{version}.targets.json"),
            t,
            &holder,
            &role_keys(keys, "targets")?,
        )?;
    }
    Ok(v)
}

/// A new key for delegated role `role` (a channel, `rollout` or `artifacts`): the targets role
/// (offline key) delegates to it instead of the old one, and the role's own metadata is signed
/// again with it, its targets unchanged. The old key file moves to `keys/revoked/`: whatever it
/// signs from now on is refused by boxes. Returns the new targets version; the server publishes
/// both at its next refresh (for an online role, once it holds the new key).
pub fn rotate_delegation(repo: &Path, keys: &Path, role: &str) -> Result<u64> {
    let top = current_targets(repo, "targets")?.signed;
    let mut delegations = top
        .delegations
        .clone()
        .context("the targets role delegates nothing")?;
    let Some(at) = delegations.roles.iter().position(|r| r.name == role) else {
        bail!("{role:?} is not a delegated role (one of the channels, rollout, artifacts)");
    };
    let old_files = key_files(keys, role)?;
    if old_files.is_empty() {
        bail!(
            "no key of the {role} role in {}: rotating needs it in hand",
            keys.display()
        );
    }
    let new_files = generate(keys, role, 1)?;
    let old_ids = std::mem::take(&mut delegations.roles[at].keyids);
    for (id, key) in public_keys(&new_files)? {
        delegations.keys.insert(id.clone(), key);
        delegations.roles[at].keyids.push(id);
    }
    for id in old_ids {
        if !delegations.roles.iter().any(|r| r.keyids.contains(&id)) {
            delegations.keys.remove(&id);
        }
    }
    let mut top = top;
    let version = top.version.get() + 1;
    top.version = nz(version)?;
    top.expires = expiry(OFFLINE_DAYS)?;
    top.delegations = Some(delegations);
    let holder = KeyHolder::Root(root(repo)?.signed);
    let top = DelegatedTargets {
        name: "targets".into(),
        targets: top,
    };
    sign_and_write(
        repo,
        &format!("{version}.targets.json"),
        top,
        &holder,
        &role_keys(keys, "targets")?,
    )?;
    revoke(keys, &old_files)?;
    let days = if ONLINE_ROLES.contains(&role) {
        ONLINE_DAYS
    } else {
        OFFLINE_DAYS
    };
    update_role(repo, keys, role, days, |_| Ok(()))?;
    Ok(version)
}
