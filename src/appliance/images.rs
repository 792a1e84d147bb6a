//! Images on the host partition: what is there and how big, which of them GRUB offers, and the
//! one space planner that makes room for a new one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::appliance::ctx::Ctx;
use crate::appliance::grub::{self, Menu};
use crate::appliance::paths::Layout;
use crate::appliance::state::State;
use crate::core::version::Version;
use crate::error::Error;
use crate::sys::fsutil;

/// One image file in `images/`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageFile {
    pub version: Version,
    /// Apparent size in bytes.
    pub size: u64,
    /// Bytes really allocated (image files are sparse).
    pub allocated: u64,
}

/// Complete image files, oldest first. Partial files (`.V.img.partial`) are not images.
pub fn list(layout: &Layout) -> Result<Vec<ImageFile>> {
    let dir = layout.images_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut images = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(version) = name.to_str().and_then(Version::from_image_file_name) else {
            continue;
        };
        let md = entry.metadata()?;
        if !md.is_file() {
            continue;
        }
        images.push(ImageFile {
            version,
            size: md.len(),
            allocated: fsutil::allocated_bytes(&entry.path())?,
        });
    }
    images.sort_by(|a, b| a.version.cmp(&b.version));
    Ok(images)
}

/// A file an interrupted run left on the host partition: a partial export or download, a
/// temp file of an atomic write.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Leftover {
    pub path: PathBuf,
    /// Bytes it really occupies.
    pub allocated: u64,
}

