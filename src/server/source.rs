//! Where send streams come from: the trait the builds use, and the real source, the snapshots
//! of the server's image zvol.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::core::version::Version;
use crate::sys::zfs;

/// Where send streams come from.
pub trait StreamSource: Send + Sync {
    /// Writes the uncompressed stream of `to`, incremental from `from`, into `out`.
    fn send(&self, from: Option<&Version>, to: &Version, out: &mut dyn Write) -> Result<()>;
    /// Whether the source holds version `v`.
    fn has(&self, v: &Version) -> Result<bool>;
    /// The bytes every box that received `v` holds as its snapshot of `v`, as a file to map:
    /// what a `zstd-ref` diff from `v` is compressed against.
    fn reference(&self, v: &Version) -> Result<PathBuf>;
    /// The length of the full stream of `v`, without sending it.
    fn full_len(&self, v: &Version) -> Result<u64>;
}

/// The real source: snapshots of the server's image zvol.
pub struct ZfsSource {
    pub zvol: String,
}

impl StreamSource for ZfsSource {
    fn send(&self, from: Option<&Version>, to: &Version, out: &mut dyn Write) -> Result<()> {
        let cmd = zfs::send_cmd(&self.zvol, from, to);
        let mut child = cmd
            .to_command()
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", cmd.display()))?;
        let mut stdout = child.stdout.take().expect("piped");
        let copied = std::io::copy(&mut stdout, out);
        let output = child.wait_with_output()?;
        crate::sys::cmd::check_status(&cmd, &output)?;
        copied.with_context(|| format!("reading {}", cmd.display()))?;
        Ok(())
    }

    fn has(&self, v: &Version) -> Result<bool> {
        Ok(zfs::snapshots(&self.zvol)?.contains(v))
    }

    /// The snapshot's block device: boxes receive the zvol itself, so theirs is the same.
    fn reference(&self, v: &Version) -> Result<PathBuf> {
        zfs::snapshot_device(&self.zvol, v)
    }

    fn full_len(&self, v: &Version) -> Result<u64> {
        zfs::send_size(&self.zvol, v)
    }
}
