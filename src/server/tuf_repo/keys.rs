//! The repository's key files: ed25519, PKCS#8 (what tough's `LocalKeySource` reads),
//! `<role>.<n>.pk8`, 0600, created once and never overwritten.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::decoded::{Decoded, Hex};

use super::block;
use crate::sys::fsutil;

pub(super) fn key_path(keys: &Path, role: &str, n: usize) -> PathBuf {
    keys.join(format!("{role}.{n}.pk8"))
}

/// Creates `count` new keys for `role`, 0600, numbered after every key the role ever had (the
/// revoked ones in `keys/revoked/` too, so a number never names two keys).
pub(super) fn generate(keys: &Path, role: &str, count: usize) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(keys).with_context(|| format!("creating {}", keys.display()))?;
    let mut ever = key_files(keys, role)?;
    ever.extend(key_files(&revoked_dir(keys), role)?);
    let first = ever.iter().filter_map(|p| key_number(p)).max().unwrap_or(0) + 1;
    (first..first + count)
        .map(|n| {
            let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
            let der = key.to_pkcs8_der().context("encoding a key")?;
            let path = key_path(keys, role, n);
            fsutil::write_new(&path, der.as_bytes(), 0o600)?;
            Ok(path)
        })
        .collect()
}

/// Where replaced keys are set aside (never deleted: the release manager decides whether to
/// destroy them).
pub(super) fn revoked_dir(keys: &Path) -> PathBuf {
    keys.join("revoked")
}

/// Moves key files to `keys/revoked/`: they sign nothing from now on.
pub(super) fn revoke(keys: &Path, files: &[PathBuf]) -> Result<()> {
    let revoked = revoked_dir(keys);
    std::fs::create_dir_all(&revoked)?;
    for f in files {
        let to = revoked.join(f.file_name().context("a key file name")?);
        if to.exists() {
            bail!("{} is already revoked", to.display());
        }
        std::fs::rename(f, &to).with_context(|| format!("revoking {}", f.display()))?;
    }
    Ok(())
}

/// `n` of `<role>.<n>.pk8`.
fn key_number(path: &Path) -> Option<usize> {
    let name = path.file_name()?.to_str()?.strip_suffix(".pk8")?;
    name.rsplit_once('.')?.1.parse().ok()
}

/// `role`'s key files in `keys`, in order.
pub(super) fn key_files(keys: &Path, role: &str) -> Result<Vec<PathBuf>> {
    let mut found: Vec<(usize, PathBuf)> = Vec::new();
    let entries = match std::fs::read_dir(keys) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", keys.display())),
    };
    for e in entries {
        let name = e?.file_name().to_string_lossy().into_owned();
        let n = (name.strip_prefix(role))
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(".pk8"))
            .and_then(|n| n.parse().ok());
        if let Some(n) = n {
            found.push((n, keys.join(name)));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

pub(super) fn sources(paths: &[PathBuf]) -> Vec<Box<dyn KeySource>> {
    (paths.iter())
        .map(|p| Box::new(LocalKeySource { path: p.clone() }) as Box<dyn KeySource>)
        .collect()
}

/// The signing keys of `role` in `keys`; an error naming the role when there are none.
pub(super) fn role_keys(keys: &Path, role: &str) -> Result<Vec<Box<dyn KeySource>>> {
    let files = key_files(keys, role)?;
    if files.is_empty() {
        bail!("no key of the {role} role in {}", keys.display());
    }
    Ok(sources(&files))
}

/// The TUF key of each file, with its key id.
pub(super) fn public_keys(
    paths: &[PathBuf],
) -> Result<Vec<(Decoded<Hex>, tough::schema::key::Key)>> {
    paths
        .iter()
        .map(|p| {
            let sign = block(LocalKeySource { path: p.clone() }.as_sign())?
                .map_err(|e| anyhow::anyhow!("reading key {}: {e}", p.display()))?;
            let key = sign.tuf_key();
            Ok((key.key_id()?, key))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_found_in_order_and_only_for_their_role() {
        let d = tempfile::tempdir().unwrap();
        generate(d.path(), "root", 3).unwrap();
        generate(d.path(), "rollout", 1).unwrap();
        let root = key_files(d.path(), "root").unwrap();
        let names: Vec<_> = root
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["root.1.pk8", "root.2.pk8", "root.3.pk8"]);
        assert_eq!(key_files(d.path(), "rollout").unwrap().len(), 1);
        assert_eq!(
            public_keys(&root).unwrap().len(),
            3,
            "tough reads our PKCS#8 keys"
        );
    }
}
