//! What an image shipped: hashes of its declared files and the text of its account databases,
//! the base of the next three-way migration.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

use super::{check_inside, display, expand, read_text, relative, Baseline, ShippedAccounts};
use crate::appliance::accounts;

/// Hashes the declared files of an image as shipped (before migration writes into it); its
/// symlinks are recorded by target.
pub fn baseline(root: &Path, patterns: &[String]) -> Result<Baseline> {
    let mut out = Baseline::new();
    for pattern in patterns {
        for rel in expand(root, &relative(pattern)?)? {
            if check_inside(root, &rel).is_err() {
                continue; // behind a symlink: not part of the image
            }
            let walk = walkdir::WalkDir::new(root.join(&rel))
                .follow_links(false)
                .follow_root_links(false);
            for entry in walk {
                let entry = entry?;
                let rel = display(entry.path().strip_prefix(root).expect("under root"));
                if entry.file_type().is_file() {
                    out.insert(rel, crate::core::hashing::sha256_file(entry.path())?);
                } else if entry.file_type().is_symlink() {
                    // Shipped, so a box that deletes it is seen to (never equal to a hash).
                    let target = fs::read_link(entry.path())?;
                    out.insert(rel, format!("symlink:{}", target.display()));
                }
            }
        }
    }
    Ok(out)
}

/// The text of the declared account databases of an image as shipped (before migration writes
/// into it); those that are not UTF-8 are left out.
/// `baseline` is the image's, from `baseline`.
pub fn shipped_accounts(root: &Path, baseline: &Baseline) -> Result<ShippedAccounts> {
    let mut out = ShippedAccounts::new();
    for path in baseline.keys() {
        if accounts::Db::for_path(path).is_some() {
            if let Some(text) = read_text(&root.join(relative(path)?))? {
                out.insert(path.clone(), text);
            }
        }
    }
    Ok(out)
}

/// Loads a stored baseline or shipped accounts (missing = unknown).
pub fn load_baseline<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(data) => Ok(Some(
            serde_json::from_slice(&data).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
