//! Configuration migration: a declared set of paths copied from the running image into the new
//! one before the switch, with owner, mode, symlinks, extended attributes and times kept.
//! Nothing outside the new image's root is ever written.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::error::refused;

/// What happens to one path.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Action {
    /// Copied (new or different in the new image).
    Copy { path: String, kind: Kind },
    /// Identical already.
    Same { path: String },
    /// A directory's entry that the new image has and the running one does not: removed so the
    /// directory mirrors the box's.
    Remove { path: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// The whole plan, plus what deserves a human's eye.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Paths changed on this box and also changed by the new image: the box's copy wins.
    pub conflicts: Vec<String>,
    /// Declared paths that the running image does not have.
    pub absent: Vec<String>,
}

/// Hashes of the declared files as an image shipped them, to tell later who changed what.
pub type Baseline = BTreeMap<String, String>;

/// Plans the migration of `patterns` from `src` (running root) into `dst` (new image root).
/// `baseline` holds the hashes of the running image's files as shipped, when known.
pub fn plan(
    src: &Path,
    dst: &Path,
    patterns: &[String],
    baseline: Option<&Baseline>,
) -> Result<Plan> {
    let mut plan = Plan::default();
    for pattern in patterns {
        let rel_pattern = relative(pattern)?;
        let matches = expand(src, &rel_pattern)?;
        if matches.is_empty() {
            plan.absent.push(pattern.clone());
        }
        for rel in matches {
            check_inside(src, &rel)?;
            plan_entry(src, dst, &rel, baseline, &mut plan)?;
        }
    }
    Ok(plan)
}

fn plan_entry(
    src: &Path,
    dst: &Path,
    rel: &Path,
    baseline: Option<&Baseline>,
    plan: &mut Plan,
) -> Result<()> {
    // Nothing is read or written through a symlink of the new image either.
    check_inside(dst, rel)?;
    let s = src.join(rel);
    let d = dst.join(rel);
    let md = fs::symlink_metadata(&s).with_context(|| format!("reading {}", s.display()))?;
    let name = display(rel);
    if md.is_dir() {
        let dst_is_dir = fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir());
        if !dst_is_dir || !same_meta(&md, &d) {
            plan.actions.push(Action::Copy {
                path: name.clone(),
                kind: Kind::Dir,
            });
        }
        let mut names: Vec<OsString> = Vec::new();
        for e in fs::read_dir(&s).with_context(|| format!("listing {}", s.display()))? {
            names.push(e?.file_name());
        }
        names.sort();
        for n in &names {
            plan_entry(src, dst, &rel.join(n), baseline, plan)?;
        }
        if dst_is_dir {
            let mut extra: Vec<OsString> = Vec::new();
            for e in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
                let n = e?.file_name();
                if !names.contains(&n) {
                    extra.push(n);
                }
            }
            extra.sort();
            for n in extra {
                plan.actions.push(Action::Remove {
                    path: display(&rel.join(n)),
                });
            }
        }
        return Ok(());
    }
    let kind = if md.file_type().is_symlink() {
        Kind::Symlink
    } else {
        Kind::File
    };
    if !(md.is_file() || md.file_type().is_symlink()) {
        bail!("{name}: only files, directories and symlinks can be migrated");
    }
    let identical = match kind {
        Kind::Symlink => fs::read_link(&d).ok() == Some(fs::read_link(&s)?),
        _ => {
            fs::symlink_metadata(&d).is_ok_and(|m| m.is_file())
                && same_meta(&md, &d)
                && crate::core::hashing::sha256_file(&s)? == crate::core::hashing::sha256_file(&d)?
        }
    };
    if identical {
        plan.actions.push(Action::Same { path: name });
        return Ok(());
    }
    if kind == Kind::File {
        if let Some(base) = baseline.and_then(|b| b.get(&name)) {
            let ours = crate::core::hashing::sha256_file(&s)?;
            let theirs = fs::symlink_metadata(&d)
                .ok()
                .filter(|m| m.is_file())
                .map(|_| crate::core::hashing::sha256_file(&d))
                .transpose()?;
            if &ours != base && theirs.as_ref().is_some_and(|t| t != base) {
                plan.conflicts.push(name.clone());
            }
        }
    }
    plan.actions.push(Action::Copy { path: name, kind });
    Ok(())
}

