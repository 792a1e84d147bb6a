//! The server side of a release: write a new image version over the previous one in the same
//! zvol (so unchanged blocks stay unchanged and diffs stay small), trim free blocks, snapshot,
//! record its digest, and manage channels, rollout and pauses.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::core::manifest::{Blob, Release, CHANNELS};
use crate::core::version::Version;
use crate::error::refused;
use crate::server::artifacts::{Store, StoredRelease};
use crate::sys::cmd::Cmd;
use crate::sys::loopmount::ImageMount;
use crate::sys::zfs;

#[derive(Debug, Serialize)]
pub struct PublishReport {
    pub version: Version,
    pub channel: String,
    pub rollout: u8,
    pub image: Blob,
    pub seconds: f64,
}

/// Where the new content comes from.
enum Source {
    Dir(PathBuf),
    Image(ImageMount),
    Tarball(tempfile::TempDir),
}

impl Source {
    fn open(from: &Path) -> Result<Source> {
        if from.is_dir() {
            return Ok(Source::Dir(from.to_owned()));
        }
        let name = from.to_string_lossy();
        if name.ends_with(".img") {
            return Ok(Source::Image(ImageMount::open(from, true)?));
        }
        if name.contains(".tar") {
            let dir = tempfile::Builder::new()
                .prefix("upgradectl-publish-")
                .tempdir()?;
            Cmd::new("tar")
                .args(["--numeric-owner", "--xattrs", "-xpf"])
                .arg(from)
                .arg("-C")
                .arg(dir.path())
                .run()?;
            return Ok(Source::Tarball(dir));
        }
        Err(refused(format!(
            "{}: expected an ext4 .img file, a directory or a tarball",
            from.display()
        )))
    }

    fn path(&self) -> &Path {
        match self {
            Source::Dir(p) => p,
            Source::Image(m) => m.path(),
            Source::Tarball(d) => d.path(),
        }
    }
}

pub fn check_channel(channel: &str) -> Result<()> {
    if CHANNELS.contains(&channel) {
        Ok(())
    } else {
        Err(refused(format!(
            "channel {channel:?} is not one of {}",
            CHANNELS.join(", ")
        )))
    }
}

