//! Receiving a verified artifact: decompress on all cores into `zfs receive`.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result};

use crate::core::version::Version;
use crate::sys::zfs;

/// Decompresses the verified artifact on all cores into `zfs receive -s -F`. A receive left
/// half done by an interruption is aborted first: the artifact is local and verified, so
/// receiving it again costs no download.
pub fn receive(file: &Path, zvol: &str, base: Option<&Version>, to: &Version) -> Result<()> {
    if zfs::snapshots(zvol)?.contains(to) {
        return Ok(());
    }
    if let Some((parent, _)) = zvol.rsplit_once('/') {
        zfs::ensure_filesystem(parent)?;
    }
    if zfs::exists(zvol)? {
        zfs::abort_receive(zvol)?;
        if base.is_none() {
            // A full stream replaces the zvol: its old snapshots (diff bases) go with it. The
            // image files on the host partition do not depend on them.
            tracing::warn!("replacing {zvol} with a full stream of {to}");
            zfs::destroy_recursive(zvol)?;
        }
    } else if base.is_some() {
        anyhow::bail!("{zvol} does not exist; an incremental stream needs its base");
    }
    let cmd = zfs::receive_cmd(zvol);
    let mut child = cmd
        .to_command()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", cmd.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut xz = xz_reader(std::fs::File::open(file)?)?;
    let copied = std::io::copy(&mut xz, &mut stdin).and_then(|_| stdin.flush());
    drop(stdin);
    let output = child.wait_with_output()?;
    crate::sys::cmd::check_status(&cmd, &output)?;
    copied.context("decompressing into zfs receive")?;
    Ok(())
}

/// Decompresses xz on all cores (the server writes independent blocks for this).
pub fn xz_reader<R: std::io::Read>(
    input: R,
) -> Result<liblzma::read::XzDecoder<std::io::BufReader<R>>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(threads)
        .memlimit_stop(u64::MAX)
        .decoder()
        .context("creating the xz decoder")?;
    Ok(liblzma::read::XzDecoder::new_stream(
        std::io::BufReader::new(input),
        stream,
    ))
}
