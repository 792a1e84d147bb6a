//! Configuration migration: a declared set of paths copied from the running image into the new
//! one before the switch, with owner, mode, symlinks, extended attributes and times kept.
//! Nothing outside the new image's root is ever written.
//!
//! Three-way against what the running image shipped (its baseline): a file the box never
//! changed keeps the new image's copy; the account databases are merged per entry
//! (`appliance::accounts`); a file changed on both sides is a conflict, the box's copy wins.
//! In a migrated directory, an entry the box removed stays removed, one the new image adds
//! stays.
//! Without a baseline (first upgrade from a factory image) the box's copy wins, and the account
//! databases are still merged per entry.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::appliance::accounts;

mod apply;
mod baseline;

use crate::error::refused;
pub use apply::apply;
pub use baseline::{baseline, load_baseline, shipped_accounts};

/// What happens to one path.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Action {
    /// Copied (new or different in the new image).
    Copy { path: String, kind: Kind },
    /// Identical already.
    Same { path: String },
    /// Unchanged on this box since its image shipped it: the new image's copy stays.
    Keep { path: String },
    /// An account database merged per entry with the new image's (`appliance::accounts`).
    Merge {
        path: String,
        /// The merged text, written by `apply` (never reported: it holds password hashes).
        #[serde(skip)]
        text: String,
    },
    /// A directory's entry that the new image has and the box does not, which the running
    /// image shipped (the box removed it), or any such entry when that is not known: removed
    /// so the directory mirrors the box's.
    Remove { path: String },
    /// A directory's entry that only the new image has, and the running image never shipped:
    /// new in this release, it stays.
    Added { path: String },
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
    /// Paths changed on this box and also changed by the new image: the box's copy wins. For
    /// the account databases, `PATH: what clashed and how it was resolved`.
    pub conflicts: Vec<String>,
    /// Declared paths that the running image does not have.
    pub absent: Vec<String>,
    /// The new image's accounts a merge did not add, by database path.
    #[serde(skip)]
    refused: BTreeMap<String, Vec<String>>,
}

/// Hashes of the declared files as an image shipped them, to tell later who changed what.
pub type Baseline = BTreeMap<String, String>;

/// The text of the declared account databases as an image shipped them, by path: the base of
/// their per-entry merge.
pub type ShippedAccounts = BTreeMap<String, String>;

/// What the running image shipped, when known.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shipped<'a> {
    pub hashes: Option<&'a Baseline>,
    pub accounts: Option<&'a ShippedAccounts>,
}

/// Plans the migration of `patterns` from `src` (running root) into `dst` (new image root).
/// `shipped` is what the running image shipped, when known.
pub fn plan(src: &Path, dst: &Path, patterns: &[String], shipped: Shipped) -> Result<Plan> {
    let mut plan = Plan::default();
    for pattern in patterns {
        let rel_pattern = relative(pattern)?;
        let matches = expand(src, &rel_pattern)?;
        if matches.is_empty() {
            plan.absent.push(pattern.clone());
        }
        for rel in matches {
            check_inside(src, &rel)?;
            plan_entry(src, dst, &rel, shipped, &mut plan)?;
        }
    }
    drop_refused_secrets(dst, &mut plan)?;
    Ok(plan)
}

/// The shadow (gshadow) entries of the new image's accounts that the passwd (group) merge did
/// not add are dropped from the merged shadow (gshadow) too.
fn drop_refused_secrets(dst: &Path, plan: &mut Plan) -> Result<()> {
    for action in &mut plan.actions {
        let (Action::Merge { path, .. } | Action::Same { path }) = action else {
            continue;
        };
        let path = path.clone();
        let owner = accounts::Db::for_path(&path).and_then(accounts::Db::owner);
        let Some(names) = owner.and_then(|o| plan.refused.get(o.path())) else {
            continue;
        };
        let text = match action {
            Action::Merge { text, .. } => text.clone(),
            _ => fs::read_to_string(dst.join(relative(&path)?))
                .with_context(|| format!("reading {path} in the new image"))?,
        };
        let kept = accounts::drop_names(&text, names);
        if kept != text {
            *action = Action::Merge { path, text: kept };
        }
    }
    Ok(())
}