/// Publishes `version` from `from` into `zvol`, recorded on `channel` at `rollout` percent.
pub fn publish(
    store: &Store,
    zvol: &str,
    version: &Version,
    from: &Path,
    channel: &str,
    rollout: u8,
) -> Result<PublishReport> {
    let start = std::time::Instant::now();
    check_channel(channel)?;
    anyhow::ensure!(rollout <= 100, "rollout is a percentage (0-100)");
    let mut releases = store.releases()?;
    if let Some(newest) = releases.iter().map(|r| &r.release.version).max() {
        if version <= newest {
            return Err(refused(format!(
                "version {version} is not newer than {newest}, the newest published"
            )));
        }
    }
    let source = Source::open(from)?;
    let device = if zfs::exists(zvol)? {
        grow_to_fit(zvol, source.path(), version)?
    } else {
        create_volume(zvol, source.path(), from)?
    };
    write_in_place(source.path(), &device)
        .with_context(|| format!("writing {version} into {zvol}"))?;
    drop(source);
    Cmd::new("zfs")
        .args(["snapshot", &format!("{zvol}@{version}")])
        .run()?;
    let snap = zfs::snapshot_device(zvol, version)?;
    let size = block_size(&snap)?;
    let sha256 = crate::core::hashing::sha256_file(&snap)?;
    let image = Blob { size, sha256 };
    releases.push(StoredRelease {
        channel: channel.to_owned(),
        release: Release {
            version: version.clone(),
            rollout,
            paused: false,
            image: image.clone(),
        },
    });
    store.save_releases(&releases)?;
    Ok(PublishReport {
        version: version.clone(),
        channel: channel.to_owned(),
        rollout,
        image,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn block_size(dev: &Path) -> Result<u64> {
    let out = Cmd::new("blockdev").arg("--getsize64").arg(dev).stdout()?;
    out.trim()
        .parse()
        .with_context(|| format!("blockdev --getsize64 {}: {out:?}", dev.display()))
}

/// Bytes the files of `tree` take.
fn tree_bytes(tree: &Path) -> Result<u64> {
    let out = Cmd::new("du").args(["-sxb"]).arg(tree).stdout()?;
    out.split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .with_context(|| format!("du -sxb {}: {out:?}", tree.display()))
}

/// `bytes` in whole 16 KiB blocks (the zvol's volblocksize).
fn whole_blocks(bytes: u64) -> u64 {
    bytes.div_ceil(16 << 10) * (16 << 10)
}

/// The size of a volume made for a tree of `used` bytes: half again for later versions, and
/// room for ext4's own (journal, inode tables).
fn room_for(used: u64) -> u64 {
    whole_blocks(used + used / 2 + (256 << 20))
}

/// The size a volume of `size` bytes must have to take a tree of `used` bytes: `size` when the
/// tree fits beside ext4's own (a 16th of the volume and 64 MiB, generously), else the room a
/// new volume would get for it.
fn size_for(used: u64, size: u64) -> u64 {
    if used + size / 16 + (64 << 20) <= size {
        size
    } else {
        room_for(used).max(size)
    }
}

/// The image zvol's device, grown first when `tree` would not fit in it (`write_in_place`
/// grows the filesystem): a version larger than the room the first one left failed half way
/// through its rsync, out of space.
fn grow_to_fit(zvol: &str, tree: &Path, version: &Version) -> Result<PathBuf> {
    let device = zfs::volume_device(zvol)?;
    let size = block_size(&device)?;
    let want = size_for(tree_bytes(tree)?, size);
    if want == size {
        return Ok(device);
    }
    tracing::warn!("{version} does not fit in {zvol} ({size} bytes): growing it to {want}");
    Cmd::new("zfs")
        .args(["set", &format!("volsize={want}"), zvol])
        .run()?;
    // The device takes the new size from ZFS's own task: wait for it, boundedly.
    for _ in 0..100 {
        if block_size(&device)? == want {
            return Ok(device);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!(
        "{} is still {} bytes 10 s after `zfs set volsize={want}`",
        device.display(),
        block_size(&device)?
    )
}

/// A sparse zvol sized for the first image, with a fresh ext4 on it.
fn create_volume(zvol: &str, tree: &Path, from: &Path) -> Result<PathBuf> {
    let bytes = if from.is_file() && from.to_string_lossy().ends_with(".img") {
        whole_blocks(std::fs::metadata(from)?.len())
    } else {
        room_for(tree_bytes(tree)?)
    };
    if let Some((parent, _)) = zvol.rsplit_once('/') {
        zfs::ensure_filesystem(parent)?;
    }
    Cmd::new("zfs")
        .args([
            "create",
            "-s",
            "-V",
            &bytes.to_string(),
            "-o",
            "volblocksize=16K",
            "-o",
            "compression=lz4",
            zvol,
        ])
        .run()?;
    let dev = zfs::volume_device(zvol)?;
    Cmd::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            "-L",
            "image",
        ])
        .arg(&dev)
        .run()?;
    Ok(dev)
}

/// rsync in place at block level, then trim free blocks so they read as zeros and take no
/// space (and never show up in a diff). The filesystem first takes the whole volume (online,
/// mounted): `grow_to_fit` grew it, or a run killed after growing it did; nothing to do
/// otherwise.
fn write_in_place(tree: &Path, device: &Path) -> Result<()> {
    let mount = ImageMount::open(device, false)?;
    Cmd::new("resize2fs")
        .arg(device)
        .run()
        .context("growing the image's filesystem to its volume")?;
    let mut src = tree.as_os_str().to_owned();
    src.push("/");
    let mut dst = mount.path().as_os_str().to_owned();
    dst.push("/");
    Cmd::new("rsync")
        .args([
            "-aHAX",
            "--numeric-ids",
            "--inplace",
            "--no-whole-file",
            "--delete",
            "--exclude=/lost+found",
        ])
        .arg(&src)
        .arg(&dst)
        .run()?;
    Cmd::new("fstrim")
        .arg(mount.path())
        .run()
        .context("trimming free blocks")?;
    mount.close()
}

/// Changes a published release: channel, rollout percentage, pause.
pub fn release(
    store: &Store,
    version: &Version,
    channel: Option<&str>,
    rollout: Option<u8>,
    paused: Option<bool>,
) -> Result<StoredRelease> {
    let mut releases = store.releases()?;
    let r = releases
        .iter_mut()
        .find(|r| &r.release.version == version)
        .ok_or_else(|| refused(format!("version {version} is not published")))?;
    if let Some(c) = channel {
        check_channel(c)?;
        r.channel = c.to_owned();
    }
    if let Some(p) = rollout {
        anyhow::ensure!(p <= 100, "rollout is a percentage (0-100)");
        r.release.rollout = p;
    }
    if let Some(p) = paused {
        r.release.paused = p;
    }
    let out = r.clone();
    store.save_releases(&releases)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_tree_that_fits_keeps_the_volume_and_one_that_does_not_grows_it() {
        // The first version's volume, made for a 700 MiB tree: 1306 MiB.
        let size = room_for(700 * MIB);
        assert_eq!(size, 1306 * MIB);
        assert_eq!(size_for(700 * MIB, size), size);
        assert_eq!(size_for(1100 * MIB, size), size);
        // Beyond the volume less a 16th and 64 MiB: room as for a new volume of that tree.
        let grown = size_for(1200 * MIB, size);
        assert_eq!(grown, room_for(1200 * MIB));
        assert!(grown > size && grown % (16 << 10) == 0);
        // Never smaller than it is.
        assert_eq!(size_for(0, 4096 * MIB), 4096 * MIB);
    }
}
