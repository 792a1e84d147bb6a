//! Receiving a verified artifact: decompress on all cores into `zfs receive`.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result};

use crate::core::version::Version;
use crate::sys::zfs;

/// Decompresses the verified artifact on all cores, in at most `max_memory` bytes, into `zfs
/// receive -s -F`. A receive left half done by an interruption is aborted first: the artifact
/// is local and verified, so receiving it again costs no download.
pub fn receive(
    file: &Path,
    zvol: &str,
    base: Option<&Version>,
    to: &Version,
    max_memory: u64,
) -> Result<()> {
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
    let mut xz = xz_reader(std::fs::File::open(file)?, max_memory)?;
    let copied = std::io::copy(&mut xz, &mut stdin).and_then(|_| stdin.flush());
    drop(stdin);
    if let Err(e) = &copied {
        // Refused before the receive's own error (it saw its input end early) hides why.
        if let Some(refusal) = memory_refusal(e, max_memory) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(refusal);
        }
    }
    let output = child.wait_with_output()?;
    crate::sys::cmd::check_status(&cmd, &output)?;
    copied.context("decompressing into zfs receive")?;
    Ok(())
}

/// A decoder that stopped at the memory limit, as refused input (exit 2).
pub fn memory_refusal(e: &std::io::Error, max_memory: u64) -> Option<anyhow::Error> {
    let inner = e.get_ref()?.downcast_ref::<liblzma::stream::Error>()?;
    matches!(inner, liblzma::stream::Error::MemLimit).then(|| {
        crate::error::refused(format!(
            "the artifact needs more than {} MiB to decompress (download.max_decoder_mib)",
            max_memory >> 20
        ))
    })
}

/// Decompresses xz on all cores (the server writes independent blocks for this), in at most
/// `max_memory` bytes: fewer threads when they would take more, an error when even one would.
pub fn xz_reader<R: std::io::Read>(
    input: R,
    max_memory: u64,
) -> Result<liblzma::read::XzDecoder<std::io::BufReader<R>>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(threads)
        .memlimit_threading(max_memory)
        .memlimit_stop(max_memory)
        .decoder()
        .context("creating the xz decoder")?;
    Ok(liblzma::read::XzDecoder::new_stream(
        std::io::BufReader::new(input),
        stream,
    ))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// xz at preset 9: its 64 MiB dictionary is what a decoder must allocate.
    fn xz9(data: &[u8]) -> Vec<u8> {
        let stream =
            liblzma::stream::Stream::new_easy_encoder(9, liblzma::stream::Check::Crc64).unwrap();
        let mut enc = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn an_artifact_needing_more_memory_than_the_limit_is_refused() {
        let data = b"a small stream with a large dictionary".repeat(100);
        let xz = xz9(&data);
        let mut out = Vec::new();
        xz_reader(&xz[..], 256 << 20)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data, "within the default limit");
        let err = xz_reader(&xz[..], 32 << 20)
            .unwrap()
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        let refusal = memory_refusal(&err, 32 << 20).expect("a memory refusal");
        assert_eq!(
            crate::error::classify(&refusal).0,
            crate::error::Exit::Refused
        );
        assert!(format!("{refusal:#}").contains("32 MiB"), "{refusal:#}");
    }
}