fn plan_entry(src: &Path, dst: &Path, rel: &Path, shipped: Shipped, plan: &mut Plan) -> Result<()> {
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
            plan_entry(src, dst, &rel.join(n), shipped, plan)?;
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
                let path = display(&rel.join(n));
                plan.actions.push(if removed_by_box(&path, shipped.hashes) {
                    Action::Remove { path }
                } else {
                    Action::Added { path }
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
    if kind == Kind::File && plan_three_way(&s, &d, &name, shipped, plan)? {
        return Ok(());
    }
    plan.actions.push(Action::Copy { path: name, kind });
    Ok(())
}

/// Whether an entry of a migrated directory that the box lacks was removed by the box: the
/// running image shipped it, or something under it. Without a baseline nobody knows, and the
/// directory mirrors the box's.
fn removed_by_box(path: &str, shipped: Option<&Baseline>) -> bool {
    let Some(base) = shipped else {
        return true;
    };
    let under = format!("{path}/");
    base.range(path.to_owned()..)
        .take_while(|(k, _)| k.starts_with(path))
        .any(|(k, _)| k == path || k.starts_with(&under))
}

/// A file that is not identical on both sides: kept when the box never changed it, merged when
/// it is an account database, else a conflict when the new image changed it too. True when
/// an action was planned (no copy).
fn plan_three_way(
    s: &Path,
    d: &Path,
    name: &str,
    shipped: Shipped,
    plan: &mut Plan,
) -> Result<bool> {
    let base = shipped.hashes.and_then(|b| b.get(name));
    let ours = crate::core::hashing::sha256_file(s)?;
    if base == Some(&ours) {
        plan.actions.push(Action::Keep { path: name.into() });
        return Ok(true);
    }
    if let Some(db) = accounts::Db::for_path(name) {
        let base_text = shipped.accounts.and_then(|a| a.get(name));
        if plan_merge(db, s, d, name, base_text.map(String::as_str), plan)? {
            return Ok(true);
        }
    }
    let theirs = fs::symlink_metadata(d)
        .ok()
        .filter(|m| m.is_file())
        .map(|_| crate::core::hashing::sha256_file(d))
        .transpose()?;
    if base.is_some_and(|b| theirs.as_ref().is_some_and(|t| t != b)) {
        plan.conflicts.push(name.into());
    }
    Ok(false)
}

/// Merges an account database when both sides hold one as UTF-8 text. True when planned.
fn plan_merge(
    db: accounts::Db,
    s: &Path,
    d: &Path,
    name: &str,
    base: Option<&str>,
    plan: &mut Plan,
) -> Result<bool> {
    if !fs::symlink_metadata(d).is_ok_and(|m| m.is_file()) {
        return Ok(false);
    }
    let (Some(ours), Some(theirs)) = (read_text(s)?, read_text(d)?) else {
        return Ok(false);
    };
    let merged = accounts::merge(db, base, &ours, &theirs);
    plan.conflicts.extend(merged.conflicts);
    if !merged.refused.is_empty() {
        plan.refused.insert(name.into(), merged.refused);
    }
    plan.actions.push(if merged.text == theirs {
        Action::Same { path: name.into() }
    } else {
        Action::Merge {
            path: name.into(),
            text: merged.text,
        }
    });
    Ok(true)
}

/// A file's text; `None` when it is not UTF-8.
fn read_text(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub(super) fn same_meta(md: &fs::Metadata, other: &Path) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::os::unix::fs::PermissionsExt;

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
        let plan = plan(&src, &dst, &patterns, Shipped::default()).unwrap();
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
        let again = super::plan(&src, &dst, &patterns, Shipped::default()).unwrap();
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
        // The symlink itself is recorded by its target; nothing behind it is read.
        let only: Vec<(&str, String)> = b.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        assert_eq!(
            only,
            [("/etc/netplan", format!("symlink:{}", outside.display()))]
        );
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
        let err = plan(&src, &dst, &pats(&["/etc/evil/x"]), Shipped::default()).unwrap_err();
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
        assert!(super::plan(&src, &dst, &pats(&["/etc/../x"]), Shipped::default()).is_err());
    }

    fn hashes(base: &Baseline) -> Shipped<'_> {
        Shipped {
            hashes: Some(base),
            accounts: None,
        }
    }

    /// A migrated directory: what the box deleted of what its image shipped stays deleted (a
    /// file, a symlink, a whole subdirectory); what the new image adds stays.
    #[test]
    fn a_migrated_directory_keeps_the_new_images_additions() {
        let (_t, src, dst) = setup();
        let running = _t.path().join("running");
        for root in [&running, &dst] {
            fs::create_dir_all(root.join("etc/netplan/old.d")).unwrap();
            fs::write(root.join("etc/netplan/00-shipped.yaml"), "a").unwrap();
            fs::write(root.join("etc/netplan/old.d/x.yaml"), "x").unwrap();
            symlink("00-shipped.yaml", root.join("etc/netplan/default")).unwrap();
        }
        let base = baseline(&running, &pats(&["/etc/netplan"])).unwrap();
        // The box deleted all three and wrote its own; the new image adds two entries.
        fs::write(src.join("etc/netplan/10-box.yaml"), "box").unwrap();
        fs::write(dst.join("etc/netplan/50-new.yaml"), "new").unwrap();
        fs::create_dir_all(dst.join("etc/netplan/new.d")).unwrap();

        let p = plan(&src, &dst, &pats(&["/etc/netplan"]), hashes(&base)).unwrap();
        for gone in ["00-shipped.yaml", "default", "old.d"] {
            assert!(
                p.actions.contains(&Action::Remove {
                    path: format!("/etc/netplan/{gone}")
                }),
                "{gone}: {:?}",
                p.actions
            );
        }
        for added in ["50-new.yaml", "new.d"] {
            assert!(p.actions.contains(&Action::Added {
                path: format!("/etc/netplan/{added}")
            }));
        }
        apply(&src, &dst, &p).unwrap();
        let mut left: Vec<String> = fs::read_dir(dst.join("etc/netplan"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["10-box.yaml", "50-new.yaml", "new.d"]);

        // Without a baseline nobody knows who added what: the directory mirrors the box's.
        fs::write(dst.join("etc/netplan/60-new.yaml"), "new").unwrap();
        let p = plan(&src, &dst, &pats(&["/etc/netplan"]), Shipped::default()).unwrap();
        assert!(p.actions.contains(&Action::Remove {
            path: "/etc/netplan/60-new.yaml".into()
        }));
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
        let plan = plan(&src, &dst, &pats(&["/etc/hosts"]), hashes(&base)).unwrap();
        assert_eq!(plan.conflicts, vec!["/etc/hosts".to_string()]);
        // Unchanged on the box: no conflict.
        base.insert(
            "/etc/hosts".into(),
            crate::core::hashing::sha256_hex(b"box edit"),
        );
        let plan = super::plan(&src, &dst, &pats(&["/etc/hosts"]), hashes(&base)).unwrap();
        assert!(plan.conflicts.is_empty());
    }

    #[test]
    fn unchanged_files_keep_the_new_images_copy_and_accounts_merge() {
        let (_t, src, dst) = setup();
        fs::write(src.join("etc/hosts"), "shipped").unwrap();
        fs::write(dst.join("etc/hosts"), "new image").unwrap();
        fs::write(src.join("etc/group"), "root:x:0:\nalice:x:1000:\n").unwrap();
        fs::write(dst.join("etc/group"), "root:x:0:\n_chrony:x:110:\n").unwrap();
        fs::set_permissions(dst.join("etc/group"), fs::Permissions::from_mode(0o640)).unwrap();
        let mut base = Baseline::new();
        base.insert(
            "/etc/hosts".into(),
            crate::core::hashing::sha256_hex(b"shipped"),
        );
        let patterns = pats(&["/etc/hosts", "/etc/group"]);
        let plan = plan(&src, &dst, &patterns, hashes(&base)).unwrap();
        assert_eq!(
            plan.actions[0],
            Action::Keep {
                path: "/etc/hosts".into()
            }
        );
        assert!(matches!(&plan.actions[1], Action::Merge { path, .. } if path == "/etc/group"));
        apply(&src, &dst, &plan).unwrap();
        assert_eq!(
            fs::read_to_string(dst.join("etc/hosts")).unwrap(),
            "new image"
        );
        assert_eq!(
            fs::read_to_string(dst.join("etc/group")).unwrap(),
            "root:x:0:\n_chrony:x:110:\nalice:x:1000:\n"
        );
        let md = fs::metadata(dst.join("etc/group")).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o640);
        assert!(!dst.join("etc/.upgradectl-group").exists());
        // The merged text never reaches the report.
        let json = serde_json::to_string(&plan).unwrap();
        assert!(!json.contains("alice"), "{json}");
    }

    #[test]
    fn an_image_account_refused_for_its_uid_loses_its_shadow_entry_too() {
        let (_t, src, dst) = setup();
        fs::write(
            src.join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nalice:x:110:110::/:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            src.join("etc/shadow"),
            "root:*:1::::::\nalice:$y$a:1::::::\n",
        )
        .unwrap();
        fs::write(
            dst.join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\n_chrony:x:110:110::/:/bin/false\n",
        )
        .unwrap();
        fs::write(
            dst.join("etc/shadow"),
            "root:*:1::::::\n_chrony:!:1::::::\n",
        )
        .unwrap();
        let plan = plan(
            &src,
            &dst,
            &pats(&["/etc/passwd", "/etc/shadow"]),
            Shipped::default(),
        )
        .unwrap();
        assert_eq!(plan.conflicts.len(), 1, "{:?}", plan.conflicts);
        apply(&src, &dst, &plan).unwrap();
        assert_eq!(
            fs::read_to_string(dst.join("etc/shadow")).unwrap(),
            "root:*:1::::::\nalice:$y$a:1::::::\n"
        );
    }
}
