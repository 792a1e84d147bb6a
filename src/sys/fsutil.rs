//! Durable file writes: the one `atomic_write`, directory fsync, the journal checkpoint that
//! makes writes visible to GRUB, and space queries.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};

/// Replaces `path` with `data` so that a crash at any instant leaves either the old or the new
/// content: temp file in the same directory, explicit mode, write, fsync, rename, fsync dir.
pub fn atomic_write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = synced_temp(path, data, mode)?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    fsync_dir(parent_dir(path))
}

/// Creates `path` with `data` like `atomic_write`, but never replaces an existing file: the
/// rename is `RENAME_NOREPLACE` (or link + unlink), so a second writer fails instead.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = synced_temp(path, data, mode)?;
    publish_new(tmp, path)
}

/// Renames a complete temp file to `path` unless `path` exists (then fails, `path` untouched).
pub fn publish_new(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    tmp.persist_noclobber(path)
        .with_context(|| format!("publishing {} (never replaced)", path.display()))?;
    fsync_dir(parent_dir(path))
}

/// A temp file next to `path` holding `data` with `mode`, fsync'd.
fn synced_temp(path: &Path, data: &[u8], mode: u32) -> Result<tempfile::NamedTempFile> {
    let dir = parent_dir(path);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .context("setting mode")?;
    tmp.write_all(data)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(tmp)
}

/// `atomic_write` of a file GRUB reads (grub.cfg, grubenv): durable for Linux *and* at its
/// home location for GRUB before this returns (see `checkpoint`), and whole, old or new, for
/// GRUB after a power cut at any point.
///
/// A checkpoint writes the journal's blocks home in no particular order: a power cut in the
/// middle may leave the new directory block (name -> new inode) without the new inode, or the
/// old inode freed (size 0) while the old directory block still names it; GRUB then reads an
/// empty or garbled file (`tests/crash_states.rs` found both). So each checkpoint moves one
/// step whose every partial outcome GRUB reads whole: (1) the new file's inode and data go home
/// under its temp name; (2) the rename, while a second name (`.<name>.prev`) keeps the old
/// inode and its blocks alive; (3) only then the old inode is freed.
pub fn atomic_write_for_boot(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = synced_temp(path, data, mode)?;
    checkpoint(path)?;
    let prev = prev_name(path);
    let _ = fs::remove_file(&prev);
    let kept = match fs::hard_link(path, &prev) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("linking {}", prev.display())),
    };
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    fsync_dir(parent_dir(path))?;
    checkpoint(path)?;
    if kept {
        fs::remove_file(&prev).with_context(|| format!("removing {}", prev.display()))?;
        fsync_dir(parent_dir(path))?;
        checkpoint(path)?;
    }
    Ok(())
}

/// `.<name>.prev` next to `path`: the old version's second name while `path` is replaced.
fn prev_name(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    parent_dir(path).join(format!(".{name}.prev"))
}

nix::ioctl_write_ptr!(ext4_ioc_checkpoint, b'f', 43, u32);
nix::ioctl_readwrite!(fifreeze, b'X', 119, nix::libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, nix::libc::c_int);

