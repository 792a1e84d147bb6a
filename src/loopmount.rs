//! An image file mounted through a loop device, under a guard that always unmounts and
//! detaches, also on error.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use loopdev::{LoopControl, LoopDevice};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A mounted ext4 image. Dropping it unmounts and detaches; if unmounting fails the mount
/// point is left alone (never delete what might still be a mounted filesystem).
pub struct ImageMount {
    dir: Option<tempfile::TempDir>,
    device: Option<LoopDevice>,
    mounted: bool,
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
        };
        let control = LoopControl::open()
            .context("opening /dev/loop-control")
            .with_context(ctx)?;
        let device = control
            .next_free()
            .context("finding a free loop device")
            .with_context(ctx)?;
        device
            .with()
            .read_only(read_only)
            .autoclear(true)
            .attach(image)
            .context("attaching a loop device")
            .with_context(ctx)?;
        let dev_path: PathBuf = device
            .path()
            .context("loop device has no path")
            .with_context(ctx)?;
        guard.device = Some(device);
        let flags = if read_only {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
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
        Ok(guard)
    }

    /// Where the image's root is mounted.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("dir lives until drop").path()
    }

    /// Unmounts and detaches now, reporting failure (drop does the same silently).
    pub fn close(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if self.mounted {
            nix::unistd::sync();
            umount2(self.path(), MntFlags::empty())
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
        Ok(())
    }
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::error!("{e:#}");
        }
    }
}
