//! Where send streams come from: the trait the builds use, and the real source, the snapshots
//! of the server's image zvol.

use std::io::Write;

use anyhow::{Context, Result};

use crate::core::version::Version;
use crate::sys::zfs;

/// Where send streams come from.
pub trait StreamSource: Send + Sync {
    /// Writes the uncompressed stream of `to`, incremental from `from`, into `out`.
    fn send(&self, from: Option<&Version>, to: &Version, out: &mut dyn Write) -> Result<()>;
    /// Whether the source holds version `v`.
    fn has(&self, v: &Version) -> Result<bool>;
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
}