/// Writes everything the filesystem holding `path` has committed to its journal to its home
/// locations. fsync + rename is durable for Linux, which replays the journal at mount; GRUB
/// reads the disk with its own driver and cannot, so a power cut after an fsync'd write but
/// before ext4 happens to checkpoint leaves GRUB an empty grub.cfg or a 0-byte image.
///
/// `EXT4_IOC_CHECKPOINT` (Linux ≥ 5.13) does exactly this. Older kernels get a freeze/thaw
/// cycle (as ostree does), which flushes the journal too; the thaw follows the freeze at once,
/// but a SIGKILL landing between the two would leave the host filesystem frozen until
/// `fsfreeze --unfreeze`. Nothing here thaws automatically: it cannot tell our freeze from an
/// administrator's. Filesystems with neither ioctl (tmpfs in tests) have nothing to do.
pub fn checkpoint(path: &Path) -> Result<()> {
    use nix::errno::Errno;
    let dir = if path.is_dir() {
        path
    } else {
        parent_dir(path)
    };
    let fd = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let flags: u32 = 0;
    // SAFETY: the ioctls take a pointer to an integer the kernel reads; fd is open.
    match unsafe { ext4_ioc_checkpoint(raw, &flags) } {
        Ok(_) | Err(Errno::ENODEV) => return Ok(()), // ENODEV: no journal at all
        Err(Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::EINVAL) => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("checkpointing the journal of {}", dir.display()))
        }
    }
    let mut arg: nix::libc::c_int = 0;
    // SAFETY: as above.
    match unsafe { fifreeze(raw, &mut arg) } {
        Ok(_) => {}
        Err(Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::EINVAL) => {
            tracing::debug!(
                "{}: no journal checkpoint or freeze; nothing to do",
                dir.display()
            );
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("freezing {}", dir.display())),
    }
    // SAFETY: as above.
    unsafe { fithaw(raw, &mut arg) }
        .with_context(|| format!("thawing {} after freezing it", dir.display()))?;
    Ok(())
}

/// What the filesystem holding a path is and sits on, as far as GRUB writing its environment
/// block (`save_env`) cares: GRUB writes only to a plain device, through a filesystem whose
/// blocks it can map (ext2/3/4 here), never through md RAID, device-mapper (LVM, LUKS),
/// btrfs or ZFS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// ext2/3/4 on a disk, a partition or a loop device.
    Plain,
    /// ext4 on an md RAID device (`md0`).
    Md(String),
    /// ext4 on a device-mapper device (LVM, LUKS...), by its dm name.
    DeviceMapper(String),
    /// Another filesystem (tmpfs, btrfs, zfs...), by its statfs magic.
    OtherFilesystem(i64),
}

/// The backing of the filesystem holding `path` (statfs, then the device in sysfs).
pub fn backing(path: &Path) -> Result<Backing> {
    const EXT4_MAGIC: i64 = 0xEF53;
    let fs =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    let magic = fs.filesystem_type().0 as i64;
    if magic != EXT4_MAGIC {
        return Ok(Backing::OtherFilesystem(magic));
    }
    let dev = fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    Ok(backing_in_sysfs(Path::new(&format!(
        "/sys/dev/block/{major}:{minor}"
    ))))
}

/// A block device's kind from its sysfs directory (`/sys/dev/block/M:m`). Pure but for reads.
pub fn backing_in_sysfs(dir: &Path) -> Backing {
    if let Ok(name) = fs::read_to_string(dir.join("dm/name")) {
        return Backing::DeviceMapper(name.trim().to_owned());
    }
    if dir.join("md").is_dir() {
        let name = fs::canonicalize(dir)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "md".into());
        return Backing::Md(name);
    }
    Backing::Plain
}

/// Makes a rename or unlink in `dir` durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Removes a file and makes the removal durable. A missing file is fine.
pub fn remove_durably(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(parent_dir(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Bytes a file really occupies on disk (holes are free).
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    let md = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(md.blocks() * 512)
}

/// Bytes available to unprivileged writers on the filesystem holding `path` (the reserve
/// for root is left alone on purpose: a box whose host partition is full misbehaves).
pub fn free_bytes(path: &Path) -> Result<u64> {
    let st =
        nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md_and_device_mapper_are_told_from_plain_devices() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("9:0");
        fs::create_dir_all(dev.join("md")).unwrap();
        assert!(matches!(backing_in_sysfs(&dev), Backing::Md(_)));
        let dm = dir.path().join("254:0");
        fs::create_dir_all(dm.join("dm")).unwrap();
        fs::write(dm.join("dm/name"), "vg-host\n").unwrap();
        assert_eq!(
            backing_in_sysfs(&dm),
            Backing::DeviceMapper("vg-host".into())
        );
        let plain = dir.path().join("8:1");
        fs::create_dir_all(&plain).unwrap();
        assert_eq!(backing_in_sysfs(&plain), Backing::Plain);
    }

    #[test]
    fn atomic_write_replaces_content_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/state.json");
        atomic_write(&p, b"one", 0o600).unwrap();
        atomic_write(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
