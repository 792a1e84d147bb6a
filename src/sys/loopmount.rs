//! An image file mounted through a loop device, under a guard that always unmounts and
//! detaches, also on error; and the private mount namespace that makes sure a killed process
//! leaks neither the mount nor the loop device.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use loopdev::{LoopControl, LoopDevice};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Moves this process into a mount namespace of its own, a slave of the system's: it still sees
/// the system's mounts, but its own mounts are invisible outside and vanish with it. A
/// process killed with an image mounted (SIGKILL, OOM, power-off of its cgroup) then leaks no
/// mount, and its loop device (autoclear) detaches when the namespace goes. Call it while the
/// process has one thread (unshare refuses otherwise). Without the privilege (a non-root
/// `status`) there is nothing to mount anyway: that is not an error.
pub fn private_mount_namespace() -> Result<()> {
    use nix::sched::{unshare, CloneFlags};
    match unshare(CloneFlags::CLONE_NEWNS) {
        Ok(()) => {}
        Err(nix::errno::Errno::EPERM) => {
            tracing::debug!("no private mount namespace: not privileged");
            return Ok(());
        }
        Err(e) => return Err(e).context("unsharing the mount namespace"),
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .context("making this process's mounts private")
}

/// Loop devices that hold `image` now (from sysfs), e.g. `/dev/loop3`.
pub fn attached_to(image: &Path) -> Result<Vec<PathBuf>> {
    let want =
        std::fs::canonicalize(image).with_context(|| format!("resolving {}", image.display()))?;
    let mut found = Vec::new();
    let entries = match std::fs::read_dir("/sys/block") {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).context("listing /sys/block"),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
            continue;
        };
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = Path::new(backing.trim_end_matches('\n'));
        if backing == want || std::fs::canonicalize(backing).is_ok_and(|b| b == want) {
            found.push(Path::new("/dev").join(name));
        }
    }
    Ok(found)
}

/// A mounted ext4 image. Dropping it unmounts and detaches; if unmounting fails the mount
/// point is left alone (never delete what might still be a mounted filesystem).
pub struct ImageMount {
    dir: Option<tempfile::TempDir>,
    device: Option<LoopDevice>,
    mounted: bool,
    /// The image file, when mounted read-write: made durable after unmounting.
    writable: Option<PathBuf>,
}

impl ImageMount {
    /// Attaches `image` to a free loop device and mounts it (read-write unless `read_only`).
    pub fn open(image: &Path, read_only: bool) -> Result<ImageMount> {
        let ctx = || format!("mounting image {}", image.display());
        let dir = tempfile::Builder::new()
            .prefix("upgradectl-mnt-")
            .tempdir()
            .with_context(ctx)?;
        let mut guard = ImageMount {
            dir: Some(dir),
            device: None,
            mounted: false,
            writable: None,
        };
        // A block device (a zvol on the server) is mounted as it is, so that discards reach
        // it; an image file goes through a loop device.
        let is_block = std::fs::metadata(image)
            .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false);
        let dev_path: PathBuf = if is_block {
            image.to_owned()
        } else {
            // Two read-write mounts of one filesystem corrupt it, and a read-only look at an
            // image being written reads garbage: never mount an image someone else holds.
            let holders = attached_to(image).with_context(ctx)?;
            if !holders.is_empty() {
                anyhow::bail!(
                    "image {} is already attached to {}; is it mounted elsewhere? \
                     (unmount it or `losetup -d` it first)",
                    image.display(),
                    holders
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let device = attach(image, read_only).with_context(ctx)?;
            let path = device
                .path()
                .context("loop device has no path")
                .with_context(ctx)?;
            guard.device = Some(device);
            path
        };
        // Nothing in an image we inspect or migrate into is ever run or opened as a device.
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(
            Some(&dev_path),
            guard.path(),
            Some("ext4"),
            flags,
            None::<&str>,
        )
        .with_context(|| format!("mount {} on {}", dev_path.display(), guard.path().display()))
        .with_context(ctx)?;
        guard.mounted = true;
        if !read_only {
            guard.writable = Some(image.to_owned());
        }
        Ok(guard)
    }

    /// Where the image's root is mounted.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("dir lives until drop").path()
    }

    /// Unmounts, detaches and, for a read-write mount, makes the image file durable, reporting
    /// failure (drop does the same silently). Only after this may anything point at the image.
    pub fn close(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if self.mounted {
            // Unmounting writes the filesystem back through the loop device into the image
            // file's page cache; fsyncing that one file below makes it durable. (A global
            // sync() would also wait for every other write on the box, e.g. a download.)
            unmount_retrying(self.path())
                .with_context(|| format!("unmounting {}", self.path().display()))
                .inspect_err(|_| {
                    // Keep the directory: it may still hold a mounted filesystem.
                    if let Some(d) = self.dir.take() {
                        let _ = d.keep();
                    }
                })?;
            self.mounted = false;
        }
        if let Some(dev) = self.device.take() {
            // With autoclear the kernel detaches on unmount; detaching again may say ENXIO.
            let _ = dev.detach();
        }
        if let Some(image) = self.writable.take() {
            std::fs::File::open(&image)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing image {}", image.display()))?;
        }
        Ok(())
    }
}

/// Unmounts `dir`, retrying while it is busy: a child forked by another thread may briefly
/// hold a descriptor under it (between fork and exec).
fn unmount_retrying(dir: &Path) -> nix::Result<()> {
    let mut tries = 0;
    loop {
        match umount2(dir, MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) if tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10 * tries));
            }
            other => return other,
        }
    }
}

/// How often a loop device taken by someone else between "find a free one" and "attach" is
/// skipped before giving up.
const ATTACH_TRIES: usize = 32;

/// Attaches `image` to a free loop device. `LOOP_CTL_GET_FREE` only names a free device; any
/// other process (another upgradectl verb, `mount -o loop`, udisks) may attach it first, which
/// shows as `EBUSY`: then take the next free one, as losetup does.
fn attach(image: &Path, read_only: bool) -> Result<LoopDevice> {
    let control = LoopControl::open().context("opening /dev/loop-control")?;
    let mut tries = 0;
    loop {
        let device = control.next_free().context("finding a free loop device")?;
        match device
            .with()
            .read_only(read_only)
            .autoclear(true)
            .attach(image)
        {
            Ok(()) => return Ok(device),
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) && tries < ATTACH_TRIES => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(tries as u64));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("attaching {} to a loop device", image.display()))
            }
        }
    }
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::error!("{e:#}");
        }
    }
}