/// Carries out a plan. Every destination's parents are checked for symlinks first, so a write
/// can never leave the new image's root. Refuses with `NoSpace` before copying anything when
/// the new image has not room enough for what the plan copies.
pub fn apply(src: &Path, dst: &Path, plan: &Plan) -> Result<()> {
    check_room(src, dst, plan)?;
    for action in &plan.actions {
        match action {
            Action::Same { .. } => {}
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
        if let Action::Copy { path, .. } = action {
            let len = fs::symlink_metadata(src.join(relative(path)?)).map_or(0, |m| m.len());
            need += len.div_ceil(BLOCK) * BLOCK + BLOCK;
        }
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
            let tmp = d.with_file_name(format!(
                ".upgradectl-{}",
                d.file_name().context("no file name")?.to_string_lossy()
            ));
            let _ = fs::remove_file(&tmp);
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

fn copy_meta(s: &Path, d: &Path, md: &fs::Metadata) -> Result<()> {
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

fn same_meta(md: &fs::Metadata, other: &Path) -> bool {
    fs::symlink_metadata(other)
        .is_ok_and(|o| o.uid() == md.uid() && o.gid() == md.gid() && o.mode() == md.mode())
}

/// Refuses any path whose existing components under `root` include a symlink: writing through
/// it could land outside the image.
fn check_inside(root: &Path, rel: &Path) -> Result<()> {
    let mut cur = root.to_path_buf();
    let comps: Vec<Component> = rel.components().collect();
    for (i, c) in comps.iter().enumerate() {
        let Component::Normal(n) = c else {
            return Err(refused(format!(
                "{}: path escapes the image root",
                rel.display()
            )));
        };
        cur.push(n);
        let last = i + 1 == comps.len();
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() && !last => {
                return Err(refused(format!(
                    "/{}: {} is a symlink; refusing to write through it",
                    rel.display(),
                    cur.strip_prefix(root).unwrap_or(&cur).display()
                )))
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

/// `/etc/x` → `etc/x`, refusing `..` and relative paths.
fn relative(p: &str) -> Result<PathBuf> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(refused(format!("{p}: migration paths must be absolute")));
    }
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            _ => return Err(refused(format!("{p}: '..' and '.' are not allowed"))),
        }
    }
    Ok(out)
}

fn display(rel: &Path) -> String {
    format!("/{}", rel.display())
}

/// Expands a glob relative to `root`, without following symlinks out of it.
fn expand(root: &Path, rel_pattern: &Path) -> Result<Vec<PathBuf>> {
    let pattern = rel_pattern.to_string_lossy();
    if !pattern.contains(['*', '?', '[']) {
        let exists = fs::symlink_metadata(root.join(rel_pattern)).is_ok();
        return Ok(if exists {
            vec![rel_pattern.to_owned()]
        } else {
            vec![]
        });
    }
    let full = format!(
        "{}/{}",
        glob::Pattern::escape(&root.to_string_lossy()),
        pattern
    );
    let mut out = Vec::new();
    for entry in glob::glob(&full).with_context(|| format!("bad glob {pattern}"))? {
        let p = entry?;
        out.push(p.strip_prefix(root).expect("glob under root").to_owned());
    }
    out.sort();
    Ok(out)
}

/// Hashes the declared files of an image as shipped (before migration writes into it).
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
                if entry.file_type().is_file() {
                    let rel = entry.path().strip_prefix(root).expect("under root");
                    out.insert(
                        display(rel),
                        crate::core::hashing::sha256_file(entry.path())?,
                    );
                }
            }
        }
    }
    Ok(out)
}