/// Files interrupted runs left behind (nothing else writes there while the lock is held):
/// `images/.*` (partial exports, temp files), everything in `downloads/`, and atomic writes'
/// temp files next to grub.cfg, grubenv, the state and the migration baselines.
pub fn leftovers(layout: &Layout) -> Result<Vec<Leftover>> {
    type IsLeftover = fn(&str) -> bool;
    let dirs: [(PathBuf, IsLeftover); 5] = [
        (layout.images_dir(), |n| n.starts_with('.')),
        (layout.downloads_dir(), |_| true),
        // `.grub.cfg.prev`: the old file's second name while it is replaced.
        (layout.grub_dir(), |n| {
            n.starts_with(".tmp-") || (n.starts_with('.') && n.ends_with(".prev"))
        }),
        (layout.state_dir(), |n| n.starts_with(".tmp-")),
        (layout.state_dir().join("baseline"), |n| {
            n.starts_with(".tmp-")
        }),
    ];
    let mut found = Vec::new();
    for (dir, is_leftover) in dirs {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for entry in entries {
            let entry = entry?;
            let keep = entry
                .file_name()
                .to_str()
                .is_none_or(|name| !is_leftover(name));
            if keep || !entry.file_type()?.is_file() {
                continue;
            }
            found.push(Leftover {
                allocated: fsutil::allocated_bytes(&entry.path())?,
                path: entry.path(),
            });
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

/// Removes the leftovers of interrupted runs but `keep` (a download this run resumes).
/// Returns the bytes freed. Only under the lock: another run's files are not leftovers.
pub fn remove_leftovers(layout: &Layout, keep: &[PathBuf]) -> Result<u64> {
    let mut freed = 0;
    for l in leftovers(layout)? {
        if keep.contains(&l.path) {
            continue;
        }
        tracing::info!("removing {} left by an interrupted run", l.path.display());
        fsutil::remove_durably(&l.path)?;
        freed += l.allocated;
    }
    Ok(freed)
}

/// Path of version `v`'s image file.
pub fn image_path(layout: &Layout, v: &Version) -> PathBuf {
    layout.images_dir().join(v.image_file_name())
}

/// Path where `v`'s image is written before it is complete.
pub fn partial_path(layout: &Layout, v: &Version) -> PathBuf {
    layout
        .images_dir()
        .join(format!(".{}.partial", v.image_file_name()))
}

/// Which images a cleanup removes: everything not protected, beyond `keep_extra` of the newest
/// unprotected ones. Pure.
pub fn plan_cleanup(on_disk: &[Version], protected: &[Version], keep_extra: usize) -> Vec<Version> {
    let mut candidates: Vec<&Version> = on_disk.iter().filter(|v| !protected.contains(v)).collect();
    candidates.sort_by(|a, b| b.cmp(a));
    candidates.into_iter().skip(keep_extra).cloned().collect()
}

/// Decides whether `need` bytes fit, and which removals (in order, oldest first) would make
/// them fit. Pure: `free` is what is free now, `removable` what each removal frees.
pub fn plan_space(need: u64, free: u64, removable: &[(Version, u64)]) -> Result<Vec<Version>, u64> {
    let mut free_after = free;
    let mut chosen = Vec::new();
    let mut order: Vec<&(Version, u64)> = removable.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    for (v, bytes) in order {
        if free_after >= need {
            break;
        }
        free_after += bytes;
        chosen.push(v.clone());
    }
    if free_after >= need {
        Ok(chosen)
    } else {
        Err(free_after)
    }
}

/// The GRUB menu the state calls for: every registered, not-bad image present on disk.
pub fn menu(ctx: &Ctx, state: &State) -> Result<Menu> {
    let booted = ctx.booted()?;
    let images = list(&ctx.layout)?
        .into_iter()
        .map(|i| i.version)
        .filter(|v| state.bootable(v))
        .collect();
    let grub = &ctx.config.grub;
    Ok(Menu {
        images,
        default: state.default.clone(),
        previous: state.previous.clone(),
        host_uuid: grub
            .host_uuid
            .clone()
            .or(booted.host_uuid)
            .or_else(|| state.host_uuid.clone()),
        kernel_args: grub.kernel_args.clone(),
        panic_seconds: grub.panic_seconds,
        timeout_seconds: grub.timeout_seconds,
    })
}

/// Rewrites grub.cfg from the state.
pub fn sync_grub(ctx: &Ctx, state: &State) -> Result<()> {
    grub::write_config(&ctx.layout.grub_cfg(), &menu(ctx, state)?)
}

/// Registers a complete, verified image file as prepared and adds it to the menu.
pub fn register_prepared(
    ctx: &Ctx,
    state: &mut State,
    v: &Version,
    sha256: Option<String>,
) -> Result<()> {
    state.register_prepared(v, sha256)?;
    sync_grub(ctx, state)
}

/// Removes image files (menu first, so GRUB never offers a missing image), then forgets them.
pub fn remove(ctx: &Ctx, state: &mut State, remove: &[Version]) -> Result<()> {
    if remove.is_empty() {
        return Ok(());
    }
    let mut next = state.clone();
    for v in remove {
        next.forget(v);
    }
    let mut menu = menu(ctx, &next)?;
    menu.images.retain(|v| !remove.contains(v));
    grub::write_config(&ctx.layout.grub_cfg(), &menu)?;
    crate::fail_point!("images::menu-written");
    for v in remove {
        fsutil::remove_durably(&image_path(&ctx.layout, v))?;
        crate::fail_point!("images::removed");
        let _ = std::fs::remove_file(ctx.baseline_path(v));
        let _ = std::fs::remove_file(ctx.shipped_accounts_path(v));
    }
    *state = next;
    Ok(())
}

/// The space planner: makes room for `bytes` more on the host partition (plus the configured
/// margin), removing unprotected images, oldest first, when that is enough; otherwise
/// `NoSpace` before anything is touched.
pub fn ensure_space(ctx: &Ctx, state: &mut State, bytes: u64) -> Result<()> {
    let chosen = space_plan(ctx, state, bytes)?.map_err(|(need, free)| Error::NoSpace {
        path: ctx.layout.host().display().to_string(),
        need,
        free,
    })?;
    remove(ctx, state, &chosen)?;
    state.save(&ctx.layout.state_file())
}

/// Whether [`ensure_space`] could make room for `bytes`, touching nothing.
pub fn could_fit(ctx: &Ctx, state: &State, bytes: u64) -> Result<bool> {
    Ok(space_plan(ctx, state, bytes)?.is_ok())
}

/// The images to remove for `bytes` more (and the margin), or what is needed and what could be
/// free.
fn space_plan(
    ctx: &Ctx,
    state: &State,
    bytes: u64,
) -> Result<std::result::Result<Vec<Version>, (u64, u64)>> {
    let booted = ctx.booted()?.version;
    let protected = state.protected(booted.as_ref());
    let removable: Vec<(Version, u64)> = list(&ctx.layout)?
        .into_iter()
        .filter(|i| !protected.contains(&i.version))
        .map(|i| (i.version, i.allocated))
        .collect();
    let need = bytes + (ctx.config.space_margin_mib << 20);
    let free = fsutil::free_bytes(ctx.layout.host())?;
    Ok(plan_space(need, free, &removable).map_err(|free| (need, free)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn cleanup_keeps_protected_and_extras() {
        let disk = [v("1.0"), v("2.0"), v("3.0"), v("4.0"), v("5.0")];
        let protected = [v("4.0"), v("5.0")];
        assert_eq!(
            plan_cleanup(&disk, &protected, 0),
            vec![v("3.0"), v("2.0"), v("1.0")]
        );
        assert_eq!(plan_cleanup(&disk, &protected, 1), vec![v("2.0"), v("1.0")]);
        assert!(plan_cleanup(&disk, &disk, 0).is_empty());
    }

    #[test]
    fn space_plan_removes_oldest_until_it_fits() {
        let removable = [(v("3.0"), 30), (v("1.0"), 10), (v("2.0"), 20)];
        assert_eq!(plan_space(50, 60, &removable), Ok(vec![]));
        assert_eq!(plan_space(50, 45, &removable), Ok(vec![v("1.0")]));
        assert_eq!(plan_space(50, 25, &removable), Ok(vec![v("1.0"), v("2.0")]));
        assert_eq!(plan_space(500, 25, &removable), Err(85));
    }
}
