//! Carrying out a migration plan inside the new image: copies built beside their targets and
//! renamed over them, merged account databases, metadata kept.

use std::fs;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{check_inside, relative, Action, Kind, Plan};

/// Carries out a plan. Every destination's parents are checked for symlinks first, so a write
/// can never leave the new image's root. Refuses with `NoSpace` before copying anything when
/// the new image has not room enough for what the plan copies.
pub fn apply(src: &Path, dst: &Path, plan: &Plan) -> Result<()> {
    check_room(src, dst, plan)?;
    for action in &plan.actions {
        match action {
            Action::Same { .. } | Action::Keep { .. } | Action::Added { .. } => {}
            Action::Merge { path, text } => {
                let rel = relative(path)?;
                check_inside(dst, &rel)?;
                write_merged(&dst.join(&rel), text).with_context(|| format!("merging {path}"))?;
                crate::fail_point!("migrate::copied");
            }
            Action::Remove { path } => {
                let rel = relative(path)?;
                check_inside(dst, &rel)?;
                let d = dst.join(&rel);
                let md = fs::symlink_metadata(&d)?;
                if md.is_dir() {
                    fs::remove_dir_all(&d)
                } else {
                    fs::remove_file(&d)
                }
                .with_context(|| format!("removing {path} from the new image"))?;
            }
            Action::Copy { path, kind } => {
                let rel = relative(path)?;
                check_inside(dst, &rel)?;
                copy_one(&src.join(&rel), &dst.join(&rel), *kind)
                    .with_context(|| format!("migrating {path}"))?;
                crate::fail_point!("migrate::copied");
            }
        }
    }
    // Durable once the image is unmounted and fsynced (`ImageMount::close`).
    Ok(())
}

/// Space the plan's copies need in the new image (file sizes rounded up to 4 KiB blocks, plus
/// a block per entry for its inode's metadata), against what the image has free.
fn check_room(src: &Path, dst: &Path, plan: &Plan) -> Result<()> {
    const BLOCK: u64 = 4096;
    let mut need = 0;
    for action in &plan.actions {
        let len = match action {
            Action::Copy { path, .. } => {
                fs::symlink_metadata(src.join(relative(path)?)).map_or(0, |m| m.len())
            }
            Action::Merge { text, .. } => text.len() as u64,
            _ => continue,
        };
        need += len.div_ceil(BLOCK) * BLOCK + BLOCK;
    }
    let free = crate::sys::fsutil::free_bytes(dst)?;
    if need > free {
        return Err(crate::error::Error::NoSpace {
            path: "the new image".into(),
            need,
            free,
        }
        .into());
    }
    Ok(())
}

fn copy_one(s: &Path, d: &Path, kind: Kind) -> Result<()> {
    let md = fs::symlink_metadata(s)?;
    if let Some(parent) = d.parent() {
        fs::create_dir_all(parent)?;
    }
    match kind {
        Kind::Dir => {
            if fs::symlink_metadata(d).is_ok_and(|m| !m.is_dir()) {
                fs::remove_file(d)?;
            }
            if !d.exists() {
                fs::create_dir(d)?;
            }
            copy_meta(s, d, &md)
        }
        Kind::Symlink | Kind::File => {
            // Build beside the target and rename over it: the new image never holds half a file.
            // No fsync per file: each one would flush the loop device, i.e. fsync the whole
            // image file on the host; `ImageMount::close` makes everything durable at once,
            // before GRUB may boot the image.
            let tmp = beside(d)?;
            if kind == Kind::Symlink {
                std::os::unix::fs::symlink(fs::read_link(s)?, &tmp)?;
            } else {
                fs::copy(s, &tmp)?;
            }
            copy_meta(s, &tmp, &md)?;
            if fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()) {
                fs::remove_dir_all(d)?;
            }
            fs::rename(&tmp, d)?;
            Ok(())
        }
    }
}

/// Writes a merged account database over the new image's copy, keeping that copy's owner, mode
/// and extended attributes (shadow stays 0640 root:shadow): built beside it, then renamed.
fn write_merged(d: &Path, text: &str) -> Result<()> {
    let md = fs::symlink_metadata(d).with_context(|| format!("reading {}", d.display()))?;
    let tmp = beside(d)?;
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    copy_attrs(d, &tmp, &md)?;
    fs::rename(&tmp, d).with_context(|| format!("renaming into {}", d.display()))
}

/// The temp path a file of the new image is built at before it is renamed over `d` (none left
/// there).
fn beside(d: &Path) -> Result<PathBuf> {
    let tmp = d.with_file_name(format!(
        ".upgradectl-{}",
        d.file_name().context("no file name")?.to_string_lossy()
    ));
    let _ = fs::remove_file(&tmp);
    Ok(tmp)
}

fn copy_meta(s: &Path, d: &Path, md: &fs::Metadata) -> Result<()> {
    copy_attrs(s, d, md)?;
    let atime = nix::sys::time::TimeSpec::new(md.atime(), md.atime_nsec());
    let mtime = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
    nix::sys::stat::utimensat(
        None,
        d,
        &atime,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("setting times of {}", d.display()))?;
    Ok(())
}

/// Owner, mode (not a symlink's) and extended attributes of `s` (whose metadata is `md`) onto
/// `d`.
fn copy_attrs(s: &Path, d: &Path, md: &fs::Metadata) -> Result<()> {
    lchown(d, Some(md.uid()), Some(md.gid())).with_context(|| format!("chown {}", d.display()))?;
    let is_link = md.file_type().is_symlink();
    if !is_link {
        fs::set_permissions(d, fs::Permissions::from_mode(md.mode() & 0o7777))?;
    }
    for name in xattr::list(s).with_context(|| format!("listing xattrs of {}", s.display()))? {
        if let Some(value) = xattr::get(s, &name)? {
            xattr::set(d, &name, &value).with_context(|| {
                format!(
                    "setting xattr {} on {}",
                    name.to_string_lossy(),
                    d.display()
                )
            })?;
        }
    }
    Ok(())
}