/// Loads a stored baseline (missing = unknown).
pub fn load_baseline(path: &Path) -> Result<Option<Baseline>> {
    match fs::read(path) {
        Ok(data) => Ok(Some(
            serde_json::from_slice(&data).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let dst = t.path().join("dst");
        for d in [&src, &dst] {
            fs::create_dir_all(d.join("etc/ssh")).unwrap();
            fs::create_dir_all(d.join("etc/netplan")).unwrap();
        }
        (t, src, dst)
    }

    fn pats(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn copies_files_globs_dirs_and_symlinks_with_metadata() {
        let (_t, src, dst) = setup();
        fs::write(src.join("etc/hostname"), "box-17\n").unwrap();
        fs::write(dst.join("etc/hostname"), "factory\n").unwrap();
        fs::write(src.join("etc/ssh/ssh_host_ed25519_key"), "KEY").unwrap();
        fs::set_permissions(
            src.join("etc/ssh/ssh_host_ed25519_key"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        fs::write(src.join("etc/netplan/10-box.yaml"), "net").unwrap();
        fs::write(dst.join("etc/netplan/01-default.yaml"), "dhcp").unwrap();
        symlink("10-box.yaml", src.join("etc/netplan/current")).unwrap();
        xattr::set(src.join("etc/hostname"), "user.origin", b"box").unwrap();

        let patterns = pats(&[
            "/etc/hostname",
            "/etc/ssh/ssh_host_*",
            "/etc/netplan",
            "/etc/missing",
        ]);
        let plan = plan(&src, &dst, &patterns, None).unwrap();
        assert_eq!(plan.absent, vec!["/etc/missing".to_string()]);
        assert!(plan.actions.contains(&Action::Remove {
            path: "/etc/netplan/01-default.yaml".into()
        }));
        apply(&src, &dst, &plan).unwrap();

        assert_eq!(
            fs::read_to_string(dst.join("etc/hostname")).unwrap(),
            "box-17\n"
        );
        let key = dst.join("etc/ssh/ssh_host_ed25519_key");
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_link(dst.join("etc/netplan/current")).unwrap(),
            Path::new("10-box.yaml")
        );
        assert!(!dst.join("etc/netplan/01-default.yaml").exists());
        assert_eq!(
            xattr::get(dst.join("etc/hostname"), "user.origin")
                .unwrap()
                .as_deref(),
            Some(&b"box"[..])
        );
        assert_eq!(
            fs::metadata(dst.join("etc/hostname")).unwrap().mtime(),
            fs::metadata(src.join("etc/hostname")).unwrap().mtime()
        );
        // A second plan finds nothing left to do.
        let again = super::plan(&src, &dst, &patterns, None).unwrap();
        assert!(
            again
                .actions
                .iter()
                .all(|a| matches!(a, Action::Same { .. })),
            "{again:?}"
        );
    }

    #[test]
    fn baseline_stays_inside_the_image() {
        let (t, _src, dst) = setup();
        let outside = t.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), "x").unwrap();
        fs::remove_dir(dst.join("etc/netplan")).unwrap();
        symlink(&outside, dst.join("etc/netplan")).unwrap();
        symlink(&outside, dst.join("etc/link")).unwrap();
        let b = baseline(&dst, &pats(&["/etc/netplan", "/etc/link/secret"])).unwrap();
        assert!(b.is_empty(), "{b:?}");
    }

    #[test]
    fn refuses_symlink_escapes_in_the_new_image() {
        let (t, src, dst) = setup();
        let outside = t.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::create_dir_all(src.join("etc/evil")).unwrap();
        fs::write(src.join("etc/evil/x"), "x").unwrap();
        symlink(&outside, dst.join("etc/evil")).unwrap();
        // Refused at planning, before anything is read through the link...
        let err = plan(&src, &dst, &pats(&["/etc/evil/x"]), None).unwrap_err();
        assert!(format!("{err:#}").contains("symlink"), "{err:#}");
        // ...and by apply, whatever plan it is given.
        let plan = Plan {
            actions: vec![Action::Copy {
                path: "/etc/evil/x".into(),
                kind: Kind::File,
            }],
            ..Plan::default()
        };
        let err = apply(&src, &dst, &plan).unwrap_err();
        assert!(format!("{err:#}").contains("symlink"), "{err:#}");
        assert!(!outside.join("x").exists());
        assert!(super::plan(&src, &dst, &pats(&["/etc/../x"]), None).is_err());
    }

    #[test]
    fn reports_paths_changed_in_both_images() {
        let (_t, src, dst) = setup();
        fs::write(src.join("etc/hosts"), "box edit").unwrap();
        fs::write(dst.join("etc/hosts"), "new image edit").unwrap();
        let mut base = Baseline::new();
        base.insert(
            "/etc/hosts".into(),
            crate::core::hashing::sha256_hex(b"shipped"),
        );
        let plan = plan(&src, &dst, &pats(&["/etc/hosts"]), Some(&base)).unwrap();
        assert_eq!(plan.conflicts, vec!["/etc/hosts".to_string()]);
        // Unchanged on the box: no conflict.
        base.insert(
            "/etc/hosts".into(),
            crate::core::hashing::sha256_hex(b"box edit"),
        );
        let plan = super::plan(&src, &dst, &pats(&["/etc/hosts"]), Some(&base)).unwrap();
        assert!(plan.conflicts.is_empty());
    }
}
